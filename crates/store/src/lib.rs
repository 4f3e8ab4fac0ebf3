//! canaryd's durable state in sled: the only crate that touches it.
//!
//! The engine's state is kept in records of the store's own (`records`), not in the engine's
//! in-memory structs, under a schema version kept in the `meta` tree (`SCHEMA`). Each schema's
//! records are frozen once released (`v1` holds format 1, which the daemon wrote until it had a
//! schema); `Store::open` migrates an older data dir to the current schema (`migrate`) and refuses
//! one written by a newer schema with `StoreError::NewerSchema`, naming both versions: nothing is
//! skipped because a newer build wrote it.
//!
//! Trees of schema 2: `meta` (the schema), `clocks.2` (each app's event-time clock), `apps.2` (each
//! app's catalog entry), `baselines.3` (each baseline's EWMA, current slot, long-memory range and
//! anomaly state; `baselines.2` before the range was kept, moved at open: a build older than
//! `baselines.3` finds no baselines and learns them anew), `slots.2` (the
//! seasonal hour-of-week summaries paged out of memory), `analyses.3` (each app's canary analysis:
//! declared rollout, model, stage, verdict and its evidence; `analysis`), `sequential.2` (each
//! analysis's sequential evidence, under the analysis's key, naming the analysis it is of), keyed
//! as `keys` says: a
//! version's keys never collide with the app's or another version's. Every engine value is the
//! schema byte, then postcard of its record.
//!
//! The daemon's own records (`events`, keyed by sequence number, which sled keeps increasing
//! across restarts; `subscriptions`; `outbox`, pending deliveries per subscription in event order,
//! written with their event; `parked`, deliveries taken off the head of their subscription's
//! outbox after failing there for too long, keyed as the outbox is; `owed`, events pruned from
//! the history while a subscription still had a pending or parked delivery of them, kept until no
//! delivery needs them, keyed as `events`; `deliveries`, the history of finished ones, pruned with
//! the events; `event_ids`, each kept event's id to its sequence number, so that an event is found
//! by the id it was named with and a second event of an id already kept is left out
//! (`StoreCounters::duplicate_events`)) are records of the store's own too (`daemon`: an event's envelope with its data as
//! the contract's JSON, and types, states and kinds by name), under a format of their own
//! (`DAEMON_FORMAT`, 2, in `meta` and as each value's first byte), which the daemon converts its
//! types to and from (`DaemonRecords`). Format 1, postcard of the daemon's in-memory types, is
//! frozen in `v1` and rewritten as format 2 when the store opens (`migrate`); a newer format stops
//! the open, or the read that finds one, with an error naming both formats. The store owns these
//! records' keys and the rules between them, written in its records' terms. An outbox or parked
//! entry exists only while its subscription does and is enabled: updates never re-insert one, a
//! delivery moves from the outbox to `parked` in one transaction, and a delete or a disable clears
//! both. An event leaves the history (`max_events`, oldest first) but is never lost while a
//! delivery of it is pending or parked: it goes to `owed` before it leaves `events`, and `event`
//! reads both. The numbers of events, outbox entries and parked ones are counted as they change
//! (sled's `len` walks a whole tree).
//!
//! A record that does not decode (corrupt, or of a format no schema ever wrote), or a daemon
//! record naming what this build does not know, is skipped, counted
//! (`StoreCounters::records_skipped`) and logged, never misread; one that says it was written by a
//! newer schema or format is an error. sled flushes only when told (`flush`), so what is durable
//! is exactly what the daemon flushed: on the flush interval, with each batch of events, and at
//! shutdown.
//!
//! sled is no longer maintained; keeping it behind `Store` (open, load, write, flush, slots) is
//! what lets it be replaced later without touching the engine or the daemon's wiring.

pub mod analysis;
pub mod daemon;
pub mod keys;
mod migrate;
pub mod records;
pub mod v1;

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use canaryd_engine::baseline::{Baseline, SLOTS_PER_WEEK, SlotStore, SlotSummary};
use canaryd_engine::catalog::AppEntry;
use canaryd_engine::window::AppClock;
use canaryd_engine::{AppArchive, ArchivedApp, BaselineId, EngineState, Scope};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use daemon::{DeliveryRecord, EventRecord, SubscriptionRecord};

use analysis::{AnalysisRecord, SequentialRecord};
use canaryd_engine::judge::AnalysisSnapshot;
use canaryd_engine::judge::sequential::SequentialState;
pub use records::ConvertError;
use records::{AppRecord, BaselineRecord, ClockRecord, StoredSlotRecord};

/// The schema this build writes, and the newest it reads.
pub const SCHEMA: u32 = 2;

/// The format of the daemon's records (events, subscriptions, deliveries) this build writes.
pub const DAEMON_FORMAT: u8 = daemon::FORMAT;

/// The engine trees of schema 2.
const CLOCKS: &str = "clocks.2";
const APPS: &str = "apps.2";
/// Baselines (`records::BaselineRecord`): the tree's version is its layout's.
const BASELINES: &str = "baselines.3";
/// The baselines' tree before it kept the long-memory range and the anomaly's recent peak, moved to
/// `BASELINES` at open.
const BASELINES_V2: &str = "baselines.2";
/// Seasonal slots, by slot then series (`keys::slot`).
const SLOTS: &str = "slots.3";
/// The slots' tree while its keys put the series first, moved to `SLOTS` at open.
const SLOTS_V2: &str = "slots.2";
/// Canary analyses, by app: added within schema 2 (a tree older daemons never open), its layout
/// versioned by the tree's name (`analysis`).
const ANALYSES: &str = "analyses.3";
/// The analyses' tree before approvals and promotion chains, moved to `ANALYSES` at open.
const ANALYSES_V2: &str = "analyses.2";
/// Each analysis's sequential evidence, under the analysis's key (`analysis::SequentialRecord`):
/// a tree of its own, so that the analyses' records keep their layout.
const SEQUENTIAL: &str = "sequential.2";
/// The sequential evidence's tree before cohorts had mixes of their own, moved to `SEQUENTIAL` at
/// open.
const SEQUENTIAL_V1: &str = "sequential.1";

/// The daemon's trees (their records are `daemon`'s, under `DAEMON_FORMAT`).
const EVENTS: &str = "events";
const OWED: &str = "owed";
const SUBSCRIPTIONS: &str = "subscriptions";
const OUTBOX: &str = "outbox";
const PARKED: &str = "parked";
const HISTORY: &str = "deliveries";
/// Each kept event's id (in `events` or `owed`) to its sequence number.
const EVENT_IDS: &str = "event_ids";
/// The trees whose values are events, and those whose values are deliveries.
const EVENT_TREES: [&str; 2] = [EVENTS, OWED];
const DELIVERY_TREES: [&str; 3] = [OUTBOX, PARKED, HISTORY];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store in {path} (is another canaryd using this data_dir?): {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("store {operation} failed: {source}")]
    Io {
        operation: &'static str,
        source: sled::Error,
    },
    #[error(
        "the data dir {path} was written by store schema {found}; this build reads up to {supported}: run a newer canaryd"
    )]
    NewerSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "a record in the store's {tree} tree was written by store schema {found}; this build reads up to {supported}: run a newer canaryd"
    )]
    NewerRecord {
        tree: &'static str,
        found: u32,
        supported: u32,
    },
    #[error(
        "the data dir {path} holds events, subscriptions and deliveries of record format {found}; this build reads up to format {supported}: run a newer canaryd"
    )]
    NewerDaemonFormat { path: PathBuf, found: u8, supported: u8 },
    #[error(
        "a record in the store's {tree} tree was written in record format {found}; this build reads up to format {supported}: run a newer canaryd"
    )]
    NewerDaemonRecord {
        tree: &'static str,
        found: u8,
        supported: u8,
    },
    #[error("the store's schema version in {path} is unreadable ({bytes:?})")]
    Meta { path: PathBuf, bytes: Vec<u8> },
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

