//! Canary analysis: a new version judged against the stable one and the learned baseline, walked
//! through its model's rollout stages.
//!
//! An `Analysis` starts when a canary appears (inferred: a version other than the stable one gets
//! traffic; or declared through the rollout API). From then on the engine hands it both versions'
//! closed 1-second buckets, and after every closed second it takes a look: each check of the model
//! on each trailing window (`checks`), combined with hysteresis (a check fails only after
//! `confirm_looks` failing looks in a row, unless the evidence is gross), weighed into a 0-100 score
//! and a state, and the current stage's gates. Changes that matter come out as `CanaryChange`s:
//! started, stage passed, failed, promoted.
//!
//! - `model`: the analysis models and their validation.
//! - `stats`: exact tests for counts and proportions, chi-square, Clopper-Pearson bounds.
//! - `checks`: the per-signal checks of one look, and the one rule that decides each.
//! - `history`: each analysed version's recent buckets, for trailing windows.
//! - `sequential`: the anytime-valid evidence, second by second, that every comparison with the
//!   stable fails on.

pub mod checks;
pub mod history;
pub mod model;
pub mod sequential;
pub mod snapshot;
pub mod stats;
pub mod traffic;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use crate::baseline::{Baseline, BaselineConfig};
use crate::features::FeatureKey;
use crate::observation::EventTime;
use crate::window::{Aggregate, RequestAggregate};
pub use checks::{Check, CheckId, Group, Outcome, Test};
use history::History;
pub use model::{Gate, GateMetric, Mode, Model, ModelError, Stage};
pub use snapshot::{AnalysisSnapshot, JudgeChanges};
pub use traffic::{HeaderMatch, Sticky, Traffic, TrafficRequest};

const SECOND: EventTime = 1_000_000_000;
/// Level a failure must keep without the one second (or block) that helps it most.
const ROBUST_ALPHA: f64 = 0.01;

/// Where an analysis stands (the contract's six states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    InsufficientData,
    Healthy,
    Marginal,
    Failing,
    Promoted,
    RolledBack,
}

impl State {
    pub const ALL: [State; 6] = [
        State::InsufficientData,
        State::Healthy,
        State::Marginal,
        State::Failing,
        State::Promoted,
        State::RolledBack,
    ];

    /// The state `name` names.
    pub fn named(name: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            State::InsufficientData => "insufficient_data",
            State::Healthy => "healthy",
            State::Marginal => "marginal",
            State::Failing => "failing",
            State::Promoted => "promoted",
            State::RolledBack => "rolled_back",
        }
    }

    fn is_final(self) -> bool {
        matches!(self, State::Promoted | State::RolledBack)
    }
}

/// What a stage gate concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GateOutcome {
    Pass,
    Pending,
    Fail,
    /// The canary breaks the gate, and the stable breaks it too over the same span: a fault both
    /// share (a dependency's outage, a bad load balancer). Not the canary's doing, so it is not
    /// rolled back for it; but no stage passes on a broken gate, so the rollout holds.
    Shared,
}

impl GateOutcome {
    pub const ALL: [GateOutcome; 4] = [
        GateOutcome::Pass,
        GateOutcome::Pending,
        GateOutcome::Fail,
        GateOutcome::Shared,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GateOutcome::Pass => "pass",
            GateOutcome::Pending => "pending",
            GateOutcome::Fail => "fail",
            GateOutcome::Shared => "shared",
        }
    }

    /// The outcome `name` names.
    pub fn named(name: &str) -> Option<GateOutcome> {
        GateOutcome::ALL.into_iter().find(|o| o.name() == name)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GateResult {
    pub metric: GateMetric,
    pub max: Option<f64>,
    pub min: Option<f64>,
    pub value: Option<f64>,
    /// Confidence bounds on the measured value.
    pub lower: Option<f64>,
    pub upper: Option<f64>,
    pub samples: u64,
    pub window_s: u64,
    pub outcome: GateOutcome,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageView {
    pub index: usize,
    pub name: String,
    pub weight: f64,
}

/// A snapshot of one analysis, as the API, events and `/metrics` show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AnalysisView {
    pub env: String,
    pub app: String,
    pub stable_version: String,
    pub canary_version: String,
    pub model: String,
    pub mode: Mode,
    pub declared: bool,
    /// Paused by an operator: judged, but passing no stage and failing nothing.
    pub paused: bool,
    /// Since when it has waited for a person to approve its next stage.
    pub awaiting_approval: Option<EventTime>,
    /// The environment of the promotion chain it waits on: not promoted until the canary is
    /// promoted there.
    pub blocked_by: Option<String>,
    /// The earlier environment of the chain it failed in, and that verdict's event id, when this
    /// failed it on sight.
    pub failed_in: Option<(String, String)>,
    /// The chain's next environment after this one.
    pub next_env: Option<String>,
    pub state: State,
    pub score: Option<f64>,
    pub stage: Option<StageView>,
    pub stages: usize,
    pub started_at: EventTime,
    pub stage_started_at: EventTime,
    /// When the state last changed.
    pub since: EventTime,
    /// End of the last second looked at.
    pub evaluated_at: EventTime,
    /// When the canary was found failing, if it was.
    pub failed_at: Option<EventTime>,
    pub canary_requests: u64,
    pub stable_requests: u64,
    pub checks: Vec<Check>,
    pub gates: Vec<GateResult>,
    /// The rollout's traffic plan: its stages' percentages and the model's (or declaration's)
    /// sticky key, header rules and allow-list.
    pub traffic: TrafficView,
}

/// A rollout's traffic plan as the API and the events show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrafficView {
    /// The canary's percentage in each stage, in order.
    pub percentages: Vec<f64>,
    #[serde(flatten)]
    pub plan: Traffic,
}

/// What one version did in one 10-second block, for charts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SeriesPoint {
    pub start: EventTime,
    pub requests: u64,
    pub errors: u64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

impl SeriesPoint {
    fn of(start: EventTime, agg: &Aggregate) -> Self {
        SeriesPoint {
            start,
            requests: agg.all.requests,
            errors: agg.all.errors,
            latency_p50_ms: agg.all.latency_ms.quantile(0.5),
            latency_p99_ms: agg.all.latency_ms.quantile(0.99),
        }
    }
}

/// The recent behaviour of both versions of an analysis: 10-second series, and the operation mix
/// and call graph over the stable's reference window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Timeline {
    pub block_s: u64,
    pub canary: Vec<SeriesPoint>,
    pub stable: Vec<SeriesPoint>,
    /// Requests per operation.
    pub canary_operations: BTreeMap<String, u64>,
    pub stable_operations: BTreeMap<String, u64>,
    /// Calls per request to each downstream.
    pub canary_calls: BTreeMap<String, f64>,
    pub stable_calls: BTreeMap<String, f64>,
    pub window_s: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Started,
    StagePassed,
    Failed,
    Promoted,
    /// A failed canary stopped getting traffic: it was taken out.
    RolledBack,
    /// The rollout API ended the analysis (`reason` of the event: ended), or a declaration
    /// replaced it (replaced).
    Ended,
    Replaced,
    /// A gate broke for both versions alike: the rollout holds (no stage passes) and is not
    /// rolled back.
    Held,
    /// An operator's action (`Operation`): promoted or aborted by hand, paused or resumed.
    OperatorPromoted,
    OperatorAborted,
    Paused,
    Resumed,
    /// Its stage passed and the next one asks for a person's approval: it waits.
    AwaitingApproval,
    /// A person approved the next stage: the canary moves on to its weight.
    Approved,
}

