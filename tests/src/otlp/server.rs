//! The receiver's accept loop and its three protocols: OTLP over gRPC, OTLP over HTTP/protobuf,
//! and a stalled HTTP server that never responds.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{MetricsService, MetricsServiceServer};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tonic::codegen::Service;

use super::{Outcome, Protocol, ReceivedRequest, Store};

/// gRPC method paths of the two OTLP services.
const GRPC_TRACES_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
const GRPC_METRICS_PATH: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// How long `stop` waits for the accept loop to close the listener and its connections.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A running accept loop on the receiver's runtime.
pub(super) struct Server {
    shutdown: oneshot::Sender<()>,
    stopped: std::sync::mpsc::Receiver<()>,
}

impl Server {
    pub(super) fn spawn(runtime: &tokio::runtime::Runtime, protocol: Protocol, listener: std::net::TcpListener, store: Store) -> std::io::Result<Server> {
        listener.set_nonblocking(true)?;
        let listener = {
            let _context = runtime.enter();
            TcpListener::from_std(listener)?
        };
        let (shutdown, shutdown_signal) = oneshot::channel();
        let (stopped_signal, stopped) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            accept_loop(listener, protocol, store, shutdown_signal).await;
            let _ = stopped_signal.send(());
        });
        Ok(Server { shutdown, stopped })
    }

    /// Closes the listener and every open connection, and returns once both are closed. It
    /// blocks the calling thread, which is never a thread of the receiver's runtime.
    pub(super) fn stop(self) {
        let _ = self.shutdown.send(());
        if self.stopped.recv_timeout(STOP_TIMEOUT).is_err() {
            eprintln!("otlp receiver: the server did not stop within {STOP_TIMEOUT:?}");
        }
    }
}

async fn accept_loop(listener: TcpListener, protocol: Protocol, store: Store, mut shutdown: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            // A dropped sender (the receiver itself is gone) stops the loop too.
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(stream, peer, protocol, store.clone()));
                }
                Err(error) => {
                    // Running out of file descriptors is the usual cause, and it passes.
                    eprintln!("otlp receiver: accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }

    // The port refuses connections from here on, and every open connection is reset.
    drop(listener);
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, protocol: Protocol, store: Store) {
    let io = TokioIo::new(stream);
    let result = match protocol {
        Protocol::Grpc => {
            let router = GrpcRouter::new(store);
            let service = service_fn(move |request| router.clone().route(request));
            hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, service).await
        }
        Protocol::Http => {
            let service = service_fn(move |request| answer_http(request, store.clone()));
            hyper::server::conn::http1::Builder::new().serve_connection(io, service).await
        }
        Protocol::HttpStalled => {
            let service = service_fn(move |request| hold_http(request, store.clone()));
            hyper::server::conn::http1::Builder::new().serve_connection(io, service).await
        }
    };
    if let Err(error) = result {
        // Clients that close a connection mid-request land here, which tests do on purpose.
        eprintln!("otlp receiver: connection from {peer} failed: {error}");
    }
}

/// The OTLP trace and metrics services behind one gRPC port, as a collector serves them.
#[derive(Clone)]
struct GrpcRouter {
    traces: TraceServiceServer<Collector>,
    metrics: MetricsServiceServer<Collector>,
    store: Store,
}

impl GrpcRouter {
    fn new(store: Store) -> GrpcRouter {
        let collector = Collector { store: store.clone() };
        GrpcRouter { traces: TraceServiceServer::new(collector.clone()), metrics: MetricsServiceServer::new(collector), store }
    }

    async fn route(mut self, request: http::Request<Incoming>) -> Result<http::Response<tonic::body::Body>, Infallible> {
        let path = request.uri().path().to_string();
        if path == GRPC_TRACES_PATH {
            return self.traces.call(request).await;
        }
        if path == GRPC_METRICS_PATH {
            return self.metrics.call(request).await;
        }
        let reason = format!("unimplemented gRPC method {path}");
        self.store.record_request(ReceivedRequest { path, headers: request.headers().clone(), outcome: Outcome::Rejected(reason.clone()) });
        Ok(tonic::Status::unimplemented(reason).into_http())
    }
}

