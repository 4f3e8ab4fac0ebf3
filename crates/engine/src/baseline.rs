//! What "normal" is for one feature series, and how far a new value is from it.
//!
//! A `Baseline` learns from one value per evaluation window:
//! - an EWMA of the level and of the variance, and of the absolute error (a scale robust to heavy
//!   tails), with a half-life in event time;
//! - seasonal quantiles: for each hour-of-week slot (168 of them) a decayed `Sketch` of the values
//!   seen in that slot. Only the current slot lives in memory, and it is persisted with the
//!   baseline; the others live in a `SlotStore` (sled, in the daemon), the current one saved there
//!   as event time leaves its hour and the next loaded as it enters that one.
//!
//! `Baseline::observe` scores a value before learning it. The level band is the EWMA level plus or
//! minus `BAND_WIDTH` robust standard deviations; the seasonal band is the slot's q05..q95, used once
//! the slot holds data from an earlier week, and only where those values spread (q05 < q95: a slot
//! that was always one value has no width to measure a departure by), widened by how few values
//! it was estimated from (`prediction_factor`: a dozen values' q05..q95 holds a new value less
//! often than nine times in ten). The score is how far the value lies outside the band, in
//! half-widths of the band (0 inside it), the larger of the two when both apply. A baseline with
//! fewer than `min_samples` windows says `InsufficientData` instead.
//!
//! A feature that is a count (a ratio of requests, a rate of events: `FeatureValue::counts`) is
//! scored count-aware (`observe_feature`, `deviation_of`): outside a band, it scores only when a
//! binomial or Poisson test at the band's edge finds its counts that unlikely (`COUNT_ALPHA`), and a
//! rise needs at least `MIN_EVENTS` events. A band learned over busy minutes is narrow; one failed
//! request among thirty at night lies far outside it as a ratio, and is entirely ordinary as a count.
//!
//! A third band (`BaselineConfig::range`, `None` leaves it out): the range of values
//! seen, with a long memory. The level band follows a slow drift and the seasonal band needs a week
//! of history; neither notices a value that creeps, or steps, beyond anything the series has shown
//! in weeks. The range's extremes relax towards the level with `RangeConfig::half_life_ns` and
//! follow a new extreme only part of the way (`RangeConfig::learning`), so that a creeping rise
//! keeps being judged against where the extremes were. The range judges once it has learned for a
//! day (a daily cycle's extremes), and never a window's quantile (`observe_feature` says why).

use serde::{Deserialize, Serialize};

use crate::anomaly::AnomalyState;
use crate::counts::Counts;
use crate::features::{Feature, FeatureValue};
use crate::observation::EventTime;
pub use crate::score::Score;
use crate::sketch::Sketch;

const NS_PER_SEC: u64 = 1_000_000_000;
const HOUR_NS: u64 = 3_600 * NS_PER_SEC;
/// Hour-of-week slots: `hour_of_week` is below this.
pub const SLOTS_PER_WEEK: u16 = 168;
const WEEK_NS: u64 = SLOTS_PER_WEEK as u64 * HOUR_NS;
/// The Unix epoch was a Thursday; hour-of-week slots start on Monday 00:00 UTC.
const EPOCH_WEEKDAY_OFFSET_NS: u64 = 3 * 24 * HOUR_NS;
/// Half-width of the level band, in robust standard deviations.
const BAND_WIDTH: f64 = 3.0;
/// Relative accuracy of seasonal slot sketches: values are feature levels, 2% is plenty.
const SLOT_ACCURACY: f64 = 0.02;
/// How much a window counts while its feature is anomalous, against 1 otherwise.
const ANOMALOUS_LEARNING: f64 = 0.1;
/// Values are clamped to +-this before learning.
const MAX_VALUE: f64 = 1e100;
/// A slot's weight (in windows) below which its quantiles are not trusted.
const MIN_SLOT_WEIGHT: f64 = 5.0;
/// The chance under which a count's value outside its band is taken to have left it: a count of
/// a few requests cannot be that unlikely at the band's edge, and scores 0 however odd its ratio.
const COUNT_ALPHA: f64 = 0.001;

/// Requests that must lie beyond a quantile for a window's quantile to be one: with fewer, it is
/// the window's slowest request or two, and one slow request puts it wherever it likes.
pub const TAIL_REQUESTS: f64 = 5.0;

/// How much wider than the q05..q95 of `n` values the interval must be that holds a new value
/// from the same distribution 90% of the time: the quantiles of a dozen values are estimates,
/// and a new value falls outside them more often than one in ten. For normal values it is the
/// prediction interval's factor, Student's t at 0.95 with `n - 1` degrees of freedom over the
/// normal's, times `sqrt(1 + 1/n)`: 1.41 for 5 values, 1.20 for 8.5 (an hour of 5-minute
/// windows a week ago, as a slot weighs them), 1.03 for 42 (of 1-minute windows). The t quantile
/// is the Cornish-Fisher expansion to 1/nu^2, within 1% from 4 degrees of freedom (fewer are never
/// judged: `MIN_SLOT_WEIGHT`).
fn prediction_factor(n: f64) -> f64 {
    const Z95: f64 = 1.644_853_626_951_472_2;
    let n = n.max(MIN_SLOT_WEIGHT);
    let nu = n - 1.0;
    let (z, z3, z5) = (Z95, Z95.powi(3), Z95.powi(5));
    let t = z + (z3 + z) / (4.0 * nu) + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * nu * nu);
    t / z * (1.0 + 1.0 / n).sqrt()
}

/// Hour-of-week slot (0 = Monday 00:00-01:00 UTC) of an event time.
pub fn hour_of_week(t: EventTime) -> u16 {
    // (t + offset) mod week, without overflowing near u64::MAX.
    (((t % WEEK_NS + EPOCH_WEEKDAY_OFFSET_NS) % WEEK_NS) / HOUR_NS) as u16
}

/// Weeks since the Monday before the epoch: tells one visit of a slot from the next.
pub fn week_index(t: EventTime) -> u32 {
    // (t + offset) / week, without overflowing near u64::MAX.
    (t / WEEK_NS + (t % WEEK_NS + EPOCH_WEEKDAY_OFFSET_NS) / WEEK_NS) as u32
}

/// How baselines learn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaselineConfig {
    /// Half-life of the EWMAs, in event time.
    pub half_life_ns: u64,
    /// Half-life of seasonal memory, in weeks: a slot's past weeks decay by this.
    pub seasonal_half_life_weeks: f64,
    /// Windows a baseline must have learned before it scores.
    pub min_samples: u64,
    /// The long-memory range of values seen, as a third band; `None` leaves it out.
    #[serde(default)]
    pub range: Option<RangeConfig>,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        BaselineConfig {
            half_life_ns: 6 * HOUR_NS,
            seasonal_half_life_weeks: 2.0,
            min_samples: 10,
            range: RangeConfig::of_width(0.03),
        }
    }
}

