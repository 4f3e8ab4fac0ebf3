//! Delivery: each subscription's outbox, sent in order by a task of its own, with the deliveries
//! that block it parked.
//!
//! When an event is stored, an outbox entry is written for every subscription that wants it, in
//! the same flush, so a delivery exists as soon as the event does and survives restarts. Each
//! subscription has one worker task, so a slow or dead receiver only ever delays itself. A
//! subscription's queue is made of lanes: a webhook's events of one app are one lane, a lever's
//! (`haproxy`, `httproute`) events all one. The worker sends each lane's oldest pending entry
//! (that lane's head), one at a time per lane, so a receiver sees each app's events in order;
//! a webhook's lanes go out side by side, up to `MAX_IN_FLIGHT` at once, so that the decisions
//! one closed second makes for many apps do not wait for one another's round trips, and one
//! app's failing delivery holds back no other app's. While the receiver takes nothing, lanes
//! open one at a time and no more once `MAX_FAILING_LANES` heads are failing, and a backlog is
//! drained one delivery at a time: side by side is for one moment's decisions. A 2xx marks a
//! delivery delivered; a 410 disables the subscription (and drops its pending and parked
//! entries); anything else (another status, a timeout, a refused connection) is retried after an
//! exponential backoff with jitter. Each attempt's record is flushed to disk behind the workers.
//!
//! A head that keeps failing would hold back every later event of its lane (a `canary.failed`
//! included), so once its next retry would come more than `park_after` after its first attempt
//! it is parked: moved off the queue to the store's parked deliveries, and the next event of its
//! lane becomes the head. A parked delivery is never dropped: the same worker retries it on its
//! own backoff, beside head attempts (a lever's taking turns with its head when both are due),
//! until `max_age` after its first attempt; then it stays parked, with no next retry, until the
//! API re-drives it (a new retry window, tried at once). Parked deliveries are out of order by
//! nature; for `haproxy` subscriptions, whose actions set weights, a parked action is skipped as
//! superseded once a later event's action has set the same servers, so an old weight never
//! overwrites a newer one. The event id is the `webhook-id`, the same on every attempt and
//! re-drive, so receivers can de-duplicate.
//!
//! Every time here is the dispatcher's `Clock`: wall time in the daemon, a manual clock in the
//! delivery benchmark.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::clock::Clock;
use super::haproxy;
use super::haproxy_maps::{self, HaproxyMaps};
use super::httproute::{self, HttpRoutes, KubeAccess};
use super::outbound::{GuardedResolver, OutboundAllow, OutboundPolicy};
use super::signing::sign;
use super::subscriptions::{Kind, Subscription, secret_key};
use crate::events::{Event, EventType, LeverOutcome, Reason};
use crate::io::try_blocking;
use crate::stats::Stats;
use crate::store::Store;

pub use crate::store::records::{Delivery, DeliveryState};

/// Delivery settings.
#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryConfig {
    /// Each request's deadline.
    pub timeout: Duration,
    /// How long after its first attempt a delivery is retried (then, parked, it waits for a
    /// re-drive).
    pub max_age: Duration,
    /// How long a delivery may fail at the head of its subscription's queue before it is parked
    /// and the events behind it go on.
    pub park_after: Duration,
    /// Backoff before the first retry; it doubles per attempt up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Where each (env, app, version) is served, for `haproxy` subscriptions.
    pub haproxy_servers: super::haproxy::HaproxyServers,
    /// Where each (env, app)'s route maps are, for `haproxy` subscriptions.
    pub haproxy_maps: super::haproxy_maps::HaproxyMaps,
    /// Which HTTPRoute carries each (env, app)'s route, for `httproute` subscriptions.
    pub httproutes: HttpRoutes,
    /// The token and CA `httproute` subscriptions reach the API server with.
    pub kube_access: KubeAccess,
    /// How often an idle `haproxy` or `httproute` worker compares what it keeps with each app's
    /// latest route.
    pub reconcile_every: Duration,
    /// Restricted targets deliveries may reach all the same (`outbound`).
    pub outbound_allow: OutboundAllow,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            timeout: Duration::from_secs(10),
            max_age: Duration::from_secs(24 * 3_600),
            park_after: Duration::from_secs(180),
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(15 * 60),
            haproxy_servers: super::haproxy::HaproxyServers::default(),
            haproxy_maps: super::haproxy_maps::HaproxyMaps::default(),
            httproutes: HttpRoutes::default(),
            kube_access: KubeAccess::default(),
            reconcile_every: Duration::from_secs(10),
            outbound_allow: OutboundAllow::loopback(),
        }
    }
}

/// The wait before retry number `attempts` (1 = the first retry): exponential, capped, with
/// "equal jitter" (half fixed, half random) so that receivers coming back are not hit in lockstep.
pub fn backoff(attempts: u32, config: &DeliveryConfig, unit_random: f64) -> Duration {
    let exp = config
        .first_backoff
        .saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1).min(30)));
    let capped = exp.min(config.max_backoff);
    capped.mul_f64(0.5 + 0.5 * unit_random.clamp(0.0, 1.0))
}

/// The webhook client could not be built with the outbound policy.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the webhook client (no redirects, checked resolution): {0}")]
pub struct ClientError(reqwest::Error);

/// What happens to a delivery after a failed attempt at `now_ms`, whose next retry would be
/// `wait` later: retried (at the head, or parked), parked, or parked for good. A head is tried
/// for `park_after` from its first attempt, the last time when that is up, then parked. Sets its
/// state and next attempt; the outcome's label for `/metrics`.
fn after_failure(
    delivery: &mut Delivery,
    now_ms: u64,
    wait: Duration,
    config: &DeliveryConfig,
) -> &'static str {
    let first = delivery.first_attempt_ms.unwrap_or(now_ms);
    let next = now_ms.saturating_add(wait.as_millis() as u64);
    let age_then = Duration::from_millis(next.saturating_sub(first));
    if age_then > config.max_age {
        // The retry window is over: kept, parked, for a re-drive.
        delivery.state = DeliveryState::Parked;
        delivery.next_attempt_ms = Delivery::NO_RETRY;
        return "expired";
    }
    delivery.next_attempt_ms = next;
    if delivery.state != DeliveryState::Pending || age_then <= config.park_after {
        return "retry";
    }
    let park_at = first.saturating_add(config.park_after.as_millis() as u64);
    if now_ms < park_at {
        // A last try at the head when its time there is up, rather than parking it early.
        delivery.next_attempt_ms = park_at;
        return "retry";
    }
    delivery.state = DeliveryState::Parked;
    "parked"
}

/// Whether applying `older`'s traffic action now would undo `later`'s: every server it sets, the
/// later one set, and its route (if its app has maps) the later one replaced. (Events without a
/// planned action override nothing.)
fn overridden_by(
    older: &Event,
    later: &Event,
    servers: &haproxy::HaproxyServers,
    maps: &HaproxyMaps,
) -> bool {
    let routed = |event: &Event| matches!(haproxy_maps::plan(event, maps), Some(Ok(_)));
    let (older_routed, older_weighted) = (
        routed(older),
        matches!(haproxy::plan(older, servers), Some(Ok(_))),
    );
    let same_app = older.data.env == later.data.env && older.data.app == later.data.app;
    let maps_overridden = !older_routed || (routed(later) && same_app);
    let weights_overridden = !older_weighted || weights_overridden_by(older, later, servers);
    (older_routed || older_weighted) && maps_overridden && weights_overridden
}

/// The same for an `httproute` subscription: a later route of the same app replaces the rules.
fn route_overridden_by(older: &Event, later: &Event, routes: &HttpRoutes) -> bool {
    let routed = |event: &Event| matches!(httproute::plan(event, routes), Some(Ok(_)));
    routed(older) && routed(later) && older.data.env == later.data.env && older.data.app == later.data.app
}

/// The weights part of `overridden_by`.
fn weights_overridden_by(older: &Event, later: &Event, servers: &haproxy::HaproxyServers) -> bool {
    let servers_of = |event: &Event| -> Option<BTreeSet<(String, String)>> {
        let steps = haproxy::plan(event, servers)?.ok()?;
        Some(
            steps
                .into_iter()
                .map(|(backend, server, _)| (backend, server))
                .collect(),
        )
    };
    match (servers_of(older), servers_of(later)) {
        (Some(older), Some(later)) => older.is_subset(&later),
        _ => false,
    }
}

/// A worker's parked deliveries that are still retried: (next attempt, event sequence number),
/// earliest first.
type Schedule = BTreeSet<(u64, u64)>;

fn schedule_of(parked: &[(u64, Delivery)]) -> Schedule {
    parked
        .iter()
        .filter_map(|(seq, d)| Some((d.next_retry_ms()?, *seq)))
        .collect()
}

/// Which of a subscription's deliveries keep their order among themselves: those of one lane go
/// out one at a time, oldest first; different lanes' go out side by side.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Lane {
    /// A webhook's events of one app (env, app): a receiver sees each app's events in order,
    /// and one app's failing delivery does not hold back another's.
    App(String, String),
    /// Every event of a lever (`haproxy`, `httproute`): its moves are applied in order, one at a
    /// time, parked ones included.
    All,
    /// A webhook's entry whose event could not be read, or its parked delivery (out of order
    /// by nature): it goes on its own.
    Alone(u64),
}

fn lane_of(kind: Kind, seq: u64, event: Option<&Event>) -> Lane {
    if kind.is_lever() {
        return Lane::All;
    }
    match event {
        Some(event) => Lane::App(event.data.env.clone(), event.data.app.clone()),
        None => Lane::Alone(seq),
    }
}

/// How many of a webhook subscription's deliveries may be in flight at once, each of its own
/// lane (a lever's: one).
const MAX_IN_FLIGHT: usize = 8;
/// While a webhook's receiver is not taking deliveries, how many lanes' heads may be failing
/// before no more lanes are opened: two, so that one event the receiver refuses does not stop
/// the others (a second lane is tried beside it), while a receiver that is down sees two heads
/// retried, not one per app.
const MAX_FAILING_LANES: usize = 2;
/// How many pending entries from the head of its outbox a worker looks at for lanes to send: an
/// app whose oldest entry lies further back waits until the entries before it are sent.
const LOOK_AHEAD: usize = 64;
/// How many it looks at while it drains a backlog (it found `LOOK_AHEAD` pending): one delivery
/// at a time, each look reading fewer entries, until fewer than these are left.
const BACKLOG_LOOK_AHEAD: usize = 16;

/// A pending outbox entry as a worker looked at it.
struct Pending {
    seq: u64,
    delivery: Delivery,
    /// Its lane, when it was not known before (its event was read for it).
    lane: Option<Lane>,
    /// Its event, when it was due and read in the same trip.
    event: Option<Box<Event>>,
}

