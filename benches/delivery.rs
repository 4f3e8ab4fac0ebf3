//! A day of receiver outage with 100,000 events queued: nothing is lost, and ingest does not slow.
//!
//! The whole daemon runs in this process (`Daemon::start_with_clock`), its dispatcher on a
//! `ManualClock`: a driver moves that clock to the next moment the subscription's worker waits
//! for, whenever the worker is waiting, so each retry, parking and re-try that a day of wall time
//! would bring is made (against a real HTTP receiver, each recorded in the store), only without
//! the waits between them. Everything else (requests, sled, the engine, ingest) runs in real
//! time. Compressing the day this way crowds its retries into seconds, so it loads the daemon far
//! more than the same day in wall time would: a conservative test of "does not slow ingest".
//!
//! Workload: a data dir holding one webhook subscription and `DELIVERY_EVENTS` (100,000) stored
//! `canaryd.canary.failed` events, each with its outbox entry (written through the store, as the
//! emitter writes them), not yet attempted, then `DELIVERY_BEYOND` (10,000) events the
//! subscription does not want, all under the daemon's default history cap (`max_events`,
//! 100,000): the oldest 10,000 queued events have left the history before the outage starts and
//! must be delivered all the same. The receiver answers 503 to everything for
//! `DELIVERY_OUTAGE_HOURS` (24) of the dispatcher's clock, then 204. Meanwhile `INGEST_SENDERS`
//! (4) tasks send OTLP/HTTP trace exports (512 spans, 10 attributes, 64 distinct requests cycled),
//! each waiting for its answer before sending again; spans accepted per second and the time from
//! an export to its answer (p50, p99) are taken in five phases:
//! 1. `reference: empty outbox`: a daemon with no subscription, for `INGEST_SECONDS` (10);
//! 2. `full outbox, idle`: the outage daemon with its 100k queued, the clock standing still;
//! 3. `full outbox, outage`: while the driver runs the day;
//! 4. `draining after the outage`: while the 100k are delivered (parked ones whose retry window
//!    ended during the day are re-driven through the API, as an operator would);
//! 5. `reference again: empty outbox`: a fresh daemon after the others stopped.
//!
//! Nothing may be lost: the receiver must have accepted every one of the 100,000 event ids, and
//! the daemon's outbox and parked deliveries must be empty at the end, or the run fails.
//!
//! `cargo bench --bench delivery` measures; `cargo test --benches` runs it small (300 events, 150
//! of them past a history of 200, two hours of outage with a one-hour retry window, so the
//! re-drive path runs too) as a smoke test.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use canaryd::act::clock::{Clock, ManualClock};
use canaryd::act::delivery::DeliveryConfig;
use canaryd::config::{Config, RawConfig};
use canaryd::daemon::{BoundAddrs, Daemon};
use canaryd::events::{Action, Event, EventData, EventType, Reason, event_seq};
use canaryd::store::{Kind, Store, StoreCounters, Subscription};
use canaryd::testdata::{self, TraceShape};
use prost::Message;
use tokio_util::sync::CancellationToken;

/// Spans in each generated export.
const SPANS_PER_REQUEST: u64 = 512;

/// The daemon's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What a run is made of.
struct Plan {
    events: usize,
    /// The daemon's `max_events`: the history's cap.
    history: usize,
    /// Events nobody subscribed to, stored after the queued ones: they push the oldest queued
    /// events out of the history, which must still deliver them.
    beyond: usize,
    outage: Duration,
    max_age_hours: u64,
    senders: usize,
    /// How long the phases without a driver (reference, queued idle) ingest.
    steady: Duration,
}

/// A webhook receiver on loopback that refuses everything while down, and counts what it took.
#[derive(Clone, Default)]
struct Receiver {
    up: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    accepted: Arc<Mutex<HashSet<String>>>,
    duplicates: Arc<AtomicU64>,
}

