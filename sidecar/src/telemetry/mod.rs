//! Traces, metrics and logs of a running sidecar.
//!
//! Spans go through the OpenTelemetry SDK to a bounded queue that a task on a runtime of its own
//! exports over OTLP, so a slow or absent collector costs queue memory and counted drops, never
//! request time. Metrics are read from the sidecar's counters and a few histograms when a reader
//! collects them: the OTLP periodic reader, and `/metrics` on the admin listener, which renders
//! the same data in the Prometheus text format. Logs use `tracing`; each request's lines carry
//! its trace id.

pub mod metrics;
pub mod prometheus;
mod spans;
pub mod trace;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{ManualReader, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

use crate::config::{Config, LogFormat, OtlpProtocol, TelemetryConfig};

pub use metrics::Instruments;

/// Name of the instrumentation scope of every span and metric.
pub const SCOPE: &str = "kvsidecar";

/// Counts of what the exporters could not deliver.
#[derive(Debug, Default)]
pub struct ExportCounters {
    pub spans_exported: AtomicU64,
    /// Spans dropped because the export queue was full.
    pub spans_dropped_queue_full: AtomicU64,
    /// Spans dropped because the collector rejected them, failed or did not respond in time.
    pub spans_dropped_export_failed: AtomicU64,
    pub metric_exports_failed: AtomicU64,
}

impl ExportCounters {
    pub fn add(counter: &AtomicU64, amount: u64) {
        counter.fetch_add(amount, Ordering::Relaxed);
    }
}

/// The telemetry pipelines of the process.
pub struct Telemetry {
    tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
    /// Reader behind `/metrics`; None when `telemetry.prometheus` is off.
    scrape: Option<Arc<ManualReader>>,
    pub counters: Arc<ExportCounters>,
    /// Runs the exporters' connections; None when nothing is exported.
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

/// The tracer and the instruments, which request code reaches without a handle.
struct Handles {
    tracer: SdkTracer,
    instruments: Instruments,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

/// Returns the tracer of the process. Before `Telemetry::start` (in unit tests, for example) it
/// records nothing.
pub fn tracer() -> &'static SdkTracer {
    &handles().tracer
}

/// Returns the histograms the request path records into.
pub fn instruments() -> &'static Instruments {
    &handles().instruments
}

fn handles() -> &'static Handles {
    HANDLES.get_or_init(|| {
        let provider = SdkTracerProvider::builder().with_sampler(Sampler::AlwaysOff).build();
        let meters = SdkMeterProvider::builder().build();
        Handles { tracer: provider.tracer(SCOPE), instruments: Instruments::new(&meters) }
    })
}

/// Failure to start the telemetry pipelines.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("failed to start the telemetry runtime: {0}")]
    Runtime(std::io::Error),
    #[error("failed to create the OTLP {signal} exporter for {endpoint}: {detail}\nhint: check telemetry.otlp_endpoint and telemetry.otlp_protocol")]
    Exporter { signal: &'static str, endpoint: String, detail: String },
    #[error("telemetry was started twice in one process")]
    Twice,
}

