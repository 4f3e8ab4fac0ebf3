//! The recent past of one version under analysis, for trailing windows ending at any closed second.
//!
//! The last seconds are kept one bucket each, older ones in 10-second blocks, so that a ten-minute
//! window merges about seventy aggregates rather than six hundred, and memory per version stays
//! near seventy aggregates whatever the traffic.
//!
//! A counter's increment is attributed to the time it covers, not to the second its point
//! arrived in: each increment is spread over the seconds of its interval in proportion to their
//! requests (a cumulative point after a gap in its exports spans the gap, and its increments
//! happened with the gap's requests), and each series counts, as its `exposure`, the requests of
//! the seconds its increments have covered. Increments per request are then increments over
//! exposure, both over the same time, whatever the points' spacing.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};

use crate::observation::{EventTime, SeriesKey};
use crate::packed::Names;
use crate::window::{Aggregate, MetricAggregate};

const SECOND: EventTime = 1_000_000_000;
const BLOCK: EventTime = 10 * SECOND;

/// `series`' aggregate in `agg`.
fn m_of<'a>(agg: &'a mut Aggregate, series: &SeriesKey) -> &'a mut MetricAggregate {
    agg.metrics.entry(series.clone()).or_default()
}

#[derive(Clone, Debug, Default)]
pub struct History {
    /// Closed 1-second buckets of the last `BLOCK`, by start.
    seconds: VecDeque<(EventTime, Aggregate)>,
    /// The block the latest buckets belong to, being filled.
    block: Option<(EventTime, Aggregate)>,
    /// Completed blocks, oldest first, each packed as bytes (`crate::packed`): a block no
    /// longer changes but for a counter's increment attributed late, and is read whole only
    /// when a long window's merge is made again, so it is held in a third to a fifth of an
    /// aggregate's memory, in one heap block rather than one per map and sketch.
    blocks: VecDeque<(EventTime, Box<[u8]>)>,
    /// The names the packed blocks refer to.
    names: Names,
    /// The names held after the table was last made anew: it is made anew once it holds twice
    /// that (and `NAMES_SLACK` more), so that names the blocks no longer hold do not pile up.
    names_after_compaction: usize,
    /// How far back blocks are kept.
    keep: EventTime,
    /// The requests of each second, as far back as blocks are kept.
    requests: SecondRequests,
    /// The earliest instant whose requests are known: the first bucket's start, or where the
    /// kept blocks begin. Increments over time before it are not attributed.
    known_from: Option<EventTime>,
    /// Per counter series, the time its attributed increments cover.
    covered: BTreeMap<SeriesKey, (EventTime, EventTime)>,
    /// Counts every change to the completed blocks (one added, dropped or given increments).
    blocks_changed: u64,
    /// The completed blocks each long window of the last look merged (`trailing`), kept while
    /// those blocks are unchanged: a window moves past a block only every ten seconds, so nine
    /// looks in ten merge one aggregate per window instead of up to sixty.
    merged_blocks: RefCell<Vec<MergedBlocks>>,
}

/// The merge of the newest `count` completed blocks, the newest starting at `newest`, as they
/// were at change `changed`; packed with the blocks' names (a merge of ten minutes of an
/// operation's latency holds a wide sketch), and read back once a look.
#[derive(Clone, Debug, Default)]
struct MergedBlocks {
    changed: u64,
    newest: EventTime,
    count: usize,
    merged: Box<[u8]>,
}

/// The requests of each second from `first` on, one count a second (0 for a second without),
/// oldest first. A version under analysis serves requests in most seconds, and a count a second
/// in a ring sized once for the horizon takes 4 bytes a second, where a second's start and count
/// took 16, in a deque that grew to twice the horizon.
#[derive(Clone, Debug, Default)]
struct SecondRequests {
    first: EventTime,
    counts: VecDeque<u32>,
}

impl SecondRequests {
    fn heap_bytes(&self) -> usize {
        self.counts.capacity() * std::mem::size_of::<u32>()
    }

