//! Fleet-index longest-prefix lookups as the index grows: 10k, 1M and 10M block hashes of one
//! peer, in snapshots of 64 chained blocks (4,096 tokens at the default block size). For each
//! size it reports the time to load the index from a full listing, and the median and p99 time of
//! a lookup of a 64-block prompt whose first 40 blocks are indexed. It also reports the memory per
//! block, as the growth of the process's resident memory and as the index's own estimate.
//!
//! Run with `scripts/bench.sh index` (or `cargo run --release -p kvsidecar-benches --bin index_scale`).

use std::time::Instant;

use anyhow::Result;
use kvsidecar::peer::index::FleetIndex;
use kvsidecar::peer::journal::IndexEvent;
use kvsidecar::prefix::Digest;

const BLOCKS_PER_SNAPSHOT: usize = 64;
const LOOKUPS: usize = 20_000;
const PEER: &str = "http://10.0.0.7:9100";

/// Returns a pseudo-random digest for `n`: the index treats digests as opaque keys.
fn digest(n: u64) -> Digest {
    Digest(*blake3::hash(&n.to_le_bytes()).as_bytes())
}

/// Returns the resident memory of this process in bytes, from /proc/self/statm.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|field| field.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn main() -> Result<()> {
    println!("| indexed blocks | load from listing | lookup p50 | lookup p99 | resident bytes per block | estimated bytes per block |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for blocks in [10_000usize, 1_000_000, 10_000_000] {
        let snapshots = blocks / BLOCKS_PER_SNAPSHOT;
        let before = resident_bytes();
        let index = FleetIndex::new(blocks);
        let started = Instant::now();
        // The listing arrives in parts, as a peer's index does, so the strings of all events
        // never exist at once.
        for part in (0..snapshots).collect::<Vec<_>>().chunks(10_000) {
            let events: Vec<IndexEvent> = part
                .iter()
                .map(|&snapshot| {
                    let first = (snapshot * BLOCKS_PER_SNAPSHOT) as u64;
                    IndexEvent::Stored {
                        id: digest(u64::MAX - snapshot as u64).to_hex(),
                        namespace: String::new(),
                        tokens: (BLOCKS_PER_SNAPSHOT * 64) as u32,
                        bytes: 0,
                        blocks: (first..first + BLOCKS_PER_SNAPSHOT as u64).map(|n| digest(n).to_hex()).collect(),
                    }
                })
                .collect();
            if index.position(PEER).is_none() {
                index.replace(PEER, "g".into(), 0, events);
            } else {
                index.apply(PEER, 0, events);
            }
        }
        let loaded = started.elapsed();
        let resident = resident_bytes().saturating_sub(before);
        let estimate = index.size().memory_bytes;

        let mut times = Vec::with_capacity(LOOKUPS);
        let mut found = 0usize;
        for lookup in 0..LOOKUPS {
            let snapshot = (lookup * 7919) % snapshots;
            let first = (snapshot * BLOCKS_PER_SNAPSHOT) as u64;
            let mut prompt: Vec<Digest> = (first..first + 40).map(digest).collect();
            prompt.extend((0..24).map(|n| digest(u64::MAX / 2 + n)));
            let started = Instant::now();
            found += index.longest(PEER, &prompt);
            times.push(started.elapsed().as_nanos() as f64);
        }
        assert_eq!(found, 40 * LOOKUPS, "every lookup finds its 40 indexed blocks");
        times.sort_by(|a, b| a.total_cmp(b));
        let percentile = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
        println!(
            "| {blocks} | {:.2} s | {:.0} ns | {:.0} ns | {:.0} | {:.0} |",
            loaded.as_secs_f64(),
            percentile(0.5),
            percentile(0.99),
            resident as f64 / blocks as f64,
            estimate as f64 / blocks as f64
        );
        drop(index);
    }
    Ok(())
}
