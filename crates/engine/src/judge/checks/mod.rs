//! One look at a canary: every check of the model on every trailing window, and the one rule that
//! turns a check's evidence into `pass`, `fail` or `insufficient_data`.
//!
//! Each check compares the canary's window with the stable version over the very same span of
//! event time, never with a longer, trailing one: when load and latency ramp (a daily or hourly
//! cycle), a longer window lags the ramp and an identical canary looks slower than the stable's
//! past. Over the same span both versions saw the same load, and a change both share (a failing
//! database) is never blamed on the canary. (The learned baseline, `baseline`, is the one longer
//! reference; it is seasonal, by hour of week.) The signal families (`errors`, `latency`, `mix`,
//! `rates`, `baseline`) only gather that evidence; `decide` alone judges it. A check fails only with both statistical significance and a practical effect from
//! the model, and passes only when its data could have revealed the model's minimum effect:
//! otherwise it is `insufficient_data`, and says how many more canary requests it needs.

mod baseline;
mod errors;
mod latency;
mod mix;
mod rates;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Serialize, Serializer};

use super::model::{Decision, Model};
use super::stats::z_of;
use crate::window::{Aggregate, RequestAggregate};
use statrs::distribution::{ChiSquared, ContinuousCDF};

pub use baseline::baseline_checks;

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
    pub const ALL: [Outcome; 4] = [
        Outcome::Pass,
        Outcome::InsufficientData,
        Outcome::Marginal,
        Outcome::Fail,
    ];

    /// The outcome `name` names.
    pub fn named(name: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::InsufficientData => "insufficient_data",
            Outcome::Marginal => "marginal",
            Outcome::Fail => "fail",
        }
    }
}

/// The family of signals a check belongs to; each group counts once in the score, with its weight.
/// In the order of their names, so that checks sort as their ids always have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    Baseline,
    CallGraph,
    ErrorLogs,
    Errors,
    Exceptions,
    Latency,
    Metrics,
    OperationMix,
}

impl Group {
    pub const ALL: [Group; 8] = [
        Group::Baseline,
        Group::CallGraph,
        Group::ErrorLogs,
        Group::Errors,
        Group::Exceptions,
        Group::Latency,
        Group::Metrics,
        Group::OperationMix,
    ];

    /// The group `name` names.
    pub fn named(name: &str) -> Option<Group> {
        Group::ALL.into_iter().find(|g| g.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Group::Errors => "errors",
            Group::Latency => "latency",
            Group::OperationMix => "operation_mix",
            Group::CallGraph => "call_graph",
            Group::Exceptions => "exceptions",
            Group::ErrorLogs => "error_logs",
            Group::Metrics => "metrics",
            Group::Baseline => "baseline",
        }
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The statistical test a check runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Test {
    FisherExact,
    Exceedance,
    ChiSquare,
    PoissonRate,
    BaselineBand,
}

impl Test {
    pub const ALL: [Test; 5] = [
        Test::FisherExact,
        Test::Exceedance,
        Test::ChiSquare,
        Test::PoissonRate,
        Test::BaselineBand,
    ];

    /// The test `name` (as the API shows it) names.
    pub fn named(name: &str) -> Option<Test> {
        Test::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The name the API and `/metrics` show.
    pub fn name(self) -> &'static str {
        match self {
            Test::FisherExact => "fisher_exact",
            Test::Exceedance => "exceedance",
            Test::ChiSquare => "chi_square",
            Test::PoissonRate => "poisson_rate",
            Test::BaselineBand => "baseline_band",
        }
    }

    /// The shorter name check ids have always used for it.
    fn in_id(self) -> &'static str {
        match self {
            Test::PoissonRate => "rate",
            Test::BaselineBand => "band",
            other => other.name(),
        }
    }
}

impl fmt::Display for Test {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Test {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// What a check measures: a feature of the app, or of one subject (an operation, downstream,
/// exception type or metric series). Displays as `name` or `name[subject]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Feature {
    pub name: String,
    pub subject: Option<String>,
}

impl Feature {
    /// The heap its name and subject hold.
    pub fn heap_bytes(&self) -> usize {
        self.name.capacity() + self.subject.as_ref().map_or(0, String::capacity)
    }

    fn app(name: impl Into<String>) -> Feature {
        Feature {
            name: name.into(),
            subject: None,
        }
    }

