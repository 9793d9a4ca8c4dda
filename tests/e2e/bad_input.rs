//! Invalid requests get a 4xx response in OpenAI's error shape that names the field, and the
//! sidecar keeps serving afterwards.

use bytes::Bytes;
use kvsidecar_tests::{Engine, Sidecar, Workspace, post_json, send, tokens};
use serde_json::json;

async fn post_raw(url: &str, body: impl Into<Bytes>) -> kvsidecar_tests::Reply {
    send(http::Method::POST, url, body.into(), &[("content-type", "application/json")]).await.expect("request")
}

fn assert_error(reply: &kvsidecar_tests::Reply, status: u16, code: &str, param: Option<&str>) {
    assert_eq!(reply.status, status, "body: {}", String::from_utf8_lossy(&reply.body));
    let body = reply.json();
    let error = &body["error"];
    assert_eq!(error["code"], code, "{body}");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(error["type"].is_string(), "{body}");
    match param {
        Some(param) => assert_eq!(error["param"], param, "{body}"),
        None => assert!(error["param"].is_null(), "{body}"),
    }
}

#[tokio::test]
async fn invalid_requests_named_and_rejected() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(2), &ws.logs()).await.unwrap();
    let mut spec = ws.sidecar(&engine);
    spec.env.push(("KVSIDECAR_SERVER_MAX_BODY".into(), "64KiB".into()));
    let sidecar = Sidecar::start(&spec, &ws.logs()).await.unwrap();
    let chat = format!("{}/v1/chat/completions", sidecar.url);
    let completions = format!("{}/v1/completions", sidecar.url);

    assert_error(&post_raw(&chat, "{\"messages\": [").await, 400, "invalid_json", None);
    assert_error(&post_raw(&chat, "[1, 2]").await, 400, "invalid_json", None);
    assert_error(&post_raw(&chat, json!({"model": "x"}).to_string()).await, 400, "missing_field", Some("messages"));
    assert_error(&post_raw(&completions, json!({"max_tokens": 2}).to_string()).await, 400, "missing_field", Some("prompt"));
    assert_error(&post_raw(&chat, json!({"messages": "hi"}).to_string()).await, 400, "invalid_type", Some("messages"));
    assert_error(&post_raw(&chat, json!({"messages": [{"role": 1, "content": "x"}]}).to_string()).await, 400, "invalid_type", Some("messages[0].role"));
    assert_error(&post_raw(&completions, json!({"prompt": "x", "stream": "yes"}).to_string()).await, 400, "invalid_type", Some("stream"));
    assert_error(&post_raw(&completions, &b"{\"prompt\": \"caf\xc3\x28\"}"[..]).await, 400, "invalid_utf8", None);
    let large = json!({"prompt": "a".repeat(100_000)}).to_string();
    assert_error(&post_raw(&completions, large).await, 413, "body_too_large", None);
    let unknown = json!({"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    assert_error(&post_raw(&chat, unknown).await, 404, "model_not_found", Some("model"));
    assert_error(&post_raw(&completions, json!({"prompt": [1, 99999]}).to_string()).await, 400, "invalid_value", Some("prompt"));

    assert_error(&post_raw(&chat, json!({"messages": [{"role": "user"}]}).to_string()).await, 400, "missing_field", Some("messages[0].content"));

    // Errors the engine itself finds keep their status and get the same shape.
    let rejected = json!({"prompt": "hello", "temperature": "hot"}).to_string();
    assert_error(&post_raw(&completions, rejected).await, 400, "engine_rejected_request", None);
    let stats = sidecar.stats().await;
    assert_eq!(stats["requests"]["client_disconnects"], 0, "{stats}");

    // Engine endpoints where tenants cannot be kept apart are not passed through.
    let messages = json!({"model": "x", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    assert_error(&post_raw(&format!("{}/v1/messages", sidecar.url), messages).await, 501, "not_passed_through", None);

    // Two tenant headers would let a client pick its tenant behind an appending gateway.
    let two_tenants = send(
        http::Method::POST,
        &completions,
        json!({"prompt": "x"}).to_string().into(),
        &[("content-type", "application/json"), ("x-kvsidecar-tenant", "a"), ("x-kvsidecar-tenant", "b")],
    )
    .await
    .unwrap();
    assert_error(&two_tenants, 400, "invalid_value", Some("x-kvsidecar-tenant"));

    // A slot the engine does not have is rejected before anything reaches the engine.
    let wrong_slot = json!({"prompt": tokens(1, 10), "id_slot": 5}).to_string();
    assert_error(&post_raw(&completions, wrong_slot).await, 400, "invalid_value", Some("id_slot"));
    assert!(!engine.log().contains("id_slot = 5"), "slot 5 reached the engine");

    // The sidecar still serves, including the model's own name.
    let model = sidecar.stats().await["engine"]["model"].as_str().unwrap().to_string();
    let ok = post_json(&chat, &json!({"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})).await.unwrap();
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(ok.json()["object"], "chat.completion");
}
