//! The records of the current schema, and their conversions to and from the engine's types.
//!
//! Schema 2 changed the keys (see `keys`), not the values: its value records are format 1's
//! (`v1`), re-exported here. A schema that changes one gives it a new type here, keeps the old
//! one in its frozen module, and converts old to new when it migrates (`migrate`). So does a tree
//! whose name carries its layout's version: `baselines.3` holds `BaselineRecord`, which adds to
//! format 1's (`v1::BaselineRecord`, in `baselines.2`) the long-memory range and the anomaly's
//! recent peak, so that a restart no longer forgets them.
//!
//! Records with public engine counterparts (clocks, baselines, slots) convert field by field. The
//! engine keeps the fields of `Sketch` and `AppEntry` private; their records mirror those fields
//! and convert through the engine type's serde shape (`bridge`), so a change to either engine
//! type fails the conversion, and the round-trip tests below, before any user's data meets it.

use canaryd_engine::anomaly::AnomalyState;
use canaryd_engine::baseline::{Baseline, Ewma, Range, Score, SlotSummary};
use canaryd_engine::catalog::AppEntry;
use canaryd_engine::sketch::Sketch;
use canaryd_engine::window::AppClock;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::v1::{
    AnomalyRecord, AppRecord, ClockRecord, EwmaRecord, ScoreRecord, SketchRecord, SlotRecord,
};

/// The persisted part of the engine's `Baseline`, in `baselines.3`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaselineRecord {
    pub ewma: EwmaRecord,
    pub slot: Option<(u16, SlotRecord)>,
    pub last_value: Option<f64>,
    pub last_score: Option<ScoreRecord>,
    pub last_window_end: u64,
    pub anomaly: AnomalyRecord,
    /// The anomaly state's recent peak (`AnomalyState::peak`) and its time.
    pub peak: (f64, u64),
    pub range: RangeRecord,
}

/// The engine's `Range`: the long-memory range of values a series has shown.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RangeRecord {
    pub lo: f64,
    pub hi: f64,
    pub samples: u64,
    pub since: u64,
}

impl From<crate::v1::BaselineRecord> for BaselineRecord {
    /// A baseline of `baselines.2` kept no range and no peak: it starts both anew, as a restart
    /// did before (its range judges again once it has learned for a day).
    fn from(old: crate::v1::BaselineRecord) -> Self {
        BaselineRecord {
            ewma: old.ewma,
            slot: old.slot,
            last_value: old.last_value,
            last_score: old.last_score,
            last_window_end: old.last_window_end,
            anomaly: old.anomaly,
            peak: (0.0, 0),
            range: RangeRecord::default(),
        }
    }
}

/// A type that would not convert to or from its record: an engine type and its record have
/// diverged, or a daemon record names what this build does not know.
#[derive(Debug, thiserror::Error)]
#[error("the {what} does not convert to or from the store's record for it: {reason}")]
pub struct ConvertError {
    pub what: &'static str,
    pub reason: String,
}

/// Converts between two types of the same serde shape (see the module documentation).
fn bridge<A: Serialize, B: DeserializeOwned>(what: &'static str, a: &A) -> Result<B, ConvertError> {
    let error = |e: postcard::Error| ConvertError {
        what,
        reason: e.to_string(),
    };
    let bytes = postcard::to_stdvec(a).map_err(error)?;
    let (b, rest) = postcard::take_from_bytes(&bytes).map_err(error)?;
    if rest.is_empty() {
        Ok(b)
    } else {
        Err(ConvertError {
            what,
            reason: format!("{} bytes left over", rest.len()),
        })
    }
}

impl From<&AppClock> for ClockRecord {
    fn from(clock: &AppClock) -> Self {
        ClockRecord {
            max_time: clock.max_time,
            closed_until: clock.closed_until,
        }
    }
}

impl From<ClockRecord> for AppClock {
    /// A lone latest time that no second observation had vouched for is not kept: after a
    /// restart the clock starts from what was vouched for.
    fn from(record: ClockRecord) -> Self {
        AppClock {
            max_time: record.max_time,
            closed_until: record.closed_until,
            lead: record.max_time,
        }
    }
}

impl TryFrom<&AppEntry> for AppRecord {
    type Error = ConvertError;

    fn try_from(entry: &AppEntry) -> Result<Self, ConvertError> {
        let mut record: AppRecord = bridge("AppEntry", entry)?;
        // The engine keeps some of these in hash maps: sorted, equal entries write equal records.
        record.operations.sort_by(|a, b| a.0.cmp(&b.0));
        record.downstreams.sort_by(|a, b| a.0.cmp(&b.0));
        record.exception_types.sort_by(|a, b| a.0.cmp(&b.0));
        record.streams.sort_by(|a, b| {
            (
                &a.0.version,
                &a.0.instance,
                &a.0.series.name,
                &a.0.series.attributes,
            )
                .cmp(&(
                    &b.0.version,
                    &b.0.instance,
                    &b.0.series.name,
                    &b.0.series.attributes,
                ))
        });
        Ok(record)
    }
}

