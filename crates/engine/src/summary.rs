//! One resource's requests, calls, exceptions and logs summed per bucket of event time, on the
//! thread that read its request.
//!
//! The engine is one thread that every connection's observations pass through. Adding each
//! observation there (a sketch's logarithm a request, a few small maps' lookups) makes it the
//! ceiling of ingest on many cores. A summary does that adding where the request was read, in
//! parallel, and leaves the engine to merge a few aggregates a resource: per bucket, per name.
//!
//! A summary is keyed by the observations' own names: which of them the catalog's caps fold is
//! the engine's to decide, app by app, as it merges. It keeps what the catalog counts (each
//! distinct name with its count, in the order first seen, so that caps admit names in the order
//! observations brought them) and what the app's clock reads (the two latest event times).
//! A resource is summed only where that pays: when its summary holds less memory than its
//! observations do. Otherwise (a handful of observations, or names and seconds enough to make
//! the summary bigger, as hostile input might) it goes to the engine as it came.
//!
//! Merging a summary gives the buckets what adding its observations one by one would, except the
//! latency sketches' running sums, which add in another order (equal to rounding).

use std::collections::HashMap;
use std::sync::Arc;

use crate::observation::{
    CallObservation, EventTime, ExceptionObservation, LogObservation, RequestObservation, TraceId,
};
use crate::sketch::Gathered;
use crate::window::{Aggregate, LATENCY_ACCURACY, RequestAggregate};

/// The two latest event times among observations (the latest twice when it came twice).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct LatestTwo {
    pub latest: Option<EventTime>,
    pub second: Option<EventTime>,
}

impl LatestTwo {
    pub fn saw(&mut self, time: EventTime) {
        match self.latest {
            Some(latest) if time <= latest => {
                self.second = Some(self.second.map_or(time, |s| s.max(time)));
            }
            _ => {
                self.second = self.latest;
                self.latest = Some(time);
            }
        }
    }

    /// Takes in another set's two latest: the two latest of both.
    pub fn join(&mut self, other: LatestTwo) {
        for time in [other.second, other.latest].into_iter().flatten() {
            self.saw(time);
        }
    }
}

/// The cohort of each trace's request in one resource's observations: what a call or exception
/// span without a cohort attribute of its own is attributed to (an SDK sets the attribute on the
/// request's span; its client spans and exception events mostly come in the same batch).
pub(crate) struct TraceCohorts<'a>(HashMap<TraceId, &'a Arc<str>>);

impl<'a> TraceCohorts<'a> {
    /// Empty, and nothing allocated, when no request carries a cohort. The all-zero trace id is
    /// invalid (OTLP) and never links spans.
    pub fn of(requests: &'a [RequestObservation]) -> Self {
        TraceCohorts(
            requests
                .iter()
                .filter(|r| r.trace_id != TraceId::default())
                .filter_map(|r| Some((r.trace_id, r.cohort.as_ref()?)))
                .collect(),
        )
    }

    /// A span's cohort: its own, else its trace's request's.
    pub fn cohort<'b>(&'b self, own: Option<&'b Arc<str>>, trace: &TraceId) -> Option<&'b Arc<str>> {
        own.or_else(|| self.0.get(trace).copied())
    }
}

/// A resource's observations of the kinds a summary sums (`ResourceObservations::observed`).
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    pub requests: &'a [RequestObservation],
    pub calls: &'a [CallObservation],
    pub exceptions: &'a [ExceptionObservation],
    pub logs: &'a [LogObservation],
}

/// A distinct name among a resource's observations of one kind, and how many carried it (and of
/// those, how many failed: requests only).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Tally {
    pub name: Arc<str>,
    pub count: u64,
    pub failed: u64,
}

/// What a resource's observations amount to, counted as the catalog counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Counts {
    pub requests: u64,
    pub errors: u64,
    pub calls: u64,
    pub exceptions: u64,
    pub logs: u64,
    pub error_logs: u64,
}

/// One bucket of a summary: where it starts, what its observations did (keyed by their own
/// names), and how many observations it holds (what the engine counts as late, when the bucket
/// has closed).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Bucket {
    pub start: EventTime,
    pub aggregate: Aggregate,
    pub items: u64,
}

