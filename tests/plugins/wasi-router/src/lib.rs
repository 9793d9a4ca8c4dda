//! Test router built for wasm32-wasip2: it reads an environment variable, so its component
//! imports WASI interfaces, which the sidecar must reject at load.

use kvsidecar_sdk::{Candidate, Config, Decision, Request, Router};

pub struct WasiRouter;

impl Router for WasiRouter {
    fn new(_config: &Config) -> Result<Self, String> {
        Ok(WasiRouter)
    }

    fn route(&mut self, _request: &Request, candidates: &[Candidate]) -> Decision {
        let first = std::env::var("KVSIDECAR_TEST_FIRST").is_ok();
        Decision::serve(if first { 0 } else { candidates.len() - 1 }, candidates.len())
    }
}

#[cfg(target_arch = "wasm32")]
kvsidecar_sdk::export_router!(WasiRouter);
