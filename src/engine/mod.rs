//! The engine's one writer: a dedicated thread owns the engine, and everything that changes or
//! reads it arrives through one bounded channel of typed inputs, applied in arrival order.
//!
//! Receivers send observation batches; the API sends rollout declarations and ends, and the reads
//! its answers need, and awaits the reply. Nothing else holds the engine, so there is no lock to
//! contend for and no second path that changes it. The thread hands what the engine's changes
//! need written to the store's writer (`store::writer`, its own thread: sled and its fsyncs run
//! there, never here or on the async runtime's workers), and every decision goes out through the
//! one emitter (`emit`), which has events stored with their outbox entries and the state of the
//! apps they are about, waits until they are durable, then wakes delivery and the watchers.
//!
//! Learning from the windows of apps that no analysis judges is deferred
//! (`Engine::defer_learning`): the thread does it when no input waits, an app at a time, so that
//! the minute's learning of every series (and an hour's turn of their seasonal slots) does not
//! hold up the batches that decide canaries. When inputs never stop coming, learning that has
//! found no idle moment for `LEARNING_WAITS_AT_MOST` takes turns with them, so it cannot fall
//! behind for good. A read learns everything waiting first, so that it sees what it would have
//! seen without the deferral, except a read of analyses, models or the catalog alone
//! (`EngineHandle::read_analyses`), which deferred learning does not change. Anomalies found by
//! deferred learning are emitted like any other, but not timed in `canaryd_act_seconds`: no one
//! request's arrival decided them.
//!
//! The channel is bounded: when it is full, a receiver waits up to `ingest_wait` for room and then
//! answers "unavailable" (gRPC UNAVAILABLE, HTTP 503), which OTLP clients retry, so a burst slows
//! senders down instead of growing memory or losing data.

mod emit;

use std::time::{Duration, Instant};

use canaryd_engine::judge::{AnalysisView, JudgeError, Operation};
use canaryd_engine::{Batch, Engine};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use emit::{Emitter, recall_verdict};

use crate::events::approval::{Action, Claim};
use crate::events::{Event, canary_event, report_events};
use crate::stats::Stats;
use crate::store::writer::{Flushed, WriteError, WriterThread};

/// What the engine is asked to do: the only ways its state changes or is read.
pub enum Input {
    /// A receiver's batch. The reply, when asked for, says what became of it. The admission, its
    /// request's share of the ingest memory budget, is given back once the batch is applied.
    Observations {
        batch: Batch,
        reply: Option<oneshot::Sender<Ingested>>,
        admission: Option<Admission>,
        /// When it was queued, for `canaryd_engine_queue_wait_seconds`.
        queued: Instant,
    },
    /// `PUT .../rollout`: judge `canary` against `stable` with `model`.
    DeclareRollout {
        rollout: Rollout,
        reply: oneshot::Sender<Result<AnalysisView, JudgeError>>,
    },
    /// `DELETE .../rollout`.
    EndRollout {
        env: String,
        app: String,
        reply: oneshot::Sender<Result<AnalysisView, JudgeError>>,
    },
    /// `POST .../canary/{operation}`: an operator's promote, pause, resume or abort.
    Operate {
        env: String,
        app: String,
        operation: Operation,
        reply: oneshot::Sender<Result<AnalysisView, JudgeError>>,
    },
    /// A signed approval link's action: taken only while the analysis waits exactly where the
    /// link says, so a used link (or one of a wait that ended) changes nothing.
    Approval {
        claim: Claim,
        reply: oneshot::Sender<Result<AnalysisView, LinkRefused>>,
    },
    /// A read for an answer: runs on the engine's thread between inputs, after the windows
    /// waiting to be learned (`Engine::defer_learning`) that `learn` says are learned: all, one
    /// app's (a read of that app alone), or none (a read of analyses, models and the catalog,
    /// which deferred learning does not change).
    Read {
        read: Box<dyn FnOnce(&Engine) + Send>,
        learn: Option<Learn>,
    },
    /// Events made outside the engine's decisions (delivery's `traffic.partial` alerts), stored
    /// and sent through the one emitter like every other.
    Alert(Box<Event>),
}

impl Input {
    /// What kind of step applying it is, for `canaryd_engine_step_seconds`.
    fn kind(&self) -> &'static str {
        match self {
            Input::Observations { .. } => "batch",
            Input::Read { .. } => "read",
            Input::DeclareRollout { .. }
            | Input::EndRollout { .. }
            | Input::Operate { .. }
            | Input::Approval { .. } => "operator",
            Input::Alert(_) => "alert",
        }
    }
}

