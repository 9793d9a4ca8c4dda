//! Typed configuration of `kvsidecar serve`: its sections, defaults and validation rules.
//!
//! Values come, in rising precedence, from the built-in defaults, a TOML file, environment
//! variables named `KVSIDECAR_<SECTION>_<KEY>`, and command-line flags. `load` reads all of them and
//! reports every invalid key at once.

mod ledger;
mod load;
mod render;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

pub use load::{ConfigError, ConfigIssue, Overrides, load, plugin_table};
pub use bytesize::ByteSize;
pub use ledger::{LedgerConfig, Micros, Price};

/// The whole configuration, one field per TOML section.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub engine: EngineConfig,
    pub request: RequestConfig,
    pub prefix: PrefixConfig,
    pub store: StoreConfig,
    pub snapshot: SnapshotConfig,
    pub log: LogConfig,
    pub plugins: PluginsConfig,
    pub peers: PeersConfig,
    pub telemetry: TelemetryConfig,
    pub ledger: LedgerConfig,
}

/// Traces and metrics: the OTLP exporter and the Prometheus endpoint.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// OTLP collector address, such as `http://127.0.0.1:4317` for gRPC or `http://127.0.0.1:4318`
    /// for HTTP; None exports nothing (trace ids still reach the logs).
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    /// Maximum wait for the collector to accept one export.
    pub otlp_timeout: Duration,
    /// Extra headers sent with every export, as `name=value`.
    pub otlp_headers: Vec<String>,
    /// `service.name` of this sidecar's traces and metrics.
    pub service_name: String,
    /// Exports spans when an endpoint is set.
    pub traces: bool,
    /// Share of new traces recorded, 0 to 1. A request with a `traceparent` follows its parent's
    /// sampled flag instead.
    pub sampling_ratio: f64,
    /// Finished spans waiting for export; more are dropped and counted.
    pub span_queue: u32,
    /// Exports metrics when an endpoint is set.
    pub metrics: bool,
    /// Time between two metric exports.
    pub metrics_interval: Duration,
    /// Serves `/metrics` in the Prometheus text format on the admin listener.
    pub prometheus: bool,
}

/// Wire protocol of the OTLP exporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    /// OTLP over gRPC, by default on port 4317.
    Grpc,
    /// OTLP over HTTP with protobuf bodies, by default on port 4318.
    Http,
}

impl OtlpProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::Http => "http",
        }
    }
}

/// Other sidecars of the fleet, and this sidecar's peer API.
#[derive(Debug, Clone)]
pub struct PeersConfig {
    /// Address of the peer API; None turns it off.
    pub listen: Option<SocketAddr>,
    /// Base URLs of the peers' APIs, such as `http://10.0.0.7:9100`.
    pub urls: Vec<String>,
    /// A `host:port` whose addresses are the peers' APIs, resolved again every `dns_interval`
    /// (a Kubernetes headless service, for example).
    pub dns: Option<String>,
    pub dns_interval: Duration,
    /// File holding the bearer token that peers present to each other.
    pub token_file: Option<PathBuf>,
    /// Time between two health checks of each peer.
    pub health_interval: Duration,
    /// A peer without a successful health check for this long is dead and leaves routing.
    pub dead_after: Duration,
    /// Index changes kept for peers to read; a peer further behind reads the whole index.
    pub journal_entries: u32,
    /// Block hashes kept per peer in the fleet index.
    pub index_blocks: u32,
    /// Encoding of snapshots sent to peers.
    pub compression: Compression,
    /// zstd level of snapshots sent to peers, 1 (fastest) to 19.
    pub zstd_level: u32,
    /// Maximum duration of a snapshot pull from a peer; a slower one is a miss.
    pub transfer_timeout: Duration,
    /// Maximum wait for a peer's response head to a forwarded request; a slower one is served here.
    pub forward_timeout: Duration,
    /// Mutual TLS: this sidecar's certificate chain and key (PEM), and the CA (PEM) that signed
    /// every sidecar's certificate. All three or none; with them, peer URLs are https://.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub tls_ca_file: Option<PathBuf>,
    /// Name that peers' certificates are checked against, instead of the host of each peer URL.
    pub tls_server_name: Option<String>,
}

/// Encoding of snapshot transfers between peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Zstd,
}

impl Compression {
    /// Returns the name used in the `content-encoding` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "identity",
            Compression::Zstd => "zstd",
        }
    }
}

impl PeersConfig {
    /// Returns the scheme of peer URLs: https with mutual TLS, http without.
    pub fn scheme(&self) -> &'static str {
        if self.tls_cert_file.is_some() { "https" } else { "http" }
    }

    /// Returns whether this sidecar is part of a fleet.
    pub fn enabled(&self) -> bool {
        self.listen.is_some() || !self.urls.is_empty() || self.dns.is_some()
    }
}

/// Listeners and limits of the client-facing HTTP server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address of the client API (OpenAI-compatible and pass-through).
    pub listen: SocketAddr,
    /// Address of the admin API; loopback unless the operator chooses otherwise.
    pub admin_listen: SocketAddr,
    /// Largest request body accepted; larger bodies get 413.
    pub max_body: ByteSize,
    /// Time given to in-flight requests to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Time a client has to send a request's headers, also while its connection waits idle for
    /// the next request; past it the connection is closed.
    pub header_timeout: Duration,
    /// Time a client has to send a request body; past it the request gets 408.
    pub body_timeout: Duration,
}

