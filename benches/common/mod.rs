//! What the benchmarks that drive the daemon binary share: starting it, and reading its CPU time
//! and memory from /proc.

#![allow(dead_code)] // each bench uses its own part of this

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// CPU seconds (user + system) a process has used, from /proc/<pid>/stat.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("no process {pid}"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(") ").context("unexpected /proc/<pid>/stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 =
        fields.get(11).context("utime")?.parse::<f64>()? + fields.get(12).context("stime")?.parse::<f64>()?;
    // The kernel's USER_HZ is 100 on every Linux the project runs on.
    Ok(ticks / 100.0)
}

/// CPU seconds the thread of process `pid` named `name` has used, if there is one.
pub fn thread_cpu_seconds(pid: u32, name: &str) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.flatten().find_map(|task| {
        let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
        if comm.trim_end() != name {
            return None;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        let after = stat.rsplit_once(") ")?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    })
}

/// How many times the process's threads named `name` (every thread, for `None`) have been
/// switched out to wait so far (`voluntary_ctxt_switches`): each is a sleep and a wake-up.
pub fn thread_waits(pid: u32, name: Option<&str>) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for task in tasks.flatten() {
        if let Some(name) = name {
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            if comm.trim_end() != name {
                continue;
            }
        }
        let status = std::fs::read_to_string(task.path().join("status")).ok()?;
        let line = status
            .lines()
            .find(|l| l.starts_with("voluntary_ctxt_switches:"))?;
        total += line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// The number environment variable `name` gives, where it parses and lies in `range`;
/// `default` otherwise (unset, or not a number there).
pub fn env_number<T>(name: &str, range: impl std::ops::RangeBounds<T>, default: T) -> T
where
    T: std::str::FromStr + PartialOrd,
{
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| range.contains(v))
        .unwrap_or(default)
}

/// Peak resident set size of a process, in KiB (VmHWM).
pub fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    Ok(line.split_whitespace().nth(1).context("VmHWM value")?.parse()?)
}

/// Resident set size of a process now, in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

/// The resident set of a process that has gone quiet, in KiB: read every 250 ms until it has not
/// fallen for 1.5 s (the daemon's allocator gives free pages back 100 ms after they were freed, on
/// a purge that runs every second), at most 15 s; the lowest reading.
pub fn settled_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut lowest = rss_kib(pid)?;
    let mut unchanged_for = 0;
    while unchanged_for < 6 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let now = rss_kib(pid)?;
        // Under 0.2% lower counts as not fallen: a page or two comes and goes at any time.
        if now + lowest / 500 < lowest {
            unchanged_for = 0;
        } else {
            unchanged_for += 1;
        }
        lowest = lowest.min(now);
    }
    Ok(lowest)
}

/// Bytes of every file under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Starts `canaryd serve` on port 0 in `data`; returns the child and its addresses.
pub fn start_daemon(data: &Path, extra: &[&str]) -> anyhow::Result<(std::process::Child, serde_json::Value)> {
    // CANARYD_BIN runs another build of the daemon (an earlier commit's, for a before/after).
    let binary = std::env::var("CANARYD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_canaryd").to_owned());
    // A daemon killed on this data dir left its addrs.json: this one's is the one to wait for.
    match std::fs::remove_file(data.join("addrs.json")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).context("cannot remove the last daemon's addrs.json");
        }
        _ => {}
    }
    let child = std::process::Command::new(binary)
        .arg("serve")
        .arg("--data-dir")
        .arg(data)
        .args([
            "--otlp-grpc-addr",
            "127.0.0.1:0",
            "--otlp-http-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .args(["--log", "warn"])
        .args(extra)
        // The bench's own variable, not a daemon setting.
        .env_remove("CANARYD_BIN")
        .stdin(std::process::Stdio::null())
        .spawn()
        .context("cannot start the daemon")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(data.join("addrs.json")) {
            return Ok((child, serde_json::from_str(&text)?));
        }
        if Instant::now() > deadline {
            bail!("the daemon did not write addrs.json");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of one sample in a Prometheus text exposition, by its exact name and labels as
/// exposed (`canaryd_baselines`, `canaryd_engine_memory_bytes{part="buckets"}`).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// Calls `attempt` until it succeeds or `within` has passed; then its last error.
pub async fn eventually_ok<T, F, Fut>(within: Duration, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// `GET /metrics` of the daemon whose API is at `api` (`http://host:port`).
pub async fn metrics_text(http: &reqwest::Client, api: &str) -> anyhow::Result<String> {
    Ok(http.get(format!("{api}/metrics")).send().await?.text().await?)
}

/// One sample of the daemon's /metrics, or an error naming it.
pub async fn metric(http: &reqwest::Client, api: &str, series: &str) -> anyhow::Result<f64> {
    sample(&metrics_text(http, api).await?, series).with_context(|| format!("no {series} in /metrics"))
}

/// Waits until the daemon's engine has taken `batches` batches in all (`canaryd_engine_batches_total`)
/// and `flushes` flushes have ended since (the gauges of its state, `canaryd_baselines` among
/// them, are set at each flush), for at most 10 minutes.
pub async fn settle(http: &reqwest::Client, api: &str, batches: f64, flushes: f64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while metric(http, api, "canaryd_engine_batches_total").await? < batches {
        if Instant::now() > deadline {
            bail!("the engine did not take {batches} batches within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let from = metric(http, api, "canaryd_store_flushes_total").await?;
    while metric(http, api, "canaryd_store_flushes_total").await? < from + flushes {
        if Instant::now() > deadline {
            bail!("{flushes} flushes did not follow within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Posts a trace export, protobuf, to an OTLP/HTTP `/v1/traces` URL; an answer other than a
/// success is an error.
pub async fn post_traces(
    http: &reqwest::Client,
    url: &str,
    request: &opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
) -> anyhow::Result<()> {
    use prost::Message;
    let answer = http
        .post(url)
        .header("content-type", "application/x-protobuf")
        .body(request.encode_to_vec())
        .send()
        .await?;
    if !answer.status().is_success() {
        bail!("a trace export answered {}", answer.status());
    }
    Ok(())
}
