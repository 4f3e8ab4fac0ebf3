use super::*;
use crate::v1::SlotRecord;
use canaryd_engine::BaselineId;
use canaryd_engine::baseline::BaselineConfig;
use canaryd_engine::features::{Feature, FeatureKey};
use serde::Deserialize;

/// The engine's baseline settings with the range band on: what these baselines learn, its
/// long-memory range too, the store gives back whole (`BaselineRecord`).
pub(crate) fn persisted_config() -> BaselineConfig {
    BaselineConfig {
        range: canaryd_engine::baseline::RangeConfig::of_width(0.06),
        ..BaselineConfig::default()
    }
}

/// The engine's baseline settings without the range band, whose long memory format 1 did not
/// keep (`v1::BaselineRecord`): what these baselines learn, a format-1 data dir gives back whole.
fn format_1_config() -> BaselineConfig {
    BaselineConfig {
        range: None,
        ..BaselineConfig::default()
    }
}

/// A baseline's record as format 1 (and `baselines.2`) kept it.
pub(crate) fn format_1_record(baseline: &Baseline) -> v1::BaselineRecord {
    let record = BaselineRecord::try_from(baseline).expect("record");
    v1::BaselineRecord {
        ewma: record.ewma,
        slot: record.slot,
        last_value: record.last_value,
        last_score: record.last_score,
        last_window_end: record.last_window_end,
        anomaly: record.anomaly,
    }
}

/// The daemon's records, reduced to what the store's rules look at.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct TestEvent {
    seq: Option<u64>,
    kind: u8,
    /// Its id where it has one of its own (named as the daemon names events); else its number.
    name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct TestSubscription {
    id: String,
    kinds: Vec<u8>,
    disabled: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct TestDelivery {
    seq: Option<u64>,
    pending: bool,
    parked: bool,
    attempts: u32,
}

struct Test;

/// The stand-ins' names in the store's records.
fn kind_name(kind: u8) -> String {
    format!("test.kind.{kind}")
}

fn seq_of(id: &str) -> Result<Option<u64>, ConvertError> {
    if id.is_empty() {
        return Ok(None);
    }
    id.parse().map(Some).map_err(|_| ConvertError {
        what: "test id",
        reason: id.to_owned(),
    })
}

fn kind_of(name: &str) -> Result<u8, ConvertError> {
    name.strip_prefix("test.kind.")
        .and_then(|k| k.parse().ok())
        .ok_or_else(|| ConvertError {
            what: "test kind",
            reason: name.to_owned(),
        })
}

impl DaemonRecords for Test {
    type Event = TestEvent;
    type Subscription = TestSubscription;
    type Delivery = TestDelivery;

    fn stored(event: &mut TestEvent, seq: u64) {
        event.seq = Some(seq);
    }
    fn event_record(event: &TestEvent) -> Result<EventRecord, ConvertError> {
        Ok(EventRecord {
            id: event
                .name
                .clone()
                .unwrap_or_else(|| event.seq.map(|s| s.to_string()).unwrap_or_default()),
            specversion: "1.0".into(),
            source: "test".into(),
            event_type: kind_name(event.kind),
            time: String::new(),
            subject: String::new(),
            datacontenttype: "application/json".into(),
            data: "{}".into(),
        })
    }
    fn event(record: EventRecord) -> Result<TestEvent, ConvertError> {
        let (seq, name) = match record.id.starts_with("name-") {
            true => (None, Some(record.id)),
            false => (seq_of(&record.id)?, None),
        };
        Ok(TestEvent {
            seq,
            kind: kind_of(&record.event_type)?,
            name,
        })
    }
    fn subscription_record(subscription: &TestSubscription) -> SubscriptionRecord {
        SubscriptionRecord {
            id: subscription.id.clone(),
            url: String::new(),
            events: subscription.kinds.iter().map(|&k| kind_name(k)).collect(),
            kind: "webhook".into(),
            secret: String::new(),
            created_at: String::new(),
            disabled: subscription.disabled.clone(),
        }
    }
    fn subscription(record: SubscriptionRecord) -> Result<TestSubscription, ConvertError> {
        Ok(TestSubscription {
            id: record.id,
            kinds: record
                .events
                .iter()
                .map(|name| kind_of(name))
                .collect::<Result<_, _>>()?,
            disabled: record.disabled,
        })
    }
    fn delivery_record(delivery: &TestDelivery) -> DeliveryRecord {
        let state = match (delivery.pending, delivery.parked) {
            (true, _) => daemon::PENDING,
            (false, true) => daemon::PARKED,
            (false, false) => "delivered",
        };
        DeliveryRecord {
            event_id: delivery.seq.map(|s| s.to_string()).unwrap_or_default(),
            event_type: kind_name(1),
            state: state.into(),
            attempts: delivery.attempts,
            first_attempt_ms: None,
            next_attempt_ms: 0,
            last_status: None,
            last_error: None,
            delivered_ms: None,
        }
    }
    fn delivery(record: DeliveryRecord) -> Result<TestDelivery, ConvertError> {
        Ok(TestDelivery {
            // A named event's delivery: the stand-in keeps numbers only.
            seq: match record.event_id.starts_with("name-") {
                true => None,
                false => seq_of(&record.event_id)?,
            },
            pending: record.is_pending(),
            parked: record.is_parked(),
            attempts: record.attempts,
        })
    }
}

type TestStore = Store<Test>;

fn open(dir: &Path) -> TestStore {
    Store::open(dir, 1 << 20, StoreCounters::default()).expect("open")
}

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
        lead: 42,
    }
}

fn events(n: usize) -> Vec<TestEvent> {
    (0..n)
        .map(|_| TestEvent {
            seq: None,
            kind: 1,
            name: None,
        })
        .collect()
}

fn subscribe(store: &TestStore, id: &str) {
    let subscription = TestSubscription {
        id: id.into(),
        kinds: vec![1],
        disabled: None,
    };
    store.put_subscription(&subscription).expect("subscribe");
}

/// The counts kept agree with the trees, which sled counts by walking them.
fn assert_counts(store: &TestStore) {
    assert_eq!(store.outbox_depth(), store.outbox.len(), "outbox");
    assert_eq!(store.parked_count(), store.parked.len(), "parked");
    assert_eq!(store.event_count(), store.events.len(), "events");
    assert_eq!(
        store.event_ids.len(),
        store.events.len() + store.owed.len(),
        "every kept event, and only those, found by its id"
    );
}

fn named(name: &str, kind: u8) -> TestEvent {
    TestEvent {
        seq: None,
        kind,
        name: Some(format!("name-{name}")),
    }
}

/// Lockstep replicas (issue 17): an event's id names the decision, so the same decision made again
/// (by a restarted daemon, say) is not stored, nor delivered, a second time; the first is found
/// by its id, and its id is let go of with it.
#[test]
fn an_event_of_an_id_kept_already_is_left_out_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let counters = StoreCounters::default();
    let store = TestStore::open(dir.path(), 1 << 20, counters.clone()).expect("open");
    subscribe(&store, "a");
    let mut first = vec![named("x", 1), named("y", 1)];
    store.append_events(&mut first, 10).expect("append");
    assert_eq!(first.len(), 2);
    let x = first[0].seq.expect("stored");
    // Again, and twice in one batch: only the new one is stored.
    let mut again = vec![named("x", 1), named("z", 1), named("z", 1)];
    store.append_events(&mut again, 10).expect("append");
    assert_eq!(
        again.iter().map(|e| e.name.as_deref()).collect::<Vec<_>>(),
        [Some("name-z")]
    );
    assert_eq!(counters.duplicate_events.get(), 2);
    assert_eq!((store.event_count(), store.outbox_depth()), (3, 3));
    assert_eq!(store.event_seq_of("name-x").expect("read"), Some(x));
    let read = store.event(x).expect("read").expect("kept");
    assert_eq!((read.seq, read.name.as_deref()), (Some(x), Some("name-x")));
    assert_eq!(store.event_seq_of("name-w").expect("read"), None);
    assert_counts(&store);
    // Delivered, then past the history's cap: gone, and its id with it; the same decision made
    // later still would be a new event.
    for _ in 0..3 {
        let (seq, mut delivery) = store.next_delivery("a").expect("read").expect("pending");
        delivery.pending = false;
        store.put_delivery("a", seq, &delivery).expect("deliver");
    }
    store.append_events(&mut vec![named("w", 1)], 2).expect("append");
    assert_eq!(store.event_seq_of("name-x").expect("read"), None);
    assert_eq!(store.event_seq_of("name-y").expect("read"), None);
    assert!(store.event_seq_of("name-w").expect("read").is_some());
    assert_counts(&store);
}