/// The daemon's types for its events, subscriptions and deliveries, and their conversions to and
/// from the store's records (`daemon`), which the store keeps and applies its outbox rules to.
/// A record that does not convert back (a name this build does not know) is skipped and counted
/// where it is read, never misread.
pub trait DaemonRecords {
    type Event;
    type Subscription;
    type Delivery;

    /// Gives an event its sequence number as it is stored or read back; one stored without an
    /// id is given one derived from the number.
    fn stored(event: &mut Self::Event, seq: u64);
    fn event_record(event: &Self::Event) -> Result<EventRecord, ConvertError>;
    fn event(record: EventRecord) -> Result<Self::Event, ConvertError>;
    fn subscription_record(subscription: &Self::Subscription) -> SubscriptionRecord;
    fn subscription(record: SubscriptionRecord) -> Result<Self::Subscription, ConvertError>;
    fn delivery_record(delivery: &Self::Delivery) -> DeliveryRecord;
    fn delivery(record: DeliveryRecord) -> Result<Self::Delivery, ConvertError>;
}

/// The store's records as they are, unconverted: for users with no types of their own for them
/// (`canaryd-lab`, which keeps none; tools and tests that read them).
#[derive(Clone, Copy, Debug, Default)]
pub struct AsStored;

impl DaemonRecords for AsStored {
    type Event = EventRecord;
    type Subscription = SubscriptionRecord;
    type Delivery = DeliveryRecord;

    fn stored(event: &mut EventRecord, seq: u64) {
        if event.id.is_empty() {
            event.id = seq.to_string();
        }
    }
    fn event_record(event: &EventRecord) -> Result<EventRecord, ConvertError> {
        Ok(event.clone())
    }
    fn event(record: EventRecord) -> Result<EventRecord, ConvertError> {
        Ok(record)
    }
    fn subscription_record(subscription: &SubscriptionRecord) -> SubscriptionRecord {
        subscription.clone()
    }
    fn subscription(record: SubscriptionRecord) -> Result<SubscriptionRecord, ConvertError> {
        Ok(record)
    }
    fn delivery_record(delivery: &DeliveryRecord) -> DeliveryRecord {
        delivery.clone()
    }
    fn delivery(record: DeliveryRecord) -> Result<DeliveryRecord, ConvertError> {
        Ok(record)
    }
}

/// The keys a write put or removed, for an earlier write that goes on after it
/// (`Store::write_superseded`): at these keys it holds older state than the store now has.
#[derive(Clone, Debug, Default)]
pub struct Superseded {
    clocks: HashSet<Vec<u8>>,
    apps: HashSet<Vec<u8>>,
    baselines: HashSet<Vec<u8>>,
    analyses: HashSet<Vec<u8>>,
    /// Key prefixes of the baselines of versions forgotten.
    forgotten: Vec<Vec<u8>>,
}

impl Superseded {
    /// Adds what writing `state` put or removed.
    pub fn add(&mut self, state: &EngineState) {
        for (env, app, version) in &state.forgotten_versions {
            self.forgotten
                .push(keys::scope(env, app, &Scope::Version(version.clone())));
        }
        self.clocks
            .extend(state.clocks.iter().map(|(env, app, _)| keys::app(env, app)));
        self.apps
            .extend(state.apps.iter().map(|(env, app, _)| keys::app(env, app)));
        self.baselines
            .extend(state.baselines.iter().map(|(id, _)| keys::baseline(id)));
        self.analyses
            .extend(state.judge.ended.iter().map(|(env, app)| keys::app(env, app)));
        self.analyses
            .extend(state.judge.analyses.iter().map(|a| keys::app(&a.env, &a.app)));
    }

    /// Adds what another write put or removed.
    pub fn merge(&mut self, other: Superseded) {
        self.clocks.extend(other.clocks);
        self.apps.extend(other.apps);
        self.baselines.extend(other.baselines);
        self.analyses.extend(other.analyses);
        self.forgotten.extend(other.forgotten);
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.clocks.is_empty()
            && self.apps.is_empty()
            && self.baselines.is_empty()
            && self.analyses.is_empty()
            && self.forgotten.is_empty()
    }

    fn supersedes_baseline(&self, key: &[u8]) -> bool {
        self.baselines.contains(key) || self.forgotten.iter().any(|prefix| key.starts_with(prefix))
    }
}

/// `state` in parts of at most `baselines` baselines each, which written in order write what
/// `state` does: the versions forgotten, clocks and catalog entries first, then the baselines,
/// then the analyses, as `Store::write` orders them. A writer that takes other writes between
/// the parts (`Store::write_superseded`) holds none of them back for longer than a part.
pub fn in_parts(state: EngineState, baselines: usize) -> Vec<EngineState> {
    let EngineState {
        clocks,
        apps,
        baselines: all,
        forgotten_versions,
        judge,
    } = state;
    let mut parts = vec![EngineState {
        clocks,
        apps,
        forgotten_versions,
        ..EngineState::default()
    }];
    let mut all = all.into_iter().peekable();
    while all.peek().is_some() {
        parts.push(EngineState {
            baselines: all.by_ref().take(baselines.max(1)).collect(),
            ..EngineState::default()
        });
    }
    parts.push(EngineState {
        judge,
        ..EngineState::default()
    });
    parts
}

/// Counters of what the store did; the daemon registers them on `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct StoreCounters {
    pub records_written: Counter,
    /// Records that did not decode: corrupt, never newer (those are errors).
    pub records_skipped: Counter,
    pub slot_errors: Counter,
    /// Events left out when appended because one of the same id is kept already: the same
    /// decision made again (its id is derived from what it is about).
    pub duplicate_events: Counter,
    /// Seasonal slots read where they were asked for (`SledSlots::load`, `load_scope`): in the
    /// daemon, on the engine's thread.
    pub slots_read: Counter,
    /// Seasonal slots read ahead of their hour (`SledSlots::load_hour`): in the daemon, on the
    /// store's writer thread.
    pub slots_read_ahead: Counter,
}

/// One hour's seasonal slots, read ahead of the hour (`SledSlots::load_hour`), by scope
/// (`BaselineId::series_prefix`). A read cut short by its limit covers the scopes before the
/// one it stopped at, whole; a scope it covers and holds nothing of has no slot of that hour.
#[derive(Debug, Default)]
pub struct HourSlots {
    scopes: HashMap<String, Vec<(String, SlotSummary)>>,
    /// The first scope not read, if the read stopped before the hour's end: it and every scope
    /// after it in key order are not covered.
    stopped_at: Option<String>,
    /// Slots held.
    held: usize,
    /// Bytes they hold, estimated as they were read (`HourSlots::bytes_of`).
    bytes: usize,
    /// Scopes taken: asked for again, they are read from the store (a feature entering the hour
    /// late looks for its slot there).
    taken: HashSet<String>,
}

impl HourSlots {
    /// Whether the read covered every slot of the hour in scope `prefix`.
    pub fn covers(&self, prefix: &str) -> bool {
        self.stopped_at.as_deref().is_none_or(|stop| prefix < stop)
    }

    /// Scope `prefix`'s slots of the hour, taken out, once; `None` if the read did not cover it
    /// or they were taken before.
    pub fn take(&mut self, prefix: &str) -> Option<Vec<(String, SlotSummary)>> {
        if !self.covers(prefix) || !self.taken.insert(prefix.to_owned()) {
            return None;
        }
        let taken = self.scopes.remove(prefix).unwrap_or_default();
        self.held -= taken.len();
        self.bytes -= taken.iter().map(Self::bytes_of).sum::<usize>();
        Some(taken)
    }

    /// What one slot read ahead holds in memory: its entry, its series' name and its sketches.
    pub fn bytes_of((series, summary): &(String, SlotSummary)) -> usize {
        std::mem::size_of::<(String, SlotSummary)>() + series.capacity() + summary.heap_bytes()
    }

