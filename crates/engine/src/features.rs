//! The features of a closed window: what the baselines learn and the judges compare.
//!
//! Each feature is a number per window, for the app as a whole or for one subject (an operation,
//! a downstream, an exception type, a metric series). Ratios exist only when their denominator is
//! not zero, latency quantiles only when there were requests. A subject the version had before but
//! not in this window reads 0 for its share, calls per request and exception rate: a vanished
//! operation or edge is behaviour too.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::window::Aggregate;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Feature {
    RequestRate,
    ErrorRatio,
    LatencyP50,
    LatencyP95,
    LatencyP99,
    OperationShare,
    OperationErrorRatio,
    OperationLatencyP95,
    CallsPerRequest,
    CallErrorRatio,
    ExceptionRate,
    ErrorLogRate,
    MetricRate,
    MetricValue,
    MetricP50,
    MetricP95,
}

impl Feature {
    pub const ALL: [Feature; 16] = [
        Feature::RequestRate,
        Feature::ErrorRatio,
        Feature::LatencyP50,
        Feature::LatencyP95,
        Feature::LatencyP99,
        Feature::OperationShare,
        Feature::OperationErrorRatio,
        Feature::OperationLatencyP95,
        Feature::CallsPerRequest,
        Feature::CallErrorRatio,
        Feature::ExceptionRate,
        Feature::ErrorLogRate,
        Feature::MetricRate,
        Feature::MetricValue,
        Feature::MetricP50,
        Feature::MetricP95,
    ];

    /// The feature's name in the API and in storage keys.
    pub fn name(self) -> &'static str {
        match self {
            Feature::RequestRate => "request_rate",
            Feature::ErrorRatio => "error_ratio",
            Feature::LatencyP50 => "latency_p50_ms",
            Feature::LatencyP95 => "latency_p95_ms",
            Feature::LatencyP99 => "latency_p99_ms",
            Feature::OperationShare => "operation_share",
            Feature::OperationErrorRatio => "operation_error_ratio",
            Feature::OperationLatencyP95 => "operation_latency_p95_ms",
            Feature::CallsPerRequest => "calls_per_request",
            Feature::CallErrorRatio => "call_error_ratio",
            Feature::ExceptionRate => "exception_rate",
            Feature::ErrorLogRate => "error_log_rate",
            Feature::MetricRate => "metric_rate",
            Feature::MetricValue => "metric_value",
            Feature::MetricP50 => "metric_p50",
            Feature::MetricP95 => "metric_p95",
        }
    }

    pub fn from_name(name: &str) -> Option<Feature> {
        Feature::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Features that read 0 for a known subject absent from a window.
    fn zero_when_absent(self) -> bool {
        matches!(
            self,
            Feature::OperationShare | Feature::CallsPerRequest | Feature::ExceptionRate
        )
    }
}

/// A feature of one subject ("" for the app as a whole).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FeatureKey {
    pub feature: Feature,
    pub subject: String,
}

impl FeatureKey {
    pub fn app(feature: Feature) -> Self {
        FeatureKey {
            feature,
            subject: String::new(),
        }
    }

    pub fn of(feature: Feature, subject: &str) -> Self {
        FeatureKey {
            feature,
            subject: subject.to_owned(),
        }
    }
}

impl std::str::FromStr for FeatureKey {
    type Err = String;

    /// Reads what `Display` writes: `name`, or `name[subject]`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (name, subject) = match text.split_once('[') {
            Some((name, rest)) => match rest.strip_suffix(']') {
                Some(subject) => (name, subject),
                None => return Err(format!("{text:?}: a subject opened with [ must end with ]")),
            },
            None => (text, ""),
        };
        let feature = Feature::from_name(name.trim()).ok_or_else(|| {
            let names: Vec<&str> = Feature::ALL.iter().map(|f| f.name()).collect();
            format!("unknown feature {name:?}; known: {}", names.join(", "))
        })?;
        Ok(FeatureKey::of(feature, subject))
    }
}

impl fmt::Display for FeatureKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.subject.is_empty() {
            f.write_str(self.feature.name())
        } else {
            write!(f, "{}[{}]", self.feature.name(), self.subject)
        }
    }
}