/// A resource's requests, calls, exceptions and logs summed per bucket (see the module's doc).
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    bucket_ns: EventTime,
    /// By start, ascending.
    pub(crate) buckets: Vec<Bucket>,
    pub(crate) latest: LatestTwo,
    pub(crate) counts: Counts,
    /// Each kind's distinct names, in the order first seen.
    pub(crate) operations: Vec<Tally>,
    pub(crate) downstreams: Vec<Tally>,
    pub(crate) exception_types: Vec<Tally>,
    /// The requests' own cohorts (what the catalog caps).
    pub(crate) cohorts: Vec<Tally>,
}

/// What an aggregate holds of a name: its count, and of those, its failures.
type CountOf = fn(&Aggregate, &Arc<str>) -> (u64, u64);

/// What each entry a summary adds holds at least, before any sketch's bins: counted as the
/// summary grows, so that one that cannot pay is given up early.
const BUCKET_BYTES: usize = std::mem::size_of::<Bucket>();
const ENTRY_BYTES: usize = std::mem::size_of::<(Arc<str>, RequestAggregate)>();

impl Summary {
    /// The bucket width it was summed at.
    pub fn bucket_ns(&self) -> EventTime {
        self.bucket_ns
    }

    /// Observations it sums.
    pub fn len(&self) -> u64 {
        self.buckets.iter().map(|b| b.items).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// About the memory it holds.
    pub fn bytes(&self) -> usize {
        let tallies = (self.operations.len()
            + self.downstreams.len()
            + self.exception_types.len()
            + self.cohorts.len())
            * std::mem::size_of::<Tally>();
        std::mem::size_of::<Summary>()
            + tallies
            + self
                .buckets
                .iter()
                .map(|b| BUCKET_BYTES + b.aggregate.heap_bytes())
                .sum::<usize>()
    }

    /// `obs`' requests, calls, exceptions and logs summed per bucket of `bucket_ns`, or `None`
    /// where that would hold more memory than they do (or `bucket_ns` is 0).
    pub fn of(obs: &Observed, bucket_ns: EventTime) -> Option<Summary> {
        let budget = observation_bytes(obs);
        Summary::within(obs, bucket_ns, budget).filter(|summary| summary.bytes() < budget)
    }

    /// `obs` summed, given up once it holds `budget` bytes or more (before its sketches' bins).
    pub(crate) fn within(obs: &Observed, bucket_ns: EventTime, budget: usize) -> Option<Summary> {
        if bucket_ns == 0 || observation_count(obs) == 0 {
            return None;
        }
        let mut builder = Builder {
            bucket_ns,
            slots: Vec::new(),
            latest: LatestTwo::default(),
            counts: Counts::default(),
            operations: Vec::new(),
            downstreams: Vec::new(),
            exception_types: Vec::new(),
            cohorts: Vec::new(),
            budget,
            spent: std::mem::size_of::<Summary>(),
        };
        builder.requests(obs.requests)?;
        let trace_cohorts = TraceCohorts::of(obs.requests);
        builder.calls(obs, &trace_cohorts)?;
        builder.exceptions(obs, &trace_cohorts)?;
        builder.logs(obs)?;
        Some(builder.finish())
    }

    /// Drops every bucket that may hold an observation dated after `limit`, returning how many
    /// observations went: a summary does not know its observations' times within a bucket, so
    /// the bucket that holds `limit` goes whole, and what is left vouches for no time past the
    /// start of its last bucket. The receivers sum only resources dated within the engine's
    /// limit, so that this is never asked of what they sent.
    pub fn drop_after(&mut self, limit: EventTime) -> u64 {
        let last = self.bucket_ns - 1;
        let keep = self
            .buckets
            .partition_point(|b| b.start.saturating_add(last) <= limit);
        let dropped: u64 = self.buckets.drain(keep..).map(|b| b.items).sum();
        if dropped > 0 {
            self.recount();
            self.latest = LatestTwo::default();
            if let Some(b) = self.buckets.last() {
                for _ in 0..b.items.min(2) {
                    self.latest.saw(b.start);
                }
            }
        }
        dropped
    }

    /// The counts and tallies of what the buckets hold, after some were dropped (a tally of no
    /// observation left goes; the others keep their order).
    fn recount(&mut self) {
        let mut counts = Counts::default();
        for b in &self.buckets {
            let agg = &b.aggregate;
            counts.requests += agg.all.requests;
            counts.errors += agg.all.errors;
            counts.calls += agg.calls.values().map(|(n, _)| n).sum::<u64>();
            counts.exceptions += agg.exceptions.values().sum::<u64>();
            counts.logs += agg.logs;
            counts.error_logs += agg.error_logs;
        }
        self.counts = counts;
        let buckets = &self.buckets;
        let recount = |tallies: &mut Vec<Tally>, of: CountOf| {
            for t in tallies.iter_mut() {
                (t.count, t.failed) = buckets.iter().fold((0, 0), |(n, f), b| {
                    let (bn, bf) = of(&b.aggregate, &t.name);
                    (n + bn, f + bf)
                });
            }
            tallies.retain(|t| t.count > 0);
        };
        recount(&mut self.operations, |agg, name| {
            agg.operations
                .get(name)
                .map_or((0, 0), |o| (o.requests, o.errors))
        });
        recount(&mut self.downstreams, |agg, name| {
            (agg.calls.get(name).map_or(0, |(n, _)| *n), 0)
        });
        recount(&mut self.exception_types, |agg, name| {
            (agg.exceptions.get(name).copied().unwrap_or(0), 0)
        });
        recount(&mut self.cohorts, |agg, name| {
            (agg.cohorts.get(name).map_or(0, |c| c.all.requests), 0)
        });
    }

    /// The first and last buckets' starts.
    pub fn span(&self) -> Option<(EventTime, EventTime)> {
        Some((self.buckets.first()?.start, self.buckets.last()?.start))
    }
}

/// The observations `Summary::of` sums.
fn observation_count(obs: &Observed) -> usize {
    obs.requests.len() + obs.calls.len() + obs.exceptions.len() + obs.logs.len()
}

/// What they hold as they came (their vectors' entries; their names are shared).
pub(crate) fn observation_bytes(obs: &Observed) -> usize {
    use std::mem::size_of_val;
    size_of_val(obs.requests) + size_of_val(obs.calls) + size_of_val(obs.exceptions) + size_of_val(obs.logs)
}

/// A bucket being summed: each name's share in a slot by the name's index among its kind's
/// tallies, so that an observation finds its slot without comparing names; made into an
/// `Aggregate` (keyed by name) once every observation is in.
#[derive(Default)]
struct Slots {
    start: EventTime,
    items: u64,
    all: Requests,
    operations: Vec<Requests>,
    calls: Vec<(u64, u64)>,
    exceptions: Vec<u64>,
    cohorts: Vec<Option<Box<CohortSlots>>>,
    logs: u64,
    error_logs: u64,
}

/// A cohort's share of a bucket: its requests (with latency), its requests per operation
/// (counted without), its calls and exceptions.
#[derive(Default)]
struct CohortSlots {
    all: Requests,
    operations: Vec<(u64, u64)>,
    calls: Vec<(u64, u64)>,
    exceptions: Vec<u64>,
}

/// Requests and their latencies, gathered (`Gathered`) to be made into a `RequestAggregate`.
struct Requests {
    requests: u64,
    errors: u64,
    latency_ms: Gathered,
}

impl Default for Requests {
    fn default() -> Self {
        Requests {
            requests: 0,
            errors: 0,
            latency_ms: Gathered::new(LATENCY_ACCURACY),
        }
    }
}

impl Requests {
    fn count(&mut self, error: bool) {
        self.requests += 1;
        self.errors += u64::from(error);
    }