/// The long-memory range of values seen (see the module documentation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RangeConfig {
    /// Half-width of the range band, as a share of the range's width.
    pub width: f64,
    /// Half-life, in event time, with which the extremes relax towards the EWMA level.
    pub half_life_ns: u64,
    /// Share, in (0, 1], of the way from an extreme to a value beyond it that the extreme moves.
    pub learning: f64,
}

impl RangeConfig {
    /// How fast the extremes relax towards the level: 45 days of event time.
    pub const HALF_LIFE_NS: u64 = 45 * 24 * HOUR_NS;
    /// A new extreme is followed a fifth of the way.
    pub const LEARNING: f64 = 0.2;
    /// How long a range learns before it judges (see `Range::judges`): a day of event time.
    pub const MATURITY_NS: u64 = 24 * HOUR_NS;

    /// The range band of half-width `width` (a share of the range's width), with the extremes'
    /// memory above; `None` for a width of 0, which leaves the band out (the
    /// `baseline_range_width` setting).
    pub fn of_width(width: f64) -> Option<RangeConfig> {
        (width > 0.0).then_some(RangeConfig {
            width,
            half_life_ns: RangeConfig::HALF_LIFE_NS,
            learning: RangeConfig::LEARNING,
        })
    }
}

/// The smallest and largest values seen, relaxed towards the level with age.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Range {
    pub lo: f64,
    pub hi: f64,
    pub samples: u64,
    /// Event time of the first value learned.
    pub since: EventTime,
}

impl Range {
    /// The range as a band, from its smallest to its largest value.
    fn band(&self) -> Band {
        Band {
            lo: self.lo,
            hi: self.hi,
        }
    }

    /// Half-widths (`config.width` of the range) that `x` lies outside the range: 0 inside it.
    fn score(&self, x: f64, config: &RangeConfig) -> f64 {
        let half = (config.width * (self.hi - self.lo)).max(0.01 * ((self.lo + self.hi) / 2.0).abs());
        self.band().score_with_half_width(x, half)
    }

    /// `score`, for a value that may be a count, as `Band::score_counted`.
    fn score_counted(&self, x: f64, counts: Option<Counts>, config: &RangeConfig) -> f64 {
        let score = self.score(x, config);
        if score > 0.0 && counts_beyond(x, counts, self.lo, self.hi) {
            score
        } else {
            0.0
        }
    }

    /// Whether the range has seen enough to judge by at `now`: `min_samples` values over at least
    /// `RangeConfig::MATURITY_NS`. A range younger than a day has not seen a daily cycle's
    /// extremes, and the cycle's next high would lie beyond it.
    fn judges(&self, now: EventTime, min_samples: u64) -> bool {
        self.samples >= min_samples && now.saturating_sub(self.since) >= RangeConfig::MATURITY_NS
    }

    /// Learns `x` at `now`, `elapsed_ns` after the previous value, with `level` the EWMA level
    /// before it.
    fn update(&mut self, x: f64, now: EventTime, elapsed_ns: u64, level: f64, config: &RangeConfig) {
        if self.samples == 0 {
            *self = Range {
                lo: x,
                hi: x,
                samples: 1,
                since: now,
            };
            return;
        }
        let relax = 0.5f64.powf(elapsed_ns as f64 / config.half_life_ns.max(1) as f64);
        let learning = config.learning.clamp(f64::MIN_POSITIVE, 1.0);
        let lo = level + (self.lo - level) * relax;
        let hi = level + (self.hi - level) * relax;
        self.lo = lo + learning * (x - lo).min(0.0);
        self.hi = hi + learning * (x - hi).max(0.0);
        self.samples += 1;
    }
}

/// Exponentially weighted mean and variance, with event-time decay.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ewma {
    pub mean: f64,
    pub variance: f64,
    /// EW mean absolute deviation from the level before each update.
    pub abs_error: f64,
    pub samples: u64,
    pub last_time: EventTime,
}

impl Ewma {
    /// Learns `x` at `time`; the weight of the past halves every `half_life_ns` of event time.
    /// `weight` in (0, 1] scales how much `x` moves the averages.
    fn update(&mut self, x: f64, time: EventTime, half_life_ns: u64, weight: f64) {
        if self.samples == 0 {
            *self = Ewma {
                mean: x,
                variance: 0.0,
                abs_error: 0.0,
                samples: 1,
                last_time: time,
            };
            return;
        }
        let dt = time.saturating_sub(self.last_time).max(1) as f64;
        let alpha = 1.0 - (-(dt / half_life_ns.max(1) as f64) * std::f64::consts::LN_2).exp();
        // Early on, learn faster: never weigh the past more than the samples it holds.
        let alpha = alpha.max(1.0 / (self.samples + 1) as f64) * weight;
        let delta = x - self.mean;
        self.mean += alpha * delta;
        self.variance = (1.0 - alpha) * (self.variance + alpha * delta * delta);
        self.abs_error += alpha * (delta.abs() - self.abs_error);
        self.samples += 1;
        self.last_time = self.last_time.max(time);
    }

    pub fn std(&self) -> f64 {
        self.variance.max(0.0).sqrt()
    }

    /// A standard deviation that outliers inflate linearly, not quadratically: 1.25 x the mean
    /// absolute error, the ratio of the two for a normal distribution.
    pub fn robust_std(&self) -> f64 {
        1.25 * self.abs_error
    }
}

/// The decayed summary of one hour-of-week slot: what earlier weeks taught, and what this week
/// is adding. Scoring uses only the earlier weeks, so that a change is judged against the past
/// rather than against itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotSummary {
    /// Values from earlier weeks, decayed by age.
    pub past: Sketch,
    /// Values from `week`.
    pub current: Sketch,
    /// Week of `current`.
    pub week: u32,
    /// Distinct weeks that contributed to `past`.
    pub past_weeks: u32,
}

impl SlotSummary {
    fn new(week: u32) -> Self {
        SlotSummary {
            past: Sketch::new(SLOT_ACCURACY),
            current: Sketch::new(SLOT_ACCURACY),
            week,
            past_weeks: 0,
        }
    }

    /// Moves the summary into `week`: this week's values join the past, which decays with age.
    fn enter_week(&mut self, week: u32, half_life_weeks: f64) {
        if week > self.week {
            let elapsed = f64::from(week - self.week);
            let half_life = half_life_weeks.max(0.1);
            // The current week's values are one week old at the next visit, the past older still.
            self.past.decay(0.5f64.powf(elapsed / half_life));
            self.current.decay(0.5f64.powf((elapsed - 1.0) / half_life));
            if !self.current.is_empty() {
                self.past.merge(&self.current);
                self.past_weeks += 1;
            }
            self.current = Sketch::new(SLOT_ACCURACY);
            self.week = week;
        }
    }

    /// Whether earlier weeks taught enough to score against.
    fn mature(&self) -> bool {
        self.past_weeks >= 1 && self.past.count() >= MIN_SLOT_WEIGHT
    }

