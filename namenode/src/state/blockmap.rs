//! The block map: where each block's replicas are and the rule for which count (length and value
//! equal the committed block's; provisional while a block is written; stale otherwise), exact
//! deletes, corrupt replicas, re-replication and excess removal (the replicas that stay verify
//! first), and read locations.

use super::*;

/// A re-replication copy under way.
#[derive(Clone, Debug)]
pub struct PendingCopy {
    /// The block.
    pub block: BlockId,
    /// Sending datanode.
    pub source: String,
    /// Receiving datanode.
    pub target: String,
    /// When to give up waiting for the target's report and plan again.
    pub deadline: Instant,
}

/// Copies one datanode sends at once.
pub const COPIES_PER_SOURCE: usize = 4;

/// Verifications one datanode runs at once before excess deletes (reads only, so more than copies).
pub const VERIFIES_PER_NODE: usize = 16;
/// A verification not reported back this long is asked again (one block read: seconds).
pub const VERIFY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// A delete command not answered this long is sent again (its heartbeat reply may have been lost).
pub const DELETE_RESEND: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a copy may take before it is planned again.
pub const COPY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Where a block's replicas are.
///
/// The rule for replicas (DESIGN.md, durability rules): a replica counts only when its reported
/// length and block value equal the committed block's. One that differs is stale (an old replica
/// under a reused id, or one rewritten behind the namenode's back): it is never listed, never a copy
/// source, never counted, and it is deleted. While a block is still being written it has no
/// committed value yet: replicas reported then are held as provisional (never listed or counted)
/// and judged by the same rule when the writer commits the block.
#[derive(Debug)]
pub struct BlockEntry {
    /// Owning file.
    pub inode: InodeId,
    /// Target replica count.
    pub replication: u8,
    /// Whether its file is complete.
    pub complete: bool,
    /// The committed length and value; `None` while the block is being written.
    pub committed: Option<(u64, Blake3Cv)>,
    /// Datanodes whose replica matches the committed block: the replicas that count.
    pub locations: BTreeSet<String>,
    /// Replicas reported before the block was committed, with what they hold.
    pub provisional: BTreeMap<String, ReportedBlock>,
    /// When each counted replica last proved its bytes by a verified read: written or copied
    /// (every piece is checked on the way in) or verified on request. A registration's report
    /// only claims a replica; it proves nothing.
    pub verified: BTreeMap<String, Instant>,
    /// Length of the block (committed, or the largest provisional replica).
    pub len: u64,
    /// Whether a replica of it has counted since the state was built (see
    /// [`State::startup_seen`]).
    pub seen: bool,
}

impl BlockEntry {
    /// A block of `inode` with no replica known yet; `committed` is `None` while it is written.
    pub fn new(
        inode: InodeId,
        replication: u8,
        complete: bool,
        committed: Option<(u64, Blake3Cv)>,
    ) -> BlockEntry {
        BlockEntry {
            inode,
            replication,
            complete,
            committed,
            locations: BTreeSet::new(),
            provisional: BTreeMap::new(),
            verified: BTreeMap::new(),
            len: committed.map_or(0, |c| c.0),
            seen: false,
        }
    }

    /// The committed replica as a delete command names it.
    pub(super) fn committed_replica(&self, id: BlockId) -> Option<ReportedBlock> {
        self.committed
            .map(|(len, cv)| ReportedBlock { id, len, cv })
    }
}

/// Most blocks a follower keeps early replicas for (see [`State::orphans`]).
const ORPHANS_MAX: usize = 1 << 20;

impl State {
    /// Queues the deletion of exactly `replica` on `name`.
    pub(super) fn delete_on(&mut self, name: &str, replica: ReportedBlock) {
        if let Some(dn) = self.datanodes.get_mut(name) {
            dn.blocks.remove(&replica.id);
            dn.pending_delete.push(replica);
        }
    }

