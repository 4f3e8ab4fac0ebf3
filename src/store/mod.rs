//! Durable state in sled: the only module that touches it.
//!
//! Five trees: `clocks` (each app's event-time clock), `apps` (each app's catalog entry: versions,
//! counts, operations, metric streams), `baselines` (each baseline's EWMA and current slot), `slots`
//! (the seasonal hour-of-week summaries paged out of memory), `events` (the event history, keyed by
//! sequence number, which sled keeps increasing across restarts), `subscriptions`, `outbox` (pending
//! deliveries, per subscription in event order, written with their event) and `deliveries` (the
//! history of finished ones, pruned with the events). An outbox entry exists only while its
//! subscription does and is enabled: updates never re-insert one, and a delete or a disable
//! clears them. The numbers of events and of outbox entries are counted as they change (sled's
//! `len` walks a whole tree). Every value is a versioned record: one format byte, then the value
//! in postcard. A record of an unknown format is skipped and counted, never misread. sled flushes
//! only when told (`flush`), so what is durable is exactly what the daemon flushed: on the flush
//! interval, with each batch of events, and at shutdown.
//!
//! sled is no longer maintained; keeping it behind `Store` (open, load, write, flush, slots) is
//! what lets it be replaced later without touching the engine or the daemon's wiring.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use canaryd_engine::baseline::{Baseline, SlotStore, SlotSummary};
use canaryd_engine::catalog::AppEntry;
use canaryd_engine::features::{Feature, FeatureKey};
use canaryd_engine::window::AppClock;
use canaryd_engine::{BaselineId, EngineState, Scope};

pub mod records;

use crate::events::{Event, event_id};
use prometheus_client::metrics::counter::Counter;
pub use records::{Delivery, DeliveryState, Kind, Subscription};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The record format this build writes and reads.
const RECORD_FORMAT: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store in {path} (is another canaryd using this data_dir?): {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("store {operation} failed: {source}")]
    Io {
        operation: &'static str,
        source: sled::Error,
    },
}

/// Counters of what the store did; `Stats` registers them on `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct StoreCounters {
    pub records_written: Counter,
    pub records_skipped: Counter,
    pub slot_errors: Counter,
}

/// Records in the trees whose size is read on the hot path (sled's `len` walks the whole tree):
/// counted once at open, then kept up to date by every insert and remove of a new key.
#[derive(Debug, Default)]
struct Counts {
    events: AtomicU64,
    outbox: AtomicU64,
}

fn decrement(count: &AtomicU64) {
    // Never below zero, whatever the interleaving.
    let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
        Some(n.saturating_sub(1))
    });
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    clocks: sled::Tree,
    apps: sled::Tree,
    baselines: sled::Tree,
    slots: sled::Tree,
    events: sled::Tree,
    subscriptions: sled::Tree,
    outbox: sled::Tree,
    history: sled::Tree,
    counts: Arc<Counts>,
    counters: StoreCounters,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = vec![RECORD_FORMAT];
    // Serializing plain data into a Vec cannot fail.
    bytes.extend(postcard::to_stdvec(value).unwrap_or_default());
    bytes
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    match bytes.split_first() {
        Some((&RECORD_FORMAT, rest)) => postcard::from_bytes(rest).ok(),
        _ => None,
    }
}

/// Outbox keys: the subscription id, a zero byte, the event's sequence number; so a
/// subscription's pending deliveries sort by event.
fn outbox_prefix(subscription: &str) -> Vec<u8> {
    let mut key = subscription.as_bytes().to_vec();
    key.push(0);
    key
}

fn outbox_key(subscription: &str, seq: u64) -> Vec<u8> {
    let mut key = outbox_prefix(subscription);
    key.extend(seq.to_be_bytes());
    key
}

/// The event sequence number at the end of an outbox key.
fn outbox_seq(key: &[u8]) -> Option<u64> {
    let at = key.len().checked_sub(8)?;
    key[at..].try_into().ok().map(u64::from_be_bytes)
}

fn slot_key(series: &str, slot: u16) -> Vec<u8> {
    let mut key = series.as_bytes().to_vec();
    key.push(0);
    key.extend(slot.to_be_bytes());
    key
}