/// What an operator can do to an analysis under way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Promote the canary now, whatever its stage (`canary.promoted`, weight 100).
    Promote,
    /// Stop the analysis from acting: it goes on judging and showing its state, but passes no
    /// stage and fails nothing until resumed.
    Pause,
    Resume,
    /// Fail the canary now (`canary.failed`, weight 0).
    Abort,
    /// Let an analysis waiting for approval enter its next stage (`canary.stage_passed`).
    Approve,
}

impl Operation {
    pub const ALL: [Operation; 5] = [
        Operation::Promote,
        Operation::Pause,
        Operation::Resume,
        Operation::Abort,
        Operation::Approve,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operation::Promote => "promote",
            Operation::Pause => "pause",
            Operation::Resume => "resume",
            Operation::Abort => "abort",
            Operation::Approve => "approve",
        }
    }

    pub fn named(name: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|o| o.name() == name)
    }
}

/// About the memory a hash map's table holds (a control byte an entry besides the entry), not
/// counting what its entries point to.
fn table_bytes<K, V>(map: &HashMap<K, V>) -> usize {
    map.capacity() * (std::mem::size_of::<(K, V)>() + 1)
}

/// A decision worth an event.
#[derive(Clone, Debug, PartialEq)]
pub struct CanaryChange {
    pub kind: ChangeKind,
    /// Event time of the evidence that decided it.
    pub time: EventTime,
    /// The canary's new traffic weight (percent), for failed (0), stage passed and promoted.
    pub weight: Option<f64>,
    pub view: AnalysisView,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JudgeError {
    #[error("unknown model {0:?}")]
    UnknownModel(String),
    #[error("unknown app {app:?} in env {env:?}")]
    UnknownApp { env: String, app: String },
    #[error("stable_version and canary_version are both {0:?}")]
    SameVersion(String),
    #[error("no rollout is declared or analysed for this app")]
    NoRollout,
    #[error(
        "an analysis of {canary} against {stable} is under way; declare with replace: true to replace it"
    )]
    LiveAnalysis { stable: String, canary: String },
    #[error("cannot {operation} the analysis of {canary}: it is {state}")]
    NotNow {
        operation: &'static str,
        canary: String,
        state: String,
    },
    /// The declaration's traffic plan cannot work with its model; names the field.
    #[error("{0}")]
    Traffic(ModelError),
}

/// The stable's dispersion as an analysis last made it from completed blocks alone.
#[derive(Debug)]
struct KeptDispersion {
    /// The stable history's `changes` then, and the starts of the blocks it was made from.
    made_from: (u64, Vec<EventTime>),
    dispersion: checks::Dispersion,
}

/// One canary under analysis.
#[derive(Debug)]
pub struct Analysis {
    env: Arc<str>,
    app: Arc<str>,
    stable: Arc<str>,
    canary: Arc<str>,
    model: Arc<Model>,
    declared: bool,
    /// An operator paused it: it judges, but neither passes stages nor fails.
    paused: bool,
    /// Since when it has waited for a person to approve the next stage (its stage passed, the
    /// next one asks for approval): judged, and failed if it fails, but no further.
    awaiting_approval: Option<EventTime>,
    /// The environment before this one in the model's promotion chain, while the canary has not
    /// been promoted there: it is not promoted here until it is (refreshed by the judge before
    /// each look, from what it was told of verdicts).
    blocked_by: Option<String>,
    /// The earlier environment it failed in, and the id of the event that said so, when that
    /// failed it here on sight.
    failed_in: Option<(String, String)>,
    started_at: EventTime,
    state: State,
    since: EventTime,
    stage: usize,
    stage_started_at: EventTime,
    /// The canary's requests since its stage started, for whole-stage gates.
    stage_requests: RequestAggregate,
    failed_at: Option<EventTime>,
    last_canary_traffic: EventTime,
    evaluated_at: EventTime,
    /// Failing looks in a row, per check.
    streaks: HashMap<checks::Series, u32>,
    checks: Vec<Check>,
    gates: Vec<GateResult>,
    score: Option<f64>,
    canary_history: History,
    stable_history: History,
    /// The error ratio and latency comparisons' evidence since the analysis began.
    sequential: sequential::Sequential,
    canary_requests: u64,
    stable_requests: u64,
    /// Where each undecided check's search for the requests it needs ended (speed only).
    power_hints: checks::PowerHints,
    /// The stable's dispersion over the reference window's completed blocks, and what it was
    /// made from: the stable history's changes and the blocks' starts. Asked at every look,
    /// it changes only when a block does, every ten (speed only).
    stable_dispersion: std::cell::RefCell<Option<KeptDispersion>>,
}

impl Analysis {
    /// About the memory its canary's and stable's histories hold: their seconds and blocks, and
    /// their long windows' merges.
    pub fn memory_bytes(&self) -> (usize, usize) {
        let (canary, canary_merges) = self.canary_history.memory_bytes();
        let (stable, stable_merges) = self.stable_history.memory_bytes();
        (canary + stable, canary_merges + stable_merges)
    }

    /// About the memory its judging holds besides the histories: the sequential evidence, the
    /// last look's checks and the failing streaks.
    pub fn evidence_bytes(&self) -> usize {
        let checks = self.checks.capacity() * std::mem::size_of::<Check>()
            + self
                .checks
                .iter()
                .map(|c| {
                    c.id.feature.heap_bytes()
                        + c.feature.capacity()
                        + c.operation.as_ref().map_or(0, String::capacity)
                        + c.message.capacity()
                })
                .sum::<usize>();
        let streaks = table_bytes(&self.streaks)
            + self
                .streaks
                .keys()
                .map(|(_, feature, _)| feature.heap_bytes())
                .sum::<usize>();
        self.sequential.memory_bytes() + checks + streaks
    }

    fn new(
        (env, app): (Arc<str>, Arc<str>),
        stable: Arc<str>,
        canary: Arc<str>,
        model: Arc<Model>,
        declared: bool,
        at: EventTime,
        keep_s: u64,
    ) -> Self {
        Analysis {
            env,
            app,
            stable,
            canary,
            model,
            declared,
            paused: false,
            awaiting_approval: None,
            blocked_by: None,
            failed_in: None,
            started_at: at,
            state: State::InsufficientData,
            since: at,
            stage: 0,
            stage_started_at: at,
            stage_requests: RequestAggregate::default(),
            failed_at: None,
            last_canary_traffic: at,
            evaluated_at: at,
            streaks: HashMap::new(),
            checks: Vec::new(),
            gates: Vec::new(),
            score: None,
            canary_history: History::new(keep_s),
            stable_history: History::new(keep_s),
            sequential: sequential::Sequential::default(),
            canary_requests: 0,
            stable_requests: 0,
            power_hints: checks::PowerHints::default(),
            stable_dispersion: Default::default(),
        }
    }

