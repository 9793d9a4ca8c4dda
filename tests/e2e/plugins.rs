//! Policy plugins seen from outside: the shipped plugins in the default configuration, a router
//! that changes the serving slot, faulty plugins that must not take requests down, WASI imports
//! rejected, and hot swaps under load. Every plugin here is built from source by the harness.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvsidecar_tests::{Engine, Reply, Sidecar, SidecarSpec, Workspace, get, send, test_plugins, tokens};
use serde_json::{Value, json};

/// Sends a short native completion of `prompt`, with the task id header when given.
async fn complete(sidecar: &Sidecar, prompt: &[u32], task: Option<&str>) -> Reply {
    let body = json!({"prompt": prompt, "n_predict": 1, "temperature": 0.0});
    let mut headers = vec![("content-type", "application/json")];
    if let Some(task) = task {
        headers.push(("x-task-id", task));
    }
    send(http::Method::POST, &format!("{}/completion", sidecar.url), body.to_string().into(), &headers).await.expect("completion request")
}

fn served_slot(reply: &Reply) -> u32 {
    reply.header("x-kvsidecar-slot").and_then(|slot| slot.parse().ok()).unwrap_or_else(|| panic!("no slot header in {:?}", reply.headers))
}

/// Returns the `/admin/plugins` entry of `kind`.
async fn plugin(sidecar: &Sidecar, kind: &str) -> Value {
    let listing = get(&format!("{}/admin/plugins", sidecar.admin_url)).await.expect("admin plugins").json();
    listing["plugins"].as_array().expect("plugin list").iter().find(|entry| entry["kind"] == kind).cloned().expect("plugin of kind")
}

fn count(entry: &Value, field: &str) -> u64 {
    entry[field].as_u64().unwrap_or_else(|| panic!("{field} missing in {entry}"))
}

/// Returns a sidecar spec of `ws` with extra `KVSIDECAR_*` settings.
fn spec(ws: &Workspace, engine: &Engine, settings: &[(&str, &str)]) -> SidecarSpec {
    let mut spec = ws.sidecar(engine);
    spec.env.extend(settings.iter().map(|(key, value)| (key.to_string(), value.to_string())));
    spec
}

fn test_plugin(name: &str) -> String {
    test_plugins().join(format!("{name}.wasm")).display().to_string()
}

#[tokio::test]
async fn shipped_plugins_serve_default_config() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(2), &ws.logs()).await.unwrap();
    let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    for seed in 0..4 {
        let reply = complete(&sidecar, &tokens(100 + seed, 300), None).await;
        assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    }
    let stats = sidecar.wait_stats(Duration::from_secs(30), |s| s["requests"]["snapshots_saved"].as_u64() >= Some(4)).await;
    assert_eq!(stats["requests"]["snapshots_saved"], 4, "{stats}");

    let router = plugin(&sidecar, "router").await;
    let evictor = plugin(&sidecar, "evictor").await;
    let admission = plugin(&sidecar, "admission").await;
    assert_eq!(router["name"], "prefix-affinity");
    assert_eq!(evictor["name"], "cost-aware");
    assert_eq!(admission["name"], "min-tokens");
    assert_eq!(count(&router, "calls"), 4, "{router}");
    assert_eq!(count(&admission, "calls"), 4, "{admission}");
    // One insert event per stored snapshot.
    assert!(count(&evictor, "calls") >= 4, "{evictor}");
    for entry in [&router, &evictor, &admission] {
        assert_eq!(count(entry, "failures"), 0, "{entry}");
        assert_eq!(entry["sha256"].as_str().map(str::len), Some(64), "{entry}");
        assert_eq!(entry["interface"], format!("kvsidecar:policy/{}@0.1.0", entry["kind"].as_str().unwrap()));
    }
}

#[tokio::test]
async fn second_candidate_router_changes_slot() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(2), &ws.logs()).await.unwrap();
    let prompt = tokens(7, 200);

    // The built-in router keeps a repeated prompt on the slot that contains it: slot 0.
    let mut builtin = Sidecar::start(&spec(&ws, &engine, &[("KVSIDECAR_PLUGINS_ROUTER_FILE", "builtin")]), &ws.logs()).await.unwrap();
    for _ in 0..3 {
        assert_eq!(served_slot(&complete(&builtin, &prompt, None).await), 0);
    }
    builtin.terminate();

    let pick_second = test_plugin("pick-second");
    let sidecar = Sidecar::start(&spec(&ws, &engine, &[("KVSIDECAR_PLUGINS_ROUTER_FILE", &pick_second)]), &ws.logs()).await.unwrap();
    for _ in 0..3 {
        let reply = complete(&sidecar, &prompt, None).await;
        assert_eq!(reply.status, 200);
        assert_eq!(served_slot(&reply), 1);
    }
    let router = plugin(&sidecar, "router").await;
    assert_eq!(router["name"], "pick-second");
    assert_eq!(count(&router, "calls"), 3);
}

