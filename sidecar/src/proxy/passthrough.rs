//! Pass-through of requests the sidecar does not cache (`/v1/models`, `/health`, `/tokenize`, ...).
//!
//! Reads and the engine's pure text endpoints stream through unchanged. Any other POST may run a
//! model in a slot the engine picks itself, where it would reuse whatever prefix the slot holds,
//! possibly another tenant's. Such a request is sent with `cache_prompt: false`, and every slot's
//! contents are marked unknown.

use bytes::Bytes;
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
    let path_and_query = parts.uri.path_and_query().map(|pq| pq.as_str().to_string()).unwrap_or_else(|| "/".into());
    parts.uri = app.engine.client().uri(&path_and_query);
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    parts.version = http::Version::HTTP_11;

    let runs_model = parts.method == Method::POST && !TEXT_ONLY.contains(&path);
    let body = if runs_model {
        let limit = app.config.server.max_body.as_u64();
        let within = app.config.server.body_timeout;
        let Ok(read) = tokio::time::timeout(within, read_limited(body, limit as usize + 1)).await else {
            return ApiError::body_timeout(within).into_response();
        };
        let Ok(bytes) = read else {
            return ApiError::body_too_large(limit).into_response();
        };
        if bytes.len() as u64 > limit {
            return ApiError::body_too_large(limit).into_response();
        }
        parts.headers.remove(http::header::CONTENT_LENGTH);
        if let Some(ready) = app.ready() {
            ready.slots.set_all_foreign();
        }
        full_body(without_prompt_cache(bytes))
    } else {
        body.map_err(|error| Box::new(error) as _).boxed()
    };

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

/// Sets `cache_prompt: false` in a JSON object body; other bodies are returned unchanged.
pub fn without_prompt_cache(bytes: Bytes) -> Bytes {
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(mut object)) => {
            object.insert("cache_prompt".into(), serde_json::Value::Bool(false));
            serde_json::to_vec(&object).map(Bytes::from).unwrap_or(bytes)
        }
        _ => bytes,
    }
}