    /// The band a value in this slot is judged against: where earlier weeks' values lay (q05..q95),
    /// widened into the interval a new value falls in as often (`prediction_factor` of the
    /// values' weight). `None` while the slot is not mature, and for a slot whose values share one
    /// sketch bin (q05 = q95: an hour that was always 0, or always one value): it has no spread to
    /// grade a departure by, and against a band of no width any other value scored
    /// astronomically, although a dozen equal values say only that the next is likely, not
    /// certainly, the same. The level band and the range, which know how far the series strays,
    /// judge such an hour.
    fn band(&self) -> Option<Band> {
        if !self.mature() {
            return None;
        }
        let (lo, hi) = (self.past.quantile(0.05)?, self.past.quantile(0.95)?);
        if hi <= lo {
            return None;
        }
        // The sketch cannot tell values within its accuracy apart: widen the band by it.
        let (lo, hi) = (lo - SLOT_ACCURACY * lo.abs(), hi + SLOT_ACCURACY * hi.abs());
        let centre = (lo + hi) / 2.0;
        let half = (hi - lo) / 2.0 * prediction_factor(self.past.count());
        Some(Band {
            lo: centre - half,
            hi: centre + half,
        })
    }

    /// The learned quantile: from earlier weeks once there are any, else from this week so far.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.past.is_empty() {
            self.current.quantile(q)
        } else {
            self.past.quantile(q)
        }
    }

    /// Bytes its sketches hold on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.past.heap_bytes() + self.current.heap_bytes()
    }
}

/// How long before an hour's turn, in event time, a `SlotStore` that reads on a thread of its own
/// reads the next hour's slots ahead, and how long after it the turn counts as over: long enough
/// for a store's reader to read an hour's slots of every series (a second or two at 100k series)
/// while traffic comes at its own pace, and for apps whose clocks lag a little to turn.
pub const READ_AHEAD_NS: EventTime = 5 * 60 * 1_000_000_000;

/// What a store that reads the seasonal slots ahead of an hour's turn does as event time reaches
/// a moment (`ahead_of_turn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AheadOfTurn {
    /// Within `READ_AHEAD_NS` of the turn into this hour-of-week: read its slots.
    Read(u16),
    /// Within `READ_AHEAD_NS` after a turn: keep what was read, for the apps still turning.
    Keep,
    /// Well inside an hour: nothing read ahead is needed any more.
    Release,
}

/// Where `time` lies against the nearest hour's turn, for a store reading slots ahead.
pub fn ahead_of_turn(time: EventTime) -> AheadOfTurn {
    let now = hour_of_week(time);
    let soon = hour_of_week(time.saturating_add(READ_AHEAD_NS));
    if soon != now {
        AheadOfTurn::Read(soon)
    } else if hour_of_week(time.saturating_sub(READ_AHEAD_NS)) != now {
        AheadOfTurn::Keep
    } else {
        AheadOfTurn::Release
    }
}

/// Where slot summaries live when they are not the current one. The engine does no IO; the daemon
/// gives it a store backed by sled, tests an in-memory one.
pub trait SlotStore {
    fn load(&mut self, series: &str, slot: u16) -> Option<SlotSummary>;
    fn save(&mut self, series: &str, slot: u16, summary: &SlotSummary);

    /// Slot `slot` of every series whose name starts with `prefix` (`BaselineId::series_prefix`):
    /// what one scope's baselines read as they enter an hour together, in one pass. `None` where
    /// the store cannot tell, and each series is then loaded alone.
    fn load_scope(&mut self, prefix: &str, slot: u16) -> Option<Vec<(String, SlotSummary)>> {
        let _ = (prefix, slot);
        None
    }

    /// Event time has reached `time` in an app (a window ending then closed): a store that can
    /// read on a thread of its own reads the next hour's slots ahead as its turn nears and lets
    /// them go once it is over (`ahead_of_turn`). Reads stay correct without it.
    fn time_reached(&mut self, time: EventTime) {
        let _ = time;
    }

    /// The slots of scope `prefix` are to be deleted (its version was forgotten; the store's
    /// flush deletes them): a store holding any of them apart, as read ahead, drops them.
    fn forget_scope(&mut self, prefix: &str) {
        let _ = prefix;
    }

    /// Saves several slots at once: a store with an order of its own writes them in it.
    fn save_all(&mut self, slots: Vec<(String, u16, SlotSummary)>) {
        for (series, slot, summary) in &slots {
            self.save(series, *slot, summary);
        }
    }
}

/// A `SlotStore` in memory.
#[derive(Debug, Default)]
pub struct MemorySlotStore {
    slots: std::collections::HashMap<(String, u16), SlotSummary>,
}

impl SlotStore for MemorySlotStore {
    fn load(&mut self, series: &str, slot: u16) -> Option<SlotSummary> {
        self.slots.get(&(series.to_owned(), slot)).cloned()
    }

    fn save(&mut self, series: &str, slot: u16, summary: &SlotSummary) {
        self.slots.insert((series.to_owned(), slot), summary.clone());
    }

    fn load_scope(&mut self, prefix: &str, slot: u16) -> Option<Vec<(String, SlotSummary)>> {
        Some(
            self.slots
                .iter()
                .filter(|((series, s), _)| *s == slot && series.starts_with(prefix))
                .map(|((series, _), summary)| (series.clone(), summary.clone()))
                .collect(),
        )
    }
}

/// Which of a baseline's bands judged a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BandKind {
    /// The EWMA level, plus or minus `BAND_WIDTH` robust standard deviations.
    Level,
    /// The hour-of-week slot's q05..q95 over earlier weeks.
    Seasonal,
    /// The long-memory range of values seen.
    Range,
}

impl BandKind {
    pub fn name(self) -> &'static str {
        match self {
            BandKind::Level => "level",
            BandKind::Seasonal => "seasonal",
            BandKind::Range => "range",
        }
    }
}

/// The band that judged a value, and its bounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JudgedBand {
    pub kind: BandKind,
    pub lo: f64,
    pub hi: f64,
}

impl JudgedBand {
    fn of(kind: BandKind, band: Band) -> Self {
        JudgedBand {
            kind,
            lo: band.lo,
            hi: band.hi,
        }
    }
}

/// The band a value is judged against.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Band {
    lo: f64,
    hi: f64,
}

/// Whether a count's value outside `[lo, hi]` counts: always for a value that is not a count; for
/// a count, only when its counts could hardly have come from the edge it lies beyond.
fn counts_beyond(x: f64, counts: Option<Counts>, lo: f64, hi: f64) -> bool {
    match counts {
        Some(counts) if x > hi => counts.beyond(hi, true, COUNT_ALPHA),
        Some(counts) if x < lo => counts.beyond(lo, false, COUNT_ALPHA),
        _ => true,
    }
}

