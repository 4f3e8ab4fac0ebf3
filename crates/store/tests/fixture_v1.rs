//! Opens a copy of `tests/fixtures/datadir-v1` (written by the daemon at commit 9bf3e01, store
//! format 1) and checks that every clock, app, baseline and seasonal slot it holds reads back, as
//! the engine's types, equal to what the frozen format-1 records decode from the same bytes, and
//! every event, subscription and delivery, as the store's format-2 records, equal to the frozen
//! format-1 daemon records converted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use canaryd_engine::baseline::{Baseline, SlotStore, SlotSummary};
use canaryd_engine::catalog::AppEntry;
use canaryd_engine::features::{Feature, FeatureKey};
use canaryd_engine::window::AppClock;
use canaryd_engine::{BaselineId, Engine, EngineConfig, Scope};
use canaryd_store::records::{AppRecord, BaselineRecord, ClockRecord, SlotRecord};
use canaryd_store::v1::{self, BaselineKeyRecord, ScopeRecord};
use canaryd_store::{
    DAEMON_FORMAT, DeliveryRecord, EventRecord, SCHEMA, Store, StoreCounters, SubscriptionRecord,
};

fn fixture() -> PathBuf {
    fixture_named("datadir-v1")
}

fn fixture_named(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read fixture") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// A copy of the fixture's data dir in a temporary dir (sled writes to what it opens).
fn fixture_copy() -> tempfile::TempDir {
    copy_of(&fixture())
}

fn copy_of(fixture: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&fixture.join("sled"), &dir.path().join("sled"));
    dir
}

/// What format 1 holds, decoded with the frozen records, as the engine's types.
struct V1 {
    clocks: BTreeMap<(String, String), AppClock>,
    apps: BTreeMap<(String, String), AppEntry>,
    baselines: BTreeMap<BaselineId, Baseline>,
    /// Each baseline's paged-out slots: (its id, slot) -> summary.
    slots: BTreeMap<(BaselineId, u16), SlotSummary>,
    slot_records: usize,
    events: Vec<EventRecord>,
    subscriptions: Vec<SubscriptionRecord>,
    /// Each subscription's finished and pending deliveries, in the order they were keyed.
    deliveries: BTreeMap<String, Vec<DeliveryRecord>>,
}

fn engine_id(key: &BaselineKeyRecord) -> BaselineId {
    BaselineId {
        env: key.env.clone(),
        app: key.app.clone(),
        scope: match &key.scope {
            ScopeRecord::App => Scope::App,
            ScopeRecord::Version(v) => Scope::Version(v.clone()),
        },
        key: FeatureKey::of(
            Feature::from_name(key.key.feature.name()).expect("a known feature"),
            &key.key.subject,
        ),
    }
}

