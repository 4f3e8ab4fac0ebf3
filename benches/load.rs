//! The OTLP load generator: starts the daemon binary on port 0, drives it with trace exports over
//! gRPC and HTTP, plain and gzipped, and reports what each took.
//!
//! Requests (512 spans of 10 attributes) are generated and encoded, and gzipped for HTTP, before
//! the clock starts, so the sender spends its time sending: `CONCURRENCY` tasks each send one
//! request, wait for the answer, and send the next, for `SECONDS` per transport. The daemon runs
//! in its own process, so its CPU seconds (from /proc) give spans per daemon-CPU-second whatever
//! the generator costs; its peak RSS is reported too, and how often its threads were woken.
//!
//! `cargo bench --bench load` measures (environment: `LOAD_SECONDS`, default 10,
//! `LOAD_CONCURRENCY`, default 8, and `LOAD_TRANSPORTS`, a comma-separated subset of
//! `grpc,grpc+gzip,http,http+gzip`, default all, e.g. to profile one; `LOAD_DETAIL=sdk` for spans
//! of about 600 bytes, with what agents' instrumentations record, instead of 400; `LOAD_SERVICES=1` for
//! requests of one service each, as an SDK exports, instead of 8); `cargo test --benches` runs
//! it for a second, as a smoke test. After the gRPC run it times the daemon's decisions under
//! 80% of that load (`LOAD_ACT=0` skips it), with `LOAD_ACT_HELD` series (e.g. 100000) held
//! meanwhile by apps of their own sending live traffic.
//!
//! Before the daemon starts, three references on one core over the same payloads: a whole prost
//! decode, a prost decode into only the fields the engine reads, and canaryd's own path without
//! the transport and the engine (spans read in place and normalized). The daemon's spans per
//! CPU-second are reported against each.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Buf, BufMut, Bytes};
use canaryd::testdata::{self, TraceShape};
use canaryd_engine::sketch::Sketch;
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Status, codegen::http::uri::PathAndQuery};

#[path = "common/mod.rs"]
mod common;

/// The daemon's allocator, so that the decode-only reference costs what it would in the daemon.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use common::{cpu_seconds, peak_rss_kib, start_daemon, thread_cpu_seconds, thread_waits};

/// How to load the daemon.
#[derive(Clone, Debug)]
struct LoadPlan {
    /// `host:port` of the OTLP gRPC receiver, or `http://host:port` of the OTLP/HTTP one.
    target: Target,
    gzip: bool,
    concurrency: usize,
    duration: Duration,
    /// Distinct requests to cycle through.
    distinct: usize,
    spans_per_request: usize,
    pid: Option<u32>,
    /// Each sender's time between sends, for a paced (open-loop) run; latency then counts from
    /// when a request was due, so a daemon falling behind shows in it. `None`: as fast as answered.
    gap: Option<Duration>,
}

#[derive(Clone, Debug)]
enum Target {
    Grpc(String),
    Http(String),
}

/// What a run measured.
#[derive(Debug)]
struct LoadReport {
    requests: u64,
    failures: u64,
    spans: u64,
    seconds: f64,
    /// Each request's ack from when it was due (paced: its turn in the schedule, so a sender
    /// that fell behind counts its lag; closed-loop: its send).
    p50_ms: f64,
    p99_ms: f64,
    /// The ack's p99 from the request's actual send.
    p99_from_send_ms: f64,
    daemon_cpu_seconds: Option<f64>,
    daemon_peak_rss_kib: Option<u64>,
    /// This process's CPU seconds over the run: the load generator's cost, counted apart.
    generator_cpu_seconds: Option<f64>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = self.spans as f64 / self.seconds;
        writeln!(
            f,
            "requests {} ({} failed) in {:.1} s",
            self.requests, self.failures, self.seconds
        )?;
        writeln!(f, "spans accepted/s {rate:.0}")?;
        writeln!(
            f,
            "ack latency p50 {:.2} ms, p99 {:.2} ms (p99 from the send {:.2} ms)",
            self.p50_ms, self.p99_ms, self.p99_from_send_ms
        )?;
        if let Some(cpu) = self.daemon_cpu_seconds {
            writeln!(
                f,
                "daemon CPU {cpu:.2} s: {:.0} spans per daemon-CPU-second",
                self.spans as f64 / cpu.max(1e-9)
            )?;
        }
        if let Some(cpu) = self.generator_cpu_seconds {
            writeln!(
                f,
                "load generator CPU {cpu:.2} s ({:.2} CPUs busy), counted apart from the daemon's",
                cpu / self.seconds
            )?;
        }
        if let Some(rss) = self.daemon_peak_rss_kib {
            writeln!(f, "daemon peak RSS {:.1} MiB", rss as f64 / 1024.0)?;
        }
        Ok(())
    }
}

/// The fields of a trace export the engine reads, and nothing else: prost skips the rest
/// (trace state, flags, links, dropped counts, scope names and versions, schema URLs) without
/// building them. Decoding into these is the floor of what any decode-then-normalize path costs.
mod lean {
    use opentelemetry_proto::tonic::common::v1::KeyValue;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Request {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceSpans {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeSpans {
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Span>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Span {
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub parent_span_id: Vec<u8>,
        #[prost(string, tag = "5")]
        pub name: String,
        #[prost(int32, tag = "6")]
        pub kind: i32,
        #[prost(fixed64, tag = "7")]
        pub start_time_unix_nano: u64,
        #[prost(fixed64, tag = "8")]
        pub end_time_unix_nano: u64,
        #[prost(message, repeated, tag = "9")]
        pub attributes: Vec<KeyValue>,
        #[prost(message, repeated, tag = "11")]
        pub events: Vec<Event>,
        #[prost(message, optional, tag = "15")]
        pub status: Option<Status>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(message, repeated, tag = "3")]
        pub attributes: Vec<KeyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(int32, tag = "3")]
        pub code: i32,
    }
}

/// Spans per second one core decodes from `payloads` (plain protobuf), decoding with `decode` for
/// about `budget`: the physical reference the daemon's cost is compared with.
fn decode_rate(payloads: &[Bytes], budget: Duration, decode: impl Fn(&[u8]) -> usize) -> f64 {
    let started = Instant::now();
    let mut spans = 0usize;
    while started.elapsed() < budget {
        for p in payloads {
            spans += decode(p);
        }
    }
    spans as f64 / started.elapsed().as_secs_f64()
}

/// Sends already-encoded bytes as a gRPC message, and ignores the answer's content.
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct IgnoreDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for IgnoreDecoder {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = IgnoreDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> IgnoreDecoder {
        IgnoreDecoder
    }
}

/// One encoded export, with where its timestamps lie, so that each send can date it now.
struct Prepared {
    bytes: Bytes,
    /// Byte offsets of every span's start and end time and every span event's time (fixed64).
    times: Vec<usize>,
    /// The latest end time in it.
    last_ns: u64,
}

impl Prepared {
    fn new(bytes: Vec<u8>) -> Prepared {
        let mut times = Vec::new();
        timestamp_offsets(&bytes, 0, 0, &mut times);
        let read = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let last_ns = times.iter().map(|&at| read(at)).max().unwrap_or(0);
        Prepared {
            bytes: Bytes::from(bytes),
            times,
            last_ns,
        }
    }

