//! Shared code of kvsidecar's benchmarks: trace loading and prompt synthesis.

pub mod trace;
