//! The RocksDB implementation of the snapshot store.
//!
//! A snapshot is written in two steps. First its chunks are written without the WAL and flushed,
//! which puts them in a blob file of their own. Then one atomic batch with the WAL synced commits
//! the metadata, token ids, block hashes and index entries, together with the deletion of any
//! snapshots evicted to make room. A reader finds snapshots only through `meta` and `index`, so a
//! crash before the commit leaves invisible chunks, which `open` deletes, and never a torn snapshot.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};

use super::access::{Access, AccessLog};
use super::{EvictionHook, NewSnapshot, StoreObserver, PrefixMatch, SnapshotMeta, StoreError, StoreStats, folder_size, now_ms};
use crate::config::StoreConfig;
use crate::prefix::Digest;

const META: &str = "meta";
const TOKENS: &str = "tokens";
const BLOCKS: &str = "blocks";
const CHUNKS: &str = "chunks";
const INDEX: &str = "index";
/// Ids of snapshots whose chunks are being written. An id that a crash leaves here names chunks
/// that the next open deletes without reading them.
const PENDING: &str = "pending";

/// Values at least this large go to blob files instead of SST files.
const MIN_BLOB_SIZE: u64 = 4096;

/// The snapshot store. Every method blocks on disk I/O; call the large ones (`insert`,
/// `read_into`) from a blocking task.
pub struct Store {
    db: DB,
    path: PathBuf,
    capacity: u64,
    /// Stored bytes above which an insert makes room, and the level it evicts down to.
    high_watermark: u64,
    low_watermark: u64,
    /// The eviction policy, notified of every insert, access and removal. Without one, the
    /// least recently used snapshots leave first.
    hook: OnceLock<Arc<dyn EvictionHook>>,
    /// Told about every stored and removed snapshot (the fleet's index journal).
    observer: OnceLock<Arc<dyn StoreObserver>>,
    chunk_size: usize,
    max_snapshot: u64,
    state: Mutex<State>,
    /// Serialises writes: inserts, so that each flush carries exactly one snapshot's chunks, and
    /// deletes and access updates, so that an update never writes back metadata of a snapshot
    /// deleted after it was read.
    insert_lock: Mutex<()>,
    access: AccessLog,
    inserted: AtomicU64,
    evicted: AtomicU64,
    corrupt_deleted: AtomicU64,
}

/// In-memory accounting of stored snapshots, in least-recently-used order.
#[derive(Default)]
struct State {
    entries: HashMap<Digest, Entry>,
    lru: BTreeSet<(u64, Digest)>,
    bytes: u64,
}

#[derive(Clone, Copy)]
struct Entry {
    bytes: u64,
    last_access_ms: u64,
}

impl State {
    fn add(&mut self, id: Digest, entry: Entry) {
        if let Some(old) = self.entries.insert(id, entry) {
            self.lru.remove(&(old.last_access_ms, id));
            self.bytes -= old.bytes;
        }
        self.lru.insert((entry.last_access_ms, id));
        self.bytes += entry.bytes;
    }

    fn remove(&mut self, id: &Digest) {
        if let Some(old) = self.entries.remove(id) {
            self.lru.remove(&(old.last_access_ms, *id));
            self.bytes -= old.bytes;
        }
    }

    fn touch(&mut self, id: &Digest, at_ms: u64) {
        if let Some(entry) = self.entries.get_mut(id) {
            self.lru.remove(&(entry.last_access_ms, *id));
            entry.last_access_ms = entry.last_access_ms.max(at_ms);
            self.lru.insert((entry.last_access_ms, *id));
        }
    }
}

fn chunk_key(id: &Digest, index: u32) -> [u8; 36] {
    let mut key = [0u8; 36];
    key[..32].copy_from_slice(&id.0);
    key[32..].copy_from_slice(&index.to_be_bytes());
    key
}

fn index_key(block: &Digest, id: &Digest) -> [u8; 64] {
    let mut key = [0u8; 64];
    key[..32].copy_from_slice(&block.0);
    key[32..].copy_from_slice(&id.0);
    key
}

/// Returns the first key after every key that starts with `id`.
fn id_end(id: &Digest) -> [u8; 36] {
    chunk_key(id, u32::MAX)
}

