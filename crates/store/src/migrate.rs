//! Brings a data dir to the current schema when the store opens it.
//!
//! The schema is a u32 (big endian) under `schema` in the `meta` tree. None there means format 1
//! (the daemon's format before schemas), or a new data dir: both go through `from_v1`, which finds
//! nothing to do in a new one. A newer schema stops the open (`StoreError::NewerSchema`).
//!
//! Schema 2 writes its engine records to trees of its own (`clocks.2`, ...), so a migration that
//! stops half-way leaves format 1's trees as they were: the next open clears what it had written
//! and starts again. Only once everything is written and flushed does `meta` say 2; then the
//! migrated format-1 records are removed. A format-1 record that cannot be migrated (it does not
//! decode, or names a feature this build does not know, or is a seasonal slot of no baseline) is
//! counted, logged and left where it was, in its format-1 tree: nothing is dropped unseen.
//!
//! The daemon's records have a format of their own (`daemon::FORMAT`), a u8 under
//! `daemon_format` in `meta`; none there means format 1, or a new data dir (`daemon_to_current`).
//! Format 1's records are rewritten as format 2's in place, one by one (each value says its
//! format, and the keys stay), so a migration that stops half-way leaves each record whole in one
//! format or the other, and the next open takes up the rest. Only then does `meta` say 2. A
//! format-1 record that does not decode is counted, logged and left as it is (reads skip it); a
//! record of a newer format, or a newer format in `meta`, stops the open
//! (`StoreError::NewerDaemonFormat`, `StoreError::NewerDaemonRecord`).

use std::collections::HashSet;
use std::path::Path;

use canaryd_engine::features::{Feature, FeatureKey};
use canaryd_engine::{BaselineId, Scope};

use crate::analysis::{AnalysisRecord, AnalysisRecordV2, SequentialRecord, SequentialRecordV1};
use crate::records::{AppRecord, BaselineRecord, ClockRecord, SlotRecord, StoredSlotRecord};
use crate::v1::{self, BaselineKeyRecord, ScopeRecord};
use crate::{
    ANALYSES, ANALYSES_V2, APPS, BASELINES, BASELINES_V2, CLOCKS, DELIVERY_TREES, Decoded, EVENT_TREES,
    SCHEMA, SEQUENTIAL, SEQUENTIAL_V1, SLOTS, SLOTS_V2, SUBSCRIPTIONS, StoreCounters, StoreError, daemon,
    decode, encode, keys,
};

const SCHEMA_KEY: &[u8] = b"schema";

/// Moves `baselines.2`'s records to `baselines.3` (`records::BaselineRecord`), each converted from
/// its frozen layout (`move_tree`): they start their range and recent peak anew.
pub(crate) fn baselines_to_current(db: &sled::Db, counters: &StoreCounters) -> Result<(), StoreError> {
    move_tree::<v1::BaselineRecord, BaselineRecord>(db, counters, BASELINES_V2, BASELINES)
}

/// Moves `analyses.2`'s records to `analyses.3` (`analysis`), each converted from its frozen
/// layout (`move_tree`).
pub(crate) fn analyses_to_current(db: &sled::Db, counters: &StoreCounters) -> Result<(), StoreError> {
    move_tree::<AnalysisRecordV2, AnalysisRecord>(db, counters, ANALYSES_V2, ANALYSES)
}

/// Moves `sequential.1`'s evidence to `sequential.2` (`analysis::SequentialRecord`), each
/// converted from its frozen layout (`move_tree`).
pub(crate) fn sequential_to_current(db: &sled::Db, counters: &StoreCounters) -> Result<(), StoreError> {
    move_tree::<SequentialRecordV1, SequentialRecord>(db, counters, SEQUENTIAL_V1, SEQUENTIAL)
}

/// Moves `slots.2`'s seasonal slots to `slots.3`, whose keys put the slot before the series
/// (`keys::slot`) and whose records hold their weights compact (`records::StoredSlotRecord`)
/// (`move_tree_keyed`); a key too short to hold a slot is left in `slots.2` too.
pub(crate) fn slots_to_current(db: &sled::Db, counters: &StoreCounters) -> Result<(), StoreError> {
    move_tree_keyed::<SlotRecord, StoredSlotRecord>(db, counters, SLOTS_V2, SLOTS, keys::slot_of_v2)
}