/// A baseline that learned `value` at the start of 2026-01-05, its slot saved under `id`.
fn learn(id: &BaselineId, value: f64, slots: &mut SledSlots) -> Baseline {
    let mut baseline = Baseline::default();
    baseline.observe(
        &id.series_name(),
        value,
        1_767_571_200_000_000_000,
        &persisted_config(),
        slots,
    );
    // As the engine does when event time leaves the slot's hour.
    let (slot, summary) = baseline.slot.as_ref().expect("a slot");
    slots.save(&id.series_name(), *slot, summary);
    baseline
}

#[test]
fn outbox_and_event_counts_follow_every_change_and_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path());
        subscribe(&store, "a");
        subscribe(&store, "b");
        let mut three = events(3);
        store.append_events(&mut three, 2).expect("append");
        assert_eq!((store.event_count(), store.outbox_depth()), (2, 6));
        assert_counts(&store);
        let (seq, mut delivery) = store.next_delivery("a").expect("read").expect("pending");
        delivery.pending = false;
        store.put_delivery("a", seq, &delivery).expect("record");
        assert_eq!(store.outbox_depth(), 5);
        store.delete_subscription("b").expect("delete");
        assert_eq!(store.outbox_depth(), 2);
        assert_counts(&store);
    }
    let store = open(dir.path());
    assert_eq!((store.event_count(), store.outbox_depth()), (2, 2));
    assert_counts(&store);
}

#[test]
fn a_delivery_recorded_after_its_subscription_was_deleted_is_not_brought_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    subscribe(&store, "a");
    store.append_events(&mut events(2), 10).expect("append");
    // The worker has the oldest in hand when the subscription is deleted.
    let (seq, mut delivery) = store.next_delivery("a").expect("read").expect("pending");
    store.delete_subscription("a").expect("delete");
    delivery.attempts = 1;
    store.put_delivery("a", seq, &delivery).expect("record a retry");
    assert_eq!(store.next_delivery("a").expect("read"), None);
    delivery.pending = false;
    store.put_delivery("a", seq, &delivery).expect("record a success");
    assert!(store.deliveries("a", 10).expect("read").is_empty());
    assert_eq!(store.outbox_depth(), 0);
    assert_counts(&store);
}

#[test]
fn disabling_a_subscription_drops_its_pending_deliveries_and_never_revives_a_deleted_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
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
    let store = open(dir.path());
    for id in ["deleted", "disabled", "live"] {
        subscribe(&store, id);
    }
    // The append read the subscriptions, then both changed before it wrote its entries.
    let read_before = store.subscription_records().expect("read");
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

fn parked(mut delivery: TestDelivery) -> TestDelivery {
    delivery.pending = false;
    delivery.parked = true;
    delivery
}

#[test]
fn a_parked_delivery_leaves_the_queue_stays_stored_and_is_finished_from_parked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = {
        let store = open(dir.path());
        subscribe(&store, "a");
        store.append_events(&mut events(3), 10).expect("append");
        let (first, delivery) = store.next_delivery("a").expect("read").expect("pending");
        store.put_delivery("a", first, &parked(delivery)).expect("park");
        assert_eq!((store.outbox_depth(), store.parked_count()), (2, 1));
        assert_counts(&store);
        // The queue moves on to the next event.
        let (next, _) = store.next_delivery("a").expect("read").expect("pending");
        assert!(next > first);
        first
    };
    // Parked survives a reopen, is listed, and can be changed in place.
    let store = open(dir.path());
    assert_eq!((store.outbox_depth(), store.parked_count()), (2, 1));
    assert_counts(&store);
    let listed = store.parked("a").expect("read");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, first);
    assert_eq!(store.deliveries("a", 10).expect("read").len(), 3);
    let changed = store
        .update_parked("a", first, |d| d.attempts = 7)
        .expect("update")
        .expect("parked");
    assert_eq!(changed.attempts, 7);
    assert_eq!(
        store.find_delivery("a", first).expect("read"),
        Some(changed.clone())
    );
    assert_eq!(store.update_parked("a", first + 1, |_| {}).expect("update"), None);
    // Recording it parked again updates it where it is.
    let mut again = changed;
    again.attempts = 8;
    store.put_delivery("a", first, &again).expect("retry");
    assert_eq!(store.parked("a").expect("read")[0].1.attempts, 8);
    assert_eq!(store.parked_count(), 1);
    // Delivered: from parked to the history.
    again.parked = false;
    store.put_delivery("a", first, &again).expect("deliver");
    assert!(store.parked("a").expect("read").is_empty());
    assert_eq!(store.find_delivery("a", first).expect("read"), Some(again));
    assert_eq!((store.outbox_depth(), store.parked_count()), (2, 0));
    assert_counts(&store);
}

/// Issue 15, "loses nothing": the history's cap (`max_events`, oldest first) took events whose
/// deliveries were still pending or parked, and those deliveries then expired unsent.
#[test]
fn an_event_past_the_history_cap_is_kept_while_a_delivery_still_needs_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (parked_seq, pending_seq, delivered_seq) = {
        let store = open(dir.path());
        subscribe(&store, "a");
        subscribe(&store, "b");
        store.append_events(&mut events(3), 10).expect("append");
        // a: the first parked, the second still pending, the third delivered; b: all delivered.
        let mut seqs = Vec::new();
        for _ in 0..3 {
            let (seq, delivery) = store.next_delivery("b").expect("read").expect("pending");
            let mut done = delivery;
            done.pending = false;
            store.put_delivery("b", seq, &done).expect("deliver");
            seqs.push(seq);
        }
        let (first, delivery) = store.next_delivery("a").expect("read").expect("pending");
        store.put_delivery("a", first, &parked(delivery)).expect("park");
        let mut done = store.find_delivery("a", seqs[2]).expect("read").expect("pending");
        done.pending = false;
        store.put_delivery("a", seqs[2], &done).expect("deliver");
        // Three more events push the first three out of a history of three.
        let mut more: Vec<TestEvent> = (0..3)
            .map(|_| TestEvent {
                seq: None,
                kind: 2,
                name: None,
            })
            .collect();
        store.append_events(&mut more, 3).expect("append");
        assert_eq!(store.event_count(), 3);
        assert_counts(&store);
        (seqs[0], seqs[1], seqs[2])
    };
    // Kept across a reopen for the deliveries that need them; the delivered one is gone.
    let store = open(dir.path());
    assert_eq!(store.owed_count(), 2);
    assert_eq!(
        store.event(parked_seq).expect("read").and_then(|e| e.seq),
        Some(parked_seq)
    );
    assert_eq!(
        store.event(pending_seq).expect("read").and_then(|e| e.seq),
        Some(pending_seq)
    );
    assert_eq!(store.event(delivered_seq).expect("read"), None);
    // Delivered, each is let go of.
    let (seq, mut delivery) = store.next_delivery("a").expect("read").expect("pending");
    assert_eq!(seq, pending_seq);
    delivery.pending = false;
    store.put_delivery("a", seq, &delivery).expect("deliver");
    assert_eq!(store.event(pending_seq).expect("read"), None);
    assert_eq!(store.owed_count(), 1);
    // Deleting the subscription lets go of what only it needed.
    store.delete_subscription("a").expect("delete");
    assert_eq!(store.event(parked_seq).expect("read"), None);
    assert_eq!(store.owed_count(), 0);
    assert_counts(&store);
}