    pub(super) fn forget_block(&mut self, block: BlockId) {
        self.repair_due.remove(&block);
        if let Some(entry) = self.blocks.remove(&block) {
            if let Some(replica) = entry.committed_replica(block) {
                for name in &entry.locations {
                    self.delete_on(name, replica);
                }
            }
            for (name, replica) in entry.provisional {
                self.delete_on(&name, replica);
            }
        }
        self.corrupt.retain(|(b, _)| *b != block);
        // Copies and verifications of it still queued or under way are moot.
        self.copies.retain(|c| c.block != block);
        self.verifying.retain(|(b, _), _| *b != block);
        for dn in self.datanodes.values_mut() {
            dn.pending_copy.retain(|c| c.block != block);
        }
    }

    /// The writer committed a block's length and value: provisional replicas that hold exactly
    /// that now count; the others are stale and deleted.
    pub(super) fn commit_block(&mut self, c: &CommittedBlock, now: Instant) {
        let Some(entry) = self.blocks.get_mut(&c.id) else {
            return;
        };
        entry.committed = Some((c.len, c.cv));
        entry.len = c.len;
        let provisional = std::mem::take(&mut entry.provisional);
        for (name, replica) in provisional {
            // Reported while the block was written: the write checked every piece. One that does
            // not hold what the writer committed is stale.
            if let Some(stale) = self.add_replica(&name, replica, Some(now)) {
                self.delete_on(&name, stale);
            }
        }
    }

    /// Counts a reported replica if it matches its block; returns it when it must be deleted
    /// instead (unknown block, stale, or marked corrupt on this node). `proved` is when the
    /// replica's bytes were last read and verified, for replicas just written, copied or verified.
    pub(super) fn add_replica(
        &mut self,
        name: &str,
        replica: ReportedBlock,
        proved: Option<Instant>,
    ) -> Option<ReportedBlock> {
        self.max_reported_block = self.max_reported_block.max(replica.id);
        // (Most reports find no corrupt replica at all: no key is made for them.)
        if !self.corrupt.is_empty() {
            let key = (replica.id, name.to_string());
            if self.corrupt.contains(&key) {
                if proved.is_none() {
                    // The bad replica reported again (a registration): it still does not count.
                    return Some(replica);
                }
                // A replica written, copied or verified since: its bytes were checked on the way
                // in.
                self.corrupt.remove(&key);
            }
        }
        let Some(entry) = self.blocks.get_mut(&replica.id) else {
            if self.follower {
                // A follower may not have applied the edit that added the block yet: the
                // replica waits for it here (up to a bound), and is never called stale on this
                // member's word.
                if self.orphans.len() >= ORPHANS_MAX && !self.orphans.contains_key(&replica.id) {
                    return None;
                }
                let waiting = self.orphans.entry(replica.id).or_default();
                waiting.retain(|(n, _)| n != name);
                waiting.push((name.to_string(), replica));
                return None;
            }
            return Some(replica);
        };
        match entry.committed {
            None => {
                entry.len = entry.len.max(replica.len);
                entry.provisional.insert(name.to_string(), replica);
            }
            Some((len, cv)) if replica.len == len && replica.cv == cv => {
                entry.locations.insert(name.to_string());
                // One replica too many: an excess one to remove.
                let over = entry.locations.len() > usize::from(entry.replication);
                if entry.complete && !entry.seen {
                    entry.seen = true;
                    self.startup_seen += 1;
                }
                if let Some(t) = proved {
                    entry.verified.insert(name.to_string(), t);
                }
                // Corrupt replicas kept only because nothing better existed can go now.
                let kept: Vec<String> = if self.corrupt.is_empty() {
                    vec![]
                } else {
                    self.corrupt
                        .range((replica.id, String::new())..)
                        .take_while(|(b, _)| *b == replica.id)
                        .filter(|(_, n)| n != name)
                        .map(|(_, n)| n.clone())
                        .collect()
                };
                for n in kept {
                    self.corrupt.remove(&(replica.id, n.clone()));
                    self.delete_on(&n, replica);
                }
                self.copies
                    .retain(|c| !(c.block == replica.id && c.target == name));
                if over {
                    self.repair_due.insert(replica.id);
                }
            }
            Some(_) => {
                entry.locations.remove(name);
                entry.verified.remove(name);
                self.repair_due.insert(replica.id);
                self.stale_replicas += 1;
                self.cancel_copies_from(name, replica.id);
                tracing::warn!(block = %replica.id, datanode = name, len = replica.len,
                    "stale replica (its length or value differs from the committed block's); deleting it");
                self.event(format!(
                    "stale replica of block {} on {name} is deleted",
                    replica.id
                ));
                return Some(replica);
            }
        }
        if let Some(dn) = self.datanodes.get_mut(name) {
            dn.blocks.insert(replica.id);
        }
        None
    }

