//! `canaryd-lab nab`: canaryd's baseline engine on the Numenta Anomaly Benchmark.
//!
//! Every `<category>/<name>.csv` (`timestamp,value`) under the data folder is run through a fresh
//! `Baseline` — the code the daemon uses for every feature — one row at a time, in file order, with
//! the row's timestamp as event time: causal, one parameter set for every file, each file from
//! scratch, as NAB's rules ask. As in the daemon, what is reported is the onset of an anomaly (the
//! anomaly rules' `Detected` transition): that row's score, mapped into [0, 1) and divided by one
//! plus the series' recent onsets (`AnomalyState::recurrence`), is its `anomaly_score`; every
//! other row scores 0. Rows are written to `<out>/<category>/<name>.csv` in
//! their order, for NAB's scorer.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use canaryd_engine::anomaly::{AnomalyRules, AnomalyState, Transition};
use canaryd_engine::baseline::{Baseline, BaselineConfig, MemorySlotStore, RangeConfig, Score};
use polars::prelude::*;

use crate::import::text_to_ns;

/// The one parameter set used for every file.
pub fn nab_config() -> BaselineConfig {
    BaselineConfig {
        half_life_ns: 6 * 3_600 * 1_000_000_000,
        seasonal_half_life_weeks: 2.0,
        min_samples: 30,
        range: Some(nab_range()),
    }
}

/// The long-memory range of values seen: a value beyond the extremes scores 1 per 6% of the
/// range's width (the extremes relax towards the level with a 45-day half-life, and follow a new
/// extreme a fifth of the way). It catches what the 6 h level absorbs and the seasonal band has
/// no week of history for: slow drifts to new highs, steps to new lows. Measured with score.py:
/// standard 61.27 -> 71.76.
pub fn nab_range() -> RangeConfig {
    RangeConfig {
        width: 0.06,
        half_life_ns: 45 * 24 * 3_600 * 1_000_000_000,
        learning: 0.2,
    }
}

/// When an anomaly opens and closes: the daemon's rules, but a single row may open one (a row
/// here is a whole window there), eight quiet rows close it, and novelty gating is on: a
/// deviation opens an anomaly only if `1 + score` is at least 0.7 times the largest recent one
/// (decayed with a 24 h half-life), so that the smaller aftershocks of a deviation (bursty
/// sensors, spike trains) are not reported again and again. Measured with score.py: standard
/// 57.66 -> 61.27 (gating); with the range and the recurrence count, 6 to 10 quiet rows score
/// alike, 0.2 above 12.
pub fn nab_rules() -> AnomalyRules {
    AnomalyRules {
        detect_score: 3.0,
        detect_windows: 1,
        gross_score: 10.0,
        resolve_score: 1.0,
        resolve_windows: 8,
        min_support: 0,
        novelty_half_life_ns: 24 * 3_600 * 1_000_000_000,
        novelty_ratio: 0.7,
        recurrence_half_life_ns: 12 * 3_600 * 1_000_000_000,
    }
}

/// Maps a score (band half-widths outside the band, 0 inside) into [0, 1), monotonically, then
/// divides it by 1 + the decayed count of the series' earlier onsets (`AnomalyState::recurrence`,
/// 12 h half-life): NAB sweeps one threshold over every file, so an onset in a series that has
/// alarmed again and again lately must rank below the first one in a quiet series. Measured with
/// score.py: standard 71.76 -> 75.45.
fn unit_score(score: Score, recurrence: f64) -> f64 {
    match score {
        Score::InsufficientData => 0.0,
        Score::Scored(s) => (1.0 - (-s / 3.0).exp()) / (1.0 + recurrence.max(0.0)),
    }
}