/// Whether the app's analysis still waits exactly where an approval link says: the same canary,
/// the same wait, before the same stage. A used link fails this (its wait ended when it was used),
/// as does one whose analysis failed, was replaced or moved on.
pub fn waits_for(engine: &Engine, claim: &Claim) -> bool {
    engine.judge().analysis(&claim.env, &claim.app).is_some_and(|a| {
        let view = a.view();
        **a.canary() == *claim.canary
            && view.awaiting_approval == Some(claim.waiting_since)
            && view.stage.as_ref().map(|s| s.index + 1) == Some(claim.stage)
    })
}

/// Why an approval link's action was not taken.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LinkRefused {
    #[error("this link was used already, or the analysis no longer waits for it")]
    Stale,
    #[error(transparent)]
    Judge(#[from] JudgeError),
}

/// A declared rollout.
#[derive(Clone, Debug)]
pub struct Rollout {
    pub env: String,
    pub app: String,
    pub stable_version: String,
    pub canary_version: String,
    pub model: Option<String>,
    /// Whether it may replace an analysis of other versions still under way.
    pub replace: bool,
    /// Its own traffic plan, laid over the model's.
    pub traffic: Option<canaryd_engine::judge::TrafficRequest>,
}

/// A request's share of the ingest memory budget (`ingest_memory_bytes`), held from the request's
/// arrival until the engine has applied its batch: what is queued for the engine counts too.
#[derive(Debug)]
pub struct Admission {
    _permit: tokio::sync::OwnedSemaphorePermit,
    arrived_ns: u64,
}

impl Admission {
    /// `arrived_ns`: when the request arrived (wall clock), before it waited for its share.
    pub fn new(permit: tokio::sync::OwnedSemaphorePermit, arrived_ns: u64) -> Self {
        Admission {
            _permit: permit,
            arrived_ns,
        }
    }

    /// When the request arrived: what time to act is timed from (`canaryd_act_seconds`).
    pub fn arrived_ns(&self) -> u64 {
        self.arrived_ns
    }
}

/// What became of one batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ingested {
    /// Observations refused for being dated too far ahead (`future_skew`).
    pub future: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the engine's queue stayed full for {0:?}")]
    Full(Duration),
    #[error("the engine has stopped")]
    Closed,
}

/// The engine has stopped (shutting down, or failed): nothing it holds can be read or changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the engine has stopped")]
pub struct EngineGone;

/// The sending end of the engine's channel, for receivers and the API.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Input>,
    /// How long a receiver waits for room before answering "unavailable".
    wait: Duration,
}

impl EngineHandle {
    /// Queues a batch, waiting up to `ingest_wait` for room.
    pub async fn submit(&self, batch: Batch, admission: Option<Admission>) -> Result<(), SubmitError> {
        self.send_batch(batch, None, admission).await
    }

    /// Queues a batch and waits until the engine has applied it.
    pub async fn submit_and_wait(
        &self,
        batch: Batch,
        admission: Option<Admission>,
    ) -> Result<Ingested, SubmitError> {
        let (reply, answer) = oneshot::channel();
        self.send_batch(batch, Some(reply), admission).await?;
        answer.await.map_err(|_| SubmitError::Closed)
    }

    async fn send_batch(
        &self,
        batch: Batch,
        reply: Option<oneshot::Sender<Ingested>>,
        admission: Option<Admission>,
    ) -> Result<(), SubmitError> {
        let input = Input::Observations {
            batch,
            reply,
            admission,
            queued: Instant::now(),
        };
        self.tx.send_timeout(input, self.wait).await.map_err(|e| match e {
            mpsc::error::SendTimeoutError::Timeout(_) => SubmitError::Full(self.wait),
            mpsc::error::SendTimeoutError::Closed(_) => SubmitError::Closed,
        })
    }