    /// Drops copies of `block` from `name` still queued or under way (its replica is no source).
    pub(super) fn cancel_copies_from(&mut self, name: &str, block: BlockId) {
        self.copies
            .retain(|c| !(c.block == block && c.source == name));
        if let Some(dn) = self.datanodes.get_mut(name) {
            dn.pending_copy.retain(|c| c.block != block);
        }
    }

    /// Forgets that `name` holds a replica of `block` (it was deleted or lost).
    pub(super) fn drop_location(&mut self, name: &str, block: BlockId) {
        if let Some(e) = self.blocks.get_mut(&block) {
            if e.locations.remove(name) {
                self.repair_due.insert(block);
            }
            e.provisional.remove(name);
            e.verified.remove(name);
        }
        self.cancel_copies_from(name, block);
    }

    /// Plans re-replication and excess-replica removal for every complete file in one go (see
    /// [`State::plan_blocks`]).
    #[cfg(test)]
    pub(crate) fn plan_repairs(&mut self, now: Instant) {
        let ids: Vec<BlockId> = self.blocks.keys().copied().collect();
        for chunk in ids.chunks(SCAN_CHUNK) {
            self.plan_blocks(chunk, now);
        }
    }

    /// Starts a repair tick and returns the blocks it plans (the server plans them a
    /// [`SCAN_CHUNK`] per hold of the lock, with [`State::plan_blocks`]): every block for the
    /// first tick out of safe mode; after that the blocks marked due since (a replica lost,
    /// deleted, found stale or corrupt, or one too many; a file completed or its replication
    /// changed; a copy timed out; every block of a datanode that died, came back or started or
    /// stopped draining, which this notes here), those that were not healthy at the last tick,
    /// and the next chunk of a slow sweep over all blocks, a safety net for anything no event
    /// marks. A block map of at most a chunk is thus planned whole at every tick.
    pub fn repair_tick(&mut self, now: Instant) -> Vec<BlockId> {
        self.check_safemode(now);
        if self.safemode != SafeMode::Off || self.follower {
            self.repair_full = true;
            return vec![];
        }
        if std::mem::take(&mut self.repair_full) {
            self.repair_due.clear();
            return self.blocks.keys().copied().collect();
        }
        let mut due = std::mem::take(&mut self.repair_due);
        let marks: Vec<(String, (bool, bool))> = self
            .datanodes
            .iter()
            .map(|(n, dn)| {
                let mark = (
                    self.node_state(dn, now) == NodeState::Dead || dn.needs_report,
                    self.decommission.contains(n),
                );
                (n.clone(), mark)
            })
            .collect();
        for (name, mark) in marks {
            if let Some(dn) = self.datanodes.get_mut(&name) {
                if dn.repair_mark != Some(mark) {
                    // A node seen for the first time is marked by its replicas as they come.
                    if dn.repair_mark.is_some() {
                        due.extend(dn.blocks.iter().copied());
                    }
                    dn.repair_mark = Some(mark);
                }
            }
        }
        for c in self.copies.iter().filter(|c| c.deadline <= now) {
            due.insert(c.block);
        }
        let mut sweep = self.blocks.range(self.repair_sweep..);
        let taken: Vec<BlockId> = sweep
            .by_ref()
            .take(self.sweep_chunk)
            .map(|(id, _)| *id)
            .collect();
        self.repair_sweep = sweep.next().map_or(BlockId(0), |(id, _)| *id);
        due.extend(taken);
        due.into_iter().collect()
    }

