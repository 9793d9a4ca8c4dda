//! Rust types of the policy interface, one for each record and enum of `wit/policy.wit`.

/// Kind of a routing candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CandidateKind {
    /// An engine slot beside this sidecar: it can serve the request and contains KV of its own.
    EngineSlot,
    /// The sidecar's snapshot store: a source of KV only, restored into the serving slot.
    LocalStore,
    /// Another sidecar of the fleet: it can serve the request or send its KV.
    Peer,
}

impl CandidateKind {
    /// Returns whether a candidate of this kind can serve a request.
    pub fn can_serve(self) -> bool {
        matches!(self, CandidateKind::EngineSlot | CandidateKind::Peer)
    }
}

/// Storage tier of a candidate's KV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Accelerator memory of the engine.
    Device,
    /// Host memory.
    Host,
    /// Local disk.
    Disk,
    /// Another machine.
    Remote,
}

/// The request being routed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Request {
    /// Hex digest of the cache namespace (model fingerprint, tenant, cache salt).
    pub namespace: String,
    /// Number of prompt tokens.
    pub prompt_tokens: u32,
    /// Task or session id the client sent, if any.
    pub task_id: Option<String>,
    /// Tenant id from the request's tenant header, or the default tenant.
    pub tenant: String,
    /// Model name the client asked for, or the engine's model.
    pub model: String,
}

/// One place that can serve the request or provide its KV.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Number of the candidate within its kind: the slot number of an engine slot, 0 for the
    /// local store.
    pub id: u32,
    /// Kind of the candidate.
    pub kind: CandidateKind,
    /// Leading prompt tokens whose KV the candidate holds for the request's namespace.
    pub matched_tokens: u32,
    /// Tokens of KV the candidate contains now, of any namespace.
    pub resident_tokens: u32,
    /// Storage tier of the candidate's KV.
    pub tier: Tier,
    /// Requests running on the candidate now.
    pub in_flight: u32,
    /// Requests waiting for the candidate.
    pub queue_depth: u32,
    /// Whether the candidate passed its last health check.
    pub healthy: bool,
    /// Estimated milliseconds to move the matched KV to the serving slot.
    pub transfer_cost_ms: f64,
    /// Estimated milliseconds of prefill for the prompt tokens the candidate does not hold.
    pub recompute_cost_ms: f64,
}

impl Candidate {
    /// Returns idle, healthy engine slot number `index`, with no KV.
    pub fn slot(index: u32) -> Candidate {
        Candidate {
            id: index,
            kind: CandidateKind::EngineSlot,
            matched_tokens: 0,
            resident_tokens: 0,
            tier: Tier::Device,
            in_flight: 0,
            queue_depth: 0,
            healthy: true,
            transfer_cost_ms: 0.0,
            recompute_cost_ms: 0.0,
        }
    }

    /// Returns the local store as a candidate holding `matched` tokens of the prompt.
    pub fn store(matched: u32) -> Candidate {
        Candidate { id: 0, kind: CandidateKind::LocalStore, matched_tokens: matched, resident_tokens: matched, tier: Tier::Disk, ..Candidate::slot(0) }
    }

    /// Returns healthy, idle peer number `index` holding `matched` tokens of the prompt in
    /// `tier`: its engine slots (`Device`, which cannot be moved) or its store (any other tier,
    /// movable at `transfer_cost_ms`).
    pub fn peer(index: u32, matched: u32, tier: Tier) -> Candidate {
        let transfer_cost_ms = if tier == Tier::Device { f64::INFINITY } else { 0.0 };
        Candidate { id: index, kind: CandidateKind::Peer, matched_tokens: matched, resident_tokens: matched, tier, transfer_cost_ms, ..Candidate::slot(0) }
    }

    /// Sets the matched prompt tokens, and raises the resident tokens to at least as many.
    pub fn matched(mut self, tokens: u32) -> Candidate {
        self.matched_tokens = tokens;
        self.resident_tokens = self.resident_tokens.max(tokens);
        self
    }

    /// Sets the requests running on and waiting for the candidate.
    pub fn load(mut self, in_flight: u32, queue_depth: u32) -> Candidate {
        self.in_flight = in_flight;
        self.queue_depth = queue_depth;
        self
    }

    /// Returns the requests running on and waiting for the candidate together.
    pub fn total_load(&self) -> u32 {
        self.in_flight.saturating_add(self.queue_depth)
    }
}

/// A router's decision: a score per candidate and the source of the request's KV.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    /// One finite score per candidate, in the order given. The serving candidate is the engine
    /// slot or peer with the highest score; the first one wins a tie.
    pub scores: Vec<f64>,
    /// Index of the candidate whose KV the request reuses: the serving candidate itself, the
    /// local store or a peer. None computes the whole prompt.
    pub kv_source: Option<u32>,
}

impl Decision {
    /// Returns a decision that serves on candidate `serve` of `count` and reuses the KV the
    /// serving candidate holds.
    pub fn serve(serve: usize, count: usize) -> Decision {
        let scores = (0..count).map(|index| if index == serve { 1.0 } else { 0.0 }).collect();
        Decision { scores, kv_source: Some(serve as u32) }
    }

    /// Replaces the KV source with candidate `source`, or with nothing to compute the whole prompt.
    pub fn with_kv_source(mut self, source: Option<usize>) -> Decision {
        self.kv_source = source.map(|index| index as u32);
        self
    }
}

/// A stored snapshot, as the evictor receives it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// Hex digest that names the snapshot.
    pub id: String,
    /// Hex digest of the snapshot's cache namespace.
    pub namespace: String,
    /// Size of the snapshot in bytes.
    pub bytes: u64,
    /// Tokens whose KV the snapshot holds.
    pub tokens: u32,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Time of the last restore, or of the insert, in milliseconds since the Unix epoch.
    pub last_access_ms: u64,
    /// Restores of the snapshot so far.
    pub hits: u64,
    /// Estimated milliseconds of prefill to compute the snapshot's tokens again.
    pub recompute_cost_ms: f64,
}

/// A finished request whose slot could be saved as a snapshot.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AdmissionCandidate {
    /// Hex digest of the request's cache namespace.
    pub namespace: String,
    /// Tenant of the request.
    pub tenant: String,
    /// Tokens the snapshot would hold.
    pub tokens: u32,
    /// Leading tokens of it that the store already holds.
    pub stored_tokens: u32,
    /// Estimated size of the snapshot in bytes.
    pub estimated_bytes: u64,
    /// Estimated milliseconds of prefill the snapshot would save on its next hit.
    pub recompute_cost_ms: f64,
    /// Bytes stored now.
    pub store_bytes: u64,
    /// The store's capacity in bytes.
    pub store_capacity: u64,
}
