//! The store's writer: one thread that writes the engine's state, its events and the seasonal
//! slots it leaves to sled, so that the engine's thread hands its changes over and goes on.
//!
//! sled takes about 15 µs to put a record into a tree of 100k series, sorted or not
//! (`cargo bench -p canaryd-store --bench flush`, `--bench slots`): a flush of every series'
//! baseline took 1.5 s at 100k series, and an hour's turn of their slots about 2.5 s, all of it
//! time in which the engine's thread took no input and decided nothing. The writer takes:
//! - periodic flushes, in parts the engine takes between its inputs (`Engine::begin_changes`,
//!   `take_part`: `PART_BASELINES` baselines each, a few parts ahead at most) and an end that
//!   makes them durable, and the seasonal slots left as event time left their hour
//!   (`WriteBehindSlots`), in the order they were sent, through one queue (parts at most
//!   `PARTS_AHEAD` ahead of the writer, slots at most `SLOTS_AHEAD`);
//! - an event's write (its apps' state and the events, made durable before the answer), which
//!   the engine's thread waits for, ahead of them all: before the next queued job, or between
//!   two pieces of a part;
//! - reading the next hour's slots ahead of an hour's turn (`WriteBehindSlots::read_ahead`), so
//!   that the turn takes them from memory instead of reading sled on the engine's thread (about
//!   0.9 s at 100k series, once an hour).
//!
//! Each write is stamped in the order the engine took it. A part leaves out what an event's
//! write taken after it put or removed (`Superseded`), whichever reached sled first.
//! Invariants: no key in sled holds older state than the engine last handed over for it; an
//! event is answered only once it and its apps' state are durable; a slot is read only once
//! every save of its hour sent before the read is written, and one read ahead is used only if
//! no save of its hour to its scope was sent after the read.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use canaryd_engine::baseline::{AheadOfTurn, SLOTS_PER_WEEK, SlotStore, SlotSummary, ahead_of_turn};
use canaryd_engine::{BaselineId, EngineState, EventTime};
use canaryd_store::{HourSlots, Superseded, in_parts};
use tokio::sync::oneshot;

use super::{SledSlots, Store, StoreError};
use crate::events::Event;

/// Baselines in a part of a flush, and written between two looks for an event's write: about
/// 15 ms of sled, and about 2 ms of the engine's thread to take.
pub const PART_BASELINES: usize = 1_000;

/// Parts of a flush sent and not yet written before the engine takes another: it goes on with
/// its inputs meanwhile, instead of taking faster than sled writes and waiting on the queue.
const PARTS_AHEAD: usize = 4;

/// Seasonal slots handed over and not yet written before the engine waits for the writer: an
/// hour's turn of 100k series hands over one each without waiting (holding them meanwhile,
/// about 24 MB stored), a bigger one goes at the writer's pace past this.
const SLOTS_AHEAD: usize = 100_000;

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store's writer thread has stopped")]
    WriterGone,
}

/// A periodic flush, done: how long the writer took and how it went.
#[derive(Debug)]
pub struct Flushed {
    pub result: Result<(), WriteError>,
    pub took: Duration,
}

/// What goes through the queue.
enum Job {
    /// A part of a flush.
    Part {
        stamp: u64,
        state: EngineState,
    },
    /// The flush's parts are all sent: make them durable, and answer.
    FlushEnd {
        done: oneshot::Sender<Flushed>,
    },
    Slots(Vec<(String, u16, SlotSummary)>),
    /// Read an hour's slots ahead of its turn (`WriteBehindSlots::read_ahead`).
    ReadAhead {
        slot: u16,
        max_bytes: usize,
        read: SyncSender<HourSlots>,
    },
    /// An event's write is waiting (`Shared::events`).
    Wake,
}

/// An event's write.
struct EventsJob {
    stamp: u64,
    state: EngineState,
    events: Vec<Event>,
    max_events: usize,
    done: SyncSender<(Vec<Event>, Result<(), StoreError>)>,
}

/// What the handles and the writer share.
struct Shared {
    /// The event's write waiting: one at most, since its sender waits for the answer.
    events: Mutex<Option<EventsJob>>,
    /// Stamps writes in the order the engine took them.
    stamps: AtomicU64,
    /// False once the writer has stopped.
    alive: AtomicBool,
    pending_slots: PendingSlots,
    /// Parts of a flush sent and not yet written.
    parts_queued: AtomicUsize,
    /// Told as each part is written.
    part_written: tokio::sync::Notify,
}

/// The hours of the week with slot saves sent and not yet written, so that a read of one waits
/// for them (it never does at an hour's turn, which saves the hour left and reads the next),
/// and a save past `SLOTS_AHEAD` pending waits for room.
#[derive(Default)]
struct PendingSlots {
    /// Saves pending, by hour of the week.
    hours: Mutex<Vec<u32>>,
    written: Condvar,
}

