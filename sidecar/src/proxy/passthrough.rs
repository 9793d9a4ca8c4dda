//! Pass-through of requests the sidecar does not cache (`/v1/models`, `/health`, `/tokenize`, ...).
//!
//! Reads and the engine's pure text endpoints are forwarded unchanged. Any other POST would run
//! the model in a slot the engine picks itself and reuse whatever prefix that slot contains,
//! possibly another tenant's. Some engine endpoints (`/v1/messages`) ignore `cache_prompt: false`,
//! so the sidecar cannot keep tenants apart there and rejects them.

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{ResponseBody, strip_hop_by_hop};
use crate::app::App;
use crate::engine::http_client::{full_body, read_limited};
use crate::error::ApiError;

/// POST endpoints that only transform text and never touch a slot.
const TEXT_ONLY: [&str; 3] = ["/tokenize", "/detokenize", "/apply-template"];

/// Forwards `request` (whose decoded path is `path`) to the engine and streams its response back.
pub async fn forward(app: &App, request: Request<Incoming>, path: &str) -> Response<ResponseBody> {
    let (mut parts, body) = request.into_parts();
    if !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) && !TEXT_ONLY.contains(&path) {
        return ApiError::not_passed_through(&parts.method, path).into_response();
    }
    let path_and_query = parts.uri.path_and_query().map(|pq| pq.as_str().to_string()).unwrap_or_else(|| "/".into());
    parts.uri = app.engine.client().uri(&path_and_query);
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    parts.version = http::Version::HTTP_11;

    // Pass-through bodies are small; reading them whole puts them under the same size and time
    // limits as completion bodies.
    let limit = app.config.server.max_body.as_u64();
    let within = app.config.server.body_timeout;
    let Ok(read) = tokio::time::timeout(within, read_limited(body, limit as usize + 1)).await else {
        return ApiError::body_timeout(within).into_response();
    };
    let bytes = match read {
        Ok(bytes) if bytes.len() as u64 <= limit => bytes,
        _ => return ApiError::body_too_large(limit).into_response(),
    };
    parts.headers.remove(http::header::CONTENT_LENGTH);
    let body = full_body(bytes);

    match app.engine.client().send(Request::from_parts(parts, body)).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.map_err(|error| Box::new(error) as _).boxed())
        }
        Err(error) => {
            tracing::warn!(http.path = %path_and_query, error = %error, "pass-through request to the engine failed");
            ApiError::from_engine(&error).into_response()
        }
    }
}
