//! Cache behaviour seen by a client: slot hits, restores from the store, prefix matches,
//! restarts, fingerprint changes and capacity.

use std::time::Duration;

use kvsidecar_tests::{Engine, Sidecar, Workspace, post_json, tokens};
use serde_json::{Value, json};

/// Sends a native completion of `prompt` at temperature 0 and returns the reply.
async fn complete(sidecar: &Sidecar, prompt: &[u32]) -> kvsidecar_tests::Reply {
    let body = json!({"prompt": prompt, "n_predict": 8, "temperature": 0.0});
    let reply = post_json(&format!("{}/completion", sidecar.url), &body).await.expect("completion request");
    assert_eq!(reply.status, 200, "completion failed: {}", String::from_utf8_lossy(&reply.body));
    reply
}

fn content(reply: &kvsidecar_tests::Reply) -> String {
    reply.json()["content"].as_str().expect("content string").to_string()
}

/// Waits until the sidecar has stored `count` snapshots.
async fn wait_saved(sidecar: &Sidecar, count: u64) -> Value {
    let stats = sidecar.wait_stats(Duration::from_secs(30), |s| s["requests"]["snapshots_saved"].as_u64() >= Some(count)).await;
    assert!(stats["requests"]["snapshots_saved"].as_u64() >= Some(count), "snapshots not saved: {stats}");
    stats
}

/// Runs `prompt` through a tiny engine and a sidecar on `ws`'s data folder until its snapshot is
/// stored, stops both, and returns the completion text.
async fn store_once(ws: &Workspace, prompt: &[u32]) -> String {
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    let reply = complete(&sidecar, prompt).await;
    wait_saved(&sidecar, 1).await;
    content(&reply)
}

#[tokio::test]
async fn same_prompt_twice_reuses_slot() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    let prompt = tokens(1, 700);

    let first = complete(&sidecar, &prompt).await;
    let second = complete(&sidecar, &prompt).await;

    assert_eq!(first.cache_source(), "none");
    assert!(second.cached_tokens() as usize >= prompt.len() - 1, "cached {}", second.cached_tokens());
    assert_eq!(second.cache_source(), "slot");
    assert_eq!(content(&first), content(&second));
}

#[tokio::test]
async fn restore_after_engine_and_sidecar_restart() {
    let ws = Workspace::new();
    let prompt = tokens(2, 700);
    let expected = store_once(&ws, &prompt).await;

    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    let again = complete(&sidecar, &prompt).await;

    assert_eq!(again.cache_source(), "local", "log:\n{}", sidecar.log());
    assert!(again.cached_tokens() as usize >= prompt.len() - 1, "cached {}", again.cached_tokens());
    assert_eq!(again.json()["timings"]["cache_n"].as_u64(), Some(prompt.len() as u64 - 1), "engine reused the restored KV");
    assert_eq!(content(&again), expected);
}

#[tokio::test]
async fn engine_restart_behind_running_sidecar() {
    let ws = Workspace::new();
    let mut engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let mut sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    let prompt = tokens(30, 600);
    let first = complete(&sidecar, &prompt).await;
    wait_saved(&sidecar, 1).await;
    let generation = sidecar.stats().await["engine"]["generation"].as_u64().unwrap();

    let port = engine.port;
    engine.kill();
    let _engine = Engine::start_on(&ws.tiny_engine(1), &ws.logs(), port).await.unwrap();
    let stats = sidecar.wait_stats(Duration::from_secs(30), |s| s["engine"]["generation"].as_u64() > Some(generation)).await;
    assert!(stats["engine"]["generation"].as_u64() > Some(generation), "sidecar did not notice the restart: {stats}");
    sidecar.wait_ready(Duration::from_secs(30)).await.unwrap();
    let again = complete(&sidecar, &prompt).await;

    assert_eq!(again.cache_source(), "local", "the emptied slot is refilled from the store");
    assert_eq!(content(&again), content(&first));
}

#[tokio::test]
async fn shared_prefix_restores_block_aligned_part() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    let stored = tokens(3, 640);
    complete(&sidecar, &stored).await;
    wait_saved(&sidecar, 1).await;

    // Another prompt takes the only slot, so the shared part can only come from the store.
    complete(&sidecar, &tokens(4, 300)).await;
    wait_saved(&sidecar, 2).await;
    let shared = 5 * 64;
    let mut prompt = stored[..shared].to_vec();
    prompt.extend(tokens(5, 200).iter().map(|token| if *token == stored[shared] { token + 1 } else { *token }));
    let reply = complete(&sidecar, &prompt).await;

    assert_eq!(reply.cache_source(), "local");
    assert_eq!(reply.cached_tokens() as usize, shared);
    assert_eq!(reply.json()["timings"]["cache_n"].as_u64(), Some(shared as u64));
}

