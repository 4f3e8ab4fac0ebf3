//! Turns metric points, delta or cumulative, into per-interval samples.
//!
//! Counters and histograms may arrive cumulative (the total since a start time) or delta (the change
//! over an interval). The engine reasons about what happened in each interval, so cumulative points
//! are differenced against the previous point of the same series. A reset (a new start time, or a
//! total that went down) starts the series over: the point then counts from its own start time. The
//! first point of a series with no start time only sets the reference, since the interval its total
//! covers is unknown. Points older than the last one seen are ignored and reported as such.
//!
//! A sample says the interval it covers: a cumulative point after a gap in its exports (points
//! lost, an exporter that could not reach the collector) covers the whole gap, and what it carries
//! happened over the gap, not at the point's time. Windows and the judge attribute it so
//! (`window::MetricAggregate::intervals`, `judge::history`).

use crate::observation::{EventTime, ExponentialBuckets, MetricPoint, PointValue, Temporality};

/// What a point meant for its interval.
#[derive(Clone, Debug, PartialEq)]
pub enum Sample {
    /// A counter grew by `value` over `[start, end]`.
    Increment {
        start: EventTime,
        end: EventTime,
        value: f64,
    },
    /// A gauge (or a non-monotonic cumulative sum) read `value` at `time`.
    Level { time: EventTime, value: f64 },
    /// Observations recorded over `[start, end]` into explicit buckets.
    Histogram {
        start: EventTime,
        end: EventTime,
        count: u64,
        sum: Option<f64>,
        bounds: Vec<f64>,
        bucket_counts: Vec<u64>,
    },
    /// Observations recorded over `[start, end]` into exponential buckets.
    ExponentialHistogram {
        start: EventTime,
        end: EventTime,
        count: u64,
        sum: Option<f64>,
        scale: i32,
        zero_count: u64,
        positive: ExponentialBuckets,
        negative: ExponentialBuckets,
    },
}

/// What became of one point.
#[derive(Clone, Debug, PartialEq)]
pub enum Conversion {
    Sample(Sample),
    /// A cumulative series' first point without a start time: kept as the reference only.
    Reference,
    /// The series was reset; the sample counts from the point's own start.
    Reset(Sample),
    /// Not newer than the last point of its series.
    Stale,
}

/// The last cumulative point of a series, kept to difference the next one against.
#[derive(Clone, Debug, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct SeriesState {
    last: Option<(EventTime, EventTime, PointValue)>,
}

impl SeriesState {
    /// Converts `point`, updating the reference when the point is cumulative.
    pub fn convert(&mut self, point: &MetricPoint) -> Conversion {
        let interval_start = |start: EventTime, end: EventTime| if start == 0 { end } else { start };
        match &point.value {
            PointValue::Gauge(v)
            | PointValue::Sum {
                monotonic: false,
                temporality: Temporality::Cumulative,
                value: v,
            } => Conversion::Sample(Sample::Level {
                time: point.time,
                value: *v,
            }),
            PointValue::Sum {
                temporality: Temporality::Delta,
                value,
                ..
            } => Conversion::Sample(Sample::Increment {
                start: interval_start(point.start_time, point.time),
                end: point.time,
                value: *value,
            }),
            PointValue::Histogram {
                temporality: Temporality::Delta,
                ..
            }
            | PointValue::ExponentialHistogram {
                temporality: Temporality::Delta,
                ..
            } => Conversion::Sample(whole_interval(point)),
            _ => self.convert_cumulative(point),
        }
    }

    fn convert_cumulative(&mut self, point: &MetricPoint) -> Conversion {
        let previous = self.last.take();
        let conversion = match &previous {
            Some((_, last_time, _)) if point.time <= *last_time => {
                self.last = previous;
                return Conversion::Stale;
            }
            None if point.start_time == 0 => Conversion::Reference,
            None => Conversion::Sample(whole_interval(point)),
            Some((last_start, _, _)) if point.start_time != 0 && point.start_time != *last_start => {
                Conversion::Reset(whole_interval(point))
            }
            Some((_, last_time, last_value)) => match difference(last_value, &point.value) {
                Some(value) => Conversion::Sample(with_interval(value, *last_time, point.time)),
                None if point.start_time == 0 => Conversion::Reference,
                None => Conversion::Reset(whole_interval(point)),
            },
        };
        self.last = Some((point.start_time, point.time, point.value.clone()));
        conversion
    }
}