    /// Runs `read` on the engine's thread, after what was queued before it, and with every
    /// window closed by then learned from.
    pub async fn read<R: Send + 'static>(
        &self,
        read: impl FnOnce(&Engine) -> R + Send + 'static,
    ) -> Result<R, EngineGone> {
        self.send_read(read, Some(Learn::All)).await
    }

    /// `read`, for a read of one app's learned state: only that app's windows waiting are
    /// learned first.
    pub async fn read_app<R: Send + 'static>(
        &self,
        env: String,
        app: String,
        read: impl FnOnce(&Engine) -> R + Send + 'static,
    ) -> Result<R, EngineGone> {
        self.send_read(read, Some(Learn::TheApp(env, app))).await
    }

    /// `read`, for a read of analyses, models or the catalog alone: windows waiting to be
    /// learned from stay waiting (a read often made, as /metrics is, would otherwise take the
    /// learning of every app at once, which the engine's thread spreads over its idle moments).
    pub async fn read_analyses<R: Send + 'static>(
        &self,
        read: impl FnOnce(&Engine) -> R + Send + 'static,
    ) -> Result<R, EngineGone> {
        self.send_read(read, None).await
    }

    async fn send_read<R: Send + 'static>(
        &self,
        read: impl FnOnce(&Engine) -> R + Send + 'static,
        learn: Option<Learn>,
    ) -> Result<R, EngineGone> {
        let (reply, answer) = oneshot::channel();
        let input = Input::Read {
            read: Box::new(move |engine| {
                // The asker may have gone (its connection closed): nothing to do then.
                let _ = reply.send(read(engine));
            }),
            learn,
        };
        self.tx.send(input).await.map_err(|_| EngineGone)?;
        answer.await.map_err(|_| EngineGone)
    }

    /// Declares a rollout; its `started` event is emitted before this returns.
    pub async fn declare_rollout(
        &self,
        rollout: Rollout,
    ) -> Result<Result<AnalysisView, JudgeError>, EngineGone> {
        self.ask(|reply| Input::DeclareRollout { rollout, reply }).await
    }

    /// Ends the app's analysis.
    pub async fn end_rollout(
        &self,
        env: String,
        app: String,
    ) -> Result<Result<AnalysisView, JudgeError>, EngineGone> {
        self.ask(|reply| Input::EndRollout { env, app, reply }).await
    }

    /// An operator's action on the app's analysis; its event is emitted before this returns.
    pub async fn operate(
        &self,
        env: String,
        app: String,
        operation: Operation,
    ) -> Result<Result<AnalysisView, JudgeError>, EngineGone> {
        self.ask(|reply| Input::Operate {
            env,
            app,
            operation,
            reply,
        })
        .await
    }

    /// Emits an alert event (already named) through the emitter, after what was queued before.
    pub async fn alert(&self, event: Event) -> Result<(), EngineGone> {
        self.tx
            .send(Input::Alert(Box::new(event)))
            .await
            .map_err(|_| EngineGone)
    }

    /// An approval link's action; its event is emitted before this returns.
    pub async fn approval(&self, claim: Claim) -> Result<Result<AnalysisView, LinkRefused>, EngineGone> {
        self.ask(|reply| Input::Approval { claim, reply }).await
    }

    async fn ask<R>(&self, input: impl FnOnce(oneshot::Sender<R>) -> Input) -> Result<R, EngineGone> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(input(reply)).await.map_err(|_| EngineGone)?;
        answer.await.map_err(|_| EngineGone)
    }
}

/// Starts the engine's thread, which applies inputs and hands the engine's changes to the store's
/// writer every `flush_interval` (one flush at a time: a tick while one is being written waits
/// for it). Returns the handle and a future that completes when the thread ends
/// (with its error, or the panic it died of), for the daemon to supervise as a stage.
///
/// The thread ends once its channel is closed and drained, after a last flush. The channel closes
/// when every handle is dropped, or when `stop` is cancelled: then it refuses new inputs (a sender
/// waiting for room is told the engine has stopped) and what it holds is still applied. `stop` is
/// what lets the final flush happen even when something (a stalled request, a connection that
/// never finishes) keeps a handle alive past the receivers' grace.
pub fn start(
    engine: Engine,
    emitter: Emitter,
    writer: WriterThread,
    capacity: usize,
    wait: Duration,
    stop: CancellationToken,
) -> std::io::Result<(
    EngineHandle,
    impl Future<Output = Result<(), String>> + Send + 'static,
)> {
    let (tx, rx) = mpsc::channel::<Input>(capacity);
    let mut engine = engine;
    engine.defer_learning(true);
    let (done, finished) = oneshot::channel::<Result<(), String>>();
    std::thread::Builder::new()
        .name("canaryd-engine".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .map_err(|e| format!("cannot start the engine's runtime: {e}"))
                .map(|runtime| runtime.block_on(run(engine, emitter, rx, stop)));
            // The engine and the emitter held the writer's last handles: it ends once it has
            // written what they sent.
            writer.join();
            // A panic drops `done` unsent, which the supervisor reports as one.
            let _ = done.send(result);
        })?;
    let finished = async move {
        finished
            .await
            .unwrap_or_else(|_| Err("the engine thread panicked".to_owned()))
    };
    Ok((EngineHandle { tx, wait }, finished))
}

