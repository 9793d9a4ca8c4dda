//! An in-process OTLP collector for tests: receives trace and metric exports over gRPC or
//! HTTP/protobuf on a loopback port, decodes them with the `opentelemetry-proto` messages and
//! stores them for assertions.
//!
//! The receiver runs on its own Tokio runtime thread, so it keeps serving exporters while the
//! test's thread blocks, whatever runtime flavor the test uses.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use kvsidecar_tests::otlp::OtlpReceiver;
//!
//! let receiver = OtlpReceiver::grpc()?;
//! // Point the exporter at receiver.endpoint(), then:
//! let spans = receiver.wait_for_spans(|spans| spans.iter().any(|span| span.name == "proxy"), Duration::from_secs(10)).await?;
//! for child in receiver.children_of(&spans[0]) {
//!     println!("{} took {:?}", child.name, child.duration());
//! }
//! # Ok(())
//! # }
//! ```

mod metric;
mod server;
mod span;
mod value;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use tokio::sync::watch;

pub use metric::{AggregationTemporality, MetricKind, MetricPoint, histogram_count, sum_value};
pub use span::{Event, Link, Span, SpanKind, StatusCode};
pub use value::Value;

/// The wire protocol a receiver speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC: the trace and metrics services over HTTP/2 without TLS.
    Grpc,
    /// OTLP/HTTP with protobuf bodies over HTTP/1.1.
    Http,
    /// An HTTP/1.1 server that reads each request and never responds.
    HttpStalled,
}

/// One request that reached the receiver.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    /// The HTTP path, such as `/v1/traces`, or the gRPC method path, such as
    /// `/opentelemetry.proto.collector.trace.v1.TraceService/Export`.
    pub path: String,
    /// The HTTP headers, or the gRPC metadata as headers.
    pub headers: http::HeaderMap,
    pub outcome: Outcome,
}

/// What the receiver did with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Decoded, stored, and given a success response.
    Accepted,
    /// Given an error response. The text is the reason.
    Rejected(String),
    /// Read by a stalled receiver, which never responds.
    Held,
}

/// Everything received, in arrival order.
#[derive(Default)]
struct Received {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
    requests: Vec<ReceivedRequest>,
}

/// The store that the servers write and the test reads. Every change bumps a counter in a watch
/// channel, so waiting needs no polling.
#[derive(Clone)]
struct Store {
    received: Arc<Mutex<Received>>,
    changes: Arc<watch::Sender<u64>>,
}

impl Store {
    fn new() -> Store {
        Store { received: Arc::default(), changes: Arc::new(watch::Sender::new(0)) }
    }

    fn lock(&self) -> MutexGuard<'_, Received> {
        // A panic while the lock is held leaves whole requests behind, so the data stays usable.
        self.received.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut Received)) {
        change(&mut self.lock());
        self.changes.send_modify(|count| *count += 1);
    }

    fn record_request(&self, request: ReceivedRequest) {
        self.update(|received| received.requests.push(request));
    }

    fn record_traces(&self, request: ReceivedRequest, message: ExportTraceServiceRequest) {
        self.update(|received| {
            received.requests.push(request);
            received.traces.push(message);
        });
    }

    fn record_metrics(&self, request: ReceivedRequest, message: ExportMetricsServiceRequest) {
        self.update(|received| {
            received.requests.push(request);
            received.metrics.push(message);
        });
    }
}

