//! Metric data points to engine metric points.
//!
//! Gauge, Sum, Histogram and ExponentialHistogram points are kept with their temporality; the
//! engine differences cumulative ones. A series is the metric's name and at most
//! `max_series_attributes` of the point's attributes, the first by key, so that one chatty
//! attribute cannot multiply series without bound. Summary points, points without a timestamp or
//! value, non-finite values, unspecified temporality and histograms whose bucket counts do not
//! fit their bounds are rejected. Points flagged `NO_RECORDED_VALUE` (a gap, no value) are skipped:
//! neither accepted nor rejected.
//!
//! Points are read in place from the request's protobuf (`wire`), as spans are: a whole prost
//! decode allocates every attribute of every point, and most of them are never kept. A message
//! given in parts merges as protobuf says (a metric's data of the same kind merges, of another
//! kind replaces; repeated fields append, packed or not; the last scalar wins).

use canaryd_engine::{
    ExponentialBuckets, MetricPoint, PointValue, ResourceObservations, SeriesKey, Temporality,
};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::AggregationTemporality;
use prost::Message;

use super::common::{DecodeError, ItemReader, KeyValueView, Nesting, read_request, within};
use super::wire::{Fields, Value, WireError};
use std::borrow::Cow;

use super::{NormalizeOptions, Normalized, beyond_horizon, cut_owned, cut_to, value_text};

/// `DataPointFlags.FLAG_NO_RECORDED_VALUE`: the point marks a gap, it carries no value.
const NO_RECORDED_VALUE: u32 = 1;

const UNSPECIFIED_TEMPORALITY: &str = "data points with unspecified aggregation_temporality";

/// A metrics export as one signal's nesting, for `read_request`.
const METRICS: Nesting = Nesting {
    request: "ExportMetricsServiceRequest",
    resource: "ResourceMetrics",
    scope: "ScopeMetrics",
};

/// Normalizes a request already decoded (a prost message, as tests and tools hold one) by reading
/// its protobuf encoding.
pub fn metrics(
    request: &ExportMetricsServiceRequest,
    options: &NormalizeOptions,
) -> Result<Normalized, DecodeError> {
    metrics_protobuf(&request.encode_to_vec(), options)
}

/// Normalizes an `ExportMetricsServiceRequest` in its protobuf encoding, reading it in place.
pub fn metrics_protobuf(buf: &[u8], options: &NormalizeOptions) -> Result<Normalized, DecodeError> {
    read_request(buf, &METRICS, options, &mut Scratch::default())
}

/// The kinds of a metric's data: the fields of its `data` oneof.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataKind {
    Gauge,
    Sum,
    Histogram,
    ExponentialHistogram,
    Summary,
}

impl DataKind {
    fn of_field(number: u32) -> Option<DataKind> {
        Some(match number {
            5 => DataKind::Gauge,
            7 => DataKind::Sum,
            9 => DataKind::Histogram,
            10 => DataKind::ExponentialHistogram,
            11 => DataKind::Summary,
            _ => return None,
        })
    }
}

/// A metric's fields that normalization reads; its points are in the scratch.
struct MetricView<'a> {
    name: &'a str,
    kind: Option<DataKind>,
    /// The data's `aggregation_temporality` (Sum, Histogram, ExponentialHistogram).
    temporality: i32,
    /// The Sum's `is_monotonic`.
    monotonic: bool,
}

/// Buffers reused from metric to metric, so a request allocates them once.
#[derive(Default)]
struct Scratch<'a> {
    /// The parts of a metric's data (a message given more than once merges).
    data: Vec<&'a [u8]>,
    points: Vec<&'a [u8]>,
    /// A point's attributes as they came on the wire: its series key is looked up by them.
    raw_attributes: Vec<&'a [u8]>,
    /// A point's attributes read, when they are (its key was not found, or it is not accepted).
    attributes: Vec<KeyValueView<'a>>,
    /// A point's series attributes as text, before they are sorted and copied.
    pairs: Vec<(&'a str, Cow<'a, str>)>,
}

impl<'a> Scratch<'a> {
    /// Reads a metric, leaving its points' encodings in `points`.
    fn read_metric(&mut self, buf: &'a [u8]) -> Result<MetricView<'a>, DecodeError> {
        let mut metric = MetricView {
            name: "",
            kind: None,
            temporality: 0,
            monotonic: false,
        };
        self.data.clear();
        self.points.clear();
        for field in Fields::new(buf) {
            let (number, value) = field.map_err(within("Metric"))?;
            if number == 1 {
                metric.name = value.str(number).map_err(within("Metric"))?;
            } else if let Some(kind) = DataKind::of_field(number) {
                let data = value.bytes(number).map_err(within("Metric"))?;
                // A oneof given again as another kind replaces what came before.
                if metric.kind != Some(kind) {
                    self.data.clear();
                    metric.kind = Some(kind);
                }
                self.data.push(data);
            }
        }
        let within = within("the metric's data");
        for part in &self.data {
            for field in Fields::new(part) {
                let (number, value) = field.map_err(&within)?;
                match number {
                    1 => self.points.push(value.bytes(number).map_err(&within)?),
                    2 if matches!(
                        metric.kind,
                        Some(DataKind::Sum | DataKind::Histogram | DataKind::ExponentialHistogram)
                    ) =>
                    {
                        // An enum is an int32: keep the low 32 bits of a sign-extended one.
                        metric.temporality = value.varint(number).map_err(&within)? as i32
                    }
                    3 if metric.kind == Some(DataKind::Sum) => {
                        metric.monotonic = value.varint(number).map_err(&within)? != 0
                    }
                    _ => {}
                }
            }
        }
        Ok(metric)
    }
}

impl<'a> ItemReader<'a> for Scratch<'a> {
    fn count(&mut self, metric: &'a [u8]) -> Result<u64, DecodeError> {
        self.read_metric(metric)?;
        Ok(self.points.len() as u64)
    }

