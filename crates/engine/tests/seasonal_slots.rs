//! An hour's turn reads a scope's seasonal slots in one pass where the store can, and saves the
//! slots left in one batch, and learns exactly what it learns reading and saving one series at a
//! time.

use std::sync::{Arc, Mutex};

use canaryd_engine::baseline::Baseline;
use canaryd_engine::baseline::{AheadOfTurn, MemorySlotStore, SlotStore, SlotSummary, ahead_of_turn};
use canaryd_engine::{
    BaselineId, Batch, Engine, EngineConfig, Identity, RequestObservation, ResourceObservations, SpanId,
    TraceId,
};

const S: u64 = 1_000_000_000;
const HOUR: u64 = 3_600 * S;
/// 2026-01-05T00:00:00Z, a Monday.
const START: u64 = 1_767_571_200 * S;

/// What the engine asked of the store.
#[derive(Debug, Default)]
struct Asked {
    loads: usize,
    scope_loads: usize,
    saves: usize,
    /// Reads (`"load"`) and hints (`"ahead"`), by slot, in the order asked.
    log: Vec<(&'static str, u16)>,
}

/// An in-memory slot store, shared so that a test can look into it, that counts what it is asked
/// and reads scopes together only if `together`.
#[derive(Clone, Default)]
struct Counted {
    inner: Arc<Mutex<(MemorySlotStore, Asked)>>,
    together: bool,
}

impl Counted {
    fn lock(&self) -> std::sync::MutexGuard<'_, (MemorySlotStore, Asked)> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl SlotStore for Counted {
    fn load(&mut self, series: &str, slot: u16) -> Option<SlotSummary> {
        let mut inner = self.lock();
        inner.1.loads += 1;
        inner.1.log.push(("load", slot));
        inner.0.load(series, slot)
    }

    fn save(&mut self, series: &str, slot: u16, summary: &SlotSummary) {
        let mut inner = self.lock();
        inner.1.saves += 1;
        inner.0.save(series, slot, summary);
    }

    fn load_scope(&mut self, prefix: &str, slot: u16) -> Option<Vec<(String, SlotSummary)>> {
        if !self.together {
            return None;
        }
        let mut inner = self.lock();
        inner.1.scope_loads += 1;
        inner.1.log.push(("load", slot));
        inner.0.load_scope(prefix, slot)
    }

