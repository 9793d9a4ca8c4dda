//! Eviction policies on a real RocksDB store, with the shipped evictor plugins built from source:
//! a scripted sequence of inserts and restores, and which snapshots each policy keeps.

use std::collections::BTreeSet;
use std::sync::Arc;

use kvsidecar::config::{ByteSize, Config};
use kvsidecar::costs::Costs;
use kvsidecar::plugin::Plugins;
use kvsidecar::prefix::Digest;
use kvsidecar::store::{NewSnapshot, Store};
use kvsidecar_tests::shipped_plugins;

/// A store of 100 KiB (high watermark 95 KiB, low 85 KiB) evicting through `evictor`.
struct Scripted {
    store: Arc<Store>,
    _plugins: Plugins,
    dir: tempfile::TempDir,
}

fn id(name: &str) -> Digest {
    Digest(*blake3::hash(name.as_bytes()).as_bytes())
}

impl Scripted {
    fn new(evictor: &str) -> Scripted {
        Self::open(evictor, tempfile::tempdir().unwrap())
    }

    /// Opens the store in `dir` again with a fresh plugin instance.
    fn reopen(self, evictor: &str) -> Scripted {
        let Scripted { store, _plugins, dir } = self;
        drop(_plugins);
        drop(store);
        Self::open(evictor, dir)
    }

    fn open(evictor: &str, dir: tempfile::TempDir) -> Scripted {
        let mut config = Config::defaults();
        config.store.data_dir = dir.path().join("data");
        config.store.capacity = ByteSize::kib(100);
        config.store.chunk_size = ByteSize::kib(4);
        config.plugins.dir = shipped_plugins();
        config.plugins.cache_dir = dir.path().join("plugin-cache");
        config.plugins.evictor.file = Some(format!("{evictor}.wasm").into());
        let store = Arc::new(Store::open(&config.store).unwrap());
        let plugins = Plugins::load(&config).unwrap();
        // Recompute cost: 1 ms a token, the estimate before any observation.
        plugins.evictor.attach(&store, Arc::new(Costs::default()));
        Scripted { store, _plugins: plugins, dir }
    }

    /// Stores snapshot `name` of `kib` KiB holding `tokens` tokens.
    fn insert(&self, name: &str, kib: usize, tokens: usize) {
        // Distinct times keep the least-recently-used order independent of the ids.
        std::thread::sleep(std::time::Duration::from_millis(3));
        let file = self.dir.path().join(format!("{name}.bin"));
        std::fs::write(&file, vec![7u8; kib << 10]).unwrap();
        let new = NewSnapshot {
            id: id(name),
            namespace: id("namespace"),
            fingerprint: "test".into(),
            tenant: "default".into(),
            tokens: vec![300; tokens],
            block_hashes: Vec::new(),
            block_tokens: 64,
        };
        self.store.insert(&new, &file).unwrap();
    }

    /// Records `times` restores of `name`.
    fn restore(&self, name: &str, times: usize) {
        std::thread::sleep(std::time::Duration::from_millis(3));
        for _ in 0..times {
            self.store.record_access(&id(name));
        }
        self.store.flush_access().unwrap();
    }

    fn kept(&self, names: &[&str]) -> BTreeSet<String> {
        names.iter().filter(|name| self.store.contains(&id(name))).map(|name| name.to_string()).collect()
    }
}

const NAMES: [&str; 6] = ["popular", "dense", "bulky", "cheap", "newcomer", "late"];

/// Value per byte (hits + 1) x recompute cost / size, before the clock rises:
/// popular 6 x 1000 ms / 20 KiB, dense 2000 ms / 10 KiB, newcomer 500 ms / 10 KiB,
/// late 300 ms / 20 KiB, bulky 200 ms / 40 KiB, cheap 50 ms / 20 KiB.
fn script(store: &Scripted) {
    store.insert("popular", 20, 1000);
    store.insert("dense", 10, 2000);
    store.restore("popular", 5);
    store.insert("bulky", 40, 200);
    store.insert("cheap", 20, 50);
    // 90 KiB stored; 10 more pass the high watermark, so 15 KiB must go.
    store.insert("newcomer", 10, 500);
    // 20 more pass it again.
    store.insert("late", 20, 300);
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| name.to_string()).collect()
}

#[test]
fn cost_aware_keeps_valuable_snapshots() {
    let scripted = Scripted::new("cost-aware");
    script(&scripted);
    assert_eq!(scripted.kept(&NAMES), set(&["popular", "dense", "newcomer", "late"]));
    assert!(scripted.store.bytes() <= 95 << 10);
}

#[test]
fn lru_drops_valuable_snapshots() {
    let scripted = Scripted::new("lru");
    script(&scripted);
    // Least recently used first: dense, then popular, although both are worth the most per byte.
    let kept = scripted.kept(&NAMES);
    assert!(!kept.contains("dense"), "{kept:?}");
    assert!(kept.contains("newcomer"), "{kept:?}");
    assert!(kept.contains("late"), "{kept:?}");
    assert!(scripted.store.bytes() <= 95 << 10);
}

#[test]
fn fresh_evictor_replays_stored_snapshots() {
    let scripted = Scripted::new("cost-aware");
    script(&scripted);
    assert!(scripted.dir.path().join("plugin-cache").read_dir().unwrap().count() >= 1, "compiled plugins are cached on disk");
    let scripted = scripted.reopen("cost-aware");
    // 60 KiB kept; 10 more stay under the high watermark, then 30 more pass it: 15 KiB must go.
    scripted.insert("filler", 10, 10);
    scripted.insert("final", 30, 30);
    // The fresh instance received the old snapshots in the replay, so it picks filler and late
    // (lowest value per byte). Without them it could name only filler, and the shortfall would
    // go to the least recently used snapshot, dense.
    let kept = scripted.kept(&["popular", "dense", "newcomer", "late", "filler", "final"]);
    assert_eq!(kept, set(&["popular", "dense", "newcomer", "final"]));
}
