//! The event-rate checks: events per canary request against the stable's, as counts over an
//! exposure of requests (quasi-Poisson, with the stable's dispersion). Calls to each downstream
//! (the call graph: new, vanished or changed edges), exceptions of each type and error logs
//! (which must not grow), and the increments of each counter metric per request.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{Check, Feature, Group, Test, decide, ratio, stable_grows, thousands};
use super::{Evidence, Power, Significance, Spec, Tested, Thresholds, Windows};
use crate::judge::model::{CallGraphCheck, Decision, MetricsCheck, Model, RateCheck};
use crate::judge::stats::rate_tails;
use crate::observation::SeriesKey;
use crate::window::Aggregate;

/// Shortest window on which a known downstream's calls per request are compared.
const MIN_EDGE_RATE_S: u64 = 30;

/// Counter points a window must hold before increments per request are compared.
const MIN_METRIC_POINTS: u64 = 3;

/// The call graph, exception, error log and metric checks of one horizon.
pub(super) fn evaluate(model: &Model, w: &Windows<'_>, t: &Thresholds, out: &mut Vec<Check>) {
    let d = &model.decision;
    let c = &model.checks;
    if let Some(g) = &c.call_graph {
        let downstreams: BTreeSet<&Arc<str>> = w.canary.calls.keys().chain(w.stable.calls.keys()).collect();
        for ds in downstreams {
            out.push(call_graph(g, d, ds, w, t));
        }
    }
    if let Some(r) = &c.exceptions {
        let types: BTreeSet<&Arc<str>> = w
            .canary
            .exceptions
            .keys()
            .chain(w.stable.exceptions.keys())
            .collect();
        for ty in types {
            let counts = Counts::of(w, &format!("exception:{ty}"), |a| {
                a.exceptions.get(ty).copied().unwrap_or(0) as f64
            });
            let id = w.id(
                Group::Exceptions,
                Feature::of("exception_rate", &**ty),
                Test::PoissonRate,
            );
            out.push(growth(r, d, id, counts, w, t));
        }
    }
    // A cohort's requests have no logs or metrics of their own: those are the app's.
    if w.cohort.is_some() {
        return;
    }
    if let Some(r) = &c.error_logs {
        let counts = Counts::of(w, "error_logs", |a| a.error_logs as f64);
        let id = w.id(
            Group::ErrorLogs,
            Feature::app("error_log_rate"),
            Test::PoissonRate,
        );
        out.push(growth(r, d, id, counts, w, t));
    }
    if let Some(m) = &c.metrics
        && w.horizon_s >= m.min_horizon_s
    {
        let series: BTreeSet<_> = w
            .stable
            .metrics
            .iter()
            .filter(|(_, a)| a.increments > 0)
            .map(|(k, _)| k)
            .collect();
        for s in series {
            out.push(metric_rate(m, d, s, w, t));
        }
    }
}

/// Events of one kind in the canary's window and the stable's same window, over their requests,
/// and the stable's dispersion of them.
struct Counts {
    /// Events: the canary's, the stable's.
    x: (f64, f64),
    /// Requests: the canary's, the stable's.
    n: (f64, f64),
    phi: f64,
}

impl Counts {
    /// Events per request of each version.
    fn of(w: &Windows<'_>, dispersion_key: &str, count: impl Fn(&Aggregate) -> f64) -> Counts {
        Counts::over(w, dispersion_key, count, |a| a.all.requests as f64)
    }

    /// Events over each version's `exposure` (in requests).
    fn over(
        w: &Windows<'_>,
        dispersion_key: &str,
        count: impl Fn(&Aggregate) -> f64,
        exposure: impl Fn(&Aggregate) -> f64,
    ) -> Counts {
        Counts {
            x: (count(w.canary), count(w.stable)),
            n: (exposure(w.canary), exposure(w.stable)),
            phi: w.dispersion.get(dispersion_key),
        }
    }

    /// Events per request of the canary and of the stable.
    fn rates(&self) -> (Option<f64>, Option<f64>) {
        (ratio(self.x.0, self.n.0), ratio(self.x.1, self.n.1))
    }

    /// (P(as many or more), P(as few or fewer)) of `x_c` canary events on `n_c` requests, against
    /// `x` events on `n` requests of the stable.
    fn tails(&self, x_c: f64, n_c: f64, (x, n): (f64, f64)) -> (f64, f64) {
        rate_tails(x_c / self.phi, n_c, x / self.phi, n)
    }

    /// The p-value of growth.
    fn growth(&self) -> Significance {
        Significance::PValue(self.tails(self.x.0, self.n.0, (self.x.1, self.n.1)).0)
    }