async fn run(mut engine: Engine, emitter: Emitter, mut rx: mpsc::Receiver<Input>, stop: CancellationToken) {
    let stats = emitter.stats.clone();
    let mut flush_timer = tokio::time::interval(emitter.flush_interval);
    flush_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    flush_timer.tick().await;
    let mut closed = false;
    let mut late = LateLog::default();
    // One flush at a time, so that each carries everything changed since the one before and the
    // engine learns in order which were written: its parts are being taken (`taking`), then the
    // writer is making them durable (`writing`).
    let mut taking = false;
    let mut writing: Option<oneshot::Receiver<Flushed>> = None;
    // Since when learning has waited for an idle moment without catching up.
    let mut behind_since: Option<Instant> = None;
    loop {
        let learning_waits = engine.has_deferred();
        if !learning_waits {
            behind_since = None;
        }
        let learn_now = learning_waits
            && (rx.is_empty()
                || behind_since.get_or_insert_with(Instant::now).elapsed() >= LEARNING_WAITS_AT_MOST);
        tokio::select! {
            () = stop.cancelled(), if !closed => {
                // No new inputs; `recv` still yields the queued ones, then `None`.
                rx.close();
                closed = true;
            }
            input = rx.recv() => match input {
                Some(input) => {
                    stats.queue_depth.set(rx.len() as i64);
                    stats.time_step(input.kind(), || apply(&mut engine, &emitter, &stats, &mut late, input));
                }
                None => break,
            },
            _ = flush_timer.tick(), if !taking && writing.is_none() => {
                stats.time_step("flush", || emitter.begin_flush(&mut engine));
                taking = true;
            }
            // A part at a time, as the writer has room, among the inputs.
            () = emitter.writer.room(), if taking => {
                stats.time_step("flush", || {
                    if !emitter.flush_step(&mut engine) {
                        taking = false;
                        writing = Some(emitter.end_flush());
                    }
                });
            }
            flushed = async {
                match writing.as_mut() {
                    Some(answer) => answer.await,
                    None => std::future::pending().await,
                }
            }, if writing.is_some() => {
                writing = None;
                stats.time_step("flush", || {
                    emitter.flushed(&mut engine, flushed.unwrap_or_else(|_| writer_gone()));
                });
            }
            () = std::future::ready(()), if learn_now => {
                stats.time_step("learning", || learn(&mut engine, &emitter, Learn::OneApp));
                if rx.is_empty() {
                    // An idle moment: the wait starts again from here.
                    behind_since = Some(Instant::now());
                }
            }
        }
        stats.unlearned_windows.set(engine.unlearned_windows() as i64);
    }
    stats.queue_depth.set(0);
    learn(&mut engine, &emitter, Learn::All);
    stats.unlearned_windows.set(0);
    tracing::info!(batches = stats.batches_ingested.get(), "engine queue drained");
    if taking {
        while emitter.flush_step(&mut engine) {}
        writing = Some(emitter.end_flush());
    }
    if let Some(writing) = writing {
        emitter.flushed(&mut engine, writing.await.unwrap_or_else(|_| writer_gone()));
    }
    emitter.flush_and_wait(&mut engine).await;
}

/// How long learning waits for an idle moment before it takes turns with the inputs.
const LEARNING_WAITS_AT_MOST: Duration = Duration::from_secs(1);

/// How much deferred learning to do at once.
pub enum Learn {
    /// The app that has waited longest (`Engine::learn_deferred`).
    OneApp,
    /// One app's windows, by env and name (`Engine::learn_deferred_of`).
    TheApp(String, String),
    /// Everything waiting (`Engine::learn_all_deferred`).
    All,
}

/// Learns what waits, as much as `how` says, and emits the anomalies it found.
fn learn(engine: &mut Engine, emitter: &Emitter, how: Learn) {
    let report = match how {
        Learn::OneApp => engine.learn_deferred(),
        Learn::TheApp(env, app) => engine.learn_deferred_of(&env, &app),
        Learn::All => engine.learn_all_deferred(),
    };
    if report.anomalies.is_empty() {
        return;
    }
    let events = report_events(engine, &report);
    emitter.emit_decided(engine, events, None);
}

/// What a flush whose answer never came is taken for.
fn writer_gone() -> Flushed {
    Flushed {
        result: Err(WriteError::WriterGone),
        took: Duration::ZERO,
    }
}

/// How often late observations are logged; they are counted on `/metrics` every time.
const LATE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Late observations since they were last logged.
#[derive(Default)]
struct LateLog {
    pending: u64,
    last: Option<std::time::Instant>,
}

impl LateLog {
    fn add(&mut self, late: u64) {
        self.pending += late;
        if self.pending == 0 || self.last.is_some_and(|t| t.elapsed() < LATE_LOG_EVERY) {
            return;
        }
        tracing::warn!(
            observations = self.pending,
            "observations arrived after their event-time bucket had closed and were not used \
             (canaryd_late_observations_total); an exporter batches for longer than \
             allowed_lateness_secs, or its clock is behind"
        );
        self.pending = 0;
        self.last = Some(std::time::Instant::now());
    }
}

