//! A completion response as the client receives it. The body passes through unchanged, and the
//! time of its first frame and the engine's token counts are noted for the metrics, the span and
//! the ledger. The counts come from the `usage` and `timings` objects of a JSON body or of a
//! stream's events.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde_json::Value;

use super::ResponseBody;
use crate::engine::http_client::BoxError;

/// Maximum stream line kept for parsing. A longer line is skipped, because usage events are short.
const MAX_LINE: usize = 1 << 20;
/// Largest JSON body kept for parsing.
const MAX_DOCUMENT: usize = 16 << 20;

/// Token counts and engine times a response reported. Later reports replace earlier ones, so a
/// stream's final event wins.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// Engine time spent on the prompt, and on generation, in milliseconds.
    pub prompt_ms: Option<f64>,
    pub generation_ms: Option<f64>,
}

impl Usage {
    /// Reads the figures of one JSON document: OpenAI `usage`, llama.cpp `timings`, and the
    /// native endpoint's `tokens_evaluated` and `tokens_predicted`. (Its `tokens_cached` counts
    /// generated tokens too, so the cached count comes from `timings.cache_n`.)
    pub fn read(&mut self, value: &Value) {
        let number = |value: &Value, key: &str| value.get(key).and_then(Value::as_u64);
        if let Some(usage) = value.get("usage").filter(|usage| usage.is_object()) {
            self.prompt_tokens = number(usage, "prompt_tokens").or(self.prompt_tokens);
            self.output_tokens = number(usage, "completion_tokens").or(self.output_tokens);
            let details = usage.get("prompt_tokens_details").unwrap_or(&Value::Null);
            self.cached_tokens = number(details, "cached_tokens").or(self.cached_tokens);
        }
        if let Some(timings) = value.get("timings").filter(|timings| timings.is_object()) {
            let computed = number(timings, "prompt_n");
            let cached = number(timings, "cache_n");
            if let (Some(computed), Some(cached)) = (computed, cached) {
                self.prompt_tokens = Some(computed + cached);
                self.cached_tokens = Some(cached);
            }
            self.output_tokens = number(timings, "predicted_n").or(self.output_tokens);
            self.prompt_ms = timings.get("prompt_ms").and_then(Value::as_f64).or(self.prompt_ms);
            self.generation_ms = timings.get("predicted_ms").and_then(Value::as_f64).or(self.generation_ms);
        }
        if let Some(evaluated) = number(value, "tokens_evaluated") {
            self.prompt_tokens = Some(evaluated);
        }
        self.output_tokens = number(value, "tokens_predicted").or(self.output_tokens);
    }
}

/// The end of a response body.
#[derive(Debug, Clone, Copy)]
pub struct Ending {
    /// Every frame reached the client.
    pub completed: bool,
    pub first_frame: Option<Instant>,
    pub ended: Instant,
    pub usage: Usage,
}

type OnEnd = Box<dyn FnOnce(Ending) + Send + Sync>;

/// Reads usage figures from the bytes of a response body.
enum Scanner {
    /// Server-sent events: complete `data:` lines that mention usage or timings are parsed.
    Events { line: Vec<u8>, skipping: bool },
    /// One JSON document, parsed at the end.
    Document { bytes: Vec<u8>, overflow: bool },
    /// Nothing to read: the usage was known when the body was wrapped.
    Known,
}

impl Scanner {
    fn feed(&mut self, chunk: &[u8], usage: &mut Usage) {
        match self {
            Scanner::Events { line, skipping } => {
                for part in chunk.split_inclusive(|byte| *byte == b'\n') {
                    let complete = part.ends_with(b"\n");
                    if !*skipping {
                        if line.len() + part.len() > MAX_LINE {
                            line.clear();
                            *skipping = true;
                        } else {
                            line.extend_from_slice(part);
                        }
                    }
                    if complete {
                        if !*skipping {
                            read_event(line, usage);
                        }
                        line.clear();
                        *skipping = false;
                    }
                }
            }
            Scanner::Known => {}
            Scanner::Document { bytes, overflow } => {
                if bytes.len() + chunk.len() > MAX_DOCUMENT {
                    *overflow = true;
                    bytes.clear();
                } else if !*overflow {
                    bytes.extend_from_slice(chunk);
                }
            }
        }
    }

