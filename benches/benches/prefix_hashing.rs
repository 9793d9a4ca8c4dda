//! Prefix hashing throughput: chained BLAKE3 block hashes of a 128k-token prompt.
//!
//! Run with `cargo bench -p kvsidecar-benches --bench prefix_hashing`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvsidecar::engine::Fingerprint;
use kvsidecar::prefix::{Namespace, block_hashes};

fn hashing(c: &mut Criterion) {
    let namespace = Namespace::new(&Fingerprint([7; 32]), "tenant", None);
    let tokens: Vec<u32> = (0..131_072u32).map(|i| i.wrapping_mul(2_654_435_761) % 150_000).collect();
    let mut group = c.benchmark_group("prefix_hashing");
    group.throughput(Throughput::Elements(tokens.len() as u64));
    for block in [16usize, 64, 256] {
        group.bench_function(format!("128k_tokens_block_{block}"), |b| b.iter(|| block_hashes(&namespace, &tokens, block)));
    }
    group.finish();
}

criterion_group!(benches, hashing);
criterion_main!(benches);