    /// A copy dated so that its last span ends at `now_ns`, as a live SDK's export would be (a
    /// request cycled with its old dates would be late data, which the engine drops cheaply);
    /// gzipped for an HTTP sender with `gzip` (tonic gzips gRPC itself), each time, as an SDK does.
    fn stamped(&self, now_ns: u64, gzip_body: bool) -> Bytes {
        let shift = now_ns.saturating_sub(self.last_ns);
        let mut bytes = self.bytes.to_vec();
        for &at in &self.times {
            let field = &mut bytes[at..at + 8];
            let time = u64::from_le_bytes((&*field).try_into().expect("8 bytes"));
            field.copy_from_slice(&(time + shift).to_le_bytes());
        }
        if !gzip_body {
            return Bytes::from(bytes);
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &bytes).expect("gzip in memory");
        Bytes::from(gz.finish().expect("gzip in memory"))
    }
}

/// Collects the offsets of the timestamps of a trace export in `buf` (at nesting `depth`: 0 the
/// request, 1 resource spans, 2 scope spans, 3 a span, 4 a span event) into `out`.
fn timestamp_offsets(buf: &[u8], base: usize, depth: u8, out: &mut Vec<usize>) {
    let mut rest = buf;
    while !rest.is_empty() {
        let at = buf.len() - rest.len();
        let key = prost::encoding::decode_varint(&mut rest).expect("generated protobuf");
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                prost::encoding::decode_varint(&mut rest).expect("generated protobuf");
            }
            1 => {
                let value_at = base + buf.len() - rest.len();
                let is_time = matches!((depth, field), (3, 7 | 8) | (4, 1));
                if is_time {
                    out.push(value_at);
                }
                rest = &rest[8..];
            }
            2 => {
                let len = prost::encoding::decode_varint(&mut rest).expect("generated protobuf") as usize;
                let inner_at = base + buf.len() - rest.len();
                let descend = matches!((depth, field), (0, 1) | (1, 2) | (2, 2) | (3, 11));
                if descend {
                    timestamp_offsets(&rest[..len], inner_at, depth + 1, out);
                }
                rest = &rest[len..];
            }
            5 => rest = &rest[4..],
            other => panic!("wire type {other} at {at} in a generated request"),
        }
    }
}

/// `LOAD_DETAIL`: `lean` (the default, about 400 bytes a span) or `sdk` (about 600: what an
/// agent's HTTP and database instrumentations record).
fn span_detail() -> testdata::SpanDetail {
    match std::env::var("LOAD_DETAIL").as_deref() {
        Ok("sdk") => testdata::SpanDetail::Sdk,
        Ok("lean") | Err(_) => testdata::SpanDetail::Lean,
        Ok(other) => panic!("LOAD_DETAIL={other}: lean or sdk"),
    }
}

/// `LOAD_SERVICES`: the services each request's spans come from, 8 by default (as a collector's
/// export mixes them); 1 is an SDK's own export, all 512 spans of one service.
fn services() -> usize {
    common::env_number("LOAD_SERVICES", 1..=512, 8)
}

/// The requests to send, encoded.
fn prepare(plan: &LoadPlan) -> Vec<Prepared> {
    (0..plan.distinct)
        .map(|i| {
            // Eight services (`LOAD_SERVICES`) of one version each: a replay of 64 requests is a
            // fixed sample, whose small differences between two versions would repeat into
            // significance and fail a canary; the canaries judged under load are the
            // time-to-act phase's own.
            let shape = TraceShape {
                apps: services(),
                versions_per_app: 1,
                spans: plan.spans_per_request,
                start_ns: testdata::EPOCH_NS + i as u64 * 5_000_000_000,
                detail: span_detail(),
                ..TraceShape::default()
            };
            Prepared::new(testdata::trace_request(&shape, i as u64).encode_to_vec())
        })
        .collect()
}

/// Nanoseconds since the Unix epoch.
fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

