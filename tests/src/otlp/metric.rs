//! Data points of received metric exports, flattened: one value per point with its metric's name,
//! type, resource and attributes, and lookups of a metric's current value.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point};
pub use opentelemetry_proto::tonic::metrics::v1::AggregationTemporality;

use super::value::{Value, attributes, matches};

/// The OTLP data type of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Gauge,
    Sum,
    Histogram,
    ExponentialHistogram,
    Summary,
}

/// One received data point.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricPoint {
    pub name: String,
    pub unit: String,
    pub kind: MetricKind,
    /// `Unspecified` for gauges and summaries, which have no temporality.
    pub temporality: AggregationTemporality,
    /// Whether a sum only grows (a counter); false for the other kinds.
    pub monotonic: bool,
    pub attributes: BTreeMap<String, Value>,
    /// Attributes of the resource that sent the point, such as `service.name`.
    pub resource: BTreeMap<String, Value>,
    pub start_unix_nanos: u64,
    pub time_unix_nanos: u64,
    /// The number of a gauge or sum point, as a double also for integer points.
    pub value: Option<f64>,
    /// The number of observations of a histogram or summary point.
    pub count: Option<u64>,
    /// The sum of the observations of a histogram or summary point, when the sender set it.
    pub sum: Option<f64>,
}

/// Flattens the data points of `requests` in the order they arrived.
pub fn flatten<'a>(requests: impl IntoIterator<Item = &'a ExportMetricsServiceRequest>) -> Vec<MetricPoint> {
    let mut points = Vec::new();
    for request in requests {
        for resource_metrics in &request.resource_metrics {
            let resource = resource_metrics.resource.as_ref().map(|resource| attributes(&resource.attributes)).unwrap_or_default();
            for scope_metrics in &resource_metrics.scope_metrics {
                for metric in &scope_metrics.metrics {
                    let base = MetricPoint {
                        name: metric.name.clone(),
                        unit: metric.unit.clone(),
                        kind: MetricKind::Gauge,
                        temporality: AggregationTemporality::Unspecified,
                        monotonic: false,
                        attributes: BTreeMap::new(),
                        resource: resource.clone(),
                        start_unix_nanos: 0,
                        time_unix_nanos: 0,
                        value: None,
                        count: None,
                        sum: None,
                    };
                    if let Some(data) = &metric.data {
                        push_points(&mut points, base, data);
                    }
                }
            }
        }
    }
    points
}

fn push_points(points: &mut Vec<MetricPoint>, base: MetricPoint, data: &Data) {
    let temporality = |number: i32| AggregationTemporality::try_from(number).unwrap_or(AggregationTemporality::Unspecified);
    match data {
        Data::Gauge(gauge) => points.extend(gauge.data_points.iter().map(|point| MetricPoint {
            kind: MetricKind::Gauge,
            attributes: attributes(&point.attributes),
            start_unix_nanos: point.start_time_unix_nano,
            time_unix_nanos: point.time_unix_nano,
            value: point.value.map(number),
            ..base.clone()
        })),
        Data::Sum(sum) => points.extend(sum.data_points.iter().map(|point| MetricPoint {
            kind: MetricKind::Sum,
            temporality: temporality(sum.aggregation_temporality),
            monotonic: sum.is_monotonic,
            attributes: attributes(&point.attributes),
            start_unix_nanos: point.start_time_unix_nano,
            time_unix_nanos: point.time_unix_nano,
            value: point.value.map(number),
            ..base.clone()
        })),
        Data::Histogram(histogram) => points.extend(histogram.data_points.iter().map(|point| MetricPoint {
            kind: MetricKind::Histogram,
            temporality: temporality(histogram.aggregation_temporality),
            attributes: attributes(&point.attributes),
            start_unix_nanos: point.start_time_unix_nano,
            time_unix_nanos: point.time_unix_nano,
            count: Some(point.count),
            sum: point.sum,
            ..base.clone()
        })),
        Data::ExponentialHistogram(histogram) => points.extend(histogram.data_points.iter().map(|point| MetricPoint {
            kind: MetricKind::ExponentialHistogram,
            temporality: temporality(histogram.aggregation_temporality),
            attributes: attributes(&point.attributes),
            start_unix_nanos: point.start_time_unix_nano,
            time_unix_nanos: point.time_unix_nano,
            count: Some(point.count),
            sum: point.sum,
            ..base.clone()
        })),
        Data::Summary(summary) => points.extend(summary.data_points.iter().map(|point| MetricPoint {
            kind: MetricKind::Summary,
            attributes: attributes(&point.attributes),
            start_unix_nanos: point.start_time_unix_nano,
            time_unix_nanos: point.time_unix_nano,
            count: Some(point.count),
            sum: Some(point.sum),
            ..base.clone()
        })),
    }
}

fn number(value: number_data_point::Value) -> f64 {
    match value {
        number_data_point::Value::AsDouble(number) => number,
        number_data_point::Value::AsInt(number) => number as f64,
    }
}

/// Returns the current value of the gauge or sum `name` over the series whose attributes match
/// `filter` (see [`super::Value`]'s `Display`), or `None` when no such point arrived.
///
/// Each series (one resource and attribute set) contributes the value of its last received point,
/// or the total of all its points for a delta sum. The result adds up the series, so a filter
/// that selects one series returns that series' value.
pub fn sum_value(points: &[MetricPoint], name: &str, filter: &[(&str, &str)]) -> Option<f64> {
    let selected = points.iter().filter(|point| matches!(point.kind, MetricKind::Gauge | MetricKind::Sum));
    combine(selected, name, filter, |point| point.value.unwrap_or(0.0))
}

/// Returns the observation count of the histogram `name` over the series whose attributes match
/// `filter`, combined across series as [`sum_value`] combines sums, or `None` when no such
/// histogram point arrived. Exponential histograms count too.
pub fn histogram_count(points: &[MetricPoint], name: &str, filter: &[(&str, &str)]) -> Option<u64> {
    let selected = points.iter().filter(|point| matches!(point.kind, MetricKind::Histogram | MetricKind::ExponentialHistogram));
    combine(selected, name, filter, |point| point.count.unwrap_or(0) as f64).map(|count| count as u64)
}

fn combine<'a>(points: impl Iterator<Item = &'a MetricPoint>, name: &str, filter: &[(&str, &str)], number: impl Fn(&MetricPoint) -> f64) -> Option<f64> {
    // Keyed by the formatted resource and attributes: `Value` contains doubles, so it is not `Ord`.
    let mut series: BTreeMap<String, f64> = BTreeMap::new();
    for point in points.filter(|point| point.name == name && matches(&point.attributes, filter)) {
        let key = format!("{:?}{:?}", point.resource, point.attributes);
        let value = number(point);
        if point.temporality == AggregationTemporality::Delta {
            *series.entry(key).or_insert(0.0) += value;
        } else {
            series.insert(key, value);
        }
    }
    if series.is_empty() { None } else { Some(series.values().sum()) }
}
