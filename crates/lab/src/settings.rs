//! The daemon's settings the lab needs, read without the daemon's crate: the engine's windows,
//! baseline and anomaly settings, and sled's cache, from the daemon's config file (a TOML file of top-level
//! keys; keys the lab does not use are ignored, the daemon checks them) and from `CANARYD_<KEY>`
//! environment variables, which win, over the engine's own defaults (`EngineConfig::default`,
//! which are the daemon's). Values are range-checked as the daemon checks them.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use canaryd_engine::EngineConfig;
use canaryd_engine::baseline::RangeConfig;
use serde::Deserialize;

const NS: u64 = 1_000_000_000;

/// sled's cache when nothing says otherwise: the daemon's default, 16 MiB.
const DEFAULT_SLED_CACHE_MB: u64 = 16;

/// The settings the lab reads; all optional.
#[derive(Debug, Default, Deserialize)]
struct Raw {
    window_secs: Option<u64>,
    allowed_lateness_secs: Option<u64>,
    baseline_half_life_secs: Option<u64>,
    seasonal_half_life_weeks: Option<f64>,
    baseline_min_samples: Option<u64>,
    baseline_range_width: Option<f64>,
    anomaly_detect_score: Option<f64>,
    anomaly_detect_windows: Option<u32>,
    anomaly_resolve_windows: Option<u32>,
    anomaly_novelty_half_life_secs: Option<u64>,
    sled_cache_mb: Option<u64>,
}

/// What the lab runs the engine and opens the store with.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub engine: EngineConfig,
    pub sled_cache_bytes: u64,
}

fn from_env<T: std::str::FromStr>(env: &BTreeMap<String, String>, key: &str) -> anyhow::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    let var = format!("CANARYD_{}", key.to_ascii_uppercase());
    env.get(&var)
        .map(|text| {
            text.parse()
                .map_err(|e| anyhow::anyhow!("environment variable {var}: {text:?}: {e}"))
        })
        .transpose()
}

fn within<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> anyhow::Result<T> {
    if range.contains(&value) {
        Ok(value)
    } else {
        bail!("{key} = {value}: must lie in {}..={}", range.start(), range.end())
    }
}

