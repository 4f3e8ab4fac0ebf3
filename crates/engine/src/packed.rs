//! Aggregates that are kept but no longer change (a completed 10-second block of an analysis's
//! history, a long window's merge of such blocks), held as one run of bytes each, their names
//! as indices into a table their holder keeps.
//!
//! A block as an `Aggregate` is some 250 bytes inline, 120 more for each operation (its name
//! and a `RequestAggregate`, whose sketch alone is 88 bytes), each sketch's bins in a heap block
//! of their own at 4 or 8 bytes a bin, and as many heap blocks as it has maps and sketches. As
//! bytes, counts are variable-length integers (a 10-second block's counts of a bin are mostly
//! one byte), each name is an index of a byte or two, and the whole block is one heap block. It
//! is read back exactly: every count, every real number to the bit, every sketch in the form its
//! bins were in (`Sketch::pack_into`), so what the judge computes from it is what it computed
//! from the aggregate. Only the capacity of its vectors differs, as after `shrink_to_fit`.
//!
//! The bytes never leave the process: a block that does not read back is a bug in this module,
//! which the round-trip property test holds it to.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::observation::SeriesKey;
use crate::sketch::Sketch;
pub use crate::varint::Unreadable;
use crate::varint::{get_f64, get_len, get_u8, get_u64, put_f64, put_u64};
use crate::vec_map::VecMap;
use crate::window::{Aggregate, LATENCY_ACCURACY, MetricAggregate, RequestAggregate};

/// Keys in the order they were first packed, each given the index of its place; a sorted index
/// finds a key's place. Append-only, so that packed bytes keep their meaning; its holder starts
/// a new table (packing again what it keeps) when the table has outgrown what is in use
/// (`History`'s compaction), which bounds it by the names its blocks hold.
#[derive(Clone, Debug)]
pub struct Table<K> {
    keys: Vec<K>,
    /// Indices into `keys`, ordered by key.
    sorted: Vec<u32>,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Table {
            keys: Vec::new(),
            sorted: Vec::new(),
        }
    }
}

impl<K: Ord + Clone> Table<K> {
    /// `key`'s index, given one if it has none.
    fn index(&mut self, key: &K) -> u64 {
        match self.sorted.binary_search_by(|&i| self.keys[i as usize].cmp(key)) {
            Ok(at) => u64::from(self.sorted[at]),
            Err(at) => {
                // A table indexes at most the names of a history's blocks, far below u32::MAX.
                let i = u32::try_from(self.keys.len()).unwrap_or(u32::MAX);
                self.keys.push(key.clone());
                self.sorted.insert(at, i);
                u64::from(i)
            }
        }
    }

    /// `key`'s index, if it has one.
    fn find(&self, key: &K) -> Option<u64> {
        self.sorted
            .binary_search_by(|&i| self.keys[i as usize].cmp(key))
            .ok()
            .map(|at| u64::from(self.sorted[at]))
    }

