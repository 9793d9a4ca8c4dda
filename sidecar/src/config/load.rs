//! Reading the configuration from defaults, a TOML file, the environment and flags, and
//! validating it with every problem collected before failing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    ByteSize, Compression, Config, EngineConfig, FlashAttention, KvCacheType, LogConfig, LogFormat, OnFailure, OtlpProtocol, PeersConfig,
    PluginConfig, PluginsConfig, PrefixConfig, RequestConfig, ServerConfig, SnapshotConfig, StoreConfig, TelemetryConfig,
};

mod ledger;

/// Prefix of the environment variables that set configuration keys.
pub const ENV_PREFIX: &str = "KVSIDECAR_";

const SECTIONS: &[&str] = &["server", "engine", "request", "prefix", "store", "snapshot", "log", "plugins", "peers", "telemetry", "ledger"];

/// Tables inside a section whose keys are read one by one, as `plugins.router.file`.
const SUBSECTIONS: &[&str] = &["plugins.router", "plugins.evictor", "plugins.admission", "ledger.price"];

/// `KVSIDECAR_*` variables that are not configuration keys: the project's setup and test
/// scripts set them.
const SCRIPT_VARIABLES: &[&str] = &[
    "KVSIDECAR_CACHE",
    "KVSIDECAR_LLAMA_SERVER",
    "KVSIDECAR_TINY_MODEL",
    "KVSIDECAR_DEMO_MODEL",
    "KVSIDECAR_PYTHON",
    "KVSIDECAR_TRACE",
    // The peer token, read by `kvsidecar serve` itself rather than as a configuration key.
    "KVSIDECAR_PEER_TOKEN",
];

/// Values given on the command line, which take precedence over the file and the environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub engine: Option<String>,
    pub data_dir: Option<String>,
    pub slot_dir: Option<String>,
    pub peers: Option<String>,
    pub peer_listen: Option<String>,
    pub peer_token_file: Option<String>,
}

/// One invalid configuration value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key path, such as `store.capacity`.
    pub path: String,
    /// The value as given, or empty for an unknown or missing key.
    pub value: String,
    /// Source of the value: the file, an environment variable or a flag.
    pub origin: String,
    /// The rule the value breaks.
    pub rule: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {} ({}): {}", self.path, self.value, self.origin, self.rule)
    }
}

/// Failure to load the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid TOML in config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("invalid configuration, {} problem(s):\n{}", .0.len(), list_issues(.0))]
    Invalid(Vec<ConfigIssue>),
}

fn list_issues(issues: &[ConfigIssue]) -> String {
    issues.iter().map(|issue| format!("  - {issue}")).collect::<Vec<_>>().join("\n")
}

/// Loads the configuration: defaults, then the file named in `overrides` (if any), then
/// `KVSIDECAR_<SECTION>_<KEY>` variables from `environment`, then the flags in `overrides`.
pub fn load(
    overrides: &Overrides,
    environment: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mut sources = Sources::default();

    if let Some(path) = &overrides.config_file {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        let table: toml::Table = toml::from_str(&text)
            .map_err(|error| ConfigError::Syntax { path: path.clone(), message: error.to_string() })?;
        sources.add_file(path, table);
    }

    for (name, value) in environment {
        sources.add_environment(&name, value);
    }

    let flags = [
        ("server.listen", "--listen", &overrides.listen),
        ("server.admin_listen", "--admin-listen", &overrides.admin_listen),
        ("engine.url", "--engine", &overrides.engine),
        ("store.data_dir", "--data-dir", &overrides.data_dir),
        ("engine.slot_dir", "--slot-dir", &overrides.slot_dir),
        ("peers.urls", "--peers", &overrides.peers),
        ("peers.listen", "--peer-listen", &overrides.peer_listen),
        ("peers.token_file", "--peer-token-file", &overrides.peer_token_file),
    ];
    for (path, flag, value) in flags {
        if let Some(value) = value {
            sources.set(path, toml::Value::String(value.clone()), format!("flag {flag}"));
        }
    }

    let config = sources.read();
    if sources.issues.is_empty() { Ok(config) } else { Err(ConfigError::Invalid(sources.issues)) }
}

