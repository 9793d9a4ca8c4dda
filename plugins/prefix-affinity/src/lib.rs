//! Prefix-affinity routing: a request goes to the engine slot that holds the longest prefix of
//! its prompt, unless that slot carries `imbalance` more requests than the least-loaded slot.
//! A request with no cached prefix goes to the least-loaded slot, and among equally loaded slots
//! to the one holding the fewest tokens, so a miss does not overwrite a valuable cache.
//!
//! The KV comes from the local store instead of the slot when the store holds at least
//! `min_restore_gain` more tokens and restoring them costs less than computing them.
//!
//! Config keys: `imbalance` (requests, default 4), `min_restore_gain` (tokens, default 64).

use kvsidecar_sdk::{Candidate, CandidateKind, Config, Decision, Request, Router};

/// The prefix-affinity router.
pub struct PrefixAffinity {
    imbalance: u32,
    min_restore_gain: u32,
}

impl Router for PrefixAffinity {
    fn new(config: &Config) -> Result<Self, String> {
        let imbalance = u32::try_from(config.u64("imbalance", 4)?).map_err(|_| "config key `imbalance` is too large".to_string())?;
        let min_restore_gain = u32::try_from(config.u64("min_restore_gain", 64)?).map_err(|_| "config key `min_restore_gain` is too large".to_string())?;
        Ok(PrefixAffinity { imbalance, min_restore_gain })
    }

    fn route(&mut self, _request: &Request, candidates: &[Candidate]) -> Decision {
        let servers = servers(candidates);
        let Some(least_load) = servers.iter().map(|&index| candidates[index].total_load()).min() else {
            return Decision::default();
        };
        // The maximum matched prefix, then the minimum load, then the first.
        let affine = servers.iter().copied().max_by_key(|&index| {
            let candidate = &candidates[index];
            (candidate.matched_tokens, std::cmp::Reverse(candidate.total_load()), std::cmp::Reverse(index))
        });
        let affine = affine.filter(|&index| {
            let candidate = &candidates[index];
            candidate.matched_tokens > 0 && candidate.total_load() <= least_load.saturating_add(self.imbalance)
        });
        // The slot that loses least when it is overwritten: the lowest load, then the shortest
        // match, then the fewest resident tokens.
        let spare = servers.iter().copied().min_by_key(|&index| {
            let candidate = &candidates[index];
            (candidate.total_load(), candidate.matched_tokens, candidate.resident_tokens, index)
        });
        let Some(spare) = spare else { return Decision::default() };
        let serve = affine.unwrap_or(spare);

        // A stored prefix that is both longer by the minimum gain and cheaper than recomputing.
        let best_slot_match = servers.iter().map(|&index| candidates[index].matched_tokens).max().unwrap_or(0);
        let store = candidates
            .iter()
            .enumerate()
            .filter(|(_, candidate)| candidate.kind == CandidateKind::LocalStore && candidate.healthy)
            .max_by_key(|(_, candidate)| candidate.matched_tokens);
        if let Some((index, store)) = store {
            let gain = store.matched_tokens.saturating_sub(best_slot_match);
            let cheaper = store.transfer_cost_ms + store.recompute_cost_ms < candidates[spare].recompute_cost_ms;
            if gain > 0 && gain >= self.min_restore_gain && cheaper {
                return Decision::serve(spare, candidates.len()).with_kv_source(Some(index));
            }
        }
        Decision::serve(serve, candidates.len())
    }
}

/// Returns the candidates that can serve: healthy engine slots and peers, or all of them when
/// none is healthy.
fn servers(candidates: &[Candidate]) -> Vec<usize> {
    let serving = |healthy_only: bool| -> Vec<usize> {
        (0..candidates.len()).filter(|&index| candidates[index].kind.can_serve() && (candidates[index].healthy || !healthy_only)).collect()
    };
    let healthy = serving(true);
    if healthy.is_empty() { serving(false) } else { healthy }
}

#[cfg(target_arch = "wasm32")]
kvsidecar_sdk::export_router!(PrefixAffinity);

#[cfg(test)]
mod tests {
    use kvsidecar_sdk::testing::RouterHarness;
    use kvsidecar_sdk::{Candidate, Request};

    fn router() -> RouterHarness<super::PrefixAffinity> {
        RouterHarness::new("").expect("defaults are valid")
    }

    #[test]
    fn route_balanced_load_longest_prefix_wins() {
        let candidates = [Candidate::slot(0).matched(10), Candidate::slot(1).matched(300).load(1, 0), Candidate::slot(2)];
        let choice = router().route(&Request::default(), &candidates).unwrap();
        assert_eq!((choice.serve, choice.kv_source), (1, Some(1)));
    }

    #[test]
    fn route_overloaded_prefix_slot_loses() {
        let candidates = [Candidate::slot(0).matched(300).load(1, 5), Candidate::slot(1).matched(20), Candidate::slot(2).load(1, 0)];
        let choice = router().route(&Request::default(), &candidates).unwrap();
        assert_eq!(choice.serve, 1);
    }

    #[test]
    fn route_miss_by_load_keeps_large_cache() {
        let mut busy_empty = Candidate::slot(0).load(1, 2);
        busy_empty.resident_tokens = 0;
        let mut idle_full = Candidate::slot(1);
        idle_full.resident_tokens = 900;
        let mut idle_small = Candidate::slot(2);
        idle_small.resident_tokens = 40;
        let choice = router().route(&Request::default(), &[busy_empty, idle_full, idle_small]).unwrap();
        assert_eq!(choice.serve, 2);
    }

    #[test]
    fn route_restores_cheaper_stored_prefix() {
        let mut slot = Candidate::slot(0).matched(64);
        slot.recompute_cost_ms = 500.0;
        let mut other = Candidate::slot(1);
        other.recompute_cost_ms = 600.0;
        let mut store = Candidate::store(512);
        store.transfer_cost_ms = 20.0;
        store.recompute_cost_ms = 80.0;
        let choice = router().route(&Request::default(), &[slot.clone(), other.clone(), store.clone()]).unwrap();
        assert_eq!((choice.serve, choice.kv_source), (1, Some(2)));

        store.transfer_cost_ms = 900.0;
        let choice = router().route(&Request::default(), &[slot, other, store]).unwrap();
        assert_eq!((choice.serve, choice.kv_source), (0, Some(0)));
    }

    #[test]
    fn config_unknown_key_fails_load() {
        assert!(RouterHarness::<super::PrefixAffinity>::new("imbalanse = 2").is_err());
        assert!(RouterHarness::<super::PrefixAffinity>::new("imbalance = 2").is_ok());
    }
}