/// Starts a sidecar whose router is the faulty test plugin with `fault`, sends a request that
/// triggers the fault and one that does not, and checks the outcome of each.
async fn faulty_router(fault: &str, on_failure: &str) {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(2), &ws.logs()).await.unwrap();
    let file = test_plugin("faulty-router");
    let config = format!("{{ fault = \"{fault}\" }}");
    let settings = [
        ("KVSIDECAR_PLUGINS_ROUTER_FILE", file.as_str()),
        ("KVSIDECAR_PLUGINS_ROUTER_CONFIG", config.as_str()),
        ("KVSIDECAR_PLUGINS_ROUTER_ON_FAILURE", on_failure),
        ("KVSIDECAR_PLUGINS_MEMORY_LIMIT", "16MiB"),
        ("KVSIDECAR_PLUGINS_DEADLINE", "50ms"),
    ];
    let sidecar = Sidecar::start(&spec(&ws, &engine, &settings), &ws.logs()).await.unwrap();
    let prompt = tokens(9, 64);

    for round in 1..=2u64 {
        let started = Instant::now();
        let failed = complete(&sidecar, &prompt, Some("fault")).await;
        if on_failure == "reject" {
            assert_eq!(failed.status, 503, "{}", String::from_utf8_lossy(&failed.body));
            assert_eq!(failed.json()["error"]["code"], "policy_failed");
            assert!(failed.json()["error"]["message"].as_str().unwrap().contains("faulty-router"), "{}", failed.json());
        } else {
            assert_eq!(failed.status, 200, "{}", String::from_utf8_lossy(&failed.body));
            // The built-in router served it: the repeated prompt stays on slot 0.
            assert_eq!(served_slot(&failed), 0);
        }
        assert!(started.elapsed() < Duration::from_secs(5), "the fault took {:?}", started.elapsed());
        let router = plugin(&sidecar, "router").await;
        assert_eq!(count(&router, "failures"), round, "{router}");

        // The sidecar stays healthy and the plugin's next call works, on a fresh instance.
        assert_eq!(get(&format!("{}/healthz", sidecar.url)).await.unwrap().status, 200);
        let next = complete(&sidecar, &prompt, None).await;
        assert_eq!(next.status, 200);
        assert_eq!(served_slot(&next), 1, "the plugin serves on the second candidate");
        let router = plugin(&sidecar, "router").await;
        assert_eq!(count(&router, "failures"), round, "{router}");
    }
    let router = plugin(&sidecar, "router").await;
    let counter = if on_failure == "reject" { "rejections" } else { "fallbacks" };
    assert_eq!(count(&router, counter), 2, "{router}");
    // Failures are logged at most once per warning interval.
    assert_eq!(sidecar.log().matches("plugin call failed").count(), 1, "{}", sidecar.log());
}

#[tokio::test]
async fn router_loop_stopped_at_deadline() {
    faulty_router("loop", "fallback").await;
}

#[tokio::test]
async fn router_memory_growth_capped() {
    faulty_router("memory", "fallback").await;
}

#[tokio::test]
async fn router_panic_gets_fresh_instance() {
    faulty_router("trap", "fallback").await;
}

#[tokio::test]
async fn router_wrong_score_count_falls_back() {
    faulty_router("wrong-length", "fallback").await;
}

#[tokio::test]
async fn router_nan_scores_fall_back() {
    faulty_router("nan", "fallback").await;
}

#[tokio::test]
async fn router_empty_scores_fall_back() {
    faulty_router("empty", "fallback").await;
}

