//! The command line as an operator sees it: invalid configuration and unusable addresses stop
//! `kvsidecar serve` before it listens, with every problem named.

use std::process::Command;

use kvsidecar_tests::{Workspace, sidecar_binary};

#[test]
fn invalid_config_lists_every_key_and_exits_2() {
    let ws = Workspace::new();
    let config = ws.dir.path().join("kvsidecar.toml");
    std::fs::write(&config, "[store]\ncapacity = \"huge\"\n\n[prefix]\nblock_tokens = 0\n").unwrap();

    let output = Command::new(sidecar_binary())
        .args(["serve", "--listen", "127.0.0.1:1", "--config"])
        .arg(&config)
        .env("KVSIDECAR_ENGINE_RESPONSE_TIMEOUT", "soon")
        .env("KVSIDECAR_SNAPSHOT_MIN_TOKEN", "5")
        .output()
        .unwrap();

    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let file = config.display().to_string();
    let expected = [
        "error: invalid configuration, 4 problem(s):".to_string(),
        "  - engine.response_timeout = \"soon\" (environment KVSIDECAR_ENGINE_RESPONSE_TIMEOUT): must be a duration with a unit, such as \"500ms\", \"5s\" or \"2m\"".to_string(),
        format!("  - prefix.block_tokens = 0 (file {file}): must be at least 1"),
        format!("  - store.capacity = \"huge\" (file {file}): must be a byte size such as \"512MiB\" or \"20GiB\", or a number of bytes"),
        "  - snapshot.min_token = \"5\" (environment KVSIDECAR_SNAPSHOT_MIN_TOKEN): unknown key in [snapshot]; config/kvsidecar.toml lists the known keys".to_string(),
    ];
    for line in &expected {
        assert!(stderr.lines().any(|l| l == line), "missing line {line:?} in:\n{stderr}");
    }
}

#[test]
fn busy_listen_address_fails_with_hint() {
    let ws = Workspace::new();
    let occupied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = occupied.local_addr().unwrap().to_string();

    let output = Command::new(sidecar_binary())
        .args(["serve", "--listen", &address, "--admin-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(ws.path("data"))
        .env("KVSIDECAR_LOG_FORMAT", "json")
        .output()
        .unwrap();

    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("error: failed to listen on {address} (client API)")), "{stderr}");
    assert!(stderr.contains("hint: choose a free address with --listen"), "{stderr}");
}
