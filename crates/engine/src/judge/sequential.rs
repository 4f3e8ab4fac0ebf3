//! Anytime-valid comparisons of the canary with the stable: evidence that grows second by second
//! and may be read at every look, with the chance that a healthy canary is ever failed bounded by
//! the model's `false_failure_rate` over the whole analysis, however long it runs and however
//! often it is looked at. No per-look correction, so a low-traffic canary is decided as soon as
//! its evidence allows, not when a window happens to hold enough of it.
//!
//! Each second both versions served is one step. Given how many events (failed requests, or
//! requests slower than the stable's recent quantile) the two versions had together in that
//! second, the canary's share of them is, when both behave alike, at most as spread as a binomial
//! draw with the canary's share of the requests (hypergeometric when each request is a trial;
//! binomial for Poisson counts). Against a canary whose rate is `r` times the stable's, that share
//! grows; the likelihood ratio of the two is a test martingale, and its expectation under the
//! null is at most 1 for every second, whatever the load did (both versions are compared within
//! the same second). The evidence is a mixture over several `r` and over start times (a fault
//! that begins mid-analysis is not buried under the healthy seconds before it: a process started
//! later carries it, at a smaller weight), which is still a test supermartingale; by Ville's
//! inequality it ever reaches `1 / alpha` with chance at most `alpha`.
//!
//! A failure must also not rest on one second: each second's step is capped at half of what the
//! check needs (in log terms), so a single slow batch or burst never fails a canary on its own.
//! A likelihood ratio cut from above still has expectation at most 1, so the cap keeps the
//! guarantee; steady evidence (an error or two a second) is never near it.

use std::collections::{HashMap, VecDeque};

use super::checks::{Feature, Group, Series, Test};
use super::history::History;
use super::model::Model;
use crate::observation::EventTime;
use crate::window::{Aggregate, RequestAggregate};

const SECOND: EventTime = 1_000_000_000;

/// The rate ratios the evidence is mixed over: from changes near the models' smallest effects to
/// gross ones, so that a gross fault is caught about as fast as a test built for it alone.
const RATIOS: [f64; 8] = [1.25, 1.6, 2.0, 3.0, 5.0, 10.0, 25.0, 100.0];
/// A new process starts every this many seconds of the analysis.
const RESTART_S: u64 = 30;
/// Processes kept besides the first: the most recent starts (about the last quarter hour). A
/// process dropped only removes evidence, which keeps the guarantee.
const KEPT_STARTS: usize = 32;
/// How much of the stable's recent past its quantiles (the latency thresholds) are taken from:
/// seconds before the one being judged, never including it.
const REFERENCE_S: u64 = 60;
/// Stable requests the reference needs before a latency threshold is taken from it.
const MIN_REFERENCE: u64 = 20;
/// Operations judged sequentially, in the order they were first seen; any beyond are judged by
/// the windowed tests alone (the catalog caps operations long before this).
const MAX_SUBJECTS: usize = 1_000;

/// One process: the log of its wealth under each ratio, and the largest single step of each.
#[derive(Clone, Debug)]
struct Start {
    /// Its place among all starts of the series, from 0: its weight is `6 / (pi^2 (index + 1)^2)`.
    index: u64,
    log_wealth: [f64; RATIOS.len()],
}

impl Start {
    fn new(index: u64) -> Self {
        Start {
            index,
            log_wealth: [0.0; RATIOS.len()],
        }
    }

    /// Its share of the mixture (all ratios together); the shares of all starts sum to 1.
    fn weight(&self) -> f64 {
        let j = (self.index + 1) as f64;
        6.0 / (std::f64::consts::PI * std::f64::consts::PI * j * j)
    }

    /// The log of each ratio's share.
    fn log_weight(&self) -> f64 {
        self.weight().ln() - (RATIOS.len() as f64).ln()
    }
}

/// The evidence of one comparison: a mixture of test supermartingales.
#[derive(Clone, Debug, Default)]
pub struct EProcess {
    /// The first start, kept for the whole analysis.
    first: Option<Start>,
    /// The later starts, newest last.
    later: VecDeque<Start>,
    starts: u64,
    /// The weight of every process started so far, dropped ones included.
    started_weight: f64,
    last_start: EventTime,
    /// Seconds that carried any event of the comparison.
    seconds: u64,
    /// The canary's requests over every second taken.
    canary_requests: f64,
}

