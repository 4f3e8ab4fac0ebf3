//! One look at a canary: every check of the model on every trailing window.
//!
//! Each check compares the canary's window with the stable version twice: against the stable's
//! longer reference (precise, and what the p-value is taken from) and against the stable in the
//! very same window (which must point the same way, at a loose level, so that a change shared by
//! both versions, such as a failing database, is never blamed on the canary). A check fails a look
//! only with both statistical significance and a practical effect from the model; when even the
//! smallest effect worth acting on could not reach significance on the data at hand, it says
//! `insufficient_data` instead of guessing.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::model::{Decision, Model};
use super::stats::{chi_square_fit, fisher_greater, rate_tails, z_of};
use crate::baseline::{Baseline, BaselineConfig};
use crate::features::{FeatureKey, window_features};
use crate::window::{Aggregate, RequestAggregate};

/// Shortest window on which a known downstream's calls per request are compared.
const MIN_EDGE_RATE_S: u64 = 30;

/// Counter points a window must hold before increments per request are compared.
const MIN_METRIC_POINTS: u64 = 3;

/// Level the same-window comparison must reach to confirm the reference comparison's direction.
pub const SAME_WINDOW_ALPHA: f64 = 0.05;

/// What one check concluded at one look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    InsufficientData,
    /// Failing at this look, not yet confirmed by enough looks in a row.
    Marginal,
    Fail,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::InsufficientData => "insufficient_data",
            Outcome::Marginal => "marginal",
            Outcome::Fail => "fail",
        }
    }
}

/// One check's evidence, as the API, events and `/metrics` show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    /// Unique within an analysis: `group:feature[subject]:test`.
    pub id: String,
    pub group: &'static str,
    pub feature: String,
    pub operation: Option<String>,
    pub test: &'static str,
    pub critical: bool,
    pub weight: f64,
    pub outcome: Outcome,
    pub canary_value: Option<f64>,
    /// The stable's value in the reference window (or the learned baseline's, for baseline checks).
    pub baseline_value: Option<f64>,
    pub canary_samples: u64,
    pub baseline_samples: u64,
    /// The test statistic as a normal deviate (or band half-widths for baseline checks).
    pub statistic: Option<f64>,
    pub p_value: Option<f64>,
    /// What the statistic had to reach.
    pub threshold: f64,
    /// The practical effect (ratio, difference or distance, per `effect_kind`) and its minimum.
    pub effect: Option<f64>,
    pub min_effect: f64,
    pub effect_kind: &'static str,
    pub window_s: u64,
    pub message: String,
}

impl Check {
    /// A check that has decided nothing yet: no statistic, no effect, no message; the fields that
    /// name and bound it are the caller's.
    fn undecided() -> Check {
        Check {
            id: String::new(),
            group: "",
            feature: String::new(),
            operation: None,
            test: "",
            critical: false,
            weight: 0.0,
            outcome: Outcome::InsufficientData,
            canary_value: None,
            baseline_value: None,
            canary_samples: 0,
            baseline_samples: 0,
            statistic: None,
            p_value: None,
            threshold: 0.0,
            effect: None,
            min_effect: 0.0,
            effect_kind: "",
            window_s: 0,
            message: String::new(),
        }
    }
}

/// Why a window with too few canary requests decides nothing.
fn too_few(requests: u64, d: &Decision) -> String {
    format!("{requests} canary requests, {} needed", d.min_requests)
}

/// The windows of one horizon.
pub struct Windows<'a> {
    pub horizon_s: u64,
    /// How much of the horizon the analysis has seen (it may have started more recently).
    pub seen_s: u64,
    pub canary: &'a Aggregate,
    pub stable: &'a Aggregate,
    pub reference: &'a Aggregate,
    pub dispersion: &'a Dispersion,
}

/// How much more the stable's event counts (calls to a downstream, exceptions of a type, error
/// logs, counter increments) vary between parts of its reference window than a Poisson count
/// would: 1 or more, per count. Calls cluster (an order makes two database calls, a product page
/// none), so a rate test that took them for independent events would find differences in noise;
/// the rate tests divide counts by this factor (quasi-Poisson).
#[derive(Clone, Debug, Default)]
pub struct Dispersion(BTreeMap<String, f64>);

