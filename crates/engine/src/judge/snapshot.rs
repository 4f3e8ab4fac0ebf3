//! What of an analysis outlives a restart, and the judge's record of what changed since the last
//! time it was asked.
//!
//! A rollout's model, mode, stage, stage start, state, verdict and the evidence behind it
//! (the last look's checks and gates, and how many failing looks in a row each check has had) are
//! durable: after a crash the same analysis goes on under the same model, so a shadow rollout
//! stays shadow and a decided verdict is not decided again (which would send it again under a
//! new event id). The recent buckets are not: like the engine's own windows, they start again
//! empty, and checks wait for fresh evidence before they pass.

use std::collections::HashMap;
use std::sync::Arc;

use super::checks::{Check, Feature, Group, Test};
use super::history::History;
use super::model::Model;
use super::{Analysis, GateResult, Judge, State};
use crate::observation::EventTime;
use crate::window::RequestAggregate;

/// One analysis as the store keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct AnalysisSnapshot {
    pub env: String,
    pub app: String,
    pub stable: String,
    pub canary: String,
    /// The model the analysis runs under, as it was when the analysis started: a model file
    /// edited or removed since does not change a rollout under way.
    pub model: Model,
    pub declared: bool,
    pub paused: bool,
    /// Since when it has waited for approval of its next stage.
    pub awaiting_approval: Option<EventTime>,
    /// The chain's environment it waits to be promoted in first.
    pub blocked_by: Option<String>,
    /// The earlier environment it failed in and that verdict's event id, when failed on sight.
    pub failed_in: Option<(String, String)>,
    pub started_at: EventTime,
    pub state: State,
    pub since: EventTime,
    pub stage: usize,
    pub stage_started_at: EventTime,
    pub stage_requests: RequestAggregate,
    pub failed_at: Option<EventTime>,
    pub last_canary_traffic: EventTime,
    pub evaluated_at: EventTime,
    /// Failing looks in a row, per check (its group, feature and test).
    pub streaks: Vec<(Group, Feature, Test, u32)>,
    pub checks: Vec<Check>,
    pub gates: Vec<GateResult>,
    pub score: Option<f64>,
    pub canary_requests: u64,
    pub stable_requests: u64,
    /// The stable version of the app's last analysis, which must not be taken for a new canary.
    pub retired: Option<String>,
    /// The sequential evidence so far: a restart continues the same tests.
    pub sequential: super::sequential::SequentialState,
}

/// The analyses changed since the judge was last asked, and those ended.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JudgeChanges {
    pub analyses: Vec<AnalysisSnapshot>,
    /// (env, app) of analyses ended by the rollout API, whose records are to be deleted.
    pub ended: Vec<(String, String)>,
}

impl Analysis {
    fn snapshot(&self, retired: Option<&Arc<str>>) -> AnalysisSnapshot {
        let mut streaks: Vec<_> = self
            .streaks
            .iter()
            .map(|((group, feature, test), n)| (*group, feature.clone(), *test, *n))
            .collect();
        streaks.sort_by(|a, b| (a.0, &a.1, a.2).cmp(&(b.0, &b.1, b.2)));
        AnalysisSnapshot {
            env: self.env.to_string(),
            app: self.app.to_string(),
            stable: self.stable.to_string(),
            canary: self.canary.to_string(),
            model: (*self.model).clone(),
            declared: self.declared,
            paused: self.paused,
            awaiting_approval: self.awaiting_approval,
            blocked_by: self.blocked_by.clone(),
            failed_in: self.failed_in.clone(),
            started_at: self.started_at,
            state: self.state,
            since: self.since,
            stage: self.stage,
            stage_started_at: self.stage_started_at,
            stage_requests: self.stage_requests.clone(),
            failed_at: self.failed_at,
            last_canary_traffic: self.last_canary_traffic,
            evaluated_at: self.evaluated_at,
            streaks,
            checks: self.checks.clone(),
            gates: self.gates.clone(),
            score: self.score,
            canary_requests: self.canary_requests,
            stable_requests: self.stable_requests,
            retired: retired.map(|r| r.to_string()),
            sequential: self.sequential.state(),
        }
    }

    fn restored(s: AnalysisSnapshot) -> Analysis {
        let keep = s.model.longest_window_s();
        Analysis {
            env: Arc::from(s.env),
            app: Arc::from(s.app),
            stable: Arc::from(s.stable),
            canary: Arc::from(s.canary),
            model: Arc::new(s.model),
            declared: s.declared,
            paused: s.paused,
            awaiting_approval: s.awaiting_approval,
            blocked_by: s.blocked_by,
            failed_in: s.failed_in,
            started_at: s.started_at,
            state: s.state,
            since: s.since,
            stage: s.stage,
            stage_started_at: s.stage_started_at,
            stage_requests: s.stage_requests,
            failed_at: s.failed_at,
            last_canary_traffic: s.last_canary_traffic,
            evaluated_at: s.evaluated_at,
            streaks: s
                .streaks
                .into_iter()
                .map(|(group, feature, test, n)| ((group, feature, test), n))
                .collect::<HashMap<_, _>>(),
            checks: s.checks,
            gates: s.gates,
            score: s.score,
            canary_history: History::new(keep),
            stable_history: History::new(keep),
            // The same tests go on: a new one would spend the false-failure budget again.
            sequential: super::sequential::Sequential::restored(&s.sequential),
            canary_requests: s.canary_requests,
            stable_requests: s.stable_requests,
            power_hints: Default::default(),
            stable_dispersion: Default::default(),
        }
    }
}