/// Records a move writes, or removes, at once: a week of seasonal slots of many series is
/// millions of records, too many for one batch.
const MOVED_AT_ONCE: usize = 10_000;

/// Moves the records of tree `from` (layout `Old`) to tree `to` (layout `New`), under the same
/// keys (`move_tree_keyed`).
fn move_tree<Old, New>(
    db: &sled::Db,
    counters: &StoreCounters,
    from: &'static str,
    to: &'static str,
) -> Result<(), StoreError>
where
    Old: serde::de::DeserializeOwned,
    New: serde::Serialize + From<Old>,
{
    move_tree_keyed::<Old, New>(db, counters, from, to, |key| Some(key.to_vec()))
}

/// Moves the records of tree `from` (layout `Old`) to tree `to` (layout `New`), each under the
/// key `key` gives it: all written and flushed before any old one is removed, so a move that
/// stops half-way is made again whole at the next open (the old tree still holds every record).
/// A record that does not decode, or whose key `key` refuses, is counted, logged and left in
/// `from`; one of a newer schema stops the open. `from` is dropped once empty.
fn move_tree_keyed<Old, New>(
    db: &sled::Db,
    counters: &StoreCounters,
    from: &'static str,
    to: &'static str,
    key: impl Fn(&[u8]) -> Option<Vec<u8>>,
) -> Result<(), StoreError>
where
    Old: serde::de::DeserializeOwned,
    New: serde::Serialize + From<Old>,
{
    let io = io("move a tree to its current layout");
    if !db.tree_names().iter().any(|n| n.as_ref() == from.as_bytes()) {
        return Ok(());
    }
    // Where a record goes, if it moves.
    let moving = |old_key: &[u8], bytes: &[u8]| -> Result<Result<(Vec<u8>, Old), &'static str>, StoreError> {
        let Some(new_key) = key(old_key) else {
            return Ok(Err("its key is not one of this tree's"));
        };
        match decode::<Old>(bytes) {
            Decoded::Record(record) => Ok(Ok((new_key, record))),
            Decoded::Newer(found) => Err(StoreError::NewerRecord {
                tree: from,
                found,
                supported: SCHEMA,
            }),
            Decoded::Corrupt => Ok(Err("does not decode")),
        }
    };
    let old = db.open_tree(from).map_err(&io)?;
    let new = db.open_tree(to).map_err(&io)?;
    let (mut batch, mut pending, mut left) = (sled::Batch::default(), 0, 0u64);
    for item in old.iter() {
        let (old_key, bytes) = item.map_err(&io)?;
        match moving(&old_key, &bytes)? {
            Ok((new_key, record)) => {
                batch.insert(new_key, encode(&New::from(record)));
                pending += 1;
            }
            Err(why) => {
                not_migrated(counters, from, &old_key, why);
                left += 1;
            }
        }
        if pending == MOVED_AT_ONCE {
            new.apply_batch(std::mem::take(&mut batch)).map_err(&io)?;
            pending = 0;
        }
    }
    new.apply_batch(batch).map_err(&io)?;
    db.flush().map_err(&io)?;
    if left == 0 {
        db.drop_tree(from).map_err(&io)?;
    } else {
        let (mut batch, mut pending) = (sled::Batch::default(), 0);
        for item in old.iter() {
            let (old_key, bytes) = item.map_err(&io)?;
            if moving(&old_key, &bytes)?.is_ok() {
                batch.remove(old_key);
                pending += 1;
            }
            if pending == MOVED_AT_ONCE {
                old.apply_batch(std::mem::take(&mut batch)).map_err(&io)?;
                pending = 0;
            }
        }
        old.apply_batch(batch).map_err(&io)?;
        tracing::warn!(
            tree = from,
            records = left,
            "records that could not be migrated were left in their old tree"
        );
    }
    db.flush().map_err(io)?;
    Ok(())
}