    fn on_wire(&self, metric: &'a [u8]) -> Result<u64, DecodeError> {
        super::count::points_of_metric(metric).map_err(within("Metric"))
    }

    fn observe(
        &mut self,
        metric: &'a [u8],
        options: &NormalizeOptions,
        obs: &mut ResourceObservations,
        out: &mut Normalized,
    ) -> Result<u64, DecodeError> {
        let metric = self.read_metric(metric)?;
        let Some(kind) = metric.kind else {
            return Ok(0);
        };
        if kind == DataKind::Summary {
            out.reject("summary data points (not supported)", self.points.len() as u64);
            return Ok(0);
        }
        let temporality = temporality(metric.temporality);
        let mut accepted = 0;
        for i in 0..self.points.len() {
            let point = self.points[i];
            self.raw_attributes.clear();
            let attributes = Attributes {
                raw: &mut self.raw_attributes,
            };
            let (head, value) = match kind {
                DataKind::Gauge => {
                    let (head, number) = read_number_point(point, attributes)?;
                    (head, number.map(PointValue::Gauge))
                }
                DataKind::Sum => {
                    let (head, number) = read_number_point(point, attributes)?;
                    (head, sum_value(number, temporality, metric.monotonic))
                }
                DataKind::Histogram => read_histogram_point(point, temporality, attributes)?,
                DataKind::ExponentialHistogram => read_exponential_point(point, temporality, attributes)?,
                DataKind::Summary => unreachable!("summaries are rejected whole above"),
            };
            let point = Point {
                head,
                value,
                attributes: PointAttributes::Wire {
                    raw: &self.raw_attributes,
                    read: &mut self.attributes,
                },
            };
            accepted += observe_point(metric.name, point, &mut self.pairs, options, obs, out)?;
        }
        Ok(accepted)
    }
}

/// One point as read, in either encoding: its head, its value (or why it is rejected) and its
/// attributes.
pub(super) struct Point<'p, 'a> {
    pub head: PointHead,
    pub value: PointRead,
    pub attributes: PointAttributes<'p, 'a>,
}

/// A point's attributes: read already (JSON), or as they came in protobuf, read only when the
/// point's series key is not found by them or the point is not accepted.
pub(super) enum PointAttributes<'p, 'a> {
    Read(&'p [KeyValueView<'a>]),
    Wire {
        raw: &'p [&'a [u8]],
        read: &'p mut Vec<KeyValueView<'a>>,
    },
}

/// Reads attributes as they came on the wire; one that does not decode fails the request, as
/// prost fails it, whether its point is kept or not.
fn read_attributes<'a>(raw: &[&'a [u8]], read: &mut Vec<KeyValueView<'a>>) -> Result<(), DecodeError> {
    read.clear();
    for bytes in raw {
        read.push(KeyValueView::read(bytes).map_err(within("a point attribute"))?);
    }
    Ok(())
}

/// Observes a point of metric `name`: a gap is skipped, a point without a usable time or value
/// rejected in `out`, any other kept in `obs` under its series. Returns 1 when it was accepted.
pub(super) fn observe_point<'a>(
    name: &str,
    point: Point<'_, 'a>,
    pairs: &mut Vec<(&'a str, Cow<'a, str>)>,
    options: &NormalizeOptions,
    obs: &mut ResourceObservations,
    out: &mut Normalized,
) -> Result<u64, DecodeError> {
    let Point {
        head,
        value,
        mut attributes,
    } = point;
    let accepted =
        head.flags & NO_RECORDED_VALUE == 0 && head.time != 0 && !beyond_horizon(head.time) && value.is_ok();
    if !accepted && let PointAttributes::Wire { raw, read } = &mut attributes {
        read_attributes(raw, read)?;
    }
    if head.flags & NO_RECORDED_VALUE != 0 {
        // A valid point with nothing to observe: not rejected, and not accepted either (only
        // what reaches the engine is).
        out.skipped += 1;
        return Ok(0);
    }
    if head.time == 0 {
        out.reject("data points without time_unix_nano", 1);
        return Ok(0);
    }
    if beyond_horizon(head.time) {
        out.reject(
            "data points with a time after 2262-04-11 (beyond int64 nanoseconds)",
            1,
        );
        return Ok(0);
    }
    match value {
        Ok(value) => {
            let series = match attributes {
                PointAttributes::Read(read) => series_key(name, read, pairs, options, &mut out.truncated)
                    .map_err(within("a point attribute"))?,
                PointAttributes::Wire { raw, read } => SERIES_KEYS.with_borrow_mut(|keys| {
                    keys.key(
                        name,
                        raw,
                        options,
                        &mut out.truncated,
                        &mut out.series_keys_forgotten,
                        |truncated| {
                            read_attributes(raw, read)?;
                            series_key(name, read, pairs, options, truncated)
                                .map_err(within("a point attribute"))
                        },
                    )
                })?,
            };
            obs.saw(head.time);
            obs.metric_points.push(MetricPoint {
                series,
                start_time: head.start_time,
                time: head.time,
                value,
            });
            Ok(1)
        }
        Err(reason) => {
            out.reject(reason, 1);
            Ok(0)
        }
    }
}