impl Judge {
    /// The analyses started, looked at or ended since the last call.
    pub fn take_changes(&mut self) -> JudgeChanges {
        let mut analyses: Vec<AnalysisSnapshot> = self
            .changed
            .drain()
            .filter_map(|key| {
                let analysis = self.analyses.get(&key)?;
                Some(analysis.snapshot(self.retired.get(&key)))
            })
            .collect();
        analyses.sort_by(|a, b| (&a.env, &a.app).cmp(&(&b.env, &b.app)));
        JudgeChanges {
            analyses,
            ended: std::mem::take(&mut self.ended),
        }
    }

    /// The changes of the analysis of `key` alone (started, looked at or ended since the last
    /// call), taken as `take_changes` would take them; the others' stay for it.
    pub fn take_changes_of(&mut self, key: &(Arc<str>, Arc<str>)) -> JudgeChanges {
        let analyses = match self.changed.remove(key) {
            true => self
                .analyses
                .get(key)
                .map(|analysis| analysis.snapshot(self.retired.get(key)))
                .into_iter()
                .collect(),
            false => Vec::new(),
        };
        let (ended, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.ended)
            .into_iter()
            .partition(|(env, app)| **env == *key.0 && **app == *key.1);
        self.ended = others;
        JudgeChanges { analyses, ended }
    }

    /// Takes an app's analysis out of memory, to be archived with the app: its record stays.
    pub(crate) fn take_out(&mut self, key: &(Arc<str>, Arc<str>)) -> Option<AnalysisSnapshot> {
        self.changed.remove(key);
        let retired = self.retired.remove(key);
        let analysis = self.analyses.remove(key)?;
        Some(analysis.snapshot(retired.as_ref()))
    }

    /// Puts back analyses as the store kept them, each under the model it was started with.
    pub fn restore(&mut self, snapshots: Vec<AnalysisSnapshot>) {
        for snapshot in snapshots {
            let key: (Arc<str>, Arc<str>) =
                (Arc::from(snapshot.env.as_str()), Arc::from(snapshot.app.as_str()));
            if let Some(retired) = &snapshot.retired {
                self.retired.insert(key.clone(), Arc::from(retired.as_str()));
            }
            self.analyses.insert(key, Analysis::restored(snapshot));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::model::{Checks, Decision, ErrorRatioCheck, Mode};
    use crate::window::Aggregate;

    fn model(name: &str, mode: Mode) -> Model {
        Model {
            name: name.to_owned(),
            description: String::new(),
            mode,
            decision: Decision::default(),
            checks: Checks {
                error_ratio: Some(ErrorRatioCheck::default()),
                ..Checks::default()
            },
            stages: vec![],
            promotion: vec![],
            traffic: Default::default(),
        }
    }

    #[test]
    fn a_restored_judge_has_the_same_analysis_under_the_same_model() {
        let mut judge = Judge::new(&[model("careful", Mode::Shadow)]);
        let key = (Arc::from("prod"), Arc::from("shop"));
        judge
            .start(key.clone(), Arc::from("v1"), Arc::from("v2"), "careful", true, 5)
            .expect("starts");
        let analysis = judge.analysis_mut(&key).expect("analysis");
        let mut bucket = Aggregate::default();
        bucket.all.add(3_000_000, true);
        analysis.push("v2", 10, &bucket);
        analysis.streaks.insert(
            (
                Group::Errors,
                Feature {
                    name: "error_ratio".to_owned(),
                    subject: None,
                },
                Test::FisherExact,
            ),
            2,
        );
        let changes = judge.take_changes();
        assert_eq!(changes.analyses.len(), 1);
        assert!(judge.take_changes().analyses.is_empty(), "nothing changed since");

        // A judge whose models no longer include the rollout's still runs it under that model.
        let mut restarted = Judge::new(&[model("default", Mode::Enforce)]);
        restarted.restore(changes.analyses.clone());
        let before = judge.analysis("prod", "shop").expect("before").view();
        let after = restarted.analysis("prod", "shop").expect("after").view();
        assert_eq!(after, before);
        assert_eq!(after.mode, Mode::Shadow);
        assert_eq!(after.canary_requests, 1);
        assert!(
            !restarted.wants_canary(&key, &Arc::from("v1")),
            "the retired stable is kept"
        );
        let again = restarted
            .analysis_mut(&key)
            .expect("analysis")
            .snapshot(Some(&Arc::from("v1")));
        assert_eq!(
            again, changes.analyses[0],
            "a snapshot of the restored analysis is the same"
        );
    }

    #[test]
    fn an_ended_analysis_is_reported_for_deletion() {
        let mut judge = Judge::new(&[model("default", Mode::Enforce)]);
        let key = (Arc::from("prod"), Arc::from("shop"));
        judge
            .start(key.clone(), Arc::from("v1"), Arc::from("v2"), "default", true, 5)
            .expect("starts");
        judge.end(&key).expect("ends");
        let changes = judge.take_changes();
        assert!(changes.analyses.is_empty());
        assert_eq!(changes.ended, vec![("prod".to_owned(), "shop".to_owned())]);
    }
}