/// Returns the built-in defaults.
pub fn defaults() -> Config {
    let mut sources = Sources::default();
    let config = sources.read();
    debug_assert!(sources.issues.is_empty(), "built-in defaults are valid");
    config
}

/// The merged key values with their origins, and the issues found while reading them.
#[derive(Default)]
struct Sources {
    values: BTreeMap<String, (toml::Value, String)>,
    issues: Vec<ConfigIssue>,
}

impl Sources {
    fn set(&mut self, path: &str, value: toml::Value, origin: String) {
        self.values.insert(path.to_string(), (value, origin));
    }

    fn add_file(&mut self, file: &Path, table: toml::Table) {
        let origin = format!("file {}", file.display());
        for (section, content) in table {
            match content {
                toml::Value::Table(keys) => {
                    for (key, value) in keys {
                        let path = format!("{section}.{key}");
                        match value {
                            toml::Value::Table(inner) if SUBSECTIONS.contains(&path.as_str()) => {
                                for (key, value) in inner {
                                    self.set(&format!("{path}.{key}"), value, origin.clone());
                                }
                            }
                            value => self.set(&path, value, origin.clone()),
                        }
                    }
                }
                other => self.issues.push(ConfigIssue {
                    path: section,
                    value: other.to_string(),
                    origin: origin.clone(),
                    rule: format!("must be a [section] table, one of: {}", SECTIONS.join(", ")),
                }),
            }
        }
    }

    /// Takes `KVSIDECAR_STORE_CAPACITY=10GiB` as `store.capacity`. A `KVSIDECAR_*` variable that
    /// names no section is an error, except the variables of the project's scripts.
    fn add_environment(&mut self, name: &str, value: String) {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else { return };
        if SCRIPT_VARIABLES.contains(&name) {
            return;
        }
        let rest = rest.to_ascii_lowercase();
        let Some(section) = SECTIONS.iter().find(|section| {
            rest.strip_prefix(*section).is_some_and(|tail| tail.starts_with('_'))
        }) else {
            self.issues.push(ConfigIssue {
                path: name.to_string(),
                value: format!("{value:?}"),
                origin: format!("environment {name}"),
                rule: format!("unknown section; configuration variables are KVSIDECAR_<SECTION>_<KEY> with a section of {}", SECTIONS.join(", ")),
            });
            return;
        };
        let key = &rest[section.len() + 1..];
        let mut path = format!("{section}.{key}");
        // KVSIDECAR_PLUGINS_ROUTER_FILE names plugins.router.file.
        if let Some(subsection) = SUBSECTIONS.iter().find(|sub| path.strip_prefix(*sub).is_some_and(|tail| tail.starts_with('_'))) {
            path = format!("{subsection}.{}", &path[subsection.len() + 1..]);
        }
        self.set(&path, toml::Value::String(value), format!("environment {name}"));
    }