/// A number point's value as a Sum's.
pub(super) fn sum_value(
    number: Result<f64, &'static str>,
    temporality: Option<Temporality>,
    monotonic: bool,
) -> PointRead {
    let value = number?;
    Ok(PointValue::Sum {
        temporality: temporality.ok_or(UNSPECIFIED_TEMPORALITY)?,
        monotonic,
        value,
    })
}

/// A number point's double, which must be finite.
pub(super) fn double_value(double: f64) -> Result<f64, &'static str> {
    if double.is_finite() {
        Ok(double)
    } else {
        Err("data points with a non-finite value")
    }
}

/// A histogram point's value, checked: its bucket counts fit its bounds, which are finite and
/// increasing.
pub(super) fn histogram_value(
    temporality: Option<Temporality>,
    count: u64,
    sum: Option<f64>,
    bounds: Vec<f64>,
    bucket_counts: Vec<u64>,
) -> PointRead {
    let temporality = temporality.ok_or(UNSPECIFIED_TEMPORALITY)?;
    if !(bucket_counts.is_empty() || bucket_counts.len() == bounds.len() + 1) {
        return Err("histogram points whose bucket_counts do not fit explicit_bounds");
    }
    if bounds.iter().any(|b| !b.is_finite()) || bounds.windows(2).any(|w| w[0] >= w[1]) {
        return Err("histogram points whose explicit_bounds are not finite and increasing");
    }
    Ok(PointValue::Histogram {
        temporality,
        count,
        sum: sum.filter(|s| s.is_finite()),
        bounds,
        bucket_counts,
    })
}

/// An exponential histogram point's parts besides its head.
pub(super) struct ExponentialParts {
    pub count: u64,
    pub sum: Option<f64>,
    pub scale: i32,
    pub zero_count: u64,
    pub positive: ExponentialBuckets,
    pub negative: ExponentialBuckets,
}

pub(super) fn exponential_value(temporality: Option<Temporality>, parts: ExponentialParts) -> PointRead {
    let temporality = temporality.ok_or(UNSPECIFIED_TEMPORALITY)?;
    Ok(PointValue::ExponentialHistogram {
        temporality,
        count: parts.count,
        sum: parts.sum.filter(|s| s.is_finite()),
        scale: parts.scale,
        zero_count: parts.zero_count,
        positive: parts.positive,
        negative: parts.negative,
    })
}

pub(super) fn temporality(value: i32) -> Option<Temporality> {
    match AggregationTemporality::try_from(value) {
        Ok(AggregationTemporality::Delta) => Some(Temporality::Delta),
        Ok(AggregationTemporality::Cumulative) => Some(Temporality::Cumulative),
        _ => None,
    }
}

/// One point's parts that every point type shares (its attributes are in the scratch).
#[derive(Default)]
pub(super) struct PointHead {
    pub start_time: u64,
    pub time: u64,
    pub flags: u32,
}

/// A point's value, or why it is rejected.
pub(super) type PointRead = Result<PointValue, &'static str>;

/// A `NumberDataPoint` of a gauge or a sum: its head and its number.
fn read_number_point<'a>(
    buf: &'a [u8],
    mut attributes: Attributes<'_, 'a>,
) -> Result<(PointHead, Result<f64, &'static str>), DecodeError> {
    let within = within("NumberDataPoint");
    let mut head = PointHead::default();
    let mut number = Err("data points without a value");
    for field in Fields::new(buf) {
        let (n, value) = field.map_err(&within)?;
        match n {
            2 => head.start_time = value.fixed64(n).map_err(&within)?,
            3 => head.time = value.fixed64(n).map_err(&within)?,
            // The value oneof: the last given wins.
            4 => number = double_value(f64::from_bits(value.fixed64(n).map_err(&within)?)),
            // sfixed64, two's complement.
            6 => number = Ok(value.fixed64(n).map_err(&within)? as i64 as f64),
            7 => attributes.push(value, n)?,
            8 => head.flags = flags(value, n).map_err(&within)?,
            _ => {}
        }
    }
    Ok((head, number))
}

