//! End-to-end tests: real `llama-server` processes with the generated tiny model, real
//! `kvsidecar` processes and a real RocksDB store, all on loopback ports.

mod bad_input;
mod cache;
mod cli;
mod eviction;
mod fleet;
mod fleet_transfer;
mod ledger;
mod observability;
mod harness;
mod openai_sdk;
mod plugins;
mod resilience;
