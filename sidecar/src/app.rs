//! Shared state of a running sidecar: configuration, engine, store, the engine's readiness and
//! slot table, and the request counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use serde::Serialize;

use crate::config::Config;
use crate::costs::Costs;
use crate::peer::Fleet;
use crate::plugin::Plugins;
use crate::engine::{Engine, EngineInfo};
use crate::error::ApiError;
use crate::ledger::Ledger;
use crate::slots::Slots;
use crate::store::Store;
use crate::telemetry::Telemetry;

/// Source of the KV reused for a request's prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheSource {
    /// Nothing reused: the engine computed the whole prompt.
    None,
    /// The engine slot already held a prefix of the prompt.
    Slot,
    /// A snapshot from the local store was restored into the slot.
    Local,
    /// A snapshot pulled from a peer was restored into the slot.
    Peer,
}

impl CacheSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheSource::None => "none",
            CacheSource::Slot => "slot",
            CacheSource::Local => "local",
            CacheSource::Peer => "peer",
        }
    }
}

/// A fingerprinted engine process and the sidecar's view of its slots.
pub struct Ready {
    pub info: EngineInfo,
    pub slots: Slots,
    /// Increments each time the engine is probed anew (start, restart, recovery).
    pub generation: u64,
}

/// Request and cache counters, shown by `/admin/stats`.
#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub requests_failed: AtomicU64,
    /// Requests by outcome: response delivered whole, 4xx, 5xx, client gone or stream broken.
    pub completed: AtomicU64,
    pub rejected: AtomicU64,
    pub failed: AtomicU64,
    pub aborted: AtomicU64,
    pub source_none: AtomicU64,
    pub source_slot: AtomicU64,
    pub source_local: AtomicU64,
    pub source_peer: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    /// Cached tokens by source.
    pub cached_slot: AtomicU64,
    pub cached_local: AtomicU64,
    pub cached_peer: AtomicU64,
    /// Generated tokens, as the engine reported them.
    pub output_tokens: AtomicU64,
    pub restores: AtomicU64,
    /// The restores and failed restores above whose snapshot was pulled from a peer.
    pub restores_pulled: AtomicU64,
    pub restores_pulled_failed: AtomicU64,
    /// Bytes of snapshots restored from the local store.
    pub restored_bytes: AtomicU64,
    pub restores_failed: AtomicU64,
    pub snapshots_saved: AtomicU64,
    pub snapshots_skipped: AtomicU64,
    pub snapshots_failed: AtomicU64,
    pub client_disconnects: AtomicU64,
    /// Snapshots pulled from peers and restored.
    pub pulls: AtomicU64,
    /// Pulls that failed: the peer or the connection broke, or the snapshot did not fit.
    pub pulls_failed: AtomicU64,
    /// Pulls whose bytes did not match the size and BLAKE3 digest the peer announced.
    pub pulls_corrupt: AtomicU64,
    /// Pulls not made because the estimated transfer took longer than computing the tokens.
    pub pulls_skipped: AtomicU64,
    /// Pulled bytes, before compression.
    pub pulled_bytes: AtomicU64,
    /// Requests sent to a peer to serve.
    pub forwards: AtomicU64,
    /// Forwards that failed before any byte reached the client, then served here.
    pub forwards_failed: AtomicU64,
    /// Requests that a peer forwarded to this node.
    pub forwarded_in: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, amount: u64) {
        counter.fetch_add(amount, Ordering::Relaxed);
    }

    pub fn count_source(&self, source: CacheSource) {
        let counter = match source {
            CacheSource::None => &self.source_none,
            CacheSource::Slot => &self.source_slot,
            CacheSource::Local => &self.source_local,
            CacheSource::Peer => &self.source_peer,
        };
        Self::add(counter, 1);
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        serde_json::json!({
            "requests": get(&self.requests),
            "requests_failed": get(&self.requests_failed),
            "outcome": {
                "completed": get(&self.completed),
                "rejected": get(&self.rejected),
                "failed": get(&self.failed),
                "aborted": get(&self.aborted),
            },
            "cache_source": {
                "none": get(&self.source_none),
                "slot": get(&self.source_slot),
                "local": get(&self.source_local),
                "peer": get(&self.source_peer),
            },
            "prompt_tokens": get(&self.prompt_tokens),
            "cached_tokens": get(&self.cached_tokens),
            "output_tokens": get(&self.output_tokens),
            "restores": get(&self.restores),
            "restored_bytes": get(&self.restored_bytes),
            "restores_failed": get(&self.restores_failed),
            "snapshots_saved": get(&self.snapshots_saved),
            "snapshots_skipped": get(&self.snapshots_skipped),
            "snapshots_failed": get(&self.snapshots_failed),
            "client_disconnects": get(&self.client_disconnects),
            "peer": {
                "pulls": get(&self.pulls),
                "pulls_failed": get(&self.pulls_failed),
                "pulls_corrupt": get(&self.pulls_corrupt),
                "pulls_skipped": get(&self.pulls_skipped),
                "pulled_bytes": get(&self.pulled_bytes),
                "forwards": get(&self.forwards),
                "forwards_failed": get(&self.forwards_failed),
                "forwarded_in": get(&self.forwarded_in),
            },
        })
    }
}