/// A `HistogramDataPoint`: its head and its value, checked.
fn read_histogram_point<'a>(
    buf: &'a [u8],
    temporality: Option<Temporality>,
    mut attributes: Attributes<'_, 'a>,
) -> Result<(PointHead, PointRead), DecodeError> {
    let within = within("HistogramDataPoint");
    let mut head = PointHead::default();
    let (mut count, mut sum) = (0, None);
    let (mut bucket_counts, mut bounds) = (Vec::new(), Vec::new());
    for field in Fields::new(buf) {
        let (n, value) = field.map_err(&within)?;
        match n {
            2 => head.start_time = value.fixed64(n).map_err(&within)?,
            3 => head.time = value.fixed64(n).map_err(&within)?,
            4 => count = value.fixed64(n).map_err(&within)?,
            5 => sum = Some(f64::from_bits(value.fixed64(n).map_err(&within)?)),
            6 => value.repeated_fixed64(n, &mut bucket_counts).map_err(&within)?,
            7 => value.repeated_double(n, &mut bounds).map_err(&within)?,
            9 => attributes.push(value, n)?,
            10 => head.flags = flags(value, n).map_err(&within)?,
            _ => {}
        }
    }
    Ok((
        head,
        histogram_value(temporality, count, sum, bounds, bucket_counts),
    ))
}

/// An `ExponentialHistogramDataPoint`: its head and its value.
fn read_exponential_point<'a>(
    buf: &'a [u8],
    temporality: Option<Temporality>,
    mut attributes: Attributes<'_, 'a>,
) -> Result<(PointHead, PointRead), DecodeError> {
    let within = within("ExponentialHistogramDataPoint");
    let mut head = PointHead::default();
    let (mut count, mut sum, mut scale, mut zero_count) = (0, None, 0, 0);
    let (mut positive, mut negative) = (ExponentialBuckets::default(), ExponentialBuckets::default());
    for field in Fields::new(buf) {
        let (n, value) = field.map_err(&within)?;
        match n {
            1 => attributes.push(value, n)?,
            2 => head.start_time = value.fixed64(n).map_err(&within)?,
            3 => head.time = value.fixed64(n).map_err(&within)?,
            4 => count = value.fixed64(n).map_err(&within)?,
            5 => sum = Some(f64::from_bits(value.fixed64(n).map_err(&within)?)),
            6 => scale = sint32(value, n).map_err(&within)?,
            7 => zero_count = value.fixed64(n).map_err(&within)?,
            // A message given twice merges: the offset is the last, the counts append.
            8 => read_buckets(value.bytes(n).map_err(&within)?, &mut positive)?,
            9 => read_buckets(value.bytes(n).map_err(&within)?, &mut negative)?,
            10 => head.flags = flags(value, n).map_err(&within)?,
            _ => {}
        }
    }
    let parts = ExponentialParts {
        count,
        sum,
        scale,
        zero_count,
        positive,
        negative,
    };
    Ok((head, exponential_value(temporality, parts)))
}

fn read_buckets(buf: &[u8], buckets: &mut ExponentialBuckets) -> Result<(), DecodeError> {
    let within = within("ExponentialHistogramDataPoint.Buckets");
    for field in Fields::new(buf) {
        let (n, value) = field.map_err(&within)?;
        match n {
            1 => buckets.offset = sint32(value, n).map_err(&within)?,
            2 => value.repeated_varint(n, &mut buckets.counts).map_err(&within)?,
            _ => {}
        }
    }
    Ok(())
}

/// Where a point's attributes go as they are found: as they came, read later if need be.
struct Attributes<'s, 'a> {
    raw: &'s mut Vec<&'a [u8]>,
}

impl<'a> Attributes<'_, 'a> {
    fn push(&mut self, value: Value<'a>, n: u32) -> Result<(), DecodeError> {
        self.raw.push(value.bytes(n).map_err(within("a data point"))?);
        Ok(())
    }
}

/// The most series keys one thread keeps made, and the most bytes they may hold. An SDK's export
/// holds tens to thousands of series; past either bound the keys are forgotten all at once
/// (counted) and made again as they come. A blocking thread that idles ends, and its keys with it.
const MAX_KEPT_SERIES_KEYS: usize = 4096;
const MAX_KEPT_SERIES_BYTES: usize = 1 << 20;
/// A point whose name and attributes take more than this on the wire has its key made each time,
/// so that no few large keys fill a thread's bytes.
const MAX_KEPT_SERIES_WIRE: usize = 2048;

thread_local! {
    static SERIES_KEYS: std::cell::RefCell<SeriesKeys> = std::cell::RefCell::new(SeriesKeys::default());
}

/// Series keys already made on this thread, found by the bytes they were made from.
///
/// An SDK sends the same series every interval, each point's attributes the same bytes, so most
/// points' keys are found here rather than made again (UTF-8 checks, sorting, cleaning and cutting
/// their text were most of what reading a point cost). One per thread, so the receivers' threads
/// share no lock. The bytes are compared whole, so a hash collision is only a miss.
#[derive(Default)]
struct SeriesKeys {
    /// The options the kept keys were made under; other options start afresh.
    limits: (usize, usize),
    kept: std::collections::HashMap<u64, KeptKey, foldhash::fast::RandomState>,
    /// The bytes the kept keys hold: their wire form and their text, counted without overhead.
    kept_bytes: usize,
    /// The current point's name and attributes as bytes, each after its length.
    wire: Vec<u8>,
    hasher: foldhash::fast::RandomState,
}

