//! Hostile load against the daemon binary: the attacks of issue 15 replayed, each against a fresh
//! daemon with its default limits, reporting the daemon's peak RSS against its memory budget and
//! checking that every acknowledged item is counted.
//!
//! Attacks (sizes for `cargo bench`; `cargo test --benches` runs each once, small, as a smoke test):
//! - `gzip bomb, metrics` / `gzip bomb, logs`: 50 concurrent senders of ~15 KB gzip bodies that
//!   inflate to ~7.4 MB of tiny gauge points or log records (more items than a request may hold).
//! - `under the item cap, metrics` / `..., logs`: 50 concurrent senders of gzip bodies holding just
//!   under `max_items_per_request` tiny items each: the most a request may make the daemon decode.
//! - `500 exporters of 4 MiB`: 500 concurrent senders of 4 MiB protobuf trace exports.
//! - `slowloris`: 3,000 connections that send headers and 1 KB of a declared 8 MB body, then stall.
//!
//! For each: peak RSS (VmHWM) of the daemon, the answers by status, and the items acknowledged
//! (in 200 answers, less what `partial_success` rejected) against
//! `canaryd_otlp_accepted_items_total`, which must be equal. With `--bench`, a peak RSS over the
//! budget (`ATTACK_BUDGET_MIB`, default 512, the daemon's default `ingest_memory_bytes`) fails the
//! run. `ATTACK_ROUNDS` (default 4) is how many requests each sender sends.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use canaryd::testdata::{self, TraceShape};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{
    Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, metric, number_data_point,
};
use prost::Message;
use tokio::io::AsyncWriteExt;

#[path = "common/mod.rs"]
mod common;
use common::{peak_rss_kib, rss_kib, start_daemon};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Signal {
    Traces,
    Metrics,
    Logs,
}

impl Signal {
    fn path(self) -> &'static str {
        match self {
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
            Signal::Logs => "/v1/logs",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
            Signal::Logs => "logs",
        }
    }

    /// Items the daemon's answer says it rejected.
    fn rejected_in(self, answer: &[u8]) -> u64 {
        match self {
            Signal::Traces => ExportTraceServiceResponse::decode(answer)
                .ok()
                .and_then(|r| r.partial_success)
                .map_or(0, |p| p.rejected_spans as u64),
            Signal::Metrics => ExportMetricsServiceResponse::decode(answer)
                .ok()
                .and_then(|r| r.partial_success)
                .map_or(0, |p| p.rejected_data_points as u64),
            Signal::Logs => ExportLogsServiceResponse::decode(answer)
                .ok()
                .and_then(|r| r.partial_success)
                .map_or(0, |p| p.rejected_log_records as u64),
        }
    }
}

/// One request body, sent over and over.
struct Payload {
    signal: Signal,
    body: Vec<u8>,
    gzip: bool,
    items: u64,
    inflated_bytes: usize,
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).expect("gzip in memory");
    encoder.finish().expect("gzip in memory")
}

/// `n` tiny gauge points of one metric, one resource.
fn tiny_points(n: usize) -> Payload {
    let points = (0..n)
        .map(|_| NumberDataPoint {
            time_unix_nano: testdata::EPOCH_NS,
            value: Some(number_data_point::Value::AsDouble(1.0)),
            ..NumberDataPoint::default()
        })
        .collect();
    let request = ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(testdata::resource("prod", "bomb", "1")),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: "g".into(),
                    data: Some(metric::Data::Gauge(Gauge { data_points: points })),
                    ..Metric::default()
                }],
                ..ScopeMetrics::default()
            }],
            ..ResourceMetrics::default()
        }],
    };
    let raw = request.encode_to_vec();
    Payload {
        signal: Signal::Metrics,
        body: gzip(&raw),
        gzip: true,
        items: n as u64,
        inflated_bytes: raw.len(),
    }
}

/// `n` tiny log records, one resource.
fn tiny_logs(n: usize) -> Payload {
    let records = (0..n)
        .map(|_| LogRecord {
            time_unix_nano: testdata::EPOCH_NS,
            body: Some(AnyValue {
                value: Some(any_value::Value::StringValue("x".into())),
            }),
            ..LogRecord::default()
        })
        .collect();
    let request = ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(testdata::resource("prod", "bomb", "1")),
            scope_logs: vec![ScopeLogs {
                log_records: records,
                ..ScopeLogs::default()
            }],
            ..ResourceLogs::default()
        }],
    };
    let raw = request.encode_to_vec();
    Payload {
        signal: Signal::Logs,
        body: gzip(&raw),
        gzip: true,
        items: n as u64,
        inflated_bytes: raw.len(),
    }
}