/// Reason the engine is not ready.
pub struct NotReady {
    pub reason: String,
    pub unreachable: bool,
}

/// Everything a request handler needs.
pub struct App {
    pub config: Config,
    pub engine: Arc<dyn Engine>,
    pub store: Arc<Store>,
    pub plugins: Arc<Plugins>,
    pub costs: Arc<Costs>,
    /// This sidecar's fleet membership; None on a single node.
    pub fleet: Option<Arc<Fleet>>,
    pub telemetry: Arc<Telemetry>,
    /// The cost-per-task ledger; None when `ledger.enabled` is false.
    pub ledger: Option<Arc<Ledger>>,
    ready: ArcSwapOption<Ready>,
    /// Reason the engine is not ready, for `/readyz` and error responses.
    not_ready: ArcSwapOption<NotReady>,
    pub counters: Counters,
    /// Bounds the snapshots being saved and ingested at once.
    pub snapshot_permits: Arc<tokio::sync::Semaphore>,
    file_counter: AtomicU64,
    /// Wakes the monitor to probe the engine now rather than at its next interval.
    pub probe_now: tokio::sync::Notify,
}

/// Snapshots saved and ingested at the same time; more are skipped rather than queued.
const CONCURRENT_SNAPSHOTS: usize = 2;

impl App {
    pub fn new(config: Config, engine: Arc<dyn Engine>, store: Arc<Store>, plugins: Arc<Plugins>, costs: Arc<Costs>, fleet: Option<Arc<Fleet>>, telemetry: Arc<Telemetry>) -> App {
        App {
            config,
            engine,
            store,
            plugins,
            costs,
            fleet,
            telemetry,
            ledger: None,
            ready: ArcSwapOption::empty(),
            not_ready: ArcSwapOption::from_pointee(NotReady { reason: "engine not probed yet".into(), unreachable: false }),
            counters: Counters::default(),
            snapshot_permits: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_SNAPSHOTS)),
            file_counter: AtomicU64::new(0),
            probe_now: tokio::sync::Notify::new(),
        }
    }

    pub fn ready(&self) -> Option<Arc<Ready>> {
        self.ready.load_full()
    }

    pub fn not_ready_reason(&self) -> String {
        self.not_ready.load_full().map(|state| state.reason.clone()).unwrap_or_default()
    }

    /// Returns the error for a request that arrives while the engine is not ready: 502 when the
    /// engine is down, 503 while it starts.
    pub fn not_ready_error(&self) -> ApiError {
        match self.not_ready.load_full() {
            Some(state) if state.unreachable => ApiError::engine_down(&state.reason),
            Some(state) => ApiError::not_ready(&state.reason),
            None => ApiError::not_ready("engine state changing"),
        }
    }

    pub fn set_ready(&self, ready: Ready) {
        self.ready.store(Some(Arc::new(ready)));
        self.not_ready.store(None);
    }

    /// Marks the engine not ready. `unreachable` separates a stopped engine from one still starting.
    pub fn set_not_ready(&self, reason: String, unreachable: bool) {
        if self.ready.swap(None).is_some()
            && let Some(fleet) = &self.fleet
        {
            fleet.journal.push(crate::peer::journal::IndexEvent::SlotsCleared);
        }
        self.not_ready.store(Some(Arc::new(NotReady { reason, unreachable })));
    }

    /// Marks the engine not ready because a request found it changed, and wakes the monitor to
    /// probe it now. The monitor itself uses `set_not_ready`, so a failing probe never wakes it.
    pub fn reprobe(&self, ready: &Ready, reason: &str) {
        if self.ready().is_some_and(|now| now.generation == ready.generation) {
            self.set_not_ready(reason.into(), false);
            self.probe_now.notify_one();
        }
    }

    /// Checks that the engine is still the one `ready` describes. An engine replaced between two
    /// health checks (same port, other model or settings) would otherwise have its KV stored or
    /// restored under the old fingerprint. A changed engine is marked not ready, so the monitor
    /// probes it anew. Returns false when the engine changed or cannot be asked.
    pub async fn engine_unchanged(&self, ready: &Ready) -> bool {
        match self.engine.identity().await {
            Ok(current) if ready.info.fingerprint_inputs.same_engine(&current) => true,
            Ok(_) => {
                tracing::warn!(engine.generation = ready.generation, "engine model or settings changed since it was probed; probing it again");
                self.reprobe(ready, "engine changed since it was probed");
                false
            }
            Err(error) => {
                tracing::debug!(error = %error, "engine identity check failed");
                false
            }
        }
    }

    /// Returns a slot-file name unique within this process, such as `kvsidecar-save-1-42.bin`.
    pub fn slot_file_name(&self, purpose: &str, slot: u32) -> String {
        let n = self.file_counter.fetch_add(1, Ordering::Relaxed);
        format!("kvsidecar-{purpose}-{}-{slot}-{n}.bin", std::process::id())
    }
}
