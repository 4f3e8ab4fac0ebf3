//! Anytime-valid comparisons of the canary with the stable: evidence that grows second by second
//! and may be read at every look, with the chance that a healthy canary is ever failed bounded by
//! the model's `false_failure_rate` over the whole analysis, however long it runs and however
//! often it is looked at. No per-look correction, so a low-traffic canary is decided as soon as
//! its evidence allows, not when a window happens to hold enough of it.
//!
//! Each second both versions served is one step. Given how many events (failed requests,
//! requests slower than the stable's recent quantile, calls to a downstream, exceptions of a type,
//! error logs, requests of one operation) the two versions had together in that second, the
//! canary's share of them is, when both behave alike, at most as spread as a binomial
//! draw with the canary's share of the requests (hypergeometric when each request is a trial;
//! binomial for Poisson counts). Against a canary whose rate is `r` times the stable's, that share
//! grows; the likelihood ratio of the two is a test martingale, and its expectation under the
//! null is at most 1 for every second, whatever the load did (both versions are compared within
//! the same second). The evidence is a mixture over several `r` and over start times (a fault
//! that begins mid-analysis is not buried under the healthy seconds before it: a process started
//! later carries it, at a smaller weight), which is still a test supermartingale; by Ville's
//! inequality it ever reaches `1 / alpha` with chance at most `alpha`.
//!
//! Where a change either way matters (calls, an operation's share, a counter's increments), the
//! mixture also holds the inverse ratios. Counts that cluster (a request makes several calls) are
//! divided by the stable's dispersion of them, measured before the second is taken, as the
//! windowed quasi-Poisson tests do; a counter's increments are taken per 10-second block once its
//! points have landed, over the requests of the time they cover.
//!
//! A failure must also not rest on one second: each second's step is capped at half of what the
//! check needs (in log terms), so a single slow batch or burst never fails a canary on its own.
//! A likelihood ratio cut from above still has expectation at most 1, so the cap keeps the
//! guarantee; steady evidence (an error or two a second) is never near it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::checks::{COHORT_SUBJECT, Dispersion, Feature, Group, Series, Test, cohort_named, cohort_subject};
use super::history::History;
use super::model::Model;
use super::table_bytes;
use crate::catalog::is_overflow;
use crate::observation::EventTime;
use crate::window::{Aggregate, RequestAggregate};

const SECOND: EventTime = 1_000_000_000;

/// The rate ratios the evidence is mixed over: from changes near the models' smallest effects to
/// gross ones, so that a gross fault is caught about as fast as a test built for it alone.
const RATIOS: [f64; 8] = [1.25, 1.6, 2.0, 3.0, 5.0, 10.0, 25.0, 100.0];
/// A new process starts every this many seconds of the analysis.
const RESTART_S: u64 = 30;
/// How much of the stable's recent past its quantiles (the latency thresholds) are taken from:
/// seconds before the one being judged, never including it.
const REFERENCE_S: u64 = 60;
/// Stable requests the reference needs before a latency threshold is taken from it.
const MIN_REFERENCE: u64 = 20;
/// The part of the error ratio's and latency's budget that goes to the operations, when they are
/// judged (`per_operation`).
const OPERATIONS_SHARE: f64 = 0.3;
/// The part of each group's budget set aside for cohorts (the error ratio, latency, operation
/// mix, call graph and exceptions), whether or not any appears, so that no series' share
/// changes when one does.
const COHORTS_SHARE: f64 = 0.1;
/// Operations judged sequentially, in the order they were first seen; any beyond are judged by
/// the windowed tests alone (the catalog caps operations long before this).
const MAX_SUBJECTS: usize = 1_000;

/// Which changes a comparison looks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sides {
    /// The canary's rate grew (errors, slow requests, exceptions, error logs).
    #[default]
    Greater,
    /// The canary's rate moved either way (calls to a downstream, an operation's share, a
    /// counter's increments per request): the evidence is mixed over the inverse ratios too.
    Both,
}

/// The ratios `sides` mixes over: `RATIOS`, then their inverses when both ways count.
fn ratio_at(i: usize) -> f64 {
    if i < RATIOS.len() {
        RATIOS[i]
    } else {
        1.0 / RATIOS[i - RATIOS.len()]
    }
}

/// The evidence of one comparison: a mixture of test supermartingales, one started every
/// `RESTART_S` seconds, each under every ratio. Start `i` (from 0) carries `6 / (pi^2 (i + 1)^2)`
/// of the mixture, shared evenly among its ratios.
///
/// Every start takes the same step each second (the cap bounds the step, not a start's wealth),
/// so the mixture is linear in the starts: under each ratio, the weighted sum of every start's
/// wealth is that sum multiplied by the second's likelihood ratio, plus each new start's weight.
/// One number a ratio holds every start ever made, in the memory of one start: an analysis holds
/// one process per check series, and keeping each start apart cost 33 starts of 8 or 16 ratios
/// (2-4 KB a process) once the analysis had run a quarter of an hour, with the older starts
/// dropped.
#[derive(Clone, Debug, Default)]
pub struct EProcess {
    sides: Sides,
    /// Under each ratio, the log of every start's wealth weighted by its share relative to the
    /// first start's, `1 / (i + 1)^2`, and summed: the wealth one start of index 0 would need
    /// to hold the whole mixture. Empty before the first start.
    log_wealth: Box<[f64]>,
    starts: u64,
    /// The weight of every process started so far.
    started_weight: f64,
    last_start: EventTime,
    /// Seconds that carried any event of the comparison.
    seconds: u64,
    /// The canary's requests over every second taken.
    canary_requests: f64,
}

/// `ln(e^a + e^b)`, exact when one of them is `-inf`.
fn log_add(a: f64, b: f64) -> f64 {
    let (top, low) = if a >= b { (a, b) } else { (b, a) };
    if low == f64::NEG_INFINITY {
        return top;
    }
    top + (low - top).exp().ln_1p()
}

/// The log of start `index`'s share of the mixture relative to the first start's.
fn log_relative_weight(index: u64) -> f64 {
    -2.0 * ((index + 1) as f64).ln()
}

impl EProcess {
    pub fn new(sides: Sides) -> Self {
        EProcess {
            sides,
            ..EProcess::default()
        }
    }

    /// How many ratios the mixture holds.
    fn ratios(&self) -> usize {
        match self.sides {
            Sides::Greater => RATIOS.len(),
            Sides::Both => 2 * RATIOS.len(),
        }
    }

    /// Starts a process at wealth 1 under every ratio.
    fn start(&mut self, at: EventTime) {
        let relative = log_relative_weight(self.starts);
        if self.log_wealth.is_empty() {
            self.log_wealth = vec![f64::NEG_INFINITY; self.ratios()].into_boxed_slice();
        }
        for wealth in &mut self.log_wealth {
            *wealth = log_add(*wealth, relative);
        }
        self.started_weight += by_rank(self.starts + 1);
        self.starts += 1;
        self.last_start = at;
    }

