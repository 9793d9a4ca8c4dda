//! Shared code of kvsidecar's benchmarks: trace loading, prompt synthesis, timing clients, load
//! generators and the systems kvsidecar is compared with.

pub mod client;
pub mod load;
pub mod peers;
pub mod replay;
pub mod trace;
pub mod vocab;
