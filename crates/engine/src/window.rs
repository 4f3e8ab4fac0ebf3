//! Event-time windows: observations into 1-second buckets, buckets closed by a watermark, closed
//! buckets rolled up into evaluation windows.
//!
//! Each (env, app) has its own clock: the watermark is the latest event time seen for the app minus
//! the allowed lateness, so one app's skewed clock cannot make another's data late. A bucket closes
//! once the watermark passes its end; an observation for a closed bucket is late, counted and not
//! used. Everything kept in an `Aggregate` merges exactly (counts, sums, sketches), so data arriving
//! out of order within the lateness gives the same windows as data arriving in order.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::delta::Sample;
use crate::observation::{EventTime, SeriesKey};
use crate::sketch::Sketch;
use crate::vec_map::VecMap;

/// Relative accuracy of latency sketches.
pub const LATENCY_ACCURACY: f64 = 0.01;

/// Window settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowConfig {
    pub bucket_ns: u64,
    /// How far behind the latest event time data may arrive and still count.
    pub lateness_ns: u64,
    /// Length of an evaluation window; a whole number of buckets.
    pub window_ns: u64,
    /// How far ahead of both the app's event time and the receive clock an observation may be
    /// dated; later ones are refused (a skewed clock, or a hostile sender), never windowed.
    pub future_skew_ns: u64,
    /// How long (in the app's event time) a source may send nothing before it stops holding the
    /// app's buckets open.
    pub source_idle_ns: u64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            bucket_ns: 1_000_000_000,
            lateness_ns: 10_000_000_000,
            window_ns: 60_000_000_000,
            future_skew_ns: DEFAULT_FUTURE_SKEW_NS,
            source_idle_ns: 10_000_000_000,
        }
    }
}

/// Five minutes: well beyond any NTP-synchronised clock and an SDK's batching delay, far short of
/// what would blind an app for long.
pub const DEFAULT_FUTURE_SKEW_NS: u64 = 300_000_000_000;

/// Requests, errors and latency of one operation (or of the whole app).
#[derive(Clone, Debug, PartialEq)]
pub struct RequestAggregate {
    pub requests: u64,
    pub errors: u64,
    /// Latency in milliseconds.
    pub latency_ms: Sketch,
}

impl Default for RequestAggregate {
    fn default() -> Self {
        RequestAggregate {
            requests: 0,
            errors: 0,
            latency_ms: Sketch::new(LATENCY_ACCURACY),
        }
    }
}

/// What a map entry costs beyond its key's and value's own heap: a B-tree's share of a node
/// (keys, values and edges over about two thirds full nodes), roughly.
const MAP_ENTRY_OVERHEAD: usize = 16;

impl RequestAggregate {
    /// The heap this holds (its sketch's bins).
    pub fn heap_bytes(&self) -> usize {
        self.latency_ms.heap_bytes()
    }

    pub fn add(&mut self, duration_ns: u64, error: bool) {
        self.requests += 1;
        self.errors += u64::from(error);
        self.latency_ms.add(duration_ns as f64 / 1e6);
    }

    /// One request, counted without its latency: an operation's share within a cohort.
    pub fn count(&mut self, error: bool) {
        self.requests += 1;
        self.errors += u64::from(error);
    }

    pub fn merge(&mut self, other: &RequestAggregate) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.latency_ms.merge(&other.latency_ms);
    }
}

/// What a metric series did over an interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricAggregate {
    /// Sum of counter increments.
    pub increment: f64,
    /// Counter points (samples of increments) that landed here.
    pub increments: u64,
    /// The increments not yet attributed to the time they cover: `(start, end, value)` each. A
    /// cumulative point after a gap carries everything of the gap; where it lands (the second of
    /// its `end`) is not where it happened. Evaluation windows keep only the part of each that
    /// falls within them (`VersionWindows::close`); the judge's history spreads each over the
    /// requests of the seconds it covers (`judge::history`).
    pub intervals: Vec<(EventTime, EventTime, f64)>,
    /// Requests of the version over the time this series' increments cover: what increments
    /// per request are counted against. Set by the judge's history; 0 elsewhere.
    pub exposure: f64,
    /// Sum and count of gauge readings.
    pub level_sum: f64,
    pub levels: u64,
    /// Values recorded into histograms, at their buckets' representative values.
    pub distribution: Option<Sketch>,
}