    /// Plans re-replication and excess-replica removal for the complete blocks among `ids` (see
    /// `repair.rs`) and queues the commands for the datanodes' next heartbeats. A block that is
    /// not healthy afterwards (fewer or more counted replicas than its replication) stays due for
    /// the next tick.
    pub fn plan_blocks(&mut self, ids: &[BlockId], now: Instant) {
        self.check_safemode(now);
        if self.safemode != SafeMode::Off {
            return;
        }
        self.copies.retain(|c| c.deadline > now);
        let live: BTreeSet<&String> = self
            .datanodes
            .iter()
            .filter(|(_, dn)| self.node_state(dn, now) != NodeState::Dead && !dn.needs_report)
            .map(|(n, _)| n)
            .collect();
        let mut pending: BTreeMap<BlockId, usize> = BTreeMap::new();
        let mut copies_out: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &self.copies {
            *pending.entry(c.block).or_default() += 1;
            *copies_out.entry(c.source.as_str()).or_default() += 1;
        }
        let blocks: Vec<crate::repair::BlockView> = ids
            .iter()
            .filter_map(|id| self.blocks.get_key_value(id))
            .filter(|(_, e)| e.complete)
            .map(|(id, e)| crate::repair::BlockView {
                id: *id,
                target: usize::from(e.replication),
                holders: e
                    .locations
                    .iter()
                    .filter(|n| live.contains(n) && !self.decommission.contains(*n))
                    .cloned()
                    .collect(),
                extra_sources: e
                    .locations
                    .iter()
                    .filter(|n| live.contains(n) && self.decommission.contains(*n))
                    .cloned()
                    .collect(),
                pending: pending.get(id).copied().unwrap_or(0),
                len: e.len,
            })
            .collect();
        let nodes: Vec<crate::repair::NodeView> = self
            .datanodes
            .iter()
            .filter(|(n, dn)| live.contains(n) && self.node_state(dn, now) == NodeState::Live)
            .map(|(n, dn)| crate::repair::NodeView {
                name: n.clone(),
                remaining: dn.space.block_room.saturating_sub(dn.promised),
                copies_out: copies_out.get(n.as_str()).copied().unwrap_or(0),
                accepts: !self.decommission.contains(n),
            })
            .collect();
        let plan = crate::repair::plan(&blocks, &nodes, COPIES_PER_SOURCE);
        for (source, block, target) in plan.copies {
            let Some(t) = self.target(&target) else {
                continue;
            };
            if let Some(dn) = self.datanodes.get_mut(&source) {
                tracing::info!(%block, %source, %target, "re-replicating");
                self.events.push_back((
                    now,
                    format!("re-replicating block {block} from {source} to {target}"),
                ));
                dn.pending_copy.push(CopyCommand {
                    block,
                    targets: vec![t],
                    token: None,
                });
                self.copies.push(PendingCopy {
                    block,
                    source,
                    target,
                    deadline: now + COPY_TIMEOUT,
                });
            }
        }
        // A verification that never came back (its command or report lost) is asked again.
        self.verifying
            .retain(|_, asked| now.saturating_duration_since(*asked) < VERIFY_TIMEOUT);
        let mut deleting: BTreeMap<BlockId, Vec<String>> = BTreeMap::new();
        for (holder, block) in &plan.deletes {
            deleting.entry(*block).or_default().push(holder.clone());
        }
        let proved = |s: &State, block: BlockId, n: &str| {
            let asked = s.verifying.get(&(block, n.to_string()));
            let proved = s.blocks.get(&block).and_then(|e| e.verified.get(n));
            matches!((asked, proved), (Some(a), Some(p)) if p > a)
        };
        let counted: BTreeMap<BlockId, &Vec<String>> =
            blocks.iter().map(|b| (b.id, &b.holders)).collect();
        for (block, planned) in deleting {
            let Some(counted) = counted.get(&block) else {
                continue;
            };
            // As many as the planner chose go, from the replicas it counted (dead and draining
            // holders take no part), unproved ones first (so the choice holds still while the
            // replicas that stay prove themselves), then the planner's order.
            let mut order: Vec<String> = counted.to_vec();
            order.sort_by_key(|n| (proved(self, block, n), !planned.contains(n)));
            let holders: Vec<String> = order.iter().take(planned.len()).cloned().collect();
            let unproved: Vec<String> = order
                .iter()
                .skip(planned.len())
                .filter(|n| !proved(self, block, n))
                .cloned()
                .collect();
            if !unproved.is_empty() {
                // The replicas that stay must prove their bytes before others go.
                for n in unproved {
                    let key = (block, n.clone());
                    let outstanding = self
                        .verifying
                        .keys()
                        .filter(|(b, v)| *v == n && !proved(self, *b, v))
                        .count();
                    if self.verifying.contains_key(&key) || outstanding >= VERIFIES_PER_NODE {
                        continue;
                    }
                    tracing::info!(%block, datanode = %n, "verifying a replica before removing an excess one");
                    let Some(dn) = self.datanodes.get_mut(&n) else {
                        continue;
                    };
                    dn.pending_copy.push(CopyCommand {
                        block,
                        targets: vec![],
                        token: None,
                    });
                    self.verifying.insert(key, now);
                }
                continue;
            }
            self.verifying.retain(|(b, _), _| *b != block);
            for holder in holders {
                tracing::info!(%block, datanode = %holder, "removing an excess replica");
                self.event(format!(
                    "removing an excess replica of block {block} from {holder}"
                ));
                let Some(e) = self.blocks.get_mut(&block) else {
                    continue;
                };
                e.locations.remove(&holder);
                e.verified.remove(&holder);
                if let Some(replica) = e.committed_replica(block) {
                    self.delete_on(&holder, replica);
                }
            }
        }
        for b in &blocks {
            if b.holders.len() != b.target {
                self.repair_due.insert(b.id);
            }
        }
    }

