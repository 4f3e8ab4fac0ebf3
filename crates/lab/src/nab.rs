//! `canaryd-lab nab`: canaryd's baseline engine on the Numenta Anomaly Benchmark.
//!
//! Every `<category>/<name>.csv` (`timestamp,value`) under the data folder is run through a fresh
//! `Baseline` and `AnomalyState` — the code the daemon runs on every feature — one row at a time,
//! in file order, with the row's timestamp as event time and a row standing for one of the
//! daemon's windows: causal, each file from scratch, as NAB's rules ask. The parameters are the
//! daemon's own settings (`settings`: its defaults, its config file, `CANARYD_*` variables), the
//! same for every file; nothing here is tuned for NAB. As the daemon reports events, only the
//! onset of an anomaly is reported: that row's score, mapped into [0, 1), is its
//! `anomaly_score`; every other row scores 0. Rows are written to `<out>/<category>/<name>.csv` in
//! their order, for NAB's scorer.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use canaryd_engine::EngineConfig;
use canaryd_engine::anomaly::{AnomalyState, Transition};
use canaryd_engine::baseline::{Baseline, MemorySlotStore, Score};
use polars::prelude::*;

use crate::import::text_to_ns;

/// Maps a score (band half-widths outside the band, 0 inside) into [0, 1), monotonically: NAB
/// sweeps one threshold over every file's scores, so only their order matters.
fn unit_score(score: Score) -> f64 {
    match score {
        Score::InsufficientData => 0.0,
        Score::Scored(s) => 1.0 - (-s / 3.0).exp(),
    }
}

/// Scores one NAB file; returns its rows with their scores, as `timestamp,value,anomaly_score` CSV.
fn score_file(file: &Path, config: &EngineConfig) -> anyhow::Result<(String, usize)> {
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
        let score = baseline.observe("nab", x, time as u64, &config.baseline, &mut slots);
        // As the daemon does, report the onset of an anomaly, not every row of it. A NAB value is
        // a level, not a count of events: nothing to hold back for thin support.
        let reported = match state.update(score, u64::MAX, time as u64, &config.anomaly) {
            Some(Transition::Detected) => unit_score(score),
            _ => 0.0,
        };
        out.push_str(&format!("{timestamp},{value},{reported:.6}\n"));
    }
    Ok((out, frame.height()))
}

/// Scores every `<category>/<name>.csv` under `data` into the same layout under `out` with the
/// engine settings `config`; returns the rows scored per file.
pub fn run(data: &Path, out: &Path, config: &EngineConfig) -> anyhow::Result<Vec<usize>> {
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
            let (csv, rows) = score_file(&file, config)?;
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
        let results = run(
            &dir.path().join("data"),
            &dir.path().join("out"),
            &EngineConfig::default(),
        )
        .expect("run");
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
