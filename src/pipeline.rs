//! The bounded queue between the receivers and the engine, and the task that owns the engine.
//!
//! Receivers normalize in parallel; the engine ingests one batch at a time, in arrival order, so
//! its state has a single writer. The queue is bounded: when it is full a receiver waits up to
//! `ingest_wait` for room, then answers "unavailable" (gRPC UNAVAILABLE, HTTP 503), which OTLP
//! clients retry, so a burst slows senders down instead of growing memory or losing data. Readers
//! (the HTTP API) lock the engine briefly between batches. The same task flushes the engine's state
//! to the store on an interval and once more after the queue has drained at shutdown.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use canaryd_engine::{Batch, Engine};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::act::delivery::Dispatcher;
use crate::events::{Event, report_events};
use crate::stats::Stats;
use crate::store::Store;
use crate::watch::EventFeed;

/// The engine, shared between its one writer (the pipeline task) and the API's readers.
#[derive(Clone)]
pub struct SharedEngine(Arc<Mutex<Engine>>);

impl SharedEngine {
    pub fn new(engine: Engine) -> Self {
        SharedEngine(Arc::new(Mutex::new(engine)))
    }

    /// Locks the engine. A panic while it was held leaves counts that are still consistent (each
    /// batch is applied by plain arithmetic), so a poisoned lock is taken over, not propagated.
    pub fn lock(&self) -> MutexGuard<'_, Engine> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the engine's queue stayed full for {0:?}")]
    Full(Duration),
    #[error("the engine has stopped")]
    Closed,
}

/// The receivers' end of the queue.
#[derive(Clone)]
pub struct BatchSender {
    tx: mpsc::Sender<Batch>,
    wait: Duration,
}

impl BatchSender {
    pub async fn submit(&self, batch: Batch) -> Result<(), SubmitError> {
        self.tx.send_timeout(batch, self.wait).await.map_err(|e| match e {
            mpsc::error::SendTimeoutError::Timeout(_) => SubmitError::Full(self.wait),
            mpsc::error::SendTimeoutError::Closed(_) => SubmitError::Closed,
        })
    }
}

/// Creates the queue and the task that feeds the engine and flushes its state to `store` every
/// `flush_interval`; the caller spawns the task (as a supervised stage). The task ends once the
/// queue is closed and drained, after a last flush. It closes when every `BatchSender` is dropped,
/// or when `stop` is cancelled: then the queue refuses new batches (a receiver waiting for room is
/// told the engine has stopped) and what it holds is still ingested. `stop` is what lets the final
/// flush happen even when something (a stalled request, a connection that never finishes) keeps
/// a sender alive past the receivers' grace.
pub fn start(
    engine: SharedEngine,
    stats: Arc<Stats>,
    outputs: Outputs,
    capacity: usize,
    wait: Duration,
    stop: CancellationToken,
) -> (
    BatchSender,
    impl Future<Output = Result<(), String>> + Send + 'static,
) {
    let (tx, mut rx) = mpsc::channel::<Batch>(capacity);
    let task = async move {
        let Outputs {
            store,
            dispatcher,
            feed,
            flush_interval,
            max_events,
        } = outputs;
        let mut flush_timer = tokio::time::interval(flush_interval);
        flush_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        flush_timer.tick().await;
        let mut closed = false;
        loop {
            tokio::select! {
                () = stop.cancelled(), if !closed => {
                    // No new batches; `recv` still yields the queued ones, then `None`.
                    rx.close();
                    closed = true;
                }
                batch = rx.recv() => match batch {
                    Some(batch) => {
                        stats.queue_depth.set(rx.len() as i64);
                        let events = ingest(&engine, &stats, &batch, &store, max_events);
                        if !events.is_empty() {
                            dispatcher.wake();
                            feed.publish(&events);
                        }
                    }
                    None => break,
                },
                _ = flush_timer.tick() => flush(&engine, &store, &stats),
            }
        }
        stats.queue_depth.set(0);
        tracing::info!(batches = stats.batches_ingested.get(), "engine queue drained");
        flush(&engine, &store, &stats);
        Ok(())
    };
    (BatchSender { tx, wait }, task)
}

/// Where the engine's results go, and how often.
pub struct Outputs {
    pub store: Store,
    /// Woken when events (and so deliveries) were stored.
    pub dispatcher: Arc<Dispatcher>,
    /// Where stored events go out to watchers.
    pub feed: EventFeed,
    pub flush_interval: Duration,
    pub max_events: usize,
}

