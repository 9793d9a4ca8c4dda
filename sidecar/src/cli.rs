//! Command-line interface of the `kvsidecar` binary.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// kvsidecar: keeps prompt-prefix KV-cache snapshots beside an inference server and reuses them.
#[derive(Debug, Parser)]
#[command(name = "kvsidecar", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI-compatible API in front of an engine, with prefix KV snapshots.
    Serve(ServeArgs),
    /// Print the effective configuration (defaults, file, environment and flags) as TOML and exit.
    Config(ServeArgs),
    /// Write, build and check policy plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Print the tasks of a running sidecar that cost the most, with their tokens and costs.
    Tasks(TasksArgs),
}

/// Options of `kvsidecar tasks`.
#[derive(Debug, Args, Clone)]
pub struct TasksArgs {
    /// Print this many tasks, from 1 to 10000, the highest ranked first.
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub top: u32,
    /// Rank tasks by cost as served, cost saved by the cache, number of requests, or time of the
    /// last request.
    #[arg(long, value_enum, default_value = "cost")]
    pub by: crate::ledger::TopBy,
    /// Print the admin API's JSON response instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Base URL of the sidecar's admin API, such as http://127.0.0.1:9090 (default: from
    /// server.admin_listen of the configuration, with 0.0.0.0 read as 127.0.0.1).
    #[arg(long, value_name = "URL")]
    pub admin: Option<String>,
    /// Read the configuration from this TOML file, as `kvsidecar serve --config` does.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Ask the sidecar whose admin API listens on this address (server.admin_listen, default
    /// 127.0.0.1:9090).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
}

impl TasksArgs {
    /// Returns the configuration sources that `serve` would read for these options.
    pub fn overrides(&self) -> crate::config::Overrides {
        crate::config::Overrides { config_file: self.config.clone(), admin_listen: self.admin_listen.clone(), ..Default::default() }
    }
}

/// The kinds of policy plugin, as `--kind` spells them.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PluginKindArg {
    Router,
    Evictor,
    Admission,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Create a policy crate with a working example policy and a native test.
    New {
        /// Crate name: lowercase letters, digits and hyphens.
        name: String,
        /// Kind of policy the crate implements.
        #[arg(long, value_enum)]
        kind: PluginKindArg,
        /// Folder to create the crate in.
        #[arg(long, value_name = "DIR", default_value = ".")]
        path: PathBuf,
        /// The kvsidecar SDK folder (default: the one this binary was built from).
        #[arg(long, value_name = "DIR")]
        sdk: Option<PathBuf>,
    },
    /// Build plugin crates for wasm32-unknown-unknown and write each as a component.
    Build {
        /// Folder for the components (default: the plugins folder beside this executable, which
        /// is the default plugins.dir).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Arguments passed to `cargo build`, such as `--manifest-path my-router/Cargo.toml` or `-p name`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
    /// Check a component as the sidecar does before loading it, and print its kind, interface
    /// version, imports and exports.
    Check {
        /// The component file.
        file: PathBuf,
        /// The plugin's config table as TOML, such as '{ imbalance = 2 }' or 'imbalance = 2'.
        #[arg(long, value_name = "TOML")]
        config: Option<String>,
    },
}

/// Options of `kvsidecar serve`. Each overrides the config file and `KVSIDECAR_*` variables.
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Read the configuration from this TOML file.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Listen for clients on this address (server.listen, default 0.0.0.0:8080).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Serve the admin API on this address (server.admin_listen, default 127.0.0.1:9090).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Base URL of the llama-server beside this sidecar (engine.url, default http://127.0.0.1:8081).
    #[arg(long, value_name = "URL")]
    pub engine: Option<String>,
    /// Keep the snapshot store in this folder (store.data_dir, default ./kvsidecar-data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<String>,
    /// Folder shared with the engine's --slot-save-path (engine.slot_dir, default DATA_DIR/slots).
    #[arg(long, value_name = "DIR")]
    pub slot_dir: Option<String>,
    /// Peer APIs of the other sidecars of the fleet, comma-separated (peers.urls).
    #[arg(long, value_name = "URL,URL")]
    pub peers: Option<String>,
    /// Serve the peer API on this address (peers.listen, such as 0.0.0.0:9100; off by default).
    #[arg(long, value_name = "ADDR")]
    pub peer_listen: Option<String>,
    /// File holding the fleet's peer token (peers.token_file; or set KVSIDECAR_PEER_TOKEN).
    #[arg(long, value_name = "PATH")]
    pub peer_token_file: Option<String>,
}

impl ServeArgs {
    pub fn overrides(&self) -> crate::config::Overrides {
        crate::config::Overrides {
            config_file: self.config.clone(),
            listen: self.listen.clone(),
            admin_listen: self.admin_listen.clone(),
            engine: self.engine.clone(),
            data_dir: self.data_dir.clone(),
            slot_dir: self.slot_dir.clone(),
            peers: self.peers.clone(),
            peer_listen: self.peer_listen.clone(),
            peer_token_file: self.peer_token_file.clone(),
        }
    }
}
