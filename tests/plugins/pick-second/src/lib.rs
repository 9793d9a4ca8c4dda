//! Test router: every request is served by the second candidate (the first when there is only
//! one), with its own KV.

use kvsidecar_sdk::{Candidate, Config, Decision, Request, Router};

pub struct PickSecond;

impl Router for PickSecond {
    fn new(_config: &Config) -> Result<Self, String> {
        Ok(PickSecond)
    }

    fn route(&mut self, _request: &Request, candidates: &[Candidate]) -> Decision {
        Decision::serve(1.min(candidates.len().saturating_sub(1)), candidates.len())
    }
}

#[cfg(target_arch = "wasm32")]
kvsidecar_sdk::export_router!(PickSecond);