#[test]
fn deleting_or_disabling_clears_parked_deliveries_and_never_revives_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    subscribe(&store, "deleted");
    subscribe(&store, "disabled");
    store.append_events(&mut events(2), 10).expect("append");
    for id in ["deleted", "disabled"] {
        let (seq, delivery) = store.next_delivery(id).expect("read").expect("pending");
        store.put_delivery(id, seq, &parked(delivery)).expect("park");
    }
    assert_eq!(store.parked_count(), 2);
    // The worker has the next one in hand when its subscription goes: parking it brings
    // nothing back.
    let (seq, delivery) = store.next_delivery("deleted").expect("read").expect("pending");
    store.delete_subscription("deleted").expect("delete");
    store.disable_subscription("disabled").expect("disable");
    store
        .put_delivery("deleted", seq, &parked(delivery))
        .expect("park");
    assert!(store.parked("deleted").expect("read").is_empty());
    assert!(store.parked("disabled").expect("read").is_empty());
    assert_eq!((store.outbox_depth(), store.parked_count()), (0, 0));
    assert_counts(&store);
}

/// Teaches `baseline` the values 0 to 19, one a minute from the start of 2026-01-05, under
/// `persisted_config` (so its range learns them too), its slot under `s` in `slots`.
fn learn_twenty_minutes(baseline: &mut Baseline, slots: &mut SledSlots) {
    for i in 0..20 {
        baseline.observe(
            "s",
            i as f64,
            1_767_571_200_000_000_000 + i * 60_000_000_000,
            &persisted_config(),
            slots,
        );
    }
}

/// Baselines written by a build before `baselines.3` (in `baselines.2`, format 1's layout) are
/// moved when the store opens: everything they kept comes back, and their range and recent peak
/// start anew. A record that does not decode stays in the old tree, counted.
#[test]
fn baselines_of_the_tree_before_ranges_are_moved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut baseline = Baseline::default();
    {
        let store = open(dir.path());
        let mut slots = store.slot_store();
        learn_twenty_minutes(&mut baseline, &mut slots);
        let state = EngineState {
            clocks: vec![("prod".into(), "shop".into(), clock())],
            baselines: vec![(id(Scope::App), baseline.clone())],
            ..EngineState::default()
        };
        store.write(&state).expect("write");
        // Moved back to the old tree, in the old layout, as the build before wrote it.
        let new = store.db.open_tree(BASELINES).expect("tree");
        let old = store.db.open_tree(BASELINES_V2).expect("tree");
        for item in new.iter() {
            let (key, _) = item.expect("read");
            old.insert(key.clone(), encode(&format_1_record(&baseline)))
                .expect("write");
            new.remove(key).expect("remove");
        }
        old.insert(b"junk", vec![2u8, 0xff]).expect("write");
        store.flush().expect("flush");
    }
    let store = open(dir.path());
    let moved = Baseline {
        range: Default::default(),
        ..baseline.clone()
    };
    assert_ne!(moved, baseline, "the range had learned");
    assert_eq!(
        store.load().expect("load").baselines,
        vec![(id(Scope::App), moved)]
    );
    let old = store.db.open_tree(BASELINES_V2).expect("tree");
    assert_eq!(old.len(), 1);
    assert!(old.get(b"junk").expect("read").is_some());
    assert_eq!(store.counters.records_skipped.get(), 1);
}

#[test]
fn state_survives_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut baseline = Baseline::default();
    {
        let store = open(dir.path());
        let mut slots = store.slot_store();
        learn_twenty_minutes(&mut baseline, &mut slots);
        // A slot left earlier, in the slot store; the current one rides in the baseline's record.
        let (slot, summary) = baseline.slot.as_ref().expect("a slot");
        slots.save("s", *slot, summary);
        assert_eq!(baseline.range.samples, 20, "the range learned every value");
        (baseline.anomaly.peak, baseline.anomaly.peak_time) = (4.5, 1_767_571_200_000_000_000);
        let state = EngineState {
            clocks: vec![("prod".into(), "shop".into(), clock())],
            apps: vec![("prod".into(), "shop".into(), AppEntry::default())],
            baselines: vec![(id(Scope::App), baseline.clone())],
            ..EngineState::default()
        };
        store.write(&state).expect("write");
        store.flush().expect("flush");
    }
    let store = open(dir.path());
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

/// The versions whose names once collided with the app's or each other's keys.
fn awkward_versions() -> Vec<String> {
    ["*", "", "1.2", "1.20", "1", "\u{1f}", "\0"]
        .into_iter()
        .map(String::from)
        .chain([String::from("v").repeat(10_000)])
        .collect()
}

#[test]
fn evicting_a_version_deletes_its_own_baselines_and_slots_only() {
    let versions = awkward_versions();
    for forget in &versions {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let mut slots = store.slot_store();
        let mut all = vec![(id(Scope::App), 0.0)];
        for (i, v) in versions.iter().enumerate() {
            all.push((id(Scope::Version(v.clone())), 1.0 + i as f64));
        }
        let baselines: Vec<(BaselineId, Baseline)> = all
            .iter()
            .map(|(id, value)| (id.clone(), learn(id, *value, &mut slots)))
            .collect();
        store
            .write(&EngineState {
                baselines: baselines.clone(),
                ..EngineState::default()
            })
            .expect("write");
        assert_eq!(store.slots.len(), all.len(), "one slot each: none shared");
        store
            .write(&EngineState {
                forgotten_versions: vec![("prod".into(), "shop".into(), forget.clone())],
                ..EngineState::default()
            })
            .expect("forget");
        let kept: Vec<(BaselineId, Baseline)> = baselines
            .into_iter()
            .filter(|(id, _)| id.scope != Scope::Version(forget.clone()))
            .collect();
        let mut loaded = store.load().expect("load").baselines;
        loaded.sort_by(|a, b| a.0.cmp(&b.0));
        let mut expected = kept.clone();
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(loaded, expected, "forgetting {:.10?}", forget);
        for (id, baseline) in &kept {
            let (slot, summary) = baseline.slot.clone().expect("a slot");
            assert_eq!(
                slots.load(&id.series_name(), slot),
                Some(summary),
                "{:.10?}'s slot after forgetting {:.10?}",
                id.scope,
                forget
            );
        }
        assert_eq!(store.slots.len(), kept.len());
    }
}

#[test]
fn a_version_forgotten_and_seen_again_keeps_its_new_baselines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let mut slots = store.slot_store();
    let back = id(Scope::Version("v1".into()));
    let series = back.series_name();
    let old = learn(&back, 1.0, &mut slots);
    store
        .write(&EngineState {
            baselines: vec![(back.clone(), old)],
            ..EngineState::default()
        })
        .expect("write");
    // Evicted, then back within one flush, still in its first hour: its current slot is only in
    // memory, and rides in its record.
    let mut new = Baseline::default();
    new.observe(
        &series,
        7.0,
        1_767_571_200_000_000_000,
        &persisted_config(),
        &mut slots,
    );
    store
        .write(&EngineState {
            baselines: vec![(back.clone(), new.clone())],
            forgotten_versions: vec![("prod".into(), "shop".into(), "v1".into())],
            ..EngineState::default()
        })
        .expect("write");
    // Its current slot comes back with it.
    assert_eq!(store.load().expect("load").baselines, vec![(back, new.clone())]);
    let (slot, _) = new.slot.clone().expect("a slot");
    assert_eq!(
        store.slot_store().load(&series, slot),
        None,
        "the forgotten incarnation's slot is gone from the slot store"
    );
}

