//! The one emitter: engine decisions become durable events, then go out.
//!
//! An event is emitted only once it, its outbox entries and the engine state that made it are
//! written and flushed together, so a crash can neither lose a decision nor make the same
//! transition fire twice. Then delivery is woken and the watchers are told. Every path that makes
//! events (ingest, a declared rollout) goes through `Emitter::emit`; there is no other.

use std::sync::Arc;
use std::time::Duration;

use canaryd_engine::Engine;

use crate::act::delivery::Dispatcher;
use crate::events::Event;
use crate::events::feed::EventFeed;
use crate::stats::Stats;
use crate::store::Store;

/// Where the engine's results go, and how often its state is flushed.
pub struct Emitter {
    pub store: Store,
    pub stats: Arc<Stats>,
    /// Woken when events (and so deliveries) were stored.
    pub dispatcher: Arc<Dispatcher>,
    /// Where stored events go out to watchers.
    pub feed: EventFeed,
    pub flush_interval: Duration,
    pub max_events: usize,
}

impl Emitter {
    /// Stores `events` (giving each its id) with their deliveries and the engine's changed state,
    /// in one flush, then wakes delivery and publishes them to watchers. Returns the events
    /// emitted: none when they could not be stored (logged and counted; the decisions stay in the
    /// engine's state, which is written again with its next change).
    pub fn emit(&self, engine: &mut Engine, mut events: Vec<Event>) -> Vec<Event> {
        if events.is_empty() {
            return events;
        }
        let changes = engine.take_changes();
        match self
            .store
            .write_with_events(&changes, &mut events, self.max_events)
        {
            Ok(()) => {
                self.stats.flushes.inc();
                for event in &events {
                    self.stats.event(event.event_type);
                    let reason = event.data.reasons.first().map_or("", |r| r.message.as_str());
                    tracing::info!(id = %event.id, r#type = event.event_type.as_str(), app = %event.data.app, %reason, "event");
                }
                self.dispatcher.wake();
                self.feed.publish(&events);
                events
            }
            Err(e) => {
                self.stats.event_errors.inc();
                self.stats.flush_errors.inc();
                tracing::error!(error = %e, events = events.len(), "cannot store events");
                Vec::new()
            }
        }
    }

    /// Writes what changed since the last flush, then makes it durable. A failed flush is logged and
    /// counted; what it carried is written again when it next changes.
    pub fn flush(&self, engine: &mut Engine) {
        let changes = engine.take_changes();
        let (baselines, bytes) = engine.baseline_memory();
        let stats = &self.stats;
        stats.baselines.set(baselines as i64);
        stats.baseline_memory_bytes.set(bytes as i64);
        match self.store.write(&changes).and_then(|()| self.store.flush()) {
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
        stats.store_disk_bytes.set(self.store.size_on_disk() as i64);
        stats.outbox_depth.set(self.store.outbox_depth() as i64);
    }
}
