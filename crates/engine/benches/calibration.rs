//! False alarms calibrated by simulation, and the time to detect real faults (issue 14, what done
//! looks like 2).
//!
//! Every run is a simulated service (`canaryd_engine::simulate`) fed into a fresh engine in event
//! time, so nothing sleeps and every figure repeats from its seeds:
//! - A/A: an identical canary for 15 minutes at 0.2, 2, 20 and 200 canary requests a second,
//!   under a flat load, a daily cycle and an hourly cycle with latency following load (each seed
//!   starts at another time of day or point in the hour), with heavy-tailed latency, with three
//!   cohorts (each judged on its own too), and with 40 operations of Zipf-skewed shares.
//!   Reported: the analyses that failed (a false failure), with a 95% upper bound, against the
//!   model's false-failure budget.
//! - Stable only: one version over four days under a daily cycle; every `anomaly.detected` is a
//!   false alarm. Reported per app-day. Four, so that the range band, which judges once it has
//!   learned for a day, judges most of them.
//! - Detection: a canary bad from its first request (errors 2x and 5x a 1% stable rate; the slowest
//!   2% of requests 1.5x and 2x slower, so the p99 moves and the median does not), at each traffic
//!   level: the event-time seconds from the canary's first request to its failure.
//!
//! `cargo bench -p canaryd-engine --bench calibration` runs it all, on every core:
//! `CALIBRATION_SEEDS` (default 1,000 per A/A condition), `CALIBRATION_DETECT_SEEDS` (50),
//! `CALIBRATION_ANOMALY_SEEDS` (20), `CALIBRATION_ANOMALY_DAYS` (4), `CALIBRATION_ONLY=<part of a condition's name>` to run some
//! (several parts separated by `|`), `CALIBRATION_THREADS` to use fewer cores, and
//! `CALIBRATION_VERBOSE=1` to print each false failure's checks and messages (and each
//! stable-only seed's false anomalies). An A/A run
//! costs 0.5 to 1.5 s of one core (several times that with 40 operations), so the defaults take
//! hours on two cores; BENCHMARKS.md says how many seeds each figure had. Under `cargo test` it
//! is a smoke run: one seed of the 20 requests-a-second conditions, shortened.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use canaryd_engine::baseline::MemorySlotStore;
use canaryd_engine::judge::model::Decision;
use canaryd_engine::simulate::{self, Fault, Latency, Load, Run, S, Service, long_stage, model, skewed};
use canaryd_engine::{Engine, EngineConfig};
use statrs::distribution::{Beta, ContinuousCDF};

/// The canary's request rates judged, and the share of the app's traffic it takes at each: a
/// tenth, except at the highest, where half keeps the simulation affordable.
const LEVELS: [(f64, f64); 4] = [(0.2, 0.1), (2.0, 0.1), (20.0, 0.1), (200.0, 0.5)];
/// The stable error rate every calibration run has: high enough that errors are seen at every
/// traffic level, so the error checks are exercised, not idle.
const BASE_ERROR: f64 = 0.01;
/// How long each A/A analysis runs, in event-time seconds.
const ANALYSIS_S: u64 = 900;

struct Plan {
    seeds: u64,
    detect_seeds: u64,
    anomaly_seeds: u64,
    analysis_s: u64,
    anomaly_days: u64,
    only: Option<String>,
    smoke: bool,
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: then this is a smoke run.
    let measuring = std::env::args().any(|a| a == "--bench");
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let plan = if measuring {
        Plan {
            seeds: env("CALIBRATION_SEEDS", 1_000),
            detect_seeds: env("CALIBRATION_DETECT_SEEDS", 50),
            anomaly_seeds: env("CALIBRATION_ANOMALY_SEEDS", 20),
            analysis_s: ANALYSIS_S,
            anomaly_days: env("CALIBRATION_ANOMALY_DAYS", 4),
            only: std::env::var("CALIBRATION_ONLY").ok(),
            smoke: false,
        }
    } else {
        Plan {
            seeds: 1,
            detect_seeds: 1,
            anomaly_seeds: 1,
            analysis_s: 120,
            anomaly_days: 1,
            only: None,
            smoke: true,
        }
    };
    let threads = threads();
    println!(
        "calibration: {} A/A seeds per condition, {} detection seeds, {} stable-only seeds, {} threads",
        plan.seeds, plan.detect_seeds, plan.anomaly_seeds, threads
    );
    a_a(&plan);
    anomalies(&plan);
    detection(&plan);
}

