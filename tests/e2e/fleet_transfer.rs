//! KV moving through the fleet: snapshots pulled from peers, requests forwarded to peers, and
//! what happens when a transfer breaks or arrives damaged. Every sidecar has its own real
//! llama-server with the tiny model; all listen on loopback ports.

use std::time::{Duration, Instant};

use kvsidecar_tests::{Engine, Fault, FaultProxy, Reply, Sidecar, SidecarSpec, Workspace, free_ports, get};
use serde_json::{Value, json};

const TOKEN: &str = kvsidecar_tests::FLEET_TOKEN;

/// Prompt tokens of the shared prompt: several blocks, above `snapshot.min_tokens`.
const PROMPT_TOKENS: usize = 512;

/// Returns a fleet member's spec (see `fleet_member`) that routes with the shipped
/// prefix-affinity router set to `forward`.
fn member(ws: &Workspace, engine: &Engine, name: &str, port: u16, peers: &[u16], forward: &str) -> SidecarSpec {
    let mut spec = kvsidecar_tests::fleet_member(ws, engine, name, port, peers);
    spec.env.extend([
        ("KVSIDECAR_PEERS_TRANSFER_TIMEOUT".to_string(), "20s".to_string()),
        ("KVSIDECAR_PLUGINS_ROUTER_CONFIG".to_string(), format!("forward = \"{forward}\"")),
    ]);
    spec
}

/// Starts `N` one-slot engines with the tiny model.
async fn start_engines<const N: usize>(ws: &Workspace) -> [Engine; N] {
    let mut engines = Vec::new();
    for _ in 0..N {
        engines.push(Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap());
    }
    engines.try_into().unwrap_or_else(|_| unreachable!("N engines were started"))
}

async fn node_id(sidecar: &Sidecar) -> String {
    let peers = get(&format!("{}/admin/peers", sidecar.admin_url)).await.unwrap().json();
    peers["self"]["node_id"].as_str().expect("node id").to_string()
}

