//! A mergeable quantile sketch with relative-error guarantees (DDSketch).
//!
//! Values fall into logarithmic bins: bin `i` holds values in `(gamma^(i-1), gamma^i]` with
//! `gamma = (1 + a) / (1 - a)`, so any quantile is answered within relative error `a` of a value
//! that was inserted. Negative values use a mirrored set of bins; values closer to zero than
//! `MIN_MAGNITUDE` count as zero. Weights are real numbers so that a summary can be decayed (old
//! weeks count less). Sketches with the same accuracy merge exactly: merging is adding bins, so the
//! order in which observations arrive never changes the result.
//!
//! Bins are stored densely from the lowest to the highest index used. When a side would exceed
//! `MAX_BINS`, its lowest bins are folded together, which keeps the upper quantiles (the ones
//! latency cares about) exact to the guarantee. A sketch kept but no longer added to packs its
//! bins (`shrink_to_fit`): most sketches of history count few requests over a wide span.

use serde::{Deserialize, Serialize};

/// Magnitudes below this are counted as zero.
const MIN_MAGNITUDE: f64 = 1e-9;
/// The most a sketch's total weight may reach for its bins to be kept as 4-byte counts: no bin
/// can then hold more.
const MAX_WHOLE: f64 = u32::MAX as f64;
/// Most bins per side. At 1% accuracy, 2048 bins span about 18 orders of magnitude.
const MAX_BINS: usize = 2048;

/// The bins of one side, in one of three forms. A sketch is filled in whole-number counts
/// (`Counts`, 4 bytes a bin from the lowest index used to the highest), as counts of requests are,
/// and turns to real weights (`Dense`, 8 bytes a bin) only when a weight that is not a whole
/// number comes (a decayed baseline, a histogram's fractional count) or the counts could pass
/// `u32::MAX`. One that is kept but no longer grows (a completed block of history, a kept merge)
/// is packed (`Bins::pack`): its span trimmed to the bins in use and its spare capacity given
/// back, or, when few bins are in use over a wide span, index and count of each (`Sparse`).
/// Adding to sparse bins unpacks them first.
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
    Sparse(Box<[(i32, u32)]>),
}

impl Default for Bins {
    fn default() -> Self {
        Bins::Counts {
            offset: 0,
            counts: Vec::new(),
        }
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
        // Sparse bins take a whole count as counts again; any other weight, as real weights.
        if whole && let Bins::Sparse(bins) = self {
            let (offset, counts) = match (bins.first(), bins.last()) {
                (Some(&(first, _)), Some(&(last, _))) => {
                    let mut counts = vec![0; (last - first) as usize + 1];
                    for &(i, c) in bins.iter() {
                        counts[(i - first) as usize] = c;
                    }
                    (first, counts)
                }
                _ => (0, Vec::new()),
            };
            *self = Bins::Counts { offset, counts };
        }
        if whole && let Bins::Counts { offset, counts } = self {
            add_within(offset, counts, index, weight as u32);
            return;
        }
        let (offset, counts) = self.dense();
        add_within(offset, counts, index, weight);
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
            Bins::Sparse(_) => return,
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
            Bins::Sparse(
                used.iter()
                    .enumerate()
                    .filter(|(_, c)| **c > 0)
                    .map(|(i, c)| (start + i as i32, *c))
                    .collect(),
            )
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
            Bins::Sparse(bins) => std::mem::size_of_val(&**bins),
        }
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
        let a = self.relative_accuracy;
        ((1.0 + a) / (1.0 - a)).ln()
    }

    fn index(&self, magnitude: f64) -> i32 {
        (magnitude.ln() / self.ln_gamma()).ceil() as i32
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
            for (i, c) in other.positive.iter() {
                self.positive.add(i, c, fits && c.fract() == 0.0);
            }
            for (i, c) in other.negative.iter() {
                self.negative.add(i, c, fits && c.fract() == 0.0);
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
    /// (the counts again, or real weights, if the sketch is added to or decayed).
    pub fn shrink_to_fit(&mut self) {
        self.positive.pack();
        self.negative.pack();
    }

    /// Bytes on the heap, for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        self.positive.heap_bytes() + self.negative.heap_bytes()
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
                let in_counts = matches!(counted.positive, Bins::Counts { .. });
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
                // Half the bytes, the span being the same.
                proptest::prop_assert!(2 * counted.positive.heap_bytes() <= real.positive.heap_bytes());
            }
        }
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
}
