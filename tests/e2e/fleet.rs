//! Sidecars as a fleet: identities, the authenticated peer API, and peer health. Each sidecar
//! has its own real llama-server; all listen on loopback ports.

use std::time::{Duration, Instant};

use kvsidecar_tests::{Engine, Sidecar, SidecarSpec, Workspace, free_ports, get, send};
use serde_json::Value;

const TOKEN: &str = kvsidecar_tests::FLEET_TOKEN;

fn member(ws: &Workspace, engine: &Engine, name: &str, port: u16, peers: &[u16]) -> SidecarSpec {
    kvsidecar_tests::fleet_member(ws, engine, name, port, peers)
}

async fn peers_of(sidecar: &Sidecar) -> Value {
    get(&format!("{}/admin/peers", sidecar.admin_url)).await.expect("admin peers").json()
}

/// Waits until `sidecar` lists exactly one peer and `accept` holds for it, and returns it.
async fn wait_peer(sidecar: &Sidecar, within: Duration, accept: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let listing = peers_of(sidecar).await;
        if let Some(peer) = listing["peers"].as_array().and_then(|peers| peers.first())
            && accept(peer)
        {
            return peer.clone();
        }
        assert!(Instant::now() < deadline, "peer state not reached: {listing}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn peers_see_each_other_and_restarts() {
    let ws = Workspace::new();
    let engine_a = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let engine_b = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let [port_a, port_b] = free_ports::<2>();
    let a = Sidecar::start(&member(&ws, &engine_a, "a", port_a, &[port_b]), &ws.logs()).await.unwrap();
    let spec_b = member(&ws, &engine_b, "b", port_b, &[port_a]);
    let mut b = Sidecar::start(&spec_b, &ws.logs()).await.unwrap();

    let seen_by_a = wait_peer(&a, Duration::from_secs(10), |peer| peer["alive"] == true).await;
    let seen_by_b = wait_peer(&b, Duration::from_secs(10), |peer| peer["alive"] == true).await;
    let id_a = peers_of(&a).await["self"]["node_id"].as_str().unwrap().to_string();
    let id_b = peers_of(&b).await["self"]["node_id"].as_str().unwrap().to_string();
    assert_eq!(seen_by_a["node_id"], id_b.as_str());
    assert_eq!(seen_by_b["node_id"], id_a.as_str());
    assert_ne!(id_a, id_b);
    assert_eq!(seen_by_a["engine_ready"], true);
    let generation = seen_by_a["generation"].as_str().unwrap().to_string();

    // B stops: A marks it dead within dead_after (1 s) plus a health interval.
    b.kill();
    let started = Instant::now();
    wait_peer(&a, Duration::from_secs(5), |peer| peer["alive"] == false).await;
    assert!(started.elapsed() < Duration::from_millis(2500), "dead after {:?}", started.elapsed());
    // The warning follows at the next failed health check.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !a.log().contains("peer dead") {
        assert!(Instant::now() < deadline, "no death warning: {}", a.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // B starts again on the same data folder: same node id, new generation.
    let _b = Sidecar::start(&spec_b, &ws.logs()).await.unwrap();
    let back = wait_peer(&a, Duration::from_secs(10), |peer| peer["alive"] == true).await;
    assert_eq!(back["node_id"], id_b.as_str());
    assert_ne!(back["generation"], generation.as_str());
}

#[tokio::test]
async fn peer_api_requires_the_token() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let [port] = free_ports::<1>();
    let _sidecar = Sidecar::start(&member(&ws, &engine, "a", port, &[]), &ws.logs()).await.unwrap();
    let base = format!("http://127.0.0.1:{port}");

    let good = format!("Bearer {TOKEN}");
    let reply = send(http::Method::GET, &format!("{base}/peer/v1/info"), bytes::Bytes::new(), &[("authorization", good.as_str())]).await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["node_id"].as_str().map(str::len), Some(32));

    let wrong = format!("Bearer {TOKEN}x");
    let short = format!("Bearer {}", &TOKEN[..10]);
    let lowercase = format!("bearer {TOKEN}");
    let zeros = "0".repeat(64);
    let snapshot = format!("/peer/v1/snapshot?namespace={zeros}&block={zeros}");
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let cases: [Case; 11] = [
        ("GET", "/peer/v1/info", &[]),
        ("GET", "/peer/v1/info", &[("authorization", wrong.as_str())]),
        ("GET", "/peer/v1/info", &[("authorization", short.as_str())]),
        ("GET", "/peer/v1/info", &[("authorization", lowercase.as_str())]),
        ("GET", "/peer/v1/info", &[("authorization", good.as_str()), ("authorization", good.as_str())]),
        ("GET", "/peer/v1/no-such-endpoint", &[]),
        ("POST", "/peer/v1/info", &[]),
        ("GET", "/peer/v1/index?since=0", &[]),
        ("GET", snapshot.as_str(), &[]),
        ("GET", snapshot.as_str(), &[("authorization", wrong.as_str())]),
        ("POST", "/peer/v1/forward/v1/completions", &[("authorization", short.as_str())]),
    ];
    for (method, path, headers) in cases {
        let reply = send(method.parse().unwrap(), &format!("{base}{path}"), bytes::Bytes::new(), headers).await.unwrap();
        assert_eq!(reply.status, 401, "{method} {path} {headers:?}");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        let body = String::from_utf8_lossy(&reply.body);
        assert!(!body.contains("node_id"), "{body}");
        assert!(!body.contains("no-such"), "{body}");
    }
}

