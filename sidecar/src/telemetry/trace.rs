//! Spans of the request path and W3C trace-context propagation.
//!
//! A request's span context travels with its future (`FutureExt::with_context`), so a step
//! starts its span as a child of `Context::current()`. Outgoing calls to the engine and to peers
//! carry a `traceparent` header, so one trace spans a request forwarded through the fleet.

use std::borrow::Cow;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;

use super::tracer;

/// Returns the trace context a request's `traceparent` and `tracestate` headers carry, or an
/// empty context when they are absent or invalid (an invalid header starts a new trace).
pub fn extract(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes the `traceparent` of the current span into `headers`.
pub fn inject_current(headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(&Context::current(), &mut HeaderInjector(headers));
}

/// Starts a span of `kind` under `parent` and returns the context holding it.
pub fn start(name: impl Into<Cow<'static, str>>, kind: SpanKind, parent: &Context, attributes: Vec<KeyValue>) -> Context {
    let span = tracer().span_builder(name).with_kind(kind).with_attributes(attributes).start_with_context(tracer(), parent);
    parent.with_span(span)
}

/// Starts an internal span under the current one.
pub fn child(name: &'static str) -> Context {
    start(name, SpanKind::Internal, &Context::current(), Vec::new())
}

/// Returns the trace id of the span in `cx` as 32 hex digits.
pub fn trace_id(cx: &Context) -> String {
    cx.span().span_context().trace_id().to_string()
}

/// Returns whether the span in `cx` records. Attributes of a span that does not record are not
/// worth building.
pub fn recording(cx: &Context) -> bool {
    cx.span().is_recording()
}

/// Adds the attributes `build` returns to the span in `cx`, if it records.
pub fn set(cx: &Context, build: impl FnOnce() -> Vec<KeyValue>) {
    let span = cx.span();
    if span.is_recording() {
        span.set_attributes(build());
    }
}

/// Marks the span in `cx` failed with `message` and the `error.type` attribute.
pub fn fail(cx: &Context, error_type: impl Into<String>, message: impl Into<Cow<'static, str>>) {
    let span = cx.span();
    if span.is_recording() {
        span.set_attribute(KeyValue::new("error.type", error_type.into()));
        span.set_status(Status::error(message));
    }
}

/// Ends the span in `cx` now.
pub fn end(cx: &Context) {
    cx.span().end();
}

/// An internal span that ends when dropped, for a step with several exits.
pub struct Step {
    cx: Context,
}

impl Step {
    pub fn start(name: &'static str) -> Step {
        Step { cx: child(name) }
    }

    pub fn context(&self) -> &Context {
        &self.cx
    }

    pub fn set(&self, build: impl FnOnce() -> Vec<KeyValue>) {
        set(&self.cx, build);
    }

    pub fn fail(&self, error_type: &'static str, message: impl Into<Cow<'static, str>>) {
        fail(&self.cx, error_type, message);
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        self.cx.span().end();
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn traceparent_round_trips() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".parse().unwrap());
        let cx = super::extract(&headers);
        assert_eq!(super::trace_id(&cx), "0af7651916cd43dd8448eb211c80319c");
        assert!(cx.span().span_context().is_sampled());
        let broken = super::extract(&http::HeaderMap::from_iter([(http::header::HeaderName::from_static("traceparent"), "zz".parse().unwrap())]));
        assert!(!broken.span().span_context().is_valid());
    }
}