/// An OTLP collector on `127.0.0.1` and a port chosen by the system. Dropping it stops the
/// server and its runtime.
pub struct OtlpReceiver {
    protocol: Protocol,
    address: SocketAddr,
    store: Store,
    server: Option<server::Server>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl OtlpReceiver {
    /// Starts an OTLP/gRPC receiver serving `TraceService/Export` and `MetricsService/Export`.
    /// Calls to other methods get `UNIMPLEMENTED` and are stored as [`Outcome::Rejected`].
    ///
    /// NOTE: tonic 0.14, built here without its `gzip` feature, rejects a message that it cannot
    /// decode, or a compressed one, before the receiver sees it, so such a call is not stored.
    pub fn grpc() -> Result<OtlpReceiver> {
        Self::start(Protocol::Grpc)
    }

    /// Starts an OTLP/HTTP receiver accepting `POST /v1/traces` and `POST /v1/metrics` with
    /// `content-type: application/x-protobuf`. Other requests get 400, 404 or 405 and are stored
    /// as [`Outcome::Rejected`].
    pub fn http() -> Result<OtlpReceiver> {
        Self::start(Protocol::Http)
    }

    /// Starts an HTTP receiver that accepts connections, reads requests and never responds, for
    /// exporter timeout tests. Requests are stored as [`Outcome::Held`] and their bodies dropped.
    pub fn http_stalled() -> Result<OtlpReceiver> {
        Self::start(Protocol::HttpStalled)
    }

    fn start(protocol: Protocol) -> Result<OtlpReceiver> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-receiver")
            .enable_all()
            .build()
            .context("start the OTLP receiver's runtime")?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind the OTLP receiver to 127.0.0.1:0")?;
        let address = listener.local_addr()?;
        let store = Store::new();
        let server = server::Server::spawn(&runtime, protocol, listener, store.clone())?;
        Ok(OtlpReceiver { protocol, address, store, server: Some(server), runtime: Some(runtime) })
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Returns the base URL `http://127.0.0.1:PORT` for `OTEL_EXPORTER_OTLP_ENDPOINT`. Over gRPC
    /// it is the whole endpoint. Over HTTP, opentelemetry-otlp 0.33 appends `/v1/traces` or
    /// `/v1/metrics` to this variable, but uses a per-signal variable or an endpoint set in code
    /// verbatim: give those [`Self::traces_url`] and [`Self::metrics_url`].
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Returns the URL of the trace signal: `endpoint()` over gRPC, `endpoint()/v1/traces` over HTTP.
    pub fn traces_url(&self) -> String {
        match self.protocol {
            Protocol::Grpc => self.endpoint(),
            Protocol::Http | Protocol::HttpStalled => format!("{}/v1/traces", self.endpoint()),
        }
    }

    /// Returns the URL of the metric signal: `endpoint()` over gRPC, `endpoint()/v1/metrics` over HTTP.
    pub fn metrics_url(&self) -> String {
        match self.protocol {
            Protocol::Grpc => self.endpoint(),
            Protocol::Http | Protocol::HttpStalled => format!("{}/v1/metrics", self.endpoint()),
        }
    }

    /// Stops the server as a collector that went down: once this returns, the port refuses
    /// connections and every open connection is closed. What was received stays stored.
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
    }

