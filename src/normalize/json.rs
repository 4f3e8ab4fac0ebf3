//! OTLP/JSON read straight into observations: the body is parsed into borrowed views of only the
//! fields canaryd reads (serde, every other field skipped unread), and each item goes through the
//! same code as the protobuf reader's (`traces::observe_span`, `metrics::observe_point`,
//! `logs::observe_record`). No prost message is built and nothing is encoded again. Strings are
//! borrowed from the body unless they hold escapes.
//!
//! The OTLP/JSON encoding, as the specification and opentelemetry-proto's serde have it: field
//! names in lowerCamelCase, ids as hex, 64-bit integers as decimal strings or numbers, enums as
//! numbers, an `AnyValue` as an object of one `...Value` member (the last one given wins, `null`
//! is none), unknown fields ignored.

use std::borrow::Cow;
use std::fmt;

use canaryd_engine::ResourceObservations;
use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};

use super::common::KeyValueView;
use super::traces::{EventView, Scratch as SpanScratch, SpanView, observe_span};
use super::{AttrValue, IdentityReader, NO_SERVICE_NAME, NormalizeOptions, Normalized};

/// Why an OTLP/JSON body could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct JsonError(String);

/// Reads an `ExportTraceServiceRequest` in its JSON encoding.
pub fn traces_json(body: &[u8], options: &NormalizeOptions) -> Result<Normalized, JsonError> {
    let request: TracesRequest<'_> = serde_json::from_slice(body).map_err(|e| JsonError(e.to_string()))?;
    let mut out = Normalized::default();
    let reader = IdentityReader { options };
    let mut scratch = SpanScratch::default();
    for resource in &request.resource_spans {
        let spans = || resource.scope_spans.iter().flat_map(|s| &s.spans);
        let attributes = resource_attributes(resource.resource.as_ref());
        let Some((identity, instance)) = reader.read(&attributes[..], &mut out.truncated) else {
            out.reject(NO_SERVICE_NAME, spans().count() as u64);
            continue;
        };
        let mut obs = ResourceObservations::new(identity);
        obs.instance = instance;
        let mut accepted = 0;
        for span in spans() {
            let ids = [
                span.trace_id.bytes(),
                span.span_id.bytes(),
                span.parent_span_id.bytes(),
            ];
            scratch.span_attributes.clear();
            scratch
                .span_attributes
                .extend(span.attributes.iter().map(KeyValueJson::view));
            scratch.events.clear();
            scratch.events.extend(span.events.iter().map(EventJson::view));
            let view = SpanView {
                trace_id: ids[0].as_slice(),
                span_id: ids[1].as_slice(),
                parent_span_id: ids[2].as_slice(),
                name: span.name.as_bytes(),
                kind: span.kind,
                start_time_unix_nano: span.start_time_unix_nano.0,
                end_time_unix_nano: span.end_time_unix_nano.0,
                status_code: span.status.as_ref().map_or(0, |s| s.code),
            };
            match observe_span(&view, &mut scratch, options, &mut obs, &mut out.truncated) {
                Ok(()) => {
                    obs.spans += 1;
                    accepted += 1;
                }
                Err(reason) => out.reject(reason, 1),
            }
        }
        keep(&mut out, obs, accepted);
    }
    Ok(out)
}

/// Reads an `ExportLogsServiceRequest` in its JSON encoding.
pub fn logs_json(body: &[u8], options: &NormalizeOptions) -> Result<Normalized, JsonError> {
    let request: LogsRequest<'_> = serde_json::from_slice(body).map_err(|e| JsonError(e.to_string()))?;
    let mut out = Normalized::default();
    let reader = IdentityReader { options };
    for resource in &request.resource_logs {
        let records = || resource.scope_logs.iter().flat_map(|s| &s.log_records);
        let attributes = resource_attributes(resource.resource.as_ref());
        let Some((identity, instance)) = reader.read(&attributes[..], &mut out.truncated) else {
            out.reject(NO_SERVICE_NAME, records().count() as u64);
            continue;
        };
        let mut obs = ResourceObservations::new(identity);
        obs.instance = instance;
        let mut accepted = 0;
        for record in records() {
            accepted += super::logs::observe_record(
                record.time_unix_nano.0,
                record.observed_time_unix_nano.0,
                record.severity_number,
                &record.severity_text,
                &mut obs,
                &mut out,
            );
        }
        keep(&mut out, obs, accepted);
    }
    Ok(out)
}

