//! The features of a closed window: what the baselines learn and the judges compare.
//!
//! Each feature is a number per window, for the app as a whole or for one subject (an operation,
//! a downstream, an exception type, a metric series). Ratios exist only when their denominator is
//! not zero, latency quantiles only when there were requests. Ratios and rates of events carry the
//! counts they were made of (`Counts`), so that baselines judge them as counts. A subject the version had before but
//! not in this window reads 0 for its share, calls per request and exception rate: a vanished
//! operation or edge is behaviour too.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::counts::Counts;
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

    /// The counts a value of this feature would rest on in a window of `requests` requests over
    /// `window_secs`, for the features `window_features` counts (a call error ratio is taken over
    /// one call per request). None for the others.
    pub fn counts_at(self, value: f64, requests: u64, window_secs: f64) -> Option<Counts> {
        let events = |exposure: f64| (value.max(0.0) * exposure).ceil() as u64;
        match self {
            Feature::ErrorRatio
            | Feature::OperationShare
            | Feature::OperationErrorRatio
            | Feature::CallErrorRatio => Some(Counts::Of {
                events: events(requests as f64).min(requests),
                trials: requests,
            }),
            Feature::CallsPerRequest => Some(Counts::Per {
                events: events(requests as f64),
                exposure: requests as f64,
            }),
            Feature::RequestRate | Feature::ExceptionRate | Feature::ErrorLogRate => Some(Counts::Per {
                events: events(window_secs),
                exposure: window_secs,
            }),
            _ => None,
        }
    }

    /// The quantile of the requests (or metric points) that a quantile feature is.
    pub fn quantile(self) -> Option<f64> {
        match self {
            Feature::LatencyP50 | Feature::MetricP50 => Some(0.5),
            Feature::LatencyP95 | Feature::OperationLatencyP95 | Feature::MetricP95 => Some(0.95),
            Feature::LatencyP99 => Some(0.99),
            _ => None,
        }
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

/// One feature's value in a window, with its support: how many events it rests on (requests for
/// ratios, shares, latencies and rates; calls for a call error ratio; samples for metrics). A value
/// resting on a handful of requests is noise, and the anomaly rules say how much support they want.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureValue {
    pub key: FeatureKey,
    pub value: f64,
    pub support: u64,
    /// The counts a ratio or a rate was made of, for the features that are counts: they are
    /// judged by how far their counts could lie from the baseline, not by the ratio alone.
    pub counts: Option<Counts>,
}

/// Collects finite feature values.
struct Features(Vec<FeatureValue>);

impl Features {
    fn push(&mut self, feature: Feature, subject: &str, value: Option<f64>, support: u64) {
        self.push_counted(feature, subject, value, support, None);
    }

    fn push_counted(
        &mut self,
        feature: Feature,
        subject: &str,
        value: Option<f64>,
        support: u64,
        counts: Option<Counts>,
    ) {
        if let Some(value) = value.filter(|v| v.is_finite()) {
            self.0.push(FeatureValue {
                key: FeatureKey::of(feature, subject),
                value,
                support,
                counts,
            });
        }
    }

    /// `events` of `trials`, as a ratio and its counts.
    fn proportion(&mut self, feature: Feature, subject: &str, events: u64, trials: u64, support: u64) {
        let counts = Counts::Of { events, trials };
        self.push_counted(feature, subject, ratio(events, trials), support, Some(counts));
    }

    /// `events` per unit of `exposure`, as a rate and its counts.
    fn rate(&mut self, feature: Feature, subject: &str, events: u64, exposure: f64, support: u64) {
        let counts = Counts::Per { events, exposure };
        let value = (exposure > 0.0).then(|| events as f64 / exposure);
        self.push_counted(feature, subject, value, support, Some(counts));
    }
}

fn ratio(n: u64, d: u64) -> Option<f64> {
    (d > 0).then(|| n as f64 / d as f64)
}

/// The features of a window `window_secs` long. `known` are the features the version has
/// baselines for, so that absent subjects read 0 where that means something.
pub fn window_features(agg: &Aggregate, window_secs: f64, known: &BTreeSet<FeatureKey>) -> Vec<FeatureValue> {
    let mut out = Features(Vec::new());
    let requests = agg.all.requests;
    let latency = &agg.all.latency_ms;
    out.rate(Feature::RequestRate, "", requests, window_secs, requests);
    out.proportion(Feature::ErrorRatio, "", agg.all.errors, requests, requests);
    out.push(Feature::LatencyP50, "", latency.quantile(0.5), requests);
    out.push(Feature::LatencyP95, "", latency.quantile(0.95), requests);
    out.push(Feature::LatencyP99, "", latency.quantile(0.99), requests);
    for (op, o) in &agg.operations {
        out.proportion(Feature::OperationShare, op, o.requests, requests, requests);
        out.proportion(Feature::OperationErrorRatio, op, o.errors, o.requests, o.requests);
        out.push(
            Feature::OperationLatencyP95,
            op,
            o.latency_ms.quantile(0.95),
            o.requests,
        );
    }
    for (ds, (calls, errors)) in &agg.calls {
        out.rate(Feature::CallsPerRequest, ds, *calls, requests as f64, requests);
        out.proportion(Feature::CallErrorRatio, ds, *errors, *calls, *calls);
    }
    for (ty, n) in &agg.exceptions {
        out.rate(Feature::ExceptionRate, ty, *n, window_secs, requests.max(*n));
    }
    let log_support = requests.max(agg.logs);
    out.rate(
        Feature::ErrorLogRate,
        "",
        agg.error_logs,
        window_secs,
        log_support,
    );
    for (series, m) in &agg.metrics {
        let subject = series.to_string();
        if m.increments > 0 {
            out.push(
                Feature::MetricRate,
                &subject,
                Some(m.increment / window_secs),
                m.increments,
            );
        }
        if m.levels > 0 {
            out.push(
                Feature::MetricValue,
                &subject,
                Some(m.level_sum / m.levels as f64),
                m.levels,
            );
        }
        if let Some(d) = &m.distribution {
            let count = d.count() as u64;
            out.push(Feature::MetricP50, &subject, d.quantile(0.5), count);
            out.push(Feature::MetricP95, &subject, d.quantile(0.95), count);
        }
    }
    let mut out = out.0;
    if requests > 0 {
        let present: BTreeSet<&FeatureKey> = out.iter().map(|f| &f.key).collect();
        let absent: Vec<FeatureKey> = known
            .iter()
            .filter(|k| k.feature.zero_when_absent() && !present.contains(k))
            .cloned()
            .collect();
        out.extend(absent.into_iter().map(|key| {
            let counts = match key.feature {
                Feature::OperationShare => Counts::Of {
                    events: 0,
                    trials: requests,
                },
                Feature::CallsPerRequest => Counts::Per {
                    events: 0,
                    exposure: requests as f64,
                },
                _ => Counts::Per {
                    events: 0,
                    exposure: window_secs,
                },
            };
            FeatureValue {
                key,
                value: 0.0,
                support: requests,
                counts: Some(counts),
            }
        }));
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
            .map(|f| (f.key.to_string(), f.value))
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
        let names: Vec<String> = features.iter().map(|f| f.key.to_string()).collect();
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
