//! End to end on two real engines: a slice of the Mooncake conversation trace replayed against
//! two `llama-server` processes with the demo model, in four setups, each on fresh engines:
//!
//! 1. round-robin over the engines with their prompt caches off (`--cache-ram 0`, and
//!    `cache_prompt: false` in every request, so no slot reuses a prefix);
//! 2. round-robin over the engines with their caches on, as they start by default (slot reuse and
//!    the 8 GiB host-memory prompt cache);
//! 3. SGLang's router with its cache-aware policy over the engines, caches on;
//! 4. a two-node kvsidecar fleet, one sidecar in front of each engine (`--cache-ram 0`, as the
//!    README starts engines), with requests round-robin over the two sidecars, as a load
//!    balancer without cache awareness would send them.
//!
//! The slice, its scaling and the engines are those of `scripts/demo.sh`. It contains the first 12
//! multi-request conversations (36 requests). Each 512-token trace block becomes 64 tokens.
//! Prompts are cut at 3,008 tokens, and responses at 16 tokens. Requests go one after another in
//! trace order, so consecutive turns of a conversation reach different engines.
//! Prompts are sent as text, because SGLang's router accepts no token ids: each token becomes a
//! word that is one token in the demo model's vocabulary (see `vocab.rs`), so two prompts share
//! exactly the tokens their trace blocks share.
//!
//! Run with `scripts/bench.sh engines`. `engine_compare fleet` (or `caches-off`, `caches-on`,
//! `sglang`) runs only the named setups, to profile one of them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kvsidecar_benches::peers;
use kvsidecar_benches::client::percentile;
use kvsidecar_benches::replay::{Record, ideal_reuse, send};
use kvsidecar_benches::trace::{self, Scale};
use kvsidecar_benches::vocab::{self, Words};
use kvsidecar_tests::{Engine, EngineSpec, Sidecar, Workspace, fleet_member, free_ports, get, paths};

const ENGINE_SLOTS: u32 = 2;
const ENGINE_CONTEXT: u32 = 16_384;

#[derive(Clone, Copy, PartialEq)]
enum Setup {
    RoundRobinCachesOff,
    RoundRobinCachesOn,
    Sglang,
    Fleet,
}

impl Setup {
    /// Returns the setup's name on the command line.
    fn key(self) -> &'static str {
        match self {
            Setup::RoundRobinCachesOff => "caches-off",
            Setup::RoundRobinCachesOn => "caches-on",
            Setup::Sglang => "sglang",
            Setup::Fleet => "fleet",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Setup::RoundRobinCachesOff => "round-robin, engine caches off",
            Setup::RoundRobinCachesOn => "round-robin, engine caches on",
            Setup::Sglang => "sglang-router, cache_aware",
            Setup::Fleet => "2-node kvsidecar fleet",
        }
    }
}

struct Outcome {
    setup: Setup,
    records: Vec<Record>,
    wall: Duration,
}