#[test]
fn fleet_without_a_token_does_not_start() {
    kvsidecar_tests::shipped_plugins();
    let ws = Workspace::new();
    let [listen, admin] = free_ports::<2>();
    let output = std::process::Command::new(kvsidecar_tests::sidecar_binary())
        .args(["serve", "--listen", &format!("127.0.0.1:{listen}"), "--admin-listen", &format!("127.0.0.1:{admin}"), "--peers", "http://127.0.0.1:9"])
        .arg("--data-dir")
        .arg(ws.path("data"))
        .env_remove("KVSIDECAR_PEER_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no peer token"), "{stderr}");
    assert!(stderr.contains("--peer-token-file"), "{stderr}");
}

/// Sends a native completion of `prompt` and checks it succeeded.
async fn complete(sidecar: &Sidecar, prompt: &[u32]) {
    let body = serde_json::json!({"prompt": prompt, "n_predict": 1, "temperature": 0.0});
    let reply = kvsidecar_tests::post_json(&format!("{}/completion", sidecar.url), &body).await.unwrap();
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
}

#[tokio::test]
async fn peers_follow_index_changes() {
    let ws = Workspace::new();
    let engine_a = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let engine_b = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let [port_a, port_b] = free_ports::<2>();
    let mut spec_a = member(&ws, &engine_a, "a", port_a, &[port_b]);
    // Room for about three snapshots of 200 tokens, so later ones evict earlier ones.
    spec_a.env.extend([("KVSIDECAR_STORE_CAPACITY".to_string(), "1500KiB".to_string()), ("KVSIDECAR_STORE_CHUNK_SIZE".to_string(), "64KiB".to_string())]);
    let mut a = Sidecar::start(&spec_a, &ws.logs()).await.unwrap();
    let b = Sidecar::start(&member(&ws, &engine_b, "b", port_b, &[port_a]), &ws.logs()).await.unwrap();
    wait_peer(&b, Duration::from_secs(10), |peer| peer["alive"] == true).await;

    // Stores and evictions on A reach B's view of A within a second of each change.
    for seed in 0..6u64 {
        complete(&a, &kvsidecar_tests::tokens(40 + seed, 200)).await;
        let stats = a.wait_stats(Duration::from_secs(30), |s| s["requests"]["snapshots_saved"].as_u64() >= Some(seed + 1)).await;
        let stored = stats["store"]["entries"].as_u64().unwrap();
        let started = Instant::now();
        wait_peer(&b, Duration::from_secs(1), |peer| peer["index"]["snapshots"].as_u64() == Some(stored)).await;
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    let stats = a.stats().await;
    assert!(stats["store"]["evicted"].as_u64().unwrap() >= 1, "{stats}");
    let before = wait_peer(&b, Duration::from_secs(1), |_| true).await;

    // A restarts: B reads A's whole index again under A's new generation, and it matches A's store.
    a.kill();
    let a = Sidecar::start(&spec_a, &ws.logs()).await.unwrap();
    let entries = a.stats().await["store"]["entries"].as_u64().unwrap();
    // A's generation changes once more when its engine is probed, so wait for the index to
    // reach the generation A reports.
    wait_peer(&b, Duration::from_secs(10), |peer| {
        peer["alive"] == true
            && peer["index"]["generation"] != before["index"]["generation"]
            && peer["index"]["generation"] == peer["generation"]
            && peer["index"]["snapshots"].as_u64() == Some(entries)
    })
    .await;
}

#[tokio::test]
async fn index_churn_reaches_peers_quickly() {
    let ws = Workspace::new();
    let engine_a = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let engine_b = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let [port_a, port_b] = free_ports::<2>();
    let mut spec_a = member(&ws, &engine_a, "a", port_a, &[port_b]);
    // Every 64-token prompt is stored, and the small store evicts as fast as it stores.
    spec_a.env.extend([
        ("KVSIDECAR_SNAPSHOT_MIN_TOKENS".to_string(), "64".to_string()),
        ("KVSIDECAR_PLUGINS_ADMISSION_FILE".to_string(), "builtin".to_string()),
        ("KVSIDECAR_STORE_CAPACITY".to_string(), "1MiB".to_string()),
        ("KVSIDECAR_STORE_CHUNK_SIZE".to_string(), "16KiB".to_string()),
        ("KVSIDECAR_LOG_LEVEL".to_string(), "info".to_string()),
    ]);
    let a = Sidecar::start(&spec_a, &ws.logs()).await.unwrap();
    let mut spec_b = member(&ws, &engine_b, "b", port_b, &[port_a]);
    spec_b.env.push(("KVSIDECAR_PEERS_INDEX_BLOCKS".to_string(), "256".to_string()));
    let b = Sidecar::start(&spec_b, &ws.logs()).await.unwrap();
    wait_peer(&b, Duration::from_secs(10), |peer| peer["alive"] == true).await;

    // Each prompt is stored unless two saves are already running, and each store beyond the
    // first few evicts one snapshot. Prompts go in batches until over 1,000 index changes are
    // made, however many saves a slow machine skips.
    let mut sent = 0u64;
    let mut stats;
    loop {
        for _ in 0..100 {
            complete(&a, &kvsidecar_tests::tokens(10_000 + sent, 64)).await;
            sent += 1;
        }
        stats = a
            .wait_stats(Duration::from_secs(60), |s| {
                s["requests"]["snapshots_saved"].as_u64().unwrap_or(0) + s["requests"]["snapshots_skipped"].as_u64().unwrap_or(0) >= sent
            })
            .await;
        let changes = stats["store"]["inserted"].as_u64().unwrap() + stats["store"]["evicted"].as_u64().unwrap();
        if changes >= 1000 {
            break;
        }
        assert!(sent < 5000, "only {changes} index changes after {sent} prompts: {}", stats["store"]);
    }
    let entries = stats["store"]["entries"].as_u64().unwrap();
    let started = Instant::now();
    let seen = wait_peer(&b, Duration::from_secs(5), |peer| peer["index"]["snapshots"].as_u64() == Some(entries)).await;
    assert!(started.elapsed() < Duration::from_secs(1), "caught up after {:?}: {seen}", started.elapsed());
    // The index stays within peers.index_blocks (256 block hashes) through the churn.
    assert!(seen["index"]["blocks"].as_u64() <= Some(256), "{seen}");
}

#[tokio::test]
async fn unreachable_peer_is_warned_once() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    // Nothing listens on the peer's port.
    let [port, closed] = free_ports::<2>();
    let sidecar = Sidecar::start(&member(&ws, &engine, "a", port, &[closed]), &ws.logs()).await.unwrap();
    let warning = "peer unreachable since this sidecar started";
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sidecar.log().contains(warning) {
        assert!(Instant::now() < deadline, "no warning: {}", sidecar.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sidecar.log().matches(warning).count(), 1, "{}", sidecar.log());
    let listing = peers_of(&sidecar).await;
    let peer = &listing["peers"][0];
    assert_eq!(peer["alive"], false);
    assert!(peer["last_error"].as_str().is_some_and(|error| error.contains("unreachable")), "{listing}");
}