/// A plain protobuf trace export of about `bytes`.
fn big_traces(bytes: usize) -> Payload {
    let per_span = testdata::trace_request(
        &TraceShape {
            apps: 1,
            versions_per_app: 1,
            spans: 100,
            ..TraceShape::default()
        },
        1,
    )
    .encode_to_vec()
    .len()
        / 100;
    let spans = (bytes / per_span.max(1)).max(1);
    let request = testdata::trace_request(
        &TraceShape {
            apps: 4,
            versions_per_app: 2,
            spans,
            ..TraceShape::default()
        },
        7,
    );
    let body = request.encode_to_vec();
    Payload {
        signal: Signal::Traces,
        inflated_bytes: body.len(),
        items: spans as u64,
        body,
        gzip: false,
    }
}

/// What one attack did to one daemon.
#[derive(Debug, Default)]
struct Outcome {
    peak_rss_mib: f64,
    rss_after_mib: f64,
    answers: std::collections::BTreeMap<u16, u64>,
    errors: u64,
    acknowledged: u64,
    accepted: u64,
    seconds: f64,
}

/// `canaryd_otlp_accepted_items_total` of one signal, over both transports.
async fn accepted_items(http: &reqwest::Client, api: &str, signal: Signal) -> anyhow::Result<u64> {
    let text = http.get(format!("{api}/metrics")).send().await?.text().await?;
    let prefix = format!("canaryd_otlp_accepted_items_total{{signal=\"{}\"", signal.name());
    Ok(text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// Senders each sending `payload` `rounds` times, as fast as answered, against a fresh daemon.
async fn flood(payload: &Payload, senders: usize, rounds: usize) -> anyhow::Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let (mut child, addrs) = start_daemon(dir.path(), &[])?;
    let pid = child.id();
    let otlp = format!("http://{}", addrs["otlp_http"].as_str().context("otlp_http")?);
    let api = format!("http://{}", addrs["http"].as_str().context("http")?);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(senders)
        .build()?;
    let started = Instant::now();
    let body = bytes::Bytes::from(payload.body.clone());
    let tasks: Vec<_> = (0..senders)
        .map(|_| {
            let (http, url, body) = (
                http.clone(),
                format!("{otlp}{}", payload.signal.path()),
                body.clone(),
            );
            let (gzip, signal, items) = (payload.gzip, payload.signal, payload.items);
            tokio::spawn(async move {
                let mut seen: Vec<(u16, u64)> = Vec::new();
                let mut errors = 0;
                for _ in 0..rounds {
                    let mut request = http
                        .post(&url)
                        .header("content-type", "application/x-protobuf")
                        .body(body.clone());
                    if gzip {
                        request = request.header("content-encoding", "gzip");
                    }
                    match request.send().await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let answer = response.bytes().await.unwrap_or_default();
                            let acked = if status == 200 {
                                items - signal.rejected_in(&answer).min(items)
                            } else {
                                0
                            };
                            seen.push((status, acked));
                        }
                        Err(_) => errors += 1,
                    }
                }
                (seen, errors)
            })
        })
        .collect();
    let mut outcome = Outcome::default();
    for task in tasks {
        let (seen, errors) = task.await?;
        outcome.errors += errors;
        for (status, acked) in seen {
            *outcome.answers.entry(status).or_default() += 1;
            outcome.acknowledged += acked;
        }
    }
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome.accepted = accepted_items(&http, &api, payload.signal).await?;
    outcome.peak_rss_mib = peak_rss_kib(pid)? as f64 / 1024.0;
    outcome.rss_after_mib = rss_kib(pid)? as f64 / 1024.0;
    child.kill()?;
    child.wait()?;
    Ok(outcome)
}