    fn finish(&mut self, usage: &mut Usage) {
        match self {
            Scanner::Events { line, skipping } => {
                if !*skipping {
                    read_event(line, usage);
                }
            }
            Scanner::Document { bytes, overflow } => {
                if !*overflow && let Ok(value) = serde_json::from_slice::<Value>(bytes) {
                    usage.read(&value);
                }
            }
            Scanner::Known => {}
        }
    }
}

fn read_event(line: &[u8], usage: &mut Usage) {
    let Some(data) = line.strip_prefix(b"data:") else { return };
    let mentions = |needle: &[u8]| data.windows(needle.len()).any(|window| window == needle);
    if !(mentions(b"\"usage\"") || mentions(b"\"timings\"") || mentions(b"\"tokens_predicted\"")) {
        return;
    }
    if let Ok(value) = serde_json::from_slice::<Value>(data.trim_ascii()) {
        usage.read(&value);
    }
}

/// The response body with an end callback that receives the first-frame time and the usage.
pub struct ObservedBody {
    inner: ResponseBody,
    scanner: Scanner,
    usage: Usage,
    first_frame: Option<Instant>,
    on_end: Option<OnEnd>,
}

impl ObservedBody {
    /// Wraps `inner`. `events` is true for a stream of server-sent events.
    pub fn new(inner: ResponseBody, events: bool, on_end: impl FnOnce(Ending) + Send + Sync + 'static) -> ObservedBody {
        let scanner = if events { Scanner::Events { line: Vec::new(), skipping: false } } else { Scanner::Document { bytes: Vec::new(), overflow: false } };
        ObservedBody { inner, scanner, usage: Usage::default(), first_frame: None, on_end: Some(Box::new(on_end)) }
    }

    /// Wraps `inner`, whose usage the caller already read from it, so the body is not read again.
    pub fn with_usage(inner: ResponseBody, usage: Usage, on_end: impl FnOnce(Ending) + Send + Sync + 'static) -> ObservedBody {
        ObservedBody { inner, scanner: Scanner::Known, usage, first_frame: None, on_end: Some(Box::new(on_end)) }
    }

    fn end(&mut self, completed: bool) {
        if let Some(on_end) = self.on_end.take() {
            self.scanner.finish(&mut self.usage);
            on_end(Ending { completed, first_frame: self.first_frame, ended: Instant::now(), usage: self.usage });
        }
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.end(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                let this = &mut *self;
                if let Some(data) = frame.data_ref() {
                    if this.first_frame.is_none() && !data.is_empty() {
                        this.first_frame = Some(Instant::now());
                    }
                    this.scanner.feed(data, &mut this.usage);
                }
                if this.inner.is_end_stream() {
                    this.end(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                self.end(false);
                Poll::Ready(Some(Err(error)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        self.end(false);
    }
}

#[cfg(test)]
mod tests {
    use super::{Scanner, Usage};

    #[test]
    fn stream_usage_comes_from_the_final_event() {
        let mut usage = Usage::default();
        let mut scanner = Scanner::Events { line: Vec::new(), skipping: false };
        let events = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"timings\":{\"cache_n\":64,\"prompt_n\":10,\"prompt_ms\":5.5,\"predicted_n\":3,\"predicted_ms\":9.0}}\n\ndata: [DONE]\n\n";
        // Split mid-line, as frames may arrive.
        scanner.feed(&events[..30], &mut usage);
        scanner.feed(&events[30..], &mut usage);
        scanner.finish(&mut usage);
        assert_eq!(usage, Usage { prompt_tokens: Some(74), cached_tokens: Some(64), output_tokens: Some(3), prompt_ms: Some(5.5), generation_ms: Some(9.0) });
    }

    #[test]
    fn document_usage_and_native_counts() {
        let mut usage = Usage::default();
        let mut scanner = Scanner::Document { bytes: Vec::new(), overflow: false };
        scanner.feed(br#"{"usage":{"prompt_tokens":12,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":8}}}"#, &mut usage);
        scanner.finish(&mut usage);
        assert_eq!((usage.prompt_tokens, usage.cached_tokens, usage.output_tokens), (Some(12), Some(8), Some(4)));

        let mut native = Usage::default();
        native.read(&serde_json::json!({"tokens_evaluated": 20, "tokens_predicted": 5, "tokens_cached": 25, "timings": {"cache_n": 16, "prompt_n": 4}}));
        assert_eq!((native.prompt_tokens, native.cached_tokens, native.output_tokens), (Some(20), Some(16), Some(5)));
    }
}
