//! kvsidecar: a sidecar for LLM inference servers that recognises prompt prefixes already
//! computed, keeps their KV-cache state as snapshots in RocksDB, and restores them into the
//! engine instead of computing them again.
//!
//! # Layout
//!
//! A completion request passes these modules in order:
//!
//! | step | module |
//! | --- | --- |
//! | accept and route by path | [`server`], [`proxy`] |
//! | parse and validate | [`request`], [`error`] |
//! | identify the prefix | [`engine`] (template, tokenizer), [`prefix`] (block hashes) |
//! | pick a slot | [`slots`], the router of [`plugin`] |
//! | restore a stored snapshot | [`restore`], [`store`] |
//! | forward and stream back | `proxy::completion` |
//! | snapshot the slot afterwards | the admission policy of [`plugin`], [`snapshot`], [`store`] (evicting through the evictor of [`plugin`]) |
//! | record tokens and costs per task | [`ledger`] |
//!
//! Around them: [`config`] and [`cli`] for start-up, [`monitor`] for engine readiness and
//! restarts, [`admin`] for the loopback admin API, [`app`] for shared state, [`costs`] for the
//! cost estimates the policies receive, [`peer`] for the fleet: identity, peer API, peer health,
//! the fleet index, snapshot transfer and forwarding, [`telemetry`] for traces, metrics and logs.

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod costs;
pub mod engine;
pub mod error;
pub mod ledger;
pub mod monitor;
pub mod peer;
pub mod plugin;
pub mod prefix;
pub mod proxy;
pub mod request;
pub mod restore;
pub mod server;
pub mod slots;
pub mod snapshot;
pub mod store;
pub mod telemetry;
