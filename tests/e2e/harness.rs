//! The observability harness itself: the OTLP receiver decodes real exports sent over HTTP and
//! gRPC, Prometheus scrapes an exposition that the test serves on loopback, and promtool judges
//! exposition texts. None of these tests needs llama-server.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kvsidecar_tests::otlp::{Outcome, OtlpReceiver, Protocol, SpanKind, StatusCode, histogram_count, sum_value};
use kvsidecar_tests::prometheus::{JOB, Prometheus, PromtoolError, TargetHealth, promtool_check_metrics};
use kvsidecar_tests::send;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span};
use prost::Message;

const TIMEOUT: Duration = Duration::from_secs(10);

const TRACE_ID: [u8; 16] = [0x0a, 0xf7, 0x65, 0x19, 0x16, 0xcd, 0x43, 0xdd, 0x84, 0x48, 0xeb, 0x21, 0x1c, 0x80, 0x31, 0x9c];
const ROOT_SPAN_ID: [u8; 8] = [0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31];
const CHILD_SPAN_ID: [u8; 8] = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];

fn attribute(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue { key: key.to_string(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

fn text(value: &str) -> any_value::Value {
    any_value::Value::StringValue(value.to_string())
}

fn resource() -> Option<Resource> {
    Some(Resource { attributes: vec![attribute("service.name", text("harness-test"))], ..Default::default() })
}

fn scope() -> Option<InstrumentationScope> {
    Some(InstrumentationScope { name: "kvsidecar-tests".to_string(), ..Default::default() })
}

/// Returns a trace of a server span with one child that failed and recorded an exception event.
fn sample_traces() -> ExportTraceServiceRequest {
    let root = Span {
        trace_id: TRACE_ID.to_vec(),
        span_id: ROOT_SPAN_ID.to_vec(),
        name: "POST /completion".to_string(),
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: 1_700_000_000_000_000_000,
        end_time_unix_nano: 1_700_000_000_250_000_000,
        attributes: vec![
            attribute("http.request.method", text("POST")),
            attribute("http.response.status_code", any_value::Value::IntValue(200)),
            attribute("kvsidecar.hit_ratio", any_value::Value::DoubleValue(0.75)),
            attribute("kvsidecar.cache_hit", any_value::Value::BoolValue(true)),
        ],
        status: Some(Status { code: StatusCode::Ok as i32, message: String::new() }),
        ..Default::default()
    };
    let child = Span {
        trace_id: TRACE_ID.to_vec(),
        span_id: CHILD_SPAN_ID.to_vec(),
        parent_span_id: ROOT_SPAN_ID.to_vec(),
        name: "restore".to_string(),
        kind: span::SpanKind::Internal as i32,
        start_time_unix_nano: 1_700_000_000_010_000_000,
        end_time_unix_nano: 1_700_000_000_020_000_000,
        events: vec![span::Event { name: "exception".to_string(), time_unix_nano: 1_700_000_000_015_000_000, ..Default::default() }],
        status: Some(Status { code: StatusCode::Error as i32, message: "snapshot checksum mismatch".to_string() }),
        ..Default::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: resource(),
            scope_spans: vec![ScopeSpans { scope: scope(), spans: vec![root, child], ..Default::default() }],
            ..Default::default()
        }],
    }
}

fn number_point(route: &str, value: i64) -> NumberDataPoint {
    NumberDataPoint {
        attributes: vec![attribute("route", text(route))],
        time_unix_nano: 1_700_000_000_000_000_000,
        value: Some(number_data_point::Value::AsInt(value)),
        ..Default::default()
    }
}

/// Returns one export of a cumulative counter (two series), a delta counter and a histogram.
fn sample_metrics(cumulative_total: i64, delta: i64, histogram_observations: u64) -> ExportMetricsServiceRequest {
    let cumulative = Metric {
        name: "kvsidecar.requests".to_string(),
        data: Some(metric::Data::Sum(Sum {
            data_points: vec![number_point("completion", cumulative_total), number_point("chat", 2)],
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    };
    let delta = Metric {
        name: "kvsidecar.snapshots.saved".to_string(),
        data: Some(metric::Data::Sum(Sum {
            data_points: vec![number_point("completion", delta)],
            aggregation_temporality: AggregationTemporality::Delta as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    };
    let histogram = Metric {
        name: "kvsidecar.restore.duration".to_string(),
        unit: "s".to_string(),
        data: Some(metric::Data::Histogram(Histogram {
            data_points: vec![HistogramDataPoint { count: histogram_observations, sum: Some(0.5), ..Default::default() }],
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        })),
        ..Default::default()
    };
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: resource(),
            scope_metrics: vec![ScopeMetrics { scope: scope(), metrics: vec![cumulative, delta, histogram], ..Default::default() }],
            ..Default::default()
        }],
    }
}

async fn post_protobuf(url: &str, body: Vec<u8>) -> kvsidecar_tests::Reply {
    send(http::Method::POST, url, Bytes::from(body), &[("content-type", "application/x-protobuf")]).await.unwrap()
}

#[tokio::test]
async fn http_receiver_decodes_traces() {
    let receiver = OtlpReceiver::http().unwrap();

    let reply = post_protobuf(&receiver.traces_url(), sample_traces().encode_to_vec()).await;
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    assert_eq!(reply.header("content-type"), Some("application/x-protobuf"));
    assert_eq!(ExportTraceServiceResponse::decode(reply.body.clone()).unwrap(), ExportTraceServiceResponse::default());

    let spans = receiver.wait_for_spans(|spans| spans.len() == 2, TIMEOUT).await.unwrap();
    let root = spans.iter().find(|span| span.name == "POST /completion").unwrap();
    assert_eq!(root.trace_id, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(root.span_id, "b7ad6b7169203331");
    assert!(root.is_root());
    assert_eq!(root.kind, SpanKind::Server);
    assert_eq!(root.status_code, StatusCode::Ok);
    assert_eq!(root.duration(), Duration::from_millis(250));
    assert_eq!(root.str("http.request.method"), Some("POST"));
    assert_eq!(root.int("http.response.status_code"), Some(200));
    assert_eq!(root.double("kvsidecar.hit_ratio"), Some(0.75));
    assert_eq!(root.bool("kvsidecar.cache_hit"), Some(true));
    assert_eq!(root.str("http.response.status_code"), None, "an integer attribute is not a string");
    assert_eq!(root.service_name(), Some("harness-test"));
    assert_eq!(root.scope, "kvsidecar-tests");

    let children = receiver.children_of(root);
    assert_eq!(children.len(), 1);
    let child = &children[0];
    assert_eq!(child.name, "restore");
    assert_eq!(child.parent_span_id, root.span_id);
    assert_eq!(child.kind, SpanKind::Internal);
    assert_eq!(child.status_code, StatusCode::Error);
    assert_eq!(child.status_message, "snapshot checksum mismatch");
    assert_eq!(child.events.len(), 1);
    assert_eq!(child.events[0].name, "exception");

    assert_eq!(receiver.requests_received(), 1);
    assert!(receiver.rejected().is_empty());
    assert_eq!(receiver.requests()[0].path, "/v1/traces");
}

/// A request that the HTTP receiver rejects, with the status and the reason it gives.
struct BadRequest {
    method: http::Method,
    url: String,
    content_type: &'static str,
    body: Vec<u8>,
    status: u16,
    reason: &'static str,
}

#[tokio::test]
async fn http_receiver_rejects_bad_requests() {
    let receiver = OtlpReceiver::http().unwrap();
    let traces = receiver.traces_url();
    let metrics = receiver.metrics_url();
    let logs = format!("{}/v1/logs", receiver.endpoint());
    // Field 1 with a length of 127 bytes, followed by nothing.
    let truncated = vec![0x0a, 0x7f];
    let protobuf = "application/x-protobuf";
    let cases = [
        BadRequest { method: http::Method::POST, url: traces.clone(), content_type: "application/json", body: b"{}".to_vec(), status: 400, reason: "unsupported content-type" },
        BadRequest { method: http::Method::POST, url: traces.clone(), content_type: protobuf, body: truncated.clone(), status: 400, reason: "invalid ExportTraceServiceRequest" },
        BadRequest { method: http::Method::POST, url: metrics, content_type: protobuf, body: truncated, status: 400, reason: "invalid ExportMetricsServiceRequest" },
        BadRequest { method: http::Method::POST, url: logs, content_type: protobuf, body: Vec::new(), status: 404, reason: "unknown path /v1/logs" },
        BadRequest { method: http::Method::GET, url: traces, content_type: protobuf, body: Vec::new(), status: 405, reason: "method GET not allowed" },
    ];

    for case in &cases {
        let reply = send(case.method.clone(), &case.url, Bytes::from(case.body.clone()), &[("content-type", case.content_type)]).await.unwrap();
        let body = String::from_utf8_lossy(&reply.body);
        assert_eq!(reply.status, case.status, "{} {} with {}: {body}", case.method, case.url, case.content_type);
        assert!(body.contains(case.reason), "{} {}: {body}", case.method, case.url);
    }

    let rejected = receiver.rejected();
    assert_eq!(rejected.len(), cases.len());
    for (request, case) in rejected.iter().zip(&cases) {
        let Outcome::Rejected(reason) = &request.outcome else { panic!("{request:?} is not rejected") };
        assert!(reason.contains(case.reason), "{reason:?} does not contain {:?}", case.reason);
    }
    assert!(receiver.spans().is_empty());
    assert!(receiver.metric_points().is_empty());
}

#[tokio::test]
async fn grpc_receiver_decodes_client_exports() {
    let receiver = OtlpReceiver::grpc().unwrap();
    assert_eq!(receiver.endpoint(), format!("http://{}", receiver.address()));

    let mut traces = TraceServiceClient::connect(receiver.endpoint()).await.unwrap();
    let mut request = tonic::Request::new(sample_traces());
    request.metadata_mut().insert("x-harness", "traces".parse().unwrap());
    traces.export(request).await.unwrap();

    let mut metrics = MetricsServiceClient::connect(receiver.endpoint()).await.unwrap();
    metrics.export(sample_metrics(3, 2, 1)).await.unwrap();
    metrics.export(sample_metrics(5, 3, 4)).await.unwrap();

    let spans = receiver.wait_for_spans(|spans| spans.len() == 2, TIMEOUT).await.unwrap();
    let root = spans.iter().find(|span| span.is_root()).unwrap();
    assert_eq!(root.name, "POST /completion");
    assert_eq!(receiver.children_of(root)[0].name, "restore");
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0].path, "/opentelemetry.proto.collector.trace.v1.TraceService/Export");
    assert_eq!(requests[0].headers.get("x-harness").unwrap(), "traces");

    let names = receiver.metric_names();
    assert!(names.contains("kvsidecar.requests"), "{names:?}");
    assert!(names.contains("kvsidecar.restore.duration"), "{names:?}");
    // A cumulative series keeps its last value, and the series add up without a filter.
    assert_eq!(receiver.sum_value("kvsidecar.requests", &[("route", "completion")]), Some(5.0));
    assert_eq!(receiver.sum_value("kvsidecar.requests", &[]), Some(7.0));
    // Delta points add up over exports.
    assert_eq!(receiver.sum_value("kvsidecar.snapshots.saved", &[]), Some(5.0));
    assert_eq!(receiver.histogram_count("kvsidecar.restore.duration", &[]), Some(4));
    assert_eq!(receiver.sum_value("kvsidecar.requests", &[("route", "embeddings")]), None);
    assert_eq!(receiver.sum_value("kvsidecar.missing", &[]), None);
    assert_eq!(receiver.histogram_count("kvsidecar.requests", &[]), None, "a sum is not a histogram");

    let points = receiver.wait_for_metrics(|points| sum_value(points, "kvsidecar.requests", &[]).is_some(), TIMEOUT).await.unwrap();
    assert_eq!(histogram_count(&points, "kvsidecar.restore.duration", &[]), Some(4));
}

/// Exports a parent span and its child through `exporter` with the OpenTelemetry SDK's simple
/// span processor, which exports each span as it ends.
fn export_two_spans(exporter: opentelemetry_otlp::SpanExporter) {
    use opentelemetry::trace::{TraceContextExt, Tracer, TracerProvider};

    let resource = opentelemetry_sdk::Resource::builder_empty().with_service_name("harness-sdk").build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().with_simple_exporter(exporter).with_resource(resource).build();
    let tracer = provider.tracer("kvsidecar-tests");
    tracer.in_span("parent", |_| {
        tracer.in_span("child", |context| context.span().set_attribute(opentelemetry::KeyValue::new("kvsidecar.tokens", 128)));
    });
    provider.shutdown().unwrap();
}

/// The receiver reads what the OTLP exporters of opentelemetry-otlp send, over both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_decodes_sdk_exports() {
    use opentelemetry_otlp::{Protocol as ExportProtocol, SpanExporter, WithExportConfig};

    for receiver in [OtlpReceiver::grpc().unwrap(), OtlpReceiver::http().unwrap()] {
        let protocol = receiver.protocol();
        let url = receiver.traces_url();
        // The exporters reach the network through Tokio, and the simple processor blocks on each
        // export, so the SDK runs on a blocking thread of this runtime.
        tokio::task::spawn_blocking(move || {
            let exporter = match protocol {
                Protocol::Grpc => SpanExporter::builder().with_tonic().with_endpoint(url).build(),
                _ => SpanExporter::builder().with_http().with_protocol(ExportProtocol::HttpBinary).with_endpoint(url).build(),
            };
            export_two_spans(exporter.unwrap());
        })
        .await
        .unwrap();

        let spans = receiver.wait_for_spans(|spans| spans.len() == 2, TIMEOUT).await.unwrap();
        let parent = spans.iter().find(|span| span.name == "parent").unwrap();
        assert!(parent.is_root(), "{protocol:?}");
        assert_eq!(parent.service_name(), Some("harness-sdk"), "{protocol:?}");
        assert_eq!(parent.scope, "kvsidecar-tests", "{protocol:?}");
        let children = receiver.children_of(parent);
        assert_eq!(children.len(), 1, "{protocol:?}");
        assert_eq!(children[0].name, "child", "{protocol:?}");
        assert_eq!(children[0].kind, SpanKind::Internal, "{protocol:?}");
        assert_eq!(children[0].int("kvsidecar.tokens"), Some(128), "{protocol:?}");
        assert!(receiver.rejected().is_empty(), "{protocol:?}: {:?}", receiver.rejected());
        if protocol == Protocol::Http {
            let requests = receiver.requests();
            assert_eq!(requests[0].path, "/v1/traces");
            assert_eq!(requests[0].headers.get("content-type").unwrap(), "application/x-protobuf");
        }
    }
}

#[tokio::test]
async fn stopped_receiver_refuses_connections() {
    for mut receiver in [OtlpReceiver::grpc().unwrap(), OtlpReceiver::http().unwrap()] {
        let address = receiver.address();
        let protocol = receiver.protocol();
        let mut open = tokio::net::TcpStream::connect(address).await.unwrap();

        receiver.stop();
        let refused = tokio::net::TcpStream::connect(address).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{protocol:?}");
        // The gRPC server may have sent its SETTINGS frame already; the connection then ends.
        let mut unread = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), tokio::io::AsyncReadExt::read_to_end(&mut open, &mut unread)).await;
        assert!(read.is_ok(), "{protocol:?}: a connection open before the stop stays open");

        receiver.restart().unwrap();
        if protocol == Protocol::Http {
            let reply = post_protobuf(&receiver.traces_url(), sample_traces().encode_to_vec()).await;
            assert_eq!(reply.status, 200, "{protocol:?} after restart");
        } else {
            let mut client = TraceServiceClient::connect(receiver.endpoint()).await.unwrap();
            client.export(sample_traces()).await.unwrap();
        }
        assert_eq!(receiver.spans().len(), 2, "{protocol:?} after restart");
    }
}

