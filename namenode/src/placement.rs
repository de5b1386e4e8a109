//! Block placement: pure decisions, no I/O. Time and randomness come in as arguments.

use rand::seq::SliceRandom;
use rand::SeedableRng;

/// A datanode that may receive a new block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Name.
    pub name: String,
    /// Bytes still free.
    pub remaining: u64,
}

/// Why no pipeline could be formed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    /// No live datanode has room (after exclusions).
    #[error("no live datanode with {needed} bytes free ({live} live, {excluded} excluded)")]
    NoTargets {
        /// Bytes needed.
        needed: u64,
        /// Live candidates considered.
        live: usize,
        /// Of those, excluded by the client.
        excluded: usize,
    },
}

/// Chooses up to `replicas` distinct datanodes for a new block, in pipeline order. Nodes named in
/// `exclude` (the client saw them fail) and nodes without room for a whole block are skipped; the rest
/// are shuffled under `seed` so load spreads evenly. Fewer than `replicas` is not an error (the writer
/// decides whether enough replicas were stored); none is.
pub fn choose_targets(
    candidates: &[Candidate],
    replicas: usize,
    block_bytes: u64,
    exclude: &[String],
    seed: u64,
) -> Result<Vec<String>, PlacementError> {
    let excluded = candidates
        .iter()
        .filter(|c| exclude.contains(&c.name))
        .count();
    let mut eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| !exclude.contains(&c.name) && c.remaining >= block_bytes)
        .collect();
    eligible.sort_by(|a, b| a.name.cmp(&b.name));
    eligible.dedup_by(|a, b| a.name == b.name);
    if eligible.is_empty() {
        return Err(PlacementError::NoTargets {
            needed: block_bytes,
            live: candidates.len(),
            excluded,
        });
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    eligible.shuffle(&mut rng);
    Ok(eligible
        .into_iter()
        .take(replicas)
        .map(|c| c.name.clone())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<Candidate> {
        (1..=n)
            .map(|i| Candidate {
                name: format!("dn-{i}"),
                remaining: 1 << 40,
            })
            .collect()
    }

    #[test]
    fn distinct_targets_respecting_exclusions_and_space() {
        for seed in 0..50 {
            let t = choose_targets(&nodes(5), 3, 1 << 20, &["dn-2".into()], seed).unwrap();
            assert_eq!(t.len(), 3);
            let mut d = t.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 3);
            assert!(!t.contains(&"dn-2".to_string()));
        }
        let mut full = nodes(2);
        full[0].remaining = 10;
        assert_eq!(
            choose_targets(&full, 3, 1 << 20, &[], 1).unwrap(),
            vec!["dn-2".to_string()]
        );
        assert!(choose_targets(&full, 3, 1 << 20, &["dn-2".into()], 1).is_err());
        assert!(choose_targets(&[], 1, 1, &[], 1).is_err());
    }

    #[test]
    fn load_spreads_over_seeds() {
        let mut firsts = std::collections::HashSet::new();
        for seed in 0..40 {
            firsts.insert(choose_targets(&nodes(4), 1, 1, &[], seed).unwrap()[0].clone());
        }
        assert_eq!(firsts.len(), 4);
    }
}
