//! Metric data points to engine metric points.
//!
//! Gauge, Sum, Histogram and ExponentialHistogram points are kept with their temporality; the
//! engine differences cumulative ones. A series is the metric's name and at most
//! `max_series_attributes` of the point's attributes, the first by key, so that one chatty
//! attribute cannot multiply series without bound. Summary points, points without a timestamp or
//! value, non-finite values, unspecified temporality and histograms whose bucket counts do not
//! fit their bounds are rejected. Points flagged `NO_RECORDED_VALUE` (a gap, no value) are skipped:
//! neither accepted nor rejected.

use canaryd_engine::{
    ExponentialBuckets, MetricPoint, PointValue, ResourceObservations, SeriesKey, Temporality,
};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Metric, exponential_histogram_data_point, metric::Data, number_data_point,
};

use super::{
    IdentityReader, NO_SERVICE_NAME, NormalizeOptions, Normalized, any_value_text, beyond_horizon, cut_to,
    resource_attributes,
};

/// `DataPointFlags.FLAG_NO_RECORDED_VALUE`: the point marks a gap, it carries no value.
const NO_RECORDED_VALUE: u32 = 1;

pub fn metrics(request: &ExportMetricsServiceRequest, options: &NormalizeOptions) -> Normalized {
    let mut out = Normalized::default();
    let reader = IdentityReader { options };
    for resource_metrics in &request.resource_metrics {
        let metrics = resource_metrics.scope_metrics.iter().flat_map(|s| &s.metrics);
        let Some((identity, instance)) = reader.read(
            resource_attributes(resource_metrics.resource.as_ref()),
            &mut out.truncated,
        ) else {
            out.reject(NO_SERVICE_NAME, metrics.map(point_count).sum());
            continue;
        };
        let mut obs = ResourceObservations::new(identity);
        obs.instance = instance;
        let mut accepted = 0;
        for metric in metrics {
            accepted += observe_metric(metric, options, &mut obs, &mut out);
        }
        out.accepted += accepted;
        if accepted > 0 {
            out.batch.resources.push(obs);
        }
    }
    out
}

fn point_count(metric: &Metric) -> u64 {
    let n = match &metric.data {
        None => 0,
        Some(Data::Gauge(g)) => g.data_points.len(),
        Some(Data::Sum(s)) => s.data_points.len(),
        Some(Data::Histogram(h)) => h.data_points.len(),
        Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
        Some(Data::Summary(s)) => s.data_points.len(),
    };
    n as u64
}

fn temporality(value: i32) -> Option<Temporality> {
    match AggregationTemporality::try_from(value) {
        Ok(AggregationTemporality::Delta) => Some(Temporality::Delta),
        Ok(AggregationTemporality::Cumulative) => Some(Temporality::Cumulative),
        _ => None,
    }
}

/// One point's parts that every point type shares.
struct PointHead<'a> {
    attributes: &'a [KeyValue],
    start_time: u64,
    time: u64,
    flags: u32,
}

