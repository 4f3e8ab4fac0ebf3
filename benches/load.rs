//! The OTLP load generator: starts the daemon binary on port 0, drives it with trace exports over
//! gRPC and HTTP, plain and gzipped, and reports what each took.
//!
//! Requests (512 spans of 10 attributes) are generated and encoded, and gzipped for HTTP, before
//! the clock starts, so the sender spends its time sending: `CONCURRENCY` tasks each send one
//! request, wait for the answer, and send the next, for `SECONDS` per transport. The daemon runs
//! in its own process, so its CPU seconds (from /proc) give spans per daemon-CPU-second whatever
//! the generator costs; its peak RSS is reported too.
//!
//! `cargo bench --bench load` measures (environment: `LOAD_SECONDS`, default 10,
//! `LOAD_CONCURRENCY`, default 8, and `LOAD_TRANSPORTS`, a comma-separated subset of
//! `grpc,grpc+gzip,http,http+gzip`, default all, e.g. to profile one); `cargo test --benches` runs
//! it for a second, as a smoke test.
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
use common::{cpu_seconds, peak_rss_kib, start_daemon};

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
    p50_ms: f64,
    p99_ms: f64,
    daemon_cpu_seconds: Option<f64>,
    daemon_peak_rss_kib: Option<u64>,
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
            "ack latency p50 {:.2} ms, p99 {:.2} ms",
            self.p50_ms, self.p99_ms
        )?;
        if let Some(cpu) = self.daemon_cpu_seconds {
            writeln!(
                f,
                "daemon CPU {cpu:.2} s: {:.0} spans per daemon-CPU-second",
                self.spans as f64 / cpu.max(1e-9)
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

/// The requests to send, encoded (and gzipped for HTTP with `gzip`).
fn prepare(plan: &LoadPlan) -> Vec<Bytes> {
    (0..plan.distinct)
        .map(|i| {
            let shape = TraceShape {
                spans: plan.spans_per_request,
                start_ns: testdata::EPOCH_NS + i as u64 * 5_000_000_000,
                ..TraceShape::default()
            };
            let bytes = testdata::trace_request(&shape, i as u64).encode_to_vec();
            match (&plan.target, plan.gzip) {
                (Target::Http(_), true) => {
                    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    std::io::Write::write_all(&mut gz, &bytes).expect("gzip in memory");
                    Bytes::from(gz.finish().expect("gzip in memory"))
                }
                _ => Bytes::from(bytes),
            }
        })
        .collect()
}

async fn run(plan: LoadPlan) -> anyhow::Result<LoadReport> {
    if plan.concurrency == 0 || plan.distinct == 0 {
        bail!("--concurrency and --distinct must be at least 1");
    }
    let requests = Arc::new(prepare(&plan));
    let cpu_before = plan.pid.map(cpu_seconds).transpose()?;
    let started = Instant::now();
    let deadline = started + plan.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..plan.concurrency {
        let requests = requests.clone();
        let plan = plan.clone();
        tasks.spawn(async move { send_loop(worker, &plan, &requests, deadline).await });
    }
    let mut latencies = Sketch::new(0.01);
    let (mut sent, mut failures) = (0u64, 0u64);
    while let Some(result) = tasks.join_next().await {
        let (ok, failed, sketch) = result.context("sender task")??;
        sent += ok;
        failures += failed;
        latencies.merge(&sketch);
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = plan.pid.map(cpu_seconds).transpose()?;
    Ok(LoadReport {
        requests: sent + failures,
        failures,
        spans: sent * plan.spans_per_request as u64,
        seconds,
        p50_ms: latencies.quantile(0.5).unwrap_or(0.0),
        p99_ms: latencies.quantile(0.99).unwrap_or(0.0),
        daemon_cpu_seconds: cpu_before.zip(cpu_after).map(|(a, b)| b - a),
        daemon_peak_rss_kib: plan.pid.map(peak_rss_kib).transpose()?,
    })
}

/// One sender: returns its successes, failures and latencies (ms).
async fn send_loop(
    worker: usize,
    plan: &LoadPlan,
    requests: &[Bytes],
    deadline: Instant,
) -> anyhow::Result<(u64, u64, Sketch)> {
    let mut latencies = Sketch::new(0.01);
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
                let body = requests[next % requests.len()].clone();
                next += 1;
                let t = wait_turn();
                tokio::time::sleep_until(t.into()).await;
                grpc.ready().await?;
                match grpc
                    .unary(tonic::Request::new(body), path.clone(), RawCodec)
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                latencies.add(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        Target::Http(base) => {
            let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
            let url = format!("{}/v1/traces", base.trim_end_matches('/'));
            while Instant::now() < deadline {
                let body = requests[next % requests.len()].clone();
                next += 1;
                let t = wait_turn();
                tokio::time::sleep_until(t.into()).await;
                let mut request = client
                    .post(&url)
                    .header("content-type", "application/x-protobuf")
                    .body(body);
                if plan.gzip {
                    request = request.header("content-encoding", "gzip");
                }
                match request.send().await {
                    Ok(response) if response.status().is_success() => ok += 1,
                    _ => failed += 1,
                }
                latencies.add(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    Ok((ok, failed, latencies))
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
    let plain = prepare(&LoadPlan {
        target: Target::Grpc(String::new()),
        gzip: false,
        concurrency: 1,
        duration: Duration::ZERO,
        distinct: 64,
        spans_per_request: 512,
        pid: None,
        gap: None,
    });
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
    println!(
        "== decode-only reference, one core: full prost decode {full:.0} spans/s, lean decode {lean:.0} spans/s; \
         canaryd's in-place read and normalize {in_place:.0} spans/s"
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
    let dir = tempfile::tempdir()?;
    let (mut daemon, addrs) = start_daemon(&dir.path().join("data"), &[])?;
    let pid = daemon.id();
    let runtime = tokio::runtime::Runtime::new()?;
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
        match runtime.block_on(run(plan.clone())) {
            Ok(report) => {
                println!("== {name}, concurrency {concurrency}, {seconds} s");
                print!("{report}");
                if let Some(cpu) = report.daemon_cpu_seconds.filter(|c| *c > 0.0) {
                    let per_cpu = report.spans as f64 / cpu;
                    println!(
                        "per daemon-CPU-second against decode-only: {:.2} of full decode, {:.2} of lean decode, \
                         {:.2} of in-place read and normalize",
                        per_cpu / full,
                        per_cpu / lean,
                        per_cpu / in_place
                    );
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
    result
}
