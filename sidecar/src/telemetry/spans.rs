//! The span processor: finished spans go into a bounded queue, and a task on the telemetry
//! runtime exports them in batches. A full queue drops the span; a failed or late export drops
//! the batch. Both are counted, and the request that ended the span never waits.
//!
//! NOTE: the SDK's batch processor drops spans the same way but does not expose the count, which
//! `kvsidecar_telemetry_spans_dropped_total` needs, hence this processor.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use tokio::sync::{mpsc, oneshot};

use super::ExportCounters;

/// Maximum spans in one export request.
const MAX_BATCH: usize = 512;
/// Maximum time a finished span waits for its batch to fill.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// Shortest time between two warnings about failed exports.
const WARN_INTERVAL: Duration = Duration::from_secs(60);

enum Message {
    Span(Box<SpanData>),
    /// Export everything queued before this message, then reply.
    Flush(oneshot::Sender<()>),
}

#[derive(Debug)]
pub struct QueueProcessor {
    queue: mpsc::Sender<Message>,
    /// Sends flush requests, which must not be lost to a full span queue.
    flushes: mpsc::UnboundedSender<Message>,
    counters: Arc<ExportCounters>,
    /// Queue-full drops not yet warned about.
    unwarned: AtomicU64,
}

impl QueueProcessor {
    /// Starts the export task on `runtime`.
    pub fn start<E: SpanExporter + 'static>(runtime: &tokio::runtime::Handle, exporter: E, capacity: usize, timeout: Duration, counters: Arc<ExportCounters>, endpoint: String) -> QueueProcessor {
        let (queue, spans) = mpsc::channel(capacity.max(1));
        let (flushes, flush_requests) = mpsc::unbounded_channel();
        runtime.spawn(export_loop(exporter, spans, flush_requests, Export { timeout, endpoint }, counters.clone()));
        QueueProcessor { queue, flushes, counters, unwarned: AtomicU64::new(0) }
    }

    fn flush(&self, within: Duration) -> OTelSdkResult {
        let (done, wait) = oneshot::channel();
        self.flushes.send(Message::Flush(done)).map_err(|_| OTelSdkError::AlreadyShutdown)?;
        // Called from the shutdown path outside the runtimes, so blocking here is allowed.
        let deadline = std::time::Instant::now() + within;
        let mut wait = wait;
        loop {
            match wait.try_recv() {
                Ok(()) => return Ok(()),
                Err(oneshot::error::TryRecvError::Closed) => return Err(OTelSdkError::AlreadyShutdown),
                Err(oneshot::error::TryRecvError::Empty) if std::time::Instant::now() >= deadline => return Err(OTelSdkError::Timeout(within)),
                Err(oneshot::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.queue.try_send(Message::Span(Box::new(span))).is_err() {
            ExportCounters::add(&self.counters.spans_dropped_queue_full, 1);
            if self.unwarned.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    "span export queue full (telemetry.span_queue): spans are being dropped and counted in kvsidecar_telemetry_spans_dropped_total; check that the collector at telemetry.otlp_endpoint keeps up"
                );
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.flush(Duration::from_secs(5))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.flush(timeout)
    }
}

/// Settings of the export task.
struct Export {
    timeout: Duration,
    /// The collector's address, for the warnings.
    endpoint: String,
}

async fn export_loop<E: SpanExporter>(exporter: E, mut spans: mpsc::Receiver<Message>, mut flushes: mpsc::UnboundedReceiver<Message>, export: Export, counters: Arc<ExportCounters>) {
    let Export { timeout, endpoint } = export;
    let mut batch: Vec<SpanData> = Vec::with_capacity(MAX_BATCH);
    let mut warned_at: Option<tokio::time::Instant> = None;
    let mut failed_since_warning = 0u64;
    loop {
        let mut flush = None;
        tokio::select! {
            message = spans.recv() => match message {
                Some(Message::Span(span)) => batch.push(*span),
                Some(Message::Flush(done)) => flush = Some(done),
                None => return,
            },
            message = flushes.recv() => match message {
                Some(Message::Flush(done)) => flush = Some(done),
                Some(Message::Span(span)) => batch.push(*span),
                None => return,
            },
        }
        if flush.is_none() {
            let deadline = tokio::time::Instant::now() + BATCH_DELAY;
            while batch.len() < MAX_BATCH {
                tokio::select! {
                    message = spans.recv() => match message {
                        Some(Message::Span(span)) => batch.push(*span),
                        Some(Message::Flush(done)) => { flush = Some(done); break }
                        None => break,
                    },
                    message = flushes.recv() => {
                        if let Some(Message::Flush(done)) = message {
                            flush = Some(done);
                        }
                        break;
                    }
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        if flush.is_some() {
            while let Ok(Message::Span(span)) = spans.try_recv() {
                batch.push(*span);
            }
        }
        let mut pending = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
        while !pending.is_empty() {
            let rest = pending.split_off(pending.len().min(MAX_BATCH));
            let part = std::mem::replace(&mut pending, rest);
            let count = part.len() as u64;
            let outcome = match tokio::time::timeout(timeout, exporter.export(part)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err(format!("no answer within {} (telemetry.otlp_timeout)", humantime::format_duration(timeout))),
            };
            match outcome {
                Ok(()) => ExportCounters::add(&counters.spans_exported, count),
                Err(error) => {
                    ExportCounters::add(&counters.spans_dropped_export_failed, count);
                    failed_since_warning += count;
                    let due = warned_at.is_none_or(|at| at.elapsed() >= WARN_INTERVAL);
                    if due {
                        tracing::warn!(
                            error = %error,
                            endpoint = %endpoint,
                            spans_dropped = failed_since_warning,
                            "span export to the OTLP collector failed; spans are dropped and counted in kvsidecar_telemetry_spans_dropped_total; check telemetry.otlp_endpoint and that the collector runs"
                        );
                        warned_at = Some(tokio::time::Instant::now());
                        failed_since_warning = 0;
                    }
                }
            }
        }
        if let Some(done) = flush {
            let _ = done.send(());
        }
    }
}