/// Scores one NAB file; returns its rows with their scores, as `timestamp,value,anomaly_score` CSV.
fn score_file(file: &Path, config: &BaselineConfig) -> anyhow::Result<(String, usize)> {
    let path = file.to_str().context("paths must be UTF-8")?;
    // Read every column as text: rows keep their order and timestamps their spelling.
    let frame = LazyCsvReader::new(PlRefPath::from(path))
        .with_has_header(true)
        .with_infer_schema_length(Some(0))
        .finish()?
        .collect()?;
    let timestamps = frame.column("timestamp")?.str()?.clone();
    let values = frame.column("value")?.str()?.clone();
    let mut baseline = Baseline::default();
    let mut slots = MemorySlotStore::default();
    let rules = nab_rules();
    let mut state = AnomalyState::default();
    let mut out = String::from("timestamp,value,anomaly_score\n");
    for (row, (timestamp, value)) in timestamps.iter().zip(values.iter()).enumerate() {
        let (Some(timestamp), Some(value)) = (timestamp, value) else {
            bail!("{}: row {} is incomplete", file.display(), row + 1);
        };
        let time = text_to_ns(timestamp)
            .with_context(|| format!("{}: row {}: timestamp {timestamp:?}", file.display(), row + 1))?;
        let Ok(x) = value.trim().parse::<f64>() else {
            bail!(
                "{}: row {}: value {value:?} is not a number",
                file.display(),
                row + 1
            );
        };
        let score = baseline.observe("nab", x, time as u64, config, &mut slots);
        // As the daemon does, report the onset of an anomaly, not every row of it.
        let reported = match state.update(score, u64::MAX, time as u64, &rules) {
            Some(Transition::Detected) => unit_score(score, state.recurrence),
            _ => 0.0,
        };
        out.push_str(&format!("{timestamp},{value},{reported:.6}\n"));
    }
    Ok((out, frame.height()))
}

/// Scores every `<category>/<name>.csv` under `data` into the same layout under `out`; returns
/// the rows scored per file.
pub fn run(data: &Path, out: &Path) -> anyhow::Result<Vec<usize>> {
    let config = nab_config();
    let mut results = Vec::new();
    let mut categories: Vec<PathBuf> = std::fs::read_dir(data)
        .with_context(|| format!("cannot read {}", data.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    categories.sort();
    for category in categories {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&category)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "csv"))
            .collect();
        files.sort();
        let target_dir = out.join(category.file_name().context("category name")?);
        std::fs::create_dir_all(&target_dir)
            .with_context(|| format!("cannot create {}", target_dir.display()))?;
        for file in files {
            let (csv, rows) = score_file(&file, &config)?;
            let target = target_dir.join(file.file_name().context("file name")?);
            std::fs::write(&target, csv).with_context(|| format!("cannot write {}", target.display()))?;
            results.push(rows);
        }
    }
    if results.is_empty() {
        bail!("no <category>/<name>.csv files under {}", data.display());
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nab_layout_is_scored_row_by_row_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let category = dir.path().join("data/artificialWithAnomaly");
        std::fs::create_dir_all(&category).expect("mkdir");
        let mut csv = String::from("timestamp,value\n");
        for i in 0..400 {
            let minute = i * 5;
            let value = if i == 350 {
                500.0
            } else {
                10.0 + (i % 7) as f64 * 0.1
            };
            csv.push_str(&format!(
                "2014-04-01 {:02}:{:02}:00,{value}\n",
                minute / 60 % 24,
                minute % 60
            ));
        }
        std::fs::write(category.join("spike.csv"), &csv).expect("write");
        let results = run(&dir.path().join("data"), &dir.path().join("out")).expect("run");
        assert_eq!(results.len(), 1);
        assert_eq!(results[0], 400);
        let scored =
            std::fs::read_to_string(dir.path().join("out/artificialWithAnomaly/spike.csv")).expect("out");
        let scores: Vec<f64> = scored
            .lines()
            .skip(1)
            .map(|l| l.rsplit(',').next().expect("score").parse().expect("number"))
            .collect();
        assert_eq!(scores.len(), 400);
        assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)));
        assert!(
            scores[..30].iter().all(|s| *s == 0.0),
            "a young baseline scores nothing"
        );
        assert!(scores[350] > 0.9, "the spike's onset stands out: {}", scores[350]);
        let elsewhere = scores
            .iter()
            .enumerate()
            .filter(|(i, s)| *i != 350 && **s > 0.5)
            .count();
        assert_eq!(elsewhere, 0, "ordinary rows do not");
    }
}
