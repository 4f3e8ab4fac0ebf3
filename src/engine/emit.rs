//! The one emitter: engine decisions become durable events, then go out.
//!
//! An event is emitted only once it, its outbox entries and the engine state that made it are
//! written and flushed together, so a crash can neither lose a decision nor make the same
//! transition fire twice. Then delivery is woken and the watchers are told. Every path that makes
//! events goes through the emitter: a decision (`emit`, `emit_decided`) or an operator's action
//! (`emit_operated`); there is no other. The emitter names each event (`Event::identify`): a
//! decision by what it is about, so that replicas fed the same stream name it alike, and an
//! operator's action with the moment it was taken too.
//!
//! Two things only the emitter can add, since they need the stored event: a stage waiting for
//! approval gets its signed links before it is stored; and each stored verdict (promoted, failed)
//! is told to the engine with its event id, for promotion chains, whose consequences (a version
//! failed on sight further along the chain) are emitted in turn.

use std::sync::Arc;
use std::time::Duration;

use canaryd_engine::Engine;
use canaryd_engine::judge::Verdict;

use crate::act::delivery::Dispatcher;
use crate::events::approval::{Approvals, now_unix};
use crate::events::feed::EventFeed;
use crate::events::{Event, EventType, canary_event};
use crate::stats::Stats;
use crate::store::Store;
use crate::store::writer::{Flushed, PART_BASELINES, StoreWriter};

/// Where the engine's results go, and how often its state is flushed.
pub struct Emitter {
    /// Read here (its size, the outbox's depth); written only through `writer`.
    pub store: Store,
    pub writer: StoreWriter,
    pub stats: Arc<Stats>,
    /// Woken when events (and so deliveries) were stored.
    pub dispatcher: Arc<Dispatcher>,
    /// Where stored events go out to watchers.
    pub feed: EventFeed,
    pub flush_interval: Duration,
    /// The most the baselines may take in memory; past it, each flush pages apps out (0: no limit).
    pub max_baseline_memory_bytes: usize,
    pub max_events: usize,
    /// Signs the links of stages waiting for approval.
    pub approvals: Approvals,
}

impl Emitter {
    /// Stores the events of decisions (naming each by what it is about) with their deliveries
    /// and the changed state of the apps they are about, in one flush, then wakes delivery and
    /// publishes them to watchers. Returns the events emitted: none when they could not be
    /// stored (logged and counted; the decisions stay in the engine's state, which is written
    /// again with its next change), and not one whose id was stored already (the same decision,
    /// made again).
    pub fn emit(&self, engine: &mut Engine, events: Vec<Event>) -> Vec<Event> {
        self.emit_decided(engine, events, None)
    }

    /// `emit`, for the events of an operator's action (a declared or ended rollout, a pause, an
    /// approval): named with the moment the action was taken, too.
    pub fn emit_operated(&self, engine: &mut Engine, mut events: Vec<Event>) -> Vec<Event> {
        let now = std::time::SystemTime::now();
        for event in &mut events {
            event.identify_operated(now);
        }
        self.emit_decided(engine, events, None)
    }