    pub fn stable(&self) -> &Arc<str> {
        &self.stable
    }

    pub fn canary(&self) -> &Arc<str> {
        &self.canary
    }

    /// The model it runs under (as it was when it started).
    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn is_final(&self) -> bool {
        self.state.is_final()
    }

    pub fn view(&self) -> AnalysisView {
        AnalysisView {
            env: self.env.to_string(),
            app: self.app.to_string(),
            stable_version: self.stable.to_string(),
            canary_version: self.canary.to_string(),
            model: self.model.name.clone(),
            mode: self.model.mode,
            declared: self.declared,
            paused: self.paused,
            awaiting_approval: self.awaiting_approval,
            blocked_by: self.blocked_by.clone(),
            failed_in: self.failed_in.clone(),
            next_env: self.next_env().map(str::to_owned),
            state: self.state,
            score: self.score,
            stage: self.model.stages.get(self.stage).map(|s| StageView {
                index: self.stage,
                name: s.name.clone(),
                weight: s.weight,
            }),
            stages: self.model.stages.len(),
            started_at: self.started_at,
            stage_started_at: self.stage_started_at,
            since: self.since,
            evaluated_at: self.evaluated_at,
            failed_at: self.failed_at,
            canary_requests: self.canary_requests,
            stable_requests: self.stable_requests,
            checks: self.checks.clone(),
            gates: self.gates.clone(),
            traffic: TrafficView {
                percentages: self.model.stages.iter().map(|s| s.weight).collect(),
                plan: self.model.traffic.clone(),
            },
        }
    }

    /// Both versions' recent series, mix and call graph.
    pub fn timeline(&self) -> Timeline {
        let window_s = self.model.decision.reference_s;
        let now = self.evaluated_at;
        let canary = self.canary_history.trailing(now, &[window_s]).remove(0);
        let stable = self.stable_history.trailing(now, &[window_s]).remove(0);
        let operations = |a: &Aggregate| -> BTreeMap<String, u64> {
            a.operations
                .iter()
                .map(|(op, o)| (op.to_string(), o.requests))
                .collect()
        };
        let calls = |a: &Aggregate| -> BTreeMap<String, f64> {
            let n = a.all.requests.max(1) as f64;
            a.calls
                .iter()
                .map(|(d, (c, _))| (d.to_string(), *c as f64 / n))
                .collect()
        };
        Timeline {
            block_s: 10,
            canary: self
                .canary_history
                .blocks()
                .map(|(t, a)| SeriesPoint::of(t, &a))
                .collect(),
            stable: self
                .stable_history
                .blocks()
                .map(|(t, a)| SeriesPoint::of(t, &a))
                .collect(),
            canary_operations: operations(&canary),
            stable_operations: operations(&stable),
            canary_calls: calls(&canary),
            stable_calls: calls(&stable),
            window_s,
        }
    }

    /// Takes a closed bucket of either version.
    pub fn push(&mut self, version: &str, start: EventTime, bucket: &Aggregate) {
        if self.state.is_final() || start < self.started_at {
            return;
        }
        if version == &*self.canary {
            self.canary_history.push(start, bucket);
            self.stage_requests.merge(&bucket.all);
            self.canary_requests += bucket.all.requests;
            if bucket.all.requests > 0 {
                self.last_canary_traffic = start.saturating_add(SECOND);
            }
        } else if version == &*self.stable {
            self.stable_history.push(start, bucket);
            self.stable_requests += bucket.all.requests;
        }
    }

    /// One look at everything up to `now` (the end of the last closed second): the trailing
    /// windows, every check on each of them, one result per check, the noise guard, hysteresis,
    /// the stage's gates, the score and state, and the stage's progress.
    pub fn look(
        &mut self,
        now: EventTime,
        baselines: &crate::vec_map::VecMap<FeatureKey, Baseline>,
        baseline_config: &BaselineConfig,
        baseline_window_s: u64,
        changes: &mut Vec<CanaryChange>,
    ) {
        if self.state.is_final() || now <= self.evaluated_at && !self.checks.is_empty() {
            return;
        }
        self.evaluated_at = now;
        let model = self.model.clone();
        self.sequential
            .update(&model, &self.canary_history, &self.stable_history, now);
        let trailing = self.collect_windows(&model, now, baseline_window_s);
        self.sequential.set_dispersion(trailing.dispersion.clone());
        let (per_horizon, thresholds) = evaluate_horizons(&model, &trailing, &self.power_hints);
        let mut combined = combine_horizons(per_horizon);
        let mut baseline_checks = Vec::new();
        checks::baseline_checks(
            &model,
            trailing.baseline_canary(),
            trailing.baseline_stable(),
            baseline_window_s,
            baselines,
            baseline_config,
            &mut baseline_checks,
        );
        combined.extend(baseline_checks.into_iter().map(|c| (c.id.series(), c)));
        // Once the canary has failed, there is nothing left to guard.
        if self.failed_at.is_none() {
            self.guard_against_one_part(&model, &trailing, now, &mut combined);
        }
        let checks = self.confirm(combined, &thresholds, &model.decision);
        let gates = self.judge_gates(&model, &trailing, now);
        let held = |gates: &[GateResult]| gates.iter().any(|g| g.outcome == GateOutcome::Shared);
        let newly_held = held(&gates) && !held(&self.gates) && self.failed_at.is_none();
        let mut score = score(&checks);
        let state = self.decide_state(&model, &checks, &gates, score, now);
        // The score agrees with the state: a canary failed by a critical check or a gate scores
        // 0 (as Kayenta's critical metrics do), and a held rollout no more than the marginal line.
        if matches!(state, State::Failing | State::RolledBack) {
            if score.is_none_or(|s| s >= model.decision.fail_score) {
                score = Some(0.0);
            }
        } else if held(&gates) {
            score = score.map(|s| s.min(model.decision.marginal_score));
        }
        self.checks = checks;
        self.gates = gates;
        self.score = score;
        self.advance(&model, state, now, changes);
        if newly_held && !self.state.is_final() && self.failed_at.is_none() {
            changes.push(CanaryChange {
                kind: ChangeKind::Held,
                time: now,
                weight: None,
                view: self.view(),
            });
        }
    }

