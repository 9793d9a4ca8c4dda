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
        }
    }
}