impl Dispersion {
    /// From the parts (seconds or blocks) of the stable's reference window.
    pub fn of(parts: &[(crate::observation::EventTime, &Aggregate)]) -> Dispersion {
        // Each part's counts by key; a part without a key had none of it.
        let parts: Vec<(f64, BTreeMap<String, f64>)> = parts
            .iter()
            .filter(|(_, p)| p.all.requests > 0)
            .map(|(_, p)| {
                let mut counts = BTreeMap::new();
                for (d, (calls, _)) in &p.calls {
                    counts.insert(format!("call:{d}"), *calls as f64);
                }
                for (t, c) in &p.exceptions {
                    counts.insert(format!("exception:{t}"), *c as f64);
                }
                counts.insert("error_logs".to_owned(), p.error_logs as f64);
                for (series, m) in &p.metrics {
                    counts.insert(format!("metric:{series}"), m.increment);
                }
                (p.all.requests as f64, counts)
            })
            .collect();
        let keys: std::collections::BTreeSet<&String> = parts.iter().flat_map(|(_, c)| c.keys()).collect();
        let factors = keys
            .into_iter()
            .map(|key| {
                let pairs: Vec<(f64, f64)> = parts
                    .iter()
                    .map(|(n, counts)| (counts.get(key).copied().unwrap_or(0.0), *n))
                    .collect();
                (key.clone(), quasi_poisson_factor(&pairs))
            })
            .collect();
        Dispersion(factors)
    }

    pub fn get(&self, key: &str) -> f64 {
        self.0.get(key).copied().unwrap_or(1.0)
    }
}

/// Pearson's dispersion statistic over (count, exposure) pairs, at least 1.
fn quasi_poisson_factor(pairs: &[(f64, f64)]) -> f64 {
    let (sx, sn): (f64, f64) = pairs.iter().fold((0.0, 0.0), |(a, b), (x, n)| (a + x, b + n));
    if pairs.len() < 2 || sx <= 0.0 || sn <= 0.0 {
        return 1.0;
    }
    let rate = sx / sn;
    let chi: f64 = pairs
        .iter()
        .map(|(x, n)| (x - rate * n).powi(2) / (rate * n))
        .sum();
    (chi / (pairs.len() - 1) as f64).max(1.0)
}

#[derive(Clone, Debug, Default)]
pub struct Thresholds {
    by_check: BTreeMap<(&'static str, bool), f64>,
    fallback: f64,
}

/// The app-wide check's share of its group's false-alarm budget.
const APP_WIDE_SHARE: f64 = 0.6;

/// Whether a check is about the whole app (not one operation, downstream, type or series): its
/// feature names no subject. (The operation mix names the operation that moved most, but judges
/// the whole mix.)
fn app_wide(check: &Check) -> bool {
    !check.feature.contains('[')
}

impl Thresholds {
    /// `checks` are the checks of one provisional look over `horizons` trailing windows.
    pub fn new(decision: &Decision, checks: &[Check], horizons: usize) -> Thresholds {
        let looks: f64 = decision
            .horizons_s
            .iter()
            .map(|h| 2.0 * (3600.0 / (*h).max(1) as f64).max(1.0))
            .sum();
        // Per group: weight, app-wide checks, per-subject checks.
        let mut groups: BTreeMap<&'static str, (f64, usize, usize)> = BTreeMap::new();
        for c in checks {
            let g = groups.entry(c.group).or_insert((c.weight, 0, 0));
            if app_wide(c) {
                g.1 += 1;
            } else {
                g.2 += 1;
            }
        }
        // A group with weight 0 still gets a sliver of the budget, so that it can decide at all.
        let share = |w: f64| w.max(0.0) + 1.0;
        let total: f64 = groups.values().map(|(w, _, _)| share(*w)).sum();
        let per_look = decision.false_alarm_rate / looks;
        let per_horizon = |n: usize| n.div_ceil(horizons.max(1)).max(1) as f64;
        let mut by_check = BTreeMap::new();
        for (g, (w, wide, subjects)) in groups {
            let budget = per_look * share(w) / total;
            let wide_share = match (wide, subjects) {
                (0, _) => 0.0,
                (_, 0) => 1.0,
                _ => APP_WIDE_SHARE,
            };
            by_check.insert((g, true), budget * wide_share / per_horizon(wide));
            by_check.insert((g, false), budget * (1.0 - wide_share) / per_horizon(subjects));
        }
        Thresholds {
            by_check,
            fallback: per_look / checks.len().max(1) as f64,
        }
    }

    /// The same threshold for every check.
    pub fn uniform(p: f64) -> Thresholds {
        Thresholds {
            by_check: BTreeMap::new(),
            fallback: p,
        }
    }

    /// A threshold of 1 for every check: a provisional look, to count the checks.
    pub fn provisional() -> Thresholds {
        Thresholds {
            by_check: BTreeMap::new(),
            fallback: 1.0,
        }
    }

    pub fn get(&self, group: &str, app_wide: bool) -> f64 {
        self.by_check
            .iter()
            .find(|((g, w), _)| *g == group && *w == app_wide)
            .map_or(self.fallback, |(_, t)| *t)
    }

