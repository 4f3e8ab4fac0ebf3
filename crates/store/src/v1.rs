//! Store format 1, frozen: the records the daemon wrote up to commit 9bf3e01, when it persisted
//! the engine's own structs. Never edit these types: postcard is positional, so each mirrors, field
//! by field and in order, the engine struct of that time, and a data dir of that time decodes
//! through them (`tests/fixtures/datadir-v1` holds one).
//!
//! Format 1 wrote every value, and every key but the events', as a format byte `1` then postcard.
//! Clock and app keys were `(env, app)`, baseline keys a `BaselineId`, and seasonal slot keys the
//! text `env \x1f app \x1f scope \x1f feature-key`, then a zero byte and the slot (u16, big
//! endian), where the app's scope was written `*`: a version named `*` shared the app's slots.
//!
//! Schema 2 kept the value records as they were (see `records`); only the keys changed.

use serde::{Deserialize, Serialize};

/// The format byte of format 1's records.
pub const FORMAT: u8 = 1;

/// An app's event-time clock (the engine's `AppClock` of format 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClockRecord {
    pub max_time: u64,
    pub closed_until: u64,
}

/// Which baselines (the engine's `Scope` of format 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScopeRecord {
    App,
    Version(String),
}

/// The engine's `Feature` of format 1, in its variant order then.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeatureRecord {
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

impl FeatureRecord {
    /// The feature's name in format 1 (the engine's `Feature::name` of that time).
    pub fn name(self) -> &'static str {
        match self {
            FeatureRecord::RequestRate => "request_rate",
            FeatureRecord::ErrorRatio => "error_ratio",
            FeatureRecord::LatencyP50 => "latency_p50_ms",
            FeatureRecord::LatencyP95 => "latency_p95_ms",
            FeatureRecord::LatencyP99 => "latency_p99_ms",
            FeatureRecord::OperationShare => "operation_share",
            FeatureRecord::OperationErrorRatio => "operation_error_ratio",
            FeatureRecord::OperationLatencyP95 => "operation_latency_p95_ms",
            FeatureRecord::CallsPerRequest => "calls_per_request",
            FeatureRecord::CallErrorRatio => "call_error_ratio",
            FeatureRecord::ExceptionRate => "exception_rate",
            FeatureRecord::ErrorLogRate => "error_log_rate",
            FeatureRecord::MetricRate => "metric_rate",
            FeatureRecord::MetricValue => "metric_value",
            FeatureRecord::MetricP50 => "metric_p50",
            FeatureRecord::MetricP95 => "metric_p95",
        }
    }
}

/// The engine's `FeatureKey` of format 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureKeyRecord {
    pub feature: FeatureRecord,
    pub subject: String,
}

/// A baseline's key in format 1 (the engine's `BaselineId` of that time).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaselineKeyRecord {
    pub env: String,
    pub app: String,
    pub scope: ScopeRecord,
    pub key: FeatureKeyRecord,
}

impl BaselineKeyRecord {
    /// The text that started this baseline's slot keys in format 1.
    pub fn series_name(&self) -> String {
        let scope = match &self.scope {
            ScopeRecord::App => "*",
            ScopeRecord::Version(v) => v,
        };
        let key = if self.key.subject.is_empty() {
            self.key.feature.name().to_owned()
        } else {
            format!("{}[{}]", self.key.feature.name(), self.key.subject)
        };
        format!("{}\u{1f}{}\u{1f}{scope}\u{1f}{key}", self.env, self.app)
    }

    /// The key of one of this baseline's slots in format 1.
    pub fn slot_key(&self, slot: u16) -> Vec<u8> {
        let mut key = self.series_name().into_bytes();
        key.push(0);
        key.extend(slot.to_be_bytes());
        key
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EwmaRecord {
    pub mean: f64,
    pub variance: f64,
    pub abs_error: f64,
    pub samples: u64,
    pub last_time: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum ScoreRecord {
    InsufficientData,
    Scored(f64),
}

/// The persisted part of the engine's `AnomalyState` of format 1.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AnomalyRecord {
    pub active: bool,
    pub streak: u32,
    pub since: u64,
}

/// One side of a sketch's bins.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BinsRecord {
    pub offset: i32,
    pub counts: Vec<f64>,
}

/// The engine's `Sketch` of format 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SketchRecord {
    pub relative_accuracy: f64,
    pub positive: BinsRecord,
    pub negative: BinsRecord,
    pub zero: f64,
    pub count: f64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

/// One hour-of-week slot's summary (the engine's `SlotSummary` of format 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub past: SketchRecord,
    pub current: SketchRecord,
    pub week: u32,
    pub past_weeks: u32,
}

/// The persisted part of the engine's `Baseline` of format 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaselineRecord {
    pub ewma: EwmaRecord,
    pub slot: Option<(u16, SlotRecord)>,
    pub last_value: Option<f64>,
    pub last_score: Option<ScoreRecord>,
    pub last_window_end: u64,
    pub anomaly: AnomalyRecord,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionStatsRecord {
    pub first_seen: u64,
    pub last_seen: u64,
    pub spans: u64,
    pub requests: u64,
    pub errors: u64,
    pub calls: u64,
    pub exceptions: u64,
    pub metric_points: u64,
    pub log_records: u64,
    pub error_log_records: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OperationStatsRecord {
    pub requests: u64,
    pub errors: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeriesKeyRecord {
    pub name: String,
    pub attributes: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamKeyRecord {
    pub version: String,
    pub instance: Option<String>,
    pub series: SeriesKeyRecord,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum TemporalityRecord {
    Delta,
    Cumulative,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExponentialBucketsRecord {
    pub offset: i32,
    pub counts: Vec<u64>,
}

/// The last cumulative point of a metric stream (the engine's `PointValue` of format 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PointValueRecord {
    Sum {
        temporality: TemporalityRecord,
        monotonic: bool,
        value: f64,
    },
    Gauge(f64),
    Histogram {
        temporality: TemporalityRecord,
        count: u64,
        sum: Option<f64>,
        bounds: Vec<f64>,
        bucket_counts: Vec<u64>,
    },
    ExponentialHistogram {
        temporality: TemporalityRecord,
        count: u64,
        sum: Option<f64>,
        scale: i32,
        zero_count: u64,
        positive: ExponentialBucketsRecord,
        negative: ExponentialBucketsRecord,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamRecord {
    /// The engine's `SeriesState`: the last cumulative point, (start time, time, value).
    pub last: Option<(u64, u64, PointValueRecord)>,
    pub points: u64,
    pub resets: u64,
    pub stale: u64,
}

/// An app's catalog entry (the engine's `AppEntry` of format 1). Its maps were written as postcard
/// maps, which read as sequences of pairs: kept here as such, in the order written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    pub versions: Vec<(String, VersionStatsRecord)>,
    pub operations: Vec<(String, OperationStatsRecord)>,
    pub downstreams: Vec<(String, u64)>,
    pub exception_types: Vec<(String, u64)>,
    pub streams: Vec<(StreamKeyRecord, StreamRecord)>,
}

/// A clock's or an app's key in format 1: the format byte then postcard of `(env, app)`.
pub fn decode_app_key(bytes: &[u8]) -> Option<(String, String)> {
    decode(bytes)
}

/// Reads one format-1 record: `None` unless it is one.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => postcard::from_bytes(rest).ok(),
        _ => None,
    }
}

/// Writes one format-1 record (tests write format-1 data dirs with it).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = vec![FORMAT];
    bytes.extend(postcard::to_stdvec(value).unwrap_or_default());
    bytes
}
