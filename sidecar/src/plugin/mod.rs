//! Policy plugins: routing, eviction and admission as WebAssembly components that can be
//! replaced while the sidecar serves.
//!
//! Each policy is a [`Plugin`]: the version in use (an `ArcSwap` of a prepared component), warm
//! instances of it, and its counters. A call takes a warm instance of the current version or
//! makes one, runs under a deadline and a memory cap, and checks the result. Any failure (trap,
//! deadline, memory cap, invalid answer) drops the instance, counts, warns at most once per
//! `plugins.warn_interval`, and returns [`CallError`] so the caller can run the built-in policy.
//! A reload prepares the new version off the request path, runs its load checks, and publishes
//! it; calls already running finish on the old version.

mod admission;
mod bindings;
mod evictor;
pub mod native;
mod router;
pub mod runtime;
pub mod tool;
mod watch;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use serde::Serialize;
use wasmtime::Store;

pub use admission::AdmissionPolicy;
pub use evictor::EvictionPolicy;
pub use router::{RoutePlan, RouterPolicy};
use runtime::{HostState, LoadError, Runtime};
pub use watch::watch;

use crate::config::{Config, OnFailure, PluginConfig};
use crate::store::now_ms;

/// The three kinds of policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Router,
    Evictor,
    Admission,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Router, Kind::Evictor, Kind::Admission];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Router => "router",
            Kind::Evictor => "evictor",
            Kind::Admission => "admission",
        }
    }

    /// Returns the export name of the kind's interface, such as `kvsidecar:policy/router@0.1.0`.
    pub fn export_name(self) -> String {
        format!("{}/{}@{}", runtime::PACKAGE, self.as_str(), runtime::INTERFACE_VERSION)
    }

    /// Parses an export name of any interface version into the kind and the version.
    pub fn from_export(name: &str) -> Option<(Kind, &str)> {
        let rest = name.strip_prefix(runtime::PACKAGE)?.strip_prefix('/')?;
        let (interface, version) = rest.split_once('@')?;
        let kind = match interface {
            "router" => Kind::Router,
            "evictor" => Kind::Evictor,
            "admission" => Kind::Admission,
            _ => return None,
        };
        Some((kind, version))
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed plugin call. The caller runs the built-in policy, or rejects with `on_failure = "reject"`.
#[derive(Debug, Clone)]
pub struct CallError {
    /// The plugin as `name@version`.
    pub plugin: String,
    pub reason: String,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "plugin {} failed: {}", self.plugin, self.reason)
    }
}

/// The binding of one kind of policy to its generated component interface.
pub trait Interface: Send + Sync + 'static {
    const KIND: Kind;
    /// Whether an instance keeps nothing between calls that a sample call could disturb, so the
    /// instance that passed the load check can serve.
    const REUSE_CHECKED_INSTANCE: bool;
    /// The prepared component, with its exports looked up.
    type Pre: Clone + Send + Sync + 'static;
    /// A live instance's exports.
    type Bindings: Send + 'static;

    fn pre(pre: wasmtime::component::InstancePre<HostState>) -> wasmtime::Result<Self::Pre>;
    fn instantiate(pre: &Self::Pre, store: &mut Store<HostState>) -> wasmtime::Result<Self::Bindings>;
    fn info(bindings: &Self::Bindings, store: &mut Store<HostState>) -> wasmtime::Result<(String, String)>;
    fn init(bindings: &Self::Bindings, store: &mut Store<HostState>, config: &str) -> wasmtime::Result<Result<(), String>>;
    /// Calls the plugin with sample input and checks the result, before a version is published.
    fn smoke(bindings: &Self::Bindings, store: &mut Store<HostState>) -> Result<(), String>;
}

/// A published plugin version.
pub struct Version<I: Interface> {
    pub generation: u64,
    pub name: String,
    pub version: String,
    pub interface: String,
    pub sha256: String,
    pub file: PathBuf,
    pub loaded_ms: u64,
    pub calls: AtomicU64,
    pub failures: AtomicU64,
    pre: I::Pre,
    config_text: String,
}

impl<I: Interface> Version<I> {
    /// Returns `name@version` with the start of the SHA-256, which distinguishes builds of one version.
    fn label(&self) -> String {
        format!("{}@{} (sha256 {})", self.name, self.version, &self.sha256[..12])
    }
}

