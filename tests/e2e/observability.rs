//! Traces and metrics as an observability stack receives them. An in-process OTLP collector (gRPC
//! and HTTP) decodes the spans, a real Prometheus server scrapes `/metrics` and promtool checks
//! it, and exports go to a collector that is down or never responds.

use std::time::Duration;

use kvsidecar_tests::otlp::{OtlpReceiver, Span};
use kvsidecar_tests::prometheus::{Prometheus, promtool_check_metrics};
use kvsidecar_tests::{Engine, Reply, Sidecar, SidecarSpec, Workspace, free_ports, get, send};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use serde_json::json;

/// Trace and span id of the client span in the `traceparent` the tests send.
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

const WAIT: Duration = Duration::from_secs(20);

/// Returns `spec` exporting traces and metrics to `collector` at sampling ratio 1.
fn exporting(mut spec: SidecarSpec, collector: &OtlpReceiver, protocol: &str) -> SidecarSpec {
    spec.env.extend([
        ("KVSIDECAR_TELEMETRY_OTLP_ENDPOINT".to_string(), collector.endpoint()),
        ("KVSIDECAR_TELEMETRY_OTLP_PROTOCOL".to_string(), protocol.to_string()),
        ("KVSIDECAR_TELEMETRY_SAMPLING_RATIO".to_string(), "1".to_string()),
        ("KVSIDECAR_TELEMETRY_METRICS_INTERVAL".to_string(), "1s".to_string()),
        ("KVSIDECAR_TELEMETRY_OTLP_TIMEOUT".to_string(), "1s".to_string()),
    ]);
    spec
}

/// Sends a native completion of `prompt`, with `headers`, and checks that it succeeded.
async fn complete(sidecar: &Sidecar, prompt: &[u32], headers: &[(&str, &str)]) -> Reply {
    let body = json!({"prompt": prompt, "n_predict": 4, "temperature": 0.0});
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let reply = send(http::Method::POST, &format!("{}/completion", sidecar.url), bytes::Bytes::from(body.to_string()), &all).await.expect("completion request");
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    reply
}

/// Waits for the server span of trace `trace` whose cache source attribute is set.
async fn server_span(collector: &OtlpReceiver, matches: impl Fn(&Span) -> bool) -> Span {
    collector
        .wait_for_span(|span| span.kind == SpanKind::Server && span.name == "POST /completion" && span.str("kvsidecar.cache.source").is_some() && matches(span), WAIT)
        .await
        .unwrap_or_else(|error| panic!("no server span: {error}; received {:#?}", collector.spans().iter().map(|s| &s.name).collect::<Vec<_>>()))
}

/// Returns the names of the spans whose parent is `parent`.
fn child_names(collector: &OtlpReceiver, parent: &Span) -> Vec<String> {
    let mut names: Vec<String> = collector.children_of(parent).into_iter().map(|span| span.name).collect();
    names.sort();
    names
}

