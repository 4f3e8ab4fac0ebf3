//! The engine as the daemon drives it: one owner, fed batch by batch.
//!
//! `Engine::ingest` catalogs each resource's observations (caps applied), drops them into their
//! version's event-time buckets, advances the app's clock, and for every window that closes
//! computes its features and lets the baselines score and learn them: each version's own, and the
//! app's, which learns from the stable version only. The stable version is the one that has carried
//! most of the app's requests recently (decayed request counts, half-life `STABLE_HALF_LIFE`).
//!
//! Baselines changed since the last `take_dirty` are handed to the daemon for persistence; the
//! seasonal slots they page in and out go through the `SlotStore` given at construction.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::anomaly::{AnomalyRules, Transition};
use crate::baseline::{Baseline, BaselineConfig, JudgedBand, Score, SlotStore, SlotSummary, hour_of_week};
use crate::catalog::{AppEntry, Cap, Catalog, Limits, NameKeys};
use crate::features::{FeatureKey, FeatureValue, window_features};
use crate::judge::{
    AnalysisSnapshot, AnalysisView, CanaryChange, ChangeKind, DEFAULT_MODEL, Judge, JudgeChanges, JudgeError,
    Model, Operation, Verdict,
};
use crate::observation::EventTime;
use crate::resource::{Batch, ResourceObservations};
#[cfg(test)]
use crate::summary::Summary;
use crate::summary::{LatestTwo, TraceCohorts};
use crate::vec_map::VecMap;
use crate::window::{Aggregate, AppClock, ClosedWindow, SourceClocks, VersionWindows, WindowConfig};

/// The catalog's key of each name a summary's aggregates carry, found once a distinct name.
struct CatalogKeys<'o, 'c> {
    entry: &'c AppEntry,
    operations: NameKeys<'o, 'c>,
    cohorts: NameKeys<'o, 'c>,
    downstreams: NameKeys<'o, 'c>,
    exception_types: NameKeys<'o, 'c>,
}

impl<'o, 'c> CatalogKeys<'o, 'c> {
    /// Adds `part` (a summary's bucket, or a cohort's share of it) to `into`, each name through
    /// the catalog's cap as the observations' own would go. A summary holds no metric series.
    fn merge(&mut self, into: &mut Aggregate, part: &'o Aggregate) {
        let entry = self.entry;
        into.all.merge(&part.all);
        // Both sides are sorted by name, and a name's key is mostly the name: each is looked for
        // first just past where the one before it was found.
        let mut at = 0;
        for (name, op) in part.operations.iter() {
            let key = self.operations.key(name, |n| entry.operation_key(n));
            into.operations.get_or_default_at(key, &mut at).merge(op);
            at += 1;
        }
        at = 0;
        for (name, &(calls, failed)) in part.calls.iter() {
            let key = self.downstreams.key(name, |n| entry.downstream_key(n));
            let count = into.calls.get_or_default_at(key, &mut at);
            count.0 += calls;
            count.1 += failed;
            at += 1;
        }
        at = 0;
        for (name, n) in part.exceptions.iter() {
            let key = self.exception_types.key(name, |n| entry.exception_type_key(n));
            *into.exceptions.get_or_default_at(key, &mut at) += n;
            at += 1;
        }
        at = 0;
        for (name, cohort) in part.cohorts.iter() {
            let key = self.cohorts.key(name, |n| entry.cohort_key(n));
            self.merge(into.cohorts.get_or_default_at(key, &mut at), cohort);
            at += 1;
        }
        into.logs += part.logs;
        into.error_logs += part.error_logs;
    }
}

/// The aggregate of cohort `key` (already through the catalog's cap), the key copied only the
/// first time a bucket sees it.
fn cohort_of<'m>(cohorts: &'m mut VecMap<Arc<str>, Aggregate>, key: &Arc<str>) -> &'m mut Aggregate {
    cohorts.get_or_default(key)
}

/// One call to `downstream`, and whether it failed.
fn count_call(calls: &mut VecMap<Arc<str>, (u64, u64)>, downstream: &Arc<str>, error: bool) {
    let entry = calls.get_or_default(downstream);
    entry.0 += 1;
    entry.1 += u64::from(error);
}

/// Windows over which a version's share of requests halves in weight, for choosing the stable one.
const STABLE_HALF_LIFE_WINDOWS: f64 = 10.0;

/// Everything the engine is told at start.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineConfig {
    pub limits: Limits,
    pub windows: WindowConfig,
    pub baseline: BaselineConfig,
    pub anomaly: AnomalyRules,
    /// The analysis models, by name; inferred canaries use `DEFAULT_MODEL`.
    pub models: Vec<Model>,
}

/// Which baselines: an app's own (learned from its stable version), or one version's.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    App,
    Version(String),
}

/// Names one baseline among all of them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BaselineId {
    pub env: String,
    pub app: String,
    pub scope: Scope,
    pub key: FeatureKey,
}

impl BaselineId {
    /// A stable text name, the key of the baseline's seasonal slots in a `SlotStore` (the store
    /// persists it: changing it needs a store migration). It starts with `series_prefix` of its
    /// env, app and scope, then the feature key.
    pub fn series_name(&self) -> String {
        let mut name = BaselineId::series_prefix(&self.env, &self.app, &self.scope);
        name.push_str(&self.key.to_string());
        name
    }

    /// The start of the series name of every baseline of one scope. Each part is preceded by its
    /// length in bytes and the scope by a tag (`A` for the app, `V` for a version), so no name of
    /// another env, app or scope starts with it, whatever the names hold: a version `*` is not
    /// the app, and version `1.2` is not a prefix of `1.20`.
    pub fn series_prefix(env: &str, app: &str, scope: &Scope) -> String {
        let scope = match scope {
            Scope::App => "A".to_owned(),
            Scope::Version(v) => format!("V{}:{v}", v.len()),
        };
        format!("{}:{env}{}:{app}{scope}/", env.len(), app.len())
    }

    /// The `series_prefix` a series name starts with: its scope's, read back by the lengths it
    /// holds. `None` for a name no `series_name` made.
    pub fn prefix_of_series(series: &str) -> Option<&str> {
        /// The length of `{n}:` followed by n bytes at the start of `rest`.
        fn counted(rest: &str) -> Option<usize> {
            let (n, _) = rest.split_once(':')?;
            let len = n.parse::<usize>().ok()?.checked_add(n.len() + 1)?;
            rest.is_char_boundary(len).then_some(len)
        }
        let mut at = counted(series)?;
        at += counted(series.get(at..)?)?;
        at += match series.as_bytes().get(at)? {
            b'A' => 1,
            b'V' => 1 + counted(series.get(at + 1..)?)?,
            _ => return None,
        };
        (series.as_bytes().get(at) == Some(&b'/')).then(|| &series[..=at])
    }
}

/// The engine's durable state, or the part of it that changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineState {
    pub clocks: Vec<(String, String, AppClock)>,
    pub apps: Vec<(String, String, AppEntry)>,
    pub baselines: Vec<(BaselineId, Baseline)>,
    /// (env, app, version) whose baselines are to be deleted.
    pub forgotten_versions: Vec<(String, String, String)>,
    /// Canary analyses: those that changed, and those ended.
    pub judge: JudgeChanges,
}

/// Everything durable about one app, as it leaves memory for the archive or comes back from it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ArchivedApp {
    pub clock: AppClock,
    pub entry: AppEntry,
    /// The app's and its versions' baselines.
    pub baselines: Vec<(BaselineId, Baseline)>,
    pub analysis: Option<AnalysisSnapshot>,
}

/// Where apps evicted from memory are kept (the store, in the daemon), to be brought back when
/// they are seen again. Without one, an evicted app's state is written at the next
/// `take_changes` and a returning app starts afresh.
pub trait AppArchive: Send {
    fn load_app(&mut self, env: &str, app: &str) -> Option<ArchivedApp>;
}

/// A version's feature left, or came back to, its own baseline.
#[derive(Clone, Debug, PartialEq)]
pub struct AnomalyChange {
    pub id: BaselineId,
    pub transition: Transition,
    /// The window's value, and what the baseline expected (its EWMA level before the window).
    pub value: f64,
    pub expected: f64,
    /// The band that judged the value (the one it lay farthest outside), when the baseline was
    /// old enough to score.
    pub band: Option<JudgedBand>,
    pub score: f64,
    pub support: u64,
    /// End of the deciding window: the event time of the evidence.
    pub time: EventTime,
}

