//! The daemon's own health counters, rendered on `/metrics` in the Prometheus text format.
//!
//! Every stage counts what it accepted, refused and dropped here, in one place, so that what the
//! daemon did with its input can always be accounted for: items accepted by the receivers equal
//! items the engine catalogued plus those the caps dropped.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use canaryd_engine::{Cap, IngestReport};

use crate::events::EventType;
use crate::store::StoreCounters;

/// The three OTLP signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    Traces,
    Metrics,
    Logs,
}

impl Signal {
    pub const ALL: [Signal; 3] = [Signal::Traces, Signal::Metrics, Signal::Logs];

    pub fn name(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
            Signal::Logs => "logs",
        }
    }

    /// What one item of this signal is called in messages.
    pub fn items(self) -> &'static str {
        match self {
            Signal::Traces => "spans",
            Signal::Metrics => "data points",
            Signal::Logs => "log records",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Grpc,
    Http,
}

impl Transport {
    pub const ALL: [Transport; 2] = [Transport::Grpc, Transport::Http];

    pub fn name(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Http => "http",
        }
    }
}

/// A histogram every thread observes into with atomic adds alone. prometheus-client's own takes a
/// write lock for each observation, and every OTLP request observes two (its slot's wait, its time
/// here): one lock all connections would take in turn (issue 16, item 5).
#[derive(Clone, Debug)]
pub struct Histogram {
    inner: std::sync::Arc<HistogramInner>,
}

#[derive(Debug)]
struct HistogramInner {
    /// Upper bounds, ascending; the last is +Inf.
    bounds: Box<[f64]>,
    /// Observations in each bucket alone (not cumulative).
    counts: Box<[AtomicU64]>,
    /// The sum of the observations, as an f64's bits.
    sum: AtomicU64,
}

impl Histogram {
    /// Buckets up to each of `bounds` (ascending), and one more past the last.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Histogram {
        let bounds: Box<[f64]> = bounds.into_iter().chain([f64::MAX]).collect();
        let counts = bounds.iter().map(|_| AtomicU64::new(0)).collect();
        Histogram {
            inner: std::sync::Arc::new(HistogramInner {
                bounds,
                counts,
                sum: AtomicU64::new(0f64.to_bits()),
            }),
        }
    }

    pub fn observe(&self, value: f64) {
        let inner = &*self.inner;
        let last = inner.counts.len() - 1;
        // NaN is under no bound: counted past them all, so that the count is the buckets'.
        let bucket = if value.is_nan() {
            last
        } else {
            inner.bounds.partition_point(|upper| *upper < value).min(last)
        };
        inner.counts[bucket].fetch_add(1, Relaxed);
        let _ = inner.sum.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + value).to_bits())
        });
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &*self.inner;
        let buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .zip(inner.counts.iter())
            .map(|(upper, count)| (*upper, count.load(Relaxed)))
            .collect();
        // The count is the buckets' own, so that it equals the +Inf bucket whatever is observed
        // meanwhile; the sum may be one observation ahead or behind.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = f64::from_bits(inner.sum.load(Relaxed));
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Buckets for the waits and steps on a request's or a decision's way (half a millisecond up).
const WAIT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type Labels3 = [(&'static str, &'static str); 3];

