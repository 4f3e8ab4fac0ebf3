//! A mergeable quantile sketch with relative-error guarantees (DDSketch).
//!
//! Values fall into logarithmic bins: bin `i` holds values in `(gamma^(i-1), gamma^i]` with
//! `gamma = (1 + a) / (1 - a)`, so any quantile is answered within relative error `a` of a value
//! that was inserted. Negative values use a mirrored set of bins; values closer to zero than
//! `MIN_MAGNITUDE` count as zero. Weights are real numbers so that a summary can be decayed (old
//! weeks count less). Sketches with the same accuracy merge exactly: merging is adding bins, so the
//! order in which observations arrive never changes the result.
//!
//! Bins are held from the lowest to the highest index used. When a side would exceed
//! `MAX_BINS`, its lowest bins are folded together, which keeps the upper quantiles (the ones
//! latency cares about) exact to the guarantee. Whole-number counts over a wide span with few bins
//! in use are held sparse, as index and count of each: most sketches of a second or a block of
//! history count few requests. A sketch kept but no longer added to packs its bins
//! (`shrink_to_fit`).

use serde::{Deserialize, Serialize};

use crate::varint::{self, Unreadable};

/// Magnitudes below this are counted as zero.
const MIN_MAGNITUDE: f64 = 1e-9;
/// The most a sketch's total weight may reach for its bins to be kept as 4-byte counts: no bin
/// can then hold more.
const MAX_WHOLE: f64 = u32::MAX as f64;
/// The accuracy a packed sketch does not write (that of latency sketches, which history holds).
const PACKED_ACCURACY: f64 = 0.01;
/// Whole numbers below this are exact as `f64`, and so read back from a varint exactly.
const WHOLE_EXACT: f64 = 9_007_199_254_740_992.0;
/// A packed sketch's flags: what it writes beyond its bins.
const PACKED_DEFAULT_ACCURACY: u8 = 1;
const PACKED_ZERO: u8 = 2;
const PACKED_COUNT: u8 = 4;
const PACKED_WHOLE_COUNT: u8 = 32;
const PACKED_NO_RANGE: u8 = 8;
const PACKED_ONE_VALUE: u8 = 16;
/// Most bins per side. At 1% accuracy, 2048 bins span about 18 orders of magnitude.
const MAX_BINS: usize = 2048;

/// The bins of one side, in one of three forms. A sketch is filled in whole-number counts, as
/// counts of requests are: while few bins are in use over a wide span, as index and count of each
/// (`Sparse`, 8 bytes a bin in use: a second's latency of a quiet operation is a few requests
/// over a hundred bins), then as 4-byte counts from the lowest index used to the highest
/// (`Counts`). It turns to real weights (`Dense`, 8 bytes a bin) only when a weight that is not a
/// whole number comes (a decayed baseline, a histogram's fractional count) or the counts could
/// pass `u32::MAX`. One that is kept but no longer grows (a completed block of history, a kept
/// merge) is packed (`Bins::pack`): its span trimmed to the bins in use, in the smaller of the
/// two whole-number forms, and its spare capacity given back.
#[derive(Clone, Debug)]
enum Bins {
    Dense {
        /// Index of `counts[0]`.
        offset: i32,
        counts: Vec<f64>,
    },
    /// Whole-number weights from `offset` on, one per bin over the span.
    Counts { offset: i32, counts: Vec<u32> },
    /// The bins in use, ascending, with their whole-number weights.
    Sparse(Vec<(i32, u32)>),
}

impl Default for Bins {
    fn default() -> Self {
        Bins::Sparse(Vec::new())
    }
}

/// Bins in use that a sparse form holds however wide their span: as many as the smallest
/// allocation of either form holds.
const FEW_BINS: usize = 4;

/// Whether `in_use` bins over `span` cost no more as index and count of each (8 bytes) than as a
/// count for every bin of the span (4 bytes), or are few; and the span is within the cap that the
/// counts fold at, so that either form folds alike.
fn sparse_pays(in_use: usize, span: usize) -> bool {
    span <= MAX_BINS && (in_use <= FEW_BINS || in_use * 2 <= span)
}

/// Bins in use from which a sketch still being added to is held as counts over its span wherever
/// those cost at most twice its sparse form. A busy operation's second fills its body's bins
/// early and its tails' few seldom, so it would otherwise stay sparse through thousands of values
/// (a uniform 1-51 ms spread sat at 80-98 of its 197 bins), each found by a binary search of six
/// or more steps; as counts, each lands by its offset. Packing (`Bins::pack`) takes the smaller
/// form again once it is kept.
const BUSY_BINS: usize = 64;

/// Whether a sketch being added to keeps `in_use` bins over `span` sparse: where that pays
/// (`sparse_pays`), unless they are many and dense enough (`BUSY_BINS`). (Two sparse sketches
/// merged in one pass are kept as memory alone says: they are not added to value by value.)
fn sparse_while_adding(in_use: usize, span: usize) -> bool {
    sparse_pays(in_use, span) && !(in_use >= BUSY_BINS && span <= 4 * in_use)
}

/// Whole-number bins `sparse` (ascending) as counts over their span.
fn counts_of(sparse: &[(i32, u32)]) -> (i32, Vec<u32>) {
    match (sparse.first(), sparse.last()) {
        (Some(&(first, _)), Some(&(last, _))) => {
            let mut counts = vec![0; (last - first) as usize + 1];
            for &(i, c) in sparse {
                counts[(i - first) as usize] = c;
            }
            (first, counts)
        }
        _ => (0, Vec::new()),
    }
}

/// Adds `weight` at `index` to the bins `counts` that start at `offset`, growing the span as
/// needed; past `MAX_BINS`, the lowest bins are folded into one. The caller makes sure that no
/// sum can overflow `T`.
fn add_within<T>(offset: &mut i32, counts: &mut Vec<T>, index: i32, weight: T)
where
    T: Copy + Default + std::ops::AddAssign + std::iter::Sum,
{
    if counts.is_empty() {
        *offset = index;
        counts.push(weight);
        return;
    }
    if index < *offset {
        let grow = (*offset - index) as usize;
        if counts.len() + grow > MAX_BINS {
            // Past the cap: the value joins the lowest bin kept.
            counts[0] += weight;
            return;
        }
        counts.splice(0..0, std::iter::repeat_n(T::default(), grow));
        *offset = index;
    }
    let at = (index - *offset) as usize;
    if at >= counts.len() {
        counts.resize(at + 1, T::default());
        if counts.len() > MAX_BINS {
            let fold = counts.len() - MAX_BINS;
            let folded: T = counts.drain(..fold).sum();
            counts[0] += folded;
            *offset += fold as i32;
        }
    }
    let at = (index - *offset) as usize;
    counts[at] += weight;
}

