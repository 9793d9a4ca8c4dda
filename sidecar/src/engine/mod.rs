//! The seam between kvsidecar and an inference engine: what the sidecar needs from an engine
//! (identity, tokenizer, slot save and restore, the HTTP upstream), and the model fingerprint.
//!
//! `llamacpp` implements it for llama.cpp's `llama-server`. A vLLM or SGLang adapter implements
//! the same trait.

pub mod fingerprint;
pub mod http_client;
pub mod llamacpp;
pub mod slot_file;

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

pub use fingerprint::{Fingerprint, FingerprintInputs};
pub use http_client::{EngineClient, UpstreamBody};

use crate::request::Endpoint;

/// Failure of a call to the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("engine at {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("engine did not answer {path} within {}", humantime::format_duration(*.after))]
    Timeout { path: String, after: Duration },
    #[error("engine answered {path} with HTTP {status}: {message}")]
    Status { path: String, status: u16, message: String },
    #[error("engine answered {path} with an invalid body: {detail}")]
    InvalidResponse { path: String, detail: String },
    #[error("slot API unavailable: {0}")]
    SlotApi(String),
    #[error("slot file {path}: {reason}")]
    SlotFile { path: String, reason: String },
}

/// Facts about the engine, read when the sidecar probed it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineInfo {
    /// Model id as the engine reports it in `/v1/models`.
    pub model_id: String,
    /// Number of slots (parallel sequences) the engine serves.
    pub total_slots: u32,
    /// Context length of each slot, in tokens.
    pub slot_context: u32,
    /// Number of tokens in the vocabulary; token ids at or above it are invalid.
    pub n_vocab: u32,
    pub fingerprint: Fingerprint,
    pub fingerprint_inputs: FingerprintInputs,
    /// Reason snapshots cannot be saved or restored on this engine, if there is one.
    pub snapshots_disabled: Option<String>,
}

/// Outcome of saving a slot to a file.
#[derive(Debug, Clone)]
pub struct SlotSaved {
    pub tokens: u32,
    pub bytes: u64,
}

/// Outcome of restoring a slot from a file.
#[derive(Debug, Clone)]
pub struct SlotRestored {
    pub tokens: u32,
    pub elapsed: Duration,
}

/// Activity of the engine's slots, read by the restart detector.
#[derive(Debug, Clone, Default)]
pub struct SlotActivity {
    /// Highest task id any slot has run; task ids only grow while an engine process lives.
    pub max_task_id: Option<u64>,
}

/// An inference engine the sidecar sits beside.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Returns the engine's identity, slots and model fingerprint; fails while it is not ready.
    async fn probe(&self) -> Result<EngineInfo, EngineError>;

    /// Returns the fingerprint inputs the engine reports now, without the KV layout, which only
    /// `probe` measures. Comparing them with the probed ones detects an engine replaced by another.
    async fn identity(&self) -> Result<FingerprintInputs, EngineError>;

    /// Returns whether the engine passes its health check.
    async fn healthy(&self) -> bool;

    /// Returns the activity counters the restart detector compares between probes.
    async fn slot_activity(&self) -> Result<SlotActivity, EngineError>;

    /// Turns a request body into the token ids the engine will evaluate for it, using the
    /// engine's own chat template and tokenizer.
    async fn prompt_tokens(&self, endpoint: Endpoint, body: &Value) -> Result<Vec<u32>, EngineError>;

    /// Pins a request body to `slot` and makes the engine reuse the slot's cached prefix.
    fn pin_to_slot(&self, body: &mut Value, slot: u32);

    /// Saves `slot` to `file_name` inside the shared slot folder.
    async fn save_slot(&self, slot: u32, file_name: &str) -> Result<SlotSaved, EngineError>;

    /// Restores `slot` from `file_name` inside the shared slot folder.
    async fn restore_slot(&self, slot: u32, file_name: &str) -> Result<SlotRestored, EngineError>;

    /// Returns the HTTP client that forwards requests to the engine.
    fn client(&self) -> &EngineClient;

    /// Reads the number of prompt tokens the engine took from its cache, from a finished
    /// non-streaming response body.
    fn cached_tokens_in_response(&self, body: &Value) -> Option<u32>;
}
