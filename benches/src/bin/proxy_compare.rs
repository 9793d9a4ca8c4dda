//! Latency and throughput a proxy adds in front of an upstream that costs nothing: nginx returns
//! a canned streamed completion for every `POST /v1/completions` (the tiny engine's own response
//! to one request). The same load goes
//!
//! - directly to nginx;
//! - through kvsidecar, with fresh prompts (the miss path) and with 64 prompts that repeat (the
//!   slot-hit path);
//! - through SGLang's router (`sglang-router`, cache-aware policy);
//! - through vLLM's router (`vllm-router`, cache-aware policy).
//!
//! Prompts are text of 256 words, one token each (SGLang's router takes no token ids), so the
//! sidecar tokenizes each prompt with the engine, as it does in production. nginx proxies every
//! path but `/v1/completions` to a real tiny `llama-server` with 64 slots, so the sidecar
//! tokenizes, probes, sizes its slot table and checks models against a real engine. Its
//! snapshots are off, because a canned response fills no slot. Its ledger, metrics and plugins
//! run as configured by default.
//!
//! Each setup gets an open-loop load at fixed rates (latency p50 and p99, measured from each
//! request's scheduled time) and a closed-loop wrk run with 64 connections (its highest throughput).
//! Setups take turns for several rounds; each figure is the median over the rounds.
//!
//! Run with `scripts/bench.sh proxy`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context, Result};
use kvsidecar_benches::client::{median, sidecar_without_snapshots};
use kvsidecar_benches::load::{Figures, Prompts, body, open_loop, wrk, wrk_script};
use kvsidecar_benches::peers::{self, Service};
use kvsidecar_benches::vocab::{self, Words};
use kvsidecar_tests::{Engine, Sidecar, Workspace, free_ports, get, post_json};

const RATES: [f64; 3] = [200.0, 500.0, 1000.0];
const RATE_LENGTH: Duration = Duration::from_secs(6);
const WRK_LENGTH: Duration = Duration::from_secs(8);
const WRK_CONNECTIONS: usize = 64;
const ROUNDS: usize = 3;
const ENGINE_SLOTS: u32 = 64;
/// Distance between the prompt keys of two setups. Keys stay below 2^31, where prompt keys wrap,
/// and one setup sends far fewer than 10^7 requests in a round.
const SEED_STRIDE: u64 = 100_000_000;

struct Setup {
    name: &'static str,
    url: String,
    prompts: Prompts,
    /// Figures of each round: one per rate, then wrk's.
    rounds: Vec<Vec<Figures>>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let (nginx, wrk_binary) = match (peers::nginx(), peers::wrk()) {
        (Ok(nginx), Ok(wrk)) => (nginx, wrk),
        (nginx, wrk) => {
            for reason in [nginx.err(), wrk.err()].into_iter().flatten() {
                println!("skipping the proxy comparison: {reason}");
            }
            return Ok(());
        }
    };
    let ws = Workspace::new();
    let mut engine_spec = ws.tiny_engine(ENGINE_SLOTS);
    engine_spec.context = 512 * ENGINE_SLOTS;
    let engine = Engine::start(&engine_spec, &ws.logs()).await?;
    let models = vocab::json(get(&format!("{}/v1/models", engine.url)).await?, "/v1/models")?;
    let model = models.pointer("/data/0/id").and_then(|id| id.as_str()).context("the engine lists no model")?.to_string();

    let words = Words::from_engine(&engine.url).await?;
    let workload = (model.as_str(), &words);

    // The canned answer is the engine's own streamed completion of one prompt.
    let sample: serde_json::Value = serde_json::from_str(&body(&model, &words, 1))?;
    let canned = String::from_utf8(post_json(&format!("{}/v1/completions", engine.url), &sample).await?.body.to_vec())?;

    let [nginx_port, sglang_port, vllm_port] = free_ports::<3>();
    let _nginx = peers::canned_nginx(&nginx, nginx_port, engine.port, &canned, &ws.path("nginx")).await?;
    let upstream = format!("http://127.0.0.1:{nginx_port}");

    let spec = sidecar_without_snapshots(&ws, &upstream);
    let sidecar = Sidecar::start(&spec, &ws.logs()).await?;