    fn time_reached(&mut self, time: u64) {
        if let AheadOfTurn::Read(slot) = ahead_of_turn(time) {
            self.lock().1.log.push(("ahead", slot));
        }
    }
}

/// One export a second of two versions of one app, from `from` for `secs` seconds: ten requests
/// each over four operations, some failing.
fn traffic(from: u64, secs: u64) -> Vec<Batch> {
    (0..secs)
        .map(|s| {
            let resources = ["1.0", "1.1"]
                .iter()
                .map(|version| {
                    let mut r = ResourceObservations::new(Identity::new("prod", "shop", version));
                    for i in 0..10u64 {
                        let time = from + s * S + i * S / 10;
                        r.spans += 1;
                        r.saw(time);
                        r.requests.push(RequestObservation {
                            operation: format!("GET /op{}", i % 4).into(),
                            time,
                            duration_ns: 3_000_000 + (s * 7 + i * 13) % 17 * 400_000,
                            error: (s + i) % 40 == 0,
                            trace_id: TraceId::default(),
                            span_id: SpanId::default(),
                            cohort: None,
                        });
                    }
                    r
                })
                .collect();
            Batch {
                resources,
                received: from + (s + 1) * S,
            }
        })
        .collect()
}

/// What one run leaves: each baseline as last handed over for storing, each stored slot, and
/// what the engine asked of the store from the second week's turn on.
struct Run {
    baselines: Vec<(BaselineId, Baseline)>,
    slots: Vec<(String, u16, SlotSummary)>,
    asked_at_the_turn: Asked,
}

/// Runs the engine over ten minutes either side of the end of a week's first hour, and again a
/// week later, so that the second turn enters an hour whose slots a week earlier left.
fn run(together: bool) -> Run {
    let store = Counted {
        together,
        ..Counted::default()
    };
    let mut engine = Engine::new(EngineConfig::default(), Box::new(store.clone()));
    let week = 168 * HOUR;
    let first = traffic(START + 50 * 60 * S, 20 * 60);
    let second = traffic(START + week + 50 * 60 * S, 20 * 60);
    let mut baselines = std::collections::BTreeMap::new();
    let mut hand_over = |engine: &mut Engine| {
        for (id, baseline) in engine.take_changes().baselines {
            baselines.insert(id, baseline);
        }
    };
    for (i, batch) in first.iter().enumerate() {
        engine.ingest(batch);
        if i % 10 == 9 {
            hand_over(&mut engine);
        }
    }
    store.lock().1 = Asked::default();
    for (i, batch) in second.iter().enumerate() {
        engine.ingest(batch);
        if i % 10 == 9 {
            hand_over(&mut engine);
        }
    }
    hand_over(&mut engine);
    let asked_at_the_turn = std::mem::take(&mut store.lock().1);
    let mut slots = Vec::new();
    for id in baselines.keys() {
        for slot in [0u16, 1] {
            if let Some(summary) = store.lock().0.load(&id.series_name(), slot) {
                slots.push((id.series_name(), slot, summary));
            }
        }
    }
    Run {
        baselines: baselines.into_iter().collect(),
        slots,
        asked_at_the_turn,
    }
}

#[test]
fn an_hours_turn_reads_a_scopes_slots_together_and_learns_what_one_by_one_learns() {
    let together = run(true);
    let alone = run(false);
    let with_slots = together
        .baselines
        .iter()
        .filter(|(_, b)| b.slot.is_some())
        .count();
    assert!(with_slots >= 20, "{with_slots} baselines with a slot");
    // Every baseline left the first hour in each week and entered the second; in the second week
    // the slot it entered held the first week's values.
    let week_old = together
        .baselines
        .iter()
        .filter(|(_, b)| b.slot.as_ref().is_some_and(|(_, s)| s.past_weeks > 0))
        .count();
    assert!(
        week_old * 2 >= with_slots,
        "{week_old} of {with_slots} entered a slot a week old"
    );
    assert_eq!(together.baselines, alone.baselines);
    assert_eq!(together.slots, alone.slots);
    assert!(
        together.slots.len() >= 2 * with_slots,
        "{} slots",
        together.slots.len()
    );

    // Alone, each baseline entering the hour was a read of its own; together, a read per scope
    // (the app's and each version's) at the turn, and few or none alone.
    let (t, a) = (&together.asked_at_the_turn, &alone.asked_at_the_turn);
    assert!(a.loads >= with_slots && a.scope_loads == 0, "{a:?}");
    assert!(
        t.scope_loads >= 3 && t.loads * 4 <= a.loads,
        "{t:?} against {a:?}"
    );
    assert_eq!(t.saves, a.saves);
}

/// The engine tells its store the event time its windows reach, so that a store reading ahead
/// reads the next hour's slots once within `READ_AHEAD_NS` of the turn, not before, and before
/// the turn reads any of them.
#[test]
fn the_store_hears_of_the_turn_five_minutes_ahead_and_before_it_reads_the_hours_slots() {
    let store = Counted {
        together: true,
        ..Counted::default()
    };
    let mut engine = Engine::new(EngineConfig::default(), Box::new(store.clone()));
    let minute = 60 * S;
    // Up to 0:54, every window closed ends more than five minutes before the hour.
    for batch in traffic(START + 50 * minute, 4 * 60) {
        engine.ingest(&batch);
    }
    let hinted = |store: &Counted| -> Vec<u16> {
        let inner = store.lock();
        inner
            .1
            .log
            .iter()
            .filter(|(what, _)| *what == "ahead")
            .map(|(_, slot)| *slot)
            .collect()
    };
    assert_eq!(hinted(&store), Vec::<u16>::new());
    for batch in traffic(START + 54 * minute, 16 * 60) {
        engine.ingest(&batch);
    }
    let hints = hinted(&store);
    assert!(
        !hints.is_empty() && hints.iter().all(|slot| *slot == 1),
        "{hints:?}"
    );
    let log = std::mem::take(&mut store.lock().1.log);
    let first_read = log.iter().position(|entry| *entry == ("load", 1));
    let first_hint = log.iter().position(|entry| *entry == ("ahead", 1));
    assert!(
        first_hint.is_some_and(|hint| first_read.is_some_and(|read| hint < read)),
        "the hour's turn read slot 1, after the hint: {log:?}"
    );
}

/// Read ahead within five minutes before a turn, kept for five minutes after it, released
/// inside the hour; the week's last hour turns into its first.
#[test]
fn a_read_ahead_is_asked_for_before_a_turn_and_released_after_it() {
    let minute = 60 * S;
    let at = |hour: u64, minutes: u64| START + hour * HOUR + minutes * minute;
    assert_eq!(ahead_of_turn(at(0, 54)), AheadOfTurn::Release);
    assert_eq!(ahead_of_turn(at(0, 55)), AheadOfTurn::Read(1));
    assert_eq!(ahead_of_turn(at(0, 59)), AheadOfTurn::Read(1));
    assert_eq!(ahead_of_turn(at(1, 0)), AheadOfTurn::Keep);
    assert_eq!(ahead_of_turn(at(1, 4)), AheadOfTurn::Keep);
    assert_eq!(ahead_of_turn(at(1, 5)), AheadOfTurn::Release);
    assert_eq!(ahead_of_turn(at(167, 57)), AheadOfTurn::Read(0));
    // At the end of time the look ahead saturates: a debug build would panic on an overflow.
    assert_eq!(ahead_of_turn(u64::MAX - 1), ahead_of_turn(u64::MAX));
}
