//! Latency kvsidecar adds to a cache miss, measured end to end. The same kind of request goes to
//! llama-server directly and through the sidecar. Every prompt is fresh token ids, so every
//! request is a miss and no tokenizer call is needed.
//!
//! Run with `scripts/bench.sh overhead` (or, after `scripts/setup.sh`,
//! `cargo run --release -p kvsidecar-benches --bin proxy_overhead`).

use anyhow::Result;
use kvsidecar_benches::client::{median, post_streaming, sidecar_without_snapshots};
use kvsidecar_tests::{Engine, Sidecar, Workspace, tokens};
use serde_json::json;

const REQUESTS: u64 = 200;
const PROMPT_TOKENS: usize = 32;

#[tokio::main]
async fn main() -> Result<()> {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await?;
    let spec = sidecar_without_snapshots(&ws, &engine.url);
    let sidecar = Sidecar::start(&spec, &ws.logs()).await?;

    let (mut direct, mut proxied, mut differences) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..REQUESTS {
        // Two different prompts of the same length, one per path, so neither is a cache hit.
        let body = |seed: u64| json!({"prompt": tokens(seed, PROMPT_TOKENS), "n_predict": 1, "temperature": 0.0, "stream": true});
        let a = post_streaming(&format!("{}/completion", engine.url), &body(1_000_000 + 2 * n)).await?;
        let b = post_streaming(&format!("{}/completion", sidecar.url), &body(1_000_001 + 2 * n)).await?;
        let (a, b) = (a.first_frame.as_secs_f64() * 1000.0, b.first_frame.as_secs_f64() * 1000.0);
        direct.push(a);
        proxied.push(b);
        differences.push(b - a);
    }
    println!("requests per path: {REQUESTS}, prompt: {PROMPT_TOKENS} tokens, n_predict 1, tiny model");
    println!("direct TTFT p50:  {:.3} ms", median(&mut direct));
    println!("sidecar TTFT p50: {:.3} ms", median(&mut proxied));
    println!("paired difference p50: {:.3} ms", median(&mut differences));
    Ok(())
}