impl MetricAggregate {
    pub fn add(&mut self, sample: &Sample) {
        match sample {
            Sample::Increment { start, end, value } => {
                self.increment += value;
                self.increments += 1;
                self.intervals.push((*start, *end, *value));
            }
            Sample::Level { value, .. } => {
                self.level_sum += value;
                self.levels += 1;
            }
            Sample::Histogram {
                bounds,
                bucket_counts,
                ..
            } => {
                let sketch = self
                    .distribution
                    .get_or_insert_with(|| Sketch::new(LATENCY_ACCURACY));
                for (i, count) in bucket_counts.iter().enumerate() {
                    if *count == 0 {
                        continue;
                    }
                    // Midpoint of the bucket; the open-ended ones stand at their one bound.
                    let value = match (i.checked_sub(1).and_then(|j| bounds.get(j)), bounds.get(i)) {
                        (Some(lo), Some(hi)) => (lo + hi) / 2.0,
                        (None, Some(hi)) => *hi,
                        (Some(lo), None) => *lo,
                        (None, None) => continue,
                    };
                    sketch.add_weighted(value, *count as f64);
                }
            }
            Sample::ExponentialHistogram {
                scale,
                zero_count,
                positive,
                negative,
                ..
            } => {
                let sketch = self
                    .distribution
                    .get_or_insert_with(|| Sketch::new(LATENCY_ACCURACY));
                let base = 2f64.powf(2f64.powi(-scale));
                let value_at = |index: i64| base.powf(index as f64 + 0.5);
                for (i, count) in positive.counts.iter().enumerate() {
                    sketch.add_weighted(value_at(i64::from(positive.offset) + i as i64), *count as f64);
                }
                for (i, count) in negative.counts.iter().enumerate() {
                    sketch.add_weighted(-value_at(i64::from(negative.offset) + i as i64), *count as f64);
                }
                sketch.add_weighted(0.0, *zero_count as f64);
            }
        }
    }

    fn merge(&mut self, other: &MetricAggregate) {
        self.increment += other.increment;
        self.increments += other.increments;
        self.intervals.extend_from_slice(&other.intervals);
        self.exposure += other.exposure;
        self.level_sum += other.level_sum;
        self.levels += other.levels;
        if let Some(d) = &other.distribution {
            match &mut self.distribution {
                Some(mine) => mine.merge(d),
                None => self.distribution = Some(d.clone()),
            }
        }
    }
}

/// Everything one version did over an interval, mergeable.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Aggregate {
    pub all: RequestAggregate,
    pub operations: VecMap<Arc<str>, RequestAggregate>,
    /// What the requests of each cohort (the cohort attribute's value) did, for those that carry
    /// one: their requests (`all`), their count per operation (`operations`, without latency),
    /// and the calls and exceptions attributed to them. No logs, metrics or cohorts of its own.
    pub cohorts: VecMap<Arc<str>, Aggregate>,
    /// Calls and failed calls per downstream.
    pub calls: VecMap<Arc<str>, (u64, u64)>,
    pub exceptions: VecMap<Arc<str>, u64>,
    pub logs: u64,
    pub error_logs: u64,
    pub metrics: BTreeMap<SeriesKey, MetricAggregate>,
}

