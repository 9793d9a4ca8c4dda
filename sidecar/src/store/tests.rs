use std::path::Path;

use super::*;
use crate::config::{ByteSize, Config};
use crate::prefix::{Namespace, block_hashes, sequence_id};

fn config(dir: &Path, capacity: u64) -> crate::config::StoreConfig {
    let mut config = Config::defaults().store;
    config.data_dir = dir.to_path_buf();
    config.capacity = ByteSize::b(capacity);
    config.chunk_size = ByteSize::kib(4);
    config
}

/// Writes a file of `len` bytes and returns the snapshot description for `tokens`.
fn snapshot(dir: &Path, name: &str, tokens: Vec<u32>, len: usize) -> (NewSnapshot, std::path::PathBuf) {
    let namespace = Namespace::new(&crate::engine::Fingerprint([1; 32]), "tenant", None);
    let path = dir.join(name);
    let bytes: Vec<u8> = (0..len).map(|i| (i * 31 + tokens.len()) as u8).collect();
    std::fs::write(&path, bytes).unwrap();
    let new = NewSnapshot {
        id: sequence_id(&namespace, &tokens),
        namespace: namespace.0,
        fingerprint: "ff".into(),
        tenant: "tenant".into(),
        block_hashes: block_hashes(&namespace, &tokens, 4),
        tokens,
        block_tokens: 4,
    };
    (new, path)
}

#[test]
fn insert_then_read_back_identical() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path(), 1 << 30)).unwrap();
    let (new, file) = snapshot(dir.path(), "a.bin", (0..10).collect(), 10_000);
    store.insert(&new, &file).unwrap();

    let out = dir.path().join("out.bin");
    let meta = store.read_into(&new.id, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&file).unwrap());
    assert_eq!(meta.tokens, 10);
    assert_eq!(meta.chunks, 3);
    assert_eq!(store.tokens(&new.id).unwrap(), new.tokens);
}

#[test]
fn longest_prefix_found_by_block() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path(), 1 << 30)).unwrap();
    let (new, file) = snapshot(dir.path(), "a.bin", (0..16).collect(), 100);
    store.insert(&new, &file).unwrap();

    let namespace = Namespace::new(&crate::engine::Fingerprint([1; 32]), "tenant", None);
    let mut query: Vec<u32> = (0..24).collect();
    query[9] = 500;
    let found = store.longest_prefix(&block_hashes(&namespace, &query, 4)).unwrap().unwrap();
    assert_eq!(found, PrefixMatch { id: new.id, blocks: 2 });

    let other = Namespace::new(&crate::engine::Fingerprint([1; 32]), "other", None);
    assert_eq!(store.longest_prefix(&block_hashes(&other, &query, 4)).unwrap(), None);
}

#[test]
fn corrupt_chunk_is_a_miss_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path(), 1 << 30)).unwrap();
    let (new, file) = snapshot(dir.path(), "a.bin", (0..8).collect(), 9000);
    assert_eq!(store.insert(&new, &file).unwrap(), Some(Vec::new()));
    assert_eq!(store.insert(&new, &file).unwrap(), None, "a second insert of the same id is a no-op");
    store.corrupt_first_chunk(&new.id).unwrap();

    let out = dir.path().join("out.bin");
    assert!(matches!(store.read_into(&new.id, &out), Err(StoreError::Corrupt { .. })));
    assert!(!out.exists(), "no partial file is left");
    assert!(!store.contains(&new.id));
    assert_eq!(store.meta(&new.id).unwrap(), None);
    assert_eq!(store.stats().corrupt_deleted, 1);
}

#[test]
fn capacity_evicts_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path(), 25_000)).unwrap();
    let mut ids = Vec::new();
    for n in 0..3u32 {
        let (new, file) = snapshot(dir.path(), &format!("{n}.bin"), (n * 100..n * 100 + 8).collect(), 10_000);
        let evicted = store.insert(&new, &file).unwrap().expect("a new snapshot");
        ids.push(new.id);
        if n == 1 {
            std::thread::sleep(std::time::Duration::from_millis(5));
            store.record_access(&ids[0]);
        }
        if n == 2 {
            assert_eq!(evicted, vec![ids[1]], "the least recently used snapshot goes first");
        }
    }
    let stats = store.stats();
    assert_eq!(stats.entries, 2);
    assert!(stats.bytes <= 25_000);
    assert_eq!(stats.evicted, 1);
}

