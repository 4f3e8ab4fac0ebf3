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
//!
//! The daemon's records (events, subscriptions, deliveries) stayed format 1, postcard of the
//! daemon's own types, up to commit 00945d3; `daemon` holds their format 2. Their layouts did
//! not change over that time except by variants appended to two enums (`EventTypeRecord`,
//! `DeliveryStateRecord`), so one frozen set reads all of them; `daemon` converts them to format 2.

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

/// The daemon's `EventType` of format 1, in its variant order. The daemon appended variants while
/// it wrote format 1 (9bf3e01 had the first six, 00945d3 all eleven); postcard writes a variant's
/// index, so this list reads what either wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventTypeRecord {
    CanaryStarted,
    CanaryStagePassed,
    CanaryFailed,
    CanaryPromoted,
    AnomalyDetected,
    AnomalyResolved,
    CanaryRolledBack,
    CanaryEnded,
    CanaryHeld,
    CanaryPaused,
    CanaryResumed,
}

impl EventTypeRecord {
    pub const ALL: [EventTypeRecord; 11] = [
        EventTypeRecord::CanaryStarted,
        EventTypeRecord::CanaryStagePassed,
        EventTypeRecord::CanaryFailed,
        EventTypeRecord::CanaryPromoted,
        EventTypeRecord::AnomalyDetected,
        EventTypeRecord::AnomalyResolved,
        EventTypeRecord::CanaryRolledBack,
        EventTypeRecord::CanaryEnded,
        EventTypeRecord::CanaryHeld,
        EventTypeRecord::CanaryPaused,
        EventTypeRecord::CanaryResumed,
    ];

    /// The type's CloudEvents name, as the event contract has it.
    pub fn name(self) -> &'static str {
        match self {
            EventTypeRecord::CanaryStarted => "canaryd.canary.started",
            EventTypeRecord::CanaryStagePassed => "canaryd.canary.stage_passed",
            EventTypeRecord::CanaryFailed => "canaryd.canary.failed",
            EventTypeRecord::CanaryPromoted => "canaryd.canary.promoted",
            EventTypeRecord::AnomalyDetected => "canaryd.anomaly.detected",
            EventTypeRecord::AnomalyResolved => "canaryd.anomaly.resolved",
            EventTypeRecord::CanaryRolledBack => "canaryd.canary.rolled_back",
            EventTypeRecord::CanaryEnded => "canaryd.canary.ended",
            EventTypeRecord::CanaryHeld => "canaryd.canary.held",
            EventTypeRecord::CanaryPaused => "canaryd.canary.paused",
            EventTypeRecord::CanaryResumed => "canaryd.canary.resumed",
        }
    }
}

/// The daemon's `Reason` of format 1. Field names are the event contract's: `EventDataRecord`
/// is written to format 2 as its JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReasonRecord {
    pub feature: String,
    pub operation: Option<String>,
    pub test: String,
    pub canary_value: f64,
    pub baseline_value: f64,
    pub statistic: f64,
    pub threshold: f64,
    pub message: String,
}

/// The daemon's `Stage` of format 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub index: u32,
    pub name: String,
    pub weight: u32,
}

/// The daemon's `Action` of format 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    pub kind: String,
    pub app: String,
    pub version: String,
    pub weight: u32,
}

/// The daemon's `EventData` of format 1 (unchanged from 9bf3e01 to 00945d3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventDataRecord {
    pub env: String,
    pub app: String,
    pub stable_version: Option<String>,
    pub canary_version: Option<String>,
    pub version: Option<String>,
    pub stage: Option<StageRecord>,
    pub state: String,
    pub score: Option<f64>,
    pub detected_at: String,
    pub reasons: Vec<ReasonRecord>,
    pub action: Option<ActionRecord>,
    pub dry_run: bool,
}

/// The daemon's `Event` of format 1: the value in `events` and `owed`, keyed by sequence number
/// (8 bytes, big endian).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub specversion: String,
    pub id: String,
    pub source: String,
    pub event_type: EventTypeRecord,
    pub time: String,
    pub subject: String,
    pub datacontenttype: String,
    pub data: EventDataRecord,
}

/// The daemon's subscription `Kind` of format 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KindRecord {
    Webhook,
    Haproxy,
}

impl KindRecord {
    pub fn name(self) -> &'static str {
        match self {
            KindRecord::Webhook => "webhook",
            KindRecord::Haproxy => "haproxy",
        }
    }
}

/// The daemon's `Subscription` of format 1: the value in `subscriptions`, whose key is the format
/// byte then postcard of its id (kept by format 2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionRecord {
    pub id: String,
    pub url: String,
    pub events: Vec<EventTypeRecord>,
    pub kind: KindRecord,
    pub secret: String,
    pub created_at: String,
    pub disabled: Option<String>,
}

/// The daemon's `DeliveryState` of format 1 (`Parked` was appended after 9bf3e01).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryStateRecord {
    Pending,
    Delivered,
    Expired,
    Gone,
    Skipped,
    Parked,
}

impl DeliveryStateRecord {
    pub const ALL: [DeliveryStateRecord; 6] = [
        DeliveryStateRecord::Pending,
        DeliveryStateRecord::Delivered,
        DeliveryStateRecord::Expired,
        DeliveryStateRecord::Gone,
        DeliveryStateRecord::Skipped,
        DeliveryStateRecord::Parked,
    ];

    /// The state's name, as the API shows it.
    pub fn name(self) -> &'static str {
        match self {
            DeliveryStateRecord::Pending => "pending",
            DeliveryStateRecord::Delivered => "delivered",
            DeliveryStateRecord::Expired => "expired",
            DeliveryStateRecord::Gone => "gone",
            DeliveryStateRecord::Skipped => "skipped",
            DeliveryStateRecord::Parked => "parked",
        }
    }
}

/// The daemon's `Delivery` of format 1: the value in `outbox`, `parked` (both keyed by the
/// subscription id, a zero byte, the event's sequence number) and `deliveries` (keyed by the
/// sequence number, then the subscription id).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub event_id: String,
    pub event_type: EventTypeRecord,
    pub state: DeliveryStateRecord,
    pub attempts: u32,
    pub first_attempt_ms: Option<u64>,
    pub next_attempt_ms: u64,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub delivered_ms: Option<u64>,
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
