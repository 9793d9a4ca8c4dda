//! The sidecar's metrics. Counters and gauges are read from the sidecar's own counters when a
//! reader collects, so requests pay nothing for them. Durations are histograms, recorded as they
//! happen. docs/observability.md lists every metric with its Prometheus name.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Histogram, Meter, MeterProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{SdkMeterProvider, Temporality};

use super::{ExportCounters, SCOPE};
use crate::app::App;
use crate::plugin::Kind;

/// Bucket bounds, in seconds, of request-scale durations: time to first token, restores, pulls.
const REQUEST_SECONDS: [f64; 16] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Bucket bounds, in seconds, of plugin calls, which have a deadline of milliseconds.
const CALL_SECONDS: [f64; 12] = [0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05];

/// The histograms, recorded where the durations are measured.
pub struct Instruments {
    time_to_first_token: Histogram<f64>,
    request_duration: Histogram<f64>,
    restore_duration: Histogram<f64>,
    pull_duration: Histogram<f64>,
    snapshot_save_duration: Histogram<f64>,
    plugin_call_duration: Histogram<f64>,
}

impl Instruments {
    pub fn new(provider: &SdkMeterProvider) -> Instruments {
        let meter = provider.meter(SCOPE);
        let seconds = |name: &'static str, description: &'static str, bounds: &[f64]| {
            meter.f64_histogram(name).with_unit("s").with_description(description).with_boundaries(bounds.to_vec()).build()
        };
        Instruments {
            time_to_first_token: seconds(
                "kvsidecar.time_to_first_token",
                "Time from a completion request's arrival to the first byte of its response body, by whether any prompt KV was reused (cache=hit|miss).",
                &REQUEST_SECONDS,
            ),
            request_duration: seconds("kvsidecar.request.duration", "Time from a completion request's arrival to the end of its response, by outcome.", &REQUEST_SECONDS),
            restore_duration: seconds(
                "kvsidecar.restore.duration",
                "Time to load a snapshot into an engine slot, from the local store (source=local) or pulled from a peer (source=peer), by result.",
                &REQUEST_SECONDS,
            ),
            pull_duration: seconds("kvsidecar.pull.duration", "Time to pull and verify a snapshot from a peer, by result.", &REQUEST_SECONDS),
            snapshot_save_duration: seconds("kvsidecar.snapshot.save.duration", "Time to save an engine slot as a snapshot in the store, off the request path, by result.", &REQUEST_SECONDS),
            plugin_call_duration: seconds("kvsidecar.plugin.call.duration", "Time of one policy plugin call, waiting for a turn included, by kind and result.", &CALL_SECONDS),
        }
    }

    pub fn time_to_first_token(&self, elapsed: Duration, hit: bool) {
        self.time_to_first_token.record(elapsed.as_secs_f64(), &[KeyValue::new("cache", if hit { "hit" } else { "miss" })]);
    }

    pub fn request_duration(&self, elapsed: Duration, outcome: &'static str) {
        self.request_duration.record(elapsed.as_secs_f64(), &[KeyValue::new("outcome", outcome)]);
    }

    pub fn restore(&self, elapsed: Duration, source: &'static str, ok: bool) {
        self.restore_duration.record(elapsed.as_secs_f64(), &[KeyValue::new("source", source), result(ok)]);
    }

    pub fn pull(&self, elapsed: Duration, ok: bool) {
        self.pull_duration.record(elapsed.as_secs_f64(), &[result(ok)]);
    }

    pub fn snapshot_save(&self, elapsed: Duration, ok: bool) {
        self.snapshot_save_duration.record(elapsed.as_secs_f64(), &[result(ok)]);
    }

    pub fn plugin_call(&self, kind: Kind, elapsed: Duration, ok: bool) {
        self.plugin_call_duration.record(elapsed.as_secs_f64(), &[KeyValue::new("kind", kind.as_str()), result(ok)]);
    }
}

fn result(ok: bool) -> KeyValue {
    KeyValue::new("result", if ok { "ok" } else { "failed" })
}

