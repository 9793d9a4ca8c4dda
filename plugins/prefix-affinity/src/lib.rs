//! Prefix-affinity routing: a request goes to the engine slot that holds the longest prefix of
//! its prompt, unless that slot carries `imbalance` more requests than the least-loaded slot.
//! A request with no cached prefix goes to the least-loaded slot, and among equally loaded slots
//! to the one holding the fewest tokens, so a miss does not overwrite a valuable cache.
//!
//! The KV comes from the local store or a peer's store instead of the slot when that source
//! holds at least `min_restore_gain` more tokens and moving them costs less than computing them.
//! A request goes to a peer instead when the peer holds at least `min_forward_gain` more tokens
//! than this node and is not overloaded; `forward` says which of the peer's tiers count.
//!
//! Config keys: `imbalance` (requests, default 4), `min_restore_gain` (tokens, default 64),
//! `min_forward_gain` (tokens, default 256: a shorter gain, such as a common system prompt, is
//! cheaper to compute here than to move the whole request),
//! `forward` (`"resident"`, the default: forward when the peer's engine slot holds the prefix, so
//! nothing moves; `"always"`: also when the peer's store holds it, rather than pulling it;
//! `"never"`: always serve here).

use kvsidecar_sdk::{Candidate, CandidateKind, Config, Decision, Request, Router, Tier};

/// When requests go to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forward {
    Never,
    Resident,
    Always,
}

/// The prefix-affinity router.
pub struct PrefixAffinity {
    imbalance: u32,
    min_restore_gain: u32,
    min_forward_gain: u32,
    forward: Forward,
}

impl Router for PrefixAffinity {
    fn new(config: &Config) -> Result<Self, String> {
        let imbalance = u32::try_from(config.u64("imbalance", 4)?).map_err(|_| "config key `imbalance` is too large".to_string())?;
        let min_restore_gain = u32::try_from(config.u64("min_restore_gain", 64)?).map_err(|_| "config key `min_restore_gain` is too large".to_string())?;
        let min_forward_gain = u32::try_from(config.u64("min_forward_gain", 256)?).map_err(|_| "config key `min_forward_gain` is too large".to_string())?;
        let forward = match config.string("forward", "resident")?.as_str() {
            "never" => Forward::Never,
            "resident" => Forward::Resident,
            "always" => Forward::Always,
            other => return Err(format!("config key `forward` is {other:?}; use \"resident\", \"always\" or \"never\"")),
        };
        Ok(PrefixAffinity { imbalance, min_restore_gain, min_forward_gain, forward })
    }