#[tokio::test]
async fn router_failure_with_reject_is_503() {
    faulty_router("trap", "reject").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_router_leaves_engine_checks_alone() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(2), &ws.logs()).await.unwrap();
    let file = test_plugin("faulty-router");
    // Every faulty call runs for the whole deadline, longer than the engine health check's timeout.
    let settings = [
        ("KVSIDECAR_PLUGINS_ROUTER_FILE", file.as_str()),
        ("KVSIDECAR_PLUGINS_ROUTER_CONFIG", "{ fault = \"loop\" }"),
        ("KVSIDECAR_PLUGINS_DEADLINE", "5s"),
        ("KVSIDECAR_PLUGINS_MAX_CONCURRENT_CALLS", "2"),
    ];
    let sidecar = Arc::new(Sidecar::start(&spec(&ws, &engine, &settings), &ws.logs()).await.unwrap());
    let mut clients = Vec::new();
    // More concurrent calls than the sidecar has async workers (one per core here), and than
    // it runs plugin calls at once.
    for client in 0..3u64 {
        let sidecar = sidecar.clone();
        clients.push(tokio::spawn(async move {
            complete(&sidecar, &tokens(700 + client, 32), Some("fault")).await.status
        }));
    }
    // While the plugin calls run, the sidecar keeps responding and checking the engine. A
    // call that held an async worker would delay these responses for up to the 5 s deadline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..10 {
        let started = Instant::now();
        let ready = get(&format!("{}/readyz", sidecar.url)).await.unwrap();
        assert_eq!(ready.status, 200, "{}", String::from_utf8_lossy(&ready.body));
        assert!(started.elapsed() < Duration::from_secs(2), "readyz took {:?} while plugin calls ran", started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for client in clients {
        assert_eq!(client.await.unwrap(), 200);
    }
    // Each call ran to the deadline or found both turns taken for a whole deadline, depending
    // on timing. The built-in router decided all three.
    let router = plugin(&sidecar, "router").await;
    assert_eq!(count(&router, "failures") + count(&router, "busy"), 3, "{router}");
    assert!(count(&router, "failures") >= 2, "{router}");
    assert_eq!(count(&router, "fallbacks"), 3, "{router}");
    assert!(!sidecar.log().contains("engine health check failed"), "{}", sidecar.log());
}

#[tokio::test]
async fn evictor_unknown_victims_fall_back() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    // The plugin returns valid victims for the load check's sample call and for its first
    // call on each instance, and names a snapshot that does not exist after that.
    let file = test_plugin("faulty-evictor");
    // About two snapshots of 200 tokens of the tiny model fit.
    let settings = [("KVSIDECAR_PLUGINS_EVICTOR_FILE", file.as_str()), ("KVSIDECAR_STORE_CAPACITY", "1MiB"), ("KVSIDECAR_STORE_CHUNK_SIZE", "64KiB")];
    let sidecar = Sidecar::start(&spec(&ws, &engine, &settings), &ws.logs()).await.unwrap();
    for seed in 0..5 {
        let reply = complete(&sidecar, &tokens(300 + seed, 200), None).await;
        assert_eq!(reply.status, 200);
        sidecar.wait_stats(Duration::from_secs(30), |s| s["requests"]["snapshots_saved"].as_u64() >= Some(seed + 1)).await;
    }
    let stats = sidecar.stats().await;
    assert_eq!(stats["requests"]["snapshots_saved"], 5, "{stats}");
    assert!(stats["store"]["bytes"].as_u64().unwrap() <= 1 << 20, "{stats}");
    assert!(stats["store"]["evicted"].as_u64().unwrap() >= 1, "{stats}");
    let evictor = plugin(&sidecar, "evictor").await;
    assert!(count(&evictor, "failures") >= 1, "{evictor}");
    assert_eq!(count(&evictor, "failures"), count(&evictor, "fallbacks"), "{evictor}");
    assert_eq!(get(&format!("{}/readyz", sidecar.url)).await.unwrap().status, 200);
}

#[tokio::test]
async fn wasi_importing_plugin_rejected() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(2), &ws.logs()).await.unwrap();
    let file = test_plugin("wasi-router");

    // At start-up: the sidecar exits with the reason and the fix.
    let mut sidecar = Sidecar::spawn(&spec(&ws, &engine, &[("KVSIDECAR_PLUGINS_ROUTER_FILE", &file)]), &ws.logs()).unwrap();
    let status = sidecar.wait_exit(Duration::from_secs(60));
    let log = sidecar.log();
    assert_eq!(status.and_then(|status| status.code()), Some(1), "sidecar started with a WASI plugin: {log}");
    assert!(log.contains("imports wasi:"), "{log}");
    assert!(log.contains("wasm32-unknown-unknown"), "{log}");

    // While serving: the new version is rejected, the serving one keeps deciding.
    let live = ws.path("live-plugins").join("router.wasm");
    replace(&test_plugins().join("pick-second.wasm"), &live);
    let live_text = live.display().to_string();
    let sidecar = Sidecar::start(&spec(&ws, &engine, &[("KVSIDECAR_PLUGINS_ROUTER_FILE", &live_text)]), &ws.logs()).await.unwrap();
    replace(Path::new(&file), &live);
    let reload = send(http::Method::POST, &format!("{}/admin/plugins/reload?kind=router", sidecar.admin_url), bytes::Bytes::new(), &[]).await.unwrap();
    assert_eq!(reload.status, 422, "{}", String::from_utf8_lossy(&reload.body));
    let router = plugin(&sidecar, "router").await;
    assert_eq!(router["name"], "pick-second", "{router}");
    assert!(count(&router, "reload_failures") >= 1, "{router}");
    assert!(router["last_reload_error"].as_str().is_some_and(|error| error.contains("imports wasi:")), "{router}");
    for _ in 0..3 {
        let reply = complete(&sidecar, &tokens(11, 40), None).await;
        assert_eq!(reply.status, 200);
        assert_eq!(served_slot(&reply), 1);
    }
    assert_eq!(get(&format!("{}/readyz", sidecar.url)).await.unwrap().status, 200);

    // The check command prints the imports and rejects the file.
    let output = std::process::Command::new(kvsidecar_tests::sidecar_binary()).args(["plugin", "check", &file]).output().unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{printed}");
    assert!(printed.contains("kind               router"), "{printed}");
    assert!(printed.contains("wasi:"), "{printed}");
    assert!(printed.contains("rejected"), "{printed}");
}