/// A condition's name, and the service it runs for a seed.
type Condition = (String, Box<dyn Fn(u64) -> Service + Sync>);

/// The A/A conditions.
fn a_a_conditions(analysis_s: u64) -> Vec<Condition> {
    let mut conditions: Vec<Condition> = Vec::new();
    let base = move |seed: u64, canary_rps: f64, share: f64| {
        let mut s = Service::new(seed, Fault::None);
        s.rps = canary_rps / share;
        s.canary_share = share;
        s.base_error = BASE_ERROR;
        s.warmup_s = 60;
        s.duration_s = analysis_s;
        s
    };
    // A load cycle with latency following load, each seed starting at another point of it.
    let cycled = move |seed: u64, canary_rps: f64, share: f64, (period_s, amplitude, latency_load)| {
        let mut s = base(seed, canary_rps, share);
        s.load = Load::Cycle { period_s, amplitude };
        s.latency_load = latency_load;
        s.offset_s = mix(seed) % period_s;
        s
    };
    for (canary_rps, share) in LEVELS {
        conditions.push((
            format!("flat, {canary_rps} canary req/s"),
            Box::new(move |seed| base(seed, canary_rps, share)),
        ));
        for (name, cycle) in [
            ("daily", (Load::DAILY, 0.9, 1.0)),
            ("hourly", (Load::HOURLY, 0.8, 1.5)),
        ] {
            conditions.push((
                format!("{name} cycle, {canary_rps} canary req/s"),
                Box::new(move |seed| cycled(seed, canary_rps, share, cycle)),
            ));
        }
    }
    conditions.push((
        "heavy-tailed latency, 20 canary req/s".into(),
        Box::new(move |seed| {
            let mut s = base(seed, 20.0, 0.1);
            s.latency = Latency::HeavyTail {
                sigma: 0.4,
                share: 0.03,
                index: 1.5,
            };
            s
        }),
    ));
    // Cohorts (issue 19): every span check also runs per cohort, one of them thin.
    conditions.push((
        "3 cohorts, 20 canary req/s".into(),
        Box::new(move |seed| {
            let mut s = base(seed, 20.0, 0.1);
            s.cohorts = vec![
                ("beta".into(), 0.1),
                ("gamma".into(), 0.3),
                ("internal".into(), 0.01),
            ];
            s
        }),
    ));
    conditions.push((
        "40 skewed operations, 20 canary req/s".into(),
        Box::new(move |seed| {
            let mut s = base(seed, 20.0, 0.1);
            s.operations = skewed(40);
            s
        }),
    ));
    conditions
}