impl Bins {
    /// The real-weight form of these bins: the lowest index in use, and the weights from it on.
    fn unpacked(&self) -> (i32, Vec<f64>) {
        let mut offset = 0;
        let mut counts = Vec::new();
        for (i, c) in self.iter() {
            if counts.is_empty() {
                offset = i;
            }
            counts.resize((i - offset) as usize, 0.0);
            counts.push(c);
        }
        (offset, counts)
    }

    /// The bins as real weights, converting whole-number ones.
    fn dense(&mut self) -> (&mut i32, &mut Vec<f64>) {
        if !matches!(self, Bins::Dense { .. }) {
            let (offset, counts) = self.unpacked();
            *self = Bins::Dense { offset, counts };
        }
        match self {
            Bins::Dense { offset, counts } => (offset, counts),
            Bins::Counts { .. } | Bins::Sparse(_) => unreachable!("converted above"),
        }
    }

    /// Adds `weight` at `index`. `whole` says that `weight` is a whole number and that the
    /// sketch's total with it stays within `u32::MAX`, so that no bin can overflow a count.
    fn add(&mut self, index: i32, weight: f64, whole: bool) {
        if whole && let Bins::Sparse(bins) = self {
            let at = match bins.binary_search_by_key(&index, |(i, _)| *i) {
                Ok(at) => {
                    bins[at].1 += weight as u32;
                    return;
                }
                Err(at) => at,
            };
            let first = bins.first().map_or(index, |b| b.0.min(index));
            let last = bins.last().map_or(index, |b| b.0.max(index));
            if sparse_while_adding(bins.len() + 1, (last - first) as usize + 1) {
                bins.insert(at, (index, weight as u32));
                return;
            }
            let (offset, counts) = counts_of(bins);
            *self = Bins::Counts { offset, counts };
        }
        if whole && let Bins::Counts { offset, counts } = self {
            add_within(offset, counts, index, weight as u32);
            return;
        }
        let (offset, counts) = self.dense();
        add_within(offset, counts, index, weight);
    }

    /// Adds every bin of `other`; `fits` says that the sums stay within `u32::MAX`. Two sparse
    /// forms of like size merge in one pass, the result staying sparse where that pays
    /// (`sparse_pays`); a few bins (a second's requests of one export) are added one by one,
    /// without copying the many they join.
    fn merge(&mut self, other: &Bins, fits: bool) {
        if fits
            && let (Bins::Sparse(mine), Bins::Sparse(theirs)) = (&mut *self, other)
            && theirs.len() * 8 > mine.len()
        {
            let mut merged = Vec::with_capacity(mine.len() + theirs.len());
            let (mut a, mut b) = (mine.iter().peekable(), theirs.iter().peekable());
            loop {
                let next = match (a.peek(), b.peek()) {
                    (Some(&&(i, x)), Some(&&(j, y))) if i == j => {
                        a.next();
                        b.next();
                        (i, x + y)
                    }
                    (Some(&&x), Some(&&y)) if x.0 < y.0 => {
                        a.next();
                        x
                    }
                    (_, Some(&&y)) => {
                        b.next();
                        y
                    }
                    (Some(&&x), None) => {
                        a.next();
                        x
                    }
                    (None, None) => break,
                };
                merged.push(next);
            }
            let span = match (merged.first(), merged.last()) {
                (Some(f), Some(l)) => (l.0 - f.0) as usize + 1,
                _ => 0,
            };
            if sparse_pays(merged.len(), span) {
                *mine = merged;
                return;
            }
            if span <= MAX_BINS {
                let (offset, counts) = counts_of(&merged);
                *self = Bins::Counts { offset, counts };
                return;
            }
        }
        if fits && let Bins::Counts { offset, counts } = self {
            // A small sketch merged into a whole-number span (a second's requests into its
            // bucket): each bin added where it falls, as `add` would, without the generic walk.
            match other {
                Bins::Sparse(theirs) => {
                    for &(i, c) in theirs.iter().filter(|(_, c)| *c > 0) {
                        add_within(offset, counts, i, c);
                    }
                    return;
                }
                Bins::Counts {
                    offset: from,
                    counts: theirs,
                } => {
                    for (at, &c) in theirs.iter().enumerate().filter(|(_, c)| **c > 0) {
                        add_within(offset, counts, from + at as i32, c);
                    }
                    return;
                }
                Bins::Dense { .. } => {}
            }
        }
        for (i, c) in other.iter() {
            self.add(i, c, fits && c.fract() == 0.0);
        }
    }

    fn total(&self) -> f64 {
        self.iter().map(|(_, c)| c).sum()
    }

    /// The bins in use (weight above zero), ascending by index.
    fn iter(&self) -> impl DoubleEndedIterator<Item = (i32, f64)> + '_ {
        // Two of the three are empty: one chain walks any form.
        let (offset, dense, whole, sparse) = match self {
            Bins::Dense { offset, counts } => (*offset, counts.as_slice(), &[][..], &[][..]),
            Bins::Counts { offset, counts } => (*offset, &[][..], &counts[..], &[][..]),
            Bins::Sparse(bins) => (0, &[][..], &[][..], &bins[..]),
        };
        let at = move |(i, c): (usize, f64)| (offset + i as i32, c);
        let dense = dense.iter().copied().enumerate().map(at);
        let whole = whole.iter().map(|c| f64::from(*c)).enumerate().map(at);
        let sparse = sparse.iter().map(|(i, c)| (*i, f64::from(*c)));
        dense.chain(whole).chain(sparse).filter(|(_, c)| *c > 0.0)
    }

    fn scale(&mut self, factor: f64) {
        self.dense().1.iter_mut().for_each(|c| *c *= factor);
    }

    /// Trims the span to the bins in use and gives back spare capacity; real weights that are all
    /// whole numbers become counts; whole-number bins take the smaller of their two forms.
    fn pack(&mut self) {
        let (start, used): (i32, Vec<u32>) = match self {
            Bins::Sparse(bins) => {
                bins.shrink_to_fit();
                return;
            }
            Bins::Counts { offset, counts } => {
                let Some(first) = counts.iter().position(|c| *c > 0) else {
                    *self = Bins::default();
                    return;
                };
                let last = counts.iter().rposition(|c| *c > 0).unwrap_or(first);
                counts.truncate(last + 1);
                counts.drain(..first);
                *offset += first as i32;
                (*offset, std::mem::take(counts))
            }
            Bins::Dense { offset, counts } => {
                let Some(first) = counts.iter().position(|c| *c > 0.0) else {
                    *self = Bins::default();
                    return;
                };
                let last = counts.iter().rposition(|c| *c > 0.0).unwrap_or(first);
                let used = &counts[first..=last];
                let whole = used
                    .iter()
                    .all(|c| *c >= 0.0 && c.fract() == 0.0 && *c <= f64::from(u32::MAX));
                if !whole {
                    counts.shrink_to_fit();
                    return;
                }
                (*offset + first as i32, used.iter().map(|c| *c as u32).collect())
            }
        };
        let in_use = used.iter().filter(|c| **c > 0).count();
        // Each form's bytes: 4 per bin of the span, or 8 per bin in use.
        *self = if in_use * 8 < used.len() * 4 {
            let mut bins: Vec<(i32, u32)> = used
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| (start + i as i32, *c))
                .collect();
            bins.shrink_to_fit();
            Bins::Sparse(bins)
        } else {
            let mut counts = used;
            counts.shrink_to_fit();
            Bins::Counts {
                offset: start,
                counts,
            }
        };
    }

    /// Bins kept, used or not (the span, or the bins in use of a sparse form).
    #[cfg(test)]
    fn len(&self) -> usize {
        match self {
            Bins::Dense { counts, .. } => counts.len(),
            Bins::Counts { counts, .. } => counts.len(),
            Bins::Sparse(bins) => bins.len(),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Bins::Dense { counts, .. } => counts.capacity() * std::mem::size_of::<f64>(),
            Bins::Counts { counts, .. } => counts.capacity() * std::mem::size_of::<u32>(),
            Bins::Sparse(bins) => bins.capacity() * std::mem::size_of::<(i32, u32)>(),
        }
    }
}

