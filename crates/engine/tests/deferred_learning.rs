//! Learning deferred (`Engine::defer_learning`, as the daemon runs the engine) learns exactly what
//! learning while each batch is applied learns: the same baselines, the same anomalies and the
//! same canary decisions, however the deferred learning is interleaved with the batches.

use canaryd_engine::baseline::{Baseline, MemorySlotStore};
use canaryd_engine::judge::CanaryChange;
use canaryd_engine::judge::model::BaselineCheck;
use canaryd_engine::rng::Rng;
use canaryd_engine::simulate;
use canaryd_engine::{
    AnomalyChange, Batch, Declaration, Engine, EngineConfig, Identity, IngestReport, RequestObservation,
    ResourceObservations, SpanId, TraceId,
};
use proptest::prelude::*;

const S: u64 = 1_000_000_000;
/// Monday 2026-01-05 00:00 UTC.
const START: u64 = 1_767_571_200 * S;
const MINUTES: u64 = 95;
const BATCH_SECS: u64 = 10;

/// The scenarios' model, with the check against the app's learned baseline too: an analysis
/// looks at what the app learned.
fn engine() -> Engine {
    let mut model = simulate::model(simulate::long_stage());
    model.checks.baseline = Some(BaselineCheck::default());
    let config = EngineConfig {
        models: vec![model],
        ..EngineConfig::default()
    };
    Engine::new(config, Box::new(MemorySlotStore::default()))
}

/// Three apps sending every 10 s, one batch holding all three, over an hour's turn:
/// - `steady`: one version throughout; a rollout of a version that never sends is declared at
///   minute 40 and ended at minute 50;
/// - `rolled`: a canary version takes a tenth of its requests from minute 70 (an inferred
///   analysis) and fails a third of them;
/// - `faulty`: one version, whose errors jump from minute 66 to 74 (an anomaly).
fn batches(seed: u64) -> Vec<Batch> {
    let mut rng = Rng::new(seed);
    let ops = ["GET /a", "GET /b", "POST /c"];
    let mut out = Vec::new();
    for chunk in (0..MINUTES * 60).step_by(BATCH_SECS as usize) {
        let mut resources = Vec::new();
        for app in ["steady", "rolled", "faulty"] {
            let mut by_version: Vec<(String, ResourceObservations)> = Vec::new();
            for second in chunk..chunk + BATCH_SECS {
                for k in 0..4 {
                    let time = START + second * S + k * 200_000_000 + rng.below(100_000_000);
                    let canary = app == "rolled" && second >= 70 * 60 && rng.unit() < 0.1;
                    let version = if canary { "2.0.0" } else { "1.0.0" };
                    let p_error = match app {
                        "faulty" if (66 * 60..74 * 60).contains(&second) => 0.3,
                        "rolled" if canary => 0.3,
                        _ => 0.01,
                    };
                    let at = match by_version.iter().position(|(v, _)| v == version) {
                        Some(at) => at,
                        None => {
                            by_version.push((
                                version.to_owned(),
                                ResourceObservations::new(Identity::new("prod", app, version)),
                            ));
                            by_version.len() - 1
                        }
                    };
                    let r = &mut by_version[at].1;
                    r.spans += 1;
                    r.saw(time);
                    r.requests.push(RequestObservation {
                        operation: ops[rng.below(3) as usize].into(),
                        time,
                        duration_ns: 5_000_000 + rng.below(40_000_000),
                        error: rng.unit() < p_error,
                        trace_id: TraceId::default(),
                        span_id: SpanId::default(),
                        cohort: None,
                    });
                }
            }
            resources.extend(by_version.into_iter().map(|(_, r)| r));
        }
        out.push(Batch {
            resources,
            received: 0,
        });
    }
    out
}

/// What an engine decided and learned.
#[derive(Debug, Default, PartialEq)]
struct Outcome {
    /// Sorted: deferred learning reports an app's anomalies later, among other apps' reports.
    anomalies: Vec<String>,
    canary: Vec<CanaryChange>,
    baselines: Vec<(String, Baseline)>,
}

impl Outcome {
    fn add(&mut self, report: IngestReport) {
        self.anomalies.extend(report.anomalies.iter().map(describe));
        self.canary.extend(report.canary);
    }

    fn finish(mut self, engine: &Engine) -> Self {
        self.anomalies.sort();
        for app in ["steady", "rolled", "faulty"] {
            for version in [None, Some("1.0.0"), Some("2.0.0")] {
                if let Some(view) = engine.baselines("prod", app, version) {
                    for (key, b) in view.baselines {
                        self.baselines
                            .push((format!("{app} {version:?} {key}"), b.clone()));
                    }
                }
            }
        }
        self
    }
}

fn describe(change: &AnomalyChange) -> String {
    format!("{:?}", change)
}

