//! `canaryd-lab import`: teach the daemon's baselines from a metric history, so that a new
//! install does not wait weeks to learn seasonality.
//!
//! The history is a CSV or Parquet table with columns `timestamp`, `app`, `version`, `feature`,
//! `value` and optionally `env` (default `default`). `feature` is written as the API writes it:
//! `request_rate`, `latency_p95_ms`, `operation_share[GET /orders]`... A `version` of `*` or empty
//! teaches the app's own baseline, any other the version's. `timestamp` is a datetime (Parquet, or
//! text polars recognises, such as `2026-01-05 13:00:00` or RFC 3339), or a number of Unix seconds
//! (numbers too large for seconds are read as milliseconds, microseconds or nanoseconds).
//!
//! Rows go through the engine's own `Baseline` code in time order, one value per row as if a
//! window had yielded it, and the result is written to the data dir's store. The daemon must not
//! be running on that data dir (the store is locked). Rows that cannot be used are counted and the
//! first few reasons shown; they never stop the import.

use std::path::Path;

use anyhow::{Context, bail};
use canaryd_engine::features::FeatureKey;
use canaryd_engine::{BaselineId, Engine, EngineConfig, Scope};
use canaryd_store::{Store, StoreCounters};
use polars::prelude::*;

/// What an import did.
#[derive(Debug, Default, PartialEq)]
pub struct ImportSummary {
    pub rows: usize,
    pub imported: usize,
    pub skipped: usize,
    /// The first reasons rows were skipped, with their row numbers (1-based, data rows, in the
    /// file's order; for a CSV file its line too).
    pub reasons: Vec<String>,
    pub baselines: usize,
}

const SHOWN_REASONS: usize = 10;

/// The column of each row's 1-based place in the file.
const ROW: &str = "__canaryd_row";

/// Reads `file` into a frame sorted by time, with `timestamp` as nanoseconds since the epoch.
fn read_history(file: &Path) -> anyhow::Result<DataFrame> {
    let path = file.to_str().context("the history file's path must be UTF-8")?;
    // Said here once, in our words: polars names the cause and the path twice.
    std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    let extension = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let frame = match extension.as_str() {
        "csv" => LazyCsvReader::new(PlRefPath::from(path))
            .with_has_header(true)
            .with_try_parse_dates(true)
            // Infer types from every row, so a bad cell far down makes its column text (read
            // value by value) instead of failing the whole file.
            .with_infer_schema_length(None)
            .finish()?
            .collect()?,
        "parquet" | "pq" => {
            LazyFrame::scan_parquet(PlRefPath::from(path), ScanArgsParquet::default())?.collect()?
        }
        other => bail!(
            "{}: unknown history format {other:?}; use .csv or .parquet",
            file.display()
        ),
    };
    for column in ["timestamp", "app", "version", "feature", "value"] {
        if frame.column(column).is_err() {
            let have: Vec<String> = frame.get_column_names().iter().map(|c| c.to_string()).collect();
            bail!(
                "{}: no column {column:?} (columns: {})",
                file.display(),
                have.join(", ")
            );
        }
    }
    let ns = timestamp_ns(frame.column("timestamp")?.as_materialized_series())
        .with_context(|| format!("{}: column \"timestamp\"", file.display()))?;
    let mut frame = frame;
    frame.with_column(ns.with_name("timestamp".into()).into_column())?;
    // Rows are learned in time order, but reported by their place in the file.
    let frame = frame.with_row_index(ROW.into(), Some(1))?;
    Ok(frame.sort(
        ["timestamp"],
        SortMultipleOptions::default().with_maintain_order(true),
    )?)
}

/// The timestamps as nanoseconds since the epoch (nulls where unreadable).
fn timestamp_ns(column: &Series) -> anyhow::Result<Series> {
    let ns = match column.dtype() {
        DataType::Datetime(unit, _) => {
            let per = match unit {
                TimeUnit::Nanoseconds => 1i64,
                TimeUnit::Microseconds => 1_000,
                TimeUnit::Milliseconds => 1_000_000,
            };
            let raw = column.cast(&DataType::Int64)?;
            (raw.i64()? * per).into_series()
        }
        DataType::Date => {
            let days = column.cast(&DataType::Int64)?;
            (days.i64()? * 86_400_000_000_000i64).into_series()
        }
        dtype if dtype.is_primitive_numeric() => {
            let seconds = column.cast(&DataType::Float64)?;
            let ns: Int64Chunked = seconds
                .f64()?
                .iter()
                .map(|v| v.and_then(unix_number_to_ns))
                .collect();
            ns.into_series()
        }
        DataType::String => {
            let ns: Int64Chunked = column.str()?.iter().map(|v| v.and_then(text_to_ns)).collect();
            ns.into_series()
        }
        other => bail!("cannot read {other} as time: use datetimes, or numbers of Unix seconds"),
    };
    Ok(ns)
}