#[tokio::main]
async fn main() -> Result<()> {
    let trace_path = std::env::var_os("KVSIDECAR_TRACE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/traces/conversation_trace.jsonl"));
    let scale = Scale { offset: 0, requests: 1000, sessions: 12, block_tokens: 64, max_prompt_tokens: 3008, max_output_tokens: 16, first_token: 261, token_range: 300 };
    let requests = trace::load(&trace_path, &scale)?;
    let words = {
        let ws = Workspace::new();
        let engine = Engine::start(&demo_engine(&ws, 0, "0"), &ws.logs()).await?;
        Words::from_engine(&engine.url).await?
    };
    // Word indices of each prompt: the tokens the engine computes after its BOS token.
    let indices: Vec<Vec<u64>> =
        requests.iter().map(|request| request.prompt.iter().map(|id| u64::from(id - scale.first_token) % words.len() as u64).collect()).collect();
    // The engine's BOS token leads every prompt; u32::MAX stands for it.
    let as_u32: Vec<Vec<u32>> = indices.iter().map(|prompt| std::iter::once(u32::MAX).chain(prompt.iter().map(|&i| i as u32)).collect()).collect();
    let ideal = ideal_reuse(&as_u32.iter().map(Vec::as_slice).collect::<Vec<_>>());
    let prompt_total: u64 = indices.iter().map(|prompt| prompt.len() as u64 + 1).sum();
    let prompts: Vec<(String, u32)> = indices.iter().zip(&requests).map(|(prompt, request)| (words.text(prompt), request.output_tokens)).collect();
    println!("{} requests, {prompt_total} prompt tokens, ideal prefix reuse {ideal} tokens ({:.1} %)", requests.len(), 100.0 * ideal as f64 / prompt_total as f64);

    let mut setups = vec![Setup::RoundRobinCachesOff, Setup::RoundRobinCachesOn];
    match peers::sglang_router() {
        Ok(_) => setups.push(Setup::Sglang),
        Err(reason) => println!("skipping sglang-router: {reason}"),
    }
    setups.push(Setup::Fleet);
    // Setups named on the command line run alone, for profiling one of them.
    let chosen: Vec<String> = std::env::args().skip(1).collect();
    if !chosen.is_empty() {
        for name in &chosen {
            if !setups.iter().any(|setup| setup.key() == name) {
                bail!("unknown setup '{name}'; choose among caches-off, caches-on, sglang and fleet");
            }
        }
        setups.retain(|setup| chosen.iter().any(|name| name == setup.key()));
    }

    let mut outcomes = Vec::new();
    for setup in setups {
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!("== {} (load average before: {})", setup.name(), load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
        match run(setup, &prompts).await {
            Ok(outcome) => outcomes.push(outcome),
            Err(error) if setup == Setup::Sglang => println!("skipping sglang-router: {error:#}"),
            Err(error) => return Err(error),
        }
    }
    print_table(&outcomes, ideal, prompt_total);
    Ok(())
}

/// Returns the spec of demo engine `n` in `ws` with a host-memory prompt cache of `cache_ram` MiB.
fn demo_engine(ws: &Workspace, n: usize, cache_ram: &str) -> EngineSpec {
    EngineSpec {
        model: paths().demo_model,
        slots: ENGINE_SLOTS,
        context: ENGINE_CONTEXT,
        slot_dir: ws.path(&format!("slots-{n}")),
        // Later flags win: this replaces the harness's `--cache-ram 0` where caches are on.
        extra: vec!["--cache-ram".into(), cache_ram.into()],
    }
}