impl Receiver {
    async fn start(&self) -> anyhow::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let state = self.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let state = state.clone();
                async move {
                    state.requests.fetch_add(1, Ordering::Relaxed);
                    if !state.up.load(Ordering::Acquire) {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let id = headers
                        .get("webhook-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let mut accepted = state.accepted.lock().unwrap_or_else(|p| p.into_inner());
                    if !accepted.insert(id) {
                        state.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(url)
    }

    /// How many of `ids` it accepted.
    fn accepted_of(&self, ids: &HashSet<String>) -> usize {
        let accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        ids.iter().filter(|id| accepted.contains(*id)).count()
    }

    fn accepted_any(&self) -> bool {
        !self.accepted.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }
}

/// A daemon on port 0 in `data_dir`, with delivery on `clock`.
async fn start_daemon(
    data_dir: &std::path::Path,
    plan: &Plan,
    clock: Clock,
) -> anyhow::Result<(Daemon, BoundAddrs)> {
    let any_port = Some("127.0.0.1:0".parse()?);
    let raw = RawConfig {
        data_dir: Some(data_dir.to_owned()),
        otlp_grpc_addr: any_port,
        otlp_http_addr: any_port,
        http_addr: any_port,
        max_events: Some(plan.history),
        delivery_max_age_hours: Some(plan.max_age_hours),
        log: Some("error".into()),
        ..RawConfig::default()
    };
    let config = Config::resolve(raw)?;
    let daemon = Daemon::start_with_clock(config, clock).await?;
    let addrs = daemon.addrs();
    Ok((daemon, addrs))
}

/// Writes the subscription, its `plan.events` queued events and `plan.beyond` events it does not
/// want into a new data dir, under the history's cap; the subscription's id and the queued ids.
fn queue_events(data_dir: &std::path::Path, url: &str, plan: &Plan) -> anyhow::Result<(String, Vec<String>)> {
    let store = Store::open(data_dir, 64 << 20, StoreCounters::default())?;
    let id = "sub_outage".to_owned();
    store.put_subscription(&Subscription {
        id: id.clone(),
        url: url.to_owned(),
        events: vec![EventType::CanaryFailed],
        kind: Kind::Webhook,
        secret: canaryd::act::subscriptions::generate_secret()?,
        created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        disabled: None,
    })?;
    let mut ids = Vec::with_capacity(plan.events);
    for chunk in (0..plan.events).collect::<Vec<_>>().chunks(1_000) {
        let mut events: Vec<Event> = chunk.iter().map(|&i| failed_event(i)).collect();
        store.append_events(&mut events, plan.history)?;
        ids.extend(events.into_iter().map(|e| e.id));
    }
    for chunk in (0..plan.beyond).collect::<Vec<_>>().chunks(1_000) {
        let mut events: Vec<Event> = chunk
            .iter()
            .map(|&i| {
                let mut event = failed_event(i);
                event.event_type = EventType::AnomalyDetected;
                event
            })
            .collect();
        store.append_events(&mut events, plan.history)?;
    }
    Ok((id, ids))
}

/// A `canary.failed` of one of 100 apps, as the judge writes them.
fn failed_event(i: usize) -> Event {
    let app = format!("app-{}", i % 100);
    Event::new(
        EventType::CanaryFailed,
        EventData {
            env: "prod".into(),
            app: app.clone(),
            stable_version: Some("1.0.0".into()),
            canary_version: Some("2.0.0".into()),
            version: Some("2.0.0".into()),
            stage: None,
            state: "failing".into(),
            score: Some(12.5),
            detected_at: "2026-01-05T10:02:13.120000000Z".into(),
            reasons: vec![Reason {
                feature: "error_ratio".into(),
                operation: Some("GET /orders".into()),
                test: "binomial".into(),
                canary_value: 0.08,
                baseline_value: 0.001,
                statistic: 9.1,
                threshold: 3.5,
                message: "errors 8.0% vs 0.1% on the stable (p < 1e-6)".into(),
            }],
            action: Some(Action {
                kind: "set_weight".into(),
                app,
                version: "2.0.0".into(),
                weight: 0,
            }),
            dry_run: false,
            approval: None,
            next_env: None,
            traffic: None,
            cause: None,
            levers: None,
        },
    )
}

/// Trace exports to cycle through, encoded once.
fn requests() -> Arc<Vec<Bytes>> {
    Arc::new(
        (0..64u64)
            .map(|i| {
                let shape = TraceShape {
                    start_ns: testdata::EPOCH_NS + i * 5_000_000_000,
                    ..TraceShape::default()
                };
                Bytes::from(testdata::trace_request(&shape, i).encode_to_vec())
            })
            .collect(),
    )
}

/// What ingest did over one phase.
struct Phase {
    spans_per_s: f64,
    /// Answered with something other than 2xx, or not answered.
    failed: u64,
    /// Time from sending an export to its answer.
    ack_p50: Duration,
    ack_p99: Duration,
    seconds: f64,
}

impl Phase {
    /// Prints the phase as a row of the table.
    fn row(&self, name: &str, note: &str) {
        println!(
            "| {name} | {:.0} k | {:.1} ms | {:.1} ms | {} | {note} |",
            self.spans_per_s / 1_000.0,
            self.ack_p50.as_secs_f64() * 1_000.0,
            self.ack_p99.as_secs_f64() * 1_000.0,
            self.failed,
        );
    }
}

/// Spans accepted, failed requests and each answered request's time to its answer, by `senders`
/// tasks sending to `addrs`, each waiting for its answer before sending again, until `stop`.
async fn ingest(addrs: BoundAddrs, senders: usize, stop: CancellationToken) -> (u64, u64, Vec<Duration>) {
    let requests = requests();
    let url = format!("http://{}/v1/traces", addrs.otlp_http);
    let mut tasks = tokio::task::JoinSet::new();
    for sender in 0..senders {
        let (requests, url, stop) = (requests.clone(), url.clone(), stop.clone());
        tasks.spawn(async move {
            let client = reqwest::Client::new();
            let (mut spans, mut failed, mut acks) = (0u64, 0u64, Vec::new());
            let mut i = sender;
            while !stop.is_cancelled() {
                let body = requests[i % requests.len()].clone();
                i += senders;
                let sent_at = Instant::now();
                let sent = client
                    .post(&url)
                    .header("content-type", "application/x-protobuf")
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => {
                        acks.push(sent_at.elapsed());
                        spans += SPANS_PER_REQUEST;
                    }
                    _ => failed += 1,
                }
            }
            (spans, failed, acks)
        });
    }
    let (mut spans, mut failed, mut acks) = (0, 0, Vec::new());
    while let Some(done) = tasks.join_next().await {
        if let Ok((s, f, a)) = done {
            spans += s;
            failed += f;
            acks.extend(a);
        }
    }
    (spans, failed, acks)
}

/// The `q` quantile of `values` (sorted here); zero when there are none.
fn quantile(values: &mut [Duration], q: f64) -> Duration {
    values.sort_unstable();
    let last = values.len().saturating_sub(1);
    values
        .get((last as f64 * q).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// Ingest while `work` runs: the phase's figures, and what `work` returned.
async fn ingest_during<T>(
    addrs: BoundAddrs,
    senders: usize,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(Phase, T)> {
    let stop = CancellationToken::new();
    let load = tokio::spawn(ingest(addrs, senders, stop.clone()));
    let started = Instant::now();
    let result = work.await;
    let seconds = started.elapsed().as_secs_f64();
    stop.cancel();
    let (spans, failed, mut acks) = load.await?;
    let phase = Phase {
        spans_per_s: spans as f64 / seconds,
        failed,
        ack_p50: quantile(&mut acks, 0.50),
        ack_p99: quantile(&mut acks, 0.99),
        seconds,
    };
    Ok((phase, result?))
}

/// Ingest for `plan.steady` of wall time: the measurement window of a phase without a driver.
async fn steady(addrs: BoundAddrs, plan: &Plan) -> anyhow::Result<Phase> {
    let window = plan.steady;
    let (phase, ()) = ingest_during(addrs, plan.senders, async move {
        tokio::time::sleep(window).await;
        Ok(())
    })
    .await?;
    Ok(phase)
}

/// Moves `clock` to each moment the worker waits for, until it would pass `until`.
async fn run_clock_until(clock: &ManualClock, until: u64) -> anyhow::Result<u64> {
    let mut steps = 0;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(120), clock.idle(1))
            .await
            .context("the delivery worker did not come back to the clock within 2 minutes")?
            .unwrap_or(until);
        if next >= until {
            clock.set(until);
            return Ok(steps);
        }
        clock.set(next);
        steps += 1;
    }
}

/// Drives the clock until the receiver holds every id in `queued`, re-driving through the API
/// parked deliveries whose retry window is over once nothing else is left to try; how many were
/// re-driven.
async fn recover(
    clock: &ManualClock,
    receiver: &Receiver,
    queued: &HashSet<String>,
    api: &str,
    subscription: &str,
) -> anyhow::Result<usize> {
    let http = reqwest::Client::new();
    let quiet_for = Duration::from_secs(16 * 60).as_millis() as u64;
    let mut redriven = 0;
    let mut last_count = 0;
    let mut last_progress = clock.now_ms();
    loop {
        let count = receiver.accepted_of(queued);
        if count == queued.len() {
            return Ok(redriven);
        }
        if count > last_count {
            (last_count, last_progress) = (count, clock.now_ms());
        }
        // Longer than the longest backoff without a delivery: what is left waits for a re-drive.
        if clock.now_ms() - last_progress > quiet_for {
            let answer: serde_json::Value = http
                .post(format!(
                    "{api}/api/v1/subscriptions/{subscription}/deliveries/redrive"
                ))
                .send()
                .await?
                .json()
                .await?;
            let n = answer["redriven"].as_u64().context("redriven")? as usize;
            if n == 0 {
                bail!(
                    "{} of {} delivered, and nothing left to re-drive",
                    count,
                    queued.len()
                );
            }
            redriven += n;
            last_progress = clock.now_ms();
        }
        let next = tokio::time::timeout(Duration::from_secs(600), clock.idle(1))
            .await
            .context("the delivery worker did not come back to the clock within 10 minutes")?
            .context("the worker waits for a time")?;
        clock.set(next);
    }
}

/// Ingest into a daemon with no subscription and an empty outbox: the reference.
async fn reference(plan: &Plan) -> anyhow::Result<Phase> {
    let dir = tempfile::tempdir()?;
    let (daemon, addrs) = start_daemon(dir.path(), plan, Clock::System).await?;
    let stop = daemon.shutdown_token();
    let running = tokio::spawn(daemon.run_until_stopped());
    let phase = steady(addrs, plan).await?;
    stop.cancel();
    running.await??;
    Ok(phase)
}

async fn run(plan: Plan) -> anyhow::Result<()> {
    println!(
        "workload: {} queued canary.failed events and {} more nobody wants, history cap {}; {} h of receiver \
         outage (503) on the dispatcher's clock, retry window {} h, park after {} s; ingest: {} OTLP/HTTP \
         senders of {SPANS_PER_REQUEST}-span exports, {:.0} s a steady phase",
        plan.events,
        plan.beyond,
        plan.history,
        plan.outage.as_secs() / 3_600,
        plan.max_age_hours,
        DeliveryConfig::default().park_after.as_secs(),
        plan.senders,
        plan.steady.as_secs_f64(),
    );
    println!("| phase | spans/s accepted | ack p50 | ack p99 | failed requests | delivery |");
    println!("|---|---|---|---|---|---|");
    reference(&plan)
        .await?
        .row("reference: empty outbox", "no subscription");

    let receiver = Receiver::default();
    let url = receiver.start().await?;
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let queued_at = Instant::now();
    let (subscription, ids) = queue_events(&data_dir, &url, &plan)?;
    let queued: HashSet<String> = ids.iter().cloned().collect();
    if queued.len() != plan.events || ids.iter().any(|id| event_seq(id).is_none()) {
        bail!("queued {} distinct events of {}", queued.len(), plan.events);
    }
    let queued_s = queued_at.elapsed().as_secs_f64();

    let start_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let clock = ManualClock::new(start_ms);
    let (daemon, addrs) = start_daemon(&data_dir, &plan, Clock::Manual(clock.clone())).await?;
    let stop = daemon.shutdown_token();
    let running = tokio::spawn(daemon.run_until_stopped());
    let api = format!("http://{}", addrs.http);
    let depth = metric(&api, "canaryd_outbox_depth").await?;
    steady(addrs, &plan).await?.row(
        "full outbox, idle",
        &format!(
            "{depth:.0} queued (written in {queued_s:.1} s), {} of them past the history's cap of {}; \
             the clock standing still",
            (plan.events + plan.beyond)
                .saturating_sub(plan.history)
                .min(plan.events),
            plan.history
        ),
    );

    let outage_end = start_ms + plan.outage.as_millis() as u64;
    let before = receiver.requests.load(Ordering::Relaxed);
    let (phase, steps) = ingest_during(addrs, plan.senders, run_clock_until(&clock, outage_end)).await?;
    let attempts = receiver.requests.load(Ordering::Relaxed) - before;
    let (parked, over) = parked_now(&api, &subscription).await?;
    phase.row(
        "full outbox, outage",
        &format!(
            "the {} h in {:.1} s: {attempts} attempts refused, {steps} clock steps; {parked} parked at its end, \
             {over} of them with their retry window over",
            plan.outage.as_secs() / 3_600,
            phase.seconds,
        ),
    );
    if receiver.accepted_any() {
        bail!("the receiver accepted something while down");
    }

    receiver.up.store(true, Ordering::Release);
    let recovered_at = clock.now_ms();
    let (phase, redriven) = ingest_during(
        addrs,
        plan.senders,
        recover(&clock, &receiver, &queued, &api, &subscription),
    )
    .await?;
    let delivered = receiver.accepted_of(&queued);
    let (depth, parked_left) = (
        metric(&api, "canaryd_outbox_depth").await?,
        metric(&api, "canaryd_deliveries_parked").await?,
    );
    phase.row(
        "draining after the outage",
        &format!(
            "{delivered} of {} delivered in {:.1} s ({:.0} min on the dispatcher's clock), {redriven} of them \
             re-driven through the API, {} twice; outbox {depth:.0}, parked {parked_left:.0} after",
            plan.events,
            phase.seconds,
            (clock.now_ms() - recovered_at) as f64 / 60_000.0,
            receiver.duplicates.load(Ordering::Relaxed)
        ),
    );
    stop.cancel();
    running.await??;
    if delivered != plan.events || depth != 0.0 || parked_left != 0.0 {
        bail!(
            "{delivered} of {} delivered; outbox {depth}, parked {parked_left}",
            plan.events
        );
    }

    reference(&plan)
        .await?
        .row("reference again: empty outbox", "no subscription");
    Ok(())
}

/// One unlabelled sample of the daemon's /metrics.
async fn metric(api: &str, name: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{api}/metrics")).await?.text().await?;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .with_context(|| format!("no {name} in /metrics"))
}

/// The subscription's parked deliveries now: how many, and how many are no longer retried.
async fn parked_now(api: &str, subscription: &str) -> anyhow::Result<(usize, usize)> {
    let listed: serde_json::Value = reqwest::get(format!(
        "{api}/api/v1/subscriptions/{subscription}/deliveries?state=parked"
    ))
    .await?
    .json()
    .await?;
    let parked = listed["deliveries"].as_array().context("deliveries")?;
    let over = parked.iter().filter(|d| d["next_retry"].is_null()).count();
    Ok((parked.len(), over))
}

/// The daemon's default `max_events`.
fn default_max_events() -> anyhow::Result<usize> {
    let defaults = RawConfig::defaults()?;
    defaults.max_events.context("max_events has a default")
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
    let plan = if measuring {
        Plan {
            events: env("DELIVERY_EVENTS", 100_000) as usize,
            history: default_max_events()?,
            beyond: env("DELIVERY_BEYOND", 10_000) as usize,
            outage: Duration::from_secs(env("DELIVERY_OUTAGE_HOURS", 24) * 3_600),
            max_age_hours: 24,
            senders: env("INGEST_SENDERS", 4) as usize,
            steady: Duration::from_secs(env("INGEST_SECONDS", 10)),
        }
    } else {
        Plan {
            events: 300,
            history: 200,
            beyond: 50,
            outage: Duration::from_secs(2 * 3_600),
            max_age_hours: 1,
            senders: 2,
            steady: Duration::from_secs(1),
        }
    };
    tokio::runtime::Runtime::new()?.block_on(run(plan))
}
