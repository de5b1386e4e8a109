//! Re-replication decisions, pure: from each block's live replica holders and its target count,
//! choose copies (most endangered blocks first, a bounded number per source datanode) and excess
//! replicas to delete. No I/O, no clocks; `state.rs` feeds it and carries the plan out.

use std::collections::{HashMap, HashSet};

use lode_protocol::BlockId;

/// A block as repair sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockView {
    /// Block id.
    pub id: BlockId,
    /// Target replica count.
    pub target: usize,
    /// Live, healthy holders that count toward the target.
    pub holders: Vec<String>,
    /// Other live holders that may still be copied from (decommissioning datanodes).
    pub extra_sources: Vec<String>,
    /// Copies already under way.
    pub pending: usize,
    /// Bytes (to check the target has room).
    pub len: u64,
}

/// A live datanode as repair sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Name.
    pub name: String,
    /// Bytes free.
    pub remaining: u64,
    /// Copies it is already sending.
    pub copies_out: usize,
    /// Whether it may receive new replicas (false while decommissioning).
    pub accepts: bool,
}

/// What to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// (source, block, target) copies to start.
    pub copies: Vec<(String, BlockId, String)>,
    /// (holder, block) replicas to delete.
    pub deletes: Vec<(String, BlockId)>,
}

