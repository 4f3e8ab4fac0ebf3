//! Memory and disk per tracked series, and the time to restart: the release daemon in its own
//! process is fed apps until it holds a target number of feature baselines (series), then its
//! resident memory, the engine's own accounting and the sled folder are read, and it is stopped
//! and started again on the same data, timing the stop and the start until it is ready.
//!
//! Apps come in groups of `GROUP` (each group in its own env, two versions, eight operations, a
//! downstream per request), with 140 s of event time each so that two windows close and every
//! feature gets a baseline. `cargo bench --bench series` measures 1k, 10k and 100k series
//! (`SERIES_SIZES=1000,10000` to choose); `cargo test --benches` runs one small size as a smoke test.
//! `SERIES_VERSIONS=1` gives each app one version, so that no app is under analysis;
//! `SERIES_ANALYSED_EVERY=10` puts the apps of one group in ten under analysis, the others one
//! version each (a fleet with a tenth of its apps rolling out).
//! `SERIES_EVENT_SECS` sets the event time each app sends (140 s by default; 700 for the steady
//! state of an analysis's history, which keeps 600 s).
//! `SERIES_NO_RESTART=1` leaves out the stop and restart and kills the daemon once read, for a
//! heap profile (`benches/heap/profile.sh`).
//! `SERIES_FLUSH_SECS` sets the daemon's flush interval (1 s by default, so that the bench
//! settles quickly; the daemon's default is 10).
//! `SERIES_STALL=1` adds a phase once the daemon is filled: every group sends 60 s more event
//! time (a window closes and every baseline learns), while a probe reads one app's baselines
//! through the engine's queue every 5 ms, until two flushes after the engine took the last
//! export: how long the engine keeps an answer waiting while the store is written, at this
//! many series (the probe's latency, p50, p99 and max), and what each flush took
//! (`canaryd_store_flush_seconds`).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use canaryd::testdata::{self, TraceShape};

#[path = "common/mod.rs"]
mod common;
use common::{dir_bytes, sample, settled_rss_kib, start_daemon};

/// Apps per group of exports.
const GROUP: usize = 20;
/// Event time between a group's exports.
const STEP_SECS: u64 = 5;

/// The daemon's flush interval (`SERIES_FLUSH_SECS`, 1 s by default).
fn flush_secs() -> u64 {
    common::env_number("SERIES_FLUSH_SECS", 1.., 1)
}

/// Exports per group (`SERIES_EVENT_SECS` of event time, 140 by default: two windows closed).
/// An analysis keeps its history for the model's longest window (600 s by default), so its
/// steady state needs at least that much: `SERIES_EVENT_SECS=700`.
fn steps() -> u64 {
    common::env_number("SERIES_EVENT_SECS", 2 * STEP_SECS.., 140) / STEP_SECS
}

struct Daemon {
    child: std::process::Child,
    http: String,
    otlp_http: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(data: &std::path::Path) -> anyhow::Result<Daemon> {
    // Every group reuses the same service names in its own environment: the caps on apps and on
    // environments per service name are raised past what the sizes need, and the memory budget is
    // off, so that every series stays in memory to be measured.
    let (child, addrs) = start_daemon(
        data,
        &[
            "--max-apps",
            "100000",
            "--max-envs-per-app",
            "100000",
            "--max-baseline-memory-bytes",
            "0",
            "--flush-interval-secs",
            &flush_secs().to_string(),
        ],
    )?;
    let addr = |k: &str| addrs[k].as_str().map(str::to_owned).context("address");
    Ok(Daemon {
        child,
        http: addr("http")?,
        otlp_http: addr("otlp_http")?,
    })
}

/// The daemon's /metrics.
async fn metrics_text(client: &reqwest::Client, daemon: &Daemon) -> anyhow::Result<String> {
    common::metrics_text(client, &format!("http://{}", daemon.http)).await
}

/// One sample of `text`, or an error naming it.
fn sample_of(text: &str, series: &str) -> anyhow::Result<f64> {
    sample(text, series).with_context(|| format!("no {series} in /metrics"))
}

/// One sample of the daemon's /metrics.
async fn metric(client: &reqwest::Client, daemon: &Daemon, series: &str) -> anyhow::Result<f64> {
    common::metric(client, &format!("http://{}", daemon.http), series).await
}

/// Versions each app runs (`SERIES_VERSIONS`, 2 by default): with two, every app is under
/// analysis (its worst case, the judge's history and evidence beside the baselines); with one,
/// a fleet where no canary is out.
fn versions_per_app() -> usize {
    common::env_number("SERIES_VERSIONS", 1..=4, 2)
}

/// Versions the apps of `group` run: `versions_per_app`, unless `SERIES_ANALYSED_EVERY=n` is
/// set, a fleet mid-rollout: then the apps of every `n`th group (the last of each `n`, so that
/// the first group, which sizes the run, is not one of them) run two versions, under analysis,
/// and the others one.
fn versions_of_group(group: usize) -> usize {
    match std::env::var("SERIES_ANALYSED_EVERY")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(n) if n > 0 => {
            if group % n == n - 1 {
                2
            } else {
                1
            }
        }
        _ => versions_per_app(),
    }
}

