//! Decode + normalize, the receivers' CPU cost per request, over generated OTLP of each signal:
//! traces (512 spans per request, 10 attributes per span, 4 apps x 2 versions, 12 operations),
//! metrics (an SDK's periodic export of 88 points, `testdata::sdk_metrics_request`) and logs
//! (512 records, `testdata::sdk_logs_request`).
//!
//! `decode` is a whole prost decode alone (what a receiver that decodes before it reads pays);
//! `normalize_in_place` is canaryd's path: the items read in place from the protobuf and
//! normalized into engine observations; `gzip_normalize_in_place` adds inflating the body as the
//! receivers do. `json_decoded_whole` and `json_in_place` are the same request in OTLP/JSON:
//! decoded whole with opentelemetry-proto's serde, re-encoded and read (the path before
//! 2026-12-04), and read straight into observations (`normalize::json`). Throughput is in items
//! (spans, points, records). Both run under the daemon's
//! allocator (mimalloc), so that each costs what it would in the daemon. Figures live in
//! BENCHMARKS.md.

use std::hint::black_box;
use std::io::{Read, Write};

use canaryd::normalize::{self, NormalizeOptions};
use canaryd::receive::SHORT_WORK_BYTES;
use canaryd::testdata::{self, TraceShape};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

/// The daemon's allocator: allocation is much of what a decode costs, so the references are
/// measured under the one the daemon runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench(c: &mut Criterion) {
    let shape = TraceShape::default();
    let request = testdata::trace_request(&shape, 1);
    let bytes = request.encode_to_vec();
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&bytes).expect("gzip in memory");
    let gzipped = encoder.finish().expect("gzip in memory");
    let options = NormalizeOptions::default();

    let mut group = c.benchmark_group("otlp_traces_512x10");
    group.throughput(Throughput::Elements(shape.spans as u64));
    group.bench_function("decode", |b| {
        b.iter(|| ExportTraceServiceRequest::decode(black_box(&bytes[..])).expect("decodes"))
    });
    group.bench_function("normalize_in_place", |b| {
        b.iter(|| normalize::traces_protobuf(black_box(&bytes[..]), &options).expect("decodes"))
    });
    group.bench_function("gzip_normalize_in_place", |b| {
        b.iter(|| {
            let mut body = Vec::with_capacity(bytes.len());
            flate2::read::GzDecoder::new(black_box(&gzipped[..]))
                .read_to_end(&mut body)
                .expect("inflates");
            normalize::traces_protobuf(&body, &options).expect("decodes")
        })
    });
    let json = serde_json::to_vec(&request).expect("JSON");
    group.bench_function("json_decoded_whole", |b| {
        b.iter(|| {
            let whole: ExportTraceServiceRequest = serde_json::from_slice(black_box(&json)).expect("decodes");
            normalize::traces(&whole, &options).expect("reads")
        })
    });
    group.bench_function("json_in_place", |b| {
        b.iter(|| normalize::traces_json(black_box(&json), &options).expect("reads"))
    });
    group.finish();

    // The same request with what agents' instrumentations record (about 600 bytes a span, the
    // load bench's `LOAD_DETAIL=sdk`).
    let sdk_shape = TraceShape {
        detail: testdata::SpanDetail::Sdk,
        ..TraceShape::default()
    };
    let sdk = testdata::trace_request(&sdk_shape, 1).encode_to_vec();
    eprintln!("600-byte spans: {} bytes a request", sdk.len());
    let mut group = c.benchmark_group("otlp_traces_512x10_sdk");
    group.throughput(Throughput::Elements(sdk_shape.spans as u64));
    group.bench_function("decode", |b| {
        b.iter(|| ExportTraceServiceRequest::decode(black_box(&sdk[..])).expect("decodes"))
    });
    group.bench_function("normalize_in_place", |b| {
        b.iter(|| normalize::traces_protobuf(black_box(&sdk[..]), &options).expect("decodes"))
    });
    group.finish();

    let metrics_request = testdata::sdk_metrics_request(1, testdata::EPOCH_NS);
    let metrics = metrics_request.encode_to_vec();
    let points = normalize::metrics_protobuf(&metrics, &options)
        .expect("decodes")
        .accepted;
    eprintln!("metrics request: {points} points, {} bytes", metrics.len());
    let mut group = c.benchmark_group("otlp_metrics_sdk_export");
    group.throughput(Throughput::Elements(points));
    group.bench_function("decode", |b| {
        b.iter(|| ExportMetricsServiceRequest::decode(black_box(&metrics[..])).expect("decodes"))
    });
    group.bench_function("normalize_in_place", |b| {
        b.iter(|| normalize::metrics_protobuf(black_box(&metrics[..]), &options).expect("decodes"))
    });
    let json = serde_json::to_vec(&metrics_request).expect("JSON");
    group.bench_function("json_decoded_whole", |b| {
        b.iter(|| {
            let whole: ExportMetricsServiceRequest =
                serde_json::from_slice(black_box(&json)).expect("decodes");
            normalize::metrics(&whole, &options).expect("reads")
        })
    });
    group.bench_function("json_in_place", |b| {
        b.iter(|| normalize::metrics_json(black_box(&json), &options).expect("reads"))
    });
    group.finish();

    let records = 512;
    let logs_request = testdata::sdk_logs_request(records, 1, testdata::EPOCH_NS);
    let logs = logs_request.encode_to_vec();
    eprintln!("logs request: {records} records, {} bytes", logs.len());
    let mut group = c.benchmark_group("otlp_logs_512");
    group.throughput(Throughput::Elements(records as u64));
    group.bench_function("decode", |b| {
        b.iter(|| ExportLogsServiceRequest::decode(black_box(&logs[..])).expect("decodes"))
    });
    group.bench_function("normalize_in_place", |b| {
        b.iter(|| normalize::logs_protobuf(black_box(&logs[..]), &options).expect("decodes"))
    });
    let json = serde_json::to_vec(&logs_request).expect("JSON");
    group.bench_function("json_decoded_whole", |b| {
        b.iter(|| {
            let whole: ExportLogsServiceRequest = serde_json::from_slice(black_box(&json)).expect("decodes");
            normalize::logs(&whole, &options).expect("reads")
        })
    });
    group.bench_function("json_in_place", |b| {
        b.iter(|| normalize::logs_json(black_box(&json), &options).expect("reads"))
    });
    group.finish();

    short_request_at_most(c, &options);
}