    /// What was gathered, as the aggregate adding each request would have made; `None` for a
    /// slot no request used.
    fn aggregate(self) -> Option<RequestAggregate> {
        (self.requests > 0).then(|| RequestAggregate {
            requests: self.requests,
            errors: self.errors,
            latency_ms: self.latency_ms.into_sketch(),
        })
    }
}

/// The slot at `index`, the slots grown to hold it; counts the slots added in `grown`.
fn slot<'a, T: Default>(slots: &'a mut Vec<T>, index: usize, grown: &mut usize) -> &'a mut T {
    if slots.len() <= index {
        *grown += index + 1 - slots.len();
        slots.resize_with(index + 1, T::default);
    }
    &mut slots[index]
}

/// Each slot in use, keyed by its tally's name.
fn named<'a, T: 'a, V>(
    slots: Vec<T>,
    tallies: &'a [Tally],
    used: impl Fn(T) -> Option<V> + 'a,
) -> impl Iterator<Item = (Arc<str>, V)> + 'a {
    slots
        .into_iter()
        .zip(tallies)
        .filter_map(move |(slot, tally)| Some((tally.name.clone(), used(slot)?)))
}

fn counted((n, failed): (u64, u64)) -> Option<(u64, u64)> {
    (n > 0).then_some((n, failed))
}