    /// Live replica holders of a block, live before stale, dead and corrupt ones left out. The order
    /// rotates with the block id so reads of consecutive blocks spread over the holders.
    pub fn locations(&self, block: BlockId, now: Instant) -> Vec<Target> {
        let Some(entry) = self.blocks.get(&block) else {
            return vec![];
        };
        let mut live = vec![];
        let mut stale = vec![];
        let mut draining = vec![];
        for name in &entry.locations {
            let Some(dn) = self.datanodes.get(name) else {
                continue;
            };
            let t = Target {
                name: name.clone(),
                addr: dn.addr.clone(),
            };
            match self.node_state(dn, now) {
                NodeState::Dead => {}
                _ if self.decommission.contains(name) => draining.push(t),
                NodeState::Live => live.push(t),
                NodeState::Stale => stale.push(t),
            }
        }
        if !live.is_empty() {
            let k = (block.0 as usize) % live.len();
            live.rotate_left(k);
        }
        live.extend(stale);
        live.extend(draining);
        live
    }

    /// Whether `block` is known and not committed yet.
    pub(super) fn being_written(&self, block: BlockId) -> bool {
        self.blocks
            .get(&block)
            .is_some_and(|e| e.committed.is_none())
    }

    /// How many datanodes have reported a finalized replica of `block` holding exactly its length
    /// and value (provisional replicas while it is written, counted ones once it is committed),
    /// and how many a commit needs: min(2, the block's replication).
    pub fn confirmations(&self, block: &CommittedBlock) -> (usize, usize) {
        let Some(e) = self.blocks.get(&block.id) else {
            return (0, 1);
        };
        let need = usize::from(e.replication.clamp(1, 2));
        let provisional = e
            .provisional
            .values()
            .filter(|r| r.len == block.len && r.cv == block.cv)
            .count();
        let counted = if e.committed == Some((block.len, block.cv)) {
            e.locations.len()
        } else {
            0
        };
        (provisional + counted, need)
    }

    /// A client says a replica failed its checksums. A client's word deletes nothing: the holder
    /// is asked to re-read and verify the replica (the datanode reports it corrupt if it is, and
    /// [`State::bad_replica`] follows), at most [`VERIFIES_PER_NODE`] at once per datanode, so
    /// reports in bulk cost no more than a bounded number of reads. Returns whether it was asked.
    pub fn suspect_replica(&mut self, block: BlockId, name: &str, now: Instant) -> bool {
        let counted = self
            .blocks
            .get(&block)
            .is_some_and(|e| e.locations.contains(name));
        let key = (block, name.to_string());
        let outstanding = self.verifying.keys().filter(|(_, n)| n == name).count();
        if !counted || self.verifying.contains_key(&key) || outstanding >= VERIFIES_PER_NODE {
            return false;
        }
        let Some(dn) = self.datanodes.get_mut(name) else {
            return false;
        };
        dn.pending_copy.push(CopyCommand {
            block,
            targets: vec![],
            token: None,
        });
        self.verifying.insert(key, now);
        self.event(format!(
            "a client reports block {block} on {name} bad: verifying it"
        ));
        true
    }

