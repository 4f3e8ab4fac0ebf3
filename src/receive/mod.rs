//! OTLP receivers: gRPC (`grpc`) and HTTP (`http`), sharing one intake.
//!
//! Both transports end in `Intake::export`: normalize (a short request on the async worker that
//! received it, any other on a blocking thread, so that no worker is held long: `Work`), count,
//! and queue the batch for the engine. Items are counted as accepted only
//! once the engine's queue has taken them; when it has not, the client gets a retryable error and
//! nothing is half-counted. One error type, `ExportError`, maps to both a gRPC code and an HTTP
//! status, so the two transports answer the same failure the same way.

pub mod grpc;
pub mod http;

use std::sync::Arc;

use axum::http::StatusCode;
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};

use crate::engine::{Admission, EngineHandle, SubmitError};
use crate::normalize::{self, NormalizeOptions, Normalized};
use crate::stats::{Signal, Stats, Transport};

/// Why an export request was refused as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot decode the request body as {format}: {reason}")]
    Undecodable { format: &'static str, reason: String },
    #[error("request exceeds the limit of {limit} bytes (max_message_bytes)")]
    TooLarge { limit: usize },
    #[error(
        "request holds {items} items, more than the limit of {limit} (max_items_per_request): send smaller batches"
    )]
    TooManyItems { items: u64, limit: u64 },
    #[error("unsupported content type {0:?}: send application/x-protobuf or application/json")]
    UnsupportedContentType(String),
    #[error("unsupported content encoding {0:?}: send gzip, deflate or identity")]
    UnsupportedEncoding(String),
    #[error("canaryd is busy: {0}; retry later")]
    Busy(SubmitError),
    #[error(
        "canaryd is busy: {in_flight} requests in flight (ingest_memory_bytes) for {waited:?}; retry later"
    )]
    Overloaded {
        in_flight: usize,
        waited: std::time::Duration,
    },
    #[error("canaryd is shutting down")]
    ShuttingDown,
}

