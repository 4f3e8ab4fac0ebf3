//! What an hour's turn costs the seasonal slots in sled: as event time leaves an hour, each
//! series saves the slot it leaves and reads the one it enters (`Baseline::observe_counted`), on
//! the engine's thread.
//!
//! For each cache size (`SLOTS_CACHE_MB`, "8,64" by default) and each layout of the slot keys
//! (`SLOTS_LAYOUTS`: `store`, the store's own `SledSlots`; `series-first` and `hour-first`, a bare
//! sled tree keyed by series then hour or by hour then series, holding the same stored records),
//! a fresh store is filled with `SLOTS_SERIES` series (100,000, `SERIES_PER_SCOPE` to an app's
//! version) each holding `SLOTS_HOURS` hours of slots (24), written hour by hour as the daemon
//! writes them, and then two hours' turns are timed over every series, each saving the current
//! slot and reading the one a week earlier:
//! - one by one, every series in a shuffled order (the engine visits apps in no order of their
//!   keys), a seek each;
//! - by scope (`store` only), the scopes in a shuffled order: the scope's slots of the hour
//!   entered read in one pass (`SlotStore::load_scope`) and those left saved in one batch
//!   (`SlotStore::save_all`), as the engine's `ScopeSlots` does;
//! - read ahead (`store` only): the hour's slots of every scope read in one pass
//!   (`SledSlots::load_hour`, on the daemon's store writer thread before the turn), then each
//!   scope's taken from what was read (all the engine's thread does to read them) and its left
//!   slots saved in one batch.
//!
//! `cargo bench -p canaryd-store --bench slots`; `cargo test --benches` runs a small size once.

use std::time::Instant;

use canaryd_engine::baseline::{SlotStore, SlotSummary};
use canaryd_engine::features::{Feature, FeatureKey};
use canaryd_engine::sketch::Sketch;
use canaryd_engine::{BaselineId, Scope};
use canaryd_store::records::StoredSlotRecord;
use canaryd_store::{Store, StoreCounters};

/// Values a slot's current week holds: an hour of one-minute windows.
const VALUES_PER_WEEK: usize = 60;
/// Weeks decayed into a slot's past.
const PAST_WEEKS: u32 = 3;
/// Baselines of one scope (an app's version): a few features of each of eight operations.
const SERIES_PER_SCOPE: usize = 40;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// A slot as a series some weeks old holds it: earlier weeks decayed (real weights) and this
/// week's values (whole counts), spread about ±15% around a level of the series' own.
fn slot_of(series: usize) -> SlotSummary {
    let level = 20.0 + (series % 97) as f64;
    let value = |i: usize| {
        let u = ((series * 7919 + i * 15_485_863) % 1000) as f64 / 1000.0;
        level * (0.85 + 0.3 * u)
    };
    let mut past = Sketch::new(0.02);
    for week in 0..PAST_WEEKS as usize {
        for i in 0..VALUES_PER_WEEK {
            past.add_weighted(value(i + week * VALUES_PER_WEEK), 0.5f64.powi(week as i32 + 1));
        }
    }
    let mut current = Sketch::new(0.02);
    for i in 0..VALUES_PER_WEEK {
        current.add(value(i + 1000));
    }
    SlotSummary {
        past,
        current,
        week: 10,
        past_weeks: PAST_WEEKS,
    }
}

/// The engine's name of series `series`: scope `series / SERIES_PER_SCOPE`, a feature of an
/// operation of its own.
fn series_name(series: usize) -> String {
    let features = [
        Feature::OperationShare,
        Feature::OperationErrorRatio,
        Feature::OperationLatencyP95,
    ];
    let feature = features[series % features.len()];
    BaselineId {
        env: "prod".into(),
        app: format!("shop-{}", series / SERIES_PER_SCOPE),
        scope: Scope::Version("1.4.2".into()),
        key: FeatureKey::of(
            feature,
            &format!("GET /api/v1/resource{}/{{id}}", series % SERIES_PER_SCOPE),
        ),
    }
    .series_name()
}

/// The prefix of scope `scope`'s series names.
fn scope_prefix(scope: usize) -> String {
    BaselineId::series_prefix("prod", &format!("shop-{scope}"), &Scope::Version("1.4.2".into()))
}

/// A fixed shuffle of `0..n` (the engine visits series in its maps' order, not in key order).
fn shuffled(n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..n).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        order.swap(i, (state % (i as u64 + 1)) as usize);
    }
    order
}

