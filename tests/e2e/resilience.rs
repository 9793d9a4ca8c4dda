//! Failures around the sidecar: a stopped or slow engine, corrupted stored snapshots, client
//! disconnects, crashes of the sidecar itself.

use std::time::{Duration, Instant};

use kvsidecar_tests::{Engine, Sidecar, Workspace, get, post_json, tokens};
use serde_json::json;

#[tokio::test]
async fn engine_down_is_bad_gateway() {
    let ws = Workspace::new();
    let mut engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    engine.kill();

    let reply = post_json(&format!("{}/completion", sidecar.url), &json!({"prompt": "hello", "n_predict": 2})).await.unwrap();
    assert_eq!(reply.status, 502, "{}", String::from_utf8_lossy(&reply.body));
    assert!(reply.json()["error"]["code"].as_str().unwrap().starts_with("engine_"));
    let health = get(&format!("{}/healthz", sidecar.url)).await.unwrap();
    assert_eq!(health.status, 200, "the sidecar itself stays up");
    let ready = get(&format!("{}/readyz", sidecar.url)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut ready_status = ready.status;
    while ready_status == 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready_status = get(&format!("{}/readyz", sidecar.url)).await.unwrap().status;
    }
    assert_eq!(ready_status, 503, "readiness follows the engine");
}

#[tokio::test]
async fn slow_engine_times_out_with_504() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let mut spec = ws.sidecar(&engine);
    spec.env.push(("KVSIDECAR_ENGINE_RESPONSE_TIMEOUT".into(), "150ms".into()));
    let sidecar = Sidecar::start(&spec, &ws.logs()).await.unwrap();

    let body = json!({"prompt": tokens(11, 3000), "n_predict": 400, "temperature": 0.0});
    let reply = post_json(&format!("{}/completion", sidecar.url), &body).await.unwrap();
    assert_eq!(reply.status, 504, "{}", String::from_utf8_lossy(&reply.body));
    assert_eq!(reply.json()["error"]["code"], "engine_timeout");

    // The engine finishes or cancels the abandoned request on its own schedule; then a quick
    // request fits in the timeout again.
    let deadline = Instant::now() + Duration::from_secs(120);
    while get(&format!("{}/slots", engine.url)).await.unwrap().json()[0]["is_processing"] == true {
        assert!(Instant::now() < deadline, "engine still busy with the abandoned request");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let quick = post_json(&format!("{}/completion", sidecar.url), &json!({"prompt": tokens(12, 8), "n_predict": 1})).await.unwrap();
    assert_eq!(quick.status, 200, "the sidecar serves after a timeout");
}

#[tokio::test]
async fn corrupt_stored_snapshot_is_a_miss() {
    let ws = Workspace::new();
    let prompt = tokens(13, 600);
    let body = json!({"prompt": prompt, "n_predict": 8, "temperature": 0.0});
    let expected = {
        let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
        let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
        let first = post_json(&format!("{}/completion", sidecar.url), &body).await.unwrap();
        sidecar.wait_stats(Duration::from_secs(30), |s| s["requests"]["snapshots_saved"] == 1).await;
        first.json()["content"].clone()
    };

    let id = {
        let mut config = kvsidecar::config::Config::defaults().store;
        config.data_dir = ws.path("data");
        let store = kvsidecar::store::Store::open(&config).unwrap();
        let snapshots = store.list().unwrap();
        assert_eq!(snapshots.len(), 1);
        store.corrupt_first_chunk(&snapshots[0].id).unwrap();
        snapshots[0].id
    };

    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    let reply = post_json(&format!("{}/completion", sidecar.url), &body).await.unwrap();

    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-kvsidecar-cache-source"), Some("none"));
    assert_eq!(reply.json()["content"], expected, "the recomputed answer is unchanged");
    let log = sidecar.log();
    assert!(log.contains("failed verification"), "verification warning missing:\n{log}");
    assert!(log.contains(&id.to_hex()), "warning without the snapshot id:\n{log}");
    let stats = sidecar.stats().await;
    assert_eq!(stats["store"]["corrupt_deleted"], 1, "{stats}");
    assert_eq!(stats["requests"]["restores"], 0, "{stats}");
}