/// The longest a request read on the async worker that received it (`receive::Work::Short`)
/// holds that worker: a request of `SHORT_WORK_BYTES` filled with the smallest spans that name
/// an operation (ids, a name, SERVER, start and end), and one filled with empty spans (each read
/// up to `max_items_per_request`, 100,000 by default, and the request refused there). Time per request.
fn short_request_at_most(c: &mut Criterion, options: &NormalizeOptions) {
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span};
    let fill = |span: Span| {
        let mut request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(testdata::resource("prod", "checkout", "v1")),
                scope_spans: vec![ScopeSpans::default()],
                ..ResourceSpans::default()
            }],
        };
        let each = span.encoded_len() + 1 + prost::length_delimiter_len(span.encoded_len());
        let room = SHORT_WORK_BYTES.saturating_sub(request.encoded_len() + 8);
        request.resource_spans[0].scope_spans[0].spans = vec![span; room / each];
        let bytes = request.encode_to_vec();
        assert!(bytes.len() <= SHORT_WORK_BYTES, "{} bytes", bytes.len());
        (bytes, room / each)
    };
    let named = Span {
        trace_id: vec![7; 16],
        span_id: vec![9; 8],
        name: "GET /".into(),
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: testdata::EPOCH_NS,
        end_time_unix_nano: testdata::EPOCH_NS + 1_000_000,
        ..Span::default()
    };
    let mut group = c.benchmark_group("short_request_at_most");
    for (name, span) in [("smallest_named_spans", named), ("empty_spans", Span::default())] {
        let (bytes, spans) = fill(span);
        eprintln!("{name}: {spans} spans, {} bytes", bytes.len());
        group.bench_function(name, |b| {
            b.iter(|| normalize::traces_protobuf(black_box(&bytes[..]), options))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