/// The point's own value as a sample over `[start_time, time]`.
fn whole_interval(point: &MetricPoint) -> Sample {
    let start = if point.start_time == 0 || point.start_time > point.time {
        point.time
    } else {
        point.start_time
    };
    with_interval(point.value.clone(), start, point.time)
}

fn with_interval(value: PointValue, start: EventTime, end: EventTime) -> Sample {
    match value {
        PointValue::Gauge(value) => Sample::Level { time: end, value },
        PointValue::Sum { value, .. } => Sample::Increment { start, end, value },
        PointValue::Histogram {
            count,
            sum,
            bounds,
            bucket_counts,
            ..
        } => Sample::Histogram {
            start,
            end,
            count,
            sum,
            bounds,
            bucket_counts,
        },
        PointValue::ExponentialHistogram {
            count,
            sum,
            scale,
            zero_count,
            positive,
            negative,
            ..
        } => Sample::ExponentialHistogram {
            start,
            end,
            count,
            sum,
            scale,
            zero_count,
            positive,
            negative,
        },
    }
}

/// `now - before` for two cumulative values of the same series, or `None` when `now` cannot have
/// grown out of `before` (a reset, or a change of bucket layout).
fn difference(before: &PointValue, now: &PointValue) -> Option<PointValue> {
    match (before, now) {
        (
            PointValue::Sum { value: b, .. },
            PointValue::Sum {
                value: n,
                temporality,
                monotonic,
            },
        ) => (n >= b).then(|| PointValue::Sum {
            temporality: *temporality,
            monotonic: *monotonic,
            value: n - b,
        }),
        (
            PointValue::Histogram {
                count: bc,
                sum: bs,
                bounds: bb,
                bucket_counts: bbc,
                ..
            },
            PointValue::Histogram {
                temporality,
                count: nc,
                sum: ns,
                bounds: nb,
                bucket_counts: nbc,
            },
        ) => {
            if bb != nb || bbc.len() != nbc.len() || nc < bc {
                return None;
            }
            let bucket_counts = nbc
                .iter()
                .zip(bbc)
                .map(|(n, b)| n.checked_sub(*b))
                .collect::<Option<Vec<u64>>>()?;
            Some(PointValue::Histogram {
                temporality: *temporality,
                count: nc - bc,
                sum: sum_difference(*bs, *ns),
                bounds: nb.clone(),
                bucket_counts,
            })
        }
        (
            PointValue::ExponentialHistogram {
                count: bc,
                sum: bs,
                scale: bscale,
                zero_count: bz,
                positive: bp,
                negative: bn,
                ..
            },
            PointValue::ExponentialHistogram {
                temporality,
                count: nc,
                sum: ns,
                scale: nscale,
                zero_count: nz,
                positive: np,
                negative: nn,
            },
        ) => {
            if bscale != nscale || nc < bc || nz < bz {
                return None;
            }
            Some(PointValue::ExponentialHistogram {
                temporality: *temporality,
                count: nc - bc,
                sum: sum_difference(*bs, *ns),
                scale: *nscale,
                zero_count: nz - bz,
                positive: bucket_difference(bp, np)?,
                negative: bucket_difference(bn, nn)?,
            })
        }
        _ => None,
    }
}

fn sum_difference(before: Option<f64>, now: Option<f64>) -> Option<f64> {
    Some(now? - before?)
}