/// A live instance of one version.
pub struct Instance<I: Interface> {
    pub generation: u64,
    pub store: Store<HostState>,
    pub bindings: I::Bindings,
}

/// Result of a reload.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Reloaded {
    /// A new version is serving.
    Loaded { sha256: String, version: String, cached_compile: bool },
    /// The file contains the version already serving.
    Unchanged,
    /// The kind runs its built-in policy; there is no file.
    Builtin,
    /// The new version failed its checks; the previous one keeps serving.
    Failed { error: String },
}

/// Warm instances kept per plugin, about one per worker thread.
const WARM_INSTANCES: usize = 8;

/// Source of the generation numbers of all plugin versions.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// Bounds the calls of one plugin that run at once, so slow or greedy calls hold at most that
/// many cores and instance memories.
struct Gate {
    running: Mutex<u32>,
    freed: Condvar,
    limit: u32,
}

/// A turn to call; dropping it lets the next call in.
struct Turn<'a>(&'a Gate);

impl Gate {
    /// Waits up to `within` for a turn.
    fn enter(&self, within: Duration) -> Option<Turn<'_>> {
        let deadline = Instant::now() + within;
        let mut running = self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        while *running >= self.limit {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            running = self.freed.wait_timeout(running, left).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
        }
        *running += 1;
        Some(Turn(self))
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut running = self.0.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *running -= 1;
        self.0.freed.notify_one();
    }
}

/// One policy slot: the configured plugin, the version in use, warm instances and counters.
pub struct Plugin<I: Interface> {
    runtime: Arc<Runtime>,
    gate: Gate,
    deadline: Duration,
    pub setting: PluginConfig,
    pub path: Option<PathBuf>,
    warn_interval_ms: u64,
    current: ArcSwapOption<Version<I>>,
    warm: Mutex<Vec<Instance<I>>>,
    /// Serialises reloads, so two reloads never publish out of order.
    reload_lock: Mutex<()>,
    pub fallbacks: AtomicU64,
    pub rejections: AtomicU64,
    /// Calls and failed calls of every version since start, for the metrics.
    calls_total: AtomicU64,
    failures_total: AtomicU64,
    /// Calls that found every turn taken for a whole deadline.
    busy: AtomicU64,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    last_reload_error: ArcSwapOption<String>,
    last_warning_ms: AtomicU64,
    suppressed_warnings: AtomicU64,
    last_reload_log_ms: AtomicU64,
}

impl<I: Interface> Plugin<I> {
    pub fn new(runtime: Arc<Runtime>, setting: &PluginConfig, config: &Config) -> Plugin<I> {
        Plugin {
            runtime,
            gate: Gate { running: Mutex::new(0), freed: Condvar::new(), limit: config.plugins.max_concurrent_calls.max(1) },
            deadline: config.plugins.deadline,
            path: setting.path(&config.plugins.dir),
            setting: setting.clone(),
            warn_interval_ms: config.plugins.warn_interval.as_millis() as u64,
            current: ArcSwapOption::empty(),
            warm: Mutex::new(Vec::new()),
            reload_lock: Mutex::new(()),
            fallbacks: AtomicU64::new(0),
            rejections: AtomicU64::new(0),
            calls_total: AtomicU64::new(0),
            failures_total: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            last_reload_error: ArcSwapOption::empty(),
            last_warning_ms: AtomicU64::new(0),
            suppressed_warnings: AtomicU64::new(0),
            last_reload_log_ms: AtomicU64::new(0),
        }
    }

    /// Re-arms the deadline of an instance's store before another call in the same turn.
    pub fn arm(&self, store: &mut Store<HostState>) {
        self.runtime.arm(store);
    }

    pub fn on_failure(&self) -> OnFailure {
        self.setting.on_failure
    }

    pub fn current(&self) -> Option<Arc<Version<I>>> {
        self.current.load_full()
    }