/// Applies one input, emitting what it decided.
fn apply(engine: &mut Engine, emitter: &Emitter, stats: &Stats, late: &mut LateLog, input: Input) {
    match input {
        Input::Observations {
            batch,
            reply,
            admission,
            queued,
        } => {
            stats.engine_queue_wait(queued.elapsed());
            let report = engine.ingest(&batch);
            let arrived = (batch.received > 0).then_some(batch.received);
            // The batch's memory is the engine's now (or gone): the budget may admit another.
            drop((batch, admission));
            let events = report_events(engine, &report);
            emitter.emit_decided(engine, events, arrived);
            stats.ingested(engine.catalog().app_count(), &report);
            late.add(report.late);
            if let Some(reply) = reply {
                let _ = reply.send(Ingested {
                    future: report.future,
                });
            }
        }
        Input::DeclareRollout { rollout, reply } => {
            let Rollout {
                env,
                app,
                stable_version,
                canary_version,
                model,
                replace,
                traffic,
            } = rollout;
            let change = engine.declare_rollout(
                &env,
                &app,
                canaryd_engine::Declaration {
                    stable: &stable_version,
                    canary: &canary_version,
                    model: model.as_deref(),
                    replace,
                    traffic: traffic.as_ref(),
                },
            );
            let answer = change.map(|changes| {
                emitter.emit_operated(engine, changes.iter().map(canary_event).collect());
                tracing::info!(%env, %app, stable = %stable_version, canary = %canary_version, replaced = changes.len() > 1, "rollout declared");
                changes.into_iter().last().map(|started| started.view)
            });
            let _ = reply.send(answer.and_then(|view| view.ok_or(JudgeError::NoRollout)));
        }
        Input::EndRollout { env, app, reply } => {
            let answer = engine.end_rollout(&env, &app).map(|ended| {
                emitter.emit_operated(engine, vec![canary_event(&ended)]);
                tracing::info!(%env, %app, canary = %ended.view.canary_version, "rollout ended");
                ended.view
            });
            let _ = reply.send(answer);
        }
        Input::Operate {
            env,
            app,
            operation,
            reply,
        } => {
            let answer = engine.operate(&env, &app, operation).map(|change| {
                emitter.emit_operated(engine, vec![canary_event(&change)]);
                tracing::info!(%env, %app, canary = %change.view.canary_version, operation = operation.name(), "operator action");
                change.view
            });
            let _ = reply.send(answer);
        }
        Input::Approval { claim, reply } => {
            let waits_there = waits_for(engine, &claim);
            let operation = match claim.action {
                Action::Approve => Operation::Approve,
                Action::Abort => Operation::Abort,
            };
            let answer = if waits_there {
                engine
                    .operate(&claim.env, &claim.app, operation)
                    .map(|change| {
                        emitter.emit_operated(engine, vec![canary_event(&change)]);
                        tracing::info!(env = %claim.env, app = %claim.app, canary = %claim.canary, action = claim.action.name(), "approval link used");
                        change.view
                    })
                    .map_err(LinkRefused::from)
            } else {
                Err(LinkRefused::Stale)
            };
            let _ = reply.send(answer);
        }
        Input::Read { read, learn: how } => {
            if let Some(how) = how {
                // What the read sees is what learning at once would have left.
                learn(engine, emitter, how);
            }
            read(engine);
        }
        Input::Alert(event) => {
            emitter.emit(engine, vec![*event]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::delivery::{DeliveryConfig, Dispatcher};
    use crate::events::EventType;
    use crate::events::feed::EventFeed;
    use crate::normalize::{self, NormalizeOptions};
    use crate::store::writer::StoreWriter;
    use crate::store::{Store, StoreCounters};
    use crate::testdata::{self, EPOCH_NS};
    use canaryd_engine::EngineConfig;
    use std::sync::Arc;

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
    fn engine_on(store: &Store) -> Engine {
        let mut engine = Engine::new(EngineConfig::default(), Box::new(store.slot_store()));
        engine.set_archive(Box::new(store.archive()));
        engine.restore(store.load().expect("load"));
        engine
    }

    fn emitter(store: &Store) -> Emitter {
        let stats = Arc::new(Stats::new());
        let (writer, _thread) = StoreWriter::start(store.clone()).expect("the writer starts");
        Emitter {
            store: store.clone(),
            writer,
            dispatcher: Dispatcher::new(
                store.clone(),
                stats.clone(),
                DeliveryConfig::default(),
                CancellationToken::new(),
            )
            .expect("the webhook client builds"),
            stats,
            feed: EventFeed::new(),
            flush_interval: Duration::from_secs(1),
            max_baseline_memory_bytes: 0,
            max_events: 1_000,
            approvals: crate::events::approval::Approvals::with_key([1; 32], "http://127.0.0.1:8080", 3_600),
        }
    }

    /// `traffic`, as the app named `app`.
    fn traffic_of(app: &str, start_ns: u64, exports: u64) -> (Vec<Batch>, u64) {
        let (mut batches, end) = traffic(start_ns, exports, 0.01);
        for batch in &mut batches {
            for resource in &mut batch.resources {
                resource.identity.app = Arc::from(app);
            }
        }
        (batches, end)
    }

    /// An engine on `store` that learned app "quiet", then, ten minutes later, app "busy".
    fn quiet_then_busy(store: &Store) -> Engine {
        let mut engine = engine_on(store);
        let (quiet, _) = traffic_of("quiet", EPOCH_NS, 4);
        ingest_all(&mut engine, quiet);
        let (busy, _) = traffic_of("busy", EPOCH_NS + 600 * 1_000_000_000, 4);
        ingest_all(&mut engine, busy);
        engine
    }

    fn ingest_all(engine: &mut Engine, batches: Vec<Batch>) {
        for batch in batches {
            engine.ingest(&batch);
        }
    }

    /// What a read sees: (windows still waiting to be learned, whether "quiet" and "busy" have
    /// learned anything).
    fn read_through(engine: &mut Engine, emitter: &Emitter, learn: Option<Learn>) -> (usize, bool, bool) {
        let (tx, rx) = std::sync::mpsc::channel();
        let read = Box::new(move |engine: &Engine| {
            let learned = |app: &str| {
                engine
                    .baselines("prod", app, None)
                    .is_some_and(|view| view.baselines.iter().any(|(_, b)| b.ewma.samples > 0))
            };
            let _ = tx.send((engine.unlearned_windows(), learned("quiet"), learned("busy")));
        });
        let stats = Stats::new();
        apply(
            engine,
            emitter,
            &stats,
            &mut LateLog::default(),
            Input::Read { read, learn },
        );
        rx.recv().expect("the read ran")
    }

    /// A read learns first what it shows: nothing for a read of analyses, one app's windows for
    /// a read of that app (its baseline, its timeline), every app's for the apps' list.
    #[tokio::test]
    async fn a_read_learns_what_it_shows_and_no_more() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
        let emitter = emitter(&store);
        let mut engine = engine_on(&store);
        engine.defer_learning(true);
        let (quiet, _) = traffic_of("quiet", EPOCH_NS, 4);
        ingest_all(&mut engine, quiet);
        let (busy, _) = traffic_of("busy", EPOCH_NS, 4);
        ingest_all(&mut engine, busy);
        let (waiting, quiet, busy) = read_through(&mut engine, &emitter, None);
        assert!(waiting > 2 && !quiet && !busy, "{waiting} {quiet} {busy}");
        let one_app = Learn::TheApp("prod".into(), "quiet".into());
        let (left, quiet, busy) = read_through(&mut engine, &emitter, Some(one_app));
        assert!(quiet && !busy, "only quiet learned: {quiet} {busy}");
        assert!(left > 0 && left < waiting, "{left} of {waiting} left");
        let (left, quiet, busy) = read_through(&mut engine, &emitter, Some(Learn::All));
        assert!(left == 0 && quiet && busy, "{left} {quiet} {busy}");
    }

    #[tokio::test]
    async fn over_the_memory_budget_the_app_seen_least_recently_moves_to_the_store_and_comes_back_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
        let mut emitter = emitter(&store);
        let mut engine = engine_on(&store);
        let (quiet, _) = traffic_of("quiet", EPOCH_NS, 4);
        ingest_all(&mut engine, quiet);
        let (busy, _) = traffic_of("busy", EPOCH_NS + 600 * 1_000_000_000, 4);
        ingest_all(&mut engine, busy);
        let learned = |engine: &Engine, app: &str| {
            engine
                .baselines("prod", app, Some("1.0.0"))
                .map_or(0, |view| view.baselines.len())
        };
        let quiet_learned = learned(&engine, "quiet");
        assert!(quiet_learned > 0 && learned(&engine, "busy") > 0);
        let (_, held) = engine.baseline_memory();
        let parts = engine.memory();
        assert_eq!(parts.baselines, held);
        assert!(parts.buckets > 0, "{parts:?}");

        // A budget the two apps' baselines do not fit: the one seen least recently goes.
        emitter.max_baseline_memory_bytes = held - 1;
        emitter.flush_and_wait(&mut engine).await;
        assert_eq!(emitter.stats.apps_paged_out.get(), 1);
        assert!(engine.catalog().app("prod", "quiet").is_none());
        assert!(engine.catalog().app("prod", "busy").is_some());
        let (_, now_held) = engine.baseline_memory();
        assert!(now_held < held, "{now_held} of {held}");

        // Seen again, it comes back with everything it had learned.
        emitter.max_baseline_memory_bytes = 0;
        let (back, _) = traffic_of("quiet", EPOCH_NS + 1_800 * 1_000_000_000, 1);
        ingest_all(&mut engine, back);
        assert!(engine.catalog().app("prod", "quiet").is_some());
        assert!(
            learned(&engine, "quiet") >= quiet_learned,
            "{} of {quiet_learned}",
            learned(&engine, "quiet")
        );
    }

    /// Issue 16, item 2, "paged to disk, not lost": an app paged out stays in the changes handed
    /// to the store until they are written; a write that fails carries it again.
    #[test]
    fn a_paged_out_app_is_written_again_until_a_write_of_it_succeeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
        let mut engine = quiet_then_busy(&store);
        let (_, held) = engine.baseline_memory();
        let _ = engine.take_changes();
        engine.changes_written();
        assert_eq!(engine.page_out(held - 1).apps, 1);
        let carries_quiet = |state: &canaryd_engine::EngineState| {
            state.apps.iter().any(|(_, app, _)| app == "quiet")
                && state.baselines.iter().any(|(id, _)| id.app == "quiet")
        };
        // The write of these changes failed (nothing says it was written): carried again.
        assert!(carries_quiet(&engine.take_changes()));
        let written = engine.take_changes();
        assert!(carries_quiet(&written));
        store.write(&written).expect("write");
        engine.changes_written();
        assert!(!carries_quiet(&engine.take_changes()), "written once is enough");
        // And from the store it comes back whole.
        let (back, _) = traffic_of("quiet", EPOCH_NS + 1_800 * 1_000_000_000, 1);
        ingest_all(&mut engine, back);
        assert!(
            engine
                .baselines("prod", "quiet", Some("1.0.0"))
                .is_some_and(|v| !v.baselines.is_empty())
        );
    }

    /// The store's writer writes a flush while the engine goes on: an app archived after the
    /// flush's changes were taken is not in them, so that flush's write does not let it go; the
    /// next flush carries it, and it leaves memory once that one is written.
    #[test]
    fn an_app_archived_while_a_flush_is_written_is_carried_by_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
        let mut engine = quiet_then_busy(&store);
        let (_, held) = engine.baseline_memory();
        let carries_quiet =
            |state: &canaryd_engine::EngineState| state.baselines.iter().any(|(id, _)| id.app == "quiet");
        let being_written = engine.take_changes();
        assert!(
            carries_quiet(&being_written),
            "quiet's baselines changed before it"
        );
        assert_eq!(engine.page_out(held - 1).apps, 1, "quiet archived meanwhile");
        engine.changes_written();
        let next = engine.take_changes();
        assert!(carries_quiet(&next), "the next flush carries it");
        engine.changes_written();
        assert!(!carries_quiet(&engine.take_changes()), "written once is enough");
    }

    /// A take in parts hands over what one take does: the head and the parts together are
    /// `take_changes`, part by part no more than asked. A baseline that changes before its part
    /// is taken goes in it as it is then, and in the next take again; an event's write taken
    /// meanwhile carries its apps' baselines not yet handed over.
    #[test]
    fn a_take_in_parts_hands_over_what_one_take_does() {
        let engine_with_traffic = || {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
            let mut engine = engine_on(&store);
            for app in ["quiet", "busy", "third"] {
                let (traffic, _) = traffic_of(app, EPOCH_NS, 4);
                ingest_all(&mut engine, traffic);
            }
            (engine, dir)
        };
        let sorted = |mut state: canaryd_engine::EngineState| {
            state.baselines.sort_by(|a, b| a.0.cmp(&b.0));
            state.clocks.sort_by(|a, b| a.1.cmp(&b.1));
            state.apps.sort_by(|a, b| a.1.cmp(&b.1));
            state
        };
        let (mut whole, _dir) = engine_with_traffic();
        let expected = sorted(whole.take_changes());
        let (mut parted, _dir2) = engine_with_traffic();
        let mut taken = parted.begin_changes();
        let changed = parted.taking();
        assert_eq!(changed, expected.baselines.len());
        let mut parts = 0;
        while let Some(mut part) = parted.take_part(7) {
            assert!(part.baselines.len() <= 7);
            taken.baselines.append(&mut part.baselines);
            parts += 1;
        }
        assert_eq!(parts, changed.div_ceil(7));
        assert_eq!(sorted(taken), expected);

        // Changed while the take is under way.
        let (mut engine, _dir3) = engine_with_traffic();
        let head = engine.begin_changes();
        assert!(head.baselines.is_empty());
        let first = engine.take_part(5).expect("a part");
        let (more, _) = traffic_of("busy", EPOCH_NS + 300 * 1_000_000_000, 6);
        ingest_all(&mut engine, more);
        let of_quiet = engine.take_changes_of(&[("prod".into(), "quiet".into())]);
        let mut later = Vec::new();
        while let Some(mut part) = engine.take_part(5) {
            later.append(&mut part.baselines);
        }
        assert!(!of_quiet.baselines.is_empty());
        assert!(of_quiet.baselines.iter().all(|(id, _)| id.app == "quiet"));
        assert!(
            later.iter().all(|(id, _)| id.app != "quiet"),
            "quiet's baselines not yet handed over went with its event's write"
        );
        let mut rest = first.baselines;
        rest.append(&mut later);
        let again = engine.take_changes();
        assert!(
            again.baselines.iter().any(|(id, _)| id.app == "busy"),
            "busy changed during the take: taken again"
        );
        let busy_in_rest = rest.iter().filter(|(id, _)| id.app == "busy").count();
        let busy_again = again.baselines.iter().filter(|(id, _)| id.app == "busy").count();
        assert!(busy_in_rest > 0 && busy_again > 0, "{busy_in_rest} {busy_again}");
    }

    /// An event's write takes its apps' changes alone; the others' wait for the next flush, and
    /// none is lost or taken twice.
    #[test]
    fn an_events_write_takes_the_changes_of_its_apps_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
        let mut engine = engine_on(&store);
        let (quiet, _) = traffic_of("quiet", EPOCH_NS, 4);
        ingest_all(&mut engine, quiet);
        let (busy, _) = traffic_of("busy", EPOCH_NS, 4);
        ingest_all(&mut engine, busy);
        let of_busy = engine.take_changes_of(&[("prod".into(), "busy".into())]);
        assert!(!of_busy.baselines.is_empty());
        assert!(of_busy.baselines.iter().all(|(id, _)| id.app == "busy"));
        assert!(of_busy.clocks.iter().all(|(_, app, _)| app == "busy"));
        assert!(of_busy.apps.iter().all(|(_, app, _)| app == "busy"));
        assert_eq!(of_busy.clocks.len(), 1);
        let rest = engine.take_changes();
        assert!(rest.baselines.iter().any(|(id, _)| id.app == "quiet"));
        assert!(
            rest.baselines.iter().all(|(id, _)| id.app == "quiet"),
            "busy's changes were taken with its event"
        );
        assert!(rest.apps.iter().all(|(_, app, _)| app == "quiet"));
    }

    #[tokio::test]
    async fn a_crash_right_after_an_event_restarts_with_the_anomaly_that_made_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
        let emitter = emitter(&store);
        let mut watched = emitter.feed.subscribe();
        let mut engine = engine_on(&store);
        let (steady, fault_start) = traffic(EPOCH_NS, 15, 0.01);
        let (fault, _) = traffic(fault_start, 6, 0.5);
        let mut detected = None;
        for (i, batch) in steady.into_iter().chain(fault).enumerate() {
            // The flush interval: every few batches.
            if i % 4 == 3 {
                emitter.flush_and_wait(&mut engine).await;
            }
            let (reply, answer) = oneshot::channel();
            let input = Input::Observations {
                batch,
                reply: Some(reply),
                admission: None,
                queued: Instant::now(),
            };
            apply(
                &mut engine,
                &emitter,
                &emitter.stats,
                &mut LateLog::default(),
                input,
            );
            answer.await.expect("the engine answers");
            while let Ok(event) = watched.try_recv() {
                if event.event_type == EventType::AnomalyDetected {
                    detected = Some(event);
                }
            }
            if detected.is_some() {
                break;
            }
        }
        let detected = detected.expect("the fault is detected, and the event published");
        let feature = &detected.data.reasons[0].feature;
        // The app as a whole, or one operation, exception type or series of it.
        let subject = detected.data.reasons[0].operation.clone().unwrap_or_default();
        let version = detected.data.version.as_deref().expect("a version's anomaly");
        // kill -9 here, before the next flush: a restart finds what the store holds. The anomaly
        // is open there, as it was when the event was stored, so the same transition cannot fire
        // again (and the fault is learned at the anomalous rate, not absorbed).
        let restarted = engine_on(&store);
        let view = restarted
            .baselines(&detected.data.env, &detected.data.app, Some(version))
            .expect("the version's baselines are restored");
        let (_, baseline) = view
            .baselines
            .iter()
            .find(|(key, _)| *key.subject == *subject && key.feature.name() == feature)
            .expect("the baseline behind the event");
        assert!(baseline.anomaly.active, "{:?}", baseline.anomaly);
    }
}
