//! The `kvsidecar plugin` commands: scaffold a policy crate, build it into a component, and
//! check a component the way the sidecar does before it loads one.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use super::runtime::Runtime;
use super::{Kind, Plugin, Reloaded};
use crate::config::{Config, PluginConfig};

/// The target plugins are built for: no WASI, so a plugin imports nothing.
pub const TARGET: &str = "wasm32-unknown-unknown";

/// Location of the SDK when this binary was built. `plugin new` uses it when it still exists.
const BUILD_SDK_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../sdk");

/// Creates a policy crate named `name` of `kind` in `parent`, with a working example policy and
/// a native test. Returns the crate's folder.
pub fn scaffold(name: &str, kind: Kind, parent: &Path, sdk: Option<&Path>) -> anyhow::Result<PathBuf> {
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') && name.starts_with(|c: char| c.is_ascii_lowercase());
    if !valid {
        bail!("invalid plugin name {name:?}: use lowercase letters, digits and hyphens, starting with a letter, such as \"my-router\"");
    }
    let dir = parent.join(name);
    if dir.exists() {
        bail!("{} already exists; choose another name or folder", dir.display());
    }
    let sdk = match sdk {
        Some(path) => path.to_path_buf(),
        None => {
            let built = PathBuf::from(BUILD_SDK_DIR);
            if !built.join("Cargo.toml").is_file() {
                bail!("the kvsidecar SDK is not at {}; pass --sdk with the path of kvsidecar's sdk folder", built.display());
            }
            built
        }
    };
    let sdk = std::fs::canonicalize(&sdk).with_context(|| format!("cannot find the SDK folder {}", sdk.display()))?;
    let manifest = format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n[lib]\ncrate-type = [\"cdylib\", \"rlib\"]\n\n[dependencies]\nkvsidecar-sdk = {{ path = \"{}\" }}\n\n# A workspace of its own, so the crate builds wherever it is placed.\n[workspace]\n\n[profile.release]\nopt-level = \"s\"\nlto = true\ncodegen-units = 1\npanic = \"abort\"\n",
        sdk.display()
    );
    let source = match kind {
        Kind::Router => ROUTER_TEMPLATE,
        Kind::Evictor => EVICTOR_TEMPLATE,
        Kind::Admission => ADMISSION_TEMPLATE,
    };
    std::fs::create_dir_all(dir.join("src")).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("Cargo.toml"), manifest)?;
    std::fs::write(dir.join("src/lib.rs"), source)?;
    std::fs::write(dir.join(".gitignore"), "/target\n")?;
    Ok(dir)
}