fn nonzero(n: u64) -> Option<u64> {
    (n > 0).then_some(n)
}

/// Builds a summary, giving up (`None`) once its slots, each at least a map entry's size, would
/// hold `budget` bytes or more.
struct Builder {
    bucket_ns: EventTime,
    slots: Vec<Slots>,
    latest: LatestTwo,
    counts: Counts,
    operations: Vec<Tally>,
    downstreams: Vec<Tally>,
    exception_types: Vec<Tally>,
    /// Every cohort named, the requests' own first: a call's or an exception's own cohort counts
    /// 0 here (the catalog caps the requests' cohorts).
    cohorts: Vec<Tally>,
    budget: usize,
    spent: usize,
}

impl Builder {
    fn spend(&mut self, bytes: usize) -> Option<()> {
        self.spent += bytes;
        (self.spent < self.budget).then_some(())
    }

    /// The index of the bucket of `time`, made where there was none.
    fn bucket(&mut self, time: EventTime) -> Option<usize> {
        let start = time - time % self.bucket_ns;
        // Nearly always the last bucket or one just before: a request's observations span a few.
        if let Some(i) = self.slots.iter().rposition(|b| b.start <= start)
            && self.slots[i].start == start
        {
            return Some(i);
        }
        self.spend(BUCKET_BYTES)?;
        let at = self.slots.partition_point(|b| b.start < start);
        self.slots.insert(
            at,
            Slots {
                start,
                ..Slots::default()
            },
        );
        Some(at)
    }

    /// Counts one observation named `name` among `kind`'s tallies (`counted`: it counts there);
    /// returns the name's index.
    fn tally(&mut self, kind: Kind, name: &Arc<str>, counted: bool, failed: bool) -> Option<usize> {
        let tallies = self.tallies(kind);
        // The receivers share each distinct name of a request: found by address, but for a copy.
        let found = tallies
            .iter()
            .position(|t| Arc::ptr_eq(&t.name, name))
            .or_else(|| tallies.iter().position(|t| t.name == *name));
        let i = match found {
            Some(i) => i,
            None => {
                self.spend(std::mem::size_of::<Tally>())?;
                let tallies = self.tallies(kind);
                tallies.push(Tally {
                    name: name.clone(),
                    count: 0,
                    failed: 0,
                });
                tallies.len() - 1
            }
        };
        let tally = &mut self.tallies(kind)[i];
        tally.count += u64::from(counted);
        tally.failed += u64::from(counted && failed);
        Some(i)
    }

    fn tallies(&mut self, kind: Kind) -> &mut Vec<Tally> {
        match kind {
            Kind::Operation => &mut self.operations,
            Kind::Downstream => &mut self.downstreams,
            Kind::ExceptionType => &mut self.exception_types,
            Kind::Cohort => &mut self.cohorts,
        }
    }

    /// Adds one observation to bucket `b` with `add`, which counts the slots it adds.
    fn put(&mut self, b: usize, add: impl FnOnce(&mut Slots, &mut usize)) -> Option<()> {
        let mut grown = 0;
        let slots = &mut self.slots[b];
        slots.items += 1;
        add(slots, &mut grown);
        if grown > 0 {
            self.spend(grown * ENTRY_BYTES)?;
        }
        Some(())
    }