#[test]
fn corrupt_records_are_skipped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let counters = StoreCounters::default();
    let store: TestStore = Store::open(dir.path(), 1 << 20, counters.clone()).expect("open");
    let key = keys::baseline(&id(Scope::Version("v1".into())));
    store
        .baselines
        .insert(&key, vec![SCHEMA as u8, 0xff])
        .expect("insert");
    store
        .baselines
        .insert(b"not a key", encode(&1u8))
        .expect("insert");
    assert!(store.load().expect("load").baselines.is_empty());
    assert_eq!(counters.records_skipped.get(), 2);
}

#[test]
fn a_record_of_a_newer_schema_stops_the_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let key = keys::baseline(&id(Scope::App));
    store
        .baselines
        .insert(key, vec![SCHEMA as u8 + 1, 1, 2])
        .expect("insert");
    let message = store.load().expect_err("newer").to_string();
    assert!(
        message.contains("store schema 3; this build reads up to 2"),
        "{message}"
    );
}

#[test]
fn a_data_dir_of_a_newer_schema_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path());
        let meta = store.db.open_tree("meta").expect("meta");
        meta.insert("schema", &(SCHEMA + 1).to_be_bytes())
            .expect("insert");
        store.flush().expect("flush");
    }
    let error = TestStore::open(dir.path(), 1 << 20, StoreCounters::default())
        .err()
        .expect("refused");
    assert!(
        matches!(
            error,
            StoreError::NewerSchema {
                found: 3,
                supported: 2,
                ..
            }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("written by store schema 3; this build reads up to 2"),
        "{message}"
    );
}

#[test]
fn a_new_data_dir_is_written_with_the_current_schema() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    assert_eq!(
        migrate::schema(&store.db, &dir.path().join("sled")).expect("read"),
        Some(SCHEMA)
    );
}

/// Writes engine state as format 1 did: the engine's structs of that time, as the frozen records.
fn write_v1(dir: &Path, baselines: &[(v1::BaselineKeyRecord, Baseline)]) {
    let db = raw_sled(dir);
    let tree = db.open_tree("baselines").expect("tree");
    let slots = db.open_tree("slots").expect("tree");
    let clocks = db.open_tree("clocks").expect("tree");
    clocks
        .insert(
            v1::encode(&("prod", "shop")),
            v1::encode(&ClockRecord::from(&clock())),
        )
        .expect("insert");
    for (key, baseline) in baselines {
        let record = format_1_record(baseline);
        tree.insert(v1::encode(key), v1::encode(&record)).expect("insert");
        let (slot, summary) = record.slot.clone().expect("a slot");
        slots
            .insert(key.slot_key(slot), v1::encode(&summary))
            .expect("insert");
    }
    // A slot no baseline names is kept where it was, not dropped.
    slots.insert(b"orphan\0\0\x01", v1::encode(&1u8)).expect("insert");
    db.flush().expect("flush");
}

#[test]
fn a_format_1_data_dir_is_migrated_and_the_app_and_a_version_star_each_get_their_slots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = |scope: v1::ScopeRecord| v1::BaselineKeyRecord {
        env: "prod".into(),
        app: "shop".into(),
        scope,
        key: v1::FeatureKeyRecord {
            feature: v1::FeatureRecord::OperationShare,
            subject: "GET /a".into(),
        },
    };
    let mut memory = canaryd_engine::baseline::MemorySlotStore::default();
    let mut baseline = Baseline::default();
    baseline.observe(
        "s",
        3.0,
        1_767_571_200_000_000_000,
        &format_1_config(),
        &mut memory,
    );
    let star = key(v1::ScopeRecord::Version("*".into()));
    write_v1(
        dir.path(),
        &[
            (key(v1::ScopeRecord::App), baseline.clone()),
            (star, baseline.clone()),
        ],
    );
    let store = open(dir.path());
    let mut loaded = store.load().expect("load");
    loaded.baselines.sort_by(|a, b| a.0.cmp(&b.0));
    let app = id(Scope::App);
    let version = id(Scope::Version("*".into()));
    assert_eq!(
        loaded.baselines,
        vec![
            (app.clone(), baseline.clone()),
            (version.clone(), baseline.clone())
        ]
    );
    assert_eq!(loaded.clocks, vec![("prod".into(), "shop".into(), clock())]);
    let (slot, summary) = baseline.slot.clone().expect("a slot");
    let mut slots = store.slot_store();
    assert_eq!(slots.load(&app.series_name(), slot), Some(summary.clone()));
    assert_eq!(slots.load(&version.series_name(), slot), Some(summary));
    let names: Vec<Vec<u8>> = store.db.tree_names().iter().map(|n| n.to_vec()).collect();
    assert!(
        !names.contains(&b"baselines".to_vec()),
        "migrated trees are dropped"
    );
    let old_slots = store.db.open_tree("slots").expect("tree");
    assert_eq!(old_slots.len(), 1, "the orphan slot is left in its format-1 tree");
}

#[test]
fn a_second_open_of_the_same_dir_fails_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = open(dir.path());
    let message = TestStore::open(dir.path(), 1 << 20, StoreCounters::default())
        .err()
        .expect("locked")
        .to_string();
    assert!(message.contains("another canaryd"), "{message}");
}

#[test]
fn a_migration_that_stopped_half_way_starts_again_from_format_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = v1::BaselineKeyRecord {
        env: "prod".into(),
        app: "shop".into(),
        scope: v1::ScopeRecord::Version("1.2".into()),
        key: v1::FeatureKeyRecord {
            feature: v1::FeatureRecord::OperationShare,
            subject: "GET /a".into(),
        },
    };
    let mut memory = canaryd_engine::baseline::MemorySlotStore::default();
    let mut baseline = Baseline::default();
    baseline.observe(
        "s",
        3.0,
        1_767_571_200_000_000_000,
        &format_1_config(),
        &mut memory,
    );
    write_v1(dir.path(), &[(key, baseline.clone())]);
    {
        // What a migration stopped before it wrote `meta` left behind.
        let db = raw_sled(dir.path());
        let half = db.open_tree(BASELINES).expect("tree");
        let stale = keys::baseline(&id(Scope::Version("gone".into())));
        half.insert(stale, encode(&1u8)).expect("insert");
        db.flush().expect("flush");
    }
    let store = open(dir.path());
    assert_eq!(
        store.load().expect("load").baselines,
        vec![(id(Scope::Version("1.2".into())), baseline)]
    );
}

/// An analysis of a shadow rollout in its second stage, failing, with a check, a gate and a streak.
pub(crate) fn analysis(app: &str) -> AnalysisSnapshot {
    use canaryd_engine::judge::checks::{Check, CheckId, Feature, Group, Outcome, Test};
    use canaryd_engine::judge::model::Decision;
    use canaryd_engine::judge::{Gate, GateMetric, GateOutcome, GateResult, Mode, Model, Stage, State};
    use canaryd_engine::window::RequestAggregate;
    let stage = |name: &str, weight: f64| Stage {
        name: name.into(),
        weight,
        observe_s: 60,
        approval: false,
        gates: vec![Gate {
            metric: GateMetric::ErrorRate,
            max: Some(0.05),
            min: None,
            window_s: 0,
        }],
    };
    let model = Model {
        name: "careful".into(),
        description: "shadow first".into(),
        mode: Mode::Shadow,
        decision: Decision::default(),
        checks: Default::default(),
        stages: vec![stage("5%", 5.0), stage("50%", 50.0)],
        promotion: vec![],
        traffic: Default::default(),
    };
    let mut stage_requests = RequestAggregate::default();
    for i in 0..40 {
        stage_requests.add(1_000_000 * (i + 1), i % 9 == 0);
    }
    let id = CheckId {
        group: Group::Errors,
        feature: Feature {
            name: "error_ratio".into(),
            subject: Some("GET /cart".into()),
        },
        test: Test::FisherExact,
        horizon_s: 30,
    };
    let check = Check {
        group: id.group,
        feature: id.feature.to_string(),
        operation: Some("GET /cart".into()),
        test: id.test,
        critical: true,
        weight: 3.0,
        outcome: Outcome::Fail,
        canary_value: Some(0.11),
        baseline_value: Some(0.01),
        canary_samples: 40,
        baseline_samples: 900,
        statistic: Some(4.2),
        p_value: Some(1e-5),
        threshold: 3.1,
        effect: Some(11.0),
        min_effect: 1.5,
        effect_kind: "ratio",
        window_s: 30,
        message: "11x the stable's error ratio".into(),
        id: id.clone(),
    };
    let gate = GateResult {
        metric: GateMetric::ErrorRate,
        max: Some(0.05),
        min: None,
        value: Some(0.11),
        lower: Some(0.07),
        upper: Some(0.16),
        samples: 40,
        window_s: 0,
        outcome: GateOutcome::Fail,
        message: "over 5%".into(),
    };
    AnalysisSnapshot {
        env: "prod".into(),
        app: app.into(),
        stable: "v1".into(),
        canary: "v2".into(),
        model,
        declared: true,
        paused: true,
        awaiting_approval: Some(65),
        blocked_by: Some("beta".into()),
        failed_in: Some(("test".into(), "evt_0000000000000007".into())),
        started_at: 10,
        state: State::Failing,
        since: 70,
        stage: 1,
        stage_started_at: 60,
        stage_requests,
        failed_at: Some(70),
        last_canary_traffic: 75,
        evaluated_at: 76,
        streaks: vec![(id.group, id.feature.clone(), id.test, 2)],
        checks: vec![check],
        gates: vec![gate],
        score: Some(12.5),
        canary_requests: 400,
        stable_requests: 9000,
        retired: Some("v1".into()),
        sequential: evidence(&id),
    }
}