    /// The threshold that applies to `check`.
    pub fn of(&self, check: &Check) -> f64 {
        self.get(check.group, app_wide(check))
    }
}

/// Evaluates every check of `model` on one horizon's windows against the per-look p-values.
pub fn evaluate(model: &Model, w: &Windows<'_>, t: &Thresholds, out: &mut Vec<Check>) {
    let d = &model.decision;
    let c = &model.checks;
    if let Some(e) = &c.error_ratio {
        let mut subjects = vec![(None, &w.canary.all, &w.stable.all, &w.reference.all)];
        if e.per_operation {
            subjects.extend(operations(w));
        }
        for (op, can, same, reference) in subjects {
            let threshold = t.get("errors", op.is_none());
            out.push(error_ratio(
                e,
                d,
                op,
                can,
                same,
                reference,
                w.horizon_s,
                threshold,
            ));
        }
    }
    if let Some(l) = &c.latency {
        let mut subjects = vec![(None, &w.canary.all, &w.stable.all, &w.reference.all)];
        if l.per_operation {
            subjects.extend(operations(w));
        }
        for (op, can, same, reference) in subjects {
            for q in &l.quantiles {
                out.push(latency(
                    l,
                    d,
                    op.clone(),
                    *q,
                    can,
                    same,
                    reference,
                    w.horizon_s,
                    t.get("latency", op.is_none()),
                ));
            }
        }
    }
    if let Some(m) = &c.operation_mix {
        out.push(operation_mix(m, d, w, t.get("operation_mix", true)));
    }
    if let Some(g) = &c.call_graph {
        let downstreams: BTreeSet<&String> = w.canary.calls.keys().chain(w.reference.calls.keys()).collect();
        for ds in downstreams {
            out.push(call_graph(g, d, ds, w, t.get("call_graph", false)));
        }
    }
    if let Some(r) = &c.exceptions {
        let types: BTreeSet<&String> = w
            .canary
            .exceptions
            .keys()
            .chain(w.reference.exceptions.keys())
            .collect();
        for ty in types {
            let count = |a: &Aggregate| a.exceptions.get(ty).copied().unwrap_or(0) as f64;
            let counts = (count(w.canary), count(w.stable), count(w.reference));
            out.push(rate_check(
                r,
                d,
                "exceptions",
                format!("exception_rate[{ty}]"),
                &format!("exception:{ty}"),
                counts,
                w,
                t.get("exceptions", false),
            ));
        }
    }
    if let Some(r) = &c.error_logs {
        let counts = (
            w.canary.error_logs as f64,
            w.stable.error_logs as f64,
            w.reference.error_logs as f64,
        );
        out.push(rate_check(
            r,
            d,
            "error_logs",
            "error_log_rate".to_owned(),
            "error_logs",
            counts,
            w,
            t.get("error_logs", true),
        ));
    }
    if let Some(m) = &c.metrics
        && w.horizon_s >= m.min_horizon_s
    {
        let series: BTreeSet<_> = w
            .reference
            .metrics
            .iter()
            .filter(|(_, a)| a.increments > 0)
            .map(|(k, _)| k)
            .collect();
        for s in series {
            out.push(metric_rate(m, d, s, w, t.get("metrics", false)));
        }
    }
}

type Subject<'a> = (
    Option<String>,
    &'a RequestAggregate,
    &'a RequestAggregate,
    &'a RequestAggregate,
);

fn operations<'a>(w: &Windows<'a>) -> Vec<Subject<'a>> {
    static EMPTY: std::sync::OnceLock<RequestAggregate> = std::sync::OnceLock::new();
    let empty = EMPTY.get_or_init(RequestAggregate::default);
    w.canary
        .operations
        .iter()
        .map(|(op, can)| {
            (
                Some(op.clone()),
                can,
                w.stable.operations.get(op).unwrap_or(empty),
                w.reference.operations.get(op).unwrap_or(empty),
            )
        })
        .collect()
}

fn feature_name(feature: &str, op: &Option<String>) -> String {
    match op {
        Some(op) => format!("{feature}[{op}]"),
        None => feature.to_owned(),
    }
}

fn ratio(n: f64, d: f64) -> Option<f64> {
    (d > 0.0).then(|| n / d)
}