/// The gRPC service implementations, which store every request and return an empty response.
#[derive(Clone)]
struct Collector {
    store: Store,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(&self, request: tonic::Request<ExportTraceServiceRequest>) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let (metadata, _, message) = request.into_parts();
        let received = ReceivedRequest { path: GRPC_TRACES_PATH.to_string(), headers: metadata.into_headers(), outcome: Outcome::Accepted };
        self.store.record_traces(received, message);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(&self, request: tonic::Request<ExportMetricsServiceRequest>) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let (metadata, _, message) = request.into_parts();
        let received = ReceivedRequest { path: GRPC_METRICS_PATH.to_string(), headers: metadata.into_headers(), outcome: Outcome::Accepted };
        self.store.record_metrics(received, message);
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// Handles one OTLP/HTTP request. A protobuf export to `/v1/traces` or `/v1/metrics` is decoded,
/// stored and given 200 with the empty protobuf response. Every other request is stored as
/// rejected and given 404 (unknown path), 405 (not POST) or 400 (another content type or
/// encoding, or a body that does not decode).
async fn answer_http(request: http::Request<Incoming>, store: Store) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_string();
    let headers = request.headers().clone();
    let method = request.method().clone();
    let body = request.into_body().collect().await.map(|collected| collected.to_bytes());

    let rejection = |status: http::StatusCode, reason: String| {
        let response = plain_response(status, &reason);
        store.record_request(ReceivedRequest { path: path.clone(), headers: headers.clone(), outcome: Outcome::Rejected(reason) });
        Ok(response)
    };

    if path != "/v1/traces" && path != "/v1/metrics" {
        return rejection(http::StatusCode::NOT_FOUND, format!("unknown path {path}; OTLP/HTTP paths are /v1/traces and /v1/metrics"));
    }
    if method != http::Method::POST {
        return rejection(http::StatusCode::METHOD_NOT_ALLOWED, format!("method {method} not allowed on {path}; OTLP/HTTP uses POST"));
    }
    let content_type = headers.get(http::header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case("application/x-protobuf") {
        return rejection(http::StatusCode::BAD_REQUEST, format!("unsupported content-type {content_type:?}; expected application/x-protobuf"));
    }
    if let Some(encoding) = headers.get(http::header::CONTENT_ENCODING).and_then(|value| value.to_str().ok())
        && !encoding.eq_ignore_ascii_case("identity")
    {
        return rejection(http::StatusCode::BAD_REQUEST, format!("unsupported content-encoding {encoding:?}; this receiver reads uncompressed bodies only"));
    }
    let body = match body {
        Ok(body) => body,
        Err(error) => return rejection(http::StatusCode::BAD_REQUEST, format!("reading the request body failed: {error}")),
    };

    let received = ReceivedRequest { path: path.clone(), headers: headers.clone(), outcome: Outcome::Accepted };
    if path == "/v1/traces" {
        match ExportTraceServiceRequest::decode(body) {
            Ok(message) => store.record_traces(received, message),
            Err(error) => return rejection(http::StatusCode::BAD_REQUEST, format!("invalid ExportTraceServiceRequest: {error}")),
        }
        Ok(protobuf_response(ExportTraceServiceResponse::default().encode_to_vec()))
    } else {
        match ExportMetricsServiceRequest::decode(body) {
            Ok(message) => store.record_metrics(received, message),
            Err(error) => return rejection(http::StatusCode::BAD_REQUEST, format!("invalid ExportMetricsServiceRequest: {error}")),
        }
        Ok(protobuf_response(ExportMetricsServiceResponse::default().encode_to_vec()))
    }
}

/// Reads one request whole, stores it as held and never responds, as a collector that hangs would.
async fn hold_http(request: http::Request<Incoming>, store: Store) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_string();
    let headers = request.headers().clone();
    let _ = request.into_body().collect().await;
    store.record_request(ReceivedRequest { path, headers, outcome: Outcome::Held });
    std::future::pending().await
}

fn protobuf_response(body: Vec<u8>) -> http::Response<Full<Bytes>> {
    let mut response = http::Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-protobuf"));
    response
}

fn plain_response(status: http::StatusCode, text: &str) -> http::Response<Full<Bytes>> {
    let mut response = http::Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}
