//! The engine's input: what canaryd saw, stripped of any wire format.
//!
//! The receiver turns OTLP into these types and nothing protobuf-shaped crosses into the engine.
//! Observations arrive grouped by the identity of the resource that produced them, as OTLP groups
//! them, so that the identity strings are carried once per resource rather than once per span.
//! Every observation carries its own event time: the engine never looks at the arrival clock.

use std::fmt;
use std::sync::Arc;

/// Nanoseconds since the Unix epoch, as found in the data.
pub type EventTime = u64;

/// Who produced an observation: the environment, the app and the app's version.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub env: Arc<str>,
    pub app: Arc<str>,
    pub version: Arc<str>,
}

impl Identity {
    pub fn new(env: &str, app: &str, version: &str) -> Self {
        Identity {
            env: env.into(),
            app: app.into(),
            version: version.into(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.env, self.app, self.version)
    }
}

/// A 16-byte W3C trace id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte W3C span id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SpanId(pub [u8; 8]);

/// One request served by the app: an entry span (SERVER, CONSUMER, or a root span).
#[derive(Clone, Debug, PartialEq)]
pub struct RequestObservation {
    /// The operation: `METHOD route` when the span names an HTTP route, else the span name.
    /// Shared, as every name an observation carries: a request's observations hold each
    /// distinct name once.
    pub operation: Arc<str>,
    /// When the request ended, which is when its outcome became known.
    pub time: EventTime,
    pub duration_ns: u64,
    pub error: bool,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The cohort the request belongs to (the value of the configured cohort attribute, e.g.
    /// `canary.cohort`), when it carries one: a canary's checks are also evaluated per cohort.
    pub cohort: Option<Arc<str>>,
}

/// Which attribute named the downstream of a call; earlier variants are preferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DownstreamSource {
    PeerService,
    ServerAddress,
    DbSystem,
    RpcService,
    MessagingSystem,
    /// No attribute named it; the span name stands in.
    SpanName,
}

/// One call the app made to something else: a CLIENT or PRODUCER span, an edge of the call graph.
#[derive(Clone, Debug, PartialEq)]
pub struct CallObservation {
    pub downstream: Arc<str>,
    pub source: DownstreamSource,
    pub time: EventTime,
    pub duration_ns: u64,
    pub error: bool,
    pub trace_id: TraceId,
    /// The call span's own cohort attribute, if it has one. A call without one is counted for
    /// the cohort of its trace's request in the same resource's observations, when there is
    /// one (the engine links them); a cohort's calls are judged as its call graph.
    pub cohort: Option<Arc<str>>,
}

/// An exception recorded on a span (an `exception` span event).
#[derive(Clone, Debug, PartialEq)]
pub struct ExceptionObservation {
    pub exception_type: Arc<str>,
    /// The operation of the span that recorded it.
    pub operation: Arc<str>,
    pub time: EventTime,
    pub trace_id: TraceId,
    /// The span's own cohort attribute, if it has one; else the engine counts it for its
    /// trace's request's, as a call's.
    pub cohort: Option<Arc<str>>,
}

/// A metric series: the metric's name and a bounded, sorted set of its point attributes.
///
/// Shared, not copied: the receivers keep the keys they made and hand the same one out for every
/// export of the series, and the engine's windows and histories hold it as often as they need,
/// so a clone is a count, not a string per attribute.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SeriesKey(std::sync::Arc<SeriesKeyParts>);

/// What a [`SeriesKey`] names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct SeriesKeyParts {
    pub name: String,
    pub attributes: Vec<(String, String)>,
}

impl SeriesKey {
    pub fn new(name: String, attributes: Vec<(String, String)>) -> Self {
        Self(std::sync::Arc::new(SeriesKeyParts { name, attributes }))
    }

    /// This holder's share of the key's heap: its text and allocation split evenly between
    /// everything that holds the key, for memory accounting.
    pub fn heap_bytes_share(&self) -> usize {
        let text = self.name.len()
            + self.attributes.capacity() * std::mem::size_of::<(String, String)>()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        let whole = std::mem::size_of::<SeriesKeyParts>() + 2 * std::mem::size_of::<usize>() + text;
        whole / std::sync::Arc::strong_count(&self.0).max(1)
    }
}

impl std::ops::Deref for SeriesKey {
    type Target = SeriesKeyParts;

    fn deref(&self) -> &SeriesKeyParts {
        &self.0
    }
}

impl fmt::Display for SeriesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.attributes.is_empty() {
            f.write_str("{")?;
            for (i, (k, v)) in self.attributes.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{k}={v:?}")?;
            }
            f.write_str("}")?;
        }
        Ok(())
    }
}

/// Whether a point carries the change over its interval or the total since its start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Temporality {
    Delta,
    Cumulative,
}

/// Bucket counts of an exponential histogram on one side of zero.
#[derive(Clone, Debug, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct ExponentialBuckets {
    pub offset: i32,
    pub counts: Vec<u64>,
}

/// The value of one metric point, as sent.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum PointValue {
    Sum {
        temporality: Temporality,
        monotonic: bool,
        value: f64,
    },
    Gauge(f64),
    Histogram {
        temporality: Temporality,
        count: u64,
        sum: Option<f64>,
        /// Upper bounds; `bucket_counts` has one more entry than `bounds`.
        bounds: Vec<f64>,
        bucket_counts: Vec<u64>,
    },
    ExponentialHistogram {
        temporality: Temporality,
        count: u64,
        sum: Option<f64>,
        scale: i32,
        zero_count: u64,
        positive: ExponentialBuckets,
        negative: ExponentialBuckets,
    },
}

/// One metric data point.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricPoint {
    pub series: SeriesKey,
    /// Start of the point's interval (0 when the sender did not say).
    pub start_time: EventTime,
    pub time: EventTime,
    pub value: PointValue,
}

/// Log severity, folded into the ranges of the OpenTelemetry log data model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Severity {
    Unspecified,
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Fatal,
}

impl Severity {
    /// Maps an OTLP `SeverityNumber` (1..=24) to its range.
    pub fn from_number(number: i32) -> Severity {
        match number {
            1..=4 => Severity::Trace,
            5..=8 => Severity::Debug,
            9..=12 => Severity::Info,
            13..=16 => Severity::Warn,
            17..=20 => Severity::Error,
            21..=24 => Severity::Fatal,
            _ => Severity::Unspecified,
        }
    }

    /// ERROR and above: what the error-log rate counts.
    pub fn is_error(self) -> bool {
        self >= Severity::Error
    }

    pub fn name(self) -> &'static str {
        match self {
            Severity::Unspecified => "unspecified",
            Severity::Trace => "trace",
            Severity::Debug => "debug",
            Severity::Info => "info",
            Severity::Warn => "warn",
            Severity::Error => "error",
            Severity::Fatal => "fatal",
        }
    }
}

/// One log record, reduced to what the engine counts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogObservation {
    pub time: EventTime,
    pub severity: Severity,
}
