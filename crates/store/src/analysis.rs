//! The record of a canary analysis, and its conversions to and from the engine's
//! `AnalysisSnapshot`.
//!
//! Its layout is versioned by the tree it lives in (values keep schema 2's byte): `analyses.2`
//! held `AnalysisRecordV2`, frozen as released; `analyses.3` holds `AnalysisRecord`, which adds
//! where the analysis waits beyond its stage (a person's approval, an earlier environment of its
//! promotion chain) and why it was failed on sight. The store moves `analyses.2` to `analyses.3`
//! when it opens (`migrate::analyses_to_current`); older daemons never open either tree's
//! successor. The sequential evidence is versioned the same way: `sequential.1` held
//! `SequentialRecordV1`; `sequential.2` holds `SequentialRecord`, which adds each cohort's
//! operation mix and whether the evidence is `legacy` (moved from `sequential.1`, so gathered
//! under the budget's split before cohorts had shares of their own, which it keeps). A build
//! older than `sequential.2` finds no evidence for an analysis in flight and starts its tests
//! again, spending its false-failure budget a second time: going back a version mid-analysis is
//! not supported.
//!
//! Names the API shows (states, outcomes, check groups and tests) are stored as those names, and
//! the analysis's model as the JSON of its model file's fields, so that neither a reordered enum
//! nor a model field added with a default changes what a stored record means.

use canaryd_engine::judge::checks::{Check, CheckId, Feature, Group, Outcome, Test, effect_kind_named};
use canaryd_engine::judge::sequential::{ProcessState, SequentialState};
use canaryd_engine::judge::{AnalysisSnapshot, GateMetric, GateOutcome, GateResult, Model, State};
use canaryd_engine::window::RequestAggregate;
use serde::{Deserialize, Serialize};

use crate::records::{ConvertError, SketchRecord};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnalysisRecord {
    pub env: String,
    pub app: String,
    pub stable: String,
    pub canary: String,
    /// The model as JSON.
    pub model: String,
    pub declared: bool,
    pub started_at: u64,
    pub state: String,
    pub since: u64,
    pub stage: u64,
    pub stage_started_at: u64,
    pub stage_requests: RequestsRecord,
    pub failed_at: Option<u64>,
    pub last_canary_traffic: u64,
    pub evaluated_at: u64,
    pub streaks: Vec<StreakRecord>,
    pub checks: Vec<CheckRecord>,
    pub gates: Vec<GateRecord>,
    pub score: Option<f64>,
    pub canary_requests: u64,
    pub stable_requests: u64,
    pub retired: Option<String>,
    /// Paused by an operator.
    pub paused: bool,
    /// Event time since which it waits for approval of its next stage.
    pub awaiting_approval: Option<u64>,
    /// The promotion chain's environment whose promotion it waits for.
    pub blocked_by: Option<String>,
    /// The earlier environment it failed in and that verdict's event id, when failed on sight.
    pub failed_in: Option<(String, String)>,
}

/// The record of an analysis in `analyses.2`, as released: frozen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnalysisRecordV2 {
    pub env: String,
    pub app: String,
    pub stable: String,
    pub canary: String,
    pub model: String,
    pub declared: bool,
    pub started_at: u64,
    pub state: String,
    pub since: u64,
    pub stage: u64,
    pub stage_started_at: u64,
    pub stage_requests: RequestsRecord,
    pub failed_at: Option<u64>,
    pub last_canary_traffic: u64,
    pub evaluated_at: u64,
    pub streaks: Vec<StreakRecord>,
    pub checks: Vec<CheckRecord>,
    pub gates: Vec<GateRecord>,
    pub score: Option<f64>,
    pub canary_requests: u64,
    pub stable_requests: u64,
    pub retired: Option<String>,
    pub paused: bool,
}

