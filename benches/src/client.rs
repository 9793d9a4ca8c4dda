//! A streaming HTTP client that measures time to the first body frame.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A streamed response with its timings.
pub struct Streamed {
    pub headers: http::HeaderMap,
    /// Time from sending the request to the first body frame.
    pub first_frame: Duration,
    pub total: Duration,
    pub text: String,
}

impl Streamed {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

/// POSTs `body` as JSON to `url` and reads the streamed response, failing on a non-2xx status.
pub async fn post_streaming(url: &str, body: &serde_json::Value) -> Result<Streamed> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;

    let started = Instant::now();
    let response = client.request(request).await.with_context(|| format!("POST {url}"))?;
    if !response.status().is_success() {
        let status = response.status();
        let text = response.into_body().collect().await?.to_bytes();
        bail!("POST {url} failed with {status}: {}", String::from_utf8_lossy(&text));
    }
    let headers = response.headers().clone();
    let mut body = response.into_body();
    let mut first_frame = None;
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            first_frame.get_or_insert_with(|| started.elapsed());
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    let total = started.elapsed();
    Ok(Streamed { headers, first_frame: first_frame.unwrap_or(total), total, text })
}

/// Returns the median of `values`, or zero for none.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// Returns the `fraction` percentile of `values` (nearest rank), or zero for none.
pub fn percentile(values: &mut [f64], fraction: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[((values.len() - 1) as f64 * fraction).round() as usize]
}

/// Returns a spec for a sidecar in front of `engine_url` in `ws` that saves no snapshots and
/// logs only warnings, so that a benchmark measures the request path alone.
pub fn sidecar_without_snapshots(ws: &kvsidecar_tests::Workspace, engine_url: &str) -> kvsidecar_tests::SidecarSpec {
    kvsidecar_tests::SidecarSpec {
        engine_url: engine_url.to_string(),
        data_dir: ws.path("data"),
        slot_dir: ws.path("slots"),
        env: vec![("KVSIDECAR_SNAPSHOT_MIN_TOKENS".into(), "100000".into()), ("KVSIDECAR_LOG_LEVEL".into(), "warn".into())],
    }
}

/// Throughput and latency of one closed-loop load run.
pub struct Round {
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

/// Runs `clients` closed-loop clients against `base_url` for `length`. Each sends streaming
/// `/completion` requests of `prompt_tokens` fresh token ids (so every request is a miss) with one
/// generated token, the next as soon as the last ends. Returns the throughput and the latency
/// percentiles of the requests that completed.
pub async fn closed_loop(base_url: &str, clients: usize, prompt_tokens: usize, length: Duration, seed: &std::sync::Arc<std::sync::atomic::AtomicU64>) -> Round {
    let deadline = Instant::now() + length;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let url = format!("{base_url}/completion");
        let seed = seed.clone();
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            while Instant::now() < deadline {
                let prompt = kvsidecar_tests::tokens(seed.fetch_add(1, std::sync::atomic::Ordering::Relaxed), prompt_tokens);
                let body = serde_json::json!({"prompt": prompt, "n_predict": 1, "temperature": 0.0, "stream": true});
                match post_streaming(&url, &body).await {
                    Ok(reply) => latencies.push(reply.total.as_secs_f64() * 1000.0),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for task in tasks {
        if let Ok((mut part, failed)) = task.await {
            latencies.append(&mut part);
            errors += failed;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let requests_per_second = latencies.len() as f64 / elapsed;
    Round { requests_per_second, p50_ms: percentile(&mut latencies, 0.5), p99_ms: percentile(&mut latencies, 0.99), errors }
}
