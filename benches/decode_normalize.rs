//! Decode + normalize, the receivers' CPU cost per request, over generated OTLP: 512 spans per
//! request, 10 attributes per span, 4 apps x 2 versions, 12 operations.
//!
//! `decode` is prost alone (the floor any receiver pays); `decode_normalize` adds canaryd's
//! normalization into engine observations; `gzip_decode_normalize` adds inflating the body as the
//! HTTP receiver does. Throughput is in spans. Figures live in BENCHMARKS.md.

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
    group.bench_function("decode_normalize", |b| {
        b.iter(|| {
            let request = ExportTraceServiceRequest::decode(black_box(&bytes[..])).expect("decodes");
            normalize::traces(&request, &options)
        })
    });
    group.bench_function("gzip_decode_normalize", |b| {
        b.iter(|| {
            let mut body = Vec::with_capacity(bytes.len());
            flate2::read::GzDecoder::new(black_box(&gzipped[..]))
                .read_to_end(&mut body)
                .expect("inflates");
            let request = ExportTraceServiceRequest::decode(&body[..]).expect("decodes");
            normalize::traces(&request, &options)
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