/// Runs the workers, one per active subscription.
pub struct Dispatcher {
    store: Store,
    stats: Arc<Stats>,
    client: reqwest::Client,
    /// What every delivery's connection is checked against, webhook and HAProxy alike.
    outbound: Arc<OutboundPolicy>,
    config: DeliveryConfig,
    clock: Clock,
    /// Woken when events are appended or subscriptions change.
    wake: Arc<Notify>,
    /// Moved on whenever parked deliveries change outside the workers (a re-drive): each worker
    /// reads its parked ones again when it sees a new value.
    parked_epoch: AtomicU64,
    shutdown: CancellationToken,
    workers: Mutex<HashMap<String, (CancellationToken, JoinHandle<()>)>>,
    /// When the request whose batch decided each recent event arrived, and when the event was
    /// stored (wall-clock nanoseconds, by event sequence number), for `canaryd_act_seconds` and
    /// `canaryd_act_after_stored_seconds`; kept for `DECIDED_KEEP_NS`, at most
    /// `DECIDED_CAP` of them (the oldest go first, counted in `canaryd_act_timings_dropped_total`).
    decided: Mutex<std::collections::BTreeMap<u64, (u64, u64)>>,
    /// Each `httproute` subscription's Kubernetes client, built at its first use.
    kube_clients: tokio::sync::Mutex<HashMap<String, kube::Client>>,
    /// `traffic.partial` alerts, for the daemon to emit through the engine's one emitter.
    alerts: tokio::sync::mpsc::Sender<Event>,
    alerts_out: Mutex<Option<tokio::sync::mpsc::Receiver<Event>>>,
    /// The events (by sequence number) already alerted on, the most recent `ALERTED_CAP`.
    alerted: Mutex<BTreeSet<u64>>,
    /// Whether delivery records were written since the store last flushed them: they are flushed
    /// behind the workers (`flush_records`), not by each record, so that a burst of decisions
    /// does not wait for a disk flush between one delivery and the next.
    records_unflushed: AtomicBool,
    /// Woken when a record is written.
    records_written: Notify,
    /// Whether the task that flushes records was started.
    records_flusher: AtomicBool,
}

/// How long after a record is written the records flusher flushes: what a burst writes meanwhile
/// goes in the same flush. A crash within it sends those deliveries again (at least once).
const RECORDS_FLUSH_DELAY: Duration = Duration::from_millis(200);

/// How many alerted events are remembered (an alert sent again is dropped by the emitter, whose
/// ids are derived from the event it is about: this only spares the engine the round trip).
const ALERTED_CAP: usize = 4_096;
/// Alerts waiting for the engine; past it one is dropped, and a later attempt sends it again.
const ALERTS_QUEUE: usize = 256;

/// The levers' outcomes for the event stored at `seq`: each `haproxy` or `httproute`
/// subscription with a delivery of it that it did not skip (its app is not one that lever moves,
/// or a later move superseded it).
pub fn lever_outcomes(store: &Store, seq: u64) -> Result<Vec<LeverOutcome>, crate::store::StoreError> {
    lever_outcomes_among(store, &store.subscriptions()?, seq)
}

/// `lever_outcomes`, among `subscriptions` (read once for many events).
pub fn lever_outcomes_among(
    store: &Store,
    subscriptions: &[Subscription],
    seq: u64,
) -> Result<Vec<LeverOutcome>, crate::store::StoreError> {
    let mut outcomes = Vec::new();
    for subscription in subscriptions {
        if !subscription.kind.is_lever() {
            continue;
        }
        let Some(delivery) = store.find_delivery(&subscription.id, seq)? else {
            continue;
        };
        let error = delivery.last_error.clone();
        let outcome = match delivery.state {
            DeliveryState::Skipped => continue,
            DeliveryState::Delivered => "applied",
            _ if delivery.attempts == 0 => "pending",
            _ if error.as_deref().is_some_and(partly_applied) => "partial",
            _ => "failed",
        };
        outcomes.push(LeverOutcome {
            subscription: subscription.id.clone(),
            kind: subscription.kind.name().to_owned(),
            outcome: outcome.to_owned(),
            attempts: delivery.attempts,
            error: if outcome == "applied" { None } else { error },
        });
    }
    Ok(outcomes)
}

/// Whether an `haproxy` delivery's error says one of its levers applied before another failed
/// (`act_on_haproxy`'s "weights applied; maps: ...").
fn partly_applied(error: &str) -> bool {
    error
        .split_once(" applied; ")
        .is_some_and(|(levers, _)| levers.split(" and ").all(|l| l == "weights" || l == "maps"))
}

/// Whether the outcomes are a partial move: some lever applied it, some other did not.
pub fn is_partial(outcomes: &[LeverOutcome]) -> bool {
    let applied = outcomes
        .iter()
        .any(|o| o.outcome == "applied" || o.outcome == "partial");
    let failed = outcomes
        .iter()
        .any(|o| o.outcome == "failed" || o.outcome == "partial");
    applied && failed
}

/// The `traffic.partial` alert about `cause`, whose levers did what `outcomes` says.
pub fn partial_alert(cause: &Event, outcomes: Vec<LeverOutcome>, now: std::time::SystemTime) -> Event {
    let mut data = cause.data.clone();
    data.state = "partial".into();
    data.approval = None;
    data.next_env = None;
    data.cause = Some(cause.id.clone());
    data.reasons = outcomes
        .iter()
        .filter(|o| o.outcome == "failed" || o.outcome == "partial")
        .map(|o| Reason {
            feature: "traffic".into(),
            operation: None,
            test: "lever".into(),
            canary_value: f64::NAN,
            baseline_value: f64::NAN,
            statistic: f64::NAN,
            threshold: f64::NAN,
            message: format!(
                "{} lever {} {} {}'s traffic move after {} attempt(s): {}",
                o.kind,
                o.subscription,
                if o.outcome == "partial" {
                    "partly applied"
                } else {
                    "did not apply"
                },
                cause.event_type.as_str(),
                o.attempts,
                o.error.as_deref().unwrap_or("no error recorded")
            ),
        })
        .collect();
    data.levers = Some(outcomes);
    let mut alert = Event::new(EventType::TrafficPartial, data);
    alert.identify();
    alert.time = humantime::format_rfc3339_millis(now).to_string();
    alert
}

/// How many decided-at times are kept for their first delivery attempt.
const DECIDED_CAP: usize = 10_000;
/// How long a decided-at time waits for its first attempt: one later than this is not a time to
/// act under load but a receiver that was down, and the outbox's own metrics show that.
const DECIDED_KEEP_NS: u64 = 600 * 1_000_000_000;

impl Dispatcher {
    /// A dispatcher on the system's clock.
    pub fn new(
        store: Store,
        stats: Arc<Stats>,
        config: DeliveryConfig,
        shutdown: CancellationToken,
    ) -> Result<Arc<Dispatcher>, ClientError> {
        Dispatcher::with_clock(store, stats, config, Clock::System, shutdown)
    }

    /// A dispatcher whose backoff, parking and retry window follow `clock`.
    pub fn with_clock(
        store: Store,
        stats: Arc<Stats>,
        config: DeliveryConfig,
        clock: Clock,
        shutdown: CancellationToken,
    ) -> Result<Arc<Dispatcher>, ClientError> {
        let outbound = Arc::new(OutboundPolicy::new(config.outbound_allow.clone()));
        let (alerts, alerts_out) = tokio::sync::mpsc::channel(ALERTS_QUEUE);
        // Redirects are not followed (a receiver could send a delivery anywhere), names resolve
        // only to addresses the policy allows, and no proxy stands between: a proxy would do
        // the resolving, out of the policy's sight. A client without that policy is no client:
        // start-up stops.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver(outbound.clone())))
            .no_proxy()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .user_agent(concat!("canaryd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ClientError)?;
        Ok(Arc::new(Dispatcher {
            store,
            stats,
            client,
            outbound,
            config,
            clock,
            wake: Arc::new(Notify::new()),
            parked_epoch: AtomicU64::new(0),
            shutdown,
            workers: Mutex::new(HashMap::new()),
            decided: Mutex::new(std::collections::BTreeMap::new()),
            kube_clients: tokio::sync::Mutex::new(HashMap::new()),
            alerts,
            alerts_out: Mutex::new(Some(alerts_out)),
            alerted: Mutex::new(BTreeSet::new()),
            records_unflushed: AtomicBool::new(false),
            records_written: Notify::new(),
            records_flusher: AtomicBool::new(false),
        }))
    }

    /// Where each app's route maps are in HAProxy (what a declared plan is checked against).
    pub fn haproxy_maps(&self) -> &HaproxyMaps {
        &self.config.haproxy_maps
    }

    /// The `traffic.partial` alerts the workers raise, once: the daemon emits them.
    pub fn take_alerts(&self) -> Option<tokio::sync::mpsc::Receiver<Event>> {
        self.alerts_out.lock().ok()?.take()
    }

    /// After a lever acted (or failed to) on event `seq`: when the event's levers now disagree
    /// (one applied its move, another did not), raises a `traffic.partial` alert, once.
    async fn check_levers(&self, seq: u64, event: &Event) {
        let moves_traffic = event.data.traffic.is_some() || event.data.action.is_some();
        if event.event_type == EventType::TrafficPartial || event.data.dry_run || !moves_traffic {
            return;
        }
        if self.alerted.lock().is_ok_and(|alerted| alerted.contains(&seq)) {
            return;
        }
        let store = self.store.clone();
        let outcomes = match try_blocking(move || lever_outcomes(&store, seq)).await {
            Ok(outcomes) => outcomes,
            Err(e) => {
                tracing::error!(event = %event.id, error = %e, "cannot read the levers' outcomes");
                return;
            }
        };
        if !is_partial(&outcomes) {
            return;
        }
        let alert = partial_alert(event, outcomes, std::time::SystemTime::now());
        tracing::error!(event = %event.id, app = %event.data.app, alert = %alert.id, reasons = ?alert.data.reasons.iter().map(|r| &r.message).collect::<Vec<_>>(), "a traffic move applied by some levers and not others");
        if let Err(e) = self.alerts.try_send(alert) {
            tracing::error!(event = %event.id, error = %e, "cannot queue the traffic.partial alert; the next attempt raises it again");
            return;
        }
        if let Ok(mut alerted) = self.alerted.lock() {
            alerted.insert(seq);
            while alerted.len() > ALERTED_CAP {
                alerted.pop_first();
            }
        }
    }

    /// Which HTTPRoute carries each app's route (what a declared plan is checked against).
    pub fn httproutes(&self) -> &HttpRoutes {
        &self.config.httproutes
    }

    /// The outbound policy deliveries go through; subscriptions are checked against it too.
    pub fn outbound(&self) -> &OutboundPolicy {
        &self.outbound
    }

    /// Notes that the events `seqs`, stored now, were decided by a batch that arrived at
    /// `arrived_ns`.
    pub fn note_decided(&self, seqs: impl Iterator<Item = u64>, arrived_ns: u64) {
        let stored_ns = crate::wall_clock_ns();
        let mut decided = self.decided.lock().unwrap_or_else(|p| p.into_inner());
        decided.extend(seqs.map(|seq| (seq, (arrived_ns, stored_ns))));
        let cutoff = stored_ns.saturating_sub(DECIDED_KEEP_NS);
        // Sequence numbers rise with time, so the oldest are first.
        while let Some((_, &(first, _))) = decided.first_key_value() {
            let over_cap = decided.len() > DECIDED_CAP;
            if !over_cap && first >= cutoff {
                break;
            }
            decided.pop_first();
            if over_cap {
                self.stats.act_timings_dropped.inc();
            }
        }
    }

    /// Observes the time from the arrival of the batch that decided event `seq` to now, when its
    /// first delivery attempt leaves, and the part of it since the event was stored.
    fn observe_act(&self, seq: u64) {
        let decided = self
            .decided
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&seq)
            .copied();
        if let Some((arrived, stored)) = decided {
            // The clock arrivals are stamped with, not the dispatcher's (a test's may be manual).
            let now = crate::wall_clock_ns();
            let since = |ns: u64| std::time::Duration::from_nanos(now.saturating_sub(ns));
            self.stats.act_seconds(since(arrived));
            self.stats.act_after_stored_seconds(since(stored));
        }
    }

    /// Tells the workers there may be new work.
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }

    /// The dispatcher's clock (what a delivery's times are in).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Flushes the delivery records written since the last flush, `RECORDS_FLUSH_DELAY` after
    /// the first of them, until shutdown (`stop` flushes what is left).
    async fn flush_records(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                () = self.records_written.notified() => {}
            }
            // Real time, not the dispatcher's clock: a disk's flush does not wait for a manual one.
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(RECORDS_FLUSH_DELAY) => {}
            }
            self.flush_records_now().await;
        }
    }

    async fn flush_records_now(&self) {
        if !self.records_unflushed.swap(false, Ordering::AcqRel) {
            return;
        }
        let store = self.store.clone();
        if let Err(e) = try_blocking(move || store.flush()).await {
            tracing::error!(error = %e, "cannot flush delivery records; tried again at the next record");
            self.records_unflushed.store(true, Ordering::Release);
        }
    }

    /// Starts a worker for every active subscription that has none, and stops the workers of
    /// subscriptions that are gone or disabled.
    pub async fn sync(self: &Arc<Self>) {
        if !self.records_flusher.swap(true, Ordering::AcqRel) {
            tokio::spawn(self.clone().flush_records());
        }
        let store = self.store.clone();
        let subscriptions = match try_blocking(move || store.subscriptions()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot read subscriptions");
                return;
            }
        };
        self.publish_depths();
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers.retain(|id, (stop, task)| {
            let active = subscriptions.iter().any(|s| &s.id == id && s.disabled.is_none());
            if !active || task.is_finished() {
                stop.cancel();
            }
            active && !task.is_finished()
        });
        for subscription in subscriptions.into_iter().filter(|s| s.disabled.is_none()) {
            if workers.contains_key(&subscription.id) {
                continue;
            }
            let stop = self.shutdown.child_token();
            let id = subscription.id.clone();
            let task = tokio::spawn(self.clone().work(subscription, stop.clone()));
            workers.insert(id, (stop, task));
        }
        drop(workers);
        self.wake();
    }

    /// Stops every worker and waits for them (each finishes or abandons its request in flight).
    pub async fn stop(&self) {
        let workers: Vec<_> = {
            let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            workers.drain().map(|(_, w)| w).collect()
        };
        for (stop, task) in workers {
            stop.cancel();
            let _ = task.await;
        }
        self.flush_records_now().await;
    }

    /// Re-drives a subscription's parked delivery of event `seq`: tried again at once, with a new
    /// retry window (`max_age` from that attempt). `None` when it has no such parked delivery.
    pub async fn redrive(&self, subscription: &str, seq: u64) -> Result<Option<Delivery>, String> {
        let (store, id, now) = (self.store.clone(), subscription.to_owned(), self.clock.now_ms());
        let changed = try_blocking(move || store.update_parked(&id, seq, |d| redriven(d, now))).await?;
        if let Some(delivery) = &changed {
            tracing::info!(subscription, event = %delivery.event_id, "parked delivery re-driven");
            self.parked_changed();
        }
        Ok(changed)
    }

    /// Re-drives every parked delivery of a subscription, as `redrive` does one; those re-driven.
    pub async fn redrive_all(&self, subscription: &str) -> Result<Vec<Delivery>, String> {
        let (store, id, now) = (self.store.clone(), subscription.to_owned(), self.clock.now_ms());
        let changed = try_blocking(move || {
            let mut changed = Vec::new();
            for (seq, _) in store.parked(&id)? {
                changed.extend(store.update_parked(&id, seq, |d| redriven(d, now))?);
            }
            Ok::<_, crate::store::StoreError>(changed)
        })
        .await?;
        if !changed.is_empty() {
            tracing::info!(
                subscription,
                deliveries = changed.len(),
                "parked deliveries re-driven"
            );
            self.parked_changed();
        }
        Ok(changed)
    }

    /// Sets the outbox and parked gauges from the store's counts, which every change keeps (the
    /// emitter sets the outbox's too, at each flush).
    fn publish_depths(&self) {
        self.stats.outbox_depth.set(self.store.outbox_depth() as i64);
        self.stats.parked.set(self.store.parked_count() as i64);
    }

    fn parked_changed(&self) {
        self.parked_epoch.fetch_add(1, Ordering::AcqRel);
        self.wake();
    }

    async fn work(self: Arc<Self>, subscription: Subscription, stop: CancellationToken) {
        let key: Arc<[u8]> = match secret_key(&subscription.secret) {
            Ok(key) => key.into(),
            Err(e) => {
                tracing::error!(subscription = %subscription.id, error = %e, "unusable secret; not delivering");
                return;
            }
        };
        let subscription = Arc::new(subscription);
        // Parked deliveries still retried, read again whenever a re-drive changed them.
        let mut schedule = Schedule::new();
        let mut schedule_epoch = None;
        // When a head and a parked delivery are both due, they take turns.
        let mut parked_turn = false;
        // A lever's worker with weights, maps or routes to keep compares them at once, then now
        // and then while it has nothing to send (a delivery applies a newer move).
        let reconciles = match subscription.kind {
            Kind::Haproxy => {
                !self.config.haproxy_maps.0.is_empty() || !self.config.haproxy_servers.0.is_empty()
            }
            Kind::Httproute => !self.config.httproutes.0.is_empty(),
            Kind::Webhook => false,
        };
        let mut next_reconcile_ms = 0;
        // The attempts in flight, and the lane of each (by event sequence number).
        let mut in_flight: JoinSet<(u64, Option<Delivery>)> = JoinSet::new();
        let mut flying: HashMap<u64, Lane> = HashMap::new();
        let mut task_seqs: HashMap<tokio::task::Id, u64> = HashMap::new();
        // The first attempts in flight of lanes not tried before, and whether the receiver
        // took the last attempt that ended (not known at the start): while it does not, lanes
        // are opened one at a time, and only while fewer than `MAX_FAILING_LANES` lanes' heads
        // are failing, so that a receiver that is down sees two heads retried, not one per app.
        let mut opening: HashSet<u64> = HashSet::new();
        let mut answering = false;
        // Whether the last look found a backlog (`LOOK_AHEAD` entries pending, then
        // `BACKLOG_LOOK_AHEAD` while it drains).
        let mut backlog = false;
        // The lanes of the entries looked at, so that each event is read for it once.
        let mut lanes: HashMap<u64, Lane> = HashMap::new();
        loop {
            // Register for a wake-up before looking, so that an append between the look and the
            // wait is not missed.
            let woken = self.wake.notified();
            let epoch = self.parked_epoch.load(Ordering::Acquire);
            if schedule_epoch != Some(epoch) {
                let (store, id) = (self.store.clone(), subscription.id.clone());
                match try_blocking(move || store.parked(&id)).await {
                    Ok(parked) => {
                        schedule = schedule_of(&parked);
                        schedule.retain(|(_, seq)| !flying.contains_key(seq));
                        schedule_epoch = Some(epoch);
                    }
                    Err(e) => {
                        tracing::error!(subscription = %subscription.id, error = %e, "cannot read parked deliveries")
                    }
                }
            }
            let looked_at = self.clock.now_ms();
            let limit = if backlog { BACKLOG_LOOK_AHEAD } else { LOOK_AHEAD };
            let window = match self.look(&subscription, &lanes, looked_at, limit).await {
                Ok(window) => window,
                Err(e) => {
                    tracing::error!(subscription = %subscription.id, error = %e, "cannot read the outbox");
                    Vec::new()
                }
            };
            let looked: HashSet<u64> = window.iter().map(|entry| entry.seq).collect();
            lanes.retain(|seq, _| looked.contains(seq));
            for entry in &window {
                if let Some(lane) = &entry.lane {
                    lanes.insert(entry.seq, lane.clone());
                }
            }
            let now = self.clock.now_ms();
            if reconciles && window.is_empty() && in_flight.is_empty() && now >= next_reconcile_ms {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    () = self.reconcile(&subscription) => {}
                }
                next_reconcile_ms = self.clock.now_ms() + self.config.reconcile_every.as_millis() as u64;
                continue;
            }

            // Each lane's oldest entry, unless that lane has an attempt in flight: due ones to
            // send now, and when the next of the others is due.
            let mut seen: HashSet<Lane> = HashSet::new();
            let mut due_heads = Vec::new();
            let mut next_due: Option<u64> = None;
            let mut failing = 0;
            // A backlog (a receiver back after an outage, say) is drained one delivery at a time:
            // lanes side by side are for the decisions of one moment, not for a catch-up that
            // would take the CPU from ingest meanwhile.
            backlog = window.len() >= limit;
            for entry in window {
                let Some(lane) = lanes.get(&entry.seq).cloned() else {
                    continue;
                };
                if !seen.insert(lane.clone()) {
                    continue;
                }
                if entry.delivery.attempts > 0 {
                    failing += 1;
                }
                if flying.values().any(|l| *l == lane) {
                    continue;
                }
                if entry.delivery.next_attempt_ms <= now {
                    due_heads.push((entry, lane));
                } else {
                    next_due = Some(next_due.map_or(entry.delivery.next_attempt_ms, |d: u64| {
                        d.min(entry.delivery.next_attempt_ms)
                    }));
                }
            }
            let parked_lane = |seq: u64| {
                if subscription.kind.is_lever() {
                    Lane::All
                } else {
                    Lane::Alone(seq)
                }
            };
            let parked = schedule
                .first()
                .copied()
                .filter(|&(_, seq)| !flying.values().any(|l| *l == parked_lane(seq)));
            let parked_due = parked.filter(|&(due, _)| due <= now);
            let capacity = |flying: &HashMap<u64, Lane>| {
                let most = if subscription.kind.is_lever() || backlog {
                    1
                } else {
                    MAX_IN_FLIGHT
                };
                most.saturating_sub(flying.len())
            };
            // A lane not tried before may open while the receiver takes deliveries, or, while it
            // does not, one at a time while few lanes are failing. One that may not is looked at
            // again when an attempt ends.
            let may_open =
                |opening: &HashSet<u64>| answering || (failing < MAX_FAILING_LANES && opening.is_empty());
            due_heads.retain(|(entry, _)| entry.delivery.attempts > 0 || may_open(&opening));
            // A parked delivery goes first on its turn, or when no head is due.
            let parked_first = parked_due.filter(|_| parked_turn || due_heads.is_empty());
            if let Some((due, seq)) = parked_first
                && capacity(&flying) > 0
            {
                schedule.remove(&(due, seq));
                parked_turn = false;
                flying.insert(seq, parked_lane(seq));
                let this = self.clone();
                let (subscription, key) = (subscription.clone(), key.clone());
                let task = in_flight
                    .spawn(async move { (seq, this.attempt_parked(&subscription, &key, seq).await) });
                task_seqs.insert(task.id(), seq);
            }
            for (entry, lane) in due_heads {
                if capacity(&flying) == 0 {
                    break;
                }
                if flying.values().any(|l| *l == lane) {
                    // A lever's parked delivery just took its one lane.
                    continue;
                }
                let opens = entry.delivery.attempts == 0;
                if opens && !may_open(&opening) {
                    continue;
                }
                parked_turn = true;
                let seq = entry.seq;
                if opens {
                    opening.insert(seq);
                }
                flying.insert(seq, lane);
                let this = self.clone();
                let (subscription, key) = (subscription.clone(), key.clone());
                let task = in_flight.spawn(async move {
                    let recorded = this
                        .attempt(&subscription, &key, seq, entry.delivery, entry.event)
                        .await;
                    (seq, Some(recorded))
                });
                task_seqs.insert(task.id(), seq);
            }
            // The parked delivery not yet due (or waiting for its turn) wakes the worker too.
            if let Some((due, _)) = schedule
                .first()
                .copied()
                .filter(|&(_, seq)| !flying.values().any(|l| *l == parked_lane(seq)))
            {
                next_due = Some(next_due.map_or(due, |d| d.min(due)));
            }
            if capacity(&flying) == 0 {
                // Nothing more can start before an attempt ends.
                next_due = None;
            }
            if in_flight.is_empty() && next_due.is_none() {
                let nap = if reconciles {
                    Duration::from_millis(next_reconcile_ms.saturating_sub(now)).min(Duration::from_secs(5))
                } else {
                    Duration::from_secs(5)
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = woken => continue,
                    // A safety net: look again now and then even without a wake-up.
                    _ = self.clock.sleep(nap) => continue,
                }
            }
            let ended = tokio::select! {
                _ = stop.cancelled() => return,
                _ = woken => continue,
                _ = self.clock.sleep_until(next_due.unwrap_or(u64::MAX)), if next_due.is_some() => continue,
                Some(ended) = in_flight.join_next_with_id(), if !in_flight.is_empty() => ended,
            };
            let (seq, recorded) = match ended {
                Ok((task, ended)) => {
                    task_seqs.remove(&task);
                    ended
                }
                Err(e) => {
                    // A panicked attempt: its delivery stays as it was last recorded, tried again.
                    tracing::error!(subscription = %subscription.id, error = %e, "a delivery attempt failed");
                    if let Some(seq) = task_seqs.remove(&e.id()) {
                        flying.remove(&seq);
                        opening.remove(&seq);
                    }
                    continue;
                }
            };
            flying.remove(&seq);
            opening.remove(&seq);
            let Some(recorded) = recorded else {
                continue;
            };
            match recorded.state {
                DeliveryState::Gone => {
                    let (store, id) = (self.store.clone(), subscription.id.clone());
                    if let Err(e) = try_blocking(move || store.disable_subscription(&id)).await {
                        tracing::error!(subscription = %subscription.id, error = %e, "cannot disable the subscription");
                    }
                    self.publish_depths();
                    tracing::warn!(subscription = %subscription.id, url = %subscription.url, "receiver answered 410 Gone; subscription disabled");
                    return;
                }
                DeliveryState::Parked => {
                    answering = false;
                    if let Some(due) = recorded.next_retry_ms() {
                        schedule.insert((due, seq));
                    }
                }
                DeliveryState::Pending => answering = false,
                DeliveryState::Delivered => {
                    answering = true;
                    if subscription.kind.is_lever() {
                        self.supersede_older_actions(&subscription, seq, &mut schedule)
                            .await;
                    }
                }
                _ => {}
            }
        }
    }

    /// The first `limit` pending entries of a subscription, each with its lane when `known`
    /// does not have it (its event read for it), and its event when it is due at `now_ms` (read
    /// in the same trip to the blocking pool, which is a wait of its own on a busy machine; a
    /// failed read is read again, and answered, by the attempt).
    async fn look(
        &self,
        subscription: &Subscription,
        known: &HashMap<u64, Lane>,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Pending>, String> {
        let (store, id, kind) = (self.store.clone(), subscription.id.clone(), subscription.kind);
        let known: HashSet<u64> = known.keys().copied().collect();
        try_blocking(move || {
            let entries = store.next_deliveries(&id, limit)?;
            Ok::<_, crate::store::StoreError>(
                entries
                    .into_iter()
                    .map(|(seq, delivery)| {
                        let due = delivery.next_attempt_ms <= now_ms;
                        let unknown = !known.contains(&seq);
                        // A lever's lane is known without its event.
                        let wanted = due || (unknown && !kind.is_lever());
                        let event = wanted.then(|| store.event(seq).ok().flatten()).flatten();
                        let lane = unknown.then(|| lane_of(kind, seq, event.as_ref()));
                        Pending {
                            seq,
                            delivery,
                            lane,
                            event: event.filter(|_| due).map(Box::new),
                        }
                    })
                    .collect(),
            )
        })
        .await
    }

    /// After a lever's subscription (`haproxy`, `httproute`) applied event `seq`'s traffic: its
    /// parked deliveries of earlier events whose traffic that one replaced (for HAProxy, set only
    /// servers it set) are skipped, never applied after it.
    async fn supersede_older_actions(&self, subscription: &Subscription, seq: u64, schedule: &mut Schedule) {
        let (store, id) = (self.store.clone(), subscription.id.clone());
        let servers = self.config.haproxy_servers.clone();
        let maps = self.config.haproxy_maps.clone();
        let routes = self.config.httproutes.clone();
        let kind = subscription.kind;
        let superseded = try_blocking(move || {
            let Some(later) = store.event(seq)? else {
                return Ok(Vec::new());
            };
            let mut superseded = Vec::new();
            for (older_seq, mut delivery) in store.parked(&id)? {
                if older_seq >= seq {
                    break;
                }
                let Some(older) = store.event(older_seq)? else {
                    continue;
                };
                let overridden = match kind {
                    Kind::Httproute => route_overridden_by(&older, &later, &routes),
                    _ => overridden_by(&older, &later, &servers, &maps),
                };
                if overridden {
                    delivery.state = DeliveryState::Skipped;
                    delivery.last_error =
                        Some(format!("superseded: {} set the same traffic after it", later.id));
                    store.put_delivery(&id, older_seq, &delivery)?;
                    superseded.push((older_seq, older.id, later.id.clone()));
                }
            }
            Ok::<_, crate::store::StoreError>(superseded)
        })
        .await;
        match superseded {
            Ok(superseded) => {
                schedule.retain(|(_, s)| !superseded.iter().any(|(older, ..)| older == s));
                for (_, older, later) in superseded {
                    self.stats.delivery(&subscription.id, "skipped");
                    tracing::info!(subscription = %subscription.id, event = %older, by = %later, "parked traffic action superseded by a later one; skipped");
                }
                self.publish_depths();
            }
            Err(e) => {
                tracing::error!(subscription = %subscription.id, error = %e, "cannot supersede parked traffic actions")
            }
        }
    }

    /// One attempt at parked delivery `seq`, when it is still parked (not delivered, or its
    /// subscription deleted, meanwhile); records and returns it in its new state.
    async fn attempt_parked(&self, subscription: &Subscription, key: &[u8], seq: u64) -> Option<Delivery> {
        let (store, id) = (self.store.clone(), subscription.id.clone());
        match try_blocking(move || store.find_delivery(&id, seq)).await {
            Ok(Some(delivery)) if delivery.state == DeliveryState::Parked => {
                Some(self.attempt(subscription, key, seq, delivery, None).await)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::error!(subscription = %subscription.id, error = %e, "cannot read a parked delivery");
                None
            }
        }
    }

    /// One attempt at one delivery (its event, when it was read already); records and returns
    /// it in its new state.
    async fn attempt(
        &self,
        subscription: &Subscription,
        key: &[u8],
        seq: u64,
        mut delivery: Delivery,
        event: Option<Box<Event>>,
    ) -> Delivery {
        let now = self.clock.now_ms();
        delivery.first_attempt_ms.get_or_insert(now);
        delivery.attempts += 1;
        let store = self.store.clone();
        let read = match event {
            Some(event) => Ok(Some(*event)),
            None => try_blocking(move || store.event(seq)).await,
        };
        let event = match read {
            Ok(Some(event)) => event,
            Ok(None) => {
                delivery.state = DeliveryState::Expired;
                delivery.last_error = Some("the event is no longer stored".into());
                return self.record(subscription, seq, delivery, "expired").await;
            }
            Err(e) => {
                delivery.last_error = Some(e.to_string());
                delivery.next_attempt_ms = now + 1_000;
                return self.record(subscription, seq, delivery, "retry").await;
            }
        };
        let first_attempt = delivery.attempts == 1;
        if subscription.kind.is_lever() {
            if first_attempt {
                self.observe_act(seq);
            }
            let label = if event.event_type == EventType::TrafficPartial {
                // An alert about a move is not a move: levers never act on it.
                delivery.state = DeliveryState::Skipped;
                "skipped"
            } else {
                match subscription.kind {
                    Kind::Httproute => self.act_on_httproute(subscription, &event, &mut delivery).await,
                    _ => self.act_on_haproxy(subscription, &event, &mut delivery).await,
                }
            };
            let recorded = self.record(subscription, seq, delivery, label).await;
            self.check_levers(seq, &event).await;
            return recorded;
        }
        // A literal address is connected to without resolution, so it is checked here; names
        // are checked by the resolver on every address.
        let checked = reqwest::Url::parse(&subscription.url)
            .map_err(|e| e.to_string())
            .and_then(|url| {
                match url.host() {
                    Some(host) => self.outbound.check_host(&host).map_err(|e| e.to_string()),
                    None => Err("the URL has no host".to_owned()),
                }
                .map(|()| url)
            });
        let url = match checked {
            Ok(url) => url,
            Err(e) => {
                delivery.last_status = None;
                delivery.last_error = Some(e);
                let label = self.schedule_retry(&mut delivery);
                return self.record(subscription, seq, delivery, label).await;
            }
        };
        let body = serde_json::to_vec(&event).unwrap_or_default();
        let timestamp = now / 1_000;
        let signature = sign(key, &event.id, timestamp, &body);
        if first_attempt {
            self.observe_act(seq);
        }
        let started = std::time::Instant::now();
        let result = self
            .client
            .post(url)
            .header("content-type", "application/cloudevents+json")
            .header("webhook-id", &event.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        self.stats.delivery_seconds(started.elapsed());
        let label = match result {
            Ok(response) if response.status().is_success() => {
                delivery.state = DeliveryState::Delivered;
                delivery.last_status = Some(response.status().as_u16());
                delivery.last_error = None;
                delivery.delivered_ms = Some(self.clock.now_ms());
                "delivered"
            }
            Ok(response) if response.status() == reqwest::StatusCode::GONE => {
                delivery.state = DeliveryState::Gone;
                delivery.last_status = Some(410);
                "gone"
            }
            Ok(response) => {
                delivery.last_status = Some(response.status().as_u16());
                delivery.last_error = Some(format!("answered {}", response.status()));
                self.schedule_retry(&mut delivery)
            }
            Err(e) => {
                delivery.last_status = None;
                delivery.last_error = Some(crate::error_chain(&e));
                self.schedule_retry(&mut delivery)
            }
        };
        self.record(subscription, seq, delivery, label).await
    }

    /// Applies the event's traffic on HAProxy, every lever its app has there (weights, maps);
    /// a failure of any is retried like a webhook's, the whole action again (each lever's
    /// commands are idempotent), and the error says which lever failed and which applied.
    async fn act_on_haproxy(
        &self,
        subscription: &Subscription,
        event: &crate::events::Event,
        delivery: &mut Delivery,
    ) -> &'static str {
        let maps = haproxy_maps::plan(event, &self.config.haproxy_maps);
        let mut unmapped = None;
        let weights = match haproxy::plan(event, &self.config.haproxy_servers) {
            // An app routed by maps alone needs no servers; one with neither is not an app this
            // HAProxy routes (another lever may), which is no failure of this one.
            Some(Err(e @ haproxy::HaproxyError::Unmapped { .. })) => {
                unmapped = Some(e.to_string());
                None
            }
            weights => weights,
        };
        if weights.is_none() && maps.is_none() {
            if let Some(reason) = &unmapped {
                tracing::warn!(subscription = %subscription.id, event = %event.id, %reason, "HAProxy does not route this app; its traffic action is skipped here");
            }
            delivery.state = DeliveryState::Skipped;
            delivery.last_error = unmapped.map(|r| format!("{r}: not an app this HAProxy routes"));
            return "skipped";
        }
        let endpoint = match subscription.url.parse::<haproxy::Endpoint>() {
            Ok(endpoint) => endpoint,
            Err(e) => {
                delivery.last_error = Some(e);
                return self.schedule_retry(delivery);
            }
        };
        let started = std::time::Instant::now();
        let mut applied: Vec<&str> = Vec::new();
        let mut failure = None;
        if let Some(steps) = weights {
            match self.set_weights(&endpoint, steps).await {
                Ok(()) => applied.push("weights"),
                Err(e) => failure = Some(format!("weights: {e}")),
            }
        }
        if failure.is_none()
            && let Some(maps) = maps
        {
            let result = match maps {
                Ok((target, route)) => {
                    let wanted = haproxy_maps::Wanted::of(route);
                    haproxy_maps::apply(&endpoint, &self.outbound, target, &wanted, self.config.timeout).await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(_) => applied.push("maps"),
                Err(e) => failure = Some(format!("maps: {e}")),
            }
        }
        self.stats.delivery_seconds(started.elapsed());
        if let Some(failure) = failure {
            delivery.last_error = Some(if applied.is_empty() {
                failure
            } else {
                format!("{} applied; {failure}", applied.join(" and "))
            });
            return self.schedule_retry(delivery);
        }
        tracing::info!(subscription = %subscription.id, event = %event.id, levers = %applied.join(", "), "HAProxy traffic applied");
        delivery.state = DeliveryState::Delivered;
        delivery.last_error = None;
        delivery.delivered_ms = Some(self.clock.now_ms());
        "delivered"
    }

    /// Writes the event's route into its app's HTTPRoute; an answer that is not a success (a
    /// conflict with another field manager, a 403 for missing RBAC, a missing route) is kept on
    /// the delivery, status and all, and retried like a webhook's.
    async fn act_on_httproute(
        &self,
        subscription: &Subscription,
        event: &crate::events::Event,
        delivery: &mut Delivery,
    ) -> &'static str {
        let (target, route) = match httproute::plan(event, &self.config.httproutes) {
            None => {
                delivery.state = DeliveryState::Skipped;
                delivery.last_error = None;
                return "skipped";
            }
            Some(Ok(planned)) => planned,
            Some(Err(e)) => {
                delivery.last_status = None;
                delivery.last_error = Some(e.to_string());
                return self.schedule_retry(delivery);
            }
        };
        let started = std::time::Instant::now();
        let result = match self.kube_client(subscription).await {
            Ok(client) => httproute::apply(&client, target, &route).await,
            Err(e) => Err(e),
        };
        self.stats.delivery_seconds(started.elapsed());
        match result {
            Ok(applied) => {
                tracing::info!(subscription = %subscription.id, event = %event.id, route = %format!("{}/{}", target.namespace, target.name), changed = applied.changed, percent = route.percent, "HTTPRoute traffic applied");
                delivery.state = DeliveryState::Delivered;
                delivery.last_status = Some(200);
                delivery.last_error = None;
                delivery.delivered_ms = Some(self.clock.now_ms());
                "delivered"
            }
            Err(e) => {
                delivery.last_status = e.status();
                delivery.last_error = Some(e.to_string());
                if matches!(e, httproute::HttpRouteError::Transport(_)) {
                    // A broken connection may have been a stale pooled one: build afresh.
                    self.kube_clients.lock().await.remove(&subscription.id);
                }
                self.schedule_retry(delivery)
            }
        }
    }

    /// The subscription's Kubernetes client, built (and the API server's addresses checked
    /// against the outbound policy) at first use.
    async fn kube_client(
        &self,
        subscription: &Subscription,
    ) -> Result<kube::Client, httproute::HttpRouteError> {
        let mut clients = self.kube_clients.lock().await;
        if let Some(client) = clients.get(&subscription.id) {
            return Ok(client.clone());
        }
        // Unset, the pod's service account's: read here, not at start-up, so that the settings
        // stay what the operator gave.
        let pod = KubeAccess::in_cluster();
        let access = KubeAccess {
            token_file: self.config.kube_access.token_file.clone().or(pod.token_file),
            ca_file: self.config.kube_access.ca_file.clone().or(pod.ca_file),
        };
        let client =
            httproute::client(&subscription.url, &access, &self.outbound, self.config.timeout).await?;
        clients.insert(subscription.id.clone(), client.clone());
        Ok(client)
    }

    async fn set_weights(
        &self,
        endpoint: &haproxy::Endpoint,
        steps: Result<Vec<haproxy::WeightStep>, haproxy::HaproxyError>,
    ) -> Result<(), haproxy::HaproxyError> {
        for (backend, server, weight) in steps? {
            haproxy::set_weight(
                endpoint,
                &self.outbound,
                &backend,
                &server,
                weight,
                self.config.timeout,
            )
            .await?;
            tracing::info!(%backend, %server, weight, "HAProxy weight set");
        }
        Ok(())
    }

    /// Compares each mapped app's HAProxy maps with the latest route this subscription acts on
    /// (its types, not a dry run) and puts back what differs: after a restart of canaryd, an
    /// HAProxy reload (which rereads the map files) or a hand edit, the applied state is read,
    /// not assumed.
    async fn reconcile(&self, subscription: &Subscription) {
        if subscription.kind == Kind::Httproute {
            return self.reconcile_routes(subscription).await;
        }
        let Ok(endpoint) = subscription.url.parse::<haproxy::Endpoint>() else {
            return;
        };
        self.reconcile_weights(subscription, &endpoint).await;
        for target in &self.config.haproxy_maps.0 {
            let latest = self
                .latest_move(subscription, &target.env, &target.app, |e| {
                    e.data.traffic.is_some() && !e.data.dry_run
                })
                .await;
            let event = match latest {
                Ok(Some(event)) => event,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(subscription = %subscription.id, error = %e, "cannot read events to reconcile HAProxy maps");
                    return;
                }
            };
            let Some(Ok((target, route))) = haproxy_maps::plan(&event, &self.config.haproxy_maps) else {
                continue;
            };
            let wanted = haproxy_maps::Wanted::of(route);
            match haproxy_maps::apply(&endpoint, &self.outbound, target, &wanted, self.config.timeout).await {
                Ok(applied) if applied.changes == 0 => self.stats.traffic_reconcile(&subscription.id, "held"),
                Ok(applied) => {
                    self.stats.traffic_reconcile(&subscription.id, "corrected");
                    tracing::warn!(subscription = %subscription.id, env = %target.env, app = %target.app, event = %event.id, changes = applied.changes, "HAProxy maps had drifted from the app's route; put back");
                }
                Err(e) => {
                    self.stats.traffic_reconcile(&subscription.id, "failed");
                    tracing::warn!(subscription = %subscription.id, env = %target.env, app = %target.app, error = %e, "cannot reconcile HAProxy maps");
                }
            }
        }
    }

    /// The same for server weights: for each app `haproxy_servers` names, the weights its latest
    /// traffic action (of this subscription's types, not a dry run) set are read with `get
    /// weight`, and set again where they differ (an HAProxy reload restores the configured
    /// weights; a person may have changed them).
    async fn reconcile_weights(&self, subscription: &Subscription, endpoint: &haproxy::Endpoint) {
        let apps: BTreeSet<(String, String)> = self
            .config
            .haproxy_servers
            .0
            .iter()
            .map(|t| (t.env.clone(), t.app.clone()))
            .collect();
        for (env, app) in apps {
            let latest = self
                .latest_move(subscription, &env, &app, |e| {
                    !e.data.dry_run && e.data.action.as_ref().is_some_and(|a| a.kind == "set_weight")
                })
                .await;
            let event = match latest {
                Ok(Some(event)) => event,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(subscription = %subscription.id, error = %e, "cannot read events to reconcile HAProxy weights");
                    return;
                }
            };
            let Some(Ok(steps)) = haproxy::plan(&event, &self.config.haproxy_servers) else {
                continue;
            };
            let mut outcome = "held";
            for (backend, server, weight) in steps {
                let timeout = self.config.timeout;
                let held = haproxy::get_weight(endpoint, &self.outbound, &backend, &server, timeout).await;
                let result = match held {
                    Ok(w) if w == weight => continue,
                    Ok(w) => {
                        tracing::warn!(subscription = %subscription.id, %backend, %server, held = w, wanted = weight, event = %event.id, "HAProxy weight had drifted from the latest action; put back");
                        haproxy::set_weight(endpoint, &self.outbound, &backend, &server, weight, timeout)
                            .await
                    }
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => outcome = "corrected",
                    Err(e) => {
                        tracing::warn!(subscription = %subscription.id, %backend, %server, error = %e, "cannot reconcile an HAProxy weight");
                        outcome = "failed";
                        break;
                    }
                }
            }
            self.stats.traffic_reconcile(&subscription.id, outcome);
        }
    }

    /// The same for an `httproute` subscription: each mapped app's HTTPRoute is read and, where
    /// its rules differ from the app's latest route, applied again.
    async fn reconcile_routes(&self, subscription: &Subscription) {
        for target in &self.config.httproutes.0 {
            let latest = self
                .latest_move(subscription, &target.env, &target.app, |e| {
                    httproute::route_of(e).is_some()
                })
                .await;
            let event = match latest {
                Ok(Some(event)) => event,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(subscription = %subscription.id, error = %e, "cannot read events to reconcile HTTPRoutes");
                    return;
                }
            };
            let Some(Ok((target, route))) = httproute::plan(&event, &self.config.httproutes) else {
                continue;
            };
            let result = match self.kube_client(subscription).await {
                Ok(client) => httproute::apply(&client, target, &route).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(applied) if !applied.changed => self.stats.traffic_reconcile(&subscription.id, "held"),
                Ok(_) => {
                    self.stats.traffic_reconcile(&subscription.id, "corrected");
                    tracing::warn!(subscription = %subscription.id, route = %format!("{}/{}", target.namespace, target.name), event = %event.id, "HTTPRoute had drifted from the app's route; put back");
                }
                Err(e) => {
                    self.stats.traffic_reconcile(&subscription.id, "failed");
                    tracing::warn!(subscription = %subscription.id, route = %format!("{}/{}", target.namespace, target.name), error = %e, "cannot reconcile an HTTPRoute");
                }
            }
        }
    }

    /// The latest stored event of (env, app) that `subscription` acts on (one of its types) and
    /// that `moves` says a lever applies: what the reconcilers compare the applied state with.
    async fn latest_move(
        &self,
        subscription: &Subscription,
        env: &str,
        app: &str,
        moves: fn(&Event) -> bool,
    ) -> Result<Option<Event>, String> {
        let (store, types) = (self.store.clone(), subscription.events.clone());
        let (env, app) = (env.to_owned(), app.to_owned());
        try_blocking(move || {
            store.last_event(|e| {
                e.data.env == env && e.data.app == app && types.contains(&e.event_type) && moves(e)
            })
        })
        .await
    }

    fn schedule_retry(&self, delivery: &mut Delivery) -> &'static str {
        let mut random = [0u8; 8];
        let unit = match getrandom::fill(&mut random) {
            Ok(()) => (u64::from_be_bytes(random) >> 11) as f64 / (1u64 << 53) as f64,
            Err(_) => 0.5,
        };
        let wait = backoff(delivery.attempts, &self.config, unit);
        after_failure(delivery, self.clock.now_ms(), wait, &self.config)
    }

    async fn record(
        &self,
        subscription: &Subscription,
        seq: u64,
        delivery: Delivery,
        label: &'static str,
    ) -> Delivery {
        self.stats.delivery(&subscription.id, label);
        match label {
            "delivered" | "skipped" => {
                tracing::debug!(subscription = %subscription.id, event = %delivery.event_id, "delivery {label}");
            }
            // A failed attempt is worth an operator's eye: the receiver is down or refusing.
            // Backoff spaces the attempts, so this stays a few lines per subscription.
            _ => tracing::warn!(
                subscription = %subscription.id,
                url = %subscription.url,
                event = %delivery.event_id,
                attempts = delivery.attempts,
                error = delivery.last_error.as_deref().unwrap_or(""),
                "delivery {label}"
            ),
        }
        // A peer's answer can be anything, of any size: what is kept of it, and served by the
        // deliveries API, is its start.
        let mut delivery = delivery;
        if let Some(e) = &mut delivery.last_error {
            clip(e, MAX_ERROR_BYTES);
        }
        let (store, id) = (self.store.clone(), subscription.id.clone());
        let stored = delivery.clone();
        let started = std::time::Instant::now();
        let recorded = try_blocking(move || store.record_delivery(&id, seq, &stored)).await;
        self.stats.delivery_record_seconds(started.elapsed());
        if let Err(e) = recorded {
            tracing::error!(subscription = %subscription.id, error = %e, "cannot record a delivery");
        }
        self.records_unflushed.store(true, Ordering::Release);
        self.records_written.notify_one();
        self.publish_depths();
        delivery
    }
}