impl PendingSlots {
    /// Waits until fewer than `SLOTS_AHEAD` saves are pending.
    fn wait_for_room(&self) {
        let Ok(mut pending) = self.hours.lock() else {
            return;
        };
        while pending.iter().map(|count| *count as usize).sum::<usize>() >= SLOTS_AHEAD {
            match self.written.wait(pending) {
                Ok(guard) => pending = guard,
                Err(_) => return,
            }
        }
    }

    fn hours_of(slots: &[(String, u16, SlotSummary)]) -> Vec<u16> {
        slots.iter().map(|(_, hour, _)| *hour).collect()
    }

    fn sent(&self, hours: &[u16]) {
        let Ok(mut pending) = self.hours.lock() else {
            return;
        };
        if pending.is_empty() {
            pending.resize(usize::from(SLOTS_PER_WEEK), 0);
        }
        for hour in hours {
            if let Some(count) = pending.get_mut(usize::from(*hour)) {
                *count += 1;
            }
        }
    }

    fn written(&self, hours: &[u16]) {
        let Ok(mut pending) = self.hours.lock() else {
            return;
        };
        for hour in hours {
            if let Some(count) = pending.get_mut(usize::from(*hour)) {
                *count = count.saturating_sub(1);
            }
        }
        self.written.notify_all();
    }

    fn wait_for(&self, hour: u16) {
        let Ok(mut pending) = self.hours.lock() else {
            return;
        };
        while pending.get(usize::from(hour)).is_some_and(|count| *count > 0) {
            match self.written.wait(pending) {
                Ok(guard) => pending = guard,
                Err(_) => return,
            }
        }
    }
}

/// A handle on the writer thread; clones send to the same thread, which ends once every handle
/// is dropped and what was sent is written.
#[derive(Clone)]
pub struct StoreWriter {
    /// Unbounded: parts are bounded by `PARTS_AHEAD`, slots by `SLOTS_AHEAD`, and an event's
    /// write by its sender's wait.
    jobs: Sender<Job>,
    shared: Arc<Shared>,
}

/// The writer thread, to be joined once every handle is dropped.
pub struct WriterThread(std::thread::JoinHandle<()>);

impl WriterThread {
    /// Waits until the writer has written every job sent and ended.
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("the store's writer thread panicked");
        }
    }
}

impl StoreWriter {
    /// Starts the writer thread on `store`.
    pub fn start(store: Store) -> std::io::Result<(StoreWriter, WriterThread)> {
        let (jobs, queue) = channel();
        let shared = Arc::new(Shared {
            events: Mutex::new(None),
            stamps: AtomicU64::new(0),
            alive: AtomicBool::new(true),
            pending_slots: PendingSlots::default(),
            parts_queued: AtomicUsize::new(0),
            part_written: tokio::sync::Notify::new(),
        });
        let writer = Writer {
            slots: store.slot_store(),
            store,
            shared: shared.clone(),
            events_written: VecDeque::new(),
            flush_error: None,
            flush_took: Duration::ZERO,
        };
        let thread = std::thread::Builder::new()
            .name("canaryd-store".into())
            .spawn(move || writer.run(queue))?;
        Ok((StoreWriter { jobs, shared }, WriterThread(thread)))
    }

    fn stamp(&self) -> u64 {
        self.shared.stamps.fetch_add(1, Ordering::Relaxed)
    }

