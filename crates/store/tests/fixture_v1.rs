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
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/datadir-v1")
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
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&fixture().join("sled"), &dir.path().join("sled"));
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
        out.events.push(event.to_current().expect("converts"));
    }
    for entry in tree("subscriptions").iter() {
        let (_, v) = entry.expect("read");
        let subscription: v1::SubscriptionRecord = v1::decode(&v).expect("a format-1 subscription");
        out.subscriptions.push(subscription.to_current());
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
                .push(delivery.to_current());
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
        let record: BaselineRecord = v1::decode(&v).expect("a format-1 baseline");
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