    /// Reads every known key with its default, collecting issues, and then reports unknown keys.
    fn read(&mut self) -> Config {
        let mut used = BTreeSet::new();
        let mut r = Reader { sources: self, used: &mut used };

        let server = ServerConfig {
            listen: r.get("server.listen", "0.0.0.0:8080".parse().expect("literal address")),
            admin_listen: r.get("server.admin_listen", "127.0.0.1:9090".parse().expect("literal address")),
            max_body: r.get("server.max_body", ByteSize::mib(32)),
            shutdown_grace: r.get("server.shutdown_grace", Duration::from_secs(10)),
            header_timeout: r.get("server.header_timeout", Duration::from_secs(30)),
            body_timeout: r.get("server.body_timeout", Duration::from_secs(60)),
        };
        let data_dir: PathBuf = r.get("store.data_dir", PathBuf::from("kvsidecar-data"));
        let engine = EngineConfig {
            url: r.get("engine.url", http::Uri::from_static("http://127.0.0.1:8081")),
            slot_dir: r.get("engine.slot_dir", data_dir.join("slots")),
            connect_timeout: r.get("engine.connect_timeout", Duration::from_secs(5)),
            response_timeout: r.get("engine.response_timeout", Duration::from_secs(300)),
            probe_interval: r.get("engine.probe_interval", Duration::from_secs(2)),
            cache_type_k: r.get("engine.cache_type_k", KvCacheType::F16),
            cache_type_v: r.get("engine.cache_type_v", KvCacheType::F16),
            flash_attention: r.get("engine.flash_attention", FlashAttention::Auto),
            unified_kv: r.get("engine.unified_kv", false),
            model_aliases: r.get("engine.model_aliases", Vec::new()),
        };
        let request = RequestConfig {
            tenant_header: r.get("request.tenant_header", http::HeaderName::from_static("x-kvsidecar-tenant")),
            default_tenant: r.get("request.default_tenant", "default".to_string()),
            shared_namespaces: r.get("request.shared_namespaces", Vec::new()),
        };
        let prefix = PrefixConfig {
            block_tokens: r.get("prefix.block_tokens", NonZeroU32::new(64).expect("non-zero literal")),
        };
        let store = StoreConfig {
            data_dir,
            capacity: r.get("store.capacity", ByteSize::gib(20)),
            chunk_size: r.get("store.chunk_size", ByteSize::mib(1)),
            max_snapshot: r.get("store.max_snapshot", ByteSize::gib(2)),
            high_watermark: r.get("store.high_watermark", 0.95),
            low_watermark: r.get("store.low_watermark", 0.85),
        };
        let snapshot = SnapshotConfig {
            min_tokens: r.get("snapshot.min_tokens", 256),
            restore_min_gain: r.get("snapshot.restore_min_gain", 64),
        };
        let log = LogConfig {
            level: r.get("log.level", "info".to_string()),
            format: r.get("log.format", LogFormat::Human),
            log_prompts: r.get("log.log_prompts", false),
        };
        let mut plugin = |kind: &str, file: &str| PluginConfig {
            file: r.get(&format!("plugins.{kind}.file"), PluginFile(Some(PathBuf::from(file)))).0,
            on_failure: r.get(&format!("plugins.{kind}.on_failure"), OnFailure::Fallback),
            config: r.get(&format!("plugins.{kind}.config"), toml::Table::new()),
        };
        let router = plugin("router", "prefix-affinity.wasm");
        let evictor = plugin("evictor", "cost-aware.wasm");
        let admission = plugin("admission", "min-tokens.wasm");
        let plugins = PluginsConfig {
            dir: r.get("plugins.dir", default_plugin_dir()),
            cache_dir: r.get("plugins.cache_dir", store.data_dir.join("plugin-cache")),
            deadline: r.get("plugins.deadline", Duration::from_millis(50)),
            memory_limit: r.get("plugins.memory_limit", ByteSize::mib(64)),
            max_concurrent_calls: r.get("plugins.max_concurrent_calls", default_concurrent_calls()),
            watch: r.get("plugins.watch", true),
            warn_interval: r.get("plugins.warn_interval", Duration::from_secs(10)),
            router,
            evictor,
            admission,
        };
        let peers = PeersConfig {
            listen: r.get("peers.listen", Optional::<SocketAddr>(None)).0,
            urls: r.get("peers.urls", Vec::new()),
            dns: r.get("peers.dns", Optional::<String>(None)).0,
            dns_interval: r.get("peers.dns_interval", Duration::from_secs(10)),
            token_file: r.get("peers.token_file", Optional::<PathBuf>(None)).0,
            health_interval: r.get("peers.health_interval", Duration::from_millis(500)),
            dead_after: r.get("peers.dead_after", Duration::from_secs(2)),
            journal_entries: r.get("peers.journal_entries", 4096),
            index_blocks: r.get("peers.index_blocks", 262_144),
            compression: r.get("peers.compression", Compression::Zstd),
            zstd_level: r.get("peers.zstd_level", 3),
            transfer_timeout: r.get("peers.transfer_timeout", Duration::from_secs(30)),
            forward_timeout: r.get("peers.forward_timeout", Duration::from_secs(10)),
            tls_cert_file: r.get("peers.tls_cert_file", Optional::<PathBuf>(None)).0,
            tls_key_file: r.get("peers.tls_key_file", Optional::<PathBuf>(None)).0,
            tls_ca_file: r.get("peers.tls_ca_file", Optional::<PathBuf>(None)).0,
            tls_server_name: r.get("peers.tls_server_name", Optional::<String>(None)).0,
        };
        let telemetry = TelemetryConfig {
            otlp_endpoint: r.get("telemetry.otlp_endpoint", Optional::<String>(None)).0,
            otlp_protocol: r.get("telemetry.otlp_protocol", OtlpProtocol::Grpc),
            otlp_timeout: r.get("telemetry.otlp_timeout", Duration::from_secs(10)),
            otlp_headers: r.get("telemetry.otlp_headers", Vec::new()),
            service_name: r.get("telemetry.service_name", "kvsidecar".to_string()),
            traces: r.get("telemetry.traces", true),
            sampling_ratio: r.get("telemetry.sampling_ratio", 1.0),
            span_queue: r.get("telemetry.span_queue", 4096),
            metrics: r.get("telemetry.metrics", true),
            metrics_interval: r.get("telemetry.metrics_interval", Duration::from_secs(15)),
            prometheus: r.get("telemetry.prometheus", true),
        };
        let ledger = r.ledger();
        let config = Config { server, engine, request, prefix, store, snapshot, log, plugins, peers, telemetry, ledger };

        for (path, (value, origin)) in &self.values {
            if !used.contains(path) {
                let rule = known_keys_rule(path);
                self.issues.push(ConfigIssue { path: path.clone(), value: value.to_string(), origin: origin.clone(), rule });
            }
        }
        self.check(&config);
        config
    }