/// Reads an `ExportMetricsServiceRequest` in its JSON encoding.
pub fn metrics_json(body: &[u8], options: &NormalizeOptions) -> Result<Normalized, JsonError> {
    use super::metrics::{
        ExponentialParts, PointHead, double_value, exponential_value, histogram_value, sum_value, temporality,
    };
    let request: MetricsRequest<'_> = serde_json::from_slice(body).map_err(|e| JsonError(e.to_string()))?;
    let mut out = Normalized::default();
    let reader = IdentityReader { options };
    let mut points = PointScratch::default();
    for resource in &request.resource_metrics {
        let metrics = || resource.scope_metrics.iter().flat_map(|s| &s.metrics);
        let resource_attributes = resource_attributes(resource.resource.as_ref());
        let Some((identity, instance)) = reader.read(&resource_attributes[..], &mut out.truncated) else {
            out.reject(NO_SERVICE_NAME, metrics().map(MetricJson::points).sum());
            continue;
        };
        let mut obs = ResourceObservations::new(identity);
        obs.instance = instance;
        let mut accepted = 0;
        for metric in metrics() {
            let head = |start: U64, time: U64, flags: u32| PointHead {
                start_time: start.0,
                time: time.0,
                flags,
            };
            let mut observe = |head, value, point_attributes| {
                points
                    .observe(
                        &metric.name,
                        head,
                        value,
                        point_attributes,
                        options,
                        &mut obs,
                        &mut out,
                    )
                    .map_err(|e| JsonError(e.to_string()))
            };
            match &metric.data {
                None => {}
                Some(DataJson::Summary(summary)) => {
                    out.reject(
                        "summary data points (not supported)",
                        summary.data_points.len() as u64,
                    );
                }
                Some(DataJson::Gauge(gauge)) => {
                    for p in &gauge.data_points {
                        let value = p
                            .number()
                            .and_then(double_value)
                            .map(canaryd_engine::PointValue::Gauge);
                        accepted += observe(
                            head(p.start_time_unix_nano, p.time_unix_nano, p.flags),
                            value,
                            &p.attributes,
                        )?;
                    }
                }
                Some(DataJson::Sum(sum)) => {
                    let temporality = temporality(sum.aggregation_temporality);
                    for p in &sum.data_points {
                        let value =
                            sum_value(p.number().and_then(double_value), temporality, sum.is_monotonic);
                        accepted += observe(
                            head(p.start_time_unix_nano, p.time_unix_nano, p.flags),
                            value,
                            &p.attributes,
                        )?;
                    }
                }
                Some(DataJson::Histogram(histogram)) => {
                    let temporality = temporality(histogram.aggregation_temporality);
                    for p in &histogram.data_points {
                        let counts = p.bucket_counts.iter().map(|c| c.0).collect();
                        let value =
                            histogram_value(temporality, p.count.0, p.sum, p.explicit_bounds.clone(), counts);
                        accepted += observe(
                            head(p.start_time_unix_nano, p.time_unix_nano, p.flags),
                            value,
                            &p.attributes,
                        )?;
                    }
                }
                Some(DataJson::Exponential(histogram)) => {
                    let temporality = temporality(histogram.aggregation_temporality);
                    for p in &histogram.data_points {
                        let parts = ExponentialParts {
                            count: p.count.0,
                            sum: p.sum,
                            scale: p.scale,
                            zero_count: p.zero_count.0,
                            positive: p.positive.as_ref().map(BucketsJson::read).unwrap_or_default(),
                            negative: p.negative.as_ref().map(BucketsJson::read).unwrap_or_default(),
                        };
                        let value = exponential_value(temporality, parts);
                        accepted += observe(
                            head(p.start_time_unix_nano, p.time_unix_nano, p.flags),
                            value,
                            &p.attributes,
                        )?;
                    }
                }
            }
        }
        keep(&mut out, obs, accepted);
    }
    Ok(out)
}

/// Buffers reused from point to point: its attributes as views, and its series' pairs.
#[derive(Default)]
struct PointScratch<'a> {
    attributes: Vec<KeyValueView<'a>>,
    pairs: Vec<(&'a str, Cow<'a, str>)>,
}

impl<'a> PointScratch<'a> {
    #[allow(clippy::too_many_arguments)]
    fn observe(
        &mut self,
        name: &str,
        head: super::metrics::PointHead,
        value: super::metrics::PointRead,
        attributes: &'a [KeyValueJson<'a>],
        options: &NormalizeOptions,
        obs: &mut ResourceObservations,
        out: &mut Normalized,
    ) -> Result<u64, super::DecodeError> {
        self.attributes.clear();
        self.attributes.extend(attributes.iter().map(KeyValueJson::view));
        let point = super::metrics::Point {
            head,
            value,
            attributes: super::metrics::PointAttributes::Read(&self.attributes),
        };
        super::metrics::observe_point(name, point, &mut self.pairs, options, obs, out)
    }
}

/// A resource's observations go out with the request when any of its items was accepted, as the
/// protobuf reader has it.
fn keep(out: &mut Normalized, obs: ResourceObservations, accepted: u64) {
    if accepted > 0 {
        out.accepted += accepted;
        out.batch.resources.push(obs);
    }
}

fn resource_attributes<'a>(resource: Option<&'a ResourceJson<'a>>) -> Vec<KeyValueView<'a>> {
    resource
        .map(|r| r.attributes.iter().map(KeyValueJson::view).collect())
        .unwrap_or_default()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TracesRequest<'a> {
    #[serde(borrow, default)]
    resource_spans: Vec<ResourceSpansJson<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResourceSpansJson<'a> {
    #[serde(borrow, default)]
    resource: Option<ResourceJson<'a>>,
    #[serde(borrow, default)]
    scope_spans: Vec<ScopeSpansJson<'a>>,
}