#[tokio::test]
async fn killed_sidecar_keeps_store_consistent() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let prompt = tokens(14, 600);
    let body = json!({"prompt": prompt, "n_predict": 4, "temperature": 0.0});
    {
        let mut sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
        post_json(&format!("{}/completion", sidecar.url), &body).await.unwrap();
        // Kill while the snapshot may still be on its way into the store.
        tokio::time::sleep(Duration::from_millis(30)).await;
        sidecar.kill();
    }

    let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    let stats = sidecar.stats().await;
    let entries = stats["store"]["entries"].as_u64().unwrap();
    assert!(entries <= 1, "{stats}");
    let listed = get(&format!("{}/admin/snapshots", sidecar.admin_url)).await.unwrap().json();
    for snapshot in listed["snapshots"].as_array().unwrap() {
        assert!(snapshot["bytes"].as_u64().unwrap() > 0);
    }
    let reply = post_json(&format!("{}/completion", sidecar.url), &body).await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(sidecar.stats().await["store"]["corrupt_deleted"], 0, "no torn snapshot was found");
}

/// Sends a long generation to the sidecar over a raw connection and closes the connection while
/// the engine is generating. Returns the engine, the sidecar and the workspace, still running.
async fn disconnect_mid_generation(stream: bool) -> (Workspace, Engine, Sidecar) {
    use tokio::io::AsyncWriteExt;

    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    let body = json!({"prompt": tokens(15, 50), "n_predict": 100000, "stream": stream, "temperature": 0.0, "ignore_eos": true}).to_string();
    let address = sidecar.url.trim_start_matches("http://");
    let mut connection = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("POST /completion HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    connection.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let busy = get(&format!("{}/slots", engine.url)).await.unwrap().json();
    assert_eq!(busy[0]["is_processing"], true, "the engine was generating: {busy}");
    drop(connection);

    let stats = sidecar.wait_stats(Duration::from_secs(5), |s| s["requests"]["client_disconnects"] == 1).await;
    assert_eq!(stats["requests"]["client_disconnects"], 1, "{stats}");
    (ws, engine, sidecar)
}

#[tokio::test]
async fn client_disconnect_cancels_stream() {
    let (_ws, engine, _sidecar) = disconnect_mid_generation(true).await;

    // The sidecar closes its engine connection, and the engine stops at its next write.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let slots = get(&format!("{}/slots", engine.url)).await.unwrap().json();
        if slots[0]["is_processing"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "engine still generating after the client left: {slots}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn client_disconnect_non_streaming_frees_the_slot() {
    // llama-server checks a non-streaming request's connection about once a second and does not
    // always notice the close, so this test checks the sidecar's side: the disconnect is counted
    // and the slot serves the next request.
    let (_ws, _engine, sidecar) = disconnect_mid_generation(false).await;

    let next = post_json(&format!("{}/completion", sidecar.url), &json!({"prompt": tokens(16, 20), "n_predict": 2})).await.unwrap();
    assert_eq!(next.status, 200, "{}", String::from_utf8_lossy(&next.body));
}

#[tokio::test]
async fn streaming_chunks_arrive_before_the_end() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    use http_body_util::BodyExt;

    let body = json!({"prompt": tokens(16, 20), "n_predict": 300, "stream": true, "temperature": 0.0, "ignore_eos": true}).to_string();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let request = http::Request::post(format!("{}/completion", sidecar.url))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let started = Instant::now();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.headers()["x-kvsidecar-cache-source"], "none");
    let mut body = response.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames.push((started.elapsed(), data.len()));
        }
    }
    let total = started.elapsed();
    assert!(frames.len() > 10, "the stream arrived in {} frames", frames.len());
    assert!(frames[0].0 < total / 2, "first frame at {:?} of {total:?}", frames[0].0);
}