    /// Checks the rules that span keys or ranges of a single typed value.
    fn check(&mut self, config: &Config) {
        let fail = |sources: &mut Self, path: &str, value: String, rule: &str| {
            let origin = sources.values.get(path).map(|(_, origin)| origin.clone()).unwrap_or_else(|| "default".into());
            sources.issues.push(ConfigIssue { path: path.into(), value, origin, rule: rule.into() });
        };
        if config.engine.url.scheme_str() != Some("http") || config.engine.url.host().is_none() {
            fail(self, "engine.url", config.engine.url.to_string(), "must be an http:// URL with a host, such as http://127.0.0.1:8081");
        }
        if config.server.admin_listen == config.server.listen {
            fail(self, "server.admin_listen", config.server.admin_listen.to_string(), "must differ from server.listen");
        }
        if config.store.chunk_size.as_u64() < 4096 || config.store.chunk_size.as_u64() > 64 << 20 {
            fail(self, "store.chunk_size", config.store.chunk_size.to_string(), "must be between 4 KiB and 64 MiB");
        }
        if config.store.capacity.as_u64() < config.store.chunk_size.as_u64() {
            fail(self, "store.capacity", config.store.capacity.to_string(), "must be at least store.chunk_size");
        }
        if config.server.max_body.as_u64() == 0 {
            fail(self, "server.max_body", config.server.max_body.to_string(), "must be larger than 0");
        }
        for (path, value) in [
            ("server.header_timeout", config.server.header_timeout),
            ("server.body_timeout", config.server.body_timeout),
            ("engine.connect_timeout", config.engine.connect_timeout),
            ("engine.response_timeout", config.engine.response_timeout),
            ("engine.probe_interval", config.engine.probe_interval),
        ] {
            if value.is_zero() {
                fail(self, path, humantime::format_duration(value).to_string(), "must be longer than 0s");
            }
        }
        if !(1..=19).contains(&config.peers.zstd_level) {
            fail(self, "peers.zstd_level", config.peers.zstd_level.to_string(), "must be 1 to 19; set peers.compression = \"none\" to send snapshots uncompressed");
        }
        for (path, value) in [("peers.transfer_timeout", config.peers.transfer_timeout), ("peers.forward_timeout", config.peers.forward_timeout)] {
            if value.is_zero() {
                fail(self, path, "0s".into(), "must be longer than 0s, such as \"10s\"");
            }
        }
        for name in &config.request.shared_namespaces {
            if name.is_empty() || name.len() > 256 || !name.bytes().all(|byte| byte.is_ascii_graphic()) {
                fail(self, "request.shared_namespaces", format!("{name:?}"), "each shared namespace is 1 to 256 visible ASCII characters");
            }
        }
        if config.request.default_tenant.is_empty() {
            fail(self, "request.default_tenant", "\"\"".into(), "must not be empty");
        }
        let (low, high) = (config.store.low_watermark, config.store.high_watermark);
        if !(0.0..=1.0).contains(&high) || high == 0.0 {
            fail(self, "store.high_watermark", high.to_string(), "must be a fraction of store.capacity above 0 and at most 1, such as 0.95");
        }
        if !(0.0..=1.0).contains(&low) || low > high {
            fail(self, "store.low_watermark", low.to_string(), "must be a fraction of store.capacity from 0 to store.high_watermark, such as 0.85");
        }
        // Deadlines are counted in 1 ms ticks, so shorter ones would be imprecise.
        if config.plugins.deadline < Duration::from_millis(5) || config.plugins.deadline > Duration::from_secs(10) {
            fail(self, "plugins.deadline", humantime::format_duration(config.plugins.deadline).to_string(), "must be between 5ms and 10s");
        }
        // A Rust plugin's memory starts at about 1.1 MiB.
        if config.plugins.memory_limit.as_u64() < 4 << 20 || config.plugins.memory_limit.as_u64() > 4 << 30 {
            fail(self, "plugins.memory_limit", config.plugins.memory_limit.to_string(), "must be between 4 MiB and 4 GiB");
        }
        let tls_files = [&config.peers.tls_cert_file, &config.peers.tls_key_file, &config.peers.tls_ca_file];
        let tls_set = tls_files.iter().filter(|file| file.is_some()).count();
        if tls_set != 0 && tls_set != 3 {
            let missing: Vec<&str> = ["peers.tls_cert_file", "peers.tls_key_file", "peers.tls_ca_file"]
                .into_iter()
                .zip(tls_files)
                .filter(|(_, file)| file.is_none())
                .map(|(name, _)| name)
                .collect();
            fail(self, missing[0], "missing".into(), &format!("mutual TLS needs peers.tls_cert_file, peers.tls_key_file and peers.tls_ca_file together; set {}, or remove the others", missing.join(" and ")));
        }
        let scheme = config.peers.scheme();
        for url in &config.peers.urls {
            let valid = url.parse::<http::Uri>().is_ok_and(|uri| uri.scheme_str() == Some(scheme) && uri.host().is_some());
            if !valid {
                let rule = if scheme == "https" {
                    "with mutual TLS (peers.tls_*), each peer must be an https:// URL of its peer API, such as https://10.0.0.7:9100"
                } else {
                    "each peer must be an http:// URL of its peer API, such as http://10.0.0.7:9100; https:// needs peers.tls_cert_file, peers.tls_key_file and peers.tls_ca_file"
                };
                fail(self, "peers.urls", format!("{url:?}"), rule);
            }
        }
        if let Some(dns) = &config.peers.dns
            && (dns.contains("://") || !dns.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()))
        {
            fail(self, "peers.dns", format!("{dns:?}"), "must be a host name and port, such as \"kvsidecar-peers.default.svc:9100\"");
        }
        if config.peers.health_interval.is_zero() || config.peers.dead_after <= config.peers.health_interval {
            fail(self, "peers.dead_after", humantime::format_duration(config.peers.dead_after).to_string(), "must be longer than peers.health_interval, which must be longer than 0s");
        }
        if config.peers.journal_entries == 0 {
            fail(self, "peers.journal_entries", "0".into(), "must be at least 1");
        }
        if config.peers.index_blocks == 0 {
            fail(self, "peers.index_blocks", "0".into(), "must be at least 1");
        }
        if !(1..=1024).contains(&config.plugins.max_concurrent_calls) {
            fail(self, "plugins.max_concurrent_calls", config.plugins.max_concurrent_calls.to_string(), "must be between 1 and 1024");
        }
        let telemetry = &config.telemetry;
        if let Some(endpoint) = &telemetry.otlp_endpoint {
            let valid = endpoint.parse::<http::Uri>().is_ok_and(|uri| uri.scheme_str() == Some("http") && uri.host().is_some());
            if !valid {
                fail(self, "telemetry.otlp_endpoint", format!("{endpoint:?}"), "must be an http:// URL of an OTLP collector, such as \"http://127.0.0.1:4317\" (gRPC) or \"http://127.0.0.1:4318\" (HTTP); for a collector behind TLS, export to a collector agent on the node that forwards over TLS");
            }
        }
        for header in &telemetry.otlp_headers {
            let valid = header.split_once('=').is_some_and(|(name, value)| {
                http::HeaderName::from_bytes(name.trim().as_bytes()).is_ok() && http::HeaderValue::from_str(value.trim()).is_ok()
            });
            if !valid {
                fail(self, "telemetry.otlp_headers", format!("{header:?}"), "each entry must be name=value with a valid HTTP header name and value, such as \"authorization=Bearer abc\"");
            }
        }
        if !(0.0..=1.0).contains(&telemetry.sampling_ratio) {
            fail(self, "telemetry.sampling_ratio", telemetry.sampling_ratio.to_string(), "must be between 0 (no new trace recorded) and 1 (all)");
        }
        if telemetry.span_queue == 0 {
            fail(self, "telemetry.span_queue", "0".into(), "must be at least 1");
        }
        if telemetry.otlp_timeout.is_zero() {
            fail(self, "telemetry.otlp_timeout", "0s".into(), "must be longer than 0s");
        }
        if telemetry.metrics_interval < Duration::from_secs(1) {
            fail(self, "telemetry.metrics_interval", humantime::format_duration(telemetry.metrics_interval).to_string(), "must be at least 1s");
        }
        if telemetry.service_name.trim().is_empty() {
            fail(self, "telemetry.service_name", "\"\"".into(), "must not be empty");
        }
        if !valid_log_filter(&config.log.level) {
            fail(self, "log.level", format!("{:?}", config.log.level), "must be a tracing filter such as \"info\" or \"kvsidecar=debug,info\"");
        }
        for (path, value, rule) in ledger::check(config) {
            fail(self, path, value, rule);
        }
    }
}