    /// The trailing windows of a look: each horizon on both versions (the same span of event
    /// time), and the windows of the baseline check and of the stage's gates.
    fn collect_windows(&self, model: &Model, now: EventTime, baseline_window_s: u64) -> Trailing {
        let d = &model.decision;
        let horizons = d.horizons_s.clone();
        let gate_windows: Vec<u64> = model
            .stages
            .get(self.stage)
            .into_iter()
            .flat_map(|s| &s.gates)
            .map(|g| g.window_s)
            .collect();
        let mut canary_h: Vec<u64> = horizons.clone();
        canary_h.push(baseline_window_s);
        canary_h.extend(gate_windows.iter().filter(|w| **w > 0));
        let mut stable_h: Vec<u64> = horizons.clone();
        stable_h.push(baseline_window_s);
        // The stable over each gate's span, to tell a shared fault from the canary's: a
        // whole-stage gate's is the stage so far (as far as the stable's recent history goes).
        let stage_s = now.saturating_sub(self.stage_started_at) / SECOND;
        stable_h.extend(
            gate_windows
                .iter()
                .map(|w| if *w > 0 { *w } else { stage_s.max(1) }),
        );
        // Only whole parts: one the analysis began inside of, or one still filling, would pair a
        // counter's whole increment with part of its requests.
        let part_ns = if d.reference_s <= 10 { SECOND } else { 10 * SECOND };
        let is_whole = |start: EventTime| start >= self.started_at && start.saturating_add(part_ns) <= now;
        let starts: Vec<(EventTime, bool)> = self
            .stable_history
            .part_starts(now, d.reference_s)
            .into_iter()
            .filter(|(start, _)| is_whole(*start))
            .collect();
        // Made from completed blocks alone, it holds until one of them changes or the window
        // moves past one.
        let key = starts.iter().all(|(_, completed)| *completed).then(|| {
            let starts = starts.iter().map(|(start, _)| *start).collect();
            (self.stable_history.changes(), starts)
        });
        let kept = self
            .stable_dispersion
            .borrow()
            .as_ref()
            .and_then(|kept| (key.as_ref() == Some(&kept.made_from)).then(|| kept.dispersion.clone()));
        let made = || {
            let parts = self.stable_history.parts_counts(now, d.reference_s);
            let whole: Vec<(EventTime, &Aggregate)> = parts
                .iter()
                .filter(|(start, _)| is_whole(*start))
                .map(|(start, part)| (*start, &**part))
                .collect();
            checks::Dispersion::of(&whole)
        };
        // Every test build checks that what is kept is what would be made.
        debug_assert!(
            kept.as_ref()
                .is_none_or(|kept| format!("{kept:?}") == format!("{:?}", made())),
            "a kept dispersion differs from the one its blocks make"
        );
        let dispersion = kept.unwrap_or_else(|| {
            let dispersion = made();
            *self.stable_dispersion.borrow_mut() = key.map(|made_from| KeptDispersion {
                made_from,
                dispersion: dispersion.clone(),
            });
            dispersion
        });
        Trailing {
            canary: self.canary_history.trailing(now, &canary_h),
            stable: self.stable_history.trailing(now, &stable_h),
            dispersion,
            sequential: self.sequential.evidence(model),
            seen_s: now.saturating_sub(self.started_at) / SECOND,
            horizons,
        }
    }

    /// A failure must not rest on a single second (or 10-second block): without the part of its
    /// window that helps it most, it must still be significant at `ROBUST_ALPHA`. A burst in one
    /// second, a single slow batch, or one unlucky look never fails a canary on its own; such a
    /// check is marginal instead.
    fn guard_against_one_part(
        &self,
        model: &Model,
        trailing: &Trailing,
        now: EventTime,
        combined: &mut BTreeMap<checks::Series, Check>,
    ) {
        for check in combined.values_mut() {
            // The sequential checks' evidence already stands without its best second.
            if check.outcome != Outcome::Fail || sequential::Sequential::covers(check.group) {
                continue;
            }
            if let Some(part) = self.rests_on_one_part(model, check, now, &trailing.dispersion) {
                check.outcome = Outcome::Marginal;
                check.message = format!(
                    "{} (but without its {} s starting at {} it is not significant: waiting for more)",
                    check.message,
                    if check.window_s <= 10 { 1 } else { 10 },
                    part / SECOND
                );
            }
        }
    }

    /// Hysteresis: a failing look counts once enough of them come in a row, or at once when the
    /// evidence is gross; until then the check is marginal.
    fn confirm(
        &mut self,
        combined: BTreeMap<checks::Series, Check>,
        thresholds: &checks::Thresholds,
        d: &model::Decision,
    ) -> Vec<Check> {
        let mut checks: Vec<Check> = Vec::with_capacity(combined.len());
        for (series, mut check) in combined {
            if check.outcome == Outcome::Fail {
                let streak = self.streaks.entry(series).or_default();
                *streak += 1;
                let gross = thresholds.of(&check) / d.gross_factor;
                let is_gross = check.p_value.is_some_and(|p| p < gross);
                if *streak < d.confirm_looks && !is_gross {
                    check.outcome = Outcome::Marginal;
                    check.message = format!(
                        "{} (failing look {} of {} needed)",
                        check.message, streak, d.confirm_looks
                    );
                }
            } else {
                self.streaks.remove(&series);
            }
            checks.push(check);
        }
        let present: HashSet<checks::Series> = checks.iter().map(|c| c.id.series()).collect();
        self.streaks.retain(|k, _| present.contains(k));
        checks
    }

    /// The gates of the current stage, each on its trailing window or on the whole stage so far.
    fn judge_gates(&self, model: &Model, trailing: &Trailing, now: EventTime) -> Vec<GateResult> {
        let Some(stage) = model.stages.get(self.stage) else {
            return Vec::new();
        };
        let mut windows = trailing.gate_windows();
        let mut stable_windows = trailing.stable_gate_windows();
        let confidence = model.decision.gate_confidence;
        stage
            .gates
            .iter()
            .map(|gate| {
                let window = if gate.window_s > 0 { windows.next() } else { None };
                let stable = stable_windows.next();
                let (requests, window_s) = match window {
                    Some(w) => (&w.all, gate.window_s),
                    None => (
                        &self.stage_requests,
                        now.saturating_sub(self.stage_started_at) / SECOND,
                    ),
                };
                let mut result = judge_gate(gate, requests, window_s, confidence);
                if result.outcome == GateOutcome::Fail
                    && let Some(stable) = stable
                {
                    let of_stable = judge_gate(gate, &stable.all, window_s, confidence);
                    if of_stable.outcome == GateOutcome::Fail {
                        result.outcome = GateOutcome::Shared;
                        result.message = format!(
                            "{}; the stable {} breaks it too, {:.5} over {} requests of the same span: a fault both versions share is not blamed on the canary, and the rollout holds",
                            result.message,
                            self.stable,
                            of_stable.value.unwrap_or(0.0),
                            of_stable.samples
                        );
                    }
                }
                result
            })
            .collect()
    }