    /// The two-sided p-value of a change either way, and whether the canary's rate grew.
    fn change(&self) -> (Significance, bool) {
        let (up, down) = self.tails(self.x.0, self.n.0, (self.x.1, self.n.1));
        (Significance::PValue((2.0 * up.min(down)).min(1.0)), up <= down)
    }

    /// Whether `n` canary requests at `rate` events each would differ significantly from the
    /// stable (grown with them), growing (`up`) or shrinking, at `alpha` (`sides` = 2 for a
    /// two-sided test).
    fn shows(&self, rate: f64, n: u64, up: bool, sides: f64, alpha: f64) -> bool {
        let f = stable_grows(n, self.n.0 as u64);
        let n = n as f64;
        let x = if up { (rate * n).ceil() } else { (rate * n).floor() };
        let (more, fewer) = self.tails(x, n, (self.x.1 * f, self.n.1 * f));
        sides * if up { more } else { fewer } < alpha
    }

    /// Evidence about the canary's requests, nothing compared yet.
    fn evidence(&self, w: &Windows<'_>, min_requests: u64) -> Evidence<'static> {
        let (c, s) = (&w.canary.all, &w.stable.all);
        Evidence::of_requests(self.rates(), c, s, w, min_requests)
    }
}

/// Events per request that must not grow: exceptions of one type, error logs.
fn growth(
    r: &RateCheck,
    d: &Decision,
    id: super::CheckId,
    counts: Counts,
    w: &Windows<'_>,
    t: &Thresholds,
) -> Check {
    let feature = id.feature.to_string();
    let sequential = w.sequential(&id);
    let spec = Spec::new(id, None, (r.critical, r.weight), t, r.min_ratio, "ratio");
    if t.counting() {
        return super::counted(spec);
    }
    let mut evidence = counts.evidence(w, d.min_requests);
    let (rate_c, Some(rate_r)) = counts.rates() else {
        return decide(spec, evidence, d.min_requests);
    };
    let target = (rate_r * r.min_ratio).max(rate_r + r.min_increase);
    let shows = |n| counts.shows(target, n, true, 1.0, spec.alpha);
    let effect = || format!("{feature} of {target:.4} per request");
    evidence.power = w.power(&spec, w.canary.all.requests, effect, shows);
    evidence.test = rate_c.map(|rate_c| {
        let new = counts.x.1 == 0.0 && counts.x.0 > 0.0;
        let feature = feature.as_str();
        Tested {
            sequential,
            significance: counts.growth(),
            effect: if rate_r > 0.0 {
                rate_c / rate_r
            } else {
                f64::INFINITY
            },
            effect_ok: rate_c >= rate_r * r.min_ratio && rate_c - rate_r >= r.min_increase,
            words: Box::new(move |failing| {
                if failing && new {
                    format!("{feature}: new on the canary, {rate_c:.4} per request")
                } else {
                    format!("{feature}: {rate_c:.4} per request against the stable's {rate_r:.4}")
                }
            }),
        }
    });
    decide(spec, evidence, d.min_requests)
}

/// The power of a two-sided rate test to show a change to `up` (and, where possible, `down`)
/// events per request, from the canary's `have` requests.
fn either_way(
    counts: &Counts,
    have: u64,
    (w, spec): (&Windows<'_>, &Spec),
    up: f64,
    down: Option<f64>,
    what: &str,
) -> Power {
    let alpha = spec.alpha;
    let shows = |n| {
        counts.shows(up, n, true, 2.0, alpha) && down.is_none_or(|r| counts.shows(r, n, false, 2.0, alpha))
    };
    let effect = || match down {
        Some(down) => format!("{what} of {up:.3} or {down:.3}"),
        None => format!("{what} of {up:.3}"),
    };
    w.power(spec, have, effect, shows)
}

fn call_graph(g: &CallGraphCheck, d: &Decision, downstream: &str, w: &Windows<'_>, t: &Thresholds) -> Check {
    let id = w.id(
        Group::CallGraph,
        Feature::of("calls_per_request", downstream),
        Test::PoissonRate,
    );
    let sequential = w.sequential(&id);
    let spec = Spec::new(id, None, (g.critical, g.weight), t, g.min_ratio, "ratio");
    if t.counting() {
        return super::counted(spec);
    }
    let counts = Counts::of(w, &format!("call:{downstream}"), |a| {
        a.calls.get(downstream).map_or(0, |c| c.0) as f64
    });
    let mut evidence = counts.evidence(w, d.min_requests);
    let (cpr_c, Some(cpr_r)) = counts.rates() else {
        return decide(spec, evidence, d.min_requests);
    };
    let (x_c, x_r) = (counts.x.0, counts.x.1);
    // How many calls a request makes depends on its operation, so over a few seconds the
    // operation mix alone moves calls per request far more than a count model allows: a known
    // edge's rate is judged on `MIN_EDGE_RATE_S` or more of traffic. What counts is the span the
    // window holds, not its nominal length: early in an analysis a long window holds seconds.
    // A new edge needs no such care.
    if x_r > 0.0 && w.seen_s.min(w.horizon_s) < MIN_EDGE_RATE_S {
        evidence.power = Power::Waiting(format!(
            "calls per request to {downstream} are judged over {MIN_EDGE_RATE_S} s or more; {} canary requests needed there",
            thousands(d.min_requests)
        ));
        return decide(spec, evidence, d.min_requests);
    }
    let up = (cpr_r * g.min_ratio).max(cpr_r + g.min_change);
    let down = Some((cpr_r / g.min_ratio).min(cpr_r - g.min_change)).filter(|r| *r >= 0.0 && cpr_r > 0.0);
    let what = format!("calls per request to {downstream}");
    evidence.power = either_way(&counts, w.canary.all.requests, (w, &spec), up, down, &what);
    evidence.test = cpr_c.map(|cpr_c| {
        let (significance, grew) = counts.change();
        let effect = if cpr_r > 0.0 {
            cpr_c / cpr_r
        } else if cpr_c > 0.0 {
            f64::INFINITY
        } else {
            1.0
        };
        Tested {
            sequential,
            significance,
            effect,
            effect_ok: (cpr_c - cpr_r).abs() >= g.min_change
                && (effect >= g.min_ratio || effect <= 1.0 / g.min_ratio),
            words: Box::new(move |_| {
                if x_r == 0.0 && grew {
                    format!("new downstream edge to {downstream}: {cpr_c:.3} calls per request")
                } else if x_c == 0.0 && !grew {
                    format!("edge to {downstream} vanished: it had {cpr_r:.3} calls per request")
                } else {
                    format!("calls per request to {downstream}: {cpr_c:.3} against the stable's {cpr_r:.3}")
                }
            }),
        }
    });
    decide(spec, evidence, d.min_requests)
}

fn metric_rate(m: &MetricsCheck, d: &Decision, series: &SeriesKey, w: &Windows<'_>, t: &Thresholds) -> Check {
    let name = series.to_string();
    let id = w.id(
        Group::Metrics,
        Feature::of("metric_rate", &name),
        Test::PoissonRate,
    );
    let sequential = w.sequential(&id);
    let spec = Spec::new(id, None, (m.critical, m.weight), t, m.min_ratio, "ratio");
    if t.counting() {
        return super::counted(spec);
    }
    // Increments over the requests of the time they cover (`judge::history`), not over the
    // window's requests: a point's increments may cover time before the window, or not yet reach
    // its end.
    let metric =
        |a: &Aggregate, f: fn(&crate::window::MetricAggregate) -> f64| a.metrics.get(series).map_or(0.0, f);
    let counts = Counts::over(
        w,
        &format!("metric:{series}"),
        |a| metric(a, |m| m.increment),
        |a| metric(a, |m| m.exposure),
    );
    let mut evidence = counts.evidence(w, d.min_requests);
    // Counter points come every few seconds and a new series' first point carries no increment:
    // compare only windows the analysis saw whole, holding several of the canary's points.
    let points = w.canary.metrics.get(series).map_or(0, |s| s.increments);
    if w.seen_s < w.horizon_s || points < MIN_METRIC_POINTS {
        evidence.power = Power::Waiting(format!(
            "{points} canary points of {name} over {} s seen, {MIN_METRIC_POINTS} points over {} s and {} canary requests needed",
            w.seen_s,
            w.horizon_s,
            thousands(d.min_requests)
        ));
        return decide(spec, evidence, d.min_requests);
    }
    let (per_c, per_r) = match counts.rates() {
        (per_c, Some(per_r)) if per_r > 0.0 => (per_c, per_r),
        _ => {
            evidence.power = Power::Waiting(format!(
                "{name} did not move on the stable; {} canary requests needed once it does",
                thousands(d.min_requests)
            ));
            return decide(spec, evidence, d.min_requests);
        }
    };
    let what = format!("{name} per request");
    evidence.power = either_way(
        &counts,
        counts.n.0.round() as u64,
        (w, &spec),
        per_r * m.min_ratio,
        Some(per_r / m.min_ratio),
        &what,
    );
    evidence.test = per_c.map(|per_c| {
        let effect = per_c / per_r;
        let name = name.as_str();
        Tested {
            sequential,
            significance: counts.change().0,
            effect,
            effect_ok: effect >= m.min_ratio || effect <= 1.0 / m.min_ratio,
            words: Box::new(move |_| {
                format!("{name}: {per_c:.4} per request against the stable's {per_r:.4}")
            }),
        }
    });
    decide(spec, evidence, d.min_requests)
}