impl Aggregate {
    /// About the memory this holds beyond its own size: the sketches' bins and the maps' entries.
    pub fn heap_bytes(&self) -> usize {
        // Each small map: its vector's room for entries, and each value's heap. The keys' text is
        // the catalog's, shared.
        fn entries<V>(map: &VecMap<Arc<str>, V>, heap: impl Fn(&V) -> usize) -> usize {
            map.capacity() * std::mem::size_of::<(Arc<str>, V)>() + map.values().map(&heap).sum::<usize>()
        }
        let operations = entries(&self.operations, RequestAggregate::heap_bytes);
        let cohorts = entries(&self.cohorts, Aggregate::heap_bytes);
        let calls = entries(&self.calls, |_| 0);
        let exceptions = entries(&self.exceptions, |_| 0);
        let metrics: usize = self
            .metrics
            .iter()
            .map(|(series, agg)| {
                series.heap_bytes_share()
                    + std::mem::size_of::<MetricAggregate>()
                    + MAP_ENTRY_OVERHEAD
                    + agg.intervals.capacity() * 24
                    + agg.distribution.as_ref().map_or(0, Sketch::heap_bytes)
            })
            .sum();
        self.all.heap_bytes() + operations + cohorts + calls + exceptions + metrics
    }

    /// Gives back the spare capacity of its sketches (packing those of whole-number weights,
    /// `Sketch::shrink_to_fit`) and interval lists: for an aggregate kept unchanged from here on.
    pub fn shrink_to_fit(&mut self) {
        self.all.latency_ms.shrink_to_fit();
        for agg in self.operations.values_mut() {
            agg.latency_ms.shrink_to_fit();
        }
        for agg in self.cohorts.values_mut() {
            agg.shrink_to_fit();
        }
        self.operations.shrink_to_fit();
        self.cohorts.shrink_to_fit();
        self.calls.shrink_to_fit();
        self.exceptions.shrink_to_fit();
        for m in self.metrics.values_mut() {
            m.intervals.shrink_to_fit();
            if let Some(d) = &mut m.distribution {
                d.shrink_to_fit();
            }
        }
    }

    pub fn merge(&mut self, other: &Aggregate) {
        self.all.merge(&other.all);
        for (cohort, agg) in &other.cohorts {
            self.cohorts.get_or_default(cohort).merge(agg);
        }
        for (op, agg) in &other.operations {
            self.operations.get_or_default(op).merge(agg);
        }
        for (ds, (calls, errors)) in &other.calls {
            let mine = self.calls.get_or_default(ds);
            mine.0 += calls;
            mine.1 += errors;
        }
        for (ty, n) in &other.exceptions {
            *self.exceptions.get_or_default(ty) += n;
        }
        self.logs += other.logs;
        self.error_logs += other.error_logs;
        for (series, agg) in &other.metrics {
            self.metrics.entry(series.clone()).or_default().merge(agg);
        }
    }
}

/// A window whose every bucket has closed.
#[derive(Clone, Debug, PartialEq)]
pub struct ClosedWindow {
    pub start: EventTime,
    pub end: EventTime,
    pub aggregate: Aggregate,
    /// Whether every bucket of the window could have been seen (false for the first window after
    /// a restart, which began before this process did).
    pub complete: bool,
}

/// The open buckets and the window being rolled up, for one version.
#[derive(Clone, Debug, Default)]
pub struct VersionWindows {
    buckets: BTreeMap<EventTime, Aggregate>,
    /// The window being filled from closed buckets: its start and contents.
    rolling: Option<Rolling>,
}

/// A window being rolled up: its start, what it holds, and whether it is complete.
type Rolling = (EventTime, Aggregate, bool);

impl VersionWindows {
    /// About the memory the open buckets and the window being rolled up hold.
    pub fn memory_bytes(&self) -> usize {
        let each = std::mem::size_of::<Aggregate>() + MAP_ENTRY_OVERHEAD;
        let buckets: usize = self.buckets.values().map(|b| each + b.heap_bytes()).sum();
        buckets + self.rolling.as_ref().map_or(0, |(_, w, _)| each + w.heap_bytes())
    }

    /// The open buckets, and the window being rolled up, as they stand.
    #[cfg(test)]
    pub(crate) fn open(&self) -> (&BTreeMap<EventTime, Aggregate>, Option<&Rolling>) {
        (&self.buckets, self.rolling.as_ref())
    }