impl Band {
    /// `score`, for a value that may be a count: 0 when its counts do not tell it from the band.
    fn score_counted(self, x: f64, counts: Option<Counts>) -> f64 {
        let score = self.score(x);
        if score > 0.0 && counts_beyond(x, counts, self.lo, self.hi) {
            score
        } else {
            0.0
        }
    }

    /// Half-widths outside the band. The half-width has a floor of 1% of the band's centre (and a
    /// tiny absolute one), so that a constant series does not make every wiggle infinitely odd.
    fn score(self, x: f64) -> f64 {
        self.score_with_half_width(x, self.half_width())
    }

    fn half_width(self) -> f64 {
        let centre = (self.lo + self.hi) / 2.0;
        ((self.hi - self.lo) / 2.0).max(0.01 * centre.abs())
    }

    /// Distance outside the band in units of `half` (at least a tiny absolute floor).
    fn score_with_half_width(self, x: f64, half: f64) -> f64 {
        let half = half.max(1e-9);
        let outside = (self.lo - x).max(x - self.hi).max(0.0);
        let score = outside / half;
        if score.is_finite() { score } else { f64::MAX }
    }
}

/// Everything one feature series learned.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub ewma: Ewma,
    /// The slot event time is in, and its summary.
    pub slot: Option<(u16, SlotSummary)>,
    pub last_value: Option<f64>,
    pub last_score: Option<Score>,
    pub last_window_end: EventTime,
    /// Whether this feature has left its baseline (see `anomaly`).
    pub anomaly: AnomalyState,
    /// The long-memory range of values seen, learned only with `BaselineConfig::range`. Left out
    /// of this type's serde shape, which format 1 of the store froze; the store keeps it in a
    /// record of its own layout.
    #[serde(skip)]
    pub range: Range,
}

impl Baseline {
    /// Scores `x`, the value of the window ending at `time`, then learns it. `series` names this
    /// baseline in `store`, where slot summaries are swapped in and out.
    /// With `config.range`, `x` is also judged against the long-memory range of values seen (the
    /// largest of the three scores counts) and learned there.
    pub fn observe(
        &mut self,
        series: &str,
        x: f64,
        time: EventTime,
        config: &BaselineConfig,
        store: &mut dyn SlotStore,
    ) -> Score {
        self.observe_counted(series, x, None, true, time, config, store).0
    }

    /// Scores and learns a window's feature as `observe` does; a feature that is a count (a ratio
    /// or a rate, `FeatureValue::counts`) is scored count-aware: by where its counts could put
    /// its rate, so that a ratio of a few requests is judged by what so few can show.
    pub fn observe_feature(
        &mut self,
        series: &str,
        feature: &FeatureValue,
        time: EventTime,
        config: &BaselineConfig,
        store: &mut dyn SlotStore,
    ) -> Score {
        self.observe_judged(series, feature, time, config, store).0
    }

    /// `observe_feature`, with the band that judged the value: the one it lies farthest outside,
    /// in its half-widths (the level band when it lies within them all). `None` while the baseline
    /// is too young to score.
    pub fn observe_judged(
        &mut self,
        series: &str,
        feature: &FeatureValue,
        time: EventTime,
        config: &BaselineConfig,
        store: &mut dyn SlotStore,
    ) -> (Score, Option<JudgedBand>) {
        // A window's quantile is a sample statistic: its noise grows as its requests fall (a p99
        // of a few hundred requests rests on its slowest few), and the requests' latency moves with
        // load, so a quiet hour's quantiles lie beyond what busy hours taught. The level and
        // seasonal bands learn that spread with the values; the range, a memory of extremes, has
        // no noise model, and judging a quantile against it by counts would need the window's
        // requests beyond the range's edge, which a feature value does not carry. So quantiles
        // neither judge against the range nor move it.
        let judged_by_range = feature.key.feature.quantile().is_none();
        self.observe_counted(
            series,
            feature.value,
            feature.counts,
            judged_by_range,
            time,
            config,
            store,
        )
    }

    /// `observe`, for a value whose counts (if a count) are `counts`; `judged_by_range` says
    /// whether the value may judge against, and move, the range.
    #[allow(clippy::too_many_arguments)]
    fn observe_counted(
        &mut self,
        series: &str,
        x: f64,
        counts: Option<Counts>,
        judged_by_range: bool,
        time: EventTime,
        config: &BaselineConfig,
        store: &mut dyn SlotStore,
    ) -> (Score, Option<JudgedBand>) {
        let range = config.range.as_ref().filter(|_| judged_by_range);
        if !x.is_finite() {
            return (self.last_score.unwrap_or(Score::InsufficientData), None);
        }
        // Far beyond any real feature value, and far enough from f64::MAX that squares stay finite.
        let x = x.clamp(-MAX_VALUE, MAX_VALUE);
        let slot = hour_of_week(time);
        let week = week_index(time);
        if self.slot.as_ref().is_none_or(|(s, _)| *s != slot) {
            if let Some((old, summary)) = self.slot.take() {
                store.save(series, old, &summary);
            }
            let summary = store.load(series, slot).unwrap_or_else(|| SlotSummary::new(week));
            self.slot = Some((slot, summary));
        }
        if let Some((_, summary)) = self.slot.as_mut() {
            summary.enter_week(week, config.seasonal_half_life_weeks);
        }

        let (score, judged) = if self.ewma.samples < config.min_samples {
            (Score::InsufficientData, None)
        } else {
            let range = range.filter(|_| self.range.judges(time, config.min_samples));
            let (score, judged) = self.score_counted(x, counts, range);
            (Score::Scored(score), Some(judged))
        };

        // While the feature is anomalous it learns only a little, so that a lasting fault is not
        // quietly absorbed into "normal" within a half-life; a true new normal still is, slowly.
        let weight = if self.anomaly.active {
            ANOMALOUS_LEARNING
        } else {
            1.0
        };
        if let Some((_, summary)) = self.slot.as_mut() {
            summary.current.add_weighted(x, weight);
        }
        if let Some(range) = range {
            let elapsed = time.saturating_sub(self.ewma.last_time);
            self.range.update(x, time, elapsed, self.ewma.mean, range);
        }
        self.ewma.update(x, time, config.half_life_ns, weight);
        self.last_value = Some(x);
        self.last_score = Some(score);
        self.last_window_end = self.last_window_end.max(time);
        (score, judged)
    }

    /// How far `x` lies outside what this baseline has learned, in band half-widths, without
    /// learning it: `None` while the baseline is too young. Uses the seasonal slot in memory.
    pub fn deviation(&self, x: f64, config: &BaselineConfig) -> Option<f64> {
        self.deviation_counted(x, None, config)
    }

    /// `deviation` of a window's feature; count-aware for a feature that is a count, as
    /// `observe_feature` scores it.
    pub fn deviation_of(&self, feature: &FeatureValue, config: &BaselineConfig) -> Option<f64> {
        self.deviation_counted(feature.value, feature.counts, config)
    }