    /// Counts `n` requests for the second starting at `start` (seconds come in time order),
    /// keeping no second more than `span` before it: older ones are trimmed before any gap is
    /// filled, so a version back after an hour's silence fills no hour of zeros. A count past
    /// `u32::MAX` in one second (beyond any ingest rate) stays at it.
    fn add(&mut self, start: EventTime, n: u64, span: EventTime) {
        let oldest = start.saturating_sub(span);
        self.trim(oldest);
        if n == 0 {
            return;
        }
        if self.counts.is_empty() || start < self.first {
            // The first second, or one out of order (never, buckets close in order): start over
            // rather than count it in the wrong second.
            self.counts.clear();
            self.first = start;
        }
        if self.counts.capacity() == 0 {
            self.counts.reserve_exact((span / SECOND) as usize + 1);
        }
        let index = ((start - self.first) / SECOND) as usize;
        while self.counts.len() <= index {
            self.counts.push_back(0);
        }
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.counts[index] = self.counts[index].saturating_add(n);
    }

    /// Forgets the seconds before `from`.
    fn trim(&mut self, from: EventTime) {
        if from <= self.first {
            return;
        }
        let drop = ((from - self.first).div_ceil(SECOND) as usize).min(self.counts.len());
        self.counts.drain(..drop);
        self.first += drop as EventTime * SECOND;
    }

    /// Each second overlapping `[from, to)` that had requests: its start and its requests.
    fn overlapping(&self, from: EventTime, to: EventTime) -> impl Iterator<Item = (EventTime, u64)> + '_ {
        // The first second that ends after `from`.
        let skip = (from.saturating_sub(self.first) / SECOND) as usize;
        self.counts
            .iter()
            .enumerate()
            .skip(skip)
            .map(|(i, n)| (self.first + i as EventTime * SECOND, u64::from(*n)))
            .take_while(move |(s, _)| *s < to)
            .filter(move |(s, n)| *n > 0 && s.saturating_add(SECOND) > from)
    }
}