    /// The bucket for `time`, or `None` when that bucket has already closed (`closed_until`).
    pub fn bucket(
        &mut self,
        time: EventTime,
        closed_until: EventTime,
        config: &WindowConfig,
    ) -> Option<&mut Aggregate> {
        if time < closed_until {
            return None;
        }
        let start = time - time % config.bucket_ns;
        Some(self.buckets.entry(start).or_default())
    }

    /// Closes every bucket that ends at or before `closed_until`, rolling them into windows;
    /// returns the windows that completed. `complete_from` is the first instant this process could
    /// have seen: windows starting earlier are marked incomplete.
    pub fn close(
        &mut self,
        closed_until: EventTime,
        complete_from: EventTime,
        config: &WindowConfig,
    ) -> Vec<ClosedWindow> {
        let mut done = Vec::new();
        let window_of = |t: EventTime| t - t % config.window_ns;
        while let Some(entry) = self.buckets.first_entry() {
            // Saturating: a bucket at the very end of time never closes rather than overflowing.
            if entry.key().saturating_add(config.bucket_ns) > closed_until {
                break;
            }
            let (start, mut bucket) = entry.remove_entry();
            let window = window_of(start);
            within_window(&mut bucket, window);
            match &mut self.rolling {
                Some((w, agg, _)) if *w == window => agg.merge(&bucket),
                _ => {
                    if let Some((w, agg, complete)) = self.rolling.take() {
                        done.push(ClosedWindow {
                            start: w,
                            end: w.saturating_add(config.window_ns),
                            aggregate: agg,
                            complete,
                        });
                    }
                    self.rolling = Some((window, bucket, window >= complete_from));
                }
            }
        }
        // The rolling window is complete once the watermark has passed its end.
        if let Some((w, _, _)) = &self.rolling
            && w.saturating_add(config.window_ns) <= closed_until
        {
            let (w, agg, complete) = self.rolling.take().expect("just matched");
            done.push(ClosedWindow {
                start: w,
                end: w.saturating_add(config.window_ns),
                aggregate: agg,
                complete,
            });
        }
        done
    }

    /// The buckets that `close(closed_until, ..)` would close, oldest first, without closing them.
    pub fn closing(
        &self,
        closed_until: EventTime,
        config: &WindowConfig,
    ) -> impl Iterator<Item = (EventTime, &Aggregate)> {
        let bucket_ns = config.bucket_ns;
        self.buckets
            .iter()
            .take_while(move |(start, _)| start.saturating_add(bucket_ns) <= closed_until)
            .map(|(start, agg)| (*start, agg))
    }

    /// Whether nothing is pending.
    pub fn is_idle(&self) -> bool {
        self.buckets.is_empty() && self.rolling.is_none()
    }
}

/// Keeps, of each counter increment in `bucket`, the part that falls within the window starting
/// at `window`, by time: a point that spans a gap reaching into earlier (closed) windows counts
/// here for the part of the gap that is here, not for all of it.
fn within_window(bucket: &mut Aggregate, window: EventTime) {
    for m in bucket.metrics.values_mut() {
        if m.intervals.iter().all(|(start, _, _)| *start >= window) {
            continue;
        }
        m.increment = 0.0;
        for (start, end, value) in &mut m.intervals {
            if *start < window && *end > *start {
                *value *= end.saturating_sub(window) as f64 / (*end - *start) as f64;
                *start = window;
            }
            m.increment += *value;
        }
    }
}

/// The event-time clock of one (env, app).
///
/// The watermark follows the latest event time that two observations vouch for, never one alone:
/// a single point from a skewed clock (an SDK a day ahead) would otherwise close every bucket up to
/// its time and make all later honest data late. The latest single time is kept as `lead` until a
/// second observation reaches it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppClock {
    /// Latest event time vouched for by at least two observations.
    pub max_time: EventTime,
    /// Buckets ending at or before this are closed.
    pub closed_until: EventTime,
    /// Latest event time of any single observation (at least `max_time`).
    pub lead: EventTime,
}

