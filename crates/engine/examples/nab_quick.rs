//! A quick, dependency-free twin of `canaryd-lab nab`, for iterating on the engine without
//! building polars: reads `<data>/<category>/<name>.csv` (`timestamp,value`), runs every file
//! through a fresh `Baseline` and `AnomalyState` exactly as `crates/lab/src/nab.rs` does, and
//! writes `<out>/<category>/<name>.csv` with an `anomaly_score` column for NAB's `score.py`.
//! Given a windows file as a third argument it also prints NAB's scores itself (a port of
//! `score.py`), so that parameter sweeps need no Python.
//!
//! Usage: `cargo run --release -p canaryd-engine --example nab_quick -- DATA OUT [WINDOWS]`

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use canaryd_engine::anomaly::{AnomalyRules, AnomalyState, Transition};
use canaryd_engine::baseline::{Baseline, BaselineConfig, MemorySlotStore, Score};

type Error = Box<dyn std::error::Error>;

/// Nanoseconds since the epoch of `YYYY-MM-DD HH:MM:SS[.ffffff]`, read as UTC.
fn text_to_ns(text: &str) -> Option<i64> {
    let text = text.trim();
    let (date, time) = text.split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3_600 + min * 60;
    Some(secs * 1_000_000_000 + (sec * 1e9).round() as i64)
}

/// The parameters under test: `crates/lab/src/nab.rs`'s `nab_config` and `nab_rules`.
/// Environment overrides (`NQ_<NAME>`) let a sweep try values without a rebuild.
fn env(name: &str, default: f64) -> f64 {
    std::env::var(format!("NQ_{name}"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn nab_config() -> BaselineConfig {
    BaselineConfig {
        half_life_ns: (env("HALF_LIFE_H", 6.0) * 3_600.0 * 1e9) as u64,
        seasonal_half_life_weeks: env("SEASONAL_WEEKS", 2.0),
        min_samples: env("MIN_SAMPLES", 30.0) as u64,
    }
}

fn nab_rules() -> AnomalyRules {
    AnomalyRules {
        detect_score: env("DETECT", 3.0),
        detect_windows: env("DETECT_WINDOWS", 1.0) as u32,
        gross_score: env("GROSS", 10.0),
        resolve_score: env("RESOLVE", 1.0),
        resolve_windows: env("RESOLVE_WINDOWS", 12.0) as u32,
        min_support: 0,
        novelty_half_life_ns: (env("NOVELTY_HL_H", 24.0) * 3_600.0 * 1e9) as u64,
        novelty_ratio: env("NOVELTY_RATIO", 0.7),
    }
}

fn unit_score(score: Score) -> f64 {
    match score {
        Score::InsufficientData => 0.0,
        Score::Scored(s) => 1.0 - (-s / env("UNIT", 3.0)).exp(),
    }
}

/// One data file: its timestamps (as written and in ns) and values.
struct File {
    rel: String,
    stamps: Vec<String>,
    times: Vec<i64>,
    values: Vec<String>,
}

fn read_file(path: &Path, rel: String) -> Result<File, Error> {
    let text = std::fs::read_to_string(path)?;
    let mut file = File {
        rel,
        stamps: Vec::new(),
        times: Vec::new(),
        values: Vec::new(),
    };
    for (row, line) in text.lines().enumerate().skip(1) {
        let (stamp, value) = line
            .split_once(',')
            .ok_or_else(|| format!("{}: row {row} has no comma", path.display()))?;
        let time = text_to_ns(stamp).ok_or_else(|| format!("{}: row {row}: bad time", path.display()))?;
        file.stamps.push(stamp.to_owned());
        file.times.push(time);
        file.values.push(value.to_owned());
    }
    Ok(file)
}

/// Scores one file as `crates/lab/src/nab.rs` does; the scores are rounded as written.
fn score_file(file: &File, raw: &mut Vec<f64>) -> Result<Vec<f64>, Error> {
    let config = nab_config();
    let rules = nab_rules();
    let mut baseline = Baseline::default();
    let mut slots = MemorySlotStore::default();
    let mut state = AnomalyState::default();
    let mut scores = Vec::with_capacity(file.values.len());
    for (value, time) in file.values.iter().zip(&file.times) {
        let x: f64 = value.trim().parse()?;
        let time = *time as u64;
        let score = baseline.observe("nab", x, time, &config, &mut slots);
        raw.push(score.value().unwrap_or(-1.0));
        let reported = match state.update(score, u64::MAX, time, &rules) {
            Some(Transition::Detected) => unit_score(score),
            _ => 0.0,
        };
        scores.push(format!("{reported:.6}").parse()?);
    }
    Ok(scores)
}

/// NAB's scaled sigmoid.
fn scaled_sigmoid(y: f64) -> f64 {
    if y > 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * y).exp()) - 1.0
    }
}