/// Checks a `tracing` filter: comma-separated directives, each a level or `target=level`. A bare
/// word that is not a level would be read as a target name and silence the log, so it is invalid.
fn valid_log_filter(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let directives_valid = filter.split(',').map(str::trim).filter(|directive| !directive.is_empty()).all(|directive| {
        match directive.rsplit_once('=') {
            Some((target, level)) => !target.is_empty() && LEVELS.contains(&level.to_ascii_lowercase().as_str()),
            None => LEVELS.contains(&directive.to_ascii_lowercase().as_str()),
        }
    });
    directives_valid && tracing_subscriber::EnvFilter::try_new(filter).is_ok()
}

/// Returns the number of CPUs the process may use: a plugin call is CPU work, and more calls
/// than cores at once would only queue in the scheduler.
fn default_concurrent_calls() -> u32 {
    std::thread::available_parallelism().map(|cores| cores.get() as u32).unwrap_or(2)
}

/// Returns the folder `plugins` beside the running executable, where `kvsidecar plugin build`
/// puts the shipped plugins.
fn default_plugin_dir() -> PathBuf {
    std::env::current_exe().ok().and_then(|exe| exe.parent().map(|dir| dir.join("plugins"))).unwrap_or_else(|| PathBuf::from("plugins"))
}

