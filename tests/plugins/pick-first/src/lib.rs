//! Test router: every request is served by the first candidate, with its own KV.

use kvsidecar_sdk::{Candidate, Config, Decision, Request, Router};

pub struct PickFirst;

impl Router for PickFirst {
    fn new(_config: &Config) -> Result<Self, String> {
        Ok(PickFirst)
    }

    fn route(&mut self, _request: &Request, candidates: &[Candidate]) -> Decision {
        Decision::serve(0, candidates.len())
    }
}

#[cfg(target_arch = "wasm32")]
kvsidecar_sdk::export_router!(PickFirst);
