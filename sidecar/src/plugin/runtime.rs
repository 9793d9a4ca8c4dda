//! The wasmtime engine that runs plugins: compilation with an on-disk artifact cache, the checks
//! a component must pass before it runs, and stores with a deadline and a memory cap.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Engine, ResourceLimiter, Store};

use super::Kind;
use crate::config::PluginsConfig;

/// Version of the wasmtime crate, part of every artifact's cache key.
pub const WASMTIME_VERSION: &str = "48.0.10";

/// Package of the policy interface, and the version of it this host implements.
pub const PACKAGE: &str = "kvsidecar:policy";
pub const INTERFACE_VERSION: &str = kvsidecar_sdk::INTERFACE_VERSION;

/// Time between two epoch ticks; deadlines are whole ticks.
const TICK: Duration = Duration::from_millis(1);

/// Largest component file accepted. The shipped plugins are about 300 KiB; compile time grows
/// with size and a large file stalls a core for seconds.
const MAX_COMPONENT_BYTES: u64 = 16 << 20;

/// State of one plugin instance's store: its memory budget.
pub struct HostState {
    limits: Budget,
}

/// Bytes a table element is counted as against the memory budget (a function reference).
const TABLE_ELEMENT_BYTES: usize = 16;

/// The memory budget of one instance: all its linear memories and tables together, which a
/// per-memory cap would not bound (a component may have several of each).
struct Budget {
    limit: usize,
    used: usize,
}

impl Budget {
    fn grow(&mut self, current: usize, desired: usize, what: &str) -> wasmtime::Result<bool> {
        let next = self.used.saturating_sub(current).saturating_add(desired);
        if next > self.limit {
            return Err(wasmtime::Error::msg(format!(
                "memory cap exceeded (plugins.memory_limit = {} bytes): growing a {what} would take the instance to {next} bytes",
                self.limit
            )));
        }
        self.used = next;
        Ok(true)
    }
}

impl ResourceLimiter for Budget {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.grow(current, desired, "memory")
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.grow(current.saturating_mul(TABLE_ELEMENT_BYTES), desired.saturating_mul(TABLE_ELEMENT_BYTES), "table")
    }

    fn instances(&self) -> usize {
        64
    }

    fn tables(&self) -> usize {
        16
    }

    fn memories(&self) -> usize {
        8
    }
}

/// Reason a component cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read plugin file {path}: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("plugin file {path} is {kind}, not a regular file; point the setting at a component file")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("plugin file {path} does not exist{}", shipped_hint(path))]
    Missing { path: PathBuf },
    #[error("plugin file {path} is {bytes} bytes; the limit is {MAX_COMPONENT_BYTES}")]
    TooLarge { path: PathBuf, bytes: u64 },
    #[error("plugin file {path} is not a valid WebAssembly component: {reason}. Build plugins with `kvsidecar plugin build`, which wraps the module as a component")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "plugin file {path} imports {imports}; kvsidecar plugins import nothing but {PACKAGE}/types. Build for wasm32-unknown-unknown (not wasm32-wasip1 or wasm32-wasip2) and avoid std APIs that need WASI (files, clocks, environment, printing)"
    )]
    Imports { path: PathBuf, imports: String },
    #[error("plugin file {path} exports {exports}; a plugin exports exactly one of {PACKAGE}/router, /evictor or /admission at version {INTERFACE_VERSION}")]
    Exports { path: PathBuf, exports: String },
    #[error("plugin file {path} is built against {PACKAGE}@{version}, but this kvsidecar implements {INTERFACE_VERSION}; rebuild the plugin with the SDK of this kvsidecar, or run a kvsidecar that implements {version}")]
    Version { path: PathBuf, version: String },
    #[error("plugin file {path} exports the {found} interface, but it is configured as plugins.{expected}.file; set it as plugins.{found}.file instead")]
    WrongKind { path: PathBuf, found: Kind, expected: Kind },
    #[error("plugin file {path} failed its load check: {reason}")]
    Check { path: PathBuf, reason: String },
}