/// An hour's turn of every series, scope by scope in a shuffled order, as the engine's
/// `ScopeSlots` takes it: each scope's entered slots got from `enter` (given the store and the
/// scope's prefix), and its left slots saved as hour `leaving` in one batch. Returns the time
/// entering took, the time saving took, and how many series found the slot they entered.
fn turn_by_scope(
    slot_store: &mut canaryd_store::SledSlots,
    names: &[String],
    summaries: &[SlotSummary],
    leaving: u16,
    mut enter: impl FnMut(&mut canaryd_store::SledSlots, &str) -> Vec<(String, SlotSummary)>,
) -> (std::time::Duration, std::time::Duration, usize) {
    let series = names.len();
    let (mut entering, mut saving) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    let mut found = 0usize;
    for scope in shuffled(series.div_ceil(SERIES_PER_SCOPE)) {
        let started = Instant::now();
        let mut entered: std::collections::HashMap<String, SlotSummary> =
            enter(slot_store, &scope_prefix(scope)).into_iter().collect();
        entering += started.elapsed();
        let members = scope * SERIES_PER_SCOPE..((scope + 1) * SERIES_PER_SCOPE).min(series);
        let mut left = Vec::with_capacity(members.len());
        for s in members {
            left.push((names[s].clone(), leaving, summaries[s].clone()));
            found += usize::from(entered.remove(&names[s]).is_some());
        }
        let started = Instant::now();
        slot_store.save_all(left);
        saving += started.elapsed();
    }
    (entering, saving, found)
}

/// Where the slots go: the store's own, or a bare tree with one of two key layouts.
// One exists at a time: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Slots {
    Store(Store, canaryd_store::SledSlots),
    Bare {
        db: sled::Db,
        tree: sled::Tree,
        hour_first: bool,
    },
}

impl Slots {
    fn open(layout: &str, dir: &std::path::Path, cache_bytes: u64) -> anyhow::Result<Slots> {
        Ok(match layout {
            "store" => {
                let store: Store = Store::open(dir, cache_bytes, StoreCounters::default())?;
                let slots = store.slot_store();
                Slots::Store(store, slots)
            }
            "series-first" | "hour-first" => {
                let db = sled::Config::new()
                    .path(dir.join("sled"))
                    .cache_capacity(cache_bytes)
                    .flush_every_ms(None)
                    .open()?;
                let tree = db.open_tree("slots")?;
                Slots::Bare {
                    db,
                    tree,
                    hour_first: layout == "hour-first",
                }
            }
            other => anyhow::bail!("SLOTS_LAYOUTS: no layout {other:?} (store, series-first, hour-first)"),
        })
    }

    fn key(name: &str, hour: u16, hour_first: bool) -> Vec<u8> {
        let mut key = Vec::with_capacity(name.len() + 2);
        if hour_first {
            key.extend(hour.to_be_bytes());
            key.extend(name.as_bytes());
        } else {
            key.extend(name.as_bytes());
            key.extend(hour.to_be_bytes());
        }
        key
    }

    fn save(&mut self, name: &str, hour: u16, summary: &SlotSummary, record: &[u8]) -> anyhow::Result<()> {
        match self {
            Slots::Store(_, slots) => slots.save(name, hour, summary),
            Slots::Bare { tree, hour_first, .. } => {
                tree.insert(Self::key(name, hour, *hour_first), record)?;
            }
        }
        Ok(())
    }

    fn load(&mut self, name: &str, hour: u16) -> anyhow::Result<bool> {
        Ok(match self {
            Slots::Store(_, slots) => slots.load(name, hour).is_some(),
            Slots::Bare { tree, hour_first, .. } => tree.get(Self::key(name, hour, *hour_first))?.is_some(),
        })
    }

    fn flush(&self) -> anyhow::Result<()> {
        match self {
            Slots::Store(store, _) => store.flush()?,
            Slots::Bare { db, .. } => {
                db.flush()?;
            }
        }
        Ok(())
    }

