//! Forwarding a completion request to a peer whose engine contains its prefix. The request goes
//! to the peer API (`POST /peer/v1/forward/v1/chat/completions`, ...), authenticated with the
//! fleet's token and marked with the forwarding node's id. The peer serves it on its own engine
//! and never forwards it again, and its response streams back to the client unchanged.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::Fleet;
use crate::app::App;
use crate::engine::http_client::full_body;
use crate::proxy::{ResponseBody, json_response};
use crate::request::Endpoint;

/// Path prefix of forwarded requests on the peer API.
pub const PATH_PREFIX: &str = "/peer/v1/forward/";

/// Request header on a forwarded request: the node id of the sidecar that forwarded it.
pub const HOP_HEADER: &str = "x-kvsidecar-forwarded-by";

/// Request header on a forwarded request: the tenant the forwarding node resolved. The peer uses
/// it instead of reading the tenant header under its own `request.tenant_header` setting, so a
/// fleet whose members name that header differently still keeps tenants apart.
pub const TENANT_HEADER: &str = "x-kvsidecar-forwarded-tenant";

/// Response header: the node id of the sidecar whose engine served the request.
pub const SERVED_BY_HEADER: &str = "x-kvsidecar-served-by";

/// Serves a request another sidecar forwarded: the completion path of this node, which never
/// forwards it again.
pub async fn serve(app: Arc<App>, request: Request<Incoming>) -> Response<ResponseBody> {
    let path = request.uri().path().trim_start_matches(PATH_PREFIX.trim_end_matches('/')).to_string();
    let Some(endpoint) = Endpoint::from_path(&path) else {
        return json_response(StatusCode::NOT_FOUND, &json!({"error": {"message": format!("no completion endpoint {path} to forward to"), "code": "not_found"}}));
    };
    crate::proxy::completion::handle_forwarded(app, request, endpoint).await
}

/// Client headers a forwarded request keeps: those the completion path reads, except the tenant
/// header, which `TENANT_HEADER` replaces, the trace context, which the forward's own span
/// replaces, and the task header, which `send` copies because its name is configured.
fn kept_headers(from: &HeaderMap, into: &mut HeaderMap) {
    let names = [
        crate::proxy::completion::NAMESPACE_HEADER,
        "accept",
    ];
    for name in names.map(http::HeaderName::from_static) {
        for value in from.get_all(&name) {
            into.append(name.clone(), value.clone());
        }
    }
}

/// Sends the request body `body` for `endpoint` to the peer at `url`, and returns the peer's
/// response once its head arrived within `peers.forward_timeout`.
pub async fn send(app: &App, fleet: &Fleet, url: &str, endpoint: Endpoint, headers: &HeaderMap, tenant: &str, body: Bytes) -> Result<Response<Incoming>, String> {
    let path = match endpoint {
        Endpoint::ChatCompletions => "v1/chat/completions",
        Endpoint::Completions => "v1/completions",
        Endpoint::NativeCompletion => "completion",
    };
    let mut request = Request::post(format!("{url}{PATH_PREFIX}{path}"))
        .header(http::header::AUTHORIZATION, fleet.token.header())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(HOP_HEADER, fleet.identity.node_id.as_str())
        .header(TENANT_HEADER, tenant)
        .body(full_body(body))
        .map_err(|error| format!("invalid peer URL {url}: {error}"))?;
    kept_headers(headers, request.headers_mut());
    let task = &app.config.ledger.task_header;
    for value in headers.get_all(task) {
        request.headers_mut().append(task.clone(), value.clone());
    }
    let within = app.config.peers.forward_timeout;
    tokio::time::timeout(within, fleet.send(request)).await.map_err(|_| format!("no response head within {}", humantime::format_duration(within)))?
}

/// Returns whether a peer's response to a forwarded request should reach the client. This node
/// already accepted the request, so any error status means the peer could not serve it (not
/// ready, overloaded, configured differently), and the request is served here instead.
pub fn deliverable(status: StatusCode) -> bool {
    status.is_success()
}