#[allow(clippy::too_many_arguments)]
fn error_ratio(
    e: &super::model::ErrorRatioCheck,
    d: &Decision,
    op: Option<String>,
    can: &RequestAggregate,
    same: &RequestAggregate,
    reference: &RequestAggregate,
    horizon_s: u64,
    threshold: f64,
) -> Check {
    let feature = feature_name("error_ratio", &op);
    let rc = ratio(can.errors as f64, can.requests as f64);
    let rs = ratio(reference.errors as f64, reference.requests as f64);
    let mut check = Check {
        id: format!("errors:{feature}:fisher_exact:{horizon_s}"),
        group: "errors",
        feature,
        operation: op,
        test: "fisher_exact",
        critical: e.critical,
        weight: e.weight,
        canary_value: rc,
        baseline_value: rs,
        canary_samples: can.requests,
        baseline_samples: reference.requests,
        threshold: z_of(threshold),
        min_effect: e.min_ratio,
        effect_kind: "ratio",
        window_s: horizon_s,
        ..Check::undecided()
    };
    let (Some(rc), Some(rs)) = (rc, rs) else {
        check.message = "no requests to compare".into();
        return check;
    };
    if can.requests < d.min_requests {
        check.message = too_few(can.requests, d);
        return check;
    }
    let p = fisher_greater(can.errors, can.requests, reference.errors, reference.requests);
    let p_same = fisher_greater(can.errors, can.requests, same.errors, same.requests);
    check.p_value = Some(p);
    check.statistic = Some(z_of(p));
    let effect_ok = rc >= rs * e.min_ratio && rc - rs >= e.min_increase;
    check.effect = Some(if rs > 0.0 { rc / rs } else { f64::INFINITY }.min(1e9));
    let pct = |r: f64| format!("{:.3}%", r * 100.0);
    if p < threshold && p_same < SAME_WINDOW_ALPHA && effect_ok {
        check.outcome = Outcome::Fail;
        check.message = format!(
            "error ratio {} against the stable's {} ({} of {} requests failed)",
            pct(rc),
            pct(rs),
            can.errors,
            can.requests
        );
        return check;
    }
    // Could the smallest effect worth acting on have shown on this many requests?
    let p1 = (rs * e.min_ratio).max(rs + e.min_increase).min(1.0);
    let expected = (p1 * can.requests as f64).ceil() as u64;
    if fisher_greater(expected, can.requests, reference.errors, reference.requests) >= threshold {
        check.message = format!(
            "{} canary requests cannot show an error ratio of {} against {}",
            can.requests,
            pct(p1),
            pct(rs)
        );
        return check;
    }
    check.outcome = Outcome::Pass;
    check.message = format!("error ratio {} against the stable's {}", pct(rc), pct(rs));
    check
}

#[allow(clippy::too_many_arguments)]
fn latency(
    l: &super::model::LatencyCheck,
    d: &Decision,
    op: Option<String>,
    q: f64,
    can: &RequestAggregate,
    same: &RequestAggregate,
    reference: &RequestAggregate,
    horizon_s: u64,
    threshold: f64,
) -> Check {
    let pct = (q * 100.0).round() as u32;
    let feature = feature_name(&format!("latency_p{pct}_ms"), &op);
    let stable_q = reference.latency_ms.quantile(q);
    let canary_q = can.latency_ms.quantile(q);
    let mut check = Check {
        id: format!("latency:{feature}:exceedance:{horizon_s}"),
        group: "latency",
        feature,
        operation: op,
        test: "exceedance",
        critical: l.critical,
        weight: l.weight,
        canary_value: canary_q,
        baseline_value: stable_q,
        canary_samples: can.requests,
        baseline_samples: reference.requests,
        threshold: z_of(threshold),
        min_effect: l.min_ratio,
        effect_kind: "ratio",
        window_s: horizon_s,
        ..Check::undecided()
    };
    let (Some(stable_q), Some(canary_q)) = (stable_q, canary_q) else {
        check.message = "no requests to compare".into();
        return check;
    };
    if can.requests < d.min_requests {
        check.message = too_few(can.requests, d);
        return check;
    }
    // How many requests of each lie above the stable's quantile: the canary's share of them
    // grows when its distribution moves up anywhere at or beyond that quantile.
    let above = |a: &RequestAggregate| a.latency_ms.count_above(stable_q).round() as u64;
    let (e_c, e_s, e_r) = (above(can), above(same), above(reference));
    let p = fisher_greater(e_c, can.requests, e_r, reference.requests);
    let p_same = fisher_greater(e_c, can.requests, e_s, same.requests);
    check.p_value = Some(p);
    check.statistic = Some(z_of(p));
    let effect = if stable_q > 0.0 { canary_q / stable_q } else { 1.0 };
    check.effect = Some(effect);
    let effect_ok = effect >= l.min_ratio && canary_q - stable_q >= l.min_increase_ms;
    if p < threshold && p_same < SAME_WINDOW_ALPHA && effect_ok {
        check.outcome = Outcome::Fail;
        check.message = format!(
            "p{pct} {canary_q:.1} ms against the stable's {stable_q:.1} ms; {e_c} of {} canary requests above it",
            can.requests
        );
        return check;
    }
    let expected_above = can.requests as f64 * (1.0 - q);
    if expected_above < 1.0
        || fisher_greater(can.requests, can.requests, e_r, reference.requests) >= threshold
    {
        check.message = format!("{} canary requests are too few to judge p{pct}", can.requests);
        return check;
    }
    check.outcome = Outcome::Pass;
    check.message = format!("p{pct} {canary_q:.1} ms against the stable's {stable_q:.1} ms");
    check
}