fn known_keys_rule(path: &str) -> String {
    let section = path.split('.').next().unwrap_or_default();
    if let Some(rule) = ledger::unknown_key_rule(path) {
        return rule;
    }
    if let Some(subsection) = SUBSECTIONS.iter().find(|sub| path.strip_prefix(*sub).is_some_and(|tail| tail.starts_with('.'))) {
        return format!("unknown key in [{subsection}]; its keys are file, on_failure and config, and the plugin's own settings go in [{subsection}.config]");
    }
    if SUBSECTIONS.contains(&path) {
        return format!("must be a table [{path}] with the keys file, on_failure and config");
    }
    if section == "plugins" {
        return "unknown key in [plugins]; its keys are dir, cache_dir, deadline, memory_limit, max_concurrent_calls, watch and warn_interval, and the tables [plugins.router], [plugins.evictor] and [plugins.admission]".into();
    }
    if SECTIONS.contains(&section) {
        format!("unknown key in [{section}]; config/kvsidecar.toml lists the known keys")
    } else {
        format!("unknown section; the sections are {}", SECTIONS.join(", "))
    }
}

struct Reader<'a> {
    sources: &'a mut Sources,
    used: &'a mut BTreeSet<String>,
}

impl Reader<'_> {
    /// Returns the value of `path` parsed as `T`, or `default` when the key is absent or invalid
    /// (an invalid value is recorded as an issue, so the default is never used silently).
    fn get<T: ConfigValue>(&mut self, path: &str, default: T) -> T {
        self.used.insert(path.to_string());
        let Some((value, origin)) = self.sources.values.get(path) else { return default };
        match T::parse(value) {
            Ok(parsed) => parsed,
            Err(rule) => {
                let issue = ConfigIssue { path: path.to_string(), value: value.to_string(), origin: origin.clone(), rule };
                self.sources.issues.push(issue);
                default
            }
        }
    }
}