#[tokio::test]
async fn two_slots_alternating_conversations_hit() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(2), &ws.logs()).await.unwrap();
    let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    let a = tokens(6, 500);
    let b = tokens(7, 500);

    let a1 = complete(&sidecar, &a).await;
    let b1 = complete(&sidecar, &b).await;
    let a2 = complete(&sidecar, &a).await;
    let b2 = complete(&sidecar, &b).await;

    for (name, reply) in [("A again", &a2), ("B again", &b2)] {
        assert!(reply.cached_tokens() >= 499, "{name}: cached {}", reply.cached_tokens());
        assert_ne!(reply.cache_source(), "none", "{name}");
    }
    assert_eq!(content(&a1), content(&a2));
    assert_eq!(content(&b1), content(&b2));
}

/// Stores `prompt` with the default tiny engine, restarts with an engine started from `spec`
/// and a sidecar with the extra variables `env`, and checks that the prompt is computed cold
/// without any restore attempt.
async fn assert_never_restored(ws: &Workspace, prompt: &[u32], spec: kvsidecar_tests::EngineSpec, env: &[(&str, &str)]) {
    store_once(ws, prompt).await;

    let engine = Engine::start(&spec, &ws.logs()).await.unwrap();
    let mut sidecar_spec = ws.sidecar(&engine);
    sidecar_spec.env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let sidecar = Sidecar::start(&sidecar_spec, &ws.logs()).await.unwrap();
    let reply = complete(&sidecar, prompt).await;

    assert_eq!(reply.cache_source(), "none");
    assert_eq!(reply.cached_tokens(), 0);
    let stats = sidecar.stats().await;
    assert_eq!(stats["requests"]["restores"], 0, "{stats}");
    assert_eq!(stats["requests"]["restores_failed"], 0, "{stats}");
}

#[tokio::test]
async fn changed_kv_type_never_restores() {
    let ws = Workspace::new();
    let mut spec = ws.tiny_engine(1);
    spec.extra = vec!["-ctk".into(), "q8_0".into()];
    assert_never_restored(&ws, &tokens(8, 600), spec, &[("KVSIDECAR_ENGINE_CACHE_TYPE_K", "q8_0")]).await;
}

#[tokio::test]
async fn undeclared_kv_type_change_detected_by_layout() {
    // The operator forgot to declare the new K type: the probed KV layout still differs.
    let ws = Workspace::new();
    let mut spec = ws.tiny_engine(1);
    spec.extra = vec!["-ctk".into(), "q8_0".into()];
    assert_never_restored(&ws, &tokens(9, 600), spec, &[]).await;
}

#[tokio::test]
async fn other_model_never_restores() {
    let ws = Workspace::new();
    let mut spec = ws.tiny_engine(1);
    spec.model = kvsidecar_tests::paths().demo_model;
    assert_never_restored(&ws, &tokens(10, 400), spec, &[]).await;
}

#[tokio::test]
async fn capacity_evicts_oldest_snapshots() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();

    // Measure one snapshot's size in a separate store, then allow two and a half of them.
    let snapshot_bytes = {
        let mut spec = ws.sidecar(&engine);
        spec.data_dir = ws.path("measure");
        let sidecar = Sidecar::start(&spec, &ws.logs()).await.unwrap();
        complete(&sidecar, &tokens(19, 600)).await;
        wait_saved(&sidecar, 1).await["store"]["bytes"].as_u64().unwrap()
    };
    let capacity = snapshot_bytes * 5 / 2;
    let mut spec = ws.sidecar(&engine);
    spec.env.push(("KVSIDECAR_STORE_CAPACITY".into(), capacity.to_string()));
    let sidecar = Sidecar::start(&spec, &ws.logs()).await.unwrap();

    let prompts: Vec<Vec<u32>> = (0..4).map(|n| tokens(20 + n, 600)).collect();
    for (n, prompt) in prompts.iter().enumerate() {
        complete(&sidecar, prompt).await;
        wait_saved(&sidecar, n as u64 + 1).await;
    }

    let stats = sidecar.stats().await;
    assert_eq!(stats["store"]["entries"], 2, "{stats}");
    assert_eq!(stats["store"]["evicted"], 2, "{stats}");
    assert!(stats["store"]["bytes"].as_u64().unwrap() <= capacity, "{stats}");
    let disk = kvsidecar::store::folder_size(&ws.path("data").join("snapshots"));
    assert!(disk <= capacity, "snapshot folder holds {disk} bytes, capacity is {capacity}");

    let listed = kvsidecar_tests::get(&format!("{}/admin/snapshots", sidecar.admin_url)).await.unwrap().json();
    let remaining: Vec<u64> = listed["snapshots"].as_array().unwrap().iter().map(|s| s["tokens"].as_u64().unwrap()).collect();
    assert_eq!(remaining.len(), 2);
}

