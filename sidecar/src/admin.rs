//! The admin API, served on its own listener (loopback by default): stored snapshots, counters
//! and the engine's fingerprint inputs.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::app::App;
use crate::proxy::{ResponseBody, health, json_response, readiness};

pub async fn handle(app: Arc<App>, request: Request<Incoming>) -> Response<ResponseBody> {
    if request.method() != http::Method::GET {
        return json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({"error": {"message": "the admin API accepts GET only", "code": "method_not_allowed"}}));
    }
    match request.uri().path() {
        "/healthz" => health(),
        "/readyz" => readiness(&app),
        "/admin/stats" => stats(&app),
        "/admin/snapshots" => snapshots(&app).await,
        path => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": {"message": format!("no admin endpoint {path}; try /admin/stats or /admin/snapshots"), "code": "not_found"}}),
        ),
    }
}

fn stats(app: &App) -> Response<ResponseBody> {
    let engine = match app.ready() {
        Some(ready) => json!({
            "ready": true,
            "generation": ready.generation,
            "model": ready.info.model_id,
            "slots": (0..ready.slots.len()).map(|slot| json!({"id": slot, "tokens": ready.slots.tokens(slot).len()})).collect::<Vec<_>>(),
            "fingerprint": ready.info.fingerprint,
            "fingerprint_inputs": ready.info.fingerprint_inputs,
            "snapshots_disabled": ready.info.snapshots_disabled,
        }),
        None => json!({"ready": false, "reason": app.not_ready_reason()}),
    };
    json_response(StatusCode::OK, &json!({"engine": engine, "store": app.store.stats(), "requests": app.counters.snapshot()}))
}

async fn snapshots(app: &Arc<App>) -> Response<ResponseBody> {
    let store = app.store.clone();
    match tokio::task::spawn_blocking(move || store.list()).await {
        Ok(Ok(list)) => json_response(StatusCode::OK, &json!({"snapshots": list})),
        Ok(Err(error)) => json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({"error": {"message": error.to_string(), "code": "store_error"}})),
        Err(error) => json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({"error": {"message": error.to_string(), "code": "internal_error"}})),
    }
}