    /// Loads the configured file if its content differs from the version serving. Blocks for
    /// the compile; call it from a blocking task.
    pub fn reload(&self) -> Reloaded {
        let Some(path) = &self.path else { return Reloaded::Builtin };
        let _serial = self.reload_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match self.prepare(path) {
            Ok(None) => {
                self.last_reload_error.store(None);
                Reloaded::Unchanged
            }
            Ok(Some((version, cached, checked))) => {
                let reloaded = Reloaded::Loaded { sha256: version.sha256.clone(), version: version.version.clone(), cached_compile: cached };
                tracing::info!(plugin.kind = %I::KIND, plugin.name = %version.name, plugin.version = %version.version, plugin.sha256 = %version.sha256, cached_compile = cached, "plugin loaded");
                let generation = version.generation;
                self.current.store(Some(Arc::new(version)));
                if I::REUSE_CHECKED_INSTANCE {
                    let mut pool = self.warm.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    pool.push(Instance { generation, store: checked.0, bindings: checked.1 });
                }
                self.reloads.fetch_add(1, Ordering::Relaxed);
                self.last_reload_error.store(None);
                reloaded
            }
            Err(error) => {
                let error = error.to_string();
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                self.last_reload_error.store(Some(Arc::new(error.clone())));
                // A file rewritten many times a second must not flood the log.
                let now = now_ms();
                let last = self.last_reload_log_ms.load(Ordering::Relaxed);
                let quiet = now.saturating_sub(last) < self.warn_interval_ms;
                if !quiet {
                    self.last_reload_log_ms.store(now, Ordering::Relaxed);
                }
                match self.current() {
                    Some(_) if quiet => tracing::debug!(plugin.kind = %I::KIND, error = ?error, "new plugin version rejected"),
                    Some(serving) => tracing::error!(plugin.kind = %I::KIND, error = ?error, serving = %serving.label(), "new plugin version rejected; the previous version keeps serving"),
                    None => tracing::error!(plugin.kind = %I::KIND, error = ?error, "plugin failed to load"),
                }
                Reloaded::Failed { error }
            }
        }
    }

    /// Reloads and returns the outcome with the name and version now serving.
    pub fn reload_described(&self) -> (Reloaded, Option<(String, String)>) {
        let outcome = self.reload();
        (outcome, self.current().map(|version| (version.name.clone(), version.version.clone())))
    }

    /// Prepares the file at `path` as a new version, and returns it with whether its compile was
    /// cached and the instance that passed the load check; None when it is the version serving.
    #[allow(clippy::type_complexity)]
    fn prepare(&self, path: &std::path::Path) -> Result<Option<(Version<I>, bool, (Store<HostState>, I::Bindings))>, LoadError> {
        let prepared = self.runtime.prepare(path)?;
        if self.current().is_some_and(|serving| serving.sha256 == prepared.sha256) {
            return Ok(None);
        }
        if prepared.kind != I::KIND {
            return Err(LoadError::WrongKind { path: path.into(), found: prepared.kind, expected: I::KIND });
        }
        let check = |reason: String| LoadError::Check { path: path.into(), reason };
        let pre = I::pre(prepared.pre).map_err(|error| check(format!("its exports do not match the interface {}: {}", I::KIND.export_name(), describe(&error))))?;
        let config_text = toml::to_string(&self.setting.config).map_err(|error| check(error.to_string()))?;
        let mut store = self.runtime.store();
        let bindings = I::instantiate(&pre, &mut store).map_err(|error| check(format!("instantiation failed: {}", describe(&error))))?;
        self.runtime.arm(&mut store);
        let (name, version) = I::info(&bindings, &mut store).map_err(|error| check(format!("info() failed: {}", describe(&error))))?;
        let (name, version) = (printable(&name), printable(&version));
        self.runtime.arm(&mut store);
        I::init(&bindings, &mut store, &config_text)
            .map_err(|error| check(format!("init() failed: {}", describe(&error))))?
            .map_err(|reason| check(format!("init() rejected its config: {}", clip(&reason))))?;
        self.runtime.arm(&mut store);
        I::smoke(&bindings, &mut store).map_err(|reason| check(format!("sample call failed: {}", clip(&reason))))?;
        let version = Version {
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            name,
            version,
            interface: prepared.interface,
            sha256: prepared.sha256,
            file: path.into(),
            loaded_ms: now_ms(),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            pre,
            config_text,
        };
        Ok(Some((version, prepared.cached, (store, bindings))))
    }