impl AppClock {
    /// Records one observation at `time`: the latest time two observations vouch for moves.
    fn saw(&mut self, time: EventTime) {
        if time > self.lead {
            // The old lead is now vouched for by this later observation too.
            self.max_time = self.max_time.max(self.lead);
            self.lead = time;
        } else {
            self.max_time = self.max_time.max(time);
        }
    }

    /// Records what one resource of a batch saw: its two latest event times (the second `None`
    /// when it had one observation). Two observations of one resource vouch for each other.
    pub fn saw_resource(&mut self, latest: EventTime, second: Option<EventTime>) {
        if let Some(second) = second {
            self.saw(second);
        }
        self.saw(latest);
    }

    /// Closes the buckets that end at least the allowed lateness before `reach` (never past the
    /// vouched latest time); returns the new `closed_until` (bucket-aligned).
    pub fn close_to(&mut self, reach: EventTime, config: &WindowConfig) -> EventTime {
        let watermark = reach.min(self.max_time).saturating_sub(config.lateness_ns);
        let aligned = watermark - watermark % config.bucket_ns.max(1);
        self.closed_until = self.closed_until.max(aligned);
        self.closed_until
    }

    /// The latest event time of any observation, vouched for or not.
    pub fn latest(&self) -> EventTime {
        self.lead.max(self.max_time)
    }
}

/// Where a source of an app's data is: one exporter stream (a version, and its instance when the
/// resource names one), by the latest event time it has sent.
pub type SourceKey = (std::sync::Arc<str>, Option<std::sync::Arc<str>>);

/// The most sources followed per app; past it the stalest gives its place (a stale source does
/// not hold the watermark anyway).
pub const MAX_SOURCES_PER_APP: usize = 256;

/// The sources of one app's data, each with the latest event time it has sent. Buckets close only
/// once every active source has passed them, so a source that exports every few seconds is not
/// made late by another that exports every half second; a source silent for longer than
/// `source_idle_ns` (in the app's event time) stops holding them back.
#[derive(Clone, Debug, Default)]
pub struct SourceClocks {
    latest: std::collections::HashMap<SourceKey, EventTime>,
}