/// The label windows: `{"cat/name.csv": [["start", "end"], ...], ...}`, read as a string stream.
fn read_windows(path: &Path) -> Result<HashMap<String, Vec<(i64, i64)>>, Error> {
    let text = std::fs::read_to_string(path)?;
    let strings: Vec<&str> = text.split('"').skip(1).step_by(2).collect();
    let mut windows: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    let mut key = String::new();
    let mut pending = None;
    for s in strings {
        if s.ends_with(".csv") {
            key = s.to_owned();
            windows.entry(key.clone()).or_default();
        } else {
            let t = text_to_ns(s).ok_or("bad window time")?;
            match pending.take() {
                None => pending = Some(t),
                Some(a) => windows.entry(key.clone()).or_default().push((a, t)),
            }
        }
    }
    Ok(windows)
}

/// score.py's three profiles: (tp, fp, fn).
const PROFILES: [(&str, f64, f64, f64); 3] = [
    ("standard", 1.0, 0.11, 1.0),
    ("reward_low_FP_rate", 1.0, 0.22, 1.0),
    ("reward_low_FN_rate", 1.0, 0.11, 2.0),
];

/// NAB's normalised score of `scores` (one vector per file) under one profile, as score.py.
fn nab_score(
    files: &[File],
    scores: &[Vec<f64>],
    windows: &HashMap<String, Vec<(i64, i64)>>,
    p: usize,
) -> (f64, f64) {
    let (_, tp, fp, fnw) = PROFILES[p];
    let max_tp = scaled_sigmoid(-1.0);
    // (score, weight, window id or usize::MAX)
    let mut points: Vec<(f64, f64, usize)> = Vec::new();
    let mut n_windows = 0;
    for (file, sc) in files.iter().zip(scores) {
        let mut first: HashMap<i64, usize> = HashMap::new();
        for (i, t) in file.times.iter().enumerate() {
            first.entry(*t).or_insert(i);
        }
        let spans: Vec<(usize, usize)> = windows
            .get(&file.rel)
            .map(|w| w.iter().map(|(a, b)| (first[a], first[b])).collect())
            .unwrap_or_default();
        let n = file.times.len();
        let probation = (0.15 * n as f64).floor().min(750.0);
        let (mut current, mut previous, mut next) = (None::<(usize, usize)>, None::<(usize, usize)>, 0);
        let base = n_windows;
        for (i, score) in sc.iter().enumerate().take(n) {
            if current.is_none() && next < spans.len() && i == spans[next].0 {
                current = Some(spans[next]);
                next += 1;
            }
            let (weight, key) = match current {
                Some(c) => {
                    let width = (c.1 - c.0 + 1) as f64;
                    let w = scaled_sigmoid(-((c.1 as f64 - i as f64 + 1.0) / width)) * tp / max_tp;
                    (w, base + next - 1)
                }
                None => {
                    let unit = match previous {
                        None => -1.0,
                        Some(pv) => scaled_sigmoid((i - pv.0) as f64 / (pv.1 as f64 - 1.0)),
                    };
                    (unit * fp, usize::MAX)
                }
            };
            if (i as f64) >= probation {
                points.push((*score, weight, key));
            }
            if let Some(c) = current
                && i == c.1
            {
                previous = Some((c.1, c.1 - c.0 + 1));
                current = None;
            }
        }
        n_windows += spans.len();
    }
    points.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut credit = vec![-fnw; n_windows];
    let mut credit_sum = -fnw * n_windows as f64;
    let mut false_positive = 0.0;
    let mut best = (credit_sum, 1.1);
    let mut threshold = 1.1;
    for (score, weight, key) in points {
        if score != threshold {
            if credit_sum + false_positive > best.0 {
                best = (credit_sum + false_positive, threshold);
            }
            threshold = score;
        }
        if key == usize::MAX {
            false_positive += weight;
        } else if weight > credit[key] {
            credit_sum += weight - credit[key];
            credit[key] = weight;
        }
    }
    if credit_sum + false_positive > best.0 {
        best = (credit_sum + false_positive, threshold);
    }
    let null = -fnw * n_windows as f64;
    let perfect = tp * n_windows as f64;
    (100.0 * (best.0 - null) / (perfect - null), best.1)
}