/// Sequential evidence part way through an analysis: a one-sided series with a first and a later
/// start, a two-sided operation of the mix, a cohort's mix, and ranks.
fn evidence(id: &canaryd_engine::judge::checks::CheckId) -> SequentialState {
    use canaryd_engine::judge::checks::Group;
    use canaryd_engine::judge::sequential::ProcessState;
    let process = |two_sided: bool| ProcessState {
        two_sided,
        starts: vec![
            (0, vec![-0.5, 1.25, 2.0, 0.0, -3.0, 0.5, 0.25, 0.125]),
            (7, vec![0.1; if two_sided { 16 } else { 8 }]),
        ],
        started: 8,
        started_weight: 0.98,
        last_start: 240_000_000_000,
        seconds: 190,
        canary_requests: 1_234.5,
    };
    SequentialState {
        series: vec![(id.series(), process(false))],
        mix: vec![("GET /".into(), 1, process(true))],
        cohort_mix: vec![(
            "beta".into(),
            1,
            vec![
                ("GET /".into(), 1, process(true)),
                ("POST /orders".into(), 2, process(true)),
            ],
        )],
        subjects: vec![("GET /".into(), 1), ("POST /orders".into(), 2)],
        keyed: vec![(Group::CallGraph, "db".into(), 1)],
        through: 250_000_000_000,
        metrics_through: 170_000_000_000,
        legacy: false,
    }
}

#[test]
fn analyses_survive_a_restart_and_an_ended_one_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path());
        let mut state = EngineState::default();
        state.judge.analyses = vec![analysis("cart"), analysis("shop")];
        store.write(&state).expect("write");
        store.flush().expect("flush");
    }
    let store = open(dir.path());
    let loaded = store.load().expect("load").judge.analyses;
    assert_eq!(loaded, vec![analysis("cart"), analysis("shop")]);
    let mut ended = EngineState::default();
    ended.judge.ended = vec![("prod".into(), "cart".into())];
    store.write(&ended).expect("write");
    assert_eq!(store.load().expect("load").judge.analyses, vec![analysis("shop")]);
    // Ended and started again between two writes: the new one is kept.
    let mut again = EngineState::default();
    again.judge.ended = vec![("prod".into(), "shop".into())];
    let mut restarted = analysis("shop");
    restarted.canary = "v3".into();
    again.judge.analyses = vec![restarted.clone()];
    store.write(&again).expect("write");
    assert_eq!(store.load().expect("load").judge.analyses, vec![restarted]);
}

/// An analysis's sequential evidence is read back only with that analysis: evidence left under
/// the app's key by an earlier analysis (a write that stopped between the two trees, an older
/// build that kept only the record) is not taken up by another.
#[test]
fn sequential_evidence_is_read_back_only_with_its_own_analysis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let mut state = EngineState::default();
    state.judge.analyses = vec![analysis("shop")];
    store.write(&state).expect("write");
    let mut record = AnalysisRecord::try_from(&analysis("shop")).expect("record");
    record.canary = "v3".into();
    store
        .analyses
        .insert(keys::app("prod", "shop"), encode(&record))
        .expect("insert");
    let loaded = store.load().expect("load").judge.analyses;
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].canary, "v3");
    assert_eq!(loaded[0].sequential, SequentialState::default());
    // Evidence that does not decode is skipped and counted; the analysis is still read.
    store
        .sequential
        .insert(keys::app("prod", "shop"), vec![SCHEMA as u8, 0xff, 0xff])
        .expect("insert");
    let skipped = store.counters.records_skipped.get();
    assert_eq!(store.load().expect("load").judge.analyses.len(), 1);
    assert_eq!(store.counters.records_skipped.get(), skipped + 1);
}

/// A format-1 event as the daemon wrote it (postcard of its `Event`, which the frozen record
/// mirrors).
fn v1_event(seq: u64, event_type: v1::EventTypeRecord) -> v1::EventRecord {
    v1::EventRecord {
        specversion: "1.0".into(),
        id: format!("evt_{seq:016x}"),
        source: "canaryd".into(),
        event_type,
        time: "2026-01-05T00:00:01.000000000Z".into(),
        subject: "shop".into(),
        datacontenttype: "application/json".into(),
        data: v1::EventDataRecord {
            env: "prod".into(),
            app: "shop".into(),
            stable_version: Some("1.0".into()),
            canary_version: None,
            version: Some("1.1".into()),
            stage: Some(v1::StageRecord {
                index: 0,
                name: "10%".into(),
                weight: 10,
            }),
            state: "failing".into(),
            score: Some(1.5),
            detected_at: "2026-01-05T00:00:00.000000000Z".into(),
            reasons: vec![v1::ReasonRecord {
                feature: "error_ratio".into(),
                operation: None,
                test: "fisher_exact".into(),
                canary_value: 0.25,
                baseline_value: 0.5,
                statistic: 3.0,
                threshold: 2.0,
                message: "m".into(),
            }],
            action: Some(v1::ActionRecord {
                kind: "set_weight".into(),
                app: "shop".into(),
                version: "1.1".into(),
                weight: 0,
            }),
            dry_run: false,
        },
    }
}

fn v1_delivery(
    seq: u64,
    event_type: v1::EventTypeRecord,
    state: v1::DeliveryStateRecord,
) -> v1::DeliveryRecord {
    v1::DeliveryRecord {
        event_id: format!("evt_{seq:016x}"),
        event_type,
        state,
        attempts: 2,
        first_attempt_ms: Some(10),
        next_attempt_ms: 20,
        last_status: Some(503),
        last_error: Some("unavailable".into()),
        delivered_ms: None,
    }
}

/// The daemon's trees of a format-1 data dir: one event of every type (the last two past the
/// history, owed), a subscription of each kind wanting them all, an outbox entry, a parked one and
/// a finished one of every state, and one event that does not decode. What it wrote, as format 2
/// should read it.
struct V1Daemon {
    events: Vec<EventRecord>,
    owed: Vec<EventRecord>,
    subscriptions: Vec<SubscriptionRecord>,
    /// The deliveries of subscription `a`, newest first.
    deliveries: Vec<DeliveryRecord>,
}