fn operation_mix(
    m: &super::model::OperationMixCheck,
    d: &Decision,
    w: &Windows<'_>,
    threshold: f64,
) -> Check {
    let n_c = w.canary.all.requests;
    let mut check = Check {
        id: format!("operation_mix:operation_share:chi_square:{}", w.horizon_s),
        group: "operation_mix",
        feature: "operation_share".into(),
        operation: None,
        test: "chi_square",
        critical: m.critical,
        weight: m.weight,
        canary_value: None,
        baseline_value: None,
        canary_samples: n_c,
        baseline_samples: w.reference.all.requests,
        threshold: z_of(threshold),
        min_effect: m.min_distance,
        effect_kind: "total_variation",
        window_s: w.horizon_s,
        ..Check::undecided()
    };
    if n_c < d.min_requests || w.reference.all.requests == 0 {
        check.message = too_few(n_c, d);
        return check;
    }
    let ops: BTreeSet<&String> = w
        .canary
        .operations
        .keys()
        .chain(w.reference.operations.keys())
        .collect();
    let count = |a: &Aggregate, op: &String| a.operations.get(op).map_or(0.0, |o| o.requests as f64);
    let total = |a: &Aggregate| a.operations.values().map(|o| o.requests as f64).sum::<f64>();
    let (t_c, t_r, t_s) = (total(w.canary), total(w.reference), total(w.stable));
    if t_c <= 0.0 || t_r <= 0.0 {
        check.message = "no operations to compare".into();
        return check;
    }
    // The operation whose share moved most names the change.
    let mut tvd = 0.0;
    let mut moved: Option<(&String, f64, f64)> = None;
    for op in &ops {
        let (sc, sr) = (count(w.canary, op) / t_c, count(w.reference, op) / t_r);
        tvd += (sc - sr).abs() / 2.0;
        if moved.is_none_or(|(_, a, b)| (sc - sr).abs() > (a - b).abs()) {
            moved = Some((op, sc, sr));
        }
    }
    check.effect = Some(tvd);
    // Operations the canary would see fewer than 5 of are pooled, as the chi-square needs.
    let fit = |reference: &Aggregate, t_ref: f64| {
        let mut observed = Vec::new();
        let mut expected = Vec::new();
        let (mut pooled_o, mut pooled_e) = (0.0, 0.0);
        for op in &ops {
            let share = (count(reference, op) + 0.5) / (t_ref + 0.5 * ops.len() as f64);
            if share * t_c < 5.0 {
                pooled_o += count(w.canary, op);
                pooled_e += share;
            } else {
                observed.push(count(w.canary, op));
                expected.push(share);
            }
        }
        if pooled_e > 0.0 {
            observed.push(pooled_o);
            expected.push(pooled_e);
        }
        chi_square_fit(&observed, &expected)
    };
    let Some((_, _, p)) = fit(w.reference, t_r) else {
        check.message = "fewer than two operations to compare".into();
        return check;
    };
    let p_same = if t_s > 0.0 {
        fit(w.stable, t_s).map_or(1.0, |(_, _, p)| p)
    } else {
        1.0
    };
    check.p_value = Some(p);
    check.statistic = Some(z_of(p));
    if let Some((op, sc, sr)) = moved {
        check.operation = Some(op.clone());
        check.canary_value = Some(sc);
        check.baseline_value = Some(sr);
    }
    let describe = moved.map_or(String::new(), |(op, sc, sr)| {
        format!(
            "; {op} is {:.1}% of requests against {:.1}%",
            sc * 100.0,
            sr * 100.0
        )
    });
    if p < threshold && p_same < SAME_WINDOW_ALPHA && tvd >= m.min_distance {
        check.outcome = Outcome::Fail;
        check.message = format!("operation mix moved by {:.1}%{describe}", tvd * 100.0);
    } else {
        check.outcome = Outcome::Pass;
        check.message = format!("operation mix within {:.1}%{describe}", tvd * 100.0);
    }
    check
}

