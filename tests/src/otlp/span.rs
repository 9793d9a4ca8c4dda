//! Spans of received trace exports, flattened: one value per span with its resource and scope.

use std::collections::BTreeMap;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1 as proto;
pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
pub use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

use super::value::{Value, attributes};

/// One received span. Ids are lowercase hex, as the W3C `traceparent` header writes them.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// `SpanKind::Unspecified` also stands for a kind number that this OTLP version does not define.
    pub kind: SpanKind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    /// `StatusCode::Unset` also stands for a missing status or an unknown code number.
    pub status_code: StatusCode,
    pub status_message: String,
    pub attributes: BTreeMap<String, Value>,
    pub events: Vec<Event>,
    pub links: Vec<Link>,
    /// Attributes of the resource that sent the span, such as `service.name`.
    pub resource: BTreeMap<String, Value>,
    /// Name of the instrumentation scope (the tracer's name).
    pub scope: String,
}

/// An event recorded on a span, such as an `exception`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub time_unix_nanos: u64,
    pub attributes: BTreeMap<String, Value>,
}

/// A link from a span to another span, possibly of another trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub trace_id: String,
    pub span_id: String,
    pub attributes: BTreeMap<String, Value>,
}

impl Span {
    pub fn attribute(&self, key: &str) -> Option<&Value> {
        self.attributes.get(key)
    }

    /// Returns the attribute `key` if it is a string.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.attribute(key).and_then(Value::as_str)
    }

    /// Returns the attribute `key` if it is an integer.
    pub fn int(&self, key: &str) -> Option<i64> {
        self.attribute(key).and_then(Value::as_int)
    }

    /// Returns the attribute `key` if it is a double.
    pub fn double(&self, key: &str) -> Option<f64> {
        self.attribute(key).and_then(Value::as_double)
    }

    /// Returns the attribute `key` if it is a boolean.
    pub fn bool(&self, key: &str) -> Option<bool> {
        self.attribute(key).and_then(Value::as_bool)
    }

    /// Returns the resource attribute `service.name`.
    pub fn service_name(&self) -> Option<&str> {
        self.resource.get("service.name").and_then(Value::as_str)
    }

    pub fn is_root(&self) -> bool {
        self.parent_span_id.is_empty()
    }

    /// Returns the time from start to end, or zero when the end precedes the start.
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.end_unix_nanos.saturating_sub(self.start_unix_nanos))
    }

    /// Returns whether `other` is a direct child of this span.
    pub fn is_parent_of(&self, other: &Span) -> bool {
        other.trace_id == self.trace_id && other.parent_span_id == self.span_id
    }
}

/// Flattens the spans of `requests` in the order they arrived.
pub fn flatten<'a>(requests: impl IntoIterator<Item = &'a ExportTraceServiceRequest>) -> Vec<Span> {
    let mut spans = Vec::new();
    for request in requests {
        for resource_spans in &request.resource_spans {
            let resource = resource_spans.resource.as_ref().map(|resource| attributes(&resource.attributes)).unwrap_or_default();
            for scope_spans in &resource_spans.scope_spans {
                let scope = scope_spans.scope.as_ref().map(|scope| scope.name.clone()).unwrap_or_default();
                spans.extend(scope_spans.spans.iter().map(|span| convert(span, &resource, &scope)));
            }
        }
    }
    spans
}

fn convert(span: &proto::Span, resource: &BTreeMap<String, Value>, scope: &str) -> Span {
    let status = span.status.as_ref();
    Span {
        trace_id: hex::encode(&span.trace_id),
        span_id: hex::encode(&span.span_id),
        parent_span_id: hex::encode(&span.parent_span_id),
        name: span.name.clone(),
        kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
        start_unix_nanos: span.start_time_unix_nano,
        end_unix_nanos: span.end_time_unix_nano,
        status_code: status.and_then(|status| StatusCode::try_from(status.code).ok()).unwrap_or(StatusCode::Unset),
        status_message: status.map(|status| status.message.clone()).unwrap_or_default(),
        attributes: attributes(&span.attributes),
        events: span
            .events
            .iter()
            .map(|event| Event { name: event.name.clone(), time_unix_nanos: event.time_unix_nano, attributes: attributes(&event.attributes) })
            .collect(),
        links: span
            .links
            .iter()
            .map(|link| Link { trace_id: hex::encode(&link.trace_id), span_id: hex::encode(&link.span_id), attributes: attributes(&link.attributes) })
            .collect(),
        resource: resource.clone(),
        scope: scope.to_string(),
    }
}