/// Observes every point of `metric`; returns how many were accepted.
fn observe_metric(
    metric: &Metric,
    options: &NormalizeOptions,
    obs: &mut ResourceObservations,
    out: &mut Normalized,
) -> u64 {
    let mut accepted = 0;
    let mut keep = |head: PointHead, value: Result<PointValue, &'static str>, out: &mut Normalized| {
        if head.flags & NO_RECORDED_VALUE != 0 {
            // A valid point with nothing to observe: not rejected, and not accepted either (only
            // what reaches the engine is).
            out.skipped += 1;
            return;
        }
        if head.time == 0 {
            return out.reject("data points without time_unix_nano", 1);
        }
        if beyond_horizon(head.time) {
            return out.reject(
                "data points with a time after 2262-04-11 (beyond int64 nanoseconds)",
                1,
            );
        }
        accepted += 1;
        match value {
            Ok(value) => {
                let series = series_key(&metric.name, head.attributes, options, &mut out.truncated);
                obs.saw(head.time);
                obs.metric_points.push(MetricPoint {
                    series,
                    start_time: head.start_time,
                    time: head.time,
                    value,
                });
            }
            Err(reason) => {
                accepted -= 1;
                out.reject(reason, 1);
            }
        }
    };
    match &metric.data {
        None => {}
        Some(Data::Gauge(gauge)) => {
            for p in &gauge.data_points {
                let value = number(&p.value).map(PointValue::Gauge);
                keep(
                    head(&p.attributes, p.start_time_unix_nano, p.time_unix_nano, p.flags),
                    value,
                    out,
                );
            }
        }
        Some(Data::Sum(sum)) => {
            let temporality = temporality(sum.aggregation_temporality);
            for p in &sum.data_points {
                let value = number(&p.value).and_then(|value| {
                    Ok(PointValue::Sum {
                        temporality: temporality.ok_or(UNSPECIFIED_TEMPORALITY)?,
                        monotonic: sum.is_monotonic,
                        value,
                    })
                });
                keep(
                    head(&p.attributes, p.start_time_unix_nano, p.time_unix_nano, p.flags),
                    value,
                    out,
                );
            }
        }
        Some(Data::Histogram(histogram)) => {
            let temporality = temporality(histogram.aggregation_temporality);
            for p in &histogram.data_points {
                let value = (|| {
                    let temporality = temporality.ok_or(UNSPECIFIED_TEMPORALITY)?;
                    let buckets_fit =
                        p.bucket_counts.is_empty() || p.bucket_counts.len() == p.explicit_bounds.len() + 1;
                    if !buckets_fit {
                        return Err("histogram points whose bucket_counts do not fit explicit_bounds");
                    }
                    if p.explicit_bounds.iter().any(|b| !b.is_finite())
                        || p.explicit_bounds.windows(2).any(|w| w[0] >= w[1])
                    {
                        return Err("histogram points whose explicit_bounds are not finite and increasing");
                    }
                    Ok(PointValue::Histogram {
                        temporality,
                        count: p.count,
                        sum: finite_or_none(p.sum),
                        bounds: p.explicit_bounds.clone(),
                        bucket_counts: p.bucket_counts.clone(),
                    })
                })();
                keep(
                    head(&p.attributes, p.start_time_unix_nano, p.time_unix_nano, p.flags),
                    value,
                    out,
                );
            }
        }
        Some(Data::ExponentialHistogram(histogram)) => {
            let temporality = temporality(histogram.aggregation_temporality);
            for p in &histogram.data_points {
                let value = temporality.ok_or(UNSPECIFIED_TEMPORALITY).map(|temporality| {
                    PointValue::ExponentialHistogram {
                        temporality,
                        count: p.count,
                        sum: finite_or_none(p.sum),
                        scale: p.scale,
                        zero_count: p.zero_count,
                        positive: buckets(p.positive.as_ref()),
                        negative: buckets(p.negative.as_ref()),
                    }
                });
                keep(
                    head(&p.attributes, p.start_time_unix_nano, p.time_unix_nano, p.flags),
                    value,
                    out,
                );
            }
        }
        Some(Data::Summary(summary)) => {
            out.reject(
                "summary data points (not supported)",
                summary.data_points.len() as u64,
            );
        }
    }
    accepted
}

const UNSPECIFIED_TEMPORALITY: &str = "data points with unspecified aggregation_temporality";

fn head(attributes: &[KeyValue], start_time: u64, time: u64, flags: u32) -> PointHead<'_> {
    PointHead {
        attributes,
        start_time,
        time,
        flags,
    }
}

fn number(value: &Option<number_data_point::Value>) -> Result<f64, &'static str> {
    match value {
        Some(number_data_point::Value::AsDouble(d)) if d.is_finite() => Ok(*d),
        Some(number_data_point::Value::AsDouble(_)) => Err("data points with a non-finite value"),
        Some(number_data_point::Value::AsInt(i)) => Ok(*i as f64),
        None => Err("data points without a value"),
    }
}

fn finite_or_none(value: Option<f64>) -> Option<f64> {
    value.filter(|v| v.is_finite())
}

fn buckets(b: Option<&exponential_histogram_data_point::Buckets>) -> ExponentialBuckets {
    b.map_or_else(ExponentialBuckets::default, |b| ExponentialBuckets {
        offset: b.offset,
        counts: b.bucket_counts.clone(),
    })
}