    fn deviation_counted(&self, x: f64, counts: Option<Counts>, config: &BaselineConfig) -> Option<f64> {
        if !x.is_finite() || self.ewma.samples < config.min_samples {
            return None;
        }
        Some(self.score_counted(x, counts, None).0)
    }

    /// Half-widths outside the level band, the seasonal band of the slot in memory (once it has
    /// earlier weeks) and, when given, the range: the largest. A count outside a band counts only
    /// when its counts could hardly have come from the band's edge (binomial or Poisson, at
    /// `COUNT_ALPHA`, with at least `MIN_EVENTS` events for a rise): one failed request among
    /// thirty does not leave a band near 0.02%, whatever its ratio.
    /// The band that gave the score comes with it (the level band when `x` lies within them all).
    fn score_counted(
        &self,
        x: f64,
        counts: Option<Counts>,
        range: Option<&RangeConfig>,
    ) -> (f64, JudgedBand) {
        let sd = self.ewma.robust_std();
        let level = Band {
            lo: self.ewma.mean - BAND_WIDTH * sd,
            hi: self.ewma.mean + BAND_WIDTH * sd,
        };
        let mut score = level.score_counted(x, counts);
        let mut judged = JudgedBand::of(BandKind::Level, level);
        let mut consider = |kind: BandKind, band: Band, band_score: f64| {
            if band_score > score {
                score = band_score;
                judged = JudgedBand::of(kind, band);
            }
        };
        if let Some(band) = self.slot.as_ref().and_then(|(_, summary)| summary.band()) {
            consider(BandKind::Seasonal, band, band.score_counted(x, counts));
        }
        if let Some(range) = range {
            consider(
                BandKind::Range,
                self.range.band(),
                self.range.score_counted(x, counts, range),
            );
        }
        (score, judged)
    }

    /// Whether a window of `requests` requests over `window_secs` could show `feature` lying
    /// `min_deviation` half-widths above the level band (the power question of a check against
    /// the baseline): the value there must score that much as `deviation_of` scores it, so for a
    /// count its counts at that value must lie beyond the band's edge, and for a quantile at least
    /// `TAIL_REQUESTS` of the requests must lie beyond it.
    pub fn could_show_rise(
        &self,
        feature: Feature,
        requests: u64,
        window_secs: f64,
        min_deviation: f64,
    ) -> bool {
        if feature
            .quantile()
            .is_some_and(|q| (requests as f64) * (1.0 - q) < TAIL_REQUESTS)
        {
            return false;
        }
        let sd = self.ewma.robust_std();
        let level = Band {
            lo: self.ewma.mean - BAND_WIDTH * sd,
            hi: self.ewma.mean + BAND_WIDTH * sd,
        };
        let x = level.hi + min_deviation * level.half_width();
        let counts = feature.counts_at(x, requests, window_secs);
        // Within rounding of exactly `min_deviation`, by construction, when the counts allow it.
        level.score_counted(x, counts) >= min_deviation * (1.0 - 1e-9)
    }

    /// The level band a new value is judged against, once the baseline has learned anything.
    pub fn band(&self) -> Option<(f64, f64)> {
        (self.ewma.samples > 0).then(|| {
            let sd = self.ewma.robust_std();
            (self.ewma.mean - BAND_WIDTH * sd, self.ewma.mean + BAND_WIDTH * sd)
        })
    }

    /// The current slot's quantiles q05, q50, q95, q99, when it has any data.
    pub fn slot_quantiles(&self) -> Option<[f64; 4]> {
        let (_, summary) = self.slot.as_ref()?;
        Some([
            summary.quantile(0.05)?,
            summary.quantile(0.5)?,
            summary.quantile(0.95)?,
            summary.quantile(0.99)?,
        ])
    }

    /// Bytes this baseline holds in memory, for accounting.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.slot.as_ref().map_or(0, |(_, s)| s.heap_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    const MINUTE: u64 = 60 * NS_PER_SEC;
    /// 2026-01-05T00:00:00Z, a Monday.
    const MONDAY: u64 = 1_767_571_200 * NS_PER_SEC;

    /// Feeds `values` one per minute from `start`; returns the scores.
    fn check(baseline: &mut Baseline, store: &mut MemorySlotStore, start: u64, values: &[f64]) -> Vec<Score> {
        let config = BaselineConfig::default();
        values
            .iter()
            .enumerate()
            .map(|(i, x)| baseline.observe("s", *x, start + i as u64 * MINUTE, &config, store))
            .collect()
    }

    fn scored(scores: &[Score]) -> Vec<f64> {
        scores.iter().filter_map(|s| s.value()).collect()
    }

    #[test]
    fn slots_start_on_monday_utc() {
        assert_eq!(hour_of_week(MONDAY), 0);
        assert_eq!(hour_of_week(MONDAY + 25 * HOUR_NS), 25);
        assert_eq!(hour_of_week(MONDAY + WEEK_NS - 1), 167);
        assert_eq!(week_index(MONDAY + WEEK_NS), week_index(MONDAY) + 1);
        // Near u64::MAX: exact (as in wider arithmetic), not an overflow.
        for t in [u64::MAX, u64::MAX - HOUR_NS, u64::MAX / 2] {
            let shifted = u128::from(t) + u128::from(EPOCH_WEEKDAY_OFFSET_NS);
            let week = u128::from(WEEK_NS);
            assert_eq!(u128::from(hour_of_week(t)), shifted % week / u128::from(HOUR_NS));
            assert_eq!(u128::from(week_index(t)), shifted / week);
        }
    }

    #[test]
    fn a_young_baseline_does_not_guess() {
        let (mut b, mut store) = (Baseline::default(), MemorySlotStore::default());
        let scores = check(&mut b, &mut store, MONDAY, &[5.0; 9]);
        assert!(scores.iter().all(|s| *s == Score::InsufficientData));
    }

    #[test]
    fn a_constant_series_is_never_anomalous() {
        let (mut b, mut store) = (Baseline::default(), MemorySlotStore::default());
        let scores = check(&mut b, &mut store, MONDAY, &vec![42.0; 3 * 24 * 60]);
        assert!(scored(&scores).iter().all(|s| *s == 0.0));
        assert!((b.ewma.mean - 42.0).abs() < 1e-9);
    }

    #[test]
    fn a_level_shift_scores_high_then_is_absorbed() {
        let (mut b, mut store) = (Baseline::default(), MemorySlotStore::default());
        let mut rng = Rng::new(3);
        let noise = |rng: &mut Rng, level: f64| level + (rng.unit() - 0.5) * 2.0;
        let before: Vec<f64> = (0..120).map(|_| noise(&mut rng, 100.0)).collect();
        let after: Vec<f64> = (0..600).map(|_| noise(&mut rng, 130.0)).collect();
        check(&mut b, &mut store, MONDAY, &before);
        let scores = scored(&check(&mut b, &mut store, MONDAY + 120 * MINUTE, &after));
        assert!(scores[0] > 3.0, "the shift is scored high: {}", scores[0]);
        let late = &scores[scores.len() - 60..];
        assert!(late.iter().all(|s| *s < 0.5), "absorbed: {late:?}");
    }