async fn run(plan: LoadPlan) -> anyhow::Result<LoadReport> {
    if plan.concurrency == 0 || plan.distinct == 0 {
        bail!("--concurrency and --distinct must be at least 1");
    }
    let requests = Arc::new(prepare(&plan));
    let cpu_before = plan.pid.map(cpu_seconds).transpose()?;
    let generator_before = cpu_seconds(std::process::id()).ok();
    let started = Instant::now();
    let deadline = started + plan.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..plan.concurrency {
        let requests = requests.clone();
        let plan = plan.clone();
        tasks.spawn(async move { send_loop(worker, &plan, &requests, deadline).await });
    }
    let mut latencies = Sketch::new(0.01);
    let mut from_send = Sketch::new(0.01);
    let (mut sent, mut failures) = (0u64, 0u64);
    while let Some(result) = tasks.join_next().await {
        let (ok, failed, sketch, sent_sketch) = result.context("sender task")??;
        sent += ok;
        failures += failed;
        latencies.merge(&sketch);
        from_send.merge(&sent_sketch);
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = plan.pid.map(cpu_seconds).transpose()?;
    let generator_after = cpu_seconds(std::process::id()).ok();
    Ok(LoadReport {
        requests: sent + failures,
        failures,
        spans: sent * plan.spans_per_request as u64,
        seconds,
        p50_ms: latencies.quantile(0.5).unwrap_or(0.0),
        p99_ms: latencies.quantile(0.99).unwrap_or(0.0),
        p99_from_send_ms: from_send.quantile(0.99).unwrap_or(0.0),
        daemon_cpu_seconds: cpu_before.zip(cpu_after).map(|(a, b)| b - a),
        daemon_peak_rss_kib: plan.pid.map(peak_rss_kib).transpose()?,
        generator_cpu_seconds: generator_before.zip(generator_after).map(|(a, b)| b - a),
    })
}

/// One sender: returns its successes, failures and latencies (ms), from each request's turn and
/// from its send.
async fn send_loop(
    worker: usize,
    plan: &LoadPlan,
    requests: &[Prepared],
    deadline: Instant,
) -> anyhow::Result<(u64, u64, Sketch, Sketch)> {
    let mut latencies = Sketch::new(0.01);
    let mut from_send = Sketch::new(0.01);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut next = worker;
    // Paced senders start spread over one gap, so that their sends interleave.
    let mut due = Instant::now()
        + plan.gap.map_or(Duration::ZERO, |g| {
            g.mul_f64(worker as f64 / plan.concurrency as f64)
        });
    let mut wait_turn = move || {
        let now = Instant::now();
        let at = if plan.gap.is_some() { due } else { now };
        if let Some(g) = plan.gap {
            due += g;
        }
        at
    };
    match &plan.target {
        Target::Grpc(addr) => {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("cannot connect to {addr}"))?;
            let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
            if plan.gzip {
                grpc = grpc.send_compressed(CompressionEncoding::Gzip);
            }
            let path =
                PathAndQuery::from_static("/opentelemetry.proto.collector.trace.v1.TraceService/Export");
            while Instant::now() < deadline {
                let t = wait_turn();
                tokio::time::sleep_until(t.into()).await;
                let body = requests[next % requests.len()].stamped(now_ns(), false);
                next += 1;
                grpc.ready().await?;
                let sent = Instant::now();
                match grpc
                    .unary(tonic::Request::new(body), path.clone(), RawCodec)
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                latencies.add(t.elapsed().as_secs_f64() * 1e3);
                from_send.add(sent.elapsed().as_secs_f64() * 1e3);
            }
        }
        Target::Http(base) => {
            let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
            let url = format!("{}/v1/traces", base.trim_end_matches('/'));
            while Instant::now() < deadline {
                let t = wait_turn();
                tokio::time::sleep_until(t.into()).await;
                let body = requests[next % requests.len()].stamped(now_ns(), plan.gzip);
                next += 1;
                let mut request = client
                    .post(&url)
                    .header("content-type", "application/x-protobuf")
                    .body(body);
                if plan.gzip {
                    request = request.header("content-encoding", "gzip");
                }
                let sent = Instant::now();
                match request.send().await {
                    Ok(response) if response.status().is_success() => ok += 1,
                    _ => failed += 1,
                }
                latencies.add(t.elapsed().as_secs_f64() * 1e3);
                from_send.add(sent.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    Ok((ok, failed, latencies, from_send))
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` does not: then this is a smoke run.
    let measuring = std::env::args().any(|a| a == "--bench");
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let seconds = if measuring { env("LOAD_SECONDS", 10) } else { 1 };
    let concurrency = if measuring {
        env("LOAD_CONCURRENCY", 8) as usize
    } else {
        2
    };
    // The reference first, on the same payloads the daemon gets, before the daemon competes for
    // the cores.
    let plain: Vec<Bytes> = prepare(&LoadPlan {
        target: Target::Grpc(String::new()),
        gzip: false,
        concurrency: 1,
        duration: Duration::ZERO,
        distinct: 64,
        spans_per_request: 512,
        pid: None,
        gap: None,
    })
    .into_iter()
    .map(|p| p.bytes)
    .collect();
    let encoded: usize = plain.iter().map(Bytes::len).sum();
    println!(
        "== workload: {} distinct requests of 512 spans from {} services ({:?}), {:.0} bytes a request, {:.0} bytes a span, re-dated at each send",
        plain.len(),
        services(),
        span_detail(),
        encoded as f64 / plain.len() as f64,
        encoded as f64 / (plain.len() * 512) as f64
    );
    let budget = Duration::from_millis(if measuring { 3_000 } else { 200 });
    let full = decode_rate(&plain, budget, |p| {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        ExportTraceServiceRequest::decode(p).map_or(0, |r| {
            r.resource_spans
                .iter()
                .flat_map(|rs| &rs.scope_spans)
                .map(|ss| ss.spans.len())
                .sum()
        })
    });
    let lean = decode_rate(&plain, budget, |p| {
        lean::Request::decode(p).map_or(0, |r| {
            r.resource_spans
                .iter()
                .flat_map(|rs| &rs.scope_spans)
                .map(|ss| ss.spans.len())
                .sum()
        })
    });
    let options = canaryd::normalize::NormalizeOptions::default();
    let in_place = decode_rate(&plain, budget, |p| {
        canaryd::normalize::traces_protobuf(p, &options).map_or(0, |n| n.accepted as usize)
    });
    // What the receivers do with a request before it is queued: read and normalize it, then sum
    // each resource per second (the engine's bucket width), as `receive::Intake` does.
    let summed = decode_rate(&plain, budget, |p| {
        canaryd::normalize::traces_protobuf(p, &options).map_or(0, |mut n| {
            for resource in &mut n.batch.resources {
                resource.summarize(1_000_000_000);
            }
            n.accepted as usize
        })
    });
    println!(
        "== decode-only reference, one core: full prost decode {full:.0} spans/s, lean decode {lean:.0} spans/s; \
         canaryd's in-place read and normalize {in_place:.0} spans/s, and summed per second as the receivers do \
         {summed:.0} spans/s"
    );
    if full <= 0.0 || lean <= 0.0 || in_place <= 0.0 {
        bail!("the decode reference decoded nothing");
    }
    const KNOWN: [&str; 4] = ["grpc", "grpc+gzip", "http", "http+gzip"];
    let transports: Vec<String> = std::env::var("LOAD_TRANSPORTS")
        .unwrap_or_else(|_| KNOWN.join(","))
        .split(',')
        .map(|t| t.trim().to_owned())
        .collect();
    if let Some(unknown) = transports.iter().find(|t| !KNOWN.contains(&t.as_str())) {
        bail!(
            "LOAD_TRANSPORTS: unknown transport {unknown:?}; known: {}",
            KNOWN.join(",")
        );
    }
    let references = References { full, lean, in_place };
    // LOAD_THREADS (e.g. 1,2,4,8,16): one daemon per count, started with `--threads`, and the
    // senders scaled with it; otherwise one daemon with its default threads.
    let thread_counts: Vec<Option<usize>> = match std::env::var("LOAD_THREADS") {
        Ok(list) => list
            .split(',')
            .map(|n| n.trim().parse::<usize>().map(Some))
            .collect::<Result<_, _>>()
            .context("LOAD_THREADS: a comma-separated list of thread counts")?,
        Err(_) => vec![None],
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let mut rows = Vec::new();
    let mut result = Ok(());
    for threads in &thread_counts {
        let senders = threads.map_or(concurrency, |n| concurrency.max(4 * n));
        let act_plan = act::Plan::new(measuring);
        match measure_daemon(
            &runtime,
            *threads,
            senders,
            seconds,
            &transports,
            &references,
            act_plan,
        ) {
            Ok(mut measured) => rows.append(&mut measured),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if thread_counts.len() > 1 {
        println!(
            "== scaling (daemon threads; spans/s accepted; daemon CPUs busy; spans per daemon-CPU-second; engine thread busy; efficiency against 1 thread's spans/s times the threads)"
        );
        for row in &rows {
            let one = rows
                .iter()
                .find(|r| r.transport == row.transport && r.threads == Some(1))
                .map(|r| r.spans_per_s);
            let efficiency = match (one, row.threads) {
                (Some(one), Some(n)) if one > 0.0 => format!("{:.2}", row.spans_per_s / (one * n as f64)),
                _ => "-".to_owned(),
            };
            println!(
                "threads {:>2} {:<9} {:>10.0} spans/s  {:>5.2} CPUs  {:>10.0} per CPU-s  engine {:>5.1}%  efficiency {efficiency}",
                row.threads.unwrap_or(0),
                row.transport,
                row.spans_per_s,
                row.cpus,
                row.per_cpu_second,
                row.engine_busy * 100.0
            );
        }
    }
    result
}

/// The one-core decode references the daemon is compared with.
struct References {
    full: f64,
    lean: f64,
    in_place: f64,
}

/// One transport's closed-loop figures, for the scaling table.
struct Row {
    threads: Option<usize>,
    transport: &'static str,
    spans_per_s: f64,
    /// Daemon CPU seconds per second of the run.
    cpus: f64,
    per_cpu_second: f64,
    /// The engine thread's CPU seconds per second of the run.
    engine_busy: f64,
}

/// Starts a daemon (with `threads`, where given) and loads it over each transport in turn.
fn measure_daemon(
    runtime: &tokio::runtime::Runtime,
    threads: Option<usize>,
    concurrency: usize,
    seconds: u64,
    transports: &[String],
    references: &References,
    act_plan: act::Plan,
) -> anyhow::Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let threads_arg = threads.map(|n| n.to_string());
    let mut extra: Vec<&str> = match &threads_arg {
        Some(n) => vec!["--threads", n.as_str()],
        None => Vec::new(),
    };
    if act_plan.held_series > 0 {
        // The held apps: a group of 20 in an env of its own, every group reusing the names.
        extra.extend(["--max-apps", "1000000", "--max-envs-per-app", "1000000"]);
    }
    let (mut daemon, addrs) = start_daemon(&dir.path().join("data"), &extra)?;
    let pid = daemon.id();
    let mut rows = Vec::new();
    let mut result = Ok(());
    for (name, target, gzip) in [
        (
            "grpc",
            Target::Grpc(addrs["otlp_grpc"].as_str().unwrap_or_default().to_owned()),
            false,
        ),
        (
            "grpc+gzip",
            Target::Grpc(addrs["otlp_grpc"].as_str().unwrap_or_default().to_owned()),
            true,
        ),
        (
            "http",
            Target::Http(format!(
                "http://{}",
                addrs["otlp_http"].as_str().unwrap_or_default()
            )),
            false,
        ),
        (
            "http+gzip",
            Target::Http(format!(
                "http://{}",
                addrs["otlp_http"].as_str().unwrap_or_default()
            )),
            true,
        ),
    ] {
        if !transports.iter().any(|t| t == name) {
            continue;
        }
        let plan = LoadPlan {
            target,
            gzip,
            concurrency,
            duration: Duration::from_secs(seconds),
            distinct: 64,
            spans_per_request: 512,
            pid: Some(pid),
            gap: None,
        };
        let engine_before = thread_cpu_seconds(pid, "canaryd-engine");
        let waits_before = (thread_waits(pid, Some("canaryd-engine")), thread_waits(pid, None));
        match runtime.block_on(run(plan.clone())) {
            Ok(report) => {
                let threads_said = threads.map_or("default".to_owned(), |n| n.to_string());
                println!("== {name}, daemon threads {threads_said}, concurrency {concurrency}, {seconds} s");
                print!("{report}");
                let engine_cpu = thread_cpu_seconds(pid, "canaryd-engine")
                    .zip(engine_before)
                    .map_or(0.0, |(after, before)| after - before);
                println!(
                    "engine thread busy {:.1}% of the run",
                    100.0 * engine_cpu / report.seconds
                );
                let per_second = |after: Option<u64>, before: Option<u64>| {
                    after
                        .zip(before)
                        .map_or(0.0, |(a, b)| a.saturating_sub(b) as f64 / report.seconds)
                };
                println!(
                    "threads woken per second: the engine's {:.0}, the daemon's {:.0} ({:.0} requests/s)",
                    per_second(thread_waits(pid, Some("canaryd-engine")), waits_before.0),
                    per_second(thread_waits(pid, None), waits_before.1),
                    report.requests as f64 / report.seconds,
                );
                if let Some(cpu) = report.daemon_cpu_seconds.filter(|c| *c > 0.0) {
                    let per_cpu = report.spans as f64 / cpu;
                    println!(
                        "per daemon-CPU-second against decode-only: {:.2} of full decode, {:.2} of lean decode, \
                         {:.2} of in-place read and normalize",
                        per_cpu / references.full,
                        per_cpu / references.lean,
                        per_cpu / references.in_place
                    );
                    rows.push(Row {
                        threads,
                        transport: name,
                        spans_per_s: report.spans as f64 / report.seconds,
                        cpus: cpu / report.seconds,
                        per_cpu_second: per_cpu,
                        engine_busy: engine_cpu / report.seconds,
                    });
                }
                // The latency a sender sees at half the load the daemon can take, paced.
                if !gzip && report.requests > 0 {
                    let peak = report.requests as f64 / report.seconds;
                    let half = LoadPlan {
                        gap: Some(Duration::from_secs_f64(plan.concurrency as f64 / (peak / 2.0))),
                        ..plan.clone()
                    };
                    match runtime.block_on(run(half)) {
                        Ok(paced) => println!(
                            "at 50% of peak ({:.0} spans/s): ack latency p50 {:.2} ms, p99 {:.2} ms",
                            paced.spans as f64 / paced.seconds,
                            paced.p50_ms,
                            paced.p99_ms
                        ),
                        Err(e) => result = Err(e),
                    }
                }
                // Time to act: canaries failing one after another while the daemon carries 80% of
                // the load it just took, on its default threads (`LOAD_ACT=0` skips it).
                let act_wanted = std::env::var("LOAD_ACT").map_or(true, |v| v != "0");
                if name == "grpc" && threads.is_none() && act_wanted && report.requests > 0 {
                    let peak = report.requests as f64 / report.seconds;
                    let busy = LoadPlan {
                        gap: Some(Duration::from_secs_f64(plan.concurrency as f64 / (peak * 0.8))),
                        duration: act_plan.seconds(),
                        ..plan.clone()
                    };
                    let api = format!("http://{}", addrs["http"].as_str().unwrap_or_default());
                    let otlp_http = addrs["otlp_http"].as_str().unwrap_or_default();
                    match runtime.block_on(act::under_load(busy, &api, otlp_http, act_plan)) {
                        Ok(acted) => print!("{acted}"),
                        Err(e) => result = Err(e),
                    }
                }
                if report.failures > 0 || report.requests == 0 {
                    result = Err(anyhow::anyhow!(
                        "{name}: {} of {} requests failed",
                        report.failures,
                        report.requests
                    ));
                }
            }
            Err(e) => result = Err(e),
        }
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = daemon.wait();
    result.map(|()| rows)
}

/// Time to act under load (issue 16, 6): canaries of many apps go bad one after another while
/// paced background load keeps the daemon at 80% of what it took closed-loop; a webhook receiver
/// here takes each `canary.failed`. The daemon's own `canaryd_act_seconds` times each decision
/// from the arrival of the request whose batch decided it to its webhook leaving.
mod act {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};
    use bytes::Bytes;
    use canaryd::testdata::{kv, kv_int, resource};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};
    use prost::Message;
    use tonic::codegen::http::uri::PathAndQuery;

    use canaryd::testdata::{self, TraceShape};

    use super::{LoadPlan, RawCodec, Target, cpu_seconds, now_ns, run};

    /// How often the apps' traffic is sent, and how many requests each version makes in that time.
    const PERIOD: Duration = Duration::from_millis(200);
    const PER_PERIOD: u64 = 4;

    /// How many canaries go bad, and when.
    #[derive(Clone, Copy)]
    pub struct Plan {
        pub apps: u64,
        /// Series held in the daemon meanwhile (`LOAD_ACT_HELD`, none by default): apps of their
        /// own sending live traffic throughout, as the series bench's do, so that windows close,
        /// baselines learn and flushes write for that many series while canaries are decided.
        pub held_series: u64,
        /// Healthy traffic before the first canary goes bad, and the time over which they all do.
        warm: Duration,
        spread: Duration,
        /// Load after the last goes bad: enough for its second to close (`allowed_lateness_secs`,
        /// 10 s by default, behind the latest event time) and be decided.
        tail: Duration,
    }

    impl Plan {
        pub fn new(measuring: bool) -> Plan {
            if measuring {
                Plan {
                    apps: 100,
                    held_series: std::env::var("LOAD_ACT_HELD")
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0),
                    warm: Duration::from_secs(15),
                    spread: Duration::from_secs(20),
                    tail: Duration::from_secs(20),
                }
            } else {
                Plan {
                    apps: 4,
                    held_series: 0,
                    warm: Duration::from_secs(3),
                    spread: Duration::from_secs(1),
                    tail: Duration::from_secs(14),
                }
            }
        }

        pub fn seconds(&self) -> Duration {
            self.warm + self.spread + self.tail
        }
    }

    pub struct Acted {
        apps: u64,
        /// Series the daemon held at the end, and the groups of apps sending them (0: none held).
        held: Option<(f64, usize)>,
        /// Seasonal slots read on the engine's thread and read ahead on the writer's, in all.
        slots_read: (f64, f64),
        background_spans_per_s: f64,
        background_ack_p99_ms: f64,
        background_ack_p99_from_send_ms: f64,
        failed: usize,
        /// Decisions' time to act; how many were timed.
        act: Spread,
        timed: f64,
        /// From a canary's first bad request to its webhook arriving here (includes the
        /// event-time wait for its second to close).
        first_bad_to_webhook: Vec<f64>,
        /// The engine thread's steps while the load ran, by kind: cumulative buckets.
        steps: Vec<(String, Vec<(f64, f64)>)>,
        /// The share of the time the load ran that the engine's thread spent in steps.
        engine_busy: f64,
        /// The decisions' time after their events were stored.
        after_stored: Spread,
        /// The webhook requests' times (send to answer).
        requests: Spread,
        /// Each attempt's record in the store.
        records: Spread,
        /// The most decisions that one closed second decided (webhooks with the same
        /// `detected_at`): they leave one after another.
        largest_burst: usize,
        /// The requests' waits for an ingest slot (since the daemon started).
        slot_wait: Spread,
        /// The requests' time in the daemon, gRPC (the paced load) and HTTP (the held apps').
        answered: (Spread, Spread),
        /// The batches' waits in the engine's queue (since the daemon started).
        queue_wait: Spread,
        /// CPUs busy meanwhile: the daemon's, and this process's (the paced load, the held
        /// apps' traffic, the webhook receiver).
        cpus_busy: (Option<f64>, Option<f64>),
    }

    impl std::fmt::Display for Acted {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let mut waits = self.first_bad_to_webhook.clone();
            waits.sort_by(f64::total_cmp);
            let at = |q: f64| {
                waits
                    .get(((waits.len() as f64 - 1.0) * q).round() as usize)
                    .copied()
            };
            writeln!(
                f,
                "== time to act, {} canaries failing under {:.0} spans/s of paced load (ack p99 {:.2} ms from each request's turn, {:.2} ms from its send)",
                self.apps,
                self.background_spans_per_s,
                self.background_ack_p99_ms,
                self.background_ack_p99_from_send_ms
            )?;
            if let Some((series, groups)) = self.held {
                writeln!(
                    f,
                    "while {series:.0} series were held, {groups} groups of {HELD_GROUP} apps sending live traffic; \
                     seasonal slots read on the engine's thread {:.0}, read ahead {:.0}",
                    self.slots_read.0, self.slots_read.1
                )?;
            }
            writeln!(
                f,
                "canary.failed webhooks received {} of {}; decisions timed by the daemon {:.0}",
                self.failed, self.apps, self.timed
            )?;
            writeln!(
                f,
                "deciding request's arrival to webhook leaving (canaryd_act_seconds): {}",
                self.act
            )?;
            writeln!(
                f,
                "first bad request sent to webhook received here: median {:.2} s, max {:.2} s (the bucket's event-time wait included)",
                at(0.5).unwrap_or(f64::NAN),
                at(1.0).unwrap_or(f64::NAN)
            )?;
            let cpus = |c: Option<f64>| c.map_or("-".to_owned(), |c| format!("{c:.2}"));
            writeln!(
                f,
                "CPUs busy meanwhile: daemon {}, this load generator {}, of {} cores",
                cpus(self.cpus_busy.0),
                cpus(self.cpus_busy.1),
                std::thread::available_parallelism().map_or(0, |n| n.get())
            )?;
            writeln!(
                f,
                "of which after its events were stored (canaryd_act_after_stored_seconds): {}",
                self.after_stored
            )?;
            writeln!(
                f,
                "webhook requests (canaryd_delivery_seconds): {}; their records (canaryd_delivery_record_seconds): {}; decisions per closed second: most {}",
                self.requests, self.records, self.largest_burst
            )?;
            writeln!(
                f,
                "requests' wait for an ingest slot (canaryd_ingest_slot_wait_seconds, since the daemon started): {}",
                self.slot_wait
            )?;
            writeln!(
                f,
                "requests' arrival to answer, in the daemon (canaryd_otlp_request_seconds): paced, gRPC {}; held apps', HTTP {}",
                self.answered.0, self.answered.1
            )?;
            writeln!(
                f,
                "batches' wait in the engine's queue (canaryd_engine_queue_wait_seconds): {}",
                self.queue_wait
            )?;
            write!(
                f,
                "engine thread's steps meanwhile (canaryd_engine_step_seconds), busy {:.0}% of the time:",
                self.engine_busy * 100.0
            )?;
            for (kind, buckets) in &self.steps {
                let total = buckets.last().map_or(0.0, |(_, n)| *n);
                let over = |bound: f64| {
                    total
                        - buckets
                            .iter()
                            .find(|(le, _)| (*le - bound).abs() < 1e-9)
                            .map_or(total, |(_, n)| *n)
                };
                let longest = buckets
                    .iter()
                    .find(|(_, n)| *n >= total)
                    .map_or("-".to_owned(), |(le, _)| format!("<= {:.1} ms", le * 1e3));
                write!(
                    f,
                    "\n  {kind}: {total:.0}, over 25 ms {:.0}, over 100 ms {:.0}, longest {longest}",
                    over(0.025),
                    over(0.1)
                )?;
            }
            writeln!(f)
        }
    }

    /// The seconds of every kind of `canaryd_engine_step_seconds`, together.
    fn engine_step_seconds(metrics: &str) -> f64 {
        metrics
            .lines()
            .filter_map(|line| line.strip_prefix("canaryd_engine_step_seconds_sum{"))
            .filter_map(|rest| rest.split_once("} ")?.1.trim().parse::<f64>().ok())
            .sum()
    }

    /// `canaryd_engine_step_seconds`'s cumulative buckets, by kind: (upper bound, count).
    fn engine_steps(metrics: &str) -> Vec<(String, Vec<(f64, f64)>)> {
        let mut kinds: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for line in metrics.lines() {
            let Some(rest) = line.strip_prefix("canaryd_engine_step_seconds_bucket{le=\"") else {
                continue;
            };
            let Some((le, rest)) = rest.split_once("\",kind=\"") else {
                continue;
            };
            let Some((kind, count)) = rest.split_once("\"} ") else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            let count: f64 = count.trim().parse().unwrap_or(0.0);
            match kinds.iter_mut().find(|(k, _)| k == kind) {
                Some((_, buckets)) => buckets.push((le, count)),
                None => kinds.push((kind.to_owned(), vec![(le, count)])),
            }
        }
        for (_, buckets) in &mut kinds {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        kinds.sort_by(|a, b| a.0.cmp(&b.0));
        kinds
    }

    /// One period's traffic of every app, dated up to `now`: a stable and a canary version each
    /// making `PER_PERIOD` requests; a canary's fail from its `bad_from` on.
    fn traffic(now: u64, bad_from: &[u64], serial: u64) -> ExportTraceServiceRequest {
        let period = PERIOD.as_nanos() as u64;
        let mut resource_spans = Vec::new();
        for (app, &bad_from) in bad_from.iter().enumerate() {
            for version in ["1.0.0", "2.0.0"] {
                let spans = (0..PER_PERIOD)
                    .map(|k| {
                        let start = now - period + k * period / PER_PERIOD;
                        let failed = version == "2.0.0" && start >= bad_from;
                        let id = serial
                            .wrapping_mul(1_000_003)
                            .wrapping_add(app as u64 * 16 + k * 2 + u64::from(version == "2.0.0"));
                        Span {
                            trace_id: [id.to_be_bytes(), serial.to_be_bytes()].concat(),
                            span_id: id.to_be_bytes().to_vec(),
                            name: "POST /checkout".into(),
                            kind: span::SpanKind::Server as i32,
                            start_time_unix_nano: start,
                            end_time_unix_nano: start + 20_000_000,
                            attributes: vec![
                                kv("http.request.method", "POST"),
                                kv("http.route", "/checkout"),
                                kv_int("http.response.status_code", if failed { 500 } else { 200 }),
                            ],
                            status: failed.then(|| Status {
                                code: status::StatusCode::Error as i32,
                                message: "internal error".into(),
                            }),
                            ..Span::default()
                        }
                    })
                    .collect();
                resource_spans.push(ResourceSpans {
                    resource: Some(resource("prod", &format!("act-{app}"), version)),
                    scope_spans: vec![ScopeSpans {
                        spans,
                        ..ScopeSpans::default()
                    }],
                    ..ResourceSpans::default()
                });
            }
        }
        ExportTraceServiceRequest { resource_spans }
    }

    /// A histogram's p50, p99 and longest, each as the upper bound of the bucket it lies in
    /// (seconds).
    struct Spread {
        p50: Option<f64>,
        p99: Option<f64>,
        longest: Option<f64>,
    }

    impl Spread {
        fn of(metrics: &str, name: &str) -> Self {
            Spread::between("", metrics, name, "")
        }

        /// The spread of what was observed after `before` up to `after`, of the series whose
        /// labels after `le` are `labels`.
        fn between(before: &str, after: &str, name: &str, labels: &str) -> Self {
            let buckets = since(buckets_of(after, name, labels), &buckets_of(before, name, labels));
            Spread {
                p50: bound_of(&buckets, 0.5),
                p99: bound_of(&buckets, 0.99),
                longest: bound_of(&buckets, 1.0),
            }
        }
    }

    impl std::fmt::Display for Spread {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let bound = |b: Option<f64>| b.map_or("-".to_owned(), |s| format!("<= {:.1} ms", s * 1e3));
            write!(
                f,
                "p50 {}, p99 {}, longest {}",
                bound(self.p50),
                bound(self.p99),
                bound(self.longest)
            )
        }
    }

    /// A histogram's cumulative buckets (upper bound, count), of the series whose labels after
    /// `le` are `labels` (`,key="value"`...).
    fn buckets_of(metrics: &str, name: &str, labels: &str) -> Vec<(f64, f64)> {
        let end = format!("\"{labels}}} ");
        let mut buckets: Vec<(f64, f64)> = metrics
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(name)?.strip_prefix("_bucket{le=\"")?;
                let (le, count) = rest.split_once(&end)?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count.trim().parse().ok()?))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    }

    /// Cumulative `buckets` less the counts `earlier` held: what was observed since.
    fn since(buckets: Vec<(f64, f64)>, earlier: &[(f64, f64)]) -> Vec<(f64, f64)> {
        buckets
            .into_iter()
            .map(|(le, n)| {
                let then = earlier.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, n)| *n);
                (le, n - then)
            })
            .collect()
    }

    /// The bucket bound under which quantile `q` of cumulative `buckets` lies.
    fn bound_of(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
        let total = buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        buckets.iter().find(|(_, n)| *n >= q * total).map(|(le, _)| *le)
    }

    /// Apps in a group of held apps (each group its own env, as the series bench's).
    const HELD_GROUP: usize = 20;
    /// Event time each export of a held group covers.
    const HELD_STEP_NS: u64 = 5_000_000_000;
    /// Event time a held group is first sent at once, so that two windows close and every
    /// feature has a baseline.
    const HELD_FILL_NS: u64 = 140_000_000_000;
    /// How far behind now held traffic is dated, so that none of a step's spans (spread about
    /// its 5 s) is dated ahead of the daemon's clock.
    const HELD_LAG_NS: u64 = 2_000_000_000;

    /// The held apps' traffic: groups of `HELD_GROUP` apps, one version, eight operations, a
    /// request and a database call each about every 250 ms, live-dated.
    struct Held {
        http: reqwest::Client,
        url: String,
        /// Event time each group has been sent up to.
        sent_until: Vec<u64>,
        exports: u64,
    }

    impl Held {
        /// Sends every step of `group` up to `until`.
        async fn catch_up(&mut self, group: usize, until: u64) -> anyhow::Result<()> {
            while self.sent_until[group] + HELD_STEP_NS <= until {
                let start = self.sent_until[group];
                let shape = TraceShape {
                    env: format!("held-{group}"),
                    apps: HELD_GROUP,
                    versions_per_app: 1,
                    operations: 8,
                    spans: HELD_GROUP * 40,
                    start_ns: start,
                    request_gap_ns: 250_000_000,
                    ..TraceShape::default()
                };
                let seed = ((group as u64) << 40) | (start / HELD_STEP_NS);
                let request = testdata::trace_request(&shape, seed);
                super::common::post_traces(&self.http, &self.url, &request)
                    .await
                    .context("a held app's export")?;
                self.sent_until[group] = start + HELD_STEP_NS;
                self.exports += 1;
            }
            Ok(())
        }

        /// Fills the daemon with about `series` series: one group first, to learn how many
        /// series a group holds, then as many more as that takes.
        async fn fill(api: &str, otlp_http: &str, series: u64) -> anyhow::Result<Held> {
            let started = Instant::now();
            let http = reqwest::Client::new();
            let mut held = Held {
                http: http.clone(),
                url: format!("http://{otlp_http}/v1/traces"),
                sent_until: Vec::new(),
                exports: 0,
            };
            let batches = super::common::metric(&http, api, "canaryd_engine_batches_total").await?;
            let before = super::common::metric(&http, api, "canaryd_baselines").await?;
            held.sent_until.push(now_ns() - HELD_FILL_NS);
            held.catch_up(0, now_ns() - HELD_LAG_NS).await?;
            super::common::settle(&http, api, batches + held.exports as f64, 2.0).await?;
            let per_group = super::common::metric(&http, api, "canaryd_baselines").await? - before;
            if per_group < 1.0 {
                bail!("a held group's traffic gave no baselines");
            }
            let groups = (series as f64 / per_group).ceil().max(1.0) as usize;
            for group in 1..groups {
                held.sent_until.push(now_ns() - HELD_FILL_NS);
                held.catch_up(group, now_ns() - HELD_LAG_NS).await?;
            }
            super::common::settle(&http, api, batches + held.exports as f64, 2.0).await?;
            let holding = super::common::metric(&http, api, "canaryd_baselines").await? - before;
            println!(
                "== holding {holding:.0} series ({groups} groups of {HELD_GROUP} apps, {per_group:.0} series a group), filled in {:.0} s",
                started.elapsed().as_secs_f64()
            );
            Ok(held)
        }

        /// Sends every group's traffic as event time passes, until `deadline`.
        async fn keep_sending(mut self, deadline: Instant) -> anyhow::Result<()> {
            let mut ticks = tokio::time::interval(Duration::from_secs(1));
            while Instant::now() < deadline {
                ticks.tick().await;
                for group in 0..self.sent_until.len() {
                    self.catch_up(group, now_ns() - HELD_LAG_NS).await?;
                }
            }
            Ok(())
        }
    }

    pub async fn under_load(busy: LoadPlan, api: &str, otlp_http: &str, plan: Plan) -> anyhow::Result<Acted> {
        let Target::Grpc(addr) = busy.target.clone() else {
            bail!("time to act is measured over gRPC");
        };
        let held = if plan.held_series > 0 {
            Some(Held::fill(api, otlp_http, plan.held_series).await?)
        } else {
            None
        };
        // The webhook receiver: when each failure arrived, and for which app.
        let received: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let hook = format!("http://{}/hook", listener.local_addr()?);
        // How many decisions each closed second made (by the event time that decided them).
        let bursts: Arc<Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
        let log = received.clone();
        let burst_log = bursts.clone();
        let router = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let log = log.clone();
                let burst_log = burst_log.clone();
                async move {
                    let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    let detected_at = event["data"]["detected_at"].to_string();
                    *burst_log
                        .lock()
                        .expect("burst log")
                        .entry(detected_at)
                        .or_default() += 1;
                    let mut app = event["data"]["app"].as_str().unwrap_or_default().to_owned();
                    if !app.starts_with("act-") {
                        app = format!("{app}: {}", event["data"]["reasons"]);
                    }
                    log.lock().expect("receiver log").push((Instant::now(), app));
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        let server = tokio::spawn(async move { axum::serve(listener, router).await });

        let http = reqwest::Client::new();
        let answer = http
            .post(format!("{api}/api/v1/subscriptions"))
            .json(&serde_json::json!({"url": hook, "events": ["canaryd.canary.failed"]}))
            .send()
            .await?;
        if answer.status() != 201 {
            bail!("subscribing answered {}", answer.status());
        }
        let started = now_ns();
        let metrics_before = super::common::metrics_text(&http, api).await?;
        let steps_before = engine_steps(&metrics_before);
        let pid = busy.pid;
        let cpu_before = (
            pid.and_then(|pid| cpu_seconds(pid).ok()),
            cpu_seconds(std::process::id()).ok(),
        );
        let started_at = Instant::now();
        let bad_from: Vec<u64> = (0..plan.apps)
            .map(|app| {
                let at = plan.warm + plan.spread.mul_f64(app as f64 / plan.apps as f64);
                started + at.as_nanos() as u64
            })
            .collect();
        let deadline = started_at + busy.duration;
        let held_groups = held.as_ref().map_or(0, |h| h.sent_until.len());
        let held_traffic = held.map(|held| tokio::spawn(held.keep_sending(deadline)));
        let background = tokio::spawn(run(busy));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let apps_traffic = tokio::spawn(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            let path =
                PathAndQuery::from_static("/opentelemetry.proto.collector.trace.v1.TraceService/Export");
            let mut ticks = tokio::time::interval(PERIOD);
            let mut serial = 0;
            while Instant::now() < deadline {
                ticks.tick().await;
                serial += 1;
                let body = Bytes::from(traffic(now_ns(), &bad_from, serial).encode_to_vec());
                grpc.ready().await?;
                grpc.unary(tonic::Request::new(body), path.clone(), RawCodec)
                    .await
                    .context("the apps' traffic was refused")?;
            }
            anyhow::Ok(bad_from)
        });
        // A rollout is declared for an app canaryd has seen.
        for app in 0..plan.apps {
            let declared = super::common::eventually_ok(Duration::from_secs(10), || async {
                let answer = http
                    .put(format!("{api}/api/v1/apps/act-{app}/rollout?env=prod"))
                    .json(&serde_json::json!({"stable_version": "1.0.0", "canary_version": "2.0.0"}))
                    .send()
                    .await?;
                match answer.status() {
                    s if s.is_success() => Ok(()),
                    s => bail!("declaring act-{app}'s rollout answered {s}"),
                }
            })
            .await;
            declared?;
        }
        let bad_from = apps_traffic.await.context("the apps' traffic")??;
        let background = background.await.context("the background load")??;
        if let Some(held_traffic) = held_traffic {
            held_traffic.await.context("the held apps' traffic")??;
        }
        server.abort();

        let metrics = http.get(format!("{api}/metrics")).send().await?.text().await?;
        let elapsed = started_at.elapsed().as_secs_f64();
        let engine_busy = (engine_step_seconds(&metrics) - engine_step_seconds(&metrics_before)) / elapsed;
        let cpus = |before: Option<f64>, pid: Option<u32>| -> Option<f64> {
            Some((cpu_seconds(pid?).ok()? - before?) / elapsed)
        };
        let cpus_busy = (
            cpus(cpu_before.0, pid),
            cpus(cpu_before.1, Some(std::process::id())),
        );
        let received = received.lock().expect("receiver log").clone();
        let largest_burst = bursts
            .lock()
            .expect("burst log")
            .values()
            .copied()
            .max()
            .unwrap_or(0);
        let first_bad_to_webhook = received
            .iter()
            .filter_map(|(at, app)| {
                let index: usize = app.strip_prefix("act-")?.parse().ok()?;
                let bad_at = started_at + Duration::from_nanos(bad_from.get(index)? - started);
                Some(at.saturating_duration_since(bad_at).as_secs_f64())
            })
            .collect();
        let others: Vec<&String> = received
            .iter()
            .map(|(_, app)| app)
            .filter(|app| !app.starts_with("act-"))
            .collect();
        if !others.is_empty() {
            bail!("canaries failed that were not made to fail: {others:?}");
        }
        if received.len() as u64 != plan.apps {
            bail!(
                "{} of {} failing canaries were acted on while the load ran",
                received.len(),
                plan.apps
            );
        }
        Ok(Acted {
            apps: plan.apps,
            held: (held_groups > 0).then(|| {
                (
                    super::common::sample(&metrics, "canaryd_baselines").unwrap_or(0.0),
                    held_groups,
                )
            }),
            background_spans_per_s: background.spans as f64 / background.seconds,
            background_ack_p99_ms: background.p99_ms,
            background_ack_p99_from_send_ms: background.p99_from_send_ms,
            failed: received.len(),
            slots_read: (
                super::common::sample(&metrics, "canaryd_store_slots_read_total").unwrap_or(0.0),
                super::common::sample(&metrics, "canaryd_store_slots_read_ahead_total").unwrap_or(0.0),
            ),
            act: Spread::of(&metrics, "canaryd_act_seconds"),
            timed: super::common::sample(&metrics, "canaryd_act_seconds_count").unwrap_or(0.0),
            first_bad_to_webhook,
            engine_busy,
            cpus_busy,
            after_stored: Spread::of(&metrics, "canaryd_act_after_stored_seconds"),
            requests: Spread::of(&metrics, "canaryd_delivery_seconds"),
            records: Spread::of(&metrics, "canaryd_delivery_record_seconds"),
            largest_burst,
            slot_wait: Spread::of(&metrics, "canaryd_ingest_slot_wait_seconds"),
            answered: (
                Spread::between(
                    &metrics_before,
                    &metrics,
                    "canaryd_otlp_request_seconds",
                    ",transport=\"grpc\"",
                ),
                Spread::between(
                    &metrics_before,
                    &metrics,
                    "canaryd_otlp_request_seconds",
                    ",transport=\"http\"",
                ),
            ),
            queue_wait: Spread::of(&metrics, "canaryd_engine_queue_wait_seconds"),
            steps: engine_steps(&metrics)
                .into_iter()
                .map(|(kind, buckets)| {
                    let before = steps_before.iter().find(|(k, _)| *k == kind);
                    let buckets = since(buckets, before.map_or(&[][..], |(_, b)| b));
                    (kind, buckets)
                })
                .collect(),
        })
    }
}
