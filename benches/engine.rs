//! The engine's cost per observation, and its memory per baseline series.
//!
//! `ingest_window` feeds one app's requests (12 operations, a CLIENT call each, 2 versions) into
//! the engine a second of event time at a time, so buckets close and windows roll as they would
//! live; the cost per observation includes windowing, features and baseline learning. Before
//! measuring, it prints the engine's baselines and their bytes in memory after an hour of such
//! traffic, which is where BENCHMARKS.md's memory-per-series figure comes from.
//! `merge_summed_minute_after_an_hour` is the same minute with each resource summed per second
//! first (`ResourceObservations::summarize`, as the receivers do while the engine's thread is
//! busy): the engine's thread's cost when it merges rather than adds.
//! `ingest_busy_ten_seconds_after_an_hour` adds ten seconds of the same app a hundred times as
//! busy (20,000 spans a second), where each operation's second holds hundreds of requests.
//! `load_*` feed it the load bench's own workload (`LOAD_DETAIL=sdk`: 8 services, 512 spans of
//! about 600 bytes a request) at 3,000 requests a second of event time, as the daemon's receivers
//! hand it over: `load_added` as read, `load_merged` with each resource summed per second, as they
//! hand it once the engine's thread is busy over half the time. Per span, with no wake-ups
//! between batches: what one writer can take, saturated, against what a receiving thread costs a
//! span in the load bench (BENCHMARKS.md, Scaling).

use std::hint::black_box;

use canaryd::normalize::{self, NormalizeOptions};
use canaryd::testdata::{self, TraceShape};
use canaryd_engine::baseline::MemorySlotStore;
use canaryd_engine::{Batch, Engine, EngineConfig};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

/// The request `shape` makes with `seed`, normalized as the receivers read it.
fn normalized(shape: &TraceShape, seed: u64) -> Batch {
    let request = testdata::trace_request(shape, seed);
    normalize::traces(&request, &NormalizeOptions::default())
        .expect("generated requests decode")
        .batch
}

/// `batches` with each resource summed per second first, as the receivers do while the engine's
/// thread is busy over half the time.
fn summed(batches: &[(Batch, u64)]) -> Vec<(Batch, u64)> {
    let mut summed = batches.to_vec();
    for (batch, _) in &mut summed {
        for resource in &mut batch.resources {
            resource.summarize(1_000_000_000);
        }
    }
    summed
}

/// `n` batches, each one second of event time of one app with two versions, `spans` spans (half
/// of them requests) in each.
fn seconds_of_traffic(n: u64, start_ns: u64, spans: usize) -> Vec<(Batch, u64)> {
    (0..n)
        .map(|s| {
            let shape = TraceShape {
                apps: 1,
                versions_per_app: 2,
                spans,
                start_ns: start_ns + s * 1_000_000_000,
                request_gap_ns: 2_000_000_000 / spans.max(1) as u64,
                ..TraceShape::default()
            };
            let batch = normalized(&shape, s);
            let observations = batch
                .resources
                .iter()
                .map(|r| (r.requests.len() + r.calls.len()) as u64)
                .sum();
            (batch, observations)
        })
        .collect()
}

/// `n` requests of the load bench's workload (`LOAD_DETAIL=sdk`, 8 services of one version),
/// `per_second` a second of event time from `start_ns`, normalized as the receivers read them.
fn load_requests(n: u64, start_ns: u64, per_second: u64) -> Vec<(Batch, u64)> {
    (0..n)
        .map(|i| {
            let shape = TraceShape {
                apps: 8,
                versions_per_app: 1,
                spans: 512,
                start_ns: start_ns + i * 1_000_000_000 / per_second,
                detail: testdata::SpanDetail::Sdk,
                ..TraceShape::default()
            };
            (normalized(&shape, i), shape.spans as u64)
        })
        .collect()
}

/// Requests a second of event time in the `load_*` cases: the load bench's rate on the 2-core VM.
const LOAD_RATE: u64 = 3_000;

/// Spans a second of the app that learns for an hour and of the minutes measured after it.
const QUIET: usize = 200;
/// Spans a second of the busy app: 20,000 (10,000 requests over 12 operations and two versions).
const BUSY: usize = 20_000;

fn engine() -> Engine {
    Engine::new(EngineConfig::default(), Box::new(MemorySlotStore::default()))
}

fn bench(c: &mut Criterion) {
    let hour = seconds_of_traffic(3_600, testdata::EPOCH_NS, QUIET);
    let (series, bytes) = learned(&hour).baseline_memory();
    eprintln!(
        "after an hour: {series} baseline series, {bytes} bytes in memory, {} bytes per series",
        bytes / series.max(1)
    );

    let after_the_hour = testdata::EPOCH_NS + 3_600 * 1_000_000_000;
    let minute = seconds_of_traffic(60, after_the_hour, QUIET);
    let mut group = c.benchmark_group("engine");
    group.sample_size(20);
    // The same minute summed per second on the receiving threads first, as the receivers do
    // while the engine's thread is busy: what merging the summaries costs that thread.
    let summed_minute = summed(&minute);
    // A busy app: each operation's second holds hundreds of requests over most of its
    // latencies' bins, where the quiet one's holds a few.
    let busy = seconds_of_traffic(10, after_the_hour, BUSY);
    // The load bench's workload: the engine learns ten seconds of it at ten requests a second,
    // then takes a fifth of a second at the full rate, as read and summed per second, as the
    // receivers sum once the engine's thread is busy.
    let load_start = testdata::EPOCH_NS + 7_200 * 1_000_000_000;
    let load_warm = load_requests(100, load_start, 10);
    let load_from = load_start + 10 * 1_000_000_000;
    let load_added = load_requests(LOAD_RATE / 5, load_from, LOAD_RATE);
    let load_merged = summed(&load_added);
    // Each case is measured on a fresh engine that has learned what comes before it (engines are
    // not Clone: their slot store is owned): the hour's last two minutes, or the load's warm-up.
    let last_minutes = &hour[hour.len() - 120..];
    for (name, batches, before) in [
        ("ingest_minute_after_an_hour", &minute, last_minutes),
        ("merge_summed_minute_after_an_hour", &summed_minute, last_minutes),
        ("ingest_busy_ten_seconds_after_an_hour", &busy, last_minutes),
        ("load_added", &load_added, &load_warm[..]),
        ("load_merged", &load_merged, &load_warm[..]),
    ] {
        let elements: u64 = batches.iter().map(|(_, n)| n).sum();
        group.throughput(Throughput::Elements(elements));
        group.bench_function(name, |b| {
            b.iter_batched(
                || learned(before),
                |mut engine| {
                    for (batch, _) in batches {
                        black_box(engine.ingest(batch));
                    }
                    engine
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// A fresh engine that has learned `batches`.
fn learned(batches: &[(Batch, u64)]) -> Engine {
    let mut engine = engine();
    for (batch, _) in batches {
        engine.ingest(batch);
    }
    engine
}

criterion_group!(benches, bench);
criterion_main!(benches);