#[derive(Deserialize)]
struct ScopeSpansJson<'a> {
    #[serde(borrow, default)]
    spans: Vec<SpanJson<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpanJson<'a> {
    #[serde(borrow, default)]
    trace_id: Hex<'a>,
    #[serde(borrow, default)]
    span_id: Hex<'a>,
    #[serde(borrow, default)]
    parent_span_id: Hex<'a>,
    #[serde(borrow, default)]
    name: Cow<'a, str>,
    #[serde(default)]
    kind: i32,
    #[serde(default)]
    start_time_unix_nano: U64,
    #[serde(default)]
    end_time_unix_nano: U64,
    #[serde(borrow, default)]
    attributes: Vec<KeyValueJson<'a>>,
    #[serde(borrow, default)]
    events: Vec<EventJson<'a>>,
    #[serde(default)]
    status: Option<StatusJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventJson<'a> {
    #[serde(default)]
    time_unix_nano: U64,
    #[serde(borrow, default)]
    name: Cow<'a, str>,
    #[serde(borrow, default)]
    attributes: Vec<KeyValueJson<'a>>,
}

impl EventJson<'_> {
    fn view(&self) -> EventView<'_> {
        // The first attribute with the key counts, as for any attribute lookup.
        let exception_type = self
            .attributes
            .iter()
            .find(|kv| kv.key == "exception.type")
            .map(|kv| kv.value.as_ref().map_or(AttrValue::Other, AnyValueJson::view));
        EventView {
            name: self.name.as_bytes(),
            time_unix_nano: self.time_unix_nano.0,
            exception_type,
        }
    }
}

#[derive(Deserialize)]
struct StatusJson {
    #[serde(default)]
    code: i32,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogsRequest<'a> {
    #[serde(borrow, default)]
    resource_logs: Vec<ResourceLogsJson<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResourceLogsJson<'a> {
    #[serde(borrow, default)]
    resource: Option<ResourceJson<'a>>,
    #[serde(borrow, default)]
    scope_logs: Vec<ScopeLogsJson<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ScopeLogsJson<'a> {
    #[serde(borrow, default)]
    log_records: Vec<LogRecordJson<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogRecordJson<'a> {
    #[serde(default)]
    time_unix_nano: U64,
    #[serde(default)]
    observed_time_unix_nano: U64,
    #[serde(default)]
    severity_number: i32,
    #[serde(borrow, default)]
    severity_text: Cow<'a, str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetricsRequest<'a> {
    #[serde(borrow, default)]
    resource_metrics: Vec<ResourceMetricsJson<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResourceMetricsJson<'a> {
    #[serde(borrow, default)]
    resource: Option<ResourceJson<'a>>,
    #[serde(borrow, default)]
    scope_metrics: Vec<ScopeMetricsJson<'a>>,
}

#[derive(Deserialize)]
struct ScopeMetricsJson<'a> {
    #[serde(borrow, default)]
    metrics: Vec<MetricJson<'a>>,
}

#[derive(Deserialize)]
struct MetricJson<'a> {
    #[serde(borrow, default)]
    name: Cow<'a, str>,
    /// The data oneof: one of `gauge`, `sum`, `histogram`, `exponentialHistogram`, `summary`.
    #[serde(borrow, flatten)]
    data: Option<DataJson<'a>>,
}

