//! The latency checks: for each of the model's quantiles, whether more of the canary's requests
//! (of the app, or of one operation) lie above the stable's quantile than the stable's own do.

use super::{Check, Group, Test, decide};
use super::{Evidence, Significance, Subject, Tested, Thresholds, Windows, grown, stable_grows};
use crate::judge::model::{Decision, LatencyCheck};
use crate::judge::stats::{fisher_greater, fisher_greater_below};
use crate::window::RequestAggregate;

pub(super) fn latency(
    l: &LatencyCheck,
    d: &Decision,
    q: f64,
    s: &Subject<'_>,
    w: &Windows<'_>,
    t: &Thresholds,
) -> Check {
    let pct = (q * 100.0).round() as u32;
    let id = w.id(
        Group::Latency,
        s.feature(format!("latency_p{pct}_ms")),
        Test::Exceedance,
    );
    let sequential = w.sequential(&id);
    let spec = s.spec(id, (l.critical, l.weight), t, l.min_ratio);
    if t.counting() {
        return super::counted(spec);
    }
    let (alpha, can, stable) = (spec.alpha, s.canary, s.stable);
    let stable_q = stable.latency_ms.quantile(q);
    let canary_q = can.latency_ms.quantile(q);
    let mut evidence = Evidence::of_requests((canary_q, stable_q), can, stable, w, d.min_requests);
    if let Some(stable_q) = stable_q {
        // How many requests of each lie above the stable's quantile: the canary's share of them
        // grows when its distribution moves up anywhere at or beyond that quantile.
        let above = |a: &RequestAggregate| a.latency_ms.count_above(stable_q).round() as u64;
        let (e_c, e_s) = (above(can), above(stable));
        // The smallest slowdown worth acting on, as the stable's latencies stretched until its
        // quantile is `min_ratio` times and `min_increase_ms` more than it was: the share of
        // canary requests that would then lie above the stable's quantile.
        let stretch = l
            .min_ratio
            .max(1.0 + l.min_increase_ms / stable_q.max(f64::MIN_POSITIVE));
        let p1 = (stable.latency_ms.count_above(stable_q / stretch) / stable.requests.max(1) as f64)
            .clamp(1.0 - q, 1.0);
        let shows = |n: u64| {
            let expected = (p1 * n as f64).ceil() as u64;
            let f = stable_grows(n, can.requests);
            fisher_greater_below(expected, n, grown(e_s, f), grown(stable.requests, f), alpha)
        };
        let effect = || format!("p{pct} {stretch:.2} times the stable's {stable_q:.1} ms");
        evidence.power = w.power(&spec, can.requests, effect, shows);
        evidence.test = canary_q.map(|canary_q| {
            let effect = if stable_q > 0.0 { canary_q / stable_q } else { 1.0 };
            Tested {
                sequential,
                significance: Significance::PValue(fisher_greater(e_c, can.requests, e_s, stable.requests)),
                effect,
                effect_ok: effect >= l.min_ratio && canary_q - stable_q >= l.min_increase_ms,
                words: Box::new(move |failing| {
                    let words = format!("p{pct} {canary_q:.1} ms against the stable's {stable_q:.1} ms");
                    if failing {
                        format!("{words}; {e_c} of {} canary requests above it", can.requests)
                    } else {
                        words
                    }
                }),
            }
        });
    }
    decide(spec, evidence, d.min_requests)
}