fn a_a(plan: &Plan) {
    let d = Decision::default();
    println!();
    println!(
        "A/A: an identical canary for {} s. The default model's budget: {} over the whole analysis, however long, for every comparison with the stable together (sequential)",
        plan.analysis_s, d.false_failure_rate,
    );
    println!();
    println!("| condition | analyses | false failures | rate | 95% upper bound | checks that failed |");
    println!("|---|---|---|---|---|---|");
    for (name, service) in a_a_conditions(plan.analysis_s) {
        if !selected(plan, &name) || (plan.smoke && !name.ends_with(" 20 canary req/s")) {
            continue;
        }
        let started = std::time::Instant::now();
        let runs = par_map(plan.seeds, |seed| {
            let service = service(seed);
            let r = simulate::run(&service, model(long_stage()));
            let from = service.canary_from();
            r.failed_at().map(|t| {
                if std::env::var_os("CALIBRATION_VERBOSE").is_some() {
                    eprintln!("  seed {seed} failed at {} s: {:#?}", (t - from) / S, r.failed_on);
                }
                let checks: Vec<String> = r.failed_on.iter().map(|c| series_of(c).to_owned()).collect();
                ((t - from) / S, checks)
            })
        });
        let failed: Vec<&(u64, Vec<String>)> = runs.iter().flatten().collect();
        let mut checks: Vec<String> = failed.iter().flat_map(|(_, c)| c.clone()).collect();
        checks.sort();
        checks.dedup();
        println!(
            "| {name} | {} | {} | {:.4} | {:.4} | {} |",
            runs.len(),
            failed.len(),
            failed.len() as f64 / runs.len() as f64,
            upper_bound(failed.len() as u64, runs.len() as u64),
            if checks.is_empty() {
                "-".to_owned()
            } else {
                checks.join(", ")
            }
        );
        eprintln!("  ({name}: {:.0} s)", started.elapsed().as_secs_f64());
    }
}

fn anomalies(plan: &Plan) {
    println!();
    println!(
        "Stable only: one version for {} days from Monday 00:00 under a daily cycle (a tenth of the mean at midnight, 1.9 times at noon), 0.02% errors",
        plan.anomaly_days
    );
    println!();
    println!("| mean req/s | app-days | anomaly.detected | per app-day | 95% upper bound | features |");
    println!("|---|---|---|---|---|---|");
    for rps in [4.0, 10.0, 40.0] {
        let name = format!("stable only, {rps} req/s");
        if !selected(plan, &name) || (plan.smoke && rps > 4.0) {
            continue;
        }
        let started = std::time::Instant::now();
        let found = par_map(plan.anomaly_seeds, |seed| {
            let mut engine = Engine::new(EngineConfig::default(), Box::new(MemorySlotStore::default()));
            let changes =
                simulate::stable_app(&mut engine, 5_000 + seed, plan.anomaly_days, rps, 0.0002, |_| {
                    None
                });
            let detected = simulate::detected(&changes);
            if std::env::var_os("CALIBRATION_VERBOSE").is_some() && !detected.is_empty() {
                eprintln!("  seed {}: {detected:?}", 5_000 + seed);
            }
            detected
        });
        let days = plan.anomaly_seeds * plan.anomaly_days;
        let alarms: Vec<&String> = found.iter().flatten().collect();
        let mut features: Vec<String> = alarms
            .iter()
            .map(|a| a.split(" at ").next().unwrap_or(a).to_owned())
            .collect();
        features.sort();
        features.dedup();
        println!(
            "| {rps} | {days} | {} | {:.3} | {:.3} | {} |",
            alarms.len(),
            alarms.len() as f64 / days as f64,
            poisson_upper_bound(alarms.len() as u64) / days as f64,
            if features.is_empty() {
                "-".to_owned()
            } else {
                features.join(", ")
            }
        );
        eprintln!("  ({name}: {:.0} s)", started.elapsed().as_secs_f64());
    }
}