/// A form's tag in a packed sketch (`Sketch::pack_into`); `NO_BINS` for negative bins never used.
const SPARSE: u8 = 0;
const COUNTS: u8 = 1;
const DENSE: u8 = 2;
const NO_BINS: u8 = 3;

impl Bins {
    fn form(&self) -> u8 {
        match self {
            Bins::Sparse(_) => SPARSE,
            Bins::Counts { .. } => COUNTS,
            Bins::Dense { .. } => DENSE,
        }
    }

    /// Appends the bins in their own form: a sparse form's indices as steps from the one before
    /// and its counts as varints, counts over a span as varints (a bin's count in a block is
    /// mostly under 128: a byte), real weights to the bit.
    fn pack_into(&self, out: &mut Vec<u8>) {
        match self {
            Bins::Sparse(bins) => {
                varint::put_u64(out, bins.len() as u64);
                let mut previous = 0i64;
                for &(i, c) in bins {
                    varint::put_i64(out, i64::from(i) - previous);
                    varint::put_u64(out, u64::from(c));
                    previous = i64::from(i);
                }
            }
            Bins::Counts { offset, counts } => {
                varint::put_i64(out, i64::from(*offset));
                varint::put_u64(out, counts.len() as u64);
                for &c in counts {
                    varint::put_u64(out, u64::from(c));
                }
            }
            Bins::Dense { offset, counts } => {
                varint::put_i64(out, i64::from(*offset));
                varint::put_u64(out, counts.len() as u64);
                for &c in counts {
                    varint::put_f64(out, c);
                }
            }
        }
    }

    /// A span's offset and weights, each weight at least `each` bytes, read by `get`.
    fn unpack_span<T>(
        input: &mut &[u8],
        each: usize,
        get: impl Fn(&mut &[u8]) -> Result<T, Unreadable>,
    ) -> Result<(i32, Vec<T>), Unreadable> {
        let offset = varint::get_i32(input)?;
        let mut weights = Vec::with_capacity(varint::get_len(input, each)?);
        for _ in 0..weights.capacity() {
            weights.push(get(input)?);
        }
        Ok((offset, weights))
    }

    /// Reads past the bins `pack_into` wrote in form `form`, keeping nothing.
    fn skip_from(form: u8, input: &mut &[u8]) -> Result<(), Unreadable> {
        let (numbers, reals) = match form {
            SPARSE => (2 * varint::get_len(input, 2)?, 0),
            COUNTS => {
                varint::get_i32(input)?;
                (varint::get_len(input, 1)?, 0)
            }
            DENSE => {
                varint::get_i32(input)?;
                (0, varint::get_len(input, 8)?)
            }
            _ => return Err(Unreadable("a bins' form unknown")),
        };
        for _ in 0..numbers {
            varint::get_u64(input)?;
        }
        *input = input.get(reals * 8..).ok_or(Unreadable("bins cut short"))?;
        Ok(())
    }

    /// The bins `pack_into` wrote in form `form`, their vectors holding no spare room.
    fn unpack_from(form: u8, input: &mut &[u8]) -> Result<Bins, Unreadable> {
        Ok(match form {
            SPARSE => {
                let mut bins = Vec::with_capacity(varint::get_len(input, 2)?);
                let mut previous = 0i64;
                for _ in 0..bins.capacity() {
                    let i = previous.saturating_add(varint::get_i64(input)?);
                    let index = i32::try_from(i).map_err(|_| Unreadable("a bin's index out of range"))?;
                    bins.push((index, varint::get_u32(input)?));
                    previous = i;
                }
                Bins::Sparse(bins)
            }
            COUNTS => {
                let (offset, counts) = Self::unpack_span(input, 1, varint::get_u32)?;
                Bins::Counts { offset, counts }
            }
            DENSE => {
                let (offset, counts) = Self::unpack_span(input, 8, varint::get_f64)?;
                Bins::Dense { offset, counts }
            }
            _ => return Err(Unreadable("a bins' form unknown")),
        })
    }
}

/// Equal when the same bins hold the same weights, whatever their form.
impl PartialEq for Bins {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

/// Stored as the dense form always (`offset`, `counts`), so that what is on disk does not depend
/// on whether a sketch was packed.
#[derive(Serialize, Deserialize)]
struct StoredBins<'a> {
    offset: i32,
    counts: std::borrow::Cow<'a, [f64]>,
}

impl Serialize for Bins {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Bins::Dense { offset, counts } => StoredBins {
                offset: *offset,
                counts: std::borrow::Cow::Borrowed(counts),
            }
            .serialize(serializer),
            Bins::Counts { .. } | Bins::Sparse(_) => {
                let (offset, counts) = self.unpacked();
                StoredBins {
                    offset,
                    counts: std::borrow::Cow::Owned(counts),
                }
                .serialize(serializer)
            }
        }
    }
}

impl<'de> Deserialize<'de> for Bins {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = StoredBins::deserialize(deserializer)?;
        Ok(Bins::Dense {
            offset: stored.offset,
            counts: stored.counts.into_owned(),
        })
    }
}

/// Bins that most sketches never use (latency is never negative), held behind a pointer that
/// stays empty until they are: history keeps some twenty sketches per series, so a second set of
/// bins in each costs more than a few hundred bytes a series. Stored as the `Bins` it stands for.
#[derive(Clone, Debug, Default)]
struct RareBins(Option<Box<Bins>>);

impl RareBins {
    fn add(&mut self, index: i32, weight: f64, whole: bool) {
        self.0.get_or_insert_with(Box::default).add(index, weight, whole);
    }