#[tokio::test]
async fn tenants_and_salts_never_share_kv() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    let prompt = tokens(40, 500);
    let url = format!("{}/completion", sidecar.url);
    let send = |tenant: &'static str, salt: Option<&'static str>| {
        let mut body = json!({"prompt": prompt, "n_predict": 4, "temperature": 0.0});
        if let Some(salt) = salt {
            body["cache_salt"] = json!(salt);
        }
        let url = url.clone();
        async move {
            let headers = [("content-type", "application/json"), ("x-kvsidecar-tenant", tenant)];
            kvsidecar_tests::send(http::Method::POST, &url, bytes::Bytes::from(body.to_string()), &headers).await.unwrap()
        }
    };

    let alice = send("alice", None).await;
    wait_saved(&sidecar, 1).await;
    let bob = send("bob", None).await;
    let salted = send("alice", Some("s2")).await;
    let alice_again = send("alice", None).await;

    assert_eq!(alice.cache_source(), "none");
    for (name, reply) in [("another tenant", &bob), ("another salt", &salted)] {
        assert_eq!(reply.cache_source(), "none", "{name}");
        assert_eq!(reply.cached_tokens(), 0, "{name}");
        assert_eq!(reply.json()["timings"]["cache_n"], 0, "{name}: the engine recomputed the prompt");
    }
    assert_eq!(alice_again.cache_source(), "local", "alice's own snapshot is restored");
    assert!(alice_again.cached_tokens() >= 499);
    assert_eq!(content(&alice), content(&bob), "isolation does not change the output");
}

#[tokio::test]
async fn encoded_paths_and_batches_stay_isolated() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    let prompt = tokens(60, 400);
    let send = |path: &str, body: Value, tenant: &'static str| {
        let url = format!("{}{path}", sidecar.url);
        async move {
            let headers = [("content-type", "application/json"), ("x-kvsidecar-tenant", tenant)];
            kvsidecar_tests::send(http::Method::POST, &url, bytes::Bytes::from(body.to_string()), &headers).await.unwrap()
        }
    };
    send("/completion", json!({"prompt": prompt, "n_predict": 2}), "alice").await;

    let erase = send("/%73lots/0?action=erase", json!({}), "bob").await;
    assert_eq!(erase.status, 403, "an encoded slot path is still a slot action");

    let encoded = send("/%63ompletion", json!({"prompt": prompt, "n_predict": 2}), "bob").await;
    assert_eq!(encoded.status, 200);
    assert_eq!(encoded.cache_source(), "none", "an encoded completion path takes the cache path");
    assert_eq!(encoded.json()["timings"]["cache_n"], 0);

    send("/completion", json!({"prompt": prompt, "n_predict": 2}), "alice").await;
    let batch = send("/completion", json!({"prompt": [prompt, tokens(61, 50)], "n_predict": 2}), "bob").await;
    assert_eq!(batch.status, 200, "{}", String::from_utf8_lossy(&batch.body));
    let results = batch.json();
    for result in results.as_array().expect("one result per prompt") {
        assert_eq!(result["timings"]["cache_n"], 0, "a batch never reuses another tenant's slot: {result}");
    }
}

#[tokio::test]
async fn same_named_model_with_other_weights_never_restores() {
    let ws = Workspace::new();
    let paths = kvsidecar_tests::paths();
    // Two models that report the same alias, file name, size and shape, with different weights.
    let first = ws.path("a").join("model.gguf");
    std::fs::copy(&paths.tiny_model, &first).unwrap();
    let second = ws.path("b").join("model.gguf");
    kvsidecar_tests::generate_tiny_model(&second, "kvsidecar-tiny", 999);
    let spec = |model: &std::path::Path| {
        let mut spec = ws.tiny_engine(1);
        spec.model = model.to_path_buf();
        spec.extra = vec!["--alias".into(), "same".into()];
        spec
    };
    let prompt = tokens(80, 600);
    {
        let engine = Engine::start(&spec(&first), &ws.logs()).await.unwrap();
        let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
        complete(&sidecar, &prompt).await;
        wait_saved(&sidecar, 1).await;
    }

    let engine = Engine::start(&spec(&second), &ws.logs()).await.unwrap();
    let expected = post_json(&format!("{}/completion", engine.url), &json!({"prompt": prompt, "n_predict": 8, "temperature": 0.0})).await.unwrap();
    let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    let reply = complete(&sidecar, &prompt).await;

    assert_eq!(reply.cache_source(), "none", "the other weights give another fingerprint");
    assert_eq!(content(&reply), content(&expected));
    assert_eq!(sidecar.stats().await["requests"]["restores"], 0);
}