    fn key(&self, input: &mut &[u8]) -> Result<K, Unreadable> {
        let i = get_u64(input)?;
        usize::try_from(i)
            .ok()
            .and_then(|i| self.keys.get(i))
            .cloned()
            .ok_or(Unreadable("a name not in the table"))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn heap_bytes(&self) -> usize {
        self.keys.capacity() * std::mem::size_of::<K>() + self.sorted.capacity() * 4
    }
}

/// The names packed aggregates refer to: operations, cohorts, downstreams and exception types in
/// one table (the catalog's shared copies), metric series in another.
#[derive(Clone, Debug, Default)]
pub struct Names {
    names: Table<Arc<str>>,
    series: Table<SeriesKey>,
}

impl Names {
    /// Names held: what a holder compares with the names in use to know when to start over.
    pub fn len(&self) -> usize {
        self.names.len() + self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tables' own memory (the names' text is the catalog's, shared).
    pub fn heap_bytes(&self) -> usize {
        self.names.heap_bytes() + self.series.heap_bytes()
    }

    /// `agg` as bytes, its names indexed here.
    pub fn pack(&mut self, agg: &Aggregate) -> Box<[u8]> {
        let mut out = Vec::with_capacity(64);
        let packed = put_aggregate(&mut out, agg, self);
        debug_assert!(packed.is_some(), "a table that adds names indexes every name");
        out.into_boxed_slice()
    }

    /// `agg` as bytes, if every name it holds is indexed here already (a merge of aggregates
    /// packed with this table): for a holder that may not add names.
    pub fn pack_known(&self, agg: &Aggregate) -> Option<Box<[u8]>> {
        let mut out = Vec::with_capacity(64);
        put_aggregate(&mut out, agg, &mut Known(self))?;
        Some(out.into_boxed_slice())
    }

    /// The aggregate `bytes` were packed from, by this table.
    pub fn unpack(&self, bytes: &[u8]) -> Result<Aggregate, Unreadable> {
        self.unpack_as(bytes, Sketches::Read)
    }

    /// The aggregate `bytes` were packed from, but for its sketches, left empty (a metric's
    /// distribution absent): every count and name, for a reader of counts alone (the stable's dispersion, read at every look),
    /// without making a sketch it would not read.
    pub fn unpack_counts(&self, bytes: &[u8]) -> Result<Aggregate, Unreadable> {
        self.unpack_as(bytes, Sketches::Skip)
    }

    fn unpack_as(&self, bytes: &[u8], sketches: Sketches) -> Result<Aggregate, Unreadable> {
        let mut input = bytes;
        let agg = self.get_aggregate(&mut input, sketches)?;
        if !input.is_empty() {
            return Err(Unreadable("bytes past the aggregate"));
        }
        Ok(agg)
    }

    fn get_aggregate(&self, input: &mut &[u8], sketches: Sketches) -> Result<Aggregate, Unreadable> {
        let all = get_request(input, sketches)?;
        // At least two bytes an entry: its name's index and a count.
        let mut operations = Vec::with_capacity(get_len(input, 2)?);
        for _ in 0..operations.capacity() {
            operations.push((self.names.key(input)?, get_request(input, sketches)?));
        }
        let mut cohorts = Vec::with_capacity(get_len(input, 2)?);
        for _ in 0..cohorts.capacity() {
            cohorts.push((self.names.key(input)?, self.get_aggregate(input, sketches)?));
        }
        let mut calls = Vec::with_capacity(get_len(input, 3)?);
        for _ in 0..calls.capacity() {
            calls.push((self.names.key(input)?, (get_u64(input)?, get_u64(input)?)));
        }
        let mut exceptions = Vec::with_capacity(get_len(input, 2)?);
        for _ in 0..exceptions.capacity() {
            exceptions.push((self.names.key(input)?, get_u64(input)?));
        }
        let logs = get_u64(input)?;
        let error_logs = get_u64(input)?;
        let mut metrics = BTreeMap::new();
        for _ in 0..get_len(input, 2)? {
            let series = self.series.key(input)?;
            metrics.insert(series, get_metric(input, sketches)?);
        }
        Ok(Aggregate {
            all,
            operations: VecMap::from_sorted(operations).ok_or(Unreadable("operations out of order"))?,
            cohorts: VecMap::from_sorted(cohorts).ok_or(Unreadable("cohorts out of order"))?,
            calls: VecMap::from_sorted(calls).ok_or(Unreadable("calls out of order"))?,
            exceptions: VecMap::from_sorted(exceptions).ok_or(Unreadable("exceptions out of order"))?,
            logs,
            error_logs,
            metrics,
        })
    }
}

/// How packing gives a name its index: adding the names a table lacks (`Names`), or finding
/// only those it has (`Known`).
trait Indexer {
    fn name(&mut self, name: &Arc<str>) -> Option<u64>;
    fn series(&mut self, series: &SeriesKey) -> Option<u64>;
}

impl Indexer for Names {
    fn name(&mut self, name: &Arc<str>) -> Option<u64> {
        Some(self.names.index(name))
    }

