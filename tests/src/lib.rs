//! Test harness of the end-to-end tests: starts real `llama-server` and `kvsidecar` processes on
//! loopback ports, and talks HTTP to them.
//!
//! The engine binary and the models come from `scripts/setup.sh`, found through the variables it
//! prints (`KVSIDECAR_LLAMA_SERVER`, `KVSIDECAR_TINY_MODEL`, ...) or in its default cache folder.
//!
//! [`otlp`] receives the sidecar's OpenTelemetry exports, and [`prometheus`] scrapes its
//! `/metrics` with a real Prometheus.

pub mod otlp;
pub mod prometheus;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Locations of the engine, the models and the Python environment.
pub struct Paths {
    pub llama_server: PathBuf,
    pub tiny_model: PathBuf,
    pub demo_model: PathBuf,
    pub python: PathBuf,
}

/// Returns the paths set up by `scripts/setup.sh`, failing with a hint when they are missing.
pub fn paths() -> Paths {
    let cache = std::env::var_os("KVSIDECAR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/kvsidecar"));
    let pick = |variable: &str, default: PathBuf| std::env::var_os(variable).map(PathBuf::from).unwrap_or(default);
    let paths = Paths {
        llama_server: pick("KVSIDECAR_LLAMA_SERVER", cache.join("engine/bin/llama-server")),
        tiny_model: pick("KVSIDECAR_TINY_MODEL", cache.join("models/tiny.gguf")),
        demo_model: pick("KVSIDECAR_DEMO_MODEL", cache.join("models/demo.gguf")),
        python: pick("KVSIDECAR_PYTHON", cache.join("venv/bin/python")),
    };
    for path in [&paths.llama_server, &paths.tiny_model] {
        assert!(path.exists(), "{} not found; run scripts/setup.sh first", path.display());
    }
    paths
}

/// Writes a model of the tiny model's shape (4 layers, width 256, 2 KV heads) with the random
/// weights of `seed` to `output`, using the project's generator, so that a test can run an engine
/// whose metadata matches the tiny model's but whose weights differ.
pub fn generate_tiny_model(output: &Path, name: &str, seed: u64) {
    let generator = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make_model.py");
    let status = Command::new(paths().python)
        .arg(&generator)
        .args(["--layers", "4", "--width", "256", "--kv-heads", "2", "--name", name, "--seed", &seed.to_string(), "--output"])
        .arg(output)
        .status()
        .expect("run scripts/make_model.py");
    assert!(status.success(), "scripts/make_model.py failed for {}", output.display());
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// Returns `N` distinct TCP ports on 127.0.0.1 that were free a moment ago. The listeners are
/// held until all ports are chosen, so the system cannot hand out the same port twice in one
/// call. Ports handed out before in this process are skipped too: a test often picks a peer's
/// port before starting another sidecar, whose own ports would otherwise be free to collide.
pub fn free_ports<const N: usize>() -> [u16; N] {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut listeners = Vec::with_capacity(N);
    // Ports handed out before stay bound until the end, so the system returns other ones.
    let mut skipped = Vec::new();
    while listeners.len() < N {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = listener.local_addr().expect("local address").port();
        if handed_out.contains(&port) {
            skipped.push(listener);
        } else {
            handed_out.push(port);
            listeners.push(listener);
        }
    }
    std::array::from_fn(|i| listeners[i].local_addr().expect("local address").port())
}

/// Returns the `kvsidecar` binary of the same build profile as the running executable: beside it
/// (a benchmark binary in `target/release`) or one folder up (a test in `target/debug/deps`).
pub fn sidecar_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let beside = exe.parent().expect("executable folder");
    let candidates = [beside.join("kvsidecar"), beside.parent().unwrap_or(beside).join("kvsidecar")];
    let found = candidates.iter().find(|candidate| candidate.is_file());
    found.cloned().unwrap_or_else(|| panic!("{} not found; build the workspace first (cargo build --workspace)", candidates[1].display()))
}

/// The shipped policy plugins.
pub const SHIPPED_PLUGINS: [&str; 5] = ["prefix-affinity", "least-loaded", "lru", "cost-aware", "min-tokens"];

/// The test plugins of `tests/plugins` built for wasm32-unknown-unknown.
pub const TEST_PLUGINS: [&str; 4] = ["pick-first", "pick-second", "faulty-router", "faulty-evictor"];