/// Registers the counters and gauges read from `app` at each collection. The callbacks hold
/// `app` weakly, so they observe nothing once it is gone.
pub fn observe(provider: &SdkMeterProvider, app: &Arc<App>, exports: &Arc<ExportCounters>) {
    let meter = provider.meter(SCOPE);
    observe_requests(&meter, Arc::downgrade(app));
    observe_cache(&meter, Arc::downgrade(app));
    observe_store(&meter, Arc::downgrade(app));
    observe_fleet(&meter, Arc::downgrade(app));
    observe_plugins(&meter, Arc::downgrade(app));
    observe_ledger(&meter, Arc::downgrade(app));
    observe_exports(&meter, Arc::downgrade(exports));
}

/// Registers a counter observed from `read`, which returns `(value, attributes)` pairs.
fn counter<T>(meter: &Meter, name: &'static str, unit: &'static str, description: &'static str, from: Weak<T>, read: impl Fn(&T) -> Vec<(u64, Vec<KeyValue>)> + Send + Sync + 'static)
where
    T: Send + Sync + 'static,
{
    meter
        .u64_observable_counter(name)
        .with_unit(unit)
        .with_description(description)
        .with_callback(move |observer| {
            if let Some(source) = from.upgrade() {
                for (value, attributes) in read(&source) {
                    observer.observe(value, &attributes);
                }
            }
        })
        .build();
}

/// Registers a gauge observed from `read`.
fn gauge<T>(meter: &Meter, name: &'static str, unit: &'static str, description: &'static str, from: Weak<T>, read: impl Fn(&T) -> Vec<(f64, Vec<KeyValue>)> + Send + Sync + 'static)
where
    T: Send + Sync + 'static,
{
    meter
        .f64_observable_gauge(name)
        .with_unit(unit)
        .with_description(description)
        .with_callback(move |observer| {
            if let Some(source) = from.upgrade() {
                for (value, attributes) in read(&source) {
                    observer.observe(value, &attributes);
                }
            }
        })
        .build();
}

fn one(value: u64) -> Vec<(u64, Vec<KeyValue>)> {
    vec![(value, Vec::new())]
}

fn by(key: &'static str, pairs: &[(&'static str, u64)]) -> Vec<(u64, Vec<KeyValue>)> {
    pairs.iter().map(|(label, value)| (*value, vec![KeyValue::new(key, *label)])).collect()
}

fn observe_requests(meter: &Meter, app: Weak<App>) {
    let get = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    counter(meter, "kvsidecar.requests", "{request}", "Completion requests by outcome: completed, rejected (4xx), failed (5xx), aborted (the client left or the stream broke).", app.clone(), move |app| {
        let c = &app.counters;
        by("outcome", &[("completed", get(&c.completed)), ("rejected", get(&c.rejected)), ("failed", get(&c.failed)), ("aborted", get(&c.aborted))])
    });
    counter(meter, "kvsidecar.forwarded_in", "{request}", "Completion requests that a peer forwarded to this node to serve.", app.clone(), move |app| one(get(&app.counters.forwarded_in)));
    counter(meter, "kvsidecar.forwards", "{request}", "Completion requests this node sent to a peer to serve, by result (failed ones were served here).", app.clone(), move |app| {
        let c = &app.counters;
        let forwards = get(&c.forwards);
        let failed = get(&c.forwards_failed);
        by("result", &[("ok", forwards.saturating_sub(failed)), ("failed", failed)])
    });
    gauge(meter, "kvsidecar.engine.ready", "", "1 while the engine is probed and ready, 0 otherwise.", app.clone(), |app| vec![(if app.ready().is_some() { 1.0 } else { 0.0 }, Vec::new())]);
    gauge(meter, "kvsidecar.engine.slots", "{slot}", "Engine slots by state: busy (serving a request here) or idle.", app, |app| match app.ready() {
        Some(ready) => {
            let total = ready.slots.len() as u64;
            let busy = ready.slots.busy_count() as u64;
            vec![(busy as f64, vec![KeyValue::new("state", "busy")]), (total.saturating_sub(busy) as f64, vec![KeyValue::new("state", "idle")])]
        }
        None => Vec::new(),
    });
}