    fn series(&mut self, series: &SeriesKey) -> Option<u64> {
        Some(self.series.index(series))
    }
}

struct Known<'a>(&'a Names);

impl Indexer for Known<'_> {
    fn name(&mut self, name: &Arc<str>) -> Option<u64> {
        self.0.names.find(name)
    }

    fn series(&mut self, series: &SeriesKey) -> Option<u64> {
        self.0.series.find(series)
    }
}

/// Appends `agg`, its names indexed by `index`; `None` where one has no index.
fn put_aggregate(out: &mut Vec<u8>, agg: &Aggregate, index: &mut impl Indexer) -> Option<()> {
    put_request(out, &agg.all);
    put_u64(out, agg.operations.len() as u64);
    for (name, op) in &agg.operations {
        put_u64(out, index.name(name)?);
        put_request(out, op);
    }
    put_u64(out, agg.cohorts.len() as u64);
    for (name, cohort) in &agg.cohorts {
        put_u64(out, index.name(name)?);
        put_aggregate(out, cohort, index)?;
    }
    put_u64(out, agg.calls.len() as u64);
    for (name, (calls, failed)) in &agg.calls {
        put_u64(out, index.name(name)?);
        put_u64(out, *calls);
        put_u64(out, *failed);
    }
    put_u64(out, agg.exceptions.len() as u64);
    for (name, n) in &agg.exceptions {
        put_u64(out, index.name(name)?);
        put_u64(out, *n);
    }
    put_u64(out, agg.logs);
    put_u64(out, agg.error_logs);
    put_u64(out, agg.metrics.len() as u64);
    for (series, m) in &agg.metrics {
        put_u64(out, index.series(series)?);
        put_metric(out, m);
    }
    Some(())
}

fn put_request(out: &mut Vec<u8>, r: &RequestAggregate) {
    put_u64(out, r.requests);
    put_u64(out, r.errors);
    r.latency_ms.pack_into(out);
}

/// Whether a reader makes the sketches it reads past.
#[derive(Clone, Copy)]
enum Sketches {
    Read,
    Skip,
}

impl Sketches {
    fn get(self, input: &mut &[u8]) -> Result<Option<Sketch>, Unreadable> {
        match self {
            Sketches::Read => Sketch::unpack_from(input).map(Some),
            Sketches::Skip => Sketch::skip_from(input).map(|()| None),
        }
    }
}

fn get_request(input: &mut &[u8], sketches: Sketches) -> Result<RequestAggregate, Unreadable> {
    let requests = get_u64(input)?;
    let errors = get_u64(input)?;
    let latency_ms = sketches
        .get(input)?
        .unwrap_or_else(|| Sketch::new(LATENCY_ACCURACY));
    Ok(RequestAggregate {
        requests,
        errors,
        latency_ms,
    })
}

/// Which of a metric aggregate's real numbers are not zero (a zero's bits are not written).
const INCREMENT: u8 = 1;
const EXPOSURE: u8 = 2;
const LEVEL_SUM: u8 = 4;
const DISTRIBUTION: u8 = 8;

fn put_metric(out: &mut Vec<u8>, m: &MetricAggregate) {
    let written = |x: f64| x.to_bits() != 0;
    let flags = (if written(m.increment) { INCREMENT } else { 0 })
        | (if written(m.exposure) { EXPOSURE } else { 0 })
        | (if written(m.level_sum) { LEVEL_SUM } else { 0 })
        | (if m.distribution.is_some() { DISTRIBUTION } else { 0 });
    out.push(flags);
    for (flag, x) in [
        (INCREMENT, m.increment),
        (EXPOSURE, m.exposure),
        (LEVEL_SUM, m.level_sum),
    ] {
        if flags & flag != 0 {
            put_f64(out, x);
        }
    }
    put_u64(out, m.increments);
    put_u64(out, m.levels);
    put_u64(out, m.intervals.len() as u64);
    for (from, to, value) in &m.intervals {
        put_u64(out, *from);
        put_u64(out, *to);
        put_f64(out, *value);
    }
    if let Some(d) = &m.distribution {
        d.pack_into(out);
    }
}