/// A component that passed the checks, ready to instantiate.
pub struct Prepared {
    pub kind: Kind,
    /// The interface it exports, such as `kvsidecar:policy/router@0.1.0`.
    pub interface: String,
    pub sha256: String,
    pub pre: InstancePre<HostState>,
    /// Whether the compiled artifact came from the on-disk cache.
    pub cached: bool,
}

/// Summary of a component, as `kvsidecar plugin check` prints it.
pub struct Inspection {
    pub kind: Option<Kind>,
    pub interface_version: Option<String>,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    pub sha256: String,
    pub problem: Option<LoadError>,
}

/// The plugin engine: one per process.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: PathBuf,
    deadline_ticks: u64,
    memory_limit: usize,
}

impl Runtime {
    pub fn new(config: &PluginsConfig) -> anyhow::Result<Runtime> {
        let mut wasm = wasmtime::Config::new();
        // One compile thread leaves the other cores to requests while a new version compiles.
        wasm.wasm_component_model(true).epoch_interruption(true).cranelift_opt_level(wasmtime::OptLevel::Speed).parallel_compilation(false);
        let engine = Engine::new(&wasm).map_err(|error| anyhow::anyhow!("{error:#}"))?;
        start_ticker(&engine);
        let deadline_ticks = (config.deadline.as_micros() / TICK.as_micros()).max(1) as u64;
        let mut linker = Linker::new(&engine);
        // The types interface has no functions, so an empty instance satisfies its import.
        linker.instance(&format!("{PACKAGE}/types@{INTERFACE_VERSION}")).map_err(|error| anyhow::anyhow!("{error:#}"))?;
        Ok(Runtime {
            linker,
            engine,
            cache_dir: config.cache_dir.clone(),
            deadline_ticks,
            memory_limit: usize::try_from(config.memory_limit.as_u64()).unwrap_or(usize::MAX),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Returns a store whose calls stop at the configured deadline and whose memories and
    /// tables together cannot grow past the configured cap.
    pub fn store(&self) -> Store<HostState> {
        let limits = Budget { limit: self.memory_limit, used: 0 };
        let mut store = Store::new(&self.engine, HostState { limits });
        store.limiter(|state| &mut state.limits);
        store.set_epoch_deadline(self.deadline_ticks);
        store
    }

    /// Re-arms the deadline of `store` for the next call.
    pub fn arm(&self, store: &mut Store<HostState>) {
        store.set_epoch_deadline(self.deadline_ticks);
    }

    /// Reads, checks and compiles the component at `path` (or loads its compiled artifact from
    /// the cache) and prepares it for instantiation.
    pub fn prepare(&self, path: &Path) -> Result<Prepared, LoadError> {
        let bytes = read_component(path)?;
        let sha256 = hex_sha256(&bytes);
        let (component, cached) = self.compile(path, &bytes, &sha256)?;
        let (kind, interface) = check_component(&self.engine, path, &component)?;
        let pre = self.linker.instantiate_pre(&component).map_err(|error| LoadError::Invalid { path: path.into(), reason: format!("{error:#}") })?;
        Ok(Prepared { kind, interface, sha256, pre, cached })
    }

    /// Returns the component's kind, imports and exports without running it.
    pub fn inspect(&self, path: &Path) -> Result<Inspection, LoadError> {
        let bytes = read_component(path)?;
        let sha256 = hex_sha256(&bytes);
        let component = Component::new(&self.engine, &bytes).map_err(|error| LoadError::Invalid { path: path.into(), reason: format!("{error:#}") })?;
        let (imports, exports) = names(&self.engine, &component);
        let problem = check_component(&self.engine, path, &component).err();
        let known = exports.iter().find_map(|name| Kind::from_export(name));
        Ok(Inspection {
            kind: known.map(|(kind, _)| kind),
            interface_version: known.map(|(_, version)| version.to_string()),
            imports,
            exports,
            sha256,
            problem,
        })
    }

    /// Compiles `bytes`, or loads the artifact a previous compile left in the cache. The cache
    /// key covers the component's SHA-256, the wasmtime version and the engine settings, so an
    /// artifact is only ever loaded into the engine that wrote it.
    fn compile(&self, path: &Path, bytes: &[u8], sha256: &str) -> Result<(Component, bool), LoadError> {
        let artifact = self.cache_dir.join(format!("{sha256}-{}.cwasm", self.engine_key()));
        if artifact.is_file() {
            // SAFETY: the artifact was written by `Component::serialize` of an engine with the
            // same version and settings (both are in its name), into a folder of this process's
            // data directory, and files there are only ever replaced by rename, never rewritten
            // while mapped. A file placed there by someone else could run arbitrary code, as a
            // replaced kvsidecar binary could.
            match unsafe { Component::deserialize_file(&self.engine, &artifact) } {
                Ok(component) => return Ok((component, true)),
                Err(error) => {
                    tracing::warn!(artifact = %artifact.display(), error = %error, "compiled plugin artifact is unusable; compiling again");
                    let _ = std::fs::remove_file(&artifact);
                }
            }
        }
        let component = Component::new(&self.engine, bytes).map_err(|error| LoadError::Invalid { path: path.into(), reason: format!("{error:#}") })?;
        if let Err(error) = self.write_artifact(&component, &artifact) {
            tracing::warn!(artifact = %artifact.display(), error = %error, "failed to cache the compiled plugin; it will be compiled again next time");
        }
        Ok((component, false))
    }

    fn write_artifact(&self, component: &Component, artifact: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.cache_dir)?;
        let serialized = component.serialize().map_err(|error| anyhow::anyhow!("{error:#}"))?;
        let mut temporary = tempfile::NamedTempFile::new_in(&self.cache_dir)?;
        std::io::Write::write_all(&mut temporary, &serialized)?;
        temporary.as_file().sync_all()?;
        temporary.persist(artifact)?;
        Ok(())
    }

    /// Hex digest of the wasmtime version and the engine's compatibility hash.
    fn engine_key(&self) -> String {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        WASMTIME_VERSION.hash(&mut hasher);
        self.engine.precompile_compatibility_hash().hash(&mut hasher);
        format!("{:016x}", hasher.finish())
    }
}

/// File names of the shipped plugins.
const SHIPPED: [&str; 5] = ["prefix-affinity.wasm", "least-loaded.wasm", "lru.wasm", "cost-aware.wasm", "min-tokens.wasm"];

/// Returns how to build a missing shipped plugin, or nothing for other files.
fn shipped_hint(path: &Path) -> String {
    let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
    if !SHIPPED.contains(&name) {
        return String::new();
    }
    ". It is a shipped plugin: build them with `kvsidecar plugin build -- --manifest-path KVSIDECAR_CHECKOUT/Cargo.toml -p prefix-affinity -p least-loaded -p lru -p cost-aware -p min-tokens`, which writes them to the folder `plugins` beside the kvsidecar binary (the default plugins.dir)".into()
}

fn read_component(path: &Path) -> Result<Vec<u8>, LoadError> {
    use std::io::Read;

    let read_error = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => LoadError::Missing { path: path.into() },
        _ => LoadError::Read { path: path.into(), cause: source },
    };
    let invalid = |reason: String| LoadError::Invalid { path: path.into(), reason };
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        // A FIFO put in place of the file must not block the open.
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(LoadError::NotAFile { path: path.into(), kind: file_kind(&meta.file_type()) });
    }
    if meta.len() > MAX_COMPONENT_BYTES {
        return Err(LoadError::TooLarge { path: path.into(), bytes: meta.len() });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // Bounded, in case the file grows while it is read.
    file.take(MAX_COMPONENT_BYTES + 1).read_to_end(&mut bytes).map_err(read_error)?;
    if bytes.len() as u64 > MAX_COMPONENT_BYTES {
        return Err(LoadError::TooLarge { path: path.into(), bytes: bytes.len() as u64 });
    }
    if !bytes.starts_with(b"\0asm") {
        let start: Vec<String> = bytes.iter().take(4).map(|byte| format!("{byte:02x}")).collect();
        let found = if start.is_empty() { "nothing (the file is empty)".to_string() } else { start.join(" ") };
        return Err(invalid(format!("not a WebAssembly file: it starts with {found}, not 00 61 73 6d")));
    }
    Ok(bytes)
}

/// Names a file type that is not a regular file.
fn file_kind(kind: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_char_device() {
            return "a character device";
        }
        if kind.is_block_device() {
            return "a block device";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    if kind.is_dir() { "a folder" } else { "not a regular file" }
}

pub fn hex_sha256(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Returns the names of the component's imports and exports.
fn names(engine: &Engine, component: &Component) -> (Vec<String>, Vec<String>) {
    let ty = component.component_type();
    let imports = ty.imports(engine).map(|(name, _)| name.to_string()).collect();
    let exports = ty.exports(engine).map(|(name, _)| name.to_string()).collect();
    (imports, exports)
}

/// Checks that the component imports nothing but the interface's own types and exports exactly
/// one policy interface of this version, and returns its kind and export name.
fn check_component(engine: &Engine, path: &Path, component: &Component) -> Result<(Kind, String), LoadError> {
    let ty = component.component_type();
    let other_version = ty
        .imports(engine)
        .map(|(name, _)| name.to_string())
        .chain(ty.exports(engine).map(|(name, _)| name.to_string()))
        .find_map(|name| name.strip_prefix(PACKAGE).and_then(|rest| rest.split_once('@')).map(|(_, version)| version.to_string()))
        .filter(|version| version != INTERFACE_VERSION);
    if let Some(version) = other_version {
        return Err(LoadError::Version { path: path.into(), version });
    }
    let foreign: Vec<String> = ty
        .imports(engine)
        .filter(|(name, item)| !is_types_import(engine, name, &item.ty))
        .map(|(name, _)| name.to_string())
        .collect();
    if !foreign.is_empty() {
        return Err(LoadError::Imports { path: path.into(), imports: foreign.join(", ") });
    }
    let exports: Vec<String> = ty.exports(engine).map(|(name, _)| name.to_string()).collect();
    let policies: Vec<(Kind, &str)> = exports.iter().filter_map(|name| Kind::from_export(name)).collect();
    match policies.as_slice() {
        [(kind, version)] if *version == INTERFACE_VERSION => Ok((*kind, kind.export_name())),
        _ => Err(LoadError::Exports { path: path.into(), exports: if exports.is_empty() { "nothing".into() } else { exports.join(", ") } }),
    }
}

/// Returns whether an import is the interface's `types`, which contains only records and enums
/// and so may be imported as an instance with no functions.
fn is_types_import(engine: &Engine, name: &str, item: &ComponentItem) -> bool {
    let types_interface = format!("{PACKAGE}/types@{INTERFACE_VERSION}");
    match item {
        ComponentItem::ComponentInstance(instance) if name == types_interface => {
            instance.exports(engine).all(|(_, export)| matches!(export.ty, ComponentItem::Type(_)))
        }
        _ => false,
    }
}

/// Advances the engine's epoch every tick from a thread that ends with the engine.
fn start_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new().name("kvsidecar-plugin-epoch".into()).spawn(move || {
        loop {
            std::thread::sleep(TICK);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => break,
            }
        }
    });
    if let Err(error) = spawned {
        tracing::error!(error = %error, "failed to start the plugin deadline thread; plugin calls have no deadline");
    }
}