fn write_v1_daemon(dir: &Path) -> V1Daemon {
    use v1::{DeliveryStateRecord as S, EventTypeRecord as T};
    let db = raw_sled(dir);
    let tree = |name: &str| db.open_tree(name).expect("tree");
    let (events, owed) = (tree(EVENTS), tree(OWED));
    let mut out = V1Daemon {
        events: Vec::new(),
        owed: Vec::new(),
        subscriptions: Vec::new(),
        deliveries: Vec::new(),
    };
    for (i, event_type) in T::ALL.into_iter().enumerate() {
        let seq = i as u64 + 1;
        let event = v1_event(seq, event_type);
        let (tree, list) = if seq > 9 {
            (&owed, &mut out.owed)
        } else {
            (&events, &mut out.events)
        };
        tree.insert(seq.to_be_bytes(), v1::encode(&event))
            .expect("insert");
        list.push(EventRecord::try_from(&event).expect("converts"));
    }
    events
        .insert(100u64.to_be_bytes(), vec![v1::FORMAT, 0xff])
        .expect("insert");
    for (id, kind) in [("a", v1::KindRecord::Webhook), ("b", v1::KindRecord::Haproxy)] {
        let subscription = v1::SubscriptionRecord {
            id: id.into(),
            url: "http://127.0.0.1:9/hook".into(),
            events: T::ALL.to_vec(),
            kind,
            secret: "whsec_x".into(),
            created_at: "2026-01-05T00:00:00Z".into(),
            disabled: None,
        };
        tree(SUBSCRIPTIONS)
            .insert(subscription_key(id), v1::encode(&subscription))
            .expect("insert");
        out.subscriptions.push(SubscriptionRecord::from(&subscription));
    }
    // Event 10 pending, 11 parked (both owed), and one finished delivery of each other state.
    let pending = v1_delivery(10, T::CanaryPaused, S::Pending);
    tree(OUTBOX)
        .insert(outbox_key("a", 10), v1::encode(&pending))
        .expect("insert");
    let parked = v1_delivery(11, T::CanaryResumed, S::Parked);
    tree(PARKED)
        .insert(outbox_key("a", 11), v1::encode(&parked))
        .expect("insert");
    out.deliveries.push(DeliveryRecord::from(&parked));
    out.deliveries.push(DeliveryRecord::from(&pending));
    for (i, state) in [S::Delivered, S::Expired, S::Gone, S::Skipped]
        .into_iter()
        .enumerate()
    {
        let seq = 9 - i as u64;
        let delivery = v1_delivery(seq, T::ALL[seq as usize - 1], state);
        let mut key = seq.to_be_bytes().to_vec();
        key.extend(b"a");
        tree(HISTORY).insert(key, v1::encode(&delivery)).expect("insert");
        out.deliveries.push(DeliveryRecord::from(&delivery));
    }
    db.flush().expect("flush");
    out
}

fn assert_reads_v1_daemon(store: &Store, v1: &V1Daemon) {
    let events = store.events(None, 100, |_| true).expect("read");
    assert_eq!(events, v1.events);
    for event in &v1.owed {
        let seq = u64::from_str_radix(&event.id[4..], 16).expect("an id");
        assert_eq!(store.event(seq).expect("read").as_ref(), Some(event));
    }
    assert_eq!(store.subscriptions().expect("read"), v1.subscriptions);
    assert_eq!(store.deliveries("a", 100).expect("read"), v1.deliveries);
    assert_eq!(
        store.next_delivery("a").expect("read").map(|(seq, _)| seq),
        Some(10)
    );
    assert_eq!(store.parked("a").expect("read").len(), 1);
    assert_eq!((store.outbox_depth(), store.parked_count()), (1, 1));
}

#[test]
fn format_1_daemon_records_are_rewritten_as_format_2_with_types_and_states_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v1 = write_v1_daemon(dir.path());
    let names: Vec<&str> = v1
        .events
        .iter()
        .chain(&v1.owed)
        .map(|e| e.event_type.as_str())
        .collect();
    assert_eq!(names, v1::EventTypeRecord::ALL.map(|t| t.name()));
    let states: Vec<&str> = v1.deliveries.iter().map(|d| d.state.as_str()).collect();
    assert_eq!(
        states,
        ["parked", "pending", "delivered", "expired", "gone", "skipped"]
    );
    let data: serde_json::Value = serde_json::from_str(&v1.events[0].data).expect("json");
    assert_eq!(data["stage"]["name"], "10%", "the data is the contract's JSON");
    assert_eq!(data["canary_version"], serde_json::Value::Null);

    let counters = StoreCounters::default();
    let store: Store = Store::open(dir.path(), 1 << 20, counters.clone()).expect("open");
    assert_reads_v1_daemon(&store, &v1);
    // The event that did not decode was counted and left where it was.
    assert_eq!(
        counters.records_skipped.get(),
        1 + 1,
        "at the migration and the read"
    );
    assert_eq!(
        store.events.get(100u64.to_be_bytes()).expect("read").as_deref(),
        Some(&[v1::FORMAT, 0xff][..])
    );
    assert_eq!(
        migrate::daemon_format(&store.db, &dir.path().join("sled")).expect("read"),
        Some(DAEMON_FORMAT)
    );
    drop(store);
    let store: Store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("reopen");
    assert_reads_v1_daemon(&store, &v1);
}

#[test]
fn a_daemon_migration_that_stopped_half_way_takes_up_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v1 = write_v1_daemon(dir.path());
    {
        // Half the events rewritten, `meta` not yet saying so.
        let db = raw_sled(dir.path());
        let events = db.open_tree(EVENTS).expect("tree");
        for record in v1.events.iter().take(4) {
            let seq = u64::from_str_radix(&record.id[4..], 16).expect("an id");
            events
                .insert(seq.to_be_bytes(), daemon::encode(record))
                .expect("insert");
        }
        db.flush().expect("flush");
    }
    let store: Store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
    assert_reads_v1_daemon(&store, &v1);
}

#[test]
fn a_daemon_record_of_a_newer_format_is_an_error_naming_both_formats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
    store
        .events
        .insert(5u64.to_be_bytes(), vec![DAEMON_FORMAT + 1, 1, 2])
        .expect("insert");
    let message = store.events(None, 10, |_| true).expect_err("newer").to_string();
    assert!(
        message.contains("events tree was written in record format 3; this build reads up to format 2"),
        "{message}"
    );
    assert!(store.event(5).is_err(), "never skipped");
    drop(store);

    // Met by a migration from format 1: the open stops.
    let dir = tempfile::tempdir().expect("tempdir");
    write_v1_daemon(dir.path());
    {
        let db = raw_sled(dir.path());
        let parked = db.open_tree(PARKED).expect("tree");
        parked
            .insert(outbox_key("a", 11), vec![DAEMON_FORMAT + 1])
            .expect("insert");
        db.flush().expect("flush");
    }
    let error = Store::<AsStored>::open(dir.path(), 1 << 20, StoreCounters::default())
        .err()
        .expect("refused");
    assert!(
        matches!(
            error,
            StoreError::NewerDaemonRecord {
                tree: PARKED,
                found: 3,
                supported: 2
            }
        ),
        "{error:?}"
    );
}

#[test]
fn a_data_dir_whose_daemon_records_are_of_a_newer_format_is_refused_naming_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path());
        let meta = store.db.open_tree("meta").expect("meta");
        meta.insert("daemon_format", &[DAEMON_FORMAT + 1])
            .expect("insert");
        store.flush().expect("flush");
    }
    let error = TestStore::open(dir.path(), 1 << 20, StoreCounters::default())
        .err()
        .expect("refused");
    let message = error.to_string();
    assert!(
        message.contains("record format 3; this build reads up to format 2"),
        "{message}"
    );
}