/// Feeds the batches; at minute 40 and 50 declares and ends `steady`'s rollout. `between` runs
/// after each batch, with the batch's index.
fn run(
    engine: &mut Engine,
    batches: &[Batch],
    mut between: impl FnMut(&mut Engine, usize, &mut Outcome),
) -> Outcome {
    let mut outcome = Outcome::default();
    let per_minute = (60 / BATCH_SECS) as usize;
    for (i, batch) in batches.iter().enumerate() {
        outcome.add(engine.ingest(batch));
        if i == 40 * per_minute {
            let declared = engine.declare_rollout(
                "prod",
                "steady",
                Declaration {
                    stable: "1.0.0",
                    canary: "9.9.9",
                    model: None,
                    replace: false,
                    traffic: None,
                },
            );
            outcome.canary.extend(declared.expect("steady is known"));
        }
        if i == 50 * per_minute {
            outcome
                .canary
                .push(engine.end_rollout("prod", "steady").expect("steady's rollout"));
        }
        between(engine, i, &mut outcome);
    }
    outcome
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    #[test]
    fn deferred_learning_learns_decides_and_alerts_the_same(seed in any::<u64>(), pace_seed in any::<u64>()) {
        let batches = batches(seed);
        let mut now = engine();
        let at_once = run(&mut now, &batches, |_, _, _| {}).finish(&now);

        let mut later = engine();
        later.defer_learning(true);
        let mut pace = Rng::new(pace_seed);
        let mut most_behind = 0;
        let deferred = run(&mut later, &batches, |engine, _, outcome| {
            most_behind = most_behind.max(engine.unlearned_windows());
            // Sometimes idle for a while, sometimes busy for several batches; now and then a
            // read that needs one app, or everything, learned.
            match pace.below(12) {
                0..=5 => {}
                6..=8 => {
                    for _ in 0..pace.below(4) {
                        outcome.add(engine.learn_deferred());
                    }
                }
                9 | 10 => {
                    // A read of one app's learned state.
                    let app = ["steady", "rolled", "faulty"][pace.below(3) as usize];
                    outcome.add(engine.learn_deferred_of("prod", app));
                }
                _ => outcome.add(engine.learn_all_deferred()),
            }
        });
        let mut deferred = deferred;
        deferred.add(later.learn_all_deferred());
        prop_assert!(!later.has_deferred());
        let deferred = deferred.finish(&later);

        prop_assert!(most_behind > 1, "learning was deferred: at most {most_behind} windows waited");
        prop_assert!(at_once.baselines.len() > 20, "something was learned: {:?}", at_once.baselines.len());
        prop_assert!(
            at_once.anomalies.iter().any(|a| a.contains("faulty")),
            "faulty's error jump was found: {:#?}", at_once.anomalies
        );
        prop_assert!(
            at_once.canary.iter().any(|c| &*c.view.canary_version == "2.0.0"),
            "rolled's canary was judged: {:#?}", at_once.canary
        );
        prop_assert_eq!(&at_once.anomalies, &deferred.anomalies);
        prop_assert_eq!(&at_once.canary, &deferred.canary);
        prop_assert_eq!(at_once.baselines.len(), deferred.baselines.len());
        for (a, b) in at_once.baselines.iter().zip(&deferred.baselines) {
            prop_assert_eq!(a, b);
        }
    }
}

/// An app with one version defers; a second version (a canary that may be inferred) or an
/// analysis makes it learn what waits before it is judged.
#[test]
fn an_app_that_may_be_judged_learns_what_waits_first() {
    let batches = batches(7);
    let mut engine = engine();
    engine.defer_learning(true);
    let per_minute = (60 / BATCH_SECS) as usize;
    let mut canary_started = false;
    for (i, batch) in batches.iter().enumerate() {
        let report = engine.ingest(batch);
        canary_started |= report.canary.iter().any(|c| &*c.view.canary_version == "2.0.0");
        if i + 1 == 69 * per_minute {
            // By minute 69 only single-version apps have closed windows: all of them wait.
            assert!(
                engine.unlearned_windows() >= 3 * 60,
                "{}",
                engine.unlearned_windows()
            );
        }
    }
    assert!(canary_started);
    // `rolled` has had two versions since minute 70: what it closed since was learned at once,
    // and what waited from before was learned first.
    let samples = |engine: &Engine, app: &str| -> Vec<u64> {
        let view = engine.baselines("prod", app, None).expect("a known app");
        view.baselines.iter().map(|(_, b)| b.ewma.samples).collect()
    };
    let rolled = samples(&engine, "rolled");
    assert!(
        rolled.iter().all(|n| *n >= 90),
        "rolled learned every window: {rolled:?}"
    );
    // `steady` learned what waited when its rollout was declared, and while it was analysed
    // (minutes 40 to 50); since, its windows wait.
    let steady = samples(&engine, "steady");
    assert!(steady.iter().all(|n| (40..=52).contains(n)), "{steady:?}");
    engine.learn_all_deferred();
    let steady = samples(&engine, "steady");
    assert!(steady.iter().all(|n| *n >= 90), "{steady:?}");
}

/// A read of one app's learned state learns that app's windows alone; the others' keep waiting
/// for the engine's idle moments.
#[test]
fn learning_one_app_leaves_the_others_waiting() {
    let batches = batches(11);
    let mut engine = engine();
    engine.defer_learning(true);
    let per_minute = (60 / BATCH_SECS) as usize;
    for batch in &batches[..30 * per_minute] {
        engine.ingest(batch);
    }
    let samples = |engine: &Engine, app: &str| -> Vec<u64> {
        let view = engine.baselines("prod", app, None).expect("a known app");
        view.baselines.iter().map(|(_, b)| b.ewma.samples).collect()
    };
    let waiting = engine.unlearned_windows();
    assert!(waiting >= 3 * 25, "{waiting}");
    engine.learn_deferred_of("prod", "faulty");
    let faulty = samples(&engine, "faulty");
    assert!(faulty.iter().all(|n| *n >= 25), "faulty learned: {faulty:?}");
    // Two apps of three still wait.
    let left = engine.unlearned_windows();
    assert!(
        (waiting / 2..=waiting * 2 / 3 + 1).contains(&left),
        "{left} of {waiting} left"
    );
    // An app unknown, or with nothing waiting, is no error.
    assert!(engine.learn_deferred_of("prod", "nobody").anomalies.is_empty());
    engine.learn_deferred_of("prod", "faulty");
}
