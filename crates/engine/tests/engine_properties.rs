//! Properties of the engine that must hold for any input: out-of-order arrival within the allowed
//! lateness learns exactly what in-order arrival learns, and nothing a baseline says is NaN or
//! infinite.

use canaryd_engine::baseline::{Baseline, BaselineConfig, MemorySlotStore};
use canaryd_engine::rng::Rng;
use canaryd_engine::simulate;
use canaryd_engine::{
    Batch, Engine, EngineConfig, Identity, RequestObservation, ResourceObservations, SpanId, TraceId,
};
use proptest::prelude::*;

const S: u64 = 1_000_000_000;
const START: u64 = 1_767_571_200 * S;

/// (offset ns from START, duration ns, error, operation, version)
type Req = (u64, u64, bool, u8, u8);

fn engine() -> Engine {
    Engine::new(EngineConfig::default(), Box::new(MemorySlotStore::default()))
}

/// One request as the observations of a single-span export.
fn observed(&(offset, duration, error, op, version): &Req) -> ResourceObservations {
    let time = START + offset;
    let mut r = ResourceObservations::new(Identity::new("prod", "shop", &format!("v{version}")));
    r.spans = 1;
    r.saw(time);
    r.requests.push(RequestObservation {
        operation: format!("op{op}").into(),
        time,
        duration_ns: duration,
        error,
        trace_id: TraceId::default(),
        span_id: SpanId::default(),
        cohort: None,
    });
    r
}

/// One batch per request, as a stream of single-span exports.
fn feed(engine: &mut Engine, requests: &[Req]) {
    for request in requests {
        engine.ingest(&Batch {
            resources: vec![observed(request)],
            received: 0,
        });
    }
}

/// Every baseline's learned state, comparable.
fn learned(engine: &Engine) -> Vec<String> {
    let mut out = Vec::new();
    for version in [None, Some("v0"), Some("v1")] {
        if let Some(view) = engine.baselines("prod", "shop", version) {
            for (key, b) in view.baselines {
                out.push(format!(
                    "{version:?} {key} {} {:?} {:?}",
                    b.ewma.samples, b.last_value, b.last_score
                ));
            }
        }
    }
    out
}

/// Requests over about 30 minutes of event time.
fn traffic(seed: u64, n: usize) -> Vec<Req> {
    let mut rng = Rng::new(seed);
    let mut out: Vec<Req> = (0..n)
        .map(|_| {
            (
                rng.below(1_800 * S),
                1_000_000 + rng.below(200_000_000),
                rng.unit() < 0.05,
                rng.below(4) as u8,
                u8::from(rng.unit() < 0.2),
            )
        })
        .collect();
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn out_of_order_within_lateness_learns_the_same(seed in any::<u64>(), jitter_seed in any::<u64>()) {
        let ordered = traffic(seed, 3_000);
        // Each request is delayed by up to half the lateness: never past its bucket's closing.
        let lateness = EngineConfig::default().windows.lateness_ns;
        let mut rng = Rng::new(jitter_seed);
        let mut shuffled: Vec<(u64, Req)> = ordered.iter().map(|r| (r.0 + rng.below(lateness / 2), *r)).collect();
        shuffled.sort_by_key(|(key, _)| *key);
        let shuffled: Vec<Req> = shuffled.into_iter().map(|(_, r)| r).collect();

        let (mut a, mut b) = (engine(), engine());
        feed(&mut a, &ordered);
        feed(&mut b, &shuffled);
        let learned_a = learned(&a);
        prop_assert!(learned_a.len() > 10, "something was learned: {learned_a:?}");
        prop_assert_eq!(learned_a, learned(&b));
    }

    #[test]
    fn baselines_never_say_nan_or_infinity(values in prop::collection::vec(any::<f64>(), 1..200)) {
        let mut baseline = Baseline::default();
        let mut store = MemorySlotStore::default();
        let config = BaselineConfig { min_samples: 2, ..BaselineConfig::default() };
        for (i, x) in values.iter().enumerate() {
            let score = baseline.observe("s", *x, START + i as u64 * 60 * S, &config, &mut store);
            if let Some(v) = score.value() {
                prop_assert!(v.is_finite() && v >= 0.0, "score {} after {:?}", v, &values[..=i]);
            }
            prop_assert!(baseline.ewma.mean.is_finite() && baseline.ewma.variance.is_finite());
            prop_assert!(baseline.ewma.abs_error.is_finite());
            if let Some(q) = baseline.slot_quantiles() {
                prop_assert!(q.iter().all(|v| v.is_finite()), "{:?}", q);
            }
        }
    }
}