#[tokio::test]
async fn unshared_slot_folder_disables_snapshots_only() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let mut spec = ws.sidecar(&engine);
    spec.slot_dir = ws.path("elsewhere");
    let sidecar = Sidecar::start(&spec, &ws.logs()).await.unwrap();

    let ready = get(&format!("{}/readyz", sidecar.url)).await.unwrap().json();
    let reason = ready["snapshots_disabled"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("--slot-save-path"), "{ready}");
    assert!(sidecar.log().contains("snapshots disabled"), "the reason is logged");

    let body = json!({"prompt": tokens(17, 300), "n_predict": 4, "temperature": 0.0});
    let first = post_json(&format!("{}/completion", sidecar.url), &body).await.unwrap();
    let second = post_json(&format!("{}/completion", sidecar.url), &body).await.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(second.header("x-kvsidecar-cache-source"), Some("slot"), "slot reuse still works");
    let stats = sidecar.stats().await;
    assert_eq!(stats["requests"]["snapshots_saved"], 0, "{stats}");
}

#[tokio::test]
async fn engine_swapped_between_checks_never_mixes_kv() {
    let ws = Workspace::new();

    // A second model of the same shape with other weights, at another path.
    let other = ws.dir.path().join("other.gguf");
    kvsidecar_tests::generate_tiny_model(&other, "other", 999);

    let prompt = tokens(50, 640);
    let mut longer = prompt.clone();
    longer.extend(tokens(51, 20));
    let body = |prompt: &[u32]| json!({"prompt": prompt, "n_predict": 8, "temperature": 0.0});

    let mut engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let expected = post_json(&format!("{}/completion", engine.url), &body(&longer)).await.unwrap().json()["content"].clone();
    let port = engine.port;
    let mut spec = ws.sidecar(&engine);
    // The health check alone would not notice a swap within this interval.
    spec.env.push(("KVSIDECAR_ENGINE_PROBE_INTERVAL".into(), "60s".into()));
    let sidecar = Sidecar::start(&spec, &ws.logs()).await.unwrap();

    // Swap in the other model on the same port, and let the sidecar see traffic and snapshots.
    engine.kill();
    let mut other_spec = ws.tiny_engine(1);
    other_spec.model = other.clone();
    let mut swapped = Engine::start_on(&other_spec, &ws.logs(), port).await.unwrap();
    for _ in 0..20 {
        post_json(&format!("{}/completion", sidecar.url), &body(&prompt)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Swap back and ask for a prompt that extends the one computed by the other model.
    swapped.kill();
    let _engine = Engine::start_on(&ws.tiny_engine(1), &ws.logs(), port).await.unwrap();
    let reply = loop {
        let reply = post_json(&format!("{}/completion", sidecar.url), &body(&longer)).await.unwrap();
        if reply.status == 200 {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    assert_eq!(reply.json()["content"], expected, "the output equals the original model's cold output");
    assert_ne!(reply.header("x-kvsidecar-cache-source"), Some("local"));
}

#[tokio::test]
async fn slow_clients_are_timed_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let mut spec = ws.sidecar(&engine);
    spec.env.push(("KVSIDECAR_SERVER_HEADER_TIMEOUT".into(), "500ms".into()));
    spec.env.push(("KVSIDECAR_SERVER_BODY_TIMEOUT".into(), "500ms".into()));
    let sidecar = Sidecar::start(&spec, &ws.logs()).await.unwrap();
    let address = sidecar.url.trim_start_matches("http://").to_string();

    // Reads what the server sends until it closes the connection, at most 10 seconds.
    async fn read_until_closed(mut connection: tokio::net::TcpStream) -> String {
        let mut received = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), connection.read_to_end(&mut received)).await;
        assert!(read.is_ok(), "the server kept the connection open");
        String::from_utf8_lossy(&received).into_owned()
    }

    let idle = tokio::net::TcpStream::connect(&address).await.unwrap();
    read_until_closed(idle).await;

    let mut partial_headers = tokio::net::TcpStream::connect(&address).await.unwrap();
    partial_headers.write_all(b"POST /completion HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    read_until_closed(partial_headers).await;

    let mut partial_body = tokio::net::TcpStream::connect(&address).await.unwrap();
    partial_body.write_all(b"POST /completion HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"pro").await.unwrap();
    let answer = read_until_closed(partial_body).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");

    let ok = post_json(&format!("{}/completion", sidecar.url), &json!({"prompt": tokens(70, 8), "n_predict": 1})).await.unwrap();
    assert_eq!(ok.status, 200, "the sidecar still serves");
}