    fn of(name: impl Into<String>, subject: impl Into<String>) -> Feature {
        Feature {
            name: name.into(),
            subject: Some(subject.into()),
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.subject {
            Some(s) => write!(f, "{}[{s}]", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// A check's identity within an analysis. Displays (and serializes) as
/// `group:feature[subject]:test:horizon_s`, the form the API and events have always shown.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CheckId {
    pub group: Group,
    pub feature: Feature,
    pub test: Test,
    pub horizon_s: u64,
}

/// One check across its horizons: what the hysteresis counts failing looks of.
pub type Series = (Group, Feature, Test);

impl CheckId {
    /// The check without its horizon.
    pub fn series(&self) -> Series {
        (self.group, self.feature.clone(), self.test)
    }

    /// Whether it is about the whole app rather than one operation, downstream, type or series.
    /// (The operation mix names the operation that moved most, but judges the whole mix.)
    pub fn app_wide(&self) -> bool {
        self.feature.subject.is_none()
    }
}

impl fmt::Display for CheckId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.group,
            self.feature,
            self.test.in_id(),
            self.horizon_s
        )
    }
}

impl Serialize for CheckId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One check's evidence and verdict, as the API, events and `/metrics` show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    /// Unique within an analysis: `group:feature[subject]:test:horizon_s`.
    pub id: CheckId,
    pub group: Group,
    /// `id.feature` as text: `name` or `name[subject]`.
    pub feature: String,
    pub operation: Option<String>,
    pub test: Test,
    pub critical: bool,
    pub weight: f64,
    pub outcome: Outcome,
    pub canary_value: Option<f64>,
    /// The stable's value in the same window (or the learned baseline's, for baseline checks).
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

/// Every `effect_kind` a check can have: what a stored check's kind is read back as.
pub const EFFECT_KINDS: [&str; 3] = ["ratio", "total_variation", "band_half_widths"];

/// The effect kind `name` names.
pub fn effect_kind_named(name: &str) -> Option<&'static str> {
    EFFECT_KINDS.into_iter().find(|k| *k == name)
}

/// What names and bounds a check, before any data: from the model and the thresholds.
pub struct Spec {
    pub id: CheckId,
    pub operation: Option<String>,
    pub critical: bool,
    pub weight: f64,
    /// The p-value the comparison must go below (unused by the band test).
    pub alpha: f64,
    /// The practical effect worth acting on, in `effect_kind` units.
    pub min_effect: f64,
    pub effect_kind: &'static str,
}

impl Spec {
    /// The spec of check `id`, at its threshold in `t`.
    pub fn new(
        id: CheckId,
        operation: Option<String>,
        (critical, weight): (bool, f64),
        t: &Thresholds,
        min_effect: f64,
        effect_kind: &'static str,
    ) -> Spec {
        Spec {
            operation,
            critical,
            weight,
            alpha: t.for_id(&id),
            min_effect,
            effect_kind,
            id,
        }
    }
}

/// What a check's data showed in one window, before any verdict.
pub struct Evidence<'a> {
    pub canary_value: Option<f64>,
    pub baseline_value: Option<f64>,
    pub canary_samples: u64,
    pub baseline_samples: u64,
    /// The canary's requests in the window, and their rate: what "more data" is counted in.
    pub canary_requests: u64,
    pub canary_rps: f64,
    /// The comparison, when one could be made.
    pub test: Option<Tested<'a>>,
    /// Whether the data could have revealed the model's minimum effect.
    pub power: Power,
}

impl Evidence<'_> {
    /// Evidence about the canary's `requests` against the stable's `stable` ones in window `w`,
    /// with nothing compared yet: until the check finds stable requests, it waits for them.
    fn of_requests(
        values: (Option<f64>, Option<f64>),
        requests: &RequestAggregate,
        stable: &RequestAggregate,
        w: &Windows<'_>,
        min_requests: u64,
    ) -> Self {
        Evidence {
            canary_value: values.0,
            baseline_value: values.1,
            canary_samples: requests.requests,
            baseline_samples: stable.requests,
            canary_requests: requests.requests,
            canary_rps: w.rps(requests.requests),
            test: None,
            power: Power::Waiting(format!(
                "no stable requests in the window to compare with; {} canary requests needed once there are",
                thousands(min_requests)
            )),
        }
    }
}

/// A comparison that was made.
pub struct Tested<'a> {
    pub significance: Significance,
    /// The sequential evidence of the check's series, for the checks that fail on it alone (the
    /// windowed significance is then shown, not decided on).
    pub sequential: Option<crate::judge::sequential::Evidence>,
    /// The practical effect, in the spec's `effect_kind`, and whether it is as large as the
    /// model's minimum (in the direction that matters).
    pub effect: f64,
    pub effect_ok: bool,
    /// What was measured, in words (`words(false)`), and the words when it fails
    /// (`words(true)`): written only when the check passes or fails, since most looks at most
    /// checks are undecided and would throw them away.
    pub words: Words<'a>,
}