const DAEMON_FORMAT_KEY: &[u8] = b"daemon_format";

fn io(operation: &'static str) -> impl Fn(sled::Error) -> StoreError {
    move |source| StoreError::Io { operation, source }
}

/// The schema the data dir was written by, if it says.
pub(crate) fn schema(db: &sled::Db, path: &Path) -> Result<Option<u32>, StoreError> {
    let meta = db.open_tree("meta").map_err(io("read the schema"))?;
    match meta.get(SCHEMA_KEY).map_err(io("read the schema"))? {
        None => Ok(None),
        Some(bytes) => match <[u8; 4]>::try_from(bytes.as_ref()) {
            Ok(be) => Ok(Some(u32::from_be_bytes(be))),
            Err(_) => Err(StoreError::Meta {
                path: path.to_owned(),
                bytes: bytes.to_vec(),
            }),
        },
    }
}

pub(crate) fn to_current(db: &sled::Db, path: &Path, counters: &StoreCounters) -> Result<(), StoreError> {
    match schema(db, path)? {
        Some(SCHEMA) => Ok(()),
        Some(found) if found > SCHEMA => Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found,
            supported: SCHEMA,
        }),
        None | Some(1) => {
            let migrated = from_v1(db, counters)?;
            let meta = db.open_tree("meta").map_err(io("write the schema"))?;
            meta.insert(SCHEMA_KEY, &SCHEMA.to_be_bytes())
                .map_err(io("write the schema"))?;
            db.flush().map_err(io("migrate"))?;
            migrated.remove_from(db)
        }
        Some(found) => Err(StoreError::Meta {
            path: path.to_owned(),
            bytes: found.to_be_bytes().to_vec(),
        }),
    }
}