impl Telemetry {
    /// Builds the tracer and meter providers that `config.telemetry` describes and makes them the
    /// process's. Call once, before the request runtime starts.
    pub fn start(config: &Config) -> Result<Arc<Telemetry>, TelemetryError> {
        let settings = &config.telemetry;
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .with_attributes([KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))])
            .build();
        let counters = Arc::new(ExportCounters::default());
        let endpoint = settings.otlp_endpoint.clone().filter(|_| settings.traces || settings.metrics);
        let runtime = match endpoint {
            Some(_) => Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("kvsidecar-telemetry")
                    .enable_all()
                    .build()
                    .map_err(TelemetryError::Runtime)?,
            ),
            None => None,
        };

        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sampling_ratio)));
        let mut tracer_builder = SdkTracerProvider::builder().with_sampler(sampler).with_resource(resource.clone());
        if let (Some(endpoint), Some(runtime), true) = (&endpoint, &runtime, settings.traces) {
            let _entered = runtime.enter();
            let mut exporter = span_exporter(settings, endpoint)?;
            opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &resource);
            let processor = spans::QueueProcessor::start(runtime.handle(), exporter, settings.span_queue as usize, settings.otlp_timeout, counters.clone(), endpoint.clone());
            tracer_builder = tracer_builder.with_span_processor(processor);
        }
        let tracer_provider = tracer_builder.build();

        let mut meter_builder = SdkMeterProvider::builder().with_resource(resource);
        let scrape = settings.prometheus.then(|| Arc::new(ManualReader::builder().build()));
        if let Some(reader) = &scrape {
            meter_builder = meter_builder.with_reader(SharedReader(reader.clone()));
        }
        if let (Some(endpoint), Some(runtime), true) = (&endpoint, &runtime, settings.metrics) {
            let _entered = runtime.enter();
            let exporter = metrics::CountingExporter::new(metric_exporter(settings, endpoint)?, runtime.handle().clone(), counters.clone(), endpoint.clone());
            meter_builder = meter_builder.with_reader(PeriodicReader::builder(exporter).with_interval(settings.metrics_interval).build());
        }
        let meter_provider = meter_builder.build();

        match &endpoint {
            Some(endpoint) => tracing::info!(
                otlp.endpoint = %endpoint,
                otlp.protocol = settings.otlp_protocol.as_str(),
                traces = settings.traces,
                sampling_ratio = settings.sampling_ratio,
                metrics = settings.metrics,
                "exporting telemetry over OTLP"
            ),
            None => tracing::info!(prometheus = settings.prometheus, "no OTLP endpoint (telemetry.otlp_endpoint): traces and metrics are not exported"),
        }
        let handles = Handles { tracer: tracer_provider.tracer(SCOPE), instruments: Instruments::new(&meter_provider) };
        HANDLES.set(handles).map_err(|_| TelemetryError::Twice)?;
        Ok(Arc::new(Telemetry { tracer_provider, meter_provider, scrape, counters, runtime: Mutex::new(runtime) }))
    }

    /// Returns pipelines that export nothing and leave the process's tracer and instruments
    /// alone, for sidecars run inside another program (benchmarks, for example). `/metrics`
    /// still renders the observed counters.
    pub fn local() -> Arc<Telemetry> {
        let scrape = Arc::new(ManualReader::builder().build());
        let meter_provider = SdkMeterProvider::builder().with_reader(SharedReader(scrape.clone())).build();
        let tracer_provider = SdkTracerProvider::builder().with_sampler(Sampler::AlwaysOff).build();
        Arc::new(Telemetry { tracer_provider, meter_provider, scrape: Some(scrape), counters: Arc::default(), runtime: Mutex::new(None) })
    }

    /// Returns the meter provider, for callbacks that observe the sidecar's counters.
    pub fn meter_provider(&self) -> &SdkMeterProvider {
        &self.meter_provider
    }

    /// Renders every metric in the Prometheus text format, or None when `/metrics` is off.
    pub fn prometheus_text(&self) -> Option<Result<String, String>> {
        let reader = self.scrape.as_ref()?;
        let mut collected = ResourceMetrics::default();
        Some(reader.collect(&mut collected).map(|()| prometheus::render(&collected)).map_err(|error| error.to_string()))
    }

    /// Exports what is queued, waiting at most `within`, and stops the exporters. Call from a
    /// thread outside any async runtime.
    pub fn shutdown(&self, within: Duration) {
        if let Err(error) = self.tracer_provider.shutdown_with_timeout(within) {
            tracing::debug!(error = %error, "span exporter shutdown");
        }
        if let Err(error) = self.meter_provider.shutdown_with_timeout(within) {
            tracing::debug!(error = %error, "metric exporter shutdown");
        }
        if let Some(runtime) = self.runtime.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take() {
            runtime.shutdown_timeout(within);
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        // A runtime dropped on an async worker would panic; this one is left to stop by itself.
        if let Some(runtime) = self.runtime.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).take() {
            runtime.shutdown_background();
        }
    }
}

/// Lets the meter provider own a reader that `/metrics` also reads.
#[derive(Debug)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: std::sync::Weak<opentelemetry_sdk::metrics::Pipeline>) {
        self.0.register_pipeline(pipeline);
    }

    fn collect(&self, metrics: &mut ResourceMetrics) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.collect(metrics)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: opentelemetry_sdk::metrics::InstrumentKind) -> opentelemetry_sdk::metrics::Temporality {
        self.0.temporality(kind)
    }
}

/// Returns the configured export headers as pairs.
fn headers(settings: &TelemetryConfig) -> Vec<(String, String)> {
    settings
        .otlp_headers
        .iter()
        .filter_map(|header| header.split_once('='))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect()
}

/// Returns the URL an HTTP exporter posts `signal` to: the endpoint with `/v1/traces` or
/// `/v1/metrics` appended, as OTLP/HTTP collectors expect.
fn signal_url(endpoint: &str, path: &str) -> String {
    format!("{}/{path}", endpoint.trim_end_matches('/'))
}

fn metadata(settings: &TelemetryConfig) -> opentelemetry_otlp::tonic_types::metadata::MetadataMap {
    let mut map = http::HeaderMap::new();
    for (name, value) in headers(settings) {
        if let (Ok(name), Ok(value)) = (http::HeaderName::from_bytes(name.as_bytes()), http::HeaderValue::from_str(&value)) {
            map.append(name, value);
        }
    }
    opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(map)
}

fn span_exporter(settings: &TelemetryConfig, endpoint: &str) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    let built = match settings.otlp_protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(settings.otlp_timeout)
            .with_metadata(metadata(settings))
            .build(),
        OtlpProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(signal_url(endpoint, "v1/traces"))
            .with_timeout(settings.otlp_timeout)
            .with_headers(headers(settings).into_iter().collect())
            .build(),
    };
    built.map_err(|error| TelemetryError::Exporter { signal: "span", endpoint: endpoint.to_string(), detail: error.to_string() })
}

fn metric_exporter(settings: &TelemetryConfig, endpoint: &str) -> Result<opentelemetry_otlp::MetricExporter, TelemetryError> {
    let built = match settings.otlp_protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(settings.otlp_timeout)
            .with_metadata(metadata(settings))
            .build(),
        OtlpProtocol::Http => opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(signal_url(endpoint, "v1/metrics"))
            .with_timeout(settings.otlp_timeout)
            .with_headers(headers(settings).into_iter().collect())
            .build(),
    };
    built.map_err(|error| TelemetryError::Exporter { signal: "metric", endpoint: endpoint.to_string(), detail: error.to_string() })
}

/// Installs the `tracing` subscriber: the configured level filter, human or JSON lines on
/// stderr. Lines logged while a request runs carry its `trace_id` (from the request's span).
pub fn init_logging(config: &Config) {
    // The level was validated with the same parser when the configuration was loaded.
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level).unwrap_or_else(|_| "info".into());
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    match config.log.format {
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
        LogFormat::Human => builder.init(),
    }
}
