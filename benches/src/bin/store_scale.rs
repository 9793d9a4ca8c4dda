//! The snapshot store as it fills: insert time, longest-prefix lookup time, resident memory and
//! disk use at growing snapshot counts. Each snapshot is a 4 KiB slot file for 8 blocks of 64
//! tokens, stored through `Store::insert` as a saved slot is. Each lookup is for a 16-block
//! prompt whose first 8 blocks are a stored snapshot's.
//!
//! Run with `scripts/bench.sh store-scale`, or with counts of your own:
//! `cargo run --release -p kvsidecar-benches --bin store_scale -- 1000 10000`.

use std::time::Instant;

use anyhow::{Context, Result};
use kvsidecar::config::{self, Overrides};
use kvsidecar::prefix::Digest;
use kvsidecar::store::{NewSnapshot, Store, folder_size};
use kvsidecar_benches::client::percentile;

const BLOCKS: usize = 8;
const BLOCK_TOKENS: u32 = 64;
const FILE_BYTES: usize = 4096;
const LOOKUPS: usize = 20_000;

/// Returns a pseudo-random digest for (`kind`, `n`): the store treats digests as opaque keys.
fn digest(kind: u8, n: u64) -> Digest {
    let mut input = [0u8; 9];
    input[0] = kind;
    input[1..].copy_from_slice(&n.to_le_bytes());
    Digest(*blake3::hash(&input).as_bytes())
}

/// Block `b` of snapshot `n`.
fn block(n: u64, b: usize) -> Digest {
    digest(1, n * 64 + b as u64)
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|field| field.parse::<u64>().ok()).unwrap_or(0) * 4096
}

fn main() -> Result<()> {
    let counts: Vec<u64> = std::env::args().skip(1).map(|arg| arg.parse().context("counts are whole numbers")).collect::<Result<_>>()?;
    let counts = if counts.is_empty() { vec![1_000, 10_000] } else { counts };
    let work = tempfile::tempdir_in(std::env::var("KVSIDECAR_CACHE").unwrap_or_else(|_| "/tmp".into()))?;
    let variables = [
        ("KVSIDECAR_STORE_DATA_DIR", work.path().join("data").display().to_string()),
        ("KVSIDECAR_STORE_CAPACITY", "100GiB".to_string()),
    ];
    let settings = config::load(&Overrides::default(), variables.into_iter().map(|(key, value)| (key.to_string(), value))).map_err(|error| anyhow::anyhow!("{error}"))?;
    let store = Store::open(&settings.store)?;
    let file = work.path().join("slot.bin");
    std::fs::write(&file, (0..FILE_BYTES).map(|i| (i * 131 % 251) as u8).collect::<Vec<u8>>())?;
    let resident_at_start = resident_bytes();

    println!("{FILE_BYTES}-byte snapshots of {BLOCKS} blocks; {LOOKUPS} lookups of a 16-block prompt per size");
    println!("| snapshots | insert p50 µs (this step) | lookup p50 µs | lookup p99 µs | resident MB | disk MB |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut stored = 0u64;
    for count in counts {
        let mut inserts = Vec::new();
        while stored < count {
            let new = NewSnapshot {
                id: digest(2, stored),
                namespace: Digest([9; 32]),
                fingerprint: "benchmark".into(),
                tenant: "default".into(),
                tokens: vec![300; BLOCKS * BLOCK_TOKENS as usize],
                block_hashes: (0..BLOCKS).map(|b| block(stored, b)).collect(),
                block_tokens: BLOCK_TOKENS,
            };
            let started = Instant::now();
            store.insert(&new, &file)?.context("the snapshot was already stored")?;
            inserts.push(started.elapsed().as_secs_f64() * 1e6);
            stored += 1;
        }
        let mut lookups = Vec::with_capacity(LOOKUPS);
        for i in 0..LOOKUPS as u64 {
            let n = (i * 7919) % stored;
            let prompt: Vec<Digest> = (0..2 * BLOCKS).map(|b| if b < BLOCKS { block(n, b) } else { digest(3, i * 64 + b as u64) }).collect();
            let started = Instant::now();
            let found = store.longest_prefix(&prompt)?;
            lookups.push(started.elapsed().as_secs_f64() * 1e6);
            anyhow::ensure!(found.is_some_and(|hit| hit.blocks == BLOCKS as u32), "lookup {i} found {found:?}");
        }
        println!(
            "| {count} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} |",
            percentile(&mut inserts, 0.5),
            percentile(&mut lookups, 0.5),
            percentile(&mut lookups, 0.99),
            resident_bytes().saturating_sub(resident_at_start) as f64 / 1e6,
            folder_size(&work.path().join("data")) as f64 / 1e6,
        );
    }
    Ok(())
}