    let mut routers: Vec<Service> = Vec::new();
    let mut setups = vec![
        Setup { name: "direct to nginx", url: upstream.clone(), prompts: Prompts::Fresh { seed: SEED_STRIDE }, rounds: Vec::new() },
        Setup { name: "kvsidecar, miss path", url: sidecar.url.clone(), prompts: Prompts::Fresh { seed: 2 * SEED_STRIDE }, rounds: Vec::new() },
        Setup { name: "kvsidecar, slot-hit path", url: sidecar.url.clone(), prompts: Prompts::Repeated { seed: 3 * SEED_STRIDE, count: 64 }, rounds: Vec::new() },
    ];
    let workers = [upstream.clone()];
    match peers::sglang_router() {
        Ok(binary) => match peers::sglang(&binary, sglang_port, &workers, &ws.logs()).await {
            Ok(service) => {
                routers.push(service);
                setups.push(Setup { name: "sglang-router, cache_aware", url: format!("http://127.0.0.1:{sglang_port}"), prompts: Prompts::Fresh { seed: 4 * SEED_STRIDE }, rounds: Vec::new() });
            }
            Err(error) => println!("skipping sglang-router: {error:#}"),
        },
        Err(reason) => println!("skipping sglang-router: {reason}"),
    }
    match peers::vllm_router() {
        Ok(binary) => match peers::vllm(&binary, vllm_port, &workers, &ws.logs()).await {
            Ok(service) => {
                routers.push(service);
                setups.push(Setup { name: "vllm-router, cache_aware", url: format!("http://127.0.0.1:{vllm_port}"), prompts: Prompts::Fresh { seed: 5 * SEED_STRIDE }, rounds: Vec::new() });
            }
            Err(error) => println!("skipping vllm-router: {error:#}"),
        },
        Err(reason) => println!("skipping vllm-router: {reason}"),
    }

    let counter = AtomicU64::new(0);
    for round in 0..ROUNDS {
        for (number, setup) in setups.iter_mut().enumerate() {
            // A short warm-up opens connections and fills the hit path's slots.
            open_loop(&setup.url, workload, 200.0, Duration::from_secs(1), setup.prompts, &counter).await;
            let mut figures = Vec::new();
            for rate in RATES {
                figures.push(open_loop(&setup.url, workload, rate, RATE_LENGTH, setup.prompts, &counter).await);
            }
            let script = ws.path("wrk").join(format!("setup-{number}-round-{round}.lua"));
            let prompts = match setup.prompts {
                // wrk counts its requests from 0, so each round starts past the open-loop keys.
                Prompts::Fresh { seed } => Prompts::Fresh { seed: seed + SEED_STRIDE / 2 + round as u64 * (SEED_STRIDE / 8) },
                repeated => repeated,
            };
            wrk_script(&script, workload, prompts)?;
            figures.push(wrk(&wrk_binary, &script, &setup.url, WRK_CONNECTIONS, WRK_LENGTH)?);
            eprintln!("round {round}, {}: {figures:?}", setup.name);
            setup.rounds.push(figures);
        }
    }

    for setup in setups.iter().filter(|setup| setup.url == sidecar.url) {
        let (hits, sent) = setup.rounds.iter().flat_map(|round| &round[..RATES.len()]).fold((0, 0), |(hits, sent), f| (hits + f.slot_hits, sent + f.sent));
        println!("{}: {hits} of {sent} open-loop requests reused at least half of the prompt from a slot (x-kvsidecar-cached-tokens)", setup.name);
    }
    print_table(&setups);
    drop(routers);
    Ok(())
}

/// Returns the median over rounds of figure `index` of `setup`.
fn figure(setup: &Setup, index: usize, pick: impl Fn(&Figures) -> f64) -> f64 {
    let mut values: Vec<f64> = setup.rounds.iter().map(|round| pick(&round[index])).collect();
    median(&mut values)
}

fn print_table(setups: &[Setup]) {
    let direct = &setups[0];
    println!(
        "\nopen loop at {:?} req/s for {} s each, then wrk with {WRK_CONNECTIONS} connections for {} s; streaming /v1/completions, {} words (one token each), max_tokens 1; median of {ROUNDS} rounds",
        RATES,
        RATE_LENGTH.as_secs(),
        WRK_LENGTH.as_secs(),
        kvsidecar_benches::load::PROMPT_TOKENS
    );
    let mut header = String::from("| setup |");
    let mut rule = String::from("| --- |");
    for rate in RATES {
        header.push_str(&format!(" p50 ms at {rate} | p99 ms at {rate} | added p99 ms at {rate} |"));
        rule.push_str(" ---: | ---: | ---: |");
    }
    header.push_str(" wrk req/s | wrk p99 ms | errors |");
    rule.push_str(" ---: | ---: | ---: |");
    println!("{header}\n{rule}");
    for setup in setups {
        let mut line = format!("| {} |", setup.name);
        for index in 0..RATES.len() {
            let p99 = figure(setup, index, |f| f.p99_ms);
            let added = p99 - figure(direct, index, |f| f.p99_ms);
            line.push_str(&format!(" {:.2} | {:.2} | {:.2} |", figure(setup, index, |f| f.p50_ms), p99, added));
        }
        let errors: u64 = setup.rounds.iter().flatten().map(|f| f.errors).sum();
        line.push_str(&format!(" {:.0} | {:.2} | {errors} |", figure(setup, RATES.len(), |f| f.rate), figure(setup, RATES.len(), |f| f.p99_ms)));
        println!("{line}");
    }
}