impl MetricJson<'_> {
    fn points(&self) -> u64 {
        (match &self.data {
            None => 0,
            Some(DataJson::Gauge(g)) => g.data_points.len(),
            Some(DataJson::Sum(s)) => s.data_points.len(),
            Some(DataJson::Histogram(h)) => h.data_points.len(),
            Some(DataJson::Exponential(h)) => h.data_points.len(),
            Some(DataJson::Summary(s)) => s.data_points.len(),
        }) as u64
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
enum DataJson<'a> {
    #[serde(borrow)]
    Gauge(GaugeJson<'a>),
    #[serde(borrow)]
    Sum(SumJson<'a>),
    #[serde(borrow)]
    Histogram(HistogramJson<'a>),
    #[serde(borrow, rename = "exponentialHistogram")]
    Exponential(ExponentialJson<'a>),
    Summary(SummaryJson),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GaugeJson<'a> {
    #[serde(borrow, default)]
    data_points: Vec<NumberPointJson<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SumJson<'a> {
    #[serde(borrow, default)]
    data_points: Vec<NumberPointJson<'a>>,
    #[serde(default)]
    aggregation_temporality: i32,
    #[serde(default)]
    is_monotonic: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HistogramJson<'a> {
    #[serde(borrow, default)]
    data_points: Vec<HistogramPointJson<'a>>,
    #[serde(default)]
    aggregation_temporality: i32,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExponentialJson<'a> {
    #[serde(borrow, default)]
    data_points: Vec<ExponentialPointJson<'a>>,
    #[serde(default)]
    aggregation_temporality: i32,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SummaryJson {
    #[serde(default)]
    data_points: Vec<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NumberPointJson<'a> {
    #[serde(borrow, default)]
    attributes: Vec<KeyValueJson<'a>>,
    #[serde(default)]
    start_time_unix_nano: U64,
    #[serde(default)]
    time_unix_nano: U64,
    #[serde(default)]
    flags: u32,
    #[serde(default)]
    as_double: Option<f64>,
    #[serde(default)]
    as_int: Option<I64>,
}

impl NumberPointJson<'_> {
    /// The value oneof, as a double (an integer converted), before it is checked.
    fn number(&self) -> Result<f64, &'static str> {
        match (self.as_double, self.as_int) {
            (Some(double), _) => Ok(double),
            (None, Some(int)) => Ok(int.0 as f64),
            (None, None) => Err("data points without a value"),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HistogramPointJson<'a> {
    #[serde(borrow, default)]
    attributes: Vec<KeyValueJson<'a>>,
    #[serde(default)]
    start_time_unix_nano: U64,
    #[serde(default)]
    time_unix_nano: U64,
    #[serde(default)]
    count: U64,
    #[serde(default)]
    sum: Option<f64>,
    #[serde(default)]
    bucket_counts: Vec<U64>,
    #[serde(default)]
    explicit_bounds: Vec<f64>,
    #[serde(default)]
    flags: u32,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExponentialPointJson<'a> {
    #[serde(borrow, default)]
    attributes: Vec<KeyValueJson<'a>>,
    #[serde(default)]
    start_time_unix_nano: U64,
    #[serde(default)]
    time_unix_nano: U64,
    #[serde(default)]
    count: U64,
    #[serde(default)]
    sum: Option<f64>,
    #[serde(default)]
    scale: i32,
    #[serde(default)]
    zero_count: U64,
    #[serde(default)]
    positive: Option<BucketsJson>,
    #[serde(default)]
    negative: Option<BucketsJson>,
    #[serde(default)]
    flags: u32,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BucketsJson {
    #[serde(default)]
    offset: i32,
    #[serde(default)]
    bucket_counts: Vec<U64>,
}

impl BucketsJson {
    fn read(&self) -> canaryd_engine::ExponentialBuckets {
        canaryd_engine::ExponentialBuckets {
            offset: self.offset,
            counts: self.bucket_counts.iter().map(|c| c.0).collect(),
        }
    }
}

#[derive(Deserialize)]
struct ResourceJson<'a> {
    #[serde(borrow, default)]
    attributes: Vec<KeyValueJson<'a>>,
}

#[derive(Deserialize)]
struct KeyValueJson<'a> {
    #[serde(borrow, default)]
    key: Cow<'a, str>,
    #[serde(borrow, default)]
    value: Option<AnyValueJson<'a>>,
}

impl KeyValueJson<'_> {
    fn view(&self) -> KeyValueView<'_> {
        KeyValueView {
            key: self.key.as_bytes(),
            value: self.value.as_ref().and_then(AnyValueJson::read),
        }
    }
}

/// An `AnyValue`'s member that was given: `None` for an empty object (or only unknown members).
#[derive(Default)]
struct AnyValueJson<'a>(Option<AnyJson<'a>>);

enum AnyJson<'a> {
    Str(Cow<'a, str>),
    Bool(bool),
    Int(i64),
    Double(f64),
    /// Bytes, arrays, maps: values canaryd does not read.
    Other,
}

impl AnyValueJson<'_> {
    fn read(&self) -> Option<AttrValue<'_>> {
        self.0.as_ref().map(|value| match value {
            AnyJson::Str(s) => AttrValue::Str(s),
            AnyJson::Bool(b) => AttrValue::Bool(*b),
            AnyJson::Int(i) => AttrValue::Int(*i),
            AnyJson::Double(d) => AttrValue::Double(*d),
            AnyJson::Other => AttrValue::Other,
        })
    }

    /// As an event's `exception.type` reads it: a value that is none is `Other`.
    fn view(&self) -> AttrValue<'_> {
        self.read().unwrap_or(AttrValue::Other)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for AnyValueJson<'a> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct AnyVisitor;

        /// `intValue`: a number or a decimal string.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum IntForm<'a> {
            Int(i64),
            #[serde(borrow)]
            Text(Cow<'a, str>),
        }

        impl<'de> Visitor<'de> for AnyVisitor {
            type Value = AnyValueJson<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an OTLP AnyValue object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut value = None;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let read = match &*key {
                        "stringValue" => map.next_value::<Option<Cow<'de, str>>>()?.map(AnyJson::Str),
                        "boolValue" => map.next_value::<Option<bool>>()?.map(AnyJson::Bool),
                        "intValue" => match map.next_value::<Option<IntForm<'de>>>()? {
                            Some(IntForm::Int(i)) => Some(AnyJson::Int(i)),
                            Some(IntForm::Text(t)) => {
                                Some(AnyJson::Int(t.parse().map_err(de::Error::custom)?))
                            }
                            None => None,
                        },
                        "doubleValue" => map.next_value::<Option<f64>>()?.map(AnyJson::Double),
                        "arrayValue" | "kvlistValue" | "bytesValue" => {
                            map.next_value::<Option<IgnoredAny>>()?.map(|_| AnyJson::Other)
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            None
                        }
                    };
                    if read.is_some() {
                        value = read;
                    }
                }
                Ok(AnyValueJson(value))
            }
        }

        d.deserialize_map(AnyVisitor)
    }
}