#[test]
fn the_app_baseline_learns_from_the_stable_version_only() {
    let mut engine = engine();
    let mut requests: Vec<Req> = Vec::new();
    for second in 0..1_200u64 {
        // v0 carries 9 requests a second, v1 one request every 10 s, with errors.
        for k in 0..9 {
            requests.push((second * S + k * 1_000_000, 20_000_000, false, 0, 0));
        }
        if second % 10 == 0 {
            requests.push((second * S + 500_000_000, 900_000_000, true, 1, 1));
        }
    }
    feed(&mut engine, &requests);
    let app = engine.baselines("prod", "shop", None).expect("app baselines");
    assert_eq!(app.stable_version, Some("v0"));
    let error_ratio = &app.baselines
        [&canaryd_engine::features::FeatureKey::app(canaryd_engine::features::Feature::ErrorRatio)];
    assert_eq!(
        error_ratio.last_value,
        Some(0.0),
        "v1's errors are not the app's norm"
    );
    let v1 = engine
        .baselines("prod", "shop", Some("v1"))
        .expect("v1 baselines");
    let v1_errors = &v1.baselines
        [&canaryd_engine::features::FeatureKey::app(canaryd_engine::features::Feature::ErrorRatio)];
    assert_eq!(v1_errors.last_value, Some(1.0));
    // 20 minutes of one-minute windows, less the one still open behind the watermark.
    assert!(error_ratio.ewma.samples >= 18, "{}", error_ratio.ewma.samples);
}

#[test]
fn late_data_is_counted_not_used() {
    let mut engine = engine();
    feed(
        &mut engine,
        &[
            (100 * S, 1, false, 0, 0),
            (200 * S, 1, false, 0, 0),
            (50 * S, 1, false, 0, 0),
        ],
    );
    let view = engine.baselines("prod", "shop", Some("v0")).expect("version");
    assert_eq!(view.late, 1);
    assert_eq!(view.clock.latest(), START + 200 * S);
    // 200 s stands alone: the watermark follows 100 s, which a later point vouched for.
    assert_eq!(view.clock.max_time, START + 100 * S);
}

