//! Costs of running policies as WebAssembly plugins:
//!
//! 1. per-decision latency of the prefix-affinity router plugin versus the built-in native
//!    router, for 8, 64 and 256 candidates (the full call: conversion, call, checks);
//! 2. time from a plugin file change to the new version serving, with the compiled artifact
//!    cached and cold;
//! 3. request latency through a sidecar with the tiny model, without swaps and while the router
//!    is swapped every 100 ms.
//!
//! Run with `scripts/bench.sh plugins` (or, after `scripts/setup.sh` and a release build of
//! kvsidecar, `cargo run --release -p kvsidecar-benches --bin plugin_overhead`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use kvsidecar::config::Config;
use kvsidecar::plugin::{Plugins, native};
use kvsidecar_benches::client::post_streaming;
use kvsidecar_sdk::{Candidate, Request};
use kvsidecar_tests::{Engine, Sidecar, Workspace, shipped_plugins, test_plugins, tokens};
use serde_json::json;

const CALLS: usize = 100_000;

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * fraction).round() as usize]
}

/// Returns (p50, p99, mean) of `samples`.
fn summary(samples: &mut [f64]) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    (percentile(samples, 0.5), percentile(samples, 0.99), mean)
}

fn candidates(count: usize) -> Vec<Candidate> {
    let mut list: Vec<Candidate> = (0..count as u32 - 1)
        .map(|index| {
            let mut slot = Candidate::slot(index).matched((index * 37) % 500).load(index % 3, index % 2);
            slot.resident_tokens = 1000;
            slot.recompute_cost_ms = f64::from(2000 - slot.matched_tokens);
            slot
        })
        .collect();
    let mut store = Candidate::store(700);
    store.transfer_cost_ms = 30.0;
    store.recompute_cost_ms = 1300.0;
    list.push(store);
    list
}

fn config(dir: &Path, router: &Path) -> Config {
    let mut config = Config::defaults();
    config.plugins.dir = shipped_plugins();
    config.plugins.cache_dir = dir.join("plugin-cache");
    config.plugins.router.file = Some(router.to_path_buf());
    config
}