/// Sends one group of apps (in env `g<group>`), every export in event-time order.
async fn feed_group(client: &reqwest::Client, daemon: &Daemon, group: usize) -> anyhow::Result<u64> {
    feed_group_steps(client, daemon, group, 0..steps()).await
}

/// Sends the exports `steps` of one group.
async fn feed_group_steps(
    client: &reqwest::Client,
    daemon: &Daemon,
    group: usize,
    steps: std::ops::Range<u64>,
) -> anyhow::Result<u64> {
    let versions = versions_of_group(group);
    let sent = steps.end - steps.start;
    for step in steps {
        let shape = TraceShape {
            env: format!("g{group}"),
            apps: GROUP,
            versions_per_app: versions,
            operations: 8,
            spans: GROUP * versions * 40,
            start_ns: testdata::EPOCH_NS + step * STEP_SECS * 1_000_000_000,
            request_gap_ns: 250_000_000,
            ..TraceShape::default()
        };
        let request = testdata::trace_request(&shape, (group as u64) << 16 | step);
        common::post_traces(
            client,
            &format!("http://{}/v1/traces", daemon.otlp_http),
            &request,
        )
        .await?;
    }
    Ok(sent)
}

/// What the probe saw while every group sent more (`SERIES_STALL`).
struct Stall {
    probes: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    flushes: f64,
    flush_mean_s: f64,
}

/// Every group sends `STALL_STEPS` more exports while a probe reads one app's baselines through
/// the engine's queue; the probe goes on until two flushes after the engine took the last one.
async fn stall(client: &reqwest::Client, daemon: &Daemon, groups: usize, sent: u64) -> anyhow::Result<Stall> {
    const STALL_STEPS: u64 = 12;
    let before = metrics_text(client, daemon).await?;
    let flushes_before = sample_of(&before, "canaryd_store_flush_seconds_count")?;
    let flush_sum_before = sample_of(&before, "canaryd_store_flush_seconds_sum")?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let (client, stop) = (client.clone(), stop.clone());
        let url = format!("http://{}/api/v1/apps/app-0/baseline?env=g0", daemon.http);
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let status = client.get(&url).send().await?.status();
                if !status.is_success() {
                    bail!("the probe's read answered {status}");
                }
                latencies.push(started.elapsed().as_secs_f64() * 1e3);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, anyhow::Error>(latencies)
        })
    };
    let mut sent = sent;
    for group in 0..groups {
        sent += feed_group_steps(client, daemon, group, steps()..steps() + STALL_STEPS).await?;
    }
    settle(client, daemon, sent).await?;
    settle(client, daemon, sent).await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut latencies = probe.await??;
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    let after = metrics_text(client, daemon).await?;
    let flushes = sample_of(&after, "canaryd_store_flush_seconds_count")? - flushes_before;
    let flush_sum = sample_of(&after, "canaryd_store_flush_seconds_sum")? - flush_sum_before;
    Ok(Stall {
        probes: latencies.len(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: at(1.0),
        flushes,
        flush_mean_s: flush_sum / flushes.max(1.0),
    })
}

/// Waits until the engine has taken every export sent and a flush has followed.
async fn settle(client: &reqwest::Client, daemon: &Daemon, sent: u64) -> anyhow::Result<()> {
    common::settle(client, &format!("http://{}", daemon.http), sent as f64, 1.0).await
}

struct Row {
    series: f64,
    rss_mib: f64,
    rss_per_series: f64,
    /// RSS per series of the daemon started again on the same data, once every baseline is back.
    restarted_per_series: f64,
    engine_per_series: f64,
    /// The engine's own estimates of its open buckets and analyses' history, per series.
    buckets_per_series: f64,
    analyses_per_series: f64,
    /// The long windows' merges of blocks the analyses keep for their next look, per series.
    merges_per_series: f64,
    /// The analyses' sequential evidence, last look's checks and failing streaks, per series.
    evidence_per_series: f64,
    sled_mib: f64,
    sled_per_series: f64,
    stop_s: f64,
    ready_s: f64,
}