/// A 64-bit integer as OTLP/JSON writes one: a number or a decimal string.
#[derive(Clone, Copy, Default)]
struct Integer<T>(T);

/// The unsigned integers (times, counts).
type U64 = Integer<u64>;
/// The signed ones (`asInt`).
type I64 = Integer<i64>;

impl<'de, T> Deserialize<'de> for Integer<T>
where
    T: TryFrom<u64> + TryFrom<i64> + std::str::FromStr,
    <T as TryFrom<u64>>::Error: fmt::Display,
    <T as TryFrom<i64>>::Error: fmt::Display,
    <T as std::str::FromStr>::Err: fmt::Display,
{
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IntegerVisitor<T>(std::marker::PhantomData<T>);

        impl<T> Visitor<'_> for IntegerVisitor<T>
        where
            T: TryFrom<u64> + TryFrom<i64> + std::str::FromStr,
            <T as TryFrom<u64>>::Error: fmt::Display,
            <T as TryFrom<i64>>::Error: fmt::Display,
            <T as std::str::FromStr>::Err: fmt::Display,
        {
            type Value = Integer<T>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a 64-bit integer, or one as a decimal string")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Integer<T>, E> {
                T::try_from(v).map(Integer).map_err(E::custom)
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Integer<T>, E> {
                T::try_from(v).map(Integer).map_err(E::custom)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Integer<T>, E> {
                v.parse().map(Integer).map_err(E::custom)
            }
        }

        d.deserialize_any(IntegerVisitor(std::marker::PhantomData))
    }
}

/// Bytes written as hex (trace and span ids), kept as the text until read.
#[derive(Default)]
struct Hex<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Hex<'a> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // null is the default (no id), as proto3's JSON mapping has it for any field. Checked
        // here, so that a bad id refuses the request wherever it is.
        let text = Option::<Cow<'a, str>>::deserialize(d)?.unwrap_or_default();
        if text.len() % 2 != 0 || !text.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(de::Error::custom(format!("{text:?} is not an id in hex")));
        }
        Ok(Hex(text))
    }
}

/// Decoded id bytes: ids are 8 or 16 bytes, so 32 hold any valid one; a longer one (which the
/// span is then rejected for) is kept as 17 bytes, a length no id has.
struct IdBytes {
    buf: [u8; 32],
    len: usize,
}