struct KeptKey {
    wire: Box<[u8]>,
    key: SeriesKey,
    /// What making it cut, counted again each time it is used.
    truncated: u64,
}

impl SeriesKeys {
    fn key(
        &mut self,
        name: &str,
        raw: &[&[u8]],
        options: &NormalizeOptions,
        truncated: &mut u64,
        forgotten: &mut u64,
        make: impl FnOnce(&mut u64) -> Result<SeriesKey, DecodeError>,
    ) -> Result<SeriesKey, DecodeError> {
        use std::hash::BuildHasher;
        let limits = (options.max_attribute_value_len, options.max_series_attributes);
        if self.limits != limits {
            self.forget();
            self.limits = limits;
        }
        let parts = || std::iter::once(name.as_bytes()).chain(raw.iter().copied());
        if parts().map(|part| 4 + part.len()).sum::<usize>() > MAX_KEPT_SERIES_WIRE {
            // Made each time, and never copied into the thread's scratch, which stays small.
            return make(truncated);
        }
        self.wire.clear();
        for part in parts() {
            self.wire.extend_from_slice(&(part.len() as u32).to_le_bytes());
            self.wire.extend_from_slice(part);
        }
        let hash = self.hasher.hash_one(&self.wire);
        if let Some(kept) = self.kept.get(&hash)
            && *kept.wire == *self.wire
        {
            *truncated += kept.truncated;
            return Ok(kept.key.clone());
        }
        let mut cut = 0;
        let key = make(&mut cut)?;
        *truncated += cut;
        let kept = KeptKey {
            wire: self.wire.as_slice().into(),
            key: key.clone(),
            truncated: cut,
        };
        let bytes = kept.bytes();
        if self.kept.len() >= MAX_KEPT_SERIES_KEYS || self.kept_bytes + bytes > MAX_KEPT_SERIES_BYTES {
            *forgotten += self.forget();
        }
        self.kept_bytes += bytes;
        if let Some(replaced) = self.kept.insert(hash, kept) {
            // Another key under the same hash: its bytes go with it.
            self.kept_bytes -= replaced.bytes();
        }
        Ok(key)
    }

    /// Forgets every kept key; returns how many there were.
    fn forget(&mut self) -> u64 {
        let n = self.kept.len() as u64;
        self.kept.clear();
        self.kept_bytes = 0;
        n
    }
}

