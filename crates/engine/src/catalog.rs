//! What canaryd has seen: apps, their versions, operations, downstreams and metric series.
//!
//! Every map here is keyed by strings that clients send, so every map has a cap (`Limits`). What
//! does not fit is never silently lost: operations, downstreams and exception types past their cap
//! fold into the `OVERFLOW` key so that per-version counts stay exact; a new version past its cap
//! first evicts a version idle for `version_idle_ns`, else folds into `OVERFLOW` too; a new app past
//! the cap is dropped unless an app idle for `app_idle_ns` can give up its place (the engine moves
//! that one to its archive, from which it comes back when it is seen again), and so is a new
//! environment of an app that has `max_envs_per_app` already, so that one app cannot take the
//! whole app cap; a new metric series past its cap is dropped. Each case is counted by `Cap`.
//!
//! First and last seen are event times (the timestamps in the data), so the catalog is the same
//! whatever order the data arrived in.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::FastMap;
use std::sync::Arc;

use crate::delta::{Conversion, Sample, SeriesState};
use crate::observation::{EventTime, SeriesKey};
use crate::resource::{Batch, ResourceObservations};
use crate::summary::{Counts, Tally};

/// The key that absorbs what arrives past a cap.
pub const OVERFLOW: &str = "__overflow__";

/// Caps on everything keyed by what clients send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// (env, app) pairs held in memory.
    pub max_apps: usize,
    /// Environments one app name may take of `max_apps`.
    pub max_envs_per_app: usize,
    pub max_versions_per_app: usize,
    pub max_operations_per_app: usize,
    pub max_downstreams_per_app: usize,
    /// Metric streams per app: each series (name and attributes) counted per version and instance,
    /// since each such stream keeps its own cumulative reference.
    pub max_metric_series_per_app: usize,
    pub max_exception_types_per_app: usize,
    /// Distinct values of the cohort attribute per app: each is judged on its own, so a few
    /// dozen at most (a user id is not a cohort).
    pub max_cohorts_per_app: usize,
    /// A version unseen for this long (event time) may be evicted to make room for a new one.
    pub version_idle_ns: u64,
    /// An app unseen for this long (event time) may be archived to make room for a new one.
    pub app_idle_ns: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_apps: 1_000,
            max_envs_per_app: 20,
            max_versions_per_app: 20,
            max_operations_per_app: 200,
            max_downstreams_per_app: 200,
            max_metric_series_per_app: 2_000,
            max_exception_types_per_app: 200,
            max_cohorts_per_app: 20,
            version_idle_ns: 3_600 * 1_000_000_000,
            app_idle_ns: 3_600 * 1_000_000_000,
        }
    }
}

/// Which cap an observation ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cap {
    Apps,
    EnvsPerApp,
    VersionsPerApp,
    OperationsPerApp,
    DownstreamsPerApp,
    MetricSeriesPerApp,
    ExceptionTypesPerApp,
    CohortsPerApp,
}

impl Cap {
    pub const ALL: [Cap; 8] = [
        Cap::Apps,
        Cap::EnvsPerApp,
        Cap::VersionsPerApp,
        Cap::OperationsPerApp,
        Cap::DownstreamsPerApp,
        Cap::MetricSeriesPerApp,
        Cap::ExceptionTypesPerApp,
        Cap::CohortsPerApp,
    ];

    /// The cap's name as the configuration and `/metrics` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Cap::Apps => "max_apps",
            Cap::EnvsPerApp => "max_envs_per_app",
            Cap::VersionsPerApp => "max_versions_per_app",
            Cap::OperationsPerApp => "max_operations_per_app",
            Cap::DownstreamsPerApp => "max_downstreams_per_app",
            Cap::MetricSeriesPerApp => "max_metric_series_per_app",
            Cap::ExceptionTypesPerApp => "max_exception_types_per_app",
            Cap::CohortsPerApp => "max_cohorts_per_app",
        }
    }

    /// Whether observations past this cap are dropped (rather than folded into `OVERFLOW`).
    pub fn drops(self) -> bool {
        matches!(self, Cap::Apps | Cap::EnvsPerApp | Cap::MetricSeriesPerApp)
    }
}