/// A type that a configuration value can be parsed into. Values from the environment and flags
/// arrive as strings, so every numeric and boolean type also accepts its string form.
trait ConfigValue: Sized {
    fn parse(value: &toml::Value) -> Result<Self, String>;
}

fn text(value: &toml::Value) -> Option<&str> {
    value.as_str()
}

impl ConfigValue for String {
    fn parse(value: &toml::Value) -> Result<Self, String> {
        text(value).map(str::to_string).ok_or_else(|| "must be a string".into())
    }
}

impl ConfigValue for bool {
    fn parse(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Boolean(flag) => Ok(*flag),
            toml::Value::String(s) if s == "true" => Ok(true),
            toml::Value::String(s) if s == "false" => Ok(false),
            _ => Err("must be true or false".into()),
        }
    }
}

impl ConfigValue for u32 {
    fn parse(value: &toml::Value) -> Result<Self, String> {
        let rule = || "must be a whole number from 0 to 4294967295".to_string();
        match value {
            toml::Value::Integer(n) => u32::try_from(*n).map_err(|_| rule()),
            toml::Value::String(s) => s.trim().parse().map_err(|_| rule()),
            _ => Err(rule()),
        }
    }
}

impl ConfigValue for NonZeroU32 {
    fn parse(value: &toml::Value) -> Result<Self, String> {
        let n = u32::parse(value).map_err(|_| "must be a whole number from 1 to 4294967295".to_string())?;
        NonZeroU32::new(n).ok_or_else(|| "must be at least 1".into())
    }
}

impl ConfigValue for ByteSize {
    fn parse(value: &toml::Value) -> Result<Self, String> {
        let rule = || "must be a byte size such as \"512MiB\" or \"20GiB\", or a number of bytes".to_string();
        match value {
            toml::Value::Integer(n) => u64::try_from(*n).map(ByteSize::b).map_err(|_| rule()),
            toml::Value::String(s) => s.trim().parse::<ByteSize>().map_err(|_| rule()),
            _ => Err(rule()),
        }
    }
}

impl ConfigValue for Duration {
    fn parse(value: &toml::Value) -> Result<Self, String> {
        let rule = || "must be a duration with a unit, such as \"500ms\", \"5s\" or \"2m\"".to_string();
        text(value).ok_or_else(rule).and_then(|s| humantime::parse_duration(s.trim()).map_err(|_| rule()))
    }
}

impl ConfigValue for SocketAddr {
    fn parse(value: &toml::Value) -> Result<Self, String> {
        let rule = || "must be an IP address and port, such as \"0.0.0.0:8080\" or \"[::1]:9090\"".to_string();
        text(value).ok_or_else(rule).and_then(|s| s.trim().parse().map_err(|_| rule()))
    }
}

impl ConfigValue for PathBuf {
    fn parse(value: &toml::Value) -> Result<Self, String> {
        match text(value) {
            Some(s) if !s.is_empty() => Ok(PathBuf::from(s)),
            _ => Err("must be a non-empty path".into()),
        }
    }
}

impl ConfigValue for f64 {
    fn parse(value: &toml::Value) -> Result<Self, String> {
        let rule = || "must be a number such as 0.9".to_string();
        let number = match value {
            toml::Value::Float(n) => *n,
            toml::Value::Integer(n) => *n as f64,
            toml::Value::String(s) => s.trim().parse().map_err(|_| rule())?,
            _ => return Err(rule()),
        };
        if number.is_finite() { Ok(number) } else { Err(rule()) }
    }
}

/// A setting that may be left empty (`""`) for none.
struct Optional<T>(Option<T>);

impl<T: ConfigValue> ConfigValue for Optional<T> {
    fn parse(value: &toml::Value) -> Result<Self, String> {
        match text(value) {
            Some(s) if s.trim().is_empty() => Ok(Optional(None)),
            _ => T::parse(value).map(|parsed| Optional(Some(parsed))),
        }
    }
}