fn observe_cache(meter: &Meter, app: Weak<App>) {
    let get = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    counter(meter, "kvsidecar.prompt.tokens", "{token}", "Prompt tokens of the completion requests this node's engine served.", app.clone(), move |app| one(get(&app.counters.prompt_tokens)));
    counter(meter, "kvsidecar.cached.tokens", "{token}", "Prompt tokens the engine did not compute because their KV was reused, by source: slot, local (restored from the store), peer (pulled).", app.clone(), move |app| {
        let c = &app.counters;
        by("source", &[("slot", get(&c.cached_slot)), ("local", get(&c.cached_local)), ("peer", get(&c.cached_peer))])
    });
    counter(meter, "kvsidecar.computed.tokens", "{token}", "Prompt tokens the engine computed (prompt tokens minus cached tokens).", app.clone(), move |app| {
        one(get(&app.counters.prompt_tokens).saturating_sub(get(&app.counters.cached_tokens)))
    });
    counter(meter, "kvsidecar.output.tokens", "{token}", "Tokens the engine generated for completion requests, as it reported them.", app.clone(), move |app| one(get(&app.counters.output_tokens)));
    counter(meter, "kvsidecar.cache.requests", "{request}", "Completion requests by where their prompt KV came from: none (a miss), slot, local or peer.", app.clone(), move |app| {
        let c = &app.counters;
        by("source", &[("none", get(&c.source_none)), ("slot", get(&c.source_slot)), ("local", get(&c.source_local)), ("peer", get(&c.source_peer))])
    });
    counter(meter, "kvsidecar.restores", "{restore}", "Snapshot restores into engine slots, by source and result.", app.clone(), move |app| {
        let c = &app.counters;
        let (pulled, pulled_failed) = (get(&c.restores_pulled), get(&c.restores_pulled_failed));
        vec![
            (get(&c.restores).saturating_sub(pulled), vec![KeyValue::new("source", "local"), KeyValue::new("result", "ok")]),
            (get(&c.restores_failed).saturating_sub(pulled_failed), vec![KeyValue::new("source", "local"), KeyValue::new("result", "failed")]),
            (pulled, vec![KeyValue::new("source", "peer"), KeyValue::new("result", "ok")]),
            (pulled_failed, vec![KeyValue::new("source", "peer"), KeyValue::new("result", "failed")]),
        ]
    });
    counter(meter, "kvsidecar.restored", "By", "Snapshot bytes restored from the local store into engine slots.", app.clone(), move |app| one(get(&app.counters.restored_bytes)));
    counter(meter, "kvsidecar.pulls", "{pull}", "Snapshot pulls from peers by result: ok, failed (peer or connection broke), corrupt (failed verification), skipped (transfer estimated slower than computing).", app.clone(), move |app| {
        let c = &app.counters;
        by("result", &[("ok", get(&c.pulls)), ("failed", get(&c.pulls_failed)), ("corrupt", get(&c.pulls_corrupt)), ("skipped", get(&c.pulls_skipped))])
    });
    counter(meter, "kvsidecar.pulled", "By", "Snapshot bytes pulled from peers, before compression.", app.clone(), move |app| one(get(&app.counters.pulled_bytes)));
    counter(meter, "kvsidecar.snapshots", "{snapshot}", "Snapshots of engine slots by result: saved, skipped (saves already running or not admitted), failed.", app, move |app| {
        let c = &app.counters;
        by("result", &[("saved", get(&c.snapshots_saved)), ("skipped", get(&c.snapshots_skipped)), ("failed", get(&c.snapshots_failed))])
    });
}

fn observe_store(meter: &Meter, app: Weak<App>) {
    gauge(meter, "kvsidecar.store.size", "By", "Bytes of the snapshots in the store.", app.clone(), |app| vec![(app.store.bytes() as f64, Vec::new())]);
    gauge(meter, "kvsidecar.store.capacity", "By", "The store's capacity (store.capacity).", app.clone(), |app| vec![(app.config.store.capacity.as_u64() as f64, Vec::new())]);
    gauge(meter, "kvsidecar.store.snapshots", "{snapshot}", "Snapshots in the store.", app.clone(), |app| vec![(app.store.len() as f64, Vec::new())]);
    counter(meter, "kvsidecar.store.evictions", "{snapshot}", "Snapshots removed from the store, by reason: capacity (evicted to make room) or corrupt (failed verification when read).", app, |app| {
        let (evicted, corrupt) = app.store.removal_counts();
        by("reason", &[("capacity", evicted), ("corrupt", corrupt)])
    });
}