/// A parked delivery re-driven at `now_ms`: due at once, its retry window starting again.
fn redriven(delivery: &mut Delivery, now_ms: u64) {
    delivery.first_attempt_ms = None;
    delivery.next_attempt_ms = now_ms;
}

/// The most of a delivery's last error that is kept.
pub const MAX_ERROR_BYTES: usize = 2_048;

/// Cuts `text` to at most `max` bytes at a character boundary, saying that it was cut.
pub(crate) fn clip(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    const MORE: &str = " [...]";
    let mut end = max.saturating_sub(MORE.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MORE);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::clock::ManualClock;

    #[test]
    fn a_long_error_is_kept_clipped_at_a_character_boundary() {
        let mut text = "é".repeat(10_000);
        clip(&mut text, MAX_ERROR_BYTES);
        assert!(text.len() <= MAX_ERROR_BYTES, "{}", text.len());
        assert!(text.ends_with(" [...]"));
        let mut short = "refused".to_owned();
        clip(&mut short, MAX_ERROR_BYTES);
        assert_eq!(short, "refused");
    }

    fn failed(state: DeliveryState, first_ms: u64) -> Delivery {
        let mut delivery = Delivery::new(
            "evt_0000000000000001".into(),
            crate::events::EventType::CanaryFailed,
        );
        delivery.state = state;
        delivery.first_attempt_ms = Some(first_ms);
        delivery
    }

    #[test]
    fn a_head_that_keeps_failing_is_parked_then_retried_until_its_window_ends() {
        let config = DeliveryConfig::default();
        let park_ms = config.park_after.as_millis() as u64;
        let max_age_ms = config.max_age.as_millis() as u64;
        // Within the park time: retried at the head.
        let mut head = failed(DeliveryState::Pending, 0);
        assert_eq!(
            after_failure(&mut head, 60_000, Duration::from_secs(60), &config),
            "retry"
        );
        assert_eq!(
            (head.state, head.next_attempt_ms),
            (DeliveryState::Pending, 120_000)
        );
        // A retry that would fall past it: one last try at the head when its time is up...
        let mut head = failed(DeliveryState::Pending, 0);
        let label = after_failure(&mut head, park_ms - 1_000, Duration::from_secs(2), &config);
        assert_eq!(label, "retry");
        assert_eq!(
            (head.state, head.next_retry_ms()),
            (DeliveryState::Pending, Some(park_ms))
        );
        // ...then parked, its retry still scheduled.
        let label = after_failure(&mut head, park_ms, Duration::from_secs(2), &config);
        assert_eq!(label, "parked");
        assert_eq!(
            (head.state, head.next_retry_ms()),
            (DeliveryState::Parked, Some(park_ms + 2_000))
        );
        // Parked, it is retried with backoff...
        let label = after_failure(&mut head, 3_600_000, Duration::from_secs(900), &config);
        assert_eq!(label, "retry");
        assert_eq!(
            (head.state, head.next_retry_ms()),
            (DeliveryState::Parked, Some(4_500_000))
        );
        // ...until its window is over: it stays parked, with no next retry.
        let label = after_failure(&mut head, max_age_ms - 60_000, Duration::from_secs(120), &config);
        assert_eq!(label, "expired");
        assert_eq!((head.state, head.next_retry_ms()), (DeliveryState::Parked, None));
        // A re-drive starts a new window at once.
        redriven(&mut head, max_age_ms + 5);
        assert_eq!(head.next_retry_ms(), Some(max_age_ms + 5));
        assert_eq!(head.first_attempt_ms, None);
    }

    /// An event carrying a `set_weight` action for shop's canary `version`.
    fn action(version: &str, weight: u32) -> Event {
        let mut event: Event = serde_json::from_value(serde_json::json!({
            "specversion": "1.0", "id": "", "source": "canaryd",
            "type": "canaryd.canary.stage_passed", "time": "2026-01-05T00:00:00Z", "subject": "shop",
            "datacontenttype": "application/json",
            "data": {"env": "prod", "app": "shop", "state": "healthy",
                     "detected_at": "2026-01-05T00:00:00Z", "reasons": [], "dry_run": false},
        }))
        .expect("an event");
        event.data.action = Some(crate::events::Action {
            kind: "set_weight".into(),
            app: "shop".into(),
            version: version.into(),
            weight,
        });
        event
    }

    #[test]
    fn an_older_haproxy_action_is_overridden_only_by_one_on_the_same_servers() {
        let servers: haproxy::HaproxyServers = "prod/shop/2.0=be/canary2+stable,prod/shop/*=be/canary"
            .parse()
            .expect("servers");
        let (stage, failed) = (action("2.0", 20), action("2.0", 0));
        assert!(overridden_by(&stage, &failed, &servers, &HaproxyMaps::default()));
        // Another canary's server is another server.
        assert!(!overridden_by(
            &stage,
            &action("3.0", 0),
            &servers,
            &HaproxyMaps::default()
        ));
        // A dry run sets nothing.
        let mut dry = action("2.0", 0);
        dry.data.dry_run = true;
        assert!(!overridden_by(&stage, &dry, &servers, &HaproxyMaps::default()));
    }

    /// A fake HAProxy runtime API on loopback: `set server be/s weight N` then `get weight be/s`,
    /// one command a connection, as HAProxy's one-shot mode answers them; it refuses to set the
    /// weight in `refused`. `applied` lists every weight it set, in order.
    #[derive(Clone, Default)]
    struct FakeHaproxy {
        weight: Arc<Mutex<Option<u32>>>,
        refused: Arc<Mutex<Option<u32>>>,
        applied: Arc<Mutex<Vec<u32>>>,
    }

    impl FakeHaproxy {
        async fn start(refused: Option<u32>) -> (FakeHaproxy, String) {
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let url = format!("tcp://{}", listener.local_addr().expect("addr"));
            let fake = FakeHaproxy::default();
            *fake.refused.lock().expect("lock") = refused;
            let state = fake.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let mut stream = BufReader::new(stream);
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.is_err() {
                        continue;
                    }
                    let words: Vec<&str> = line.split_whitespace().collect();
                    let answer = match words[..] {
                        ["set", "server", _, "weight", n] => {
                            let n: u32 = n.parse().expect("a weight");
                            if *state.refused.lock().expect("lock") == Some(n) {
                                "Refused: busy\n".to_owned()
                            } else {
                                *state.weight.lock().expect("lock") = Some(n);
                                state.applied.lock().expect("lock").push(n);
                                String::new()
                            }
                        }
                        ["get", "weight", _] => {
                            let n = state.weight.lock().expect("lock").unwrap_or(100);
                            format!("{n} (initial 100)\n")
                        }
                        _ => "Unknown command.\n".to_owned(),
                    };
                    let _ = stream.get_mut().write_all(answer.as_bytes()).await;
                }
            });
            (fake, url)
        }

        fn applied(&self) -> Vec<u32> {
            self.applied.lock().expect("lock").clone()
        }
    }

    /// Moves `clock` to each moment the one worker waits for, until `done` holds.
    async fn run_until(clock: &ManualClock, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !done() {
            let next = tokio::time::timeout_at(deadline, clock.idle(1))
                .await
                .expect("the worker waits for the clock before the deadline");
            if done() {
                break;
            }
            clock.set(next.expect("it waits for a time"));
        }
    }

    /// The `haproxy` kind goes through the same queue: an action HAProxy keeps refusing is parked
    /// after `park_after`, the later `canary.failed` then sets weight 0, and the parked action,
    /// overridden by it, is skipped rather than ever applied after it.
    #[tokio::test]
    async fn a_stuck_haproxy_action_is_parked_and_never_undoes_a_later_one() {
        use crate::events::EventType;
        use crate::store::Kind;

        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, crate::store::StoreCounters::default()).expect("open");
        let (haproxy, url) = FakeHaproxy::start(Some(20)).await;
        store
            .put_subscription(&Subscription {
                id: "h".into(),
                url,
                events: vec![EventType::CanaryStagePassed, EventType::CanaryFailed],
                kind: Kind::Haproxy,
                secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
                created_at: "2026-01-05T00:00:00Z".into(),
                disabled: None,
            })
            .expect("subscribe");
        let mut stage = action("2.0", 20);
        stage.event_type = EventType::CanaryStagePassed;
        let mut failed = action("2.0", 0);
        failed.event_type = EventType::CanaryFailed;
        let mut events = vec![stage, failed];
        store.append_events(&mut events, 100).expect("append");
        let stage_seq = events[0].seq;

        let start = 1_767_571_200_000;
        let clock = ManualClock::new(start);
        let config = DeliveryConfig {
            park_after: Duration::from_secs(60),
            haproxy_servers: "prod/shop/2.0=be/canary".parse().expect("servers"),
            ..DeliveryConfig::default()
        };
        let stats = Arc::new(Stats::new());
        let dispatcher = dispatching_on(&store, stats.clone(), config, &clock).await;
        run_until(&clock, || haproxy.applied() == [0]).await;
        let waited = clock.now_ms() - start;
        assert!(
            waited <= 60_000,
            "canary.failed waited {waited} ms behind the stuck action"
        );
        let stuck = store.find_delivery("h", stage_seq).expect("read").expect("kept");
        assert_eq!(stuck.state, DeliveryState::Skipped, "{stuck:?}");
        assert!(stuck.attempts >= 2, "{stuck:?}");
        assert!(
            stuck
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("superseded")),
            "{stuck:?}"
        );
        // HAProxy would take weight 20 now; a day passes and it is never set after the 0.
        *haproxy.refused.lock().expect("lock") = None;
        let day_later = clock.now_ms() + 24 * 3_600_000;
        run_until(&clock, || clock.now_ms() >= day_later).await;
        assert_eq!(haproxy.applied(), [0]);
        assert_eq!(store.parked_count(), 0);
        assert_eq!(stats.parked.get(), 0);
        dispatcher.stop().await;
    }

    /// What a crash would leave: the store as it is on disk now, copied and opened apart.
    fn as_on_disk(dir: &std::path::Path) -> Store {
        fn copy(from: &std::path::Path, to: &std::path::Path) {
            std::fs::create_dir_all(to).expect("mkdir");
            for entry in std::fs::read_dir(from).expect("read dir") {
                let entry = entry.expect("entry");
                let target = to.join(entry.file_name());
                if entry.file_type().expect("type").is_dir() {
                    copy(&entry.path(), &target);
                } else {
                    std::fs::copy(entry.path(), &target).expect("copy");
                }
            }
        }
        let copied = tempfile::tempdir().expect("tempdir").keep();
        copy(dir, &copied);
        Store::open(&copied, 1 << 20, crate::store::StoreCounters::default()).expect("open the copy")
    }

    /// Records are not flushed one by one on the way from one delivery to the next, but they do
    /// reach the disk behind the workers, with no other write to carry them: a crash after that
    /// does not send them again.
    #[tokio::test]
    async fn delivery_records_reach_the_disk_behind_the_worker() {
        use crate::events::EventType;
        use crate::store::Kind;

        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, crate::store::StoreCounters::default()).expect("open");
        let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = received.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let router = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async { axum::http::StatusCode::NO_CONTENT }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, router).await });
        store
            .put_subscription(&Subscription {
                id: "w".into(),
                url,
                events: vec![EventType::CanaryFailed],
                kind: Kind::Webhook,
                secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
                created_at: "2026-01-05T00:00:00Z".into(),
                disabled: None,
            })
            .expect("subscribe");
        let mut events: Vec<Event> = ["2.0", "2.1", "2.2"]
            .into_iter()
            .map(|version| {
                let mut failed = action(version, 0);
                failed.event_type = EventType::CanaryFailed;
                failed.data.canary_version = Some(version.into());
                failed.identify();
                failed
            })
            .collect();
        store.append_events(&mut events, 100).expect("append");
        let (dispatcher, shutdown) = dispatching(&store, DeliveryConfig::default()).await;

        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let delivered = |store: &Store| {
            events.iter().all(|event| {
                store
                    .find_delivery("w", event.seq)
                    .expect("read")
                    .is_some_and(|d| d.state == DeliveryState::Delivered)
            })
        };
        while !delivered(&store) {
            assert!(tokio::time::Instant::now() < deadline, "not delivered in time");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(received.load(Ordering::SeqCst), 3);
        while !delivered(&as_on_disk(dir.path())) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the delivered records never reached the disk"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
        dispatcher.stop().await;
    }

    /// What the lanes tests' receiver saw: requests in flight (all, by app) and the most at
    /// once, the ids of every request, and the events it accepted, by app, in the order they
    /// arrived.
    #[derive(Default)]
    struct Seen {
        in_flight: usize,
        most_in_flight: usize,
        app_in_flight: HashMap<String, usize>,
        most_of_one_app: usize,
        requested: Vec<String>,
        /// At each request's arrival, how many were in flight with it.
        in_flight_at_each: Vec<usize>,
        accepted: HashMap<String, Vec<String>>,
    }

    impl Seen {
        fn accepted_count(&self) -> usize {
            self.accepted.values().map(Vec::len).sum()
        }

        /// Each of `apps` got its events among `events` once each, in order.
        fn assert_each_app_in_order(&self, apps: &[String], events: &[Event]) {
            for app in apps {
                let sent: Vec<&str> = events
                    .iter()
                    .filter(|e| &e.data.app == app)
                    .map(|e| e.id.as_str())
                    .collect();
                assert_eq!(self.accepted[app], sent, "{app}'s events once each, in order");
            }
        }
    }

    /// A dispatcher on `clock` with its workers started, counting into `stats`.
    async fn dispatching_on(
        store: &Store,
        stats: Arc<Stats>,
        config: DeliveryConfig,
        clock: &Arc<ManualClock>,
    ) -> Arc<Dispatcher> {
        let dispatcher = Dispatcher::with_clock(
            store.clone(),
            stats,
            config,
            Clock::Manual(clock.clone()),
            CancellationToken::new(),
        )
        .expect("a dispatcher");
        dispatcher.sync().await;
        dispatcher
    }

    /// A dispatcher on the system's clock with its workers started, and what stops it.
    async fn dispatching(store: &Store, config: DeliveryConfig) -> (Arc<Dispatcher>, CancellationToken) {
        let shutdown = CancellationToken::new();
        let dispatcher = Dispatcher::new(store.clone(), Arc::new(Stats::new()), config, shutdown.clone())
            .expect("a dispatcher");
        dispatcher.sync().await;
        (dispatcher, shutdown)
    }

    /// A webhook receiver that holds each request 100 ms and refuses (503) the app "broken"'s
    /// events, and every event while `down`; its URL.
    async fn lanes_receiver(seen: Arc<Mutex<Seen>>, down: Arc<std::sync::atomic::AtomicBool>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let router = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (state, down) = (seen.clone(), down.clone());
                async move {
                    let event: serde_json::Value = serde_json::from_slice(&body).expect("an event");
                    let app = event["data"]["app"].as_str().expect("app").to_owned();
                    let id = event["id"].as_str().expect("id").to_owned();
                    {
                        let mut seen = state.lock().expect("lock");
                        seen.requested.push(id.clone());
                        seen.in_flight += 1;
                        let now = seen.in_flight;
                        seen.in_flight_at_each.push(now);
                        seen.most_in_flight = seen.most_in_flight.max(now);
                        let mine = seen.app_in_flight.entry(app.clone()).or_default();
                        *mine += 1;
                        let mine = *mine;
                        seen.most_of_one_app = seen.most_of_one_app.max(mine);
                    }
                    // Held a while, so that what is sent side by side overlaps here.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let mut seen = state.lock().expect("lock");
                    seen.in_flight -= 1;
                    *seen.app_in_flight.entry(app.clone()).or_default() -= 1;
                    if app == "broken" || down.load(Ordering::SeqCst) {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    seen.accepted.entry(app).or_default().push(id);
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, router).await });
        url
    }

    /// A store with a webhook subscription "w" to `url` and `events` appended, each a
    /// `canary.failed` of (app, n).
    fn lanes_store(dir: &std::path::Path, url: String, events: &[(&str, usize)]) -> (Store, Vec<Event>) {
        use crate::events::EventType;
        use crate::store::Kind;

        let store = Store::open(dir, 1 << 20, crate::store::StoreCounters::default()).expect("open");
        store
            .put_subscription(&Subscription {
                id: "w".into(),
                url,
                events: vec![EventType::CanaryFailed],
                kind: Kind::Webhook,
                secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
                created_at: "2026-01-05T00:00:00Z".into(),
                disabled: None,
            })
            .expect("subscribe");
        let mut events: Vec<Event> = events
            .iter()
            .map(|&(app, n)| {
                let mut failed = action("2.0", 0);
                failed.event_type = EventType::CanaryFailed;
                failed.data.app = app.to_owned();
                failed.data.canary_version = Some(format!("2.{n}"));
                failed.identify();
                failed
            })
            .collect();
        store.append_events(&mut events, 1_000).expect("append");
        (store, events)
    }

    /// Waits up to 30 s for `done` to hold of what the receiver saw.
    async fn until_seen(seen: &Mutex<Seen>, what: &str, done: impl Fn(&Seen) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done(&seen.lock().expect("lock")) {
            assert!(tokio::time::Instant::now() < deadline, "{what}: not in time");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A webhook's decisions for many apps go out side by side, up to `MAX_IN_FLIGHT`, each
    /// app's one at a time and in order, and an app whose deliveries keep failing holds back no
    /// other app's.
    #[tokio::test]
    async fn a_webhook_sends_each_apps_events_in_order_and_apps_side_by_side() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let url = lanes_receiver(seen.clone(), Arc::default()).await;
        // The broken app's event first, at the head of the queue; then three events each of
        // twelve apps, interleaved; then the broken app's second.
        let apps: Vec<String> = (0..12).map(|i| format!("app-{i}")).collect();
        let mut queued = vec![("broken", 0)];
        for n in 0..3 {
            queued.extend(apps.iter().map(|app| (app.as_str(), n)));
        }
        queued.push(("broken", 1));
        let (store, events) = lanes_store(dir.path(), url, &queued);
        let (dispatcher, shutdown) = dispatching(&store, DeliveryConfig::default()).await;

        until_seen(&seen, "every healthy app's events delivered", |seen| {
            seen.accepted_count() == 3 * apps.len()
        })
        .await;
        let seen = std::mem::take(&mut *seen.lock().expect("lock"));
        seen.assert_each_app_in_order(&apps, &events);
        assert_eq!(seen.most_of_one_app, 1, "one app's deliveries one at a time");
        assert!(
            seen.most_in_flight > 1 && seen.most_in_flight <= MAX_IN_FLIGHT,
            "side by side, at most {MAX_IN_FLIGHT}: {}",
            seen.most_in_flight
        );
        // The broken app's delivery still waits for its retry, at the head of its own lane.
        let broken = store
            .find_delivery("w", events[0].seq)
            .expect("read")
            .expect("kept");
        assert_eq!(broken.state, DeliveryState::Pending, "{broken:?}");
        assert!(broken.attempts >= 1, "{broken:?}");
        let behind = store
            .find_delivery("w", events[events.len() - 1].seq)
            .expect("read")
            .expect("kept");
        assert_eq!(
            behind.attempts, 0,
            "sent before its app's earlier event: {behind:?}"
        );
        drop(seen);
        shutdown.cancel();
        dispatcher.stop().await;
    }

    /// A receiver that is down is not sent one retried head per app: lanes open one at a time
    /// while it takes nothing, and no more once `MAX_FAILING_LANES` heads are failing. When it
    /// is back, every app's events arrive, each app's in order.
    #[tokio::test]
    async fn a_receiver_that_is_down_sees_few_heads_retried_not_one_per_app() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let url = lanes_receiver(seen.clone(), down.clone()).await;
        let apps: Vec<String> = (0..12).map(|i| format!("app-{i}")).collect();
        let mut queued = Vec::new();
        for n in 0..2 {
            queued.extend(apps.iter().map(|app| (app.as_str(), n)));
        }
        let (store, events) = lanes_store(dir.path(), url, &queued);
        let config = DeliveryConfig {
            first_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            ..DeliveryConfig::default()
        };
        let (dispatcher, shutdown) = dispatching(&store, config).await;

        // About a second of retries: enough for a lane to be opened every 100 ms without the cap.
        until_seen(&seen, "40 attempts", |seen| seen.requested.len() >= 40).await;
        let tried: HashSet<String> = seen.lock().expect("lock").requested.iter().cloned().collect();
        assert!(
            tried.len() <= 2,
            "{} events tried while the receiver was down (MAX_FAILING_LANES is 2)",
            tried.len()
        );
        down.store(false, Ordering::SeqCst);
        until_seen(&seen, "every event delivered", |seen| {
            seen.accepted_count() == events.len()
        })
        .await;
        let seen = std::mem::take(&mut *seen.lock().expect("lock"));
        seen.assert_each_app_in_order(&apps, &events);
        assert!(seen.most_in_flight > 1, "side by side once it was back");
        shutdown.cancel();
        dispatcher.stop().await;
    }

    /// While the receiver is down, heads park, new lanes open as failing ones park, and parked
    /// deliveries are retried on their backoff, the worker coming back to its clock between
    /// attempts (the driver moves a manual clock only while the worker waits on it: a worker
    /// that looked again and again without waiting would stop it).
    #[tokio::test]
    async fn parked_deliveries_are_retried_while_new_lanes_wait_for_the_receiver() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let url = lanes_receiver(seen, down).await;
        let queued: Vec<(String, usize)> = (0..6).map(|i| (format!("app-{i}"), 0)).collect();
        let queued: Vec<(&str, usize)> = queued.iter().map(|(app, n)| (app.as_str(), *n)).collect();
        let (store, _) = lanes_store(dir.path(), url, &queued);
        let clock = ManualClock::new(1_767_571_200_000);
        let config = DeliveryConfig {
            park_after: Duration::from_secs(2),
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(4),
            ..DeliveryConfig::default()
        };
        let dispatcher = dispatching_on(&store, Arc::new(Stats::new()), config, &clock).await;
        run_until(&clock, || {
            store
                .parked("w")
                .expect("read")
                .iter()
                .any(|(_, d)| d.attempts >= 5)
        })
        .await;
        dispatcher.stop().await;
    }

    /// A parked delivery that is due goes out even while every due head is a new lane that may
    /// not open (the receiver down, two heads failing): those heads are not due for this worker,
    /// so they take no turn from it. When they counted as due, the parked one waited for a turn
    /// that only a head's start gives, and the worker looked again and again, at once, until a
    /// failing head's retry came: a spin, the parked delivery not tried. The clock stands still
    /// here, so only what is due now can go.
    #[tokio::test]
    async fn a_parked_delivery_due_goes_while_new_lanes_may_not_open() {
        use crate::store::DeliveryState;
        let dir = tempfile::tempdir().expect("tempdir");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let url = lanes_receiver(seen.clone(), down).await;
        let queued = [
            ("parked", 0),
            ("failing-1", 0),
            ("failing-2", 0),
            ("new-1", 0),
            ("new-2", 0),
        ];
        let (store, events) = lanes_store(dir.path(), url, &queued);
        let now = 1_767_571_200_000;
        for (seq, mut delivery) in store.next_deliveries("w", 16).expect("read") {
            match events
                .iter()
                .find(|e| e.id == delivery.event_id)
                .map(|e| e.data.app.as_str())
            {
                Some("parked") => {
                    delivery.state = DeliveryState::Parked;
                    delivery.attempts = 6;
                    delivery.first_attempt_ms = Some(now - 600_000);
                    delivery.next_attempt_ms = now;
                }
                Some("failing-1" | "failing-2") => {
                    delivery.attempts = 2;
                    delivery.first_attempt_ms = Some(now - 10_000);
                    delivery.next_attempt_ms = now + 60_000;
                    delivery.last_status = Some(503);
                }
                _ => continue,
            }
            store.put_delivery("w", seq, &delivery).expect("write");
        }
        assert_eq!(store.parked("w").expect("read").len(), 1);
        let clock = ManualClock::new(now);
        let dispatcher =
            dispatching_on(&store, Arc::new(Stats::new()), DeliveryConfig::default(), &clock).await;
        let parked_id = &events[0].id;
        until_seen(&seen, "the parked delivery tried", |seen| {
            seen.requested.contains(parked_id)
        })
        .await;
        // Its failure (the receiver is down) is recorded before anything else could start.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while store.parked("w").expect("read")[0].1.attempts < 7 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the parked attempt not recorded"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            seen.lock().expect("lock").requested,
            vec![parked_id.clone()],
            "no new lane opened while two heads were failing and the receiver took nothing"
        );
        dispatcher.stop().await;
    }

    /// A backlog is drained one delivery at a time (lanes side by side are for one moment's
    /// decisions), and side by side again once little is left.
    #[tokio::test]
    async fn a_backlog_is_drained_one_delivery_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let url = lanes_receiver(seen.clone(), Arc::default()).await;
        let apps: Vec<String> = (0..LOOK_AHEAD + 8).map(|i| format!("app-{i}")).collect();
        let queued: Vec<(&str, usize)> = apps.iter().map(|app| (app.as_str(), 0)).collect();
        let (store, _) = lanes_store(dir.path(), url, &queued);
        let (dispatcher, shutdown) = dispatching(&store, DeliveryConfig::default()).await;
        until_seen(&seen, "the backlog delivered", |seen| {
            seen.accepted_count() == apps.len()
        })
        .await;
        let at_each = std::mem::take(&mut seen.lock().expect("lock").in_flight_at_each);
        let drained = apps.len() - BACKLOG_LOOK_AHEAD;
        assert!(
            at_each[..drained].iter().all(|&n| n == 1),
            "side by side while a backlog drained: {at_each:?}"
        );
        assert!(
            at_each[drained..].iter().any(|&n| n > 1),
            "one at a time once little was left: {at_each:?}"
        );
        shutdown.cancel();
        dispatcher.stop().await;
    }

    #[test]
    fn a_move_is_partial_when_one_lever_applied_it_and_another_did_not() {
        let lever = |outcome: &str| LeverOutcome {
            subscription: format!("sub_{outcome}"),
            kind: "haproxy".into(),
            outcome: outcome.into(),
            attempts: 1,
            error: None,
        };
        assert!(is_partial(&[lever("applied"), lever("failed")]));
        assert!(
            is_partial(&[lever("partial")]),
            "HAProxy's weights applied, its maps not"
        );
        assert!(
            !is_partial(&[lever("applied"), lever("pending")]),
            "not tried yet is no failure"
        );
        assert!(
            !is_partial(&[lever("failed"), lever("failed")]),
            "nothing applied: no split"
        );
        assert!(!is_partial(&[lever("applied"), lever("applied")]));
        assert!(partly_applied(
            "weights applied; maps: HAProxy refused \"add map\": x"
        ));
        assert!(
            partly_applied("weights and maps applied; routes: x"),
            "lever names only"
        );
        assert!(!partly_applied("maps: the answer said weights applied; no"));
        assert!(!partly_applied("cannot reach the runtime API"));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let config = DeliveryConfig::default();
        assert_eq!(backoff(1, &config, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(2, &config, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(4, &config, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(40, &config, 1.0), Duration::from_secs(15 * 60));
    }
}