    /// `emit`, for events a batch decided: `arrived` is when that batch arrived (wall-clock
    /// nanoseconds), from which delivery times its first attempt (`canaryd_act_seconds`).
    pub fn emit_decided(
        &self,
        engine: &mut Engine,
        mut events: Vec<Event>,
        arrived: Option<u64>,
    ) -> Vec<Event> {
        if events.is_empty() {
            return events;
        }
        for event in events.iter_mut().filter(|e| e.id.is_empty()) {
            event.identify();
        }
        self.sign_approvals(engine, &mut events);
        // The state that made these decisions is their apps'; the others' changes wait for the
        // next flush, so that an event's write does not grow with every series held.
        let mut apps: Vec<(String, String)> = Vec::new();
        for event in &events {
            let app = (event.data.env.clone(), event.data.app.clone());
            if !apps.contains(&app) {
                apps.push(app);
            }
        }
        let changes = engine.take_changes_of(&apps);
        let count = events.len();
        match self.writer.write_events(changes, events, self.max_events) {
            Ok(mut events) => {
                self.stats.flushes.inc();
                for event in &events {
                    self.stats.event(event.event_type);
                    let reason = event.data.reasons.first().map_or("", |r| r.message.as_str());
                    tracing::info!(id = %event.id, r#type = event.event_type.as_str(), app = %event.data.app, %reason, "event");
                }
                if let Some(arrived) = arrived {
                    // Before the wake, so that the first attempt finds it.
                    let seqs = events.iter().map(|e| e.seq);
                    self.dispatcher.note_decided(seqs, arrived);
                }
                self.dispatcher.wake();
                self.feed.publish(&events);
                let follow: Vec<Event> = events
                    .iter()
                    .flat_map(|event| remember_verdict(engine, event))
                    .map(|change| canary_event(&change))
                    .collect();
                // Each round moves one environment along a chain: it ends with the chain.
                let followed = self.emit_decided(engine, follow, arrived);
                events.extend(followed);
                events
            }
            Err(e) => {
                self.stats.event_errors.inc();
                self.stats.flush_errors.inc();
                tracing::error!(error = %e, events = count, "cannot store events");
                Vec::new()
            }
        }
    }

    /// Gives each event of a stage waiting for approval its signed links.
    fn sign_approvals(&self, engine: &Engine, events: &mut [Event]) {
        for event in events
            .iter_mut()
            .filter(|e| e.event_type == EventType::CanaryAwaitingApproval)
        {
            let Some(analysis) = engine.judge().analysis(&event.data.env, &event.data.app) else {
                continue;
            };
            event.data.approval =
                self.approvals
                    .links(&analysis.view(), &analysis.model().stages, now_unix());
        }
    }

    /// Begins a flush: hands the head of what changed since the last one to the store's writer
    /// (`Engine::begin_changes`); `flush_step` hands the changed baselines over in parts, between
    /// the engine's inputs, and `end_flush` asks for them all to be made durable, while the engine
    /// goes on; `flushed` takes the answer. A failed flush is logged and counted; what it carried
    /// is written again when it next changes.
    pub fn begin_flush(&self, engine: &mut Engine) {
        let stats = &self.stats;
        let paged = engine.page_out(self.max_baseline_memory_bytes);
        if paged.apps > 0 {
            stats.apps_paged_out.inc_by(paged.apps as u64);
            tracing::info!(
                apps = paged.apps,
                before = paged.bytes_before,
                after = paged.bytes_after,
                budget = self.max_baseline_memory_bytes,
                "baselines over max_baseline_memory_bytes: apps seen least recently moved to the store"
            );
        }
        let head = engine.begin_changes();
        let memory = engine.memory();
        stats.baselines.set(memory.baseline_series as i64);
        stats.baseline_memory_bytes.set(memory.baselines as i64);
        stats.engine_memory(memory);
        let forgotten = engine.judge().verdicts_dropped();
        let counted = stats.chain_verdicts_forgotten.get();
        stats
            .chain_verdicts_forgotten
            .inc_by(forgotten.saturating_sub(counted));
        tracing::debug!(
            apps = head.apps.len(),
            baselines = engine.taking(),
            "flush begun: state handed to the store's writer in parts"
        );
        self.writer.write_part(head);
    }

    /// Hands the next part of the flush begun to the writer; whether parts remain.
    pub fn flush_step(&self, engine: &mut Engine) -> bool {
        if let Some(part) = engine.take_part(PART_BASELINES) {
            self.writer.write_part(part);
        }
        engine.taking() > 0
    }

    /// Every part is handed over: the answer comes once they are durable.
    pub fn end_flush(&self) -> tokio::sync::oneshot::Receiver<Flushed> {
        self.writer.end_flush()
    }

    /// What became of a flush.
    pub fn flushed(&self, engine: &mut Engine, flushed: Flushed) {
        let stats = &self.stats;
        // Timed before it is counted, so that /metrics never shows a flush counted and not timed.
        stats.flush_seconds(flushed.took);
        match flushed.result {
            Ok(()) => {
                // Apps paged out or archived leave memory only now that their state is on disk.
                engine.changes_written();
                stats.flushes.inc();
            }
            Err(e) => {
                stats.flush_errors.inc();
                tracing::error!(error = %e, "cannot flush state to disk");
            }
        }
        stats.store_disk_bytes.set(self.store.size_on_disk() as i64);
        stats.outbox_depth.set(self.store.outbox_depth() as i64);
    }

    /// A whole flush, waiting for the writer: for the last one, and for tests.
    pub async fn flush_and_wait(&self, engine: &mut Engine) {
        self.begin_flush(engine);
        while self.flush_step(engine) {}
        let flushed = self.end_flush().await.unwrap_or(Flushed {
            result: Err(crate::store::writer::WriteError::WriterGone),
            took: std::time::Duration::ZERO,
        });
        self.flushed(engine, flushed);
    }
}

/// Tells the engine of a stored verdict (promoted or failed), with its event's id; the changes
/// that makes along promotion chains.
pub fn remember_verdict(engine: &mut Engine, event: &Event) -> Vec<canaryd_engine::judge::CanaryChange> {
    match verdict_of(event) {
        Some((version, verdict)) => {
            engine.remember_verdict(&event.data.env, &event.data.app, version, verdict)
        }
        None => Vec::new(),
    }
}

/// Tells the engine of a stored verdict without applying it: a restart recalls every stored
/// verdict first, then follows the chains once (`Engine::follow_chains`).
pub fn recall_verdict(engine: &mut Engine, event: &Event) {
    if let Some((version, verdict)) = verdict_of(event) {
        engine.recall_verdict(&event.data.env, &event.data.app, version, verdict);
    }
}

/// The verdict an event states, with the version it is about; `None` for other events.
fn verdict_of(event: &Event) -> Option<(&str, Verdict)> {
    let passed = match event.event_type {
        EventType::CanaryPromoted => true,
        EventType::CanaryFailed => false,
        _ => return None,
    };
    let version = event.data.version.as_deref()?;
    let verdict = Verdict {
        passed,
        event_id: event.id.clone(),
    };
    Some((version, verdict))
}