/// All of the daemon's own metrics. What each accepted OTLP request counts in is resolved once
/// (`accepted`, `otlp_request_by`), so that the receivers touch atomics only: a family's lookup
/// takes its lock (shared, but one lock for all connections).
pub struct Stats {
    registry: Registry,
    requests: Family<Labels3, Counter>,
    /// By signal and transport.
    accepted: [[Accepted; 2]; 3],
    /// `otlp_request_seconds` by transport.
    otlp_request_by: [Histogram; 2],
    truncated_values: Counter,
    series_keys_forgotten: Counter,
    capped: Family<Labels2, Counter>,
    pub batches_ingested: Counter,
    /// Resources the receivers summed where they read them (`receive::Intake`).
    pub resources_summed: Counter,
    engine_busy_ratio: Gauge<f64, AtomicU64>,
    pub queue_depth: Gauge,
    /// Closed windows the engine has yet to learn from (its learning waits for idle moments).
    pub unlearned_windows: Gauge,
    pub apps_tracked: Gauge,
    pub late_observations: Counter,
    pub future_observations: Counter,
    apps_archived: Counter,
    /// Apps moved to the store because the baselines were over `max_baseline_memory_bytes`.
    pub apps_paged_out: Counter,
    apps_restored: Counter,
    gate_pins_forgotten: Counter,
    /// Versions whose promotion-chain verdicts the judge forgot at its cap.
    pub chain_verdicts_forgotten: Counter,
    pub windows_closed: Counter,
    pub flushes: Counter,
    pub flush_errors: Counter,
    flush_seconds: Histogram,
    pub baselines: Gauge,
    pub baseline_memory_bytes: Gauge,
    engine_memory_bytes: Family<Labels1, Gauge>,
    pub store_disk_bytes: Gauge,
    store: StoreCounters,
    events: Family<Labels1, Counter>,
    pub event_errors: Counter,
    deliveries: Family<Vec<(&'static str, String)>, Counter>,
    traffic_reconciles: Family<Vec<(&'static str, String)>, Counter>,
    delivery_seconds: Histogram,
    act_seconds: Histogram,
    act_after_stored_seconds: Histogram,
    delivery_record_seconds: Histogram,
    engine_step_seconds: Family<Labels1, Histogram, fn() -> Histogram>,
    engine_queue_wait_seconds: Histogram,
    ingest_slot_wait_seconds: Histogram,
    /// Decided-at times dropped at their cap before their first delivery attempt.
    pub act_timings_dropped: Counter,
    pub outbox_depth: Gauge,
    pub parked: Gauge,
    /// The engine thread's busy share over its last whole second (`time_step`).
    engine_busy: EngineBusy,
}

/// The counters an accepted request of one signal and transport counts in.
struct Accepted {
    ok: Counter,
    partial: Counter,
    items: Counter,
    rejected_items: Counter,
}

/// How busy the engine's thread was over its last whole second of steps, kept by that thread
/// (`Stats::time_step`) and read by the receivers, which take work off it when it is busy
/// (`receive::Intake`). Written by one thread only, so relaxed atomics suffice.
struct EngineBusy {
    since: std::time::Instant,
    /// Where the current second began, in nanoseconds from `since`.
    window_start_ns: AtomicU64,
    /// Time in steps since then.
    busy_ns: AtomicU64,
    /// The share of the last whole second, in thousandths.
    share_permille: AtomicU64,
}

impl Default for EngineBusy {
    fn default() -> Self {
        EngineBusy {
            since: std::time::Instant::now(),
            window_start_ns: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            share_permille: AtomicU64::new(0),
        }
    }
}

impl EngineBusy {
    /// Counts a step that took `took` and ended now.
    fn step(&self, took: std::time::Duration) {
        self.step_at(self.since.elapsed().as_nanos() as u64, took);
    }

    /// `step`, ended `now` nanoseconds after `since`.
    fn step_at(&self, now: u64, took: std::time::Duration) {
        let busy = self.busy_ns.load(Relaxed) + took.as_nanos() as u64;
        let start = self.window_start_ns.load(Relaxed);
        let span = now.saturating_sub(start);
        if span >= 1_000_000_000 {
            self.share_permille
                .store((busy.min(span) * 1_000 / span).min(1_000), Relaxed);
            self.window_start_ns.store(now, Relaxed);
            self.busy_ns.store(0, Relaxed);
        } else {
            self.busy_ns.store(busy, Relaxed);
        }
    }

    /// The last whole second's busy share (0 to 1); a thread idle for longer than a second (no
    /// step to close its second) reads as it last was, which a busy one never is.
    fn share(&self) -> f64 {
        self.share_at(self.since.elapsed().as_nanos() as u64)
    }

    /// `share`, read `now` nanoseconds after `since`.
    fn share_at(&self, now: u64) -> f64 {
        if now.saturating_sub(self.window_start_ns.load(Relaxed)) > 2_000_000_000 {
            return 0.0;
        }
        self.share_permille.load(Relaxed) as f64 / 1_000.0
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        let mut registry = Registry::default();
        let requests = Family::<Labels3, Counter>::default();
        registry.register(
            "canaryd_otlp_requests",
            "OTLP export requests by signal, transport and outcome",
            requests.clone(),
        );
        let accepted_items = Family::<Labels2, Counter>::default();
        registry.register(
            "canaryd_otlp_accepted_items",
            "Spans, data points and log records accepted and handed to the engine",
            accepted_items.clone(),
        );
        let rejected_items = Family::<Labels2, Counter>::default();
        registry.register(
            "canaryd_otlp_rejected_items",
            "Items refused in partial_success (unusable, or from a resource without service.name)",
            rejected_items.clone(),
        );
        let truncated_values = Counter::default();
        registry.register(
            "canaryd_truncated_values",
            "Attribute values cut to max_attribute_value_len, values nested too deep emptied, and metric attributes left out of series keys",
            truncated_values.clone(),
        );
        let series_keys_forgotten = Counter::default();
        registry.register(
            "canaryd_metric_series_keys_forgotten",
            "Metric series keys the receivers' threads stopped keeping (over 4,096 or 1 MiB a thread); each is made again from its point's attributes",
            series_keys_forgotten.clone(),
        );
        let capped = Family::<Labels2, Counter>::default();
        registry.register(
            "canaryd_capped_observations",
            "Observations that ran into a cap, by cap and by what became of them (dropped, or folded into __overflow__)",
            capped.clone(),
        );
        let batches_ingested = Counter::default();
        registry.register(
            "canaryd_engine_batches",
            "Batches the engine has ingested",
            batches_ingested.clone(),
        );
        let resources_summed = Counter::default();
        registry.register(
            "canaryd_otlp_resources_summed",
            "Resources the receivers summed per second where they read them, taking that work off the engine's \
             thread while it was busy (receivers_sum_from_engine_busy); the others the engine adds one by one",
            resources_summed.clone(),
        );
        let engine_busy_ratio = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "canaryd_engine_busy_ratio",
            "Share of its last whole second the engine's thread spent in steps (0 to 1)",
            engine_busy_ratio.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "canaryd_pipeline_queue_depth",
            "Batches waiting between the receivers and the engine",
            queue_depth.clone(),
        );
        let unlearned_windows = Gauge::default();
        registry.register(
            "canaryd_engine_unlearned_windows",
            "Closed windows of apps not under analysis that the engine has yet to learn from: \
             learning waits for the engine's idle moments, and falls behind only when it has none",
            unlearned_windows.clone(),
        );
        let apps_tracked = Gauge::default();
        registry.register(
            "canaryd_apps_tracked",
            "Apps (env, app) in the catalog",
            apps_tracked.clone(),
        );
        let late_observations = Counter::default();
        registry.register(
            "canaryd_late_observations",
            "Observations that arrived after their event-time bucket had closed (past allowed_lateness_secs)",
            late_observations.clone(),
        );
        let future_observations = Counter::default();
        registry.register(
            "canaryd_future_observations",
            "Observations refused for being dated more than max_clock_skew_secs ahead of both their app's event time and canaryd's clock",
            future_observations.clone(),
        );
        let apps_paged_out = Counter::default();
        registry.register(
            "canaryd_apps_paged_out",
            "Apps moved from memory to the store because the baselines took more than max_baseline_memory_bytes; each comes back whole when seen again (counted in canaryd_apps_restored_total)",
            apps_paged_out.clone(),
        );
        let apps_archived = Counter::default();
        registry.register(
            "canaryd_apps_archived",
            "Apps idle for app_idle_secs moved out of memory (their state kept in the store) to make room for new apps under max_apps",
            apps_archived.clone(),
        );
        let apps_restored = Counter::default();
        registry.register(
            "canaryd_apps_restored",
            "Archived apps brought back from the store when they were seen again",
            apps_restored.clone(),
        );
        let gate_pins_forgotten = Counter::default();
        registry.register(
            "canaryd_gate_pins_forgotten",
            "Flagger revisions whose pinned canary version was forgotten to keep the gate's pins within their cap (4096)",
            gate_pins_forgotten.clone(),
        );
        let chain_verdicts_forgotten = Counter::default();
        registry.register(
            "canaryd_chain_verdicts_forgotten",
            "Versions whose verdicts (promoted or failed, per environment) the promotion chains forgot to stay within their cap (65536); such a version reads as not yet promoted",
            chain_verdicts_forgotten.clone(),
        );
        let windows_closed = Counter::default();
        registry.register(
            "canaryd_windows_closed",
            "Evaluation windows closed, over all versions",
            windows_closed.clone(),
        );
        let flushes = Counter::default();
        registry.register(
            "canaryd_store_flushes",
            "Flushes of engine state to disk",
            flushes.clone(),
        );
        let flush_errors = Counter::default();
        registry.register(
            "canaryd_store_flush_errors",
            "Flushes that failed",
            flush_errors.clone(),
        );
        let flush_seconds = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "canaryd_store_flush_seconds",
            "Time the store's writer took to write each periodic flush of engine state and make it durable (on its own thread; the engine goes on meanwhile)",
            flush_seconds.clone(),
        );
        let baselines = Gauge::default();
        registry.register(
            "canaryd_baselines",
            "Feature baselines held (versions and apps)",
            baselines.clone(),
        );
        let engine_memory_bytes = Family::<Labels1, Gauge>::default();
        registry.register(
            "canaryd_engine_memory_bytes",
            "About the memory the engine's state holds, by part: baselines (learned), buckets (open event-time buckets and windows being rolled up), analyses (the canaries' and stables' recent history), analysis_merges (the merges of that history kept for the next look), analysis_evidence (the analyses' sequential evidence, last look's checks and failing streaks); read at each flush",
            engine_memory_bytes.clone(),
        );
        let baseline_memory_bytes = Gauge::default();
        registry.register(
            "canaryd_baseline_memory_bytes",
            "Bytes the baselines hold in memory",
            baseline_memory_bytes.clone(),
        );
        let store_disk_bytes = Gauge::default();
        registry.register(
            "canaryd_store_disk_bytes",
            "Bytes sled uses on disk",
            store_disk_bytes.clone(),
        );
        let store = StoreCounters::default();
        registry.register(
            "canaryd_store_records_written",
            "Records written to the store",
            store.records_written.clone(),
        );
        registry.register(
            "canaryd_store_records_skipped",
            "Stored records of an unknown format, skipped",
            store.records_skipped.clone(),
        );
        registry.register(
            "canaryd_events_duplicate",
            "Events left out of the history because one of the same id (the same decision) was stored already",
            store.duplicate_events.clone(),
        );
        registry.register(
            "canaryd_store_slots_read",
            "Seasonal slots read from the store on the engine's thread: at an hour's turn, those no read ahead held",
            store.slots_read.clone(),
        );
        registry.register(
            "canaryd_store_slots_read_ahead",
            "Seasonal slots read on the store's writer thread ahead of their hour's turn",
            store.slots_read_ahead.clone(),
        );
        registry.register(
            "canaryd_store_slot_errors",
            "Seasonal slots that could not be read or written",
            store.slot_errors.clone(),
        );
        let events = Family::<Labels1, Counter>::default();
        registry.register(
            "canaryd_events",
            "Events emitted (stored), by type",
            events.clone(),
        );
        for t in EventType::ALL {
            events.get_or_create(&[("type", t.as_str())]).inc_by(0);
        }
        let event_errors = Counter::default();
        registry.register(
            "canaryd_event_errors",
            "Events that could not be stored, and so were not emitted",
            event_errors.clone(),
        );
        let deliveries = Family::<Vec<(&'static str, String)>, Counter>::default();
        registry.register(
            "canaryd_deliveries",
            "Delivery attempts by subscription and outcome (delivered, retry, parked: taken off the queue, expired: retry window over or event gone, gone, skipped)",
            deliveries.clone(),
        );
        let traffic_reconciles = Family::<Vec<(&'static str, String)>, Counter>::default();
        registry.register(
            "canaryd_traffic_reconciles",
            "Comparisons of HAProxy's maps with the latest route of each app, by subscription and outcome (held: HAProxy had it; corrected: it had drifted and was put back; failed)",
            traffic_reconciles.clone(),
        );
        let delivery_seconds =
            Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        registry.register(
            "canaryd_delivery_seconds",
            "Time of each webhook request, answer or failure",
            delivery_seconds.clone(),
        );
        // Finer around the 100 ms aim (issue 16), so that a p99 just past it reads so.
        let act_buckets = [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0,
        ];
        let act_seconds = Histogram::new(act_buckets);
        registry.register(
            "canaryd_act_seconds",
            "Time to act: from the arrival of the OTLP request whose batch decided an event to its first delivery attempt leaving (webhook request or HAProxy command), once per subscription",
            act_seconds.clone(),
        );
        let engine_step_seconds: Family<Labels1, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| {
                Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])
            });
        registry.register(
            "canaryd_engine_step_seconds",
            "How long one step held the engine's thread, by kind (batch, read, operator, alert, flush, learning): every input queued meanwhile waits that long",
            engine_step_seconds.clone(),
        );
        let engine_queue_wait_seconds = Histogram::new(WAIT_BUCKETS);
        registry.register(
            "canaryd_engine_queue_wait_seconds",
            "How long each batch waited in the engine's queue: from its request read and normalized to the engine taking it (time to act, canaryd_act_seconds, starts earlier: at the request's arrival, before it waited for a slot and was read)",
            engine_queue_wait_seconds.clone(),
        );
        let act_after_stored_seconds = Histogram::new(act_buckets);
        registry.register(
            "canaryd_act_after_stored_seconds",
            "The part of canaryd_act_seconds after the deciding batch's events were stored: from then to the first delivery attempt leaving",
            act_after_stored_seconds.clone(),
        );
        let delivery_record_seconds = Histogram::new(WAIT_BUCKETS);
        registry.register(
            "canaryd_delivery_record_seconds",
            "Time to record each delivery attempt's outcome in the store: the next delivery of its lane (a webhook's app, or a lever's every event) waits for it",
            delivery_record_seconds.clone(),
        );
        let ingest_slot_wait_seconds = Histogram::new(WAIT_BUCKETS.into_iter().chain([5.0]));
        registry.register(
            "canaryd_ingest_slot_wait_seconds",
            "How long each OTLP request waited for one of the requests in flight that ingest_memory_bytes allows, before its body was read (those that waited all of ingest_wait were refused)",
            ingest_slot_wait_seconds.clone(),
        );
        let otlp_request_seconds: Family<Labels1, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(WAIT_BUCKETS.into_iter().chain([5.0])));
        registry.register(
            "canaryd_otlp_request_seconds",
            "How long each OTLP request accepted in whole or part took here, by transport: from its arrival (before it waited for a slot and its body was read) to its answer being ready",
            otlp_request_seconds.clone(),
        );
        let act_timings_dropped = Counter::default();
        registry.register(
            "canaryd_act_timings_dropped",
            "Decided events whose arrival time was dropped at its cap before their first delivery attempt, so not timed",
            act_timings_dropped.clone(),
        );
        let outbox_depth = Gauge::default();
        registry.register(
            "canaryd_outbox_depth",
            "Deliveries waiting in the outbox, over all subscriptions",
            outbox_depth.clone(),
        );
        let parked = Gauge::default();
        registry.register(
            "canaryd_deliveries_parked",
            "Deliveries parked (taken off their subscription's queue after failing at its head), over all subscriptions",
            parked.clone(),
        );
        let build_info = Family::<[(&'static str, &'static str); 1], Gauge<i64, AtomicI64>>::default();
        registry.register("canaryd_build_info", "canaryd's version", build_info.clone());
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        // Every series an accepted request counts in exists from the start, so that rates and
        // alerts see zeros, not gaps; its handles are kept (`Accepted`).
        let accepted = Signal::ALL.map(|signal| {
            Transport::ALL.map(|transport| {
                let labels = item_labels(signal, transport);
                let outcome = |outcome| {
                    requests
                        .get_or_create(&[labels[0], labels[1], ("outcome", outcome)])
                        .clone()
                };
                Accepted {
                    ok: outcome("ok"),
                    partial: outcome("partial"),
                    items: accepted_items.get_or_create(&labels).clone(),
                    rejected_items: rejected_items.get_or_create(&labels).clone(),
                }
            })
        });
        let otlp_request_by = Transport::ALL.map(|t| {
            otlp_request_seconds
                .get_or_create(&[("transport", t.name())])
                .clone()
        });
        for cap in Cap::ALL {
            capped.get_or_create(&cap_labels(cap)).inc_by(0);
        }
        Stats {
            registry,
            requests,
            accepted,
            otlp_request_by,
            truncated_values,
            series_keys_forgotten,
            capped,
            batches_ingested,
            resources_summed,
            engine_busy_ratio,
            queue_depth,
            unlearned_windows,
            apps_tracked,
            late_observations,
            future_observations,
            apps_archived,
            apps_paged_out,
            apps_restored,
            gate_pins_forgotten,
            chain_verdicts_forgotten,
            windows_closed,
            flushes,
            flush_errors,
            flush_seconds,
            baselines,
            baseline_memory_bytes,
            engine_memory_bytes,
            store_disk_bytes,
            store,
            events,
            event_errors,
            deliveries,
            traffic_reconciles,
            delivery_seconds,
            act_seconds,
            act_after_stored_seconds,
            delivery_record_seconds,
            engine_step_seconds,
            engine_queue_wait_seconds,
            ingest_slot_wait_seconds,
            act_timings_dropped,
            outbox_depth,
            parked,
            engine_busy: EngineBusy::default(),
        }
    }

    pub fn event(&self, event_type: EventType) {
        self.events.get_or_create(&[("type", event_type.as_str())]).inc();
    }

    /// Counts one delivery attempt's outcome, per subscription (ids are canaryd's own, so the
    /// label is safe to expose; there is one series per subscription and outcome).
    pub fn delivery(&self, subscription: &str, outcome: &'static str) {
        self.deliveries
            .get_or_create(&vec![
                ("subscription", subscription.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    /// One comparison of an app's HAProxy maps with its route.
    pub fn traffic_reconcile(&self, subscription: &str, outcome: &'static str) {
        self.traffic_reconciles
            .get_or_create(&vec![
                ("subscription", subscription.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    /// The engine's memory by part, as `Engine::memory` estimates it.
    pub fn engine_memory(&self, memory: canaryd_engine::EngineMemory) {
        for (part, bytes) in [
            ("baselines", memory.baselines),
            ("buckets", memory.buckets),
            ("analyses", memory.analyses),
            ("analysis_merges", memory.analysis_merges),
            ("analysis_evidence", memory.analysis_evidence),
        ] {
            self.engine_memory_bytes
                .get_or_create(&[("part", part)])
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    pub fn delivery_seconds(&self, elapsed: std::time::Duration) {
        self.delivery_seconds.observe(elapsed.as_secs_f64());
    }

    /// One periodic flush took `elapsed` of the engine's thread.
    pub fn flush_seconds(&self, elapsed: std::time::Duration) {
        self.flush_seconds.observe(elapsed.as_secs_f64());
    }

    /// One step of the engine's thread (`kind`: what it was) and how long it held the thread.
    pub fn engine_step(&self, kind: &'static str, took: std::time::Duration) {
        self.engine_step_seconds
            .get_or_create(&[("kind", kind)])
            .observe(took.as_secs_f64());
    }

    /// Runs `step` on the engine's thread and times it as an `engine_step` of `kind`.
    pub fn time_step<R>(&self, kind: &'static str, step: impl FnOnce() -> R) -> R {
        let started = std::time::Instant::now();
        let result = step();
        let took = started.elapsed();
        self.engine_step(kind, took);
        self.engine_busy.step(took);
        result
    }

    /// The engine thread's busy share over its last whole second of steps (0 to 1).
    pub fn engine_busy(&self) -> f64 {
        self.engine_busy.share()
    }

    /// An OTLP request over `transport`, accepted in whole or part, answered `took` after it
    /// arrived.
    pub fn otlp_request(&self, transport: Transport, took: std::time::Duration) {
        self.otlp_request_by[transport as usize].observe(took.as_secs_f64());
    }

    /// How long a request waited for its ingest slot.
    pub fn ingest_slot_wait(&self, waited: std::time::Duration) {
        self.ingest_slot_wait_seconds.observe(waited.as_secs_f64());
    }

    /// How long a batch waited in the engine's queue.
    pub fn engine_queue_wait(&self, waited: std::time::Duration) {
        self.engine_queue_wait_seconds.observe(waited.as_secs_f64());
    }

    pub fn act_seconds(&self, elapsed: std::time::Duration) {
        self.act_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn delivery_record_seconds(&self, elapsed: std::time::Duration) {
        self.delivery_record_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn act_after_stored_seconds(&self, elapsed: std::time::Duration) {
        self.act_after_stored_seconds.observe(elapsed.as_secs_f64());
    }

    /// The store's counters, registered here.
    pub fn store_counters(&self) -> StoreCounters {
        self.store.clone()
    }

    /// Counts one export request and, when it was taken, its accepted and rejected items.
    pub fn export(
        &self,
        signal: Signal,
        transport: Transport,
        outcome: &'static str,
        accepted: u64,
        rejected: u64,
    ) {
        let counters = &self.accepted[signal as usize][transport as usize];
        match outcome {
            "ok" => counters.ok.inc(),
            "partial" => counters.partial.inc(),
            // A refusal: its outcome's series is made at its first.
            _ => {
                let labels = item_labels(signal, transport);
                self.requests
                    .get_or_create(&[labels[0], labels[1], ("outcome", outcome)])
                    .inc()
            }
        };
        counters.items.inc_by(accepted);
        counters.rejected_items.inc_by(rejected);
    }

    /// Counts what ingesting one batch did.
    pub fn ingested(&self, apps: usize, report: &IngestReport) {
        self.batches_ingested.inc();
        self.apps_tracked.set(apps as i64);
        self.late_observations.inc_by(report.late);
        self.future_observations.inc_by(report.future);
        self.apps_archived.inc_by(report.apps_archived);
        self.apps_restored.inc_by(report.apps_restored);
        self.windows_closed.inc_by(report.windows_closed);
        for (cap, n) in &report.cap_hits {
            self.capped(*cap, *n);
        }
    }

    pub fn gate_pin_forgotten(&self) {
        self.gate_pins_forgotten.inc();
    }

    pub fn truncated(&self, n: u64) {
        self.truncated_values.inc_by(n);
    }

    pub fn series_keys_forgotten(&self, n: u64) {
        self.series_keys_forgotten.inc_by(n);
    }

    pub fn capped(&self, cap: Cap, n: u64) {
        self.capped.get_or_create(&cap_labels(cap)).inc_by(n);
    }

    /// Everything above in the OpenMetrics text format (what Prometheus asks for first).
    pub fn render_openmetrics(&self) -> String {
        self.render_openmetrics_with(&Registry::default())
    }

    /// Everything above and `more` (metrics made for this scrape), in the OpenMetrics text format.
    pub fn render_openmetrics_with(&self, more: &Registry) -> String {
        self.engine_busy_ratio.set(self.engine_busy());
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut text, &self.registry);
        let _ = encode_registry(&mut text, more);
        let _ = encode_eof(&mut text);
        text
    }

    /// Everything above in the classic Prometheus text format (0.0.4), for scrapers and people
    /// that do not ask for OpenMetrics.
    pub fn render_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.render_openmetrics())
    }

    /// `render_openmetrics_with` in the classic Prometheus text format.
    pub fn render_prometheus_with(&self, more: &Registry) -> String {
        openmetrics_to_prometheus(&self.render_openmetrics_with(more))
    }
}

/// Rewrites OpenMetrics text as Prometheus 0.0.4 text: counter families are named with their
/// `_total` suffix, as their samples are, and the `# EOF` marker goes.
fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match meta {
            Some(renamed) => out.push_str(&renamed),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn item_labels(signal: Signal, transport: Transport) -> Labels2 {
    [("signal", signal.name()), ("transport", transport.name())]
}

fn cap_labels(cap: Cap) -> Labels2 {
    let action = if cap.drops() { "dropped" } else { "folded" };
    [("cap", cap.name()), ("action", action)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_their_labels() {
        let stats = Stats::new();
        stats.export(Signal::Traces, Transport::Grpc, "ok", 512, 3);
        stats.capped(Cap::OperationsPerApp, 7);
        let text = stats.render_openmetrics();
        assert!(
            text.contains("canaryd_otlp_accepted_items_total{signal=\"traces\",transport=\"grpc\"} 512"),
            "{text}"
        );
        assert!(
            text.contains("canaryd_otlp_rejected_items_total{signal=\"traces\",transport=\"grpc\"} 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "canaryd_capped_observations_total{cap=\"max_operations_per_app\",action=\"folded\"} 7"
            ),
            "{text}"
        );
        assert!(text.contains("canaryd_otlp_accepted_items_total{signal=\"logs\",transport=\"http\"} 0"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn accepted_requests_count_in_their_own_series() {
        // The handles are indexed by discriminant, in the order `ALL` lists.
        assert!(Signal::ALL.iter().enumerate().all(|(i, s)| *s as usize == i));
        assert!(Transport::ALL.iter().enumerate().all(|(i, t)| *t as usize == i));
        let stats = Stats::new();
        stats.export(Signal::Logs, Transport::Http, "partial", 5, 2);
        stats.export(Signal::Metrics, Transport::Grpc, "ok", 7, 0);
        stats.export(Signal::Metrics, Transport::Grpc, "busy", 0, 0);
        stats.otlp_request(Transport::Http, std::time::Duration::from_millis(3));
        let text = stats.render_prometheus();
        for line in [
            "canaryd_otlp_requests_total{signal=\"logs\",transport=\"http\",outcome=\"partial\"} 1",
            "canaryd_otlp_requests_total{signal=\"logs\",transport=\"http\",outcome=\"ok\"} 0",
            "canaryd_otlp_rejected_items_total{signal=\"logs\",transport=\"http\"} 2",
            "canaryd_otlp_accepted_items_total{signal=\"metrics\",transport=\"grpc\"} 7",
            "canaryd_otlp_requests_total{signal=\"metrics\",transport=\"grpc\",outcome=\"busy\"} 1",
            "canaryd_otlp_request_seconds_count{transport=\"http\"} 1",
            "canaryd_otlp_request_seconds_bucket{le=\"0.005\",transport=\"http\"} 1",
            "canaryd_otlp_request_seconds_bucket{le=\"0.0025\",transport=\"http\"} 0",
            "canaryd_otlp_request_seconds_count{transport=\"grpc\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn a_histogram_counts_each_value_in_the_first_bucket_that_holds_it() {
        let histogram = Histogram::new([1.0, 2.0]);
        for value in [0.5, 1.0, 1.5, 2.5, f64::NAN] {
            histogram.observe(value);
        }
        let mut registry = Registry::default();
        registry.register("h", "h", histogram.clone());
        let mut text = String::new();
        encode_registry(&mut text, &registry).expect("encodes");
        for line in [
            "h_bucket{le=\"1.0\"} 2",
            "h_bucket{le=\"2.0\"} 3",
            "h_bucket{le=\"+Inf\"} 5",
            "h_count 5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // Observed from many threads at once, nothing is lost.
        let histogram = Histogram::new([1.0]);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| (0..10_000).for_each(|_| histogram.observe(0.5)));
            }
        });
        let mut registry = Registry::default();
        registry.register("h", "h", histogram);
        let mut text = String::new();
        encode_registry(&mut text, &registry).expect("encodes");
        assert!(text.lines().any(|l| l == "h_sum 20000.0"), "{text}");
        assert!(text.lines().any(|l| l == "h_count 40000"), "{text}");
    }

    #[test]
    fn the_engine_threads_busy_share_is_its_last_whole_seconds() {
        const MS: u64 = 1_000_000;
        let busy = EngineBusy::default();
        let step =
            |at_ms: u64, took_ms: u64| busy.step_at(at_ms * MS, std::time::Duration::from_millis(took_ms));
        assert_eq!(busy.share_at(0), 0.0, "nothing yet");
        // 600 ms of steps in the first second: read once the second is whole.
        step(300, 300);
        step(900, 300);
        assert_eq!(busy.share_at(900 * MS), 0.0, "the second is not whole yet");
        step(1_000, 0);
        assert_eq!(busy.share_at(1_000 * MS), 0.6);
        // The next second, 100 ms in 1.25 s.
        step(1_500, 50);
        step(2_250, 50);
        assert_eq!(busy.share_at(2_250 * MS), 0.08);
        // A thread with no step for over two seconds is idle, whatever it last was.
        assert_eq!(busy.share_at(4_000 * MS), 0.08);
        assert_eq!(busy.share_at(4_300 * MS), 0.0);
        // Steps longer than their second read as wholly busy, not more.
        step(7_000, 5_000);
        assert_eq!(busy.share_at(7_000 * MS), 1.0);

        // On /metrics, as read at the scrape.
        let stats = Stats::new();
        stats.engine_busy.step_at(0, std::time::Duration::ZERO);
        stats
            .engine_busy
            .step_at(1_000 * MS, std::time::Duration::from_millis(250));
        let text = stats.render_prometheus();
        assert!(text.contains("\ncanaryd_engine_busy_ratio 0.25\n"), "{text}");
    }

    #[test]
    fn engine_steps_and_waits_are_timed() {
        let stats = Stats::new();
        stats.engine_step("batch", std::time::Duration::from_millis(3));
        stats.engine_step("batch", std::time::Duration::from_millis(40));
        stats.engine_step("learning", std::time::Duration::from_micros(200));
        stats.ingest_slot_wait(std::time::Duration::from_millis(4));
        stats.engine_queue_wait(std::time::Duration::from_millis(1));
        let text = stats.render_prometheus();
        for line in [
            "canaryd_engine_step_seconds_count{kind=\"batch\"} 2\n",
            "canaryd_engine_step_seconds_bucket{le=\"0.005\",kind=\"batch\"} 1\n",
            "canaryd_engine_step_seconds_bucket{le=\"0.05\",kind=\"batch\"} 2\n",
            "canaryd_engine_step_seconds_bucket{le=\"0.001\",kind=\"learning\"} 1\n",
            "# TYPE canaryd_engine_unlearned_windows gauge\n",
            "canaryd_ingest_slot_wait_seconds_bucket{le=\"0.005\"} 1\n",
            "canaryd_engine_queue_wait_seconds_bucket{le=\"0.0005\"} 0\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn prometheus_text_names_counter_families_by_their_samples() {
        let stats = Stats::new();
        stats.truncated(2);
        let text = stats.render_prometheus();
        assert!(
            text.contains("# TYPE canaryd_truncated_values_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP canaryd_truncated_values_total Attribute values"),
            "{text}"
        );
        assert!(text.contains("\ncanaryd_truncated_values_total 2\n"), "{text}");
        assert!(
            text.contains("# TYPE canaryd_pipeline_queue_depth gauge\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
    }
}