    /// The analysis's state from its checks, gates and score. Every check undecided is
    /// `insufficient_data`, never `healthy`: an analysis does not succeed on no evidence.
    fn decide_state(
        &self,
        model: &Model,
        checks: &[Check],
        gates: &[GateResult],
        score: Option<f64>,
        now: EventTime,
    ) -> State {
        let d = &model.decision;
        let critical_fail = critical_failure(checks, gates);
        // A gate broken by both versions holds the rollout: doubt, not failure.
        let any_doubt = checks
            .iter()
            .any(|c| matches!(c.outcome, Outcome::Fail | Outcome::Marginal))
            || gates.iter().any(|g| g.outcome == GateOutcome::Shared);
        // A gate that could decide is evidence too: a model of gates alone can pass a canary.
        let critical_data = checks
            .iter()
            .any(|c| c.critical && c.outcome != Outcome::InsufficientData)
            || gates.iter().any(|g| g.outcome == GateOutcome::Pass);
        // But a model with checks that all say `insufficient_data` has not been judged, whatever
        // its gates say (Flagger #883: an analysis that "succeeds" on no data).
        let all_undecided =
            !checks.is_empty() && checks.iter().all(|c| c.outcome == Outcome::InsufficientData);
        let canary_silent = now.saturating_sub(self.last_canary_traffic) >= d.rolled_back_after_s * SECOND;
        if self.failed_at.is_some() {
            if canary_silent && model.mode == Mode::Enforce {
                State::RolledBack
            } else {
                State::Failing
            }
        } else if critical_fail || score.is_some_and(|s| s < d.fail_score) {
            State::Failing
        } else if canary_silent || all_undecided || !critical_data && score.is_none() {
            State::InsufficientData
        } else if any_doubt || score.is_some_and(|s| s < d.marginal_score) {
            State::Marginal
        } else if critical_data {
            State::Healthy
        } else {
            State::InsufficientData
        }
    }

    /// Takes the new state, and with it the decisions worth an event: failed; or, once a healthy
    /// canary has been observed for its stage's period with every gate passing, stage passed or
    /// promoted.
    fn advance(&mut self, model: &Model, state: State, now: EventTime, changes: &mut Vec<CanaryChange>) {
        if self.paused {
            // Judged and shown, but no decision: the operator has the rollout in hand.
            let state = if self.failed_at.is_some() {
                self.state
            } else {
                state
            };
            self.set_state(state, now);
            return;
        }
        if state == State::Failing && self.failed_at.is_none() {
            self.failed_at = Some(now);
            // A failed canary waits for no one: its approval links are void from here.
            self.awaiting_approval = None;
            self.set_state(state, now);
            changes.push(CanaryChange {
                kind: ChangeKind::Failed,
                time: now,
                weight: Some(0.0),
                view: self.view(),
            });
            return;
        }
        if self.awaiting_approval.is_some() {
            // Judged and shown, and failed above if it fails; a person decides the rest.
            self.set_state(state, now);
            return;
        }
        let stage_passed = state == State::Healthy
            && model.stages.get(self.stage).is_some_and(|stage| {
                now.saturating_sub(self.stage_started_at) >= stage.observe_s.saturating_mul(SECOND)
            })
            && self.gates.iter().all(|g| g.outcome == GateOutcome::Pass);
        if !stage_passed {
            let rolled_back = state == State::RolledBack && self.state != State::RolledBack;
            self.set_state(state, now);
            if rolled_back {
                changes.push(CanaryChange {
                    kind: ChangeKind::RolledBack,
                    time: now,
                    weight: None,
                    view: self.view(),
                });
            }
            return;
        }
        let Some(next) = model.stages.get(self.stage + 1) else {
            if self.blocked_by.is_some() {
                // Not before the canary is promoted in the chain's environment before this one.
                self.set_state(state, now);
                return;
            }
            self.set_state(State::Promoted, now);
            changes.push(CanaryChange {
                kind: ChangeKind::Promoted,
                time: now,
                weight: Some(100.0),
                view: self.view(),
            });
            return;
        };
        self.set_state(state, now);
        if next.approval {
            self.awaiting_approval = Some(now);
            changes.push(CanaryChange {
                kind: ChangeKind::AwaitingApproval,
                time: now,
                weight: None,
                view: self.view(),
            });
            return;
        }
        changes.push(self.next_stage(ChangeKind::StagePassed, next.weight, now));
    }

    /// Enters the next stage at `now`: the change that says so, with what passed (gates
    /// included) and the canary's next weight.
    fn next_stage(&mut self, kind: ChangeKind, weight: f64, now: EventTime) -> CanaryChange {
        let gates_passed = self.gates.clone();
        self.awaiting_approval = None;
        self.stage += 1;
        self.stage_started_at = now;
        self.stage_requests = RequestAggregate::default();
        let mut view = self.view();
        view.gates = gates_passed;
        CanaryChange {
            kind,
            time: now,
            weight: Some(weight),
            view,
        }
    }

    /// The environment after this one in the model's promotion chain.
    fn next_env(&self) -> Option<&str> {
        let chain = &self.model.promotion;
        let here = chain.iter().position(|e| **e == *self.env)?;
        chain.get(here + 1).map(String::as_str)
    }

    /// Fails the canary on sight at `now`: it failed in `env` (`event_id` said so), earlier in
    /// the promotion chain. None when it has failed already.
    fn fail_on_sight(&mut self, env: &str, event_id: &str, now: EventTime) -> Option<CanaryChange> {
        if self.failed_at.is_some() || self.state.is_final() {
            return None;
        }
        self.failed_in = Some((env.to_owned(), event_id.to_owned()));
        self.awaiting_approval = None;
        self.failed_at = Some(now);
        self.set_state(State::Failing, now);
        Some(CanaryChange {
            kind: ChangeKind::Failed,
            time: now,
            weight: Some(0.0),
            view: self.view(),
        })
    }

