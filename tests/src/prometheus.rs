//! A real Prometheus server for tests, scraping loopback targets, and `promtool check metrics`.
//!
//! Both binaries come from the Debian package `prometheus`, which `scripts/setup.sh` installs.
//! The server listens on `127.0.0.1` only, keeps its configuration and data in a temporary folder,
//! and is killed when the [`Prometheus`] value is dropped or the test process exits.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use crate::{Process, free_port, get};

/// The scrape job name and the `job` label of every scraped series.
pub const JOB: &str = "kvsidecar";

/// How long `start` waits for `/-/ready`, and then again for the scrape targets to be loaded.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause between two polls of the HTTP API while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// One series of a query result.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Labels of the series, with `__name__` when the query keeps the metric name.
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Health of a scrape target as of its last scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetHealth {
    Up,
    Down,
    /// Not scraped yet.
    Unknown,
}

/// A scrape target as `/api/v1/targets` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub scrape_url: String,
    pub health: TargetHealth,
    /// Why the last scrape failed; empty after a successful scrape.
    pub last_error: String,
    pub labels: BTreeMap<String, String>,
}

/// A running `prometheus` that scrapes `http://TARGET/metrics` of its targets (job
/// [`JOB`]). It is killed on drop.
pub struct Prometheus {
    // Declared before `dir`, so the process is killed before its folder is removed.
    process: Process,
    url: String,
    dir: tempfile::TempDir,
    /// The number of distinct configured targets.
    target_count: usize,
}

impl Prometheus {
    /// Starts Prometheus with the targets `targets`, every one on loopback, scraped every
    /// `scrape_interval` with a scrape timeout of the same length. Returns once `/-/ready` returns
    /// 200 and `/api/v1/targets` lists every target.
    ///
    /// This takes about 5 s with Prometheus 2.42, because its discovery manager passes new targets
    /// on every 5 s, the first time too. The first scrape of a target happens within one interval
    /// after the return. Prometheus durations have millisecond resolution, so the interval is
    /// rounded down to whole milliseconds and must be at least 1 ms.
    pub async fn start(targets: &[SocketAddr], scrape_interval: Duration) -> Result<Prometheus> {
        // Prometheus lists a target given twice once.
        let targets: BTreeSet<SocketAddr> = targets.iter().copied().collect();
        if let Some(target) = targets.iter().find(|target| !target.ip().is_loopback()) {
            bail!("scrape target {target} is not on loopback; tests scrape only servers on 127.0.0.1");
        }
        if scrape_interval < Duration::from_millis(1) {
            bail!("scrape interval {scrape_interval:?} is too short; Prometheus needs at least 1ms");
        }
        let binary = find_program("prometheus").ok_or_else(|| anyhow!("prometheus not found on PATH; run scripts/setup.sh, which installs the Debian package prometheus"))?;

        let dir = tempfile::Builder::new().prefix("kvsidecar-prometheus-").tempdir().context("create a temporary folder for Prometheus")?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, render_config(&targets, scrape_interval)).with_context(|| format!("write {}", config.display()))?;