impl IdBytes {
    fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Hex<'_> {
    /// The id's bytes (its text was checked when read).
    fn bytes(&self) -> IdBytes {
        let text = self.0.as_bytes();
        let mut id = IdBytes {
            buf: [0; 32],
            len: if text.len() / 2 > 32 { 17 } else { text.len() / 2 },
        };
        let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
        for (byte, pair) in id.buf.iter_mut().zip(text.chunks_exact(2)) {
            *byte = digit(pair[0]) << 4 | digit(pair[1]);
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span};
    use prost::Message;

    use super::*;
    use crate::testdata::{self, Rng, TraceShape, kv};

    fn options() -> NormalizeOptions {
        NormalizeOptions {
            // Short, so that some generated values are cut.
            max_attribute_value_len: 24,
            ..NormalizeOptions::default()
        }
    }

    /// A value of any AnyValue kind, some of them none at all.
    fn any_value(rng: &mut Rng) -> Option<AnyValue> {
        use any_value::Value;
        let value = match rng.below(9) {
            0 => return None,
            1 => None,
            2 => Some(Value::IntValue(rng.next_u64() as i64 >> rng.below(64))),
            3 => Some(Value::DoubleValue(rng.unit() * 1e3 - 500.0)),
            4 => Some(Value::BoolValue(rng.below(2) == 0)),
            5 => Some(Value::BytesValue(vec![1, 2, 3])),
            6 => Some(Value::ArrayValue(ArrayValue {
                values: vec![AnyValue {
                    value: Some(Value::StringValue("x".into())),
                }],
            })),
            _ => Some(Value::StringValue(text(rng))),
        };
        Some(AnyValue { value })
    }

    /// Text of the kinds clients send: plain, long, non-ASCII, with quotes, escapes and control
    /// characters.
    fn text(rng: &mut Rng) -> String {
        match rng.below(6) {
            0 => String::new(),
            1 => "GET /api/orders/{id}".into(),
            2 => "ünïcödé \u{1F980} name that is rather longer than the cut".into(),
            3 => "quote \" backslash \\ tab\t newline\n".into(),
            4 => "500".into(),
            _ => format!("value-{}", rng.below(1000)),
        }
    }

    fn attribute(rng: &mut Rng) -> KeyValue {
        let keys = [
            "http.route",
            "http.request.method",
            "http.response.status_code",
            "http.status_code",
            "peer.service",
            "db.system",
            "server.address",
            "messaging.destination.name",
            "exception.type",
            "other",
        ];
        KeyValue {
            key: keys[rng.below(keys.len() as u64) as usize].into(),
            value: any_value(rng),
            ..KeyValue::default()
        }
    }

    fn id(rng: &mut Rng, len: usize) -> Vec<u8> {
        // Mostly the right length; sometimes none, short or long (the span is then rejected).
        let len = match rng.below(12) {
            0 => 0,
            1 => len / 2,
            2 => len + 1,
            _ => len,
        };
        (0..len).map(|_| rng.below(256) as u8).collect()
    }

    fn time(rng: &mut Rng) -> u64 {
        match rng.below(20) {
            0 => 0,
            1 => u64::MAX - rng.below(1000),
            _ => testdata::EPOCH_NS + rng.below(600_000_000_000),
        }
    }

    fn resource(rng: &mut Rng) -> Option<Resource> {
        if rng.below(10) == 0 {
            return None;
        }
        let mut attributes = Vec::new();
        if rng.below(8) != 0 {
            attributes.push(kv("service.name", ["shop", "cart", ""][rng.below(3) as usize]));
        }
        for (key, chance) in [
            ("service.namespace", 4),
            ("service.version", 2),
            ("deployment.environment.name", 2),
            ("deployment.environment", 4),
            ("service.instance.id", 2),
        ] {
            if rng.below(chance) == 0 {
                attributes.push(KeyValue {
                    key: key.into(),
                    value: any_value(rng),
                    ..KeyValue::default()
                });
            }
        }
        Some(Resource {
            attributes,
            ..Resource::default()
        })
    }

    fn random_traces(rng: &mut Rng) -> ExportTraceServiceRequest {
        let resource_spans = (0..rng.below(4))
            .map(|_| ResourceSpans {
                resource: resource(rng),
                scope_spans: (0..rng.below(3))
                    .map(|_| ScopeSpans {
                        spans: (0..rng.below(6))
                            .map(|_| {
                                let start = time(rng);
                                Span {
                                    trace_id: id(rng, 16),
                                    span_id: id(rng, 8),
                                    parent_span_id: if rng.below(2) == 0 { vec![] } else { id(rng, 8) },
                                    name: text(rng),
                                    kind: rng.below(7) as i32 - 1,
                                    start_time_unix_nano: start,
                                    end_time_unix_nano: match rng.below(10) {
                                        0 => start.saturating_sub(1),
                                        _ => start.saturating_add(rng.below(1_000_000_000)),
                                    },
                                    attributes: (0..rng.below(6)).map(|_| attribute(rng)).collect(),
                                    events: (0..rng.below(3))
                                        .map(|_| span::Event {
                                            time_unix_nano: time(rng),
                                            name: if rng.below(2) == 0 {
                                                "exception".into()
                                            } else {
                                                text(rng)
                                            },
                                            attributes: (0..rng.below(3)).map(|_| attribute(rng)).collect(),
                                            ..span::Event::default()
                                        })
                                        .collect(),
                                    status: (rng.below(2) == 0).then(|| Status {
                                        code: rng.below(3) as i32,
                                        message: text(rng),
                                    }),
                                    ..Span::default()
                                }
                            })
                            .collect(),
                        ..ScopeSpans::default()
                    })
                    .collect(),
                ..ResourceSpans::default()
            })
            .collect();
        ExportTraceServiceRequest { resource_spans }
    }

    fn random_logs(rng: &mut Rng) -> ExportLogsServiceRequest {
        let resource_logs = (0..rng.below(4))
            .map(|_| ResourceLogs {
                resource: resource(rng),
                scope_logs: (0..rng.below(3))
                    .map(|_| ScopeLogs {
                        log_records: (0..rng.below(6))
                            .map(|_| LogRecord {
                                time_unix_nano: time(rng),
                                observed_time_unix_nano: time(rng),
                                severity_number: rng.below(26) as i32 - 1,
                                severity_text: ["", "ERROR", "warning", "Info", "crit!"]
                                    [rng.below(5) as usize]
                                    .into(),
                                body: any_value(rng),
                                attributes: (0..rng.below(3)).map(|_| attribute(rng)).collect(),
                                ..LogRecord::default()
                            })
                            .collect(),
                        ..ScopeLogs::default()
                    })
                    .collect(),
                ..ResourceLogs::default()
            })
            .collect();
        ExportLogsServiceRequest { resource_logs }
    }

    fn random_metrics(rng: &mut Rng) -> ExportMetricsServiceRequest {
        use opentelemetry_proto::tonic::metrics::v1::{
            ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Histogram, HistogramDataPoint,
            Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, Summary, SummaryDataPoint,
            exponential_histogram_data_point::Buckets, metric::Data, number_data_point,
        };
        let attributes = |rng: &mut Rng| (0..rng.below(4)).map(|_| attribute(rng)).collect::<Vec<_>>();
        // JSON has no NaN or infinity: every double generated is finite.
        let number = |rng: &mut Rng| match rng.below(4) {
            0 => None,
            1 => Some(number_data_point::Value::AsInt(
                rng.next_u64() as i64 >> rng.below(64),
            )),
            _ => Some(number_data_point::Value::AsDouble(rng.unit() * 100.0 - 10.0)),
        };
        let number_point = |rng: &mut Rng| NumberDataPoint {
            attributes: attributes(rng),
            start_time_unix_nano: time(rng),
            time_unix_nano: time(rng),
            flags: (rng.below(8) == 0) as u32,
            value: number(rng),
            ..NumberDataPoint::default()
        };
        let buckets = |rng: &mut Rng| Buckets {
            offset: rng.below(21) as i32 - 10,
            bucket_counts: (0..rng.below(5)).map(|_| rng.below(100)).collect(),
        };
        let data = |rng: &mut Rng| -> Option<Data> {
            let temporality = rng.below(3) as i32;
            let points = rng.below(4);
            Some(match rng.below(6) {
                0 => return None,
                1 => Data::Gauge(Gauge {
                    data_points: (0..points).map(|_| number_point(rng)).collect(),
                }),
                2 => Data::Sum(Sum {
                    data_points: (0..points).map(|_| number_point(rng)).collect(),
                    aggregation_temporality: temporality,
                    is_monotonic: rng.below(2) == 0,
                }),
                3 => Data::Histogram(Histogram {
                    data_points: (0..points)
                        .map(|_| {
                            let bounds: Vec<f64> = match rng.below(4) {
                                0 => vec![5.0, 1.0],
                                _ => (0..rng.below(4)).map(|i| i as f64 * 10.0).collect(),
                            };
                            let fits = rng.below(4) != 0;
                            HistogramDataPoint {
                                attributes: attributes(rng),
                                start_time_unix_nano: time(rng),
                                time_unix_nano: time(rng),
                                count: rng.below(1000),
                                sum: (rng.below(2) == 0).then(|| rng.unit() * 50.0),
                                bucket_counts: (0..bounds.len() as u64 + u64::from(fits))
                                    .map(|_| rng.below(50))
                                    .collect(),
                                explicit_bounds: bounds,
                                flags: (rng.below(8) == 0) as u32,
                                ..HistogramDataPoint::default()
                            }
                        })
                        .collect(),
                    aggregation_temporality: temporality,
                }),
                4 => Data::ExponentialHistogram(ExponentialHistogram {
                    data_points: (0..points)
                        .map(|_| ExponentialHistogramDataPoint {
                            attributes: attributes(rng),
                            start_time_unix_nano: time(rng),
                            time_unix_nano: time(rng),
                            count: rng.below(1000),
                            sum: (rng.below(2) == 0).then(|| rng.unit() * 50.0),
                            scale: rng.below(9) as i32 - 4,
                            zero_count: rng.below(10),
                            positive: (rng.below(3) != 0).then(|| buckets(rng)),
                            negative: (rng.below(3) == 0).then(|| buckets(rng)),
                            flags: (rng.below(8) == 0) as u32,
                            ..ExponentialHistogramDataPoint::default()
                        })
                        .collect(),
                    aggregation_temporality: temporality,
                }),
                _ => Data::Summary(Summary {
                    data_points: (0..points)
                        .map(|_| SummaryDataPoint {
                            time_unix_nano: time(rng),
                            ..SummaryDataPoint::default()
                        })
                        .collect(),
                }),
            })
        };
        let resource_metrics = (0..rng.below(4))
            .map(|_| ResourceMetrics {
                resource: resource(rng),
                scope_metrics: (0..rng.below(3))
                    .map(|_| ScopeMetrics {
                        metrics: (0..rng.below(4))
                            .map(|_| Metric {
                                name: text(rng),
                                data: data(rng),
                                ..Metric::default()
                            })
                            .collect(),
                        ..ScopeMetrics::default()
                    })
                    .collect(),
                ..ResourceMetrics::default()
            })
            .collect();
        ExportMetricsServiceRequest { resource_metrics }
    }

    /// Issue 16, item 4: a request in OTLP/JSON (as opentelemetry-proto writes it) reads exactly
    /// as the same request in protobuf does, for random requests of all three signals in every
    /// shape the readers handle (every point kind, bad temporalities, bounds and bucket counts,
    /// gaps), rejections, cuts and identity included.
    #[test]
    fn random_requests_read_from_json_as_from_protobuf() {
        let options = options();
        let mut rng = Rng::new(16);
        for _ in 0..2_000 {
            let traces = random_traces(&mut rng);
            let json = serde_json::to_vec(&traces).expect("JSON");
            let from_json = traces_json(&json, &options).expect("reads");
            let from_protobuf =
                super::super::traces_protobuf(&traces.encode_to_vec(), &options).expect("reads");
            assert_eq!(from_json, from_protobuf, "{}", String::from_utf8_lossy(&json));

            let metrics = random_metrics(&mut rng);
            let json = serde_json::to_vec(&metrics).expect("JSON");
            let from_json = metrics_json(&json, &options).expect("reads");
            let from_protobuf =
                super::super::metrics_protobuf(&metrics.encode_to_vec(), &options).expect("reads");
            assert_eq!(from_json, from_protobuf, "{}", String::from_utf8_lossy(&json));

            let logs = random_logs(&mut rng);
            let json = serde_json::to_vec(&logs).expect("JSON");
            let from_json = logs_json(&json, &options).expect("reads");
            let from_protobuf = super::super::logs_protobuf(&logs.encode_to_vec(), &options).expect("reads");
            assert_eq!(from_json, from_protobuf, "{}", String::from_utf8_lossy(&json));
        }
    }

    /// The SDK-shaped requests of the benchmarks and tests read alike too.
    #[test]
    fn generated_workloads_read_from_json_as_from_protobuf() {
        let options = NormalizeOptions::default();
        for seed in 0..5 {
            let traces = testdata::trace_request(&TraceShape::default(), seed);
            let json = serde_json::to_vec(&traces).expect("JSON");
            assert_eq!(
                traces_json(&json, &options).expect("reads"),
                super::super::traces_protobuf(&traces.encode_to_vec(), &options).expect("reads")
            );
            let metrics = testdata::sdk_metrics_request(seed, testdata::EPOCH_NS);
            let json = serde_json::to_vec(&metrics).expect("JSON");
            assert_eq!(
                metrics_json(&json, &options).expect("reads"),
                super::super::metrics_protobuf(&metrics.encode_to_vec(), &options).expect("reads")
            );
            let logs = testdata::sdk_logs_request(200, seed, testdata::EPOCH_NS);
            let json = serde_json::to_vec(&logs).expect("JSON");
            assert_eq!(
                logs_json(&json, &options).expect("reads"),
                super::super::logs_protobuf(&logs.encode_to_vec(), &options).expect("reads")
            );
        }
    }

    /// What the OTLP/JSON encoding allows beyond what opentelemetry-proto writes: 64-bit integers
    /// as numbers, unknown fields, nulls, escapes; and what it refuses: ids that are not hex,
    /// integers that are not integers.
    #[test]
    fn the_json_encodings_other_forms_read_alike_and_bad_ones_are_refused() {
        let options = NormalizeOptions::default();
        let as_written = r#"{"resourceSpans":[{"resource":{"attributes":[
            {"key":"service.name","value":{"stringValue":"shop"}},
            {"key":"service.version","value":{"intValue":"2"}}]},
          "scopeSpans":[{"scope":{"name":"s"},"spans":[{
            "traceId":"0102030405060708090a0b0c0d0e0f10","spanId":"0102030405060708",
            "name":"GET /orders","kind":2,"startTimeUnixNano":"1767571200000000000",
            "endTimeUnixNano":"1767571200020000000",
            "attributes":[{"key":"http.response.status_code","value":{"intValue":"503"}}]}]}]}]}"#;
        let other_forms = r#"{"resourceSpans":[{"unknown":{"deep":[1,2]},"resource":{"attributes":[
            {"key":"service.name","value":{"stringValue":"sh\u006fp","extra":true}},
            {"key":"service.version","value":{"intValue":2}}],"droppedAttributesCount":0},
          "scopeSpans":[{"spans":[{
            "traceId":"0102030405060708090A0B0C0D0E0F10","spanId":"0102030405060708",
            "parentSpanId":null,"traceState":"","flags":1,
            "name":"GET \/orders","kind":2,"startTimeUnixNano":1767571200000000000,
            "endTimeUnixNano":1767571200020000000,"status":null,"links":[],
            "attributes":[{"key":"http.response.status_code","value":{"stringValue":null,"intValue":503}}]}]}]}]}"#;
        let read = traces_json(as_written.as_bytes(), &options).expect("reads");
        assert_eq!(read.accepted, 1);
        assert!(read.batch.resources[0].requests[0].error, "503 is an error");
        assert_eq!(&*read.batch.resources[0].identity.version, "2");
        assert_eq!(
            traces_json(other_forms.as_bytes(), &options).expect("reads"),
            read
        );
        assert_eq!(
            traces_json(b"{}", &options).expect("reads"),
            Normalized::default()
        );
        for bad in [
            r#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"xyz0"}]}]}]}"#,
            r#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"spanId":"abc"}]}]}]}"#,
            r#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"startTimeUnixNano":"-1"}]}]}]}"#,
            r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"a","value":{"intValue":"1.5"}}]}}]}"#,
            r#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"kind":"SERVER"}]}]}]}"#,
            r#"{"resourceSpans": {}}"#,
            "not json",
        ] {
            assert!(traces_json(bad.as_bytes(), &options).is_err(), "{bad}");
        }
        assert!(
            logs_json(
                br#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"timeUnixNano":true}]}]}]}"#,
                &options
            )
            .is_err()
        );
    }
}
