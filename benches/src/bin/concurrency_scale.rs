//! Throughput and latency as concurrent clients grow from 1 to 64: closed-loop clients send
//! streaming misses (fresh 32-token prompts, one generated token) to a tiny llama-server with 4
//! slots, directly and through the sidecar, alternating, at each client count.
//!
//! Run with `scripts/bench.sh concurrency`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Result;
use kvsidecar_benches::client::{closed_loop, sidecar_without_snapshots};
use kvsidecar_tests::{Engine, Sidecar, Workspace};

const PROMPT_TOKENS: usize = 32;
const ENGINE_SLOTS: u32 = 4;
const ROUND: Duration = Duration::from_secs(10);
const WARMUP: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> Result<()> {
    let ws = Workspace::new();
    let mut engine_spec = ws.tiny_engine(ENGINE_SLOTS);
    engine_spec.context = 1024 * ENGINE_SLOTS;
    let engine = Engine::start(&engine_spec, &ws.logs()).await?;
    let spec = sidecar_without_snapshots(&ws, &engine.url);
    let sidecar = Sidecar::start(&spec, &ws.logs()).await?;
    let seed = Arc::new(AtomicU64::new(5_000_000));

    println!("closed-loop clients, {} s per point after {} s of warm-up, streaming misses of {PROMPT_TOKENS} tokens with 1 generated token, tiny model, {ENGINE_SLOTS} engine slots", ROUND.as_secs(), WARMUP.as_secs());
    println!("| clients | direct req/s | sidecar req/s | sidecar / direct | direct p99 ms | sidecar p99 ms | errors |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for clients in [1usize, 2, 4, 8, 16, 32, 64] {
        closed_loop(&engine.url, clients, PROMPT_TOKENS, WARMUP, &seed).await;
        let direct = closed_loop(&engine.url, clients, PROMPT_TOKENS, ROUND, &seed).await;
        closed_loop(&sidecar.url, clients, PROMPT_TOKENS, WARMUP, &seed).await;
        let proxied = closed_loop(&sidecar.url, clients, PROMPT_TOKENS, ROUND, &seed).await;
        println!(
            "| {clients} | {:.1} | {:.1} | {:.3} | {:.2} | {:.2} | {} |",
            direct.requests_per_second,
            proxied.requests_per_second,
            proxied.requests_per_second / direct.requests_per_second,
            direct.p99_ms,
            proxied.p99_ms,
            direct.errors + proxied.errors
        );
    }
    Ok(())
}