impl Store {
    /// Opens (or creates) the store under `data_dir`, with sled's cache bounded to `cache_bytes`.
    pub fn open(data_dir: &Path, cache_bytes: u64, counters: StoreCounters) -> Result<Store, StoreError> {
        let path = data_dir.join("sled");
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(None)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        let tree = |name: &str| {
            db.open_tree(name).map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })
        };
        let events = tree("events")?;
        let outbox = tree("outbox")?;
        let counts = Arc::new(Counts {
            events: AtomicU64::new(events.len() as u64),
            outbox: AtomicU64::new(outbox.len() as u64),
        });
        Ok(Store {
            clocks: tree("clocks")?,
            apps: tree("apps")?,
            baselines: tree("baselines")?,
            slots: tree("slots")?,
            events,
            subscriptions: tree("subscriptions")?,
            outbox,
            history: tree("deliveries")?,
            db,
            counts,
            counters,
        })
    }

    /// Everything persisted. Unreadable records are skipped and counted.
    pub fn load(&self) -> Result<EngineState, StoreError> {
        let mut state = EngineState::default();
        for (key, value) in self.records::<(String, String), AppClock>(&self.clocks)? {
            state.clocks.push((key.0, key.1, value));
        }
        for (key, value) in self.records::<(String, String), AppEntry>(&self.apps)? {
            state.apps.push((key.0, key.1, value));
        }
        state.baselines = self.records::<BaselineId, Baseline>(&self.baselines)?;
        Ok(state)
    }

    /// Every readable record of `tree`.
    fn records<K: DeserializeOwned, V: DeserializeOwned>(
        &self,
        tree: &sled::Tree,
    ) -> Result<Vec<(K, V)>, StoreError> {
        let mut out = Vec::new();
        for entry in tree.iter() {
            let (key, value) = entry.map_err(|source| StoreError::Io {
                operation: "load",
                source,
            })?;
            match (decode(&key), decode(&value)) {
                (Some(k), Some(v)) => out.push((k, v)),
                _ => {
                    self.counters.records_skipped.inc();
                }
            }
        }
        Ok(out)
    }

    /// Writes clocks, apps and baselines (atomically per tree). Forgotten versions go first: a
    /// version forgotten and seen again since the last write has new baselines in `state`, which
    /// must outlive the deletion of the old ones.
    pub fn write(&self, state: &EngineState) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            operation: "write",
            source,
        };
        for (env, app, version) in &state.forgotten_versions {
            self.forget_version(env, app, version).map_err(io)?;
        }
        // The engine saved the current slots of `state`'s baselines before handing it over, so
        // the deletion just took those of a version that came back; they are saved again.
        if !state.forgotten_versions.is_empty() {
            let mut slots = self.slot_store();
            for (id, baseline) in &state.baselines {
                let forgotten = state.forgotten_versions.iter().any(|(env, app, version)| {
                    *env == id.env && *app == id.app && id.scope == Scope::Version(version.clone())
                });
                if forgotten {
                    baseline.save_slot(&id.series_name(), &mut slots);
                }
            }
        }
        let mut batch = sled::Batch::default();
        for (env, app, clock) in &state.clocks {
            batch.insert(encode(&(env, app)), encode(clock));
        }
        self.clocks.apply_batch(batch).map_err(io)?;
        let mut batch = sled::Batch::default();
        for (env, app, entry) in &state.apps {
            batch.insert(encode(&(env, app)), encode(entry));
        }
        self.apps.apply_batch(batch).map_err(io)?;
        let mut batch = sled::Batch::default();
        for (id, baseline) in &state.baselines {
            batch.insert(encode(id), encode(baseline));
        }
        self.baselines.apply_batch(batch).map_err(io)?;
        let written = state.clocks.len() + state.apps.len() + state.baselines.len();
        self.counters.records_written.inc_by(written as u64);
        Ok(())
    }

    /// Deletes a version's baselines and seasonal slots.
    fn forget_version(&self, env: &str, app: &str, version: &str) -> Result<(), sled::Error> {
        // A BaselineId's record key starts with the encoding of its env, app and scope.
        let scope = Scope::Version(version.to_owned());
        let baseline_prefix = encode(&(env, app, &scope));
        let any_feature = BaselineId {
            env: env.to_owned(),
            app: app.to_owned(),
            scope,
            key: FeatureKey::app(Feature::RequestRate),
        };
        // Slot keys start with the series name, whose last part is the feature.
        let name = any_feature.series_name();
        let slot_prefix = &name[..name.len() - Feature::RequestRate.name().len()];
        for (tree, prefix) in [
            (&self.baselines, baseline_prefix),
            (&self.slots, slot_prefix.as_bytes().to_vec()),
        ] {
            let mut batch = sled::Batch::default();
            for key in tree.scan_prefix(&prefix).keys() {
                batch.remove(key?);
            }
            tree.apply_batch(batch)?;
        }
        Ok(())
    }

    /// Stores events, giving each its id (in order), and makes them durable before returning:
    /// an event is emitted once this returns. Beyond `max_events`, the oldest are dropped.
    pub fn append_events(&self, events: &mut [Event], max_events: usize) -> Result<(), StoreError> {
        self.put_events(events, max_events)?;
        self.flush()
    }

    /// Writes the engine state that made `events`, then stores the events as `append_events` does,
    /// and makes both durable in one flush: after a crash, the decisions behind a stored event are
    /// never older than the event (which would make them fire again).
    pub fn write_with_events(
        &self,
        state: &EngineState,
        events: &mut [Event],
        max_events: usize,
    ) -> Result<(), StoreError> {
        self.write(state)?;
        self.put_events(events, max_events)?;
        self.flush()
    }

    /// `append_events` but for the flush.
    fn put_events(&self, events: &mut [Event], max_events: usize) -> Result<(), StoreError> {
        let subscriptions = self.subscriptions()?;
        self.put_events_for(events, max_events, &subscriptions)
    }

    /// Stores events with an outbox entry for each of `subscriptions` that wants them. The list
    /// was read before the entries are written, so a subscription deleted or disabled meanwhile
    /// may have been given some: looked up again afterwards, such a subscription's entries are
    /// removed here (its delete or disable removes any written before it looked).
    fn put_events_for(
        &self,
        events: &mut [Event],
        max_events: usize,
        subscriptions: &[Subscription],
    ) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            operation: "append events",
            source,
        };
        let mut batch = sled::Batch::default();
        let mut outbox = sled::Batch::default();
        let mut entries = 0;
        let mut given: Vec<&str> = Vec::new();
        for event in events.iter_mut() {
            let seq = self.db.generate_id().map_err(io)?;
            event.id = event_id(seq);
            batch.insert(&seq.to_be_bytes(), encode(event));
            for subscription in subscriptions.iter().filter(|s| s.wants(event.event_type)) {
                let delivery = Delivery::new(event.id.clone(), event.event_type);
                outbox.insert(outbox_key(&subscription.id, seq), encode(&delivery));
                entries += 1;
                if !given.contains(&subscription.id.as_str()) {
                    given.push(&subscription.id);
                }
            }
        }
        self.events.apply_batch(batch).map_err(io)?;
        self.counts
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        // Fresh sequence numbers: every entry is a new key.
        self.outbox.apply_batch(outbox).map_err(io)?;
        self.counts.outbox.fetch_add(entries, Ordering::Relaxed);
        for id in given {
            let active = self.subscription(id)?.is_some_and(|s| s.disabled.is_none());
            if !active {
                self.clear_outbox(id).map_err(io)?;
            }
        }
        while self.counts.events.load(Ordering::Relaxed) > max_events as u64 {
            let Some((oldest, _)) = self.events.pop_min().map_err(io)? else {
                self.counts.events.store(0, Ordering::Relaxed);
                break;
            };
            decrement(&self.counts.events);
            // Delivery history older than the oldest event kept goes with it.
            let mut old = sled::Batch::default();
            for key in self.history.range(..oldest.to_vec()).keys() {
                old.remove(key.map_err(io)?);
            }
            self.history.apply_batch(old).map_err(io)?;
        }
        Ok(())
    }

    /// Removes every pending delivery of a subscription.
    fn clear_outbox(&self, subscription: &str) -> Result<(), sled::Error> {
        for key in self.outbox.scan_prefix(outbox_prefix(subscription)).keys() {
            // One by one: what another remover took first is not counted twice.
            if self.outbox.remove(key?)?.is_some() {
                decrement(&self.counts.outbox);
            }
        }
        Ok(())
    }

    /// The sequence number of the newest stored event.
    pub fn last_event_seq(&self) -> Result<Option<u64>, StoreError> {
        let last = self.events.last().map_err(|source| StoreError::Io {
            operation: "read events",
            source,
        })?;
        Ok(last.and_then(|(key, _)| key.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// The event stored at `seq`.
    pub fn event(&self, seq: u64) -> Result<Option<Event>, StoreError> {
        let value = self
            .events
            .get(seq.to_be_bytes())
            .map_err(|source| StoreError::Io {
                operation: "read an event",
                source,
            })?;
        Ok(value.and_then(|v| decode(&v)))
    }

    pub fn subscriptions(&self) -> Result<Vec<Subscription>, StoreError> {
        self.records::<String, Subscription>(&self.subscriptions)
            .map(|all| all.into_iter().map(|(_, s)| s).collect())
    }

    pub fn subscription(&self, id: &str) -> Result<Option<Subscription>, StoreError> {
        let value = self
            .subscriptions
            .get(encode(&id))
            .map_err(|source| StoreError::Io {
                operation: "read a subscription",
                source,
            })?;
        Ok(value.and_then(|v| decode(&v)))
    }

    /// Stores a subscription durably.
    pub fn put_subscription(&self, subscription: &Subscription) -> Result<(), StoreError> {
        self.subscriptions
            .insert(encode(&subscription.id), encode(subscription))
            .map_err(|source| StoreError::Io {
                operation: "write a subscription",
                source,
            })?;
        self.flush()
    }

    /// Marks a subscription disabled (its receiver answered 410 Gone) and drops its pending
    /// deliveries, which will never be sent. A subscription deleted meanwhile stays deleted.
    pub fn disable_subscription(&self, id: &str) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            operation: "disable a subscription",
            source,
        };
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        self.subscriptions
            .update_and_fetch(encode(&id), |old| {
                let old = old?;
                // A record this build cannot read is left as it is.
                let Some(mut subscription) = decode::<Subscription>(old) else {
                    return Some(old.to_vec());
                };
                subscription.disabled.get_or_insert_with(|| now.clone());
                Some(encode(&subscription))
            })
            .map_err(io)?;
        self.clear_outbox(id).map_err(io)?;
        self.flush()
    }

    /// Deletes a subscription and its pending deliveries; false when there was none.
    pub fn delete_subscription(&self, id: &str) -> Result<bool, StoreError> {
        let io = |source| StoreError::Io {
            operation: "delete a subscription",
            source,
        };
        // The subscription first: an append that looks it up from now on finds it gone and
        // clears what it wrote itself; what it wrote before is cleared here.
        let existed = self.subscriptions.remove(encode(&id)).map_err(io)?.is_some();
        self.clear_outbox(id).map_err(io)?;
        self.flush()?;
        Ok(existed)
    }

    /// The oldest pending delivery of a subscription.
    pub fn next_delivery(&self, subscription: &str) -> Result<Option<(u64, Delivery)>, StoreError> {
        let io = |source| StoreError::Io {
            operation: "read the outbox",
            source,
        };
        for entry in self.outbox.scan_prefix(outbox_prefix(subscription)) {
            let (key, value) = entry.map_err(io)?;
            let seq = outbox_seq(&key);
            match (seq, decode::<Delivery>(&value)) {
                (Some(seq), Some(delivery)) => return Ok(Some((seq, delivery))),
                _ => {
                    self.counters.records_skipped.inc();
                    if self.outbox.remove(key).map_err(io)?.is_some() {
                        decrement(&self.counts.outbox);
                    }
                }
            }
        }
        Ok(None)
    }

    /// Records a delivery's new state: a pending one stays in the outbox, a finished one moves to
    /// the history. Only while it is still in the outbox: one whose subscription was deleted or
    /// disabled meanwhile is not brought back.
    pub fn put_delivery(&self, subscription: &str, seq: u64, delivery: &Delivery) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            operation: "record a delivery",
            source,
        };
        let key = outbox_key(subscription, seq);
        if delivery.state == DeliveryState::Pending {
            let record = encode(delivery);
            // Atomic: replaces the entry only if it is there, never inserts it.
            self.outbox
                .update_and_fetch(key, |old| old.map(|_| record.clone()))
                .map_err(io)?;
        } else if self.outbox.remove(key).map_err(io)?.is_some() {
            decrement(&self.counts.outbox);
            let mut history_key = seq.to_be_bytes().to_vec();
            history_key.extend(subscription.as_bytes());
            self.history.insert(history_key, encode(delivery)).map_err(io)?;
        }
        self.flush()
    }

    /// A subscription's deliveries, pending and finished, newest first, at most `limit`.
    pub fn deliveries(&self, subscription: &str, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        let io = |source| StoreError::Io {
            operation: "read deliveries",
            source,
        };
        let mut out: Vec<(u64, Delivery)> = Vec::new();
        for entry in self.outbox.scan_prefix(outbox_prefix(subscription)) {
            let (key, value) = entry.map_err(io)?;
            let seq = outbox_seq(&key);
            if let (Some(seq), Some(d)) = (seq, decode(&value)) {
                out.push((seq, d));
            }
        }
        for entry in self.history.iter().rev() {
            let (key, value) = entry.map_err(io)?;
            if key.len() > 8 && &key[8..] == subscription.as_bytes() {
                let seq = u64::from_be_bytes(key[..8].try_into().unwrap_or_default());
                if let Some(d) = decode(&value) {
                    out.push((seq, d));
                }
            }
            if out.len() >= limit * 2 {
                break;
            }
        }
        out.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        out.truncate(limit);
        Ok(out.into_iter().map(|(_, d)| d).collect())
    }

    /// Deliveries waiting in the outbox, over all subscriptions.
    pub fn outbox_depth(&self) -> usize {
        self.counts.outbox.load(Ordering::Relaxed) as usize
    }

    /// Events in the history.
    pub fn event_count(&self) -> usize {
        self.counts.events.load(Ordering::Relaxed) as usize
    }

    /// Stored events after the one with sequence `after` (all when `None`), oldest first, that
    /// `keep` accepts, at most `limit`.
    pub fn events(
        &self,
        after: Option<u64>,
        limit: usize,
        keep: impl Fn(&Event) -> bool,
    ) -> Result<Vec<Event>, StoreError> {
        let start = after.map_or(0, |seq| seq.saturating_add(1));
        let mut out = Vec::new();
        for entry in self.events.range(start.to_be_bytes()..) {
            let (_, value) = entry.map_err(|source| StoreError::Io {
                operation: "read events",
                source,
            })?;
            match decode::<Event>(&value) {
                Some(event) if keep(&event) => out.push(event),
                Some(_) => {}
                None => {
                    self.counters.records_skipped.inc();
                }
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(|source| StoreError::Io {
            operation: "flush",
            source,
        })
    }

    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// The engine's view of the seasonal slots.
    pub fn slot_store(&self) -> SledSlots {
        SledSlots {
            slots: self.slots.clone(),
            counters: self.counters.clone(),
        }
    }
}

/// Seasonal slot summaries in sled, for the engine.
pub struct SledSlots {
    slots: sled::Tree,
    counters: StoreCounters,
}

impl SlotStore for SledSlots {
    fn load(&mut self, series: &str, slot: u16) -> Option<SlotSummary> {
        match self.slots.get(slot_key(series, slot)) {
            Ok(Some(bytes)) => {
                let summary = decode(&bytes);
                if summary.is_none() {
                    self.counters.records_skipped.inc();
                }
                summary
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, series, slot, "cannot read a seasonal slot");
                self.counters.slot_errors.inc();
                None
            }
        }
    }

    fn save(&mut self, series: &str, slot: u16, summary: &SlotSummary) {
        match self.slots.insert(slot_key(series, slot), encode(summary)) {
            Ok(_) => {
                self.counters.records_written.inc();
            }
            Err(e) => {
                tracing::warn!(error = %e, series, slot, "cannot write a seasonal slot");
                self.counters.slot_errors.inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canaryd_engine::baseline::BaselineConfig;

    fn id(scope: Scope) -> BaselineId {
        BaselineId {
            env: "prod".into(),
            app: "shop".into(),
            scope,
            key: FeatureKey::of(Feature::OperationShare, "GET /a"),
        }
    }

    fn clock() -> AppClock {
        AppClock {
            max_time: 42,
            closed_until: 40,
            lead: 43,
        }
    }

    fn event() -> Event {
        serde_json::from_value(serde_json::json!({
            "specversion": "1.0",
            "id": "",
            "source": "canaryd",
            "type": "canaryd.anomaly.detected",
            "time": "2026-01-05T00:00:00Z",
            "subject": "shop",
            "datacontenttype": "application/json",
            "data": {
                "env": "prod",
                "app": "shop",
                "state": "anomalous",
                "detected_at": "2026-01-05T00:00:00Z",
                "reasons": [],
                "dry_run": false,
            },
        }))
        .expect("an event")
    }

    fn events(n: usize) -> Vec<Event> {
        (0..n).map(|_| event()).collect()
    }

    fn subscribe(store: &Store, id: &str) -> Subscription {
        let subscription = Subscription {
            id: id.into(),
            url: "http://127.0.0.1:9/hook".into(),
            events: vec![crate::events::EventType::AnomalyDetected],
            kind: Kind::Webhook,
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            created_at: "2026-01-05T00:00:00Z".into(),
            disabled: None,
        };
        store.put_subscription(&subscription).expect("subscribe");
        subscription
    }

    /// The counts kept agree with the trees, which sled counts by walking them.
    fn assert_counts(store: &Store) {
        assert_eq!(store.outbox_depth(), store.outbox.len(), "outbox");
        assert_eq!(store.event_count(), store.events.len(), "events");
    }

    #[test]
    fn outbox_and_event_counts_follow_every_change_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
            subscribe(&store, "a");
            subscribe(&store, "b");
            let mut three = events(3);
            store.append_events(&mut three, 2).expect("append");
            assert_eq!((store.event_count(), store.outbox_depth()), (2, 6));
            assert_counts(&store);
            let (seq, mut delivery) = store.next_delivery("a").expect("read").expect("pending");
            delivery.state = DeliveryState::Delivered;
            store.put_delivery("a", seq, &delivery).expect("record");
            assert_eq!(store.outbox_depth(), 5);
            store.delete_subscription("b").expect("delete");
            assert_eq!(store.outbox_depth(), 2);
            assert_counts(&store);
        }
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("reopen");
        assert_eq!((store.event_count(), store.outbox_depth()), (2, 2));
        assert_counts(&store);
    }

    #[test]
    fn a_delivery_recorded_after_its_subscription_was_deleted_is_not_brought_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
        subscribe(&store, "a");
        store.append_events(&mut events(2), 10).expect("append");
        // The worker has the oldest in hand when the subscription is deleted.
        let (seq, mut delivery) = store.next_delivery("a").expect("read").expect("pending");
        store.delete_subscription("a").expect("delete");
        delivery.attempts = 1;
        delivery.last_status = Some(503);
        store.put_delivery("a", seq, &delivery).expect("record a retry");
        assert_eq!(store.next_delivery("a").expect("read"), None);
        delivery.state = DeliveryState::Delivered;
        store.put_delivery("a", seq, &delivery).expect("record a success");
        assert!(store.deliveries("a", 10).expect("read").is_empty());
        assert_eq!(store.outbox_depth(), 0);
        assert_counts(&store);
    }

    #[test]
    fn disabling_a_subscription_drops_its_pending_deliveries_and_never_revives_a_deleted_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
        subscribe(&store, "gone");
        subscribe(&store, "kept");
        store.append_events(&mut events(3), 10).expect("append");
        store.disable_subscription("gone").expect("disable");
        let gone = store.subscription("gone").expect("read").expect("still listed");
        assert!(gone.disabled.is_some());
        assert_eq!(store.next_delivery("gone").expect("read"), None);
        assert_eq!(store.outbox_depth(), 3, "the other subscription's stay");
        // Its worker's 410 races a DELETE: the delete wins.
        store.delete_subscription("kept").expect("delete");
        store.disable_subscription("kept").expect("disable");
        assert_eq!(store.subscription("kept").expect("read"), None);
        assert_eq!(store.outbox_depth(), 0);
        assert_counts(&store);
    }

    #[test]
    fn an_append_that_raced_a_delete_or_a_disable_leaves_no_entries_for_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
        for id in ["deleted", "disabled", "live"] {
            subscribe(&store, id);
        }
        // The append read the subscriptions, then both changed before it wrote its entries.
        let read_before = store.subscriptions().expect("read");
        store.delete_subscription("deleted").expect("delete");
        store.disable_subscription("disabled").expect("disable");
        store
            .put_events_for(&mut events(2), 10, &read_before)
            .expect("append");
        assert_eq!(store.next_delivery("deleted").expect("read"), None);
        assert_eq!(store.next_delivery("disabled").expect("read"), None);
        assert!(store.next_delivery("live").expect("read").is_some());
        assert_eq!(store.outbox_depth(), 2);
        assert_counts(&store);
    }

    #[test]
    fn state_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut baseline = Baseline::default();
        {
            let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
            let mut slots = store.slot_store();
            for i in 0..20 {
                baseline.observe(
                    "s",
                    i as f64,
                    1_767_571_200_000_000_000 + i * 60_000_000_000,
                    &BaselineConfig::default(),
                    &mut slots,
                );
            }
            baseline.save_slot("s", &mut slots);
            let state = EngineState {
                clocks: vec![("prod".into(), "shop".into(), clock())],
                apps: vec![("prod".into(), "shop".into(), AppEntry::default())],
                baselines: vec![(id(Scope::App), baseline.clone())],
                forgotten_versions: vec![],
            };
            store.write(&state).expect("write");
            store.flush().expect("flush");
        }
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("reopen");
        let state = store.load().expect("load");
        assert_eq!(
            state.clocks,
            vec![("prod".to_string(), "shop".to_string(), clock())]
        );
        assert_eq!(
            state.apps,
            vec![("prod".to_string(), "shop".to_string(), AppEntry::default())]
        );
        assert_eq!(state.baselines, vec![(id(Scope::App), baseline.clone())]);
        let (slot, summary) = baseline.slot.clone().expect("a slot");
        assert_eq!(store.slot_store().load("s", slot), Some(summary));
    }

    #[test]
    fn a_forgotten_version_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
        let mut slots = store.slot_store();
        let keep = id(Scope::Version("v10".into()));
        let forget = id(Scope::Version("v1".into()));
        let mut baseline = Baseline::default();
        for target in [&keep, &forget] {
            baseline.observe(
                &target.series_name(),
                1.0,
                1_767_571_200_000_000_000,
                &BaselineConfig::default(),
                &mut slots,
            );
            baseline.save_slot(&target.series_name(), &mut slots);
            baseline.slot = None;
        }
        let both = EngineState {
            baselines: vec![
                (keep.clone(), baseline.clone()),
                (forget.clone(), baseline.clone()),
            ],
            ..EngineState::default()
        };
        store.write(&both).expect("write");
        let forgotten = EngineState {
            forgotten_versions: vec![("prod".into(), "shop".into(), "v1".into())],
            ..EngineState::default()
        };
        store.write(&forgotten).expect("forget");
        let ids: Vec<BaselineId> = store
            .load()
            .expect("load")
            .baselines
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(
            ids,
            vec![keep.clone()],
            "v10 shares v1's prefix as text, not as a record key"
        );
        assert_eq!(store.slots.len(), 1);
    }

    #[test]
    fn a_version_forgotten_and_seen_again_keeps_its_new_baselines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
        let mut slots = store.slot_store();
        let back = id(Scope::Version("v1".into()));
        let series = back.series_name();
        let learn = |value: f64, slots: &mut SledSlots| {
            let mut baseline = Baseline::default();
            baseline.observe(
                &series,
                value,
                1_767_571_200_000_000_000,
                &BaselineConfig::default(),
                slots,
            );
            baseline
        };
        let old = learn(1.0, &mut slots);
        old.save_slot(&series, &mut slots);
        store
            .write(&EngineState {
                baselines: vec![(back.clone(), old)],
                ..EngineState::default()
            })
            .expect("write");
        // Evicted, then back within one flush: the engine saved the new slot as it took changes.
        let new = learn(7.0, &mut slots);
        new.save_slot(&series, &mut slots);
        store
            .write(&EngineState {
                baselines: vec![(back.clone(), new.clone())],
                forgotten_versions: vec![("prod".into(), "shop".into(), "v1".into())],
                ..EngineState::default()
            })
            .expect("write");
        assert_eq!(store.load().expect("load").baselines, vec![(back, new.clone())]);
        let (slot, summary) = new.slot.clone().expect("a slot");
        assert_eq!(store.slot_store().load(&series, slot), Some(summary));
    }

    #[test]
    fn records_of_another_format_are_skipped_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let counters = StoreCounters::default();
        let store = Store::open(dir.path(), 1 << 20, counters.clone()).expect("open");
        store
            .baselines
            .insert(encode(&id(Scope::Version("v1".into()))), vec![99, 1, 2])
            .expect("insert");
        assert!(store.load().expect("load").baselines.is_empty());
        assert_eq!(counters.records_skipped.get(), 1);
    }

    #[test]
    fn a_second_open_of_the_same_dir_fails_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
        let message = Store::open(dir.path(), 1 << 20, StoreCounters::default())
            .err()
            .expect("locked")
            .to_string();
        assert!(message.contains("another canaryd"), "{message}");
    }
}
