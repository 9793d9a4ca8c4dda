//! The sidecar's own work on a cache miss, without the engine's tokenizer: parse the request body,
//! hash the prompt's blocks, look the prefix up in a RocksDB store that holds 200 snapshots, and
//! choose a slot.
//!
//! Run with `cargo bench -p kvsidecar-benches --bench miss_path`.

use criterion::{Criterion, criterion_group, criterion_main};
use kvsidecar::config::{ByteSize, Config};
use kvsidecar::engine::Fingerprint;
use kvsidecar::prefix::{Namespace, block_hashes, sequence_id};
use kvsidecar::request::{self, Endpoint};
use kvsidecar::slots::Slots;
use kvsidecar::store::{NewSnapshot, Store};

fn prompt(seed: u32, len: u32) -> Vec<u32> {
    (0..len).map(|i| (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 32_000).collect()
}

fn miss_path(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let mut config = Config::defaults().store;
    config.data_dir = dir.path().to_path_buf();
    config.capacity = ByteSize::gib(1);
    let store = Store::open(&config).expect("open store");
    let namespace = Namespace::new(&Fingerprint([3; 32]), "default", None);

    // 200 stored snapshots of 2,000 tokens with 64 KiB files each.
    let file = dir.path().join("slot.bin");
    std::fs::write(&file, vec![1u8; 64 << 10]).expect("write file");
    for seed in 0..200 {
        let tokens = prompt(seed, 2000);
        let new = NewSnapshot {
            id: sequence_id(&namespace, &tokens),
            namespace: namespace.0,
            fingerprint: "bench".into(),
            tenant: "default".into(),
            block_hashes: block_hashes(&namespace, &tokens, 64),
            tokens,
            block_tokens: 64,
        };
        store.insert(&new, &file).expect("insert snapshot");
    }

    let slots = Slots::new(4);
    for slot in 0..4 {
        slots.set_tokens(slot, prompt(1000 + slot, 2000), namespace);
    }
    let missing = prompt(9999, 2000);
    let body = serde_json::json!({"prompt": missing, "max_tokens": 16, "stream": true}).to_string();

    c.bench_function("miss_path_2000_tokens", |b| {
        b.iter(|| {
            let parsed = request::parse(Endpoint::Completions, body.as_bytes()).expect("valid request");
            let tokens: Vec<u32> = parsed.body["prompt"].as_array().expect("ids").iter().map(|v| v.as_u64().unwrap_or(0) as u32).collect();
            let hashes = block_hashes(&namespace, &tokens, 64);
            let found = store.longest_prefix(&hashes).expect("lookup");
            let choice = slots.best_for(&tokens, &namespace);
            (found, choice)
        })
    });
}

criterion_group!(benches, miss_path);
criterion_main!(benches);