#[tokio::test]
async fn stalled_receiver_never_responds() {
    let receiver = OtlpReceiver::http_stalled().unwrap();

    let url = receiver.traces_url();
    let result = tokio::time::timeout(Duration::from_millis(500), post_protobuf(&url, sample_traces().encode_to_vec())).await;
    assert!(result.is_err(), "a stalled receiver answered: {result:?}");

    let requests = receiver.wait_for_requests(1, TIMEOUT).await.unwrap();
    assert_eq!(requests[0].path, "/v1/traces");
    assert_eq!(requests[0].outcome, Outcome::Held);
    assert!(receiver.spans().is_empty(), "held requests are not decoded");
}

/// A counter in the Prometheus text format, as the sidecar's `/metrics` would serve it.
const EXPOSITION: &str = "# HELP demo_requests_total Requests served by the demo endpoint.\n\
                          # TYPE demo_requests_total counter\n\
                          demo_requests_total{route=\"/completion\"} 42\n";

/// Serves `text` at every path of a loopback port until the returned task is aborted.
async fn serve_exposition(text: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service_fn(move |_request| async move {
                let mut response = http::Response::new(Full::new(Bytes::from_static(text.as_bytes())));
                response.headers_mut().insert("content-type", http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
                Ok::<_, std::convert::Infallible>(response)
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    (address, task)
}

/// Prometheus 2.42 passes its targets on about 5 s after the start, so one test covers a target
/// that is up and one that is down.
#[tokio::test]
async fn prometheus_scrapes_up_and_down_targets() {
    let (address, server) = serve_exposition(EXPOSITION).await;
    // A port that was free a moment ago, so no server listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let prometheus = Prometheus::start(&[address, closed], Duration::from_millis(200)).await.unwrap();

    let samples = prometheus.wait_for("demo_requests_total", |samples| !samples.is_empty(), TIMEOUT).await.unwrap();
    assert_eq!(samples.len(), 1, "{samples:?}");
    assert_eq!(samples[0].value, 42.0);
    assert_eq!(samples[0].labels["route"], "/completion");
    assert_eq!(samples[0].labels["instance"], address.to_string());
    assert_eq!(samples[0].labels["job"], JOB);
    let doubled = prometheus.query("scalar(demo_requests_total) * 2").await.unwrap();
    assert_eq!(doubled[0].value, 84.0);

    let up = prometheus.wait_for("up", |samples| samples.len() == 2, TIMEOUT).await.unwrap();
    let value_of = |instance: String| up.iter().find(|sample| sample.labels["instance"] == instance).map(|sample| sample.value);
    assert_eq!(value_of(address.to_string()), Some(1.0));
    assert_eq!(value_of(closed.to_string()), Some(0.0));

    let targets = prometheus.targets().await.unwrap();
    assert_eq!(targets.len(), 2);
    let down = targets.iter().find(|target| target.scrape_url == format!("http://{closed}/metrics")).unwrap();
    assert_eq!(down.health, TargetHealth::Down);
    assert_eq!(down.labels["job"], JOB);
    let error = prometheus.wait_for_targets_up(Duration::from_millis(500)).await.unwrap_err().to_string();
    assert!(error.contains(&format!("http://{closed}/metrics is Down")), "{error}");
    assert!(error.contains("connection refused"), "{error}");

    let error = format!("{:#}", prometheus.query("sum(").await.unwrap_err());
    assert!(error.contains("bad_data"), "{error}");
    assert!(error.contains("parse error"), "{error}");
    server.abort();
}

#[tokio::test]
async fn prometheus_rejects_remote_target() {
    let remote: SocketAddr = "192.0.2.1:9090".parse().unwrap();
    let error = Prometheus::start(&[remote], Duration::from_secs(1)).await.err().expect("a remote target is rejected").to_string();
    assert!(error.contains("not on loopback"), "{error}");
}

#[test]
fn promtool_accepts_valid_counter() {
    let output = promtool_check_metrics(EXPOSITION).unwrap();
    assert_eq!(output.trim(), "");
}

#[test]
fn promtool_flags_counter_without_total() {
    let text = "# HELP demo_requests Requests served.\n# TYPE demo_requests counter\ndemo_requests 3\n";
    let error = promtool_check_metrics(text).unwrap_err();
    let PromtoolError::Problems { output, .. } = &error else { panic!("unexpected error: {error}") };
    assert!(output.contains("demo_requests counter metrics should have \"_total\" suffix"), "{output}");
}

#[test]
fn promtool_rejects_invalid_syntax() {
    let error = promtool_check_metrics("demo_requests_total{route=} 1\n").unwrap_err();
    let PromtoolError::Problems { status, output } = &error else { panic!("unexpected error: {error}") };
    assert!(!status.success());
    assert!(output.contains("parsing error"), "{output}");
}
