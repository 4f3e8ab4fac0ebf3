//! The baseline checks: the canary's app-level features against the app's learned (seasonal)
//! baseline, beside the stable's own deviation in the same window, since a deviation both share is
//! the environment's, not the canary's. A check passes only on a window that could have shown its
//! minimum deviation (`Baseline::could_show_rise`): a rise in a count must be countable, a
//! quantile must have requests beyond it.

use std::collections::BTreeSet;

use super::{Check, CheckId, Feature, Group, Test, decide, thousands};
use super::{Evidence, Power, Significance, Spec, Tested};
use crate::baseline::{Baseline, BaselineConfig};
use crate::features::{FeatureKey, window_features};
use crate::judge::model::Model;
use crate::window::Aggregate;

/// The canary's window against the app's learned baseline, for each feature the model names.
pub fn baseline_checks(
    model: &Model,
    canary: &Aggregate,
    stable: &Aggregate,
    window_s: u64,
    baselines: &crate::vec_map::VecMap<FeatureKey, Baseline>,
    config: &BaselineConfig,
    out: &mut Vec<Check>,
) {
    let Some(b) = &model.checks.baseline else {
        return;
    };
    let min_requests = model.decision.min_requests;
    let secs = window_s.max(1) as f64;
    let known = BTreeSet::new();
    let value_of = |agg: &Aggregate, name: &str| {
        window_features(agg, secs, &known)
            .into_iter()
            .find(|f| f.key.subject.is_empty() && f.key.feature.name() == name)
    };
    for name in &b.features {
        let spec = Spec {
            id: CheckId {
                group: Group::Baseline,
                feature: Feature::app(name.clone()),
                test: Test::BaselineBand,
                horizon_s: window_s,
            },
            operation: None,
            critical: b.critical,
            weight: b.weight,
            alpha: 0.0,
            min_effect: b.max_deviation,
            effect_kind: "band_half_widths",
        };
        let key = name.parse::<FeatureKey>().ok();
        let baseline = key.as_ref().and_then(|k| baselines.get(k));
        let can = value_of(canary, name);
        let support = can.as_ref().map_or(0, |f| f.support);
        let mut evidence = Evidence {
            canary_value: can.as_ref().map(|f| f.value),
            baseline_value: baseline.map(|b| b.ewma.mean),
            canary_samples: support,
            baseline_samples: baseline.map_or(0, |b| b.ewma.samples),
            canary_requests: support,
            canary_rps: support as f64 / secs,
            test: None,
            power: Power::Enough,
        };
        // Could this window have shown the minimum deviation? Rates over the window do not
        // depend on the canary's requests: a window too short for them waits for a longer one.
        let power = |baseline: &Baseline, feature| {
            let effect = || {
                format!(
                    "{name} {} band half-widths above its learned level",
                    b.max_deviation
                )
            };
            let shows = |n| baseline.could_show_rise(feature, n, secs, b.max_deviation);
            match Power::of(support, effect, shows) {
                Power::Short { needed: None, .. } => Power::Waiting(format!(
                    "a {window_s} s window cannot show {name} {} band half-widths above its learned level, whatever the canary's requests: a longer horizon can",
                    b.max_deviation
                )),
                power => power,
            }
        };
        match (baseline.zip(key.as_ref()), &can) {
            (None, _) => {
                evidence.power = Power::Waiting(format!(
                    "no learned baseline of {name} yet; {} canary requests needed once there is",
                    thousands(min_requests)
                ));
            }
            // No canary value without canary requests: `decide` asks for as many as could show
            // the minimum deviation.
            (Some((baseline, key)), None) => evidence.power = power(baseline, key.feature),
            (Some((baseline, key)), Some(can)) => match baseline.deviation_of(can, config) {
                None => {
                    evidence.power = Power::Waiting(format!(
                        "the baseline of {name} is still learning; {} canary requests needed once it has",
                        thousands(min_requests)
                    ));
                }
                Some(dev) => {
                    let (value, mean) = (can.value, baseline.ewma.mean);
                    let stable_dev = value_of(stable, name)
                        .and_then(|f| baseline.deviation_of(&f, config))
                        .unwrap_or(0.0);
                    evidence.power = power(baseline, key.feature);
                    evidence.test = Some(Tested {
                        sequential: None,
                        // Only a rise is a regression for the features this check is meant for.
                        significance: Significance::Band {
                            canary: dev,
                            stable: stable_dev,
                            above: value > mean,
                        },
                        effect: dev,
                        effect_ok: true,
                        words: Box::new(move |failing| {
                            if failing {
                                format!(
                                    "{name} {value:.4} is {dev:.1} band half-widths outside the learned baseline (mean {mean:.4}); the stable is within it"
                                )
                            } else {
                                format!(
                                    "{name} {value:.4}, {dev:.1} half-widths from the learned baseline (mean {mean:.4})"
                                )
                            }
                        }),
                    });
                }
            },
        }
        out.push(decide(spec, evidence, min_requests));
    }
}