impl From<AnalysisRecordV2> for AnalysisRecord {
    /// An analysis of a build before approvals and promotion chains waited on neither.
    fn from(r: AnalysisRecordV2) -> Self {
        AnalysisRecord {
            env: r.env,
            app: r.app,
            stable: r.stable,
            canary: r.canary,
            model: r.model,
            declared: r.declared,
            started_at: r.started_at,
            state: r.state,
            since: r.since,
            stage: r.stage,
            stage_started_at: r.stage_started_at,
            stage_requests: r.stage_requests,
            failed_at: r.failed_at,
            last_canary_traffic: r.last_canary_traffic,
            evaluated_at: r.evaluated_at,
            streaks: r.streaks,
            checks: r.checks,
            gates: r.gates,
            score: r.score,
            canary_requests: r.canary_requests,
            stable_requests: r.stable_requests,
            retired: r.retired,
            paused: r.paused,
            awaiting_approval: None,
            blocked_by: None,
            failed_in: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestsRecord {
    pub requests: u64,
    pub errors: u64,
    pub latency_ms: SketchRecord,
}

/// What a check measures, by the names its id shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckKeyRecord {
    pub group: String,
    pub feature: String,
    pub subject: Option<String>,
    pub test: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreakRecord {
    pub check: CheckKeyRecord,
    pub failing_looks: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckRecord {
    pub check: CheckKeyRecord,
    pub horizon_s: u64,
    pub operation: Option<String>,
    pub critical: bool,
    pub weight: f64,
    pub outcome: String,
    pub canary_value: Option<f64>,
    pub baseline_value: Option<f64>,
    pub canary_samples: u64,
    pub baseline_samples: u64,
    pub statistic: Option<f64>,
    pub p_value: Option<f64>,
    pub threshold: f64,
    pub effect: Option<f64>,
    pub min_effect: f64,
    pub effect_kind: String,
    pub window_s: u64,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateRecord {
    pub metric: String,
    pub max: Option<f64>,
    pub min: Option<f64>,
    pub value: Option<f64>,
    pub lower: Option<f64>,
    pub upper: Option<f64>,
    pub samples: u64,
    pub window_s: u64,
    pub outcome: String,
    pub message: String,
}

/// A model as its record keeps it.
pub fn model_record(model: &Model) -> Result<String, ConvertError> {
    serde_json::to_string(model).map_err(|e| ConvertError {
        what: "Model",
        reason: e.to_string(),
    })
}

/// The model a record keeps.
pub fn model_of_record(text: &str) -> Result<Model, ConvertError> {
    serde_json::from_str(text).map_err(|e| ConvertError {
        what: "Model",
        reason: e.to_string(),
    })
}

fn unknown(what: &'static str, name: &str) -> ConvertError {
    ConvertError {
        what,
        reason: format!("unknown name {name:?}"),
    }
}

fn key_record(group: Group, feature: &Feature, test: Test) -> CheckKeyRecord {
    CheckKeyRecord {
        group: group.name().to_owned(),
        feature: feature.name.clone(),
        subject: feature.subject.clone(),
        test: test.name().to_owned(),
    }
}

fn key_of(record: &CheckKeyRecord) -> Result<(Group, Feature, Test), ConvertError> {
    let group = Group::named(&record.group).ok_or_else(|| unknown("check group", &record.group))?;
    let test = Test::named(&record.test).ok_or_else(|| unknown("check test", &record.test))?;
    let feature = Feature {
        name: record.feature.clone(),
        subject: record.subject.clone(),
    };
    Ok((group, feature, test))
}

impl TryFrom<&AnalysisSnapshot> for AnalysisRecord {
    type Error = ConvertError;

    fn try_from(s: &AnalysisSnapshot) -> Result<Self, ConvertError> {
        let model = model_record(&s.model)?;
        Ok(AnalysisRecord {
            env: s.env.clone(),
            app: s.app.clone(),
            stable: s.stable.clone(),
            canary: s.canary.clone(),
            model,
            declared: s.declared,
            paused: s.paused,
            started_at: s.started_at,
            state: s.state.name().to_owned(),
            since: s.since,
            stage: s.stage as u64,
            stage_started_at: s.stage_started_at,
            stage_requests: RequestsRecord {
                requests: s.stage_requests.requests,
                errors: s.stage_requests.errors,
                latency_ms: (&s.stage_requests.latency_ms).try_into()?,
            },
            failed_at: s.failed_at,
            last_canary_traffic: s.last_canary_traffic,
            evaluated_at: s.evaluated_at,
            streaks: s
                .streaks
                .iter()
                .map(|(group, feature, test, n)| StreakRecord {
                    check: key_record(*group, feature, *test),
                    failing_looks: *n,
                })
                .collect(),
            checks: s.checks.iter().map(CheckRecord::from).collect(),
            gates: s.gates.iter().map(GateRecord::from).collect(),
            score: s.score,
            canary_requests: s.canary_requests,
            stable_requests: s.stable_requests,
            retired: s.retired.clone(),
            awaiting_approval: s.awaiting_approval,
            blocked_by: s.blocked_by.clone(),
            failed_in: s.failed_in.clone(),
        })
    }
}

impl TryFrom<&AnalysisRecord> for AnalysisSnapshot {
    type Error = ConvertError;

    fn try_from(r: &AnalysisRecord) -> Result<Self, ConvertError> {
        let model = model_of_record(&r.model)?;
        Ok(AnalysisSnapshot {
            env: r.env.clone(),
            app: r.app.clone(),
            stable: r.stable.clone(),
            canary: r.canary.clone(),
            model,
            declared: r.declared,
            paused: r.paused,
            awaiting_approval: r.awaiting_approval,
            blocked_by: r.blocked_by.clone(),
            failed_in: r.failed_in.clone(),
            started_at: r.started_at,
            state: State::named(&r.state).ok_or_else(|| unknown("analysis state", &r.state))?,
            since: r.since,
            stage: usize::try_from(r.stage).map_err(|_| unknown("stage", &r.stage.to_string()))?,
            stage_started_at: r.stage_started_at,
            stage_requests: RequestAggregate {
                requests: r.stage_requests.requests,
                errors: r.stage_requests.errors,
                latency_ms: (&r.stage_requests.latency_ms).try_into()?,
            },
            failed_at: r.failed_at,
            last_canary_traffic: r.last_canary_traffic,
            evaluated_at: r.evaluated_at,
            streaks: r
                .streaks
                .iter()
                .map(|s| key_of(&s.check).map(|(g, f, t)| (g, f, t, s.failing_looks)))
                .collect::<Result<_, _>>()?,
            checks: r
                .checks
                .iter()
                .map(Check::try_from_record)
                .collect::<Result<_, _>>()?,
            gates: r
                .gates
                .iter()
                .map(GateResult::try_from_record)
                .collect::<Result<_, _>>()?,
            score: r.score,
            canary_requests: r.canary_requests,
            stable_requests: r.stable_requests,
            retired: r.retired.clone(),
            // Kept in a tree of its own (`SequentialRecord`), and attached by the store.
            sequential: SequentialState::default(),
        })
    }
}

impl From<&Check> for CheckRecord {
    fn from(c: &Check) -> Self {
        CheckRecord {
            check: key_record(c.id.group, &c.id.feature, c.id.test),
            horizon_s: c.id.horizon_s,
            operation: c.operation.clone(),
            critical: c.critical,
            weight: c.weight,
            outcome: c.outcome.name().to_owned(),
            canary_value: c.canary_value,
            baseline_value: c.baseline_value,
            canary_samples: c.canary_samples,
            baseline_samples: c.baseline_samples,
            statistic: c.statistic,
            p_value: c.p_value,
            threshold: c.threshold,
            effect: c.effect,
            min_effect: c.min_effect,
            effect_kind: c.effect_kind.to_owned(),
            window_s: c.window_s,
            message: c.message.clone(),
        }
    }
}

/// Conversions from records of engine types the store does not own, so no `From` impl.
trait FromRecord<R>: Sized {
    fn try_from_record(record: &R) -> Result<Self, ConvertError>;
}

impl FromRecord<CheckRecord> for Check {
    fn try_from_record(r: &CheckRecord) -> Result<Check, ConvertError> {
        let (group, feature, test) = key_of(&r.check)?;
        let id = CheckId {
            group,
            feature,
            test,
            horizon_s: r.horizon_s,
        };
        Ok(Check {
            group,
            feature: id.feature.to_string(),
            id,
            operation: r.operation.clone(),
            test,
            critical: r.critical,
            weight: r.weight,
            outcome: Outcome::named(&r.outcome).ok_or_else(|| unknown("check outcome", &r.outcome))?,
            canary_value: r.canary_value,
            baseline_value: r.baseline_value,
            canary_samples: r.canary_samples,
            baseline_samples: r.baseline_samples,
            statistic: r.statistic,
            p_value: r.p_value,
            threshold: r.threshold,
            effect: r.effect,
            min_effect: r.min_effect,
            effect_kind: effect_kind_named(&r.effect_kind)
                .ok_or_else(|| unknown("effect kind", &r.effect_kind))?,
            window_s: r.window_s,
            message: r.message.clone(),
        })
    }
}

impl From<&GateResult> for GateRecord {
    fn from(g: &GateResult) -> Self {
        GateRecord {
            metric: g.metric.name().to_owned(),
            max: g.max,
            min: g.min,
            value: g.value,
            lower: g.lower,
            upper: g.upper,
            samples: g.samples,
            window_s: g.window_s,
            outcome: g.outcome.name().to_owned(),
            message: g.message.clone(),
        }
    }
}

impl FromRecord<GateRecord> for GateResult {
    fn try_from_record(r: &GateRecord) -> Result<GateResult, ConvertError> {
        Ok(GateResult {
            metric: GateMetric::named(&r.metric).ok_or_else(|| unknown("gate metric", &r.metric))?,
            max: r.max,
            min: r.min,
            value: r.value,
            lower: r.lower,
            upper: r.upper,
            samples: r.samples,
            window_s: r.window_s,
            outcome: GateOutcome::named(&r.outcome).ok_or_else(|| unknown("gate outcome", &r.outcome))?,
            message: r.message.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::analysis;
    use crate::{AsStored, Store, StoreCounters};
    use canaryd_engine::EngineState;

    fn open(dir: &std::path::Path) -> Store<AsStored> {
        Store::open(dir, 1 << 20, StoreCounters::default()).expect("open")
    }

    /// An analysis written by a build before approvals and promotion chains (`analyses.2`) is moved
    /// to `analyses.3` when the store opens, whole, waiting on neither; the old tree goes.
    #[test]
    fn analyses_of_the_tree_before_approvals_are_moved_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut snapshot = analysis("shop");
        (
            snapshot.awaiting_approval,
            snapshot.blocked_by,
            snapshot.failed_in,
        ) = (None, None, None);
        {
            let store = open(dir.path());
            let mut state = EngineState::default();
            state.judge.analyses = vec![snapshot.clone()];
            store.write(&state).expect("write");
            store.flush().expect("flush");
            // Moved back to the old tree, in the old layout, as the build before wrote it.
            let db = &store.db;
            let new = db.open_tree(crate::ANALYSES).expect("tree");
            let old = db.open_tree(crate::ANALYSES_V2).expect("tree");
            for item in new.iter() {
                let (key, bytes) = item.expect("read");
                let crate::Decoded::Record(record) = crate::decode::<AnalysisRecord>(&bytes) else {
                    panic!("a record of the current layout");
                };
                let v2 = AnalysisRecordV2 {
                    env: record.env,
                    app: record.app,
                    stable: record.stable,
                    canary: record.canary,
                    model: record.model,
                    declared: record.declared,
                    started_at: record.started_at,
                    state: record.state,
                    since: record.since,
                    stage: record.stage,
                    stage_started_at: record.stage_started_at,
                    stage_requests: record.stage_requests,
                    failed_at: record.failed_at,
                    last_canary_traffic: record.last_canary_traffic,
                    evaluated_at: record.evaluated_at,
                    streaks: record.streaks,
                    checks: record.checks,
                    gates: record.gates,
                    score: record.score,
                    canary_requests: record.canary_requests,
                    stable_requests: record.stable_requests,
                    retired: record.retired,
                    paused: record.paused,
                };
                old.insert(key.clone(), crate::encode(&v2)).expect("write");
                new.remove(key).expect("remove");
            }
            old.insert(b"junk", vec![2u8, 0xff]).expect("write");
            store.flush().expect("flush");
        }
        let store = open(dir.path());
        let state = store.load().expect("load");
        assert_eq!(state.judge.analyses, vec![snapshot]);
        // The record that does not decode is left where it was, counted.
        let old = store.db.open_tree(crate::ANALYSES_V2).expect("tree");
        assert_eq!(old.len(), 1);
        assert!(old.get(b"junk").expect("read").is_some());
    }

    /// Evidence written by a build before cohorts had mixes (`sequential.1`) is moved to
    /// `sequential.2` when the store opens, and read back with its analysis, whole: the tests go on
    /// rather than start again (which would spend the false-failure budget twice).
    #[test]
    fn evidence_of_the_tree_before_cohort_mixes_is_moved_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut snapshot = analysis("shop");
        snapshot.sequential.cohort_mix.clear();
        {
            let store = open(dir.path());
            let mut state = EngineState::default();
            state.judge.analyses = vec![snapshot.clone()];
            store.write(&state).expect("write");
            store.flush().expect("flush");
            let db = &store.db;
            let new = db.open_tree(crate::SEQUENTIAL).expect("tree");
            let old = db.open_tree(crate::SEQUENTIAL_V1).expect("tree");
            for item in new.iter() {
                let (key, bytes) = item.expect("read");
                let crate::Decoded::Record(r) = crate::decode::<SequentialRecord>(&bytes) else {
                    panic!("a record of the current layout");
                };
                let v1 = SequentialRecordV1 {
                    stable: r.stable,
                    canary: r.canary,
                    started_at: r.started_at,
                    series: r.series,
                    mix: r.mix,
                    subjects: r.subjects,
                    keyed: r.keyed,
                    through: r.through,
                    metrics_through: r.metrics_through,
                };
                old.insert(key.clone(), crate::encode(&v1)).expect("write");
                new.remove(key).expect("remove");
            }
            old.insert(b"junk", vec![2u8, 0xff]).expect("write");
            store.flush().expect("flush");
        }
        let store = open(dir.path());
        let state = store.load().expect("load");
        // Marked legacy: it goes on under the budget's split it was gathered under.
        snapshot.sequential.legacy = true;
        assert_eq!(state.judge.analyses, vec![snapshot]);
        let old = store.db.open_tree(crate::SEQUENTIAL_V1).expect("tree");
        assert_eq!(old.len(), 1, "only the record that does not decode is left");
        assert_eq!(store.counters.records_skipped.get(), 1);
    }
}

/// An analysis's sequential evidence as `sequential.1` held it, before cohorts had mixes of their
/// own: frozen as released, moved to `sequential.2` at open.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SequentialRecordV1 {
    pub stable: String,
    pub canary: String,
    pub started_at: u64,
    pub series: Vec<(CheckKeyRecord, ProcessRecord)>,
    pub mix: Vec<(String, u64, ProcessRecord)>,
    pub subjects: Vec<(String, u64)>,
    /// Group name, subject, rank.
    pub keyed: Vec<(String, String, u64)>,
    pub through: u64,
    pub metrics_through: u64,
}

impl From<SequentialRecordV1> for SequentialRecord {
    /// The same evidence, marked as gathered under the split it goes on under; no cohort had a
    /// mix of its own.
    fn from(r: SequentialRecordV1) -> Self {
        SequentialRecord {
            stable: r.stable,
            canary: r.canary,
            started_at: r.started_at,
            series: r.series,
            mix: r.mix,
            cohort_mix: Vec::new(),
            subjects: r.subjects,
            keyed: r.keyed,
            through: r.through,
            metrics_through: r.metrics_through,
            legacy: true,
        }
    }
}

/// An analysis's sequential evidence (`judge::sequential`), in the `sequential.2` tree under the
/// analysis's key, written with its record. It names the analysis it belongs to, so evidence is
/// never taken up by another analysis of the same app.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SequentialRecord {
    pub stable: String,
    pub canary: String,
    pub started_at: u64,
    pub series: Vec<(CheckKeyRecord, ProcessRecord)>,
    pub mix: MixRecord,
    /// Cohort, rank, and its mix.
    pub cohort_mix: Vec<(String, u64, MixRecord)>,
    pub subjects: Vec<(String, u64)>,
    /// Group name, subject, rank.
    pub keyed: Vec<(String, String, u64)>,
    pub through: u64,
    pub metrics_through: u64,
    /// Gathered under the budget's split before cohorts had shares of their own (moved from
    /// `sequential.1`): it goes on under that split.
    pub legacy: bool,
}

/// An operation mix: each operation, its rank and its process.
pub type MixRecord = Vec<(String, u64, ProcessRecord)>;

/// A mix's processes as the record keeps them.
fn mix_record(mix: &[(String, usize, ProcessState)]) -> MixRecord {
    mix.iter()
        .map(|(op, rank, p)| (op.clone(), *rank as u64, p.into()))
        .collect()
}

/// A kept mix's processes, as the judge holds them.
fn mix_state(
    mix: &[(String, u64, ProcessRecord)],
) -> Result<Vec<(String, usize, ProcessState)>, ConvertError> {
    mix.iter()
        .map(|(op, k, p)| Ok((op.clone(), rank(*k)?, p.into())))
        .collect()
}

fn rank(k: u64) -> Result<usize, ConvertError> {
    usize::try_from(k).map_err(|_| unknown("rank", &k.to_string()))
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub two_sided: bool,
    pub starts: Vec<(u64, Vec<f64>)>,
    pub started: u64,
    pub started_weight: f64,
    pub last_start: u64,
    pub seconds: u64,
    pub canary_requests: f64,
}

impl From<&ProcessState> for ProcessRecord {
    fn from(p: &ProcessState) -> Self {
        ProcessRecord {
            two_sided: p.two_sided,
            starts: p.starts.clone(),
            started: p.started,
            started_weight: p.started_weight,
            last_start: p.last_start,
            seconds: p.seconds,
            canary_requests: p.canary_requests,
        }
    }
}

impl From<&ProcessRecord> for ProcessState {
    fn from(p: &ProcessRecord) -> Self {
        ProcessState {
            two_sided: p.two_sided,
            starts: p.starts.clone(),
            started: p.started,
            started_weight: p.started_weight,
            last_start: p.last_start,
            seconds: p.seconds,
            canary_requests: p.canary_requests,
        }
    }
}

impl SequentialRecord {
    /// The record of `s`'s sequential evidence.
    pub fn of(s: &AnalysisSnapshot) -> SequentialRecord {
        let q = &s.sequential;
        SequentialRecord {
            stable: s.stable.clone(),
            canary: s.canary.clone(),
            started_at: s.started_at,
            series: q
                .series
                .iter()
                .map(|((group, feature, test), p)| (key_record(*group, feature, *test), p.into()))
                .collect(),
            mix: mix_record(&q.mix),
            cohort_mix: q
                .cohort_mix
                .iter()
                .map(|(cohort, rank, mix)| (cohort.clone(), *rank as u64, mix_record(mix)))
                .collect(),
            subjects: q.subjects.iter().map(|(op, k)| (op.clone(), *k as u64)).collect(),
            keyed: q
                .keyed
                .iter()
                .map(|(group, subject, k)| (group.name().to_owned(), subject.clone(), *k as u64))
                .collect(),
            through: q.through,
            metrics_through: q.metrics_through,
            legacy: q.legacy,
        }
    }

    /// Whether it is the evidence of analysis `s` (and not of an earlier one of the same app).
    pub fn belongs_to(&self, s: &AnalysisSnapshot) -> bool {
        self.stable == s.stable && self.canary == s.canary && self.started_at == s.started_at
    }
}

impl TryFrom<&SequentialRecord> for SequentialState {
    type Error = ConvertError;

    fn try_from(r: &SequentialRecord) -> Result<Self, ConvertError> {
        Ok(SequentialState {
            series: r
                .series
                .iter()
                .map(|(key, p)| key_of(key).map(|series| (series, p.into())))
                .collect::<Result<_, _>>()?,
            mix: mix_state(&r.mix)?,
            cohort_mix: r
                .cohort_mix
                .iter()
                .map(|(cohort, k, mix)| Ok((cohort.clone(), rank(*k)?, mix_state(mix)?)))
                .collect::<Result<_, ConvertError>>()?,
            subjects: r
                .subjects
                .iter()
                .map(|(op, k)| Ok((op.clone(), rank(*k)?)))
                .collect::<Result<_, ConvertError>>()?,
            keyed: r
                .keyed
                .iter()
                .map(|(group, subject, k)| {
                    let group = Group::named(group).ok_or_else(|| unknown("check group", group))?;
                    Ok((group, subject.clone(), rank(*k)?))
                })
                .collect::<Result<_, ConvertError>>()?,
            through: r.through,
            metrics_through: r.metrics_through,
            legacy: r.legacy,
        })
    }
}
