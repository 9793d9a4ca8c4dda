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
    kvsidecar_tests::shipped_plugins();
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

#[test]
fn plugin_new_build_check_flow() {
    let ws = Workspace::new();
    let parent = ws.path("policies");
    let run = |args: &[&str]| {
        let output = Command::new(sidecar_binary()).args(args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        (output.status.success(), text)
    };

    let (ok, text) = run(&["plugin", "new", "my-router", "--kind", "router", "--path", parent.to_str().unwrap()]);
    assert!(ok, "{text}");
    let manifest = parent.join("my-router/Cargo.toml");
    assert!(manifest.is_file(), "{text}");
    let (ok, text) = run(&["plugin", "new", "my-router", "--kind", "router", "--path", parent.to_str().unwrap()]);
    assert!(!ok, "{text}");
    assert!(text.contains("already exists"), "{text}");
    let (ok, text) = run(&["plugin", "new", "My Router", "--kind", "router", "--path", parent.to_str().unwrap()]);
    assert!(!ok, "{text}");
    assert!(text.contains("invalid plugin name"), "{text}");

    let out = ws.path("components");
    let (ok, text) = run(&["plugin", "build", "--out", out.to_str().unwrap(), "--", "--manifest-path", manifest.to_str().unwrap(), "--quiet"]);
    assert!(ok, "{text}");
    let component = out.join("my-router.wasm");
    assert!(component.is_file(), "{text}");

    let (ok, text) = run(&["plugin", "check", component.to_str().unwrap()]);
    assert!(ok, "{text}");
    for expected in ["kind               router", "interface version  0.1.0", "imports            kvsidecar:policy/types@0.1.0", "exports            kvsidecar:policy/router@0.1.0", "plugin             my-router 0.1.0", "result             ok"] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    let (ok, text) = run(&["plugin", "check", manifest.to_str().unwrap()]);
    assert!(!ok, "{text}");
    assert!(text.contains("not a valid WebAssembly component"), "{text}");
}