/// Plans repairs. Blocks with the fewest live replicas go first; a source sends at most
/// `copies_per_source` copies at once; a target never already holds the block; excess replicas are
/// deleted from the holders with the least free space, never going below the target.
pub fn plan(blocks: &[BlockView], nodes: &[NodeView], copies_per_source: usize) -> Plan {
    let mut out = Plan::default();
    let mut busy: HashMap<&str, usize> = nodes
        .iter()
        .map(|n| (n.name.as_str(), n.copies_out))
        .collect();
    let mut room: HashMap<&str, u64> = nodes
        .iter()
        .map(|n| (n.name.as_str(), n.remaining))
        .collect();
    let live: HashSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    let mut under: Vec<&BlockView> = blocks
        .iter()
        .filter(|b| !(b.holders.is_empty() && b.extra_sources.is_empty()))
        .filter(|b| b.holders.len() + b.pending < b.target)
        .collect();
    under.sort_by_key(|b| (b.holders.len(), b.id));
    for b in under {
        let mut needed = b.target - b.holders.len() - b.pending;
        while needed > 0 {
            let source = b
                .holders
                .iter()
                .chain(&b.extra_sources)
                .filter(|h| live.contains(h.as_str()))
                .filter(|h| busy.get(h.as_str()).copied().unwrap_or(usize::MAX) < copies_per_source)
                .min_by_key(|h| busy.get(h.as_str()).copied().unwrap_or(0));
            let chosen: HashSet<&str> = out
                .copies
                .iter()
                .filter(|(_, id, _)| *id == b.id)
                .map(|(_, _, t)| t.as_str())
                .collect();
            let target = nodes
                .iter()
                .filter(|n| {
                    n.accepts && !b.holders.contains(&n.name) && !b.extra_sources.contains(&n.name)
                })
                .filter(|n| !chosen.contains(n.name.as_str()))
                .filter(|n| room.get(n.name.as_str()).copied().unwrap_or(0) >= b.len)
                .max_by_key(|n| {
                    (
                        room.get(n.name.as_str()).copied().unwrap_or(0),
                        std::cmp::Reverse(n.name.clone()),
                    )
                });
            let (Some(source), Some(target)) = (source, target) else {
                break;
            };
            *busy.entry(source.as_str()).or_default() += 1;
            if let Some(r) = room.get_mut(target.name.as_str()) {
                *r = r.saturating_sub(b.len);
            }
            out.copies.push((source.clone(), b.id, target.name.clone()));
            needed -= 1;
        }
    }
    for b in blocks
        .iter()
        .filter(|b| b.pending == 0 && b.holders.len() > b.target)
    {
        let mut holders: Vec<&String> = b.holders.iter().collect();
        holders.sort_by_key(|h| (room.get(h.as_str()).copied().unwrap_or(0), (*h).clone()));
        for h in holders.into_iter().take(b.holders.len() - b.target) {
            out.deletes.push((h.clone(), b.id));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: &str, remaining: u64) -> NodeView {
        NodeView {
            name: n.into(),
            remaining,
            copies_out: 0,
            accepts: true,
        }
    }

    fn block(id: u64, target: usize, holders: &[&str]) -> BlockView {
        BlockView {
            id: BlockId(id),
            target,
            holders: holders.iter().map(|h| h.to_string()).collect(),
            extra_sources: vec![],
            pending: 0,
            len: 10,
        }
    }

    #[test]
    fn most_endangered_first_distinct_targets_and_throttled() {
        let nodes = vec![
            node("a", 100),
            node("b", 100),
            node("c", 100),
            node("d", 1000),
        ];
        let blocks = vec![
            block(1, 3, &["a", "b"]),
            block(2, 3, &["a"]),
            block(3, 2, &["c", "d"]),
        ];
        let p = plan(&blocks, &nodes, 1);
        // block 2 (one replica) goes first; "a" may send only one copy, so block 1 uses "b".
        assert_eq!(p.copies[0], ("a".to_string(), BlockId(2), "d".to_string()));
        for (src, id, tgt) in &p.copies {
            let b = blocks.iter().find(|b| b.id == *id).unwrap();
            assert!(b.holders.contains(src) && !b.holders.contains(tgt));
        }
        let sources: Vec<&String> = p.copies.iter().map(|(s, _, _)| s).collect();
        let mut dedup = sources.clone();
        dedup.dedup();
        assert_eq!(
            sources.len(),
            dedup.len(),
            "at most one copy per source: {p:?}"
        );
        // Block 2's second copy waits for a free source; no target is chosen twice for one block.
        let b2: Vec<&String> = p
            .copies
            .iter()
            .filter(|(_, id, _)| *id == BlockId(2))
            .map(|(_, _, t)| t)
            .collect();
        let mut d = b2.clone();
        d.sort();
        d.dedup();
        assert_eq!(b2.len(), d.len());
        assert!(p.deletes.is_empty());
    }

    #[test]
    fn excess_replicas_are_deleted_down_to_the_target() {
        let nodes = vec![node("a", 5), node("b", 50), node("c", 500)];
        let p = plan(&[block(1, 1, &["a", "b", "c"])], &nodes, 2);
        assert_eq!(
            p.deletes,
            vec![("a".to_string(), BlockId(1)), ("b".to_string(), BlockId(1))]
        );
        let pending = BlockView {
            pending: 1,
            ..block(2, 1, &["a", "b"])
        };
        assert!(
            plan(&[pending], &nodes, 2).deletes.is_empty(),
            "no deletes while copies run"
        );
    }

    #[test]
    fn a_draining_node_is_a_source_but_never_a_target_or_a_counted_holder() {
        let mut nodes = vec![node("a", 100), node("b", 100), node("c", 100)];
        nodes[0].accepts = false;
        let b = BlockView {
            holders: vec!["b".into()],
            extra_sources: vec!["a".into()],
            ..block(1, 2, &[])
        };
        let p = plan(&[b], &nodes, 1);
        assert_eq!(p.copies.len(), 1);
        assert_eq!(p.copies[0].2, "c");
        // Its replicas are never counted as excess either.
        let full = BlockView {
            holders: vec!["b".into(), "c".into()],
            extra_sources: vec!["a".into()],
            ..block(2, 2, &[])
        };
        assert!(plan(&[full], &nodes, 1).deletes.is_empty());
    }

    #[test]
    fn nothing_to_copy_without_a_holder_or_a_target() {
        let nodes = vec![node("a", 100)];
        assert!(plan(&[block(1, 3, &["a"])], &nodes, 2).copies.is_empty());
        assert!(plan(&[block(1, 3, &[])], &nodes, 2).copies.is_empty());
    }
}
