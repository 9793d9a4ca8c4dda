//! Throughput and latency of the sidecar with telemetry off, and with traces and metrics exported
//! over OTLP at sampling ratios 1 and 0.01. Closed-loop clients send short completions (fresh
//! prompts, one generated token) through the sidecar to a tiny llama-server. The OTLP receiver is
//! an in-process gRPC collector that decodes and keeps what it receives.
//!
//! The three setups run in turns, several rounds, and each result is the median over its rounds,
//! so drift of the shared machine spreads over all of them.
//!
//! Run with `scripts/bench.sh telemetry`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Result;
use kvsidecar_benches::client::{Round, closed_loop, median};
use kvsidecar_tests::otlp::OtlpReceiver;
use kvsidecar_tests::{Engine, Sidecar, SidecarSpec, Workspace};

const CLIENTS: usize = 8;
const ROUNDS: usize = 3;
const ROUND: Duration = Duration::from_secs(20);
const WARMUP: Duration = Duration::from_secs(3);
const PROMPT_TOKENS: usize = 32;
const ENGINE_SLOTS: u32 = 4;

struct Setup {
    name: &'static str,
    /// `KVSIDECAR_TELEMETRY_*` settings; none exports nothing.
    sampling: Option<&'static str>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let ws = Workspace::new();
    let mut engine_spec = ws.tiny_engine(ENGINE_SLOTS);
    engine_spec.context = 1024 * ENGINE_SLOTS;
    let engine = Engine::start(&engine_spec, &ws.logs()).await?;
    let collector = OtlpReceiver::grpc()?;
    let setups = [
        Setup { name: "telemetry off", sampling: None },
        Setup { name: "OTLP traces + metrics, sampling 1", sampling: Some("1.0") },
        Setup { name: "OTLP traces + metrics, sampling 0.01", sampling: Some("0.01") },
    ];
    let seed = Arc::new(AtomicU64::new(1_000_000));
    let mut results: Vec<Vec<Round>> = setups.iter().map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        for (n, setup) in setups.iter().enumerate() {
            let mut env = vec![
                ("KVSIDECAR_SNAPSHOT_MIN_TOKENS".to_string(), "100000".to_string()),
                ("KVSIDECAR_LOG_LEVEL".to_string(), "warn".to_string()),
                ("KVSIDECAR_TELEMETRY_PROMETHEUS".to_string(), "true".to_string()),
            ];
            if let Some(ratio) = setup.sampling {
                env.push(("KVSIDECAR_TELEMETRY_OTLP_ENDPOINT".to_string(), collector.endpoint()));
                env.push(("KVSIDECAR_TELEMETRY_SAMPLING_RATIO".to_string(), ratio.to_string()));
                env.push(("KVSIDECAR_TELEMETRY_METRICS_INTERVAL".to_string(), "5s".to_string()));
            }
            let spec = SidecarSpec { engine_url: engine.url.clone(), data_dir: ws.path(&format!("data-{round}-{n}")), slot_dir: ws.path("slots"), env };
            let sidecar = Sidecar::start(&spec, &ws.logs()).await?;
            closed_loop(&sidecar.url, CLIENTS, PROMPT_TOKENS, WARMUP, &seed).await;
            let measured = closed_loop(&sidecar.url, CLIENTS, PROMPT_TOKENS, ROUND, &seed).await;
            eprintln!("round {round} {}: {:.1} req/s, p99 {:.2} ms", setup.name, measured.requests_per_second, measured.p99_ms);
            results[n].push(measured);
            drop(sidecar);
        }
    }

    println!("{CLIENTS} closed-loop clients, {ROUNDS} rounds of {} s per setup, prompt {PROMPT_TOKENS} fresh tokens, 1 generated token, tiny model, {ENGINE_SLOTS} engine slots", ROUND.as_secs());
    println!("| setup | requests/s | ratio to off | p50 ms | p99 ms | errors |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut baseline = None;
    for (setup, rounds) in setups.iter().zip(&results) {
        let throughput = median(&mut rounds.iter().map(|round| round.requests_per_second).collect::<Vec<_>>());
        let p50 = median(&mut rounds.iter().map(|round| round.p50_ms).collect::<Vec<_>>());
        let p99 = median(&mut rounds.iter().map(|round| round.p99_ms).collect::<Vec<_>>());
        let errors: u64 = rounds.iter().map(|round| round.errors).sum();
        let base = *baseline.get_or_insert(throughput);
        println!("| {} | {throughput:.1} | {:.3} | {p50:.2} | {p99:.2} | {errors} |", setup.name, throughput / base);
    }
    println!("spans received by the collector: {}", collector.spans().len());
    Ok(())
}