/// A plugin file setting: a path, or `builtin` for the built-in policy.
struct PluginFile(Option<PathBuf>);

impl ConfigValue for PluginFile {
    fn parse(value: &toml::Value) -> Result<Self, String> {
        match text(value).map(str::trim) {
            Some("builtin") => Ok(PluginFile(None)),
            Some(path) if !path.is_empty() => Ok(PluginFile(Some(PathBuf::from(path)))),
            _ => Err("must be a component file such as \"prefix-affinity.wasm\", or \"builtin\" for the built-in policy".into()),
        }
    }
}

impl ConfigValue for toml::Table {
    /// Accepts a TOML table, or from the environment its text in either form.
    fn parse(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Table(table) => Ok(table.clone()),
            toml::Value::String(text) => plugin_table(text),
            _ => Err("must be a table of the plugin's settings, such as { imbalance = 2 }".into()),
        }
    }
}

/// Parses a plugin's settings written as an inline table (`{ imbalance = 2 }`) or as TOML lines
/// (`imbalance = 2`).
pub fn plugin_table(text: &str) -> Result<toml::Table, String> {
    let lines = text.parse::<toml::Table>();
    if let Ok(table) = lines {
        return Ok(table);
    }
    let inline = toml::from_str::<toml::Table>(&format!("config = {text}"));
    match inline.as_ref().ok().and_then(|outer| outer.get("config")) {
        Some(toml::Value::Table(inner)) => Ok(inner.clone()),
        _ => {
            // Report the parser's error for the form the text looks like.
            let error = if text.trim_start().starts_with('{') { inline.err().map(|error| error.message().to_string()) } else { lines.err().map(|error| error.message().to_string()) };
            let detail = error.map(|message| format!(" ({message})")).unwrap_or_default();
            Err(format!("must be a table of the plugin's settings, as `{{ imbalance = 2 }}` or `imbalance = 2`{detail}"))
        }
    }
}

impl ConfigValue for http::Uri {
    fn parse(value: &toml::Value) -> Result<Self, String> {
        let rule = || "must be a URL such as \"http://127.0.0.1:8081\"".to_string();
        let s = text(value).ok_or_else(rule)?;
        s.trim().trim_end_matches('/').parse().map_err(|_| rule())
    }
}

impl ConfigValue for http::HeaderName {
    fn parse(value: &toml::Value) -> Result<Self, String> {
        let rule = || "must be a valid HTTP header name, such as \"x-tenant-id\"".to_string();
        text(value).ok_or_else(rule).and_then(|s| s.trim().parse().map_err(|_| rule()))
    }
}

impl ConfigValue for Vec<String> {
    /// Accepts a TOML array of strings, or from the environment either a comma-separated list
    /// (`a,b`) or a TOML array (`["a", "b"]`).
    fn parse(value: &toml::Value) -> Result<Self, String> {
        let rule = || "must be a list of strings, such as [\"a\", \"b\"] or a,b".to_string();
        match value {
            toml::Value::Array(items) => items.iter().map(|item| text(item).map(str::to_string).ok_or_else(rule)).collect(),
            toml::Value::String(s) if s.trim_start().starts_with('[') => {
                let table: toml::Table = toml::from_str(&format!("list = {s}")).map_err(|_| rule())?;
                Self::parse(&table["list"])
            }
            toml::Value::String(s) => Ok(s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()),
            _ => Err(rule()),
        }
    }
}

/// Enums parse through serde from their snake_case names.
macro_rules! enum_value {
    ($type:ty, $names:literal) => {
        impl ConfigValue for $type {
            fn parse(value: &toml::Value) -> Result<Self, String> {
                let rule = || format!("must be one of {}", $names);
                let name = text(value).ok_or_else(rule)?;
                serde::Deserialize::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(name.trim()))
                    .map_err(|_| rule())
            }
        }
    };
}

enum_value!(KvCacheType, "f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1");
enum_value!(FlashAttention, "on, off, auto");
enum_value!(LogFormat, "human, json");
enum_value!(OnFailure, "fallback, reject");
enum_value!(Compression, "zstd, none");
enum_value!(OtlpProtocol, "grpc, http");

#[cfg(test)]
mod tests;
