//! Shared code of kvsidecar's benchmarks: trace loading, prompt synthesis and a timing client.

pub mod client;
pub mod trace;