fn read_v1(dir: &Path) -> V1 {
    let db = sled::open(dir.join("sled")).expect("open the copy");
    let tree = |name: &str| db.open_tree(name).expect("tree");
    let mut out = V1 {
        clocks: BTreeMap::new(),
        apps: BTreeMap::new(),
        baselines: BTreeMap::new(),
        slots: BTreeMap::new(),
        slot_records: tree("slots").len(),
        events: Vec::new(),
        subscriptions: Vec::new(),
        deliveries: BTreeMap::new(),
    };
    for entry in tree("events").iter() {
        let (_, v) = entry.expect("read");
        let event: v1::EventRecord = v1::decode(&v).expect("a format-1 event");
        out.events.push(EventRecord::try_from(&event).expect("converts"));
    }
    for entry in tree("subscriptions").iter() {
        let (_, v) = entry.expect("read");
        let subscription: v1::SubscriptionRecord = v1::decode(&v).expect("a format-1 subscription");
        out.subscriptions.push(SubscriptionRecord::from(&subscription));
    }
    for name in ["deliveries", "outbox"] {
        for entry in tree(name).iter() {
            let (k, v) = entry.expect("read");
            let delivery: v1::DeliveryRecord = v1::decode(&v).expect("a format-1 delivery");
            let id = match name {
                "deliveries" => &k[8..],
                _ => &k[..k.len() - 9],
            };
            out.deliveries
                .entry(String::from_utf8(id.to_vec()).expect("an id"))
                .or_default()
                .push(DeliveryRecord::from(&delivery));
        }
    }
    for entry in tree("clocks").iter() {
        let (k, v) = entry.expect("read");
        let key = v1::decode_app_key(&k).expect("a format-1 key");
        let record: ClockRecord = v1::decode(&v).expect("a format-1 clock");
        out.clocks.insert(key, record.into());
    }
    for entry in tree("apps").iter() {
        let (k, v) = entry.expect("read");
        let key = v1::decode_app_key(&k).expect("a format-1 key");
        let record: AppRecord = v1::decode(&v).expect("a format-1 app");
        out.apps
            .insert(key, AppEntry::try_from(&record).expect("an engine app"));
    }
    let slots = tree("slots");
    for entry in tree("baselines").iter() {
        let (k, v) = entry.expect("read");
        let key: BaselineKeyRecord = v1::decode(&k).expect("a format-1 baseline key");
        let record: v1::BaselineRecord = v1::decode(&v).expect("a format-1 baseline");
        let record = BaselineRecord::from(record);
        let id = engine_id(&key);
        for slot in 0..168 {
            if let Some(bytes) = slots.get(key.slot_key(slot)).expect("read") {
                let record: SlotRecord = v1::decode(&bytes).expect("a format-1 slot");
                let summary = SlotSummary::try_from(&record).expect("an engine slot");
                out.slots.insert((id.clone(), slot), summary);
            }
        }
        out.baselines
            .insert(id, Baseline::try_from(&record).expect("an engine baseline"));
    }
    out
}

#[test]
fn the_v1_fixture_reads_back_whole_after_migration() {
    let pristine = fixture_copy();
    let v1 = read_v1(pristine.path());
    // What the fixture's README says it holds.
    assert_eq!((v1.clocks.len(), v1.apps.len()), (1, 1));
    let versions: Vec<&Scope> = v1.baselines.keys().map(|id| &id.scope).collect();
    assert!(versions.contains(&&Scope::App));
    assert!(versions.contains(&&Scope::Version("*".into())));
    assert!(versions.contains(&&Scope::Version("2.7.1".into())));
    assert!(v1.slot_records > 0, "the fixture has paged-out seasonal slots");
    let types: Vec<&str> = v1.events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["canaryd.canary.started", "canaryd.canary.failed"]);
    assert_eq!(v1.subscriptions.len(), 1);
    let deliveries = &v1.deliveries[&v1.subscriptions[0].id];
    assert_eq!(deliveries.len(), 2);
    assert!(deliveries.iter().all(|d| d.state == "delivered"));
    // Every slot record belongs to some baseline (the app's and version *'s are one record).
    let star_shared = v1
        .slots
        .keys()
        .filter(|(id, _)| id.scope == Scope::Version("*".into()))
        .count();
    assert_eq!(v1.slots.len() - star_shared, v1.slot_records);
    eprintln!(
        "fixture: {} clocks, {} apps, {} baselines ({} app-scope), {} slot records, {} events, {} subscriptions, {} deliveries",
        v1.clocks.len(),
        v1.apps.len(),
        v1.baselines.len(),
        v1.baselines.keys().filter(|id| id.scope == Scope::App).count(),
        v1.slot_records,
        v1.events.len(),
        v1.subscriptions.len(),
        v1.deliveries.values().map(Vec::len).sum::<usize>()
    );

    let copy = fixture_copy();
    let store: Store = Store::open(copy.path(), 1 << 20, StoreCounters::default()).expect("open");
    let state = store.load().expect("load");
    let clocks: BTreeMap<_, _> = state
        .clocks
        .iter()
        .map(|(e, a, c)| ((e.clone(), a.clone()), *c))
        .collect();
    assert_eq!(clocks, v1.clocks);
    let apps: BTreeMap<_, _> = state
        .apps
        .iter()
        .map(|(e, a, entry)| ((e.clone(), a.clone()), entry.clone()))
        .collect();
    assert_eq!(apps, v1.apps);
    let baselines: BTreeMap<_, _> = state.baselines.iter().cloned().collect();
    assert_eq!(baselines.len(), v1.baselines.len());
    assert_eq!(baselines, v1.baselines);
    let mut slots = store.slot_store();
    for ((id, slot), summary) in &v1.slots {
        assert_eq!(
            slots.load(&id.series_name(), *slot).as_ref(),
            Some(summary),
            "{id:?} slot {slot}"
        );
    }
    assert_eq!(store.slot_count(), v1.slots.len());
    assert_eq!(store.event_count(), v1.events.len());
    assert_eq!(store.events(None, 100, |_| true).expect("events"), v1.events);
    assert_eq!(store.subscriptions().expect("subscriptions"), v1.subscriptions);
    for (id, deliveries) in &v1.deliveries {
        let mut newest_first = deliveries.clone();
        newest_first.reverse();
        assert_eq!(&store.deliveries(id, 100).expect("deliveries"), &newest_first);
    }
    drop((slots, store));

    // Reopened, it is schema 2 and needs no migration; the engine restores from it.
    let store: Store = Store::open(copy.path(), 1 << 20, StoreCounters::default()).expect("reopen");
    let mut engine = Engine::new(EngineConfig::default(), Box::new(store.slot_store()));
    engine.restore(store.load().expect("load"));
    let view = engine
        .baselines("prod", "shop", None)
        .expect("the app's baselines");
    assert_eq!(
        view.baselines.len(),
        v1.baselines.keys().filter(|id| id.scope == Scope::App).count()
    );
    assert!(engine.baselines("prod", "shop", Some("*")).is_some());
    assert_eq!(store.events(None, 100, |_| true).expect("events"), v1.events);
    assert_eq!((SCHEMA, DAEMON_FORMAT), (2, 2));
}