fn call_graph(
    g: &super::model::CallGraphCheck,
    d: &Decision,
    downstream: &str,
    w: &Windows<'_>,
    threshold: f64,
) -> Check {
    let calls = |a: &Aggregate| a.calls.get(downstream).map_or(0, |c| c.0) as f64;
    let (n_c, n_s, n_r) = (
        w.canary.all.requests as f64,
        w.stable.all.requests as f64,
        w.reference.all.requests as f64,
    );
    let (x_c, x_s, x_r) = (calls(w.canary), calls(w.stable), calls(w.reference));
    let cpr_c = ratio(x_c, n_c);
    let cpr_r = ratio(x_r, n_r);
    let mut check = Check {
        id: format!("call_graph:calls_per_request[{downstream}]:rate:{}", w.horizon_s),
        group: "call_graph",
        feature: format!("calls_per_request[{downstream}]"),
        operation: None,
        test: "poisson_rate",
        critical: g.critical,
        weight: g.weight,
        canary_value: cpr_c,
        baseline_value: cpr_r,
        canary_samples: w.canary.all.requests,
        baseline_samples: w.reference.all.requests,
        threshold: z_of(threshold),
        min_effect: g.min_ratio,
        effect_kind: "ratio",
        window_s: w.horizon_s,
        ..Check::undecided()
    };
    let (Some(cpr_c), Some(cpr_r)) = (cpr_c, cpr_r) else {
        check.message = "no requests to compare".into();
        return check;
    };
    if w.canary.all.requests < d.min_requests {
        check.message = too_few(w.canary.all.requests, d);
        return check;
    }
    // How many calls a request makes depends on its operation, so over a few seconds the
    // operation mix alone moves calls per request far more than a count model allows: a known
    // edge's rate is judged on windows of `MIN_EDGE_RATE_S` or more. A new edge needs no such care.
    if x_r > 0.0 && w.horizon_s < MIN_EDGE_RATE_S {
        check.message =
            format!("calls per request to {downstream} are judged over {MIN_EDGE_RATE_S} s or more");
        return check;
    }
    let phi = w.dispersion.get(&format!("call:{downstream}"));
    let (up, down) = rate_tails(x_c / phi, n_c, x_r / phi, n_r);
    let (up_same, down_same) = rate_tails(x_c / phi, n_c, x_s / phi, n_s);
    let (p, p_same, grew) = if up <= down {
        ((2.0 * up).min(1.0), up_same, true)
    } else {
        ((2.0 * down).min(1.0), down_same, false)
    };
    check.p_value = Some(p);
    check.statistic = Some(z_of(p));
    let effect = if cpr_r > 0.0 {
        cpr_c / cpr_r
    } else if cpr_c > 0.0 {
        f64::INFINITY
    } else {
        1.0
    };
    check.effect = Some(effect.min(1e9));
    let big = (cpr_c - cpr_r).abs() >= g.min_change && (effect >= g.min_ratio || effect <= 1.0 / g.min_ratio);
    let what = if x_r == 0.0 && grew {
        format!("new downstream edge to {downstream}: {cpr_c:.3} calls per request")
    } else if x_c == 0.0 && !grew {
        format!("edge to {downstream} vanished: it had {cpr_r:.3} calls per request")
    } else {
        format!("calls per request to {downstream}: {cpr_c:.3} against the stable's {cpr_r:.3}")
    };
    if p < threshold && p_same < SAME_WINDOW_ALPHA && big {
        check.outcome = Outcome::Fail;
    } else {
        check.outcome = Outcome::Pass;
    }
    check.message = what;
    check
}

/// Events per request that must not grow: exceptions of one type, error logs.
#[allow(clippy::too_many_arguments)]
fn rate_check(
    r: &super::model::RateCheck,
    d: &Decision,
    group: &'static str,
    feature: String,
    dispersion_key: &str,
    (x_c, x_s, x_r): (f64, f64, f64),
    w: &Windows<'_>,
    threshold: f64,
) -> Check {
    let phi = w.dispersion.get(dispersion_key);
    let (n_c, n_s, n_r) = (
        w.canary.all.requests as f64,
        w.stable.all.requests as f64,
        w.reference.all.requests as f64,
    );
    let rate_c = ratio(x_c, n_c);
    let rate_r = ratio(x_r, n_r);
    let mut check = Check {
        id: format!("{group}:{feature}:rate:{}", w.horizon_s),
        group,
        feature: feature.clone(),
        operation: None,
        test: "poisson_rate",
        critical: r.critical,
        weight: r.weight,
        canary_value: rate_c,
        baseline_value: rate_r,
        canary_samples: w.canary.all.requests,
        baseline_samples: w.reference.all.requests,
        threshold: z_of(threshold),
        min_effect: r.min_ratio,
        effect_kind: "ratio",
        window_s: w.horizon_s,
        ..Check::undecided()
    };
    let (Some(rate_c), Some(rate_r)) = (rate_c, rate_r) else {
        check.message = "no requests to compare".into();
        return check;
    };
    if w.canary.all.requests < d.min_requests {
        check.message = too_few(w.canary.all.requests, d);
        return check;
    }
    let (p, _) = rate_tails(x_c / phi, n_c, x_r / phi, n_r);
    let (p_same, _) = rate_tails(x_c / phi, n_c, x_s / phi, n_s);
    check.p_value = Some(p);
    check.statistic = Some(z_of(p));
    check.effect = Some(
        if rate_r > 0.0 {
            rate_c / rate_r
        } else {
            f64::INFINITY
        }
        .min(1e9),
    );
    let effect_ok = rate_c >= rate_r * r.min_ratio && rate_c - rate_r >= r.min_increase;
    let new = x_r == 0.0 && x_c > 0.0;
    if p < threshold && p_same < SAME_WINDOW_ALPHA && effect_ok {
        check.outcome = Outcome::Fail;
        check.message = if new {
            format!("{feature}: new on the canary, {rate_c:.4} per request")
        } else {
            format!("{feature}: {rate_c:.4} per request against the stable's {rate_r:.4}")
        };
        return check;
    }
    let target = (rate_r * r.min_ratio).max(rate_r + r.min_increase);
    let (p_target, _) = rate_tails((target * n_c).ceil() / phi, n_c, x_r / phi, n_r);
    if p_target >= threshold {
        check.message = format!(
            "{} canary requests cannot show {feature} of {target:.4} per request",
            w.canary.all.requests
        );
        return check;
    }
    check.outcome = Outcome::Pass;
    check.message = format!("{feature}: {rate_c:.4} per request against the stable's {rate_r:.4}");
    check
}