/// Feeds one batch to the engine, and stores the events its decisions make (with their
/// deliveries) together with the engine's changed state, in one flush: the anomaly state that
/// made an event is durable with it, so a crash cannot make the same transition fire twice.
/// Returns the events stored.
fn ingest(
    engine: &SharedEngine,
    stats: &Stats,
    batch: &Batch,
    store: &Store,
    max_events: usize,
) -> Vec<Event> {
    let (report, apps, mut events, changes) = {
        let mut engine = engine.lock();
        let report = engine.ingest(batch);
        let events = report_events(&engine, &report);
        let changes = (!events.is_empty()).then(|| engine.take_changes());
        (report, engine.catalog().app_count(), events, changes)
    };
    if let Some(changes) = changes {
        match store.write_with_events(&changes, &mut events, max_events) {
            Ok(()) => {
                stats.flushes.inc();
                for event in &events {
                    stats.event(event.event_type);
                    let reason = event.data.reasons.first().map_or("", |r| r.message.as_str());
                    tracing::info!(id = %event.id, r#type = event.event_type.as_str(), app = %event.data.app, %reason, "event");
                }
            }
            Err(e) => {
                stats.event_errors.inc();
                stats.flush_errors.inc();
                tracing::error!(error = %e, events = events.len(), "cannot store events");
                events.clear();
            }
        }
    }
    stats.batches_ingested.inc();
    stats.apps_tracked.set(apps as i64);
    stats.late_observations.inc_by(report.late);
    stats.windows_closed.inc_by(report.windows_closed);
    for (cap, n) in report.cap_hits {
        stats.capped(cap, n);
    }
    events
}

/// Writes what changed since the last flush, then makes it durable. A failed flush is logged and
/// counted; what it carried is written again when it next changes.
fn flush(engine: &SharedEngine, store: &Store, stats: &Stats) {
    let (changes, (baselines, bytes)) = {
        let mut engine = engine.lock();
        (engine.take_changes(), engine.baseline_memory())
    };
    stats.baselines.set(baselines as i64);
    stats.baseline_memory_bytes.set(bytes as i64);
    match store.write(&changes).and_then(|()| store.flush()) {
        Ok(()) => {
            stats.flushes.inc();
            tracing::debug!(
                apps = changes.apps.len(),
                baselines = changes.baselines.len(),
                "state flushed"
            );
        }
        Err(e) => {
            stats.flush_errors.inc();
            tracing::error!(error = %e, "cannot flush state to disk");
        }
    }
    stats.store_disk_bytes.set(store.size_on_disk() as i64);
    stats.outbox_depth.set(store.outbox_depth() as i64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventType;
    use crate::normalize::{self, NormalizeOptions};
    use crate::store::StoreCounters;
    use crate::testdata::{self, EPOCH_NS};
    use canaryd_engine::EngineConfig;

    /// One app's traffic from `start_ns`, normalized: see `testdata::app_traffic`.
    fn traffic(start_ns: u64, exports: u64, error_rate: f64) -> (Vec<Batch>, u64) {
        let (requests, end) = testdata::app_traffic(start_ns, exports, error_rate);
        let options = NormalizeOptions::default();
        let batches = requests
            .iter()
            .map(|r| {
                normalize::traces(r, &options)
                    .expect("generated requests decode")
                    .batch
            })
            .collect();
        (batches, end)
    }

    /// An engine as a (re)start makes it: restored from what the store holds.
    fn engine_on(store: &Store) -> SharedEngine {
        let mut engine = Engine::new(EngineConfig::default(), Box::new(store.slot_store()));
        engine.restore(store.load().expect("load"));
        SharedEngine::new(engine)
    }

    #[test]
    fn a_crash_right_after_an_event_restarts_with_the_anomaly_that_made_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
        let stats = Stats::new();
        let engine = engine_on(&store);
        let (steady, fault_start) = traffic(EPOCH_NS, 15, 0.01);
        let (fault, _) = traffic(fault_start, 6, 0.5);
        let mut detected = None;
        for (i, batch) in steady.iter().chain(&fault).enumerate() {
            // The flush interval: every few batches.
            if i % 4 == 3 {
                flush(&engine, &store, &stats);
            }
            let events = ingest(&engine, &stats, batch, &store, 1_000);
            detected = events
                .into_iter()
                .find(|e| e.event_type == EventType::AnomalyDetected);
            if detected.is_some() {
                break;
            }
        }
        let detected = detected.expect("the fault is detected");
        let feature = &detected.data.reasons[0].feature;
        let version = detected.data.version.as_deref().expect("a version's anomaly");
        // kill -9 here, before the next flush: a restart finds what the store holds. The anomaly
        // is open there, as it was when the event was stored, so the same transition cannot fire
        // again (and the fault is learned at the anomalous rate, not absorbed).
        let restarted = engine_on(&store);
        let restarted = restarted.lock();
        let view = restarted
            .baselines(&detected.data.env, &detected.data.app, Some(version))
            .expect("the version's baselines are restored");
        let (_, baseline) = view
            .baselines
            .iter()
            .find(|(key, _)| key.subject.is_empty() && key.feature.name() == feature)
            .expect("the baseline behind the event");
        assert!(baseline.anomaly.active, "{:?}", baseline.anomaly);
    }
}