#[test]
fn an_evicted_version_is_forgotten_with_its_baselines() {
    let limits = canaryd_engine::Limits {
        max_versions_per_app: 2,
        version_idle_ns: 600 * S,
        ..canaryd_engine::Limits::default()
    };
    let config = EngineConfig {
        limits,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(config, Box::new(MemorySlotStore::default()));
    // v0 for five minutes, then v1 for twenty: v0 is idle long enough to make room for v2.
    let mut requests: Vec<Req> = (0..300).map(|s| (s * S, 1_000_000, false, 0, 0)).collect();
    requests.extend((300..1_500).map(|s| (s * S, 1_000_000, false, 0, 1)));
    feed(&mut engine, &requests);
    assert!(engine.baselines("prod", "shop", Some("v0")).is_some());
    feed(&mut engine, &[(1_500 * S, 1_000_000, false, 0, 2)]);
    assert!(
        engine.baselines("prod", "shop", Some("v0")).is_none(),
        "v0 is forgotten"
    );
    let changes = engine.take_changes();
    assert_eq!(
        changes.forgotten_versions,
        vec![("prod".into(), "shop".into(), "v0".into())]
    );
    assert!(
        changes
            .baselines
            .iter()
            .all(|(id, _)| id.scope != canaryd_engine::Scope::Version("v0".into()))
    );
}

#[test]
fn an_error_jump_is_detected_within_two_windows_and_resolved_after_it_ends() {
    let mut engine = engine();
    let mut rng = Rng::new(5);
    let mut requests: Vec<Req> = Vec::new();
    // An hour at 5 requests a second with 1% errors, then 10 minutes at 40%, then 20 minutes at 1%.
    for second in 0..5_400u64 {
        let error_rate = if (3_600..4_200).contains(&second) {
            0.4
        } else {
            0.01
        };
        for k in 0..5 {
            requests.push((
                second * S + k * 150_000_000,
                20_000_000,
                rng.unit() < error_rate,
                0,
                0,
            ));
        }
    }
    let mut changes = Vec::new();
    for chunk in requests.chunks(50) {
        let batch = Batch {
            resources: chunk.iter().map(observed).collect(),
            received: 0,
        };
        changes.extend(engine.ingest(&batch).anomalies);
    }
    let error_changes: Vec<(canaryd_engine::anomaly::Transition, u64)> = changes
        .iter()
        .filter(|c| c.id.key.to_string() == "error_ratio")
        .map(|c| (c.transition, (c.time - START) / S))
        .collect();
    use canaryd_engine::anomaly::Transition::{Detected, Resolved};
    assert_eq!(error_changes.len(), 2, "{error_changes:?}");
    assert_eq!(error_changes[0].0, Detected);
    assert!(
        (3_660..=3_720).contains(&error_changes[0].1),
        "detected in a window or two: {error_changes:?}"
    );
    assert_eq!(error_changes[1].0, Resolved);
    // The quiet windows that resolve an anomaly, and two more for the window the fault ends in.
    let quiet_secs = (u64::from(canaryd_engine::anomaly::AnomalyRules::default().resolve_windows) + 2) * 60;
    assert!(
        (4_200..=4_200 + quiet_secs).contains(&error_changes[1].1),
        "resolved after the fault: {error_changes:?}"
    );
    let false_alarms: Vec<_> = changes.iter().filter(|c| (c.time - START) / S < 3_600).collect();
    assert!(
        false_alarms.is_empty(),
        "no anomaly before the fault: {false_alarms:?}"
    );
}

/// A stable app from Monday 00:00 for `days`, in a fresh engine (`simulate::stable_app`).
fn stable_app(
    seed: u64,
    days: u64,
    rps: f64,
    error: f64,
    fault: impl Fn(u64) -> Option<f64>,
) -> Vec<canaryd_engine::AnomalyChange> {
    simulate::stable_app(&mut engine(), seed, days, rps, error, fault)
}

/// Issue 14, class (c): a stable app over two days, no fault, raised anomalies at night on one
/// operation's error ratio: one failed request among a few dozen scored millions of band widths
/// against a baseline near 0.02%. Over seeds and traffic levels (at the lowest, the rarest
/// operation sees a request or two a minute at night), a stable app raises none.
#[test]
fn a_stable_app_raises_no_anomaly_from_a_few_requests_at_night() {
    let found: Vec<(u64, Vec<String>)> = [(1, 10.0), (2, 10.0), (3, 4.0)]
        .into_iter()
        .map(|(seed, rps)| {
            (
                seed,
                simulate::detected(&stable_app(seed, 2, rps, 0.0002, |_| None)),
            )
        })
        .filter(|(_, found)| !found.is_empty())
        .collect();
    let counts: Vec<(u64, usize)> = found.iter().map(|(seed, f)| (*seed, f.len())).collect();
    assert!(found.is_empty(), "anomalies per seed {counts:?}: {found:#?}");
}

/// The other side of class (c): a real error jump on a stable app is still caught within a
/// minute at ordinary traffic, for jumps of several sizes at several times of day.
#[test]
fn a_real_error_jump_on_a_stable_app_alerts_within_a_minute() {
    for (seed, hour, error) in [(4, 10, 0.02), (5, 14, 0.05), (6, 18, 0.02), (7, 21, 0.05)] {
        let onset = hour * 3_600;
        let changes = stable_app(seed, 1, 10.0, 0.0002, |second| {
            (onset..onset + 600).contains(&second).then_some(error)
        });
        let first = changes.iter().find(|c| {
            c.transition == canaryd_engine::anomaly::Transition::Detected
                && c.id.key.to_string() == "error_ratio"
        });
        let delay = first.map(|c| (c.time - START) / S - onset);
        assert!(
            delay.is_some_and(|d| d <= 60),
            "seed {seed}, {error} from {hour}:00: detected after {delay:?} s; {:#?}",
            simulate::detected(&changes)
        );
        let before: Vec<canaryd_engine::AnomalyChange> = changes
            .iter()
            .filter(|c| (c.time - START) / S < onset)
            .cloned()
            .collect();
        assert!(
            before.is_empty(),
            "seed {seed}: before the fault: {:#?}",
            simulate::detected(&before)
        );
    }
}
