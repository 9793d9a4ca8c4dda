//! The client-facing HTTP service: routes completion requests through the cache path and passes
//! every other request to the engine unchanged.

mod body;
mod observe;
pub mod completion;
mod passthrough;

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::app::App;
use crate::engine::http_client::BoxError;
use crate::error::ApiError;
use crate::request::Endpoint;

/// Body type of every response the sidecar sends.
pub type ResponseBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Wraps bytes as a response body.
pub fn full(bytes: Bytes) -> ResponseBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// Builds a JSON response.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ResponseBody> {
    let mut response = Response::new(full(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

/// Routes one client request by its percent-decoded path, which is the path the engine routes
/// by: `/%73lots/0` must not slip past the checks that `/slots/0` meets.
pub async fn handle(app: Arc<App>, request: Request<Incoming>) -> Response<ResponseBody> {
    let Ok(path) = percent_encoding::percent_decode_str(request.uri().path()).decode_utf8().map(|path| path.into_owned()) else {
        return ApiError::invalid_value("path", format!("the request path {} is not valid UTF-8 once percent-decoded", request.uri().path()))
            .into_response();
    };
    match (request.method(), path.as_str()) {
        (_, "/healthz") => health(),
        (_, "/readyz") => readiness(&app),
        (_, path) if path.starts_with(crate::ledger::endpoints::TASK_PATH) || path == "/v1/tasks" => crate::ledger::endpoints::task(app, request, path).await,
        // The sidecar owns the engine's slots; a client saving, restoring or erasing one would
        // make the slot table wrong and could read another client's KV.
        (method, path) if method != http::Method::GET && path.starts_with("/slots") => ApiError::forbidden(
            path,
            "slot actions are managed by kvsidecar; use /admin/stats to see the slots",
        )
        .into_response(),
        (method, path) => match Endpoint::from_path(path) {
            Some(endpoint) if method == http::Method::POST => completion::handle(app, request, endpoint).await,
            Some(_) if method != http::Method::OPTIONS => ApiError::method_not_allowed(method, path).into_response(),
            _ => passthrough::forward(&app, request, path).await,
        },
    }
}

/// `GET /healthz`: the sidecar process is up.
pub fn health() -> Response<ResponseBody> {
    json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

/// `GET /readyz`: the engine is reachable and fingerprinted.
pub fn readiness(app: &App) -> Response<ResponseBody> {
    match app.ready() {
        Some(ready) => json_response(
            StatusCode::OK,
            &serde_json::json!({
                "status": "ready",
                "model": ready.info.model_id,
                "fingerprint": ready.info.fingerprint,
                "engine_generation": ready.generation,
                "snapshots_disabled": ready.info.snapshots_disabled,
            }),
        ),
        None => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "not_ready", "reason": app.not_ready_reason()}),
        ),
    }
}

/// Headers that belong to one connection and are not forwarded (RFC 9110, section 7.6.1).
const HOP_BY_HOP: [header::HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(','))
        .filter_map(|name| name.trim().parse().ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(named.iter()) {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}
