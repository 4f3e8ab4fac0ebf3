//! The operation mix check: whether the canary serves a different mix of operations than the
//! stable does (a broken route, a client retrying one call), by a chi-square goodness of fit.

use std::collections::BTreeSet;

use super::{Check, Feature, Group, Test, decide};
use super::{Evidence, Power, Significance, Spec, Tested, Thresholds, Windows};
use crate::judge::model::{Decision, OperationMixCheck};
use crate::judge::stats::chi_square_fit;
use crate::window::Aggregate;

pub(super) fn operation_mix(m: &OperationMixCheck, d: &Decision, w: &Windows<'_>, t: &Thresholds) -> Check {
    let id = w.id(
        Group::OperationMix,
        Feature::app("operation_share"),
        Test::ChiSquare,
    );
    let mut spec = Spec::new(
        id,
        None,
        (m.critical, m.weight),
        t,
        m.min_distance,
        "total_variation",
    );
    let mut evidence =
        Evidence::of_requests((None, None), &w.canary.all, &w.reference.all, w, d.min_requests);
    let ops: Vec<&String> = w
        .canary
        .operations
        .keys()
        .chain(w.reference.operations.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let count = |a: &Aggregate, op: &String| a.operations.get(op).map_or(0.0, |o| o.requests as f64);
    let total = |a: &Aggregate| a.operations.values().map(|o| o.requests as f64).sum::<f64>();
    let (t_c, t_r, t_s) = (total(w.canary), total(w.reference), total(w.stable));
    // The stable's shares, with half a request of each operation so that none is impossible.
    let shares = |reference: &Aggregate, t_ref: f64| -> Vec<f64> {
        ops.iter()
            .map(|op| (count(reference, op) + 0.5) / (t_ref + 0.5 * ops.len() as f64))
            .collect()
    };
    if t_r <= 0.0 {
        return decide(spec, evidence, d.min_requests);
    }
    let reference_shares = shares(w.reference, t_r);
    if ops.len() < 2 {
        evidence.power = Power::Waiting(format!(
            "fewer than two operations to compare; {} canary requests needed once there are",
            d.min_requests
        ));
        return decide(spec, evidence, d.min_requests);
    }
    // The smallest change worth acting on that is hardest to see: `min_distance` of the requests
    // moving from the stable's most common operation to its second most common one.
    let mut by_share: Vec<usize> = (0..ops.len()).collect();
    by_share.sort_by(|a, b| reference_shares[*b].total_cmp(&reference_shares[*a]));
    let (from, to) = (by_share[0], by_share[1]);
    let shift = m.min_distance.min(reference_shares[from]);
    let shows = |n: u64| {
        let n = n as f64;
        let moved: Vec<f64> = (0..ops.len())
            .map(|i| {
                let share = reference_shares[i] - if i == from { shift } else { 0.0 }
                    + if i == to { shift } else { 0.0 };
                share * n
            })
            .collect();
        fit(&moved, &reference_shares).is_some_and(|p| p < spec.alpha)
    };
    let effect = || format!("a {:.1}% shift in the operation mix", m.min_distance * 100.0);
    evidence.power = Power::of(w.canary.all.requests, effect, shows);
    if t_c > 0.0 {
        let observed: Vec<f64> = ops.iter().map(|op| count(w.canary, op)).collect();
        // The operation whose share moved most names the change.
        let mut tvd = 0.0;
        let mut moved: Option<(&String, f64, f64)> = None;
        for (op, o) in ops.iter().zip(&observed) {
            let (sc, sr) = (o / t_c, count(w.reference, op) / t_r);
            tvd += (sc - sr).abs() / 2.0;
            if moved.is_none_or(|(_, a, b)| (sc - sr).abs() > (a - b).abs()) {
                moved = Some((op, sc, sr));
            }
        }
        if let Some((op, sc, sr)) = moved {
            spec.operation = Some(op.clone());
            evidence.canary_value = Some(sc);
            evidence.baseline_value = Some(sr);
        }
        let describe = moved.map_or(String::new(), |(op, sc, sr)| {
            format!(
                "; {op} is {:.1}% of requests against {:.1}%",
                sc * 100.0,
                sr * 100.0
            )
        });
        let same_window = if t_s > 0.0 {
            fit(&observed, &shares(w.stable, t_s)).unwrap_or(1.0)
        } else {
            1.0
        };
        evidence.test = fit(&observed, &reference_shares).map(|reference| Tested {
            significance: Significance::PValue {
                reference,
                same_window,
            },
            effect: tvd,
            effect_ok: tvd >= m.min_distance,
            finding: format!("operation mix within {:.1}%{describe}", tvd * 100.0),
            failing: format!("operation mix moved by {:.1}%{describe}", tvd * 100.0),
        });
    }
    decide(spec, evidence, d.min_requests)
}

/// The chi-square p-value of the canary's `observed` counts per operation against the stable's
/// `shares`. Operations the canary would see fewer than 5 of are pooled, as the test needs.
fn fit(observed: &[f64], shares: &[f64]) -> Option<f64> {
    let n: f64 = observed.iter().sum();
    let mut o = Vec::new();
    let mut e = Vec::new();
    let (mut pooled_o, mut pooled_e) = (0.0, 0.0);
    for (count, share) in observed.iter().zip(shares) {
        if share * n < 5.0 {
            pooled_o += count;
            pooled_e += share;
        } else {
            o.push(*count);
            e.push(*share);
        }
    }
    if pooled_e > 0.0 {
        o.push(pooled_o);
        e.push(pooled_e);
    }
    chi_square_fit(&o, &e).map(|(_, _, p)| p)
}