    fn route(&mut self, _request: &Request, candidates: &[Candidate]) -> Decision {
        let locals = healthy_or_all(candidates, |candidate| candidate.kind == CandidateKind::EngineSlot);
        let Some(least_load) = locals.iter().map(|&index| candidates[index].total_load()).min() else {
            return Decision::default();
        };
        // The maximum matched prefix, then the minimum load, then the first.
        let affine = locals.iter().copied().max_by_key(|&index| {
            let candidate = &candidates[index];
            (candidate.matched_tokens, std::cmp::Reverse(candidate.total_load()), std::cmp::Reverse(index))
        });
        let affine = affine.filter(|&index| {
            let candidate = &candidates[index];
            candidate.matched_tokens > 0 && candidate.total_load() <= least_load.saturating_add(self.imbalance)
        });
        // The slot that loses least when it is overwritten: the lowest load, then the shortest
        // match, then the fewest resident tokens.
        let spare = locals.iter().copied().min_by_key(|&index| {
            let candidate = &candidates[index];
            (candidate.total_load(), candidate.matched_tokens, candidate.resident_tokens, index)
        });
        let Some(spare) = spare else { return Decision::default() };
        let serve = affine.unwrap_or(spare);
        let best_slot_match = locals.iter().map(|&index| candidates[index].matched_tokens).max().unwrap_or(0);
        let store_match = candidates.iter().filter(|candidate| candidate.kind == CandidateKind::LocalStore && candidate.healthy).map(|candidate| candidate.matched_tokens).max().unwrap_or(0);

        // A peer with a match longer than this node's by the minimum forward gain, and not
        // overloaded.
        let here = best_slot_match.max(store_match);
        let forward_to = candidates
            .iter()
            .enumerate()
            .filter(|(_, candidate)| candidate.kind == CandidateKind::Peer && candidate.healthy)
            .filter(|(_, candidate)| match self.forward {
                Forward::Never => false,
                Forward::Resident => candidate.tier == Tier::Device,
                Forward::Always => true,
            })
            .filter(|(_, candidate)| candidate.matched_tokens > 0 && candidate.matched_tokens.saturating_sub(here) >= self.min_forward_gain.max(1))
            .filter(|(_, candidate)| candidate.total_load() <= least_load.saturating_add(self.imbalance))
            .max_by_key(|(index, candidate)| (candidate.matched_tokens, std::cmp::Reverse(candidate.total_load()), std::cmp::Reverse(*index)));
        if let Some((index, _)) = forward_to {
            return Decision::serve(index, candidates.len());
        }

        // A stored prefix, here or on a peer, that is both longer by the minimum gain and
        // cheaper than recomputing; the cheapest of the longest.
        let source = candidates
            .iter()
            .enumerate()
            .filter(|(_, candidate)| matches!(candidate.kind, CandidateKind::LocalStore | CandidateKind::Peer) && candidate.healthy)
            .filter(|(_, candidate)| candidate.transfer_cost_ms.is_finite())
            .filter(|(_, candidate)| {
                let gain = candidate.matched_tokens.saturating_sub(best_slot_match);
                gain > 0 && gain >= self.min_restore_gain && candidate.transfer_cost_ms + candidate.recompute_cost_ms < candidates[spare].recompute_cost_ms
            })
            .max_by(|(_, a), (_, b)| a.matched_tokens.cmp(&b.matched_tokens).then(b.transfer_cost_ms.total_cmp(&a.transfer_cost_ms)));
        if let Some((index, _)) = source {
            return Decision::serve(spare, candidates.len()).with_kv_source(Some(index));
        }
        Decision::serve(serve, candidates.len())
    }
}

/// Returns the candidates that `keep` selects and are healthy, or all it selects when none is.
fn healthy_or_all(candidates: &[Candidate], keep: impl Fn(&Candidate) -> bool) -> Vec<usize> {
    let selected: Vec<usize> = (0..candidates.len()).filter(|&index| keep(&candidates[index])).collect();
    let healthy: Vec<usize> = selected.iter().copied().filter(|&index| candidates[index].healthy).collect();
    if healthy.is_empty() { selected } else { healthy }
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
    fn route_forwards_to_peer_slot_holding_prefix() {
        let peer = Candidate::peer(0, 512, kvsidecar_sdk::Tier::Device);
        let candidates = [Candidate::slot(0), Candidate::slot(1).matched(64), peer];
        let choice = router().route(&Request::default(), &candidates).unwrap();
        assert_eq!(choice.serve, 2);

        let never = RouterHarness::<super::PrefixAffinity>::new("forward = \"never\"").unwrap().route(&Request::default(), &candidates).unwrap();
        assert_eq!(never.serve, 1);
    }

    #[test]
    fn route_pulls_cheap_peer_snapshot() {
        let mut peer = Candidate::peer(0, 512, kvsidecar_sdk::Tier::Remote);
        peer.transfer_cost_ms = 10.0;
        peer.recompute_cost_ms = 5.0;
        let mut slot = Candidate::slot(0);
        slot.recompute_cost_ms = 400.0;
        let choice = router().route(&Request::default(), &[slot.clone(), peer.clone()]).unwrap();
        assert_eq!((choice.serve, choice.kv_source), (0, Some(1)));

        let always = RouterHarness::<super::PrefixAffinity>::new("forward = \"always\"").unwrap().route(&Request::default(), &[slot.clone(), peer.clone()]).unwrap();
        assert_eq!(always.serve, 1);

        peer.transfer_cost_ms = 1000.0;
        let choice = router().route(&Request::default(), &[slot, peer]).unwrap();
        assert_eq!((choice.serve, choice.kv_source), (0, Some(0)));
    }

    #[test]
    fn config_unknown_key_fails_load() {
        assert!(RouterHarness::<super::PrefixAffinity>::new("imbalanse = 2").is_err());
        assert!(RouterHarness::<super::PrefixAffinity>::new("imbalance = 2").is_ok());
    }
}