/// The features of a window `window_secs` long. `known` are the features the version has
/// baselines for, so that absent subjects read 0 where that means something.
pub fn window_features(
    agg: &Aggregate,
    window_secs: f64,
    known: &BTreeSet<FeatureKey>,
) -> Vec<(FeatureKey, f64)> {
    let mut out = Vec::new();
    let requests = agg.all.requests as f64;
    let ratio = |n: u64, d: u64| (d > 0).then(|| n as f64 / d as f64);
    let push = |out: &mut Vec<_>, feature, subject: &str, value: Option<f64>| {
        if let Some(v) = value.filter(|v: &f64| v.is_finite()) {
            out.push((FeatureKey::of(feature, subject), v));
        }
    };

    push(&mut out, Feature::RequestRate, "", Some(requests / window_secs));
    push(
        &mut out,
        Feature::ErrorRatio,
        "",
        ratio(agg.all.errors, agg.all.requests),
    );
    push(
        &mut out,
        Feature::LatencyP50,
        "",
        agg.all.latency_ms.quantile(0.5),
    );
    push(
        &mut out,
        Feature::LatencyP95,
        "",
        agg.all.latency_ms.quantile(0.95),
    );
    push(
        &mut out,
        Feature::LatencyP99,
        "",
        agg.all.latency_ms.quantile(0.99),
    );
    for (op, o) in &agg.operations {
        push(
            &mut out,
            Feature::OperationShare,
            op,
            ratio(o.requests, agg.all.requests),
        );
        push(
            &mut out,
            Feature::OperationErrorRatio,
            op,
            ratio(o.errors, o.requests),
        );
        push(
            &mut out,
            Feature::OperationLatencyP95,
            op,
            o.latency_ms.quantile(0.95),
        );
    }
    for (ds, (calls, errors)) in &agg.calls {
        push(
            &mut out,
            Feature::CallsPerRequest,
            ds,
            ratio(*calls, agg.all.requests),
        );
        push(&mut out, Feature::CallErrorRatio, ds, ratio(*errors, *calls));
    }
    for (ty, n) in &agg.exceptions {
        push(
            &mut out,
            Feature::ExceptionRate,
            ty,
            Some(*n as f64 / window_secs),
        );
    }
    push(
        &mut out,
        Feature::ErrorLogRate,
        "",
        Some(agg.error_logs as f64 / window_secs),
    );
    for (series, m) in &agg.metrics {
        let subject = series.to_string();
        if m.increments > 0 {
            push(
                &mut out,
                Feature::MetricRate,
                &subject,
                Some(m.increment / window_secs),
            );
        }
        if m.levels > 0 {
            push(
                &mut out,
                Feature::MetricValue,
                &subject,
                Some(m.level_sum / m.levels as f64),
            );
        }
        if let Some(d) = &m.distribution {
            push(&mut out, Feature::MetricP50, &subject, d.quantile(0.5));
            push(&mut out, Feature::MetricP95, &subject, d.quantile(0.95));
        }
    }
    if agg.all.requests > 0 {
        let present: BTreeSet<&FeatureKey> = out.iter().map(|(k, _)| k).collect();
        let absent: Vec<FeatureKey> = known
            .iter()
            .filter(|k| k.feature.zero_when_absent() && !present.contains(k))
            .cloned()
            .collect();
        out.extend(absent.into_iter().map(|k| (k, 0.0)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_of_a_window() {
        let mut agg = Aggregate::default();
        for i in 0..10 {
            let error = i < 2;
            agg.all.add(10_000_000 * (i + 1), error);
            let op = if i < 6 { "GET /a" } else { "GET /b" };
            agg.operations.entry(op.into()).or_default().add(1_000_000, error);
        }
        agg.calls.insert("db".into(), (20, 1));
        let known = BTreeSet::from([
            FeatureKey::of(Feature::OperationShare, "GET /gone"),
            FeatureKey::of(Feature::CallsPerRequest, "cache"),
        ]);
        let features: std::collections::BTreeMap<String, f64> = window_features(&agg, 10.0, &known)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(features["request_rate"], 1.0);
        assert_eq!(features["error_ratio"], 0.2);
        assert!((features["latency_p50_ms"] - 50.0).abs() <= 0.5);
        assert_eq!(features["operation_share[GET /a]"], 0.6);
        assert_eq!(features["calls_per_request[db]"], 2.0);
        assert_eq!(features["call_error_ratio[db]"], 0.05);
        assert_eq!(
            features["operation_share[GET /gone]"], 0.0,
            "a vanished operation reads 0"
        );
        assert_eq!(
            features["calls_per_request[cache]"], 0.0,
            "a vanished edge reads 0"
        );
    }

    #[test]
    fn an_empty_window_has_no_ratios() {
        let features = window_features(&Aggregate::default(), 60.0, &BTreeSet::new());
        let names: Vec<String> = features.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(names, vec!["request_rate", "error_log_rate"]);
    }

    #[test]
    fn feature_names_round_trip() {
        for f in Feature::ALL {
            assert_eq!(Feature::from_name(f.name()), Some(f));
        }
        for text in [
            "request_rate",
            "operation_share[GET /a/{id}]",
            "metric_rate[orders{route=\"/r[1]\"}]",
        ] {
            let key: FeatureKey = text.parse().expect("parses");
            assert_eq!(key.to_string(), text);
        }
        assert!("latency".parse::<FeatureKey>().is_err());
        assert!("operation_share[GET /a".parse::<FeatureKey>().is_err());
    }
}