    /// The start of the one part (second or block) of `check`'s window without which it would no
    /// longer be significant at `ROBUST_ALPHA`, if there is such a part.
    fn rests_on_one_part(
        &self,
        model: &Model,
        check: &Check,
        now: EventTime,
        dispersion: &checks::Dispersion,
    ) -> Option<EventTime> {
        let h = check.window_s;
        let canary_parts = self.canary_history.parts(now, h);
        let stable_parts = self.stable_history.parts(now, h);
        if canary_parts.len() < 2 {
            return None;
        }
        let loose = checks::Thresholds::uniform(ROBUST_ALPHA);
        let without = |parts: &[(EventTime, std::borrow::Cow<'_, Aggregate>)], skip: EventTime| {
            let mut merged = Aggregate::default();
            for (start, part) in parts {
                if *start != skip {
                    merged.merge(part);
                }
            }
            merged
        };
        for (start, _) in &canary_parts {
            let canary = without(&canary_parts, *start);
            let stable = without(&stable_parts, *start);
            let windows = checks::Windows {
                horizon_s: h,
                seen_s: now.saturating_sub(self.started_at) / SECOND,
                canary: &canary,
                stable: &stable,
                dispersion,
                sequential: None,
                cohort: None,
                power_hints: None,
            };
            let mut out = Vec::new();
            checks::evaluate(model, &windows, &loose, &mut out);
            let still = out
                .iter()
                .find(|c| c.id == check.id)
                .is_some_and(|c| c.outcome == Outcome::Fail);
            if !still {
                return Some(*start);
            }
        }
        None
    }

    /// An operator's action, at `now`: the change it makes.
    fn operate(&mut self, operation: Operation, now: EventTime) -> Result<CanaryChange, JudgeError> {
        let refused = |a: &Analysis, why: &str| JudgeError::NotNow {
            operation: operation.name(),
            canary: a.canary.to_string(),
            state: why.to_owned(),
        };
        if self.state.is_final() {
            return Err(refused(self, self.state.name()));
        }
        let (kind, weight) = match operation {
            Operation::Approve => {
                if self.failed_at.is_some() {
                    return Err(refused(self, "failed already"));
                }
                let Some(next) = self
                    .model
                    .stages
                    .get(self.stage + 1)
                    .filter(|_| self.awaiting_approval.is_some())
                else {
                    return Err(refused(self, "not awaiting approval"));
                };
                let weight = next.weight;
                return Ok(self.next_stage(ChangeKind::Approved, weight, now));
            }
            Operation::Promote => {
                self.paused = false;
                self.awaiting_approval = None;
                self.set_state(State::Promoted, now);
                (ChangeKind::OperatorPromoted, Some(100.0))
            }
            Operation::Abort => {
                if self.failed_at.is_some() {
                    return Err(refused(self, "failed already"));
                }
                self.paused = false;
                self.awaiting_approval = None;
                self.failed_at = Some(now);
                self.set_state(State::Failing, now);
                (ChangeKind::OperatorAborted, Some(0.0))
            }
            Operation::Pause if self.paused => return Err(refused(self, "paused already")),
            Operation::Pause => {
                self.paused = true;
                (ChangeKind::Paused, None)
            }
            Operation::Resume if !self.paused => return Err(refused(self, "not paused")),
            Operation::Resume => {
                self.paused = false;
                (ChangeKind::Resumed, None)
            }
        };
        Ok(CanaryChange {
            kind,
            time: now,
            weight,
            view: self.view(),
        })
    }

    fn set_state(&mut self, state: State, now: EventTime) {
        if self.state != state {
            self.state = state;
            self.since = now;
        }
    }
}

/// The trailing windows of one look.
struct Trailing {
    /// The canary's: each horizon, then the baseline check's, then each windowed gate's.
    canary: Vec<Aggregate>,
    /// The stable's: each horizon, then the baseline check's.
    stable: Vec<Aggregate>,
    horizons: Vec<u64>,
    /// How much of the horizons the analysis has seen.
    seen_s: u64,
    dispersion: checks::Dispersion,
    sequential: sequential::EvidenceBySeries,
}

impl Trailing {
    /// The windows of the `i`th horizon.
    fn windows<'a>(&'a self, i: usize, power_hints: &'a checks::PowerHints) -> checks::Windows<'a> {
        checks::Windows {
            horizon_s: self.horizons[i],
            seen_s: self.seen_s,
            canary: &self.canary[i],
            stable: &self.stable[i],
            dispersion: &self.dispersion,
            sequential: Some(&self.sequential),
            cohort: None,
            power_hints: Some(power_hints),
        }
    }

    fn baseline_canary(&self) -> &Aggregate {
        &self.canary[self.horizons.len()]
    }

    fn baseline_stable(&self) -> &Aggregate {
        &self.stable[self.horizons.len()]
    }

    /// The canary's windows of the gates that have one, in the stage's order.
    fn gate_windows(&self) -> std::slice::Iter<'_, Aggregate> {
        self.canary[self.horizons.len() + 1..].iter()
    }

    /// The stable's window of every gate, in the stage's order.
    fn stable_gate_windows(&self) -> std::slice::Iter<'_, Aggregate> {
        self.stable[self.horizons.len() + 1..].iter()
    }
}

/// Every check on every horizon, at thresholds that depend on how many checks each group has:
/// evaluated at provisional thresholds to count them, then again at the final ones.
fn evaluate_horizons(
    model: &Model,
    trailing: &Trailing,
    power_hints: &checks::PowerHints,
) -> (Vec<Vec<Check>>, checks::Thresholds) {
    let run = |thresholds: &checks::Thresholds| -> Vec<Vec<Check>> {
        (0..trailing.horizons.len())
            .map(|i| {
                let mut out = Vec::new();
                checks::evaluate(model, &trailing.windows(i, power_hints), thresholds, &mut out);
                out
            })
            .collect()
    };
    let provisional: Vec<Check> = run(&checks::Thresholds::provisional())
        .into_iter()
        .flatten()
        .collect();
    let thresholds = checks::Thresholds::new(&model.decision, &provisional, trailing.horizons.len());
    (run(&thresholds), thresholds)
}

/// One result per check across its horizons: the most significant failing horizon, else the
/// longest that could decide, else the longest.
fn combine_horizons(per_horizon: Vec<Vec<Check>>) -> BTreeMap<checks::Series, Check> {
    let mut combined: BTreeMap<checks::Series, Check> = BTreeMap::new();
    for check in per_horizon.into_iter().rev().flatten() {
        let series = check.id.series();
        let better = combined
            .get(&series)
            .is_none_or(|have| match (check.outcome, have.outcome) {
                (Outcome::Fail, Outcome::Fail) => check.p_value.unwrap_or(1.0) < have.p_value.unwrap_or(1.0),
                (Outcome::Fail, _) => true,
                (Outcome::Pass, Outcome::InsufficientData) => true,
                _ => false,
            });
        if better {
            combined.insert(series, check);
        }
    }
    combined
}

/// The score: each group counts with its weight, at its worst check's outcome; undecided checks
/// do not count. None when no group could decide.
fn score(checks: &[Check]) -> Option<f64> {
    let mut groups: BTreeMap<checks::Group, (f64, f64)> = BTreeMap::new();
    for c in checks {
        let value = match c.outcome {
            Outcome::Pass => 1.0,
            Outcome::Marginal => 0.5,
            Outcome::Fail => 0.0,
            Outcome::InsufficientData => continue,
        };
        let g = groups.entry(c.group).or_insert((c.weight, 1.0));
        g.1 = g.1.min(value);
    }
    let total: f64 = groups.values().map(|g| g.0).sum();
    (total > 0.0).then(|| 100.0 * groups.values().map(|g| g.0 * g.1).sum::<f64>() / total)
}

/// A failing critical check, or a gate the canary alone breaks.
fn critical_failure(checks: &[Check], gates: &[GateResult]) -> bool {
    checks.iter().any(|c| c.critical && c.outcome == Outcome::Fail)
        || gates.iter().any(|g| g.outcome == GateOutcome::Fail)
}

