//! Native test harnesses: run a policy with `cargo test`, without WebAssembly, and check each
//! result the way kvsidecar does.
//!
//! ```
//! use kvsidecar_sdk::testing::RouterHarness;
//! use kvsidecar_sdk::{Candidate, Config, Decision, Request, Router};
//!
//! struct Last;
//!
//! impl Router for Last {
//!     fn new(_config: &Config) -> Result<Self, String> {
//!         Ok(Last)
//!     }
//!
//!     fn route(&mut self, _request: &Request, candidates: &[Candidate]) -> Decision {
//!         Decision::serve(candidates.len() - 1, candidates.len())
//!     }
//! }
//!
//! let mut router = RouterHarness::<Last>::new("").unwrap();
//! let choice = router.route(&Request::default(), &[Candidate::slot(0), Candidate::slot(1)]).unwrap();
//! assert_eq!(choice.serve, 1);
//! ```

use std::collections::BTreeMap;

use crate::check::{self, Choice, InvalidDecision, InvalidVictims};
use crate::{Admission, AdmissionCandidate, Candidate, CandidateKind, Config, Evictor, Router, Snapshot};

/// Builds a policy from TOML text the way the sidecar does: parse, construct, reject unknown keys.
fn build<P>(config: &str, new: impl FnOnce(&Config) -> Result<P, String>) -> Result<P, String> {
    let config = Config::parse(config)?;
    let policy = new(&config)?;
    config.finish()?;
    Ok(policy)
}

/// Runs a [`Router`] natively and checks its decisions.
pub struct RouterHarness<R: Router> {
    /// The policy under test.
    pub policy: R,
}

impl<R: Router> RouterHarness<R> {
    /// Builds the policy from `config`, a TOML table.
    pub fn new(config: &str) -> Result<Self, String> {
        Ok(RouterHarness { policy: build(config, R::new)? })
    }

    /// Routes one request and checks the decision.
    pub fn route(&mut self, request: &crate::Request, candidates: &[Candidate]) -> Result<Choice, InvalidDecision> {
        let decision = self.policy.route(request, candidates);
        let kinds: Vec<CandidateKind> = candidates.iter().map(|candidate| candidate.kind).collect();
        check::decision(&decision, &kinds)
    }
}

/// Runs an [`Evictor`] natively over a simulated store: inserts, accesses and evictions with
/// the same events and checks as the sidecar's store.
pub struct EvictorHarness<E: Evictor> {
    /// The policy under test.
    pub policy: E,
    stored: BTreeMap<String, Snapshot>,
    clock_ms: u64,
}

impl<E: Evictor> EvictorHarness<E> {
    /// Builds the policy from `config`, a TOML table.
    pub fn new(config: &str) -> Result<Self, String> {
        Ok(EvictorHarness { policy: build(config, E::new)?, stored: BTreeMap::new(), clock_ms: 1 })
    }

    fn tick(&mut self) -> u64 {
        self.clock_ms += 1;
        self.clock_ms
    }

    /// Stores a snapshot of `bytes` and `tokens` with the given recompute cost.
    pub fn insert(&mut self, id: &str, bytes: u64, tokens: u32, recompute_cost_ms: f64) {
        let now = self.tick();
        let snapshot = Snapshot { id: id.into(), namespace: "test".into(), bytes, tokens, created_ms: now, last_access_ms: now, hits: 0, recompute_cost_ms };
        self.stored.insert(id.into(), snapshot.clone());
        self.policy.on_insert(snapshot);
    }

    /// Records a restore of snapshot `id`. Unknown ids are ignored, as the store ignores them.
    pub fn access(&mut self, id: &str) {
        let now = self.tick();
        if let Some(snapshot) = self.stored.get_mut(id) {
            snapshot.hits += 1;
            snapshot.last_access_ms = now;
            let snapshot = snapshot.clone();
            self.policy.on_access(snapshot);
        }
    }

    /// Requests `bytes` of room, checks the victim list, removes the victims and returns their ids.
    pub fn evict(&mut self, bytes: u64) -> Result<Vec<String>, InvalidVictims> {
        let answer = self.policy.choose_victims(bytes);
        let victims = check::victims(answer, self.stored.len(), |id| self.stored.contains_key(id))?;
        for id in &victims {
            self.stored.remove(id);
            self.policy.on_remove(id);
        }
        Ok(victims)
    }

    /// Returns the ids still stored, in order.
    pub fn stored(&self) -> Vec<String> {
        self.stored.keys().cloned().collect()
    }

    /// Returns the bytes still stored.
    pub fn stored_bytes(&self) -> u64 {
        self.stored.values().map(|snapshot| snapshot.bytes).sum()
    }
}

/// Runs an [`Admission`] policy natively.
pub struct AdmissionHarness<A: Admission> {
    /// The policy under test.
    pub policy: A,
}

impl<A: Admission> AdmissionHarness<A> {
    /// Builds the policy from `config`, a TOML table.
    pub fn new(config: &str) -> Result<Self, String> {
        Ok(AdmissionHarness { policy: build(config, A::new)? })
    }

    /// Asks whether to store `candidate`.
    pub fn admit(&mut self, candidate: &AdmissionCandidate) -> bool {
        self.policy.admit(candidate)
    }
}