/// What ingesting one batch ran into.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IngestReport {
    /// Observations dropped or folded, per cap.
    pub cap_hits: Vec<(Cap, u64)>,
    /// Observations that arrived after their bucket had closed.
    pub late: u64,
    /// Windows closed, over all versions.
    pub windows_closed: u64,
    /// Observations refused for being dated more than the allowed skew ahead of both their app's
    /// event time and the receive clock.
    pub future: u64,
    /// Idle apps moved to the archive to make room for new ones, and apps brought back from it.
    pub apps_archived: u64,
    pub apps_restored: u64,
    /// Anomalies detected and resolved, in event-time order.
    pub anomalies: Vec<AnomalyChange>,
    /// Canary analyses started, stages passed, canaries failed and promoted, in event-time order.
    pub canary: Vec<CanaryChange>,
}

#[derive(Debug, Default)]
struct VersionState {
    windows: VersionWindows,
    baselines: VecMap<FeatureKey, Baseline>,
    late: u64,
}

#[derive(Debug, Default)]
struct AppState {
    clock: AppClock,
    /// Where each of the app's sources has come to: buckets close once all active ones pass them.
    sources: SourceClocks,
    versions: crate::FastMap<Arc<str>, VersionState>,
    baselines: VecMap<FeatureKey, Baseline>,
    /// Decayed request counts per version.
    traffic: HashMap<Arc<str>, f64>,
    stable: Option<Arc<str>>,
    late: u64,
    /// Windows that started before this instant were partly missed (the process was not running).
    complete_from: EventTime,
    /// Windows closed and not yet learned from, in time order (`Engine::defer_learning`).
    unlearned: Vec<(Arc<str>, ClosedWindow)>,
}

impl AppState {
    /// Gives back the room its baseline maps keep for more entries: for after they were filled
    /// from the store.
    fn shrink_baselines(&mut self) {
        self.baselines.shrink_to_fit();
        for version in self.versions.values_mut() {
            version.baselines.shrink_to_fit();
        }
    }

    /// The bytes the app's baselines, its versions' included, take in memory.
    fn baseline_bytes(&self) -> usize {
        // Each baseline, its key and the maps' unused room.
        let entry = std::mem::size_of::<(FeatureKey, Baseline)>() - std::mem::size_of::<Baseline>();
        let spare = |map: &VecMap<FeatureKey, Baseline>| {
            (map.capacity() - map.len()) * std::mem::size_of::<(FeatureKey, Baseline)>()
        };
        self.baselines
            .iter()
            .chain(self.versions.values().flat_map(|v| v.baselines.iter()))
            .map(|(key, baseline)| entry + key.subject.capacity() + baseline.memory_bytes())
            .sum::<usize>()
            + spare(&self.baselines)
            + self.versions.values().map(|v| spare(&v.baselines)).sum::<usize>()
    }
}

/// About the memory the engine's state holds, by structure (`Engine::memory`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineMemory {
    /// How many baselines are held.
    pub baseline_series: usize,
    /// The learned baselines: EWMAs and the current seasonal slot's sketches.
    pub baselines: usize,
    /// The open event-time buckets, the windows being rolled up per version, and the closed
    /// windows waiting to be learned from.
    pub buckets: usize,
    /// The analyses' recent history of the canary and the stable, second by second and in blocks.
    pub analyses: usize,
    /// The merges of those blocks that the analyses' long windows keep for their next look.
    pub analysis_merges: usize,
    /// The analyses' sequential evidence, last look's checks and failing streaks.
    pub analysis_evidence: usize,
}

/// What `Engine::page_out` moved out of memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageOut {
    pub apps: usize,
    /// The baselines' bytes before and after.
    pub bytes_before: usize,
    pub bytes_after: usize,
}

/// A read-only view of one scope's baselines.
pub struct BaselinesView<'a> {
    pub clock: AppClock,
    pub stable_version: Option<&'a str>,
    pub late: u64,
    pub baselines: &'a VecMap<FeatureKey, Baseline>,
}

/// A declared rollout, as `Engine::declare_rollout` takes it.
#[derive(Clone, Copy, Debug)]
pub struct Declaration<'a> {
    pub stable: &'a str,
    pub canary: &'a str,
    /// The model's name; `default` when none.
    pub model: Option<&'a str>,
    /// Whether it may replace an analysis of other versions still under way.
    pub replace: bool,
    /// The declaration's own traffic plan, laid over the model's.
    pub traffic: Option<&'a crate::judge::TrafficRequest>,
}

