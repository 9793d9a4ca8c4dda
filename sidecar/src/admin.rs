//! The admin API, served on its own listener (loopback by default): stored snapshots, counters,
//! the engine's fingerprint inputs, the policy plugins, and the ledger's top tasks.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::app::App;
use crate::plugin::{Kind, Reloaded};
use crate::proxy::{ResponseBody, health, json_response, readiness};

pub async fn handle(app: Arc<App>, request: Request<Incoming>) -> Response<ResponseBody> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    match (method.as_str(), path.as_str()) {
        ("POST", "/admin/plugins/reload") => reload(&app, request.uri().query()).await,
        ("GET", "/healthz") => health(),
        ("GET", "/readyz") => readiness(&app),
        ("GET", "/admin/stats") => stats(&app),
        ("GET", "/admin/snapshots") => snapshots(&app).await,
        ("GET", "/admin/plugins") => json_response(StatusCode::OK, &app.plugins.describe()),
        ("GET", "/admin/peers") => peers(&app),
        ("GET", "/metrics") => metrics(&app).await,
        ("GET", "/admin/tasks") => crate::ledger::endpoints::admin_tasks(&app, request.uri().query()).await,
        (_, "/admin/plugins/reload") => with_allow(
            json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": {"message": format!("{method} /admin/plugins/reload is not allowed; use POST"), "code": "method_not_allowed"}}),
            ),
            "POST",
        ),
        ("GET", _) => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": {"message": format!("no admin endpoint {path}; try /admin/stats, /admin/snapshots, /admin/plugins, /admin/peers, /admin/tasks or /metrics"), "code": "not_found"}}),
        ),
        _ => with_allow(
            json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": {"message": format!("{method} {path} is not allowed; the admin API accepts GET, and POST on /admin/plugins/reload"), "code": "method_not_allowed"}}),
            ),
            "GET",
        ),
    }
}

fn with_allow(mut response: Response<ResponseBody>, methods: &'static str) -> Response<ResponseBody> {
    response.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static(methods));
    response
}

/// Reloads the plugins whose files changed, or only the kind named by `?kind=`. Returns 200
/// when every reload succeeded or had nothing to do, 422 when a new version was rejected (the
/// previous one keeps serving).
async fn reload(app: &Arc<App>, query: Option<&str>) -> Response<ResponseBody> {
    let bad_request = |message: String, param: Option<&str>| json_response(StatusCode::BAD_REQUEST, &json!({"error": {"message": message, "code": "invalid_value", "param": param}}));
    let mut kind = None;
    for raw in query.unwrap_or_default().split('&').filter(|pair| !pair.is_empty()) {
        let pair = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
        let value = match pair.split_once('=') {
            Some(("kind", value)) if kind.is_none() => value,
            Some(("kind", _)) => return bad_request("kind is given more than once; name one kind, or none to reload all".into(), Some("kind")),
            _ => return bad_request(format!("unknown query parameter {pair:?}; the only parameter is kind=router|evictor|admission"), None),
        };
        kind = Some(match value {
            "router" => Kind::Router,
            "evictor" => Kind::Evictor,
            "admission" => Kind::Admission,
            other => return bad_request(format!("unknown plugin kind {other:?}; use router, evictor or admission, or no kind to reload all"), Some("kind")),
        });
    }
    let plugins = app.plugins.clone();
    let reloaded = tokio::task::spawn_blocking(move || match kind {
        Some(kind) => vec![(kind, plugins.reload(kind))],
        None => plugins.reload_all(),
    })
    .await;
    let Ok(reloaded) = reloaded else {
        return json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({"error": {"message": "plugin reload task failed", "code": "internal_error"}}));
    };
    let failed = reloaded.iter().any(|(_, outcome)| matches!(outcome, Reloaded::Failed { .. }));
    let results: Vec<_> = reloaded.into_iter().map(|(kind, outcome)| json!({"kind": kind, "result": outcome})).collect();
    let status = if failed { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::OK };
    json_response(status, &json!({"reloaded": results}))
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
    json_response(
        StatusCode::OK,
        &json!({"engine": engine, "store": app.store.stats(), "requests": app.counters.snapshot(), "plugins": app.plugins.describe()["plugins"]}),
    )
}

async fn snapshots(app: &Arc<App>) -> Response<ResponseBody> {
    let store = app.store.clone();
    match tokio::task::spawn_blocking(move || store.list()).await {
        Ok(Ok(list)) => json_response(StatusCode::OK, &json!({"snapshots": list})),
        Ok(Err(error)) => json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({"error": {"message": error.to_string(), "code": "store_error"}})),
        Err(error) => json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({"error": {"message": error.to_string(), "code": "internal_error"}})),
    }
}

/// Returns every metric in the Prometheus text format.
async fn metrics(app: &Arc<App>) -> Response<ResponseBody> {
    let telemetry = app.telemetry.clone();
    // Collecting runs the observers, which read the store and fleet state under their locks.
    let rendered = tokio::task::spawn_blocking(move || telemetry.prometheus_text()).await;
    match rendered {
        Ok(Some(Ok(text))) => {
            let mut response = Response::new(crate::proxy::full(bytes::Bytes::from(text)));
            response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(crate::telemetry::prometheus::CONTENT_TYPE));
            response
        }
        Ok(None) => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": {"message": "the Prometheus endpoint is off; set telemetry.prometheus = true to serve /metrics", "code": "not_found"}}),
        ),
        Ok(Some(Err(error))) => json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({"error": {"message": format!("metric collection failed: {error}"), "code": "internal_error"}})),
        Err(error) => json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({"error": {"message": error.to_string(), "code": "internal_error"}})),
    }
}

/// Returns this node's identity and the state of its peers, an empty list on a single node.
fn peers(app: &App) -> Response<ResponseBody> {
    let mut body = match &app.fleet {
        Some(fleet) => fleet.peers.describe(&fleet.index),
        None => json!({"peers": []}),
    };
    body["self"] = crate::peer::info(app);
    json_response(StatusCode::OK, &body)
}