    fn size_on_disk(&self) -> u64 {
        match self {
            Slots::Store(store, _) => store.size_on_disk(),
            Slots::Bare { db, .. } => db.size_on_disk().unwrap_or(0),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let measuring = std::env::args().any(|a| a == "--bench");
    let (series, hours, caches, layouts) = if measuring {
        (
            env_or("SLOTS_SERIES", "100000").parse::<usize>()?,
            env_or("SLOTS_HOURS", "24").parse::<u16>()?,
            env_or("SLOTS_CACHE_MB", "8,64"),
            env_or("SLOTS_LAYOUTS", "store,series-first,hour-first"),
        )
    } else {
        (200, 3, "1".to_owned(), "store,series-first,hour-first".to_owned())
    };
    let names: Vec<String> = (0..series).map(series_name).collect();
    let summaries: Vec<SlotSummary> = (0..series).map(slot_of).collect();
    let records: Vec<Vec<u8>> = summaries
        .iter()
        .map(|s| Ok(postcard::to_allocvec(&StoredSlotRecord::try_from(s)?)?))
        .collect::<anyhow::Result<_>>()?;
    let order = shuffled(series);
    let mean_record = records.iter().map(Vec::len).sum::<usize>() / series.max(1);
    println!("slots: {series} series, {hours} hours of slots each, records of {mean_record} B on average");
    println!(
        "| layout | cache | filling, a slot | an hour's turn, a series: one by one | by scope | read ahead | sled on disk |"
    );
    println!("|---|---|---|---|---|---|---|");
    for layout in layouts.split(',').map(str::trim) {
        for cache in caches.split(',') {
            let cache_mb: u64 = cache.trim().parse()?;
            let dir = tempfile::tempdir()?;
            let mut slots = Slots::open(layout, dir.path(), cache_mb << 20)?;

            let started = Instant::now();
            for hour in 0..hours {
                for &s in &order {
                    slots.save(&names[s], hour, &summaries[s], &records[s])?;
                }
                slots.flush()?;
            }
            let fill_us = started.elapsed().as_secs_f64() * 1e6 / (series * hours as usize) as f64;

            let started = Instant::now();
            let mut found = 0usize;
            for &s in &order {
                slots.save(&names[s], hours, &summaries[s], &records[s])?;
                found += usize::from(slots.load(&names[s], 0)?);
            }
            slots.flush()?;
            let turn_us = started.elapsed().as_secs_f64() * 1e6 / series as f64;
            anyhow::ensure!(found == series, "read back {found} of {series} slots");

            // The next hour's turn, by scope: slot `hours + 1` saved, slot 1 read.
            let (by_scope, read_ahead) = match &mut slots {
                Slots::Store(store, slot_store) => {
                    let (reading, saving, found) =
                        turn_by_scope(slot_store, &names, &summaries, hours + 1, |store, prefix| {
                            store.load_scope(prefix, 1).unwrap_or_default()
                        });
                    let started = Instant::now();
                    store.flush()?;
                    let flushing = started.elapsed();
                    anyhow::ensure!(found == series, "read back {found} of {series} slots by scope");
                    let per_series = |d: std::time::Duration| d.as_secs_f64() * 1e6 / series as f64;
                    let by_scope = format!(
                        "{:.1} µs (reading {:.1}, saving {:.1}, flushing {:.1})",
                        per_series(reading + saving + flushing),
                        per_series(reading),
                        per_series(saving),
                        per_series(flushing)
                    );

                    // The hour after, read ahead: slot 2 read whole (the daemon's writer thread
                    // does this before the turn), then each scope's entered slots taken from it
                    // (the engine's thread's whole part of the read) and slot `hours + 2` saved.
                    let started = Instant::now();
                    let mut hour = slot_store
                        .load_hour(2, usize::MAX)
                        .ok_or_else(|| anyhow::anyhow!("the hour read ahead failed"))?;
                    let reading_ahead = started.elapsed();
                    let held = hour.bytes() as f64 / series as f64;
                    let (taking, saving, found) =
                        turn_by_scope(slot_store, &names, &summaries, hours + 2, |_, prefix| {
                            hour.take(prefix).unwrap_or_default()
                        });
                    store.flush()?;
                    anyhow::ensure!(found == series, "read back {found} of {series} slots ahead");
                    (
                        by_scope,
                        format!(
                            "{:.1} µs of the writer, {held:.0} B a series held; the engine's part {:.2} µs (saving {:.1})",
                            per_series(reading_ahead),
                            per_series(taking),
                            per_series(saving)
                        ),
                    )
                }
                Slots::Bare { .. } => (String::new(), String::new()),
            };

            println!(
                "| {layout} | {cache_mb} MiB | {fill_us:.1} µs | {turn_us:.1} µs | {by_scope} | {read_ahead} | {:.0} MiB |",
                slots.size_on_disk() as f64 / (1 << 20) as f64
            );
        }
    }
    Ok(())
}