/// Differences two exponential bucket runs of the same scale, aligning them by bucket index.
fn bucket_difference(before: &ExponentialBuckets, now: &ExponentialBuckets) -> Option<ExponentialBuckets> {
    let count_at = |b: &ExponentialBuckets, index: i64| -> u64 {
        let i = index - i64::from(b.offset);
        usize::try_from(i)
            .ok()
            .and_then(|i| b.counts.get(i))
            .copied()
            .unwrap_or(0)
    };
    let end = |b: &ExponentialBuckets| i64::from(b.offset) + b.counts.len() as i64;
    // Any bucket the old point had must still be covered by the new one, or counts went missing.
    let before_used = (i64::from(before.offset)..end(before)).filter(|i| count_at(before, *i) > 0);
    for index in before_used {
        if count_at(now, index) < count_at(before, index) {
            return None;
        }
    }
    let counts = (i64::from(now.offset)..end(now))
        .map(|i| count_at(now, i) - count_at(before, i))
        .collect();
    Some(ExponentialBuckets {
        offset: now.offset,
        counts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::SeriesKey;

    fn counter(start: EventTime, time: EventTime, value: f64, temporality: Temporality) -> MetricPoint {
        MetricPoint {
            series: SeriesKey::new("orders".into(), vec![]),
            start_time: start,
            time,
            value: PointValue::Sum {
                temporality,
                monotonic: true,
                value,
            },
        }
    }

    fn increment(start: EventTime, end: EventTime, value: f64) -> Sample {
        Sample::Increment { start, end, value }
    }

    /// Feeds points through one series and returns what each became.
    fn check(points: &[MetricPoint]) -> Vec<Conversion> {
        let mut state = SeriesState::default();
        points.iter().map(|p| state.convert(p)).collect()
    }

    #[test]
    fn cumulative_counter_becomes_increments() {
        use Temporality::Cumulative as C;
        let out = check(&[
            counter(100, 110, 5.0, C),
            counter(100, 120, 9.0, C),
            counter(100, 130, 9.0, C),
        ]);
        assert_eq!(
            out,
            vec![
                Conversion::Sample(increment(100, 110, 5.0)),
                Conversion::Sample(increment(110, 120, 4.0)),
                Conversion::Sample(increment(120, 130, 0.0)),
            ]
        );
    }

    #[test]
    fn a_total_that_goes_down_is_a_reset() {
        use Temporality::Cumulative as C;
        let out = check(&[counter(0, 110, 50.0, C), counter(0, 120, 3.0, C)]);
        assert_eq!(out, vec![Conversion::Reference, Conversion::Reference]);
        let out = check(&[counter(100, 110, 50.0, C), counter(100, 120, 3.0, C)]);
        assert_eq!(out[1], Conversion::Reset(increment(100, 120, 3.0)));
    }

    #[test]
    fn a_new_start_time_is_a_reset_even_when_the_total_grew() {
        use Temporality::Cumulative as C;
        let out = check(&[counter(100, 110, 5.0, C), counter(115, 120, 7.0, C)]);
        assert_eq!(out[1], Conversion::Reset(increment(115, 120, 7.0)));
    }

    #[test]
    fn stale_points_leave_the_reference_alone() {
        use Temporality::Cumulative as C;
        let out = check(&[
            counter(100, 120, 9.0, C),
            counter(100, 110, 5.0, C),
            counter(100, 130, 12.0, C),
        ]);
        assert_eq!(out[1], Conversion::Stale);
        assert_eq!(out[2], Conversion::Sample(increment(120, 130, 3.0)));
    }

    #[test]
    fn delta_counters_pass_through() {
        let out = check(&[counter(100, 110, 5.0, Temporality::Delta)]);
        assert_eq!(out, vec![Conversion::Sample(increment(100, 110, 5.0))]);
    }

    #[test]
    fn cumulative_histograms_are_differenced_per_bucket() {
        let hist = |time, count, buckets: Vec<u64>| MetricPoint {
            series: SeriesKey::new("latency".into(), vec![]),
            start_time: 1,
            time,
            value: PointValue::Histogram {
                temporality: Temporality::Cumulative,
                count,
                sum: Some(count as f64),
                bounds: vec![10.0, 100.0],
                bucket_counts: buckets,
            },
        };
        let out = check(&[hist(10, 3, vec![1, 1, 1]), hist(20, 7, vec![2, 4, 1])]);
        assert_eq!(
            out[1],
            Conversion::Sample(Sample::Histogram {
                start: 10,
                end: 20,
                count: 4,
                sum: Some(4.0),
                bounds: vec![10.0, 100.0],
                bucket_counts: vec![1, 3, 0],
            })
        );
    }

    #[test]
    fn exponential_buckets_align_by_index() {
        let before = ExponentialBuckets {
            offset: 2,
            counts: vec![1, 2],
        };
        let now = ExponentialBuckets {
            offset: 1,
            counts: vec![4, 1, 5, 6],
        };
        assert_eq!(
            bucket_difference(&before, &now),
            Some(ExponentialBuckets {
                offset: 1,
                counts: vec![4, 0, 3, 6],
            })
        );
        let shrunk = ExponentialBuckets {
            offset: 3,
            counts: vec![9],
        };
        assert_eq!(bucket_difference(&before, &shrunk), None);
    }
}