/// Returns the options of kvsidecar's RocksDB databases: created when missing, with their column
/// families, and with the WAL (8 MiB), the info log (2 files of 1 MiB, warnings and worse) and the
/// manifest (4 MiB) bounded, so a long-running sidecar's folder does not grow with them.
pub fn bounded_options() -> Options {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.set_max_total_wal_size(8 << 20);
    options.set_log_level(rocksdb::LogLevel::Warn);
    options.set_max_log_file_size(1 << 20);
    options.set_keep_log_file_num(2);
    options.set_max_manifest_file_size(4 << 20);
    options
}

impl Store {
    /// Opens or creates the store under `config.data_dir`, deleting chunks that no committed
    /// snapshot owns. Snapshots are a cache: a store that RocksDB finds damaged while opening or
    /// loading it is moved aside for inspection and replaced by an empty one, so the sidecar keeps
    /// serving.
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        let path = config.data_dir.join("snapshots");
        match Self::open_once(config) {
            Err(StoreError::Db(error)) if error.kind() == rocksdb::ErrorKind::Corruption => {
                let aside = config.data_dir.join(format!("snapshots.damaged-{}", now_ms()));
                tracing::error!(store.path = %path.display(), moved_to = %aside.display(), error = %error, "snapshot store is damaged; starting with an empty store");
                std::fs::rename(&path, &aside)
                    .map_err(|rename| StoreError::Open { path: path.display().to_string(), reason: format!("{error}; moving it aside failed: {rename}") })?;
                Self::open_once(config)
            }
            other => other,
        }
    }

    fn open_once(config: &StoreConfig) -> Result<Store, StoreError> {
        let path = config.data_dir.join("snapshots");
        std::fs::create_dir_all(&path)
            .map_err(|error| StoreError::Open { path: path.display().to_string(), reason: error.to_string() })?;

        // Chunks bypass the WAL, so it only carries metadata, and the small WAL limit of
        // `bounded_options` makes RocksDB flush the metadata families and drop old WAL files.
        let options = bounded_options();

        let families = Self::families(config).into_iter();
        let families: Vec<ColumnFamilyDescriptor> = families.collect();
        let db = match DB::open_cf_descriptors(&options, &path, families) {
            Ok(db) => db,
            Err(error) if error.kind() == rocksdb::ErrorKind::Corruption => return Err(StoreError::Db(error)),
            Err(error) => {
                let mut reason = error.to_string();
                if reason.contains("lock") {
                    reason.push_str("\nhint: another kvsidecar process is probably using this data dir; stop it or choose another --data-dir");
                }
                return Err(StoreError::Open { path: path.display().to_string(), reason });
            }
        };

        let store = Store {
            db,
            path,
            capacity: config.capacity.as_u64(),
            high_watermark: (config.capacity.as_u64() as f64 * config.high_watermark) as u64,
            low_watermark: (config.capacity.as_u64() as f64 * config.low_watermark) as u64,
            hook: OnceLock::new(),
            observer: OnceLock::new(),
            chunk_size: config.chunk_size.as_u64() as usize,
            max_snapshot: config.max_snapshot.as_u64(),
            state: Mutex::new(State::default()),
            insert_lock: Mutex::new(()),
            access: AccessLog::new(),
            inserted: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            corrupt_deleted: AtomicU64::new(0),
        };
        store.load_state()?;
        store.delete_orphan_chunks()?;
        Ok(store)
    }

    /// Returns the column families with their options; chunks go to blob files.
    fn families(config: &StoreConfig) -> Vec<ColumnFamilyDescriptor> {
        let mut chunk_options = Options::default();
        chunk_options.set_enable_blob_files(true);
        chunk_options.set_min_blob_size(MIN_BLOB_SIZE);
        chunk_options.set_blob_file_size(config.max_snapshot.as_u64().max(64 << 20));
        chunk_options.set_enable_blob_gc(true);
        chunk_options.set_blob_gc_age_cutoff(1.0);
        chunk_options.set_write_buffer_size(64 << 20);
        [META, TOKENS, BLOCKS, INDEX, PENDING]
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, Options::default()))
            .chain([ColumnFamilyDescriptor::new(CHUNKS, chunk_options)])
            .collect()
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // Every family is created by `open`, so the handle always exists.
        self.db.cf_handle(name).expect("column family created at open")
    }

    fn load_state(&self) -> Result<(), StoreError> {
        let mut state = self.lock_state();
        let mut unreadable = Vec::new();
        for item in self.db.iterator_cf(self.cf(META), IteratorMode::Start) {
            let (key, value) = item?;
            match serde_json::from_slice::<SnapshotMeta>(&value) {
                Ok(meta) => state.add(meta.id, Entry { bytes: meta.bytes, last_access_ms: meta.last_access_ms }),
                Err(error) => {
                    tracing::warn!(snapshot.key = %hex::encode(&key), error = %error, "unreadable snapshot metadata, deleting the snapshot");
                    unreadable.push(key);
                }
            }
        }
        drop(state);
        for key in unreadable {
            if let Some(id) = Digest::from_slice(&key) {
                self.delete(&[id])?;
            } else {
                self.db.delete_cf(self.cf(META), &key)?;
            }
        }
        Ok(())
    }

    /// Deletes chunks left by an insert that crashed before its commit, as listed in `pending`.
    fn delete_orphan_chunks(&self) -> Result<(), StoreError> {
        let mut orphans = Vec::new();
        for item in self.db.iterator_cf(self.cf(PENDING), IteratorMode::Start) {
            let (key, _) = item?;
            if let Some(id) = Digest::from_slice(&key) {
                orphans.push(id);
            }
        }
        for id in &orphans {
            if self.db.get_pinned_cf(self.cf(META), id.0)?.is_none() {
                tracing::warn!(snapshot.id = %id, "deleting chunks of a snapshot whose write did not commit");
                self.discard_chunks(id)?;
            }
            self.db.delete_cf(self.cf(PENDING), id.0)?;
        }
        Ok(())
    }

    /// Deletes the chunks of `id` without reading them, and reclaims their space.
    fn discard_chunks(&self, id: &Digest) -> Result<(), StoreError> {
        let chunks = self.cf(CHUNKS);
        self.db.delete_range_cf(chunks, chunk_key(id, 0), id_end(id))?;
        self.db.compact_range_cf(chunks, Some(chunk_key(id, 0)), Some(id_end(id)));
        Ok(())
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state contains plain counters that stay consistent even if a lock holder panicked.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Installs the eviction policy. Only the first call has an effect.
    pub fn set_eviction_hook(&self, hook: Arc<dyn EvictionHook>) {
        let _ = self.hook.set(hook);
    }

    /// Installs the observer of stored and removed snapshots. Only the first call has an effect.
    pub fn set_observer(&self, observer: Arc<dyn StoreObserver>) {
        let _ = self.observer.set(observer);
    }

    /// Returns the chained block hashes of a stored snapshot.
    pub fn blocks(&self, id: &Digest) -> Result<Vec<Digest>, StoreError> {
        let value = self.db.get_pinned_cf(self.cf(BLOCKS), id.0)?.ok_or(StoreError::NotFound(*id))?;
        Ok(value.chunks_exact(32).filter_map(Digest::from_slice).collect())
    }

    /// Returns whether a snapshot with this id is stored.
    pub fn contains(&self, id: &Digest) -> bool {
        self.lock_state().entries.contains_key(id)
    }

    /// Finds the stored snapshot holding the most leading blocks of `hashes`. Because each block
    /// hash chains its parents, a snapshot indexed under block `i` holds blocks `0..=i` too, so
    /// a binary search over the blocks needs only about log2(n) index seeks.
    pub fn longest_prefix(&self, hashes: &[Digest]) -> Result<Option<PrefixMatch>, StoreError> {
        let (mut low, mut high) = (0usize, hashes.len());
        let mut best = None;
        while low < high {
            let middle = (low + high) / 2;
            match self.find_block(&hashes[middle])? {
                Some(id) => {
                    best = Some(PrefixMatch { id, blocks: middle as u32 + 1 });
                    low = middle + 1;
                }
                None => high = middle,
            }
        }
        Ok(best)
    }

    fn find_block(&self, block: &Digest) -> Result<Option<Digest>, StoreError> {
        let mut iterator = self.db.raw_iterator_cf(self.cf(INDEX));
        iterator.seek(block.0);
        let found = iterator.key().filter(|key| key.starts_with(&block.0)).and_then(|key| Digest::from_slice(&key[32..]));
        iterator.status()?;
        Ok(found)
    }

    /// Returns the metadata of a stored snapshot.
    pub fn meta(&self, id: &Digest) -> Result<Option<SnapshotMeta>, StoreError> {
        let Some(value) = self.db.get_pinned_cf(self.cf(META), id.0)? else { return Ok(None) };
        serde_json::from_slice(&value).map(Some).map_err(|error| StoreError::Metadata { id: *id, reason: error.to_string() })
    }

    /// Returns the token ids of a stored snapshot.
    pub fn tokens(&self, id: &Digest) -> Result<Vec<u32>, StoreError> {
        let value = self.db.get_pinned_cf(self.cf(TOKENS), id.0)?.ok_or(StoreError::NotFound(*id))?;
        if value.len() % 4 != 0 {
            return Err(StoreError::Metadata { id: *id, reason: format!("token list of {} bytes is not a multiple of 4", value.len()) });
        }
        Ok(value.chunks_exact(4).map(|bytes| u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])).collect())
    }

    /// Lists the metadata of every stored snapshot, most recently used first.
    pub fn list(&self) -> Result<Vec<SnapshotMeta>, StoreError> {
        let mut all = Vec::new();
        for item in self.db.iterator_cf(self.cf(META), IteratorMode::Start) {
            let (_, value) = item?;
            if let Ok(meta) = serde_json::from_slice::<SnapshotMeta>(&value) {
                all.push(meta);
            }
        }
        all.sort_by_key(|meta| std::cmp::Reverse(meta.last_access_ms));
        Ok(all)
    }

    pub fn stats(&self) -> StoreStats {
        let state = self.lock_state();
        StoreStats {
            entries: state.entries.len() as u64,
            bytes: state.bytes,
            capacity_bytes: self.capacity,
            disk_bytes: folder_size(&self.path),
            inserted: self.inserted.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            corrupt_deleted: self.corrupt_deleted.load(Ordering::Relaxed),
        }
    }

    /// Stores the slot file at `file` as snapshot `new`, evicting least recently used snapshots
    /// when the store would pass its capacity. Returns the ids of the evicted snapshots, or None
    /// when a snapshot with this id is already stored.
    pub fn insert(&self, new: &NewSnapshot, file: &Path) -> Result<Option<Vec<Digest>>, StoreError> {
        let file_error = |source| StoreError::File { path: file.display().to_string(), source };
        let bytes = std::fs::metadata(file).map_err(file_error)?.len();
        for (limit, setting) in [(self.max_snapshot, "store.max_snapshot"), (self.capacity, "store.capacity")] {
            if bytes > limit {
                return Err(StoreError::TooLarge { bytes, limit, setting });
            }
        }
        let _serial = self.insert_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.contains(&new.id) {
            return Ok(None);
        }

        let mut synced = WriteOptions::default();
        synced.set_sync(true);
        self.db.put_cf_opt(self.cf(PENDING), new.id.0, [], &synced)?;
        let written = self.write_snapshot(new, file, bytes, &synced);
        if written.is_err() && self.discard_chunks(&new.id).is_ok() {
            // When this cleanup fails, the pending marker stays and the next open deletes the chunks.
            let _ = self.db.delete_cf(self.cf(PENDING), new.id.0);
        }
        written
    }

    /// Writes the chunks and commits the snapshot; `insert` handles failures.
    fn write_snapshot(&self, new: &NewSnapshot, file: &Path, bytes: u64, synced: &WriteOptions) -> Result<Option<Vec<Digest>>, StoreError> {
        let file_error = |source| StoreError::File { path: file.display().to_string(), source };

        // Step 1: the chunks, without the WAL, flushed into their own blob file.
        let chunks = self.cf(CHUNKS);
        let mut reader = std::fs::File::open(file).map_err(file_error)?;
        let mut hasher = blake3::Hasher::new();
        let mut buffer = vec![0u8; self.chunk_size];
        let mut count = 0u32;
        let mut staged = WriteBatch::default();
        let mut staged_bytes = 0usize;
        let mut no_wal = WriteOptions::default();
        no_wal.disable_wal(true);
        loop {
            let filled = read_full(&mut reader, &mut buffer).map_err(file_error)?;
            if filled == 0 {
                break;
            }
            hasher.update(&buffer[..filled]);
            staged.put_cf(chunks, chunk_key(&new.id, count), &buffer[..filled]);
            staged_bytes += filled;
            count += 1;
            if staged_bytes >= 16 << 20 {
                self.db.write_opt(std::mem::take(&mut staged), &no_wal)?;
                staged_bytes = 0;
            }
        }
        self.db.write_opt(staged, &no_wal)?;
        self.db.flush_cf(chunks)?;

        // Step 2: choose victims and commit everything else in one synced batch.
        let now = now_ms();
        let meta = SnapshotMeta {
            id: new.id,
            namespace: new.namespace,
            fingerprint: new.fingerprint.clone(),
            tenant: new.tenant.clone(),
            tokens: new.tokens.len() as u32,
            blocks: new.block_hashes.len() as u32,
            block_tokens: new.block_tokens,
            bytes,
            digest: Digest(*hasher.finalize().as_bytes()),
            chunk_size: self.chunk_size as u32,
            chunks: count,
            created_ms: now,
            last_access_ms: now,
            hits: 0,
        };
        let victims = self.choose_victims(bytes, &new.id)?;
        let mut batch = WriteBatch::default();
        for victim in &victims {
            self.delete_into(&mut batch, victim)?;
        }
        batch.put_cf(self.cf(META), new.id.0, serde_json::to_vec(&meta).unwrap_or_default());
        let token_bytes: Vec<u8> = new.tokens.iter().flat_map(|token| token.to_le_bytes()).collect();
        batch.put_cf(self.cf(TOKENS), new.id.0, token_bytes);
        let block_bytes: Vec<u8> = new.block_hashes.iter().flat_map(|hash| hash.0).collect();
        batch.put_cf(self.cf(BLOCKS), new.id.0, block_bytes);
        for (position, block) in new.block_hashes.iter().enumerate() {
            batch.put_cf(self.cf(INDEX), index_key(block, &new.id), (position as u32 + 1).to_be_bytes());
        }
        batch.delete_cf(self.cf(PENDING), new.id.0);
        self.db.write_opt(batch, synced)?;

        let mut state = self.lock_state();
        for victim in &victims {
            state.remove(victim);
        }
        state.add(new.id, Entry { bytes, last_access_ms: now });
        drop(state);
        self.inserted.fetch_add(1, Ordering::Relaxed);
        self.evicted.fetch_add(victims.len() as u64, Ordering::Relaxed);
        if let Some(hook) = self.hook.get() {
            hook.changed(&victims, Some(&meta));
        }
        if let Some(observer) = self.observer.get() {
            if !victims.is_empty() {
                observer.removed(&victims);
            }
            observer.stored(&meta, &new.block_hashes);
        }
        self.reclaim(&victims);
        Ok(Some(victims))
    }

    /// Chooses the snapshots to evict so that `incoming` more bytes fit. Nothing is evicted
    /// while the total stays at or below the high watermark; above it, the eviction policy is
    /// requested enough bytes to reach the low watermark, its victims are checked against the
    /// store, and least recently used snapshots make up any shortfall. Fails only when the
    /// policy refuses (`on_failure = "reject"`).
    fn choose_victims(&self, incoming: u64, keep: &Digest) -> Result<Vec<Digest>, StoreError> {
        let total = self.lock_state().bytes + incoming;
        if total <= self.high_watermark.min(self.capacity) {
            return Ok(Vec::new());
        }
        let need = total - self.low_watermark.min(total);
        let mut victims = match self.hook.get() {
            Some(hook) => hook.choose_victims(need).ok_or(StoreError::EvictionRejected)?,
            None => Vec::new(),
        };
        let state = self.lock_state();
        let mut chosen = std::collections::HashSet::new();
        victims.retain(|id| id != keep && state.entries.contains_key(id) && chosen.insert(*id));
        let mut freed: u64 = victims.iter().map(|id| state.entries[id].bytes).sum();
        for (_, id) in &state.lru {
            if freed >= need {
                break;
            }
            if id == keep || chosen.contains(id) {
                continue;
            }
            freed += state.entries[id].bytes;
            victims.push(*id);
        }
        Ok(victims)
    }

    /// Returns the number of stored snapshots.
    pub fn len(&self) -> usize {
        self.lock_state().entries.len()
    }

    /// Returns whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the bytes stored now.
    pub fn bytes(&self) -> u64 {
        self.lock_state().bytes
    }

    /// Returns the snapshots removed since start: evicted for room, and deleted as corrupt.
    pub fn removal_counts(&self) -> (u64, u64) {
        (self.evicted.load(Ordering::Relaxed), self.corrupt_deleted.load(Ordering::Relaxed))
    }

    /// Returns the size of snapshot `id`, or None when it is not stored.
    pub fn size_of(&self, id: &Digest) -> Option<u64> {
        self.lock_state().entries.get(id).map(|entry| entry.bytes)
    }

    /// Adds the deletion of every key of snapshot `id` to `batch`.
    fn delete_into(&self, batch: &mut WriteBatch, id: &Digest) -> Result<(), StoreError> {
        if let Some(blocks) = self.db.get_pinned_cf(self.cf(BLOCKS), id.0)? {
            for block in blocks.chunks_exact(32).filter_map(Digest::from_slice) {
                batch.delete_cf(self.cf(INDEX), index_key(&block, id));
            }
        }
        batch.delete_cf(self.cf(META), id.0);
        batch.delete_cf(self.cf(TOKENS), id.0);
        batch.delete_cf(self.cf(BLOCKS), id.0);
        batch.delete_range_cf(self.cf(CHUNKS), chunk_key(id, 0), id_end(id));
        Ok(())
    }

    /// Deletes snapshots in one synced batch and reclaims their disk space.
    pub fn delete(&self, ids: &[Digest]) -> Result<(), StoreError> {
        let _serial = self.insert_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut batch = WriteBatch::default();
        for id in ids {
            self.delete_into(&mut batch, id)?;
        }
        let mut synced = WriteOptions::default();
        synced.set_sync(true);
        self.db.write_opt(batch, &synced)?;
        let mut state = self.lock_state();
        for id in ids {
            state.remove(id);
        }
        drop(state);
        if let Some(hook) = self.hook.get() {
            hook.changed(ids, None);
        }
        if let Some(observer) = self.observer.get() {
            observer.removed(ids);
        }
        self.reclaim(ids);
        Ok(())
    }

    /// Compacts the chunk ranges of deleted snapshots, which drops their keys and so the blob
    /// files that only they referenced.
    fn reclaim(&self, ids: &[Digest]) {
        let chunks = self.cf(CHUNKS);
        for id in ids {
            self.db.compact_range_cf(chunks, Some(chunk_key(id, 0)), Some(id_end(id)));
        }
    }

    /// Writes snapshot `id` to `destination`, verifying its chunk sequence, size and BLAKE3
    /// digest. A snapshot that fails verification is deleted and reported as corrupt.
    pub fn read_into(&self, id: &Digest, destination: &Path) -> Result<SnapshotMeta, StoreError> {
        let file_error = |source| StoreError::File { path: destination.display().to_string(), source };
        let read = std::fs::File::create(destination).map_err(file_error).and_then(|file| {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            let meta = self.read_chunks(id, |chunk| out.write_all(chunk))?;
            out.flush().map_err(file_error)?;
            Ok(meta)
        });
        if read.is_err() {
            let _ = std::fs::remove_file(destination);
        }
        read
    }

    /// Passes the bytes of snapshot `id` to `sink` chunk by chunk, verifying the chunk sequence,
    /// size and BLAKE3 digest. The last chunk is passed only after the whole snapshot verified.
    /// A snapshot that fails verification is deleted and reported as corrupt. An error of `sink`
    /// ends the read as `StoreError::File`.
    pub fn read_chunks(&self, id: &Digest, mut sink: impl FnMut(&[u8]) -> std::io::Result<()>) -> Result<SnapshotMeta, StoreError> {
        self.read_owned_chunks(id, |chunk| sink(&chunk))
    }

    /// Works as `read_chunks`, but hands each chunk over as an owned buffer, so a caller that
    /// sends the chunks on does not copy them.
    pub fn read_owned_chunks(&self, id: &Digest, mut sink: impl FnMut(Box<[u8]>) -> std::io::Result<()>) -> Result<SnapshotMeta, StoreError> {
        let meta = self.meta(id)?.ok_or(StoreError::NotFound(*id))?;
        match self.copy_verified(&meta, &mut sink) {
            Ok(()) => Ok(meta),
            Err(StoreError::Corrupt { id, reason }) => {
                tracing::warn!(snapshot.id = %id, reason = %reason, "stored snapshot failed verification, deleting it");
                self.corrupt_deleted.fetch_add(1, Ordering::Relaxed);
                self.delete(&[id])?;
                Err(StoreError::Corrupt { id, reason })
            }
            Err(error) => Err(error),
        }
    }

    fn copy_verified(&self, meta: &SnapshotMeta, sink: &mut dyn FnMut(Box<[u8]>) -> std::io::Result<()>) -> Result<(), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt { id: meta.id, reason };
        let sink_error = |source| StoreError::File { path: "snapshot reader".to_string(), source };
        let mut hasher = blake3::Hasher::new();
        let mut expected = 0u32;
        let mut written = 0u64;
        // Each chunk is held back until the next one is read, so the last one reaches the sink
        // only after the whole snapshot verified.
        let mut pending: Option<Box<[u8]>> = None;

        let start = chunk_key(&meta.id, 0);
        // The BLAKE3 digest covers every byte, so RocksDB's per-blob CRC32C adds nothing but time:
        // with the portable CRC code the rocksdb crate builds, it took 15 % of a pull's CPU.
        let mut options = rocksdb::ReadOptions::default();
        options.set_verify_checksums(false);
        let chunks = self.db.iterator_cf_opt(self.cf(CHUNKS), options, IteratorMode::From(&start, Direction::Forward));
        for item in chunks {
            // RocksDB's own failures (a missing blob file, a damaged block) come before the
            // BLAKE3 check can, and they mean the same: this snapshot cannot be read whole.
            let (key, value) = item.map_err(|error| corrupt(format!("chunk read failed: {error}")))?;
            if !key.starts_with(&meta.id.0) {
                break;
            }
            let index = key.get(32..36).map(|bytes| u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]));
            if index != Some(expected) {
                return Err(corrupt(format!("chunk {expected} is missing")));
            }
            hasher.update(&value);
            written += value.len() as u64;
            expected += 1;
            if let Some(previous) = pending.replace(value) {
                sink(previous).map_err(sink_error)?;
            }
        }

        if expected != meta.chunks {
            return Err(corrupt(format!("found {expected} chunks, metadata says {}", meta.chunks)));
        }
        if written != meta.bytes {
            return Err(corrupt(format!("found {written} bytes, metadata says {}", meta.bytes)));
        }
        let digest = Digest(*hasher.finalize().as_bytes());
        if digest != meta.digest {
            return Err(corrupt(format!("BLAKE3 digest {digest} does not match the stored {}", meta.digest)));
        }
        if let Some(last) = pending {
            sink(last).map_err(sink_error)?;
        }
        Ok(())
    }

    /// Returns the id of the shortest stored snapshot that contains block `block`, looking at up
    /// to 64 of them, so a peer that needs only a shared prefix pulls as few bytes as it can.
    pub fn holding_block(&self, block: &Digest) -> Result<Option<Digest>, StoreError> {
        let mut iterator = self.db.raw_iterator_cf(self.cf(INDEX));
        iterator.seek(block.0);
        let mut ids = Vec::new();
        while let Some(key) = iterator.key().filter(|key| key.starts_with(&block.0)) {
            if let Some(id) = Digest::from_slice(&key[32..]) {
                ids.push(id);
            }
            if ids.len() == 64 {
                break;
            }
            iterator.next();
        }
        iterator.status()?;
        let state = self.lock_state();
        Ok(ids.into_iter().filter(|id| state.entries.contains_key(id)).min_by_key(|id| state.entries[id].bytes))
    }

    /// Deletes snapshot `id` after a read of its metadata or token list failed, and counts it as
    /// corrupt. Deleting is best effort: a delete that fails leaves the snapshot for the next try.
    pub fn discard_unreadable(&self, id: &Digest, reason: &str) {
        tracing::warn!(snapshot.id = %id, reason = %reason, "stored snapshot is unreadable, deleting it");
        self.corrupt_deleted.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = self.delete(&[*id]) {
            tracing::warn!(snapshot.id = %id, error = %error, "failed to delete an unreadable snapshot");
        }
    }

    /// Records a hit on the request path; the metadata is updated later by `flush_access`.
    pub fn record_access(&self, id: &Digest) {
        let at_ms = now_ms();
        self.lock_state().touch(id, at_ms);
        if !self.access.push(Access { id: *id, at_ms }) {
            tracing::debug!(snapshot.id = %id, "access ring full, dropping a hit record");
        }
    }

    /// Writes queued access records to the snapshot metadata. Returns how many were written.
    pub fn flush_access(&self) -> Result<usize, StoreError> {
        let records = self.access.drain();
        if records.is_empty() {
            return Ok(0);
        }
        let mut updates: HashMap<Digest, (u64, u64)> = HashMap::new();
        for record in &records {
            let update = updates.entry(record.id).or_default();
            update.0 += 1;
            update.1 = update.1.max(record.at_ms);
        }
        let _serial = self.insert_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut batch = WriteBatch::default();
        let mut updated = Vec::new();
        for (id, (hits, last_ms)) in updates {
            if let Some(mut meta) = self.meta(&id)? {
                meta.hits += hits;
                meta.last_access_ms = meta.last_access_ms.max(last_ms);
                batch.put_cf(self.cf(META), id.0, serde_json::to_vec(&meta).unwrap_or_default());
                updated.push(meta);
            }
        }
        self.db.write(batch)?;
        if let Some(hook) = self.hook.get() {
            hook.accessed(&updated);
        }
        Ok(records.len())
    }

    /// Waits until an access is recorded.
    pub async fn access_recorded(&self) {
        self.access.wait().await;
    }
}