    /// Bytes the slots still held take in memory (the estimate of `bytes_of`).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Slots still held.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Keeps a scope read whole.
    fn keep(&mut self, read: ScopeRead) {
        self.held += read.slots.len();
        self.bytes += read.bytes;
        self.scopes.insert(read.prefix, read.slots);
    }
}

/// A scope being read into `HourSlots`: its prefix, its slots read so far and their bytes.
struct ScopeRead {
    prefix: String,
    slots: Vec<(String, SlotSummary)>,
    bytes: usize,
}

/// Records in the trees whose size is read on the hot path (sled's `len` walks the whole tree):
/// counted once at open, then kept up to date by every insert and remove of a new key.
#[derive(Debug, Default)]
struct Counts {
    events: AtomicU64,
    outbox: AtomicU64,
    parked: AtomicU64,
}

fn decrement(count: &AtomicU64) {
    // Never below zero, whatever the interleaving.
    let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
        Some(n.saturating_sub(1))
    });
}

pub struct Store<R: DaemonRecords = AsStored> {
    db: sled::Db,
    clocks: sled::Tree,
    apps: sled::Tree,
    baselines: sled::Tree,
    slots: sled::Tree,
    analyses: sled::Tree,
    sequential: sled::Tree,
    events: sled::Tree,
    subscriptions: sled::Tree,
    outbox: sled::Tree,
    parked: sled::Tree,
    /// Events past the history's cap that a pending or parked delivery still needs.
    owed: sled::Tree,
    history: sled::Tree,
    event_ids: sled::Tree,
    counts: Arc<Counts>,
    counters: StoreCounters,
    records: PhantomData<fn() -> R>,
}

impl<R: DaemonRecords> Clone for Store<R> {
    fn clone(&self) -> Self {
        Store {
            db: self.db.clone(),
            clocks: self.clocks.clone(),
            apps: self.apps.clone(),
            baselines: self.baselines.clone(),
            slots: self.slots.clone(),
            analyses: self.analyses.clone(),
            sequential: self.sequential.clone(),
            events: self.events.clone(),
            subscriptions: self.subscriptions.clone(),
            outbox: self.outbox.clone(),
            parked: self.parked.clone(),
            owed: self.owed.clone(),
            history: self.history.clone(),
            event_ids: self.event_ids.clone(),
            counts: self.counts.clone(),
            counters: self.counters.clone(),
            records: PhantomData,
        }
    }
}

/// How long `Store::open` waits for a data dir's lock to be let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether sled could not open because the data dir's lock file is held.
fn is_lock_busy(error: &sled::Error) -> bool {
    let sled::Error::Io(io) = error else {
        return false;
    };
    let inner = io.get_ref().and_then(|e| e.downcast_ref::<std::io::Error>());
    io.kind() == std::io::ErrorKind::WouldBlock
        || inner.is_some_and(|e| e.kind() == std::io::ErrorKind::WouldBlock)
        || io.to_string().contains("could not acquire lock")
}

/// Opens sled as `config` says. The lock on the data dir outlives its last user by a moment
/// (sled's IO threads let go of it after the database is dropped), so a restart in the same
/// process, or one right after the previous process exited, waits up to `LOCK_WAIT` for it;
/// another live canaryd on the same data dir still fails, with the error that says so.
fn open_waiting(config: &sled::Config) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Err(error) if is_lock_busy(&error) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            opened => return opened,
        }
    }
}

/// An engine record of the current schema.
fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    let mut bytes = vec![SCHEMA as u8];
    // Serializing plain data into a Vec cannot fail.
    bytes.extend(postcard::to_stdvec(record).unwrap_or_default());
    bytes
}

/// What reading one engine record found.
enum Decoded<T> {
    Record(T),
    /// Written by this newer schema.
    Newer(u32),
    Corrupt,
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Decoded<T> {
    match bytes.split_first() {
        Some((&schema, rest)) if u32::from(schema) == SCHEMA => match postcard::from_bytes(rest) {
            Ok(record) => Decoded::Record(record),
            Err(_) => Decoded::Corrupt,
        },
        Some((&schema, _)) if u32::from(schema) > SCHEMA => Decoded::Newer(schema.into()),
        _ => Decoded::Corrupt,
    }
}

/// Subscription keys: format 1's (its format byte, then postcard of the id), kept by format 2.
fn subscription_key(id: &str) -> Vec<u8> {
    v1::encode(&id)
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

impl<R: DaemonRecords> Store<R> {
    /// Opens (or creates) the store under `data_dir`, with sled's cache bounded to `cache_bytes`,
    /// migrating a data dir of an older schema to the current one first.
    pub fn open(data_dir: &Path, cache_bytes: u64, counters: StoreCounters) -> Result<Self, StoreError> {
        let path = data_dir.join("sled");
        let config = sled::Config::new()
            .path(&path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(None);
        let db = open_waiting(&config).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        migrate::to_current(&db, &path, &counters)?;
        migrate::daemon_to_current(&db, &path, &counters)?;
        migrate::baselines_to_current(&db, &counters)?;
        migrate::analyses_to_current(&db, &counters)?;
        migrate::sequential_to_current(&db, &counters)?;
        migrate::slots_to_current(&db, &counters)?;
        let tree = |name: &str| {
            db.open_tree(name).map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })
        };
        let events = tree(EVENTS)?;
        let outbox = tree(OUTBOX)?;
        let parked = tree(PARKED)?;
        let counts = Arc::new(Counts {
            events: AtomicU64::new(events.len() as u64),
            outbox: AtomicU64::new(outbox.len() as u64),
            parked: AtomicU64::new(parked.len() as u64),
        });
        let store = Store {
            clocks: tree(CLOCKS)?,
            apps: tree(APPS)?,
            baselines: tree(BASELINES)?,
            slots: tree(SLOTS)?,
            analyses: tree(ANALYSES)?,
            sequential: tree(SEQUENTIAL)?,
            events,
            subscriptions: tree(SUBSCRIPTIONS)?,
            outbox,
            parked,
            owed: tree(OWED)?,
            history: tree(HISTORY)?,
            event_ids: tree(EVENT_IDS)?,
            db,
            counts,
            counters,
            records: PhantomData,
        };
        // What a crash, or a race between pruning and a delivery, left kept for no delivery.
        store.release_owed(None).map_err(|source| StoreError::Io {
            operation: "release owed events",
            source,
        })?;
        Ok(store)
    }

    /// Everything persisted of the engine. A record of a newer schema is an error; corrupt ones
    /// are skipped and counted.
    pub fn load(&self) -> Result<EngineState, StoreError> {
        let mut state = EngineState::default();
        for (key, record) in self.records::<ClockRecord>(&self.clocks, CLOCKS)? {
            if let Some((env, app)) = keys::parse_app(&key) {
                state.clocks.push((env, app, AppClock::from(record)));
            } else {
                self.corrupt(CLOCKS, &key);
            }
        }
        for (key, record) in self.records::<AppRecord>(&self.apps, APPS)? {
            if let Some((env, app)) = keys::parse_app(&key) {
                state.apps.push((env, app, AppEntry::try_from(&record)?));
            } else {
                self.corrupt(APPS, &key);
            }
        }
        for (key, record) in self.records::<BaselineRecord>(&self.baselines, BASELINES)? {
            if let Some(id) = keys::parse_baseline(&key) {
                state.baselines.push((id, Baseline::try_from(&record)?));
            } else {
                self.corrupt(BASELINES, &key);
            }
        }
        for (key, record) in self.records::<AnalysisRecord>(&self.analyses, ANALYSES)? {
            let mut analysis = AnalysisSnapshot::try_from(&record)?;
            attach_evidence(&self.sequential, &key, &mut analysis, &self.counters)?;
            state.judge.analyses.push(analysis);
        }
        Ok(state)
    }

    fn corrupt(&self, tree: &str, key: &[u8]) {
        tracing::warn!(tree, key = ?key, "skipping a store record that does not decode");
        self.counters.records_skipped.inc();
    }

    /// One of the daemon's records as the daemon's type: `None`, counted and logged, when it does
    /// not decode or convert; an error when a newer format wrote it.
    fn daemon_value<T: DeserializeOwned, U>(
        &self,
        tree: &'static str,
        key: &[u8],
        bytes: &[u8],
        convert: impl FnOnce(T) -> Result<U, ConvertError>,
    ) -> Result<Option<U>, StoreError> {
        match daemon::decode::<T>(bytes) {
            daemon::Decoded::Record(record) => match convert(record) {
                Ok(value) => Ok(Some(value)),
                Err(error) => {
                    tracing::warn!(tree, key = ?key, %error, "skipping a store record this build cannot read");
                    self.counters.records_skipped.inc();
                    Ok(None)
                }
            },
            daemon::Decoded::Newer(found) => Err(StoreError::NewerDaemonRecord {
                tree,
                found,
                supported: daemon::FORMAT,
            }),
            daemon::Decoded::Corrupt => {
                self.corrupt(tree, key);
                Ok(None)
            }
        }
    }

    fn event_value(
        &self,
        tree: &'static str,
        key: &[u8],
        bytes: &[u8],
    ) -> Result<Option<R::Event>, StoreError> {
        let mut event = self.daemon_value(tree, key, bytes, R::event)?;
        if let (Some(event), Some(seq)) = (&mut event, outbox_seq(key)) {
            R::stored(event, seq);
        }
        Ok(event)
    }

    fn delivery_value(
        &self,
        tree: &'static str,
        key: &[u8],
        bytes: &[u8],
    ) -> Result<Option<R::Delivery>, StoreError> {
        self.daemon_value(tree, key, bytes, R::delivery)
    }

    /// Every decodable record of an engine tree, with its key.
    fn records<T: DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        name: &'static str,
    ) -> Result<Vec<(sled::IVec, T)>, StoreError> {
        let mut out = Vec::new();
        for entry in tree.iter() {
            let (key, value) = entry.map_err(|source| StoreError::Io {
                operation: "load",
                source,
            })?;
            match decode(&value) {
                Decoded::Record(record) => out.push((key, record)),
                Decoded::Newer(found) => {
                    return Err(StoreError::NewerRecord {
                        tree: name,
                        found,
                        supported: SCHEMA,
                    });
                }
                Decoded::Corrupt => self.corrupt(name, &key),
            }
        }
        Ok(out)
    }