    /// Takes one second at `at`: the canary's `x_c` events over `n_c` exposure (requests), the
    /// stable's `x_s` over `n_s`. No step adds more than `cap` to any process's log wealth.
    pub fn observe(&mut self, at: EventTime, (x_c, n_c): (f64, f64), (x_s, n_s): (f64, f64), cap: f64) {
        let ratios = self.ratios();
        if self.starts == 0 || at >= self.last_start.saturating_add(RESTART_S * SECOND) {
            self.start(at);
        }
        if n_s > 0.0 {
            self.canary_requests += n_c.max(0.0);
        }
        if n_c <= 0.0 || n_s <= 0.0 || x_c + x_s <= 0.0 {
            return;
        }
        self.seconds += 1;
        let share = n_c / (n_c + n_s);
        let mut steps = [0.0; 2 * RATIOS.len()];
        for (i, step) in steps.iter_mut().enumerate().take(ratios) {
            let r = ratio_at(i);
            let shifted = r * n_c / (r * n_c + n_s);
            *step = (x_c * (shifted / share).ln() + x_s * ((1.0 - shifted) / (1.0 - share)).ln()).min(cap);
        }
        for (wealth, step) in self.log_wealth.iter_mut().zip(steps) {
            *wealth += step;
        }
    }

    /// The evidence against "the canary is no worse", as an e-value (1 is none).
    pub fn e_value(&self) -> f64 {
        let Some(top) = self.log_wealth.iter().copied().reduce(f64::max) else {
            return 1.0;
        };
        // Each ratio's share of the first start's weight.
        let first = by_rank(1) / self.ratios() as f64;
        let sum: f64 = self.log_wealth.iter().map(|l| (l - top).exp()).sum();
        // Processes not started yet hold their weight at wealth 1 (so the mixture reads 1 before
        // any evidence).
        (first * top.exp() * sum + (1.0 - self.started_weight).max(0.0)).min(f64::MAX)
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

/// Evidence spread over subjects whose number is not known in advance (the operations of the
/// mix): the `k`th subject first seen carries `6 / (pi^2 k^2)` of it, and the weighted mean of
/// their e-processes (subjects not seen yet held at 1) is itself an e-process.
#[derive(Clone, Debug, Default)]
struct Spread {
    by_subject: HashMap<String, (usize, EProcess)>,
}

impl Spread {
    fn process(&mut self, subject: &str, sides: Sides) -> Option<&mut EProcess> {
        if !self.by_subject.contains_key(subject) {
            if self.by_subject.len() >= MAX_SUBJECTS {
                return None;
            }
            let rank = self.by_subject.len() + 1;
            self.by_subject
                .insert(subject.to_owned(), (rank, EProcess::new(sides)));
        }
        self.by_subject.get_mut(subject).map(|(_, p)| p)
    }

    fn e_value(&self) -> f64 {
        let (mut e, mut weight) = (0.0, 0.0);
        for (rank, process) in self.by_subject.values() {
            let w = by_rank(*rank as u64);
            e += w * process.e_value();
            weight += w;
        }
        e + (1.0 - weight).max(0.0)
    }

    fn seconds(&self) -> u64 {
        self.by_subject
            .values()
            .map(|(_, p)| p.seconds())
            .max()
            .unwrap_or(0)
    }

    fn canary_requests(&self) -> u64 {
        self.by_subject
            .values()
            .map(|(_, p)| p.canary_requests())
            .max()
            .unwrap_or(0)
    }

    /// Each subject, its rank and its process's state, by rank.
    fn state(&self) -> MixState {
        let mut state: MixState = self
            .by_subject
            .iter()
            .map(|(subject, (rank, process))| (subject.clone(), *rank, process.state()))
            .collect();
        state.sort_by_key(|(_, rank, _)| *rank);
        state
    }

    fn restored(state: &[(String, usize, ProcessState)]) -> Spread {
        Spread {
            by_subject: state
                .iter()
                .map(|(subject, rank, process)| (subject.clone(), (*rank, EProcess::restored(process))))
                .collect(),
        }
    }
}

/// How long after a 10-second block ends its counter increments are taken: a point lands when
/// its export interval ends (60 s by default in the OpenTelemetry SDKs), and only then are its
/// increments and their requests attributed to the seconds it covers.
const METRIC_LAG_S: u64 = 70;
const BLOCK: EventTime = 10 * SECOND;

/// A part of the app's requests judged on its own: an operation, or a cohort.
enum Subject {
    Operation(String),
    Cohort(String),
}

impl Subject {
    /// The check's subject, as its feature names it.
    fn name(&self) -> String {
        match self {
            Subject::Operation(op) => op.clone(),
            Subject::Cohort(cohort) => cohort_subject(cohort, None),
        }
    }
}

/// The sequential evidence of one analysis, per check series.
#[derive(Clone, Debug, Default)]
pub struct Sequential {
    by_series: HashMap<Series, EProcess>,
    /// The operation mix: one two-sided process per operation's share.
    mix: Spread,
    /// Each cohort's operation mix, with the cohort's rank (in the order first judged), which
    /// sets its share of the mix's budget.
    cohort_mix: HashMap<String, (usize, Spread)>,
    /// Operations and cohorts (`cohort:beta`), each with its rank among those of its kind in the
    /// order first judged, which sets its share of the budget.
    subjects: HashMap<String, usize>,
    /// Downstreams, exception types and counter series (a cohort's among them), each with its
    /// rank among those of its group and kind (the app's, or cohorts') in the order first
    /// judged; and how many each group and kind has.
    keyed: HashMap<(Group, String), usize>,
    keyed_counts: HashMap<(Group, bool), usize>,
    /// Evidence gathered under the budget's split before cohorts had shares of their own (a
    /// store record of `sequential.1`): it goes on under that split, cohorts judged by nothing
    /// but the app's and operations' series, so that no series' share changes mid-analysis.
    legacy: bool,
    /// The stable's dispersion of each count, as of the last look: fixed before the seconds it
    /// scales are taken.
    dispersion: Dispersion,
    /// The cohorts the stable has served so far: the cohorts judged, each against the stable's
    /// same cohort. Not stored: a restart learns them again.
    stable_cohorts: BTreeSet<String>,
    /// The end of the last second taken.
    through: EventTime,
    /// The end of the last block whose counter increments were taken.
    metrics_through: EventTime,
}

impl EProcess {
    fn heap_bytes(&self) -> usize {
        std::mem::size_of_val::<[f64]>(&self.log_wealth)
    }
}

impl Spread {
    fn memory_bytes(&self) -> usize {
        table_bytes(&self.by_subject)
            + self
                .by_subject
                .iter()
                .map(|(subject, (_, p))| subject.capacity() + p.heap_bytes())
                .sum::<usize>()
    }
}

impl Sequential {
    /// About the memory it holds: each check series' process, the mixes' processes and the
    /// ranks' maps, with their tables.
    pub fn memory_bytes(&self) -> usize {
        let series = table_bytes(&self.by_series)
            + self
                .by_series
                .iter()
                .map(|((_, feature, _), p)| feature.heap_bytes() + p.heap_bytes())
                .sum::<usize>();
        let mixes = self.mix.memory_bytes()
            + table_bytes(&self.cohort_mix)
            + self
                .cohort_mix
                .iter()
                .map(|(cohort, (_, spread))| cohort.capacity() + spread.memory_bytes())
                .sum::<usize>();
        let ranks = table_bytes(&self.subjects)
            + self.subjects.keys().map(String::capacity).sum::<usize>()
            + table_bytes(&self.keyed)
            + self.keyed.keys().map(|(_, s)| s.capacity()).sum::<usize>()
            + table_bytes(&self.keyed_counts);
        series + mixes + ranks
    }

    /// Whether checks of `group` decide failures sequentially: every comparison with the stable
    /// (the baseline band compares with what was learned, not with a running version).
    pub fn covers(group: Group) -> bool {
        group != Group::Baseline
    }

    /// The stable's dispersion of each count (quasi-Poisson), for the seconds taken from now on.
    pub fn set_dispersion(&mut self, dispersion: Dispersion) {
        self.dispersion = dispersion;
    }

    /// Takes every second from the last one taken up to `now` (of those still held one by one in
    /// the histories): both versions' requests in it, as steps of each series' evidence; and the
    /// counter increments of every block old enough for its points to have landed.
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
        if model.checks.metrics.is_some() {
            let ripe = now.saturating_sub(METRIC_LAG_S * SECOND);
            let mut block = self.metrics_through.max(ripe.saturating_sub(20 * BLOCK));
            block -= block % BLOCK;
            while block.saturating_add(BLOCK) <= ripe {
                if let (Some(can), Some(st)) = (canary.block(block), stable.block(block)) {
                    self.counters(model, block, &can, &st);
                }
                block += BLOCK;
            }
            self.metrics_through = self.metrics_through.max(block);
        }
    }

    /// Takes the steps of one count: `x` events of the canary and the stable over `n` requests
    /// each, the counts scaled down by the stable's dispersion of them (`dispersion_key`).
    #[allow(clippy::too_many_arguments)]
    fn count(
        &mut self,
        model: &Model,
        series: Series,
        sides: Sides,
        dispersion_key: &str,
        at: EventTime,
        (x_c, n_c): (f64, f64),
        (x_s, n_s): (f64, f64),
    ) {
        // Until the stable's spread has been measured at all, a count says nothing: taken as
        // Poisson, clustered calls would count several times over.
        if self.dispersion.is_empty() {
            return;
        }
        let phi = self.dispersion.get(dispersion_key);
        if !self.rank(&series) {
            return;
        }
        let cap = self.step_cap(model, &series);
        self.by_series
            .entry(series)
            .or_insert_with(|| EProcess::new(sides))
            .observe(at, (x_c / phi, n_c), (x_s / phi, n_s), cap);
    }

    /// Gives a keyed series (a downstream, exception type or counter series) its place in its
    /// group, when it has none yet; whether it has one.
    fn rank(&mut self, (group, feature, _): &Series) -> bool {
        let Some(subject) = &feature.subject else {
            return true;
        };
        let key = (*group, subject.clone());
        if self.keyed.contains_key(&key) {
            return true;
        }
        let count = self.keyed_counts.entry((*group, is_cohort(subject))).or_default();
        if *count >= MAX_SUBJECTS {
            return false;
        }
        *count += 1;
        self.keyed.insert(key, *count);
        true
    }

    /// Gives an operation or cohort (`cohort:beta`) its rank among those of its kind, when it has
    /// none yet and its kind is under the cap; whether it has one.
    fn rank_subject(&mut self, subject: &str) -> bool {
        if self.subjects.contains_key(subject) {
            return true;
        }
        let cohort = is_cohort(subject);
        let count = self.subjects.keys().filter(|s| is_cohort(s) == cohort).count();
        if count >= MAX_SUBJECTS {
            return false;
        }
        // Legacy evidence ranked both kinds together; its ranks go on so, never repeated.
        let rank = if self.legacy { self.subjects.len() } else { count } + 1;
        self.subjects.insert(subject.to_owned(), rank);
        true
    }

    fn second(&mut self, model: &Model, at: EventTime, can: &Aggregate, st: &Aggregate, stable: &History) {
        self.requests(model, at, can, st, stable);
        self.events(model, at, can, st, None);
        if self.legacy {
            return;
        }
        // Each cohort's calls, exceptions and mix, against the stable's same cohort once the
        // stable has served it (`requests` has just learned whether it has): the app's whole
        // traffic says nothing of what a cohort's mix and calls should be.
        for (cohort, agg) in can.cohorts.iter().filter(|(c, _)| !is_overflow(c)) {
            if !self.stable_cohorts.contains(&**cohort) {
                continue;
            }
            if let Some(reference) = st.cohorts.get(cohort)
                && agg.all.requests > 0
                && reference.all.requests > 0
            {
                self.events(model, at, agg, reference, Some(cohort));
            }
        }
    }

    /// The steps of one second's event counts (calls per downstream, exceptions per type, error
    /// logs, requests per operation) of the app's requests, or of one cohort's.
    fn events(
        &mut self,
        model: &Model,
        at: EventTime,
        can: &Aggregate,
        st: &Aggregate,
        cohort: Option<&str>,
    ) {
        let c = &model.checks;
        let n = (can.all.requests as f64, st.all.requests as f64);
        let subject = |s: &str| match cohort {
            None => s.to_owned(),
            Some(cohort) => cohort_subject(cohort, Some(s)),
        };
        if c.call_graph.is_some() {
            let downstreams: BTreeSet<&Arc<str>> = can.calls.keys().chain(st.calls.keys()).collect();
            for ds in downstreams {
                let calls = |a: &Aggregate| a.calls.get(ds).map_or(0.0, |c| c.0 as f64);
                let series = (
                    Group::CallGraph,
                    feature_of("calls_per_request", Some(&subject(ds))),
                    Test::PoissonRate,
                );
                let key = format!("call:{ds}");
                self.count(
                    model,
                    series,
                    Sides::Both,
                    &key,
                    at,
                    (calls(can), n.0),
                    (calls(st), n.1),
                );
            }
        }
        if c.exceptions.is_some() {
            let types: BTreeSet<&Arc<str>> = can.exceptions.keys().chain(st.exceptions.keys()).collect();
            for ty in types {
                let count = |a: &Aggregate| a.exceptions.get(ty).copied().unwrap_or(0) as f64;
                let series = (
                    Group::Exceptions,
                    feature_of("exception_rate", Some(&subject(ty))),
                    Test::PoissonRate,
                );
                let key = format!("exception:{ty}");
                self.count(
                    model,
                    series,
                    Sides::Greater,
                    &key,
                    at,
                    (count(can), n.0),
                    (count(st), n.1),
                );
            }
        }
        if c.error_logs.is_some() && cohort.is_none() {
            let series = (
                Group::ErrorLogs,
                feature_of("error_log_rate", None),
                Test::PoissonRate,
            );
            let x = (can.error_logs as f64, st.error_logs as f64);
            self.count(
                model,
                series,
                Sides::Greater,
                "error_logs",
                at,
                (x.0, n.0),
                (x.1, n.1),
            );
        }
        if c.operation_mix.is_some() {
            // Each operation's requests among all requests: when both versions serve one mix,
            // the canary's share of an operation's requests in a second is a binomial draw with
            // its share of all requests, exactly (requests are routed one by one).
            if let Some(cohort) = cohort
                && !self.cohort_mix.contains_key(cohort)
                && self.cohort_mix.len() < MAX_SUBJECTS
            {
                let rank = self.cohort_mix.len() + 1;
                self.cohort_mix
                    .insert(cohort.to_owned(), (rank, Spread::default()));
            }
            let cap = self.step_cap(model, &mix_series(cohort));
            let spread = match cohort {
                None => &mut self.mix,
                Some(cohort) => match self.cohort_mix.get_mut(cohort) {
                    Some((_, spread)) => spread,
                    None => return,
                },
            };
            let ops: BTreeSet<&Arc<str>> = can.operations.keys().chain(st.operations.keys()).collect();
            for op in ops {
                let requests = |a: &Aggregate| a.operations.get(op).map_or(0.0, |r| r.requests as f64);
                if let Some(process) = spread.process(op, Sides::Both) {
                    process.observe(at, (requests(can), n.0), (requests(st), n.1), cap);
                }
            }
        }
    }

    /// The counter increments per request of one block of each version: increments over the
    /// requests of the time they cover (`History`), both over the same block.
    fn counters(&mut self, model: &Model, at: EventTime, can: &Aggregate, st: &Aggregate) {
        for (series, s) in &st.metrics {
            let Some(c) = can.metrics.get(series) else {
                continue;
            };
            if c.exposure <= 0.0 || s.exposure <= 0.0 {
                continue;
            }
            let name = series.to_string();
            let key = format!("metric:{name}");
            let id = (
                Group::Metrics,
                feature_of("metric_rate", Some(&name)),
                Test::PoissonRate,
            );
            self.count(
                model,
                id,
                Sides::Both,
                &key,
                at,
                (c.increment, c.exposure),
                (s.increment, s.exposure),
            );
        }
    }

    /// The error ratio and latency steps of one second, of the app and of each operation.
    fn requests(&mut self, model: &Model, at: EventTime, can: &Aggregate, st: &Aggregate, stable: &History) {
        static EMPTY: std::sync::OnceLock<RequestAggregate> = std::sync::OnceLock::new();
        let empty = EMPTY.get_or_init(RequestAggregate::default);
        let c = &model.checks;
        let per_operation = c.error_ratio.as_ref().is_some_and(|e| e.per_operation)
            || c.latency.as_ref().is_some_and(|l| l.per_operation);
        let mut subjects: Vec<(Option<Subject>, &RequestAggregate, &RequestAggregate)> =
            vec![(None, &can.all, &st.all)];
        if per_operation {
            for (op, agg) in &can.operations {
                if self.rank_subject(op) {
                    let subject = Subject::Operation(op.to_string());
                    subjects.push((Some(subject), agg, st.operations.get(op).unwrap_or(empty)));
                }
            }
        }
        // Each cohort, against the stable's same cohort once the stable has served it, as the
        // windows' checks compare them; a cohort routed to the canary alone has nothing to be
        // compared with (its own mix of operations makes the app's whole traffic no stand-in).
        let legacy = self.legacy;
        let cohorts = can.cohorts.iter().filter(|(c, _)| !is_overflow(c) && !legacy);
        for (cohort, agg) in cohorts {
            let name = cohort_subject(cohort, None);
            let ranked = self.rank_subject(&name);
            if st.cohorts.get(cohort).is_some_and(|s| s.all.requests > 0) {
                self.stable_cohorts.insert(cohort.to_string());
            }
            if ranked && self.stable_cohorts.contains(&**cohort) {
                let reference = st.cohorts.get(cohort).map_or(empty, |r| &r.all);
                subjects.push((Some(Subject::Cohort(cohort.to_string())), &agg.all, reference));
            }
        }
        let reference = c.latency.as_ref().map(|_| stable.before(at, REFERENCE_S));
        for (subject, can_r, st_r) in subjects {
            let op = subject.as_ref().map(Subject::name);
            let is_cohort = matches!(subject, Some(Subject::Cohort(..)));
            let feature = |name: String| Feature {
                name,
                subject: op.clone(),
            };
            if let Some(e) = &c.error_ratio
                && (op.is_none() || e.per_operation || is_cohort)
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
                && (op.is_none() || l.per_operation || is_cohort)
            {
                let past = match &subject {
                    None => &reference.all,
                    Some(Subject::Operation(op)) => reference.operations.get(op.as_str()).unwrap_or(empty),
                    Some(Subject::Cohort(cohort)) => {
                        reference.cohorts.get(cohort.as_str()).map_or(empty, |r| &r.all)
                    }
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
        let mut by_series: EvidenceBySeries = self
            .by_series
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
            .collect();
        let mixes = std::iter::once((None, &self.mix)).chain(
            self.cohort_mix
                .iter()
                .map(|(c, (_, spread))| (Some(c.as_str()), spread)),
        );
        for (cohort, spread) in mixes.filter(|(_, spread)| !spread.by_subject.is_empty()) {
            let series = mix_series(cohort);
            let evidence = Evidence {
                e_value: spread.e_value(),
                needed: 1.0 / self.alpha(model, &series),
                seconds: spread.seconds(),
                canary_requests: spread.canary_requests(),
            };
            by_series.insert(series, evidence);
        }
        by_series
    }

    /// The most one second may add to `series`' log evidence: half of what it needs to fail.
    fn step_cap(&self, model: &Model, series: &Series) -> f64 {
        (1.0 / self.alpha(model, series)).ln() / 2.0
    }

    /// `series`' share of the model's false-failure budget: split over the groups by weight
    /// (each group at least a sliver). Within the error ratio and latency groups 60% goes to the
    /// app-wide checks, 30% to the operations and 10% to the cohorts (without `per_operation`,
    /// 90% and 10%), the `k`th subject of its kind first seen getting `6 / (pi^2 k^2)` of its
    /// kind's part (so that any number of them stays within it), and evenly over a subject's
    /// quantiles; the operation mix gives 90% to the app's and 10% to the cohorts', by rank;
    /// within the call graph and exceptions the `k`th downstream or type first seen gets
    /// `6 / (pi^2 k^2)` of 90% of its group's share, the `k`th of the cohorts' of 10%; within the
    /// counters, the `k`th series of all of it. Legacy evidence keeps the split before cohorts:
    /// no cohort series, and 40% to the operations (ranked with the cohorts they once shared it
    /// with), else all to the app-wide series.
    pub fn alpha(&self, model: &Model, (group, feature, _): &Series) -> f64 {
        let c = &model.checks;
        let share = |w: f64| w.max(0.0) + 1.0;
        let weights = [
            (Group::Errors, c.error_ratio.as_ref().map(|e| e.weight)),
            (Group::Latency, c.latency.as_ref().map(|l| l.weight)),
            (Group::OperationMix, c.operation_mix.as_ref().map(|m| m.weight)),
            (Group::CallGraph, c.call_graph.as_ref().map(|g| g.weight)),
            (Group::Exceptions, c.exceptions.as_ref().map(|r| r.weight)),
            (Group::ErrorLogs, c.error_logs.as_ref().map(|r| r.weight)),
            (Group::Metrics, c.metrics.as_ref().map(|m| m.weight)),
        ];
        let total: f64 = weights.iter().filter_map(|(_, w)| w.map(share)).sum();
        let Some(weight) = weights.iter().find(|(g, _)| g == group).and_then(|(_, w)| *w) else {
            return 0.0;
        };
        let budget = model.decision.false_failure_rate * share(weight) / total;
        // The split between a group's app-wide series and its subjects never changes during an
        // analysis: a share taken from a series that has already gathered evidence would not
        // lower the chance that it had crossed (Ville's bound holds for the largest share it
        // ever had). Cohorts may first appear at any time, so their share is set aside from the
        // start, used or not; legacy evidence keeps the split it was gathered under, in which
        // cohorts had none.
        let cohorts = if self.legacy { 0.0 } else { COHORTS_SHARE };
        let (per_operation, per_subject) = match group {
            Group::Errors => (c.error_ratio.as_ref().is_some_and(|e| e.per_operation), 1.0),
            Group::Latency => c.latency.as_ref().map_or((false, 1.0), |l| {
                (l.per_operation, l.quantiles.len().max(1) as f64)
            }),
            Group::OperationMix => (false, 1.0),
            Group::CallGraph | Group::Exceptions => {
                // The app's downstreams or types, and the cohorts' (`cohort:beta/payments`),
                // each ranked among its own kind.
                return match &feature.subject {
                    None => budget,
                    // A subject past the cap has no place, and no share: it never fails.
                    Some(subject) => self.keyed.get(&(*group, subject.clone())).map_or(0.0, |k| {
                        let part = if is_cohort(subject) {
                            cohorts
                        } else {
                            1.0 - cohorts
                        };
                        budget * part * by_rank(*k as u64)
                    }),
                };
            }
            _ => {
                return match &feature.subject {
                    None => budget,
                    Some(subject) => self
                        .keyed
                        .get(&(*group, subject.clone()))
                        .map_or(0.0, |k| budget * by_rank(*k as u64)),
                };
            }
        };
        // The app-wide series, the operations (legacy: `OPERATIONS_SHARE` and `COHORTS_SHARE`
        // together, as they were) and the cohorts, each subject by its rank among its kind.
        let operations = match (per_operation, self.legacy) {
            (false, _) => 0.0,
            (true, false) => OPERATIONS_SHARE,
            (true, true) => OPERATIONS_SHARE + COHORTS_SHARE,
        };
        let app_wide = 1.0 - operations - cohorts;
        let (part, rank) = match &feature.subject {
            None => return budget * app_wide / per_subject,
            Some(subject) if *group == Group::OperationMix => (
                cohorts,
                cohort_named(subject)
                    .and_then(|cohort| self.cohort_mix.get(&*cohort))
                    .map(|(k, _)| *k),
            ),
            Some(subject) if is_cohort(subject) => (cohorts, self.subjects.get(subject).copied()),
            Some(op) => (operations, self.subjects.get(op).copied()),
        };
        // A subject past the cap has no place, and no share: it never fails.
        rank.map_or(0.0, |k| budget * part * by_rank(k as u64) / per_subject)
    }
}

/// One process's state, as the store keeps it: starts, each with its index and the log of its
/// wealth under each ratio. This build keeps the whole mixture as one start of index 0 (the
/// wealth that start would need to hold every start's weighted wealth); an earlier build kept the
/// first start and the newest 32 apart, which restoring folds into one. Either build
/// reads the other's state to the same e-value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessState {
    pub two_sided: bool,
    pub starts: Vec<(u64, Vec<f64>)>,
    pub started: u64,
    pub started_weight: f64,
    pub last_start: EventTime,
    pub seconds: u64,
    pub canary_requests: f64,
}

/// An operation mix as the store keeps it: each operation, its rank and its process.
pub type MixState = Vec<(String, usize, ProcessState)>;

/// The whole sequential evidence of one analysis as the store keeps it, so that a restart
/// continues the same tests rather than starting new ones (which would spend the false-failure
/// budget again).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SequentialState {
    pub series: Vec<(Series, ProcessState)>,
    /// The operation mix: each operation, its rank and its process.
    pub mix: MixState,
    /// Each cohort's operation mix: the cohort, its rank, and its mix as `mix` is kept.
    pub cohort_mix: Vec<(String, usize, MixState)>,
    /// The operations' ranks (error ratio and latency).
    pub subjects: Vec<(String, usize)>,
    /// Downstreams', exception types' and counter series' ranks within their groups.
    pub keyed: Vec<(Group, String, usize)>,
    pub through: EventTime,
    pub metrics_through: EventTime,
    /// Gathered under the budget's split before cohorts had shares of their own.
    pub legacy: bool,
}

impl EProcess {
    fn state(&self) -> ProcessState {
        let starts = if self.log_wealth.is_empty() {
            Vec::new()
        } else {
            vec![(0, self.log_wealth.to_vec())]
        };
        ProcessState {
            two_sided: self.sides == Sides::Both,
            starts,
            started: self.starts,
            started_weight: self.started_weight,
            last_start: self.last_start,
            seconds: self.seconds,
            canary_requests: self.canary_requests,
        }
    }

    /// The process a stored state describes, its starts folded into one mixture. The later
    /// starts are taken as the last ones started, as they always are when stored; were they not,
    /// each would be given a later index than its own, and so less weight, which only lowers the
    /// evidence (a stored index is not trusted: a record that repeated index 0 must not weigh
    /// more than the starts it counts). A wealth with fewer ratios than the process has is read
    /// as 1 under the others.
    fn restored(state: &ProcessState) -> EProcess {
        let sides = if state.two_sided {
            Sides::Both
        } else {
            Sides::Greater
        };
        let mut process = EProcess::new(sides);
        let ratios = process.ratios();
        let first = state.starts.iter().find(|(index, _)| *index == 0);
        let later: Vec<_> = state.starts.iter().filter(|(index, _)| *index != 0).collect();
        let newest = state.starts.iter().map(|(index, _)| index + 1).max().unwrap_or(0);
        let held = (later.len() + usize::from(first.is_some())) as u64;
        process.starts = state.started.max(newest).max(held);
        let first_later = process.starts - later.len() as u64;
        let indexed = first.map(|(_, wealth)| (0, wealth)).into_iter().chain(
            later
                .iter()
                .enumerate()
                .map(|(k, (_, wealth))| (first_later + k as u64, wealth)),
        );
        let mut log_wealth = vec![f64::NEG_INFINITY; ratios];
        let mut any = false;
        for (index, wealth) in indexed {
            any = true;
            let relative = log_relative_weight(index);
            let each = wealth.iter().copied().chain(std::iter::repeat(0.0));
            for (sum, l) in log_wealth.iter_mut().zip(each) {
                *sum = log_add(*sum, relative + l);
            }
        }
        if any {
            process.log_wealth = log_wealth.into_boxed_slice();
        }
        process.started_weight = state.started_weight;
        process.last_start = state.last_start;
        process.seconds = state.seconds;
        process.canary_requests = state.canary_requests;
        process
    }
}

impl Sequential {
    /// Its state, for the store.
    pub fn state(&self) -> SequentialState {
        let mut series: Vec<(Series, ProcessState)> = self
            .by_series
            .iter()
            .map(|(series, process)| (series.clone(), process.state()))
            .collect();
        series.sort_by(|a, b| a.0.cmp(&b.0));
        let mix = self.mix.state();
        let mut cohort_mix: Vec<(String, usize, MixState)> = self
            .cohort_mix
            .iter()
            .map(|(cohort, (rank, spread))| (cohort.clone(), *rank, spread.state()))
            .collect();
        cohort_mix.sort_by_key(|(_, rank, _)| *rank);
        let mut subjects: Vec<(String, usize)> = self.subjects.iter().map(|(s, k)| (s.clone(), *k)).collect();
        subjects.sort_by_key(|(_, k)| *k);
        let mut keyed: Vec<(Group, String, usize)> = self
            .keyed
            .iter()
            .map(|((group, subject), k)| (*group, subject.clone(), *k))
            .collect();
        keyed.sort_by_key(|(group, _, k)| (*group, *k));
        SequentialState {
            series,
            mix,
            cohort_mix,
            subjects,
            keyed,
            through: self.through,
            metrics_through: self.metrics_through,
            legacy: self.legacy,
        }
    }

    /// The evidence as the store kept it (the dispersion is measured again at the next look).
    pub fn restored(state: &SequentialState) -> Sequential {
        let mut keyed_counts: HashMap<(Group, bool), usize> = HashMap::new();
        for (group, subject, _) in &state.keyed {
            *keyed_counts.entry((*group, is_cohort(subject))).or_default() += 1;
        }
        Sequential {
            by_series: state
                .series
                .iter()
                .map(|(series, process)| (series.clone(), EProcess::restored(process)))
                .collect(),
            mix: Spread::restored(&state.mix),
            cohort_mix: state
                .cohort_mix
                .iter()
                .map(|(cohort, rank, mix)| (cohort.clone(), (*rank, Spread::restored(mix))))
                .collect(),
            subjects: state.subjects.iter().cloned().collect(),
            keyed: state
                .keyed
                .iter()
                .map(|(group, subject, k)| ((*group, subject.clone()), *k))
                .collect(),
            keyed_counts,
            legacy: state.legacy,
            dispersion: Dispersion::default(),
            stable_cohorts: BTreeSet::new(),
            through: state.through,
            metrics_through: state.metrics_through,
        }
    }
}

/// The share of the `k`th of any number of things (from 1): `6 / (pi^2 k^2)`, which sum to 1.
fn by_rank(k: u64) -> f64 {
    let k = k as f64;
    6.0 / (std::f64::consts::PI * std::f64::consts::PI * k * k)
}

/// Whether a check's subject is a cohort's (`cohort:beta`, `cohort:beta/payments`).
fn is_cohort(subject: &str) -> bool {
    subject.starts_with(COHORT_SUBJECT)
}

/// The operation mix's series: the app's, or one cohort's.
fn mix_series(cohort: Option<&str>) -> Series {
    let subject = cohort.map(|c| cohort_subject(c, None));
    (
        Group::OperationMix,
        feature_of("operation_share", subject.as_deref()),
        Test::ChiSquare,
    )
}

/// A feature as the checks name it.
fn feature_of(name: &str, subject: Option<&str>) -> Feature {
    Feature {
        name: name.to_owned(),
        subject: subject.map(str::to_owned),
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
        for sides in [Sides::Greater, Sides::Both] {
            healthy_runs_rarely_cross(sides);
        }
    }

    fn healthy_runs_rarely_cross(sides: Sides) {
        let alpha = 0.05;
        let runs = 400;
        let mut crossed = 0;
        for seed in 0..runs {
            let mut rng = Rng::new(seed);
            let mut e = EProcess::new(sides);
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
            "{sides:?}: {crossed} of {runs} healthy runs crossed"
        );
    }

    /// A canary that stopped making half its calls is evidence only when both ways count.
    #[test]
    fn a_drop_is_caught_two_sided_and_never_one_sided() {
        let needed: f64 = 1_000.0;
        let mut rng = Rng::new(3);
        let (mut greater, mut both) = (EProcess::new(Sides::Greater), EProcess::new(Sides::Both));
        let mut caught = None;
        for second in 0..600u64 {
            let (n_c, n_s) = (20, 80);
            let x_c = binomial(&mut rng, n_c, 0.25);
            let x_s = binomial(&mut rng, n_s, 0.5);
            for e in [&mut greater, &mut both] {
                e.observe(
                    second * SECOND,
                    (x_c as f64, n_c as f64),
                    (x_s as f64, n_s as f64),
                    needed.ln() / 2.0,
                );
            }
            if caught.is_none() && both.e_value() >= needed {
                caught = Some(second);
            }
        }
        assert!(caught.is_some_and(|s| s < 60), "caught at {caught:?}");
        assert!(greater.e_value() < 1.0, "one-sided: {}", greater.e_value());
    }

    /// The operation mix's evidence, per operation and spread over them, when both versions
    /// serve the same mix (which drifts with the hour, as real mixes do): it reaches `1 / alpha`
    /// in at most about `alpha` of long runs.
    #[test]
    fn the_mix_of_a_healthy_canary_rarely_ever_reaches_the_threshold() {
        let alpha = 0.05;
        let runs = 300;
        let mut crossed = 0;
        for seed in 0..runs {
            let mut rng = Rng::new(10_000 + seed);
            let mut mix = Spread::default();
            let mut ever = false;
            for second in 0..600u64 {
                let drift = ((second as f64) / 120.0).sin();
                let weights = [4.0 + 2.0 * drift, 2.0, 1.0 - 0.5 * drift, 0.5, 0.1, 0.02];
                let total: f64 = weights.iter().sum();
                let mut counts = [[0u64; 6]; 2];
                for _ in 0..(20 + rng.below(20)) {
                    let mut pick = rng.unit() * total;
                    let mut op = 0;
                    while op + 1 < weights.len() && pick >= weights[op] {
                        pick -= weights[op];
                        op += 1;
                    }
                    counts[usize::from(rng.unit() < 0.2)][op] += 1;
                }
                let n = |v: usize| counts[v].iter().sum::<u64>() as f64;
                for (op, (stable, canary)) in counts[0].iter().zip(&counts[1]).enumerate() {
                    if let Some(p) = mix.process(&format!("op{op}"), Sides::Both) {
                        p.observe(
                            second * SECOND,
                            (*canary as f64, n(1)),
                            (*stable as f64, n(0)),
                            f64::INFINITY,
                        );
                    }
                }
                ever |= mix.e_value() >= 1.0 / alpha;
            }
            crossed += u32::from(ever);
        }
        assert!(
            (crossed as f64) / (runs as f64) <= 0.09,
            "{crossed} of {runs} healthy runs crossed"
        );
    }

    /// The mixture as the definition reads it: every start's wealth kept apart, each weighted
    /// by its index, summed at each look.
    struct StartsApart {
        sides: Sides,
        starts: Vec<Vec<f64>>,
        last_start: EventTime,
    }

    impl StartsApart {
        fn observe(&mut self, at: EventTime, canary: (f64, f64), stable: (f64, f64), cap: f64) {
            let ratios = EProcess::new(self.sides).ratios();
            if self.starts.is_empty() || at >= self.last_start + RESTART_S * SECOND {
                self.starts.push(vec![0.0; ratios]);
                self.last_start = at;
            }
            // One process of a single start (no earlier one) gives the second's step.
            let mut step = EProcess::new(self.sides);
            step.observe(at, canary, stable, cap);
            let steps = step.log_wealth.to_vec();
            if steps.is_empty() || step.seconds == 0 {
                return;
            }
            for start in &mut self.starts {
                for (wealth, s) in start.iter_mut().zip(&steps) {
                    *wealth += s;
                }
            }
        }

        fn e_value(&self) -> f64 {
            let ratios = EProcess::new(self.sides).ratios() as f64;
            let mut e = 0.0;
            let mut weight = 0.0;
            for (i, start) in self.starts.iter().enumerate() {
                let w = by_rank(i as u64 + 1);
                weight += w;
                e += start.iter().map(|l| w / ratios * l.exp()).sum::<f64>();
            }
            e + (1.0 - weight).max(0.0)
        }
    }

    /// One number a ratio is the whole mixture: over a long run, through healthy stretches and a
    /// fault that begins late (carried by the starts made after it), the process reads what
    /// keeping every start apart reads, whatever the number of starts.
    #[test]
    fn one_number_a_ratio_holds_every_start() {
        let mut rng = Rng::new(11);
        for sides in [Sides::Greater, Sides::Both] {
            let mut process = EProcess::new(sides);
            let mut apart = StartsApart {
                sides,
                starts: Vec::new(),
                last_start: 0,
            };
            let seconds = 3_000u64;
            for second in 0..seconds {
                // Healthy, then from 2,400 s the canary fails three times as often.
                let p = if second >= 2_400 { 0.06 } else { 0.02 };
                let x_c = binomial(&mut rng, 20, p) as f64;
                let x_s = binomial(&mut rng, 80, 0.02) as f64;
                let at = second * SECOND;
                process.observe(at, (x_c, 20.0), (x_s, 80.0), 4.0);
                apart.observe(at, (x_c, 20.0), (x_s, 80.0), 4.0);
                if second % 97 == 0 || second == seconds - 1 {
                    let (e, expected) = (process.e_value(), apart.e_value());
                    assert!(
                        (e - expected).abs() <= 1e-9 * expected,
                        "{sides:?} at {second} s: {e} against {expected}"
                    );
                }
            }
            assert_eq!(process.starts, seconds / RESTART_S);
            assert_eq!(process.log_wealth.len(), process.ratios());
            assert!(
                process.e_value() > 1e3,
                "the late fault is found: {}",
                process.e_value()
            );
        }
    }

    /// The store sees one start holding the mixture, and reads it back to the same process; the
    /// state an earlier build kept (the first start and the newest ones apart) is folded into the
    /// e-value that build read from it.
    #[test]
    fn stored_starts_fold_into_the_same_evidence() {
        let mut process = EProcess::new(Sides::Both);
        for second in 0..1_000 {
            process.observe(second * SECOND, (1.0, 10.0), (1.0, 90.0), 4.0);
        }
        let state = process.state();
        assert_eq!(state.starts.len(), 1);
        assert_eq!(state.starts[0].0, 0);
        let restored = EProcess::restored(&state);
        assert_eq!(restored.state(), state);
        assert_eq!(restored.e_value(), process.e_value());

        // An earlier build's: start 0, and starts 8 to 40 of 41 (the indices as it stored them).
        let ratios = 2 * RATIOS.len();
        let wealth = |i: u64| {
            (0..ratios)
                .map(|r| (i as f64 - 20.0) / 7.0 + r as f64 * 0.1)
                .collect::<Vec<f64>>()
        };
        let kept: Vec<u64> = std::iter::once(0).chain(8..41).collect();
        let started_weight: f64 = (1..=41).map(by_rank).sum();
        let earlier = ProcessState {
            two_sided: true,
            starts: kept.iter().map(|&i| (i, wealth(i))).collect(),
            started: 41,
            started_weight,
            last_start: 1_200 * SECOND,
            seconds: 900,
            canary_requests: 9_000.0,
        };
        let read: f64 = kept
            .iter()
            .map(|&i| {
                let w = by_rank(i + 1) / ratios as f64;
                wealth(i).iter().map(|l| w * l.exp()).sum::<f64>()
            })
            .sum::<f64>()
            + (1.0 - started_weight).max(0.0);
        let restored = EProcess::restored(&earlier);
        assert!(
            (restored.e_value() - read).abs() <= 1e-12 * read,
            "{} against {read}",
            restored.e_value()
        );
        assert_eq!(restored.starts, 41);
        // A record that claims index 0 for every start has the first read as the first start
        // and the others not at all: it weighs no more than one start.
        let mut repeated = earlier.clone();
        for (index, _) in &mut repeated.starts {
            *index = 0;
        }
        let claimed = EProcess::restored(&repeated).e_value();
        let w = by_rank(1) / ratios as f64;
        let honest = wealth(0).iter().map(|l| w * l.exp()).sum::<f64>() + (1.0 - started_weight).max(0.0);
        assert!(
            (claimed - honest).abs() <= 1e-12 * honest,
            "{claimed} against {honest}"
        );
    }

    /// A restart continues the same tests: the evidence as the store keeps it, restored, reads
    /// the same and grows the same from the next second on.
    #[test]
    fn restored_evidence_goes_on_as_if_nothing_had_stopped() {
        let mut rng = Rng::new(5);
        let mut sequential = Sequential::default();
        let errors = (Group::Errors, feature_of("error_ratio", None), Test::FisherExact);
        let calls = (
            Group::CallGraph,
            feature_of("calls_per_request", Some("db")),
            Test::PoissonRate,
        );
        sequential.rank(&calls);
        sequential.subjects.insert("GET /".into(), 1);
        let step = |sequential: &mut Sequential, second: u64, rng: &mut Rng| {
            let x_c = binomial(rng, 10, 0.05) as f64;
            let x_s = binomial(rng, 90, 0.02) as f64;
            let at = second * SECOND;
            for (series, sides) in [(&errors, Sides::Greater), (&calls, Sides::Both)] {
                sequential
                    .by_series
                    .entry(series.clone())
                    .or_insert_with(|| EProcess::new(sides))
                    .observe(at, (x_c, 10.0), (x_s, 90.0), 4.0);
            }
            if let Some(p) = sequential.mix.process("GET /", Sides::Both) {
                p.observe(at, (x_c, 10.0), (x_s, 90.0), 4.0);
            }
            let (_, beta) = sequential
                .cohort_mix
                .entry("beta".into())
                .or_insert_with(|| (1, Spread::default()));
            if let Some(p) = beta.process("GET /", Sides::Both) {
                p.observe(at, (x_c, 10.0), (x_s, 90.0), 4.0);
            }
        };
        // Well past the first quarter hour (where an earlier build began to drop starts).
        for second in 0..1_200 {
            step(&mut sequential, second, &mut rng);
        }
        let state = sequential.state();
        let mut restored = Sequential::restored(&state);
        assert_eq!(restored.state(), state);
        let model = every_check();
        let e = |s: &Sequential| {
            let mut by: Vec<(Series, f64)> = s
                .evidence(&model)
                .into_iter()
                .map(|(k, v)| (k, v.e_value))
                .collect();
            by.sort_by(|a, b| a.0.cmp(&b.0));
            by
        };
        assert_eq!(e(&restored), e(&sequential));
        let mut twin = rng.clone();
        for second in 1_200..1_500 {
            step(&mut sequential, second, &mut rng);
            step(&mut restored, second, &mut twin);
        }
        assert_eq!(restored.state(), sequential.state());
        assert_eq!(e(&restored), e(&sequential));
        assert!(e(&restored).iter().any(|(s, _)| *s == mix_series(Some("beta"))));
        assert!(
            e(&sequential).iter().any(|(_, v)| *v > 1.0),
            "{:?}",
            e(&sequential)
        );
    }

    /// Every check kind on, with the defaults.
    fn every_check() -> Model {
        crate::judge::checks::tests::decision::model()
    }

    /// However many operations, downstreams, exception types and counter series an analysis
    /// meets, the shares of every series it can fail on add up to no more than the model's one
    /// `false_failure_rate`: the chance that a healthy canary is failed on anything.
    #[test]
    fn every_series_together_spends_at_most_the_false_failure_rate() {
        for (per_operation, legacy) in [(true, false), (false, false), (true, true), (false, true)] {
            let mut model = every_check();
            if let Some(e) = &mut model.checks.error_ratio {
                e.per_operation = per_operation;
            }
            if let Some(l) = &mut model.checks.latency {
                l.per_operation = per_operation;
            }
            let sequential = Sequential {
                legacy,
                ..Sequential::default()
            };
            let (mut sequential, series) = with_every_series(sequential, &model, 300);
            let spent: f64 = series.iter().map(|s| sequential.alpha(&model, s)).sum();
            let budget = model.decision.false_failure_rate;
            let case = format!("per_operation {per_operation}, legacy {legacy}");
            assert!(spent <= budget, "{case}: {spent} of {budget}");
            assert!(
                spent > 0.9 * budget,
                "{case}: most of it is spent: {spent} of {budget}"
            );
            // A subject past the cap has no place and no share.
            let past = (
                Group::CallGraph,
                feature_of("rate", Some("unranked")),
                Test::PoissonRate,
            );
            assert_eq!(sequential.alpha(&model, &past), 0.0);
            // Legacy evidence gives cohorts nothing, and ranks both kinds together.
            let cohort = (
                Group::Errors,
                feature_of("error_ratio", Some("cohort:c-1")),
                Test::FisherExact,
            );
            assert_eq!(sequential.alpha(&model, &cohort) == 0.0, legacy, "{case}");
            assert!(sequential.rank_subject("new-op"));
            let ranks: BTreeSet<usize> = sequential.subjects.values().copied().collect();
            if legacy {
                assert_eq!(ranks.len(), sequential.subjects.len(), "{case}: a rank repeated");
            }
        }
    }

    /// Every kind of series, `n` of each keyed kind: app-wide, operations (with
    /// `per_operation`), cohorts, their downstreams, exception types and mixes, and counters.
    fn with_every_series(mut sequential: Sequential, model: &Model, n: usize) -> (Sequential, Vec<Series>) {
        let quantiles = model.checks.latency.as_ref().map_or(0, |l| l.quantiles.len());
        let per_operation = model.checks.error_ratio.as_ref().is_some_and(|e| e.per_operation);
        let mut series: Vec<Series> = Vec::new();
        let mut subjects: Vec<Option<String>> = vec![None];
        for k in 1..=n {
            if per_operation {
                subjects.push(Some(format!("op-{k}")));
            }
            subjects.push(Some(cohort_subject(&format!("c-{k}"), None)));
        }
        for subject in &subjects {
            if let Some(s) = subject {
                assert!(sequential.rank_subject(s));
            }
            series.push((
                Group::Errors,
                feature_of("error_ratio", subject.as_deref()),
                Test::FisherExact,
            ));
            for q in 0..quantiles {
                series.push((
                    Group::Latency,
                    feature_of(&format!("latency_q{q}"), subject.as_deref()),
                    Test::Exceedance,
                ));
            }
        }
        for k in 1..=n {
            let app = format!("ds-{k}");
            let cohort = cohort_subject("c-1", Some(&app));
            for group in [Group::CallGraph, Group::Exceptions] {
                for s in [&app, &cohort] {
                    let keyed = (group, feature_of("rate", Some(s)), Test::PoissonRate);
                    assert!(sequential.rank(&keyed));
                    series.push(keyed);
                }
            }
            let counter = (Group::Metrics, feature_of("rate", Some(&app)), Test::PoissonRate);
            assert!(sequential.rank(&counter));
            series.push(counter);
            let cohort = format!("c-{k}");
            sequential
                .cohort_mix
                .insert(cohort.clone(), (k, Spread::default()));
            series.push(mix_series(Some(&cohort)));
        }
        series.push((
            Group::ErrorLogs,
            feature_of("error_log_rate", None),
            Test::PoissonRate,
        ));
        series.push(mix_series(None));
        (sequential, series)
    }

    /// No series' share changes when cohorts appear mid-analysis (a share lowered after evidence
    /// has gathered would not lower the chance it had crossed), nor do the app's downstreams
    /// and types lose rank to cohorts'.
    #[test]
    fn a_cohort_appearing_changes_no_other_series_share() {
        for per_operation in [true, false] {
            let mut model = every_check();
            if let Some(e) = &mut model.checks.error_ratio {
                e.per_operation = per_operation;
            }
            let app_series = [
                (Group::Errors, feature_of("error_ratio", None), Test::FisherExact),
                (
                    Group::Errors,
                    feature_of("error_ratio", Some("GET /")),
                    Test::FisherExact,
                ),
                mix_series(None),
                (
                    Group::CallGraph,
                    feature_of("calls_per_request", Some("db")),
                    Test::PoissonRate,
                ),
                (
                    Group::CallGraph,
                    feature_of("calls_per_request", Some("cache")),
                    Test::PoissonRate,
                ),
            ];
            let mut before = Sequential::default();
            before.rank_subject("GET /");
            before.rank(&app_series[3]);
            let mut after = before.clone();
            // Cohorts come, with their own downstreams, and then the app's second downstream.
            after.rank_subject(&cohort_subject("beta", None));
            after.cohort_mix.insert("beta".into(), (1, Spread::default()));
            for ds in ["db", "search", "queue"] {
                let cohort = cohort_subject("beta", Some(ds));
                after.rank(&(
                    Group::CallGraph,
                    feature_of("calls_per_request", Some(&cohort)),
                    Test::PoissonRate,
                ));
            }
            before.rank(&app_series[4]);
            after.rank(&app_series[4]);
            for series in &app_series {
                assert_eq!(
                    before.alpha(&model, series),
                    after.alpha(&model, series),
                    "per_operation {per_operation}: {series:?}"
                );
            }
        }
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