pub struct Engine {
    config: EngineConfig,
    catalog: Catalog,
    apps: crate::FastMap<(Arc<str>, Arc<str>), AppState>,
    slots: Box<dyn SlotStore + Send>,
    judge: Judge,
    /// Baselines changed since the last take, in order, so that a take's parts each write one
    /// stretch of the store's keys (written in no order, a flush took the store's writer half as
    /// long again and left a third more on disk).
    dirty: BTreeSet<BaselineId>,
    /// Versions forgotten since the last `take_changes`.
    forgotten: Vec<(String, String, String)>,
    archive: Option<Box<dyn AppArchive>>,
    /// Apps archived whose state is not yet written (until `changes_written`), each with the
    /// number of `take_changes` before it was archived.
    archiving: crate::FastMap<(Arc<str>, Arc<str>), (ArchivedApp, u64)>,
    /// How many times `take_changes` has been called.
    taken: u64,
    /// Baselines changed before the take under way began, not yet handed over (`take_part`,
    /// from the first).
    taking: BTreeSet<BaselineId>,
    /// Whether an app that no analysis can judge soon learns its closed windows later
    /// (`learn_deferred`) rather than while its batch is applied.
    defer_learning: bool,
    /// Apps with windows not yet learned from, in the order their first one closed; an app may
    /// also be here after it was learned on its own (it is skipped then).
    unlearned_apps: VecDeque<(Arc<str>, Arc<str>)>,
    /// Windows not yet learned from, over all apps.
    unlearned_windows: usize,
    /// Anomalies found by learning that no report has carried yet: the next `ingest` or
    /// `learn_deferred` reports them.
    unreported: Vec<AnomalyChange>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .field("apps", &self.apps.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    pub fn new(config: EngineConfig, slots: Box<dyn SlotStore + Send>) -> Self {
        Engine {
            catalog: Catalog::new(config.limits.clone()),
            judge: Judge::new(&config.models),
            config,
            apps: crate::FastMap::default(),
            slots,
            dirty: BTreeSet::new(),
            forgotten: Vec::new(),
            archive: None,
            archiving: crate::FastMap::default(),
            taken: 0,
            taking: BTreeSet::new(),
            defer_learning: false,
            unlearned_apps: VecDeque::new(),
            unlearned_windows: 0,
            unreported: Vec::new(),
        }
    }

    /// Lets an app that no analysis can judge soon (one version, none analysed) learn its closed
    /// windows later, through `learn_deferred`, instead of while the batch that closed them is
    /// applied. Learning is most of the engine's work when many apps' windows close together
    /// (each minute, and each hour's turn with its seasonal slots), and none of it decides a
    /// canary: deferred, it waits for the engine's idle moments, not the batches behind it.
    ///
    /// Each app still learns its windows in their order and before anything reads or judges
    /// it (a second version, a declared rollout, its archiving, `learn_all_deferred` before a
    /// read of its baselines), so what is learned is what it would have been.
    pub fn defer_learning(&mut self, defer: bool) {
        self.defer_learning = defer;
    }

    /// Whether windows wait to be learned from, or anomalies to be reported.
    pub fn has_deferred(&self) -> bool {
        // The queue, not the count: `learn_deferred` empties it even of apps gone since.
        !self.unlearned_apps.is_empty() || !self.unreported.is_empty()
    }

    /// Windows closed and not yet learned from.
    pub fn unlearned_windows(&self) -> usize {
        self.unlearned_windows
    }

    /// Learns the windows of the app that has waited longest: one app at a time, so that an input
    /// waits at most that long. Reports the anomalies found, and any found earlier.
    pub fn learn_deferred(&mut self) -> IngestReport {
        let mut report = IngestReport::default();
        while let Some(key) = self.unlearned_apps.pop_front() {
            if self.learn_unlearned(&key, &mut report.anomalies) {
                break;
            }
        }
        report.anomalies.append(&mut self.unreported);
        report
    }

    /// Learns every window waiting (before the state is read whole, or written at shutdown).
    pub fn learn_all_deferred(&mut self) -> IngestReport {
        let mut report = IngestReport::default();
        while let Some(key) = self.unlearned_apps.pop_front() {
            self.learn_unlearned(&key, &mut report.anomalies);
        }
        report.anomalies.append(&mut self.unreported);
        report
    }

    /// Learns the windows waiting of one app (before that app's learned state is read alone):
    /// the other apps' stay waiting. Reports the anomalies found, and any found earlier.
    pub fn learn_deferred_of(&mut self, env: &str, app: &str) -> IngestReport {
        let mut report = IngestReport::default();
        let key: (Arc<str>, Arc<str>) = (env.into(), app.into());
        // The app stays in the queue: learning it there finds nothing waiting.
        self.learn_unlearned(&key, &mut report.anomalies);
        report.anomalies.append(&mut self.unreported);
        report
    }

    /// Learns the app's windows waiting, if any; returns whether there were.
    fn learn_unlearned(&mut self, key: &(Arc<str>, Arc<str>), anomalies: &mut Vec<AnomalyChange>) -> bool {
        let Some(app) = self.apps.get_mut(key) else {
            return false;
        };
        if app.unlearned.is_empty() {
            return false;
        }
        let closed = std::mem::take(&mut app.unlearned);
        self.unlearned_windows -= closed.len();
        self.learn_windows(key, closed, anomalies);
        true
    }

    /// Learns what waits for the app before it is read, judged or moved; anomalies found go out
    /// with the next report.
    fn catch_up(&mut self, key: &(Arc<str>, Arc<str>)) {
        let mut anomalies = std::mem::take(&mut self.unreported);
        self.learn_unlearned(key, &mut anomalies);
        self.unreported = anomalies;
    }

    /// Where evicted apps are read back from.
    pub fn set_archive(&mut self, archive: Box<dyn AppArchive>) {
        self.archive = Some(archive);
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Apps known only by what they learned (an import of their history): baselines in memory,
    /// never seen in traffic, so absent from the catalog. Sorted by (env, app).
    pub fn learned_only_apps(&self) -> Vec<(&str, &str)> {
        let mut apps: Vec<(&str, &str)> = self
            .apps
            .iter()
            .filter(|(_, state)| {
                !state.baselines.is_empty() || state.versions.values().any(|v| !v.baselines.is_empty())
            })
            .map(|((env, app), _)| (&**env, &**app))
            .filter(|(env, app)| self.catalog.app(env, app).is_none())
            .collect();
        apps.sort_unstable();
        apps
    }

    pub fn ingest(&mut self, batch: &Batch) -> IngestReport {
        let mut report = IngestReport::default();
        let mut hits: BTreeMap<Cap, u64> = BTreeMap::new();
        for resource in &batch.resources {
            // Nearly always nothing is dated too far ahead, and the resource is used as it came.
            let limit = self.future_limit(&resource.identity, batch.received);
            let trimmed;
            let resource = match resource.seen {
                Some((_, latest)) if latest > limit => {
                    let mut kept = resource.clone();
                    report.future += kept.drop_after(limit);
                    trimmed = kept;
                    &trimmed
                }
                _ => resource,
            };
            self.make_room(resource, &mut report);
            let (resource_hits, admission) = self.catalog.admit(resource);
            for (cap, n) in resource_hits {
                *hits.entry(cap).or_default() += n;
            }
            if let Some(admission) = admission {
                if let Some(evicted) = &admission.evicted {
                    self.forget_version(&resource.identity.env, &resource.identity.app, evicted);
                }
                self.window_resource(resource, &admission.version, &admission.samples, &mut report);
            }
        }
        report.cap_hits = hits.into_iter().collect();
        report.anomalies.append(&mut self.unreported);
        report
    }

    /// Before an app not in memory is admitted: an idle app gives up its place if the cap is full,
    /// and the app comes back from the archive if it was there.
    fn make_room(&mut self, resource: &ResourceObservations, report: &mut IngestReport) {
        let id = &resource.identity;
        let Some((_, latest)) = resource.seen else { return };
        if self.catalog.app(&id.env, &id.app).is_some() || self.catalog.over_env_share(&id.app) {
            return;
        }
        if self.catalog.is_full() {
            match self.catalog.idle_app(latest) {
                Some(idle) => {
                    self.archive_app(&idle);
                    report.apps_archived += 1;
                }
                None => return,
            }
        }
        if self.recall((id.env.clone(), id.app.clone())) {
            report.apps_restored += 1;
        }
    }

    /// Brings the app back from the archive, if it is there; returns whether it was.
    fn recall(&mut self, key: (Arc<str>, Arc<str>)) -> bool {
        let archived = match self.archiving.remove(&key) {
            Some((app, _)) => Some(app),
            None => self.archive.as_mut().and_then(|a| a.load_app(&key.0, &key.1)),
        };
        match archived {
            Some(app) => {
                self.bring_back(key, app);
                true
            }
            None => false,
        }
    }

    /// Moves an app's durable state out of memory, to be written at the next `take_changes`.
    fn archive_app(&mut self, key: &(Arc<str>, Arc<str>)) {
        self.catch_up(key);
        let Some(entry) = self.catalog.remove(&key.0, &key.1) else {
            return;
        };
        let state = self.apps.remove(key).unwrap_or_default();
        let mut baselines = Vec::new();
        let id = |scope: Scope, feature: &FeatureKey| BaselineId {
            env: key.0.to_string(),
            app: key.1.to_string(),
            scope,
            key: feature.clone(),
        };
        for (feature, baseline) in state.baselines {
            baselines.push((id(Scope::App, &feature), baseline));
        }
        for (version, v) in state.versions {
            for (feature, baseline) in v.baselines {
                baselines.push((id(Scope::Version(version.to_string()), &feature), baseline));
            }
        }
        for (id, _) in &baselines {
            self.dirty.remove(id);
        }
        let archived = ArchivedApp {
            clock: state.clock,
            entry,
            baselines,
            analysis: self.judge.take_out(key),
        };
        self.archiving.insert(key.clone(), (archived, self.taken));
    }

    /// Puts an archived app back in memory, as a restart would.
    fn bring_back(&mut self, key: (Arc<str>, Arc<str>), app: ArchivedApp) {
        self.catalog.restore(&key.0, &key.1, app.entry);
        let state = self.apps.entry(key).or_default();
        state.clock = app.clock;
        state.complete_from = app.clock.max_time;
        for (id, baseline) in app.baselines {
            let map = match id.scope {
                Scope::App => &mut state.baselines,
                Scope::Version(v) => &mut state.versions.entry(Arc::from(v)).or_default().baselines,
            };
            map.insert(id.key, baseline);
        }
        state.shrink_baselines();
        if let Some(analysis) = app.analysis {
            self.judge.restore(vec![analysis]);
        }
    }

    /// The latest event time an observation of `identity`'s app may carry: the skew beyond both
    /// the app's event time and the receive clock (when there is one); no limit for an app with
    /// no clock in a replay.
    fn future_limit(&self, identity: &crate::observation::Identity, received: EventTime) -> EventTime {
        let app_time = self
            .apps
            .get(&(identity.env.clone(), identity.app.clone()))
            .map_or(0, |a| a.clock.max_time);
        let now = app_time.max(received);
        if now == 0 {
            return EventTime::MAX;
        }
        now.saturating_add(self.config.windows.future_skew_ns)
    }

    fn window_resource(
        &mut self,
        obs: &ResourceObservations,
        version: &Arc<str>,
        samples: &[(crate::observation::SeriesKey, crate::delta::Sample)],
        report: &mut IngestReport,
    ) {
        let Some((_, last)) = obs.seen else { return };
        let id = &obs.identity;
        let key = (id.env.clone(), id.app.clone());
        let Some(entry) = self.catalog.app(&id.env, &id.app) else {
            return;
        };
        let config = &self.config.windows;
        let app = self.apps.entry(key.clone()).or_default();
        let closed_until = app.clock.closed_until;
        let state = app.versions.entry(version.clone()).or_default();
        let mut late = 0;
        let mut top = LatestTwo::default();
        // The buckets share the catalog's copy of each name, found once a distinct name.
        let (mut operations, mut cohorts) = (NameKeys::new(), NameKeys::new());
        let (mut downstreams, mut exception_types) = (NameKeys::new(), NameKeys::new());
        if let Some(summary) = &obs.summary {
            // Summed where the request was read (at this bucket width, `WindowConfig::bucket_ns`,
            // which the receivers are given): a few merges a bucket, the same as adding each.
            top.join(summary.latest);
            let mut keys = CatalogKeys {
                entry,
                operations: NameKeys::new(),
                cohorts: NameKeys::new(),
                downstreams: NameKeys::new(),
                exception_types: NameKeys::new(),
            };
            for bucket in &summary.buckets {
                // Closed buckets end on a bucket's bound, so that a bucket is late whole or not.
                match state.windows.bucket(bucket.start, closed_until, config) {
                    Some(b) => keys.merge(b, &bucket.aggregate),
                    None => late += bucket.items,
                }
            }
        }
        for r in &obs.requests {
            top.saw(r.time);
            match state.windows.bucket(r.time, closed_until, config) {
                Some(b) => {
                    b.all.add(r.duration_ns, r.error);
                    let (op, place) =
                        operations.key_and_place(&r.operation, |name| entry.operation_key(name));
                    b.operations
                        .get_or_default_at(op, place)
                        .add(r.duration_ns, r.error);
                    if let Some(cohort) = &r.cohort {
                        let key = cohorts.key(cohort, |name| entry.cohort_key(name));
                        let cohort = cohort_of(&mut b.cohorts, key);
                        cohort.all.add(r.duration_ns, r.error);
                        cohort.operations.get_or_default(op).count(r.error);
                    }
                }
                None => late += 1,
            }
        }
        let trace_cohorts = TraceCohorts::of(&obs.requests);
        for c in &obs.calls {
            top.saw(c.time);
            match state.windows.bucket(c.time, closed_until, config) {
                Some(b) => {
                    let (downstream, place) =
                        downstreams.key_and_place(&c.downstream, |name| entry.downstream_key(name));
                    let count = b.calls.get_or_default_at(downstream, place);
                    count.0 += 1;
                    count.1 += u64::from(c.error);
                    if let Some(cohort) = trace_cohorts.cohort(c.cohort.as_ref(), &c.trace_id) {
                        let cohort = cohort_of(&mut b.cohorts, entry.cohort_key(cohort));
                        count_call(&mut cohort.calls, downstream, c.error);
                    }
                }
                None => late += 1,
            }
        }
        for e in &obs.exceptions {
            top.saw(e.time);
            match state.windows.bucket(e.time, closed_until, config) {
                Some(b) => {
                    let ty = exception_types.key(&e.exception_type, |name| entry.exception_type_key(name));
                    *b.exceptions.get_or_default(ty) += 1;
                    if let Some(cohort) = trace_cohorts.cohort(e.cohort.as_ref(), &e.trace_id) {
                        let cohort = cohort_of(&mut b.cohorts, entry.cohort_key(cohort));
                        *cohort.exceptions.get_or_default(ty) += 1;
                    }
                }
                None => late += 1,
            }
        }
        for l in &obs.logs {
            top.saw(l.time);
            match state.windows.bucket(l.time, closed_until, config) {
                Some(b) => {
                    b.logs += 1;
                    b.error_logs += u64::from(l.severity.is_error());
                }
                None => late += 1,
            }
        }
        for (series, sample) in samples {
            let time = match sample {
                crate::delta::Sample::Level { time, .. } => *time,
                crate::delta::Sample::Increment { end, .. }
                | crate::delta::Sample::Histogram { end, .. }
                | crate::delta::Sample::ExponentialHistogram { end, .. } => *end,
            };
            top.saw(time);
            match state.windows.bucket(time, closed_until, config) {
                Some(b) => b.metrics.entry(series.clone()).or_default().add(sample),
                None => late += 1,
            }
        }
        state.late += late;
        app.late += late;
        report.late += late;

        // Two observations of the resource vouch for the second latest time; internal spans are
        // not windowed, but when there were several, the earliest time seen is vouched for too.
        let (first, _) = obs.seen.unwrap_or((last, last));
        let second = match top.second {
            Some(t) => Some(t.max(first).min(last)),
            None => (obs.spans > 1).then_some(first),
        };
        app.clock.saw_resource(last, second);
        app.sources.saw(&(version.clone(), obs.instance.clone()), last);
        let reach = app.sources.reach(app.clock.max_time, config);
        let until = app.clock.close_to(reach, config);
        if until > closed_until {
            report.windows_closed += self.close_windows(&key, until, report);
        }
    }

    /// Closes what the app's clock allows, in every version, and learns from the closed windows
    /// (or leaves that for later: `defer_learning`).
    fn close_windows(
        &mut self,
        key: &(Arc<str>, Arc<str>),
        until: EventTime,
        report: &mut IngestReport,
    ) -> u64 {
        let Some(app) = self.apps.get(key) else {
            return 0;
        };
        // A second version may become a canary here, judged against the stable version that
        // learning picks, and an analysis looks at the app's baselines: both need what is learned.
        let judged_soon =
            app.versions.len() > 1 || self.judge.analysis(&key.0, &key.1).is_some_and(|a| !a.is_final());
        let learn_now = !self.defer_learning || judged_soon;
        if learn_now {
            self.learn_unlearned(key, &mut report.anomalies);
        }
        let config = &self.config;
        let Some(app) = self.apps.get_mut(key) else {
            return 0;
        };
        let judged = judge_buckets(&mut self.judge, key, app, until, config, &mut report.canary);
        let complete_from = app.complete_from;
        let mut closed: Vec<(Arc<str>, ClosedWindow)> = Vec::new();
        for (version, state) in &mut app.versions {
            for window in state.windows.close(until, complete_from, &config.windows) {
                closed.push((version.clone(), window));
            }
        }
        // Windows in time order, versions in name order within a window: learning is deterministic.
        closed.sort_by(|a, b| (a.1.start, &a.0).cmp(&(b.1.start, &b.0)));
        let count = closed.len() as u64;
        if !learn_now {
            if !closed.is_empty() {
                if app.unlearned.is_empty() {
                    self.unlearned_apps.push_back(key.clone());
                }
                self.unlearned_windows += closed.len();
                app.unlearned.append(&mut closed);
            }
            return count;
        }
        self.learn_windows(key, closed, &mut report.anomalies);
        let config = &self.config;
        let Some(app) = self.apps.get_mut(key) else {
            return count;
        };
        if let Some(analysis) = self.judge.analysis_mut(key) {
            let window_s = config.windows.window_ns / 1_000_000_000;
            let mut i = 0;
            while i < judged.len() {
                let start = judged[i].0;
                while i < judged.len() && judged[i].0 == start {
                    analysis.push(&judged[i].1, start, &judged[i].2);
                    i += 1;
                }
                let now = start.saturating_add(config.windows.bucket_ns);
                analysis.look(
                    now,
                    &app.baselines,
                    &config.baseline,
                    window_s,
                    &mut report.canary,
                );
            }
            // Also when nothing came: silence is evidence too (a canary that stopped sending).
            analysis.look(
                until,
                &app.baselines,
                &config.baseline,
                window_s,
                &mut report.canary,
            );
        }
        count
    }

    /// Learns from the app's closed windows, given in time order.
    fn learn_windows(
        &mut self,
        key: &(Arc<str>, Arc<str>),
        closed: Vec<(Arc<str>, ClosedWindow)>,
        anomalies: &mut Vec<AnomalyChange>,
    ) {
        let config = &self.config;
        let Some(app) = self.apps.get_mut(key) else {
            return;
        };
        if let Some(last) = closed.last() {
            self.slots.time_reached(last.1.end);
        }
        let window_secs = config.windows.window_ns as f64 / 1e9;
        let decay = 0.5f64.powf(1.0 / STABLE_HALF_LIFE_WINDOWS);
        let mut i = 0;
        while i < closed.len() {
            let start = closed[i].1.start;
            let group_end = closed[i..]
                .iter()
                .position(|(_, w)| w.start != start)
                .map_or(closed.len(), |n| i + n);
            for traffic in app.traffic.values_mut() {
                *traffic *= decay;
            }
            for (version, window) in &closed[i..group_end] {
                *app.traffic.entry(version.clone()).or_default() += window.aggregate.all.requests as f64;
            }
            app.traffic.retain(|_, t| *t > 1e-3);
            app.stable = app
                .traffic
                .iter()
                .max_by(|a, b| a.1.total_cmp(b.1).then_with(|| b.0.cmp(a.0)))
                .map(|(v, _)| v.clone());
            // While a canary is analysed the app learns from the stable version it is judged against.
            let learns_from = match self.judge.analysis_mut(key) {
                Some(a) if !a.is_final() => Some(a.stable().clone()),
                _ => app.stable.clone(),
            };
            for (version, window) in &closed[i..group_end] {
                if !window.complete {
                    continue;
                }
                let Some(state) = app.versions.get_mut(version) else {
                    continue;
                };
                let known: BTreeSet<FeatureKey> = state.baselines.keys().cloned().collect();
                let features = window_features(&window.aggregate, window_secs, &known);
                let mut learner = Learner {
                    app: key,
                    time: window.end,
                    config,
                    slots: self.slots.as_mut(),
                    dirty: &mut self.dirty,
                    anomalies,
                };
                learner.learn(
                    &mut state.baselines,
                    &features,
                    Scope::Version(version.to_string()),
                );
                if learns_from.as_ref() == Some(version) {
                    let known: BTreeSet<FeatureKey> = app.baselines.keys().cloned().collect();
                    let features = window_features(&window.aggregate, window_secs, &known);
                    learner.learn(&mut app.baselines, &features, Scope::App);
                }
            }
            i = group_end;
        }
    }

    /// Drops a version the catalog evicted: its windows and baselines, here and (at the next
    /// flush) in the store, so that memory stays bounded across any number of deploys.
    fn forget_version(&mut self, env: &Arc<str>, app: &Arc<str>, version: &Arc<str>) {
        self.catch_up(&(env.clone(), app.clone()));
        if let Some(state) = self.apps.get_mut(&(env.clone(), app.clone())) {
            state.versions.remove(version);
            state.traffic.remove(version);
        }
        let scope = Scope::Version(version.to_string());
        self.slots
            .forget_scope(&BaselineId::series_prefix(env, app, &scope));
        let of_other =
            |id: &BaselineId| id.env.as_str() != &**env || id.app.as_str() != &**app || id.scope != scope;
        self.dirty.retain(of_other);
        self.taking.retain(of_other);
        self.forgotten
            .push((env.to_string(), app.to_string(), version.to_string()));
    }

    /// Learns one feature value from history, as if a window ending at `time` had yielded it (the
    /// `canaryd-lab import` path). Returns the value's score against what was learned before it.
    pub fn learn_value(&mut self, id: &BaselineId, value: f64, time: EventTime) -> Score {
        let key: (Arc<str>, Arc<str>) = (Arc::from(id.env.as_str()), Arc::from(id.app.as_str()));
        self.catch_up(&key);
        if !self.apps.contains_key(&key) {
            // An archived app learns on top of what it had, not from nothing.
            self.recall(key.clone());
        }
        let app = self.apps.entry(key).or_default();
        let baselines = match &id.scope {
            Scope::App => &mut app.baselines,
            Scope::Version(v) => &mut app.versions.entry(Arc::from(v.as_str())).or_default().baselines,
        };
        let baseline = baselines.get_or_default(&id.key);
        let score = baseline.observe(
            &id.series_name(),
            value,
            time,
            &self.config.baseline,
            self.slots.as_mut(),
        );
        self.dirty.insert(id.clone());
        score
    }

    /// The baselines of an app (`version` None) or of one of its versions.
    pub fn baselines(&self, env: &str, app: &str, version: Option<&str>) -> Option<BaselinesView<'_>> {
        let state = self.apps.get(&(Arc::from(env), Arc::from(app)))?;
        let (baselines, late) = match version {
            None => (&state.baselines, state.late),
            Some(v) => {
                let s = state.versions.get(v)?;
                (&s.baselines, s.late)
            }
        };
        Some(BaselinesView {
            clock: state.clock,
            stable_version: state.stable.as_deref(),
            late,
            baselines,
        })
    }

    /// What changed since the last call, for persistence: every clock, and the apps and baselines
    /// that changed, and every app archived whose state is not yet written (`changes_written`
    /// says it is). A baseline carries its current seasonal slot whole, so nothing goes to the
    /// slot store here: a slot is saved there only as its hour is left (`Baseline::observe`).
    /// Saving it there at each flush as well would write each series twice, the second time into
    /// the slot tree: with a day of slots, about 65 µs a series (`cargo bench -p canaryd-store
    /// --bench slots`), seconds a flush at 100k series.
    pub fn take_changes(&mut self) -> EngineState {
        let mut state = self.begin_changes();
        let ids = std::mem::take(&mut self.taking).into_iter().collect();
        let mut baselines = self.baselines_of(ids);
        baselines.append(&mut state.baselines);
        state.baselines = baselines;
        state
    }

    /// Begins a take of what changed, for a writer that takes it in parts so that no part holds
    /// the engine for long: the head now (every clock, the apps changed, the versions forgotten,
    /// the analyses, and the apps archived and not yet written, whole), and the baselines
    /// changed so far in parts by `take_part`. A baseline that changes again before its part is
    /// taken goes in its part as it is then, and in the next take too. What `take_changes`
    /// hands over, the head and every part together hand over, and `changes_written` counts
    /// this as a take.
    pub fn begin_changes(&mut self) -> EngineState {
        // The set moves whole, in order, and its parts leave it as they are taken: at 1M series
        // a pass over it here, to a vector or a sort, held the engine for tens of milliseconds.
        // What a take left untaken (none, the way the daemon takes) goes with this one.
        let mut untaken = std::mem::replace(&mut self.taking, std::mem::take(&mut self.dirty));
        self.taking.append(&mut untaken);
        let mut state = EngineState {
            clocks: self.clocks(),
            apps: self.catalog.take_changed(),
            baselines: Vec::new(),
            forgotten_versions: std::mem::take(&mut self.forgotten),
            judge: self.judge.take_changes(),
        };
        self.taken += 1;
        // Copied, not taken: an archived app leaves memory only once what carries it is written
        // (`changes_written`); a write that fails carries it again next time.
        for ((env, app), (archived, _)) in &self.archiving {
            let (env, app) = (env.to_string(), app.to_string());
            state.clocks.push((env.clone(), app.clone(), archived.clock));
            state.apps.push((env, app, archived.entry.clone()));
            for (id, baseline) in &archived.baselines {
                state.baselines.push((id.clone(), baseline.clone()));
            }
            state.judge.analyses.extend(archived.analysis.clone());
        }
        state
    }

    /// The next part of the take `begin_changes` began: at most `baselines` of the baselines
    /// changed before it, as they are now. `None` once all are handed over.
    pub fn take_part(&mut self, baselines: usize) -> Option<EngineState> {
        if self.taking.is_empty() {
            return None;
        }
        let mut ids = Vec::with_capacity(baselines.max(1).min(self.taking.len()));
        while ids.len() < baselines.max(1)
            && let Some(id) = self.taking.pop_first()
        {
            ids.push(id);
        }
        Some(EngineState {
            baselines: self.baselines_of(ids),
            ..EngineState::default()
        })
    }

    /// Baselines changed and not yet handed over by a take's parts.
    pub fn taking(&self) -> usize {
        self.taking.len()
    }

    /// What changed of the apps named (env, app) alone, as `take_changes` takes it: their clocks,
    /// catalog entries, baselines, versions forgotten and analyses. The other apps' changes stay
    /// for the next `take_changes`. This is what an event about these apps is written with, so
    /// that its write does not wait on every other series' changes (about 15 µs a baseline in
    /// sled: 1.5 s at 100k series, `cargo bench -p canaryd-store --bench flush`). Apps being
    /// archived are not in it (they decide nothing), and it does not count as a `take_changes`
    /// for `changes_written`.
    pub fn take_changes_of(&mut self, apps: &[(String, String)]) -> EngineState {
        let mut state = EngineState::default();
        if apps.is_empty() {
            return state;
        }
        let named = |env: &str, app: &str| apps.iter().any(|(e, a)| e == env && a == app);
        // One pass over the changed series, whatever the number of apps, and over those a take
        // under way has not handed over yet: the event's write carries them.
        let mut dirty = Vec::new();
        for changed in [&mut self.dirty, &mut self.taking] {
            changed.retain(|id| {
                let of_them = named(&id.env, &id.app);
                if of_them {
                    dirty.push(id.clone());
                }
                !of_them
            });
        }
        // A series changed again since its take began is in both.
        dirty.sort_unstable();
        dirty.dedup();
        state.baselines = self.baselines_of(dirty);
        let (forgotten, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.forgotten)
            .into_iter()
            .partition(|(env, app, _)| named(env, app));
        self.forgotten = others;
        state.forgotten_versions = forgotten;
        for (env, app) in apps {
            let key = (Arc::from(env.as_str()), Arc::from(app.as_str()));
            if let Some(app_state) = self.apps.get(&key) {
                state.clocks.push((env.clone(), app.clone(), app_state.clock));
            }
            state.apps.extend(self.catalog.take_changed_of(&key));
            let judged = self.judge.take_changes_of(&key);
            state.judge.analyses.extend(judged.analyses);
            state.judge.ended.extend(judged.ended);
        }
        state
    }

    /// The baselines named, those still held (a copy of each). Sorted by app and scope first, so
    /// that each app and version is looked up once, not once a series: at 100k series a lookup
    /// each (the names copied into the map's key type, then hashed) made a flush hold the
    /// engine's thread for about 250 ms.
    fn baselines_of(&self, mut ids: Vec<BaselineId>) -> Vec<(BaselineId, Baseline)> {
        ids.sort_unstable_by(|a, b| (&a.env, &a.app, &a.scope).cmp(&(&b.env, &b.app, &b.scope)));
        let mut baselines = Vec::with_capacity(ids.len());
        type Held<'a> = Option<&'a VecMap<FeatureKey, Baseline>>;
        let mut group: Option<(String, String, Scope, Held<'_>)> = None;
        for id in ids {
            let same = matches!(&group, Some((env, app, scope, _))
                if *env == id.env && *app == id.app && *scope == id.scope);
            if !same {
                let held = self
                    .apps
                    .get(&(Arc::from(id.env.as_str()), Arc::from(id.app.as_str())))
                    .and_then(|app| match &id.scope {
                        Scope::App => Some(&app.baselines),
                        Scope::Version(v) => app.versions.get(v.as_str()).map(|v| &v.baselines),
                    });
                group = Some((id.env.clone(), id.app.clone(), id.scope.clone(), held));
            }
            if let Some((_, _, _, Some(held))) = &group
                && let Some(baseline) = held.get(&id.key)
            {
                baselines.push((id, baseline.clone()));
            }
        }
        baselines
    }

    /// What the last `take_changes` handed over is durable: the apps it carried as archived
    /// leave memory for good (seen again, they come back from the archive). One archived since
    /// stays until a later `take_changes` carries it and that is written: the store may write in
    /// the background while the engine goes on.
    pub fn changes_written(&mut self) {
        let taken = self.taken;
        self.archiving.retain(|_, (_, archived_at)| *archived_at >= taken);
    }

    /// Every app's clock.
    pub fn clocks(&self) -> Vec<(String, String, AppClock)> {
        self.apps
            .iter()
            .map(|((env, app), s)| (env.to_string(), app.to_string(), s.clock))
            .collect()
    }

    /// Restores persisted state. Windows of an app that began before its restored clock are marked
    /// incomplete, since part of them was never seen.
    pub fn restore(&mut self, state: EngineState) {
        let EngineState {
            clocks,
            apps,
            baselines,
            forgotten_versions: _,
            judge,
        } = state;
        self.judge.restore(judge.analyses);
        for (env, app, entry) in apps {
            self.catalog.restore(&env, &app, entry);
        }
        for (env, app, clock) in clocks {
            let state = self.apps.entry((Arc::from(env), Arc::from(app))).or_default();
            state.clock = clock;
            state.complete_from = clock.max_time;
        }
        for (id, baseline) in baselines {
            let state = self
                .apps
                .entry((Arc::from(id.env.as_str()), Arc::from(id.app.as_str())))
                .or_default();
            let map = match id.scope {
                Scope::App => &mut state.baselines,
                Scope::Version(v) => &mut state.versions.entry(Arc::from(v)).or_default().baselines,
            };
            map.insert(id.key, baseline);
        }
        for state in self.apps.values_mut() {
            state.shrink_baselines();
        }
        // A store may hold more apps than the cap (those archived): the least recently seen stay
        // there, to come back when they are seen.
        for key in self.catalog.over_cap() {
            self.catalog.remove(&key.0, &key.1);
            self.apps.remove(&key);
            self.judge.take_out(&key);
        }
    }

    /// Repairs clocks that a point dated far ahead moved before such points were refused (an
    /// older canaryd persisted them): an app whose latest event time is beyond `now` plus the
    /// allowed skew goes back to the end of the last window it learned from, which honest data
    /// reached, and so do its versions' last-seen times. `now` is the daemon's clock at start.
    /// Returns the apps repaired, with the time they were at and the time they are back at.
    pub fn repair_future_clocks(
        &mut self,
        now: EventTime,
    ) -> Vec<(Arc<str>, Arc<str>, EventTime, EventTime)> {
        let limit = now.saturating_add(self.config.windows.future_skew_ns);
        let bucket = self.config.windows.bucket_ns.max(1);
        let mut repaired = Vec::new();
        for ((env, app), state) in &mut self.apps {
            let was = state.clock.latest();
            if was <= limit {
                continue;
            }
            let learned = state
                .baselines
                .values()
                .chain(state.versions.values().flat_map(|v| v.baselines.values()))
                .map(|b| b.last_window_end)
                .filter(|t| *t <= limit)
                .max()
                .unwrap_or(0);
            let back = learned - learned % bucket;
            state.clock = AppClock {
                max_time: back,
                closed_until: back,
                lead: back,
            };
            state.complete_from = back;
            self.catalog.clamp_last_seen(env, app, back);
            repaired.push((env.clone(), app.clone(), was, back));
        }
        repaired
    }

    pub fn judge(&self) -> &Judge {
        &self.judge
    }

    /// The app's current (or last) canary analysis.
    pub fn analysis(&self, env: &str, app: &str) -> Option<AnalysisView> {
        self.judge.analysis(env, app).map(|a| a.view())
    }

    /// The app's analysis's recent series, mix and call graph, for charts.
    pub fn timeline(&self, env: &str, app: &str) -> Option<crate::judge::Timeline> {
        self.judge.analysis(env, app).map(|a| a.timeline())
    }

    /// Declares a rollout: its canary is judged against its stable with its model (default
    /// `default`, with the declaration's traffic plan laid over it) from the app's current event
    /// time. An analysis of other versions still under way is replaced only when `replace` says
    /// so: a declaration never ends a live analysis silently.
    pub fn declare_rollout(
        &mut self,
        env: &str,
        app: &str,
        declaration: Declaration<'_>,
    ) -> Result<Vec<CanaryChange>, JudgeError> {
        let Declaration {
            stable,
            canary,
            model,
            replace,
            traffic,
        } = declaration;
        let key: (Arc<str>, Arc<str>) = (Arc::from(env), Arc::from(app));
        // An analysed app has nothing left to learn (`close_windows`).
        self.catch_up(&key);
        let Some(state) = self.apps.get(&key) else {
            return Err(JudgeError::UnknownApp {
                env: env.to_owned(),
                app: app.to_owned(),
            });
        };
        if let Some(live) = self.judge.analysis(env, app).filter(|a| !a.is_final())
            && (&**live.stable() != stable || &**live.canary() != canary)
            && !replace
        {
            return Err(JudgeError::LiveAnalysis {
                stable: live.stable().to_string(),
                canary: live.canary().to_string(),
            });
        }
        let at = state.clock.closed_until;
        // The analysis this declaration takes the place of, if it is another rollout's.
        let replaced = self
            .judge
            .analysis(env, app)
            .filter(|a| &**a.stable() != stable || &**a.canary() != canary)
            .map(|a| a.view());
        let model = self
            .judge
            .resolve_model(model.unwrap_or(DEFAULT_MODEL), traffic)?;
        let started = self
            .judge
            .begin(key, Arc::from(stable), Arc::from(canary), model, true, at)?;
        let mut changes = Vec::with_capacity(2);
        if let Some(view) = replaced {
            changes.push(CanaryChange {
                kind: ChangeKind::Replaced,
                time: at,
                weight: None,
                view,
            });
        }
        changes.extend(started);
        Ok(changes)
    }

    /// An operator's action on the app's analysis (promote, pause, resume, abort), at the app's
    /// event time; the change it makes, for its event.
    pub fn operate(
        &mut self,
        env: &str,
        app: &str,
        operation: Operation,
    ) -> Result<CanaryChange, JudgeError> {
        let key = (Arc::from(env), Arc::from(app));
        let at = self.apps.get(&key).map_or(0, |a| a.clock.closed_until);
        self.judge.operate(&key, operation, at)
    }

    /// Tells the judge of a version's final verdict in an environment (the event that said so):
    /// the changes that makes to analyses further along their promotion chains.
    pub fn remember_verdict(
        &mut self,
        env: &str,
        app: &str,
        version: &str,
        verdict: Verdict,
    ) -> Vec<CanaryChange> {
        self.judge.remember_verdict(env, app, version, verdict, 0)
    }

    /// Tells the judge of a stored verdict without applying it (a restart's rebuild; see
    /// `Judge::recall_verdict`).
    pub fn recall_verdict(&mut self, env: &str, app: &str, version: &str, verdict: Verdict) {
        self.judge.recall_verdict(env, app, version, verdict);
    }

    /// Applies every live analysis's promotion chain (after a restart's verdicts were recalled).
    pub fn follow_chains(&mut self) -> Vec<CanaryChange> {
        self.judge.follow_chains(0)
    }

    /// Ends the app's rollout analysis; its `ended` change.
    pub fn end_rollout(&mut self, env: &str, app: &str) -> Result<CanaryChange, JudgeError> {
        let key = (Arc::from(env), Arc::from(app));
        let at = self.apps.get(&key).map_or(0, |a| a.clock.closed_until);
        let view = self.judge.end(&key)?;
        Ok(CanaryChange {
            kind: ChangeKind::Ended,
            time: at,
            weight: None,
            view,
        })
    }

    /// Moves the apps seen least recently out of memory, as the app cap does (their state is
    /// written at the next `take_changes`, and they come back whole when seen again), until the
    /// baselines held take at most `budget_bytes`. An app whose canary is being judged stays.
    /// Needs an archive to bring apps back from: without one, or with a budget of 0, nothing moves.
    pub fn page_out(&mut self, budget_bytes: usize) -> PageOut {
        let (_, held) = self.baseline_memory();
        let mut out = PageOut {
            apps: 0,
            bytes_before: held,
            bytes_after: held,
        };
        if budget_bytes == 0 || held <= budget_bytes || self.archive.is_none() {
            return out;
        }
        type Candidate = (EventTime, (Arc<str>, Arc<str>), usize);
        let mut candidates: Vec<Candidate> = self
            .apps
            .iter()
            .filter(|(key, _)| self.judge.analysis(&key.0, &key.1).is_none_or(|a| a.is_final()))
            .map(|(key, state)| {
                let last_seen = self
                    .catalog
                    .app(&key.0, &key.1)
                    .and_then(|entry| entry.last_seen())
                    .unwrap_or(0);
                (last_seen, key.clone(), state.baseline_bytes())
            })
            .collect();
        candidates.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        for (_, key, bytes) in candidates {
            if out.bytes_after <= budget_bytes {
                break;
            }
            self.archive_app(&key);
            out.apps += 1;
            out.bytes_after = out.bytes_after.saturating_sub(bytes);
        }
        out
    }

    /// About the memory the engine's state holds, by structure.
    pub fn memory(&self) -> EngineMemory {
        let (baseline_series, baselines) = self.baseline_memory();
        let buckets = self
            .apps
            .values()
            .flat_map(|a| a.versions.values())
            .map(|v| v.windows.memory_bytes())
            .sum::<usize>()
            + self
                .apps
                .values()
                .flat_map(|a| &a.unlearned)
                .map(|(_, w)| std::mem::size_of::<ClosedWindow>() + w.aggregate.heap_bytes())
                .sum::<usize>();
        let (analyses, analysis_merges, analysis_evidence) =
            self.judge.analyses().fold((0, 0, 0), |(a, m, e), analysis| {
                let (more, merges) = analysis.memory_bytes();
                (a + more, m + merges, e + analysis.evidence_bytes())
            });
        EngineMemory {
            baseline_series,
            baselines,
            buckets,
            analyses,
            analysis_merges,
            analysis_evidence,
        }
    }

    /// Baselines held, and the bytes they take in memory.
    pub fn baseline_memory(&self) -> (usize, usize) {
        self.apps.values().fold((0, 0), |(n, bytes), a| {
            let held = a.baselines.len() + a.versions.values().map(|v| v.baselines.len()).sum::<usize>();
            (n + held, bytes + a.baseline_bytes())
        })
    }
}

/// Starts an inferred analysis when a version other than the stable one sends requests, and
/// copies the buckets about to close of the analysed versions, in time order, for the analysis.
fn judge_buckets(
    judge: &mut Judge,
    key: &(Arc<str>, Arc<str>),
    app: &AppState,
    until: EventTime,
    config: &EngineConfig,
    changes: &mut Vec<CanaryChange>,
) -> Vec<(EventTime, Arc<str>, crate::window::Aggregate)> {
    let active = judge.analysis_mut(key).is_some_and(|a| !a.is_final());
    if !active && let Some(stable) = &app.stable {
        let first_traffic = |v: &Arc<str>| {
            app.versions.get(v).and_then(|s| {
                s.windows
                    .closing(until, &config.windows)
                    .find(|(_, agg)| agg.all.requests > 0)
                    .map(|(start, _)| start)
            })
        };
        let candidate = app
            .versions
            .keys()
            .filter(|v| *v != stable && judge.wants_canary(key, v))
            .filter_map(|v| first_traffic(v).map(|t| (t, v.clone())))
            .min();
        if let Some((at, canary)) = candidate
            && let Ok(started) = judge.start(key.clone(), stable.clone(), canary, DEFAULT_MODEL, false, at)
        {
            changes.extend(started);
        }
    }
    let mut buckets = Vec::new();
    if let Some(analysis) = judge.analysis_mut(key).filter(|a| !a.is_final()) {
        for version in [analysis.stable(), analysis.canary()] {
            if let Some(state) = app.versions.get(version) {
                for (start, agg) in state.windows.closing(until, &config.windows) {
                    buckets.push((start, version.clone(), agg.clone()));
                }
            }
        }
    }
    buckets.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    buckets
}

/// Lets baselines learn one window's features.
struct Learner<'a> {
    app: &'a (Arc<str>, Arc<str>),
    /// End of the window.
    time: EventTime,
    config: &'a EngineConfig,
    slots: &'a mut dyn SlotStore,
    dirty: &'a mut BTreeSet<BaselineId>,
    anomalies: &'a mut Vec<AnomalyChange>,
}

impl Learner<'_> {
    /// Scores and learns each feature; for a version's own baselines, also follows its anomaly
    /// state and reports the changes.
    fn learn(
        &mut self,
        baselines: &mut VecMap<FeatureKey, Baseline>,
        features: &[FeatureValue],
        scope: Scope,
    ) {
        let held = baselines.len();
        let prefix = BaselineId::series_prefix(&self.app.0, &self.app.1, &scope);
        let mut slots = ScopeSlots::new(&mut *self.slots, prefix, hour_of_week(self.time));
        // A pass over the scope's slots of the hour costs about what a few seeks do; worth it
        // when many of its baselines enter the hour now (they mostly do so together, at the
        // hour's first window), not when a quiet feature or two enter it late.
        let entering = features
            .iter()
            .filter(|f| {
                baselines
                    .get(&f.key)
                    .is_none_or(|b| b.slot.as_ref().is_none_or(|(s, _)| *s != slots.hour))
            })
            .count();
        slots.read_together = entering * 4 >= held.max(4);
        for f in features {
            let id = BaselineId {
                env: self.app.0.to_string(),
                app: self.app.1.to_string(),
                scope: scope.clone(),
                key: f.key.clone(),
            };
            let baseline = baselines.get_or_default(&f.key);
            let expected = baseline.ewma.mean;
            let (score, band) =
                baseline.observe_judged(&id.series_name(), f, self.time, &self.config.baseline, &mut slots);
            if matches!(scope, Scope::Version(_))
                && let Some(transition) =
                    baseline
                        .anomaly
                        .update(score, f.support, self.time, &self.config.anomaly)
            {
                self.anomalies.push(AnomalyChange {
                    id: id.clone(),
                    transition,
                    value: f.value,
                    expected,
                    band,
                    score: score.value().unwrap_or(0.0),
                    support: f.support,
                    time: self.time,
                });
            }
            self.dirty.insert(id);
        }
        slots.finish();
        // A baseline is added once, when its feature is first seen, and then kept: no room is
        // kept for more.
        if baselines.len() != held {
            baselines.shrink_to_fit();
        }
    }
}