impl EProcess {
    /// Takes one second at `at`: the canary's `x_c` events over `n_c` exposure (requests), the
    /// stable's `x_s` over `n_s`. No step adds more than `cap` to any process's log wealth.
    pub fn observe(&mut self, at: EventTime, (x_c, n_c): (f64, f64), (x_s, n_s): (f64, f64), cap: f64) {
        if self.first.is_none() {
            let first = Start::new(0);
            self.started_weight = first.weight();
            self.first = Some(first);
            self.starts = 1;
            self.last_start = at;
        } else if at >= self.last_start.saturating_add(RESTART_S * SECOND) {
            let start = Start::new(self.starts);
            self.started_weight += start.weight();
            self.later.push_back(start);
            self.starts += 1;
            self.last_start = at;
            if self.later.len() > KEPT_STARTS {
                self.later.pop_front();
            }
        }
        if n_s > 0.0 {
            self.canary_requests += n_c.max(0.0);
        }
        if n_c <= 0.0 || n_s <= 0.0 || x_c + x_s <= 0.0 {
            return;
        }
        self.seconds += 1;
        let share = n_c / (n_c + n_s);
        let mut steps = [0.0; RATIOS.len()];
        for (step, r) in steps.iter_mut().zip(RATIOS) {
            let shifted = r * n_c / (r * n_c + n_s);
            *step = (x_c * (shifted / share).ln() + x_s * ((1.0 - shifted) / (1.0 - share)).ln()).min(cap);
        }
        for start in self.first.iter_mut().chain(self.later.iter_mut()) {
            for (wealth, step) in start.log_wealth.iter_mut().zip(steps) {
                *wealth += step;
            }
        }
    }

    /// The evidence against "the canary is no worse", as an e-value (1 is none).
    pub fn e_value(&self) -> f64 {
        let terms: Vec<f64> = self
            .first
            .iter()
            .chain(self.later.iter())
            .flat_map(|s| {
                let w = s.log_weight();
                s.log_wealth.iter().map(move |l| w + l)
            })
            .collect();
        let Some(top) = terms.iter().copied().reduce(f64::max) else {
            return 1.0;
        };
        // Processes not started yet hold their weight at wealth 1 (so the mixture reads 1 before
        // any evidence); those dropped count as 0, which only lowers it.
        let sum: f64 = terms.iter().map(|t| (t - top).exp()).sum();
        (top.exp() * sum + (1.0 - self.started_weight).max(0.0)).min(f64::MAX)
    }

    /// Seconds that carried any event.
    pub fn seconds(&self) -> u64 {
        self.seconds
    }

    /// The canary's requests the evidence was gathered over.
    pub fn canary_requests(&self) -> u64 {
        self.canary_requests as u64
    }
}

/// What a check reports of its sequential evidence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evidence {
    pub e_value: f64,
    /// The e-value the check needs to fail: one over its share of the false-failure budget.
    pub needed: f64,
    pub seconds: u64,
    /// The canary's requests it was gathered over: what the model's `min_requests` counts for a
    /// sequential check, since its evidence is not a window's.
    pub canary_requests: u64,
}

impl Default for Evidence {
    /// No evidence yet: nothing could make it significant.
    fn default() -> Self {
        Evidence {
            e_value: 1.0,
            needed: f64::INFINITY,
            seconds: 0,
            canary_requests: 0,
        }
    }
}

impl Evidence {
    pub fn significant(&self) -> bool {
        self.e_value >= self.needed
    }
}

/// The sequential evidence at one look, per check series.
pub type EvidenceBySeries = HashMap<Series, Evidence>;

/// The sequential evidence of one analysis, per check series.
#[derive(Clone, Debug, Default)]
pub struct Sequential {
    by_series: HashMap<Series, EProcess>,
    /// Operations in the order they were first judged, which sets their share of the budget.
    subjects: HashMap<String, usize>,
    /// The end of the last second taken.
    through: EventTime,
}

impl Sequential {
    /// Whether checks of `group` decide failures sequentially.
    pub fn covers(group: Group) -> bool {
        matches!(group, Group::Errors | Group::Latency)
    }

    /// Takes every second from the last one taken up to `now` (of those still held one by one in
    /// the histories): both versions' requests in it, as steps of each series' evidence.
    pub fn update(&mut self, model: &Model, canary: &History, stable: &History, now: EventTime) {
        let mut start = self.through.max(now.saturating_sub(10 * SECOND));
        while start.saturating_add(SECOND) <= now {
            if let (Some(can), Some(st)) = (canary.second(start), stable.second(start))
                && can.all.requests > 0
                && st.all.requests > 0
            {
                self.second(model, start, can, st, stable);
            }
            start += SECOND;
        }
        self.through = self.through.max(now);
    }