/// A stage gate on the canary's `requests` over `window_s`. Every gate is a proportion (of failed
/// requests, or of requests slower than the limit): it passes when the proportion's confidence
/// bounds meet the limit, fails when they break it, and is pending in between, saying how many
/// more requests like these would settle it.
fn judge_gate(gate: &Gate, requests: &RequestAggregate, window_s: u64, confidence: f64) -> GateResult {
    let n = requests.requests;
    let mut result = GateResult {
        metric: gate.metric,
        max: gate.max,
        min: gate.min,
        value: None,
        lower: None,
        upper: None,
        samples: n,
        window_s,
        outcome: GateOutcome::Pending,
        message: String::new(),
    };
    if n == 0 {
        result.message = "no canary requests yet".into();
        return result;
    }
    let quantile = match gate.metric {
        GateMetric::ErrorRate | GateMetric::Availability => None,
        GateMetric::LatencyP50Ms => Some(0.5),
        GateMetric::LatencyP95Ms => Some(0.95),
        GateMetric::LatencyP99Ms => Some(0.99),
    };
    let limit = gate.max.or(gate.min).unwrap_or_default();
    // The quantile is above the limit exactly when more than 1 - q of requests are.
    let (x, value) = match quantile {
        None if gate.metric == GateMetric::Availability => {
            (requests.errors, 1.0 - requests.errors as f64 / n as f64)
        }
        None => (requests.errors, requests.errors as f64 / n as f64),
        Some(q) => (
            requests.latency_ms.count_above(limit).round() as u64,
            requests.latency_ms.quantile(q).unwrap_or(0.0),
        ),
    };
    // (lower, upper, pass, fail) for `x` of `n` requests.
    let bounds = |x: u64, n: u64| {
        let (lo, hi) = stats::proportion_bounds(x, n, confidence);
        match (gate.metric, quantile) {
            (GateMetric::Availability, _) => {
                let (a_lo, a_hi) = (1.0 - hi, 1.0 - lo);
                let (pass, fail) = match (gate.min, gate.max) {
                    (Some(min), _) => (a_lo >= min, a_hi < min),
                    (_, Some(max)) => (a_hi <= max, a_lo > max),
                    _ => (true, false),
                };
                (a_lo, a_hi, pass, fail)
            }
            (_, q) => {
                let tail = q.map_or(limit, |q| 1.0 - q);
                let (pass, fail) = match (gate.max, gate.min) {
                    (Some(_), _) => (hi <= tail, lo > tail),
                    (_, Some(_)) => (lo >= tail, hi < tail),
                    _ => (true, false),
                };
                (lo, hi, pass, fail)
            }
        }
    };
    let (lower, upper, pass, fail) = bounds(x, n);
    result.value = Some(value);
    result.lower = Some(lower);
    result.upper = Some(upper);
    let bound = if gate.max.is_some() { "at most" } else { "at least" };
    let name = gate.metric.name();
    let outcome = checks::rule(fail, pass);
    if outcome == Outcome::Fail {
        result.outcome = GateOutcome::Fail;
        result.message =
            format!("{name} {value:.5} breaks the gate ({bound} {limit}) with confidence over {n} requests");
    } else if outcome == Outcome::Pass {
        result.outcome = GateOutcome::Pass;
        result.message = format!("{name} {value:.5} meets the gate ({bound} {limit}) over {n} requests");
    } else {
        // As many more requests, with the same share of them failed (or slow), as would settle it.
        let share = x as f64 / n as f64;
        let settles = |m: u64| {
            let (_, _, pass, fail) = bounds((share * m as f64).round() as u64, m);
            pass || fail
        };
        let needed = match checks::Power::of(n, String::new, settles) {
            checks::Power::Short { needed, .. } => needed,
            _ => None,
        };
        let rps = n as f64 / window_s.max(1) as f64;
        result.message = format!(
            "{name} {value:.5}: {n} requests cannot yet tell whether it is {bound} {limit}; {}",
            match needed {
                Some(needed) => checks::more_needed(n, needed, rps),
                None => "as it stands, no number of requests would".to_owned(),
            }
        );
    }
    result
}

/// Every analysis, and the declared rollouts.
#[derive(Debug, Default)]
pub struct Judge {
    models: BTreeMap<String, Arc<Model>>,
    analyses: HashMap<(Arc<str>, Arc<str>), Analysis>,
    /// The stable version of each app's last analysis: a former stable still sending after a
    /// promotion is not taken for a new canary.
    retired: HashMap<(Arc<str>, Arc<str>), Arc<str>>,
    /// Analyses started or looked at since the last `take_changes`, and those ended.
    changed: HashSet<(Arc<str>, Arc<str>)>,
    ended: Vec<(String, String)>,
    /// What each version's analyses concluded in each environment, for promotion chains.
    verdicts: Verdicts,
}

/// A final verdict on a version in one environment, and the id of the event that said so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub passed: bool,
    pub event_id: String,
}

/// The verdicts the judge was told of, per (app, version), oldest versions forgotten first past
/// `MAX_VERDICT_VERSIONS` (and counted): a chain that forgets a version blocks its promotion
/// rather than passing it.
#[derive(Debug, Default)]
struct Verdicts {
    by_version: HashMap<(Arc<str>, Arc<str>), BTreeMap<String, Verdict>>,
    order: std::collections::VecDeque<(Arc<str>, Arc<str>)>,
    dropped: u64,
}

/// Versions whose verdicts the judge keeps for promotion chains.
pub const MAX_VERDICT_VERSIONS: usize = 65_536;

impl Verdicts {
    fn remember(&mut self, env: &str, key: (Arc<str>, Arc<str>), verdict: Verdict) {
        if !self.by_version.contains_key(&key) {
            self.order.push_back(key.clone());
            while self.order.len() > MAX_VERDICT_VERSIONS {
                if let Some(oldest) = self.order.pop_front() {
                    self.by_version.remove(&oldest);
                    self.dropped += 1;
                }
            }
        }
        self.by_version
            .entry(key)
            .or_default()
            .insert(env.to_owned(), verdict);
    }

    fn of(&self, app: &Arc<str>, version: &Arc<str>, env: &str) -> Option<&Verdict> {
        self.by_version.get(&(app.clone(), version.clone()))?.get(env)
    }
}

/// The model every inferred analysis uses.
pub const DEFAULT_MODEL: &str = "default";

impl Judge {
    pub fn new(models: &[Model]) -> Self {
        Judge {
            models: models
                .iter()
                .map(|m| (m.name.clone(), Arc::new(m.clone())))
                .collect(),
            ..Judge::default()
        }
    }

    pub fn models(&self) -> impl Iterator<Item = &Model> {
        self.models.values().map(|m| &**m)
    }

    pub fn analysis(&self, env: &str, app: &str) -> Option<&Analysis> {
        self.analyses.get(&(Arc::from(env), Arc::from(app)))
    }

    pub fn analyses(&self) -> impl Iterator<Item = &Analysis> {
        self.analyses.values()
    }

    /// The analysis, to be changed: one still under way is written at the next flush (a decided
    /// one no longer changes).
    pub(crate) fn analysis_mut(&mut self, key: &(Arc<str>, Arc<str>)) -> Option<&mut Analysis> {
        let analysis = self.analyses.get_mut(key)?;
        if !analysis.is_final() {
            self.changed.insert(key.clone());
        }
        Some(analysis)
    }

    /// Whether `version` of this app should start an inferred analysis.
    pub(crate) fn wants_canary(&self, key: &(Arc<str>, Arc<str>), version: &Arc<str>) -> bool {
        if !self.models.contains_key(DEFAULT_MODEL) {
            return false;
        }
        if self.retired.get(key) == Some(version) {
            return false;
        }
        match self.analyses.get(key) {
            None => true,
            Some(a) => a.is_final() && &a.canary != version && !a.declared,
        }
    }