/// Every daemon record of a format-1 data dir, decoded with the frozen records and converted to
/// format 2's, by tree and key.
#[derive(Default)]
struct V1Daemon {
    events: BTreeMap<u64, EventRecord>,
    owed: BTreeMap<u64, EventRecord>,
    subscriptions: Vec<SubscriptionRecord>,
    /// Outbox and parked entries: (subscription, sequence number) -> delivery.
    outbox: BTreeMap<(String, u64), DeliveryRecord>,
    parked: BTreeMap<(String, u64), DeliveryRecord>,
    history: BTreeMap<(String, u64), DeliveryRecord>,
    event_types: Vec<v1::EventTypeRecord>,
    states: Vec<v1::DeliveryStateRecord>,
    kinds: Vec<v1::KindRecord>,
}

fn read_v1_daemon(dir: &Path) -> V1Daemon {
    let db = sled::open(dir.join("sled")).expect("open the copy");
    let tree = |name: &str| db.open_tree(name).expect("tree");
    let seq = |key: &[u8]| u64::from_be_bytes(key[key.len() - 8..].try_into().expect("8 bytes"));
    let mut out = V1Daemon::default();
    for (name, events) in [("events", &mut out.events), ("owed", &mut out.owed)] {
        for entry in tree(name).iter() {
            let (k, v) = entry.expect("read");
            let event: v1::EventRecord = v1::decode(&v).expect("a format-1 event");
            out.event_types.push(event.event_type);
            events.insert(seq(&k), EventRecord::try_from(&event).expect("converts"));
        }
    }
    for entry in tree("subscriptions").iter() {
        let (_, v) = entry.expect("read");
        let subscription: v1::SubscriptionRecord = v1::decode(&v).expect("a format-1 subscription");
        out.kinds.push(subscription.kind);
        out.subscriptions.push(SubscriptionRecord::from(&subscription));
    }
    for (name, deliveries) in [("outbox", &mut out.outbox), ("parked", &mut out.parked)] {
        for entry in tree(name).iter() {
            let (k, v) = entry.expect("read");
            let delivery: v1::DeliveryRecord = v1::decode(&v).expect("a format-1 delivery");
            out.states.push(delivery.state);
            let id = String::from_utf8(k[..k.len() - 9].to_vec()).expect("an id");
            deliveries.insert((id, seq(&k)), DeliveryRecord::from(&delivery));
        }
    }
    for entry in tree("deliveries").iter() {
        let (k, v) = entry.expect("read");
        let delivery: v1::DeliveryRecord = v1::decode(&v).expect("a format-1 delivery");
        out.states.push(delivery.state);
        let id = String::from_utf8(k[8..].to_vec()).expect("an id");
        let seq = u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
        out.history.insert((id, seq), DeliveryRecord::from(&delivery));
    }
    out
}