/// A check's words for what it measured, given whether it fails.
pub type Words<'a> = Box<dyn Fn(bool) -> String + 'a>;

/// How strongly the canary differs from the stable.
#[derive(Clone, Copy)]
pub enum Significance {
    /// The p-value of the comparison with the stable in the same window.
    PValue(f64),
    /// Band half-widths from a learned baseline, of the canary and of the stable in the same
    /// window, and whether the canary lies above the band's centre.
    Band { canary: f64, stable: f64, above: bool },
}

/// The power question: could this much data have revealed the minimum effect at this threshold?
pub enum Power {
    Enough,
    /// No: the minimum effect in words, and the canary requests it would take to show it (`None`:
    /// no number would, against this stable window).
    Short {
        effect: String,
        needed: Option<u64>,
    },
    /// Something other than canary requests is missing first (a longer window, metric points, a
    /// learned baseline, any stable requests to compare with).
    Waiting(String),
}

impl Power {
    /// The power of a test that shows the minimum effect on `n` canary requests exactly when
    /// `shows(n)`; `shows` must be (about) monotone in `n`.
    pub fn of(have: u64, effect: impl FnOnce() -> String, shows: impl Fn(u64) -> bool) -> Power {
        Power::searched(have, effect, shows, None)
    }

    /// `of`, its search for the requests needed starting where `hint` last ended.
    fn searched(
        have: u64,
        effect: impl FnOnce() -> String,
        shows: impl Fn(u64) -> bool,
        hint: Option<(&PowerHints, u64)>,
    ) -> Power {
        if shows(have) {
            return Power::Enough;
        }
        let first = grid_index(have.saturating_add(1));
        let start = hint
            .and_then(|(hints, key)| hints.0.borrow().get(&key).copied())
            .unwrap_or(first)
            .clamp(first, GRID_LAST);
        let needed = first_showing(first, start, |k| shows(grid(k)));
        if let Some((hints, key)) = hint {
            let mut map = hints.0.borrow_mut();
            if map.len() >= MAX_POWER_HINTS && !map.contains_key(&key) {
                map.clear();
            }
            map.insert(key, needed.unwrap_or(GRID_LAST));
        }
        Power::Short {
            effect: effect(),
            needed: needed.map(grid),
        }
    }
}

/// The request counts `Power` answers in: every count up to `GRID_LINEAR`, then steps of 1% (the
/// answer is an estimate for people, not a bound). Answering on a fixed grid makes the answer
/// the grid's first count that shows the effect, wherever its search started.
const GRID_LINEAR: u32 = 100;

/// The grid's last point, the first at or past 2^32: more canary requests than that are never
/// worth asking for, and a minimum effect the data cannot show by then is reported as such.
const GRID_LAST: u32 = 1_867;

/// The `k`th request count of the grid (`k <= GRID_LAST`).
fn grid(k: u32) -> u64 {
    static GRID: std::sync::LazyLock<Vec<u64>> = std::sync::LazyLock::new(|| {
        (0..=GRID_LAST)
            .map(|k| {
                if k <= GRID_LINEAR {
                    u64::from(k)
                } else {
                    (f64::from(GRID_LINEAR) * 1.01f64.powi((k - GRID_LINEAR) as i32)).ceil() as u64
                }
            })
            .collect()
    });
    GRID[k.min(GRID_LAST) as usize]
}

/// The index of the grid's first count at or above `n`.
fn grid_index(n: u64) -> u32 {
    if n <= u64::from(GRID_LINEAR) {
        return n as u32;
    }
    let guess = GRID_LINEAR as f64 + ((n as f64 / GRID_LINEAR as f64).ln() / 1.01f64.ln()).ceil();
    let mut k = (guess.max(f64::from(GRID_LINEAR)) as u32).min(GRID_LAST);
    // Rounding in the logarithm can put the guess one off either way.
    while k > GRID_LINEAR && grid(k - 1) >= n {
        k -= 1;
    }
    while k < GRID_LAST && grid(k) < n {
        k += 1;
    }
    k
}