    fn requests(&mut self, requests: &[RequestObservation]) -> Option<()> {
        for r in requests {
            self.latest.saw(r.time);
            self.counts.requests += 1;
            self.counts.errors += u64::from(r.error);
            let op = self.tally(Kind::Operation, &r.operation, true, r.error)?;
            let cohort = match &r.cohort {
                Some(c) => Some(self.tally(Kind::Cohort, c, true, false)?),
                None => None,
            };
            let b = self.bucket(r.time)?;
            self.put(b, |slots, grown| {
                // As `RequestAggregate::add` takes it.
                let latency_ms = r.duration_ns as f64 / 1e6;
                let operation = slot(&mut slots.operations, op, grown);
                operation.count(r.error);
                slots.all.count(r.error);
                slots
                    .all
                    .latency_ms
                    .add_to_both(&mut operation.latency_ms, latency_ms);
                if let Some(cohort) = cohort {
                    let cohort = slot(&mut slots.cohorts, cohort, grown).get_or_insert_with(Box::default);
                    cohort.all.count(r.error);
                    cohort.all.latency_ms.add(latency_ms);
                    let count = slot(&mut cohort.operations, op, grown);
                    count.0 += 1;
                    count.1 += u64::from(r.error);
                }
            })?;
        }
        Some(())
    }

    fn calls(&mut self, obs: &Observed, trace_cohorts: &TraceCohorts) -> Option<()> {
        for c in obs.calls {
            self.latest.saw(c.time);
            self.counts.calls += 1;
            let downstream = self.tally(Kind::Downstream, &c.downstream, true, false)?;
            let cohort = match trace_cohorts.cohort(c.cohort.as_ref(), &c.trace_id) {
                Some(name) => Some(self.tally(Kind::Cohort, name, false, false)?),
                None => None,
            };
            let b = self.bucket(c.time)?;
            self.put(b, |slots, grown| {
                let count = slot(&mut slots.calls, downstream, grown);
                count.0 += 1;
                count.1 += u64::from(c.error);
                if let Some(cohort) = cohort {
                    let cohort = slot(&mut slots.cohorts, cohort, grown).get_or_insert_with(Box::default);
                    let count = slot(&mut cohort.calls, downstream, grown);
                    count.0 += 1;
                    count.1 += u64::from(c.error);
                }
            })?;
        }
        Some(())
    }

    fn exceptions(&mut self, obs: &Observed, trace_cohorts: &TraceCohorts) -> Option<()> {
        for e in obs.exceptions {
            self.latest.saw(e.time);
            self.counts.exceptions += 1;
            let ty = self.tally(Kind::ExceptionType, &e.exception_type, true, false)?;
            let cohort = match trace_cohorts.cohort(e.cohort.as_ref(), &e.trace_id) {
                Some(name) => Some(self.tally(Kind::Cohort, name, false, false)?),
                None => None,
            };
            let b = self.bucket(e.time)?;
            self.put(b, |slots, grown| {
                *slot(&mut slots.exceptions, ty, grown) += 1;
                if let Some(cohort) = cohort {
                    let cohort = slot(&mut slots.cohorts, cohort, grown).get_or_insert_with(Box::default);
                    *slot(&mut cohort.exceptions, ty, grown) += 1;
                }
            })?;
        }
        Some(())
    }

    fn logs(&mut self, obs: &Observed) -> Option<()> {
        for l in obs.logs {
            self.latest.saw(l.time);
            let error = l.severity.is_error();
            self.counts.logs += 1;
            self.counts.error_logs += u64::from(error);
            let b = self.bucket(l.time)?;
            self.put(b, |slots, _| {
                slots.logs += 1;
                slots.error_logs += u64::from(error);
            })?;
        }
        Some(())
    }