    /// Makes a fresh instance of `version` and initialises it with its config.
    fn instantiate(&self, version: &Version<I>) -> Result<Instance<I>, String> {
        let mut store = self.runtime.store();
        let bindings = I::instantiate(&version.pre, &mut store).map_err(|error| format!("instantiation failed: {}", describe(&error)))?;
        self.runtime.arm(&mut store);
        I::init(&bindings, &mut store, &version.config_text)
            .map_err(|error| format!("init() failed: {}", describe(&error)))?
            .map_err(|reason| format!("init() rejected its config: {}", clip(&reason)))?;
        Ok(Instance { generation: version.generation, store, bindings })
    }

    /// Runs `call` on an instance of the current version: a warm one, or a fresh one that
    /// `fresh` prepares first. Returns None when the kind runs its built-in policy.
    pub fn call<T>(
        &self,
        fresh: impl FnOnce(&mut Instance<I>) -> Result<(), String>,
        call: impl FnOnce(&mut Instance<I>) -> Result<T, String>,
    ) -> Option<Result<T, CallError>> {
        let version = self.current()?;
        let started = Instant::now();
        self.calls_total.fetch_add(1, Ordering::Relaxed);
        let Some(_turn) = self.gate.enter(self.deadline) else {
            self.busy.fetch_add(1, Ordering::Relaxed);
            self.failures_total.fetch_add(1, Ordering::Relaxed);
            let error = CallError { plugin: version.label(), reason: format!("all {} call turns (plugins.max_concurrent_calls) stayed taken for the whole deadline", self.gate.limit) };
            self.warn(&error);
            return Some(Err(error));
        };
        let warm = {
            let mut pool = self.warm.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            pool.retain(|instance| instance.generation == version.generation);
            pool.pop()
        };
        let result = match warm {
            Some(instance) => Ok(instance),
            None => self.instantiate(&version).and_then(|mut instance| {
                self.runtime.arm(&mut instance.store);
                fresh(&mut instance).map(|()| instance)
            }),
        }
        .and_then(|mut instance| {
            self.runtime.arm(&mut instance.store);
            call(&mut instance).map(|value| (value, instance))
        });
        version.calls.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::instruments().plugin_call(I::KIND, started.elapsed(), result.is_ok());
        match result {
            Ok((value, instance)) => {
                let mut pool = self.warm.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if pool.len() < WARM_INSTANCES && self.current().is_some_and(|now| now.generation == instance.generation) {
                    pool.push(instance);
                }
                Some(Ok(value))
            }
            Err(reason) => {
                // The instance is dropped: after a trap it cannot be entered again, and after an
                // invalid result its state is suspect.
                version.failures.fetch_add(1, Ordering::Relaxed);
                self.failures_total.fetch_add(1, Ordering::Relaxed);
                let error = CallError { plugin: version.label(), reason };
                self.warn(&error);
                Some(Err(error))
            }
        }
    }

    /// Logs a plugin failure, at most once per warning interval, and counts the failures not logged.
    fn warn(&self, error: &CallError) {
        let now = now_ms();
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < self.warn_interval_ms
            || self.last_warning_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            self.suppressed_warnings.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = self.suppressed_warnings.swap(0, Ordering::Relaxed);
        let consequence = match (self.setting.on_failure, I::KIND) {
            (OnFailure::Fallback, _) => "the built-in policy decides this call",
            (OnFailure::Reject, Kind::Router) => "the request is rejected with 503 (on_failure = \"reject\")",
            (OnFailure::Reject, _) => "the snapshot is not stored (on_failure = \"reject\")",
        };
        tracing::warn!(
            plugin.kind = %I::KIND,
            plugin = %error.plugin,
            // Quoted: the reason may contain text from the plugin.
            error = ?error.reason,
            failures_not_logged = suppressed,
            "plugin call failed: {consequence}; the next call gets a fresh instance"
        );
    }