/// KV-cache storage type the engine was started with (`-ctk` / `-ctv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Iq4Nl,
    Q5_0,
    Q5_1,
}

/// The engine's flash-attention setting (`-fa on|off|auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlashAttention {
    On,
    Off,
    Auto,
}

/// The inference engine beside the sidecar and the KV settings it was started with.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Base URL of the engine's HTTP server (`http://host:port`).
    pub url: http::Uri,
    /// Folder the engine reads and writes slot files in (llama-server's `--slot-save-path`).
    pub slot_dir: PathBuf,
    /// Time allowed to open a TCP connection to the engine.
    pub connect_timeout: Duration,
    /// Time allowed from sending a request to receiving the engine's response headers.
    pub response_timeout: Duration,
    /// Interval of the engine health probe that detects restarts.
    pub probe_interval: Duration,
    /// Declared K cache type (`-ctk`).
    pub cache_type_k: KvCacheType,
    /// Declared V cache type (`-ctv`).
    pub cache_type_v: KvCacheType,
    /// Declared flash-attention setting (`-fa`).
    pub flash_attention: FlashAttention,
    /// Declared unified KV buffer for all slots (`-kvu`).
    pub unified_kv: bool,
    /// Extra model names accepted in requests besides the engine's own model id.
    pub model_aliases: Vec<String>,
}

/// Attribution of requests to tenants.
#[derive(Debug, Clone)]
pub struct RequestConfig {
    /// Header that carries the tenant id.
    pub tenant_header: http::HeaderName,
    /// Tenant of requests without the header.
    pub default_tenant: String,
    /// Namespaces whose cached prefixes every tenant shares. A request joins one with the
    /// `x-kvsidecar-namespace` header; without it, each tenant's cache is its own.
    pub shared_namespaces: Vec<String>,
}

/// Prefix hashing.
#[derive(Debug, Clone)]
pub struct PrefixConfig {
    /// Tokens per hashed block.
    pub block_tokens: NonZeroU32,
}

/// The local snapshot store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Folder of the RocksDB database.
    pub data_dir: PathBuf,
    /// Maximum total size of stored snapshot files; the least recently used are evicted above it.
    pub capacity: ByteSize,
    /// Size of the chunks a snapshot file is stored in.
    pub chunk_size: ByteSize,
    /// Largest single snapshot accepted; larger slot files are not stored.
    pub max_snapshot: ByteSize,
    /// Fraction of the capacity above which an insert makes room, and the fraction it evicts
    /// down to.
    pub high_watermark: f64,
    pub low_watermark: f64,
}

/// When snapshots are taken and restored.
#[derive(Debug, Clone)]
pub struct SnapshotConfig {
    /// Shortest prompt, in tokens, whose slot is saved after the response.
    pub min_tokens: u32,
    /// Tokens a stored snapshot must add over the best slot's prefix before it is restored.
    pub restore_min_gain: u32,
}

/// Action taken when a plugin call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The built-in policy decides instead.
    Fallback,
    /// The request gets 503; for eviction and admission, the snapshot is not stored.
    Reject,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Fallback => "fallback",
            OnFailure::Reject => "reject",
        }
    }
}

/// One policy plugin: its component file and its own configuration.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// Component file, relative to `plugins.dir` unless absolute; None runs the built-in policy.
    pub file: Option<PathBuf>,
    pub on_failure: OnFailure,
    /// The plugin's `config` table, passed to it as TOML text at load time.
    pub config: toml::Table,
}

impl PluginConfig {
    /// Returns the component file with `dir` applied to a relative path.
    pub fn path(&self, dir: &std::path::Path) -> Option<PathBuf> {
        self.file.as_ref().map(|file| if file.is_absolute() { file.clone() } else { dir.join(file) })
    }
}

/// The WebAssembly plugin host and the routing, eviction and admission plugins.
#[derive(Debug, Clone)]
pub struct PluginsConfig {
    /// Folder that relative plugin files are found in.
    pub dir: PathBuf,
    /// Folder of compiled plugin artifacts.
    pub cache_dir: PathBuf,
    /// Maximum time a single plugin call may run.
    pub deadline: Duration,
    /// Largest memory a plugin instance may grow to, all its memories and tables together.
    pub memory_limit: ByteSize,
    /// Calls of one plugin that may run at once; a call waits up to `deadline` for a turn, then
    /// the built-in policy decides it.
    pub max_concurrent_calls: u32,
    /// Reloads a plugin when its file changes.
    pub watch: bool,
    /// Shortest time between two warnings about failures of one plugin.
    pub warn_interval: Duration,
    pub router: PluginConfig,
    pub evictor: PluginConfig,
    pub admission: PluginConfig,
}

/// Output format of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Human,
    Json,
}

/// Logging.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `tracing` filter directive, as in `RUST_LOG` (`info`, `kvsidecar=debug`, ...).
    pub level: String,
    pub format: LogFormat,
    /// Allows prompt text and token ids in debug logs. Off by default because prompts hold user data.
    pub log_prompts: bool,
}

impl Config {
    /// Returns the configuration that `kvsidecar serve` uses when nothing is set.
    pub fn defaults() -> Config {
        load::defaults()
    }
}