fn observe_fleet(meter: &Meter, app: Weak<App>) {
    gauge(meter, "kvsidecar.peers", "{peer}", "Peers by state: alive (answered within peers.dead_after) or dead.", app.clone(), |app| match &app.fleet {
        Some(fleet) => {
            let (alive, dead) = fleet.peers.counts();
            vec![(alive as f64, vec![KeyValue::new("state", "alive")]), (dead as f64, vec![KeyValue::new("state", "dead")])]
        }
        None => Vec::new(),
    });
    gauge(meter, "kvsidecar.peer.up", "", "1 while the peer answers its health checks, 0 otherwise, by peer URL.", app.clone(), |app| match &app.fleet {
        Some(fleet) => fleet.peers.liveness().into_iter().map(|(url, alive)| (if alive { 1.0 } else { 0.0 }, vec![KeyValue::new("peer", url)])).collect(),
        None => Vec::new(),
    });
    gauge(meter, "kvsidecar.index.blocks", "{block}", "Block hashes in the fleet index, over all peers, by tier: store (peers' snapshots) or slot (peers' engine slots).", app.clone(), |app| match &app.fleet {
        Some(fleet) => {
            let size = fleet.index.size();
            vec![(size.stored_blocks as f64, vec![KeyValue::new("tier", "store")]), (size.slot_blocks as f64, vec![KeyValue::new("tier", "slot")])]
        }
        None => Vec::new(),
    });
    gauge(meter, "kvsidecar.index.memory", "By", "Estimated memory of the fleet index.", app, |app| match &app.fleet {
        Some(fleet) => vec![(fleet.index.size().memory_bytes as f64, Vec::new())],
        None => Vec::new(),
    });
}

fn observe_plugins(meter: &Meter, app: Weak<App>) {
    let labelled = |figures: &crate::plugin::PluginFigures| vec![KeyValue::new("kind", figures.kind.as_str()), KeyValue::new("plugin", figures.name.clone())];
    counter(meter, "kvsidecar.plugin.calls", "{call}", "Policy plugin calls, by kind and plugin name.", app.clone(), move |app| {
        app.plugins.figures().iter().map(|figures| (figures.calls, labelled(figures))).collect()
    });
    counter(meter, "kvsidecar.plugin.failures", "{call}", "Policy plugin calls that trapped, ran out of time or memory, returned an invalid result, or found no free turn.", app.clone(), move |app| {
        app.plugins.figures().iter().map(|figures| (figures.failures, labelled(figures))).collect()
    });
    counter(meter, "kvsidecar.plugin.fallbacks", "{call}", "Failed plugin calls answered by the built-in policy (on_failure = \"fallback\").", app.clone(), move |app| {
        app.plugins.figures().iter().map(|figures| (figures.fallbacks, labelled(figures))).collect()
    });
    counter(meter, "kvsidecar.plugin.swaps", "{load}", "Plugin versions loaded while serving, the first included, by kind and result (failed: the previous version kept serving).", app.clone(), |app| {
        app.plugins
            .figures()
            .iter()
            .flat_map(|figures| {
                let kind = figures.kind.as_str();
                [
                    (figures.loads, vec![KeyValue::new("kind", kind), KeyValue::new("result", "ok")]),
                    (figures.load_failures, vec![KeyValue::new("kind", kind), KeyValue::new("result", "failed")]),
                ]
            })
            .collect()
    });
    gauge(meter, "kvsidecar.plugin.info", "", "1 for the plugin version each kind runs, with its name and version.", app, |app| {
        app.plugins
            .figures()
            .iter()
            .map(|figures| (1.0, vec![KeyValue::new("kind", figures.kind.as_str()), KeyValue::new("plugin", figures.name.clone()), KeyValue::new("version", figures.version.clone())]))
            .collect()
    });
}

/// Reads one cost, in units of currency, from the ledger's totals.
type CostReader = fn(&crate::ledger::Totals) -> f64;

/// Pico-units (1e-12) per unit of currency.
const PICO: f64 = 1e12;

