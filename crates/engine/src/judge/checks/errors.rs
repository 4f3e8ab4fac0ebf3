//! The error ratio check: the share of the canary's requests (of the app, or of one operation)
//! that failed, against the stable's, by Fisher's exact test.

use super::{Check, Group, Test, decide};
use super::{Evidence, Significance, Subject, Tested, Thresholds, Windows, grown, ratio, stable_grows};
use crate::judge::model::{Decision, ErrorRatioCheck};
use crate::judge::stats::{fisher_greater, fisher_greater_below};

pub(super) fn error_ratio(
    e: &ErrorRatioCheck,
    d: &Decision,
    s: &Subject<'_>,
    w: &Windows<'_>,
    t: &Thresholds,
) -> Check {
    let id = w.id(Group::Errors, s.feature("error_ratio"), Test::FisherExact);
    let sequential = w.sequential(&id);
    let spec = s.spec(id, (e.critical, e.weight), t, e.min_ratio);
    if t.counting() {
        return super::counted(spec);
    }
    let (alpha, can, stable) = (spec.alpha, s.canary, s.stable);
    let rc = ratio(can.errors as f64, can.requests as f64);
    let rs = ratio(stable.errors as f64, stable.requests as f64);
    let pct = |r: f64| format!("{:.3}%", r * 100.0);
    let mut evidence = Evidence::of_requests((rc, rs), can, stable, w, d.min_requests);
    if let Some(rs) = rs {
        // Could the smallest effect worth acting on have shown on this many requests?
        let p1 = (rs * e.min_ratio).max(rs + e.min_increase).min(1.0);
        let shows = |n: u64| {
            let expected = (p1 * n as f64).ceil() as u64;
            let f = stable_grows(n, can.requests);
            fisher_greater_below(
                expected,
                n,
                grown(stable.errors, f),
                grown(stable.requests, f),
                alpha,
            )
        };
        let effect = || format!("an error ratio of {} against {}", pct(p1), pct(rs));
        evidence.power = w.power(&spec, can.requests, effect, shows);
        evidence.test = rc.map(|rc| Tested {
            sequential,
            significance: Significance::PValue(fisher_greater(
                can.errors,
                can.requests,
                stable.errors,
                stable.requests,
            )),
            effect: if rs > 0.0 { rc / rs } else { f64::INFINITY },
            effect_ok: rc >= rs * e.min_ratio && rc - rs >= e.min_increase,
            words: Box::new(move |failing| {
                let words = format!("error ratio {} against the stable's {}", pct(rc), pct(rs));
                if failing {
                    format!("{words} ({} of {} requests failed)", can.errors, can.requests)
                } else {
                    words
                }
            }),
        });
    }
    decide(spec, evidence, d.min_requests)
}
