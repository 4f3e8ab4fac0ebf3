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
//! latency cares about) exact to the guarantee.

use serde::{Deserialize, Serialize};

/// Magnitudes below this are counted as zero.
const MIN_MAGNITUDE: f64 = 1e-9;
/// Most bins per side. At 1% accuracy, 2048 bins span about 18 orders of magnitude.
const MAX_BINS: usize = 2048;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Bins {
    /// Index of `counts[0]`.
    offset: i32,
    counts: Vec<f64>,
}

impl Bins {
    fn add(&mut self, index: i32, weight: f64) {
        if self.counts.is_empty() {
            self.offset = index;
            self.counts.push(weight);
            return;
        }
        if index < self.offset {
            let grow = (self.offset - index) as usize;
            if self.counts.len() + grow > MAX_BINS {
                // Past the cap: the value joins the lowest bin kept.
                self.counts[0] += weight;
                return;
            }
            self.counts.splice(0..0, std::iter::repeat_n(0.0, grow));
            self.offset = index;
        }
        let at = (index - self.offset) as usize;
        if at >= self.counts.len() {
            self.counts.resize(at + 1, 0.0);
            if self.counts.len() > MAX_BINS {
                let fold = self.counts.len() - MAX_BINS;
                let folded: f64 = self.counts.drain(..fold).sum();
                self.counts[0] += folded;
                self.offset += fold as i32;
            }
        }
        let at = (index - self.offset) as usize;
        self.counts[at] += weight;
    }

    fn total(&self) -> f64 {
        self.counts.iter().sum()
    }

    fn iter(&self) -> impl DoubleEndedIterator<Item = (i32, f64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0.0)
            .map(|(i, c)| (self.offset + i as i32, *c))
    }

    fn scale(&mut self, factor: f64) {
        self.counts.iter_mut().for_each(|c| *c *= factor);
    }

    fn heap_bytes(&self) -> usize {
        self.counts.capacity() * std::mem::size_of::<f64>()
    }
}

/// A DDSketch over real values with real-valued weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sketch {
    relative_accuracy: f64,
    positive: Bins,
    negative: Bins,
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
            negative: Bins::default(),
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
        if value > MIN_MAGNITUDE {
            let i = self.index(value);
            self.positive.add(i, weight);
        } else if value < -MIN_MAGNITUDE {
            let i = self.index(-value);
            self.negative.add(i, weight);
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
            for (i, c) in other.positive.iter() {
                self.positive.add(i, c);
            }
            for (i, c) in other.negative.iter() {
                self.negative.add(i, c);
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
    /// as long as their span.
    pub fn shrink_to_fit(&mut self) {
        self.positive.counts.shrink_to_fit();
        self.negative.counts.shrink_to_fit();
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
        assert!(sketch.positive.counts.len() <= MAX_BINS);
        let p99 = sketch.quantile(0.99).expect("not empty");
        assert!((p99 / 1e29 - 1.0).abs() < 0.0101, "{p99}");
    }
}