/// The metric's name and its first `max_series_attributes` attributes by key, values as text.
fn series_key(
    name: &str,
    attributes: &[KeyValue],
    options: &NormalizeOptions,
    truncated: &mut u64,
) -> SeriesKey {
    let max = options.max_attribute_value_len;
    let mut pairs: Vec<(String, String)> = attributes
        .iter()
        .filter_map(|kv| Some((kv.key.clone(), any_value_text(kv.value.as_ref())?)))
        .collect();
    pairs.sort();
    pairs.dedup_by(|a, b| a.0 == b.0);
    if pairs.len() > options.max_series_attributes {
        *truncated += (pairs.len() - options.max_series_attributes) as u64;
        pairs.truncate(options.max_series_attributes);
    }
    for (k, v) in &mut pairs {
        *k = cut_to(k, max, truncated);
        *v = cut_to(v, max, truncated);
    }
    SeriesKey {
        name: cut_to(name, max, truncated),
        attributes: pairs,
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{kv, resource};
    use super::*;
    use opentelemetry_proto::tonic::metrics::v1::{
        Gauge, Histogram, HistogramDataPoint, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, Summary,
        SummaryDataPoint,
    };

    fn number_point(time: u64, value: f64, attrs: Vec<KeyValue>) -> NumberDataPoint {
        NumberDataPoint {
            attributes: attrs,
            start_time_unix_nano: 10,
            time_unix_nano: time,
            value: Some(number_data_point::Value::AsDouble(value)),
            ..NumberDataPoint::default()
        }
    }

    fn metric(name: &str, data: Data) -> Metric {
        Metric {
            name: name.into(),
            data: Some(data),
            ..Metric::default()
        }
    }

    fn request(metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: resource(&[("service.name", "shop")]),
                scope_metrics: vec![ScopeMetrics {
                    metrics,
                    ..ScopeMetrics::default()
                }],
                ..ResourceMetrics::default()
            }],
        }
    }

    #[test]
    fn sums_gauges_and_histograms_keep_their_shape() {
        let sum = Data::Sum(Sum {
            data_points: vec![number_point(100, 4.0, vec![kv("route", "/a")])],
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        });
        let gauge = Data::Gauge(Gauge {
            data_points: vec![number_point(100, 0.5, vec![])],
        });
        let histogram = Data::Histogram(Histogram {
            data_points: vec![HistogramDataPoint {
                time_unix_nano: 100,
                count: 3,
                sum: Some(12.0),
                bucket_counts: vec![1, 2, 0],
                explicit_bounds: vec![5.0, 10.0],
                ..HistogramDataPoint::default()
            }],
            aggregation_temporality: AggregationTemporality::Delta as i32,
        });
        let out = metrics(
            &request(vec![
                metric("orders", sum),
                metric("load", gauge),
                metric("latency", histogram),
            ]),
            &NormalizeOptions::default(),
        );
        assert_eq!((out.accepted, out.rejected), (3, 0));
        let points = &out.batch.resources[0].metric_points;
        assert_eq!(points[0].series.to_string(), "orders{route=\"/a\"}");
        assert_eq!(
            points[0].value,
            PointValue::Sum {
                temporality: Temporality::Cumulative,
                monotonic: true,
                value: 4.0
            }
        );
        assert_eq!(points[1].value, PointValue::Gauge(0.5));
        assert!(matches!(points[2].value, PointValue::Histogram { count: 3, .. }));
    }

    #[test]
    fn unusable_points_are_rejected_one_by_one() {
        let mut no_time = number_point(0, 1.0, vec![]);
        no_time.time_unix_nano = 0;
        let gauge = Data::Gauge(Gauge {
            data_points: vec![
                no_time,
                number_point(5, f64::NAN, vec![]),
                number_point(5, 1.0, vec![]),
                number_point(u64::MAX, 1.0, vec![]),
            ],
        });
        let bad_histogram = Data::Histogram(Histogram {
            data_points: vec![HistogramDataPoint {
                time_unix_nano: 100,
                bucket_counts: vec![1, 2],
                explicit_bounds: vec![5.0, 10.0],
                ..HistogramDataPoint::default()
            }],
            aggregation_temporality: AggregationTemporality::Delta as i32,
        });
        let summary = Data::Summary(Summary {
            data_points: vec![SummaryDataPoint::default()],
        });
        let out = metrics(
            &request(vec![
                metric("g", gauge),
                metric("h", bad_histogram),
                metric("s", summary),
            ]),
            &NormalizeOptions::default(),
        );
        assert_eq!((out.accepted, out.rejected), (1, 5), "{:?}", out.rejections);
        assert_eq!(out.skipped, 0);
        assert!(
            out.rejections.keys().any(|r| r.contains("after 2262")),
            "{:?}",
            out.rejections
        );
    }

    #[test]
    fn points_without_a_recorded_value_are_skipped_not_accepted() {
        let mut gap = number_point(100, 0.0, vec![]);
        gap.flags = NO_RECORDED_VALUE;
        gap.value = None;
        let gauge = Data::Gauge(Gauge {
            data_points: vec![gap, number_point(100, 1.0, vec![])],
        });
        let out = metrics(&request(vec![metric("g", gauge)]), &NormalizeOptions::default());
        assert_eq!((out.accepted, out.rejected, out.skipped), (1, 0, 1));
        assert_eq!(out.batch.resources[0].metric_points.len(), 1);
        assert_eq!(out.error_message("data points"), None);
    }

    #[test]
    fn series_keep_the_first_attributes_by_key() {
        let options = NormalizeOptions {
            max_series_attributes: 2,
            ..NormalizeOptions::default()
        };
        let mut truncated = 0;
        let key = series_key(
            "m",
            &[kv("c", "3"), kv("a", "1"), kv("b", "2")],
            &options,
            &mut truncated,
        );
        assert_eq!(key.to_string(), "m{a=\"1\",b=\"2\"}");
        assert_eq!(truncated, 1);
    }
}