    fn iter(&self) -> impl DoubleEndedIterator<Item = (i32, f64)> + '_ {
        self.0.iter().flat_map(|bins| bins.iter())
    }

    fn total(&self) -> f64 {
        self.0.as_ref().map_or(0.0, |bins| bins.total())
    }

    fn scale(&mut self, factor: f64) {
        if let Some(bins) = &mut self.0 {
            bins.scale(factor);
        }
    }

    fn pack(&mut self) {
        if let Some(bins) = &mut self.0 {
            bins.pack();
            if bins.iter().next().is_none() {
                self.0 = None;
            }
        }
    }

    fn heap_bytes(&self) -> usize {
        self.0
            .as_ref()
            .map_or(0, |bins| std::mem::size_of::<Bins>() + bins.heap_bytes())
    }
}

impl PartialEq for RareBins {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Serialize for RareBins {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(bins) => bins.serialize(serializer),
            None => Bins::default().serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for RareBins {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bins = Bins::deserialize(deserializer)?;
        let used = bins.iter().next().is_some();
        Ok(RareBins(used.then(|| Box::new(bins))))
    }
}

/// The logarithm of the bins' ratio at `relative_accuracy`.
fn ln_gamma(relative_accuracy: f64) -> f64 {
    // A logarithm saved for each value added: nearly every sketch a thread adds to has the
    // accuracy of the one before it.
    thread_local! {
        static LAST: std::cell::Cell<(f64, f64)> = const { std::cell::Cell::new((f64::NAN, f64::NAN)) };
    }
    LAST.with(|last| {
        let (accuracy, ln_gamma) = last.get();
        if accuracy == relative_accuracy {
            return ln_gamma;
        }
        let a = relative_accuracy;
        let ln_gamma = ((1.0 + a) / (1.0 - a)).ln();
        last.set((a, ln_gamma));
        ln_gamma
    })
}

/// The bin of `magnitude` (positive) at `relative_accuracy`.
fn bin_index(relative_accuracy: f64, magnitude: f64) -> i32 {
    (magnitude.ln() / ln_gamma(relative_accuracy)).ceil() as i32
}

/// Non-negative values gathered for a sketch made at once (`into_sketch`): each value's bin is
/// found as it comes, and the bins are counted in one sort when the sketch is made, which for a
/// few values is cheaper than inserting each into sorted bins. The sketch is the one adding each
/// value in turn would give.
#[derive(Clone, Debug)]
pub struct Gathered {
    relative_accuracy: f64,
    bins: Vec<i32>,
    /// Values that no bin of `bins` holds: zero (and, should one come, negative or not finite),
    /// added as they are when the sketch is made.
    others: Vec<f64>,
    sum: f64,
    min: f64,
    max: f64,
}

impl Gathered {
    pub fn new(relative_accuracy: f64) -> Gathered {
        Gathered {
            relative_accuracy: Sketch::new(relative_accuracy).relative_accuracy,
            bins: Vec::new(),
            others: Vec::new(),
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    pub fn add(&mut self, value: f64) {
        if !value.is_finite() {
            // As the sketch ignores it.
            return;
        }
        match self.bin_of(value) {
            Some(bin) => self.add_at(value, bin),
            None => {
                // Summed here, in the order values came, as the sketch sums them.
                self.total(value);
                self.others.push(value);
            }
        }
    }

    /// Adds `value` to this and to `other`, its bin found once where both have one accuracy.
    pub fn add_to_both(&mut self, other: &mut Gathered, value: f64) {
        match self.bin_of(value) {
            Some(bin) if other.relative_accuracy == self.relative_accuracy => {
                self.add_at(value, bin);
                other.add_at(value, bin);
            }
            _ => {
                self.add(value);
                other.add(value);
            }
        }
    }

    /// The bin of a positive value, as the sketch would find it.
    fn bin_of(&self, value: f64) -> Option<i32> {
        (value.is_finite() && value > MIN_MAGNITUDE).then(|| bin_index(self.relative_accuracy, value))
    }

    fn add_at(&mut self, value: f64, bin: i32) {
        self.bins.push(bin);
        self.total(value);
    }

    fn total(&mut self, value: f64) {
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// The sketch of every value gathered.
    pub fn into_sketch(mut self) -> Sketch {
        let lowest = self.bins.iter().min().copied().unwrap_or(0);
        let highest = self.bins.iter().max().copied().unwrap_or(0);
        let values = self.bins.len() as f64;
        if (highest - lowest) as usize >= MAX_BINS || values + self.others.len() as f64 > MAX_WHOLE {
            // Past the span the bins fold at, or past whole counts: bin by bin in the order they
            // came, as adding each value folds them.
            let mut sketch = Sketch::new(self.relative_accuracy);
            for &bin in &self.bins {
                let whole = sketch.count + 1.0 <= MAX_WHOLE;
                sketch.positive.add(bin, 1.0, whole);
                sketch.count += 1.0;
            }
            for value in self.others {
                sketch.add(value);
            }
            // Every value's, in the order they came, as adding each would have summed them.
            sketch.sum = self.sum;
            sketch.min = self.min;
            sketch.max = self.max;
            return sketch;
        }
        let mut sketch = Sketch::new(self.relative_accuracy);
        self.bins.sort_unstable();
        let mut counted: Vec<(i32, u32)> = Vec::new();
        for &bin in &self.bins {
            match counted.last_mut() {
                Some((last, n)) if *last == bin => *n += 1,
                _ => counted.push((bin, 1)),
            }
        }
        let span = match (counted.first(), counted.last()) {
            (Some(f), Some(l)) => (l.0 - f.0) as usize + 1,
            _ => 0,
        };
        sketch.positive = if sparse_pays(counted.len(), span) {
            Bins::Sparse(counted)
        } else {
            let (offset, counts) = counts_of(&counted);
            Bins::Counts { offset, counts }
        };
        sketch.count = values;
        for value in self.others {
            sketch.add(value);
        }
        sketch.sum = self.sum;
        sketch.min = self.min;
        sketch.max = self.max;
        sketch
    }
}

/// A DDSketch over real values with real-valued weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sketch {
    relative_accuracy: f64,
    positive: Bins,
    negative: RareBins,
    zero: f64,
    count: f64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Sketch {
    /// A sketch answering quantiles within `relative_accuracy` (e.g. 0.01 for 1%).
    pub fn new(relative_accuracy: f64) -> Sketch {
        let relative_accuracy = if relative_accuracy.is_finite() {
            relative_accuracy.clamp(1e-4, 0.5)
        } else {
            0.01
        };
        Sketch {
            relative_accuracy,
            positive: Bins::default(),
            negative: RareBins::default(),
            zero: 0.0,
            count: 0.0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    fn ln_gamma(&self) -> f64 {
        ln_gamma(self.relative_accuracy)
    }

    fn index(&self, magnitude: f64) -> i32 {
        bin_index(self.relative_accuracy, magnitude)
    }

    /// The representative value of bin `index`: within the relative accuracy of all its members.
    fn value(&self, index: i32) -> f64 {
        let gamma = self.ln_gamma().exp();
        2.0 * (self.ln_gamma() * index as f64).exp() / (gamma + 1.0)
    }

    pub fn add(&mut self, value: f64) {
        self.add_weighted(value, 1.0);
    }

    /// Adds `value` with `weight`; non-finite values and non-positive weights are ignored.
    pub fn add_weighted(&mut self, value: f64, weight: f64) {
        if !value.is_finite() || !weight.is_finite() || weight <= 0.0 {
            return;
        }
        let whole = weight.fract() == 0.0 && self.count + weight <= MAX_WHOLE;
        if value > MIN_MAGNITUDE {
            let i = self.index(value);
            self.positive.add(i, weight, whole);
        } else if value < -MIN_MAGNITUDE {
            let i = self.index(-value);
            self.negative.add(i, weight, whole);
        } else {
            self.zero += weight;
        }
        self.count += weight;
        self.sum += value * weight;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Adds every value of `other`. Sketches of different accuracy merge approximately (each of
    /// `other`'s bins is re-binned by its representative value).
    pub fn merge(&mut self, other: &Sketch) {
        if other.count <= 0.0 {
            return;
        }
        if other.relative_accuracy == self.relative_accuracy {
            let fits = self.count + other.count <= MAX_WHOLE;
            self.positive.merge(&other.positive, fits);
            if let Some(theirs) = &other.negative.0
                && theirs.iter().next().is_some()
            {
                self.negative
                    .0
                    .get_or_insert_with(Box::default)
                    .merge(theirs, fits);
            }
            self.zero += other.zero;
            self.count += other.count;
            self.sum += other.sum;
            self.min = self.min.min(other.min);
            self.max = self.max.max(other.max);
        } else {
            for (i, c) in other.positive.iter() {
                self.add_weighted(other.value(i), c);
            }
            for (i, c) in other.negative.iter() {
                self.add_weighted(-other.value(i), c);
            }
            self.add_weighted(0.0, other.zero);
        }
    }

    /// Multiplies every weight by `factor` in (0, 1]: older data counts less.
    pub fn decay(&mut self, factor: f64) {
        if !(factor.is_finite() && factor > 0.0 && factor <= 1.0) {
            return;
        }
        self.positive.scale(factor);
        self.negative.scale(factor);
        self.zero *= factor;
        self.count *= factor;
        self.sum *= factor;
    }

    /// Total weight (the number of values, when undecayed).
    pub fn count(&self) -> f64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count <= 0.0
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    pub fn min(&self) -> Option<f64> {
        (self.count > 0.0).then_some(self.min)
    }

    pub fn max(&self) -> Option<f64> {
        (self.count > 0.0).then_some(self.max)
    }

    /// The `q`-quantile (0..=1), within the relative accuracy; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 || !q.is_finite() {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        if q == 0.0 {
            return Some(self.min);
        }
        if q == 1.0 {
            return Some(self.max);
        }
        let total = self.negative.total() + self.zero + self.positive.total();
        let rank = q * total;
        let mut seen = 0.0;
        // From the most negative value up: negative bins by falling magnitude, zero, positive.
        for (i, c) in self.negative.iter().rev() {
            seen += c;
            if seen >= rank {
                return Some((-self.value(i)).clamp(self.min, self.max));
            }
        }
        seen += self.zero;
        if seen >= rank && self.zero > 0.0 {
            return Some(0.0);
        }
        for (i, c) in self.positive.iter() {
            seen += c;
            if seen >= rank {
                return Some(self.value(i).clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    /// Weight of the values that lie above `value`'s bin: the values certainly larger than it, up
    /// to the sketch's accuracy. Two sketches of one accuracy bin a threshold alike, so their counts
    /// above it compare exactly.
    pub fn count_above(&self, value: f64) -> f64 {
        if self.count <= 0.0 || !value.is_finite() {
            return 0.0;
        }
        let positive = |from: i32| -> f64 {
            self.positive
                .iter()
                .filter(|(i, _)| *i > from)
                .map(|(_, c)| c)
                .sum()
        };
        if value > MIN_MAGNITUDE {
            positive(self.index(value))
        } else if value < -MIN_MAGNITUDE {
            let below: f64 = self
                .negative
                .iter()
                .filter(|(i, _)| *i < self.index(-value))
                .map(|(_, c)| c)
                .sum();
            below + self.zero + self.positive.total()
        } else {
            self.positive.total()
        }
    }

    /// Gives back the bins' spare capacity: for a sketch that is kept but no longer grows (a
    /// completed block of history, a kept merge), whose bins a merge's doubling left up to twice
    /// as long as their span. Bins are trimmed to those in use, and bins of whole-number weights
    /// take the smaller of 4-byte counts over the span or index and count of each bin in use
    /// (real weights if the sketch is decayed).
    pub fn shrink_to_fit(&mut self) {
        self.positive.pack();
        self.negative.pack();
    }

    /// Bytes on the heap, for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        self.positive.heap_bytes() + self.negative.heap_bytes()
    }

    /// The weight the sketch's bins and zero hold: its count, unless weights were scaled or
    /// summed in another order (a packed sketch then writes its count).
    fn bins_total(&self) -> f64 {
        self.zero + self.positive.total() + self.negative.total()
    }

    /// Appends this sketch as bytes that `unpack_from` reads back exactly: each field to the bit,
    /// the bins in the form they are in (so that merging the sketch read back takes the same
    /// path). What is implied is not written: the accuracy of latency sketches, a zero of zeros,
    /// a count that its bins sum to, an empty sketch's range, one value's sum, min and max.
    pub(crate) fn pack_into(&self, out: &mut Vec<u8>) {
        let same = |a: f64, b: f64| a.to_bits() == b.to_bits();
        let mut flags = 0;
        if same(self.relative_accuracy, PACKED_ACCURACY) {
            flags |= PACKED_DEFAULT_ACCURACY;
        }
        if !same(self.zero, 0.0) {
            flags |= PACKED_ZERO;
        }
        // A count of requests is a whole number: a varint of a byte or three, and nothing to sum
        // when read back.
        let whole_count = self.count >= 0.0 && self.count < WHOLE_EXACT && self.count.fract() == 0.0;
        if whole_count && !same(self.count, -0.0) {
            flags |= PACKED_WHOLE_COUNT;
        } else if !same(self.count, self.bins_total()) {
            flags |= PACKED_COUNT;
        }
        if same(self.min, f64::INFINITY) && same(self.max, f64::NEG_INFINITY) && same(self.sum, 0.0) {
            flags |= PACKED_NO_RANGE;
        } else if same(self.min, self.max) && same(self.sum, self.min) {
            flags |= PACKED_ONE_VALUE;
        }
        let negative = self.negative.0.as_deref().map_or(NO_BINS, Bins::form);
        out.push(flags);
        out.push(self.positive.form() | negative << 2);
        if flags & PACKED_DEFAULT_ACCURACY == 0 {
            varint::put_f64(out, self.relative_accuracy);
        }
        if flags & PACKED_ZERO != 0 {
            varint::put_f64(out, self.zero);
        }
        if flags & PACKED_WHOLE_COUNT != 0 {
            varint::put_u64(out, self.count as u64);
        } else if flags & PACKED_COUNT != 0 {
            varint::put_f64(out, self.count);
        }
        if flags & PACKED_NO_RANGE == 0 {
            varint::put_f64(out, self.sum);
            if flags & PACKED_ONE_VALUE == 0 {
                varint::put_f64(out, self.min);
                varint::put_f64(out, self.max);
            }
        }
        self.positive.pack_into(out);
        if let Some(bins) = &self.negative.0 {
            bins.pack_into(out);
        }
    }

    /// Reads past the sketch `pack_into` wrote, keeping nothing: for a reader of counts alone.
    pub(crate) fn skip_from(input: &mut &[u8]) -> Result<(), Unreadable> {
        let flags = varint::get_u8(input)?;
        let forms = varint::get_u8(input)?;
        // In the order written: the accuracy and zero, the count, then the range.
        let skip = |input: &mut &[u8], reals: usize| -> Result<(), Unreadable> {
            *input = input.get(reals * 8..).ok_or(Unreadable("a sketch cut short"))?;
            Ok(())
        };
        skip(
            input,
            usize::from(flags & PACKED_DEFAULT_ACCURACY == 0) + usize::from(flags & PACKED_ZERO != 0),
        )?;
        if flags & PACKED_WHOLE_COUNT != 0 {
            varint::get_u64(input)?;
        } else if flags & PACKED_COUNT != 0 {
            skip(input, 1)?;
        }
        let range = match (flags & PACKED_NO_RANGE != 0, flags & PACKED_ONE_VALUE != 0) {
            (true, _) => 0,
            (false, true) => 1,
            (false, false) => 3,
        };
        skip(input, range)?;
        Bins::skip_from(forms & 3, input)?;
        if forms >> 2 != NO_BINS {
            Bins::skip_from(forms >> 2, input)?;
        }
        Ok(())
    }

    /// The sketch `pack_into` wrote, advancing `input` past it.
    pub(crate) fn unpack_from(input: &mut &[u8]) -> Result<Sketch, Unreadable> {
        let flags = varint::get_u8(input)?;
        let forms = varint::get_u8(input)?;
        let relative_accuracy = if flags & PACKED_DEFAULT_ACCURACY != 0 {
            PACKED_ACCURACY
        } else {
            varint::get_f64(input)?
        };
        let zero = if flags & PACKED_ZERO != 0 {
            varint::get_f64(input)?
        } else {
            0.0
        };
        let count = if flags & PACKED_WHOLE_COUNT != 0 {
            Some(varint::get_u64(input)? as f64)
        } else if flags & PACKED_COUNT != 0 {
            Some(varint::get_f64(input)?)
        } else {
            None
        };
        let (sum, min, max) = if flags & PACKED_NO_RANGE != 0 {
            (0.0, f64::INFINITY, f64::NEG_INFINITY)
        } else if flags & PACKED_ONE_VALUE != 0 {
            let value = varint::get_f64(input)?;
            (value, value, value)
        } else {
            (
                varint::get_f64(input)?,
                varint::get_f64(input)?,
                varint::get_f64(input)?,
            )
        };
        let positive = Bins::unpack_from(forms & 3, input)?;
        let negative = match forms >> 2 {
            NO_BINS => RareBins(None),
            form => RareBins(Some(Box::new(Bins::unpack_from(form, input)?))),
        };
        let mut sketch = Sketch {
            relative_accuracy,
            positive,
            negative,
            zero,
            count: 0.0,
            sum,
            min,
            max,
        };
        sketch.count = count.unwrap_or_else(|| sketch.bins_total());
        Ok(sketch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_above_counts_whole_bins_past_the_value() {
        let mut s = Sketch::new(0.01);
        for v in 1..=100 {
            s.add(v as f64);
        }
        assert_eq!(s.count_above(50.0), 50.0);
        assert_eq!(s.count_above(0.0), 100.0);
        assert_eq!(s.count_above(1000.0), 0.0);
        s.add(-5.0);
        assert_eq!(s.count_above(-10.0), 101.0);
    }

    fn exact_quantile(sorted: &[f64], q: f64) -> f64 {
        let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
        sorted[rank - 1]
    }

    #[test]
    fn quantiles_are_within_the_relative_accuracy() {
        let mut sketch = Sketch::new(0.01);
        let mut values: Vec<f64> = (1..=10_000).map(|i| (i as f64 * 0.37).powf(1.7) + 0.5).collect();
        for v in &values {
            sketch.add(*v);
        }
        values.sort_by(f64::total_cmp);
        for q in [0.01, 0.05, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999] {
            let want = exact_quantile(&values, q);
            let got = sketch.quantile(q).expect("not empty");
            assert!(
                (got - want).abs() <= 0.0101 * want,
                "q{q}: got {got}, want {want}"
            );
        }
    }

    #[test]
    fn negative_zero_and_positive_values_keep_their_order() {
        let mut sketch = Sketch::new(0.01);
        for v in [-100.0, -1.0, 0.0, 0.0, 1.0, 100.0] {
            sketch.add(v);
        }
        let q = |q| sketch.quantile(q).expect("not empty");
        assert!((q(0.1) + 100.0).abs() < 1.01);
        assert!((q(0.3) + 1.0).abs() < 0.0101);
        assert_eq!(q(0.5), 0.0);
        assert!((q(0.95) - 100.0).abs() < 1.01);
        assert_eq!(sketch.quantile(0.0), Some(-100.0));
        assert_eq!(sketch.quantile(1.0), Some(100.0));
    }

    #[test]
    fn merging_equals_inserting_everything_in_one() {
        let mut a = Sketch::new(0.01);
        let mut b = Sketch::new(0.01);
        let mut both = Sketch::new(0.01);
        for i in 0..500 {
            let v = 1.0 + i as f64;
            if i % 3 == 0 {
                a.add(v)
            } else {
                b.add(v)
            }
            both.add(v);
        }
        a.merge(&b);
        for q in [0.1, 0.5, 0.99] {
            assert_eq!(a.quantile(q), both.quantile(q));
        }
        assert_eq!(a.count(), both.count());
    }

    #[test]
    fn decay_lowers_the_weight_of_the_past() {
        let mut sketch = Sketch::new(0.02);
        for _ in 0..100 {
            sketch.add(10.0);
        }
        sketch.decay(0.01);
        for _ in 0..100 {
            sketch.add(1000.0);
        }
        let median = sketch.quantile(0.5).expect("not empty");
        assert!((median - 1000.0).abs() < 20.0, "{median}");
        assert!((sketch.count() - 101.0).abs() < 1e-9);
    }

    #[test]
    fn garbage_in_is_ignored() {
        let mut sketch = Sketch::new(0.01);
        sketch.add(f64::NAN);
        sketch.add(f64::INFINITY);
        sketch.add_weighted(3.0, -1.0);
        assert!(sketch.is_empty());
        assert_eq!(sketch.quantile(0.5), None);
    }

    #[test]
    fn a_wide_range_stays_within_the_bin_cap() {
        let mut sketch = Sketch::new(0.01);
        for e in -30..30 {
            sketch.add(10f64.powi(e));
        }
        assert!(sketch.positive.len() <= MAX_BINS);
        let p99 = sketch.quantile(0.99).expect("not empty");
        assert!((p99 / 1e29 - 1.0).abs() < 0.0101, "{p99}");
    }

    /// A sketch of `values`, each with `weight`.
    fn sketch_of(values: &[f64], weight: f64) -> Sketch {
        let mut sketch = Sketch::new(0.01);
        for v in values {
            sketch.add_weighted(*v, weight);
        }
        sketch
    }

    /// `a` and `b` hold the same bins, answer every quantile and count above a value alike, and
    /// are stored as the same bytes.
    fn answers_and_stores_alike(a: &Sketch, b: &Sketch) -> Result<(), proptest::test_runner::TestCaseError> {
        proptest::prop_assert_eq!(a, b);
        for q in [0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0] {
            proptest::prop_assert_eq!(a.quantile(q), b.quantile(q));
        }
        for v in [-100.0, 0.0, 1.0, 20.0, 1e3] {
            proptest::prop_assert_eq!(a.count_above(v), b.count_above(v));
        }
        proptest::prop_assert_eq!(
            serde_json::to_string(a).expect("serializes"),
            serde_json::to_string(b).expect("serializes")
        );
        Ok(())
    }

    proptest::proptest! {
        #[test]
        fn a_packed_sketch_answers_and_stores_as_the_dense_one(
            values in proptest::collection::vec(
                proptest::prop_oneof![-1e4..1e4f64, 0.5..60.0f64, proptest::strategy::Just(0.0)],
                0..300,
            ),
            weight in proptest::prop_oneof![proptest::strategy::Just(1.0), proptest::strategy::Just(3.0), 0.1..2.0f64],
            more in proptest::collection::vec(0.5..5e3f64, 0..20),
        ) {
            let dense = sketch_of(&values, weight);
            let mut packed = dense.clone();
            packed.shrink_to_fit();
            // Stored exactly as the dense form, so that the disk does not see the difference.
            answers_and_stores_alike(&packed, &dense)?;
            // Merged from, or added to and merged into, it gives what the dense one gives.
            let other = sketch_of(&more, 1.0);
            let (mut into_dense, mut into_packed) = (other.clone(), other.clone());
            into_dense.merge(&dense);
            into_packed.merge(&packed);
            proptest::prop_assert_eq!(&into_packed, &into_dense);
            let (mut dense_grown, mut packed_grown) = (dense.clone(), packed.clone());
            dense_grown.merge(&other);
            packed_grown.merge(&other);
            proptest::prop_assert_eq!(&packed_grown, &dense_grown);
            for q in [0.01, 0.5, 0.99] {
                proptest::prop_assert_eq!(packed_grown.quantile(q), dense_grown.quantile(q));
            }
            // Never larger than the dense bins it came from.
            proptest::prop_assert!(packed.heap_bytes() <= dense.heap_bytes());
        }
    }

    proptest::proptest! {
        #[test]
        fn a_sketch_filled_in_counts_answers_and_stores_as_one_of_real_weights(
            values in proptest::collection::vec(
                proptest::prop_oneof![-1e4..1e4f64, 0.5..60.0f64, proptest::strategy::Just(0.0)],
                0..300,
            ),
            // Large weights pass `u32::MAX` in total within a few values: the counts must turn
            // to real weights before any bin overflows.
            weight in proptest::prop_oneof![
                proptest::strategy::Just(1.0),
                proptest::strategy::Just(7.0),
                proptest::strategy::Just(f64::from(1u32 << 30)),
            ],
            more in proptest::collection::vec(0.5..5e3f64, 0..20),
        ) {
            let counted = sketch_of(&values, weight);
            // Both sides in real weights from the start: adding keeps them so.
            let mut real = Sketch::new(0.01);
            real.positive = Bins::Dense { offset: 0, counts: Vec::new() };
            real.negative = RareBins(Some(Box::new(real.positive.clone())));
            for v in &values {
                real.add_weighted(*v, weight);
            }
            let real_dense = matches!(real.positive, Bins::Dense { .. });
            proptest::prop_assert!(real_dense, "real weights");
            if weight == 1.0 {
                let in_counts = matches!(counted.positive, Bins::Counts { .. } | Bins::Sparse(_));
                proptest::prop_assert!(in_counts, "counts");
            }
            answers_and_stores_alike(&counted, &real)?;
            let other = sketch_of(&more, weight);
            let (mut into_counted, mut into_real) = (counted.clone(), real.clone());
            into_counted.merge(&other);
            into_real.merge(&other);
            proptest::prop_assert_eq!(&into_counted, &into_real);
            let (mut from_counted, mut from_real) = (other.clone(), other.clone());
            from_counted.merge(&counted);
            from_real.merge(&real);
            proptest::prop_assert_eq!(&from_counted, &from_real);
            if matches!(counted.positive, Bins::Counts { .. }) {
                // The same span, in 4-byte counts where real weights take 8. (Not compared by
                // capacity: a busy sketch turns to counts early and grows by doubling after.)
                proptest::prop_assert_eq!(counted.positive.len(), real.positive.len());
            }
        }
    }

    proptest::proptest! {
        /// Sketches filled in whole counts (sparse while few bins are in use, counts over the
        /// span after) and merged, as buckets roll into windows and blocks, hold what sketches of
        /// real weights built the same way hold: also past the cap on bins, where they fold.
        #[test]
        fn sketches_of_counts_merge_as_sketches_of_real_weights(
            chunks in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::prop_oneof![
                        0.5..60.0f64,
                        1e-7..1e13f64,
                        proptest::strategy::Just(12.0),
                        -50.0..-0.5f64,
                    ],
                    0..40,
                ),
                1..8,
            ),
        ) {
            let real_sketch = || {
                let mut real = Sketch::new(0.01);
                real.positive = Bins::Dense { offset: 0, counts: Vec::new() };
                real.negative = RareBins(Some(Box::new(real.positive.clone())));
                real
            };
            let mut counted = Sketch::new(0.01);
            let mut real = real_sketch();
            for chunk in &chunks {
                let mut part = real_sketch();
                for v in chunk {
                    part.add(*v);
                }
                counted.merge(&sketch_of(chunk, 1.0));
                real.merge(&part);
            }
            proptest::prop_assert!(matches!(real.positive, Bins::Dense { .. }), "real weights");
            answers_and_stores_alike(&counted, &real)?;
            // Sparse only where that pays.
            if let Bins::Sparse(bins) = &counted.positive
                && let (Some(first), Some(last)) = (bins.first(), bins.last())
            {
                proptest::prop_assert!(sparse_pays(bins.len(), (last.0 - first.0) as usize + 1));
            }
            proptest::prop_assert!(!matches!(counted.positive, Bins::Dense { .. }), "whole counts stay counts");
        }
    }

    /// A second of a quiet operation: a few requests far apart in latency are held as index
    /// and count of each while being counted, not as a count for every bin between them.
    #[test]
    fn few_requests_over_a_wide_span_are_counted_sparse() {
        let mut sketch = sketch_of(&[1.0, 250.0, 3_000.0], 1.0);
        assert!(matches!(sketch.positive, Bins::Sparse(_)));
        assert_eq!(sketch.heap_bytes(), FEW_BINS * 8);
        let median = sketch.quantile(0.5).expect("not empty");
        assert!((median / 250.0 - 1.0).abs() <= 0.01, "{median}");
        // Filled in, the span's counts are smaller, and it turns to them.
        for i in 0..3_000 {
            sketch.add(1.0 + i as f64);
        }
        assert!(matches!(sketch.positive, Bins::Counts { .. }));
        // Merging two sparse sketches keeps the merge sparse while that pays.
        let mut a = sketch_of(&[1.0, 900.0], 1.0);
        a.merge(&sketch_of(&[5.0, 900.0, 40_000.0], 1.0));
        assert!(matches!(&a.positive, Bins::Sparse(bins) if bins.len() == 4));
        assert_eq!(a.count(), 5.0);
        assert_eq!(a.count_above(100.0), 3.0);
    }

    /// A busy second fills every third bin of its span: sparse while few, then, from `BUSY_BINS`
    /// in use, counts over the span (at most twice the bytes); it answers as the sketch made from
    /// the same values at once, and kept, packs to the smaller form, sparse.
    #[test]
    fn a_busy_sketch_fills_as_counts_and_packs_to_the_smaller_form() {
        let probe = Sketch::new(0.01);
        let values: Vec<f64> = (0..80).map(|k| probe.value(3 * k)).collect();
        let mut sketch = Sketch::new(0.01);
        for (n, v) in values.iter().enumerate() {
            sketch.add(*v);
            let in_use = n + 1;
            let counts = matches!(sketch.positive, Bins::Counts { .. });
            assert_eq!(counts, in_use >= BUSY_BINS, "{in_use} bins in use");
        }
        assert_eq!(sketch.positive.len(), 3 * 79 + 1);
        // Every value again, as a busy second's later requests hit the bins already in use.
        for v in &values {
            sketch.add(*v);
        }
        let mut gathered = Gathered::new(0.01);
        for v in values.iter().chain(&values) {
            gathered.add(*v);
        }
        let at_once = gathered.into_sketch();
        assert!(
            matches!(at_once.positive, Bins::Sparse(_)),
            "made at once, where sparse pays"
        );
        answers_and_stores_alike(&sketch, &at_once).expect("either form answers alike");
        sketch.shrink_to_fit();
        assert!(matches!(sketch.positive, Bins::Sparse(_)));
        assert_eq!(sketch.heap_bytes(), 80 * 8);
    }

    #[test]
    fn few_counts_over_a_wide_span_pack_into_the_bins_in_use() {
        // Ten requests between 1 and 50 ms, as a 10-second block of a quiet operation holds.
        let values: Vec<f64> = (0..10).map(|i| 1.0 + 5.0 * i as f64).collect();
        let mut sketch = sketch_of(&values, 1.0);
        let dense_bytes = sketch.heap_bytes();
        sketch.shrink_to_fit();
        assert!(matches!(sketch.positive, Bins::Sparse(_)));
        assert_eq!(sketch.heap_bytes(), 10 * 8, "was {dense_bytes}");
        // Many counts over the same span: one 4-byte count per bin.
        let values: Vec<f64> = (0..5000).map(|i| 1.0 + i as f64 / 100.0).collect();
        let mut sketch = sketch_of(&values, 1.0);
        let span = sketch.positive.len();
        sketch.shrink_to_fit();
        assert!(matches!(sketch.positive, Bins::Counts { .. }));
        assert_eq!(sketch.heap_bytes(), span * 4);
        // Decayed weights are not whole numbers: they stay dense, without spare capacity.
        let mut sketch = sketch_of(&values, 1.0);
        sketch.decay(0.9);
        sketch.shrink_to_fit();
        assert!(matches!(sketch.positive, Bins::Dense { .. }));
        assert_eq!(sketch.heap_bytes(), span * 8);
    }

    #[test]
    fn a_sketch_of_positive_values_holds_no_negative_bins() {
        let mut sketch = sketch_of(&[1.0, 2.0], 1.0);
        assert_eq!(sketch.negative.0, None);
        assert_eq!(std::mem::size_of::<Sketch>(), 88);
        sketch.add(-1.0);
        assert!(sketch.negative.0.is_some());
        // What is stored reads back the same, whether the negative bins were ever used or not.
        for sketch in [sketch_of(&[1.0, 2.0], 1.0), sketch] {
            let stored = serde_json::to_string(&sketch).expect("serializes");
            let read: Sketch = serde_json::from_str(&stored).expect("reads back");
            assert_eq!(read, sketch);
            assert_eq!(read.negative.0.is_some(), sketch.negative.0.is_some());
        }
    }

    proptest::proptest! {
        /// Values gathered and made into a sketch at once give the sketch that adding each in
        /// turn gives: the same bins and weights, count, sum (added in the same order), least and
        /// greatest; over narrow spans and over spans past the bins' cap (which fold), with zeros
        /// and, for two sketches at once, the same for both.
        #[test]
        fn gathered_values_make_the_sketch_adding_each_makes(
            values in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(0.0),
                    proptest::strategy::Just(1e-9),
                    0.5f64..2000.0,
                    proptest::strategy::Strategy::prop_map(-30i32..40, |e| 10f64.powi(e)),
                ],
                0..300,
            ),
            accuracy in proptest::prop_oneof![proptest::strategy::Just(0.01), proptest::strategy::Just(0.05)],
        ) {
            let (mut gathered, mut other) = (Gathered::new(accuracy), Gathered::new(accuracy));
            let (mut added, mut added_other) = (Sketch::new(accuracy), Sketch::new(accuracy));
            for (i, v) in values.iter().enumerate() {
                if i % 2 == 0 {
                    gathered.add_to_both(&mut other, *v);
                    added_other.add(*v);
                } else {
                    gathered.add(*v);
                }
                added.add(*v);
            }
            let (made, made_other) = (gathered.into_sketch(), other.into_sketch());
            proptest::prop_assert_eq!(&made, &added);
            proptest::prop_assert_eq!(made.sum.to_bits(), added.sum.to_bits());
            proptest::prop_assert_eq!(&made_other, &added_other);
            proptest::prop_assert_eq!(made.quantile(0.99), added.quantile(0.99));
        }
    }
}