    fn second(&mut self, model: &Model, at: EventTime, can: &Aggregate, st: &Aggregate, stable: &History) {
        static EMPTY: std::sync::OnceLock<RequestAggregate> = std::sync::OnceLock::new();
        let empty = EMPTY.get_or_init(RequestAggregate::default);
        let c = &model.checks;
        let per_operation = c.error_ratio.as_ref().is_some_and(|e| e.per_operation)
            || c.latency.as_ref().is_some_and(|l| l.per_operation);
        let mut subjects: Vec<(Option<&str>, &RequestAggregate, &RequestAggregate)> =
            vec![(None, &can.all, &st.all)];
        if per_operation {
            for (op, agg) in &can.operations {
                if !self.subjects.contains_key(op) && self.subjects.len() < MAX_SUBJECTS {
                    let rank = self.subjects.len() + 1;
                    self.subjects.insert(op.clone(), rank);
                }
                if self.subjects.contains_key(op) {
                    subjects.push((Some(op), agg, st.operations.get(op).unwrap_or(empty)));
                }
            }
        }
        let reference = c.latency.as_ref().map(|_| stable.before(at, REFERENCE_S));
        for (op, can_r, st_r) in subjects {
            let feature = |name: String| Feature {
                name,
                subject: op.map(str::to_owned),
            };
            if let Some(e) = &c.error_ratio
                && (op.is_none() || e.per_operation)
            {
                let series = (Group::Errors, feature("error_ratio".into()), Test::FisherExact);
                let cap = self.step_cap(model, &series);
                self.by_series.entry(series).or_default().observe(
                    at,
                    (can_r.errors as f64, can_r.requests as f64),
                    (st_r.errors as f64, st_r.requests as f64),
                    cap,
                );
            }
            if let (Some(l), Some(reference)) = (&c.latency, &reference)
                && (op.is_none() || l.per_operation)
            {
                let past = match op {
                    None => &reference.all,
                    Some(op) => reference.operations.get(op).unwrap_or(empty),
                };
                if past.requests < MIN_REFERENCE {
                    continue;
                }
                for q in &l.quantiles {
                    let Some(threshold) = past.latency_ms.quantile(*q) else {
                        continue;
                    };
                    let above = |a: &RequestAggregate| a.latency_ms.count_above(threshold).round();
                    let pct = (q * 100.0).round() as u32;
                    let series = (
                        Group::Latency,
                        feature(format!("latency_p{pct}_ms")),
                        Test::Exceedance,
                    );
                    let cap = self.step_cap(model, &series);
                    self.by_series.entry(series).or_default().observe(
                        at,
                        (above(can_r), can_r.requests as f64),
                        (above(st_r), st_r.requests as f64),
                        cap,
                    );
                }
            }
        }
    }

    /// The evidence of every series, with what each needs: what the checks of one look read.
    pub fn evidence(&self, model: &Model) -> EvidenceBySeries {
        self.by_series
            .iter()
            .map(|(series, process)| {
                let evidence = Evidence {
                    e_value: process.e_value(),
                    needed: 1.0 / self.alpha(model, series),
                    seconds: process.seconds(),
                    canary_requests: process.canary_requests(),
                };
                (series.clone(), evidence)
            })
            .collect()
    }

    /// The most one second may add to `series`' log evidence: half of what it needs to fail.
    fn step_cap(&self, model: &Model, series: &Series) -> f64 {
        (1.0 / self.alpha(model, series)).ln() / 2.0
    }