/// The first index in `first..=GRID_LAST` where `shows` holds, searched from `start` (galloping
/// away from it, then halving); `None` when it holds nowhere. Near the last answer, two tests.
fn first_showing(first: u32, start: u32, shows: impl Fn(u32) -> bool) -> Option<u32> {
    // Invariants once bracketed: `shows(hi)`, and nothing below `lo` shows.
    let (mut lo, mut hi);
    if shows(start) {
        hi = start;
        let mut step = 1;
        loop {
            if hi == first {
                return Some(hi);
            }
            let probe = hi.saturating_sub(step).max(first);
            if shows(probe) {
                hi = probe;
                step = step.saturating_mul(2);
            } else {
                lo = probe + 1;
                break;
            }
        }
    } else {
        lo = start + 1;
        let mut step = 1;
        loop {
            if lo > GRID_LAST {
                return None;
            }
            let probe = start.saturating_add(step).min(GRID_LAST);
            if shows(probe) {
                hi = probe;
                break;
            }
            lo = probe + 1;
            step = step.saturating_mul(2);
        }
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if shows(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(hi)
}

/// Where each undecided check's search for the requests it needs ended at an analysis's last
/// look (its grid index, by a hash of the check's id and subject): the next look starts there,
/// and mostly finds the answer again in two tests instead of a dozen. Only speed depends on it,
/// so it is neither stored nor counted when cleared at `MAX_POWER_HINTS`.
#[derive(Debug, Default)]
pub struct PowerHints(std::cell::RefCell<std::collections::HashMap<u64, u32>>);

/// More checks than an analysis holds at once: a hint map this full has collected ones that
/// went away, and starts again.
const MAX_POWER_HINTS: usize = 8_192;

/// The check of `spec` in a provisional look (`Thresholds::counting`): undecided, with nothing
/// computed, which is all that counting the checks needs.
pub fn counted(spec: Spec) -> Check {
    let evidence = Evidence {
        canary_value: None,
        baseline_value: None,
        canary_samples: 0,
        baseline_samples: 0,
        canary_requests: 0,
        canary_rps: 0.0,
        test: None,
        power: Power::Waiting(String::new()),
    };
    decide(spec, evidence, 0)
}

/// Evidence into a check's outcome, by the one rule (`rule`). A check fails with significance
/// against the stable in the same window at its threshold, and the model's minimum effect; it
/// passes only when its data could have revealed that minimum effect; anything else is
/// `insufficient_data`, with the canary requests still needed.
pub fn decide(spec: Spec, evidence: Evidence<'_>, min_requests: u64) -> Check {
    let group = spec.id.group;
    let test = spec.id.test;
    let band = matches!(test, Test::BaselineBand);
    let mut check = Check {
        group,
        feature: spec.id.feature.to_string(),
        operation: spec.operation,
        test,
        critical: spec.critical,
        weight: spec.weight,
        outcome: Outcome::InsufficientData,
        canary_value: evidence.canary_value,
        baseline_value: evidence.baseline_value,
        canary_samples: evidence.canary_samples,
        baseline_samples: evidence.baseline_samples,
        statistic: None,
        p_value: None,
        threshold: if band { spec.min_effect } else { z_of(spec.alpha) },
        effect: None,
        min_effect: spec.min_effect,
        effect_kind: spec.effect_kind,
        window_s: spec.id.horizon_s,
        message: String::new(),
        id: spec.id,
    };
    let n = evidence.canary_requests;
    if let Power::Waiting(why) = &evidence.power {
        check.message = why.clone();
        return check;
    }
    let significant = evidence.test.as_ref().map(|t| {
        (
            match (t.sequential, t.significance) {
                (Some(sequential), _) => sequential.significant(),
                (None, Significance::PValue(p)) => p < spec.alpha,
                (
                    None,
                    Significance::Band {
                        canary,
                        stable,
                        above,
                    },
                ) => canary >= spec.min_effect && above && stable < spec.min_effect / 2.0,
            },
            t,
        )
    });
    if let Some((_, t)) = &significant {
        (check.statistic, check.p_value) = match t.significance {
            Significance::PValue(p) => (Some(z_of(p)), Some(p)),
            Significance::Band { canary, .. } => (Some(canary), None),
        };
        check.effect = Some(t.effect.min(1e9));
    }
    let fails = significant.is_some_and(|(significant, t)| {
        significant && t.effect_ok && t.sequential.map_or(n, |s| s.canary_requests) >= min_requests
    });
    let passes = significant.is_some() && matches!(evidence.power, Power::Enough) && n >= min_requests;
    check.outcome = rule(fails, passes);
    check.message = match (check.outcome, significant) {
        (Outcome::Fail, Some((_, t))) => match t.sequential {
            Some(s) => format!(
                "{}; sequential evidence {} over {} s, {} needed",
                (t.words)(true),
                e_value(s.e_value),
                s.seconds,
                e_value(s.needed)
            ),
            None => (t.words)(true),
        },
        (Outcome::Pass, Some((_, t))) => (t.words)(false),
        _ => still_needed(n, min_requests, evidence.power, evidence.canary_rps),
    };
    check
}

/// The rule every check and every stage gate ends in: fail on evidence that clears the threshold
/// with the minimum effect; pass only on data that could have shown that effect (a check's
/// `Power`, a gate's confidence bounds meeting its limit); anything else is undecided
/// (`insufficient_data`, a gate's `pending`).
pub fn rule(fails: bool, passes: bool) -> Outcome {
    if fails {
        Outcome::Fail
    } else if passes {
        Outcome::Pass
    } else {
        Outcome::InsufficientData
    }
}

/// An e-value for people: `3.2e4`, `850`.
fn e_value(e: f64) -> String {
    if e >= 1e4 {
        format!("{e:.1e}")
    } else {
        format!("{e:.0}")
    }
}

/// Why an undecided check is undecided, and how many more canary requests (and about how long at
/// the canary's current rate) it needs.
fn still_needed(n: u64, min_requests: u64, power: Power, rps: f64) -> String {
    let (why, needed) = match power {
        Power::Short { effect, needed } => (
            format!("{} canary requests cannot show {effect}", thousands(n)),
            needed.map(|k| k.max(min_requests)),
        ),
        _ => (
            format!(
                "{} canary requests are fewer than the {} a check needs",
                thousands(n),
                thousands(min_requests)
            ),
            Some(min_requests),
        ),
    };
    let Some(needed) = needed else {
        return format!(
            "{why}, and no number of them could against the stable's window: more stable requests needed first"
        );
    };
    format!("{why}; {}", more_needed(n, needed, rps))
}

/// How many canary requests beyond `n` make `needed`, and about how long they take at `rps`:
/// "about 1,800 more needed, ~3 min at 10 req/s".
pub(crate) fn more_needed(n: u64, needed: u64, rps: f64) -> String {
    let more = needed.saturating_sub(n).max(1);
    let when = if rps > 0.0 {
        format!("~{} at {} req/s", duration(more as f64 / rps), rate(rps))
    } else {
        "and the canary had no requests in this window".to_owned()
    };
    format!("about {} more needed, {when}", thousands(more))
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn duration(s: f64) -> String {
    if s < 90.0 {
        format!("{} s", s.ceil().max(1.0))
    } else if s < 90.0 * 60.0 {
        format!("{} min", (s / 60.0).round())
    } else if s < 48.0 * 3600.0 {
        format!("{} h", (s / 3600.0).round())
    } else {
        format!("{} days", (s / 86400.0).round())
    }
}

fn rate(rps: f64) -> String {
    if rps >= 10.0 {
        format!("{rps:.0}")
    } else if rps >= 1.0 {
        format!("{rps:.1}")
    } else {
        format!("{rps:.2}")
    }
}

/// The windows of one horizon: both versions over the same span of event time.
pub struct Windows<'a> {
    pub horizon_s: u64,
    /// How much of the horizon the analysis has seen (it may have started more recently).
    pub seen_s: u64,
    pub canary: &'a Aggregate,
    pub stable: &'a Aggregate,
    pub dispersion: &'a Dispersion,
    /// The analysis's sequential evidence so far, per series: the error ratio and latency checks
    /// fail on it alone (a series without any yet cannot fail). `None` judges them on the
    /// window's significance instead, as the other checks are: what the windowed statistics'
    /// own tests look at.
    pub sequential: Option<&'a crate::judge::sequential::EvidenceBySeries>,
    /// The cohort these windows are of, when they hold one cohort's requests (their checks' ids
    /// then name it); `None` for the whole app's.
    pub cohort: Option<&'a str>,
    /// Where the analysis's last look found each check's requests needed (`None`: search afresh).
    pub power_hints: Option<&'a PowerHints>,
}

impl<'a> Windows<'a> {
    /// Each cohort of the canary's requests (but `OVERFLOW`, those past the cap) that the stable
    /// served too, with the two versions' aggregates of it. A cohort routed to the canary alone
    /// (allow-listed users) has nothing to be compared with: it uses the app its own way (an
    /// internal team on the admin pages), so the stable's whole traffic is no stand-in.
    fn cohorts(&self) -> Vec<(&'a str, &'a Aggregate, &'a Aggregate)> {
        let (canary, stable) = (self.canary, self.stable);
        canary
            .cohorts
            .iter()
            .filter(|(cohort, _)| !crate::catalog::is_overflow(cohort))
            .filter(|(_, can)| can.all.requests > 0)
            .filter_map(|(cohort, can)| {
                let same = stable.cohorts.get(cohort).filter(|s| s.all.requests > 0)?;
                Some((&**cohort, can, same))
            })
            .collect()
    }
}

impl Windows<'_> {
    /// `requests` of the canary's window as a rate per second over the part of the horizon the
    /// analysis has seen.
    fn rps(&self, requests: u64) -> f64 {
        requests as f64 / self.seen_s.min(self.horizon_s).max(1) as f64
    }

    /// The analysis's sequential evidence for the series of check `id`: none yet reads as none
    /// at all. `None` where the windows are judged without any (a provisional look, a test).
    /// `Power::of` for the check of `spec`, its search starting where this check's last ended.
    fn power(
        &self,
        spec: &Spec,
        have: u64,
        effect: impl FnOnce() -> String,
        shows: impl Fn(u64) -> bool,
    ) -> Power {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hint = self.power_hints.map(|hints| {
            let key = BuildHasherDefault::<DefaultHasher>::default().hash_one((&spec.id, &spec.operation));
            (hints, key)
        });
        Power::searched(have, effect, shows, hint)
    }

    fn sequential(&self, id: &CheckId) -> Option<crate::judge::sequential::Evidence> {
        self.sequential
            .map(|by_series| by_series.get(&id.series()).copied().unwrap_or_default())
    }

    /// The id of this horizon's check of `feature`; in a cohort's windows, its subject is the
    /// cohort's (`cohort:beta`, `cohort:beta/payments`).
    fn id(&self, group: Group, feature: Feature, test: Test) -> CheckId {
        let feature = match self.cohort {
            None => feature,
            Some(cohort) => Feature {
                subject: Some(cohort_subject(cohort, feature.subject.as_deref())),
                name: feature.name,
            },
        };
        CheckId {
            group,
            feature,
            test,
            horizon_s: self.horizon_s,
        }
    }
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
        // Each part's counts by key, over their exposure: the part's requests (a part without
        // a key had none of it), or for a counter the requests of the time its increments
        // cover there (a part it does not cover says nothing of it).
        let parts: Vec<(f64, PartCounts)> = parts
            .iter()
            .filter(|(_, p)| p.all.requests > 0)
            .map(|(_, p)| {
                let n = p.all.requests as f64;
                let mut counts = BTreeMap::new();
                for (d, (calls, _)) in &p.calls {
                    counts.insert(format!("call:{d}"), (*calls as f64, n));
                }
                for (t, c) in &p.exceptions {
                    counts.insert(format!("exception:{t}"), (*c as f64, n));
                }
                counts.insert("error_logs".to_owned(), (p.error_logs as f64, n));
                for (series, m) in &p.metrics {
                    counts.insert(format!("metric:{series}"), (m.increment, m.exposure));
                }
                (n, counts)
            })
            .collect();
        let keys: std::collections::BTreeSet<&String> = parts.iter().flat_map(|(_, c)| c.keys()).collect();
        let factors = keys
            .into_iter()
            .map(|key| {
                let metric = key.starts_with("metric:");
                let pairs: Vec<(f64, f64)> = parts
                    .iter()
                    .filter_map(|(n, counts)| match counts.get(key) {
                        Some(pair) => Some(*pair),
                        None if metric => None,
                        None => Some((0.0, *n)),
                    })
                    .filter(|(_, exposure)| *exposure > 0.0)
                    .collect();
                (key.clone(), quasi_poisson_factor(&pairs))
            })
            .collect();
        Dispersion(factors)
    }

    pub fn get(&self, key: &str) -> f64 {
        self.0.get(key).copied().unwrap_or(1.0)
    }

    /// Whether no part has been measured yet (nothing says how any count is spread).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One part's (count, exposure) by key.
type PartCounts = BTreeMap<String, (f64, f64)>;

/// The dispersion of a count seen in only one part: nothing has measured it yet, so it is taken
/// as strongly clustered (as a second part with an ordinary spread would make it at this
/// confidence) until more parts say otherwise.
const UNMEASURED_DISPERSION: f64 = 100.0;

/// Pearson's dispersion statistic over (count, exposure) pairs, at its one-sided 90% upper
/// confidence bound (times its degrees of freedom over chi-square's 10% quantile), at least 1.
/// Measured on a few parts the statistic is noisy, and a rate test that took a low draw of it
/// for the truth would find differences in noise: with many operations calling a downstream
/// different numbers of times, the canary's calls per request move with its mix far more than
/// Poisson counts do, and every look of every horizon is another chance.
fn quasi_poisson_factor(pairs: &[(f64, f64)]) -> f64 {
    let (sx, sn): (f64, f64) = pairs.iter().fold((0.0, 0.0), |(a, b), (x, n)| (a + x, b + n));
    if sx <= 0.0 || sn <= 0.0 {
        return 1.0;
    }
    if pairs.len() < 2 {
        return UNMEASURED_DISPERSION;
    }
    let rate = sx / sn;
    let chi: f64 = pairs
        .iter()
        .map(|(x, n)| (x - rate * n).powi(2) / (rate * n))
        .sum();
    let df = (pairs.len() - 1) as f64;
    let low = ChiSquared::new(df).map_or(0.0, |c| c.inverse_cdf(0.1));
    if low <= 0.0 {
        return UNMEASURED_DISPERSION;
    }
    (chi / low).max(1.0)
}

/// The p-value each check must go below at one look: the false-alarm budget per hour, split over
/// the looks, the groups by weight, and each group's app-wide and per-subject checks.
#[derive(Clone, Debug, Default)]
pub struct Thresholds {
    by_check: BTreeMap<(Group, bool), f64>,
    fallback: f64,
    /// A provisional look's: the checks are only counted, nothing is computed.
    counting: bool,
}

/// The app-wide check's share of its group's false-alarm budget.
const APP_WIDE_SHARE: f64 = 0.6;

impl Thresholds {
    /// `checks` are the checks of one provisional look over `horizons` trailing windows.
    pub fn new(decision: &Decision, checks: &[Check], horizons: usize) -> Thresholds {
        let looks: f64 = decision
            .horizons_s
            .iter()
            .map(|h| 2.0 * (3600.0 / (*h).max(1) as f64).max(1.0))
            .sum();
        // Per group: weight, app-wide checks, per-subject checks.
        let mut groups: BTreeMap<Group, (f64, usize, usize)> = BTreeMap::new();
        for c in checks {
            let g = groups.entry(c.group).or_insert((c.weight, 0, 0));
            if c.id.app_wide() {
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
            counting: false,
        }
    }

    /// The same threshold for every check.
    pub fn uniform(p: f64) -> Thresholds {
        Thresholds {
            by_check: BTreeMap::new(),
            fallback: p,
            counting: false,
        }
    }

    /// A provisional look's, which only counts the checks that `new` splits the budget over: each
    /// check is made from its spec alone (`counted`), with none of its statistics computed.
    pub fn provisional() -> Thresholds {
        Thresholds {
            by_check: BTreeMap::new(),
            fallback: 1.0,
            counting: true,
        }
    }

    /// Whether these are a provisional look's, which only counts the checks.
    pub fn counting(&self) -> bool {
        self.counting
    }

    pub fn get(&self, group: Group, app_wide: bool) -> f64 {
        self.by_check
            .get(&(group, app_wide))
            .copied()
            .unwrap_or(self.fallback)
    }

    /// The threshold that applies to `check`.
    pub fn of(&self, check: &Check) -> f64 {
        self.for_id(&check.id)
    }

    /// The threshold for a check of `id`.
    pub fn for_id(&self, id: &CheckId) -> f64 {
        self.get(id.group, id.app_wide())
    }
}

/// Evaluates every check of `model` on one horizon's windows against the per-look p-values.
pub fn evaluate(model: &Model, w: &Windows<'_>, t: &Thresholds, out: &mut Vec<Check>) {
    let d = &model.decision;
    let c = &model.checks;
    if let Some(e) = &c.error_ratio {
        for s in subjects(w, e.per_operation) {
            out.push(errors::error_ratio(e, d, &s, w, t));
        }
    }
    if let Some(l) = &c.latency {
        for s in subjects(w, l.per_operation) {
            for q in &l.quantiles {
                out.push(latency::latency(l, d, *q, &s, w, t));
            }
        }
    }
    if let Some(m) = &c.operation_mix {
        out.push(mix::operation_mix(m, d, w, t));
    }
    rates::evaluate(model, w, t, out);
    // Each cohort's operation mix, call graph and exceptions, as the app's are judged (its error
    // ratio and latency are subjects above), against the stable's same cohort. Logs and metrics
    // carry no request's cohort.
    if w.cohort.is_none() {
        for (cohort, canary, stable) in w.cohorts() {
            let view = Windows {
                canary,
                stable,
                cohort: Some(cohort),
                ..*w
            };
            let first = out.len();
            if let Some(m) = &c.operation_mix {
                out.push(mix::operation_mix(m, d, &view, t));
            }
            rates::evaluate(model, &view, t, out);
            let subject = cohort_subject(cohort, None);
            for check in &mut out[first..] {
                check.operation = Some(subject.clone());
            }
        }
    }
}

/// An operation's requests (or the whole app's) in both versions' windows.
pub(crate) struct Subject<'a> {
    pub operation: Option<String>,
    pub canary: &'a RequestAggregate,
    pub stable: &'a RequestAggregate,
}

/// The prefix of a cohort's subject (`cohort:beta`), beside operations' names.
pub const COHORT_SUBJECT: &str = "cohort:";

/// The subject of a check of `cohort`: the cohort (`cohort:beta`, the operation mix), or the
/// cohort's `subject` (`cohort:beta/payments`, a downstream or exception type of its requests).
/// A `/` or `%` in the cohort's name is escaped (`%2F`, `%25`), so that the first `/` ends it
/// and no two cohorts' subjects are alike.
pub fn cohort_subject(cohort: &str, subject: Option<&str>) -> String {
    let cohort = if cohort.contains(['/', '%']) {
        cohort.replace('%', "%25").replace('/', "%2F")
    } else {
        cohort.to_owned()
    };
    match subject {
        None => format!("{COHORT_SUBJECT}{cohort}"),
        Some(subject) => format!("{COHORT_SUBJECT}{cohort}/{subject}"),
    }
}

/// The cohort a cohort's own subject names (`cohort:beta` -> `beta`), undoing `cohort_subject`'s
/// escapes; `None` for any other subject (an operation, or a cohort's downstream or type).
pub fn cohort_named(subject: &str) -> Option<std::borrow::Cow<'_, str>> {
    let escaped = subject
        .strip_prefix(COHORT_SUBJECT)
        .filter(|c| !c.contains('/'))?;
    if !escaped.contains('%') {
        return Some(escaped.into());
    }
    let mut name = String::with_capacity(escaped.len());
    let mut rest = escaped;
    while let Some(at) = rest.find('%') {
        name.push_str(&rest[..at]);
        let code = rest.get(at..at + 3);
        name.push_str(match code {
            Some("%2F") => "/",
            Some("%25") => "%",
            _ => "%",
        });
        rest = &rest[at + if matches!(code, Some("%2F" | "%25")) { 3 } else { 1 }..];
    }
    name.push_str(rest);
    Some(name.into())
}