    /// Hands a part of a flush to the writer (the head `Engine::begin_changes` gave, or a part
    /// `Engine::take_part` gave).
    pub fn write_part(&self, state: EngineState) {
        let stamp = self.stamp();
        self.shared.parts_queued.fetch_add(1, Ordering::AcqRel);
        if self.jobs.send(Job::Part { stamp, state }).is_err() {
            // No writer: `end_flush` answers so.
            self.shared.parts_queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether the writer has room for another part (`PARTS_AHEAD`).
    pub fn has_room(&self) -> bool {
        self.shared.parts_queued.load(Ordering::Acquire) < PARTS_AHEAD
    }

    /// Returns once the writer has room for another part, or may have.
    pub async fn room(&self) {
        if !self.has_room() {
            self.shared.part_written.notified().await;
        }
    }

    /// Every part of a flush is sent: the answer comes once they are durable, with the first
    /// error any of them met.
    pub fn end_flush(&self) -> oneshot::Receiver<Flushed> {
        let (done, flushed) = oneshot::channel();
        if let Err(std::sync::mpsc::SendError(Job::FlushEnd { done })) =
            self.jobs.send(Job::FlushEnd { done })
        {
            let _ = done.send(Flushed {
                result: Err(WriteError::WriterGone),
                took: Duration::ZERO,
            });
        }
        flushed
    }

    /// Hands `state` over as one flush: a head, its baselines in parts, and the end.
    #[cfg(test)]
    pub fn flush(&self, mut state: EngineState) -> oneshot::Receiver<Flushed> {
        let baselines = std::mem::take(&mut state.baselines);
        self.write_part(state);
        let mut baselines = baselines.into_iter().peekable();
        while baselines.peek().is_some() {
            self.write_part(EngineState {
                baselines: baselines.by_ref().take(PART_BASELINES).collect(),
                ..EngineState::default()
            });
        }
        self.end_flush()
    }

    /// Writes `state` and stores `events` as `Store::write_with_events` does, ahead of what is
    /// queued, and waits until both are durable. Returns the events stored (each given its
    /// sequence number; one whose id was kept already left out). Called from one thread, the
    /// engine's: the writer holds one event's write waiting at a time, and a second sent from
    /// elsewhere meanwhile would take its place (the first then answered `WriterGone`).
    pub fn write_events(
        &self,
        state: EngineState,
        events: Vec<Event>,
        max_events: usize,
    ) -> Result<Vec<Event>, WriteError> {
        let (done, answer) = sync_channel(1);
        let job = EventsJob {
            stamp: self.stamp(),
            state,
            events,
            max_events,
            done,
        };
        match self.shared.events.lock() {
            Ok(mut waiting) => *waiting = Some(job),
            Err(_) => return Err(WriteError::WriterGone),
        }
        // The writer looks for an event's write before each job; the wake is for one waiting.
        if self.jobs.send(Job::Wake).is_err() {
            self.take_back();
            return Err(WriteError::WriterGone);
        }
        loop {
            match answer.recv_timeout(Duration::from_millis(100)) {
                Ok((events, result)) => {
                    result?;
                    return Ok(events);
                }
                Err(RecvTimeoutError::Timeout) if self.shared.alive.load(Ordering::Acquire) => {}
                Err(_) => {
                    self.take_back();
                    return Err(WriteError::WriterGone);
                }
            }
        }
    }

    /// Takes back an event's write no writer will take.
    fn take_back(&self) {
        if let Ok(mut waiting) = self.shared.events.lock() {
            waiting.take();
        }
    }

    /// A `SlotStore` that reads from `slots`, hands its saves to this writer, and has it read
    /// the next hour's slots ahead of each turn, holding up to `read_ahead_bytes` of them
    /// (`HourSlots::bytes_of`; 0 reads none ahead).
    pub fn slot_store(&self, slots: SledSlots, read_ahead_bytes: usize) -> WriteBehindSlots {
        WriteBehindSlots {
            slots,
            writer: self.clone(),
            ahead: None,
            read_ahead_bytes,
        }
    }
}

struct Writer {
    store: Store,
    slots: SledSlots,
    shared: Arc<Shared>,
    /// What each event's write put, with its stamp, in the order written (which is the order of
    /// their stamps: the engine waits for each). A part leaves out what those stamped after it
    /// put; one stamped before every part still to come is dropped.
    events_written: VecDeque<(u64, Superseded)>,
    /// The first error a part of the flush under way met.
    flush_error: Option<WriteError>,
    /// The time the flush under way has taken the writer so far.
    flush_took: Duration,
}

impl Drop for Writer {
    /// A writer that stops, even by a panic, leaves no sender of an event's write waiting.
    fn drop(&mut self) {
        self.shared.alive.store(false, Ordering::Release);
        if let Ok(mut waiting) = self.shared.events.lock() {
            waiting.take();
        }
        self.shared.part_written.notify_one();
        // Nothing pending will be written: no save or read waits for it.
        if let Ok(mut pending) = self.shared.pending_slots.hours.lock() {
            pending.iter_mut().for_each(|count| *count = 0);
        }
        self.shared.pending_slots.written.notify_all();
    }
}

impl Writer {
    fn run(mut self, queue: Receiver<Job>) {
        loop {
            self.write_waiting_events(None);
            match queue.recv() {
                Ok(job) => self.take(job),
                Err(_) => break,
            }
        }
        self.write_waiting_events(None);
    }

    fn take(&mut self, job: Job) {
        match job {
            Job::Part { stamp, state } => {
                let started = Instant::now();
                if let Err(e) = self.write_part(stamp, state) {
                    self.flush_error.get_or_insert(e);
                }
                self.flush_took += started.elapsed();
                self.shared.parts_queued.fetch_sub(1, Ordering::AcqRel);
                self.shared.part_written.notify_one();
            }
            Job::FlushEnd { done } => {
                let started = Instant::now();
                let flushed = self.store.flush();
                let result = match (self.flush_error.take(), flushed) {
                    (Some(e), _) => Err(e),
                    (None, Err(e)) => Err(e.into()),
                    (None, Ok(())) => Ok(()),
                };
                let took = std::mem::take(&mut self.flush_took) + started.elapsed();
                let _ = done.send(Flushed { result, took });
            }
            Job::Slots(slots) => {
                let hours = PendingSlots::hours_of(&slots);
                self.slots.save_all(slots);
                self.shared.pending_slots.written(&hours);
            }
            Job::ReadAhead {
                slot,
                max_bytes,
                read,
            } => {
                if let Some(hour) = self.slots.load_hour(slot, max_bytes) {
                    let _ = read.send(hour);
                }
            }
            Job::Wake => {}
        }
    }

    /// Writes a part of a flush in pieces, with the events' writes that arrive meanwhile
    /// between them; each piece leaves out what the events' writes taken after the part put.
    fn write_part(&mut self, stamp: u64, state: EngineState) -> Result<(), WriteError> {
        while self.events_written.front().is_some_and(|(at, _)| *at < stamp) {
            self.events_written.pop_front();
        }
        let mut newer = Superseded::default();
        for (_, wrote) in &self.events_written {
            newer.merge(wrote.clone());
        }
        for piece in in_parts(state, PART_BASELINES) {
            self.write_waiting_events(Some(&mut newer));
            self.store.write_superseded(&piece, &newer)?;
        }
        Ok(())
    }

    /// Writes the event's write waiting, if one is, and keeps what it put for the parts to come.
    /// While a part is being written, that part leaves it out too (`newer`): the event was
    /// taken after it.
    fn write_waiting_events(&mut self, newer: Option<&mut Superseded>) {
        let job = match self.shared.events.lock() {
            Ok(mut waiting) => waiting.take(),
            Err(_) => None,
        };
        let Some(EventsJob {
            stamp,
            state,
            mut events,
            max_events,
            done,
        }) = job
        else {
            return;
        };
        let result = self.store.write_with_events(&state, &mut events, max_events);
        let written = result.is_ok();
        let _ = done.send((events, result));
        if !written {
            return;
        }
        let mut wrote = Superseded::default();
        wrote.add(&state);
        if let Some(newer) = newer {
            newer.merge(wrote.clone());
        }
        self.events_written.push_back((stamp, wrote));
    }
}

/// The seasonal slots of the daemon's engine: saved by the writer; the hour's turn takes them
/// from a read ahead on the writer's thread when one covers them, else reads them from sled on
/// the engine's thread. A read of an hour waits for the saves of that hour sent before it; a
/// read ahead, queued behind them, sees them too, and a save sent after it leaves its scope to be
/// read from sled.
pub struct WriteBehindSlots {
    slots: SledSlots,
    writer: StoreWriter,
    ahead: Option<ReadAhead>,
    /// The most the slots read ahead may hold in memory.
    read_ahead_bytes: usize,
}

/// An hour's slots asked of the writer ahead of the hour's turn.
struct ReadAhead {
    slot: u16,
    /// Answered once the writer has read them; never, if it could not.
    reading: Receiver<HourSlots>,
    read: Option<HourSlots>,
    /// Scopes given a save of `slot`, or forgotten, since the read was asked for: not taken
    /// from it.
    changed_since: HashSet<String>,
}

impl ReadAhead {
    /// The slots read, once the writer has answered. Never waits for it.
    fn read(&mut self) -> Option<&mut HourSlots> {
        if self.read.is_none() {
            self.read = self.reading.try_recv().ok();
        }
        self.read.as_mut()
    }

    /// Scope `prefix`'s slots of the hour, if the read is in, covers the scope, and no save of
    /// the hour to the scope came after it was asked for.
    fn take(&mut self, prefix: &str) -> Option<Vec<(String, SlotSummary)>> {
        if self.changed_since.contains(prefix) {
            return None;
        }
        self.read()?.take(prefix)
    }

    fn saved(&mut self, slots: &[(String, u16, SlotSummary)]) {
        for (series, slot, _) in slots {
            if *slot == self.slot
                && let Some(prefix) = BaselineId::prefix_of_series(series)
                && !self.changed_since.contains(prefix)
            {
                self.changed_since.insert(prefix.to_owned());
            }
        }
    }

    fn forgot(&mut self, prefix: &str) {
        if let Some(read) = self.read.as_mut() {
            read.take(prefix);
        }
        self.changed_since.insert(prefix.to_owned());
    }
}

impl WriteBehindSlots {
    /// Whether the writer has answered a read ahead of `slot` (it never waits for one).
    pub fn has_read_ahead(&mut self, slot: u16) -> bool {
        self.ahead
            .as_mut()
            .filter(|ahead| ahead.slot == slot)
            .is_some_and(|ahead| ahead.read().is_some())
    }

    /// Asks the writer to read the hour's slots, once an hour: what an earlier read ahead still
    /// holds is dropped.
    pub fn read_ahead(&mut self, slot: u16) {
        if self.read_ahead_bytes == 0 || self.ahead.as_ref().is_some_and(|ahead| ahead.slot == slot) {
            return;
        }
        let (read, reading) = sync_channel(1);
        self.ahead = None;
        let job = Job::ReadAhead {
            slot,
            max_bytes: self.read_ahead_bytes,
            read,
        };
        if self.writer.jobs.send(job).is_ok() {
            self.ahead = Some(ReadAhead {
                slot,
                reading,
                read: None,
                changed_since: HashSet::new(),
            });
        }
    }

    fn hand_over(&mut self, slots: Vec<(String, u16, SlotSummary)>) {
        if slots.is_empty() {
            return;
        }
        if let Some(ahead) = &mut self.ahead {
            ahead.saved(&slots);
        }
        let pending = &self.writer.shared.pending_slots;
        pending.wait_for_room();
        let hours = PendingSlots::hours_of(&slots);
        pending.sent(&hours);
        if let Err(std::sync::mpsc::SendError(Job::Slots(slots))) = self.writer.jobs.send(Job::Slots(slots)) {
            // No writer: saved here, as a store without one would.
            self.slots.save_all(slots);
            pending.written(&hours);
        }
    }
}

impl SlotStore for WriteBehindSlots {
    fn load(&mut self, series: &str, slot: u16) -> Option<SlotSummary> {
        self.writer.shared.pending_slots.wait_for(slot);
        self.slots.load(series, slot)
    }

    fn save(&mut self, series: &str, slot: u16, summary: &SlotSummary) {
        self.hand_over(vec![(series.to_owned(), slot, summary.clone())]);
    }

    fn load_scope(&mut self, prefix: &str, slot: u16) -> Option<Vec<(String, SlotSummary)>> {
        if let Some(ahead) = self.ahead.as_mut().filter(|ahead| ahead.slot == slot)
            && let Some(slots) = ahead.take(prefix)
        {
            return Some(slots);
        }
        self.writer.shared.pending_slots.wait_for(slot);
        self.slots.load_scope(prefix, slot)
    }

    fn save_all(&mut self, slots: Vec<(String, u16, SlotSummary)>) {
        self.hand_over(slots);
    }

    fn forget_scope(&mut self, prefix: &str) {
        if let Some(ahead) = &mut self.ahead {
            ahead.forgot(prefix);
        }
    }

    fn time_reached(&mut self, time: EventTime) {
        match ahead_of_turn(time) {
            AheadOfTurn::Read(slot) => self.read_ahead(slot),
            AheadOfTurn::Keep => {}
            // What the read still holds belongs to scopes that did not turn with the others
            // (quiet apps, or quiet features entering the hour one by one): read from sled.
            AheadOfTurn::Release => self.ahead = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventData, EventType};
    use canaryd_engine::baseline::Baseline;
    use canaryd_engine::features::{Feature, FeatureKey};
    use canaryd_engine::sketch::Sketch;
    use canaryd_engine::{BaselineId, Scope};

    fn open(dir: &std::path::Path) -> Store {
        Store::open(dir, 8 << 20, super::super::StoreCounters::default()).expect("open")
    }

    fn baseline(app: &str, n: usize, level: f64) -> (BaselineId, Baseline) {
        let id = BaselineId {
            env: "prod".into(),
            app: app.into(),
            scope: Scope::App,
            key: FeatureKey::of(Feature::OperationShare, &format!("GET /{n}")),
        };
        let mut baseline = Baseline::default();
        baseline.ewma.mean = level;
        (id, baseline)
    }

    fn anomaly_of(app: &str) -> Event {
        Event::new(
            EventType::AnomalyDetected,
            EventData {
                env: "prod".into(),
                app: app.into(),
                stable_version: None,
                canary_version: None,
                version: None,
                stage: None,
                state: "anomalous".into(),
                score: None,
                detected_at: "2026-01-05T00:00:00Z".into(),
                reasons: Vec::new(),
                action: None,
                dry_run: false,
                approval: None,
                next_env: None,
                traffic: None,
                cause: None,
                levers: None,
            },
        )
    }

    /// A slot with one value in its current week.
    fn summary() -> SlotSummary {
        let mut summary = SlotSummary {
            past: Sketch::new(0.02),
            current: Sketch::new(0.02),
            week: 3,
            past_weeks: 2,
        };
        summary.current.add(12.5);
        summary
    }

    /// Hands over hour 9's slots of 200 scopes of 100 series, a batch a scope, as an hour's
    /// turn does: 20,000 saves for the writer to work through.
    fn queue_slot_saves(slots: &mut WriteBehindSlots, summary: &SlotSummary) {
        for scope in 0..200 {
            let prefix = BaselineId::series_prefix("prod", &format!("app-{scope}"), &Scope::App);
            slots.save_all(
                (0..100)
                    .map(|n| (format!("{prefix}series-{n}"), 9, summary.clone()))
                    .collect(),
            );
        }
    }

    /// An event's write does not wait for a flush being written: it is answered, durable, while
    /// the flush is still under way, and the flush's older state of the same series, written
    /// after it, does not replace its newer one.
    #[tokio::test]
    async fn an_events_write_goes_ahead_of_a_flush_and_its_state_stands() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let (writer, thread) = StoreWriter::start(store.clone()).expect("start");
        // Thirty parts of other apps' baselines, then shop's at level 1.
        let mut flush = EngineState {
            baselines: (0..30 * PART_BASELINES)
                .map(|n| baseline(&format!("bulk-{}", n % 50), n, 5.0))
                .collect(),
            ..EngineState::default()
        };
        flush.baselines.extend((0..10).map(|n| baseline("shop", n, 1.0)));
        let mut flushed = writer.flush(flush);
        let newer = EngineState {
            baselines: (0..10).map(|n| baseline("shop", n, 2.0)).collect(),
            ..EngineState::default()
        };
        let events = writer
            .write_events(newer, vec![anomaly_of("shop")], 100)
            .expect("the event is stored");
        assert_eq!(events.len(), 1);
        assert!(!events[0].id.is_empty(), "stored, and named");
        assert!(
            matches!(flushed.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "answered before the flush ended"
        );
        let done = flushed.await.expect("the flush is answered");
        assert!(done.result.is_ok(), "{:?}", done.result);
        drop(writer);
        thread.join();

        let loaded = store.load().expect("load");
        for n in 0..10 {
            let (id, _) = baseline("shop", n, 0.0);
            let level = loaded
                .baselines
                .iter()
                .find(|(i, _)| *i == id)
                .map(|(_, b)| b.ewma.mean);
            assert_eq!(
                level,
                Some(2.0),
                "shop's baseline {n}: the event's, not the flush's"
            );
        }
        assert_eq!(loaded.baselines.len(), 30 * PART_BASELINES + 10);
        assert_eq!(store.event_count(), 1);
    }

    /// An event's write does not wait behind the slot saves queued before it (an hour's turn
    /// sends a batch a scope): it is answered while they are still being written.
    #[test]
    fn an_events_write_goes_ahead_of_queued_slot_saves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let (writer, thread) = StoreWriter::start(store.clone()).expect("start");
        let mut slots = writer.slot_store(store.slot_store(), 1 << 30);
        let summary = summary();
        queue_slot_saves(&mut slots, &summary);
        writer
            .write_events(EngineState::default(), vec![anomaly_of("shop")], 100)
            .expect("the event is stored");
        let still_pending = writer
            .shared
            .pending_slots
            .hours
            .lock()
            .expect("lock")
            .get(9)
            .copied()
            .unwrap_or(0);
        assert!(still_pending > 0, "the slot saves were all written first");
        assert_eq!(store.event_count(), 1);
        drop((slots, writer));
        thread.join();
        assert_eq!(store.slot_count(), 200 * 100, "and every save was written after");
    }

    /// A flush queued behind slot saves, and an event's write taken after it that goes ahead of
    /// both: the flush, begun after the event's write, still leaves that write's newer state.
    #[test]
    fn a_flush_begun_after_a_later_events_write_leaves_its_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let (writer, thread) = StoreWriter::start(store.clone()).expect("start");
        let mut slots = writer.slot_store(store.slot_store(), 1 << 30);
        let summary = summary();
        queue_slot_saves(&mut slots, &summary);
        let flushed = writer.flush(EngineState {
            baselines: (0..10).map(|n| baseline("shop", n, 1.0)).collect(),
            ..EngineState::default()
        });
        let newer = EngineState {
            baselines: (0..10).map(|n| baseline("shop", n, 2.0)).collect(),
            ..EngineState::default()
        };
        writer
            .write_events(newer, vec![anomaly_of("shop")], 100)
            .expect("the event is stored");
        let done = flushed.blocking_recv().expect("the flush is answered");
        assert!(done.result.is_ok(), "{:?}", done.result);
        drop((slots, writer));
        thread.join();
        let loaded = store.load().expect("load");
        assert_eq!(loaded.baselines.len(), 10);
        assert!(
            loaded.baselines.iter().all(|(_, b)| b.ewma.mean == 2.0),
            "the event's state, not the flush's"
        );
    }

    /// A part taken after an event's write is newer than it: written over it, not left out.
    #[test]
    fn a_part_taken_after_an_events_write_is_written_over_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let (writer, thread) = StoreWriter::start(store.clone()).expect("start");
        let level = |level: f64| EngineState {
            baselines: (0..10).map(|n| baseline("shop", n, level)).collect(),
            ..EngineState::default()
        };
        writer.write_part(EngineState::default());
        writer.write_part(level(1.0));
        writer
            .write_events(level(2.0), vec![anomaly_of("shop")], 100)
            .expect("the event is stored");
        writer.write_part(level(3.0));
        let done = writer.end_flush().blocking_recv().expect("answered");
        assert!(done.result.is_ok(), "{:?}", done.result);
        drop(writer);
        thread.join();
        let loaded = store.load().expect("load");
        assert!(loaded.baselines.iter().all(|(_, b)| b.ewma.mean == 3.0));
        assert_eq!(loaded.baselines.len(), 10);
    }