fn observe_ledger(meter: &Meter, app: Weak<App>) {
    let Some(currency) = app.upgrade().filter(|app| app.ledger.is_some()).map(|app| app.config.ledger.currency.clone()) else { return };
    let unit = format!("{{{currency}}}");
    let costs: [(&'static str, &'static str, CostReader); 3] = [
        ("kvsidecar.cost.served", "Cost of the requests the ledger recorded, as served, in the ledger's currency.", |totals| totals.cost_served_pico as f64 / PICO),
        ("kvsidecar.cost.uncached", "Cost the recorded requests would have had with nothing cached.", |totals| totals.cost_uncached_pico as f64 / PICO),
        (
            "kvsidecar.cost.saved",
            "Cost saved by the cache: uncached minus served. It only grows while no cached-token price is above the input price.",
            |totals| totals.cost_uncached_pico.saturating_sub(totals.cost_served_pico) as f64 / PICO,
        ),
    ];
    for (name, description, read) in costs {
        let from = app.clone();
        meter
            .f64_observable_counter(name)
            .with_unit(unit.clone())
            .with_description(description)
            .with_callback(move |observer| {
                if let Some(ledger) = from.upgrade().and_then(|app| app.ledger.clone()) {
                    observer.observe(read(&ledger.totals()), &[]);
                }
            })
            .build();
    }
    let get = |app: &App| app.ledger.as_ref().map(|ledger| ledger.totals()).unwrap_or_default();
    counter(meter, "kvsidecar.ledger.requests", "{request}", "Requests the cost ledger recorded.", app.clone(), move |app| one(get(app).requests));
    counter(meter, "kvsidecar.ledger.records.lost", "{request}", "Ledger records lost, by reason: dropped (the write queue was full) or failed (their write failed).", app, move |app| {
        let totals = get(app);
        by("reason", &[("dropped", totals.dropped), ("failed", totals.failed)])
    });
}

fn observe_exports(meter: &Meter, exports: Weak<ExportCounters>) {
    let get = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    counter(meter, "kvsidecar.telemetry.spans.exported", "{span}", "Spans the OTLP collector accepted.", exports.clone(), move |c| one(get(&c.spans_exported)));
    counter(meter, "kvsidecar.telemetry.spans.dropped", "{span}", "Spans not exported, by reason: queue_full (telemetry.span_queue) or export_failed (the collector refused, failed or did not answer within telemetry.otlp_timeout).", exports.clone(), move |c| {
        by("reason", &[("queue_full", get(&c.spans_dropped_queue_full)), ("export_failed", get(&c.spans_dropped_export_failed))])
    });
    counter(meter, "kvsidecar.telemetry.metric_exports.failed", "{export}", "Metric exports the OTLP collector refused, failed or did not answer in time.", exports, move |c| one(get(&c.metric_exports_failed)));
}

/// Wraps the OTLP metric exporter: runs each export in the telemetry runtime, which its
/// connections need, and counts failed exports.
pub struct CountingExporter<E> {
    inner: E,
    runtime: tokio::runtime::Handle,
    counters: Arc<ExportCounters>,
    /// The collector's address, for the warnings.
    endpoint: String,
}

impl<E> CountingExporter<E> {
    pub fn new(inner: E, runtime: tokio::runtime::Handle, counters: Arc<ExportCounters>, endpoint: String) -> CountingExporter<E> {
        CountingExporter { inner, runtime, counters, endpoint }
    }
}

impl<E: PushMetricExporter> PushMetricExporter for CountingExporter<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = InRuntime { runtime: &self.runtime, inner: std::pin::pin!(self.inner.export(metrics)) }.await;
        if let Err(error) = &result {
            let failed = self.counters.metric_exports_failed.fetch_add(1, Ordering::Relaxed) + 1;
            // The reader exports every telemetry.metrics_interval, so a warning every 20 failures
            // is at most one every few minutes.
            if failed % 20 == 1 {
                tracing::warn!(
                    error = %error,
                    endpoint = %self.endpoint,
                    failed_exports = failed,
                    "metric export to the OTLP collector failed; counted in kvsidecar_telemetry_metric_exports_failed_total; check telemetry.otlp_endpoint and that the collector runs"
                );
            }
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// Polls `inner` with `runtime` entered, so the timers and tasks it creates belong to that
/// runtime although the SDK's reader thread polls it.
struct InRuntime<'a, F> {
    runtime: &'a tokio::runtime::Handle,
    inner: std::pin::Pin<&'a mut F>,
}

impl<F: std::future::Future> std::future::Future for InRuntime<'_, F> {
    type Output = F::Output;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let _entered = self.runtime.enter();
        self.inner.as_mut().poll(cx)
    }
}