/// Where a part of a trailing window is held: as an aggregate (a second, the block being
/// filled), or packed (a completed block).
enum Part<'a> {
    Held(&'a Aggregate),
    Packed(&'a [u8]),
}

/// Names a table may gain beyond twice those in use before it is made anew.
const NAMES_SLACK: usize = 64;

impl History {
    /// The completed block packed as `bytes`.
    fn unpack(names: &Names, bytes: &[u8]) -> Aggregate {
        // History packed these bytes itself with this table; the round-trip property test holds
        // what is packed to read back as it was: bytes that do not are a bug here, not input.
        names
            .unpack(bytes)
            .expect("a completed block reads back as it was packed")
    }

    /// About the memory the seconds and blocks kept hold, and apart, the long windows' merges of
    /// blocks kept for the next look.
    pub fn memory_bytes(&self) -> (usize, usize) {
        let each = std::mem::size_of::<(EventTime, Aggregate)>();
        let kept = (self.seconds.capacity() + usize::from(self.block.is_some())) * each
            + self
                .seconds
                .iter()
                .chain(self.block.iter())
                .map(|(_, agg)| agg.heap_bytes())
                .sum::<usize>()
            + self.blocks.capacity() * std::mem::size_of::<(EventTime, Box<[u8]>)>()
            + self.blocks.iter().map(|(_, bytes)| bytes.len()).sum::<usize>()
            + self.names.heap_bytes()
            + self.requests.heap_bytes();
        let merges = self
            .merged_blocks
            .borrow()
            .iter()
            .map(|m| std::mem::size_of::<MergedBlocks>() + m.merged.len())
            .sum::<usize>();
        (kept, merges)
    }

    pub fn new(keep_s: u64) -> Self {
        History {
            keep: keep_s.saturating_mul(SECOND).max(BLOCK),
            ..History::default()
        }
    }

    /// Adds the closed bucket that starts at `start`, with its counters' increments attributed
    /// to the time they cover. Buckets come in time order.
    pub fn push(&mut self, start: EventTime, bucket: &Aggregate) {
        let mut bucket = bucket.clone();
        let mut increments = Vec::new();
        for (series, m) in &mut bucket.metrics {
            for interval in m.intervals.drain(..) {
                increments.push((series.clone(), interval));
            }
            m.increment = 0.0;
        }
        self.requests.add(start, bucket.all.requests, self.keep + BLOCK);
        self.known_from.get_or_insert(start);
        self.add_bucket(start, bucket);
        for (series, (from, to, value)) in increments {
            self.attribute(&series, start, (from, to), value);
        }
    }

    fn add_bucket(&mut self, start: EventTime, mut bucket: Aggregate) {
        let block_start = start - start % BLOCK;
        match &mut self.block {
            Some((b, agg)) if *b == block_start => agg.merge(&bucket),
            _ => {
                if let Some((done_start, mut done)) = self.block.take() {
                    done.shrink_to_fit();
                    if self.blocks.capacity() == 0 {
                        // Sized once for the horizon: a deque that doubles its way there holds up
                        // to twice the blocks' room (an aggregate, about 250 bytes, a block).
                        self.blocks.reserve_exact((self.keep / BLOCK) as usize + 2);
                    }
                    let packed = self.names.pack(&done);
                    self.blocks.push_back((done_start, packed));
                    self.blocks_changed += 1;
                }
                self.block = Some((block_start, bucket.clone()));
            }
        }
        // Held as it is from here on: packed (most seconds hold few requests of each operation).
        bucket.shrink_to_fit();
        if self.seconds.capacity() == 0 {
            self.seconds.reserve_exact((BLOCK / SECOND) as usize + 1);
        }
        self.seconds.push_back((start, bucket));
        while self
            .seconds
            .front()
            .is_some_and(|(s, _)| s.saturating_add(BLOCK) <= start)
        {
            self.seconds.pop_front();
        }
        let horizon = block_start.saturating_sub(self.keep);
        while self.blocks.front().is_some_and(|(b, _)| *b < horizon) {
            self.blocks.pop_front();
            self.blocks_changed += 1;
        }
        self.compact_names();
        let kept_from = self.blocks.front().map_or(block_start, |(b, _)| *b);
        self.requests.trim(kept_from);
        if let Some(known) = &mut self.known_from {
            *known = (*known).max(kept_from);
        }
    }

    /// Makes the names' table anew, packing every block again with it, once it holds more than
    /// twice the names it held after it was last made (and `NAMES_SLACK`): names that only
    /// dropped blocks held then go, so the table stays within about twice the names in use.
    fn compact_names(&mut self) {
        if self.names.len() <= 2 * self.names_after_compaction + NAMES_SLACK {
            return;
        }
        let mut names = Names::default();
        for (_, bytes) in &mut self.blocks {
            *bytes = names.pack(&Self::unpack(&self.names, bytes));
        }
        self.names = names;
        self.names_after_compaction = self.names.len();
        // Packed with the old table: made again at the next look.
        self.merged_blocks.get_mut().clear();
    }

    /// Attributes `value`, a counter's increment over `[from, to)` that landed in the second
    /// starting at `landed`: the part of it over time before `known_from` is dropped (by time);
    /// the rest is spread over the seconds of its interval in proportion to their requests (to
    /// the second it landed in, when they had none). The requests of the seconds the interval
    /// covers for the first time count as the series' exposure.
    fn attribute(
        &mut self,
        series: &SeriesKey,
        landed: EventTime,
        (from, to): (EventTime, EventTime),
        value: f64,
    ) {
        let known = self.known_from.unwrap_or(landed);
        let start = from.max(known);
        if to <= start {
            // Zero-length, or entirely before what is known: a point's own total, or a gap's.
            if to == from && to >= known {
                self.with_parts(landed, |m| m_of(m, series).increment += value);
            }
            return;
        }
        let value = value * (to - start) as f64 / (to - from) as f64;
        let weights = self.request_weights(start, to);
        let total: f64 = weights.iter().map(|(_, w)| w).sum();
        if total > 0.0 {
            for (second, w) in weights {
                self.with_parts(second, |m| m_of(m, series).increment += value * w / total);
            }
        } else {
            self.with_parts(landed, |m| m_of(m, series).increment += value);
        }
        // Exposure for the time not covered before.
        let (newly, covered) = match self.covered.get(series) {
            None => (vec![(start, to)], (start, to)),
            Some(&(a, b)) => {
                let mut newly = Vec::new();
                if start < a {
                    newly.push((start, to.min(a)));
                }
                if to > b {
                    newly.push((start.max(b), to));
                }
                (newly, (a.min(start), b.max(to)))
            }
        };
        self.covered.insert(series.clone(), covered);
        for (lo, hi) in newly {
            for (second, w) in self.request_weights(lo, hi) {
                self.with_parts(second, |m| m_of(m, series).exposure += w);
            }
        }
    }

    /// The requests of each second overlapping `[from, to)` that had any, each weighted by the
    /// share of the second that overlaps.
    fn request_weights(&self, from: EventTime, to: EventTime) -> Vec<(EventTime, f64)> {
        self.requests
            .overlapping(from, to)
            .map(|(s, n)| {
                let overlap = to.min(s.saturating_add(SECOND)) - from.max(s);
                (s, n as f64 * overlap as f64 / SECOND as f64)
            })
            .collect()
    }

    /// Applies `f` to the second starting at `second`, where it is still kept on its own, and to
    /// its block.
    fn with_parts(&mut self, second: EventTime, f: impl Fn(&mut Aggregate)) {
        let i = self.seconds.partition_point(|(s, _)| *s < second);
        if let Some((s, agg)) = self.seconds.get_mut(i)
            && *s == second
        {
            f(agg);
        }
        let block = second - second % BLOCK;
        match &mut self.block {
            Some((b, agg)) if *b == block => f(agg),
            _ => {
                let i = self.blocks.partition_point(|(b, _)| *b < block);
                if let Some((b, bytes)) = self.blocks.get_mut(i)
                    && *b == block
                {
                    let mut agg = Self::unpack(&self.names, bytes);
                    f(&mut agg);
                    *bytes = self.names.pack(&agg);
                    self.blocks_changed += 1;
                }
            }
        }
    }

    /// What the version did in each trailing window `[now - h, now)`, for each `h` in seconds
    /// (ascending order is not required). Windows longer than a block are block-aligned at their
    /// start, so they may be up to one block shorter than asked.
    pub fn trailing(&self, now: EventTime, horizons_s: &[u64]) -> Vec<Aggregate> {
        let mut order: Vec<usize> = (0..horizons_s.len()).collect();
        order.sort_by_key(|&i| horizons_s[i]);
        let mut out = vec![Aggregate::default(); horizons_s.len()];
        // Short windows from single seconds.
        let mut acc = Aggregate::default();
        let mut secs = self.seconds.iter().rev().peekable();
        let mut long = Vec::new();
        for i in order {
            let h = horizons_s[i].saturating_mul(SECOND);
            let from = now.saturating_sub(h);
            if h <= BLOCK && long.is_empty() {
                while let Some((s, agg)) = secs.peek() {
                    if *s < from {
                        break;
                    }
                    acc.merge(agg);
                    secs.next();
                }
                out[i] = acc.clone();
            } else {
                long.push((i, from));
            }
        }
        if long.is_empty() {
            return out;
        }
        // Longer windows: whole blocks, then the block being filled.
        let newest = self.blocks.back().map_or(0, |(b, _)| *b);
        let mut cache = self.merged_blocks.borrow_mut();
        // Each merge this look uses: its count of blocks, as kept, and as read back.
        let mut fresh: Vec<(usize, Option<MergedBlocks>, Aggregate)> = Vec::with_capacity(long.len());
        for (i, from) in long {
            let count = self.blocks.iter().rev().take_while(|(b, _)| *b >= from).count();
            let at = match fresh.iter().position(|(n, _, _)| *n == count) {
                Some(at) => at,
                None => {
                    let kept = cache
                        .iter()
                        .position(|m| {
                            m.changed == self.blocks_changed && m.newest == newest && m.count == count
                        })
                        .map(|at| cache.swap_remove(at));
                    let made = match kept {
                        Some(kept) => {
                            let merged = Self::unpack(&self.names, &kept.merged);
                            (count, Some(kept), merged)
                        }
                        None => {
                            // From the longest shorter merge made here, adding the blocks it lacks.
                            let (mut merged, have) = fresh
                                .iter()
                                .filter(|(n, _, _)| *n < count)
                                .max_by_key(|(n, _, _)| *n)
                                .map_or((Aggregate::default(), 0), |(n, _, m)| (m.clone(), *n));
                            for (_, bytes) in self.blocks.iter().rev().skip(have).take(count - have) {
                                merged.merge(&Self::unpack(&self.names, bytes));
                            }
                            // Kept until a block changes, ten looks at most. Every name it holds is
                            // a block's, so the table has it; one it lacked would go unkept.
                            merged.shrink_to_fit();
                            let kept = self.names.pack_known(&merged).map(|packed| MergedBlocks {
                                changed: self.blocks_changed,
                                newest,
                                count,
                                merged: packed,
                            });
                            (count, kept, merged)
                        }
                    };
                    fresh.push(made);
                    fresh.len() - 1
                }
            };
            // The merge, and the block being filled merged into it: the same sums as the other
            // way round, each field adding two numbers.
            let mut window = fresh[at].2.clone();
            if let Some((_, block)) = &self.block {
                window.merge(block);
            }
            out[i] = window;
        }
        *cache = fresh.into_iter().filter_map(|(_, kept, _)| kept).collect();
        out
    }

    /// The closed bucket of the second starting at `start`, while it is still held on its own
    /// (the last ten seconds).
    pub fn second(&self, start: EventTime) -> Option<&Aggregate> {
        self.seconds
            .iter()
            .rev()
            .find(|(s, _)| *s == start)
            .map(|(_, a)| a)
    }

    /// The completed 10-second block starting at `start`, while it is kept.
    pub fn block(&self, start: EventTime) -> Option<Aggregate> {
        let i = self.blocks.partition_point(|(b, _)| *b < start);
        self.blocks
            .get(i)
            .filter(|(b, _)| *b == start)
            .map(|(_, bytes)| Self::unpack(&self.names, bytes))
    }

    /// What the version did in `[at - h, at)`, from the whole blocks and single seconds that end
    /// by `at`: unlike `trailing`, nothing at or after `at` is in it, whatever came since. Seconds
    /// of a block that ends after `at` and are no longer held alone are left out, so it may hold
    /// up to a block less than asked.
    pub fn before(&self, at: EventTime, horizon_s: u64) -> Aggregate {
        let from = at.saturating_sub(horizon_s.saturating_mul(SECOND));
        let mut acc = Aggregate::default();
        let mut covered_until = from;
        for (b, bytes) in &self.blocks {
            if *b >= from && b.saturating_add(BLOCK) <= at {
                acc.merge(&Self::unpack(&self.names, bytes));
                covered_until = covered_until.max(b.saturating_add(BLOCK));
            }
        }
        for (s, agg) in &self.seconds {
            if *s >= covered_until && s.saturating_add(SECOND) <= at {
                acc.merge(agg);
            }
        }
        acc
    }

    /// The pieces `trailing(now, [h])` merges: single seconds for windows up to a block, else
    /// the block being filled and whole blocks; each with its start.
    pub fn parts(&self, now: EventTime, horizon_s: u64) -> Vec<(EventTime, Cow<'_, Aggregate>)> {
        self.parts_read(now, horizon_s, Self::unpack)
    }

    /// The same parts as `parts`, but for the completed blocks' sketches, left empty: for a
    /// reader of counts alone (the stable's dispersion), which would otherwise make every sketch
    /// of the reference window's blocks.
    pub fn parts_counts(&self, now: EventTime, horizon_s: u64) -> Vec<(EventTime, Cow<'_, Aggregate>)> {
        self.parts_read(now, horizon_s, |names, bytes| {
            names
                .unpack_counts(bytes)
                .expect("a completed block reads back as it was packed")
        })
    }

    /// The start of each part `parts(now, horizon_s)` gives, in its order, and whether it is a
    /// completed block (unchanged while `changes` stays) rather than a second or the block
    /// being filled; without reading any.
    pub fn part_starts(&self, now: EventTime, horizon_s: u64) -> Vec<(EventTime, bool)> {
        self.part_places(now, horizon_s)
            .map(|(start, part)| (start, matches!(part, Part::Packed(_))))
            .collect()
    }

    /// Counts every change to the completed blocks: one added, dropped or given increments.
    pub fn changes(&self) -> u64 {
        self.blocks_changed
    }

    fn parts_read(
        &self,
        now: EventTime,
        horizon_s: u64,
        unpack: impl Fn(&Names, &[u8]) -> Aggregate,
    ) -> Vec<(EventTime, Cow<'_, Aggregate>)> {
        self.part_places(now, horizon_s)
            .map(|(start, part)| match part {
                Part::Held(agg) => (start, Cow::Borrowed(agg)),
                Part::Packed(bytes) => (start, Cow::Owned(unpack(&self.names, bytes))),
            })
            .collect()
    }

    /// Where each part of `parts(now, horizon_s)` is held.
    fn part_places(&self, now: EventTime, horizon_s: u64) -> impl Iterator<Item = (EventTime, Part<'_>)> {
        let h = horizon_s.saturating_mul(SECOND);
        let from = now.saturating_sub(h);
        let (seconds, blocks, filling) = if h <= BLOCK {
            (self.seconds.range(..), None, None)
        } else {
            (self.seconds.range(0..0), Some(&self.blocks), self.block.as_ref())
        };
        seconds
            .filter(move |(s, _)| *s >= from)
            .map(|(s, agg)| (*s, Part::Held(agg)))
            .chain(
                blocks
                    .into_iter()
                    .flatten()
                    .filter(move |(b, _)| *b >= from)
                    .map(|(b, bytes)| (*b, Part::Packed(bytes))),
            )
            .chain(filling.map(|(b, agg)| (*b, Part::Held(agg))))
    }

    /// The 10-second blocks held, oldest first, the one being filled last.
    pub fn blocks(&self) -> impl Iterator<Item = (EventTime, Cow<'_, Aggregate>)> {
        self.blocks
            .iter()
            .map(|(start, bytes)| (*start, Cow::Owned(Self::unpack(&self.names, bytes))))
            .chain(
                self.block
                    .as_ref()
                    .map(|(start, agg)| (*start, Cow::Borrowed(agg))),
            )
    }

    /// Bytes held, roughly, for memory accounting.
    pub fn len(&self) -> usize {
        self.seconds.len() + self.blocks.len() + usize::from(self.block.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(requests: u64) -> Aggregate {
        let mut a = Aggregate::default();
        for _ in 0..requests {
            a.all.add(1_000_000, false);
        }
        a
    }

    #[test]
    fn trailing_windows_count_what_they_cover() {
        let mut h = History::new(120);
        // One request per second from 0 to 299 s.
        for s in 0..300u64 {
            h.push(s * SECOND, &bucket(1));
        }
        let now = 300 * SECOND;
        let w = h.trailing(now, &[60, 5, 10, 1000]);
        assert_eq!(w[1].all.requests, 5);
        assert_eq!(w[2].all.requests, 10);
        assert_eq!(w[0].all.requests, 60);
        // Only `keep` (120 s) and the block in progress are kept.
        assert!(
            w[3].all.requests >= 120 && w[3].all.requests <= 130,
            "{}",
            w[3].all.requests
        );
        assert!(h.len() <= 10 + 14, "{}", h.len());
        // Their room was reserved once, for the horizon: not doubled past it.
        assert_eq!(h.seconds.capacity(), 11);
        assert_eq!(h.blocks.capacity(), 14);
        assert!(
            h.requests.counts.capacity() <= 131,
            "{}",
            h.requests.counts.capacity()
        );
    }

    /// Completed blocks and the long windows' kept merges no longer change, so they are held
    /// packed: each in well under half the memory of the aggregate it reads back as, and
    /// counted as what it holds.
    #[test]
    fn what_is_kept_unchanged_is_held_packed() {
        let mut h = History::new(120);
        for s in 0..200u64 {
            let mut b = Aggregate::default();
            // Latencies from 1 ms widening to 1 s within each block, so bins grow as it fills.
            for i in 0..4u64 {
                let ms = 1.0 + (s % 10 * 4 + i) as f64 * 25.0;
                b.all.add((ms * 1e6) as u64, false);
                b.operations
                    .entry("GET /".into())
                    .or_default()
                    .add((ms * 1e6) as u64, false);
            }
            h.push(s * SECOND, &b);
        }
        let w = h.trailing(200 * SECOND, &[30, 120]);
        assert_eq!(w[1].all.requests, 480);
        assert!(h.blocks.len() >= 12);
        let as_aggregate =
            |bytes: &[u8]| std::mem::size_of::<Aggregate>() + History::unpack(&h.names, bytes).heap_bytes();
        for (_, bytes) in &h.blocks {
            assert!(bytes.len() * 2 < as_aggregate(bytes), "{} bytes", bytes.len());
        }
        let merges = h.merged_blocks.borrow();
        assert!(!merges.is_empty());
        for m in merges.iter() {
            assert!(
                m.merged.len() * 2 < as_aggregate(&m.merged),
                "{} bytes",
                m.merged.len()
            );
        }
        let (held, kept_merges) = h.memory_bytes();
        let blocks: usize = h.blocks.iter().map(|(_, bytes)| bytes.len()).sum();
        assert!(held > blocks + h.names.heap_bytes());
        let packed: usize = merges
            .iter()
            .map(|m| std::mem::size_of::<MergedBlocks>() + m.merged.len())
            .sum();
        assert_eq!(kept_merges, packed);
    }

    /// What the sequential evidence reads for a second already behind the latest bucket: that
    /// second alone, and a reference that ends before it (`trailing` always ends at the latest).
    #[test]
    fn a_past_second_and_the_time_before_it_hold_nothing_from_after() {
        let mut h = History::new(120);
        // Second s has s + 1 requests, from 0 to 94 s.
        for s in 0..95u64 {
            h.push(s * SECOND, &bucket(s + 1));
        }
        for s in [85u64, 90, 94] {
            assert_eq!(h.second(s * SECOND).map(|a| a.all.requests), Some(s + 1));
        }
        assert!(
            h.second(80 * SECOND).is_none(),
            "only the last ten seconds are held alone"
        );
        // [27, 87): whole blocks from 30 s to 80 s, then the seconds still held alone up to 86 s;
        // 80 to 84 s are in a block that ends after 87 s, and no longer held alone.
        let before = h.before(87 * SECOND, 60);
        let expected: u64 = (30..80u64).chain(85..87).map(|s| s + 1).sum();
        assert_eq!(before.all.requests, expected);
        let at_block = h.before(90 * SECOND, 60);
        assert_eq!(at_block.all.requests, (30..90u64).map(|s| s + 1).sum::<u64>());
    }

    #[test]
    fn parts_merge_into_the_trailing_window() {
        let mut h = History::new(120);
        for s in 0..95u64 {
            h.push(s * SECOND, &bucket(1 + s % 3));
        }
        let now = 95 * SECOND;
        for horizon in [5, 10, 60] {
            let mut merged = Aggregate::default();
            for (_, part) in h.parts(now, horizon) {
                merged.merge(&part);
            }
            let trailing = &h.trailing(now, &[horizon])[0];
            assert_eq!(merged.all.requests, trailing.all.requests, "{horizon}");
            assert_eq!(merged.all.latency_ms, trailing.all.latency_ms, "{horizon}");
            // Read for counts alone: the same parts and counts, the completed blocks' sketches
            // left empty.
            let counts = h.parts_counts(now, horizon);
            let parts = h.parts(now, horizon);
            assert_eq!(counts.len(), parts.len());
            for ((start, counted), (part_start, part)) in counts.iter().zip(&parts) {
                assert_eq!((start, counted.all.requests), (part_start, part.all.requests));
                if horizon > 10 && *start + BLOCK <= now {
                    assert!(counted.all.latency_ms.is_empty() && !part.all.latency_ms.is_empty());
                }
            }
        }
    }

    fn orders() -> SeriesKey {
        SeriesKey::new("orders".into(), vec![])
    }

    /// `requests` in a second, and a counter point landing in it with `value` over `[from, to)`.
    fn with_point(requests: u64, from: EventTime, to: EventTime, value: f64) -> Aggregate {
        let mut a = bucket(requests);
        let m = a.metrics.entry(orders()).or_default();
        m.increment = value;
        m.increments = 1;
        m.intervals.push((from, to, value));
        a
    }

    fn orders_in(w: &Aggregate) -> (f64, f64) {
        w.metrics
            .get(&orders())
            .map_or((0.0, 0.0), |m| (m.increment, m.exposure))
    }

    #[test]
    fn a_point_after_a_gap_is_spread_over_the_requests_of_the_gap() {
        let mut h = History::new(600);
        // Four requests a second for 300 s (a busy hour), then one a second; the counter's
        // points stop at 100 s and the next comes at 400 s: 600 increments over [100, 400).
        for s in 0..400u64 {
            let requests = if s < 300 { 4 } else { 1 };
            let b = match s {
                99 => with_point(requests, 0, 100 * SECOND, 400.0),
                399 => with_point(requests, 100 * SECOND, 400 * SECOND, 1_300.0),
                _ => bucket(requests),
            };
            h.push(s * SECOND, &b);
        }
        let now = 400 * SECOND;
        // The last 100 s had 100 of the gap's 900 requests: a ninth of its increments, not all.
        let (increment, exposure) = orders_in(&h.trailing(now, &[100])[0]);
        assert!((increment - 1_300.0 / 9.0).abs() < 1e-6, "{increment}");
        assert!((exposure - 100.0).abs() < 1e-6, "{exposure}");
        // Everything covered: 1,700 increments over 1,300 requests, wherever the windows fall.
        let (increment, exposure) = orders_in(&h.trailing(now, &[600])[0]);
        assert!((increment - 1_700.0).abs() < 1e-6 && (exposure - 1_300.0).abs() < 1e-6);
        let (increment, exposure) = orders_in(&h.trailing(now, &[10])[0]);
        assert!((increment - 1_300.0 / 90.0).abs() < 1e-6 && (exposure - 10.0).abs() < 1e-6);
        // Seconds not covered yet count no exposure: the second after the point has none.
        h.push(400 * SECOND, &bucket(7));
        let (_, exposure) = orders_in(&h.trailing(401 * SECOND, &[5])[0]);
        assert!((exposure - 4.0).abs() < 1e-6, "{exposure}");
    }

    /// Every look's windows, with the merges kept from earlier looks, are the windows merged
    /// afresh: as blocks complete and drop out, and as counter points reach back into completed
    /// blocks.
    #[test]
    fn kept_merges_give_the_windows_a_fresh_merge_gives() {
        let mut h = History::new(600);
        let horizons = [5, 10, 30, 120, 300, 600, 900];
        for s in 0..1_000u64 {
            let requests = 1 + s % 7;
            let mut b = bucket(requests);
            b.all.add((5 + s % 13) * 1_000_000, s % 11 == 0);
            if s % 45 == 44 {
                // A point covering the last 45 s, most of them in completed blocks.
                b = with_point(requests, (s - 44) * SECOND, (s + 1) * SECOND, (s % 17) as f64);
            }
            h.push(s * SECOND, &b);
            let now = (s + 1) * SECOND;
            let kept = h.trailing(now, &horizons);
            let fresh = h.clone();
            fresh.merged_blocks.borrow_mut().clear();
            let afresh = fresh.trailing(now, &horizons);
            for (i, (k, f)) in kept.iter().zip(&afresh).enumerate() {
                let at = format!("{} s window at {s} s", horizons[i]);
                assert_eq!(k.all.requests, f.all.requests, "{at}");
                assert_eq!(k.all.errors, f.all.errors, "{at}");
                assert_eq!(
                    k.all.latency_ms.quantile(0.9),
                    f.all.latency_ms.quantile(0.9),
                    "{at}"
                );
                let ((ki, ke), (fi, fe)) = (orders_in(k), orders_in(f));
                assert!(
                    (ki - fi).abs() < 1e-9 && (ke - fe).abs() < 1e-9,
                    "{at}: {ki} {ke} != {fi} {fe}"
                );
            }
        }
        assert!(!h.merged_blocks.borrow().is_empty());
    }

    #[test]
    fn increments_over_time_before_the_history_are_dropped_by_time() {
        let mut h = History::new(600);
        h.push(100 * SECOND, &bucket(2));
        // A first point whose interval began 100 s before the history did: half of it is ours.
        h.push(199 * SECOND, &with_point(2, 0, 200 * SECOND, 50.0));
        let (increment, exposure) = orders_in(&h.trailing(200 * SECOND, &[600])[0]);
        assert!((increment - 25.0).abs() < 1e-6 && (exposure - 4.0).abs() < 1e-6);
    }

    #[test]
    fn gaps_in_traffic_are_just_absent() {
        let mut h = History::new(60);
        h.push(0, &bucket(3));
        h.push(25 * SECOND, &bucket(4));
        let w = h.trailing(30 * SECOND, &[10, 30]);
        assert_eq!(w[0].all.requests, 4);
        assert_eq!(w[1].all.requests, 7);
    }

    /// The per-second counts give every window the seconds, and the requests, that a list of
    /// each second with requests gives (as the history kept them before), over gaps short and
    /// long, and hold no more seconds than the horizon.
    #[test]
    fn second_counts_read_as_a_list_of_seconds_does() {
        let mut rng = crate::rng::Rng::new(3);
        let span = 60 * SECOND;
        let mut counts = SecondRequests::default();
        let mut listed: Vec<(EventTime, u64)> = Vec::new();
        let mut second = 1_000u64;
        for _ in 0..5_000 {
            second += match rng.unit() {
                u if u < 0.7 => 1,
                u if u < 0.95 => 2 + (rng.unit() * 20.0) as u64,
                _ => 50 + (rng.unit() * 200.0) as u64,
            };
            let start = second * SECOND;
            let n = (rng.unit() * 5.0) as u64;
            counts.add(start, n, span);
            if n > 0 {
                listed.push((start, n));
            }
            listed.retain(|(s, _)| *s >= start - span);
            assert!(counts.counts.len() <= 61, "{} seconds held", counts.counts.len());
            for _ in 0..3 {
                let from = start - (rng.unit() * 70.0 * SECOND as f64) as u64;
                let to = from + (rng.unit() * 30.0 * SECOND as f64) as u64;
                let got: Vec<(EventTime, u64)> = counts.overlapping(from, to).collect();
                let expected: Vec<(EventTime, u64)> = listed
                    .iter()
                    .copied()
                    .filter(|(s, _)| s + SECOND > from && *s < to && *s >= start - span)
                    .collect();
                assert_eq!(got, expected, "[{from}, {to}) at {start}");
            }
        }
    }
}