    /// A store on a fresh data dir, its counters and its writer, for the daemon's slot store.
    struct SlotsOnWriter {
        _dir: tempfile::TempDir,
        counters: super::super::StoreCounters,
        store: Store,
        writer: StoreWriter,
        thread: WriterThread,
    }

    impl SlotsOnWriter {
        fn start() -> SlotsOnWriter {
            let dir = tempfile::tempdir().expect("tempdir");
            let counters = super::super::StoreCounters::default();
            let store = Store::open(dir.path(), 8 << 20, counters.clone()).expect("open");
            let (writer, thread) = StoreWriter::start(store.clone()).expect("start");
            SlotsOnWriter {
                _dir: dir,
                counters,
                store,
                writer,
                thread,
            }
        }

        /// The daemon's slot store over this store and writer, reading ahead without a limit.
        fn slot_store(&self) -> WriteBehindSlots {
            self.writer.slot_store(self.store.slot_store(), 1 << 30)
        }

        /// Waits until the writer has written everything sent and ended (every slot store over
        /// it dropped first).
        fn stop(self) {
            drop(self.writer);
            self.thread.join();
        }
    }

    /// The slots of `scopes` apps of `per_scope` series each, in hour `slot`, each summary
    /// holding `value`.
    fn hour_of(
        scopes: std::ops::Range<usize>,
        per_scope: usize,
        slot: u16,
        value: f64,
    ) -> Vec<(String, u16, SlotSummary)> {
        let mut summary = summary();
        summary.current.add(value);
        scopes
            .flat_map(|scope| {
                let prefix = prefix_of(scope);
                (0..per_scope).map(move |n| (format!("{prefix}series-{n}"), slot))
            })
            .map(|(series, slot)| (series, slot, summary.clone()))
            .collect()
    }