/// A time written as a number (see `unix_number_to_ns`) or as an RFC 3339 datetime (UTC when
/// it has no offset).
pub(crate) fn text_to_ns(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(v) = text.parse::<f64>() {
        return unix_number_to_ns(v);
    }
    let time = humantime::parse_rfc3339_weak(text).ok()?;
    let ns = time.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
    i64::try_from(ns).ok()
}

/// A Unix time number in seconds, milliseconds, microseconds or nanoseconds, by its magnitude.
fn unix_number_to_ns(v: f64) -> Option<i64> {
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    let ns = if v < 1e11 {
        v * 1e9
    } else if v < 1e14 {
        v * 1e6
    } else if v < 1e17 {
        v * 1e3
    } else {
        v
    };
    (ns < i64::MAX as f64).then_some(ns as i64)
}

fn text_column(frame: &DataFrame, name: &str) -> anyhow::Result<StringChunked> {
    match frame.column(name) {
        Ok(c) => Ok(c.cast(&DataType::String)?.str()?.clone()),
        Err(_) => Ok(StringChunked::full(name.into(), "default", frame.height())),
    }
}

/// Imports `file` into the store under `data_dir`, learning with `config`.
pub fn import(
    data_dir: &Path,
    file: &Path,
    config: EngineConfig,
    cache_bytes: u64,
) -> anyhow::Result<ImportSummary> {
    let frame = read_history(file)?;
    std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    let store: Store = Store::open(data_dir, cache_bytes, StoreCounters::default())?;
    let mut engine = Engine::new(config, Box::new(store.slot_store()));
    engine.set_archive(Box::new(store.archive()));
    engine.restore(store.load()?);

    let times = frame.column("timestamp")?.i64()?.clone();
    let apps = text_column(&frame, "app")?;
    let versions = text_column(&frame, "version")?;
    let features = text_column(&frame, "feature")?;
    let envs = text_column(&frame, "env")?;
    let values = frame.column("value")?.cast(&DataType::Float64)?.f64()?.clone();
    let places = frame.column(ROW)?.cast(&DataType::UInt64)?.u64()?.clone();
    let csv = file.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"));

    let mut summary = ImportSummary {
        rows: frame.height(),
        ..ImportSummary::default()
    };
    let rows = times
        .iter()
        .zip(apps.iter())
        .zip(versions.iter())
        .zip(features.iter())
        .zip(envs.iter())
        .zip(values.iter())
        .zip(places.iter());
    for ((((((time, app), version), feature), env), value), place) in rows {
        let parsed = (|| {
            let time = time.filter(|t| *t > 0).ok_or("no readable timestamp")?;
            let app = app.filter(|a| !a.is_empty()).ok_or("no app")?;
            let value = value.filter(|v| v.is_finite()).ok_or("no finite value")?;
            let key: FeatureKey = feature.ok_or("no feature")?.parse().map_err(|e: String| e)?;
            let scope = match version.unwrap_or("") {
                "" | "*" => Scope::App,
                v => Scope::Version(v.to_owned()),
            };
            let env = env.filter(|e| !e.is_empty()).unwrap_or("default");
            let id = BaselineId {
                env: env.to_owned(),
                app: app.to_owned(),
                scope,
                key,
            };
            Ok::<_, String>((id, value, time as u64))
        })();
        match parsed {
            Ok((id, value, time)) => {
                engine.learn_value(&id, value, time);
                summary.imported += 1;
            }
            Err(reason) => {
                summary.skipped += 1;
                if summary.reasons.len() < SHOWN_REASONS {
                    let place = place.unwrap_or_default();
                    summary.reasons.push(if csv {
                        // The header is line 1.
                        format!("row {place} (line {}): {reason}", place + 1)
                    } else {
                        format!("row {place}: {reason}")
                    });
                }
            }
        }
    }
    let changes = engine.take_changes();
    summary.baselines = changes.baselines.len();
    store.write(&changes)?;
    store.flush()?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MONDAY: i64 = 1_767_571_200;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write history");
        path
    }

    #[test]
    fn a_csv_history_teaches_baselines_that_the_daemon_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut csv = String::from("timestamp,env,app,version,feature,value\n");
        // Three weeks of one value per minute, a daily pattern, for the app and one version.
        for minute in 0..3 * 7 * 24 * 60 {
            let t = MONDAY + minute * 60;
            let hour = (minute / 60) % 24;
            let value = 100.0 + hour as f64;
            csv.push_str(&format!("{t},prod,shop,*,request_rate,{value}\n"));
        }
        csv.push_str("not-a-time,prod,shop,*,request_rate,1\n");
        csv.push_str(&format!("{MONDAY},prod,shop,1.0,latency,5\n"));
        csv.push_str(&format!("{MONDAY},prod,shop,1.0,operation_share[GET /a],0.5\n"));
        let file = write(dir.path(), "history.csv", &csv);
        let data = dir.path().join("data");
        let summary = import(&data, &file, EngineConfig::default(), 1 << 20).expect("import");
        assert_eq!(summary.rows, 3 * 7 * 24 * 60 + 3);
        assert_eq!(summary.imported, 3 * 7 * 24 * 60 + 1);
        assert_eq!(summary.skipped, 2, "{:?}", summary.reasons);
        // Reported by their place in the file, though learned in time order (the unreadable
        // time sorts first, the other two among the first minute's rows).
        let rows = 3 * 7 * 24 * 60;
        assert_eq!(summary.reasons.len(), 2, "{:?}", summary.reasons);
        assert_eq!(
            summary.reasons[0],
            format!("row {} (line {}): no readable timestamp", rows + 1, rows + 2)
        );
        let latency = format!(
            "row {} (line {}): unknown feature \"latency\"",
            rows + 2,
            rows + 3
        );
        assert!(summary.reasons[1].starts_with(&latency), "{:?}", summary.reasons);

        let store: Store = Store::open(&data, 1 << 20, StoreCounters::default()).expect("open");
        let mut engine = Engine::new(EngineConfig::default(), Box::new(store.slot_store()));
        engine.restore(store.load().expect("load"));
        let view = engine.baselines("prod", "shop", None).expect("app baselines");
        let rate = &view.baselines[&"request_rate".parse::<FeatureKey>().expect("key")];
        assert_eq!(rate.ewma.samples, 3 * 7 * 24 * 60);
        // The last slot learned is Sunday 23:00, whose values were 123.
        let [_, q50, _, _] = rate.slot_quantiles().expect("slot quantiles");
        assert!((q50 - 123.0).abs() < 123.0 * 0.03, "{q50}");
        let version = engine
            .baselines("prod", "shop", Some("1.0"))
            .expect("version baselines");
        assert_eq!(version.baselines.len(), 1);
    }

    #[test]
    fn a_parquet_history_with_datetimes_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = 120;
        let millis: Vec<i64> = (0..n).map(|i| (MONDAY + i * 60) * 1_000).collect();
        let timestamps = Int64Chunked::from_vec("timestamp".into(), millis)
            .into_datetime(TimeUnit::Milliseconds, None)
            .into_series();
        let text = |name: &str, v: &str| StringChunked::full(name.into(), v, n as usize).into_series();
        let values =
            Float64Chunked::from_vec("value".into(), (0..n).map(|i| i as f64).collect()).into_series();
        let mut frame = DataFrame::new_infer_height(vec![
            timestamps.into_column(),
            text("app", "shop").into_column(),
            text("version", "2.0").into_column(),
            text("feature", "latency_p95_ms").into_column(),
            values.into_column(),
        ])
        .expect("frame");
        let path = dir.path().join("history.parquet");
        let file = std::fs::File::create(&path).expect("create");
        ParquetWriter::new(file)
            .finish(&mut frame)
            .expect("write parquet");
        let summary =
            import(&dir.path().join("data"), &path, EngineConfig::default(), 1 << 20).expect("import");
        assert_eq!(
            (summary.imported, summary.skipped, summary.baselines),
            (120, 0, 1)
        );
    }

    #[test]
    fn missing_columns_and_unknown_formats_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write(
            dir.path(),
            "h.csv",
            "timestamp,app,feature,value\n1767571200,shop,request_rate,1\n",
        );
        let message = import(&dir.path().join("d"), &file, EngineConfig::default(), 1 << 20)
            .expect_err("no version column")
            .to_string();
        assert!(message.contains("\"version\""), "{message}");
        let file = write(dir.path(), "h.json", "{}");
        let message = import(&dir.path().join("d"), &file, EngineConfig::default(), 1 << 20)
            .expect_err("json")
            .to_string();
        assert!(message.contains(".csv or .parquet"), "{message}");
        let missing = dir.path().join("nope.csv");
        let message = format!(
            "{:#}",
            import(&dir.path().join("d"), &missing, EngineConfig::default(), 1 << 20).expect_err("no file")
        );
        assert_eq!(
            message.matches("os error 2").count(),
            1,
            "the cause once: {message}"
        );
        assert!(message.starts_with("cannot read "), "{message}");
    }

    #[test]
    fn unix_numbers_are_read_by_magnitude() {
        let s = 1_767_571_200.0;
        let ns = Some(1_767_571_200_000_000_000);
        assert_eq!(unix_number_to_ns(s), ns);
        assert_eq!(unix_number_to_ns(s * 1e3), ns);
        assert_eq!(unix_number_to_ns(s * 1e6), ns);
        assert_eq!(unix_number_to_ns(s * 1e9), ns);
        assert_eq!(unix_number_to_ns(-1.0), None);
        assert_eq!(text_to_ns("2026-01-05 00:00:00"), ns);
        assert_eq!(text_to_ns("2026-01-05T00:00:00Z"), ns);
        assert_eq!(text_to_ns(" 1767571200 "), ns);
        assert_eq!(text_to_ns("yesterday"), None);
    }
}
