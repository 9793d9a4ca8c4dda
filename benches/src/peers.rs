//! The systems kvsidecar is compared with, run as processes on loopback: nginx serving a canned
//! completion, SGLang's router and vLLM's router. `scripts/setup.sh --bench` installs them:
//! Debian's nginx and wrk, and the routers from PyPI into a virtual environment in the cache
//! folder. A missing tool is reported, and its comparison is skipped.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kvsidecar_tests::Process;

/// A process started for a benchmark, killed when dropped.
pub struct Service {
    name: String,
    process: Process,
}

impl Service {
    /// Starts `command` with its output in `logs/NAME.log`.
    pub fn spawn(name: &str, command: &mut Command, logs: &Path) -> Result<Service> {
        let process = Process::spawn(command, logs.join(format!("{name}.log"))).with_context(|| format!("start {name}"))?;
        Ok(Service { name: name.to_string(), process })
    }

    /// Waits until `GET url` returns 200, failing with the service's log when it exits or
    /// `within` passes first.
    pub async fn wait_ok(&mut self, url: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if kvsidecar_tests::get(url).await.is_ok_and(|reply| reply.status == 200) {
                return Ok(());
            }
            if !self.process.running() {
                bail!("{} exited before {url} returned 200; log:\n{}", self.name, self.process.output());
            }
            if Instant::now() > deadline {
                bail!("{} did not return 200 on {url} within {within:?}; log:\n{}", self.name, self.process.output());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A comparison tool: its path, or why it cannot be used.
pub type Tool = std::result::Result<PathBuf, String>;

/// Returns the tool named by environment variable `variable`, or else at `default`, or the reason
/// it is missing.
pub fn tool(variable: &str, default: PathBuf, install_hint: &str) -> Tool {
    let path = std::env::var_os(variable).map(PathBuf::from).unwrap_or(default);
    if path.is_file() { Ok(path) } else { Err(format!("{} not found ({install_hint}; or set {variable})", path.display())) }
}

fn cache_folder() -> PathBuf {
    std::env::var_os("KVSIDECAR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/kvsidecar"))
}

pub fn nginx() -> Tool {
    tool("KVSIDECAR_NGINX", PathBuf::from("/usr/sbin/nginx"), "scripts/bench.sh installs Debian's nginx-light")
}

pub fn wrk() -> Tool {
    tool("KVSIDECAR_WRK", PathBuf::from("/usr/bin/wrk"), "scripts/bench.sh installs Debian's wrk")
}

pub fn sglang_router() -> Tool {
    tool("KVSIDECAR_SGLANG_ROUTER", cache_folder().join("routers/bin/sglang-router"), "scripts/bench.sh installs sglang-router from PyPI")
}

pub fn vllm_router() -> Tool {
    tool("KVSIDECAR_VLLM_ROUTER", cache_folder().join("routers/bin/vllm-router"), "scripts/bench.sh installs vllm-router from PyPI")
}

/// Starts nginx on 127.0.0.1:`port`. `POST /v1/completions` returns `canned` (a streamed
/// completion) without reading further. Every other path is proxied to `engine_port`. A sidecar
/// in front of it probes and tokenizes with a real engine, and its completions cost the upstream
/// nothing.
pub async fn canned_nginx(binary: &Path, port: u16, engine_port: u16, canned: &str, dir: &Path) -> Result<Service> {
    if canned.contains('$') {
        bail!("the canned completion contains '$', which nginx would read as a variable");
    }
    let quoted = canned.replace('\\', "\\\\").replace('"', "\\\"");
    let dir_text = dir.display();
    let mut config = String::new();
    // One process without a master, so that killing the child stops nginx entirely. A process
    // that starts as root switches to an unprivileged user, and that user cannot enter the
    // temporary folders of this process, so it keeps root.
    // SAFETY: geteuid takes no arguments and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        config.push_str("user root;\n");
    }
    write!(
        config,
        r#"master_process off;
daemon off;
pid {dir_text}/nginx.pid;
error_log {dir_text}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 600s;
  client_body_temp_path {dir_text}/client-body;
  proxy_temp_path {dir_text}/proxy;
  fastcgi_temp_path {dir_text}/fastcgi;
  uwsgi_temp_path {dir_text}/uwsgi;
  scgi_temp_path {dir_text}/scgi;
  upstream engine {{ server 127.0.0.1:{engine_port}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{port};
    location = /v1/completions {{
      default_type text/event-stream;
      return 200 "{quoted}";
    }}
    location / {{
      proxy_pass http://engine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 600s;
    }}
  }}
}}
"#
    )?;
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config).with_context(|| format!("write {}", path.display()))?;
    let mut service = Service::spawn("nginx", Command::new(binary).arg("-e").arg("stderr").arg("-p").arg(dir).arg("-c").arg(&path), dir)?;
    service.wait_ok(&format!("http://127.0.0.1:{port}/health"), Duration::from_secs(20)).await?;
    Ok(service)
}

/// Returns the flags that put a router's Prometheus listener on a free loopback port. Both routers
/// listen on the same fixed port otherwise, and the second one to start panics.
fn metrics_listener() -> [String; 4] {
    ["--prometheus-host".into(), "127.0.0.1".into(), "--prometheus-port".into(), kvsidecar_tests::free_port().to_string()]
}

/// Starts SGLang's router on 127.0.0.1:`port` over `workers` with its cache-aware policy.
pub async fn sglang(binary: &Path, port: u16, workers: &[String], logs: &Path) -> Result<Service> {
    let mut command = Command::new(binary);
    command
        .arg("launch")
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--policy", "cache_aware", "--log-level", "warn"])
        .args(metrics_listener())
        .arg("--worker-urls")
        .args(workers);
    let mut service = Service::spawn("sglang-router", &mut command, logs)?;
    service.wait_ok(&format!("http://127.0.0.1:{port}/health"), Duration::from_secs(60)).await?;
    Ok(service)
}

/// Starts vLLM's router on 127.0.0.1:`port` over `workers` with its cache-aware policy.
pub async fn vllm(binary: &Path, port: u16, workers: &[String], logs: &Path) -> Result<Service> {
    let mut command = Command::new(binary);
    command
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--policy", "cache_aware", "--log-level", "warning"])
        .args(metrics_listener())
        .arg("--worker-urls")
        .args(workers);
    let mut service = Service::spawn("vllm-router", &mut command, logs)?;
    service.wait_ok(&format!("http://127.0.0.1:{port}/health"), Duration::from_secs(60)).await?;
    Ok(service)
}
