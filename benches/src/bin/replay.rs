//! Replays the start of a Mooncake-format request trace against OpenAI-compatible endpoints and
//! reports, per request and in total, prompt tokens, cached tokens, cache source, serving node
//! and time to first token. With several `--target`s the requests go round-robin over them, as a
//! load balancer without cache awareness would send them.
//!
//! Each trace block id becomes a fixed run of token ids (the same id always gives the same
//! tokens), so requests that share leading block ids share that prompt prefix.
//!
//! ```text
//! replay run --target http://127.0.0.1:8080 --trace trace.jsonl --label sidecar --out a.json
//! replay run --target http://127.0.0.1:8080,http://127.0.0.1:8081 --trace trace.jsonl --label fleet --out f.json
//! replay compare a.json b.json
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kvsidecar_benches::client::percentile;
use kvsidecar_benches::replay::{Record, send};
use kvsidecar_benches::trace::{self, Scale};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(about = "Replay a request trace against an OpenAI-compatible server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send the trace's requests one after another and record what each one cost.
    Run {
        /// Base URLs of the servers (kvsidecars or bare llama-servers), comma-separated; requests
        /// go round-robin over them.
        #[arg(long, value_delimiter = ',', required = true)]
        target: Vec<String>,
        /// Trace file, one JSON object a line with input_length, output_length and hash_ids.
        #[arg(long)]
        trace: PathBuf,
        /// Name of this run in the report.
        #[arg(long)]
        label: String,
        /// Write the per-request results to this JSON file.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        scale: Scale,
    },
    /// Print two recorded runs side by side.
    Compare { first: PathBuf, second: PathBuf },
}

#[derive(Debug, Serialize, Deserialize)]
struct Run {
    label: String,
    records: Vec<Record>,
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Run { target, trace, label, out, scale } => {
            let requests = trace::load(&trace, &scale)?;
            println!("{label}: replaying {} requests against {}", requests.len(), target.join(", "));
            println!("{:>4} {:>6} {:>7} {:>7} {:>7} {:>9} {:>9}", "#", "target", "prompt", "cached", "source", "ttft_ms", "total_ms");
            let mut records = Vec::new();
            for (index, request) in requests.iter().enumerate() {
                let at = index % target.len();
                let mut record = send(&target[at], index, (serde_json::json!(request.prompt), request.prompt.len() as u64), request.output_tokens, &serde_json::Map::new()).await?;
                record.target = at;
                println!(
                    "{:>4} {:>6} {:>7} {:>7} {:>7} {:>9.1} {:>9.1}",
                    index, at, record.prompt_tokens, record.cached_tokens, record.source, record.ttft_ms, record.total_ms
                );
                records.push(record);
            }
            let run = Run { label, records };
            print_totals(&run);
            std::fs::write(&out, serde_json::to_vec_pretty(&run)?).with_context(|| format!("write {}", out.display()))?;
        }
        Command::Compare { first, second } => {
            let read = |path: &PathBuf| -> Result<Run> {
                Ok(serde_json::from_slice(&std::fs::read(path).with_context(|| format!("read {}", path.display()))?)?)
            };
            let (a, b) = (read(&first)?, read(&second)?);
            compare(&a, &b);
        }
    }
    Ok(())
}

fn print_totals(run: &Run) {
    let prompt: u64 = run.records.iter().map(|r| r.prompt_tokens).sum();
    let cached: u64 = run.records.iter().map(|r| r.cached_tokens).sum();
    let mut ttft: Vec<f64> = run.records.iter().map(|r| r.ttft_ms).collect();
    let sum: f64 = ttft.iter().sum();
    let mut by_source = std::collections::BTreeMap::new();
    let mut cached_by_source = std::collections::BTreeMap::new();
    for record in &run.records {
        *by_source.entry(record.source.as_str()).or_insert(0) += 1;
        *cached_by_source.entry(record.source.as_str()).or_insert(0u64) += record.cached_tokens;
    }
    println!(
        "{}: {} requests, prompt tokens {prompt}, cached {cached} ({:.1} %), sources {by_source:?}, ttft mean {:.1} ms, p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
        run.label,
        run.records.len(),
        100.0 * cached as f64 / prompt.max(1) as f64,
        sum / ttft.len().max(1) as f64,
        percentile(&mut ttft, 0.5),
        percentile(&mut ttft, 0.9),
        percentile(&mut ttft, 0.99),
    );
    if run.records.iter().any(|record| record.served_by.is_some()) {
        let shares: Vec<String> = cached_by_source.iter().map(|(source, tokens)| format!("{source} {:.1} %", 100.0 * *tokens as f64 / prompt.max(1) as f64)).collect();
        println!("{}: hit rate by source (share of prompt tokens): {}; forwarded to another node: {}", run.label, shares.join(", "), forwarded(run));
    }
}

/// Counts requests served by another node than the one that usually serves their target.
fn forwarded(run: &Run) -> usize {
    let mut usual: std::collections::BTreeMap<usize, std::collections::BTreeMap<&str, usize>> = std::collections::BTreeMap::new();
    for record in &run.records {
        if let Some(node) = &record.served_by {
            *usual.entry(record.target).or_default().entry(node.as_str()).or_default() += 1;
        }
    }
    let home = |target: usize| usual.get(&target).and_then(|nodes| nodes.iter().max_by_key(|(_, count)| **count).map(|(node, _)| *node));
    run.records.iter().filter(|record| record.served_by.as_deref().is_some_and(|node| Some(node) != home(record.target))).count()
}

fn compare(a: &Run, b: &Run) {
    println!("{:>4} {:>7} | {:>7} {:>7} {:>9} | {:>7} {:>7} {:>9}", "#", "prompt", "cached", "source", "ttft_ms", "cached", "source", "ttft_ms");
    println!("{:>4} {:>7} | {:^25} | {:^25}", "", "", a.label, b.label);
    for (x, y) in a.records.iter().zip(&b.records) {
        println!(
            "{:>4} {:>7} | {:>7} {:>7} {:>9.1} | {:>7} {:>7} {:>9.1}",
            x.index, x.prompt_tokens, x.cached_tokens, x.source, x.ttft_ms, y.cached_tokens, y.source, y.ttft_ms
        );
    }
    print_totals(a);
    print_totals(b);
    let total = |run: &Run| run.records.iter().map(|r| r.ttft_ms).sum::<f64>();
    let ratio = total(b) / total(a).max(1e-9);
    let verdict = if ratio >= 1.0 { format!("{} {ratio:.2} times faster", a.label) } else { format!("{} {:.2} times slower", a.label, 1.0 / ratio.max(1e-9)) };
    println!("time to first token, summed: {} {:.0} ms, {} {:.0} ms: {verdict}", a.label, total(a), b.label, total(b));
    println!("cached: prompt tokens the engine did not compute; source (sidecar runs only): none, slot, local (restored from the store) or peer (pulled from another sidecar)");
}