    /// Starts the server again on the same port, as a collector that came back, keeping what was
    /// received. Fails if another process took the port in the meantime.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let runtime = self.runtime.as_ref().context("the OTLP receiver's runtime is gone")?;
        let listener = std::net::TcpListener::bind(self.address).with_context(|| format!("bind the OTLP receiver to {} again", self.address))?;
        self.server = Some(server::Server::spawn(runtime, self.protocol, listener, self.store.clone())?);
        Ok(())
    }

    /// Returns every request that reached the receiver, accepted or not, in arrival order.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.store.lock().requests.clone()
    }

    pub fn requests_received(&self) -> usize {
        self.store.lock().requests.len()
    }

    /// Returns the requests that got an error response.
    pub fn rejected(&self) -> Vec<ReceivedRequest> {
        self.store.lock().requests.iter().filter(|request| matches!(request.outcome, Outcome::Rejected(_))).cloned().collect()
    }

    /// Returns the decoded trace exports in arrival order.
    pub fn trace_requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.store.lock().traces.clone()
    }

    /// Returns the decoded metric exports in arrival order.
    pub fn metric_requests(&self) -> Vec<ExportMetricsServiceRequest> {
        self.store.lock().metrics.clone()
    }

    /// Returns every received span in arrival order.
    pub fn spans(&self) -> Vec<Span> {
        span::flatten(&self.store.lock().traces)
    }

    /// Returns the received spans whose parent is `parent`, in arrival order.
    pub fn children_of(&self, parent: &Span) -> Vec<Span> {
        self.spans().into_iter().filter(|span| parent.is_parent_of(span)).collect()
    }

    /// Waits until the received spans satisfy `done`, and returns them all.
    pub async fn wait_for_spans(&self, done: impl Fn(&[Span]) -> bool, timeout: Duration) -> Result<Vec<Span>> {
        self.wait_until("spans", timeout, |received| {
            let spans = span::flatten(&received.traces);
            done(&spans).then_some(spans)
        })
        .await
    }

    /// Waits for the first span that satisfies `matches`, and returns it.
    pub async fn wait_for_span(&self, matches: impl Fn(&Span) -> bool, timeout: Duration) -> Result<Span> {
        self.wait_until("a matching span", timeout, |received| span::flatten(&received.traces).into_iter().find(|span| matches(span))).await
    }

    /// Returns every received metric data point in arrival order.
    pub fn metric_points(&self) -> Vec<MetricPoint> {
        metric::flatten(&self.store.lock().metrics)
    }

    pub fn metric_names(&self) -> BTreeSet<String> {
        self.metric_points().into_iter().map(|point| point.name).collect()
    }

    /// Returns the current value of the gauge or sum `name` over the series that match `filter`;
    /// see [`sum_value`].
    pub fn sum_value(&self, name: &str, filter: &[(&str, &str)]) -> Option<f64> {
        sum_value(&self.metric_points(), name, filter)
    }

    /// Returns the observation count of the histogram `name` over the series that match `filter`;
    /// see [`histogram_count`].
    pub fn histogram_count(&self, name: &str, filter: &[(&str, &str)]) -> Option<u64> {
        histogram_count(&self.metric_points(), name, filter)
    }

    /// Waits until the received data points satisfy `done`, and returns them all. Use
    /// [`sum_value`] and [`histogram_count`] on the slice inside `done`.
    pub async fn wait_for_metrics(&self, done: impl Fn(&[MetricPoint]) -> bool, timeout: Duration) -> Result<Vec<MetricPoint>> {
        self.wait_until("metrics", timeout, |received| {
            let points = metric::flatten(&received.metrics);
            done(&points).then_some(points)
        })
        .await
    }

    /// Waits until at least `count` requests reached the receiver, whatever their outcome, and
    /// returns them all.
    pub async fn wait_for_requests(&self, count: usize, timeout: Duration) -> Result<Vec<ReceivedRequest>> {
        self.wait_until(&format!("{count} request(s)"), timeout, |received| (received.requests.len() >= count).then(|| received.requests.clone())).await
    }

    /// Checks `found` after every change to the store until it returns a value or `timeout`
    /// passes. The error lists what did arrive.
    async fn wait_until<T>(&self, what: &str, timeout: Duration, found: impl Fn(&Received) -> Option<T>) -> Result<T> {
        let mut changes = self.store.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(value) = found(&self.store.lock()) {
                return Ok(value);
            }
            // `changes` cannot close: `self.store` keeps its sender alive.
            if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
                bail!("timed out after {timeout:?} waiting for {what} at the OTLP receiver {}; {}", self.endpoint(), self.summary());
            }
        }
    }

    /// Describes what was received, for failure messages.
    fn summary(&self) -> String {
        let received = self.store.lock();
        let spans: Vec<String> = span::flatten(&received.traces).into_iter().map(|span| span.name).collect();
        let metrics: BTreeSet<String> = metric::flatten(&received.metrics).into_iter().map(|point| point.name).collect();
        let mut text = format!("received {} request(s); spans {spans:?}; metrics {metrics:?}", received.requests.len());
        for request in &received.requests {
            match &request.outcome {
                Outcome::Accepted => {}
                Outcome::Rejected(reason) => {
                    let _ = write!(text, "; rejected {}: {reason}", request.path);
                }
                Outcome::Held => {
                    let _ = write!(text, "; held {}", request.path);
                }
            }
        }
        text
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop();
        if let Some(runtime) = self.runtime.take() {
            // `shutdown_background` never blocks, so dropping the receiver inside an async test is fine.
            runtime.shutdown_background();
        }
    }
}