        // Another process may take the chosen port before Prometheus binds it, so a start that
        // fails on a busy address is tried again with another port.
        let mut attempt = 1;
        loop {
            let port = free_port();
            let mut process = spawn(&binary, dir.path(), &config, port)?;
            let url = format!("http://127.0.0.1:{port}");
            match wait_ready(&mut process, &url).await {
                Ok(()) => {
                    let prometheus = Prometheus { process, url, dir, target_count: targets.len() };
                    prometheus.wait_for_discovery().await?;
                    return Ok(prometheus);
                }
                Err(error) if attempt < 3 && read_log(&process).contains("address already in use") => {
                    eprintln!("prometheus: port {port} was taken, trying another ({error:#})");
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Returns the base URL of the HTTP API and web UI, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Returns the configuration file Prometheus runs with.
    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("prometheus.yml")
    }

    /// Returns what Prometheus has logged so far.
    pub fn log(&self) -> String {
        read_log(&self.process)
    }

    /// Runs an instant query and returns its series. A scalar result is one sample without
    /// labels. The error of a rejected query contains Prometheus's error type and text.
    pub async fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let url = format!("{}/api/v1/query?query={}", self.url, utf8_percent_encode(promql, NON_ALPHANUMERIC));
        let data = self.api(&url).await.with_context(|| format!("query {promql:?} failed"))?;
        parse_samples(&data).with_context(|| format!("query {promql:?} returned an unexpected result"))
    }

    /// Runs `promql` until its result satisfies `done` and returns that result. A query error ends
    /// the wait at once. On timeout, the error shows the last result and the scrape targets with
    /// their last errors.
    pub async fn wait_for(&self, promql: &str, done: impl Fn(&[Sample]) -> bool, timeout: Duration) -> Result<Vec<Sample>> {
        let deadline = Instant::now() + timeout;
        loop {
            let samples = self.query(promql).await?;
            if done(&samples) {
                return Ok(samples);
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {promql:?} to match; last result: {samples:?}; {}", self.describe_targets().await);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Returns the active scrape targets from `/api/v1/targets`.
    pub async fn targets(&self) -> Result<Vec<Target>> {
        let data = self.api(&format!("{}/api/v1/targets?state=active", self.url)).await?;
        let active = data["activeTargets"].as_array().ok_or_else(|| anyhow!("/api/v1/targets has no activeTargets: {data}"))?;
        Ok(active.iter().map(parse_target).collect())
    }

    /// Waits until the last scrape of every configured target succeeded, and returns the targets.
    /// On timeout, the error lists each target's health and last scrape error.
    pub async fn wait_for_targets_up(&self, timeout: Duration) -> Result<Vec<Target>> {
        let deadline = Instant::now() + timeout;
        loop {
            let targets = self.targets().await?;
            if targets.len() >= self.target_count && targets.iter().all(|target| target.health == TargetHealth::Up) {
                return Ok(targets);
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for every scrape target to be up; {}", describe(&targets));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn wait_for_discovery(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.targets().await?.len() < self.target_count {
            if Instant::now() >= deadline {
                bail!("prometheus did not load its {} scrape target(s) within {READY_TIMEOUT:?}; log:\n{}", self.target_count, self.log());
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Ok(())
    }

    async fn describe_targets(&self) -> String {
        match self.targets().await {
            Ok(targets) => describe(&targets),
            Err(error) => format!("reading the targets failed: {error:#}"),
        }
    }

    /// Sends a GET to the HTTP API and returns the `data` of a successful response.
    async fn api(&self, url: &str) -> Result<Value> {
        let reply = get(url).await.with_context(|| format!("GET {url} failed; Prometheus log:\n{}", self.log()))?;
        let body: Value = serde_json::from_slice(&reply.body)
            .with_context(|| format!("GET {url} returned {} with a body that is not JSON: {}", reply.status, String::from_utf8_lossy(&reply.body)))?;
        if body["status"] != "success" {
            bail!("Prometheus returned {} {}: {}", reply.status, body["errorType"].as_str().unwrap_or("without an error type"), body["error"].as_str().unwrap_or("without an error text"));
        }
        Ok(body["data"].clone())
    }
}

/// Runs `promtool check metrics` on the exposition `text` and returns its output. Any non-zero
/// exit or any output on standard error is a problem: promtool 2.42 prints lint problems there and
/// exits with 3, or with 1 when the text does not parse.
pub fn promtool_check_metrics(text: &str) -> Result<String, PromtoolError> {
    let binary = find_program("promtool").ok_or(PromtoolError::NotFound)?;
    let mut child = Command::new(binary)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(PromtoolError::Run)?;

    // promtool reads all input before it writes, but a thread keeps a large text from blocking
    // on a full pipe either way. It may also exit early on a parse error, closing its input.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = text.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().map_err(PromtoolError::Run)?;
    match writer.join() {
        Ok(Ok(())) => {}
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::BrokenPipe => {}
        Ok(Err(error)) => return Err(PromtoolError::Run(error)),
        Err(_) => return Err(PromtoolError::Run(std::io::Error::other("the thread writing promtool's input panicked"))),
    }

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let combined = format!("{stdout}{stderr}");
    if !output.status.success() || !stderr.trim().is_empty() {
        return Err(PromtoolError::Problems { status: output.status, output: combined });
    }
    Ok(combined)
}

/// Why `promtool check metrics` did not pass a text.
#[derive(Debug, thiserror::Error)]
pub enum PromtoolError {
    #[error("promtool not found on PATH; run scripts/setup.sh, which installs the Debian package prometheus")]
    NotFound,
    #[error("running promtool check metrics failed: {0}")]
    Run(#[source] std::io::Error),
    #[error("promtool check metrics reported problems ({status}):\n{output}")]
    Problems { status: ExitStatus, output: String },
}

/// Returns the configuration: one job of static targets, with the scrape timeout equal to the
/// interval, because Prometheus rejects a timeout longer than the interval.
fn render_config(targets: &BTreeSet<SocketAddr>, scrape_interval: Duration) -> String {
    let interval = format!("{}ms", scrape_interval.as_millis());
    let targets: Vec<String> = targets.iter().map(|target| format!("'{target}'")).collect();
    format!(
        "# Written by the kvsidecar test harness.\n\
         global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  evaluation_interval: {interval}\n\
         scrape_configs:\n  - job_name: {JOB}\n    metrics_path: /metrics\n    scheme: http\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    )
}

/// Starts Prometheus on `127.0.0.1:port` under `setpriv --pdeathsig KILL`, so the kernel kills
/// it when the thread that started it exits, even when the test process dies without unwinding.
///
/// NOTE: the signal follows the spawning thread, not the process. A `Prometheus` started on a
/// thread that exits before the value is dropped (a `spawn_blocking` task, say) stops early.
fn spawn(binary: &Path, dir: &Path, config: &Path, port: u16) -> Result<Process> {
    let mut command = Command::new("setpriv");
    command
        .args(["--pdeathsig", "KILL", "--"])
        .arg(binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    Process::spawn(&mut command, dir.join(format!("prometheus-{port}.log"))).context("start prometheus under setpriv (util-linux)")
}

async fn wait_ready(process: &mut Process, url: &str) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if get(&format!("{url}/-/ready")).await.is_ok_and(|reply| reply.status == 200) {
            return Ok(());
        }
        if !process.running() {
            bail!("prometheus exited before it was ready; log:\n{}", read_log(process));
        }
        if Instant::now() >= deadline {
            bail!("prometheus was not ready at {url}/-/ready within {READY_TIMEOUT:?}; log:\n{}", read_log(process));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_log(process: &Process) -> String {
    std::fs::read_to_string(&process.log).unwrap_or_default()
}

/// Returns the first executable file named `name` in a folder of `PATH`.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|folder| folder.join(name)).find(|candidate| candidate.is_file())
}

fn parse_samples(data: &Value) -> Result<Vec<Sample>> {
    let result = &data["result"];
    match data["resultType"].as_str() {
        Some("vector") => {
            let series = result.as_array().ok_or_else(|| anyhow!("vector result is not an array: {result}"))?;
            series
                .iter()
                .map(|entry| {
                    let labels = entry["metric"]
                        .as_object()
                        .map(|labels| labels.iter().map(|(name, value)| (name.clone(), value.as_str().unwrap_or_default().to_string())).collect())
                        .unwrap_or_default();
                    Ok(Sample { labels, value: parse_value(&entry["value"])? })
                })
                .collect()
        }
        Some("scalar") => Ok(vec![Sample { labels: BTreeMap::new(), value: parse_value(result)? }]),
        other => bail!("result type {other:?} is not supported; use an instant vector or a scalar expression"),
    }
}

/// Parses a `[timestamp, "value"]` pair. Prometheus writes the value as a string so that `NaN`
/// and `+Inf` survive JSON, and Rust's `f64` parser reads those spellings too.
fn parse_value(pair: &Value) -> Result<f64> {
    let text = pair[1].as_str().ok_or_else(|| anyhow!("sample {pair} has no string value"))?;
    text.parse().with_context(|| format!("sample value {text:?} is not a number"))
}

fn parse_target(entry: &Value) -> Target {
    let health = match entry["health"].as_str() {
        Some("up") => TargetHealth::Up,
        Some("down") => TargetHealth::Down,
        _ => TargetHealth::Unknown,
    };
    let labels = entry["labels"]
        .as_object()
        .map(|labels| labels.iter().map(|(name, value)| (name.clone(), value.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default();
    Target {
        scrape_url: entry["scrapeUrl"].as_str().unwrap_or_default().to_string(),
        health,
        last_error: entry["lastError"].as_str().unwrap_or_default().to_string(),
        labels,
    }
}

fn describe(targets: &[Target]) -> String {
    if targets.is_empty() {
        return "no scrape targets".to_string();
    }
    let lines: Vec<String> = targets
        .iter()
        .map(|target| {
            let error = if target.last_error.is_empty() { String::new() } else { format!(" ({})", target.last_error) };
            format!("{} is {:?}{error}", target.scrape_url, target.health)
        })
        .collect();
    format!("targets: {}", lines.join("; "))
}