impl SourceClocks {
    /// Records that `source` sent data up to `time`.
    pub fn saw(&mut self, source: &SourceKey, time: EventTime) {
        if let Some(t) = self.latest.get_mut(source) {
            *t = (*t).max(time);
            return;
        }
        if self.latest.len() >= MAX_SOURCES_PER_APP
            && let Some(stalest) = self
                .latest
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| k.clone())
        {
            self.latest.remove(&stalest);
        }
        self.latest.insert(source.clone(), time);
    }

    /// How far every source active at `app_time` has come; `app_time` when none is behind it.
    pub fn reach(&self, app_time: EventTime, config: &WindowConfig) -> EventTime {
        let active_since = app_time.saturating_sub(config.source_idle_ns);
        self.latest
            .values()
            .copied()
            .filter(|t| *t >= active_since)
            .min()
            .map_or(app_time, |t| t.min(app_time))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// One observation at `t` as one resource's only one, then the buckets that closes.
    fn advance(clock: &mut AppClock, t: u64, config: &WindowConfig) -> u64 {
        clock.saw_resource(t, None);
        clock.close_to(clock.max_time, config)
    }

    fn config() -> WindowConfig {
        WindowConfig {
            bucket_ns: S,
            lateness_ns: 5 * S,
            window_ns: 10 * S,
            future_skew_ns: DEFAULT_FUTURE_SKEW_NS,
            source_idle_ns: 10 * S,
        }
    }

    /// Feeds (time, duration) requests in the given order; returns the closed windows' request
    /// counts and the number of late observations.
    fn check(times: &[u64]) -> (Vec<(u64, u64)>, u64) {
        let config = config();
        let mut clock = AppClock::default();
        let mut windows = VersionWindows::default();
        let mut late = 0;
        let mut closed = Vec::new();
        for t in times {
            let closed_until = clock.closed_until;
            match windows.bucket(*t, closed_until, &config) {
                Some(b) => b.all.add(1_000_000, false),
                None => late += 1,
            }
            let until = advance(&mut clock, *t, &config);
            for w in windows.close(until, 0, &config) {
                closed.push((w.start / S, w.aggregate.all.requests));
            }
        }
        (closed, late)
    }

    #[test]
    fn windows_close_when_the_watermark_passes_them() {
        let times: Vec<u64> = (0..40).map(|i| i * S / 2).collect(); // 0..20 s, two per second
        let (closed, late) = check(&times);
        // Watermark reaches 14.5 s: the window [0, 10) is closed, [10, 20) is not.
        assert_eq!(closed, vec![(0, 20)]);
        assert_eq!(late, 0);
    }

    #[test]
    fn out_of_order_within_lateness_is_exact_and_beyond_is_counted() {
        let ordered: Vec<u64> = (0..60).map(|i| i * S / 2).collect();
        let mut shuffled = ordered.clone();
        // Swap neighbours three seconds apart: within the 5 s lateness.
        for i in (0..shuffled.len() - 6).step_by(7) {
            shuffled.swap(i, i + 6);
        }
        assert_eq!(check(&ordered), check(&shuffled));
        let mut with_late = ordered.clone();
        with_late.push(2 * S); // 27.5 s seen: buckets before 22 s are closed
        assert_eq!(check(&with_late).1, 1);
    }

    #[test]
    fn times_at_the_end_of_the_range_do_not_overflow() {
        let config = config();
        let mut clock = AppClock::default();
        let mut windows = VersionWindows::default();
        for t in [u64::MAX - 1, u64::MAX] {
            let closed_until = clock.closed_until;
            windows
                .bucket(t, closed_until, &config)
                .expect("open")
                .all
                .add(1, false);
            let until = advance(&mut clock, t, &config);
            // The last bucket can never end, so nothing closes; what matters is no panic.
            assert!(windows.close(until, 0, &config).is_empty());
        }
        assert!(!windows.is_idle());
        // A window whose end is past u64::MAX closes at the end of time.
        let mut windows = VersionWindows::default();
        let late = u64::MAX - 3 * S;
        windows.bucket(late, 0, &config).expect("open").all.add(1, false);
        let closed = windows.close(u64::MAX, 0, &config);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].end, u64::MAX);
    }

    #[test]
    fn a_counter_point_counts_in_its_window_only_for_the_part_of_its_interval_there() {
        let config = config();
        let mut windows = VersionWindows::default();
        let series = SeriesKey::new("orders".into(), vec![]);
        // A cumulative point at 25 s after a gap since 5 s: 40 increments over 20 s, of which the
        // window [20, 30) holds a quarter.
        let sample = Sample::Increment {
            start: 5 * S,
            end: 25 * S,
            value: 40.0,
        };
        let bucket = windows.bucket(25 * S, 0, &config).expect("open");
        bucket.metrics.entry(series.clone()).or_default().add(&sample);
        let closed = windows.close(40 * S, 0, &config);
        let m = &closed[0].aggregate.metrics[&series];
        assert_eq!((closed[0].start, m.increment, m.increments), (20 * S, 10.0, 1));
    }

    #[test]
    fn the_first_window_after_a_restart_is_incomplete() {
        let config = config();
        let mut windows = VersionWindows::default();
        windows
            .bucket(15 * S, 0, &config)
            .expect("open")
            .all
            .add(1, false);
        windows
            .bucket(25 * S, 0, &config)
            .expect("open")
            .all
            .add(1, false);
        let closed = windows.close(30 * S, 12 * S, &config);
        assert_eq!(
            closed.iter().map(|w| w.complete).collect::<Vec<_>>(),
            vec![false, true]
        );
    }
}