    /// Returns the plugin's counters since start, for the metrics.
    pub fn figures(&self) -> PluginFigures {
        let version = self.current();
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PluginFigures {
            kind: I::KIND,
            name: version.as_ref().map(|v| v.name.clone()).unwrap_or_else(|| format!("builtin-{}", I::KIND)),
            version: version.as_ref().map(|v| v.version.clone()).unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string()),
            calls: load(&self.calls_total),
            failures: load(&self.failures_total),
            fallbacks: load(&self.fallbacks),
            rejections: load(&self.rejections),
            loads: load(&self.reloads),
            load_failures: load(&self.reload_failures),
        }
    }

    /// Returns the plugin's entry in `/admin/plugins`.
    pub fn describe(&self) -> serde_json::Value {
        let version = self.current();
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        serde_json::json!({
            "kind": I::KIND,
            "file": self.path.as_ref().map(|path| path.display().to_string()),
            "builtin": self.path.is_none(),
            "name": version.as_ref().map(|v| v.name.clone()).unwrap_or_else(|| format!("builtin-{}", I::KIND)),
            "version": version.as_ref().map(|v| v.version.clone()),
            "interface": version.as_ref().map(|v| v.interface.clone()),
            "sha256": version.as_ref().map(|v| v.sha256.clone()),
            "generation": version.as_ref().map(|v| v.generation),
            "loaded_at_ms": version.as_ref().map(|v| v.loaded_ms),
            "calls": version.as_ref().map(|v| load(&v.calls)).unwrap_or(0),
            "failures": version.as_ref().map(|v| load(&v.failures)).unwrap_or(0),
            "fallbacks": load(&self.fallbacks),
            "rejections": load(&self.rejections),
            "busy": load(&self.busy),
            "loads": load(&self.reloads),
            "reload_failures": load(&self.reload_failures),
            "last_reload_error": self.last_reload_error.load_full().map(|error| error.as_str().to_string()),
            "on_failure": self.setting.on_failure.as_str(),
        })
    }
}

/// A plugin's counters since start.
#[derive(Debug, Clone)]
pub struct PluginFigures {
    pub kind: Kind,
    /// Name and version of the version in use; `builtin-KIND` for a built-in policy.
    pub name: String,
    pub version: String,
    pub calls: u64,
    /// Calls that trapped, ran out of time or memory, returned an invalid result, or found no free turn.
    pub failures: u64,
    pub fallbacks: u64,
    pub rejections: u64,
    /// Versions loaded, the first one included, and loads that failed (the previous version kept serving).
    pub loads: u64,
    pub load_failures: u64,
}

/// Maximum length of a plugin's name or version as kept, in characters.
const MAX_LABEL: usize = 64;

/// Returns `text` cut to [`MAX_LABEL`] characters, with everything but visible ASCII replaced,
/// so a plugin's name and version can neither forge log lines nor spoof other text.
fn printable(text: &str) -> String {
    let label: String = text.chars().take(MAX_LABEL).map(|c| if c.is_ascii_graphic() { c } else { '?' }).collect();
    if label.is_empty() { "unnamed".into() } else { label }
}

/// Maximum length of a plugin's error message as kept, in characters.
const MAX_MESSAGE: usize = 512;

/// Returns a plugin-supplied message cut to [`MAX_MESSAGE`] characters, with control, bidirectional
/// and invisible formatting characters replaced, so it cannot forge or disguise log lines.
fn clip(text: &str) -> String {
    let hidden = |c: char| c.is_control() || matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}');
    let mut clipped: String = text.chars().take(MAX_MESSAGE).map(|c| if hidden(c) { ' ' } else { c }).collect();
    if text.chars().nth(MAX_MESSAGE).is_some() {
        clipped.push_str(" [cut]");
    }
    clipped
}

/// Describes a wasmtime error in one line: the trap, or the innermost cause (a memory limit, for
/// example), without the wasm backtrace that wasmtime attaches as context.
pub fn describe(error: &wasmtime::Error) -> String {
    let trap = error.downcast_ref::<wasmtime::Trap>();
    let text = match trap {
        Some(wasmtime::Trap::Interrupt) => return "deadline exceeded (plugins.deadline)".into(),
        Some(wasmtime::Trap::OutOfFuel) => return "ran out of fuel".into(),
        // A Rust panic in a plugin ends in an `unreachable` instruction.
        Some(wasmtime::Trap::UnreachableCodeReached) => return "trap: unreachable instruction executed (a Rust panic traps this way)".into(),
        Some(trap) => format!("trap: {trap}"),
        None => error.root_cause().to_string(),
    };
    let line = clip(text.lines().next().unwrap_or_default().trim());
    if line.starts_with("memory cap exceeded") {
        line
    } else if line.contains("count too high") {
        format!("{line} (a plugin instance may have at most 8 memories, 16 tables and 64 core instances)")
    } else if line.contains("memory") && (line.contains("limit") || line.contains("grow")) {
        format!("memory cap exceeded (plugins.memory_limit): {line}")
    } else {
        line
    }
}