/// Starts the engines (and the router or sidecars) of `setup`, replays `prompts` (text and
/// output tokens) and stops them.
async fn run(setup: Setup, prompts: &[(String, u32)]) -> Result<Outcome> {
    let ws = Workspace::new();
    // 8 GiB is llama-server's default host-memory prompt cache.
    let cache_ram = if matches!(setup, Setup::RoundRobinCachesOn | Setup::Sglang) { "8192" } else { "0" };
    let mut engines = Vec::new();
    for n in 0..2 {
        engines.push(Engine::start(&demo_engine(&ws, n, cache_ram), &ws.logs()).await?);
    }
    let engine_urls: Vec<String> = engines.iter().map(|engine| engine.url.clone()).collect();

    // Every body names the model: SGLang's router rejects a completion request without one.
    let models = vocab::json(get(&format!("{}/v1/models", engine_urls[0])).await?, "/v1/models")?;
    let model = models.pointer("/data/0/id").and_then(|id| id.as_str()).context("the engine lists no model")?.to_string();
    let mut extra = serde_json::Map::new();
    extra.insert("model".into(), model.into());
    let mut _router = None;
    let mut sidecars = Vec::new();
    let targets = match setup {
        Setup::RoundRobinCachesOff => {
            extra.insert("cache_prompt".into(), false.into());
            engine_urls.clone()
        }
        Setup::RoundRobinCachesOn => engine_urls.clone(),
        Setup::Sglang => {
            let binary = peers::sglang_router().map_err(anyhow::Error::msg)?;
            let [port] = free_ports::<1>();
            _router = Some(peers::sglang(&binary, port, &engine_urls, &ws.logs()).await?);
            vec![format!("http://127.0.0.1:{port}")]
        }
        Setup::Fleet => {
            let [peer_a, peer_b] = free_ports::<2>();
            let specs = [fleet_member(&ws, &engines[0], "a", peer_a, &[peer_b]), fleet_member(&ws, &engines[1], "b", peer_b, &[peer_a])];
            for (n, mut spec) in specs.into_iter().enumerate() {
                spec.slot_dir = ws.path(&format!("slots-{n}"));
                spec.env.push(("KVSIDECAR_LOG_LEVEL".into(), "warn".into()));
                sidecars.push(Sidecar::start(&spec, &ws.logs()).await?);
            }
            for sidecar in &sidecars {
                wait_for_peers(sidecar).await?;
            }
            sidecars.iter().map(|sidecar| sidecar.url.clone()).collect()
        }
    };

    let started = Instant::now();
    let mut records = Vec::new();
    for (index, (text, output_tokens)) in prompts.iter().enumerate() {
        let at = index % targets.len();
        let words = text.split(' ').count() as u64;
        let mut record = send(&targets[at], index, (text.as_str().into(), words + 1), *output_tokens, &extra).await.with_context(|| setup.name())?;
        record.target = at;
        records.push(record);
    }
    let wall = started.elapsed();
    for (n, sidecar) in sidecars.iter().enumerate() {
        let stats = sidecar.stats().await;
        println!("sidecar {n}: sources {}, peer {}", stats["requests"]["cache_source"], stats["requests"]["peer"]);
    }
    Ok(Outcome { setup, records, wall })
}

/// Waits until `sidecar` lists its peer as alive.
async fn wait_for_peers(sidecar: &Sidecar) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let peers = get(&format!("{}/admin/peers", sidecar.admin_url)).await?.json();
        let alive = peers["peers"].as_array().is_some_and(|list| list.iter().any(|peer| peer["alive"] == true));
        if alive {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the fleet's peers did not see each other within 30 s: {peers}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_table(outcomes: &[Outcome], ideal: u64, prompt_total: u64) {
    println!("\n| setup | TTFT mean ms | TTFT p50 ms | TTFT p99 ms | prefill tokens computed | cached tokens | cached / ideal reuse | requests per minute |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mean = |outcome: &Outcome| outcome.records.iter().map(|r| r.ttft_ms).sum::<f64>() / outcome.records.len().max(1) as f64;
    for outcome in outcomes {
        let mut ttft: Vec<f64> = outcome.records.iter().map(|r| r.ttft_ms).collect();
        let cached: u64 = outcome.records.iter().map(|r| r.cached_tokens).sum();
        let prompt: u64 = outcome.records.iter().map(|r| r.prompt_tokens).sum();
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {} | {} | {:.1} % | {:.1} |",
            outcome.setup.name(),
            mean(outcome),
            percentile(&mut ttft, 0.5),
            percentile(&mut ttft, 0.99),
            prompt.saturating_sub(cached),
            cached,
            100.0 * cached as f64 / ideal.max(1) as f64,
            outcome.records.len() as f64 * 60.0 / outcome.wall.as_secs_f64(),
        );
    }
    println!("prompt tokens sent: {prompt_total}; ideal prefix reuse: {ideal}");
    if let Some(fleet) = outcomes.iter().find(|outcome| outcome.setup == Setup::Fleet) {
        for other in outcomes.iter().filter(|outcome| outcome.setup != Setup::Fleet) {
            println!("mean TTFT, {} / fleet: {:.2}", other.setup.name(), mean(other) / mean(fleet).max(1e-9));
        }
    }
}