/// The slot store as one scope's baselines see it while a window is learned. The slots they
/// enter are read in one pass over the scope (`SlotStore::load_scope`) the first time one is asked
/// for, when `read_together`, and the slots they leave are saved together at `finish`: an hour's
/// turn then reads and writes the scope's slots in the store's order, not a seek for each series
/// (`cargo bench -p canaryd-store --bench slots`).
struct ScopeSlots<'a> {
    store: &'a mut dyn SlotStore,
    /// `BaselineId::series_prefix` of the scope.
    prefix: String,
    /// The hour-of-week of the window being learned.
    hour: u16,
    read_together: bool,
    /// The scope's slots of `hour` not yet handed out, once read; `None` inside if the store
    /// could not read them together.
    entered: Option<Option<crate::FastMap<String, SlotSummary>>>,
    left: Vec<(String, u16, SlotSummary)>,
}

impl<'a> ScopeSlots<'a> {
    fn new(store: &'a mut dyn SlotStore, prefix: String, hour: u16) -> Self {
        ScopeSlots {
            store,
            prefix,
            hour,
            read_together: false,
            entered: None,
            left: Vec::new(),
        }
    }

    /// Saves the slots left.
    fn finish(self) {
        if !self.left.is_empty() {
            self.store.save_all(self.left);
        }
    }
}