/// Builds plugin crates of this workspace into components in `out`, once per process.
fn build_plugins(target: &str, names: &[&str], out: &Path) {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut args = vec!["--manifest-path".to_string(), manifest.display().to_string(), "--quiet".to_string()];
    for name in names {
        args.extend(["-p".to_string(), name.to_string()]);
    }
    kvsidecar::plugin::tool::build(target, &args, out).unwrap_or_else(|error| panic!("building plugins {names:?} failed: {error:#}"));
}

/// Builds the shipped plugins from source into the folder `plugins` beside the kvsidecar
/// binary, the default `plugins.dir`, and returns that folder.
pub fn shipped_plugins() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = sidecar_binary().parent().expect("binary folder").join("plugins");
            build_plugins(kvsidecar::plugin::tool::TARGET, &SHIPPED_PLUGINS, &dir);
            dir
        })
        .clone()
}

/// Builds the test plugins from source and returns their folder. `wasi-router.wasm` there is
/// built for wasm32-wasip2 and imports WASI.
pub fn test_plugins() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = sidecar_binary().parent().expect("binary folder").join("test-plugins");
            build_plugins(kvsidecar::plugin::tool::TARGET, &TEST_PLUGINS, &dir);
            build_plugins("wasm32-wasip2", &["wasi-router"], &dir);
            dir
        })
        .clone()
}

/// Returns `count` deterministic token ids for `seed`, drawn from ordinary text pieces of the
/// generated vocabulary (ids 261 and up, past the control and byte tokens).
pub fn tokens(seed: u64, count: usize) -> Vec<u32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            261 + ((state >> 33) % 300) as u32
        })
        .collect()
}

