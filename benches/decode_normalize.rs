//! Decode + normalize, the receivers' CPU cost per request, over generated OTLP: 512 spans per
//! request, 10 attributes per span, 4 apps x 2 versions, 12 operations.
//!
//! `decode` is a whole prost decode alone (what a receiver that decodes before it reads pays);
//! `normalize_in_place` is canaryd's path: the spans read in place from the protobuf and normalized
//! into engine observations; `gzip_normalize_in_place` adds inflating the body as the receivers
//! do. Throughput is in spans. Figures live in BENCHMARKS.md.

use std::hint::black_box;
use std::io::{Read, Write};

use canaryd::normalize::{self, NormalizeOptions};
use canaryd::testdata::{self, TraceShape};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

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
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