    /// A datanode found a replica of its own failing its checksum: stop serving it, and delete it
    /// if another replica remains.
    pub fn bad_replica(&mut self, block: BlockId, name: &str) {
        if self
            .blocks
            .get(&block)
            .is_some_and(|e| e.locations.contains(name))
        {
            self.event(format!("corrupt replica of block {block} on {name}"));
        }
        let Some(entry) = self.blocks.get_mut(&block) else {
            return;
        };
        // Counted or not (a replica asked to verify before its delete was resent is not), a bad
        // replica goes once a good one is counted elsewhere; until then it stays, marked corrupt.
        entry.locations.remove(name);
        self.repair_due.insert(block);
        entry.verified.remove(name);
        let others = !entry.locations.is_empty();
        let replica = entry.committed_replica(block);
        self.cancel_copies_from(name, block);
        self.corrupt.insert((block, name.to_string()));
        if others {
            if let Some(replica) = replica {
                self.delete_on(name, replica);
            }
            self.corrupt.remove(&(block, name.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn after_the_first_pass_a_repair_tick_plans_the_blocks_events_made_due() {
        let t0 = Instant::now();
        let mut s = state(3, 2, true, t0);
        s.safemode_threshold = 0.0;
        s.sweep_chunk = 0;
        let all = [replica(1), replica(2), replica(3)];
        s.register("dn-1", "a:1".into(), space(), &all, t0);
        s.register("dn-2", "a:2".into(), space(), &all, t0);
        s.register("dn-3", "a:3".into(), space(), &[replica(1)], t0);
        // The first tick plans every block (and forgets what was marked before it).
        assert_eq!(s.repair_tick(t0).len(), 3);
        assert!(s.repair_tick(t0).is_empty(), "nothing happened since");
        // A lost replica, a completed file and a replication change each mark their block.
        s.drop_location("dn-2", BlockId(2));
        assert_eq!(s.repair_tick(t0), [BlockId(2)]);
        s.on_applied(
            &Applied {
                replication: vec![(BlockId(3), 3)],
                ..Applied::default()
            },
            t0,
        );
        assert_eq!(s.repair_tick(t0), [BlockId(3)]);
        // A datanode that dies makes all of its blocks due once.
        let ts = t0 + timing().dead_after / 2;
        s.heartbeat("dn-2", space(), &[], &[], ts);
        s.heartbeat("dn-3", space(), &[], &[], ts);
        let t1 = t0 + timing().dead_after;
        assert_eq!(s.repair_tick(t1), [BlockId(1), BlockId(2), BlockId(3)]);
        assert!(s.repair_tick(t1).is_empty());
        // With the sweep, a chunk of every block is planned at each tick as well.
        s.sweep_chunk = 2;
        assert_eq!(s.repair_tick(t1), [BlockId(1), BlockId(2)]);
        assert_eq!(s.repair_tick(t1), [BlockId(3)]);
        assert_eq!(s.repair_tick(t1), [BlockId(1), BlockId(2)]);
    }

    #[test]
    fn only_replicas_matching_the_committed_block_count() {
        let t0 = Instant::now();
        let mut s = state(1, 2, true, t0);
        let stale = ReportedBlock {
            len: 100,
            ..replica(1)
        };
        assert!(s
            .register("dn-1", "a:1".into(), space(), &[replica(1)], t0)
            .is_empty());
        assert_eq!(
            s.register("dn-2", "a:2".into(), space(), &[stale], t0),
            vec![stale]
        );
        assert_eq!(s.blocks[&BlockId(1)].locations.len(), 1);
        assert_eq!(s.stale_replicas, 1);
        let listed: Vec<String> = s
            .locations(BlockId(1), t0)
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(listed, ["dn-1"]);
    }

    #[test]
    fn replicas_of_a_block_being_written_count_once_committed_if_they_match() {
        let t0 = Instant::now();
        let mut s = state(0, 2, false, t0);
        s.blocks.insert(
            BlockId(5),
            BlockEntry::new(lode_protocol::InodeId(2), 2, false, None),
        );
        let good = replica(5);
        let other = ReportedBlock {
            cv: lode_protocol::Blake3Cv([1; 32]),
            ..good
        };
        s.register("dn-1", "a:1".into(), space(), &[good], t0);
        s.register("dn-2", "a:2".into(), space(), &[other], t0);
        assert!(
            s.blocks[&BlockId(5)].locations.is_empty(),
            "provisional only"
        );
        s.commit_block(
            &CommittedBlock {
                id: good.id,
                len: good.len,
                cv: good.cv,
            },
            t0,
        );
        let e = &s.blocks[&BlockId(5)];
        assert_eq!(e.locations.iter().collect::<Vec<_>>(), ["dn-1"]);
        assert_eq!(s.datanodes["dn-2"].pending_delete, vec![other]);
    }

    #[test]
    fn an_excess_replica_goes_only_after_the_ones_that_stay_verify() {
        let t0 = Instant::now();
        let mut s = state(1, 1, true, t0);
        s.safemode = SafeMode::Off;
        s.register("dn-1", "a:1".into(), space(), &[replica(1)], t0);
        s.register("dn-2", "a:2".into(), space(), &[replica(1)], t0);
        s.plan_repairs(t0);
        // Nothing deleted yet: the replica that stays is asked to prove its bytes.
        assert_eq!(s.blocks[&BlockId(1)].locations.len(), 2);
        let asked: Vec<&String> = s.verifying.keys().map(|(_, n)| n).collect();
        assert_eq!(asked.len(), 1);
        let keeper = asked[0].clone();
        let verify = &s.datanodes[&keeper].pending_copy;
        assert!(verify
            .iter()
            .any(|c| c.block == BlockId(1) && c.targets.is_empty()));
        // It verifies (reports the replica again); now the other one goes.
        let t1 = t0 + Duration::from_millis(10);
        s.heartbeat(&keeper, space(), &[replica(1)], &[], t1)
            .unwrap();
        s.plan_repairs(t1);
        let e = &s.blocks[&BlockId(1)];
        assert_eq!(e.locations.iter().collect::<Vec<_>>(), [&keeper]);
        let gone = if keeper == "dn-1" { "dn-2" } else { "dn-1" };
        assert_eq!(s.datanodes[gone].pending_delete, vec![replica(1)]);
    }

    #[test]
    fn a_dead_holder_neither_blocks_nor_takes_part_in_excess_removal() {
        let t0 = Instant::now();
        let mut s = state(1, 1, true, t0);
        s.safemode = SafeMode::Off;
        for n in 1..=4 {
            s.register(
                &format!("dn-{n}"),
                format!("a:{n}"),
                space(),
                &[replica(1)],
                t0,
            );
        }
        // dn-4 falls silent and is dead; its replica stays listed in the block's locations.
        let t1 = t0 + Duration::from_secs(11);
        for t in [t0 + Duration::from_secs(6), t1] {
            for n in 1..=3 {
                s.heartbeat(&format!("dn-{n}"), space(), &[], &[], t)
                    .unwrap();
            }
        }
        s.plan_repairs(t1);
        assert!(
            s.datanodes["dn-4"].pending_copy.is_empty(),
            "a dead node is never asked to verify"
        );
        let asked: Vec<String> = s.verifying.keys().map(|(_, n)| n.clone()).collect();
        assert_eq!(asked.len(), 1, "{asked:?}");
        let keeper = asked[0].clone();
        let t2 = t1 + Duration::from_millis(10);
        s.heartbeat(&keeper, space(), &[replica(1)], &[], t2)
            .unwrap();
        s.plan_repairs(t2);
        let live: Vec<&String> = s.blocks[&BlockId(1)]
            .locations
            .iter()
            .filter(|n| *n != "dn-4")
            .collect();
        assert_eq!(live, [&keeper], "the two excess live replicas go");
    }
}