/// The store's rules read the records: a subscription wants an event by its type's name, a new
/// delivery is pending, and `AsStored` keeps whatever the records say.
#[test]
fn the_outbox_rules_read_the_stored_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Store = Store::open(dir.path(), 1 << 20, StoreCounters::default()).expect("open");
    let v1 = EventRecord::try_from(&v1_event(1, v1::EventTypeRecord::CanaryHeld)).expect("converts");
    let mut subscription = SubscriptionRecord::from(&v1::SubscriptionRecord {
        id: "a".into(),
        url: String::new(),
        events: vec![v1::EventTypeRecord::CanaryHeld],
        kind: v1::KindRecord::Webhook,
        secret: String::new(),
        created_at: String::new(),
        disabled: None,
    });
    store.put_subscription(&subscription).expect("subscribe");
    subscription.id = "b".into();
    subscription.events = vec!["canaryd.canary.failed".into()];
    store.put_subscription(&subscription).expect("subscribe");
    let mut events = vec![v1.clone()];
    store.append_events(&mut events, 10).expect("append");
    let (seq, delivery) = store.next_delivery("a").expect("read").expect("pending");
    assert_eq!(delivery, DeliveryRecord::pending(&events[0]));
    assert_eq!(events[0].id, v1.id, "an event with an id keeps it");
    assert_eq!(store.event_seq_of(&v1.id).expect("read"), Some(seq));
    assert_eq!(store.next_delivery("b").expect("read"), None);
}

/// The data dir's sled opened directly, as a test writes what an older build or an interrupted
/// migration left; waits for the lock as `Store::open` does, since a store just dropped may
/// still hold it for a moment.
fn raw_sled(data_dir: &Path) -> sled::Db {
    super::open_waiting(&sled::Config::new().path(data_dir.join("sled"))).expect("open")
}

/// Ten requests a second of one app's one version, one export a second from `from` for `secs`
/// seconds, as a live stream receives them.
fn steady_traffic(from: u64, secs: u64) -> Vec<canaryd_engine::Batch> {
    use canaryd_engine::{Identity, RequestObservation, ResourceObservations, SpanId, TraceId};
    const S: u64 = 1_000_000_000;
    (0..secs)
        .map(|s| {
            let mut r = ResourceObservations::new(Identity::new("prod", "shop", "1.0"));
            for i in 0..10 {
                let time = from + s * S + i * S / 10;
                r.spans += 1;
                r.saw(time);
                r.requests.push(RequestObservation {
                    operation: if i % 3 == 0 { "POST /cart" } else { "GET /item" }.into(),
                    time,
                    duration_ns: 4_000_000 + (s * 7 + i * 13) % 11 * 500_000,
                    error: (s + i) % 50 == 0,
                    trace_id: TraceId::default(),
                    span_id: SpanId::default(),
                    cohort: None,
                });
            }
            canaryd_engine::Batch {
                resources: vec![r],
                received: from + (s + 1) * S,
            }
        })
        .collect()
}

/// Every key and value of the slot store, in key order.
fn slot_records(store: &TestStore) -> Vec<(Vec<u8>, Vec<u8>)> {
    store
        .slots
        .iter()
        .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).expect("read"))
        .collect()
}

/// A baseline's record carries its current seasonal slot whole, so a flush writes no slot: one
/// reaches the slot store only as event time leaves its hour. A daemon stopped and restarted
/// mid-hour loses only what its open window held: its slots and baselines are those of one that
/// ran through without that window's data.
#[test]
fn slots_reach_the_slot_store_as_their_hour_is_left_not_at_each_flush_and_a_restart_loses_none() {
    use canaryd_engine::{Engine, EngineConfig};
    const S: u64 = 1_000_000_000;
    // 2026-01-05T00:50:00Z: ten minutes before the first hour of the week ends.
    let from = 1_767_571_200 * S + 50 * 60 * S;
    let traffic = steady_traffic(from, 20 * 60);
    let restart_at = 5 * 60 + 30;
    let engine_on = |store: &TestStore| {
        let mut engine = Engine::new(EngineConfig::default(), Box::new(store.slot_store()));
        engine.set_archive(Box::new(store.archive()));
        engine.restore(store.load().expect("load"));
        engine
    };
    let flush = |engine: &mut Engine, store: &TestStore| {
        store.write(&engine.take_changes()).expect("write");
        store.flush().expect("flush");
        engine.changes_written();
    };
    let sorted = |mut baselines: Vec<(BaselineId, Baseline)>| {
        baselines.sort_by(|a, b| a.0.cmp(&b.0));
        baselines
    };

    // Stopped and started again mid-hour, after a flush.
    let restarted_dir = tempfile::tempdir().expect("tempdir");
    let lost = {
        let store = open(restarted_dir.path());
        let mut engine = engine_on(&store);
        for batch in &traffic[..restart_at] {
            engine.ingest(batch);
        }
        flush(&mut engine, &store);
        // What its open evaluation window held (those after the last closed one) is not stored,
        // and the window it was in, seen again only in part, is not learned from.
        let window = EngineConfig::default().windows.window_ns;
        let closed = store.load().expect("load").clocks[0].2.closed_until;
        closed / window * window..(from + restart_at as u64 * S).div_ceil(window) * window
    };
    let restarted = open(restarted_dir.path());
    let mut engine = engine_on(&restarted);
    for (second, batch) in traffic.iter().enumerate().skip(restart_at) {
        engine.ingest(batch);
        if second % 10 == 9 {
            flush(&mut engine, &restarted);
        }
    }
    flush(&mut engine, &restarted);

    // Ran through, without what the restart lost.
    let through_dir = tempfile::tempdir().expect("tempdir");
    let through = open(through_dir.path());
    let mut engine = engine_on(&through);
    let mut flushes_in_first_hour = 0;
    for (second, batch) in traffic.iter().enumerate() {
        if lost.contains(&(from + second as u64 * S)) {
            continue;
        }
        engine.ingest(batch);
        if second % 10 == 9 {
            flush(&mut engine, &through);
            if second < 10 * 60 {
                flushes_in_first_hour += 1;
                assert_eq!(through.slots.len(), 0, "the flush at {second} s wrote a slot");
            }
        }
    }
    flush(&mut engine, &through);
    let baselines = sorted(through.load().expect("load").baselines);
    let with_slots = baselines.iter().filter(|(_, b)| b.slot.is_some()).count();
    assert!(
        flushes_in_first_hour >= 50 && with_slots >= 10,
        "{with_slots} baselines with a slot"
    );
    assert_eq!(
        through.slots.len(),
        with_slots,
        "each baseline left its first hour's slot, once"
    );
    assert!(
        baselines
            .iter()
            .all(|(_, b)| b.slot.as_ref().is_none_or(|(slot, _)| *slot == 1)),
        "every current slot is the second hour's"
    );
    assert!(lost.start > from && lost.end < from + 10 * 60 * S, "{lost:?}");

    assert_eq!(slot_records(&restarted), slot_records(&through));
    assert_eq!(sorted(restarted.load().expect("load").baselines), baselines);
}

/// A schema-2 data dir whose seasonal slots are in `slots.2`, keyed by series then slot: `slots`
/// of `series` (slot, value), and `stray` keys too short to hold a slot. With `half_moved`, some of
/// them are in `slots.3` already, as a move that stopped half-way leaves them.
fn write_slots_v2(dir: &Path, slots: &[(String, u16, SlotSummary)], stray: &[&[u8]], half_moved: bool) {
    drop(open(dir));
    let db = sled::open(dir.join("sled")).expect("sled");
    let old = db.open_tree(SLOTS_V2).expect("tree");
    let new = db.open_tree(SLOTS).expect("tree");
    for (i, (series, slot, summary)) in slots.iter().enumerate() {
        let record = SlotRecord::try_from(summary).expect("record");
        let mut key = series.as_bytes().to_vec();
        key.extend(slot.to_be_bytes());
        old.insert(key, encode(&record)).expect("insert");
        if half_moved && i % 2 == 0 {
            let moved = encode(&StoredSlotRecord::from(&record));
            new.insert(keys::slot(series, *slot), moved).expect("insert");
        }
    }
    for key in stray {
        // Of this schema, and not a slot.
        old.insert(*key, &[SCHEMA as u8, 0xff][..]).expect("insert");
    }
    db.flush().expect("flush");
}