    /// A daily pattern with a little noise, one value per minute from `start` for `days`.
    fn daily(rng: &mut Rng, days: u64, shift_hours: f64) -> Vec<f64> {
        (0..days * 24 * 60)
            .map(|m| {
                let hours = m as f64 / 60.0 + shift_hours;
                100.0 + 50.0 * (hours / 24.0 * std::f64::consts::TAU).sin() + rng.unit() * 2.0
            })
            .collect()
    }

    #[test]
    fn a_daily_pattern_is_learned_per_slot() {
        let mut rng = Rng::new(9);
        let (mut b, mut store) = (Baseline::default(), MemorySlotStore::default());
        check(&mut b, &mut store, MONDAY, &daily(&mut rng, 21, 0.0));
        let week4 = MONDAY + 3 * WEEK_NS;
        let mut same = (b.clone(), std::mem::take(&mut store));
        let mut shifted_store = MemorySlotStore {
            slots: same.1.slots.clone(),
        };
        let mut shifted = b;
        let same_scores = scored(&check(&mut same.0, &mut same.1, week4, &daily(&mut rng, 1, 0.0)));
        let shifted_scores = scored(&check(
            &mut shifted,
            &mut shifted_store,
            week4,
            &daily(&mut rng, 1, 12.0),
        ));
        // The share of windows a full half-width outside the band: what an alert would fire on.
        let flagged = |s: &[f64]| s.iter().filter(|x| **x > 1.0).count() as f64 / s.len() as f64;
        assert!(
            flagged(&same_scores) < 0.01,
            "same pattern: {}",
            flagged(&same_scores)
        );
        assert!(
            flagged(&shifted_scores) > 0.5,
            "shifted pattern: {}",
            flagged(&shifted_scores)
        );
    }

    /// The factor against Student's t quantiles (0.95; 4, 11 and 41 degrees of freedom) times the
    /// prediction interval's sqrt(1 + 1/n), and towards 1 as the values grow.
    #[test]
    fn the_prediction_factor_is_the_t_interval_for_one_new_value() {
        let z = 1.644_853_626_951_472_2;
        for (n, t) in [(5.0, 2.131_847), (12.0, 1.795_885), (42.0, 1.682_878)] {
            let exact = t / z * (1.0f64 + 1.0 / n).sqrt();
            let factor = prediction_factor(n);
            assert!(
                (factor / exact - 1.0).abs() < 0.01,
                "{n} values: {factor} against {exact}"
            );
        }
        assert!(prediction_factor(10_000.0) < 1.001);
        assert!(prediction_factor(8.5) > prediction_factor(42.0));
    }

    /// A slot holding the same values learned from a dozen windows, or from five times as many,
    /// has the same q05..q95; judged from a dozen, its band is as much wider as a new value needs
    /// (the factors' ratio), so a value just beyond the well-learned band lies within it.
    #[test]
    fn a_slot_of_few_values_judges_with_a_wider_band() {
        let slot_of = |repeats: u32| {
            let mut summary = SlotSummary::new(1);
            for i in 0..12 {
                for _ in 0..repeats {
                    summary.past.add_weighted(90.0 + 2.0 * f64::from(i), 1.0);
                }
            }
            summary.past_weeks = 1;
            summary
        };
        let (few, many) = (slot_of(1), slot_of(5));
        assert_eq!(few.past.quantile(0.05), many.past.quantile(0.05));
        assert_eq!(few.past.quantile(0.95), many.past.quantile(0.95));
        let (wide, narrow) = (few.band().expect("mature"), many.band().expect("mature"));
        let ratio = (wide.hi - wide.lo) / (narrow.hi - narrow.lo);
        let expected = prediction_factor(12.0) / prediction_factor(60.0);
        assert!(
            (ratio / expected - 1.0).abs() < 1e-9,
            "{ratio} against {expected}"
        );
        let x = narrow.hi + 1.0;
        assert!(narrow.score(x) > 0.0 && wide.score(x) == 0.0);
    }

