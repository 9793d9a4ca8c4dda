//! Least-loaded routing: the slot with the fewest running and waiting requests serves, and it
//! reuses whatever prefix of the prompt it holds. Among equally loaded slots the one with the
//! longest matched prefix wins. The store is never restored from.
//!
//! Config keys: none.

use kvsidecar_sdk::{Candidate, Config, Decision, Request, Router};

/// The least-loaded router.
pub struct LeastLoaded;

impl Router for LeastLoaded {
    fn new(_config: &Config) -> Result<Self, String> {
        Ok(LeastLoaded)
    }

    fn route(&mut self, _request: &Request, candidates: &[Candidate]) -> Decision {
        let best = (0..candidates.len()).filter(|&index| candidates[index].kind.can_serve()).min_by_key(|&index| {
            let candidate = &candidates[index];
            (!candidate.healthy, candidate.total_load(), std::cmp::Reverse(candidate.matched_tokens), index)
        });
        match best {
            Some(index) => Decision::serve(index, candidates.len()),
            None => Decision::default(),
        }
    }
}

#[cfg(target_arch = "wasm32")]
kvsidecar_sdk::export_router!(LeastLoaded);

#[cfg(test)]
mod tests {
    use kvsidecar_sdk::testing::RouterHarness;
    use kvsidecar_sdk::{Candidate, Request};

    #[test]
    fn route_idle_slot_wins_without_prefix() {
        let mut router = RouterHarness::<super::LeastLoaded>::new("").unwrap();
        let candidates = [Candidate::slot(0).matched(500).load(1, 1), Candidate::slot(1), Candidate::store(900)];
        let choice = router.route(&Request::default(), &candidates).unwrap();
        assert_eq!((choice.serve, choice.kv_source), (1, Some(1)));
    }
}