fn get_metric(input: &mut &[u8], sketches: Sketches) -> Result<MetricAggregate, Unreadable> {
    let flags = get_u8(input)?;
    let mut real = |flag: u8| -> Result<f64, Unreadable> {
        if flags & flag != 0 {
            get_f64(input)
        } else {
            Ok(0.0)
        }
    };
    let increment = real(INCREMENT)?;
    let exposure = real(EXPOSURE)?;
    let level_sum = real(LEVEL_SUM)?;
    let increments = get_u64(input)?;
    let levels = get_u64(input)?;
    let mut intervals = Vec::with_capacity(get_len(input, 10)?);
    for _ in 0..intervals.capacity() {
        intervals.push((get_u64(input)?, get_u64(input)?, get_f64(input)?));
    }
    let distribution = if flags & DISTRIBUTION != 0 {
        sketches.get(input)?
    } else {
        None
    };
    Ok(MetricAggregate {
        increment,
        increments,
        intervals,
        exposure,
        level_sum,
        levels,
        distribution,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A sketch in any of its states: values of either sign, zeros, whole or fractional weights,
    /// decayed, at latency's accuracy or another, packed or as it was filled.
    fn sketch() -> impl Strategy<Value = Sketch> {
        (
            prop_oneof![Just(0.01), Just(0.02), 0.001f64..0.2],
            prop::collection::vec(
                (
                    prop_oneof![
                        4 => 0.5f64..5_000.0,
                        1 => -100.0f64..-0.01,
                        1 => Just(0.0),
                        1 => 1e6f64..1e12,
                    ],
                    prop_oneof![4 => Just(1.0), 1 => (1u32..1_000u32).prop_map(f64::from), 1 => 0.01f64..10.0],
                ),
                0..120,
            ),
            prop::option::of(0.1f64..1.0),
            any::<bool>(),
        )
            .prop_map(|(accuracy, values, decay, pack)| {
                let mut s = Sketch::new(accuracy);
                for (v, w) in values {
                    s.add_weighted(v, w);
                }
                if let Some(factor) = decay {
                    s.decay(factor);
                }
                if pack {
                    s.shrink_to_fit();
                }
                s
            })
    }

    fn request() -> impl Strategy<Value = RequestAggregate> {
        ((0u64..1 << 60), 0u64..1_000, sketch()).prop_map(|(requests, errors, latency_ms)| RequestAggregate {
            requests,
            errors,
            latency_ms,
        })
    }

    fn name() -> impl Strategy<Value = Arc<str>> {
        prop_oneof![
            Just("GET /api/v1/resource3/{id}"),
            Just("GET /api/v1/resource4/{id}"),
            Just("payments"),
            Just(""),
            Just("é"),
        ]
        .prop_map(Arc::from)
    }

    fn metric() -> impl Strategy<Value = MetricAggregate> {
        let real = prop_oneof![Just(0.0), Just(-0.0), -1e9f64..1e9, Just(f64::NAN)];
        (
            (real.clone(), (0u64..1 << 60), real.clone(), real, (0u64..1 << 60)),
            prop::collection::vec(((0u64..1 << 60), (0u64..1 << 60), -1e6f64..1e6), 0..3),
            prop::option::of(sketch()),
        )
            .prop_map(
                |((increment, increments, exposure, level_sum, levels), intervals, distribution)| {
                    MetricAggregate {
                        increment,
                        increments,
                        intervals,
                        exposure,
                        level_sum,
                        levels,
                        distribution,
                    }
                },
            )
    }

    fn aggregate(cohorts: bool) -> BoxedStrategy<Aggregate> {
        let cohort = if cohorts {
            prop::collection::vec((name(), aggregate(false)), 0..3).boxed()
        } else {
            Just(Vec::new()).boxed()
        };
        let series = (
            prop_oneof![Just("orders"), Just("queue.depth")],
            prop::collection::vec(("[a-c]", "[x-z]{0,2}"), 0..2),
        )
            .prop_map(|(n, attributes)| SeriesKey::new(n.into(), attributes));
        (
            request(),
            prop::collection::vec((name(), request()), 0..6),
            cohort,
            prop::collection::vec((name(), ((0u64..1 << 60), 0u64..10)), 0..3),
            prop::collection::vec((name(), (0u64..1 << 60)), 0..3),
            ((0u64..1 << 60), (0u64..1 << 60)),
            prop::collection::vec((series, metric()), 0..3),
        )
            .prop_map(
                |(all, operations, cohorts, calls, exceptions, (logs, error_logs), metrics)| Aggregate {
                    all,
                    operations: operations.into_iter().collect(),
                    cohorts: cohorts.into_iter().collect(),
                    calls: calls.into_iter().collect(),
                    exceptions: exceptions.into_iter().collect(),
                    logs,
                    error_logs,
                    metrics: metrics.into_iter().collect(),
                },
            )
            .boxed()
    }

    /// `agg` with every sketch empty, as a reader of counts gives it.
    fn without_sketches(agg: &mut Aggregate) {
        agg.all.latency_ms = Sketch::new(LATENCY_ACCURACY);
        for op in agg.operations.values_mut() {
            op.latency_ms = Sketch::new(LATENCY_ACCURACY);
        }
        for cohort in agg.cohorts.values_mut() {
            without_sketches(cohort);
        }
        for m in agg.metrics.values_mut() {
            m.distribution = None;
        }
    }

    proptest! {
        /// What is packed reads back exactly: every field to the bit and every sketch's bins in
        /// their form (the debug form shows both), so that merging it, and everything the judge
        /// reads from it, is what it was; and several aggregates packed with one table each
        /// read back so.
        #[test]
        fn what_is_packed_reads_back_exactly(
            aggs in prop::collection::vec(aggregate(true), 1..4),
            into in aggregate(true),
        ) {
            let mut names = Names::default();
            let packed: Vec<Box<[u8]>> = aggs.iter().map(|a| names.pack(a)).collect();
            // Packed again by a table that only finds names: the same bytes, since each name
            // is known now; a table that knows none refuses any aggregate with a name.
            for (agg, bytes) in aggs.iter().zip(&packed) {
                prop_assert_eq!(names.pack_known(agg), Some(bytes.clone()));
                let named = !agg.operations.is_empty()
                    || !agg.cohorts.is_empty()
                    || !agg.calls.is_empty()
                    || !agg.exceptions.is_empty()
                    || !agg.metrics.is_empty();
                prop_assert_eq!(Names::default().pack_known(agg).is_none(), named);
            }
            for (agg, bytes) in aggs.iter().zip(&packed) {
                let read = names.unpack(bytes);
                prop_assert!(read.is_ok(), "{read:?}");
                let read = read.unwrap_or_default();
                prop_assert_eq!(format!("{read:?}"), format!("{agg:?}"));
                let mut merged_read = into.clone();
                merged_read.merge(&read);
                let mut merged = into.clone();
                merged.merge(agg);
                prop_assert_eq!(format!("{merged_read:?}"), format!("{merged:?}"));
                // Read for its counts alone: the same but for sketches left empty.
                let counts = names.unpack_counts(bytes).unwrap_or_default();
                let mut emptied = agg.clone();
                without_sketches(&mut emptied);
                prop_assert_eq!(format!("{counts:?}"), format!("{emptied:?}"));
                // Every shorter cut is unreadable, never a panic or another aggregate.
                for end in [0, bytes.len() / 2, bytes.len().saturating_sub(1)] {
                    if end < bytes.len() {
                        prop_assert!(names.unpack(&bytes[..end]).is_err());
                        prop_assert!(names.unpack_counts(&bytes[..end]).is_err());
                    }
                }
            }
        }
    }

    #[test]
    fn an_aggregate_cut_short_is_unreadable_not_a_panic() {
        let names = Names::default();
        let agg = Names::default().pack(&Aggregate::default());
        assert!(names.unpack(&agg).is_ok());
        for end in 0..agg.len() {
            assert!(names.unpack(&agg[..end]).is_err(), "{end}");
        }
    }
}