/// Counts of what one version sent.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VersionStats {
    pub first_seen: EventTime,
    pub last_seen: EventTime,
    pub spans: u64,
    pub requests: u64,
    pub errors: u64,
    pub calls: u64,
    pub exceptions: u64,
    pub metric_points: u64,
    pub log_records: u64,
    pub error_log_records: u64,
}

/// Counts per operation, all versions together.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OperationStats {
    pub requests: u64,
    pub errors: u64,
}

/// One metric stream: a series from one version and instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
struct StreamKey {
    version: Arc<str>,
    instance: Option<Arc<str>>,
    series: SeriesKey,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Stream {
    state: SeriesState,
    points: u64,
    resets: u64,
    stale: u64,
}

/// How one resource's observations were admitted.
#[derive(Clone, Debug, PartialEq)]
pub struct Admission {
    /// The version key they count under: the version itself, or `OVERFLOW`.
    pub version: Arc<str>,
    /// A version idle long enough that it was forgotten to make room for this one.
    pub evicted: Option<Arc<str>>,
    /// The metric samples their points yielded, with their series.
    pub samples: Vec<(SeriesKey, Sample)>,
}

/// Everything known about one (env, app).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AppEntry {
    versions: BTreeMap<Arc<str>, VersionStats>,
    operations: FastMap<Arc<str>, OperationStats>,
    downstreams: FastMap<Arc<str>, u64>,
    exception_types: FastMap<Arc<str>, u64>,
    streams: FastMap<StreamKey, Stream>,
    /// Requests per cohort. Not stored: after a restart cohorts are admitted again as seen
    /// (the windows that judge them start empty then too).
    #[serde(skip)]
    cohorts: FastMap<Arc<str>, u64>,
}

impl AppEntry {
    pub fn versions(&self) -> impl Iterator<Item = (&str, &VersionStats)> {
        self.versions.iter().map(|(v, s)| (&**v, s))
    }

    pub fn operations(&self) -> impl Iterator<Item = (&str, &OperationStats)> {
        self.operations.iter().map(|(o, s)| (&**o, s))
    }

    pub fn downstreams(&self) -> impl Iterator<Item = (&str, u64)> {
        self.downstreams.iter().map(|(d, n)| (&**d, *n))
    }

    pub fn exception_types(&self) -> impl Iterator<Item = (&str, u64)> {
        self.exception_types.iter().map(|(e, n)| (&**e, *n))
    }

    /// Distinct metric series (name and attributes), whatever version or instance sent them.
    pub fn metric_series(&self) -> usize {
        let mut names: Vec<&SeriesKey> = self.streams.keys().map(|k| &k.series).collect();
        names.sort();
        names.dedup();
        names.len()
    }

    pub fn metric_streams(&self) -> usize {
        self.streams.len()
    }

    /// Cumulative resets and stale points seen across the app's metric streams.
    pub fn metric_resets_and_stale(&self) -> (u64, u64) {
        self.streams
            .values()
            .fold((0, 0), |(r, s), stream| (r + stream.resets, s + stream.stale))
    }

    /// The key `operation` is counted under: the catalog's own copy of the name once admitted,
    /// else `OVERFLOW`. Windows and history share that copy instead of one each.
    pub fn operation_key(&self, operation: &str) -> &Arc<str> {
        shared_key(&self.operations, operation)
    }

    /// The key `cohort` is counted under, shared as `operation_key`'s.
    pub fn cohort_key(&self, cohort: &str) -> &Arc<str> {
        shared_key(&self.cohorts, cohort)
    }

    /// The key `downstream` is counted under, shared as `operation_key`'s.
    pub fn downstream_key(&self, downstream: &str) -> &Arc<str> {
        shared_key(&self.downstreams, downstream)
    }

    /// The key `exception_type` is counted under, shared as `operation_key`'s.
    pub fn exception_type_key(&self, exception_type: &str) -> &Arc<str> {
        shared_key(&self.exception_types, exception_type)
    }

    pub fn first_seen(&self) -> Option<EventTime> {
        self.versions.values().map(|v| v.first_seen).min()
    }

    pub fn last_seen(&self) -> Option<EventTime> {
        self.versions.values().map(|v| v.last_seen).max()
    }
}

/// Whether `name` is the key of what past a cap was folded together.
pub fn is_overflow(name: &str) -> bool {
    name == OVERFLOW
}

/// The one `OVERFLOW` name every map shares.
static OVERFLOW_KEY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(OVERFLOW));

