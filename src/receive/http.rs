//! The OTLP/HTTP receiver: `POST /v1/traces`, `/v1/metrics`, `/v1/logs`.
//!
//! Bodies are `application/x-protobuf` or `application/json` (the OTLP JSON encoding: hex ids,
//! camelCase names, 64-bit integers as strings), optionally `Content-Encoding: gzip` or `deflate`.
//! The answer uses the request's encoding. Failures carry a `google.rpc.Status` body: 400 for a
//! body that does not decode, 413 past `max_message_bytes` (compressed or not: decompression stops
//! at the limit), 415 for another content type or encoding, 503 when the engine's queue is full.

use std::io::Read;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

use super::{ExportError, ExportOutcome, Intake, OtlpRequest, Work};
use crate::normalize::{NormalizeOptions, Normalized};
use crate::stats::Transport;

const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";

/// `google.rpc.Status`, the body of OTLP/HTTP failures (without `details`, which canaryd leaves
/// empty).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// How a request body is encoded, and so how its answer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Protobuf,
    Json,
}

pub fn router(intake: Arc<Intake>) -> Router {
    Router::new()
        .route("/v1/traces", post(export::<ExportTraceServiceRequest>))
        .route("/v1/metrics", post(export::<ExportMetricsServiceRequest>))
        .route("/v1/logs", post(export::<ExportLogsServiceRequest>))
        .with_state(intake)
}

async fn export<R: OtlpRequest>(
    State(intake): State<Arc<Intake>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let refuse = |format, e: ExportError| {
        intake.count_refusal(R::SIGNAL, Transport::Http, &e);
        failure(format, e)
    };
    let format = match format_of(&headers) {
        Ok(format) => format,
        Err(e) => return refuse(Format::Json, e),
    };
    let encoding = match encoding_of(&headers) {
        Ok(encoding) => encoding,
        Err(e) => return refuse(format, e),
    };
    // A slot first: the body is read only once the request fits the ingest memory budget.
    let admission = match intake.admit(R::SIGNAL, Transport::Http).await {
        Ok(admission) => admission,
        Err(e) => return failure(format, e),
    };
    let limit = intake.max_message_bytes();
    // The limit applies to the bytes on the wire too, so a huge compressed body is not read whole.
    let raw = match axum::body::to_bytes(body, limit).await {
        Ok(raw) => raw,
        Err(e) => {
            let cause = e.into_inner();
            let error = if cause.is::<http_body_util::LengthLimitError>() {
                ExportError::TooLarge { limit }
            } else {
                ExportError::Undecodable {
                    format: "a request body",
                    reason: cause.to_string(),
                }
            };
            return refuse(format, error);
        }
    };
    let work = match (format, encoding) {
        (Format::Protobuf, Encoding::Identity) => Work::of_protobuf(raw.len()),
        _ => Work::Long,
    };
    let normalized = move |options: &_| normalize::<R>(format, encoding, raw, limit, options);
    match intake
        .export::<R>(Transport::Http, admission, work, normalized)
        .await
    {
        Ok(outcome) => success::<R>(format, outcome),
        Err(e) => failure(format, e),
    }
}

/// The request's format from `Content-Type` (parameters such as `charset` ignored).
fn format_of(headers: &HeaderMap) -> Result<Format, ExportError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let media_type = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match media_type.as_str() {
        PROTOBUF => Ok(Format::Protobuf),
        JSON => Ok(Format::Json),
        _ => Err(ExportError::UnsupportedContentType(content_type)),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
    Deflate,
}

fn encoding_of(headers: &HeaderMap) -> Result<Encoding, ExportError> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(Encoding::Identity);
    };
    let text = String::from_utf8_lossy(value.as_bytes())
        .trim()
        .to_ascii_lowercase();
    match text.as_str() {
        "" | "identity" => Ok(Encoding::Identity),
        "gzip" | "x-gzip" => Ok(Encoding::Gzip),
        "deflate" => Ok(Encoding::Deflate),
        _ => Err(ExportError::UnsupportedEncoding(text)),
    }
}

/// Decompresses (up to `limit` bytes), decodes and normalizes a request body. Runs on a blocking
/// thread.
fn normalize<R: OtlpRequest>(
    format: Format,
    encoding: Encoding,
    raw: Bytes,
    limit: usize,
    options: &NormalizeOptions,
) -> Result<Normalized, ExportError> {
    let body = match encoding {
        Encoding::Identity => raw,
        // Concatenated gzip members are one valid stream (RFC 1952): every member is read.
        Encoding::Gzip => inflate(flate2::read::MultiGzDecoder::new(&raw[..]), limit, "gzip")?,
        Encoding::Deflate => inflate(flate2::read::ZlibDecoder::new(&raw[..]), limit, "deflate")?,
    };
    match format {
        Format::Protobuf => R::normalize_protobuf(body, options),
        Format::Json => normalize_json::<R>(&body, options),
    }
}

/// Reads and normalizes an inflated OTLP/JSON body (its size bounds what that can take); the item
/// limit still holds for what it carried.
pub(crate) fn normalize_json<R: OtlpRequest>(
    body: &[u8],
    options: &NormalizeOptions,
) -> Result<Normalized, ExportError> {
    let normalized = R::normalize_json(body, options)?;
    let items = normalized.accepted + normalized.rejected + normalized.skipped;
    let limit = options.max_items_per_request;
    if items > limit {
        return Err(ExportError::TooManyItems { items, limit });
    }
    Ok(normalized)
}

/// Reads a decompressor to its end, refusing output past `limit` bytes.
fn inflate(reader: impl Read, limit: usize, name: &'static str) -> Result<Bytes, ExportError> {
    let mut out = Vec::new();
    let read = reader.take(limit as u64 + 1).read_to_end(&mut out);
    read.map_err(|e| ExportError::Undecodable {
        format: name,
        reason: e.to_string(),
    })?;
    if out.len() > limit {
        return Err(ExportError::TooLarge { limit });
    }
    Ok(Bytes::from(out))
}

fn success<R: OtlpRequest>(format: Format, outcome: ExportOutcome) -> Response {
    match format {
        Format::Protobuf => {
            let body = R::response(outcome.rejected, outcome.error_message).encode_to_vec();
            ([(header::CONTENT_TYPE, PROTOBUF)], body).into_response()
        }
        Format::Json => {
            let body = match outcome.error_message {
                Some(message) => serde_json::json!({
                    "partialSuccess": {
                        R::REJECTED_FIELD: outcome.rejected.to_string(),
                        "errorMessage": message,
                    }
                }),
                None => serde_json::json!({}),
            };
            ([(header::CONTENT_TYPE, JSON)], body.to_string()).into_response()
        }
    }
}

fn failure(format: Format, error: ExportError) -> Response {
    let status = error.http_status();
    let rpc_status = RpcStatus {
        code: error.grpc_code() as i32,
        message: error.to_string(),
    };
    let mut response = match format {
        Format::Protobuf => ([(header::CONTENT_TYPE, PROTOBUF)], rpc_status.encode_to_vec()).into_response(),
        Format::Json => {
            let body = serde_json::json!({"code": rpc_status.code, "message": rpc_status.message});
            ([(header::CONTENT_TYPE, JSON)], body.to_string()).into_response()
        }
    };
    *response.status_mut() = status;
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}
