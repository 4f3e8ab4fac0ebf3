//! canaryd's statistics engine.
//!
//! Everything here is pure computation over observations: no sockets, no files, no clocks, no
//! async. The daemon feeds it what the receivers normalized and asks it what it knows; a replay
//! of recorded data gives the same answers as the live stream because only event time (the
//! timestamps in the data) moves it.
//!
//! - `observation`: the input types, free of any wire format.
//! - `resource`: a resource's observations of one request, and a request's (`Batch`).
//! - `delta`: cumulative and delta metric points turned into per-interval samples.
//! - `catalog`: the apps, versions, operations and series seen, each map capped by `Limits`.
//! - `sketch`: a mergeable quantile sketch with relative error (DDSketch).
//! - `summary`: a resource's observations summed per bucket where its request was read.
//! - `vec_map`: an ordered map in one sorted vector, for an aggregate's small maps.
//! - `baseline`: EWMA and seasonal hour-of-week quantiles per feature, and the anomaly score.
//! - `anomaly`: when a version's feature has left its own baseline, with hysteresis.
//! - `window`: event-time buckets, the per-app watermark, and evaluation windows.
//! - `features`: the numbers a closed window yields (rates, ratios, quantiles, shares).
//! - `counts`: the counts behind ratios and rates, and their exact binomial and Poisson tails.
//! - `judge`: canary analyses: the checks, the sequential decision, stages and gates, models.
//! - `engine`: `Engine`, which drives all of the above batch by batch.
//! - `rng`: a seeded generator for synthetic data.
//! - `simulate`: simulated services in event time, for the scenario tests and the calibration bench.

/// A hash map for keys that arrive with every observation (operation and downstream names, apps):
/// foldhash, seeded per process, in place of SipHash on the engine thread's hottest lookups. Every
/// such map is capped (`Limits`), which bounds what colliding keys could cost.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub mod anomaly;
pub mod baseline;
pub mod catalog;
pub mod counts;
pub mod delta;
mod engine;
pub mod features;
pub mod judge;
pub mod observation;
pub mod packed;
pub mod resource;
pub mod rng;
pub mod score;
pub mod simulate;
pub mod sketch;
pub mod summary;
pub mod varint;
pub mod vec_map;
pub mod window;

pub use catalog::{Cap, Catalog, Limits, OVERFLOW};
pub use engine::{
    AnomalyChange, AppArchive, ArchivedApp, BaselineId, BaselinesView, Declaration, Engine, EngineConfig,
    EngineMemory, EngineState, IngestReport, PageOut, Scope,
};
pub use observation::*;
pub use resource::{Batch, ResourceObservations};