/// A child process that is killed when dropped, with its output in a log file.
pub struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `command` with its standard output and error in the file `log`.
    pub fn spawn(command: &mut Command, log: PathBuf) -> Result<Process> {
        let file = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("start {:?}", command.get_program()))?;
        Ok(Process { child, log })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let status = self.wait(within);
        if status.is_none() {
            self.kill();
        }
        status
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `within` for the process to exit by itself.
    fn wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Process {
    /// Returns what the process has written to its log so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How to start a `llama-server`.
#[derive(Clone)]
pub struct EngineSpec {
    pub model: PathBuf,
    pub slots: u32,
    /// Total context in tokens, split across slots.
    pub context: u32,
    pub slot_dir: PathBuf,
    pub extra: Vec<String>,
}

/// A running `llama-server` on a loopback port.
pub struct Engine {
    process: Process,
    pub port: u16,
    pub url: String,
}

impl Engine {
    /// Starts the engine on a free port and waits until `/health` returns 200.
    pub async fn start(spec: &EngineSpec, logs: &Path) -> Result<Engine> {
        Self::start_on(spec, logs, free_port()).await
    }

    /// Starts the engine on `port`, as a restarted engine would come back.
    pub async fn start_on(spec: &EngineSpec, logs: &Path, port: u16) -> Result<Engine> {
        let paths = paths();
        std::fs::create_dir_all(&spec.slot_dir)?;
        let mut command = Command::new(&paths.llama_server);
        command
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("-m")
            .arg(&spec.model)
            .args(["-c", &spec.context.to_string(), "-np", &spec.slots.to_string(), "-t", "2", "--cache-ram", "0"])
            .arg("--slot-save-path")
            .arg(&spec.slot_dir)
            .args(&spec.extra);
        let log = logs.join(format!("llama-server-{port}-{}.log", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()));
        let process = Process::spawn(&mut command, log)?;
        let mut engine = Engine { process, port, url: format!("http://127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if get(&format!("{}/health", engine.url)).await.is_ok_and(|reply| reply.status == 200) {
                return Ok(engine);
            }
            if !engine.process.running() || Instant::now() > deadline {
                bail!("llama-server did not become healthy; log:\n{}", engine.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.process.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }
}

/// How to start a sidecar.
#[derive(Clone)]
pub struct SidecarSpec {
    pub engine_url: String,
    pub data_dir: PathBuf,
    pub slot_dir: PathBuf,
    /// Extra `KVSIDECAR_*` variables.
    pub env: Vec<(String, String)>,
}

/// A running `kvsidecar serve` on loopback ports.
pub struct Sidecar {
    process: Process,
    pub url: String,
    pub admin_url: String,
}

impl Sidecar {
    /// Starts the sidecar and waits until `/readyz` returns 200.
    pub async fn start(spec: &SidecarSpec, logs: &Path) -> Result<Sidecar> {
        let mut sidecar = Self::spawn(spec, logs)?;
        sidecar.wait_ready(Duration::from_secs(60)).await?;
        Ok(sidecar)
    }

    /// Starts the sidecar without waiting for it to be ready.
    pub fn spawn(spec: &SidecarSpec, logs: &Path) -> Result<Sidecar> {
        // The default configuration runs the shipped plugins from the binary's plugins folder.
        shipped_plugins();
        let [port, admin_port] = free_ports::<2>();
        let mut command = Command::new(sidecar_binary());
        command
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}"), "--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(["--engine", &spec.engine_url])
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .arg("--slot-dir")
            .arg(&spec.slot_dir)
            .env("KVSIDECAR_LOG_LEVEL", "kvsidecar=debug,info")
            .env("KVSIDECAR_ENGINE_PROBE_INTERVAL", "200ms")
            // Compiled plugins are keyed by their SHA-256, so tests share one cache.
            .env("KVSIDECAR_PLUGINS_CACHE_DIR", sidecar_binary().parent().expect("binary folder").join("plugin-cache"))
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let log = logs.join(format!("kvsidecar-{port}.log"));
        let process = Process::spawn(&mut command, log)?;
        Ok(Sidecar { process, url: format!("http://127.0.0.1:{port}"), admin_url: format!("http://127.0.0.1:{admin_port}") })
    }

    pub async fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if get(&format!("{}/readyz", self.url)).await.is_ok_and(|reply| reply.status == 200) {
                return Ok(());
            }
            if !self.process.running() || Instant::now() > deadline {
                bail!("kvsidecar did not become ready; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.process.log).unwrap_or_default()
    }

    /// Returns `/admin/stats`.
    pub async fn stats(&self) -> Value {
        get(&format!("{}/admin/stats", self.admin_url)).await.expect("admin stats").json()
    }

    /// Waits until `/admin/stats` satisfies `done`, returning the last stats seen.
    pub async fn wait_stats(&self, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let stats = self.stats().await;
            if done(&stats) || Instant::now() > deadline {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the sidecar with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Stops the sidecar with SIGTERM and returns its exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.process.terminate(Duration::from_secs(15))
    }

    /// Waits up to `within` for the sidecar to exit by itself, as it does on a start-up error.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.process.wait(within)
    }
}

/// An HTTP response with its body read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| panic!("body is not JSON ({error}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// Returns `x-kvsidecar-cached-tokens` as a number.
    pub fn cached_tokens(&self) -> u32 {
        self.header("x-kvsidecar-cached-tokens").and_then(|value| value.parse().ok()).expect("x-kvsidecar-cached-tokens header")
    }

    pub fn cache_source(&self) -> &str {
        self.header("x-kvsidecar-cache-source").expect("x-kvsidecar-cache-source header")
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request and reads the whole response.
pub async fn send(method: http::Method, url: &str, body: Bytes, headers: &[(&str, &str)]) -> Result<Reply> {
    let mut builder = http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = client().request(builder.body(Full::new(body))?).await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Reply { status, headers, body })
}

pub async fn get(url: &str) -> Result<Reply> {
    send(http::Method::GET, url, Bytes::new(), &[]).await
}

pub async fn post_json(url: &str, body: &Value) -> Result<Reply> {
    send(http::Method::POST, url, Bytes::from(body.to_string()), &[("content-type", "application/json")]).await
}

/// A temporary folder for one test's data, slot files and logs. Logs are printed when a test
/// fails, so keep the value alive for the whole test.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Workspace {
        Workspace { dir: tempfile::Builder::new().prefix("kvsidecar-e2e-").tempdir().expect("temporary folder") }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(&path).expect("create folder");
        path
    }

    pub fn logs(&self) -> PathBuf {
        self.path("logs")
    }

    /// Returns an engine spec for the tiny model with `slots` slots, sharing `slots/` with the sidecar.
    pub fn tiny_engine(&self, slots: u32) -> EngineSpec {
        EngineSpec { model: paths().tiny_model, slots, context: 4096 * slots, slot_dir: self.path("slots"), extra: Vec::new() }
    }

    pub fn sidecar(&self, engine: &Engine) -> SidecarSpec {
        SidecarSpec {
            engine_url: engine.url.clone(),
            data_dir: self.path("data"),
            slot_dir: self.path("slots"),
            env: vec![("KVSIDECAR_SNAPSHOT_MIN_TOKENS".into(), "128".into())],
        }
    }
}

/// The bearer token the sidecars of a test fleet share.
pub const FLEET_TOKEN: &str = "fleet-token-for-tests-0123456789";

/// Returns a sidecar spec of `ws` under `name` in front of `engine`, serving its peer API on
/// `port` and following the peer APIs on `peers`, all on loopback, with fast health checks.
pub fn fleet_member(ws: &Workspace, engine: &Engine, name: &str, port: u16, peers: &[u16]) -> SidecarSpec {
    let urls: Vec<String> = peers.iter().map(|peer| format!("http://127.0.0.1:{peer}")).collect();
    let mut spec = ws.sidecar(engine);
    spec.data_dir = ws.path(&format!("{name}-data"));
    spec.env.extend([
        ("KVSIDECAR_PEERS_LISTEN".to_string(), format!("127.0.0.1:{port}")),
        ("KVSIDECAR_PEERS_URLS".to_string(), urls.join(",")),
        ("KVSIDECAR_PEER_TOKEN".to_string(), FLEET_TOKEN.to_string()),
        ("KVSIDECAR_PEERS_HEALTH_INTERVAL".to_string(), "200ms".to_string()),
        ("KVSIDECAR_PEERS_DEAD_AFTER".to_string(), "1s".to_string()),
    ]);
    spec
}

impl Default for Workspace {
    fn default() -> Self {
        Self::new()
    }
}

/// Damage a `FaultProxy` does to the response of a snapshot request.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Forwards this many bytes of the response, then holds the rest back.
    StallAfter(usize),
    /// Inverts the byte at this offset of the response.
    FlipAt(usize),
}

/// A TCP proxy on loopback in front of a peer API that damages the responses to snapshot requests
/// (`GET /peer/v1/snapshot`) and passes everything else unchanged. It stands for a network or a
/// peer that fails mid-transfer, which the real parts cannot do on demand.
pub struct FaultProxy {
    pub port: u16,
    /// Set once a snapshot response was damaged or held back.
    pub triggered: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: u16, fault: Fault) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let triggered = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = triggered.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let flag = flag.clone();
                tokio::spawn(async move {
                    if let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await {
                        proxy_connection(client, server, fault, flag).await;
                    }
                });
            }
        });
        FaultProxy { port, triggered, task }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy_connection(client: tokio::net::TcpStream, server: tokio::net::TcpStream, fault: Fault, triggered: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Set by the request direction when a snapshot request passes. HTTP/1.1 without pipelining
    // sends a request only after the previous response, so every later response byte is its.
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let arm = armed.clone();
    let requests = tokio::spawn(async move {
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            let n = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if String::from_utf8_lossy(&buffer[..n]).contains("GET /peer/v1/snapshot") {
                arm.store(true, Ordering::SeqCst);
            }
            if server_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    });
    let mut buffer = vec![0u8; 64 << 10];
    let mut answered = 0usize;
    loop {
        let n = match server_read.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = &mut buffer[..n];
        if armed.load(Ordering::SeqCst) {
            match fault {
                Fault::StallAfter(limit) => {
                    let room = limit.saturating_sub(answered);
                    if chunk.len() > room {
                        triggered.store(true, Ordering::SeqCst);
                        chunk = &mut chunk[..room];
                    }
                }
                Fault::FlipAt(offset) => {
                    if (answered..answered + chunk.len()).contains(&offset) {
                        chunk[offset - answered] ^= 0xff;
                        triggered.store(true, Ordering::SeqCst);
                    }
                }
            }
            answered += n;
        }
        if !chunk.is_empty() && client_write.write_all(chunk).await.is_err() {
            break;
        }
    }
    // The upstream closed (or the peer died): so does the connection to the client.
    let _ = client_write.shutdown().await;
    requests.abort();
}