#[test]
fn state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (new, file) = snapshot(dir.path(), "a.bin", (0..8).collect(), 5000);
    {
        let store = Store::open(&config(dir.path(), 1 << 30)).unwrap();
        store.insert(&new, &file).unwrap();
        store.record_access(&new.id);
        assert_eq!(store.flush_access().unwrap(), 1);
    }
    let store = Store::open(&config(dir.path(), 1 << 30)).unwrap();
    assert!(store.contains(&new.id));
    assert_eq!(store.stats().bytes, 5000);
    assert_eq!(store.meta(&new.id).unwrap().unwrap().hits, 1);
}

#[test]
fn oversized_snapshot_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path(), 8192)).unwrap();
    let (new, file) = snapshot(dir.path(), "a.bin", (0..8).collect(), 9000);
    assert!(matches!(store.insert(&new, &file), Err(StoreError::TooLarge { setting: "store.capacity", .. })));
    assert_eq!(store.stats().entries, 0);
}

#[test]
fn interrupted_write_is_cleaned_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (new, file) = snapshot(dir.path(), "a.bin", (0..8).collect(), 9000);
    {
        let store = Store::open(&config(dir.path(), 1 << 30)).unwrap();
        store.stage_without_commit(&new, &file).unwrap();
        assert!(!store.contains(&new.id), "staged chunks are not a snapshot");
    }
    let store = Store::open(&config(dir.path(), 1 << 30)).unwrap();
    assert!(!store.contains(&new.id));
    assert_eq!(store.pending_count(), 0);
    assert_eq!(store.chunk_count(&new.id), 0, "the chunks are gone");
    assert_eq!(store.insert(&new, &file).unwrap(), Some(Vec::new()), "the same snapshot can be stored again");
}

#[test]
fn unreadable_chunk_is_corrupt_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path(), 1 << 30)).unwrap();
    let (new, file) = snapshot(dir.path(), "a.bin", (0..8).collect(), 9000);
    store.insert(&new, &file).unwrap();
    store.drop_last_chunk(&new.id).unwrap();

    let out = dir.path().join("out.bin");
    assert!(matches!(store.read_into(&new.id, &out), Err(StoreError::Corrupt { .. })), "a truncated snapshot is corrupt");
    assert!(!store.contains(&new.id));
}

#[test]
fn damaged_blob_file_is_a_miss_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (new, file) = snapshot(dir.path(), "a.bin", (0..8).collect(), 50_000);
    {
        let store = Store::open(&config(dir.path(), 1 << 30)).unwrap();
        store.insert(&new, &file).unwrap();
    }
    let blobs: Vec<_> = std::fs::read_dir(dir.path().join("snapshots"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "blob"))
        .collect();
    assert!(!blobs.is_empty(), "chunks are kept in blob files");
    for blob in &blobs {
        let mut bytes = std::fs::read(blob).unwrap();
        // A byte inside a chunk's value, past the record header: reads skip RocksDB's CRC, so
        // only damage to the value bytes themselves (which BLAKE3 covers) matters.
        let middle = (bytes.len() / 2 + 200).min(bytes.len() - 1);
        bytes[middle] ^= 0x01;
        std::fs::write(blob, bytes).unwrap();
    }

    let store = Store::open(&config(dir.path(), 1 << 30)).expect("a damaged blob does not stop the store from opening");
    let out = dir.path().join("out.bin");
    let read = store.read_into(&new.id, &out);
    assert!(matches!(read, Err(StoreError::Corrupt { .. })), "{read:?}");
    assert!(!store.contains(&new.id), "the damaged snapshot is deleted");
}

#[test]
fn damaged_metadata_files_never_stop_open() {
    let dir = tempfile::tempdir().unwrap();
    let (new, file) = snapshot(dir.path(), "a.bin", (0..8).collect(), 50_000);
    {
        let store = Store::open(&config(dir.path(), 1 << 30)).unwrap();
        store.insert(&new, &file).unwrap();
    }
    for entry in std::fs::read_dir(dir.path().join("snapshots")).unwrap().filter_map(Result::ok) {
        if entry.path().extension().is_some_and(|ext| ext == "sst") {
            let mut bytes = std::fs::read(entry.path()).unwrap();
            bytes[0] ^= 0x01;
            std::fs::write(entry.path(), bytes).unwrap();
        }
    }

    let store = Store::open(&config(dir.path(), 1 << 30)).expect("a damaged store is replaced, not fatal");
    let out = dir.path().join("out.bin");
    assert!(store.read_into(&new.id, &out).is_err(), "nothing damaged is served");
    let (other, other_file) = snapshot(dir.path(), "b.bin", (100..108).collect(), 5000);
    assert_eq!(store.insert(&other, &other_file).unwrap(), Some(Vec::new()), "the store accepts new snapshots");
}
