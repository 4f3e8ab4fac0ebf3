//! OTLP receivers: gRPC (`grpc`) and HTTP (`http`), sharing one intake.
//!
//! Both transports end in `Intake::export`: normalize on a blocking thread (CPU work stays off the
//! async workers), count, and queue the batch for the engine. Items are counted as accepted only
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

use canaryd_engine::EventTime;

use crate::engine::{EngineHandle, SubmitError};
use crate::normalize::{self, NormalizeOptions, Normalized};
use crate::stats::{Signal, Stats, Transport};

/// Why an export request was refused as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot decode the request body as {format}: {reason}")]
    Undecodable { format: &'static str, reason: String },
    #[error("request exceeds the limit of {limit} bytes (max_message_bytes)")]
    TooLarge { limit: usize },
    #[error("unsupported content type {0:?}: send application/x-protobuf or application/json")]
    UnsupportedContentType(String),
    #[error("unsupported content encoding {0:?}: send gzip, deflate or identity")]
    UnsupportedEncoding(String),
    #[error("canaryd is busy: {0}; retry later")]
    Busy(SubmitError),
    #[error("canaryd is shutting down")]
    ShuttingDown,
}

impl ExportError {
    fn undecodable_protobuf(reason: String) -> Self {
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
            ExportError::TooLarge { .. } => tonic::Code::ResourceExhausted,
            ExportError::Busy(_) | ExportError::ShuttingDown => tonic::Code::Unavailable,
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            ExportError::Undecodable { .. } => StatusCode::BAD_REQUEST,
            ExportError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ExportError::UnsupportedContentType(_) | ExportError::UnsupportedEncoding(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            ExportError::Busy(_) | ExportError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `outcome` label of `canaryd_otlp_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            ExportError::Undecodable { .. } => "undecodable",
            ExportError::TooLarge { .. } => "too_large",
            ExportError::UnsupportedContentType(_) | ExportError::UnsupportedEncoding(_) => {
                "unsupported_media_type"
            }
            ExportError::Busy(_) => "busy",
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
pub trait OtlpRequest: prost::Message + Default + serde::de::DeserializeOwned + Send + 'static {
    const SIGNAL: Signal;
    type Response: prost::Message + Send + 'static;

    /// Normalizes a decoded request (the OTLP/JSON path, and gRPC metrics and logs).
    fn normalize(&self, options: &NormalizeOptions) -> Result<Normalized, ExportError>;

    /// Decodes and normalizes a request in its protobuf encoding: by default a whole prost decode;
    /// traces, the bulk of what is sent, are read in place.
    fn normalize_protobuf(buf: Bytes, options: &NormalizeOptions) -> Result<Normalized, ExportError> {
        Self::decode(buf)
            .map_err(|e| ExportError::undecodable_protobuf(e.to_string()))?
            .normalize(options)
    }

    fn response(rejected: u64, error_message: Option<String>) -> Self::Response;
    /// The OTLP JSON name of the response's rejected-items counter.
    const REJECTED_FIELD: &'static str;
}

impl OtlpRequest for ExportTraceServiceRequest {
    const SIGNAL: Signal = Signal::Traces;
    type Response = ExportTraceServiceResponse;
    const REJECTED_FIELD: &'static str = "rejectedSpans";

    fn normalize(&self, options: &NormalizeOptions) -> Result<Normalized, ExportError> {
        normalize::traces(self, options).map_err(|e| ExportError::undecodable_protobuf(e.to_string()))
    }

    fn normalize_protobuf(buf: Bytes, options: &NormalizeOptions) -> Result<Normalized, ExportError> {
        normalize::traces_protobuf(&buf, options)
            .map_err(|e| ExportError::undecodable_protobuf(e.to_string()))
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
    type Response = ExportMetricsServiceResponse;
    const REJECTED_FIELD: &'static str = "rejectedDataPoints";

    fn normalize(&self, options: &NormalizeOptions) -> Result<Normalized, ExportError> {
        Ok(normalize::metrics(self, options))
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
    type Response = ExportLogsServiceResponse;
    const REJECTED_FIELD: &'static str = "rejectedLogRecords";

    fn normalize(&self, options: &NormalizeOptions) -> Result<Normalized, ExportError> {
        Ok(normalize::logs(self, options))
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

/// What an accepted export request amounted to, for its response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportOutcome {
    pub accepted: u64,
    pub rejected: u64,
    pub error_message: Option<String>,
}

/// The receive clock: nanoseconds since the Unix epoch (0 if the system clock is before it).
pub fn wall_clock_ns() -> EventTime {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The receivers' shared path into the engine.
pub struct Intake {
    options: NormalizeOptions,
    engine: EngineHandle,
    /// How far ahead of the receive clock (and the app's event time) data may be dated.
    future_skew_ns: u64,
    stats: Arc<Stats>,
    max_message_bytes: usize,
}

impl Intake {
    pub fn new(
        options: NormalizeOptions,
        engine: EngineHandle,
        future_skew_ns: u64,
        stats: Arc<Stats>,
        max_message_bytes: usize,
    ) -> Self {
        Intake {
            options,
            engine,
            future_skew_ns,
            stats,
            max_message_bytes,
        }
    }

    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Runs `normalize` (decoding included, where the request is still encoded) on a blocking
    /// thread, then queues the batch.
    pub async fn export<R: OtlpRequest>(
        &self,
        transport: Transport,
        normalize: impl FnOnce(&NormalizeOptions) -> Result<Normalized, ExportError> + Send + 'static,
    ) -> Result<ExportOutcome, ExportError> {
        let options = self.options.clone();
        let normalized = tokio::task::spawn_blocking(move || normalize(&options))
            .await
            .map_err(|_| ExportError::ShuttingDown)
            .and_then(|r| r);
        let result = match normalized {
            Ok(n) => self.submit(n, R::SIGNAL).await,
            Err(e) => Err(e),
        };
        match &result {
            Ok(o) => {
                let outcome = if o.rejected > 0 { "partial" } else { "ok" };
                self.stats
                    .export(R::SIGNAL, transport, outcome, o.accepted, o.rejected);
            }
            Err(e) => self.count_refusal(R::SIGNAL, transport, e),
        }
        result
    }

    /// Counts a request refused as a whole.
    pub fn count_refusal(&self, signal: Signal, transport: Transport, error: &ExportError) {
        tracing::debug!(signal = signal.name(), transport = transport.name(), %error, "export refused");
        self.stats.export(signal, transport, error.outcome(), 0, 0);
    }

    async fn submit(&self, mut n: Normalized, signal: Signal) -> Result<ExportOutcome, ExportError> {
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
            let received = wall_clock_ns();
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
                self.engine.submit_and_wait(n.batch).await.map(|i| i.future)
            } else {
                self.engine.submit(n.batch).await.map(|()| 0)
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
        Ok(outcome)
    }
}