    fn prefix_of(scope: usize) -> String {
        BaselineId::series_prefix("prod", &format!("app-{scope:03}"), &Scope::App)
    }

    /// Waits, with a deadline, until the writer has read the hour ahead.
    fn wait_for_read_ahead(slots: &mut WriteBehindSlots, slot: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !slots.has_read_ahead(slot) {
            assert!(Instant::now() < deadline, "the writer read hour {slot} ahead");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn sorted(mut slots: Vec<(String, SlotSummary)>) -> Vec<(String, SlotSummary)> {
        slots.sort_by(|a, b| a.0.cmp(&b.0));
        slots
    }

    /// An hour's turn takes each scope's slots from the hour read ahead on the writer's thread,
    /// exactly what sled holds, without reading sled on the engine's thread; a scope with no slot
    /// of the hour is answered empty, and one asked for again is read from sled.
    #[test]
    fn an_hours_turn_takes_the_slots_read_ahead_without_reading_sled() {
        let on_writer = SlotsOnWriter::start();
        let (counters, store) = (&on_writer.counters, &on_writer.store);
        let mut slots = on_writer.slot_store();
        slots.save_all(hour_of(0..20, 30, 5, 1.0));
        slots.save_all(hour_of(0..20, 30, 6, 2.0));
        slots.read_ahead(5);
        wait_for_read_ahead(&mut slots, 5);
        assert_eq!(counters.slots_read_ahead.get(), 600);
        let mut reference = store.slot_store();
        let expected: Vec<_> = (0..21)
            .map(|scope| reference.load_scope(&prefix_of(scope), 5))
            .collect();
        let read_before = counters.slots_read.get();
        for (scope, expected) in expected.into_iter().enumerate() {
            let took = slots.load_scope(&prefix_of(scope), 5).expect("read");
            assert_eq!(Some(sorted(took)), expected.map(sorted), "scope {scope}");
        }
        assert_eq!(
            counters.slots_read.get(),
            read_before,
            "no slot read on the engine's thread"
        );
        // Another hour, and a scope asked for a second time, are read from sled.
        assert_eq!(slots.load_scope(&prefix_of(3), 6).expect("read").len(), 30);
        assert_eq!(slots.load_scope(&prefix_of(3), 5).expect("read").len(), 30);
        assert_eq!(counters.slots_read.get(), read_before + 60);
        drop(slots);
        on_writer.stop();
    }

    /// A save of the hour to a scope after the read ahead was asked for is what that scope reads
    /// (from sled, once written), not the older slot read ahead; other scopes still take theirs.
    #[test]
    fn a_save_after_the_read_ahead_is_what_its_scope_reads() {
        let on_writer = SlotsOnWriter::start();
        let counters = &on_writer.counters;
        let mut slots = on_writer.slot_store();
        slots.save_all(hour_of(0..4, 10, 5, 1.0));
        slots.read_ahead(5);
        wait_for_read_ahead(&mut slots, 5);
        let newer = hour_of(2..3, 1, 5, 9.0);
        slots.save_all(newer.clone());
        let read_before = counters.slots_read.get();
        let scope_two = sorted(slots.load_scope(&prefix_of(2), 5).expect("read"));
        assert_eq!(counters.slots_read.get(), read_before + 10, "read from sled");
        let (series, _, summary) = &newer[0];
        assert!(
            scope_two.contains(&(series.clone(), summary.clone())),
            "the newer save is read"
        );
        assert_eq!(slots.load_scope(&prefix_of(1), 5).expect("read").len(), 10);
        assert_eq!(
            counters.slots_read.get(),
            read_before + 10,
            "scope 1 taken from the read ahead"
        );
        // A scope forgotten (its version evicted) is not taken from the read ahead either.
        slots.forget_scope(&prefix_of(3));
        assert_eq!(slots.load_scope(&prefix_of(3), 5).expect("read").len(), 10);
        assert_eq!(
            counters.slots_read.get(),
            read_before + 20,
            "scope 3 read from sled"
        );
        drop(slots);
        on_writer.stop();
    }

    /// Event time five minutes from a turn asks for the hour's slots; well inside the hour
    /// after it, what the read still holds is let go, and a late scope reads sled.
    #[test]
    fn the_hours_read_is_asked_for_near_its_turn_and_let_go_inside_the_hour() {
        const MINUTE: EventTime = 60_000_000_000;
        // 2026-01-05T00:00:00Z, a Monday: hour-of-week 0.
        const MONDAY: EventTime = 1_767_571_200_000_000_000;
        let on_writer = SlotsOnWriter::start();
        let counters = &on_writer.counters;
        let mut slots = on_writer.slot_store();
        slots.save_all(hour_of(0..3, 10, 1, 1.0));
        slots.time_reached(MONDAY + 50 * MINUTE);
        assert!(slots.ahead.is_none(), "nothing asked ten minutes before the turn");
        slots.time_reached(MONDAY + 56 * MINUTE);
        wait_for_read_ahead(&mut slots, 1);
        slots.time_reached(MONDAY + 62 * MINUTE);
        let read_before = counters.slots_read.get();
        assert_eq!(slots.load_scope(&prefix_of(0), 1).expect("read").len(), 10);
        assert_eq!(
            counters.slots_read.get(),
            read_before,
            "taken from the read ahead"
        );
        slots.time_reached(MONDAY + 66 * MINUTE);
        assert!(slots.ahead.is_none(), "let go five minutes past the turn");
        assert_eq!(slots.load_scope(&prefix_of(1), 1).expect("read").len(), 10);
        assert_eq!(counters.slots_read.get(), read_before + 10, "read from sled");
        drop(slots);
        on_writer.stop();
    }

    /// A read ahead stops at a scope's start once it would hold more than its limit: the scopes
    /// before are covered whole, the rest are not (read from sled at the turn).
    #[test]
    fn a_read_ahead_stops_at_a_scope_past_its_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let mut sled_slots = store.slot_store();
        sled_slots.save_all(hour_of(0..5, 10, 5, 1.0));
        let mut whole = sled_slots.load_hour(5, usize::MAX).expect("read");
        let scope_bytes: usize = whole
            .take(&prefix_of(0))
            .expect("covered")
            .iter()
            .map(HourSlots::bytes_of)
            .sum();
        assert_eq!(whole.bytes(), scope_bytes * 4, "every scope's slots alike");
        let mut hour = sled_slots.load_hour(5, scope_bytes * 5 / 2).expect("read");
        assert_eq!(hour.held(), 20);
        assert_eq!(hour.take(&prefix_of(0)).map(|s| s.len()), Some(10));
        assert_eq!(hour.take(&prefix_of(1)).map(|s| s.len()), Some(10));
        assert!(hour.take(&prefix_of(2)).is_none() && hour.take(&prefix_of(4)).is_none());
        assert_eq!(hour.held(), 0);
        let mut whole = sled_slots.load_hour(5, scope_bytes * 5).expect("read");
        assert_eq!(whole.bytes(), scope_bytes * 5);
        assert_eq!(whole.held(), 50);
        assert_eq!(whole.take(&prefix_of(4)).map(|s| s.len()), Some(10));
        // A scope of no slot of the hour is covered: it has none.
        assert_eq!(whole.take(&prefix_of(9)).map(|s| s.len()), Some(0));
    }

    /// Saves handed to the writer are read back at once: a read of their hour waits for them.
    #[test]
    fn slots_saved_through_the_writer_are_read_back_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let (writer, thread) = StoreWriter::start(store.clone()).expect("start");
        let mut slots = writer.slot_store(store.slot_store(), 1 << 30);
        let prefix = BaselineId::series_prefix("prod", "shop", &Scope::App);
        let summary = summary();
        let saved: Vec<(String, u16, SlotSummary)> = (0..3_000)
            .map(|n| (format!("{prefix}series-{n}"), 5, summary.clone()))
            .collect();
        slots.save_all(saved);
        slots.save(&format!("{prefix}one"), 6, &summary);
        let read = slots.load_scope(&prefix, 5).expect("read");
        assert_eq!(read.len(), 3_000, "every save of hour 5, written before the read");
        assert!(read.iter().all(|(_, s)| *s == summary));
        assert_eq!(slots.load(&format!("{prefix}one"), 6), Some(summary));
        drop((slots, writer));
        thread.join();
    }
}
