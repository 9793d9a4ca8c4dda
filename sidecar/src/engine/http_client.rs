//! The pooled HTTP/1.1 client that talks to the engine, with connect and response timeouts.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::EngineError;

/// Error type of request bodies sent upstream.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body type of requests sent to the engine.
pub type UpstreamBody = BoxBody<Bytes, BoxError>;

/// Largest JSON body read from the engine's control endpoints (props, tokenize, slots).
const MAX_CONTROL_BODY: usize = 64 << 20;

/// A client bound to one engine base URL.
#[derive(Clone)]
pub struct EngineClient {
    base: Uri,
    client: Client<HttpConnector, UpstreamBody>,
    connect_timeout: Duration,
    response_timeout: Duration,
}

/// Owner of a dedicated engine connection. Dropping it aborts the task that drives the
/// connection, which closes the socket, and the engine stops working on the request.
pub struct ConnectionGuard(tokio::task::AbortHandle);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl EngineClient {
    pub fn new(base: Uri, connect_timeout: Duration, response_timeout: Duration) -> EngineClient {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        EngineClient { base, client, connect_timeout, response_timeout }
    }

    pub fn base(&self) -> &Uri {
        &self.base
    }

    /// Builds the engine URI for `path_and_query` (which starts with `/`).
    pub fn uri(&self, path_and_query: &str) -> Uri {
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = Some(path_and_query.parse().unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/")));
        Uri::from_parts(parts).unwrap_or_else(|_| self.base.clone())
    }

    /// Sends `request` and waits for the response headers, at most the response timeout.
    pub async fn send(&self, request: Request<UpstreamBody>) -> Result<Response<Incoming>, EngineError> {
        self.send_within(request, self.response_timeout).await
    }

    async fn send_within(&self, request: Request<UpstreamBody>, limit: Duration) -> Result<Response<Incoming>, EngineError> {
        let path = request.uri().path().to_string();
        match tokio::time::timeout(limit, self.client.request(request)).await {
            Err(_) => Err(EngineError::Timeout { path, after: limit }),
            Ok(Err(error)) => Err(EngineError::Unreachable { url: self.base.to_string(), reason: error_chain(&error) }),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// Sends `request` on a connection of its own and waits for the response headers, at most
    /// the response timeout. The connection closes when the returned guard is dropped, so a
    /// timeout, a client disconnect or a dropped stream also cancels the engine's work. A pooled
    /// connection would stay open until the engine finished.
    pub async fn send_cancellable(&self, mut request: Request<UpstreamBody>) -> Result<(Response<Incoming>, ConnectionGuard), EngineError> {
        let path = request.uri().path().to_string();
        let unreachable = |reason: String| EngineError::Unreachable { url: self.base.to_string(), reason };
        let host = self.base.host().unwrap_or("127.0.0.1").trim_start_matches('[').trim_end_matches(']').to_string();
        let port = self.base.port_u16().unwrap_or(80);

        let stream = match tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect((host.as_str(), port))).await {
            Err(_) => return Err(unreachable(format!("connect timed out after {}", humantime::format_duration(self.connect_timeout)))),
            Ok(Err(error)) => return Err(unreachable(error.to_string())),
            Ok(Ok(stream)) => stream,
        };
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|error| unreachable(error_chain(&error)))?;
        let driver = tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "engine connection ended with an error");
            }
        });
        let guard = ConnectionGuard(driver.abort_handle());

        // HTTP/1.1 on a raw connection takes the origin form of the URI and a Host header.
        let origin = request.uri().path_and_query().map(|pq| pq.as_str().to_string()).unwrap_or_else(|| "/".into());
        *request.uri_mut() = origin.parse().unwrap_or_else(|_| Uri::from_static("/"));
        if let Some(authority) = self.base.authority().and_then(|authority| http::HeaderValue::from_str(authority.as_str()).ok()) {
            request.headers_mut().insert(http::header::HOST, authority);
        }
        match tokio::time::timeout(self.response_timeout, sender.send_request(request)).await {
            Err(_) => Err(EngineError::Timeout { path, after: self.response_timeout }),
            Ok(Err(error)) => Err(unreachable(error_chain(&error))),
            Ok(Ok(response)) => Ok((response, guard)),
        }
    }

    /// Calls a JSON control endpoint and returns its decoded body. A non-2xx status is an error.
    pub async fn json(&self, method: Method, path: &str, body: Option<&Value>, limit: Duration) -> Result<Value, EngineError> {
        let payload = match body {
            Some(value) => Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
            None => Bytes::new(),
        };
        let mut builder = Request::builder().method(method).uri(self.uri(path));
        if body.is_some() {
            builder = builder.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(full_body(payload))
            .map_err(|error| EngineError::InvalidResponse { path: path.into(), detail: error.to_string() })?;

        let response = self.send_within(request, limit).await?;
        let status = response.status();
        let bytes = read_limited(response.into_body(), MAX_CONTROL_BODY)
            .await
            .map_err(|detail| EngineError::InvalidResponse { path: path.into(), detail })?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|error| EngineError::InvalidResponse {
            path: path.into(),
            detail: format!("not JSON ({error}) with HTTP {status}"),
        })?;
        if !status.is_success() {
            let message = value
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("no error message")
                .to_string();
            return Err(EngineError::Status { path: path.into(), status: status.as_u16(), message });
        }
        Ok(value)
    }
}

/// Wraps bytes as an upstream request body.
pub fn full_body(bytes: Bytes) -> UpstreamBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// Reads a whole body, failing when it passes `limit` bytes.
pub async fn read_limited<B>(body: B, limit: usize) -> Result<Bytes, String>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => Err(error.to_string()),
    }
}

/// Formats an error with its chain of sources, so that "client error (Connect)" is followed by
/// its cause, such as "connection refused".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