/// `connections` that send headers and 1 KB of a declared 8 MB body, then stall until the daemon
/// closes them or `hold` passes; reports how many it closed.
async fn slowloris(connections: usize, hold: Duration) -> anyhow::Result<(Outcome, usize)> {
    let dir = tempfile::tempdir()?;
    let (mut child, addrs) = start_daemon(
        dir.path(),
        &["--header-read-timeout-secs", "2", "--request-timeout-secs", "3"],
    )?;
    let pid = child.id();
    let addr = addrs["otlp_http"].as_str().context("otlp_http")?.to_owned();
    let started = Instant::now();
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut stream = tokio::net::TcpStream::connect(&addr).await?;
        let head = format!(
            "POST /v1/traces HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 8388608\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&[0u8; 1024]).await?;
        streams.push(stream);
    }
    let peak_open = rss_kib(pid)? as f64 / 1024.0;
    let deadline = Instant::now() + hold;
    let mut closed = 0;
    for mut stream in streams {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut buf = [0u8; 512];
        // The daemon's answer (408) or its close ends the read; a stream still open at the
        // deadline was not closed.
        let read = tokio::io::AsyncReadExt::read(&mut stream, &mut buf);
        if tokio::time::timeout(left, read).await.is_ok() {
            closed += 1;
        }
    }
    let outcome = Outcome {
        peak_rss_mib: peak_rss_kib(pid)? as f64 / 1024.0,
        rss_after_mib: peak_open,
        seconds: started.elapsed().as_secs_f64(),
        ..Outcome::default()
    };
    child.kill()?;
    child.wait()?;
    Ok((outcome, closed))
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` does not: then this is a smoke run.
    let measuring = std::env::args().any(|a| a == "--bench");
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let budget_mib = env("ATTACK_BUDGET_MIB", 512) as f64;
    let rounds = if measuring { env("ATTACK_ROUNDS", 4) } else { 1 };
    let runtime = tokio::runtime::Runtime::new()?;
    let (bomb_items, under_cap, senders, exporters, big, loris) = if measuring {
        (370_000, 99_000, 50, 500, 4 << 20, 3_000)
    } else {
        (120_000, 20_000, 4, 8, 256 << 10, 50)
    };
    let attacks: Vec<(&str, Payload, usize)> = vec![
        ("gzip bomb, metrics", tiny_points(bomb_items), senders),
        ("gzip bomb, logs", tiny_logs(bomb_items), senders),
        ("under the item cap, metrics", tiny_points(under_cap), senders),
        ("under the item cap, logs", tiny_logs(under_cap), senders),
        ("exporters of 4 MiB", big_traces(big), exporters),
    ];
    println!(
        "attack | senders x requests | body (inflated) | answers | acknowledged = accepted | peak RSS | RSS after | s"
    );
    let mut over = Vec::new();
    for (name, payload, senders) in &attacks {
        let outcome = runtime.block_on(flood(payload, *senders, rounds))?;
        println!(
            "{name} | {senders} x {rounds} | {} KiB ({} KiB, {} items) | {:?}, {} failed | {} = {} | {:.0} MiB | {:.0} MiB | {:.1}",
            payload.body.len() / 1024,
            payload.inflated_bytes / 1024,
            payload.items,
            outcome.answers,
            outcome.errors,
            outcome.acknowledged,
            outcome.accepted,
            outcome.peak_rss_mib,
            outcome.rss_after_mib,
            outcome.seconds,
        );
        if outcome.acknowledged != outcome.accepted {
            bail!(
                "{name}: {} items acknowledged but {} counted as accepted",
                outcome.acknowledged,
                outcome.accepted
            );
        }
        if outcome.peak_rss_mib > budget_mib {
            over.push(format!("{name}: {:.0} MiB", outcome.peak_rss_mib));
        }
    }
    let hold = Duration::from_secs(if measuring { 8 } else { 6 });
    let (outcome, closed) = runtime.block_on(slowloris(loris, hold))?;
    println!(
        "slowloris | {loris} connections | headers + 1 KiB of 8 MiB | {closed} closed by the daemon within {:.0} s | - | {:.0} MiB | {:.0} MiB while open | {:.1}",
        hold.as_secs_f64(),
        outcome.peak_rss_mib,
        outcome.rss_after_mib,
        outcome.seconds
    );
    if closed < loris {
        bail!("slowloris: only {closed} of {loris} stalled connections were closed");
    }
    if outcome.peak_rss_mib > budget_mib {
        over.push(format!("slowloris: {:.0} MiB", outcome.peak_rss_mib));
    }
    if measuring && !over.is_empty() {
        bail!(
            "peak RSS over the {budget_mib:.0} MiB budget: {}",
            over.join("; ")
        );
    }
    Ok(())
}