fn metric_rate(
    m: &super::model::MetricsCheck,
    d: &Decision,
    series: &crate::observation::SeriesKey,
    w: &Windows<'_>,
    threshold: f64,
) -> Check {
    let inc = |a: &Aggregate| a.metrics.get(series).map_or(0.0, |s| s.increment);
    let (n_c, n_s, n_r) = (
        w.canary.all.requests as f64,
        w.stable.all.requests as f64,
        w.reference.all.requests as f64,
    );
    let (x_c, x_s, x_r) = (inc(w.canary), inc(w.stable), inc(w.reference));
    let name = series.to_string();
    let per_c = ratio(x_c, n_c);
    let per_r = ratio(x_r, n_r);
    let mut check = Check {
        id: format!("metrics:metric_rate[{name}]:rate:{}", w.horizon_s),
        group: "metrics",
        feature: format!("metric_rate[{name}]"),
        operation: None,
        test: "poisson_rate",
        critical: m.critical,
        weight: m.weight,
        canary_value: per_c,
        baseline_value: per_r,
        canary_samples: w.canary.all.requests,
        baseline_samples: w.reference.all.requests,
        threshold: z_of(threshold),
        min_effect: m.min_ratio,
        effect_kind: "ratio",
        window_s: w.horizon_s,
        ..Check::undecided()
    };
    let (Some(per_c), Some(per_r)) = (per_c, per_r) else {
        check.message = "no requests to compare".into();
        return check;
    };
    // Counter points come every few seconds and a new series' first point carries no increment:
    // compare only windows the analysis saw whole, holding several of the canary's points.
    let points = w.canary.metrics.get(series).map_or(0, |s| s.increments);
    if w.seen_s < w.horizon_s || points < MIN_METRIC_POINTS {
        check.message = format!(
            "{points} canary points of {name} over {} s seen, {MIN_METRIC_POINTS} points over {} s needed",
            w.seen_s, w.horizon_s
        );
        return check;
    }
    if w.canary.all.requests < d.min_requests || per_r <= 0.0 {
        check.message = too_few(w.canary.all.requests, d);
        return check;
    }
    let phi = w.dispersion.get(&format!("metric:{series}"));
    let (up, down) = rate_tails(x_c / phi, n_c, x_r / phi, n_r);
    let (up_same, down_same) = rate_tails(x_c / phi, n_c, x_s / phi, n_s);
    let (p, p_same) = if up <= down {
        ((2.0 * up).min(1.0), up_same)
    } else {
        ((2.0 * down).min(1.0), down_same)
    };
    check.p_value = Some(p);
    check.statistic = Some(z_of(p));
    let effect = per_c / per_r;
    check.effect = Some(effect);
    let big = effect >= m.min_ratio || effect <= 1.0 / m.min_ratio;
    check.outcome = if p < threshold && p_same < SAME_WINDOW_ALPHA && big {
        Outcome::Fail
    } else {
        Outcome::Pass
    };
    check.message = format!("{name}: {per_c:.4} per request against the stable's {per_r:.4}");
    check
}

