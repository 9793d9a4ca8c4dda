//! The SDK for kvsidecar policy plugins: routing, snapshot eviction and snapshot admission
//! policies written in Rust and run by kvsidecar as WebAssembly components.
//!
//! A policy is a type that implements [`Router`], [`Evictor`] or [`Admission`]. One of the
//! export macros ([`export_router!`], [`export_evictor!`], [`export_admission!`]) turns the
//! crate into a plugin when it is built for `wasm32-unknown-unknown` and wrapped as a component
//! (`kvsidecar plugin build`). The same type can be tested natively with the harnesses of
//! [`testing`], which check every result the way the sidecar does.
//!
//! ```
//! use kvsidecar_sdk::{Candidate, Config, Decision, Request, Router};
//!
//! /// Serves every request on the first candidate and reuses its KV.
//! struct First;
//!
//! impl Router for First {
//!     fn new(_config: &Config) -> Result<Self, String> {
//!         Ok(First)
//!     }
//!
//!     fn route(&mut self, _request: &Request, candidates: &[Candidate]) -> Decision {
//!         Decision::serve(0, candidates.len())
//!     }
//! }
//! # #[cfg(target_arch = "wasm32")]
//! kvsidecar_sdk::export_router!(First);
//! ```
#![deny(missing_docs)]

extern crate self as kvsidecar_sdk;

pub mod check;
mod config;
#[cfg(feature = "guest")]
#[doc(hidden)]
pub mod guest;
pub mod testing;
mod types;

pub use config::Config;
pub use types::{AdmissionCandidate, Candidate, CandidateKind, Decision, Request, Snapshot, Tier};

/// Version of the WIT package `kvsidecar:policy` that this SDK implements.
pub const INTERFACE_VERSION: &str = "0.1.0";

/// A routing policy: scores the candidates for each request and names the source of its KV.
pub trait Router: Sized + 'static {
    /// Builds the policy from its `config` table. An error stops the plugin from loading.
    fn new(config: &Config) -> Result<Self, String>;

    /// Decides one request. `candidates` contains at least one engine slot.
    fn route(&mut self, request: &Request, candidates: &[Candidate]) -> Decision;
}

/// An eviction policy: follows the store's snapshots and chooses which ones leave when the store
/// needs room.
pub trait Evictor: Sized + 'static {
    /// Builds the policy from its `config` table. An error stops the plugin from loading.
    fn new(config: &Config) -> Result<Self, String>;

    /// Records a stored snapshot. A fresh instance receives one call for every stored snapshot.
    /// The same id can arrive again when a change races with that replay; treat it as an update.
    fn on_insert(&mut self, snapshot: Snapshot);

    /// Records a restore of a snapshot, with its hits and last access updated.
    fn on_access(&mut self, snapshot: Snapshot);

    /// Records that a snapshot left the store. Ignore an id the policy does not know.
    fn on_remove(&mut self, id: &str);

    /// Returns ids of stored snapshots that together free at least `bytes`. The sidecar deletes
    /// least recently used snapshots for any shortfall.
    fn choose_victims(&mut self, bytes: u64) -> Vec<String>;
}

/// An admission policy: decides whether a finished request's slot is saved as a snapshot.
pub trait Admission: Sized + 'static {
    /// Builds the policy from its `config` table. An error stops the plugin from loading.
    fn new(config: &Config) -> Result<Self, String>;

    /// Returns whether to store the snapshot.
    fn admit(&mut self, candidate: &AdmissionCandidate) -> bool;
}