#[tokio::test]
async fn spans_of_miss_hit_and_restore() {
    let ws = Workspace::new();
    let collector = OtlpReceiver::grpc().unwrap();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let sidecar = Sidecar::start(&exporting(ws.sidecar(&engine), &collector, "grpc"), &ws.logs()).await.unwrap();
    let prompt = kvsidecar_tests::tokens(31, 600);
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");

    // A miss that continues the client's trace; its slot is saved as a snapshot afterwards.
    complete(&sidecar, &prompt, &[("traceparent", &traceparent)]).await;
    let miss = server_span(&collector, |span| span.trace_id == CLIENT_TRACE).await;
    assert_eq!(miss.parent_span_id, CLIENT_SPAN, "the client's span is the parent");
    assert_eq!(miss.str("kvsidecar.cache.source"), Some("none"));
    assert_eq!(miss.int("kvsidecar.cache.cached_tokens"), Some(0));
    assert_eq!(miss.int("gen_ai.usage.input_tokens"), Some(600));
    assert_eq!(miss.int("gen_ai.usage.output_tokens"), Some(4));
    assert_eq!(miss.str("gen_ai.operation.name"), Some("text_completion"));
    assert_eq!(miss.int("http.response.status_code"), Some(200));
    assert!(miss.str("gen_ai.request.model").is_some_and(|model| !model.is_empty()), "{miss:?}");
    assert!(miss.double("kvsidecar.time_to_first_token").is_some_and(|seconds| seconds > 0.0), "{miss:?}");
    assert_eq!(miss.service_name(), Some("kvsidecar"));
    collector.wait_for_spans(|spans| spans.iter().any(|span| span.name == "kvsidecar.snapshot.save" && span.parent_span_id == miss.span_id), WAIT).await.unwrap();
    let children = child_names(&collector, &miss);
    assert!(children.starts_with(&["kvsidecar.prefix".to_string(), "kvsidecar.route".to_string(), "kvsidecar.snapshot.save".to_string()]), "{children:?}");
    let engine_call = collector.children_of(&miss).into_iter().find(|span| span.name.starts_with("text_completion ")).expect("engine call span");
    assert_eq!(engine_call.kind, SpanKind::Client);
    assert_eq!(engine_call.int("gen_ai.usage.input_tokens"), Some(600));
    let route = collector.children_of(&miss).into_iter().find(|span| span.name == "kvsidecar.route").unwrap();
    assert_eq!(route.str("kvsidecar.plugin.name"), Some("prefix-affinity"));
    assert!(route.int("kvsidecar.route.candidates") >= Some(1), "{route:?}");
    assert_eq!(route.str("kvsidecar.route.decision"), Some("local"));
    let prefix = collector.children_of(&miss).into_iter().find(|span| span.name == "kvsidecar.prefix").unwrap();
    assert_eq!(prefix.int("kvsidecar.prompt.tokens"), Some(600));

    // A slot hit without a traceparent starts its own trace.
    complete(&sidecar, &prompt, &[]).await;
    let hit = server_span(&collector, |span| span.trace_id != CLIENT_TRACE && span.str("kvsidecar.cache.source") == Some("slot")).await;
    assert!(hit.is_root(), "{hit:?}");
    assert!(hit.int("kvsidecar.cache.cached_tokens") >= Some(599), "{hit:?}");

    // Another prompt takes the only slot, so the first one comes back from the store.
    complete(&sidecar, &kvsidecar_tests::tokens(32, 300), &[]).await;
    let restored = complete(&sidecar, &prompt, &[]).await;
    assert_eq!(restored.cache_source(), "local");
    let local = server_span(&collector, |span| span.str("kvsidecar.cache.source") == Some("local")).await;
    let restore = collector.children_of(&local).into_iter().find(|span| span.name == "kvsidecar.restore").expect("restore span");
    assert_eq!(restore.str("kvsidecar.restore.source"), Some("local"));
    assert!(restore.int("kvsidecar.restore.bytes") > Some(100_000), "{restore:?}");
    assert!(restore.int("kvsidecar.restore.tokens") >= Some(576), "{restore:?}");
    assert!(restore.end_unix_nanos > restore.start_unix_nanos);

    // The same figures arrive as OTLP metrics.
    collector
        .wait_for_metrics(|points| kvsidecar_tests::otlp::sum_value(points, "kvsidecar.cache.requests", &[("source", "local")]) >= Some(1.0), WAIT)
        .await
        .unwrap();
    assert!(collector.histogram_count("kvsidecar.time_to_first_token", &[("cache", "hit")]) >= Some(2));
}

#[tokio::test]
async fn forwarded_request_is_one_trace() {
    let ws = Workspace::new();
    let collector = OtlpReceiver::http().unwrap();
    let engines = [Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap(), Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap()];
    let [port_a, port_b] = free_ports::<2>();
    let member = |engine: &Engine, name: &str, port: u16, peer: u16, forward: &str| {
        let mut spec = exporting(kvsidecar_tests::fleet_member(&ws, engine, name, port, &[peer]), &collector, "http");
        spec.env.push(("KVSIDECAR_PLUGINS_ROUTER_CONFIG".to_string(), format!("forward = \"{forward}\"")));
        spec.env.push(("KVSIDECAR_TELEMETRY_SERVICE_NAME".to_string(), format!("kvsidecar-{name}")));
        spec
    };
    let a = Sidecar::start(&member(&engines[0], "a", port_a, port_b, "never"), &ws.logs()).await.unwrap();
    let b = Sidecar::start(&member(&engines[1], "b", port_b, port_a, "always"), &ws.logs()).await.unwrap();
    let prompt = kvsidecar_tests::tokens(41, 512);
    complete(&a, &prompt, &[]).await;
    // B forwards once its view of A's slot contains the prompt.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let peers = get(&format!("{}/admin/peers", b.admin_url)).await.unwrap().json();
        if peers["peers"][0]["index"]["slot_blocks"].as_u64() >= Some(8) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "B never saw A's slot: {peers}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let reply = complete(&b, &prompt, &[("traceparent", &traceparent)]).await;
    assert!(reply.header("x-kvsidecar-served-by").is_some());

    let spans = collector
        .wait_for_spans(|spans| spans.iter().filter(|span| span.trace_id == CLIENT_TRACE && span.name == "POST /completion" && span.str("kvsidecar.cache.source").is_some()).count() >= 1
            && spans.iter().any(|span| span.trace_id == CLIENT_TRACE && span.bool("kvsidecar.forwarded") == Some(true) && span.str("kvsidecar.cache.source").is_some()), WAIT)
        .await
        .unwrap_or_else(|error| panic!("{error}: {:#?}", collector.spans()));
    let in_trace: Vec<&Span> = spans.iter().filter(|span| span.trace_id == CLIENT_TRACE).collect();
    let entry = in_trace.iter().find(|span| span.name == "POST /completion" && span.parent_span_id == CLIENT_SPAN).expect("B's server span");
    assert_eq!(entry.service_name(), Some("kvsidecar-b"));
    assert!(entry.str("kvsidecar.served_by").is_some(), "{entry:?}");
    let forward = in_trace.iter().find(|span| span.name == "kvsidecar.forward").expect("B's forward span");
    assert_eq!(forward.parent_span_id, entry.span_id);
    assert_eq!(forward.kind, SpanKind::Client);
    let served = in_trace.iter().find(|span| span.bool("kvsidecar.forwarded") == Some(true)).expect("A's server span");
    assert_eq!(served.parent_span_id, forward.span_id, "A's span continues B's forward span");
    assert_eq!(served.service_name(), Some("kvsidecar-a"));
    assert_eq!(served.str("kvsidecar.cache.source"), Some("slot"));
    assert!(collector.rejected().is_empty(), "every export decoded: {:?}", collector.rejected());
}