impl ExportError {
    fn undecodable_protobuf(mut reason: String) -> Self {
        // prost's messages name every field on the way to the fault, which runs to kilobytes for
        // a deeply nested one: the start says what is wrong.
        const MAX_REASON_BYTES: usize = 512;
        if reason.len() > MAX_REASON_BYTES {
            let mut end = MAX_REASON_BYTES;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
            reason.push_str("...");
        }
        ExportError::Undecodable {
            format: "protobuf",
            reason,
        }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            ExportError::Undecodable { .. }
            | ExportError::UnsupportedContentType(_)
            | ExportError::UnsupportedEncoding(_) => tonic::Code::InvalidArgument,
            ExportError::TooLarge { .. } | ExportError::TooManyItems { .. } => tonic::Code::ResourceExhausted,
            ExportError::Busy(_) | ExportError::Overloaded { .. } | ExportError::ShuttingDown => {
                tonic::Code::Unavailable
            }
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            ExportError::Undecodable { .. } => StatusCode::BAD_REQUEST,
            ExportError::TooLarge { .. } | ExportError::TooManyItems { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ExportError::UnsupportedContentType(_) | ExportError::UnsupportedEncoding(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            ExportError::Busy(_) | ExportError::Overloaded { .. } | ExportError::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The `outcome` label of `canaryd_otlp_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            ExportError::Undecodable { .. } => "undecodable",
            ExportError::TooLarge { .. } => "too_large",
            ExportError::TooManyItems { .. } => "too_many_items",
            ExportError::UnsupportedContentType(_) | ExportError::UnsupportedEncoding(_) => {
                "unsupported_media_type"
            }
            ExportError::Busy(_) => "busy",
            ExportError::Overloaded { .. } => "overloaded",
            ExportError::ShuttingDown => "shutting_down",
        }
    }
}

impl From<ExportError> for tonic::Status {
    fn from(e: ExportError) -> Self {
        tonic::Status::new(e.grpc_code(), e.to_string())
    }
}

/// An OTLP export request type: how to normalize it and how to answer it.
pub trait OtlpRequest: prost::Message + Default + Send + 'static {
    const SIGNAL: Signal;
    /// The gRPC service's full name, and its `Export` method's path.
    const GRPC_SERVICE: &'static str;
    const GRPC_EXPORT_PATH: &'static str;
    type Response: prost::Message + Send + 'static;

    /// Reads and normalizes a request in its OTLP/JSON encoding, straight into observations.
    fn normalize_json(body: &[u8], options: &NormalizeOptions) -> Result<Normalized, ExportError>;

    /// Items (spans, data points, log records) in the encoded request, counted on the wire.
    fn count_items(buf: &[u8]) -> Result<u64, normalize::WireError>;

    /// Reads and normalizes a request in its protobuf encoding, in place, refusing it once it is
    /// past `max_items_per_request` items.
    fn normalize_protobuf(buf: Bytes, options: &NormalizeOptions) -> Result<Normalized, ExportError>;

    fn response(rejected: u64, error_message: Option<String>) -> Self::Response;
    /// The OTLP JSON name of the response's rejected-items counter.
    const REJECTED_FIELD: &'static str;
}

/// Why a protobuf request was not read, as the receivers answer it. One refused for holding more
/// items than `max_items_per_request` (reading stops at the first past the limit) is counted
/// whole on the wire, to say how many it held.
fn refusal<R: OtlpRequest>(buf: &[u8], error: normalize::DecodeError) -> ExportError {
    match error {
        normalize::DecodeError::TooManyItems { limit } => match R::count_items(buf) {
            Ok(items) => ExportError::TooManyItems { items, limit },
            Err(e) => ExportError::undecodable_protobuf(e.to_string()),
        },
        wire => ExportError::undecodable_protobuf(wire.to_string()),
    }
}

impl OtlpRequest for ExportTraceServiceRequest {
    const SIGNAL: Signal = Signal::Traces;
    const GRPC_SERVICE: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
    const GRPC_EXPORT_PATH: &'static str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
    type Response = ExportTraceServiceResponse;
    const REJECTED_FIELD: &'static str = "rejectedSpans";

    fn normalize_json(body: &[u8], options: &NormalizeOptions) -> Result<Normalized, ExportError> {
        normalize::traces_json(body, options).map_err(|e| ExportError::Undecodable {
            format: "OTLP JSON",
            reason: e.to_string(),
        })
    }

    fn count_items(buf: &[u8]) -> Result<u64, normalize::WireError> {
        normalize::count::spans(buf)
    }

    fn normalize_protobuf(buf: Bytes, options: &NormalizeOptions) -> Result<Normalized, ExportError> {
        normalize::traces_protobuf(&buf, options).map_err(|e| refusal::<Self>(&buf, e))
    }

    fn response(rejected: u64, error_message: Option<String>) -> Self::Response {
        ExportTraceServiceResponse {
            partial_success: error_message.map(|error_message| ExportTracePartialSuccess {
                rejected_spans: rejected as i64,
                error_message,
            }),
        }
    }
}

impl OtlpRequest for ExportMetricsServiceRequest {
    const SIGNAL: Signal = Signal::Metrics;
    const GRPC_SERVICE: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
    const GRPC_EXPORT_PATH: &'static str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";
    type Response = ExportMetricsServiceResponse;
    const REJECTED_FIELD: &'static str = "rejectedDataPoints";

    fn count_items(buf: &[u8]) -> Result<u64, normalize::WireError> {
        normalize::count::data_points(buf)
    }

    fn normalize_protobuf(buf: Bytes, options: &NormalizeOptions) -> Result<Normalized, ExportError> {
        normalize::metrics_protobuf(&buf, options).map_err(|e| refusal::<Self>(&buf, e))
    }

    fn normalize_json(body: &[u8], options: &NormalizeOptions) -> Result<Normalized, ExportError> {
        normalize::metrics_json(body, options).map_err(|e| ExportError::Undecodable {
            format: "OTLP JSON",
            reason: e.to_string(),
        })
    }

    fn response(rejected: u64, error_message: Option<String>) -> Self::Response {
        ExportMetricsServiceResponse {
            partial_success: error_message.map(|error_message| ExportMetricsPartialSuccess {
                rejected_data_points: rejected as i64,
                error_message,
            }),
        }
    }
}

impl OtlpRequest for ExportLogsServiceRequest {
    const SIGNAL: Signal = Signal::Logs;
    const GRPC_SERVICE: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
    const GRPC_EXPORT_PATH: &'static str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
    type Response = ExportLogsServiceResponse;
    const REJECTED_FIELD: &'static str = "rejectedLogRecords";

    fn count_items(buf: &[u8]) -> Result<u64, normalize::WireError> {
        normalize::count::log_records(buf)
    }

    fn normalize_protobuf(buf: Bytes, options: &NormalizeOptions) -> Result<Normalized, ExportError> {
        normalize::logs_protobuf(&buf, options).map_err(|e| refusal::<Self>(&buf, e))
    }

    fn normalize_json(body: &[u8], options: &NormalizeOptions) -> Result<Normalized, ExportError> {
        normalize::logs_json(body, options).map_err(|e| ExportError::Undecodable {
            format: "OTLP JSON",
            reason: e.to_string(),
        })
    }

    fn response(rejected: u64, error_message: Option<String>) -> Self::Response {
        ExportLogsServiceResponse {
            partial_success: error_message.map(|error_message| ExportLogsPartialSuccess {
                rejected_log_records: rejected as i64,
                error_message,
            }),
        }
    }
}

/// How long reading a request may take, by what it is: a short one is read where it was
/// received, as handing it to a blocking thread and back (two wake-ups and two context switches)
/// cost the daemon about a tenth of its CPU under load (BENCHMARKS.md, ingest throughput).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// Protobuf, uncompressed, of at most `SHORT_WORK_BYTES`: an SDK's export of 512 spans (its
    /// batch processor's default) of up to a kilobyte each, read in place in a fifth of a
    /// millisecond on one core of the development VM; at most 0.74 ms for the smallest spans
    /// that name an operation, and 1.4 ms for empty ones, refused at `max_items_per_request`
    /// (`benches/decode_normalize.rs`, `short_request_at_most`).
    Short,
    /// Anything else: compressed (inflating costs more than reading), JSON, or larger.
    Long,
}

/// The largest uncompressed protobuf request read on the async worker that received it. At 256
/// KiB, an SDK's 512 spans of the 600 bytes agents' spans take (307 KB) went to the blocking pool
/// and cost the daemon 10-17% more CPU a span (BENCHMARKS.md).
pub const SHORT_WORK_BYTES: usize = 512 << 10;

impl Work {
    pub fn of_protobuf(uncompressed_bytes: usize) -> Work {
        if uncompressed_bytes <= SHORT_WORK_BYTES {
            Work::Short
        } else {
            Work::Long
        }
    }
}

/// What an accepted export request amounted to, for its response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportOutcome {
    pub accepted: u64,
    pub rejected: u64,
    pub error_message: Option<String>,
}

/// The receive clock (each batch's arrival is stamped with it).
pub use crate::wall_clock_ns;

/// Sums each resource's requests, calls, exceptions and logs per bucket on the thread that read
/// them (`canaryd_engine::summary::Summary`), so that the engine's one thread merges a few
/// aggregates a resource instead of adding every observation. A resource dated past `limit` (the
/// receive clock and the future skew) is left whole: the engine may refuse part of it,
/// observation by observation.
///
/// Done only while the engine's thread is busy (`Intake::sum_where_read`): summing on the
/// receivers costs more CPU in all than the engine's adding (5-8% of the daemon's on the load
/// bench, BENCHMARKS.md), and pays only where that one thread is what limits ingest. Either way
/// the engine decides the same.
#[derive(Clone, Copy)]
struct SumWhereRead {
    limit: u64,
    bucket_ns: u64,
}

impl SumWhereRead {
    /// `normalized` summed by `sum`, or as it is without one.
    fn maybe(sum: Option<SumWhereRead>, normalized: Normalized) -> Normalized {
        match sum {
            Some(sum) => sum.apply(normalized),
            None => normalized,
        }
    }

    fn apply(self, mut normalized: Normalized) -> Normalized {
        for resource in &mut normalized.batch.resources {
            if resource.seen.is_some_and(|(_, latest)| latest <= self.limit) {
                resource.summarize(self.bucket_ns);
            }
        }
        normalized
    }
}

/// The receivers' shared path into the engine.
pub struct Intake {
    options: NormalizeOptions,
    engine: EngineHandle,
    /// One permit per request that may be in flight (`Config::requests_in_flight`).
    slots: Arc<tokio::sync::Semaphore>,
    in_flight: usize,
    /// One permit per request being decoded (`Config::threads`), so that decoding, on the worker
    /// that received a short request and on the blocking pool otherwise, takes no more CPUs than
    /// the runtime's workers.
    decoders: Arc<tokio::sync::Semaphore>,
    /// How long a request waits for a slot before it is answered "unavailable".
    wait: std::time::Duration,
    /// How far ahead of the receive clock (and the app's event time) data may be dated.
    future_skew_ns: u64,
    /// When and at what width each resource is summed where it was read.
    summing: Summing,
    stats: Arc<Stats>,
    max_message_bytes: usize,
}

/// When the receivers sum what they read (`SumWhereRead`), and at what width.
#[derive(Clone, Copy, Debug)]
pub struct Summing {
    /// The engine's bucket width.
    pub bucket_ns: u64,
    /// The engine thread's busy share over its last second from which the receivers sum
    /// (`Config::receivers_sum_from_engine_busy`, a half by default: past it a batch's wait in
    /// the engine's queue grows fast with load, as a single server's does, as the share over one
    /// less the share, and that one thread is what limits ingest; below it, the adding costs less
    /// CPU on the engine's thread than summing does on the receivers').
    pub from_engine_busy: f64,
}

impl Intake {
    pub fn new(
        options: NormalizeOptions,
        engine: EngineHandle,
        (future_skew_ns, summing): (u64, Summing),
        stats: Arc<Stats>,
        max_message_bytes: usize,
        (in_flight, wait): (usize, std::time::Duration),
        decoders: usize,
    ) -> Self {
        Intake {
            options,
            engine,
            slots: Arc::new(tokio::sync::Semaphore::new(in_flight)),
            in_flight,
            decoders: Arc::new(tokio::sync::Semaphore::new(decoders.max(1))),
            wait,
            future_skew_ns,
            summing,
            stats,
            max_message_bytes,
        }
    }

    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Takes a slot for one request, before its body is read: waits up to `ingest_wait` for one
    /// of the `requests_in_flight`, then refuses (retryable). The slot stays taken until the
    /// engine has applied the request's batch, so that memory spent on requests (bodies, decoded
    /// items, queued batches) stays within `ingest_memory_bytes`.
    pub async fn admit(&self, signal: Signal, transport: Transport) -> Result<Admission, ExportError> {
        let arrived = wall_clock_ns();
        let asked = std::time::Instant::now();
        let slot = tokio::time::timeout(self.wait, Arc::clone(&self.slots).acquire_owned()).await;
        self.stats.ingest_slot_wait(asked.elapsed());
        match slot {
            Ok(Ok(permit)) => Ok(Admission::new(permit, arrived)),
            Ok(Err(_)) => Err(ExportError::ShuttingDown),
            Err(_) => {
                let e = ExportError::Overloaded {
                    in_flight: self.in_flight,
                    waited: self.wait,
                };
                self.count_refusal(signal, transport, &e);
                Err(e)
            }
        }
    }

    /// Runs `normalize` (decoding included, where the request is still encoded), then queues the
    /// batch with the request's admission. A request of `Work::Short` is read on the async worker
    /// that received it; any other on a blocking thread, so that no worker is held long.
    pub async fn export<R: OtlpRequest>(
        &self,
        transport: Transport,
        admission: Admission,
        work: Work,
        normalize: impl FnOnce(&NormalizeOptions) -> Result<Normalized, ExportError> + Send + 'static,
    ) -> Result<ExportOutcome, ExportError> {
        // The request already holds its slot, so this wait is bounded by the slots' memory.
        let decoder = Arc::clone(&self.decoders)
            .acquire_owned()
            .await
            .map_err(|_| ExportError::ShuttingDown)?;
        let sum = self.sum_where_read(admission.arrived_ns());
        let summing = sum.is_some();
        let normalized = match work {
            Work::Short => {
                let normalized = normalize(&self.options).map(|n| SumWhereRead::maybe(sum, n));
                drop(decoder);
                normalized
            }
            Work::Long => {
                let options = self.options.clone();
                tokio::task::spawn_blocking(move || {
                    let normalized = normalize(&options).map(|n| SumWhereRead::maybe(sum, n));
                    drop(decoder);
                    normalized
                })
                .await
                .map_err(|_| ExportError::ShuttingDown)
                .and_then(|r| r)
            }
        };
        if let (true, Ok(n)) = (summing, &normalized) {
            let summed = n.batch.resources.iter().filter(|r| r.summary.is_some()).count();
            self.stats.resources_summed.inc_by(summed as u64);
        }
        let arrived_ns = admission.arrived_ns();
        let result = match normalized {
            Ok(n) => self.submit(n, R::SIGNAL, admission).await,
            Err(e) => Err(e),
        };
        match &result {
            Ok(o) => {
                let outcome = if o.rejected > 0 { "partial" } else { "ok" };
                self.stats
                    .export(R::SIGNAL, transport, outcome, o.accepted, o.rejected);
                let took = wall_clock_ns().saturating_sub(arrived_ns);
                self.stats
                    .otlp_request(transport, std::time::Duration::from_nanos(took));
            }
            Err(e) => self.count_refusal(R::SIGNAL, transport, e),
        }
        result
    }

    /// Whether this request's resources are summed where they are read: while the engine's
    /// thread was busy at least `Summing::from_engine_busy` of its last second.
    fn sum_where_read(&self, arrived_ns: u64) -> Option<SumWhereRead> {
        (self.stats.engine_busy() >= self.summing.from_engine_busy).then(|| SumWhereRead {
            limit: arrived_ns.saturating_add(self.future_skew_ns),
            bucket_ns: self.summing.bucket_ns,
        })
    }

    /// Counts a request refused as a whole.
    pub fn count_refusal(&self, signal: Signal, transport: Transport, error: &ExportError) {
        tracing::debug!(signal = signal.name(), transport = transport.name(), %error, "export refused");
        self.stats.export(signal, transport, error.outcome(), 0, 0);
    }

    async fn submit(
        &self,
        mut n: Normalized,
        signal: Signal,
        admission: Admission,
    ) -> Result<ExportOutcome, ExportError> {
        if n.skipped > 0 {
            tracing::debug!(
                signal = signal.name(),
                items = n.skipped,
                "items without a value skipped"
            );
        }
        let mut outcome = ExportOutcome {
            accepted: n.accepted,
            rejected: n.rejected,
            error_message: n.error_message(signal.items()),
        };
        if !n.batch.resources.is_empty() {
            // Its arrival, before it waited for a slot and was read: what time to act is timed from.
            let received = admission.arrived_ns();
            n.batch.received = received;
            // Whether anything is dated beyond the skew ahead of this clock: only the engine knows
            // whether it is also ahead of its app's event time, and so refused. Such a request
            // waits for the engine's answer, to report it; every other is answered once queued.
            let limit = received.saturating_add(self.future_skew_ns);
            let suspect = n
                .batch
                .resources
                .iter()
                .any(|r| r.seen.is_some_and(|(_, hi)| hi > limit));
            let refused = if suspect {
                self.engine
                    .submit_and_wait(n.batch, Some(admission))
                    .await
                    .map(|i| i.future)
            } else {
                self.engine.submit(n.batch, Some(admission)).await.map(|()| 0)
            }
            .map_err(|e| match e {
                SubmitError::Closed => ExportError::ShuttingDown,
                full => ExportError::Busy(full),
            })?;
            if refused > 0 {
                outcome.accepted = outcome.accepted.saturating_sub(refused);
                outcome.rejected += refused;
                let why = format!(
                    "{refused} {} dated more than {} s ahead of both the app's event time and canaryd's clock",
                    signal.items(),
                    self.future_skew_ns / 1_000_000_000
                );
                outcome.error_message = Some(match outcome.error_message.take() {
                    Some(earlier) => format!("{earlier}; {why}"),
                    None => why,
                });
            }
        }
        self.stats.truncated(n.truncated);
        self.stats.series_keys_forgotten(n.series_keys_forgotten);
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canaryd_engine::{Identity, RequestObservation, ResourceObservations, SpanId, TraceId};

    const S: u64 = 1_000_000_000;

    /// A resource of `n` requests ending at `last`, one every 50 ms.
    fn resource(app: &str, n: u64, last: u64) -> ResourceObservations {
        let operation: Arc<str> = Arc::from("GET /");
        let mut r = ResourceObservations::new(Identity::new("prod", app, "1.0"));
        for i in 0..n {
            let time = last - i * S / 20;
            r.saw(time);
            r.spans += 1;
            r.requests.push(RequestObservation {
                operation: operation.clone(),
                time,
                duration_ns: 1_000_000,
                error: false,
                trace_id: TraceId([1; 16]),
                span_id: SpanId([1; 8]),
                cohort: None,
            });
        }
        r
    }

    /// The receivers sum every resource dated within the skew ahead of the receive clock, and
    /// leave whole one dated past it: the engine may refuse part of it, observation by
    /// observation, which a summary could not split.
    #[test]
    fn resources_are_summed_where_read_but_those_dated_past_the_skew() {
        let now = 1_767_571_200 * S;
        let sum = SumWhereRead {
            limit: now + 60 * S,
            bucket_ns: S,
        };
        let mut normalized = Normalized::default();
        normalized.batch.resources = vec![resource("shop", 40, now), resource("ahead", 40, now + 120 * S)];
        let normalized = sum.apply(normalized);
        let [shop, ahead] = &normalized.batch.resources[..] else {
            panic!("two resources");
        };
        assert!(shop.summary.is_some() && shop.requests.is_empty());
        assert_eq!(shop.len(), 40);
        assert!(ahead.summary.is_none());
        assert_eq!(ahead.requests.len(), 40);
    }
}