fn decisions(dir: &Path) -> Result<()> {
    let plugins = Plugins::load(&config(dir, &shipped_plugins().join("prefix-affinity.wasm")))?;
    let request = Request { namespace: "0".repeat(64), prompt_tokens: 2000, task_id: None, tenant: "default".into(), model: "tiny".into() };
    println!("## Per-decision latency, {CALLS} calls each (microseconds)");
    println!();
    println!("| candidates | native p50 | native p99 | Wasm p50 | Wasm p99 | Wasm mean |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for count in [8, 64, 256] {
        let list = candidates(count);
        let mut native_us = Vec::with_capacity(CALLS);
        let mut wasm_us = Vec::with_capacity(CALLS);
        for _ in 0..1000 {
            plugins.router.route(&request, &list).map_err(|error| anyhow::anyhow!("{error}"))?;
        }
        for _ in 0..CALLS {
            let started = Instant::now();
            std::hint::black_box(native::route(std::hint::black_box(&list), 64));
            native_us.push(started.elapsed().as_secs_f64() * 1e6);
            let started = Instant::now();
            let plan = plugins.router.route(&request, &list);
            wasm_us.push(started.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(plan.map_err(|error| anyhow::anyhow!("{error}"))?);
        }
        let (native_p50, native_p99, _) = summary(&mut native_us);
        let (wasm_p50, wasm_p99, wasm_mean) = summary(&mut wasm_us);
        println!("| {count} | {native_p50:.2} | {native_p99:.2} | {wasm_p50:.2} | {wasm_p99:.2} | {wasm_mean:.2} |");
    }
    let router = plugins.router.plugin.describe();
    println!();
    println!("plugin failures during the run: {}", router["failures"]);
    Ok(())
}

/// Replaces `target` with `source` by rename.
fn replace(source: &Path, target: &Path) -> Result<()> {
    let temporary = target.with_extension("tmp");
    std::fs::copy(source, &temporary)?;
    std::fs::rename(&temporary, target)?;
    Ok(())
}

async fn swap_latency(dir: &Path) -> Result<()> {
    const SWAPS: usize = 20;
    let versions = [test_plugins().join("pick-first.wasm"), test_plugins().join("pick-second.wasm")];
    let live_dir = dir.join("live");
    std::fs::create_dir_all(&live_dir)?;
    let live = live_dir.join("router.wasm");
    replace(&versions[0], &live)?;
    let settings = config(dir, &live);
    let plugins = Arc::new(tokio::task::spawn_blocking(move || Plugins::load(&settings)).await??);
    let _watcher = kvsidecar::plugin::watch(plugins.clone());
    let hashes: Vec<String> = versions.iter().map(|path| kvsidecar::plugin::runtime::hex_sha256(&std::fs::read(path).unwrap())).collect();
    // Compile both versions once, so the cached run measures cached loads only.
    for next in [1, 0] {
        replace(&versions[next], &live)?;
        while plugins.router.plugin.current().is_none_or(|version| version.sha256 != hashes[next]) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    println!();
    println!("## File change to new version serving ({SWAPS} swaps each, milliseconds)");
    println!();
    println!("| compiled artifact | p50 | max |");
    println!("| --- | --- | --- |");
    for cold in [false, true] {
        let mut elapsed = Vec::new();
        for swap in 0..SWAPS {
            let next = (swap + 1) % 2;
            if cold {
                let _ = std::fs::remove_dir_all(dir.join("plugin-cache"));
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            let started = Instant::now();
            replace(&versions[next], &live)?;
            while plugins.router.plugin.current().is_none_or(|version| version.sha256 != hashes[next]) {
                tokio::time::sleep(Duration::from_micros(200)).await;
                anyhow::ensure!(started.elapsed() < Duration::from_secs(10), "swap {swap} was not picked up");
            }
            elapsed.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        let (p50, _, _) = summary(&mut elapsed);
        let max = elapsed.last().copied().unwrap_or_default();
        println!("| {} | {p50:.1} | {max:.1} |", if cold { "cold (cache emptied before each swap)" } else { "cached" });
    }
    Ok(())
}

async fn latency_during_swaps() -> Result<()> {
    const CLIENTS: u64 = 4;
    const PER_CLIENT: usize = 250;
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(2), &ws.logs()).await?;
    let live = ws.path("live").join("router.wasm");
    let versions = [shipped_plugins().join("prefix-affinity.wasm"), shipped_plugins().join("least-loaded.wasm")];
    replace(&versions[0], &live)?;
    let mut spec = ws.sidecar(&engine);
    spec.env.push(("KVSIDECAR_PLUGINS_ROUTER_FILE".into(), live.display().to_string()));
    spec.env.push(("KVSIDECAR_LOG_LEVEL".into(), "warn".into()));
    let sidecar = Sidecar::start(&spec, &ws.logs()).await?;
    println!();
    println!("## Request latency, {CLIENTS} clients x {PER_CLIENT} requests, tiny model, 24-token prompts (milliseconds)");
    println!();
    println!("| run | swaps | p50 | p99 | failed |");
    println!("| --- | --- | --- | --- | --- |");
    for swapping in [false, true] {
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let (stop, live, versions) = (stop.clone(), live.clone(), versions.clone());
            tokio::spawn(async move {
                let mut swaps = 0usize;
                while swapping && !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    swaps += 1;
                    let _ = replace(&versions[swaps % 2], &live);
                }
                swaps
            })
        };
        let mut clients = Vec::new();
        for client in 0..CLIENTS {
            let url = format!("{}/completion", sidecar.url);
            clients.push(tokio::spawn(async move {
                let body = json!({"prompt": tokens(900 + client, 24), "n_predict": 1, "temperature": 0.0, "stream": true});
                let mut latencies = Vec::new();
                let mut failed = 0;
                for _ in 0..PER_CLIENT {
                    match post_streaming(&url, &body).await {
                        Ok(reply) => latencies.push(reply.total.as_secs_f64() * 1000.0),
                        Err(_) => failed += 1,
                    }
                }
                (latencies, failed)
            }));
        }
        let (mut all, mut failed) = (Vec::new(), 0);
        for client in clients {
            let (latencies, client_failed) = client.await?;
            all.extend(latencies);
            failed += client_failed;
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = swapper.await?;
        let (p50, p99, _) = summary(&mut all);
        println!("| {} | {swaps} | {p50:.2} | {p99:.2} | {failed} |", if swapping { "router swapped every 100 ms" } else { "no swaps" });
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || decisions(&path)).await??;
    swap_latency(dir.path()).await?;
    latency_during_swaps().await?;
    Ok(())
}
