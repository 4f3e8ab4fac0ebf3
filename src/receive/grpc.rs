//! The OTLP gRPC receiver: TraceService, MetricsService and LogsService `Export`, on tonic, as one
//! hand-written service (`RawExport`) that hands the intake each message's bytes.
//!
//! gzip and deflate request compression are accepted; requests are limited to `max_message_bytes`
//! after decompression. tonic refuses some requests itself, with codes other than the contract's;
//! `contract_status_codes` corrects those answers on their way out.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, Response};
use bytes::{Buf, Bytes};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::codegen::{BoxFuture, http};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Status};

use super::{Intake, OtlpRequest, Work};
use crate::engine::Admission;
use crate::normalize::NormalizeOptions;
use crate::serve::watch::Watch;
use crate::serve::watch::proto::event_service_server::EventServiceServer;
use crate::stats::Transport;

/// The gRPC path of the three OTLP `Export`s: tonic frames and decompresses the message and hands
/// over its bytes undecoded, so that the request takes its slot of the ingest memory budget before
/// its body is read, its items are counted before anything is decoded, and it is decoded (traces:
/// read in place) where `receive::Work` says: on the worker that received it when short, on a
/// blocking thread otherwise (`OtlpRequest::normalize_protobuf`).
struct RawExport<R> {
    intake: Arc<Intake>,
    limit: usize,
    /// This request's slot, between the HTTP/2 layer that took it and the unary call that uses it.
    admission: Option<Admission>,
    signal: std::marker::PhantomData<fn() -> R>,
}

impl<R> RawExport<R> {
    fn new(intake: Arc<Intake>, limit: usize) -> Self {
        RawExport {
            intake,
            limit,
            admission: None,
            signal: std::marker::PhantomData,
        }
    }
}

impl<R> Clone for RawExport<R> {
    /// A clone for one request: the slot is that request's alone.
    fn clone(&self) -> Self {
        RawExport::new(Arc::clone(&self.intake), self.limit)
    }
}

impl<R: OtlpRequest> tonic::server::NamedService for RawExport<R> {
    const NAME: &'static str = R::GRPC_SERVICE;
}

impl<R: OtlpRequest> tonic::server::UnaryService<Bytes> for RawExport<R> {
    type Response = R::Response;
    type Future = BoxFuture<tonic::Response<R::Response>, Status>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let intake = Arc::clone(&self.intake);
        let admission = self.admission.take();
        let bytes = request.into_inner();
        Box::pin(async move {
            let Some(admission) = admission else {
                return Err(Status::internal("a request without its slot"));
            };
            // tonic has inflated a compressed message by now.
            let work = Work::of_protobuf(bytes.len());
            let normalize = move |options: &NormalizeOptions| R::normalize_protobuf(bytes, options);
            let outcome = intake
                .export::<R>(Transport::Grpc, admission, work, normalize)
                .await?;
            Ok(tonic::Response::new(R::response(
                outcome.rejected,
                outcome.error_message,
            )))
        })
    }
}

impl<R, B> tower::Service<http::Request<B>> for RawExport<R>
where
    R: OtlpRequest,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != R::GRPC_EXPORT_PATH {
            return Box::pin(async { Ok(Status::unimplemented("unknown method").into_http()) });
        }
        let mut service = self.clone();
        Box::pin(async move {
            match service.intake.admit(R::SIGNAL, Transport::Grpc).await {
                Ok(admission) => service.admission = Some(admission),
                Err(e) => return Ok(Status::from(e).into_http()),
            }
            let mut grpc = tonic::server::Grpc::new(RawCodec::<R::Response>::default())
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Deflate)
                .max_decoding_message_size(service.limit);
            Ok(grpc.unary(service, request).await)
        })
    }
}

/// Decodes a gRPC message to its bytes (zero-copy from tonic's buffer); encodes the response with
/// prost.
struct RawCodec<T>(std::marker::PhantomData<fn() -> T>);

impl<T> Default for RawCodec<T> {
    fn default() -> Self {
        RawCodec(std::marker::PhantomData)
    }
}

impl<T: prost::Message + Send + 'static> tonic::codec::Codec for RawCodec<T> {
    type Encode = T;
    type Decode = Bytes;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

struct RawDecoder;

impl tonic::codec::Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Refusals that tonic makes before a request reaches canaryd, with the code tonic gives them and
/// the code the gRPC status-code guide and the OTLP contract ask for: an oversized message is
/// RESOURCE_EXHAUSTED (tonic: OUT_OF_RANGE), an undecodable one INVALID_ARGUMENT (tonic's prost
/// codec: INTERNAL). Matched by tonic's message, as it has no other mark.
const STATUS_REWRITES: [(&str, &str, &str); 2] = [
    ("11", "message length too large", "8"),
    ("13", "failed to decode Protobuf message", "3"),
];

/// Puts the contract's status code on tonic's own refusals (see `STATUS_REWRITES`).
fn contract_status_codes<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    let (Some(code), Some(message)) = (headers.get("grpc-status"), headers.get("grpc-message")) else {
        return response;
    };
    // grpc-message is percent-encoded; the phrases matched are plain ASCII either way.
    let message = String::from_utf8_lossy(message.as_bytes()).replace("%20", " ");
    let rewrite = STATUS_REWRITES
        .iter()
        .find(|(from, phrase, _)| code == *from && message.contains(phrase));
    if let Some((_, _, to)) = rewrite {
        headers.insert("grpc-status", HeaderValue::from_static(to));
    }
    response
}

/// Serves the OTLP gRPC services, and canaryd's own EventService, on `listener` until `shutdown` is cancelled, then finishes the
/// requests in flight.
pub async fn serve(
    listener: TcpListener,
    intake: Arc<Intake>,
    watch: Watch,
    request_timeout: Duration,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let limit = intake.max_message_bytes();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        // OTLP requests are hundreds of KiB: HTTP/2's default 64 KiB windows would make every
        // request wait on several window updates.
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        // A request that has not been read and answered by then is cancelled (a client that
        // trickles its message must not hold it forever); a Watch's stream is not a request
        // still being answered, and goes on. Dead peers are found by keep-alive pings.
        .timeout(request_timeout)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(tower::util::MapResponseLayer::new(contract_status_codes))
        .add_service(RawExport::<ExportTraceServiceRequest>::new(
            Arc::clone(&intake),
            limit,
        ))
        .add_service(RawExport::<ExportMetricsServiceRequest>::new(
            Arc::clone(&intake),
            limit,
        ))
        .add_service(RawExport::<ExportLogsServiceRequest>::new(intake, limit))
        .add_service(EventServiceServer::new(watch))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}
