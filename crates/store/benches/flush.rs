//! What a flush of changed baselines costs at scale: `FLUSH_SERIES` baselines (100,000), each with
//! its current seasonal slot, are written and made durable (`Store::write`, `Store::flush`) as
//! the engine's flush does when every series learned a window since the last one, three times
//! over (the first inserts, the others overwrite). Reports the time of each part per series.
//!
//! `cargo bench -p canaryd-store --bench flush`; `cargo test --benches` runs a small size once.

use std::time::Instant;

use canaryd_engine::baseline::{Baseline, Ewma, SlotSummary};
use canaryd_engine::features::{Feature, FeatureKey};
use canaryd_engine::sketch::Sketch;
use canaryd_engine::{BaselineId, EngineState, Scope};
use canaryd_store::{Store, StoreCounters};

const SERIES_PER_SCOPE: usize = 40;

fn baseline(series: usize, round: usize) -> Baseline {
    let level = 20.0 + (series % 97) as f64;
    let mut current = Sketch::new(0.02);
    for i in 0..60 {
        let u = ((series * 7919 + i * 15_485_863) % 1000) as f64 / 1000.0;
        current.add(level * (0.85 + 0.3 * u));
    }
    Baseline {
        ewma: Ewma {
            mean: level + round as f64,
            variance: 4.0,
            abs_error: 1.5,
            samples: 100 + round as u64,
            last_time: 1_700_000_000_000_000_000,
        },
        slot: Some((
            10,
            SlotSummary {
                past: Sketch::new(0.02),
                current,
                week: 1,
                past_weeks: 0,
            },
        )),
        last_value: Some(level),
        last_window_end: 1_700_000_000_000_000_000,
        ..Baseline::default()
    }
}

fn id(series: usize) -> BaselineId {
    BaselineId {
        env: "prod".into(),
        app: format!("shop-{}", series / SERIES_PER_SCOPE),
        scope: Scope::Version("1.4.2".into()),
        key: FeatureKey::of(
            [
                Feature::OperationShare,
                Feature::OperationErrorRatio,
                Feature::OperationLatencyP95,
            ][series % 3],
            &format!("GET /api/v1/resource{}/{{id}}", series % SERIES_PER_SCOPE),
        ),
    }
}

fn main() -> anyhow::Result<()> {
    let measuring = std::env::args().any(|a| a == "--bench");
    let series: usize = if measuring {
        std::env::var("FLUSH_SERIES")
            .unwrap_or_else(|_| "100000".into())
            .parse()?
    } else {
        300
    };
    let cache_mb: u64 = std::env::var("FLUSH_CACHE_MB")
        .unwrap_or_else(|_| "64".into())
        .parse()?;
    let dir = tempfile::tempdir()?;
    let store: Store = Store::open(dir.path(), cache_mb << 20, StoreCounters::default())?;
    println!("flush: {series} baselines changed, sled cache {cache_mb} MiB");
    println!("| round | clone (take_changes) | write | flush | in all | a series |");
    println!("|---|---|---|---|---|---|");
    for round in 0..3 {
        let held: Vec<(BaselineId, Baseline)> = (0..series).map(|s| (id(s), baseline(s, round))).collect();
        let started = Instant::now();
        let state = EngineState {
            baselines: held.clone(),
            ..EngineState::default()
        };
        let cloned = started.elapsed();
        let started = Instant::now();
        store.write(&state)?;
        let written = started.elapsed();
        let started = Instant::now();
        store.flush()?;
        let flushed = started.elapsed();
        let all = cloned + written + flushed;
        println!(
            "| {round} | {:.3} s | {:.3} s | {:.3} s | {:.3} s | {:.1} µs |",
            cloned.as_secs_f64(),
            written.as_secs_f64(),
            flushed.as_secs_f64(),
            all.as_secs_f64(),
            all.as_secs_f64() * 1e6 / series as f64
        );
    }
    Ok(())
}