impl TryFrom<&AppRecord> for AppEntry {
    type Error = ConvertError;

    fn try_from(record: &AppRecord) -> Result<Self, ConvertError> {
        bridge("AppEntry", record)
    }
}

impl TryFrom<&Sketch> for SketchRecord {
    type Error = ConvertError;

    fn try_from(sketch: &Sketch) -> Result<Self, ConvertError> {
        bridge("Sketch", sketch)
    }
}

impl TryFrom<&SketchRecord> for Sketch {
    type Error = ConvertError;

    fn try_from(record: &SketchRecord) -> Result<Self, ConvertError> {
        bridge("Sketch", record)
    }
}

impl TryFrom<&SlotSummary> for SlotRecord {
    type Error = ConvertError;

    fn try_from(summary: &SlotSummary) -> Result<Self, ConvertError> {
        Ok(SlotRecord {
            past: (&summary.past).try_into()?,
            current: (&summary.current).try_into()?,
            week: summary.week,
            past_weeks: summary.past_weeks,
        })
    }
}

impl TryFrom<&SlotRecord> for SlotSummary {
    type Error = ConvertError;

    fn try_from(record: &SlotRecord) -> Result<Self, ConvertError> {
        Ok(SlotSummary {
            past: (&record.past).try_into()?,
            current: (&record.current).try_into()?,
            week: record.week,
            past_weeks: record.past_weeks,
        })
    }
}

/// One side of a sketch's bins as the slot tree (`slots.3`) stores them: whole weights (a week's
/// counts, most of a slot's bins) as varints, a byte or two each, and real ones (weeks decayed into
/// the past) as they are. Read back, both give the same `BinsRecord` to the bit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WeightsRecord {
    Whole(Vec<u64>),
    Real(Vec<f64>),
}

/// The largest whole weight held exactly as an f64 and as a u64 alike.
const MAX_WHOLE_WEIGHT: f64 = (1u64 << 53) as f64;

impl From<&[f64]> for WeightsRecord {
    fn from(weights: &[f64]) -> Self {
        // Sign-positive, so that -0.0 is kept as it is.
        let whole = |w: &f64| w.fract() == 0.0 && w.is_sign_positive() && *w <= MAX_WHOLE_WEIGHT;
        if weights.iter().all(whole) {
            WeightsRecord::Whole(weights.iter().map(|w| *w as u64).collect())
        } else {
            WeightsRecord::Real(weights.to_vec())
        }
    }
}

impl From<&WeightsRecord> for Vec<f64> {
    fn from(weights: &WeightsRecord) -> Self {
        match weights {
            WeightsRecord::Whole(counts) => counts.iter().map(|c| *c as f64).collect(),
            WeightsRecord::Real(weights) => weights.clone(),
        }
    }
}

/// `BinsRecord`, its weights compact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompactBinsRecord {
    pub offset: i32,
    pub weights: WeightsRecord,
}

/// `SketchRecord`, its bins compact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompactSketchRecord {
    pub relative_accuracy: f64,
    pub positive: CompactBinsRecord,
    pub negative: CompactBinsRecord,
    pub zero: f64,
    pub count: f64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl From<&crate::v1::BinsRecord> for CompactBinsRecord {
    fn from(bins: &crate::v1::BinsRecord) -> Self {
        CompactBinsRecord {
            offset: bins.offset,
            weights: WeightsRecord::from(bins.counts.as_slice()),
        }
    }
}

impl From<&CompactBinsRecord> for crate::v1::BinsRecord {
    fn from(bins: &CompactBinsRecord) -> Self {
        crate::v1::BinsRecord {
            offset: bins.offset,
            counts: Vec::from(&bins.weights),
        }
    }
}

impl From<&SketchRecord> for CompactSketchRecord {
    fn from(s: &SketchRecord) -> Self {
        CompactSketchRecord {
            relative_accuracy: s.relative_accuracy,
            positive: (&s.positive).into(),
            negative: (&s.negative).into(),
            zero: s.zero,
            count: s.count,
            sum: s.sum,
            min: s.min,
            max: s.max,
        }
    }
}