/// Copies `source` over `target` by rename, as a deploy tool would.
fn replace(source: &Path, target: &Path) {
    let temporary = target.with_extension("tmp");
    std::fs::copy(source, &temporary).unwrap();
    std::fs::rename(&temporary, target).unwrap();
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap()).iter().map(|byte| format!("{byte:02x}")).collect()
}

#[tokio::test]
async fn router_hot_swap_under_load() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(2), &ws.logs()).await.unwrap();
    let versions = [test_plugins().join("pick-first.wasm"), test_plugins().join("pick-second.wasm")];
    let live: PathBuf = ws.path("live-plugins").join("router.wasm");
    replace(&versions[0], &live);
    let live_text = live.display().to_string();
    let sidecar = Arc::new(Sidecar::start(&spec(&ws, &engine, &[("KVSIDECAR_PLUGINS_ROUTER_FILE", &live_text)]), &ws.logs()).await.unwrap());

    const CLIENTS: u64 = 4;
    const PER_CLIENT: u64 = 500;
    let failed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (sidecar, failed, done) = (sidecar.clone(), failed.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let prompt = tokens(500 + client, 24);
            for _ in 0..PER_CLIENT {
                let reply = complete(&sidecar, &prompt, None).await;
                if reply.status != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("request failed: {} {}", reply.status, String::from_utf8_lossy(&reply.body));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Swap between the versions while the clients run; after each swap, once /admin/plugins
    // shows the new version, every new request follows it.
    let probe = tokens(600, 24);
    let mut swaps = 0;
    while swaps < 20 || done.load(Ordering::Relaxed) < CLIENTS * PER_CLIENT {
        let next = (swaps + 1) % 2;
        replace(&versions[next], &live);
        let expected = sha256(&versions[next]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while plugin(&sidecar, "router").await["sha256"] != expected.as_str() {
            assert!(Instant::now() < deadline, "swap {swaps} not picked up: {}", plugin(&sidecar, "router").await);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        swaps += 1;
        let reply = complete(&sidecar, &probe, None).await;
        assert_eq!(reply.status, 200);
        assert_eq!(served_slot(&reply), next as u32, "after swap {swaps} the decision follows the new version");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A broken new version is rejected and the old one keeps serving.
    let serving = plugin(&sidecar, "router").await;
    let broken = ws.path("broken").join("router.wasm");
    std::fs::write(&broken, b"\0asm\x0d\0\x01\0not a component").unwrap();
    replace(&broken, &live);
    let reload = send(http::Method::POST, &format!("{}/admin/plugins/reload?kind=router", sidecar.admin_url), bytes::Bytes::new(), &[]).await.unwrap();
    assert_eq!(reload.status, 422, "{}", String::from_utf8_lossy(&reload.body));
    let after = plugin(&sidecar, "router").await;
    assert_eq!(after["sha256"], serving["sha256"]);
    assert!(after["last_reload_error"].as_str().is_some_and(|error| error.contains("not a valid WebAssembly component")), "{after}");

    for client in clients {
        client.await.unwrap();
    }
    assert!(swaps >= 20, "only {swaps} swaps");
    assert_eq!(done.load(Ordering::Relaxed), CLIENTS * PER_CLIENT);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed during swaps");
    let router = plugin(&sidecar, "router").await;
    assert_eq!(count(&router, "failures"), 0, "{router}");
    let expected_slot = if serving["name"] == "pick-first" { 0 } else { 1 };
    assert_eq!(served_slot(&complete(&sidecar, &probe, None).await), expected_slot);
}
