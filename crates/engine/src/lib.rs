//! canaryd's statistics engine.
//!
//! Everything here is pure computation over observations: no sockets, no files, no clocks, no
//! async. The daemon feeds it what the receivers normalized and asks it what it knows; a replay
//! of recorded data gives the same answers as the live stream because only event time (the
//! timestamps in the data) moves it.
//!
//! - `observation`: the input types, free of any wire format.
//! - `delta`: cumulative and delta metric points turned into per-interval samples.
//! - `catalog`: the apps, versions, operations and series seen, each map capped by `Limits`.
//! - `sketch`: a mergeable quantile sketch with relative error (DDSketch).
//! - `baseline`: EWMA and seasonal hour-of-week quantiles per feature, and the anomaly score.
//! - `rng`: a seeded generator for synthetic data.

pub mod baseline;
pub mod catalog;
pub mod delta;
pub mod observation;
pub mod rng;
pub mod sketch;

pub use catalog::{Cap, Catalog, Limits, OVERFLOW};
pub use observation::*;

/// The engine as the daemon drives it: one owner, fed batch by batch.
#[derive(Debug)]
pub struct Engine {
    catalog: Catalog,
}

/// What ingesting one batch ran into.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngestReport {
    /// Observations dropped or folded, per cap.
    pub cap_hits: Vec<(Cap, u64)>,
}

impl Engine {
    pub fn new(limits: Limits) -> Self {
        Engine {
            catalog: Catalog::new(limits),
        }
    }

    pub fn ingest(&mut self, batch: &Batch) -> IngestReport {
        IngestReport {
            cap_hits: self.catalog.ingest(batch),
        }
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }
}