    /// A gauge that is 0 most of the time, with a spike of 1 to 3 in about one window in twenty
    /// (a queue that fills now and then), one value per 5 minutes for `weeks`.
    fn zero_with_spikes(rng: &mut Rng, weeks: u64) -> Vec<f64> {
        (0..weeks * 7 * 24 * 12)
            .map(|_| {
                if rng.unit() < 0.05 {
                    1.0 + 2.0 * rng.unit()
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// Most of such a series' hour-of-week slots hold only zeros from earlier weeks: a band of no
    /// width, against which any spike scored astronomically, however usual its size. A slot with
    /// no spread does not judge; the level band and the range, which learned how far the series
    /// strays, do: a week more of the same spikes scores none of them as gross, and a spike ten
    /// times the largest still is.
    #[test]
    fn an_hour_that_was_always_one_value_does_not_judge_alone() {
        let config = BaselineConfig::default();
        let rules = crate::anomaly::AnomalyRules::default();
        let mut rng = Rng::new(11);
        let (mut baseline, mut store) = (Baseline::default(), MemorySlotStore::default());
        let step = 5 * MINUTE;
        let learn = zero_with_spikes(&mut rng, 2);
        for (i, x) in learn.iter().enumerate() {
            baseline.observe("s", *x, MONDAY + i as u64 * step, &config, &mut store);
        }
        let start = MONDAY + learn.len() as u64 * step;
        let (mut largest, mut degenerate_spikes) = (0.0f64, 0);
        for (i, x) in zero_with_spikes(&mut rng, 1).iter().enumerate() {
            let time = start + i as u64 * step;
            let score = baseline.observe("s", *x, time, &config, &mut store);
            let (_, summary) = baseline.slot.as_ref().expect("a slot");
            if *x > 0.0 && summary.past.quantile(0.95) == summary.past.quantile(0.05) {
                degenerate_spikes += 1;
            }
            largest = largest.max(score.value().unwrap_or(0.0));
        }
        assert!(
            degenerate_spikes > 50,
            "spikes in slots of no spread: {degenerate_spikes}"
        );
        assert!(
            largest < rules.gross_score,
            "the same spikes for a week more score at most {largest}"
        );
        let time = start + 7 * 24 * HOUR_NS;
        let (score, judged) = baseline.observe_judged(
            "s",
            &FeatureValue {
                key: crate::features::FeatureKey::app(Feature::MetricValue),
                value: 30.0,
                support: 100,
                counts: None,
            },
            time,
            &config,
            &mut store,
        );
        assert!(score.value().is_some_and(|s| s >= rules.gross_score), "{score:?}");
        assert_ne!(judged.map(|j| j.kind), Some(BandKind::Seasonal));
    }

    /// Three days of noise around 100, then two days creeping up to 160, one value per 10
    /// minutes, as a plain value or, with `feature`, as that feature of a window of 10,000
    /// requests; returns the largest score of the creep, plain and with the range.
    fn creep_of(range: &RangeConfig, feature: Option<Feature>) -> (f64, f64, Baseline) {
        let config = BaselineConfig {
            half_life_ns: 6 * 60 * MINUTE,
            range: None,
            ..BaselineConfig::default()
        };
        let mut rng = Rng::new(5);
        let values: Vec<f64> = (0..720)
            .map(|i| {
                let level = if i < 432 {
                    100.0
                } else {
                    100.0 + (i - 432) as f64 * 60.0 / 288.0
                };
                level + (rng.unit() - 0.5) * 20.0
            })
            .collect();
        let ranged_config = BaselineConfig {
            range: Some(range.clone()),
            ..config.clone()
        };
        let (mut plain, mut ranged) = (Baseline::default(), Baseline::default());
        let (mut store, mut ranged_store) = (MemorySlotStore::default(), MemorySlotStore::default());
        let (mut plain_max, mut ranged_max) = (0.0f64, 0.0f64);
        for (i, x) in values.iter().enumerate() {
            let time = MONDAY + i as u64 * 10 * MINUTE;
            let (a, b) = match feature {
                None => (
                    plain.observe("s", *x, time, &config, &mut store),
                    ranged.observe("s", *x, time, &ranged_config, &mut ranged_store),
                ),
                Some(feature) => {
                    let value = FeatureValue {
                        key: crate::features::FeatureKey::app(feature),
                        value: *x,
                        support: 10_000,
                        counts: None,
                    };
                    (
                        plain.observe_feature("s", &value, time, &config, &mut store),
                        ranged.observe_feature("s", &value, time, &ranged_config, &mut ranged_store),
                    )
                }
            };
            if i >= 432 {
                plain_max = plain_max.max(a.value().unwrap_or(0.0));
                ranged_max = ranged_max.max(b.value().unwrap_or(0.0));
            }
        }
        assert_eq!(
            plain.range,
            Range::default(),
            "without the setting no range is learned"
        );
        (plain_max, ranged_max, ranged)
    }

    fn creep(range: &RangeConfig) -> (f64, f64, Baseline) {
        creep_of(range, None)
    }

    fn range_config() -> RangeConfig {
        RangeConfig {
            width: 0.06,
            half_life_ns: 30 * 24 * 60 * MINUTE,
            learning: 0.2,
        }
    }

    #[test]
    fn a_creep_beyond_the_range_seen_scores_only_against_the_range() {
        let (plain, ranged, baseline) = creep(&range_config());
        assert!(plain < 3.0, "the level follows the creep: {plain}");
        assert!(ranged > 4.0, "the range does not: {ranged}");
        assert!(
            baseline.range.hi > 120.0 && baseline.range.lo < 95.0,
            "{:?}",
            baseline.range
        );
    }

    /// A window's quantile is noisier the fewer requests it rests on, and moves with load: the
    /// range, with no noise model, leaves every quantile feature to the other bands (on
    /// `a_stable_app_raises_no_anomaly_from_a_few_requests_at_night`'s apps, it raised latency
    /// anomalies at the quiet hours). A feature that is not a quantile, a gauge's value, it judges.
    #[test]
    fn a_window_quantile_neither_judges_against_the_range_nor_moves_it() {
        for feature in Feature::ALL.into_iter().filter(|f| f.quantile().is_some()) {
            let (plain, ranged, baseline) = creep_of(&range_config(), Some(feature));
            assert_eq!(ranged, plain, "{feature:?}: judged by the level band alone");
            assert_eq!(baseline.range, Range::default(), "{feature:?}: nothing learned");
        }
        let (plain, ranged, baseline) = creep_of(&range_config(), Some(Feature::MetricValue));
        assert!(
            plain < 3.0 && ranged > 4.0,
            "a gauge's creep: {plain} then {ranged}"
        );
        assert!(baseline.range.samples > 0);
    }

    /// An anomaly says which band it left: a value beyond the range seen but within the level
    /// band was judged by the range, with the range's bounds; a value within every band by the
    /// level band.
    #[test]
    fn the_band_that_judged_a_value_comes_with_its_score() {
        let config = BaselineConfig {
            range: Some(range_config()),
            ..BaselineConfig::default()
        };
        let (mut baseline, mut store) = (Baseline::default(), MemorySlotStore::default());
        let mut rng = Rng::new(9);
        let gauge = |value: f64| FeatureValue {
            key: crate::features::FeatureKey::app(Feature::MetricValue),
            value,
            support: 100,
            counts: None,
        };
        let minutes = 2 * 24 * 60;
        for i in 0..minutes {
            let x = 100.0 + (rng.unit() - 0.5) * 20.0;
            baseline.observe_feature("s", &gauge(x), MONDAY + i * MINUTE, &config, &mut store);
        }
        let (level_lo, level_hi) = baseline.band().expect("a level band");
        let x = level_hi - 1.0;
        let (score, judged) =
            baseline
                .clone()
                .observe_judged("s", &gauge(x), MONDAY + minutes * MINUTE, &config, &mut store);
        let judged = judged.expect("scored");
        assert!(score.value().is_some_and(|s| s > 3.0), "{score:?}");
        assert_eq!(judged.kind, BandKind::Range);
        assert_eq!((judged.lo, judged.hi), (baseline.range.lo, baseline.range.hi));
        assert!(judged.hi < x && x < level_hi);
        let (score, judged) =
            baseline.observe_judged("s", &gauge(100.0), MONDAY + minutes * MINUTE, &config, &mut store);
        assert_eq!(score, Score::Scored(0.0));
        let judged = judged.expect("scored");
        assert_eq!(
            (judged.kind, judged.lo, judged.hi),
            (BandKind::Level, level_lo, level_hi)
        );
    }

    #[test]
    fn a_range_that_learns_new_extremes_at_once_absorbs_a_creep() {
        let (_, ranged, _) = creep(&RangeConfig {
            learning: 1.0,
            ..range_config()
        });
        let (_, partial, _) = creep(&range_config());
        assert!(
            ranged < partial,
            "full learning {ranged} against partial {partial}"
        );
    }

    /// A daily cycle's first day: each hour climbs beyond the range the hours before it showed.
    /// A range that has not seen a day judges nothing, so the range adds no score to the level's
    /// and the seasonal bands'; from the second day on it does judge.
    #[test]
    fn a_range_younger_than_a_day_judges_nothing() {
        let plain_config = BaselineConfig {
            range: None,
            ..BaselineConfig::default()
        };
        let config = BaselineConfig {
            range: Some(range_config()),
            ..plain_config.clone()
        };
        let (mut plain, mut ranged) = (Baseline::default(), Baseline::default());
        let (mut store, mut ranged_store) = (MemorySlotStore::default(), MemorySlotStore::default());
        let mut rng = Rng::new(11);
        let minutes = 2 * 24 * 60;
        let mut differed_on_day = [0u32; 2];
        for i in 0..minutes {
            let phase = i as f64 / (24.0 * 60.0) * std::f64::consts::TAU;
            let x = 100.0 - 60.0 * phase.cos() + (rng.unit() - 0.5) * 4.0;
            let time = MONDAY + i as u64 * MINUTE;
            let a = plain.observe("s", x, time, &plain_config, &mut store);
            let b = ranged.observe("s", x, time, &config, &mut ranged_store);
            if a != b {
                differed_on_day[(i / (24 * 60)) as usize] += 1;
            }
        }
        assert_eq!(differed_on_day[0], 0, "the first day is judged without the range");
        assert!(ranged.range.samples > 24 * 60, "the range learned all along");
        assert!(
            ranged
                .range
                .judges(MONDAY + minutes as u64 * MINUTE, config.min_samples),
            "a range that has seen a day judges"
        );
    }

    #[test]
    fn the_range_relaxes_towards_the_level() {
        let mut range = Range::default();
        let config = range_config();
        range.update(100.0, 0, 0, 100.0, &config);
        range.update(200.0, 0, 0, 100.0, &config);
        assert_eq!((range.lo, range.hi), (100.0, 120.0), "a fifth of the way");
        range.update(100.0, config.half_life_ns, config.half_life_ns, 100.0, &config);
        assert_eq!(
            (range.lo, range.hi),
            (100.0, 110.0),
            "half-way back after a half-life"
        );
        assert_eq!(range.score(110.0, &config), 0.0);
        // Width 10, half-width 6% of it; the 1% of the centre (1.05) is the larger.
        assert!((range.score(111.05, &config) - 1.0).abs() < 1e-9);
    }

    /// An error ratio learned near 0.02% over busy minutes, then windows of `errors` of
    /// `requests`: their scores as a plain ratio and as the counts they are.
    fn ratio_scores(errors: u64, requests: u64) -> (f64, f64) {
        let (mut b, mut store) = (Baseline::default(), MemorySlotStore::default());
        let mut rng = Rng::new(11);
        let config = BaselineConfig::default();
        for minute in 0..120u64 {
            let failed = (0..1_000).filter(|_| rng.unit() < 0.0002).count() as f64;
            b.observe(
                "s",
                failed / 1_000.0,
                MONDAY + minute * MINUTE,
                &config,
                &mut store,
            );
        }
        let x = errors as f64 / requests as f64;
        let counts = Counts::Of {
            events: errors,
            trials: requests,
        };
        let plain = b.deviation(x, &config).expect("learned");
        let feature = FeatureValue {
            key: crate::features::FeatureKey::app(crate::features::Feature::ErrorRatio),
            value: x,
            support: requests,
            counts: Some(counts),
        };
        (plain, b.deviation_of(&feature, &config).expect("learned"))
    }

    #[test]
    fn a_ratio_of_a_few_requests_is_judged_by_its_counts() {
        // One failure among thirty: a ratio far outside the band, and a count that is ordinary.
        let (plain, counted) = ratio_scores(1, 30);
        assert!(plain > 10.0, "{plain}");
        assert_eq!(counted, 0.0);
        // Two among forty: still fewer than MIN_EVENTS.
        assert_eq!(ratio_scores(2, 40).1, 0.0);
        // Twenty among a thousand: the counts leave no doubt, and the score is the plain one.
        let (plain, counted) = ratio_scores(20, 1_000);
        assert!(counted > 10.0 && counted == plain, "{plain} {counted}");
        // Four among thirty: as unlikely at the band's edge as it looks.
        assert!(ratio_scores(4, 30).1 > 10.0);
    }

    /// The power question of a check against the baseline, for each kind of feature: what a
    /// window must hold before a rise of three half-widths could show, and that more never hurts.
    #[test]
    fn a_rise_can_show_only_on_a_window_that_could_count_it() {
        let config = BaselineConfig::default();
        let mut rng = Rng::new(5);
        let (mut errors, mut p99, mut rate, mut store) = (
            Baseline::default(),
            Baseline::default(),
            Baseline::default(),
            MemorySlotStore::default(),
        );
        for minute in 0..120u64 {
            let t = MONDAY + minute * MINUTE;
            // Minutes of 600 requests at 0.5% errors; a p99 near 40 ms; 10 requests per second.
            let failed = (0..600).filter(|_| rng.unit() < 0.005).count() as f64;
            errors.observe("errors", failed / 600.0, t, &config, &mut store);
            p99.observe("p99", 40.0 + 4.0 * rng.unit(), t, &config, &mut store);
            rate.observe("rate", 10.0 + rng.unit(), t, &config, &mut store);
        }
        let shows = |b: &Baseline, f: Feature, n: u64, secs: f64| b.could_show_rise(f, n, secs, 3.0);
        // A count: a handful of requests hold too few events, many hold enough, and more still.
        assert!(!shows(&errors, Feature::ErrorRatio, 40, 60.0));
        let enough = (1..40)
            .map(|k| 50 * k)
            .find(|n| shows(&errors, Feature::ErrorRatio, *n, 60.0))
            .expect("some window of under 2,000 requests shows a rise of the error ratio");
        assert!(enough > 100, "{enough}");
        for more in [enough * 2, enough * 10, enough * 1_000] {
            assert!(shows(&errors, Feature::ErrorRatio, more, 60.0), "{more}");
        }
        // A p99 needs five requests beyond it, whatever its band.
        assert!(!shows(&p99, Feature::LatencyP99, 499, 60.0));
        assert!(shows(&p99, Feature::LatencyP99, 500, 60.0));
        // A rate over the window does not depend on the requests: a longer window shows it.
        assert!(!shows(&rate, Feature::RequestRate, 1_000_000, 0.5));
        assert!(shows(&rate, Feature::RequestRate, 0, 600.0));
    }

    #[test]
    fn scores_are_never_nan_or_infinite() {
        let (mut b, mut store) = (Baseline::default(), MemorySlotStore::default());
        let values = [
            0.0,
            1e300,
            -1e300,
            0.0,
            1e-300,
            f64::MAX,
            f64::MIN,
            0.0,
            0.0,
            0.0,
            0.0,
            5.0,
            f64::MAX,
        ];
        for s in scored(&check(&mut b, &mut store, MONDAY, &values)) {
            assert!(s.is_finite() && s >= 0.0, "{s}");
        }
        let (mut b, mut store) = (Baseline::default(), MemorySlotStore::default());
        let config = BaselineConfig {
            range: Some(range_config()),
            ..BaselineConfig::default()
        };
        for (i, x) in values.iter().enumerate() {
            let time = MONDAY + i as u64 * MINUTE;
            let s = b.observe("s", *x, time, &config, &mut store);
            assert!(s.value().is_none_or(|s| s.is_finite() && s >= 0.0), "{s:?}");
        }
    }
}