/// `map`'s own copy of `key` when it holds one, else the shared `OVERFLOW`.
fn shared_key<'m, V>(map: &'m FastMap<Arc<str>, V>, key: &str) -> &'m Arc<str> {
    match map.get_key_value(key) {
        Some((k, _)) => k,
        None => &OVERFLOW_KEY,
    }
}

/// Adds `key` to a capped count map, folding it into `OVERFLOW` when the map is full. Returns
/// whether it was folded.
fn count_capped<V: Default>(
    map: &mut FastMap<Arc<str>, V>,
    key: &str,
    cap: usize,
    update: impl FnOnce(&mut V),
) -> bool {
    if let Some(v) = map.get_mut(key) {
        update(v);
        return false;
    }
    // OVERFLOW itself does not take one of the cap's places.
    let real_keys = map.len() - usize::from(map.contains_key(OVERFLOW));
    let folded = real_keys >= cap;
    let key = if folded {
        OVERFLOW_KEY.clone()
    } else {
        Arc::from(key)
    };
    update(map.entry(key).or_default());
    folded
}

/// At most how many distinct names `count_capped_by_name` and `NameKeys` remember at once.
pub(crate) const NAMES_REMEMBERED: usize = 64;

/// What a resource's observations amount to, summed where they were read or not.
fn observation_counts(obs: &ResourceObservations) -> Counts {
    if let Some(summary) = &obs.summary {
        return summary.counts;
    }
    Counts {
        requests: obs.requests.len() as u64,
        errors: obs.requests.iter().filter(|r| r.error).count() as u64,
        calls: obs.calls.len() as u64,
        exceptions: obs.exceptions.len() as u64,
        logs: obs.logs.len() as u64,
        error_logs: obs.logs.iter().filter(|l| l.severity.is_error()).count() as u64,
    }
}

/// Counts a resource's names in the app's maps, each capped; returns what each cap folded. A
/// summary's names come tallied, in the order they were first seen; else they are tallied here.
fn count_names(entry: &mut AppEntry, limits: &Limits, obs: &ResourceObservations) -> [(Cap, u64); 4] {
    fn tallied(tallies: &[Tally]) -> impl Iterator<Item = (&Arc<str>, u64, u64)> {
        tallies.iter().map(|t| (&t.name, t.count, t.failed))
    }
    let operation = |s: &mut OperationStats, n, failed| {
        s.requests += n;
        s.errors += failed;
    };
    let count = |count: &mut u64, n, _| *count += n;
    let (operations, downstreams) = (limits.max_operations_per_app, limits.max_downstreams_per_app);
    let (exception_types, cohorts) = (limits.max_exception_types_per_app, limits.max_cohorts_per_app);
    let folded = match &obs.summary {
        Some(summary) => [
            count_tallied(
                &mut entry.operations,
                operations,
                tallied(&summary.operations),
                &operation,
            ),
            count_tallied(
                &mut entry.downstreams,
                downstreams,
                tallied(&summary.downstreams),
                &count,
            ),
            count_tallied(
                &mut entry.exception_types,
                exception_types,
                tallied(&summary.exception_types),
                &count,
            ),
            count_tallied(&mut entry.cohorts, cohorts, tallied(&summary.cohorts), &count),
        ],
        None => [
            count_capped_by_name(
                &mut entry.operations,
                operations,
                obs.requests.iter().map(|r| (&r.operation, r.error)),
                operation,
            ),
            count_capped_by_name(
                &mut entry.downstreams,
                downstreams,
                obs.calls.iter().map(|c| (&c.downstream, false)),
                count,
            ),
            count_capped_by_name(
                &mut entry.exception_types,
                exception_types,
                obs.exceptions.iter().map(|e| (&e.exception_type, false)),
                count,
            ),
            count_capped_by_name(
                &mut entry.cohorts,
                cohorts,
                obs.requests
                    .iter()
                    .filter_map(|r| r.cohort.as_ref())
                    .map(|c| (c, false)),
                count,
            ),
        ],
    };
    let [operations, downstreams, exception_types, cohorts] = folded;
    [
        (Cap::OperationsPerApp, operations),
        (Cap::DownstreamsPerApp, downstreams),
        (Cap::ExceptionTypesPerApp, exception_types),
        (Cap::CohortsPerApp, cohorts),
    ]
}