impl From<&CompactSketchRecord> for SketchRecord {
    fn from(s: &CompactSketchRecord) -> Self {
        SketchRecord {
            relative_accuracy: s.relative_accuracy,
            positive: (&s.positive).into(),
            negative: (&s.negative).into(),
            zero: s.zero,
            count: s.count,
            sum: s.sum,
            min: s.min,
            max: s.max,
        }
    }
}

/// A seasonal slot as the slot tree (`slots.3`) stores it: `SlotRecord` with its sketches' weights
/// compact. A slot of 60 values a week and three weeks decayed into its past takes about 40% less
/// than as `SlotRecord` (`cargo bench -p canaryd-store --bench slots`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredSlotRecord {
    pub past: CompactSketchRecord,
    pub current: CompactSketchRecord,
    pub week: u32,
    pub past_weeks: u32,
}

impl From<&SlotRecord> for StoredSlotRecord {
    fn from(slot: &SlotRecord) -> Self {
        StoredSlotRecord {
            past: (&slot.past).into(),
            current: (&slot.current).into(),
            week: slot.week,
            past_weeks: slot.past_weeks,
        }
    }
}

impl From<SlotRecord> for StoredSlotRecord {
    fn from(slot: SlotRecord) -> Self {
        StoredSlotRecord::from(&slot)
    }
}

impl From<&StoredSlotRecord> for SlotRecord {
    fn from(slot: &StoredSlotRecord) -> Self {
        SlotRecord {
            past: (&slot.past).into(),
            current: (&slot.current).into(),
            week: slot.week,
            past_weeks: slot.past_weeks,
        }
    }
}

impl TryFrom<&SlotSummary> for StoredSlotRecord {
    type Error = ConvertError;

    fn try_from(summary: &SlotSummary) -> Result<Self, ConvertError> {
        Ok(StoredSlotRecord::from(&SlotRecord::try_from(summary)?))
    }
}

impl TryFrom<&StoredSlotRecord> for SlotSummary {
    type Error = ConvertError;

    fn try_from(record: &StoredSlotRecord) -> Result<Self, ConvertError> {
        SlotSummary::try_from(&SlotRecord::from(record))
    }
}

impl From<&Score> for ScoreRecord {
    fn from(score: &Score) -> Self {
        match *score {
            Score::InsufficientData => ScoreRecord::InsufficientData,
            Score::Scored(v) => ScoreRecord::Scored(v),
        }
    }
}

impl From<ScoreRecord> for Score {
    fn from(record: ScoreRecord) -> Self {
        match record {
            ScoreRecord::InsufficientData => Score::InsufficientData,
            ScoreRecord::Scored(v) => Score::Scored(v),
        }
    }
}

impl TryFrom<&Baseline> for BaselineRecord {
    type Error = ConvertError;

    /// What a restart keeps of a baseline: all of it.
    fn try_from(baseline: &Baseline) -> Result<Self, ConvertError> {
        let ewma = &baseline.ewma;
        Ok(BaselineRecord {
            ewma: EwmaRecord {
                mean: ewma.mean,
                variance: ewma.variance,
                abs_error: ewma.abs_error,
                samples: ewma.samples,
                last_time: ewma.last_time,
            },
            slot: match &baseline.slot {
                Some((slot, summary)) => Some((*slot, summary.try_into()?)),
                None => None,
            },
            last_value: baseline.last_value,
            last_score: baseline.last_score.as_ref().map(ScoreRecord::from),
            last_window_end: baseline.last_window_end,
            anomaly: AnomalyRecord {
                active: baseline.anomaly.active,
                streak: baseline.anomaly.streak,
                since: baseline.anomaly.since,
            },
            peak: (baseline.anomaly.peak, baseline.anomaly.peak_time),
            range: RangeRecord {
                lo: baseline.range.lo,
                hi: baseline.range.hi,
                samples: baseline.range.samples,
                since: baseline.range.since,
            },
        })
    }
}

impl TryFrom<&BaselineRecord> for Baseline {
    type Error = ConvertError;

