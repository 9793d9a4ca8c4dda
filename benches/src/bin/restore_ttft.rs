//! Time to first token for a prompt computed cold versus restored from kvsidecar's store, on the
//! 12-layer demo model, for 2k, 4k and 8k-token prompts.
//!
//! For each size and repetition it sends a fresh prompt (cold), then a short unrelated prompt that
//! takes the engine's only slot, then the first prompt again, which the sidecar restores from its
//! RocksDB store. Run with `scripts/bench.sh restore` (or, after `scripts/setup.sh`,
//! `cargo run --release -p kvsidecar-benches --bin restore_ttft`).

use std::time::Duration;

use anyhow::{Result, bail};
use kvsidecar_benches::client::{median, post_streaming};
use kvsidecar_tests::{Engine, EngineSpec, Sidecar, SidecarSpec, Workspace, paths, tokens};
use serde_json::json;

const SIZES: [usize; 3] = [2048, 4096, 8192];
const REPETITIONS: u64 = 3;

#[tokio::main]
async fn main() -> Result<()> {
    let ws = Workspace::new();
    let spec = EngineSpec { model: paths().demo_model, slots: 1, context: 9216, slot_dir: ws.path("slots"), extra: Vec::new() };
    let engine = Engine::start(&spec, &ws.logs()).await?;
    let sidecar_spec = SidecarSpec {
        engine_url: engine.url.clone(),
        data_dir: ws.path("data"),
        slot_dir: ws.path("slots"),
        env: vec![("KVSIDECAR_SNAPSHOT_MIN_TOKENS".into(), "1024".into()), ("KVSIDECAR_LOG_LEVEL".into(), "info".into())],
    };
    let sidecar = Sidecar::start(&sidecar_spec, &ws.logs()).await?;
    let url = format!("{}/completion", sidecar.url);

    println!("| prompt tokens | cold TTFT (ms) | restored TTFT (ms) | restored / cold |");
    println!("| ---: | ---: | ---: | ---: |");
    for size in SIZES {
        let (mut cold, mut restored) = (Vec::new(), Vec::new());
        for repetition in 0..REPETITIONS {
            let prompt = tokens(size as u64 * 100 + repetition, size);
            let body = json!({"prompt": prompt, "n_predict": 1, "temperature": 0.0, "stream": true});

            let first = post_streaming(&url, &body).await?;
            if first.header("x-kvsidecar-cache-source") != Some("none") {
                bail!("the cold request was served from cache");
            }
            cold.push(first.first_frame.as_secs_f64() * 1000.0);
            let saved = 1 + sidecar.stats().await["requests"]["snapshots_saved"].as_u64().unwrap_or(0);
            sidecar.wait_stats(Duration::from_secs(120), |s| s["requests"]["snapshots_saved"].as_u64() >= Some(saved)).await;

            let other = json!({"prompt": tokens(7 + repetition, 64), "n_predict": 1, "stream": true});
            post_streaming(&url, &other).await?;

            let again = post_streaming(&url, &body).await?;
            if again.header("x-kvsidecar-cache-source") != Some("local") {
                bail!("the repeated request was not restored from the store: {:?}", again.header("x-kvsidecar-cache-source"));
            }
            restored.push(again.first_frame.as_secs_f64() * 1000.0);
        }
        let (cold, restored) = (median(&mut cold), median(&mut restored));
        println!("| {size} | {cold:.0} | {restored:.0} | {:.1} % |", 100.0 * restored / cold);
    }
    Ok(())
}
