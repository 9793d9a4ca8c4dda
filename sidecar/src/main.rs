//! The `kvsidecar` binary: parses the command line, loads the configuration, and decides the exit code.

use std::process::ExitCode;

use clap::Parser;
use kvsidecar::cli::{Cli, Command, PluginCommand, PluginKindArg, TasksArgs};
use kvsidecar::plugin::{Kind, tool};
use kvsidecar::config::{self, Config};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => match load(&args) {
            Some(config) => serve(config),
            None => ExitCode::from(2),
        },
        Command::Config(args) => match load(&args) {
            Some(config) => {
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            None => ExitCode::from(2),
        },
        Command::Plugin(command) => plugin(command),
        Command::Tasks(args) => tasks(args),
    }
}

fn tasks(args: TasksArgs) -> ExitCode {
    let url = match &args.admin {
        Some(url) => url.clone(),
        None => match config::load(&args.overrides(), std::env::vars()) {
            Ok(config) => kvsidecar::ledger::command::admin_url(config.server.admin_listen),
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(2);
            }
        },
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: failed to start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kvsidecar::ledger::command::run(&url, args.top, args.by, args.json)) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn plugin(command: PluginCommand) -> ExitCode {
    let result = match command {
        PluginCommand::New { name, kind, path, sdk } => {
            let kind = match kind {
                PluginKindArg::Router => Kind::Router,
                PluginKindArg::Evictor => Kind::Evictor,
                PluginKindArg::Admission => Kind::Admission,
            };
            tool::scaffold(&name, kind, &path, sdk.as_deref()).map(|dir| {
                println!("created {kind} plugin crate {}", dir.display());
                println!("test it:  cargo test --manifest-path {}/Cargo.toml", dir.display());
                println!("build it: kvsidecar plugin build --out DIR -- --manifest-path {}/Cargo.toml", dir.display());
                true
            })
        }
        PluginCommand::Build { out, cargo_args } => {
            let default_folder = out.is_none();
            let out = out.unwrap_or_else(|| config::Config::defaults().plugins.dir);
            tool::build(tool::TARGET, &cargo_args, &out).map(|written| {
                for file in written {
                    let sha256 = std::fs::read(&file).map(|bytes| kvsidecar::plugin::runtime::hex_sha256(&bytes)).unwrap_or_default();
                    println!("wrote {} (sha256 {sha256})", file.display());
                }
                if default_folder {
                    println!("into the folder beside this kvsidecar binary, its default plugins.dir; choose another with --out");
                }
                true
            })
        }
        PluginCommand::Check { file, config } => {
            let table = match config.as_deref().map(config::plugin_table) {
                None => Ok(toml::Table::new()),
                Some(Ok(table)) => Ok(table),
                Some(Err(rule)) => Err(anyhow::anyhow!("invalid --config {:?}: {rule}", config.unwrap_or_default())),
            };
            // The deadline and memory cap come from the environment, as for `serve`.
            let settings = match config::load(&config::Overrides::default(), std::env::vars()) {
                Ok(settings) => settings,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::from(2);
                }
            };
            table.and_then(|table| tool::check(&file, table, &settings)).map(|report| {
                for (label, value) in &report.lines {
                    println!("{label:<18} {value}");
                }
                report.ok
            })
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(args: &kvsidecar::cli::ServeArgs) -> Option<Config> {
    match config::load(&args.overrides(), std::env::vars()) {
        Ok(config) => Some(config),
        Err(error) => {
            eprintln!("error: {error}");
            None
        }
    }
}

fn serve(config: Config) -> ExitCode {
    kvsidecar::telemetry::init_logging(&config);
    let telemetry = match kvsidecar::telemetry::Telemetry::start(&config) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: failed to start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(kvsidecar::server::serve(config, telemetry.clone(), shutdown_signal()));
    // Spans of the last requests are exported before the process exits.
    telemetry.shutdown(std::time::Duration::from_secs(2));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(error = %error, "failed to watch SIGTERM; only SIGINT stops the sidecar");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