impl SlotStore for ScopeSlots<'_> {
    fn load(&mut self, series: &str, slot: u16) -> Option<SlotSummary> {
        if !self.read_together || slot != self.hour || !series.starts_with(&self.prefix) {
            return self.store.load(series, slot);
        }
        let entered = self.entered.get_or_insert_with(|| {
            self.store
                .load_scope(&self.prefix, slot)
                .map(|all| all.into_iter().collect())
        });
        match entered {
            Some(entered) => entered.remove(series),
            None => self.store.load(series, slot),
        }
    }

    fn save(&mut self, series: &str, slot: u16, summary: &SlotSummary) {
        self.left.push((series.to_owned(), slot, summary.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::{CallObservation, Identity, RequestObservation, SpanId, TraceId};

    fn request(trace: u8, cohort: Option<&str>) -> RequestObservation {
        RequestObservation {
            operation: "GET /".into(),
            time: 1,
            duration_ns: 1,
            error: false,
            trace_id: TraceId([trace; 16]),
            span_id: SpanId([1; 8]),
            cohort: cohort.map(Into::into),
        }
    }

    proptest::proptest! {
        /// A series name gives back its scope's prefix, whatever the env, app, version and key
        /// hold (digits, colons, slashes, any text), and a name cut inside its prefix gives none.
        #[test]
        fn a_series_name_gives_back_its_scopes_prefix(
            env in ".{0,12}",
            app in ".{0,12}",
            version in proptest::option::of(".{0,12}"),
            key in ".{0,24}",
            cut in 0usize..64,
        ) {
            let scope = version.map_or(Scope::App, Scope::Version);
            let prefix = BaselineId::series_prefix(&env, &app, &scope);
            let name = format!("{prefix}{key}");
            proptest::prop_assert_eq!(BaselineId::prefix_of_series(&name), Some(prefix.as_str()));
            let cut = cut.min(prefix.len() - 1);
            if let Some(short) = prefix.get(..cut) {
                proptest::prop_assert_eq!(BaselineId::prefix_of_series(short), None);
            }
        }
    }

    /// The open buckets count operations and downstreams under the catalog's own copy of each
    /// name, so a long route name is held once per app however many buckets and history blocks
    /// count it: each bucket adds a reference, not a copy.
    #[test]
    fn buckets_share_the_catalogs_names() {
        const S: EventTime = 1_000_000_000;
        let start: EventTime = 1_767_571_200 * S;
        let mut engine = Engine::new(
            EngineConfig::default(),
            Box::new(crate::baseline::MemorySlotStore::default()),
        );
        let route = format!("GET /{}", "segment/".repeat(40));
        let seconds = 5;
        for second in 0..seconds {
            let mut r = ResourceObservations::new(Identity::new("prod", "shop", "1.0"));
            for i in 0..2 {
                let time = start + second * S + i * S / 2;
                r.spans += 2;
                r.saw(time);
                r.requests.push(RequestObservation {
                    operation: route.as_str().into(),
                    time,
                    ..request(1, None)
                });
                r.calls.push(CallObservation {
                    downstream: "payments".into(),
                    source: crate::observation::DownstreamSource::PeerService,
                    time,
                    duration_ns: 1,
                    error: false,
                    trace_id: TraceId([1; 16]),
                    cohort: None,
                });
            }
            engine.ingest(&Batch {
                resources: vec![r],
                received: 0,
            });
        }
        let app = engine.catalog().app("prod", "shop").expect("admitted");
        let op = app.operation_key(&route);
        let downstream = app.downstream_key("payments");
        assert_eq!(&**op, route);
        // The catalog's reference, and one per open bucket (none has closed: there is no later
        // data to vouch for their end).
        assert!(
            Arc::strong_count(op) > seconds as usize,
            "{}",
            Arc::strong_count(op)
        );
        assert!(Arc::strong_count(downstream) > seconds as usize);
        assert!(crate::catalog::is_overflow(app.operation_key("GET /never-seen")));
    }

    /// A resource of random requests, calls, exceptions and logs over a few seconds from `from`,
    /// its names shared as the receivers share them (and now and then a name's text in a copy
    /// of its own). Latencies are whole milliseconds, so that a sketch's running sum is the same
    /// in any order and aggregates summed apart compare equal to those added one by one.
    fn random_resource(rng: &mut crate::rng::Rng, version: &str, from: EventTime) -> ResourceObservations {
        const S: EventTime = 1_000_000_000;
        let names = |prefix: &str, n: usize| -> Vec<Arc<str>> {
            (0..n).map(|i| Arc::from(format!("{prefix}{i}"))).collect()
        };
        let (ops, cohorts, downstreams, types) =
            (names("op", 6), names("c", 3), names("d", 4), names("e", 3));
        let pick = |rng: &mut crate::rng::Rng, names: &[Arc<str>]| -> Arc<str> {
            let name = &names[rng.below(names.len() as u64) as usize];
            if rng.below(8) == 0 {
                Arc::from(&**name)
            } else {
                name.clone()
            }
        };
        let mut r = ResourceObservations::new(Identity::new("prod", "shop", version));
        let time = |rng: &mut crate::rng::Rng| from + rng.below(4 * S);
        let trace = |rng: &mut crate::rng::Rng| TraceId([rng.below(4) as u8; 16]);
        for _ in 0..rng.below(40) {
            let t = time(rng);
            r.saw(t);
            r.spans += 1;
            let cohort = (rng.below(2) == 0).then(|| pick(rng, &cohorts));
            r.requests.push(RequestObservation {
                operation: pick(rng, &ops),
                time: t,
                duration_ns: (1 + rng.below(900)) * 1_000_000,
                error: rng.below(5) == 0,
                trace_id: trace(rng),
                span_id: SpanId([1; 8]),
                cohort,
            });
        }
        for _ in 0..rng.below(30) {
            let t = time(rng);
            r.saw(t);
            r.spans += 1;
            let cohort = (rng.below(4) == 0).then(|| pick(rng, &cohorts));
            r.calls.push(CallObservation {
                downstream: pick(rng, &downstreams),
                source: crate::observation::DownstreamSource::PeerService,
                time: t,
                duration_ns: 1,
                error: rng.below(4) == 0,
                trace_id: trace(rng),
                cohort,
            });
        }
        for _ in 0..rng.below(6) {
            let t = time(rng);
            r.saw(t);
            let cohort = (rng.below(4) == 0).then(|| pick(rng, &cohorts));
            r.exceptions.push(crate::observation::ExceptionObservation {
                exception_type: pick(rng, &types),
                operation: pick(rng, &ops),
                time: t,
                trace_id: trace(rng),
                cohort,
            });
        }
        for _ in 0..rng.below(10) {
            let t = time(rng);
            r.saw(t);
            let severity = if rng.below(3) == 0 {
                crate::observation::Severity::Error
            } else {
                crate::observation::Severity::Info
            };
            r.logs
                .push(crate::observation::LogObservation { time: t, severity });
        }
        r
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// A batch's resources summed where they were read leave the engine as adding their
        /// observations one by one does: the same open buckets and window being rolled up in
        /// every version, the same clock, catalog counts and names (past small caps, which fold
        /// names in the order they came), and the same reports (late observations, windows closed).
        #[test]
        fn summed_resources_window_as_their_observations_do(seed in proptest::prelude::any::<u64>()) {
            const S: EventTime = 1_000_000_000;
            let config = EngineConfig {
                limits: Limits {
                    max_operations_per_app: 4,
                    max_cohorts_per_app: 2,
                    max_downstreams_per_app: 3,
                    max_exception_types_per_app: 2,
                    ..Limits::default()
                },
                ..EngineConfig::default()
            };
            let engine = || Engine::new(config.clone(), Box::new(crate::baseline::MemorySlotStore::default()));
            let (mut one_by_one, mut summed) = (engine(), engine());
            let mut rng = crate::rng::Rng::new(seed);
            let mut from: EventTime = 1_767_571_200 * S;
            for _ in 0..20 {
                // Time mostly moves on; now and then a batch comes from before the last one.
                from = if rng.below(5) == 0 { from - 3 * S } else { from + rng.below(12) * S };
                let mut resources = Vec::new();
                for version in ["1.0", "2.0"] {
                    if rng.below(4) != 0 {
                        resources.push(random_resource(&mut rng, version, from));
                    }
                }
                let batch = Batch { resources, received: 0 };
                let mut batch_summed = batch.clone();
                for r in &mut batch_summed.resources {
                    if let Some(summary) = Summary::within(&r.observed(), S, usize::MAX) {
                        r.summary = Some(Box::new(summary));
                        (r.requests, r.calls, r.exceptions, r.logs) = Default::default();
                    }
                }
                let (a, b) = (one_by_one.ingest(&batch), summed.ingest(&batch_summed));
                proptest::prop_assert_eq!(a, b);
            }
            let key = (Arc::from("prod"), Arc::from("shop"));
            let (Some(a), Some(b)) = (one_by_one.apps.get(&key), summed.apps.get(&key)) else {
                proptest::prop_assert!(!one_by_one.apps.contains_key(&key) && !summed.apps.contains_key(&key));
                return Ok(());
            };
            proptest::prop_assert_eq!(a.clock, b.clock);
            proptest::prop_assert_eq!(a.late, b.late);
            for (version, state) in &a.versions {
                let theirs = &b.versions[version];
                proptest::prop_assert_eq!(state.windows.open(), theirs.windows.open());
                proptest::prop_assert_eq!(state.late, theirs.late);
            }
            proptest::prop_assert_eq!(a.versions.len(), b.versions.len());
            let (a, b) = (one_by_one.catalog().app("prod", "shop"), summed.catalog().app("prod", "shop"));
            let (Some(a), Some(b)) = (a, b) else {
                return Err(proptest::test_runner::TestCaseError::fail("the app is catalogued"));
            };
            fn sorted<T: std::fmt::Debug>(items: impl Iterator<Item = T>) -> Vec<String> {
                let mut items: Vec<String> = items.map(|i| format!("{i:?}")).collect();
                items.sort();
                items
            }
            proptest::prop_assert_eq!(sorted(a.versions()), sorted(b.versions()));
            proptest::prop_assert_eq!(sorted(a.operations()), sorted(b.operations()));
            proptest::prop_assert_eq!(sorted(a.downstreams()), sorted(b.downstreams()));
            proptest::prop_assert_eq!(sorted(a.exception_types()), sorted(b.exception_types()));
        }
    }
}