/// Waits until every peer `sidecar` lists satisfies `accept`, and at least `count` are listed.
async fn wait_peers(sidecar: &Sidecar, count: usize, within: Duration, accept: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let listing = get(&format!("{}/admin/peers", sidecar.admin_url)).await.unwrap().json();
        let peers = listing["peers"].as_array().cloned().unwrap_or_default();
        if peers.len() >= count && peers.iter().all(&accept) {
            return;
        }
        assert!(Instant::now() < deadline, "peer state not reached: {listing}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a native completion of `prompt` at temperature 0 as `tenant`, and checks it succeeded.
async fn complete(sidecar: &Sidecar, prompt: &[u32], tenant: &str) -> Reply {
    let body = json!({"prompt": prompt, "n_predict": 8, "temperature": 0.0});
    let reply = kvsidecar_tests::send(http::Method::POST, &format!("{}/completion", sidecar.url), bytes::Bytes::from(body.to_string()), &[("content-type", "application/json"), ("x-kvsidecar-tenant", tenant)])
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    reply
}

fn content(reply: &Reply) -> String {
    reply.json()["content"].as_str().expect("completion content").to_string()
}

/// Waits until the fleet index of `sidecar` lists `snapshots` or more stored snapshots of `owner`.
async fn wait_index(sidecar: &Sidecar, owner: &str, snapshots: u64) {
    wait_peers(sidecar, 1, Duration::from_secs(10), |peer| peer["node_id"] != owner || peer["index"]["snapshots"].as_u64() >= Some(snapshots)).await;
}

/// Computes `prompt` on `a` and waits until its snapshot is stored and `peers` see it.
async fn computed_on(a: &Sidecar, prompt: &[u32], peers: &[&Sidecar]) -> String {
    let reply = complete(a, prompt, "default").await;
    assert_eq!(reply.cache_source(), "none");
    let saved = a.wait_stats(Duration::from_secs(30), |s| s["requests"]["snapshots_saved"].as_u64() >= Some(1)).await;
    let owner = node_id(a).await;
    for peer in peers {
        wait_index(peer, &owner, saved["store"]["entries"].as_u64().unwrap()).await;
    }
    content(&reply)
}

#[tokio::test]
async fn peer_prefix_pulled_or_forwarded() {
    let ws = Workspace::new();
    let engines: [Engine; 3] = start_engines(&ws).await;
    let [port_a, port_b, port_c] = free_ports::<3>();
    let a = Sidecar::start(&member(&ws, &engines[0], "a", port_a, &[port_b, port_c], "resident"), &ws.logs()).await.unwrap();
    // B forwards to any peer with a longer match. C never forwards, so it pulls instead.
    let b = Sidecar::start(&member(&ws, &engines[1], "b", port_b, &[port_a, port_c], "always"), &ws.logs()).await.unwrap();
    let c = Sidecar::start(&member(&ws, &engines[2], "c", port_c, &[port_a, port_b], "never"), &ws.logs()).await.unwrap();
    for node in [&a, &b, &c] {
        wait_peers(node, 2, Duration::from_secs(10), |peer| peer["alive"] == true).await;
    }
    let (id_a, id_b, id_c) = (node_id(&a).await, node_id(&b).await, node_id(&c).await);

    let prompt = kvsidecar_tests::tokens(7001, PROMPT_TOKENS);
    let expected = computed_on(&a, &prompt, &[&b, &c]).await;

    // B forwards to A, the peer whose slot contains the prefix, and A serves it.
    let forwarded = complete(&b, &prompt, "default").await;
    assert_eq!(forwarded.header("x-kvsidecar-served-by"), Some(id_a.as_str()), "B is {id_b}, C is {id_c}: {:?}", forwarded.headers);
    assert_ne!(forwarded.cache_source(), "none", "{:?}", forwarded.headers);
    assert_eq!(content(&forwarded), expected);
    assert_eq!(b.stats().await["requests"]["peer"]["forwards"], 1);

    // C pulls A's snapshot, restores it into its own engine, and serves.
    let pulled = complete(&c, &prompt, "default").await;
    assert_eq!(pulled.cache_source(), "peer", "{:?}", pulled.headers);
    assert!(pulled.cached_tokens() >= 448, "{:?}", pulled.headers);
    assert_eq!(pulled.header("x-kvsidecar-served-by"), Some(id_c.as_str()));
    assert_eq!(content(&pulled), expected);
    let stats = c.stats().await;
    assert_eq!(stats["requests"]["peer"]["pulls"], 1, "{stats}");
    assert!(stats["requests"]["peer"]["pulled_bytes"].as_u64() > Some(100_000), "{stats}");
    // The admission policy kept a copy in C's store.
    c.wait_stats(Duration::from_secs(10), |s| s["store"]["entries"].as_u64() >= Some(1)).await;

    // A forwarded request is never forwarded again, and a plain miss stays where it arrived.
    let other = kvsidecar_tests::tokens(7002, PROMPT_TOKENS);
    let local = complete(&b, &other, "default").await;
    assert_eq!(local.header("x-kvsidecar-served-by"), Some(id_b.as_str()));
    let forwarded_in = |stats: Value| stats["requests"]["peer"]["forwarded_in"].as_u64().unwrap();
    assert_eq!(forwarded_in(a.stats().await), 1);
    assert_eq!(forwarded_in(c.stats().await), 0);
    assert_eq!(forwarded_in(b.stats().await), 0);
}

#[tokio::test]
async fn forward_to_a_dead_peer_is_served_here() {
    let ws = Workspace::new();
    let engine_a = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let engine_b = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let [port_a, port_b] = free_ports::<2>();
    let mut spec_b = member(&ws, &engine_b, "b", port_b, &[port_a], "always");
    // A long enough dead_after that B still counts A alive when it forwards.
    spec_b.env.push(("KVSIDECAR_PEERS_DEAD_AFTER".to_string(), "30s".to_string()));
    let mut a = Sidecar::start(&member(&ws, &engine_a, "a", port_a, &[port_b], "resident"), &ws.logs()).await.unwrap();
    let b = Sidecar::start(&spec_b, &ws.logs()).await.unwrap();
    wait_peers(&b, 1, Duration::from_secs(10), |peer| peer["alive"] == true).await;
    let prompt = kvsidecar_tests::tokens(7101, PROMPT_TOKENS);
    let expected = computed_on(&a, &prompt, &[&b]).await;

    a.kill();
    let reply = complete(&b, &prompt, "default").await;
    assert_eq!(reply.header("x-kvsidecar-served-by"), Some(node_id(&b).await.as_str()));
    assert_eq!(content(&reply), expected);
    let stats = b.stats().await;
    assert_eq!(stats["requests"]["peer"]["forwards_failed"], 1, "{stats}");
}

/// Starts A, and B following A through a `FaultProxy` with `fault`; B pulls rather than forwards.
/// Returns the sidecars, the proxy and the completion of the prompt that A computed.
async fn pull_through_fault(ws: &Workspace, engines: &[Engine; 2], fault: Fault, compression: &str, prompt: &[u32]) -> (Sidecar, Sidecar, FaultProxy, String) {
    let [port_a, port_b] = free_ports::<2>();
    let mut spec_a = member(ws, &engines[0], "a", port_a, &[port_b], "never");
    spec_a.env.push(("KVSIDECAR_PEERS_COMPRESSION".to_string(), compression.to_string()));
    let a = Sidecar::start(&spec_a, &ws.logs()).await.unwrap();
    let proxy = FaultProxy::start(port_a, fault).await;
    let b = Sidecar::start(&member(ws, &engines[1], "b", port_b, &[proxy.port], "never"), &ws.logs()).await.unwrap();
    wait_peers(&b, 1, Duration::from_secs(10), |peer| peer["alive"] == true).await;
    let expected = computed_on(&a, prompt, &[&b]).await;
    (a, b, proxy, expected)
}

/// Returns the pull files left in the shared slot folder.
fn pull_files(ws: &Workspace) -> Vec<String> {
    std::fs::read_dir(ws.path("slots"))
        .unwrap()
        .filter_map(|entry| entry.ok().map(|entry| entry.file_name().to_string_lossy().into_owned()))
        .filter(|name| name.contains("-pull-"))
        .collect()
}

#[tokio::test]
async fn peer_killed_mid_transfer_recomputes() {
    let ws = Workspace::new();
    let engines: [Engine; 2] = start_engines(&ws).await;
    let prompt = kvsidecar_tests::tokens(7201, PROMPT_TOKENS);
    let (mut a, b, proxy, expected) = pull_through_fault(&ws, &engines, Fault::StallAfter(64 << 10), "none", &prompt).await;

    let request = {
        let url = b.url.clone();
        let prompt = prompt.clone();
        tokio::spawn(async move {
            let body = json!({"prompt": prompt, "n_predict": 8, "temperature": 0.0});
            kvsidecar_tests::post_json(&format!("{url}/completion"), &body).await.unwrap()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proxy.triggered.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the pull never started: {}", b.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A dies with the transfer half done.
    a.kill();
    let reply = request.await.unwrap();
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    assert_eq!(reply.cache_source(), "none");
    assert_eq!(content(&reply), expected);
    let stats = b.stats().await;
    assert_eq!(stats["requests"]["peer"]["pulls_failed"], 1, "{stats}");
    assert_eq!(stats["requests"]["peer"]["pulls"], 0, "{stats}");
    assert!(pull_files(&ws).is_empty(), "{:?}", pull_files(&ws));
    // B's store holds only what B computed itself, whole.
    let stats = b.wait_stats(Duration::from_secs(30), |s| s["requests"]["snapshots_saved"].as_u64() >= Some(1)).await;
    assert_eq!(stats["store"]["entries"], 1, "{stats}");
    assert_eq!(stats["store"]["corrupt_deleted"], 0, "{stats}");
}

#[tokio::test]
async fn corrupted_transfer_rejected_and_counted() {
    let ws = Workspace::new();
    let engines: [Engine; 2] = start_engines(&ws).await;
    for (compression, seed) in [("none", 7301), ("zstd", 7302)] {
        let prompt = kvsidecar_tests::tokens(seed, PROMPT_TOKENS);
        let (_a, b, proxy, expected) = pull_through_fault(&ws, &engines, Fault::FlipAt(20_000), compression, &prompt).await;
        let reply = complete(&b, &prompt, "default").await;
        assert!(proxy.triggered.load(std::sync::atomic::Ordering::SeqCst), "{compression}: no snapshot transfer passed the proxy");
        assert_eq!(reply.cache_source(), "none", "{compression}");
        assert_eq!(content(&reply), expected, "{compression}");
        let stats = b.stats().await;
        assert_eq!(stats["requests"]["peer"]["pulls_corrupt"], 1, "{compression}: {stats}");
        assert_eq!(stats["requests"]["peer"]["pulls"], 0, "{compression}: {stats}");
        assert!(pull_files(&ws).is_empty(), "{:?}", pull_files(&ws));
        if compression == "none" {
            assert!(b.log().contains("BLAKE3 digest"), "{}", b.log());
        }
    }
}

#[tokio::test]
async fn engine_restart_stops_slot_routing_to_it() {
    let ws = Workspace::new();
    let mut engine_a = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let engine_b = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let [port_a, port_b] = free_ports::<2>();
    let a = Sidecar::start(&member(&ws, &engine_a, "a", port_a, &[port_b], "resident"), &ws.logs()).await.unwrap();
    let b = Sidecar::start(&member(&ws, &engine_b, "b", port_b, &[port_a], "resident"), &ws.logs()).await.unwrap();
    wait_peers(&b, 1, Duration::from_secs(10), |peer| peer["alive"] == true).await;
    let prompt = kvsidecar_tests::tokens(7401, PROMPT_TOKENS);
    computed_on(&a, &prompt, &[&b]).await;
    wait_peers(&b, 1, Duration::from_secs(5), |peer| peer["index"]["slot_blocks"].as_u64() >= Some(8)).await;

    // A's engine restarts on the same port with empty slots.
    let port = engine_a.url.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    engine_a.kill();
    let started = Instant::now();
    wait_peers(&b, 1, Duration::from_secs(2), |peer| peer["index"]["slot_blocks"] == 0).await;
    assert!(started.elapsed() < Duration::from_secs(2), "slot view cleared after {:?}", started.elapsed());
    let _engine_a = Engine::start_on(&ws.tiny_engine(1), &ws.logs(), port).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&format!("{}/readyz", a.url)).await.map(|reply| reply.status).ok() != Some(200) {
        assert!(Instant::now() < deadline, "A's engine not ready again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // B's index no longer lists the prompt in A's slot, so B does not forward it there as a slot
    // hit. It pulls A's stored snapshot or computes the prompt itself.
    wait_peers(&b, 1, Duration::from_secs(5), |peer| peer["alive"] == true && peer["engine_ready"] == true).await;
    let reply = complete(&b, &prompt, "default").await;
    assert_eq!(reply.header("x-kvsidecar-served-by"), Some(node_id(&b).await.as_str()));
    assert_eq!(b.stats().await["requests"]["peer"]["forwards"], 0);
}

#[tokio::test]
async fn other_tenant_misses_on_every_node() {
    let ws = Workspace::new();
    let engines: [Engine; 3] = start_engines(&ws).await;
    let [port_a, port_b, port_c] = free_ports::<3>();
    let shared = ("KVSIDECAR_REQUEST_SHARED_NAMESPACES".to_string(), "docs".to_string());
    let mut specs = [
        member(&ws, &engines[0], "a", port_a, &[port_b, port_c], "always"),
        member(&ws, &engines[1], "b", port_b, &[port_a, port_c], "never"),
        member(&ws, &engines[2], "c", port_c, &[port_a, port_b], "always"),
    ];
    for spec in &mut specs {
        spec.env.push(shared.clone());
    }
    let a = Sidecar::start(&specs[0], &ws.logs()).await.unwrap();
    let b = Sidecar::start(&specs[1], &ws.logs()).await.unwrap();
    let c = Sidecar::start(&specs[2], &ws.logs()).await.unwrap();
    for node in [&a, &b, &c] {
        wait_peers(node, 2, Duration::from_secs(10), |peer| peer["alive"] == true).await;
    }

    let prompt = kvsidecar_tests::tokens(7501, PROMPT_TOKENS);
    let reply = complete(&a, &prompt, "tenant-x").await;
    assert_eq!(reply.cache_source(), "none");
    a.wait_stats(Duration::from_secs(30), |s| s["requests"]["snapshots_saved"].as_u64() >= Some(1)).await;
    let id_a = node_id(&a).await;
    for node in [&b, &c] {
        wait_index(node, &id_a, 1).await;
    }
    // Each node gets the prompt from a tenant of its own, so no tenant's earlier request on
    // another node can be the hit.
    for (name, node, tenant) in [("A", &a, "tenant-y"), ("B", &b, "tenant-z"), ("C", &c, "tenant-w")] {
        let reply = complete(node, &prompt, tenant).await;
        assert_eq!(reply.cache_source(), "none", "on {name}: {:?}", reply.headers);
        assert_eq!(reply.cached_tokens(), 0, "on {name}");
        assert_eq!(reply.header("x-kvsidecar-served-by"), Some(node_id(node).await.as_str()), "{tenant}'s request on {name} was forwarded");
    }
    for node in [&b, &c] {
        assert_eq!(node.stats().await["requests"]["peer"]["pulls"], 0);
    }

    // A namespace marked shared is the exception: tenant-y reuses what tenant-x computed in it.
    let docs = kvsidecar_tests::tokens(7502, PROMPT_TOKENS);
    let body = json!({"prompt": docs, "n_predict": 8, "temperature": 0.0});
    let post = |node: &Sidecar, tenant: &'static str| {
        let url = format!("{}/completion", node.url);
        let body = body.to_string();
        async move {
            kvsidecar_tests::send(http::Method::POST, &url, bytes::Bytes::from(body), &[("content-type", "application/json"), ("x-kvsidecar-tenant", tenant), ("x-kvsidecar-namespace", "docs")]).await.unwrap()
        }
    };
    let first = post(&a, "tenant-x").await;
    assert_eq!(first.status, 200);
    a.wait_stats(Duration::from_secs(30), |s| s["requests"]["snapshots_saved"].as_u64() >= Some(2)).await;
    wait_index(&c, &id_a, 2).await;
    // C forwards to A, whose slot contains the shared prefix.
    let reuse = post(&c, "tenant-y").await;
    assert_eq!(reuse.status, 200);
    assert_eq!(reuse.header("x-kvsidecar-served-by"), Some(id_a.as_str()), "{:?}", reuse.headers);
    assert!(reuse.cached_tokens() >= 448, "{:?}", reuse.headers);
    let unknown = kvsidecar_tests::send(http::Method::POST, &format!("{}/completion", b.url), bytes::Bytes::from(body.to_string()), &[("x-kvsidecar-namespace", "other")]).await.unwrap();
    assert_eq!(unknown.status, 400);
    assert!(String::from_utf8_lossy(&unknown.body).contains("request.shared_namespaces"));
}

/// Writes a CA and one certificate it signed for 127.0.0.1 into `dir`. The certificate serves as
/// both server and client certificate. Returns the paths of the certificate, its key and the CA.
fn fleet_certificates(dir: &std::path::Path) -> [std::path::PathBuf; 3] {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Distinct names, so that OpenSSL (curl) does not take the node certificate for self-signed.
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "kvsidecar test fleet CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let node_key = rcgen::KeyPair::generate().unwrap();
    let mut node_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    node_params.distinguished_name.push(rcgen::DnType::CommonName, "kvsidecar test node");
    node_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let node = node_params.signed_by(&node_key, &ca, &ca_key).unwrap();
    let paths = [dir.join("node.pem"), dir.join("node.key"), dir.join("ca.pem")];
    std::fs::write(&paths[0], node.pem()).unwrap();
    std::fs::write(&paths[1], node_key.serialize_pem()).unwrap();
    std::fs::write(&paths[2], ca.pem()).unwrap();
    paths
}

/// Runs curl against the peer API at `url` with `args`; returns its exit code and output.
fn curl(url: &str, args: &[&str]) -> (Option<i32>, String) {
    let output = std::process::Command::new("curl").args(["-sS", "--max-time", "5"]).args(args).arg(url).output().expect("curl runs");
    (output.status.code(), format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)))
}

#[tokio::test]
async fn mutual_tls_fleet_pulls_and_rejects_strangers() {
    let ws = Workspace::new();
    let [cert, key, ca] = fleet_certificates(&ws.path("tls"));
    let engines: [Engine; 2] = start_engines(&ws).await;
    let [port_a, port_b] = free_ports::<2>();
    let tls = |spec: &mut SidecarSpec, peer: u16| {
        spec.env.extend([
            ("KVSIDECAR_PEERS_URLS".to_string(), format!("https://127.0.0.1:{peer}")),
            ("KVSIDECAR_PEERS_TLS_CERT_FILE".to_string(), cert.display().to_string()),
            ("KVSIDECAR_PEERS_TLS_KEY_FILE".to_string(), key.display().to_string()),
            ("KVSIDECAR_PEERS_TLS_CA_FILE".to_string(), ca.display().to_string()),
        ]);
    };
    let mut spec_a = member(&ws, &engines[0], "a", port_a, &[], "never");
    tls(&mut spec_a, port_b);
    let mut spec_b = member(&ws, &engines[1], "b", port_b, &[], "never");
    tls(&mut spec_b, port_a);
    let a = Sidecar::start(&spec_a, &ws.logs()).await.unwrap();
    let b = Sidecar::start(&spec_b, &ws.logs()).await.unwrap();
    wait_peers(&a, 1, Duration::from_secs(10), |peer| peer["alive"] == true).await;
    wait_peers(&b, 1, Duration::from_secs(10), |peer| peer["alive"] == true).await;

    // Snapshots move between the sidecars over mutual TLS.
    let prompt = kvsidecar_tests::tokens(7601, PROMPT_TOKENS);
    let expected = computed_on(&a, &prompt, &[&b]).await;
    let pulled = complete(&b, &prompt, "default").await;
    assert_eq!(pulled.cache_source(), "peer", "{:?}", pulled.headers);
    assert_eq!(content(&pulled), expected);

    // With the fleet's certificate and token, curl reads the peer API. Without a client
    // certificate the handshake fails, and plain HTTP gets no response.
    let url = format!("https://127.0.0.1:{port_a}/peer/v1/info");
    let bearer = format!("authorization: Bearer {TOKEN}");
    let (code, output) = curl(&url, &["--cacert", &ca.display().to_string(), "--cert", &cert.display().to_string(), "--key", &key.display().to_string(), "-H", &bearer]);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("node_id"), "{output}");
    let (code, output) = curl(&url, &["--cacert", &ca.display().to_string(), "-H", &bearer]);
    assert_ne!(code, Some(0), "{output}");
    assert!(!output.contains("node_id"), "{output}");
    let plain = kvsidecar_tests::send(http::Method::GET, &format!("http://127.0.0.1:{port_a}/peer/v1/info"), bytes::Bytes::new(), &[("authorization", bearer.trim_start_matches("authorization: "))]).await;
    assert!(plain.is_err() || plain.as_ref().is_ok_and(|reply| reply.status != 200), "{plain:?}");
}