/// `count_capped` for each item of a resource's observations (its name, and whether it failed),
/// looked up once for each distinct name rather than once for each item: the items of a request
/// share one allocation per name (the receivers make them so), so telling two names apart is a
/// pointer comparison. The names are counted in order of first appearance, in runs of at most
/// `NAMES_REMEMBERED`, so that which of them the cap folds is what item by item would fold.
/// `apply` is given the entry, the items and the failed items of one name. Returns the items folded.
fn count_capped_by_name<'a, V: Default>(
    map: &mut FastMap<Arc<str>, V>,
    cap: usize,
    items: impl Iterator<Item = (&'a Arc<str>, bool)>,
    apply: impl Fn(&mut V, u64, u64),
) -> u64 {
    let mut tally: Vec<(&Arc<str>, u64, u64)> = Vec::new();
    let mut folded = 0;
    for (name, failed) in items {
        match tally.iter_mut().find(|(known, ..)| Arc::ptr_eq(known, name)) {
            Some((_, n, f)) => {
                *n += 1;
                *f += u64::from(failed);
            }
            None => {
                if tally.len() == NAMES_REMEMBERED {
                    folded += count_tallied(map, cap, tally.drain(..), &apply);
                }
                tally.push((name, 1, u64::from(failed)));
            }
        }
    }
    folded + count_tallied(map, cap, tally.drain(..), &apply)
}

/// `count_capped_by_name` of names already tallied (each with its count and failures), in the
/// order they were first seen: the same names admitted as their items one by one would.
fn count_tallied<'a, V: Default>(
    map: &mut FastMap<Arc<str>, V>,
    cap: usize,
    tallies: impl Iterator<Item = (&'a Arc<str>, u64, u64)>,
    apply: &impl Fn(&mut V, u64, u64),
) -> u64 {
    let mut folded = 0;
    for (name, n, failed) in tallies {
        if count_capped(map, name, cap, |v| apply(v, n, failed)) {
            folded += n;
        }
    }
    folded
}

/// The catalog's key of each name of a resource's observations (`AppEntry::operation_key` and
/// the like), found once for each distinct name, as `count_capped_by_name` counts them; and for
/// each, where it was last found in a bucket's map (`VecMap::get_or_default_at`): the buckets of
/// one version hold mostly the same names in the same places.
pub(crate) struct NameKeys<'o, 'c> {
    found: Vec<(&'o Arc<str>, &'c Arc<str>, usize)>,
    /// Where the names past `NAMES_REMEMBERED` were last found, one place for all of them: seldom
    /// right, and harmless when wrong (a lookup checks a place before it uses it).
    unremembered: usize,
}

impl<'o, 'c> NameKeys<'o, 'c> {
    pub fn new() -> Self {
        NameKeys {
            found: Vec::new(),
            unremembered: 0,
        }
    }

    /// `name`'s key, by `find` the first time.
    pub fn key(&mut self, name: &'o Arc<str>, find: impl FnOnce(&str) -> &'c Arc<str>) -> &'c Arc<str> {
        self.key_and_place(name, find).0
    }

    /// `name`'s key, by `find` the first time, and where it was last found in a bucket.
    pub fn key_and_place(
        &mut self,
        name: &'o Arc<str>,
        find: impl FnOnce(&str) -> &'c Arc<str>,
    ) -> (&'c Arc<str>, &mut usize) {
        match self
            .found
            .iter()
            .position(|(known, _, _)| Arc::ptr_eq(known, name))
        {
            Some(i) => {
                let (_, key, place) = &mut self.found[i];
                (*key, place)
            }
            None => {
                let key = find(name);
                if self.found.len() < NAMES_REMEMBERED {
                    self.found.push((name, key, 0));
                    let (_, key, place) = self.found.last_mut().expect("just pushed");
                    (*key, place)
                } else {
                    (key, &mut self.unremembered)
                }
            }
        }
    }
}

/// The catalog of apps, bounded by `Limits`.
#[derive(Debug)]
pub struct Catalog {
    limits: Limits,
    apps: BTreeMap<(Arc<str>, Arc<str>), AppEntry>,
    /// Environments held per app name.
    envs: HashMap<Arc<str>, usize>,
    cap_hits: BTreeMap<Cap, u64>,
    /// Apps changed since the last `take_changed`.
    changed: HashSet<(Arc<str>, Arc<str>)>,
}