/// `tests/fixtures/datadir-00945d3`: daemon records of format 1 as the last build that wrote them
/// left them (appended event types, parked deliveries, owed events, a pending outbox, an haproxy
/// subscription), each read back by the store after its migration to format 2.
#[test]
fn the_00945d3_fixture_reads_back_every_daemon_record() {
    use v1::{DeliveryStateRecord as S, EventTypeRecord as T};
    let fixture = fixture_named("datadir-00945d3");
    let v1 = read_v1_daemon(copy_of(&fixture).path());
    // What the fixture's README says it holds.
    assert_eq!((v1.events.len(), v1.owed.len()), (4, 3));
    for t in [T::CanaryEnded, T::CanaryPaused, T::CanaryResumed] {
        assert!(v1.event_types.contains(&t), "{t:?}");
    }
    for state in [S::Parked, S::Pending, S::Skipped, S::Delivered] {
        assert!(v1.states.contains(&state), "{state:?}");
    }
    assert!(v1.kinds.contains(&v1::KindRecord::Haproxy));
    assert!(!v1.outbox.is_empty() && v1.parked.len() == 3);

    let copy = copy_of(&fixture);
    let counters = StoreCounters::default();
    let store: Store = Store::open(copy.path(), 1 << 20, counters.clone()).expect("open");
    let events: Vec<EventRecord> = v1.events.values().cloned().collect();
    assert_eq!(store.events(None, 100, |_| true).expect("events"), events);
    for (seq, event) in v1.events.iter().chain(&v1.owed) {
        assert_eq!(
            store.event(*seq).expect("event").as_ref(),
            Some(event),
            "event {seq}"
        );
    }
    assert_eq!(store.owed_count(), v1.owed.len());
    let mut subscriptions = store.subscriptions().expect("subscriptions");
    let mut expected = v1.subscriptions.clone();
    subscriptions.sort_by(|a, b| a.id.cmp(&b.id));
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(subscriptions, expected);
    assert_eq!(
        (store.outbox_depth(), store.parked_count()),
        (v1.outbox.len(), v1.parked.len())
    );
    for subscription in &v1.subscriptions {
        let id = &subscription.id;
        let mine = |tree: &BTreeMap<(String, u64), DeliveryRecord>| -> Vec<(u64, DeliveryRecord)> {
            tree.iter()
                .filter(|((sub, _), _)| sub == id)
                .map(|((_, seq), d)| (*seq, d.clone()))
                .collect()
        };
        assert_eq!(store.parked(id).expect("parked"), mine(&v1.parked), "{id}");
        assert_eq!(
            store.next_delivery(id).expect("outbox"),
            mine(&v1.outbox).into_iter().next(),
            "{id}"
        );
        let mut all: Vec<(u64, DeliveryRecord)> = mine(&v1.outbox);
        all.extend(mine(&v1.parked));
        all.extend(mine(&v1.history));
        all.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        let all: Vec<DeliveryRecord> = all.into_iter().map(|(_, d)| d).collect();
        assert_eq!(store.deliveries(id, 100).expect("deliveries"), all, "{id}");
        for (seq, delivery) in mine(&v1.outbox).into_iter().chain(mine(&v1.parked)) {
            assert_eq!(store.find_delivery(id, seq).expect("find"), Some(delivery));
        }
    }
    assert_eq!(counters.records_skipped.get(), 0, "nothing skipped");
    // The engine's state needed no migration and still loads.
    let state = store.load().expect("load");
    assert_eq!(state.clocks.len(), 1);
}