/// The row of `target` series; none when the stall phase was measured instead.
async fn measure(target: usize) -> anyhow::Result<Option<Row>> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let client = reqwest::Client::new();
    let daemon = start(&data)?;
    let rss_before = settled_rss_kib(daemon.child.id())?;
    let mut sent = feed_group(&client, &daemon, 0).await?;
    settle(&client, &daemon, sent).await?;
    let per_group = metric(&client, &daemon, "canaryd_baselines").await?.max(1.0);
    let groups = (target as f64 / per_group).ceil().max(1.0) as usize;
    for group in 1..groups {
        sent += feed_group(&client, &daemon, group).await?;
    }
    settle(&client, &daemon, sent).await?;
    if std::env::var_os("SERIES_STALL").is_some() {
        let stall = stall(&client, &daemon, groups, sent).await?;
        println!(
            "stall ({:.0} series, flush every {} s): {} probes, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} flushes written, {:.3} s each on average",
            metric(&client, &daemon, "canaryd_baselines").await?,
            flush_secs(),
            stall.probes,
            stall.p50_ms,
            stall.p99_ms,
            stall.max_ms,
            stall.flushes,
            stall.flush_mean_s
        );
        return Ok(None);
    }
    let text = metrics_text(&client, &daemon).await?;
    let series = sample_of(&text, "canaryd_baselines")?;
    let engine_bytes = sample_of(&text, "canaryd_baseline_memory_bytes")?;
    let bucket_bytes = sample_of(&text, "canaryd_engine_memory_bytes{part=\"buckets\"}")?;
    let analysis_bytes = sample_of(&text, "canaryd_engine_memory_bytes{part=\"analyses\"}")?;
    let merge_bytes = sample_of(&text, "canaryd_engine_memory_bytes{part=\"analysis_merges\"}")?;
    // NaN from a build before the evidence was estimated (`CANARYD_BIN`, to compare builds).
    let evidence_bytes =
        sample_of(&text, "canaryd_engine_memory_bytes{part=\"analysis_evidence\"}").unwrap_or(f64::NAN);
    let rss = settled_rss_kib(daemon.child.id())?;
    let sled = dir_bytes(&data) as f64;
    let row = |restarted_per_series: f64, stop_s: f64, ready_s: f64| Row {
        series,
        rss_mib: rss as f64 / 1024.0,
        rss_per_series: (rss.saturating_sub(rss_before) as f64 * 1024.0) / series,
        restarted_per_series,
        engine_per_series: engine_bytes / series,
        buckets_per_series: bucket_bytes / series,
        analyses_per_series: analysis_bytes / series,
        merges_per_series: merge_bytes / series,
        evidence_per_series: evidence_bytes / series,
        sled_mib: sled / (1024.0 * 1024.0),
        sled_per_series: sled / series,
        stop_s,
        ready_s,
    };
    if std::env::var_os("SERIES_NO_RESTART").is_some() {
        // Killed where it stands, neither stopped nor started again: a heap profiler then
        // reports what was live as never freed (benches/heap/profile.sh).
        return Ok(Some(row(f64::NAN, f64::NAN, f64::NAN)));
    }

    // Stop (SIGTERM: drain and flush), then start on the same data until ready.
    let mut daemon = daemon;
    let stopping = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &daemon.child.id().to_string()])
        .status()?;
    daemon.child.wait()?;
    let stop_s = stopping.elapsed().as_secs_f64();
    drop(daemon);
    let starting = Instant::now();
    let again = start(&data)?;
    let ready_s = starting.elapsed().as_secs_f64();
    // The gauge is set at each flush (every second here).
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&client, &again, "canaryd_store_flushes_total").await? < 1.0 {
        if Instant::now() > deadline {
            bail!("no flush after the restart");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restored = metric(&client, &again, "canaryd_baselines").await?;
    if restored < series {
        bail!("restart restored {restored} of {series} baselines");
    }
    // What the state read back from the store holds, without the history that only live
    // traffic builds.
    let restarted_rss = settled_rss_kib(again.child.id())?;
    Ok(Some(row(
        (restarted_rss.saturating_sub(rss_before) as f64 * 1024.0) / series,
        stop_s,
        ready_s,
    )))
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` does not: then this is a smoke run.
    let measuring = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<usize> = if measuring {
        std::env::var("SERIES_SIZES")
            .ok()
            .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![1_000, 10_000, 100_000])
    } else {
        vec![300]
    };
    let runtime = tokio::runtime::Runtime::new()?;
    println!(
        "{:>8} {:>9} {:>11} {:>13} {:>12} {:>13} {:>14} {:>12} {:>14} {:>9} {:>11} {:>7} {:>8}",
        "series",
        "RSS MiB",
        "RSS B/ser",
        "restart B/ser",
        "engine B/ser",
        "buckets B/ser",
        "analyses B/ser",
        "merges B/ser",
        "evidence B/ser",
        "sled MiB",
        "sled B/ser",
        "stop s",
        "ready s"
    );
    for target in sizes {
        let Some(row) = runtime.block_on(measure(target))? else {
            continue;
        };
        println!(
            "{:>8.0} {:>9.1} {:>11.0} {:>13.0} {:>12.0} {:>13.0} {:>14.0} {:>12.0} {:>14.0} {:>9.1} {:>11.0} {:>7.2} {:>8.2}",
            row.series,
            row.rss_mib,
            row.rss_per_series,
            row.restarted_per_series,
            row.engine_per_series,
            row.buckets_per_series,
            row.analyses_per_series,
            row.merges_per_series,
            row.evidence_per_series,
            row.sled_mib,
            row.sled_per_series,
            row.stop_s,
            row.ready_s
        );
        if row.series < target as f64 * 0.9 {
            bail!("reached {} series of {target}", row.series);
        }
    }
    Ok(())
}
