//! `kvsidecar tasks`: the top tasks of a running sidecar, read from its admin API and printed as
//! a table or as JSON.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;

use super::TopBy;
use crate::engine::EngineError;
use crate::engine::http_client::{EngineClient, full_body, read_limited};

/// Time allowed to connect to the admin API and to receive its response.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest response read from the admin API: 10000 tasks take about 6 MB.
const MAX_RESPONSE_BODY: usize = 64 << 20;

/// Failure of `kvsidecar tasks`.
#[derive(Debug, thiserror::Error)]
pub enum TasksError {
    #[error("invalid --admin URL {url:?}: use http://HOST:PORT, such as http://127.0.0.1:9090")]
    InvalidUrl { url: String },
    #[error(
        "no kvsidecar admin API answered at {url}: {reason}\nhint: start `kvsidecar serve`, or name the running sidecar's admin API with --admin URL, or with the --config or --admin-listen it was started with"
    )]
    Unreachable { url: String, reason: String },
    #[error("the kvsidecar admin API at {url} answered with HTTP {status}: {message}")]
    Status { url: String, status: u16, message: String },
    #[error("the kvsidecar admin API at {url} sent an invalid task list: {reason}\nhint: check that the sidecar runs the same kvsidecar version as this command")]
    Invalid { url: String, reason: String },
}

/// Returns the admin API's base URL for an admin listen address. An unspecified address
/// (0.0.0.0 or ::) becomes loopback, where the sidecar also listens.
pub fn admin_url(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// Asks the admin API at `url` for the top `top` tasks by `by`. Returns the output to print: the
/// response's JSON when `json` is set, else a table.
pub async fn run(url: &str, top: u32, by: TopBy, json: bool) -> Result<String, TasksError> {
    let base: http::Uri = url
        .trim_end_matches('/')
        .parse()
        .ok()
        .filter(|uri: &http::Uri| uri.scheme_str() == Some("http") && uri.host().is_some())
        .ok_or_else(|| TasksError::InvalidUrl { url: url.to_string() })?;
    let client = EngineClient::new(base, CONNECT_TIMEOUT, RESPONSE_TIMEOUT);
    let path = format!("/admin/tasks?top={top}&by={}", by.as_str());
    let invalid = |reason: String| TasksError::Invalid { url: url.to_string(), reason };
    let request = http::Request::get(client.uri(&path)).body(full_body(Bytes::new())).map_err(|error| invalid(error.to_string()))?;
    let response = client.send(request).await.map_err(|error| match error {
        EngineError::Unreachable { reason, .. } => TasksError::Unreachable { url: url.to_string(), reason },
        other => TasksError::Unreachable { url: url.to_string(), reason: other.to_string() },
    })?;
    let status = response.status();
    let body = read_limited(response.into_body(), MAX_RESPONSE_BODY).await.map_err(invalid)?;
    if !status.is_success() {
        return Err(status_error(url, status, &body));
    }
    if json {
        // The body as the sidecar wrote it, so its fields keep their order.
        return Ok(format!("{}\n", String::from_utf8_lossy(&body).trim_end()));
    }
    let listing: Listing = serde_json::from_slice(&body).map_err(|error| invalid(error.to_string()))?;
    Ok(table(&listing))
}

/// Returns the error for a response with a non-2xx `status`, with the message of an error body.
fn status_error(url: &str, status: http::StatusCode, body: &[u8]) -> TasksError {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| parsed.as_ref().and_then(|value| value.pointer(&format!("/error/{name}"))).and_then(serde_json::Value::as_str).map(str::to_string);
    let mut message = field("message").unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned());
    if field("code").as_deref() != Some("ledger_disabled") {
        message.push_str("\nhint: --admin names the sidecar's admin API (server.admin_listen, default 127.0.0.1:9090), not its client API");
    }
    TasksError::Status { url: url.to_string(), status: status.as_u16(), message }
}

/// The response of `/admin/tasks`, with the fields the table shows.
#[derive(Debug, Deserialize)]
pub struct Listing {
    pub by: String,
    pub currency: String,
    pub tasks: Vec<Row>,
    pub totals: Totals,
}

#[derive(Debug, Deserialize)]
pub struct Row {
    pub task: String,
    pub tenant: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    pub ttft_mean_ms: f64,
    pub cost_served: String,
    pub cost_uncached: String,
    pub cost_saved: String,
}

#[derive(Debug, Deserialize)]
pub struct Totals {
    pub requests: u64,
    pub cost_served: String,
    pub cost_saved: String,
    pub dropped: u64,
    pub failed: u64,
}

/// Formats the listing as a table with a header row, text columns aligned left and numbers
/// right, followed by the totals of the sidecar process.
pub fn table(listing: &Listing) -> String {
    let currency = &listing.currency;
    let header: Vec<String> = ["task", "tenant", "requests", "prompt", "cached", "output", "ttft ms"]
        .into_iter()
        .map(str::to_string)
        .chain([format!("served {currency}"), format!("uncached {currency}"), format!("saved {currency}")])
        .collect();
    let rows: Vec<Vec<String>> = listing
        .tasks
        .iter()
        .map(|row| {
            vec![
                row.task.clone(),
                row.tenant.clone(),
                row.requests.to_string(),
                row.prompt_tokens.to_string(),
                row.cached_tokens.to_string(),
                row.output_tokens.to_string(),
                format!("{:.1}", row.ttft_mean_ms),
                row.cost_served.clone(),
                row.cost_uncached.clone(),
                row.cost_saved.clone(),
            ]
        })
        .collect();

    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: &[String]| {
        let formatted: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(column, (cell, width))| if column < 2 { format!("{cell:<width$}") } else { format!("{cell:>width$}") })
            .collect();
        format!("{}\n", formatted.join("  ").trim_end())
    };

    let mut output = String::new();
    if rows.is_empty() {
        output.push_str("no tasks recorded\n");
    } else {
        output.push_str(&line(&header));
        for row in &rows {
            output.push_str(&line(row));
        }
    }
    let totals = &listing.totals;
    output.push_str(&format!(
        "\nsince the sidecar started: {} requests, served {} {currency}, saved {} {currency}, {} records dropped, {} failed to write\n",
        totals.requests, totals.cost_served, totals.cost_saved, totals.dropped, totals.failed
    ));
    output
}