    /// Starts an analysis; returns its `started` change, and its `failed` one when the promotion
    /// chain fails it on sight.
    pub(crate) fn start(
        &mut self,
        key: (Arc<str>, Arc<str>),
        stable: Arc<str>,
        canary: Arc<str>,
        model: &str,
        declared: bool,
        at: EventTime,
    ) -> Result<Vec<CanaryChange>, JudgeError> {
        let model = self.resolve_model(model, None)?;
        self.begin(key, stable, canary, model, declared, at)
    }

    /// The model named `name`, with a declared rollout's traffic plan laid over it.
    pub(crate) fn resolve_model(
        &self,
        name: &str,
        traffic: Option<&TrafficRequest>,
    ) -> Result<Arc<Model>, JudgeError> {
        let model = self
            .models
            .get(name)
            .cloned()
            .ok_or_else(|| JudgeError::UnknownModel(name.to_owned()))?;
        match traffic {
            None => Ok(model),
            Some(request) => Ok(Arc::new(
                model.with_traffic(request).map_err(JudgeError::Traffic)?,
            )),
        }
    }

    /// Starts an analysis under `model`.
    pub(crate) fn begin(
        &mut self,
        key: (Arc<str>, Arc<str>),
        stable: Arc<str>,
        canary: Arc<str>,
        model: Arc<Model>,
        declared: bool,
        at: EventTime,
    ) -> Result<Vec<CanaryChange>, JudgeError> {
        if stable == canary {
            return Err(JudgeError::SameVersion(stable.to_string()));
        }
        let keep = model.longest_window_s();
        let analysis = Analysis::new(key.clone(), stable.clone(), canary, model, declared, at, keep);
        let view = analysis.view();
        self.analyses.insert(key.clone(), analysis);
        self.changed.insert(key.clone());
        self.retired.insert(key.clone(), stable);
        let mut changes = vec![CanaryChange {
            kind: ChangeKind::Started,
            time: at,
            weight: None,
            view,
        }];
        changes.extend(self.follow_chain(&key, at));
        Ok(changes)
    }

    /// Tells the judge that `version` of `app` was promoted (`passed`) or failed in `env`, by
    /// the event `event_id`; the changes that makes to analyses in the environments after it in
    /// their promotion chains (a failure fails them on sight; a pass lets them be promoted).
    pub fn remember_verdict(
        &mut self,
        env: &str,
        app: &str,
        version: &str,
        verdict: Verdict,
        at: EventTime,
    ) -> Vec<CanaryChange> {
        self.recall_verdict(env, app, version, verdict);
        let (app, version): (Arc<str>, Arc<str>) = (Arc::from(app), Arc::from(version));
        let affected: Vec<_> = self
            .analyses
            .iter()
            .filter(|((e, a), analysis)| **e != *env && *a == app && analysis.canary == version)
            .map(|(key, _)| key.clone())
            .collect();
        affected
            .into_iter()
            .flat_map(|key| self.follow_chain(&key, at))
            .collect()
    }

    /// Tells the judge of a verdict without applying it to any analysis: how a restart rebuilds
    /// what it knows from stored events, oldest first, before `follow_chains` applies only the
    /// latest verdict per environment (applying each in turn would fail an analysis on a failure
    /// that a later promotion in the same environment has since overtaken).
    pub fn recall_verdict(&mut self, env: &str, app: &str, version: &str, verdict: Verdict) {
        self.verdicts
            .remember(env, (Arc::from(app), Arc::from(version)), verdict);
    }

    /// Applies every live analysis's promotion chain to what the judge knows of verdicts (after
    /// a restart, once they have been told again); the changes it makes.
    pub fn follow_chains(&mut self, at: EventTime) -> Vec<CanaryChange> {
        let keys: Vec<_> = self.analyses.keys().cloned().collect();
        keys.into_iter()
            .flat_map(|key| self.follow_chain(&key, at))
            .collect()
    }

    /// How many versions' verdicts were forgotten to keep within `MAX_VERDICT_VERSIONS`.
    pub fn verdicts_dropped(&self) -> u64 {
        self.verdicts.dropped
    }

    /// The analysis's place in its model's promotion chain: failed on sight when its canary
    /// failed in an earlier environment; else blocked while not promoted in the one before.
    fn follow_chain(&mut self, key: &(Arc<str>, Arc<str>), at: EventTime) -> Option<CanaryChange> {
        let analysis = self.analyses.get(key)?;
        let chain = &analysis.model.promotion;
        let here = chain.iter().position(|e| **e == *key.0).filter(|i| *i > 0)?;
        let (app, canary) = (&analysis.app, &analysis.canary);
        let failed = chain[..here].iter().find_map(|env| {
            self.verdicts
                .of(app, canary, env)
                .filter(|v| !v.passed)
                .map(|v| (env.clone(), v.event_id.clone()))
        });
        let previous = &chain[here - 1];
        let blocked_by = self
            .verdicts
            .of(app, canary, previous)
            .is_none_or(|v| !v.passed)
            .then(|| previous.clone());
        let analysis = self.analyses.get_mut(key)?;
        self.changed.insert(key.clone());
        analysis.blocked_by = blocked_by;
        let (env, event_id) = failed?;
        analysis.fail_on_sight(&env, &event_id, at.max(analysis.evaluated_at))
    }

    /// Ends the app's analysis (the rollout API's DELETE).
    /// An operator's action on the app's analysis.
    pub(crate) fn operate(
        &mut self,
        key: &(Arc<str>, Arc<str>),
        operation: Operation,
        now: EventTime,
    ) -> Result<CanaryChange, JudgeError> {
        let analysis = self.analyses.get_mut(key).ok_or(JudgeError::NoRollout)?;
        let change = analysis.operate(operation, now)?;
        self.changed.insert(key.clone());
        Ok(change)
    }

    pub(crate) fn end(&mut self, key: &(Arc<str>, Arc<str>)) -> Result<AnalysisView, JudgeError> {
        let ended = self.analyses.remove(key).ok_or(JudgeError::NoRollout)?;
        self.changed.remove(key);
        self.ended.push((key.0.to_string(), key.1.to_string()));
        Ok(ended.view())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_gate_names_the_requests_it_needs() {
        let gate = Gate {
            metric: GateMetric::ErrorRate,
            max: Some(0.05),
            min: None,
            window_s: 60,
        };
        let mut requests = RequestAggregate::default();
        for _ in 0..20 {
            requests.add(1_000_000, false);
        }
        let result = judge_gate(&gate, &requests, 60, 0.95);
        assert_eq!(result.outcome, GateOutcome::Pending, "{}", result.message);
        assert!(
            result.message.contains("20 requests cannot yet tell")
                && result.message.contains(" more needed, ~"),
            "{}",
            result.message
        );
        for _ in 0..200 {
            requests.add(1_000_000, false);
        }
        assert_eq!(judge_gate(&gate, &requests, 60, 0.95).outcome, GateOutcome::Pass);
    }
}