/// Per file, at `threshold`: flags outside windows after probation, and for each window where
/// its first flag fell (as a fraction of the window, `-` for none).
fn diagnose(files: &[File], scores: &[Vec<f64>], windows: &HashMap<String, Vec<(i64, i64)>>, threshold: f64) {
    for (file, sc) in files.iter().zip(scores) {
        let n = file.times.len();
        let probation = (0.15 * n as f64).floor().min(750.0) as usize;
        let idx = |t: &i64| file.times.iter().position(|x| x == t).unwrap_or(0);
        let spans: Vec<(usize, usize)> = windows
            .get(&file.rel)
            .map(|w| w.iter().map(|(a, b)| (idx(a), idx(b))).collect())
            .unwrap_or_default();
        let inside = |i: usize| spans.iter().any(|(a, b)| (*a..=*b).contains(&i));
        let fps: Vec<usize> = (probation..n)
            .filter(|i| sc[*i] >= threshold && !inside(*i))
            .collect();
        let hits: Vec<String> = spans
            .iter()
            .map(|(a, b)| {
                (*a..=*b)
                    .find(|i| sc[*i] >= threshold)
                    .map_or("-".to_owned(), |i| {
                        format!("{:.2}", (i - a) as f64 / (b - a + 1) as f64)
                    })
            })
            .collect();
        println!(
            "{:55} n {n:5} prob {probation:4} windows {:?} hits [{}] fp {} {:?}",
            file.rel,
            spans,
            hits.join(" "),
            fps.len(),
            &fps[..fps.len().min(12)]
        );
    }
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(data), Some(out)) = (args.get(1), args.get(2)) else {
        return Err("usage: nab_quick DATA OUT [WINDOWS]".into());
    };
    let (data, out) = (Path::new(data), Path::new(out));
    let mut files = Vec::new();
    let mut categories: Vec<PathBuf> = std::fs::read_dir(data)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    categories.sort();
    for category in categories {
        let cat = category
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or("category name")?
            .to_owned();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&category)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "csv"))
            .collect();
        paths.sort();
        for path in paths {
            let name = path.file_name().and_then(|n| n.to_str()).ok_or("file name")?;
            files.push(read_file(&path, format!("{cat}/{name}"))?);
        }
    }
    let mut all = Vec::with_capacity(files.len());
    for file in &files {
        let mut raw = Vec::new();
        let scores = score_file(file, &mut raw)?;
        if let Ok(dir) = std::env::var("NQ_RAWDIR") {
            let target = Path::new(&dir).join(&file.rel);
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let text: Vec<String> = raw.iter().map(|r| format!("{r:.4}")).collect();
            std::fs::write(target, text.join("\n"))?;
        }
        let target = out.join(&file.rel);
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut csv = String::from("timestamp,value,anomaly_score\n");
        for ((stamp, value), s) in file.stamps.iter().zip(&file.values).zip(&scores) {
            csv.push_str(&format!("{stamp},{value},{s:.6}\n"));
        }
        std::fs::write(&target, csv)?;
        all.push(scores);
    }
    if let Some(windows) = args.get(3) {
        let windows = read_windows(Path::new(windows))?;
        let s: Vec<(f64, f64)> = (0..PROFILES.len())
            .map(|p| nab_score(&files, &all, &windows, p))
            .collect();
        if env("DIAG", 0.0) > 0.0 {
            diagnose(&files, &all, &windows, s[0].1);
        }
        println!(
            "nab: standard {:.2}, reward_low_FP {:.2}, reward_low_FN {:.2} (threshold {:.4})",
            s[0].0, s[1].0, s[2].0, s[0].1
        );
    }
    Ok(())
}