/// Reads until `buffer` is full or the reader ends; returns the number of bytes read.
fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// Test support: damage and interruptions that the real store cannot produce on demand.
#[cfg(any(test, feature = "fault-injection"))]
impl Store {
    /// Writes the chunks of `new` and its pending marker, as an insert killed before its commit.
    pub fn stage_without_commit(&self, new: &NewSnapshot, file: &Path) -> Result<(), StoreError> {
        self.db.put_cf(self.cf(PENDING), new.id.0, [])?;
        let bytes = std::fs::read(file).map_err(|source| StoreError::File { path: file.display().to_string(), source })?;
        for (index, chunk) in bytes.chunks(self.chunk_size).enumerate() {
            self.db.put_cf(self.cf(CHUNKS), chunk_key(&new.id, index as u32), chunk)?;
        }
        Ok(())
    }

    pub fn pending_count(&self) -> usize {
        self.db.iterator_cf(self.cf(PENDING), IteratorMode::Start).count()
    }

    pub fn chunk_count(&self, id: &Digest) -> usize {
        let start = chunk_key(id, 0);
        self.db
            .iterator_cf(self.cf(CHUNKS), IteratorMode::From(&start, Direction::Forward))
            .take_while(|item| item.as_ref().is_ok_and(|(key, _)| key.starts_with(&id.0)))
            .count()
    }

    /// Deletes the last chunk of a snapshot, as a truncated store would lose it.
    pub fn drop_last_chunk(&self, id: &Digest) -> Result<(), StoreError> {
        let meta = self.meta(id)?.ok_or(StoreError::NotFound(*id))?;
        self.db.delete_cf(self.cf(CHUNKS), chunk_key(id, meta.chunks - 1))?;
        Ok(())
    }

    /// Damages one byte of a stored snapshot's first chunk, as a failing disk would.
    pub fn corrupt_first_chunk(&self, id: &Digest) -> Result<(), StoreError> {
        let chunks = self.cf(CHUNKS);
        let key = chunk_key(id, 0);
        let mut value = self.db.get_cf(chunks, key)?.ok_or(StoreError::NotFound(*id))?;
        let middle = value.len() / 2;
        value[middle] ^= 0xff;
        self.db.put_cf(chunks, key, value)?;
        self.db.flush_cf(chunks)?;
        Ok(())
    }
}