    /// The summary: each bucket's slots in use as maps by name, and the tallies the catalog
    /// counts (cohorts named only by calls or exceptions left out).
    fn finish(self) -> Summary {
        let Builder {
            bucket_ns,
            slots,
            latest,
            counts,
            operations,
            downstreams,
            exception_types,
            cohorts,
            ..
        } = self;
        let buckets = slots
            .into_iter()
            .map(|b| {
                let cohort = |c: Option<Box<CohortSlots>>| {
                    let c = *c?;
                    let count_only = |(n, failed): (u64, u64)| {
                        (n > 0).then(|| RequestAggregate {
                            requests: n,
                            errors: failed,
                            ..RequestAggregate::default()
                        })
                    };
                    Some(Aggregate {
                        all: c.all.aggregate().unwrap_or_default(),
                        operations: named(c.operations, &operations, count_only).collect(),
                        calls: named(c.calls, &downstreams, counted).collect(),
                        exceptions: named(c.exceptions, &exception_types, nonzero).collect(),
                        ..Aggregate::default()
                    })
                };
                let aggregate = Aggregate {
                    all: b.all.aggregate().unwrap_or_default(),
                    operations: named(b.operations, &operations, Requests::aggregate).collect(),
                    cohorts: named(b.cohorts, &cohorts, cohort).collect(),
                    calls: named(b.calls, &downstreams, counted).collect(),
                    exceptions: named(b.exceptions, &exception_types, nonzero).collect(),
                    logs: b.logs,
                    error_logs: b.error_logs,
                    metrics: Default::default(),
                };
                Bucket {
                    start: b.start,
                    aggregate,
                    items: b.items,
                }
            })
            .collect();
        Summary {
            bucket_ns,
            buckets,
            latest,
            counts,
            operations,
            downstreams,
            exception_types,
            cohorts: cohorts.into_iter().filter(|t| t.count > 0).collect(),
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Operation,
    Downstream,
    ExceptionType,
    Cohort,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::observation::SpanId;

    /// A request of 2 ms to `operation` ending at `time`, in trace `[trace; 16]`.
    pub(crate) fn request(
        operation: &Arc<str>,
        time: EventTime,
        trace: u8,
        cohort: Option<&str>,
    ) -> RequestObservation {
        RequestObservation {
            operation: operation.clone(),
            time,
            duration_ns: 2_000_000,
            error: false,
            trace_id: TraceId([trace; 16]),
            span_id: SpanId([1; 8]),
            cohort: cohort.map(Into::into),
        }
    }

    /// A call or exception span without a cohort of its own takes its trace's request's; its own
    /// wins; the invalid all-zero trace id links nothing.
    #[test]
    fn a_span_without_a_cohort_takes_its_requests() {
        let op: Arc<str> = Arc::from("GET /");
        let requests = [
            request(&op, 1, 1, Some("beta")),
            request(&op, 1, 2, None),
            request(&op, 1, 0, Some("gamma")),
        ];
        let cohorts = TraceCohorts::of(&requests);
        let gamma: Arc<str> = Arc::from("gamma");
        let of = |own: Option<&Arc<str>>, trace: u8| {
            cohorts.cohort(own, &TraceId([trace; 16])).map(|c| c.to_string())
        };
        assert_eq!(of(None, 1).as_deref(), Some("beta"));
        assert_eq!(of(Some(&gamma), 1).as_deref(), Some("gamma"));
        assert_eq!(of(None, 2), None);
        assert_eq!(of(None, 3), None);
        assert_eq!(of(None, 0), None);
        assert!(TraceCohorts::of(&[request(&op, 1, 1, None)]).0.is_empty());
    }

    /// The two latest of two sets joined are the two latest of all.
    #[test]
    fn two_latest_join_as_one_set() {
        let mut rng = crate::rng::Rng::new(7);
        for _ in 0..200 {
            let times: Vec<EventTime> = (0..rng.below(6)).map(|_| rng.below(5)).collect();
            let cut = rng.below(times.len() as u64 + 1) as usize;
            let (mut all, mut left, mut right) =
                (LatestTwo::default(), LatestTwo::default(), LatestTwo::default());
            times.iter().for_each(|t| all.saw(*t));
            times[..cut].iter().for_each(|t| left.saw(*t));
            times[cut..].iter().for_each(|t| right.saw(*t));
            left.join(right);
            assert_eq!(left, all, "{times:?} cut at {cut}");
        }
    }
}
