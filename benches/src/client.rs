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