fn detection(plan: &Plan) {
    let faults = [
        ("errors 2x", Fault::ErrorRate(2.0 * BASE_ERROR)),
        ("errors 5x", Fault::ErrorRate(5.0 * BASE_ERROR)),
        ("p99 1.5x", Fault::TailLatency(1.5)),
        ("p99 2x", Fault::TailLatency(2.0)),
    ];
    println!();
    println!(
        "Detection: a canary bad from its first request, flat load, {BASE_ERROR} stable errors; event-time seconds from the canary's first request to its failure"
    );
    println!();
    println!("| fault | canary req/s | runs | caught | median s | p90 s | max s | within |");
    println!("|---|---|---|---|---|---|---|---|");
    for (fault_name, fault) in faults {
        for (canary_rps, share) in LEVELS {
            let name = format!("{fault_name}, {canary_rps} canary req/s");
            if !selected(plan, &name) || (plan.smoke && canary_rps != 20.0) {
                continue;
            }
            // Enough event time at each level for a few hundred canary requests at least.
            let duration_s = match canary_rps {
                r if r < 1.0 => 3_600,
                r if r < 10.0 => 1_800,
                _ => 600,
            }
            .min(if plan.smoke { 120 } else { u64::MAX });
            let started = std::time::Instant::now();
            let delays = par_map(plan.detect_seeds, |seed| {
                let mut s = Service::new(7_000 + seed, fault);
                s.rps = canary_rps / share;
                s.canary_share = share;
                s.base_error = BASE_ERROR;
                s.warmup_s = 60;
                s.duration_s = duration_s;
                s.fault_at_s = 0;
                let r: Run = simulate::run(&s, model(long_stage()));
                r.delay_s()
            });
            let mut caught: Vec<f64> = delays.iter().flatten().copied().collect();
            caught.sort_by(f64::total_cmp);
            let at = |q: f64| {
                if caught.is_empty() {
                    "-".to_owned()
                } else {
                    format!("{:.0}", caught[((caught.len() - 1) as f64 * q).round() as usize])
                }
            };
            println!(
                "| {fault_name} | {canary_rps} | {} | {} | {} | {} | {} | {duration_s} s |",
                delays.len(),
                caught.len(),
                at(0.5),
                at(0.9),
                at(1.0),
            );
            eprintln!("  ({name}: {:.0} s)", started.elapsed().as_secs_f64());
        }
    }
}

/// Whether condition `name` runs: every one, or those containing one of `CALIBRATION_ONLY`'s
/// `|`-separated parts.
fn selected(plan: &Plan, name: &str) -> bool {
    plan.only
        .as_deref()
        .is_none_or(|only| only.split('|').any(|part| name.contains(part)))
}

/// The threads the runs share: `CALIBRATION_THREADS`, else every core.
fn threads() -> usize {
    std::env::var("CALIBRATION_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// `f` of every seed in `0..seeds`, on every core, in the seeds' order.
fn par_map<T: Send>(seeds: u64, f: impl Fn(u64) -> T + Sync) -> Vec<T> {
    let next = AtomicU64::new(0);
    let out = Mutex::new(Vec::with_capacity(seeds as usize));
    let threads = threads();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= seeds {
                        break;
                    }
                    let result = f(seed);
                    out.lock().unwrap_or_else(|e| e.into_inner()).push((seed, result));
                }
            });
        }
    });
    let mut out = out.into_inner().unwrap_or_else(|e| e.into_inner());
    out.sort_by_key(|(seed, _)| *seed);
    out.into_iter().map(|(_, r)| r).collect()
}

/// A seed spread over 64 bits, for picking a start time from it.
fn mix(seed: u64) -> u64 {
    let mut x = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The one-sided 95% Clopper-Pearson upper bound on a rate of `x` in `n`.
fn upper_bound(x: u64, n: u64) -> f64 {
    if x >= n {
        return 1.0;
    }
    Beta::new((x + 1) as f64, (n - x) as f64).map_or(1.0, |b| b.inverse_cdf(0.95))
}

/// The one-sided 95% upper bound on a Poisson mean from `x` events: the mean at which `x` or
/// fewer have a 5% chance, which is the 95% quantile of Gamma(x + 1, 1).
fn poisson_upper_bound(x: u64) -> f64 {
    use statrs::distribution::Gamma;
    Gamma::new((x + 1) as f64, 1.0).map_or(f64::INFINITY, |g| g.inverse_cdf(0.95))
}

/// A failed check's series, `group:feature[subject]`, from its `group:feature[subject]:test:horizon`
/// id and message (a subject may hold colons: `cohort:beta/payments`).
fn series_of(failed: &str) -> &str {
    let id = failed.split(": ").next().unwrap_or(failed);
    id.rsplitn(3, ':').nth(2).unwrap_or(id)
}