impl KeptKey {
    fn bytes(&self) -> usize {
        self.wire.len()
            + self.key.name.len()
            + self
                .key
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// A uint32 on the wire: a varint of which prost keeps the low 32 bits.
fn flags(value: Value<'_>, n: u32) -> Result<u32, WireError> {
    Ok(value.varint(n)? as u32)
}

/// A sint32 on the wire: a zigzag varint of which prost keeps the low 32 bits.
fn sint32(value: Value<'_>, n: u32) -> Result<i32, WireError> {
    let raw = value.varint(n)? as u32;
    Ok(((raw >> 1) as i32) ^ -((raw & 1) as i32))
}

/// The metric's name and its first `max_series_attributes` attributes by key, values as text.
/// Sorted and cut while borrowed, so that only what the key keeps is copied, once.
fn series_key<'a>(
    name: &str,
    attributes: &[KeyValueView<'a>],
    pairs: &mut Vec<(&'a str, Cow<'a, str>)>,
    options: &NormalizeOptions,
    truncated: &mut u64,
) -> Result<SeriesKey, WireError> {
    let max = options.max_attribute_value_len;
    pairs.clear();
    for kv in attributes {
        let key = kv.key_str()?;
        if let Some(text) = kv.value.and_then(value_text) {
            pairs.push((key, text));
        }
    }
    pairs.sort_unstable();
    pairs.dedup_by(|a, b| a.0 == b.0);
    if pairs.len() > options.max_series_attributes {
        *truncated += (pairs.len() - options.max_series_attributes) as u64;
        pairs.truncate(options.max_series_attributes);
    }
    let attributes = pairs
        .drain(..)
        .map(|(k, v)| (cut_to(k, max, truncated), cut_owned(v, max, truncated)))
        .collect();
    Ok(SeriesKey::new(cut_to(name, max, truncated), attributes))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{kv, resource};
    use super::*;
    use opentelemetry_proto::tonic::common::v1::KeyValue;
    use opentelemetry_proto::tonic::metrics::v1::{
        Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
        Summary, SummaryDataPoint, metric::Data, number_data_point,
    };

    fn number_point(time: u64, value: f64, attrs: Vec<KeyValue>) -> NumberDataPoint {
        NumberDataPoint {
            attributes: attrs,
            start_time_unix_nano: 10,
            time_unix_nano: time,
            value: Some(number_data_point::Value::AsDouble(value)),
            ..NumberDataPoint::default()
        }
    }

    fn metric(name: &str, data: Data) -> Metric {
        Metric {
            name: name.into(),
            data: Some(data),
            ..Metric::default()
        }
    }

    fn request(metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: resource(&[("service.name", "shop")]),
                scope_metrics: vec![ScopeMetrics {
                    metrics,
                    ..ScopeMetrics::default()
                }],
                ..ResourceMetrics::default()
            }],
        }
    }

    #[test]
    fn sums_gauges_and_histograms_keep_their_shape() {
        let sum = Data::Sum(Sum {
            data_points: vec![number_point(100, 4.0, vec![kv("route", "/a")])],
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        });
        let gauge = Data::Gauge(Gauge {
            data_points: vec![number_point(100, 0.5, vec![])],
        });
        let histogram = Data::Histogram(Histogram {
            data_points: vec![HistogramDataPoint {
                time_unix_nano: 100,
                count: 3,
                sum: Some(12.0),
                bucket_counts: vec![1, 2, 0],
                explicit_bounds: vec![5.0, 10.0],
                ..HistogramDataPoint::default()
            }],
            aggregation_temporality: AggregationTemporality::Delta as i32,
        });
        let out = metrics(
            &request(vec![
                metric("orders", sum),
                metric("load", gauge),
                metric("latency", histogram),
            ]),
            &NormalizeOptions::default(),
        )
        .expect("decodes");
        assert_eq!((out.accepted, out.rejected), (3, 0));
        let points = &out.batch.resources[0].metric_points;
        assert_eq!(points[0].series.to_string(), "orders{route=\"/a\"}");
        assert_eq!(
            points[0].value,
            PointValue::Sum {
                temporality: Temporality::Cumulative,
                monotonic: true,
                value: 4.0
            }
        );
        assert_eq!(points[1].value, PointValue::Gauge(0.5));
        assert!(matches!(points[2].value, PointValue::Histogram { count: 3, .. }));
    }

    #[test]
    fn unusable_points_are_rejected_one_by_one() {
        let mut no_time = number_point(0, 1.0, vec![]);
        no_time.time_unix_nano = 0;
        let gauge = Data::Gauge(Gauge {
            data_points: vec![
                no_time,
                number_point(5, f64::NAN, vec![]),
                number_point(5, 1.0, vec![]),
                number_point(u64::MAX, 1.0, vec![]),
            ],
        });
        let bad_histogram = Data::Histogram(Histogram {
            data_points: vec![HistogramDataPoint {
                time_unix_nano: 100,
                bucket_counts: vec![1, 2],
                explicit_bounds: vec![5.0, 10.0],
                ..HistogramDataPoint::default()
            }],
            aggregation_temporality: AggregationTemporality::Delta as i32,
        });
        let summary = Data::Summary(Summary {
            data_points: vec![SummaryDataPoint::default()],
        });
        let out = metrics(
            &request(vec![
                metric("g", gauge),
                metric("h", bad_histogram),
                metric("s", summary),
            ]),
            &NormalizeOptions::default(),
        )
        .expect("decodes");
        assert_eq!((out.accepted, out.rejected), (1, 5), "{:?}", out.rejections);
        assert_eq!(out.skipped, 0);
        assert!(
            out.rejections.keys().any(|r| r.contains("after 2262")),
            "{:?}",
            out.rejections
        );
    }

    #[test]
    fn points_without_a_recorded_value_are_skipped_not_accepted() {
        let mut gap = number_point(100, 0.0, vec![]);
        gap.flags = NO_RECORDED_VALUE;
        gap.value = None;
        let gauge = Data::Gauge(Gauge {
            data_points: vec![gap, number_point(100, 1.0, vec![])],
        });
        let out = metrics(&request(vec![metric("g", gauge)]), &NormalizeOptions::default()).expect("decodes");
        assert_eq!((out.accepted, out.rejected, out.skipped), (1, 0, 1));
        assert_eq!(out.batch.resources[0].metric_points.len(), 1);
        assert_eq!(out.error_message("data points"), None);
    }

    #[test]
    fn series_keep_the_first_attributes_by_key() {
        let options = NormalizeOptions {
            max_series_attributes: 2,
            ..NormalizeOptions::default()
        };
        let attributes = vec![kv("c", "3"), kv("a", "1"), kv("b", "2")];
        let gauge = Data::Gauge(Gauge {
            data_points: vec![number_point(100, 1.0, attributes)],
        });
        let out = metrics(&request(vec![metric("m", gauge)]), &options).expect("decodes");
        let key = &out.batch.resources[0].metric_points[0].series;
        assert_eq!(key.to_string(), "m{a=\"1\",b=\"2\"}");
        assert_eq!(out.truncated, 1);
    }

    /// The series keys of the first resource's points, as text.
    fn series_keys(out: &Normalized) -> Vec<String> {
        out.batch.resources[0]
            .metric_points
            .iter()
            .map(|p| p.series.to_string())
            .collect()
    }

    #[test]
    fn a_series_read_again_has_the_key_made_afresh_under_the_options_of_its_read() {
        let long = "v".repeat(40);
        let attributes = vec![kv("c", "3"), kv("a", &long), kv("b", "2")];
        let request = request(vec![metric(
            "m",
            Data::Gauge(Gauge {
                data_points: vec![
                    number_point(100, 1.0, attributes.clone()),
                    number_point(200, 2.0, attributes),
                ],
            }),
        )]);
        let read = |max_series_attributes, max_attribute_value_len| {
            let options = NormalizeOptions {
                max_series_attributes,
                max_attribute_value_len,
                ..NormalizeOptions::default()
            };
            let out = metrics(&request, &options).expect("decodes");
            (series_keys(&out), out.truncated)
        };
        let cut = format!("m{{a={:?},b=\"2\"}}", "v".repeat(10));
        // The second point's key is found, not made: the same key, its cuts counted again.
        for _ in 0..2 {
            assert_eq!(read(2, 10), (vec![cut.clone(), cut.clone()], 4));
        }
        // Other options make other keys from the same bytes.
        let whole = format!("m{{a={long:?},b=\"2\",c=\"3\"}}");
        assert_eq!(read(8, 64), (vec![whole.clone(), whole], 0));
        assert_eq!(read(2, 10), (vec![cut.clone(), cut], 4));
    }

    #[test]
    fn a_thread_keeps_a_bounded_number_of_series_keys_and_counts_those_it_forgets() {
        let series = MAX_KEPT_SERIES_KEYS + 904;
        let points = (0..series)
            .map(|i| number_point(100, 1.0, vec![kv("i", &i.to_string())]))
            .collect();
        let request = request(vec![metric("m", Data::Gauge(Gauge { data_points: points }))]);
        for _ in 0..2 {
            let out = metrics(&request, &NormalizeOptions::default()).expect("decodes");
            let keys = series_keys(&out);
            assert_eq!(keys.len(), series);
            for (i, key) in keys.iter().enumerate() {
                assert_eq!(*key, format!("m{{i=\"{i}\"}}"));
            }
            // Every read forgets the 4,096 kept when the 4,097th key comes.
            assert!(
                out.series_keys_forgotten >= MAX_KEPT_SERIES_KEYS as u64,
                "{}",
                out.series_keys_forgotten
            );
        }
    }

    #[test]
    fn a_series_too_large_to_keep_has_its_key_made_at_every_read() {
        let large = "x".repeat(MAX_KEPT_SERIES_WIRE);
        let gauge = Data::Gauge(Gauge {
            data_points: vec![number_point(100, 1.0, vec![kv("a", &large)]); 2],
        });
        let request = request(vec![metric("m", gauge)]);
        let options = NormalizeOptions::default();
        let cut = format!("m{{a={:?}}}", &large[..options.max_attribute_value_len]);
        for _ in 0..2 {
            let out = metrics(&request, &options).expect("decodes");
            assert_eq!(
                (series_keys(&out), out.truncated),
                (vec![cut.clone(), cut.clone()], 2)
            );
        }
        SERIES_KEYS.with_borrow(|keys| {
            assert!(keys.kept.is_empty());
            assert!(keys.wire.capacity() <= MAX_KEPT_SERIES_WIRE);
        });
    }

    /// What protobuf allows on the wire beyond what prost writes.
    mod wire {
        use super::*;
        use opentelemetry_proto::tonic::metrics::v1::{ExponentialHistogram, ExponentialHistogramDataPoint};

        fn normalize(buf: &[u8]) -> Result<Normalized, DecodeError> {
            metrics_protobuf(buf, &NormalizeOptions::default())
        }

        use super::super::super::common::{length_delimited, request_with_item as request_with_metric};

        fn sum(points: Vec<NumberDataPoint>, temporality: AggregationTemporality) -> Data {
            Data::Sum(Sum {
                data_points: points,
                aggregation_temporality: temporality as i32,
                is_monotonic: true,
            })
        }

        #[test]
        fn a_metric_in_parts_merges_as_prost_merges_it() {
            // The sum's points in two parts, the second changing the temporality: both points
            // count, under the last temporality. Then a gauge given after a sum replaces it.
            let mut buf = metric(
                "m",
                sum(
                    vec![number_point(100, 1.0, vec![])],
                    AggregationTemporality::Delta,
                ),
            )
            .encode_to_vec();
            buf.extend(
                metric(
                    "",
                    sum(
                        vec![number_point(200, 2.0, vec![])],
                        AggregationTemporality::Cumulative,
                    ),
                )
                .encode_to_vec(),
            );
            let request = request_with_metric(&buf);
            let out = normalize(&request).expect("decodes");
            let points = &out.batch.resources[0].metric_points;
            assert_eq!(points.len(), 2);
            assert!(points.iter().all(|p| matches!(
                p.value,
                PointValue::Sum {
                    temporality: Temporality::Cumulative,
                    ..
                }
            )));
            // The second part's empty name is not on the wire (a default is not encoded), so the
            // first part's stands; prost reads the same bytes the same way.
            assert!(points.iter().all(|p| p.series.name == "m"));
            let decoded = ExportMetricsServiceRequest::decode(&request[..]).expect("prost decodes");
            assert_eq!(
                metrics(&decoded, &NormalizeOptions::default()).expect("decodes"),
                out
            );

            buf.extend(
                metric(
                    "",
                    Data::Gauge(Gauge {
                        data_points: vec![number_point(300, 3.0, vec![])],
                    }),
                )
                .encode_to_vec(),
            );
            let out = normalize(&request_with_metric(&buf)).expect("decodes");
            let values: Vec<&PointValue> = out.batch.resources[0]
                .metric_points
                .iter()
                .map(|p| &p.value)
                .collect();
            assert_eq!(values, vec![&PointValue::Gauge(3.0)]);
        }

        #[test]
        fn repeated_numbers_are_read_packed_or_one_by_one() {
            // A histogram point whose bucket counts and bounds come one value per field (wire type
            // 1), and then once more packed: all of them, in order.
            let mut point = HistogramDataPoint {
                time_unix_nano: 100,
                count: 6,
                ..HistogramDataPoint::default()
            }
            .encode_to_vec();
            for count in [1u64, 2] {
                point.push(0x31); // field 6, fixed64
                point.extend(count.to_le_bytes());
            }
            point.push(0x39); // field 7, fixed64
            point.extend(5.0f64.to_bits().to_le_bytes());
            point.extend(
                HistogramDataPoint {
                    bucket_counts: vec![3],
                    explicit_bounds: vec![10.0],
                    ..HistogramDataPoint::default()
                }
                .encode_to_vec(),
            );
            let mut histogram = Vec::new();
            length_delimited(1, &point, &mut histogram);
            histogram.extend([0x10, AggregationTemporality::Delta as u8]);
            let mut metric = vec![0x0a, 1, b'h'];
            length_delimited(9, &histogram, &mut metric);
            let request = request_with_metric(&metric);
            let out = normalize(&request).expect("decodes");
            match &out.batch.resources[0].metric_points[0].value {
                PointValue::Histogram {
                    bounds,
                    bucket_counts,
                    ..
                } => {
                    assert_eq!(bounds, &vec![5.0, 10.0]);
                    assert_eq!(bucket_counts, &vec![1, 2, 3]);
                }
                other => panic!("{other:?}"),
            }
            let decoded = ExportMetricsServiceRequest::decode(&request[..]).expect("prost decodes");
            assert_eq!(
                metrics(&decoded, &NormalizeOptions::default()).expect("decodes"),
                out
            );
        }

        #[test]
        fn a_point_that_does_not_decode_fails_the_request_with_where_and_why() {
            let gauge = metric(
                "g",
                Data::Gauge(Gauge {
                    data_points: vec![number_point(100, 1.0, vec![])],
                }),
            );
            let whole = request_with_metric(&gauge.encode_to_vec());
            assert!(normalize(&whole).is_ok());
            assert!(normalize(&whole[..whole.len() - 2]).is_err());
            // The point's time as a varint instead of fixed64.
            let mut point = number_point(100, 1.0, vec![]).encode_to_vec();
            point.extend([0x18, 1]);
            let mut data = Vec::new();
            length_delimited(1, &point, &mut data);
            let mut metric = Vec::new();
            length_delimited(5, &data, &mut metric);
            let error = normalize(&request_with_metric(&metric)).expect_err("wrong wire type");
            assert_eq!(
                error.to_string(),
                "in NumberDataPoint: field 3 has wire type varint, expected fixed64"
            );
        }

        /// Every kind of point, a summary and attributes of every scalar type, each cut to two
        /// points: mutated, read as prost reads them.
        #[test]
        fn mutated_requests_are_read_as_prost_reads_them() {
            let mut request = crate::testdata::sdk_metrics_request(3, 1_000_000_000);
            let metrics = &mut request.resource_metrics[0].scope_metrics[0].metrics;
            metrics.dedup_by(|a, b| a.name == b.name);
            for metric in metrics.iter_mut() {
                match &mut metric.data {
                    Some(Data::Gauge(g)) => g.data_points.truncate(2),
                    Some(Data::Sum(s)) => s.data_points.truncate(2),
                    Some(Data::Histogram(h)) => h.data_points.truncate(2),
                    Some(Data::ExponentialHistogram(h)) => {
                        h.data_points.truncate(2);
                        h.data_points[1].negative = h.data_points[0].positive.clone();
                    }
                    _ => {}
                }
            }
            metrics.push(metric(
                "s",
                Data::Summary(Summary {
                    data_points: vec![SummaryDataPoint::default()],
                }),
            ));
            metrics.push(metric(
                "e",
                Data::ExponentialHistogram(ExponentialHistogram {
                    data_points: vec![ExponentialHistogramDataPoint {
                        time_unix_nano: 5,
                        scale: -2,
                        ..ExponentialHistogramDataPoint::default()
                    }],
                    aggregation_temporality: AggregationTemporality::Delta as i32,
                }),
            ));
            super::super::super::common::assert_mutations_read_as_prost_reads::<ExportMetricsServiceRequest>(
                &request.encode_to_vec(),
                metrics_protobuf,
            );
        }

        #[test]
        fn an_sdk_export_reads_whole() {
            let request = crate::testdata::sdk_metrics_request(1, 1_000_000_000);
            let out = metrics(&request, &NormalizeOptions::default()).expect("decodes");
            assert_eq!((out.accepted, out.rejected, out.skipped), (88, 0, 0));
            let series: std::collections::BTreeSet<String> = out.batch.resources[0]
                .metric_points
                .iter()
                .map(|p| p.series.name.clone())
                .collect();
            assert_eq!(series.len(), 11, "{series:?}");
        }
    }
}