#[tokio::test]
async fn collector_down_drops_and_counts() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(2), &ws.logs()).await.unwrap();
    let mut down = OtlpReceiver::grpc().unwrap();
    let stalled = OtlpReceiver::http_stalled().unwrap();
    let mut sidecar_down = Sidecar::start(&exporting(ws.sidecar(&engine), &down, "grpc"), &ws.logs()).await.unwrap();
    down.stop();
    let mut spec = exporting(ws.sidecar(&engine), &stalled, "http");
    spec.data_dir = ws.path("stalled-data");
    let sidecar_stalled = Sidecar::start(&spec, &ws.logs()).await.unwrap();

    for (n, sidecar) in [&sidecar_down, &sidecar_stalled].into_iter().enumerate() {
        for request in 0..10u64 {
            complete(sidecar, &kvsidecar_tests::tokens(1000 * n as u64 + request, 40), &[]).await;
        }
        let deadline = std::time::Instant::now() + WAIT;
        let dropped = loop {
            let text = get(&format!("{}/metrics", sidecar.admin_url)).await.unwrap();
            let text = String::from_utf8_lossy(&text.body).to_string();
            let dropped: f64 = text
                .lines()
                .find(|line| line.starts_with("kvsidecar_telemetry_spans_dropped_total{reason=\"export_failed\"}"))
                .and_then(|line| line.rsplit(' ').next())
                .and_then(|value| value.parse().ok())
                .unwrap_or(0.0);
            if dropped >= 10.0 || std::time::Instant::now() > deadline {
                break dropped;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(dropped >= 10.0, "dropped spans counted: {dropped}");
        assert_eq!(sidecar.stats().await["requests"]["outcome"]["completed"], 10);
    }
    assert!(sidecar_down.log().contains("span export to the OTLP collector failed"), "a warning names the failure");
    assert!(stalled.requests_received() >= 1, "the stalled collector was reached");
    let _ = sidecar_down.terminate();
}

#[tokio::test]
async fn prometheus_scrapes_and_promtool_passes() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    // A fleet member with a peer that never responds, so peer metrics have a series too.
    let [port, silent] = free_ports::<2>();
    let sidecar = Sidecar::start(&kvsidecar_tests::fleet_member(&ws, &engine, "a", port, &[silent]), &ws.logs()).await.unwrap();
    let prompt = kvsidecar_tests::tokens(51, 300);
    complete(&sidecar, &prompt, &[]).await;
    complete(&sidecar, &prompt, &[]).await;

    let metrics = get(&format!("{}/metrics", sidecar.admin_url)).await.unwrap();
    assert_eq!(metrics.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    for name in ["kvsidecar_requests_total", "kvsidecar_cached_tokens_total", "kvsidecar_time_to_first_token_seconds_bucket", "kvsidecar_peers", "kvsidecar_plugin_calls_total", "kvsidecar_store_size_bytes"] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    if let Err(problems) = promtool_check_metrics(&text) {
        panic!("promtool check metrics: {problems}\n{text}");
    }

    let admin: std::net::SocketAddr = sidecar.admin_url.trim_start_matches("http://").parse().unwrap();
    let prometheus = Prometheus::start(&[admin], Duration::from_secs(1)).await.unwrap();
    prometheus.wait_for_targets_up(WAIT).await.unwrap();
    let ratio = prometheus
        .wait_for("sum(kvsidecar_cached_tokens_total) / sum(kvsidecar_prompt_tokens_total)", |samples| samples.first().is_some_and(|sample| sample.value > 0.4), WAIT)
        .await
        .unwrap();
    // The second request reused all but the last prompt token.
    assert!((ratio[0].value - 299.0 / 600.0).abs() < 1e-9, "{}", ratio[0].value);
    let requests = prometheus.query("sum(kvsidecar_requests_total{outcome=\"completed\"})").await.unwrap();
    assert_eq!(requests[0].value, 2.0);
}
