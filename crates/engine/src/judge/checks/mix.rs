//! The operation mix check: whether the canary serves a different mix of operations than the
//! stable does over the same span (a broken route, a client retrying one call), by a chi-square
//! test of homogeneity of the two versions' requests per operation.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{Check, Feature, Group, Test, decide};
use super::{Evidence, Power, Significance, Spec, Tested, Thresholds, Windows, stable_grows};
use crate::judge::model::{Decision, OperationMixCheck};
use crate::judge::stats::chi_square_homogeneity;
use crate::window::Aggregate;

pub(super) fn operation_mix(m: &OperationMixCheck, d: &Decision, w: &Windows<'_>, t: &Thresholds) -> Check {
    let id = w.id(
        Group::OperationMix,
        Feature::app("operation_share"),
        Test::ChiSquare,
    );
    let sequential = w.sequential(&id);
    let mut spec = Spec::new(
        id,
        None,
        (m.critical, m.weight),
        t,
        m.min_distance,
        "total_variation",
    );
    if t.counting() {
        return super::counted(spec);
    }
    let mut evidence = Evidence::of_requests((None, None), &w.canary.all, &w.stable.all, w, d.min_requests);
    let ops: Vec<&Arc<str>> = w
        .canary
        .operations
        .keys()
        .chain(w.stable.operations.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let count = |a: &Aggregate, op: &Arc<str>| a.operations.get(op).map_or(0.0, |o| o.requests as f64);
    let counts = |a: &Aggregate| -> Vec<f64> { ops.iter().map(|op| count(a, op)).collect() };
    let (canary, stable) = (counts(w.canary), counts(w.stable));
    let (t_c, t_s) = (canary.iter().sum::<f64>(), stable.iter().sum::<f64>());
    if t_s <= 0.0 {
        return decide(spec, evidence, d.min_requests);
    }
    if ops.len() < 2 {
        evidence.power = Power::Waiting(format!(
            "fewer than two operations to compare; {} canary requests needed once there are",
            d.min_requests
        ));
        return decide(spec, evidence, d.min_requests);
    }
    let stable_shares: Vec<f64> = stable.iter().map(|s| s / t_s).collect();
    // The smallest change worth acting on that is hardest to see: `min_distance` of the requests
    // moving from the stable's most common operation to its second most common one.
    let mut by_share: Vec<usize> = (0..ops.len()).collect();
    by_share.sort_by(|a, b| stable_shares[*b].total_cmp(&stable_shares[*a]));
    let (from, to) = (by_share[0], by_share[1]);
    let shift = m.min_distance.min(stable_shares[from]);
    let shows = |n: u64| {
        let f = stable_grows(n, w.canary.all.requests);
        let n = n as f64;
        let moved: Vec<f64> = (0..ops.len())
            .map(|i| {
                let share = stable_shares[i] - if i == from { shift } else { 0.0 }
                    + if i == to { shift } else { 0.0 };
                share * n
            })
            .collect();
        let stable: Vec<f64> = stable.iter().map(|s| s * f).collect();
        homogeneity(&moved, &stable).is_some_and(|p| p < spec.alpha)
    };
    let effect = || format!("a {:.1}% shift in the operation mix", m.min_distance * 100.0);
    evidence.power = w.power(&spec, w.canary.all.requests, effect, shows);
    if t_c > 0.0 {
        // The operation whose share moved most names the change.
        let mut tvd = 0.0;
        let mut moved: Option<(&Arc<str>, f64, f64)> = None;
        for ((op, c), ss) in ops.iter().zip(&canary).zip(&stable_shares) {
            let sc = c / t_c;
            tvd += (sc - ss).abs() / 2.0;
            if moved.is_none_or(|(_, a, b)| (sc - ss).abs() > (a - b).abs()) {
                moved = Some((*op, sc, *ss));
            }
        }
        if let Some((op, sc, ss)) = moved {
            spec.operation = Some(op.to_string());
            evidence.canary_value = Some(sc);
            evidence.baseline_value = Some(ss);
        }
        evidence.test = homogeneity(&canary, &stable).map(|p| Tested {
            sequential,
            significance: Significance::PValue(p),
            effect: tvd,
            effect_ok: tvd >= m.min_distance,
            words: Box::new(move |failing| {
                let describe = moved.map_or(String::new(), |(op, sc, ss)| {
                    format!(
                        "; {op} is {:.1}% of requests against {:.1}%",
                        sc * 100.0,
                        ss * 100.0
                    )
                });
                let how = if failing { "moved by" } else { "within" };
                format!("operation mix {how} {:.1}%{describe}", tvd * 100.0)
            }),
        });
    }
    decide(spec, evidence, d.min_requests)
}

/// The p-value of the canary's and the stable's requests per operation coming from one mix.
fn homogeneity(canary: &[f64], stable: &[f64]) -> Option<f64> {
    chi_square_homogeneity(canary, stable).map(|(_, _, p)| p)
}