/// The format-1 records a migration carried over, by tree: removed once the new schema is durable.
#[derive(Default)]
struct Migrated {
    trees: Vec<(&'static str, Vec<sled::IVec>)>,
}

impl Migrated {
    fn remove_from(self, db: &sled::Db) -> Result<(), StoreError> {
        let io = io("remove migrated records");
        for (name, keys) in self.trees {
            let tree = db.open_tree(name).map_err(&io)?;
            let mut batch = sled::Batch::default();
            for key in keys {
                batch.remove(key);
            }
            tree.apply_batch(batch).map_err(&io)?;
            let left = tree.len();
            if left == 0 {
                db.drop_tree(name).map_err(&io)?;
            } else {
                tracing::warn!(
                    tree = name,
                    records = left,
                    "records that could not be migrated were left in their old tree"
                );
            }
        }
        db.flush().map_err(io)?;
        Ok(())
    }
}

fn not_migrated(counters: &StoreCounters, tree: &str, key: &[u8], why: &str) {
    tracing::warn!(tree, key = ?key, why, "a record of an older layout was not migrated");
    counters.records_skipped.inc();
}

/// A format-1 baseline key as the engine's id: `None` for a feature this build does not know.
fn baseline_id(key: &BaselineKeyRecord) -> Option<BaselineId> {
    Some(BaselineId {
        env: key.env.clone(),
        app: key.app.clone(),
        scope: match &key.scope {
            ScopeRecord::App => Scope::App,
            ScopeRecord::Version(v) => Scope::Version(v.clone()),
        },
        key: FeatureKey::of(Feature::from_name(key.key.feature.name())?, &key.key.subject),
    })
}

/// Writes schema 2's engine trees from format 1's.
fn from_v1(db: &sled::Db, counters: &StoreCounters) -> Result<Migrated, StoreError> {
    let io = io("migrate from format 1");
    let existing: HashSet<Vec<u8>> = db.tree_names().into_iter().map(|n| n.to_vec()).collect();
    let old = |name: &str| -> Result<Option<sled::Tree>, StoreError> {
        if existing.contains(name.as_bytes()) {
            db.open_tree(name).map(Some).map_err(&io)
        } else {
            Ok(None)
        }
    };
    let new = |name: &str| -> Result<sled::Tree, StoreError> {
        let tree = db.open_tree(name).map_err(&io)?;
        // Left by a migration that stopped half-way.
        tree.clear().map_err(&io)?;
        Ok(tree)
    };
    let (clocks, apps, baselines, slots) = (new(CLOCKS)?, new(APPS)?, new(BASELINES)?, new(SLOTS)?);
    // Where a build before `baselines.3` wrote its baselines when it stopped half-way here: they
    // are written again, from format 1, into `baselines.3`.
    if existing.contains(BASELINES_V2.as_bytes()) {
        db.drop_tree(BASELINES_V2).map_err(&io)?;
    }
    let mut migrated = Migrated::default();

    for (name, to) in [("clocks", &clocks), ("apps", &apps)] {
        let Some(from) = old(name)? else { continue };
        let mut batch = sled::Batch::default();
        let mut done = Vec::new();
        for entry in from.iter() {
            let (key, value) = entry.map_err(&io)?;
            let Some((env, app)) = v1::decode_app_key(&key) else {
                not_migrated(counters, name, &key, "its key does not decode");
                continue;
            };
            let record = if name == "clocks" {
                v1::decode::<ClockRecord>(&value).map(|r| encode(&r))
            } else {
                v1::decode::<AppRecord>(&value).map(|r| encode(&r))
            };
            match record {
                Some(record) => {
                    batch.insert(keys::app(&env, &app), record);
                    done.push(key);
                }
                None => not_migrated(counters, name, &key, "its value does not decode"),
            }
        }
        to.apply_batch(batch).map_err(&io)?;
        migrated.trees.push((name, done));
    }

    let old_slots = old("slots")?;
    let mut slots_done = Vec::new();
    if let Some(from) = old("baselines")? {
        let mut batch = sled::Batch::default();
        let mut slot_batch = sled::Batch::default();
        let mut done = Vec::new();
        for entry in from.iter() {
            let (key, value) = entry.map_err(&io)?;
            let Some(old_key) = v1::decode::<BaselineKeyRecord>(&key) else {
                not_migrated(counters, "baselines", &key, "its key does not decode");
                continue;
            };
            let Some(id) = baseline_id(&old_key) else {
                not_migrated(
                    counters,
                    "baselines",
                    &key,
                    "its feature is unknown to this build",
                );
                continue;
            };
            let Some(record) = v1::decode::<v1::BaselineRecord>(&value) else {
                not_migrated(counters, "baselines", &key, "its value does not decode");
                continue;
            };
            batch.insert(keys::baseline(&id), encode(&BaselineRecord::from(record)));
            done.push(key);
            // Its seasonal slots. The app's and a version `*`'s were the same records in format
            // 1: both get a copy.
            let Some(from_slots) = &old_slots else { continue };
            let mut prefix = old_key.series_name().into_bytes();
            prefix.push(0);
            let series = id.series_name();
            for entry in from_slots.scan_prefix(&prefix) {
                let (slot_key, value) = entry.map_err(&io)?;
                let slot = <[u8; 2]>::try_from(&slot_key[prefix.len()..]).map(u16::from_be_bytes);
                match (slot, v1::decode::<SlotRecord>(&value)) {
                    (Ok(slot), Some(record)) => {
                        slot_batch.insert(
                            keys::slot(&series, slot),
                            encode(&StoredSlotRecord::from(&record)),
                        );
                        slots_done.push(slot_key);
                    }
                    // Another series whose name continues this one's after a zero byte.
                    (Err(_), _) => {}
                    (Ok(_), None) => not_migrated(counters, "slots", &slot_key, "its value does not decode"),
                }
            }
        }
        baselines.apply_batch(batch).map_err(&io)?;
        slots.apply_batch(slot_batch).map_err(&io)?;
        migrated.trees.push(("baselines", done));
    }
    if old_slots.is_some() {
        slots_done.sort();
        slots_done.dedup();
        migrated.trees.push(("slots", slots_done));
    }
    db.flush().map_err(&io)?;
    Ok(migrated)
}

/// The format of the daemon's records the data dir says it holds, if it says.
pub(crate) fn daemon_format(db: &sled::Db, path: &Path) -> Result<Option<u8>, StoreError> {
    let meta = db
        .open_tree("meta")
        .map_err(io("read the daemon's record format"))?;
    match meta
        .get(DAEMON_FORMAT_KEY)
        .map_err(io("read the daemon's record format"))?
    {
        None => Ok(None),
        Some(bytes) => match bytes.as_ref() {
            &[format] => Ok(Some(format)),
            _ => Err(StoreError::Meta {
                path: path.to_owned(),
                bytes: bytes.to_vec(),
            }),
        },
    }
}

pub(crate) fn daemon_to_current(
    db: &sled::Db,
    path: &Path,
    counters: &StoreCounters,
) -> Result<(), StoreError> {
    match daemon_format(db, path)? {
        Some(daemon::FORMAT) => Ok(()),
        Some(found) if found > daemon::FORMAT => Err(StoreError::NewerDaemonFormat {
            path: path.to_owned(),
            found,
            supported: daemon::FORMAT,
        }),
        None | Some(v1::FORMAT) => {
            daemon_from_v1(db, counters)?;
            let meta = db
                .open_tree("meta")
                .map_err(io("write the daemon's record format"))?;
            meta.insert(DAEMON_FORMAT_KEY, &[daemon::FORMAT])
                .map_err(io("write the daemon's record format"))?;
            db.flush().map_err(io("migrate the daemon's records"))?;
            Ok(())
        }
        Some(found) => Err(StoreError::Meta {
            path: path.to_owned(),
            bytes: vec![found],
        }),
    }
}

/// What one format-1 daemon record becomes in format 2, if it decodes.
type Rewrite = fn(&[u8]) -> Option<Result<Vec<u8>, StoreError>>;

fn event_v1(bytes: &[u8]) -> Option<Result<Vec<u8>, StoreError>> {
    let old: v1::EventRecord = v1::decode(bytes)?;
    Some(
        daemon::EventRecord::try_from(&old)
            .map(|record| daemon::encode(&record))
            .map_err(StoreError::from),
    )
}

fn subscription_v1(bytes: &[u8]) -> Option<Result<Vec<u8>, StoreError>> {
    let old: v1::SubscriptionRecord = v1::decode(bytes)?;
    Some(Ok(daemon::encode(&daemon::SubscriptionRecord::from(&old))))
}

fn delivery_v1(bytes: &[u8]) -> Option<Result<Vec<u8>, StoreError>> {
    let old: v1::DeliveryRecord = v1::decode(bytes)?;
    Some(Ok(daemon::encode(&daemon::DeliveryRecord::from(&old))))
}

/// Rewrites every format-1 record of the daemon's trees as format 2, in place.
fn daemon_from_v1(db: &sled::Db, counters: &StoreCounters) -> Result<(), StoreError> {
    let io = io("migrate the daemon's records from format 1");
    let existing: HashSet<Vec<u8>> = db.tree_names().into_iter().map(|n| n.to_vec()).collect();
    let trees = EVENT_TREES
        .iter()
        .map(|&name| (name, event_v1 as Rewrite))
        .chain([(SUBSCRIPTIONS, subscription_v1 as Rewrite)])
        .chain(DELIVERY_TREES.iter().map(|&name| (name, delivery_v1 as Rewrite)));
    for (name, rewrite) in trees {
        if !existing.contains(name.as_bytes()) {
            continue;
        }
        let tree = db.open_tree(name).map_err(&io)?;
        let mut batch = sled::Batch::default();
        for entry in tree.iter() {
            let (key, value) = entry.map_err(&io)?;
            match value.first() {
                // Migrated by an open that stopped before `meta` said so.
                Some(&daemon::FORMAT) => {}
                Some(&found) if found > daemon::FORMAT => {
                    return Err(StoreError::NewerDaemonRecord {
                        tree: name,
                        found,
                        supported: daemon::FORMAT,
                    });
                }
                _ => match rewrite(&value) {
                    Some(record) => {
                        batch.insert(key, record?);
                    }
                    None => not_migrated(counters, name, &key, "its value does not decode"),
                },
            }
        }
        tree.apply_batch(batch).map_err(&io)?;
    }
    db.flush().map_err(&io)?;
    Ok(())
}