/// The whole app, then each operation the canary served when `per_operation`, then each cohort
/// the canary's requests carry (`COHORT_SUBJECT` + its name): a version that fails only for one
/// cohort is caught there, and named. A cohort is compared with the stable's requests of the same
/// cohort (`Windows::cohorts`). Requests past the cohort cap (`OVERFLOW`) are no cohort.
fn subjects<'a>(w: &Windows<'a>, per_operation: bool) -> Vec<Subject<'a>> {
    static EMPTY: std::sync::OnceLock<RequestAggregate> = std::sync::OnceLock::new();
    let empty = EMPTY.get_or_init(RequestAggregate::default);
    let app = Subject {
        operation: None,
        canary: &w.canary.all,
        stable: &w.stable.all,
    };
    let operations = w
        .canary
        .operations
        .iter()
        .filter(|_| per_operation)
        .map(|(op, can)| Subject {
            operation: Some(op.to_string()),
            canary: can,
            stable: w.stable.operations.get(op).unwrap_or(empty),
        });
    let cohorts = w.cohorts().into_iter().map(|(cohort, can, st)| Subject {
        operation: Some(cohort_subject(cohort, None)),
        canary: &can.all,
        stable: &st.all,
    });
    std::iter::once(app).chain(operations).chain(cohorts).collect()
}

impl Subject<'_> {
    /// The spec of this subject's check `id`: a check of a ratio to the stable's value.
    fn spec(&self, id: CheckId, critical_weight: (bool, f64), t: &Thresholds, min_ratio: f64) -> Spec {
        Spec::new(id, self.operation.clone(), critical_weight, t, min_ratio, "ratio")
    }

    /// The feature `name` of this subject.
    fn feature(&self, name: impl Into<String>) -> Feature {
        Feature {
            name: name.into(),
            subject: self.operation.clone(),
        }
    }
}

/// How much the stable's counts grow while the canary's grow from `have` requests to `n`: both
/// are counted over the same span, so more canary requests take more time and bring the stable's
/// with them, in the proportion they are in now (as if the canary had one request, when it has
/// none). What the power questions assume of the stable at `n` canary requests.
fn stable_grows(n: u64, have: u64) -> f64 {
    (n as f64 / have.max(1) as f64).max(1.0)
}

/// `count` grown by `factor`, as a count.
fn grown(count: u64, factor: f64) -> u64 {
    (count as f64 * factor).round() as u64
}

/// `n / d`, when there is anything to divide by.
fn ratio(n: f64, d: f64) -> Option<f64> {
    (d > 0.0).then(|| n / d)
}