/// The canary's window against the app's learned baseline, beside the stable's own deviation in
/// the same window: a deviation both share is the environment's, not the canary's.
pub fn baseline_checks(
    model: &Model,
    canary: &Aggregate,
    stable: &Aggregate,
    window_s: u64,
    baselines: &BTreeMap<FeatureKey, Baseline>,
    config: &BaselineConfig,
    out: &mut Vec<Check>,
) {
    let Some(b) = &model.checks.baseline else {
        return;
    };
    let secs = window_s.max(1) as f64;
    let known = BTreeSet::new();
    let value_of = |agg: &Aggregate, name: &str| {
        window_features(agg, secs, &known)
            .into_iter()
            .find(|f| f.key.subject.is_empty() && f.key.feature.name() == name)
    };
    for name in &b.features {
        let key = name.parse::<FeatureKey>().ok();
        let baseline = key.as_ref().and_then(|k| baselines.get(k));
        let can = value_of(canary, name);
        let mut check = Check {
            id: format!("baseline:{name}:band:{window_s}"),
            group: "baseline",
            feature: name.clone(),
            operation: None,
            test: "baseline_band",
            critical: b.critical,
            weight: b.weight,
            canary_value: can.as_ref().map(|f| f.value),
            baseline_value: baseline.map(|b| b.ewma.mean),
            canary_samples: can.as_ref().map_or(0, |f| f.support),
            baseline_samples: baseline.map_or(0, |b| b.ewma.samples),
            threshold: b.max_deviation,
            min_effect: b.max_deviation,
            effect_kind: "band_half_widths",
            window_s,
            ..Check::undecided()
        };
        let (Some(baseline), Some(can)) = (baseline, can) else {
            check.message = "no learned baseline or no canary value yet".into();
            out.push(check);
            continue;
        };
        if can.support < model.decision.min_requests {
            check.message = too_few(can.support, &model.decision);
            out.push(check);
            continue;
        }
        let Some(dev) = baseline.deviation(can.value, config) else {
            check.message = "the baseline is still learning".into();
            out.push(check);
            continue;
        };
        let stable_dev = value_of(stable, name)
            .and_then(|f| baseline.deviation(f.value, config))
            .unwrap_or(0.0);
        check.statistic = Some(dev);
        check.effect = Some(dev);
        // Only a rise is a regression for the features this check is meant for.
        let above = can.value > baseline.ewma.mean;
        if dev >= b.max_deviation && above && stable_dev < b.max_deviation / 2.0 {
            check.outcome = Outcome::Fail;
            check.message = format!(
                "{name} {:.4} is {dev:.1} band half-widths outside the learned baseline (mean {:.4}); the stable is within it",
                can.value, baseline.ewma.mean
            );
        } else {
            check.outcome = Outcome::Pass;
            check.message = format!(
                "{name} {:.4}, {dev:.1} half-widths from the learned baseline (mean {:.4})",
                can.value, baseline.ewma.mean
            );
        }
        out.push(check);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::model::Decision;

    fn check(group: &'static str, feature: &str, operation: Option<&str>) -> Check {
        Check {
            id: format!("{group}:{feature}"),
            group,
            feature: feature.into(),
            operation: operation.map(str::to_owned),
            test: "t",
            critical: true,
            weight: 10.0,
            outcome: Outcome::Pass,
            canary_value: None,
            baseline_value: None,
            canary_samples: 0,
            baseline_samples: 0,
            statistic: None,
            p_value: None,
            threshold: 0.0,
            effect: None,
            min_effect: 0.0,
            effect_kind: "ratio",
            window_s: 10,
            message: String::new(),
        }
    }

    #[test]
    fn thresholds_spend_exactly_the_budget_and_leave_no_check_out() {
        let decision = Decision::default();
        // One horizon's checks: app-wide and per-subject ones, and a mix check naming an operation.
        let checks = vec![
            check("errors", "error_ratio", None),
            check("errors", "error_ratio[GET /a]", Some("GET /a")),
            check("errors", "error_ratio[GET /b]", Some("GET /b")),
            check("operation_mix", "operation_share", Some("GET /a")),
            check("call_graph", "calls_per_request[db]", None),
        ];
        let horizons = 1;
        let t = Thresholds::new(&decision, &checks, horizons);
        let looks: f64 = decision.horizons_s.iter().map(|h| 2.0 * 3600.0 / *h as f64).sum();
        let spent: f64 = checks.iter().map(|c| t.of(c)).sum();
        let budget = decision.false_alarm_rate / looks;
        assert!((spent - budget).abs() < budget * 1e-9, "{spent} of {budget}");
        for c in &checks {
            assert!(t.of(c) > 0.0, "{} has no budget", c.feature);
        }
        assert!(
            t.of(&checks[0]) > t.of(&checks[1]),
            "the app-wide check gets the larger share"
        );
    }
}

#[cfg(test)]
mod dispersion_tests {
    use super::*;

    fn part(requests: u64, calls: u64) -> Aggregate {
        let mut a = Aggregate::default();
        for _ in 0..requests {
            a.all.add(1_000_000, false);
        }
        a.calls.insert("db".into(), (calls, 0));
        a
    }

    #[test]
    fn clustered_calls_are_overdispersed_and_steady_ones_are_not() {
        // Every request makes exactly one call: no more variation than Poisson (less, in fact).
        let steady: Vec<Aggregate> = (0..30).map(|_| part(100, 100)).collect();
        let parts: Vec<(u64, &Aggregate)> = steady.iter().map(|a| (0, a)).collect();
        assert_eq!(Dispersion::of(&parts).get("call:db"), 1.0);
        // Calls come ten at a time from a few requests: far more variation between parts.
        let clustered: Vec<Aggregate> = (0..30)
            .map(|i| part(100, if i % 2 == 0 { 0 } else { 40 }))
            .collect();
        let parts: Vec<(u64, &Aggregate)> = clustered.iter().map(|a| (0, a)).collect();
        assert!(Dispersion::of(&parts).get("call:db") > 10.0);
        assert_eq!(Dispersion::of(&parts).get("call:unknown"), 1.0);
    }
}
