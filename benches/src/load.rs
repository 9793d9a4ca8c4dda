//! Load generators for proxy benchmarks: an open-loop client that sends at a fixed rate, and wrk
//! for the highest throughput a server reaches with many connections open.
//!
//! Both send streaming `/v1/completions` requests with a text prompt of [`PROMPT_TOKENS`] words
//! (one token each, see [`Words`]) and one generated token. A [`Prompts`] value decides whether
//! prompts are fresh (every request a cache miss) or repeat from a small set (cache hits after
//! the first round).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::client::percentile;
use crate::vocab::Words;

/// Tokens (words) per prompt.
pub const PROMPT_TOKENS: usize = 256;

/// The prompts of a load.
#[derive(Debug, Clone, Copy)]
pub enum Prompts {
    /// A new prompt for every request, starting at this seed.
    Fresh { seed: u64 },
    /// Request `n` sends prompt `n % count` of the set starting at this seed.
    Repeated { seed: u64, count: u64 },
}

impl Prompts {
    fn key(self, n: u64) -> u64 {
        match self {
            Prompts::Fresh { seed } => seed + n,
            Prompts::Repeated { seed, count } => seed + n % count,
        }
    }

    /// Returns the lua expression wrk evaluates for request `n`'s key.
    fn lua_key(self) -> String {
        match self {
            Prompts::Fresh { seed } => format!("{seed} + n"),
            Prompts::Repeated { seed, count } => format!("{seed} + n % {count}"),
        }
    }
}

/// Returns the word indices of prompt `key`. The lua function in [`wrk_script`] computes the same.
pub fn prompt(key: u64) -> Vec<u64> {
    // MINSTD steps from a state derived from the key; every product stays below 2^53, so the lua
    // side computes the same numbers in doubles.
    let mut state = key % 2_147_483_646 + 1;
    (0..PROMPT_TOKENS)
        .map(|_| {
            state = state * 48_271 % 2_147_483_647;
            state
        })
        .collect()
}

/// Returns the request body for prompt `key`.
pub fn body(model: &str, words: &Words, key: u64) -> String {
    serde_json::json!({"model": model, "prompt": words.text(&prompt(key)), "max_tokens": 1, "temperature": 0.0, "stream": true}).to_string()
}

/// Latency and throughput of one load run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    /// Completed requests per second.
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// Requests sent; open-loop runs only.
    pub sent: u64,
    /// Responses for which a sidecar planned to reuse at least half of the prompt from a slot
    /// (`x-kvsidecar-cache-source: slot` and `x-kvsidecar-cached-tokens`); open-loop runs only.
    pub slot_hits: u64,
}