impl Catalog {
    pub fn new(limits: Limits) -> Self {
        Catalog {
            limits,
            apps: BTreeMap::new(),
            envs: HashMap::new(),
            cap_hits: BTreeMap::new(),
            changed: HashSet::new(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Apps ordered by (env, app).
    pub fn apps(&self) -> impl Iterator<Item = (&str, &str, &AppEntry)> {
        self.apps.iter().map(|((env, app), e)| (&**env, &**app, e))
    }

    pub fn app_count(&self) -> usize {
        self.apps.len()
    }

    pub fn app(&self, env: &str, app: &str) -> Option<&AppEntry> {
        self.apps.get(&(Arc::from(env), Arc::from(app)))
    }

    /// The apps changed since the last call, for persistence.
    pub fn take_changed(&mut self) -> Vec<(String, String, AppEntry)> {
        let changed: Vec<_> = self.changed.drain().collect();
        changed
            .into_iter()
            .filter_map(|key| {
                let entry = self.apps.get(&key)?.clone();
                Some((key.0.to_string(), key.1.to_string(), entry))
            })
            .collect()
    }

    /// The app's entry if it changed since the last `take_changed`, taken as that would take it.
    pub fn take_changed_of(&mut self, key: &(Arc<str>, Arc<str>)) -> Option<(String, String, AppEntry)> {
        if !self.changed.remove(key) {
            return None;
        }
        let entry = self.apps.get(key)?.clone();
        Some((key.0.to_string(), key.1.to_string(), entry))
    }

    /// Puts back a persisted or archived app.
    pub fn restore(&mut self, env: &str, app: &str, entry: AppEntry) {
        let key = (Arc::from(env), Arc::from(app));
        if self.apps.insert(key.clone(), entry).is_none() {
            *self.envs.entry(key.1).or_default() += 1;
        }
    }

    /// Takes an app out (to the engine's archive); nothing of it is left here.
    pub fn remove(&mut self, env: &str, app: &str) -> Option<AppEntry> {
        let key = (Arc::from(env), Arc::from(app));
        let entry = self.apps.remove(&key)?;
        self.changed.remove(&key);
        if let Some(n) = self.envs.get_mut(&key.1) {
            *n -= 1;
            if *n == 0 {
                self.envs.remove(&key.1);
            }
        }
        Some(entry)
    }

    /// Whether a new (env, app) would be refused for its app's share of the environments.
    pub fn over_env_share(&self, app: &str) -> bool {
        self.envs.get(app).copied().unwrap_or(0) >= self.limits.max_envs_per_app
    }

    pub fn is_full(&self) -> bool {
        self.apps.len() >= self.limits.max_apps
    }

    /// The app seen least recently, if it has been idle for `app_idle_ns` at `now`.
    pub fn idle_app(&self, now: EventTime) -> Option<(Arc<str>, Arc<str>)> {
        self.apps
            .iter()
            .map(|(key, entry)| (entry.last_seen().unwrap_or(0), key))
            .min()
            .filter(|(last, _)| last.saturating_add(self.limits.app_idle_ns) < now)
            .map(|(_, key)| key.clone())
    }

    /// The apps beyond `max_apps`, least recently seen first (after a restore of more apps than
    /// the cap holds).
    pub fn over_cap(&self) -> Vec<(Arc<str>, Arc<str>)> {
        let excess = self.apps.len().saturating_sub(self.limits.max_apps);
        let mut by_age: Vec<_> = self
            .apps
            .iter()
            .map(|(key, entry)| (entry.last_seen().unwrap_or(0), key.clone()))
            .collect();
        by_age.sort();
        by_age.into_iter().take(excess).map(|(_, key)| key).collect()
    }

    /// Brings every version of the app last seen after `time` back to it (a clock repair), and
    /// marks the app changed so that the repair is persisted.
    pub fn clamp_last_seen(&mut self, env: &str, app: &str, time: EventTime) {
        let key = (Arc::from(env), Arc::from(app));
        if let Some(entry) = self.apps.get_mut(&key) {
            for stats in entry.versions.values_mut() {
                stats.last_seen = stats.last_seen.min(time);
                stats.first_seen = stats.first_seen.min(stats.last_seen);
            }
            self.changed.insert(key);
        }
    }

    /// How many observations each cap dropped or folded since start.
    pub fn cap_hits(&self) -> impl Iterator<Item = (Cap, u64)> + '_ {
        Cap::ALL
            .into_iter()
            .map(|cap| (cap, self.cap_hits.get(&cap).copied().unwrap_or(0)))
    }

    /// Catalogs a batch; returns what each cap dropped or folded from it.
    pub fn ingest(&mut self, batch: &Batch) -> Vec<(Cap, u64)> {
        let mut hits: BTreeMap<Cap, u64> = BTreeMap::new();
        for resource in &batch.resources {
            let (resource_hits, _) = self.admit(resource);
            for (cap, n) in resource_hits {
                *hits.entry(cap).or_default() += n;
            }
        }
        hits.into_iter().collect()
    }

    /// Catalogs one resource's observations. Returns what each cap dropped or folded, and, unless
    /// the app was dropped, under which version key the observations count and the metric samples
    /// they yielded.
    pub fn admit(&mut self, obs: &ResourceObservations) -> (Vec<(Cap, u64)>, Option<Admission>) {
        let (hits, admission) = self.admit_inner(obs);
        let hits: Vec<(Cap, u64)> = hits.into_iter().filter(|(_, n)| *n > 0).collect();
        for (cap, n) in &hits {
            *self.cap_hits.entry(*cap).or_default() += n;
        }
        (hits, admission)
    }

    fn admit_inner(&mut self, obs: &ResourceObservations) -> (Vec<(Cap, u64)>, Option<Admission>) {
        let Some((first, last)) = obs.seen else {
            return (Vec::new(), None);
        };
        let id = &obs.identity;
        let key = (id.env.clone(), id.app.clone());
        if !self.apps.contains_key(&key) {
            let items = obs.spans + obs.metric_points.len() as u64 + obs.log_count();
            if self.over_env_share(&key.1) {
                return (vec![(Cap::EnvsPerApp, items)], None);
            }
            if self.is_full() {
                return (vec![(Cap::Apps, items)], None);
            }
            *self.envs.entry(key.1.clone()).or_default() += 1;
        }
        let limits = self.limits.clone();
        self.changed.insert(key.clone());
        let entry = self.apps.entry(key).or_default();
        let mut hits: Vec<(Cap, u64)> = Vec::new();

        let (version, evicted) = admit_version(entry, &id.version, first, &limits);
        if version.as_ref() == OVERFLOW && id.version.as_ref() != OVERFLOW {
            // Per item folded, as every other cap counts.
            let items = obs.spans + obs.metric_points.len() as u64 + obs.log_count();
            hits.push((Cap::VersionsPerApp, items));
        }
        let stats = entry.versions.entry(version.clone()).or_insert(VersionStats {
            first_seen: first,
            last_seen: last,
            ..VersionStats::default()
        });
        stats.first_seen = stats.first_seen.min(first);
        stats.last_seen = stats.last_seen.max(last);
        stats.spans += obs.spans;
        let counts = observation_counts(obs);
        stats.requests += counts.requests;
        stats.errors += counts.errors;
        stats.calls += counts.calls;
        stats.exceptions += counts.exceptions;
        stats.log_records += counts.logs;
        stats.error_log_records += counts.error_logs;
        hits.extend(count_names(entry, &limits, obs));

        let mut dropped = 0;
        let mut samples = Vec::new();
        for point in &obs.metric_points {
            let key = StreamKey {
                version: version.clone(),
                instance: obs.instance.clone(),
                series: point.series.clone(),
            };
            let full = entry.streams.len() >= limits.max_metric_series_per_app;
            let stream = match entry.streams.get_mut(&key) {
                Some(stream) => stream,
                None if full => {
                    dropped += 1;
                    continue;
                }
                None => entry.streams.entry(key).or_default(),
            };
            stream.points += 1;
            match stream.state.convert(point) {
                Conversion::Reset(sample) => {
                    stream.resets += 1;
                    samples.push((point.series.clone(), sample));
                }
                Conversion::Sample(sample) => samples.push((point.series.clone(), sample)),
                Conversion::Stale => stream.stale += 1,
                Conversion::Reference => {}
            }
        }
        hits.push((Cap::MetricSeriesPerApp, dropped));
        // Only the points kept are catalogued: the dropped ones are counted by their cap, so that
        // what was accepted is exactly what was catalogued plus what caps dropped.
        if let Some(stats) = entry.versions.get_mut(&version) {
            stats.metric_points += obs.metric_points.len() as u64 - dropped;
        }
        (
            hits,
            Some(Admission {
                version,
                evicted,
                samples,
            }),
        )
    }
}

/// The version key the observations of `version` are counted under: itself when it is known or
/// fits, after evicting an idle version if need be; `OVERFLOW` otherwise.
/// The version evicted to make room, if one was, comes second.
fn admit_version(
    entry: &mut AppEntry,
    version: &Arc<str>,
    now: EventTime,
    limits: &Limits,
) -> (Arc<str>, Option<Arc<str>>) {
    if entry.versions.contains_key(version) {
        return (version.clone(), None);
    }
    let real_versions = entry.versions.len() - usize::from(entry.versions.contains_key(OVERFLOW));
    if real_versions < limits.max_versions_per_app {
        return (version.clone(), None);
    }
    let idle = entry
        .versions
        .iter()
        .filter(|(v, _)| v.as_ref() != OVERFLOW)
        .min_by_key(|(_, s)| s.last_seen)
        .filter(|(_, s)| s.last_seen.saturating_add(limits.version_idle_ns) < now)
        .map(|(v, _)| v.clone());
    match idle {
        Some(evicted) => {
            entry.versions.remove(&evicted);
            entry.streams.retain(|k, _| k.version != evicted);
            (version.clone(), Some(evicted))
        }
        None => (Arc::from(OVERFLOW), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::*;

    proptest::proptest! {
        /// Counting by distinct name is counting item by item: the same counts, the same names
        /// folded by the cap, the same items reported folded; whether names share allocations
        /// (as a request's do) or not, and past the names remembered at once.
        #[test]
        fn counting_by_name_is_counting_item_by_item(
            picks in proptest::collection::vec((0usize..100, proptest::bool::ANY, proptest::bool::ANY), 0..400),
            already in 0usize..20,
            cap in 0usize..120,
        ) {
            let shared: Vec<Arc<str>> = (0..100).map(|i| Arc::from(format!("op{i}"))).collect();
            let items: Vec<(Arc<str>, bool)> = picks
                .iter()
                .map(|&(i, failed, own)| {
                    let name = if own { Arc::from(&*shared[i]) } else { shared[i].clone() };
                    (name, failed)
                })
                .collect();
            let mut one_by_one: FastMap<Arc<str>, (u64, u64)> = FastMap::default();
            for i in 0..already {
                one_by_one.insert(Arc::from(format!("op{}", 99 - i)), (1, 0));
            }
            let mut by_name = one_by_one.clone();
            let mut folded = 0;
            for (name, failed) in &items {
                folded += u64::from(count_capped(&mut one_by_one, name, cap, |(n, f)| {
                    *n += 1;
                    *f += u64::from(*failed);
                }));
            }
            let folded_by_name = count_capped_by_name(
                &mut by_name,
                cap,
                items.iter().map(|(name, failed)| (name, *failed)),
                |(n, f), items, failed| {
                    *n += items;
                    *f += failed;
                },
            );
            proptest::prop_assert_eq!(folded, folded_by_name);
            proptest::prop_assert_eq!(one_by_one, by_name);
        }
    }

    fn request(operation: &str, time: EventTime, error: bool) -> RequestObservation {
        RequestObservation {
            operation: operation.into(),
            time,
            duration_ns: 1_000_000,
            error,
            trace_id: TraceId::default(),
            span_id: SpanId::default(),
            cohort: None,
        }
    }

    fn resource(app: &str, version: &str, requests: Vec<RequestObservation>) -> ResourceObservations {
        let mut r = ResourceObservations::new(Identity::new("prod", app, version));
        r.spans = requests.len() as u64;
        for q in &requests {
            r.saw(q.time);
        }
        r.requests = requests;
        r
    }

    fn ingest(catalog: &mut Catalog, resources: Vec<ResourceObservations>) {
        catalog.ingest(&Batch {
            resources,
            received: 0,
        });
    }

    fn hits(catalog: &Catalog, cap: Cap) -> u64 {
        catalog.cap_hits().find(|(c, _)| *c == cap).map_or(0, |(_, n)| n)
    }

    #[test]
    fn counts_and_event_time_range_per_version() {
        let mut c = Catalog::new(Limits::default());
        ingest(
            &mut c,
            vec![resource(
                "shop",
                "v2",
                vec![request("GET /a", 50, false), request("GET /a", 20, true)],
            )],
        );
        ingest(
            &mut c,
            vec![resource("shop", "v2", vec![request("GET /b", 30, false)])],
        );
        let app = c.app("prod", "shop").expect("app is catalogued");
        let (version, stats) = app.versions().next().expect("one version");
        assert_eq!(version, "v2");
        assert_eq!((stats.first_seen, stats.last_seen), (20, 50));
        assert_eq!((stats.spans, stats.requests, stats.errors), (3, 3, 1));
        assert_eq!(app.operations().count(), 2);
    }

    #[test]
    fn operations_past_the_cap_fold_into_overflow_and_keep_counts_exact() {
        let limits = Limits {
            max_operations_per_app: 3,
            ..Limits::default()
        };
        let mut c = Catalog::new(limits);
        let requests = (0..10).map(|i| request(&format!("op{i}"), 1, false)).collect();
        ingest(&mut c, vec![resource("shop", "v1", requests)]);
        let app = c.app("prod", "shop").expect("app");
        let ops: HashMap<&str, &OperationStats> = app.operations().collect();
        assert_eq!(ops.len(), 4, "three real operations plus the overflow");
        assert_eq!(ops[OVERFLOW].requests, 7);
        assert_eq!(ops.values().map(|s| s.requests).sum::<u64>(), 10);
        assert_eq!(hits(&c, Cap::OperationsPerApp), 7);
    }

    #[test]
    fn apps_past_the_cap_are_dropped_and_counted() {
        let limits = Limits {
            max_apps: 1,
            ..Limits::default()
        };
        let mut c = Catalog::new(limits);
        ingest(&mut c, vec![resource("a", "v1", vec![request("x", 1, false)])]);
        ingest(
            &mut c,
            vec![resource(
                "b",
                "v1",
                vec![request("x", 1, false), request("y", 2, false)],
            )],
        );
        assert_eq!(c.apps().count(), 1);
        assert_eq!(hits(&c, Cap::Apps), 2);
    }

    #[test]
    fn an_idle_version_makes_room_and_a_busy_one_does_not() {
        let limits = Limits {
            max_versions_per_app: 1,
            version_idle_ns: 100,
            ..Limits::default()
        };
        let mut c = Catalog::new(limits);
        ingest(
            &mut c,
            vec![resource("a", "v1", vec![request("x", 1_000, false)])],
        );
        ingest(
            &mut c,
            vec![resource("a", "v2", vec![request("x", 1_050, false)])],
        );
        let versions: Vec<&str> = c.app("prod", "a").expect("app").versions().map(|v| v.0).collect();
        assert_eq!(versions, vec![OVERFLOW, "v1"]);
        assert_eq!(hits(&c, Cap::VersionsPerApp), 1);
        ingest(
            &mut c,
            vec![resource(
                "a",
                "v2",
                vec![request("x", 1_010, false), request("y", 1_020, false)],
            )],
        );
        assert_eq!(
            hits(&c, Cap::VersionsPerApp),
            3,
            "one per item folded, not per resource"
        );

        ingest(
            &mut c,
            vec![resource("a", "v3", vec![request("x", 2_000, false)])],
        );
        let versions: Vec<&str> = c.app("prod", "a").expect("app").versions().map(|v| v.0).collect();
        assert_eq!(versions, vec![OVERFLOW, "v3"]);
    }

    #[test]
    fn metric_streams_past_the_cap_are_dropped() {
        let limits = Limits {
            max_metric_series_per_app: 2,
            ..Limits::default()
        };
        let mut c = Catalog::new(limits);
        let mut r = resource("a", "v1", vec![]);
        for i in 0..5 {
            r.saw(10);
            r.metric_points.push(MetricPoint {
                series: SeriesKey::new(format!("m{i}"), vec![]),
                start_time: 0,
                time: 10,
                value: PointValue::Gauge(1.0),
            });
        }
        ingest(&mut c, vec![r]);
        let app = c.app("prod", "a").expect("app");
        assert_eq!(app.metric_series(), 2);
        assert_eq!(
            app.versions().next().expect("v1").1.metric_points,
            2,
            "the dropped points are counted by the cap, not catalogued"
        );
        assert_eq!(hits(&c, Cap::MetricSeriesPerApp), 3);
    }
}