/// The three policy plugins of a sidecar.
pub struct Plugins {
    pub router: RouterPolicy,
    pub evictor: Arc<EvictionPolicy>,
    pub admission: AdmissionPolicy,
}

/// Failure to load the configured plugins at start-up.
#[derive(Debug, thiserror::Error)]
#[error("{kind} plugin (plugins.{kind}.file): {error}")]
pub struct StartError {
    pub kind: Kind,
    pub error: String,
}

impl Plugins {
    /// Creates the plugin engine and loads every configured plugin. A plugin that fails to load
    /// at start-up is an error: the sidecar does not start with a policy other than the one
    /// configured.
    pub fn load(config: &Config) -> Result<Plugins, StartError> {
        let runtime = Arc::new(Runtime::new(&config.plugins).map_err(|error| StartError { kind: Kind::Router, error: format!("plugin engine: {error:#}") })?);
        let plugins = Plugins {
            router: RouterPolicy::new(Plugin::new(runtime.clone(), &config.plugins.router, config), config),
            evictor: Arc::new(EvictionPolicy::new(Plugin::new(runtime.clone(), &config.plugins.evictor, config))),
            admission: AdmissionPolicy::new(Plugin::new(runtime, &config.plugins.admission, config)),
        };
        for kind in Kind::ALL {
            if let Reloaded::Failed { error } = plugins.reload(kind) {
                return Err(StartError { kind, error });
            }
        }
        Ok(plugins)
    }

    /// Reloads every plugin whose file changed. Blocks; call it from a blocking task.
    pub fn reload_all(&self) -> Vec<(Kind, Reloaded)> {
        Kind::ALL.into_iter().map(|kind| (kind, self.reload(kind))).collect()
    }

    /// Reloads the plugin of `kind`.
    pub fn reload(&self, kind: Kind) -> Reloaded {
        match kind {
            Kind::Router => self.router.plugin.reload(),
            Kind::Evictor => self.evictor.plugin.reload(),
            Kind::Admission => self.admission.plugin.reload(),
        }
    }

    /// Returns the counters of the three policies.
    pub fn figures(&self) -> [PluginFigures; 3] {
        [self.router.plugin.figures(), self.evictor.plugin.figures(), self.admission.plugin.figures()]
    }

    /// Returns the component files to watch, with their kinds.
    pub fn files(&self) -> Vec<(Kind, PathBuf)> {
        [(Kind::Router, &self.router.plugin.path), (Kind::Evictor, &self.evictor.plugin.path), (Kind::Admission, &self.admission.plugin.path)]
            .into_iter()
            .filter_map(|(kind, path)| path.clone().map(|path| (kind, path)))
            .collect()
    }

    /// Returns the body of `/admin/plugins`.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "interface_version": runtime::INTERFACE_VERSION,
            "wasmtime": runtime::WASMTIME_VERSION,
            "plugins": [self.router.plugin.describe(), self.evictor.plugin.describe(), self.admission.plugin.describe()],
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    use super::{Gate, clip, printable};

    #[test]
    fn gate_waits_then_gives_up() {
        let gate = Gate { running: Mutex::new(0), freed: Condvar::new(), limit: 1 };
        let first = gate.enter(Duration::from_millis(10)).expect("a free turn");
        assert!(gate.enter(Duration::from_millis(20)).is_none());
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| gate.enter(Duration::from_secs(5)).is_some());
            std::thread::sleep(Duration::from_millis(20));
            drop(first);
            assert!(waiter.join().unwrap(), "a turn freed within the wait is taken");
        });
        assert_eq!(*gate.running.lock().unwrap(), 0);
    }

    #[test]
    fn plugin_text_is_cut_and_defused() {
        assert_eq!(printable("evil\nname\u{202E}"), "evil?name?");
        assert_eq!(printable(""), "unnamed");
        assert_eq!(printable(&"x".repeat(100)).len(), 64);
        assert_eq!(clip("line one\nline two\u{2028}end"), "line one line two end");
        assert!(clip(&"y".repeat(1000)).ends_with(" [cut]"));
    }
}
