//! Renders collected OpenTelemetry metrics in the Prometheus text exposition format (0.0.4).
//!
//! Names follow the usual translation: dots become underscores, the unit adds `_seconds`,
//! `_bytes` or `_ratio`, and a monotonic sum becomes a counter ending in `_total`. Annotation
//! units in braces, such as `{request}`, add nothing.

use std::fmt::Write as _;

use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};

/// Content type of the rendered text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Returns the Prometheus name of a metric.
pub fn metric_name(name: &str, unit: &str, counter: bool) -> String {
    let mut out: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == ':' { c } else { '_' }).collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    let suffix = match unit {
        "s" => "_seconds",
        "By" => "_bytes",
        "1" => "_ratio",
        _ => "",
    };
    if !suffix.is_empty() && !out.ends_with(suffix) {
        out.push_str(suffix);
    }
    if counter && !out.ends_with("_total") {
        out.push_str("_total");
    }
    out
}

/// Renders every metric of `collected`.
pub fn render(collected: &ResourceMetrics) -> String {
    let mut out = String::with_capacity(16 * 1024);
    for scope in collected.scope_metrics() {
        for metric in scope.metrics() {
            render_metric(&mut out, metric);
        }
    }
    out
}

fn render_metric(out: &mut String, metric: &Metric) {
    match metric.data() {
        AggregatedMetrics::F64(data) => render_data(out, metric, data, |value| format_float(*value)),
        AggregatedMetrics::U64(data) => render_data(out, metric, data, |value| value.to_string()),
        AggregatedMetrics::I64(data) => render_data(out, metric, data, |value| value.to_string()),
    }
}

fn render_data<T>(out: &mut String, metric: &Metric, data: &MetricData<T>, format: impl Fn(&T) -> String)
where
    T: Copy,
{
    match data {
        MetricData::Sum(sum) => {
            let name = metric_name(metric.name(), metric.unit(), sum.is_monotonic());
            header(out, &name, metric.description(), if sum.is_monotonic() { "counter" } else { "gauge" });
            for point in sum.data_points() {
                sample(out, &name, point.attributes(), None, &format(&point.value()));
            }
        }
        MetricData::Gauge(gauge) => {
            let name = metric_name(metric.name(), metric.unit(), false);
            header(out, &name, metric.description(), "gauge");
            for point in gauge.data_points() {
                sample(out, &name, point.attributes(), None, &format(&point.value()));
            }
        }
        MetricData::Histogram(histogram) => {
            let name = metric_name(metric.name(), metric.unit(), false);
            header(out, &name, metric.description(), "histogram");
            let bucket = format!("{name}_bucket");
            for point in histogram.data_points() {
                let mut cumulative = 0u64;
                let mut counts = point.bucket_counts();
                for bound in point.bounds() {
                    cumulative += counts.next().unwrap_or(0);
                    sample(out, &bucket, point.attributes(), Some(&format_float(bound)), &cumulative.to_string());
                }
                sample(out, &bucket, point.attributes(), Some("+Inf"), &point.count().to_string());
                sample(out, &format!("{name}_sum"), point.attributes(), None, &format(&point.sum()));
                sample(out, &format!("{name}_count"), point.attributes(), None, &point.count().to_string());
            }
        }
        // No instrument of the sidecar produces exponential histograms.
        MetricData::ExponentialHistogram(_) => {}
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample<'a>(out: &mut String, name: &str, attributes: impl Iterator<Item = &'a KeyValue>, le: Option<&str>, value: &str) {
    let mut labels: Vec<(String, String)> = attributes.map(|pair| (label_name(pair.key.as_str()), pair.value.as_str().into_owned())).collect();
    labels.sort();
    if let Some(le) = le {
        labels.push(("le".into(), le.into()));
    }
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (n, (key, value)) in labels.iter().enumerate() {
            if n > 0 {
                out.push(',');
            }
            let value = value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
            let _ = write!(out, "{key}=\"{value}\"");
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

fn label_name(key: &str) -> String {
    let mut name: String = key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    name
}

/// Formats a float as Prometheus reads it: `+Inf`, `-Inf`, `NaN`, or the shortest decimal that
/// reads back as the same value.
fn format_float(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::{format_float, metric_name};

    #[test]
    fn names_follow_prometheus_conventions() {
        assert_eq!(metric_name("kvsidecar.requests", "{request}", true), "kvsidecar_requests_total");
        assert_eq!(metric_name("kvsidecar.time_to_first_token", "s", false), "kvsidecar_time_to_first_token_seconds");
        assert_eq!(metric_name("kvsidecar.store.size", "By", false), "kvsidecar_store_size_bytes");
        assert_eq!(metric_name("kvsidecar.pulled", "By", true), "kvsidecar_pulled_bytes_total");
        assert_eq!(metric_name("kvsidecar.cost.served", "{USD}", true), "kvsidecar_cost_served_total");
    }

    #[test]
    fn floats_read_back() {
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(0.005), "0.005");
        assert_eq!(format_float(2.0), "2");
    }
}