    /// Writes clocks, apps and baselines (atomically per tree). Forgotten versions go first: a
    /// version forgotten and seen again since the last write has new baselines in `state`, which
    /// must outlive the deletion of the old ones.
    pub fn write(&self, state: &EngineState) -> Result<(), StoreError> {
        self.write_superseded(state, &Superseded::default())
    }

    /// `write`, leaving out what `newer` says a later write already put: a record at a key it
    /// wrote or removed, a baseline of a version it forgot. This lets a write taken from the
    /// engine earlier (a periodic flush, written in parts) go on after a later one (an event's)
    /// without putting older state back over it.
    pub fn write_superseded(&self, state: &EngineState, newer: &Superseded) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            operation: "write",
            source,
        };
        for (env, app, version) in &state.forgotten_versions {
            self.forget_version(env, app, version).map_err(io)?;
        }
        let mut batch = sled::Batch::default();
        for (env, app, clock) in &state.clocks {
            let key = keys::app(env, app);
            if !newer.clocks.contains(&key) {
                batch.insert(key, encode(&ClockRecord::from(clock)));
            }
        }
        self.clocks.apply_batch(batch).map_err(io)?;
        let mut batch = sled::Batch::default();
        for (env, app, entry) in &state.apps {
            let key = keys::app(env, app);
            if !newer.apps.contains(&key) {
                batch.insert(key, encode(&AppRecord::try_from(entry)?));
            }
        }
        self.apps.apply_batch(batch).map_err(io)?;
        let mut batch = sled::Batch::default();
        for (id, baseline) in &state.baselines {
            let key = keys::baseline(id);
            if !newer.supersedes_baseline(&key) {
                batch.insert(key, encode(&BaselineRecord::try_from(baseline)?));
            }
        }
        self.baselines.apply_batch(batch).map_err(io)?;
        // Ended first: an analysis ended and started again since the last write is written anew.
        let mut batch = sled::Batch::default();
        let mut evidence = sled::Batch::default();
        for (env, app) in &state.judge.ended {
            let key = keys::app(env, app);
            if !newer.analyses.contains(&key) {
                batch.remove(key.clone());
                evidence.remove(key);
            }
        }
        for analysis in &state.judge.analyses {
            let key = keys::app(&analysis.env, &analysis.app);
            if newer.analyses.contains(&key) {
                continue;
            }
            let record = AnalysisRecord::try_from(analysis)?;
            evidence.insert(key.clone(), encode(&SequentialRecord::of(analysis)));
            batch.insert(key, encode(&record));
        }
        // Evidence first: read back only with the record of the analysis it names.
        self.sequential.apply_batch(evidence).map_err(io)?;
        self.analyses.apply_batch(batch).map_err(io)?;
        let written =
            state.clocks.len() + state.apps.len() + state.baselines.len() + state.judge.analyses.len();
        self.counters.records_written.inc_by(written as u64);
        Ok(())
    }

    /// Deletes a version's baselines and seasonal slots, and nothing else: the keys of one scope
    /// start with a prefix no other scope's keys start with (`keys`).
    fn forget_version(&self, env: &str, app: &str, version: &str) -> Result<(), sled::Error> {
        let scope = Scope::Version(version.to_owned());
        let mut batch = sled::Batch::default();
        for key in self.baselines.scan_prefix(keys::scope(env, app, &scope)).keys() {
            batch.remove(key?);
        }
        self.baselines.apply_batch(batch)?;
        let mut batch = sled::Batch::default();
        for slot in 0..SLOTS_PER_WEEK {
            for key in self
                .slots
                .scan_prefix(keys::slot_scope(env, app, &scope, slot))
                .keys()
            {
                batch.remove(key?);
            }
        }
        self.slots.apply_batch(batch)
    }

    /// Stores events, giving each its sequence number (in order), and makes them durable before
    /// returning: an event is emitted once this returns. One whose id is kept already is left out
    /// of `events` (and counted): it was stored, and given to subscribers, the first time. Beyond
    /// `max_events`, the oldest are dropped.
    pub fn append_events(&self, events: &mut Vec<R::Event>, max_events: usize) -> Result<(), StoreError> {
        self.put_events(events, max_events)?;
        self.flush()
    }

    /// Writes the engine state that made `events`, then stores the events as `append_events` does,
    /// and makes both durable in one flush: after a crash, the decisions behind a stored event are
    /// never older than the event (which would make them fire again).
    pub fn write_with_events(
        &self,
        state: &EngineState,
        events: &mut Vec<R::Event>,
        max_events: usize,
    ) -> Result<(), StoreError> {
        self.write(state)?;
        self.put_events(events, max_events)?;
        self.flush()
    }

    /// `append_events` but for the flush.
    fn put_events(&self, events: &mut Vec<R::Event>, max_events: usize) -> Result<(), StoreError> {
        let subscriptions = self.subscription_records()?;
        self.put_events_for(events, max_events, &subscriptions)
    }

    /// Stores events with an outbox entry for each of `subscriptions` that wants them. The list
    /// was read before the entries are written, so a subscription deleted or disabled meanwhile
    /// may have been given some: looked up again afterwards, such a subscription's entries are
    /// removed here (its delete or disable removes any written before it looked).
    fn put_events_for(
        &self,
        events: &mut Vec<R::Event>,
        max_events: usize,
        subscriptions: &[SubscriptionRecord],
    ) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            operation: "append events",
            source,
        };
        let mut batch = sled::Batch::default();
        let mut ids = sled::Batch::default();
        let mut outbox = sled::Batch::default();
        let mut entries = 0;
        let mut given: Vec<&str> = Vec::new();
        let mut named: Vec<String> = Vec::new();
        let mut duplicates = Vec::new();
        for (at, event) in events.iter_mut().enumerate() {
            let seq = self.db.generate_id().map_err(io)?;
            R::stored(event, seq);
            let record = R::event_record(event)?;
            if named.contains(&record.id) || self.event_ids.contains_key(record.id.as_bytes()).map_err(io)? {
                tracing::info!(id = %record.id, "event already stored: left out");
                duplicates.push(at);
                continue;
            }
            ids.insert(record.id.as_bytes(), &seq.to_be_bytes());
            named.push(record.id.clone());
            batch.insert(&seq.to_be_bytes(), daemon::encode(&record));
            for subscription in subscriptions.iter().filter(|s| s.wants(&record)) {
                let id = subscription.id.as_str();
                outbox.insert(
                    outbox_key(id, seq),
                    daemon::encode(&DeliveryRecord::pending(&record)),
                );
                entries += 1;
                if !given.contains(&id) {
                    given.push(id);
                }
            }
        }
        for at in duplicates.iter().rev() {
            events.remove(*at);
        }
        self.counters.duplicate_events.inc_by(duplicates.len() as u64);
        // The ids first: an event readable in `events` is always found by its id.
        self.event_ids.apply_batch(ids).map_err(io)?;
        self.events.apply_batch(batch).map_err(io)?;
        self.counts
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        // Fresh sequence numbers: every entry is a new key.
        self.outbox.apply_batch(outbox).map_err(io)?;
        self.counts.outbox.fetch_add(entries, Ordering::Relaxed);
        for id in given {
            let active = self
                .subscription_record(id)?
                .is_some_and(|s| s.disabled.is_none());
            if !active {
                self.clear_outbox(id).map_err(io)?;
            }
        }
        while self.counts.events.load(Ordering::Relaxed) > max_events as u64 {
            let Some((oldest, event)) = self.events.first().map_err(io)? else {
                self.counts.events.store(0, Ordering::Relaxed);
                break;
            };
            // Still to be delivered: kept in `owed`, written there before it leaves `events` so
            // that a worker reading it meanwhile finds it in one or the other.
            let seq = outbox_seq(&oldest).unwrap_or_default();
            let ids = || subscriptions.iter().map(|s| s.id.as_str());
            let mut kept = false;
            if self.is_owed(seq, ids()).map_err(io)? {
                self.owed.insert(&oldest, event.clone()).map_err(io)?;
                kept = true;
                // Delivered meanwhile, after the look: let go again (a delivery finished after
                // this look finds it in `owed` and lets go of it itself).
                if !self.is_owed(seq, ids()).map_err(io)? {
                    kept = self.owed.remove(&oldest).map_err(io)?.is_none();
                }
            }
            if self.events.remove(&oldest).map_err(io)?.is_some() {
                decrement(&self.counts.events);
            }
            if !kept {
                self.forget_event_id(&event).map_err(io)?;
            }
            // Delivery history older than the oldest event kept goes with it.
            let mut old = sled::Batch::default();
            for key in self.history.range(..oldest.to_vec()).keys() {
                old.remove(key.map_err(io)?);
            }
            self.history.apply_batch(old).map_err(io)?;
        }
        Ok(())
    }

    /// Removes every pending and parked delivery of a subscription. The outbox first: a delivery
    /// being parked meanwhile is either still there or already in `parked`, which is cleared next.
    fn clear_outbox(&self, subscription: &str) -> Result<(), sled::Error> {
        for (tree, count) in [
            (&self.outbox, &self.counts.outbox),
            (&self.parked, &self.counts.parked),
        ] {
            for key in tree.scan_prefix(outbox_prefix(subscription)).keys() {
                // One by one: what another remover took first is not counted twice.
                if tree.remove(key?)?.is_some() {
                    decrement(count);
                }
            }
        }
        self.release_owed(None)
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
    /// A stored event: in the history, or past it but still owed to a subscription.
    pub fn event(&self, seq: u64) -> Result<Option<R::Event>, StoreError> {
        let io = |source| StoreError::Io {
            operation: "read an event",
            source,
        };
        let key = seq.to_be_bytes();
        // `events` first: pruning writes `owed` before it removes from `events`.
        let (tree, value) = match self.events.get(key).map_err(io)? {
            Some(value) => (EVENTS, Some(value)),
            None => (OWED, self.owed.get(key).map_err(io)?),
        };
        match value {
            Some(value) => self.event_value(tree, &key, &value),
            None => Ok(None),
        }
    }

    /// Events kept past the history's cap for their deliveries.
    pub fn owed_count(&self) -> usize {
        self.owed.len()
    }

    /// Whether any of the subscriptions `ids` has a pending or parked delivery of event `seq`.
    fn is_owed<'a>(&self, seq: u64, ids: impl IntoIterator<Item = &'a str>) -> Result<bool, sled::Error> {
        for id in ids {
            let key = outbox_key(id, seq);
            if self.outbox.contains_key(&key)? || self.parked.contains_key(&key)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Lets go of owed events no delivery needs any more: event `seq`'s, or every one.
    fn release_owed(&self, seq: Option<u64>) -> Result<(), sled::Error> {
        let keys: Vec<sled::IVec> = match seq {
            Some(seq) => match self.owed.contains_key(seq.to_be_bytes())? {
                true => vec![sled::IVec::from(&seq.to_be_bytes())],
                false => return Ok(()),
            },
            None => self.owed.iter().keys().collect::<Result<_, _>>()?,
        };
        if keys.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = self
            .subscriptions
            .iter()
            .keys()
            .filter_map(|key| key.map(|key| v1::decode::<String>(&key)).transpose())
            .collect::<Result<_, _>>()?;
        for key in keys {
            let seq = outbox_seq(&key).unwrap_or_default();
            if !self.is_owed(seq, ids.iter().map(String::as_str))?
                && let Some(event) = self.owed.remove(key)?
            {
                self.forget_event_id(&event)?;
            }
        }
        Ok(())
    }

    /// Drops the id of an event that left the store (its value as it was kept).
    fn forget_event_id(&self, value: &[u8]) -> Result<(), sled::Error> {
        if let daemon::Decoded::Record(record) = daemon::decode::<EventRecord>(value) {
            self.event_ids.remove(record.id.as_bytes())?;
        }
        Ok(())
    }

    /// The sequence number of the kept event named `id`, if there is one.
    pub fn event_seq_of(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let found = self
            .event_ids
            .get(id.as_bytes())
            .map_err(|source| StoreError::Io {
                operation: "read event ids",
                source,
            })?;
        Ok(found.and_then(|seq| seq.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    pub fn subscriptions(&self) -> Result<Vec<R::Subscription>, StoreError> {
        self.read_subscriptions(R::subscription)
    }

    /// The subscriptions as the store's records, for its outbox rules.
    fn subscription_records(&self) -> Result<Vec<SubscriptionRecord>, StoreError> {
        self.read_subscriptions(Ok)
    }

    fn read_subscriptions<T>(
        &self,
        convert: impl Fn(SubscriptionRecord) -> Result<T, ConvertError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for entry in self.subscriptions.iter() {
            let (key, value) = entry.map_err(|source| StoreError::Io {
                operation: "read subscriptions",
                source,
            })?;
            if let Some(subscription) = self.daemon_value(SUBSCRIPTIONS, &key, &value, &convert)? {
                out.push(subscription);
            }
        }
        Ok(out)
    }

    pub fn subscription(&self, id: &str) -> Result<Option<R::Subscription>, StoreError> {
        self.read_subscription(id, R::subscription)
    }

    fn subscription_record(&self, id: &str) -> Result<Option<SubscriptionRecord>, StoreError> {
        self.read_subscription(id, Ok)
    }

    fn read_subscription<T>(
        &self,
        id: &str,
        convert: impl FnOnce(SubscriptionRecord) -> Result<T, ConvertError>,
    ) -> Result<Option<T>, StoreError> {
        let key = subscription_key(id);
        let value = self.subscriptions.get(&key).map_err(|source| StoreError::Io {
            operation: "read a subscription",
            source,
        })?;
        match value {
            Some(value) => self.daemon_value(SUBSCRIPTIONS, &key, &value, convert),
            None => Ok(None),
        }
    }

    /// Stores a subscription durably.
    pub fn put_subscription(&self, subscription: &R::Subscription) -> Result<(), StoreError> {
        let record = R::subscription_record(subscription);
        self.subscriptions
            .insert(subscription_key(&record.id), daemon::encode(&record))
            .map_err(|source| StoreError::Io {
                operation: "write a subscription",
                source,
            })?;
        self.flush()
    }

    /// Marks a subscription disabled (its receiver answered 410 Gone) and drops its pending and
    /// parked deliveries, which will never be sent. A subscription deleted meanwhile stays deleted.
    pub fn disable_subscription(&self, id: &str) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            operation: "disable a subscription",
            source,
        };
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let mut newer = None;
        self.subscriptions
            .update_and_fetch(subscription_key(id), |old| {
                let old = old?;
                match daemon::decode::<SubscriptionRecord>(old) {
                    daemon::Decoded::Record(mut subscription) => {
                        subscription.disabled.get_or_insert_with(|| now.clone());
                        Some(daemon::encode(&subscription))
                    }
                    daemon::Decoded::Newer(found) => {
                        newer = Some(found);
                        Some(old.to_vec())
                    }
                    // A record this build cannot read is left as it is.
                    daemon::Decoded::Corrupt => Some(old.to_vec()),
                }
            })
            .map_err(io)?;
        if let Some(found) = newer {
            return Err(StoreError::NewerDaemonRecord {
                tree: SUBSCRIPTIONS,
                found,
                supported: daemon::FORMAT,
            });
        }
        self.clear_outbox(id).map_err(io)?;
        self.flush()
    }

    /// Deletes a subscription and its pending and parked deliveries; false when there was none.
    pub fn delete_subscription(&self, id: &str) -> Result<bool, StoreError> {
        let io = |source| StoreError::Io {
            operation: "delete a subscription",
            source,
        };
        // The subscription first: an append that looks it up from now on finds it gone and
        // clears what it wrote itself; what it wrote before is cleared here.
        let existed = self
            .subscriptions
            .remove(subscription_key(id))
            .map_err(io)?
            .is_some();
        self.clear_outbox(id).map_err(io)?;
        self.flush()?;
        Ok(existed)
    }

    /// The oldest pending delivery of a subscription.
    pub fn next_delivery(&self, subscription: &str) -> Result<Option<(u64, R::Delivery)>, StoreError> {
        Ok(self.next_deliveries(subscription, 1)?.pop())
    }

    /// A subscription's pending deliveries, oldest first, at most `limit`.
    pub fn next_deliveries(
        &self,
        subscription: &str,
        limit: usize,
    ) -> Result<Vec<(u64, R::Delivery)>, StoreError> {
        let io = |source| StoreError::Io {
            operation: "read the outbox",
            source,
        };
        let mut pending = Vec::new();
        for entry in self.outbox.scan_prefix(outbox_prefix(subscription)) {
            if pending.len() >= limit {
                break;
            }
            let (key, value) = entry.map_err(io)?;
            let seq = outbox_seq(&key);
            // Counted and logged when it does not read; an error when a newer format wrote it.
            let delivery = self.delivery_value(OUTBOX, &key, &value)?;
            match (seq, delivery) {
                (Some(seq), Some(delivery)) => {
                    pending.push((seq, delivery));
                    continue;
                }
                (None, _) => self.corrupt(OUTBOX, &key),
                (Some(_), None) => {}
            }
            // Taken off the queue, or the subscription's queue would stop behind it.
            if self.outbox.remove(key).map_err(io)?.is_some() {
                decrement(&self.counts.outbox);
            }
        }
        Ok(pending)
    }

    /// Records a delivery's new state, as `record_delivery` does, and flushes it (and all else
    /// written) to disk.
    pub fn put_delivery(
        &self,
        subscription: &str,
        seq: u64,
        delivery: &R::Delivery,
    ) -> Result<(), StoreError> {
        self.record_delivery(subscription, seq, delivery)?;
        self.flush()
    }

    /// Records a delivery's new state: a pending one stays in the outbox, a parked one moves (or
    /// stays) in `parked`, a finished one moves to the history. Only while it is still in the
    /// outbox or parked: one whose subscription was deleted or disabled meanwhile is not brought
    /// back. Durable at the next flush: until then a crash leaves the delivery as it was (a
    /// delivered one is sent again, which at-least-once delivery allows).
    pub fn record_delivery(
        &self,
        subscription: &str,
        seq: u64,
        delivery: &R::Delivery,
    ) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            operation: "record a delivery",
            source,
        };
        let key = outbox_key(subscription, seq);
        let delivery = R::delivery_record(delivery);
        let record = daemon::encode(&delivery);
        if delivery.is_pending() {
            // Atomic: replaces the entry only if it is there, never inserts it.
            self.outbox
                .update_and_fetch(key, |old| old.map(|_| record.clone()))
                .map_err(io)?;
        } else if delivery.is_parked() {
            let updated = self
                .parked
                .update_and_fetch(&key, |old| old.map(|_| record.clone()))
                .map_err(io)?;
            if updated.is_none() && self.move_to_parked(&key, &record)? {
                decrement(&self.counts.outbox);
                self.counts.parked.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            let removed = if self.outbox.remove(&key).map_err(io)?.is_some() {
                Some(&self.counts.outbox)
            } else if self.parked.remove(&key).map_err(io)?.is_some() {
                Some(&self.counts.parked)
            } else {
                None
            };
            if let Some(count) = removed {
                decrement(count);
                let mut history_key = seq.to_be_bytes().to_vec();
                history_key.extend(subscription.as_bytes());
                self.history.insert(history_key, record).map_err(io)?;
                self.release_owed(Some(seq)).map_err(io)?;
            }
        }
        Ok(())
    }

    /// Moves an outbox entry to `parked` as `record`, in one transaction, if it is in the outbox;
    /// whether it was.
    fn move_to_parked(&self, key: &[u8], record: &[u8]) -> Result<bool, StoreError> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        let moved = (&self.outbox, &self.parked)
            .transaction(|(outbox, parked)| {
                if outbox.remove(key)?.is_none() {
                    return Ok(false);
                }
                parked.insert(key, record)?;
                Ok::<_, ConflictableTransactionError<()>>(true)
            })
            .map_err(|e| match e {
                TransactionError::Storage(source) => StoreError::Io {
                    operation: "park a delivery",
                    source,
                },
                // Nothing above aborts.
                TransactionError::Abort(()) => StoreError::Io {
                    operation: "park a delivery",
                    source: sled::Error::Unsupported("aborted".into()),
                },
            })?;
        Ok(moved)
    }

    /// A subscription's parked deliveries, in event order.
    pub fn parked(&self, subscription: &str) -> Result<Vec<(u64, R::Delivery)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.parked.scan_prefix(outbox_prefix(subscription)) {
            let (key, value) = entry.map_err(|source| StoreError::Io {
                operation: "read parked deliveries",
                source,
            })?;
            let Some(seq) = outbox_seq(&key) else {
                self.corrupt(PARKED, &key);
                continue;
            };
            if let Some(delivery) = self.delivery_value(PARKED, &key, &value)? {
                out.push((seq, delivery));
            }
        }
        Ok(out)
    }

    /// Changes a parked delivery in place, atomically; the delivery as changed, or `None` when
    /// the subscription has no such parked delivery.
    pub fn update_parked(
        &self,
        subscription: &str,
        seq: u64,
        change: impl Fn(&mut R::Delivery),
    ) -> Result<Option<R::Delivery>, StoreError> {
        let key = outbox_key(subscription, seq);
        let changed = self
            .parked
            .update_and_fetch(&key, |old| {
                let old = old?;
                // A record this build cannot read is left as it is (and reported below).
                let daemon::Decoded::Record(record) = daemon::decode::<DeliveryRecord>(old) else {
                    return Some(old.to_vec());
                };
                let Ok(mut delivery) = R::delivery(record) else {
                    return Some(old.to_vec());
                };
                change(&mut delivery);
                Some(daemon::encode(&R::delivery_record(&delivery)))
            })
            .map_err(|source| StoreError::Io {
                operation: "change a parked delivery",
                source,
            })?;
        match changed {
            Some(bytes) => self.delivery_value(PARKED, &key, &bytes),
            None => Ok(None),
        }
    }

    /// A subscription's delivery of the event `seq`, wherever it is: pending, parked or finished.
    pub fn find_delivery(&self, subscription: &str, seq: u64) -> Result<Option<R::Delivery>, StoreError> {
        let io = |source| StoreError::Io {
            operation: "read a delivery",
            source,
        };
        let key = outbox_key(subscription, seq);
        let mut history_key = seq.to_be_bytes().to_vec();
        history_key.extend(subscription.as_bytes());
        for (tree, name, key) in [
            (&self.outbox, OUTBOX, &key),
            (&self.parked, PARKED, &key),
            (&self.history, HISTORY, &history_key),
        ] {
            if let Some(value) = tree.get(key).map_err(io)? {
                return self.delivery_value(name, key, &value);
            }
        }
        Ok(None)
    }

    /// A subscription's deliveries, pending, parked and finished, newest first, at most `limit`.
    pub fn deliveries(&self, subscription: &str, limit: usize) -> Result<Vec<R::Delivery>, StoreError> {
        let io = |source| StoreError::Io {
            operation: "read deliveries",
            source,
        };
        let mut out: Vec<(u64, R::Delivery)> = Vec::new();
        // The newest `limit` of each place, so that a long outbox is not read whole.
        for (tree, name) in [(&self.outbox, OUTBOX), (&self.parked, PARKED)] {
            for entry in tree.scan_prefix(outbox_prefix(subscription)).rev().take(limit) {
                let (key, value) = entry.map_err(io)?;
                let Some(seq) = outbox_seq(&key) else {
                    self.corrupt(name, &key);
                    continue;
                };
                if let Some(d) = self.delivery_value(name, &key, &value)? {
                    out.push((seq, d));
                }
            }
        }
        let mut finished = 0;
        for entry in self.history.iter().rev() {
            let (key, value) = entry.map_err(io)?;
            if let Some((seq, id)) = key.split_first_chunk::<8>()
                && id == subscription.as_bytes()
                && let Some(d) = self.delivery_value(HISTORY, &key, &value)?
            {
                out.push((u64::from_be_bytes(*seq), d));
                finished += 1;
            }
            if finished >= limit {
                break;
            }
        }
        out.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        out.truncate(limit);
        Ok(out.into_iter().map(|(_, d)| d).collect())
    }

    /// Deliveries waiting in the outbox, over all subscriptions (parked ones not included).
    pub fn outbox_depth(&self) -> usize {
        self.counts.outbox.load(Ordering::Relaxed) as usize
    }

    /// Parked deliveries, over all subscriptions.
    pub fn parked_count(&self) -> usize {
        self.counts.parked.load(Ordering::Relaxed) as usize
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
        keep: impl Fn(&R::Event) -> bool,
    ) -> Result<Vec<R::Event>, StoreError> {
        let start = after.map_or(0, |seq| seq.saturating_add(1));
        let mut out = Vec::new();
        for entry in self.events.range(start.to_be_bytes()..) {
            let (key, value) = entry.map_err(|source| StoreError::Io {
                operation: "read events",
                source,
            })?;
            match self.event_value(EVENTS, &key, &value)? {
                Some(event) if keep(&event) => out.push(event),
                _ => {}
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The newest stored event that `keep` accepts.
    pub fn last_event(&self, keep: impl Fn(&R::Event) -> bool) -> Result<Option<R::Event>, StoreError> {
        for entry in self.events.iter().rev() {
            let (key, value) = entry.map_err(|source| StoreError::Io {
                operation: "read events",
                source,
            })?;
            if let Some(event) = self.event_value(EVENTS, &key, &value)?
                && keep(&event)
            {
                return Ok(Some(event));
            }
        }
        Ok(None)
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

    /// The engine's view of the apps it archived: they are read back from here.
    pub fn archive(&self) -> SledArchive {
        SledArchive {
            clocks: self.clocks.clone(),
            apps: self.apps.clone(),
            baselines: self.baselines.clone(),
            analyses: self.analyses.clone(),
            sequential: self.sequential.clone(),
            counters: self.counters.clone(),
        }
    }

    /// Records in the seasonal slot tree (walks it: for tests and tools, not the hot path).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }
}

/// Gives `analysis` the sequential evidence kept under `key`, when it is that analysis's: a
/// record left by an earlier analysis of the app is not taken up. Evidence that cannot be read is
/// lost, not guessed (counted and logged like any corrupt record): the analysis's tests start
/// again.
fn attach_evidence(
    tree: &sled::Tree,
    key: &[u8],
    analysis: &mut AnalysisSnapshot,
    counters: &StoreCounters,
) -> Result<(), StoreError> {
    let bytes = tree.get(key).map_err(|source| StoreError::Io {
        operation: "read sequential evidence",
        source,
    })?;
    match bytes.map(|b| decode::<SequentialRecord>(&b)) {
        Some(Decoded::Record(evidence)) if evidence.belongs_to(analysis) => {
            analysis.sequential = SequentialState::try_from(&evidence)?;
        }
        // None kept, or another analysis's.
        None | Some(Decoded::Record(_)) => {}
        Some(Decoded::Newer(found)) => {
            return Err(StoreError::NewerRecord {
                tree: SEQUENTIAL,
                found,
                supported: SCHEMA,
            });
        }
        Some(Decoded::Corrupt) => {
            tracing::warn!(tree = SEQUENTIAL, key = ?key, "skipping a store record that does not decode");
            counters.records_skipped.inc();
        }
    }
    Ok(())
}

/// Apps the engine moved out of memory, read back from their records when seen again.
pub struct SledArchive {
    clocks: sled::Tree,
    apps: sled::Tree,
    baselines: sled::Tree,
    analyses: sled::Tree,
    sequential: sled::Tree,
    counters: StoreCounters,
}

impl SledArchive {
    fn one<T: DeserializeOwned>(tree: &sled::Tree, key: &[u8]) -> Result<Option<T>, String> {
        match tree.get(key).map_err(|e| e.to_string())? {
            None => Ok(None),
            Some(bytes) => match decode(&bytes) {
                Decoded::Record(record) => Ok(Some(record)),
                Decoded::Newer(found) => Err(format!("a record of the newer schema {found}")),
                Decoded::Corrupt => Err("a record that does not decode".to_owned()),
            },
        }
    }

    fn read(&self, env: &str, app: &str) -> Result<Option<ArchivedApp>, String> {
        let key = keys::app(env, app);
        let Some(clock) = Self::one::<ClockRecord>(&self.clocks, &key)? else {
            return Ok(None);
        };
        let entry = match Self::one::<AppRecord>(&self.apps, &key)? {
            Some(record) => AppEntry::try_from(&record).map_err(|e| e.to_string())?,
            None => AppEntry::default(),
        };
        let mut baselines = Vec::new();
        // The app's key is the start of the keys of its baselines and of no other app's.
        for item in self.baselines.scan_prefix(&key) {
            let (key, bytes) = item.map_err(|e| e.to_string())?;
            let id = keys::parse_baseline(&key).ok_or("a baseline key that does not parse")?;
            match decode::<BaselineRecord>(&bytes) {
                Decoded::Record(record) => {
                    baselines.push((id, Baseline::try_from(&record).map_err(|e| e.to_string())?));
                }
                _ => return Err("a baseline record that does not decode".to_owned()),
            }
        }
        let analysis = match Self::one::<AnalysisRecord>(&self.analyses, &key)? {
            Some(record) => {
                let mut analysis = AnalysisSnapshot::try_from(&record).map_err(|e| e.to_string())?;
                attach_evidence(&self.sequential, &key, &mut analysis, &self.counters)
                    .map_err(|e| e.to_string())?;
                Some(analysis)
            }
            None => None,
        };
        Ok(Some(ArchivedApp {
            clock: AppClock::from(clock),
            entry,
            baselines,
            analysis,
        }))
    }
}

impl AppArchive for SledArchive {
    /// An app whose records cannot be read comes back as a new app (logged and counted).
    fn load_app(&mut self, env: &str, app: &str) -> Option<ArchivedApp> {
        match self.read(env, app) {
            Ok(found) => found,
            Err(reason) => {
                tracing::warn!(env, app, %reason, "cannot read an archived app back; it starts afresh");
                self.counters.records_skipped.inc();
                None
            }
        }
    }
}

/// Seasonal slot summaries in sled, for the engine.
pub struct SledSlots {
    slots: sled::Tree,
    counters: StoreCounters,
}

impl SledSlots {
    /// A stored slot's summary; one that cannot be read is logged, counted and `None`.
    fn summary(&self, bytes: &[u8], series: &str, slot: u16) -> Option<SlotSummary> {
        match decode::<StoredSlotRecord>(bytes) {
            Decoded::Record(record) => match SlotSummary::try_from(&record) {
                Ok(summary) => Some(summary),
                Err(e) => {
                    tracing::warn!(error = %e, series, slot, "cannot convert a seasonal slot");
                    self.counters.slot_errors.inc();
                    None
                }
            },
            // Open refuses a data dir of a newer schema, so this is a record written since.
            Decoded::Newer(found) => {
                tracing::warn!(found, series, slot, "a seasonal slot of a newer schema");
                self.counters.slot_errors.inc();
                None
            }
            Decoded::Corrupt => {
                tracing::warn!(series, slot, "skipping a seasonal slot that does not decode");
                self.counters.records_skipped.inc();
                None
            }
        }
    }

    /// Every scope's slots of hour-of-week `slot`, in one pass over the hour's keys (which lie
    /// together, `keys::slot`), stopping at the first scope that would take it past `max_bytes`
    /// in memory (`HourSlots::bytes_of`) so that what is held ahead stays bounded. `None` if the
    /// read failed (logged and counted).
    pub fn load_hour(&self, slot: u16, max_bytes: usize) -> Option<HourSlots> {
        let mut hour = HourSlots::default();
        let mut scope: Option<ScopeRead> = None;
        for item in self.slots.scan_prefix(keys::slot_hour(slot)) {
            let (key, bytes) = match item {
                Ok(kv) => kv,
                Err(e) => {
                    tracing::warn!(error = %e, slot, "cannot read an hour's seasonal slots ahead");
                    self.counters.slot_errors.inc();
                    return None;
                }
            };
            let Some(series) = keys::series_of_slot(&key) else {
                self.counters.records_skipped.inc();
                continue;
            };
            let Some(prefix) = BaselineId::prefix_of_series(series) else {
                self.counters.records_skipped.inc();
                continue;
            };
            if scope.as_ref().is_none_or(|read| read.prefix != prefix) {
                if let Some(done) = scope.take() {
                    hour.keep(done);
                }
                scope = Some(ScopeRead {
                    prefix: prefix.to_owned(),
                    slots: Vec::new(),
                    bytes: 0,
                });
            }
            let Some(read) = scope.as_mut() else {
                continue;
            };
            let Some(summary) = self.summary(&bytes, series, slot) else {
                continue;
            };
            let entry = (series.to_owned(), summary);
            read.bytes += HourSlots::bytes_of(&entry);
            if hour.bytes + read.bytes > max_bytes {
                hour.stopped_at = Some(std::mem::take(&mut read.prefix));
                self.counters.slots_read_ahead.inc_by(hour.held as u64);
                return Some(hour);
            }
            read.slots.push(entry);
        }
        if let Some(done) = scope {
            hour.keep(done);
        }
        self.counters.slots_read_ahead.inc_by(hour.held as u64);
        Some(hour)
    }

    /// A slot's stored record, or `None` (logged and counted) if it cannot be made.
    fn record(&self, series: &str, slot: u16, summary: &SlotSummary) -> Option<Vec<u8>> {
        match StoredSlotRecord::try_from(summary) {
            Ok(record) => Some(encode(&record)),
            Err(e) => {
                tracing::warn!(error = %e, series, slot, "cannot convert a seasonal slot");
                self.counters.slot_errors.inc();
                None
            }
        }
    }
}

impl SlotStore for SledSlots {
    fn load(&mut self, series: &str, slot: u16) -> Option<SlotSummary> {
        self.counters.slots_read.inc();
        match self.slots.get(keys::slot(series, slot)) {
            Ok(Some(bytes)) => self.summary(&bytes, series, slot),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, series, slot, "cannot read a seasonal slot");
                self.counters.slot_errors.inc();
                None
            }
        }
    }

    fn save(&mut self, series: &str, slot: u16, summary: &SlotSummary) {
        let Some(record) = self.record(series, slot, summary) else {
            return;
        };
        match self.slots.insert(keys::slot(series, slot), record) {
            Ok(_) => {
                self.counters.records_written.inc();
            }
            Err(e) => {
                tracing::warn!(error = %e, series, slot, "cannot write a seasonal slot");
                self.counters.slot_errors.inc();
            }
        }
    }

    /// One pass over the keys of the slot and scope, which lie together (`keys::slot`). A read
    /// that fails part way gives `None`, and each series is then read alone.
    fn load_scope(&mut self, prefix: &str, slot: u16) -> Option<Vec<(String, SlotSummary)>> {
        let mut found = Vec::new();
        for item in self.slots.scan_prefix(keys::slot(prefix, slot)) {
            let (key, bytes) = match item {
                Ok(kv) => kv,
                Err(e) => {
                    tracing::warn!(error = %e, prefix, slot, "cannot read a scope's seasonal slots");
                    self.counters.slot_errors.inc();
                    return None;
                }
            };
            let Some(series) = keys::series_of_slot(&key) else {
                self.counters.records_skipped.inc();
                continue;
            };
            if let Some(summary) = self.summary(&bytes, series, slot) {
                found.push((series.to_owned(), summary));
            }
        }
        self.counters.slots_read.inc_by(found.len() as u64);
        Some(found)
    }

    /// One batch, which sled applies in key order.
    fn save_all(&mut self, slots: Vec<(String, u16, SlotSummary)>) {
        let mut batch = sled::Batch::default();
        let mut written = 0;
        for (series, slot, summary) in &slots {
            if let Some(record) = self.record(series, *slot, summary) {
                batch.insert(keys::slot(series, *slot), record);
                written += 1;
            }
        }
        match self.slots.apply_batch(batch) {
            Ok(()) => {
                self.counters.records_written.inc_by(written);
            }
            Err(e) => {
                tracing::warn!(error = %e, slots = slots.len(), "cannot write seasonal slots");
                self.counters.slot_errors.inc_by(slots.len() as u64);
            }
        }
    }
}

#[cfg(test)]
mod tests;