/// Builds the plugin crates selected by `cargo_args` (such as `--manifest-path` and `-p`) for
/// `target` (normally [`TARGET`]) in release mode, wraps each module as a component, and writes
/// it to `out/<crate-name>.wasm` by rename, so a watching sidecar never loads a partial file.
pub fn build(target: &str, cargo_args: &[String], out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if let Some(given) = cargo_args.iter().find(|arg| *arg == "--target" || arg.starts_with("--target=")) {
        bail!("`{given}` is not allowed here: plugins are built for {TARGET}, and other targets (such as wasm32-wasip2) produce components that import WASI, which kvsidecar rejects");
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(&cargo)
        .args(["build", "--release", "--target", target, "--message-format=json-render-diagnostics"])
        // Debug info would make up most of a component's bytes.
        .args(["--config", "profile.release.strip=\"debuginfo\""])
        .args(cargo_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot run {}; is Rust installed?", Path::new(&cargo).display()))?;
    let mut modules = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if message["reason"] != "compiler-artifact" {
                continue;
            }
            let is_cdylib = message["target"]["crate_types"].as_array().is_some_and(|types| types.iter().any(|kind| kind == "cdylib"));
            let name = message["target"]["name"].as_str().unwrap_or_default().replace('_', "-");
            let wasm = message["filenames"].as_array().and_then(|files| files.iter().filter_map(|file| file.as_str()).find(|file| file.ends_with(".wasm")).map(PathBuf::from));
            if let (true, Some(wasm)) = (is_cdylib, wasm) {
                modules.push((name, wasm));
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo build failed ({status}); its errors are above");
    }
    if modules.is_empty() {
        bail!("cargo built no cdylib crate; a plugin crate needs `crate-type = [\"cdylib\", \"rlib\"]` under [lib]");
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut written = Vec::new();
    for (name, wasm) in modules {
        let bytes = std::fs::read(&wasm).with_context(|| format!("cannot read {}", wasm.display()))?;
        let component = componentize(&bytes).with_context(|| format!("cannot make a component of {}", wasm.display()))?;
        let target = out.join(format!("{name}.wasm"));
        let mut temporary = tempfile::NamedTempFile::new_in(out)?;
        std::io::Write::write_all(&mut temporary, &component)?;
        set_readable(temporary.as_file())?;
        temporary.persist(&target).with_context(|| format!("cannot write {}", target.display()))?;
        written.push(target);
    }
    Ok(written)
}

/// Makes a component file readable by all, like a file written by `cp`; the temporary file it
/// starts as is private.
fn set_readable(file: &std::fs::File) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    #[cfg(not(unix))]
    let _ = file;
    Ok(())
}

/// Wraps a core module built with the SDK as a component; a component is returned unchanged.
pub fn componentize(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    if is_component(bytes) {
        return Ok(bytes.to_vec());
    }
    wit_component::ComponentEncoder::default().module(bytes)?.validate(true).encode()
}

/// Returns whether `bytes` is a component rather than a core module (by the binary's layer field).
fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[6..8] == [1, 0]
}

/// Result of `kvsidecar plugin check`: labelled lines, and whether the sidecar would load the file.
pub struct CheckReport {
    pub lines: Vec<(String, String)>,
    pub ok: bool,
}

/// Inspects the component at `path` and runs the sidecar's load checks on it with `config` as
/// its config table and the deadline and memory cap of `settings`: imports, exports, interface
/// version, init, and a sample call.
pub fn check(path: &Path, config: toml::Table, settings: &Config) -> anyhow::Result<CheckReport> {
    // A relative path names a file in the current folder, not in plugins.dir.
    let path = &std::path::absolute(path).with_context(|| format!("invalid path {}", path.display()))?;
    let scratch = tempfile::tempdir()?;
    let mut settings = settings.clone();
    settings.plugins.cache_dir = scratch.path().to_path_buf();
    let runtime = std::sync::Arc::new(Runtime::new(&settings.plugins)?);
    let inspection = runtime.inspect(path)?;
    let list = |names: &[String]| if names.is_empty() { "none".to_string() } else { names.join(", ") };
    let mut lines = vec![
        ("file".to_string(), path.display().to_string()),
        ("sha256".to_string(), inspection.sha256.clone()),
        ("kind".to_string(), inspection.kind.map(|kind| kind.to_string()).unwrap_or_else(|| "unknown".into())),
        (
            "interface version".to_string(),
            format!("{} (this kvsidecar supports {})", inspection.interface_version.clone().unwrap_or_else(|| "none".into()), super::runtime::INTERFACE_VERSION),
        ),
        ("imports".to_string(), list(&inspection.imports)),
        ("exports".to_string(), list(&inspection.exports)),
    ];
    if let Some(problem) = inspection.problem {
        lines.push(("result".into(), format!("rejected: {problem}")));
        return Ok(CheckReport { lines, ok: false });
    }
    let setting = PluginConfig { file: Some(path.to_path_buf()), on_failure: crate::config::OnFailure::Fallback, config };
    let outcome = match inspection.kind {
        Some(Kind::Router) => Plugin::<super::router::RouterInterface>::new(runtime, &setting, &settings).reload_described(),
        Some(Kind::Evictor) => Plugin::<super::evictor::EvictorInterface>::new(runtime, &setting, &settings).reload_described(),
        Some(Kind::Admission) => Plugin::<super::admission::AdmissionInterface>::new(runtime, &setting, &settings).reload_described(),
        None => (Reloaded::Failed { error: "no policy interface exported".into() }, None),
    };
    let ok = match outcome {
        (Reloaded::Loaded { .. }, Some((name, version))) => {
            lines.push(("plugin".into(), format!("{name} {version}")));
            lines.push(("result".into(), "ok: init and a sample call succeeded".into()));
            true
        }
        (Reloaded::Failed { error }, _) => {
            lines.push(("result".into(), format!("rejected: {error}")));
            false
        }
        (other, _) => {
            lines.push(("result".into(), format!("{other:?}")));
            false
        }
    };
    Ok(CheckReport { lines, ok })
}

const ROUTER_TEMPLATE: &str = r#"//! A kvsidecar router: the slot holding the longest prefix of the prompt serves it.

use kvsidecar_sdk::{Candidate, CandidateKind, Config, Decision, Request, Router};

pub struct Policy;

impl Router for Policy {
    fn new(config: &Config) -> Result<Self, String> {
        // Read settings here, for example `config.u64("imbalance", 4)?`.
        let _ = config;
        Ok(Policy)
    }

    fn route(&mut self, _request: &Request, candidates: &[Candidate]) -> Decision {
        // The engine slot with the longest matched prefix, then the lowest load; it reuses its own KV.
        let best = (0..candidates.len())
            .filter(|&index| candidates[index].kind == CandidateKind::EngineSlot)
            .max_by_key(|&index| (candidates[index].matched_tokens, std::cmp::Reverse(candidates[index].total_load())));
        match best {
            Some(index) => Decision::serve(index, candidates.len()),
            None => Decision::default(),
        }
    }
}

#[cfg(target_arch = "wasm32")]
kvsidecar_sdk::export_router!(Policy);

#[cfg(test)]
mod tests {
    use kvsidecar_sdk::testing::RouterHarness;
    use kvsidecar_sdk::{Candidate, Request};

    #[test]
    fn route_longest_prefix_serves() {
        let mut router = RouterHarness::<super::Policy>::new("").unwrap();
        let candidates = [Candidate::slot(0).matched(10), Candidate::slot(1).matched(200)];
        let choice = router.route(&Request::default(), &candidates).unwrap();
        assert_eq!((choice.serve, choice.kv_source), (1, Some(1)));
    }
}
"#;

const EVICTOR_TEMPLATE: &str = r#"//! A kvsidecar evictor: the oldest snapshots leave first.

use std::collections::BTreeMap;

use kvsidecar_sdk::{Config, Evictor, Snapshot};

#[derive(Default)]
pub struct Policy {
    /// Creation time, id and size of each stored snapshot.
    stored: BTreeMap<(u64, String), u64>,
}

impl Evictor for Policy {
    fn new(_config: &Config) -> Result<Self, String> {
        Ok(Policy::default())
    }

    fn on_insert(&mut self, snapshot: Snapshot) {
        self.stored.insert((snapshot.created_ms, snapshot.id), snapshot.bytes);
    }

    fn on_access(&mut self, _snapshot: Snapshot) {}

    fn on_remove(&mut self, id: &str) {
        self.stored.retain(|(_, stored), _| stored != id);
    }

    fn choose_victims(&mut self, bytes: u64) -> Vec<String> {
        let mut freed = 0;
        let mut victims = Vec::new();
        for ((_, id), size) in &self.stored {
            if freed >= bytes {
                break;
            }
            freed += size;
            victims.push(id.clone());
        }
        victims
    }
}

#[cfg(target_arch = "wasm32")]
kvsidecar_sdk::export_evictor!(Policy);

#[cfg(test)]
mod tests {
    use kvsidecar_sdk::testing::EvictorHarness;

    #[test]
    fn evict_oldest_first() {
        let mut evictor = EvictorHarness::<super::Policy>::new("").unwrap();
        evictor.insert("old", 100, 10, 5.0);
        evictor.insert("new", 100, 10, 5.0);
        assert_eq!(evictor.evict(50).unwrap(), vec!["old".to_string()]);
    }
}
"#;

const ADMISSION_TEMPLATE: &str = r#"//! A kvsidecar admission policy: stores snapshots of long prompts only.

use kvsidecar_sdk::{Admission, AdmissionCandidate, Config};

pub struct Policy {
    min_tokens: u64,
}

impl Admission for Policy {
    fn new(config: &Config) -> Result<Self, String> {
        Ok(Policy { min_tokens: config.u64("min_tokens", 512)? })
    }

    fn admit(&mut self, candidate: &AdmissionCandidate) -> bool {
        u64::from(candidate.tokens) >= self.min_tokens
    }
}

#[cfg(target_arch = "wasm32")]
kvsidecar_sdk::export_admission!(Policy);

#[cfg(test)]
mod tests {
    use kvsidecar_sdk::AdmissionCandidate;
    use kvsidecar_sdk::testing::AdmissionHarness;

    #[test]
    fn admit_rejects_short_prompt() {
        let mut admission = AdmissionHarness::<super::Policy>::new("min_tokens = 100").unwrap();
        assert!(admission.admit(&AdmissionCandidate { tokens: 100, ..Default::default() }));
        assert!(!admission.admit(&AdmissionCandidate { tokens: 99, ..Default::default() }));
    }
}
"#;