/// The settings from `file` (if any) and `env`, over the engine's defaults.
pub fn read(file: Option<&Path>, env: &BTreeMap<String, String>) -> anyhow::Result<Settings> {
    let raw: Raw = match file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))?
        }
        None => Raw::default(),
    };
    let raw = Raw {
        window_secs: from_env(env, "window_secs")?.or(raw.window_secs),
        allowed_lateness_secs: from_env(env, "allowed_lateness_secs")?.or(raw.allowed_lateness_secs),
        baseline_half_life_secs: from_env(env, "baseline_half_life_secs")?.or(raw.baseline_half_life_secs),
        seasonal_half_life_weeks: from_env(env, "seasonal_half_life_weeks")?.or(raw.seasonal_half_life_weeks),
        baseline_min_samples: from_env(env, "baseline_min_samples")?.or(raw.baseline_min_samples),
        baseline_range_width: from_env(env, "baseline_range_width")?.or(raw.baseline_range_width),
        anomaly_detect_score: from_env(env, "anomaly_detect_score")?.or(raw.anomaly_detect_score),
        anomaly_detect_windows: from_env(env, "anomaly_detect_windows")?.or(raw.anomaly_detect_windows),
        anomaly_resolve_windows: from_env(env, "anomaly_resolve_windows")?.or(raw.anomaly_resolve_windows),
        anomaly_novelty_half_life_secs: from_env(env, "anomaly_novelty_half_life_secs")?
            .or(raw.anomaly_novelty_half_life_secs),
        sled_cache_mb: from_env(env, "sled_cache_mb")?.or(raw.sled_cache_mb),
    };
    let mut engine = EngineConfig::default();
    if let Some(secs) = raw.window_secs {
        let secs = within("window_secs", secs, 1..=3_600)?;
        if 3_600 % secs != 0 {
            bail!("window_secs = {secs}: must divide an hour (1, 2, 5, 10, 30, 60, ...)");
        }
        engine.windows.window_ns = secs * NS;
    }
    if let Some(secs) = raw.allowed_lateness_secs {
        engine.windows.lateness_ns = within("allowed_lateness_secs", secs, 0..=3_600)? * NS;
    }
    if let Some(secs) = raw.baseline_half_life_secs {
        engine.baseline.half_life_ns = within("baseline_half_life_secs", secs, 1..=365 * 86_400)? * NS;
    }
    if let Some(weeks) = raw.seasonal_half_life_weeks {
        engine.baseline.seasonal_half_life_weeks = within("seasonal_half_life_weeks", weeks, 0.1..=520.0)?;
    }
    if let Some(n) = raw.baseline_min_samples {
        engine.baseline.min_samples = within("baseline_min_samples", n, 1..=1_000_000)?;
    }
    if let Some(width) = raw.baseline_range_width {
        engine.baseline.range = RangeConfig::of_width(within("baseline_range_width", width, 0.0..=10.0)?);
    }
    if let Some(score) = raw.anomaly_detect_score {
        engine.anomaly.detect_score = within("anomaly_detect_score", score, 1.0..=100.0)?;
    }
    if let Some(windows) = raw.anomaly_detect_windows {
        engine.anomaly.detect_windows = within("anomaly_detect_windows", windows, 1..=60)?;
    }
    if let Some(windows) = raw.anomaly_resolve_windows {
        engine.anomaly.resolve_windows = within("anomaly_resolve_windows", windows, 1..=1_000)?;
    }
    if let Some(secs) = raw.anomaly_novelty_half_life_secs {
        engine.anomaly.novelty_half_life_ns =
            within("anomaly_novelty_half_life_secs", secs, 0..=30 * 86_400)? * NS;
    }
    let cache_mb = within(
        "sled_cache_mb",
        raw.sled_cache_mb.unwrap_or(DEFAULT_SLED_CACHE_MB),
        1..=1 << 20,
    )?;
    Ok(Settings {
        engine,
        sled_cache_bytes: cache_mb << 20,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_reads_as_the_engine_defaults() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/canaryd.example.toml");
        let settings = read(Some(&example), &BTreeMap::new()).expect("the example reads");
        assert_eq!(
            settings,
            Settings {
                engine: EngineConfig::default(),
                sled_cache_bytes: DEFAULT_SLED_CACHE_MB << 20,
            }
        );
    }

    #[test]
    fn the_environment_wins_over_the_file_and_bad_values_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("canaryd.toml");
        std::fs::write(
            &file,
            "window_secs = 30\nbaseline_half_life_secs = 60\nlog = \"info\"\n",
        )
        .expect("write");
        let env = BTreeMap::from([
            ("CANARYD_BASELINE_HALF_LIFE_SECS".to_string(), "120".to_string()),
            ("CANARYD_ANOMALY_RESOLVE_WINDOWS".to_string(), "5".to_string()),
            ("CANARYD_BASELINE_RANGE_WIDTH".to_string(), "0.1".to_string()),
        ]);
        let settings = read(Some(&file), &env).expect("reads");
        assert_eq!(settings.engine.windows.window_ns, 30 * NS);
        assert_eq!(settings.engine.baseline.half_life_ns, 120 * NS);
        assert_eq!(settings.engine.anomaly.resolve_windows, 5);
        assert_eq!(settings.engine.baseline.range, RangeConfig::of_width(0.1));
        let env = BTreeMap::from([("CANARYD_ANOMALY_DETECT_WINDOWS".to_string(), "0".to_string())]);
        let message = read(None, &env).expect_err("0 windows").to_string();
        assert!(message.contains("anomaly_detect_windows"), "{message}");
        let env = BTreeMap::from([("CANARYD_WINDOW_SECS".to_string(), "7".to_string())]);
        let message = read(None, &env)
            .expect_err("7 s does not divide an hour")
            .to_string();
        assert!(message.contains("window_secs"), "{message}");
    }
}
