//! Pass-through of requests the sidecar does not cache (`/v1/models`, `/health`, `/tokenize`, ...):
//! request and response bodies stream through unchanged.

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{ResponseBody, strip_hop_by_hop};
use crate::app::App;
use crate::error::ApiError;

/// Forwards `request` to the engine and streams its response back.
pub async fn forward(app: &App, request: Request<Incoming>) -> Response<ResponseBody> {
    let (mut parts, body) = request.into_parts();
    let path_and_query = parts.uri.path_and_query().map(|pq| pq.as_str().to_string()).unwrap_or_else(|| "/".into());
    parts.uri = app.engine.client().uri(&path_and_query);
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    parts.version = http::Version::HTTP_11;
    let upstream = Request::from_parts(parts, body.map_err(|error| Box::new(error) as _).boxed());

    match app.engine.client().send(upstream).await {
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