/// Sends `rate` requests per second to `base_url` for `length`, each at its scheduled time
/// whether or not earlier ones have finished, over one pool of kept-alive connections. Latency
/// runs from the scheduled time to the end of the response body, so a server that falls behind
/// shows its queueing in the percentiles.
pub async fn open_loop(base_url: &str, (model, words): (&str, &Words), rate: f64, length: Duration, prompts: Prompts, counter: &AtomicU64) -> Figures {
    let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build_http::<Full<Bytes>>();
    let url: Arc<str> = format!("{base_url}/v1/completions").into();
    let total = (rate * length.as_secs_f64()).round() as u64;
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);

    for i in 0..total {
        let scheduled = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(scheduled).await;
        let payload = body(model, words, prompts.key(counter.fetch_add(1, Ordering::Relaxed)));
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let request = http::Request::post(&*url).header("content-type", "application/json").body(Full::new(Bytes::from(payload))).ok()?;
            let response = client.request(request).await.ok()?;
            if !response.status().is_success() {
                return None;
            }
            let header = |name: &str| response.headers().get(name).and_then(|value| value.to_str().ok());
            let cached: usize = header("x-kvsidecar-cached-tokens").and_then(|value| value.parse().ok()).unwrap_or(0);
            let slot_hit = header("x-kvsidecar-cache-source") == Some("slot") && cached >= PROMPT_TOKENS / 2;
            response.into_body().collect().await.ok()?;
            Some((scheduled.elapsed().as_secs_f64() * 1000.0, slot_hit))
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let (mut errors, mut slot_hits) = (0, 0);
    for task in tasks {
        match task.await {
            Ok(Some((ms, slot_hit))) => {
                latencies.push(ms);
                slot_hits += u64::from(slot_hit);
            }
            _ => errors += 1,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = latencies.len() as f64 / elapsed;
    Figures { rate, p50_ms: percentile(&mut latencies, 0.5), p99_ms: percentile(&mut latencies, 0.99), errors, sent: total, slot_hits }
}

/// Writes the wrk script that sends the same requests as [`open_loop`] for `prompts`.
pub fn wrk_script(path: &Path, (model, words): (&str, &Words), prompts: Prompts) -> Result<()> {
    let script = format!(
        r#"-- Streaming completions of {PROMPT_TOKENS} words with one generated token.
local words = {table}
local n = 0
function request()
  local key = {key}
  n = n + 1
  local state = key % 2147483646 + 1
  local text = {{}}
  for i = 1, {PROMPT_TOKENS} do
    state = (state * 48271) % 2147483647
    text[i] = words[state % #words + 1]
  end
  local body = '{{"model":{model_json},"prompt":"' .. table.concat(text, " ") .. '","max_tokens":1,"temperature":0.0,"stream":true}}'
  return wrk.format("POST", "/v1/completions", {{["Content-Type"] = "application/json"}}, body)
end
"#,
        key = prompts.lua_key(),
        model_json = serde_json::to_string(model)?,
        table = words.lua_table(),
    );
    std::fs::write(path, script).with_context(|| format!("write {}", path.display()))
}

/// Runs wrk with `connections` connections on one thread for `length` against `base_url`, and
/// returns its throughput and latency percentiles. Non-2xx responses count as errors.
pub fn wrk(binary: &Path, script: &Path, base_url: &str, connections: usize, length: Duration) -> Result<Figures> {
    let output = Command::new(binary)
        .args(["-t1", &format!("-c{connections}"), &format!("-d{}s", length.as_secs()), "--latency", "--timeout", "10s", "-s"])
        .arg(script)
        .arg(base_url)
        .output()
        .with_context(|| format!("run {}", binary.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("wrk failed: {}{}", text, String::from_utf8_lossy(&output.stderr));
    }
    parse_wrk(&text).with_context(|| format!("read wrk's report:\n{text}"))
}

fn parse_wrk(text: &str) -> Option<Figures> {
    let mut figures = Figures::default();
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(value)) => figures.rate = value.parse().ok()?,
            (Some("50%"), Some(value)) => figures.p50_ms = wrk_millis(value)?,
            (Some("99%"), Some(value)) => figures.p99_ms = wrk_millis(value)?,
            (Some("Non-2xx"), _) => figures.errors += line.rsplit(' ').next()?.parse::<u64>().ok()?,
            (Some("Socket"), Some("errors:")) => {
                // "Socket errors: connect 0, read 0, write 0, timeout 0"
                figures.errors += line.split(',').filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok()).sum::<u64>();
            }
            _ => {}
        }
    }
    (figures.rate > 0.0).then_some(figures)
}

/// Reads a wrk duration such as `512.00us`, `1.20ms` or `2.01s` in milliseconds.
fn wrk_millis(value: &str) -> Option<f64> {
    let split = value.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().ok()?;
    match unit {
        "us" => Some(number / 1000.0),
        "ms" => Some(number),
        "s" => Some(number * 1000.0),
        "m" => Some(number * 60_000.0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_report_is_read() {
        let report = "Running 10s test @ http://127.0.0.1:1\n  1 threads and 64 connections\n  Latency Distribution\n     50%  512.00us\n     75%    1.00ms\n     90%    1.50ms\n     99%    2.50s \n  12345 requests in 10.00s, 1.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\nRequests/sec:   1234.50\n";
        let figures = parse_wrk(report).expect("figures");
        assert_eq!((figures.rate, figures.p50_ms, figures.p99_ms, figures.errors), (1234.5, 0.512, 2500.0, 7));
    }

    #[test]
    fn fresh_prompts_differ_and_repeated_ones_cycle() {
        let fresh = Prompts::Fresh { seed: 10 };
        assert_ne!(prompt(fresh.key(0)), prompt(fresh.key(1)));
        let repeated = Prompts::Repeated { seed: 10, count: 4 };
        assert_eq!(prompt(repeated.key(1)), prompt(repeated.key(5)));
        assert_eq!(prompt(7).len(), PROMPT_TOKENS);
    }
}