    fn try_from(record: &BaselineRecord) -> Result<Self, ConvertError> {
        let ewma = &record.ewma;
        Ok(Baseline {
            ewma: Ewma {
                mean: ewma.mean,
                variance: ewma.variance,
                abs_error: ewma.abs_error,
                samples: ewma.samples,
                last_time: ewma.last_time,
            },
            slot: match &record.slot {
                Some((slot, summary)) => Some((*slot, summary.try_into()?)),
                None => None,
            },
            last_value: record.last_value,
            last_score: record.last_score.map(Score::from),
            last_window_end: record.last_window_end,
            anomaly: AnomalyState {
                active: record.anomaly.active,
                streak: record.anomaly.streak,
                since: record.anomaly.since,
                peak: record.peak.0,
                peak_time: record.peak.1,
            },
            range: Range {
                lo: record.range.lo,
                hi: record.range.hi,
                samples: record.range.samples,
                since: record.range.since,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::persisted_config;
    use canaryd_engine::baseline::MemorySlotStore;

    /// A baseline that has learned two hours of a daily pattern, with an anomaly open.
    fn learned() -> Baseline {
        let mut baseline = Baseline::default();
        let mut slots = MemorySlotStore::default();
        for minute in 0..120u64 {
            let value = if minute > 100 {
                500.0
            } else {
                10.0 + (minute % 7) as f64
            };
            baseline.observe(
                "s",
                value,
                1_767_571_200_000_000_000 + minute * 60_000_000_000,
                &persisted_config(),
                &mut slots,
            );
        }
        baseline.anomaly.active = true;
        baseline.anomaly.streak = 3;
        baseline.anomaly.since = 7;
        (baseline.anomaly.peak, baseline.anomaly.peak_time) = (12.5, 9);
        assert!(baseline.range.samples > 0, "the range learned");
        baseline
    }

    #[test]
    fn engine_baselines_round_trip_through_their_records() {
        let baseline = learned();
        let record = BaselineRecord::try_from(&baseline).expect("to record");
        let back = Baseline::try_from(&record).expect("from record");
        assert_eq!(back, baseline);
        let (_, summary) = baseline.slot.clone().expect("a slot");
        let slot = SlotRecord::try_from(&summary).expect("to record");
        assert_eq!(SlotSummary::try_from(&slot).expect("from record"), summary);
        let stored = StoredSlotRecord::try_from(&summary).expect("to record");
        assert_eq!(SlotSummary::try_from(&stored).expect("from record"), summary);
    }

    proptest::proptest! {
        /// A slot stored compact reads back to the bit, whatever its weights: whole, decayed,
        /// zero, huge, or past what an f64 holds exactly as a whole number.
        #[test]
        fn a_slot_stored_compact_reads_back_exactly(
            values in proptest::collection::vec((0.001f64..1e6, 0u8..6), 0..60),
            decay in 0.01f64..1.0,
            week in 0u32..5000,
        ) {
            let mut past = Sketch::new(0.02);
            let mut current = Sketch::new(0.02);
            for (value, kind) in &values {
                match kind {
                    0 => past.add(*value),
                    1 => past.add_weighted(*value, *value),
                    2 => past.add_weighted(-*value, 3.0),
                    3 => current.add_weighted(*value, 9.0e15),
                    4 => past.decay(decay),
                    _ => current.add(*value),
                }
            }
            let summary = SlotSummary { past, current, week, past_weeks: week / 2 };
            let stored = StoredSlotRecord::try_from(&summary).expect("to record");
            let bytes = postcard::to_stdvec(&stored).expect("encode");
            let read: StoredSlotRecord = postcard::from_bytes(&bytes).expect("decode");
            let back = SlotSummary::try_from(&read).expect("from record");
            proptest::prop_assert_eq!(
                postcard::to_stdvec(&SlotRecord::try_from(&back).expect("record")).expect("encode"),
                postcard::to_stdvec(&SlotRecord::try_from(&summary).expect("record")).expect("encode")
            );
            proptest::prop_assert_eq!(back, summary);
        }
    }

    #[test]
    fn the_records_of_format_1_read_what_format_1_wrote() {
        // Format 1 was postcard of the engine's structs: the engine's serde shape of today must
        // still read as the frozen records (until an engine type changes, when this test moves to
        // a fixture of bytes).
        let baseline = learned();
        // The range and the recent peak were not part of it (`serde(skip)`), and start anew.
        let engine_bytes = postcard::to_stdvec(&baseline).expect("encode");
        let record: crate::v1::BaselineRecord = postcard::from_bytes(&engine_bytes).expect("decode");
        let forgetful = Baseline {
            range: Default::default(),
            anomaly: AnomalyState {
                peak: 0.0,
                peak_time: 0,
                ..baseline.anomaly.clone()
            },
            ..baseline.clone()
        };
        assert_eq!(
            BaselineRecord::from(record),
            BaselineRecord::try_from(&forgetful).expect("to record")
        );
        // The engine's clock has since gained a field (its lone latest time, `lead`): format 1's
        // clock bytes, two varints, still read, and come back with the lead at the vouched time.
        let format_1_clock = postcard::to_stdvec(&(9u64, 5u64)).expect("encode");
        let record: ClockRecord = postcard::from_bytes(&format_1_clock).expect("decode");
        let clock = AppClock::from(record);
        assert_eq!((clock.max_time, clock.closed_until, clock.lead), (9, 5, 9));
    }
}
