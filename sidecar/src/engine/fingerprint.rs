//! The model fingerprint: a BLAKE3 digest of everything that shapes the KV cache an engine
//! computes, so that a snapshot is only ever restored into an engine that computes the same KV.

use std::fmt;

use serde::Serialize;

use super::slot_file::KvLayout;
use crate::config::{FlashAttention, KvCacheType};

/// Domain-separation context of the fingerprint hash.
const CONTEXT: &str = "kvsidecar model fingerprint v1";

/// Everything the fingerprint binds. Each field changes the KV an engine computes or the layout
/// of its slot files; two engines with equal inputs can exchange snapshots.
///
/// NOTE: `probe_output` is measured only when the engine is probed, and the identity checks
/// between probes compare the reported fields alone.
/// llama-server does not report RoPE settings (`--rope-freq-base`, `--rope-scale`), so an
/// engine restarted with other RoPE settings and the same model gets the same fingerprint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FingerprintInputs {
    /// Engine family, such as `llama.cpp`.
    pub engine: String,
    /// Model id from `/v1/models` (`data[0].id`).
    pub model_id: String,
    /// Model file name, without its folder, from `/props` (`model_path`).
    pub model_file: String,
    /// Weight type from `/props` (`model_ftype`).
    pub model_ftype: String,
    /// From `/v1/models` `data[0].meta`: vocabulary size, training context, width, parameter count
    /// and file size in bytes.
    pub n_vocab: u64,
    pub n_ctx_train: u64,
    pub n_embd: u64,
    pub n_params: u64,
    pub model_bytes: u64,
    /// Context per slot (`/props` `default_generation_settings.n_ctx`).
    pub slot_context: u64,
    /// Number of slots (`/props` `total_slots`).
    pub total_slots: u64,
    /// KV settings the operator declared in `[engine]`.
    pub cache_type_k: KvCacheType,
    pub cache_type_v: KvCacheType,
    pub flash_attention: FlashAttention,
    pub unified_kv: bool,
    /// KV layout measured from a slot file the engine wrote at probe time. It has the stream
    /// count, the layer count, K and V types and row sizes per layer, and whether V is stored
    /// transposed. A row size is the KV head count times the head width times the type size.
    /// None when the slot API is unavailable.
    pub layout: Option<KvLayout>,
    /// Token ids the model generates greedily from a fixed prompt at probe time. They tell apart
    /// models whose reported metadata is equal but whose weights differ.
    pub probe_output: Vec<u32>,
}

impl FingerprintInputs {
    /// Returns whether `current` (from `Engine::identity`, without a layout) describes the same
    /// engine as these probed inputs.
    pub fn same_engine(&self, current: &FingerprintInputs) -> bool {
        let mut current = current.clone();
        current.layout = self.layout.clone();
        current.probe_output = self.probe_output.clone();
        *self == current
    }
}

/// A 32-byte model fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Computes the fingerprint of `inputs` from their canonical JSON form.
    pub fn of(inputs: &FingerprintInputs) -> Fingerprint {
        // Serializing a struct of plain fields and enums cannot fail.
        let canonical = serde_json::to_vec(inputs).expect("fingerprint inputs serialize");
        let mut hasher = blake3::Hasher::new_derive_key(CONTEXT);
        hasher.update(&canonical);
        Fingerprint(*hasher.finalize().as_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}