fn some_slots() -> Vec<(String, u16, SlotSummary)> {
    let mut memory = canaryd_engine::baseline::MemorySlotStore::default();
    let mut out = Vec::new();
    for (i, scope) in [
        Scope::App,
        Scope::Version("1.2".into()),
        Scope::Version("1.20".into()),
    ]
    .into_iter()
    .enumerate()
    {
        for hour in [0u16, 1, 100, 167] {
            let mut baseline = Baseline::default();
            let time = 1_767_571_200_000_000_000 + u64::from(hour) * 3_600_000_000_000;
            baseline.observe(
                "s",
                i as f64 + f64::from(hour),
                time,
                &persisted_config(),
                &mut memory,
            );
            let (slot, summary) = baseline.slot.expect("a slot");
            assert_eq!(slot, hour);
            out.push((id(scope.clone()).series_name(), slot, summary));
        }
    }
    out
}

/// Slots kept by series then slot are moved to the layout by slot then series, read back alike,
/// and the old tree is dropped; a key too short to be a slot is counted and left where it was.
#[test]
fn slots_of_the_series_first_layout_are_moved_to_the_hour_first_one() {
    for half_moved in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let slots = some_slots();
        write_slots_v2(dir.path(), &slots, &[], half_moved);
        let store = open(dir.path());
        let mut slot_store = store.slot_store();
        for (series, slot, summary) in &slots {
            assert_eq!(
                slot_store.load(series, *slot).as_ref(),
                Some(summary),
                "{series:?} {slot}"
            );
        }
        assert_eq!(store.slots.len(), slots.len());
        let names: Vec<Vec<u8>> = store.db.tree_names().iter().map(|n| n.to_vec()).collect();
        assert!(
            !names.contains(&SLOTS_V2.as_bytes().to_vec()),
            "the old tree is dropped"
        );
        // The hour's slots of every series lie together.
        let hours: Vec<u16> = store
            .slots
            .iter()
            .keys()
            .map(|k| u16::from_be_bytes([k.as_ref().expect("key")[0], k.as_ref().expect("key")[1]]))
            .collect();
        assert!(hours.is_sorted(), "{hours:?}");
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let slots = some_slots();
    write_slots_v2(dir.path(), &slots, &[b"\x01", b"a corrupt slot\x00\x05"], false);
    let counters = StoreCounters::default();
    let store = TestStore::open(dir.path(), 1 << 20, counters.clone()).expect("open");
    assert_eq!(counters.records_skipped.get(), 2);
    assert_eq!(store.slots.len(), slots.len());
    let old = store.db.open_tree(SLOTS_V2).expect("tree");
    let left: Vec<Vec<u8>> = old.iter().keys().map(|k| k.expect("key").to_vec()).collect();
    assert_eq!(
        left,
        vec![b"\x01".to_vec(), b"a corrupt slot\x00\x05".to_vec()],
        "only what could not be moved is left"
    );
}

/// Forgetting a version deletes its slots of every hour and nothing else, in the hour-first layout.
#[test]
fn forgetting_a_version_deletes_its_slots_of_every_hour() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let mut slot_store = store.slot_store();
    let slots = some_slots();
    for (series, slot, summary) in &slots {
        slot_store.save(series, *slot, summary);
    }
    store
        .write(&EngineState {
            forgotten_versions: vec![("prod".into(), "shop".into(), "1.2".into())],
            ..EngineState::default()
        })
        .expect("forget");
    let forgotten = id(Scope::Version("1.2".into())).series_name();
    for (series, slot, summary) in &slots {
        let expected = (*series != forgotten).then_some(summary);
        assert_eq!(
            slot_store.load(series, *slot).as_ref(),
            expected,
            "{series:?} {slot}"
        );
    }
    assert_eq!(store.slots.len(), slots.len() - 4);
}

/// A baseline of `app`'s version `version`, feature `n`, whose level is `level`.
fn leveled(app: &str, version: &str, n: usize, level: f64) -> (BaselineId, Baseline) {
    let id = BaselineId {
        env: "prod".into(),
        app: app.into(),
        scope: Scope::Version(version.into()),
        key: FeatureKey::of(Feature::OperationShare, &format!("GET /{n}")),
    };
    let mut baseline = Baseline::default();
    baseline.ewma.mean = level;
    (id, baseline)
}

/// A flush taken from the engine before an event's write, and written in parts after it, puts
/// back none of the older state the event's write replaced (a baseline or clock it wrote, a
/// baseline of a version it forgot), and writes what the flush alone carried.
#[test]
fn a_flush_written_in_parts_after_a_newer_write_leaves_what_that_wrote() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let later_clock = AppClock {
        max_time: 99,
        closed_until: 90,
        lead: 99,
    };
    // The flush, taken first: two apps' baselines at level 1, clocks, entries.
    let mut flush = EngineState {
        clocks: vec![
            ("prod".into(), "shop".into(), clock()),
            ("prod".into(), "cart".into(), clock()),
        ],
        apps: vec![("prod".into(), "shop".into(), AppEntry::default())],
        ..EngineState::default()
    };
    for n in 0..25 {
        flush.baselines.push(leveled("cart", "1", n, 1.0));
        flush.baselines.push(leveled("shop", "1", n, 1.0));
        flush.baselines.push(leveled("shop", "2", n, 1.0));
    }
    // The event's write, taken later, about shop alone: version 2 forgotten, version 1's first
    // ten baselines newer, a later clock.
    let mut newer_state = EngineState {
        clocks: vec![("prod".into(), "shop".into(), later_clock)],
        apps: vec![("prod".into(), "shop".into(), AppEntry::default())],
        forgotten_versions: vec![("prod".into(), "shop".into(), "2".into())],
        ..EngineState::default()
    };
    for n in 0..10 {
        newer_state.baselines.push(leveled("shop", "1", n, 2.0));
    }
    let parts = in_parts(flush.clone(), 7);
    assert_eq!(
        parts.len(),
        2 + 75usize.div_ceil(7),
        "the head, the baselines by 7, the analyses"
    );
    let mut newer = Superseded::default();
    assert!(newer.is_empty());
    // The flush's head and first part are written, then the event's write, then the rest.
    store.write_superseded(&parts[0], &newer).expect("write");
    store.write_superseded(&parts[1], &newer).expect("write");
    store.write(&newer_state).expect("write");
    newer.add(&newer_state);
    assert!(!newer.is_empty());
    for part in &parts[2..] {
        store.write_superseded(part, &newer).expect("write");
    }

    let loaded = store.load().expect("load");
    let level_of = |app: &str, version: &str, n: usize| {
        let (id, _) = leveled(app, version, n, 0.0);
        loaded
            .baselines
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, b)| b.ewma.mean)
    };
    for n in 0..25 {
        assert_eq!(level_of("cart", "1", n), Some(1.0), "the flush's own, written");
        let expected = if n < 10 { 2.0 } else { 1.0 };
        assert_eq!(level_of("shop", "1", n), Some(expected), "baseline {n}");
        assert_eq!(
            level_of("shop", "2", n),
            None,
            "a forgotten version stays forgotten"
        );
    }
    let clock_of = |app: &str| {
        loaded
            .clocks
            .iter()
            .find(|(_, a, _)| a == app)
            .map(|(_, _, c)| *c)
    };
    assert_eq!(clock_of("shop"), Some(later_clock));
    assert_eq!(clock_of("cart"), Some(clock()));

    // Nothing newer: in parts, a state writes what it writes whole.
    let whole_dir = tempfile::tempdir().expect("tempdir");
    let whole = open(whole_dir.path());
    whole.write(&flush).expect("write");
    let parted_dir = tempfile::tempdir().expect("tempdir");
    let parted = open(parted_dir.path());
    for part in in_parts(flush, 4) {
        parted
            .write_superseded(&part, &Superseded::default())
            .expect("write");
    }
    assert_eq!(parted.load().expect("load"), whole.load().expect("load"));
}
