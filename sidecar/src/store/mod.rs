//! The local snapshot store: engine slot files kept in RocksDB in chunks, with their metadata and
//! a block-hash index, written in one atomic batch and verified by BLAKE3 on every read.
//!
//! Column families:
//!
//! | family | key | value |
//! | --- | --- | --- |
//! | `meta` | snapshot id (32 bytes) | [`SnapshotMeta`] as JSON |
//! | `tokens` | snapshot id | token ids, 4 bytes little-endian each |
//! | `blocks` | snapshot id | chained block hashes, 32 bytes each |
//! | `chunks` | snapshot id, chunk number (4 bytes big-endian) | up to `store.chunk_size` file bytes |
//! | `index` | block hash, snapshot id | number of blocks through this one (4 bytes big-endian) |
//!
//! Chunk values go to RocksDB blob files, so large values do not pass through SST compaction.

mod access;
mod rocks;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::prefix::Digest;

pub use rocks::{Store, bounded_options};

/// Metadata of one stored snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    #[serde(with = "hex_digest")]
    pub id: Digest,
    #[serde(with = "hex_digest")]
    pub namespace: Digest,
    /// Model fingerprint (hex) of the engine that wrote the slot file.
    pub fingerprint: String,
    pub tenant: String,
    /// Number of tokens whose KV the snapshot holds.
    pub tokens: u32,
    /// Number of full blocks indexed, and the block size they were hashed with.
    pub blocks: u32,
    pub block_tokens: u32,
    /// Size of the slot file in bytes.
    pub bytes: u64,
    /// BLAKE3 digest of the whole slot file.
    #[serde(with = "hex_digest")]
    pub digest: Digest,
    pub chunk_size: u32,
    pub chunks: u32,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub last_access_ms: u64,
    pub hits: u64,
}

/// A snapshot about to be stored: everything but the file bytes and the fields the store fills.
#[derive(Debug, Clone)]
pub struct NewSnapshot {
    pub id: Digest,
    pub namespace: Digest,
    pub fingerprint: String,
    pub tenant: String,
    pub tokens: Vec<u32>,
    pub block_hashes: Vec<Digest>,
    pub block_tokens: u32,
}

/// The longest stored prefix of a request's block hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixMatch {
    pub id: Digest,
    /// Number of leading blocks of the request the snapshot holds.
    pub blocks: u32,
}

/// Failure of a snapshot store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to open the snapshot store at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("snapshot store I/O failed: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("snapshot file I/O failed on {path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("snapshot {0} not found")]
    NotFound(Digest),
    #[error("snapshot {id} is corrupt and was deleted: {reason}")]
    Corrupt { id: Digest, reason: String },
    #[error("snapshot of {bytes} bytes is larger than the limit of {limit} bytes ({setting})")]
    TooLarge { bytes: u64, limit: u64, setting: &'static str },
    #[error("invalid snapshot metadata for {id}: {reason}")]
    Metadata { id: Digest, reason: String },
    #[error("the eviction plugin failed and plugins.evictor.on_failure is \"reject\"; the snapshot was not stored")]
    EvictionRejected,
}

/// The eviction policy as the store uses it: notified of every change, requested for victims.
pub trait EvictionHook: Send + Sync {
    /// Snapshots left the store, and one may have entered it, in one committed batch.
    fn changed(&self, removed: &[Digest], inserted: Option<&SnapshotMeta>);
    /// Snapshots were restored; their metadata carries the updated hits and last access.
    fn accessed(&self, updated: &[SnapshotMeta]);
    /// Returns snapshots that together free at least `bytes`; the store checks them and adds
    /// least recently used ones for any shortfall. None refuses the insert.
    fn choose_victims(&self, bytes: u64) -> Option<Vec<Digest>>;
}

/// Follows the store's contents: every snapshot stored and every one removed, after the commit.
pub trait StoreObserver: Send + Sync {
    fn stored(&self, meta: &SnapshotMeta, blocks: &[Digest]);
    fn removed(&self, ids: &[Digest]);
}

/// Counters and sizes shown by `/admin/stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreStats {
    pub entries: u64,
    pub bytes: u64,
    pub capacity_bytes: u64,
    pub disk_bytes: u64,
    pub inserted: u64,
    pub evicted: u64,
    pub corrupt_deleted: u64,
}

/// Returns milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or_default()
}

/// Returns the total size of the files under `path`, following no symlinks.
pub fn folder_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => folder_size(&entry.path()),
            Ok(kind) if kind.is_file() => entry.metadata().map(|meta| meta.len()).unwrap_or_default(),
            _ => 0,
        })
        .sum()
}

mod hex_digest {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::prefix::Digest;

    pub fn serialize<S: Serializer>(digest: &Digest, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&digest.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Digest, D::Error> {
        let text = String::deserialize(deserializer)?;
        Digest::from_hex(&text).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

#[cfg(test)]
mod tests;