    /// `series`' share of the model's false-failure budget: split over the sequential groups by
    /// weight (each group at least a sliver), within a group 60% to the app-wide checks and 40%
    /// to the operations, the `k`th operation first seen getting `6 / (pi^2 k^2)` of that (so
    /// that any number of operations stays within it), and evenly over a subject's quantiles.
    pub fn alpha(&self, model: &Model, (group, feature, _): &Series) -> f64 {
        let c = &model.checks;
        let share = |w: f64| w.max(0.0) + 1.0;
        let groups = [
            (
                Group::Errors,
                c.error_ratio.as_ref().map(|e| (e.weight, e.per_operation, 1)),
            ),
            (
                Group::Latency,
                c.latency
                    .as_ref()
                    .map(|l| (l.weight, l.per_operation, l.quantiles.len().max(1))),
            ),
        ];
        let total: f64 = groups
            .iter()
            .filter_map(|(_, spec)| spec.map(|(w, _, _)| share(w)))
            .sum();
        let Some((weight, per_operation, series_per_subject)) = groups
            .iter()
            .find(|(g, _)| g == group)
            .and_then(|(_, spec)| *spec)
        else {
            return 0.0;
        };
        let budget = model.decision.false_failure_rate * share(weight) / total;
        let per_subject = series_per_subject as f64;
        match &feature.subject {
            None if per_operation => budget * 0.6 / per_subject,
            None => budget / per_subject,
            Some(op) => {
                let k = self.subjects.get(op).copied().unwrap_or(MAX_SUBJECTS) as f64;
                budget * 0.4 * 6.0 / (std::f64::consts::PI * std::f64::consts::PI * k * k) / per_subject
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn binomial(rng: &mut Rng, n: u64, p: f64) -> u64 {
        (0..n).filter(|_| rng.unit() < p).count() as u64
    }

    /// Ville's inequality, checked: when both versions fail alike, the evidence reaches `1 /
    /// alpha` in at most about `alpha` of long runs, looked at every second, under load that
    /// swings from second to second.
    #[test]
    fn a_healthy_canary_rarely_ever_reaches_the_threshold() {
        let alpha = 0.05;
        let runs = 400;
        let mut crossed = 0;
        for seed in 0..runs {
            let mut rng = Rng::new(seed);
            let mut e = EProcess::default();
            let mut ever = false;
            for second in 0..600u64 {
                let load = 1.0 + 0.8 * ((second as f64) / 60.0).sin();
                let n_c = (5.0 * load) as u64 + rng.below(3);
                let n_s = (45.0 * load) as u64 + rng.below(10);
                let p = 0.02 * load;
                let x_c = binomial(&mut rng, n_c, p);
                let x_s = binomial(&mut rng, n_s, p);
                // Uncapped: the cap only ever lowers the evidence.
                e.observe(
                    second * SECOND,
                    (x_c as f64, n_c as f64),
                    (x_s as f64, n_s as f64),
                    f64::INFINITY,
                );
                ever |= e.e_value() >= 1.0 / alpha;
            }
            crossed += u32::from(ever);
        }
        // At most alpha in expectation; 400 runs put a binomial's 99.9% bound near 0.085.
        assert!(
            (crossed as f64) / (runs as f64) <= 0.085,
            "{crossed} of {runs} healthy runs crossed"
        );
    }

    #[test]
    fn a_canary_failing_five_times_as_often_is_caught_quickly_even_after_a_long_healthy_start() {
        let mut rng = Rng::new(7);
        let mut e = EProcess::default();
        let needed: f64 = 1_000.0;
        let mut caught = None;
        for second in 0..1_800u64 {
            let bad = second >= 1_200;
            let (n_c, n_s) = (10, 90);
            let x_c = binomial(&mut rng, n_c, if bad { 0.05 } else { 0.01 });
            let x_s = binomial(&mut rng, n_s, 0.01);
            e.observe(
                second * SECOND,
                (x_c as f64, n_c as f64),
                (x_s as f64, n_s as f64),
                needed.ln() / 2.0,
            );
            if e.e_value() >= needed {
                caught = Some(second);
                break;
            }
        }
        let at = caught.expect("caught");
        assert!((1_200..1_320).contains(&at), "caught at {at}");
    }

    #[test]
    fn one_burst_alone_is_not_enough() {
        let needed: f64 = 1_000.0;
        let cap = needed.ln() / 2.0;
        let mut e = EProcess::default();
        for second in 0..=60u64 {
            let x_c = if second == 60 { 10.0 } else { 0.0 };
            e.observe(second * SECOND, (x_c, 10.0), (1.0, 90.0), cap);
        }
        assert!(e.e_value() > 1.0, "the burst is evidence: {}", e.e_value());
        assert!(
            e.e_value() < needed,
            "but one second cannot decide: {}",
            e.e_value()
        );
        let mut uncapped = EProcess::default();
        for second in 0..=60u64 {
            let x_c = if second == 60 { 10.0 } else { 0.0 };
            uncapped.observe(second * SECOND, (x_c, 10.0), (1.0, 90.0), f64::INFINITY);
        }
        assert!(
            uncapped.e_value() > needed,
            "uncapped it would: {}",
            uncapped.e_value()
        );
    }

    #[test]
    fn no_events_is_no_evidence() {
        let mut e = EProcess::default();
        for second in 0..100u64 {
            e.observe(second * SECOND, (0.0, 10.0), (0.0, 90.0), f64::INFINITY);
        }
        assert!((e.e_value() - 1.0).abs() < 1e-9, "{}", e.e_value());
        assert_eq!(e.seconds(), 0);
    }
}
