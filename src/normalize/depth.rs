//! Values nested too deep for a whole decode, flattened before it.
//!
//! OTLP's `AnyValue` nests without bound (an array of arrays of ...), and prost refuses a whole
//! message nested past its recursion limit (100), so one deep attribute value cost every point
//! or log record of a metrics or logs request, which are decoded whole; the trace reader, which
//! skips values it does not read, took the same request. Here the request is walked on the wire,
//! along the schema's paths to every `AnyValue`, and when one nests deeper than
//! `MAX_VALUE_DEPTH`, the request is re-encoded with each value at that depth emptied (counted as
//! truncated, like a value cut to the length cap): the item keeps its other attributes and is
//! judged like any other. A request within the limit, which is every request a real SDK sends,
//! is not copied.

use prost::encoding::{WireType, encode_key, encode_varint};

use super::wire::{Fields, Value, WireError};

/// `AnyValue`s nested deeper than this are emptied. With the messages around them (8 at most, for
/// a metric point's exemplar) and up to three messages per level (a key-value list, its key-value
/// and its value), 24 levels stay inside prost's limit of 100.
pub const MAX_VALUE_DEPTH: usize = 24;

/// How a field's bytes are read: as a message of the schema, or not at all (copied as they are).
#[derive(Clone, Copy)]
enum Kind {
    Message(&'static [(u32, Kind)]),
    KeyValue,
    AnyValue,
}

const ATTRIBUTES: Kind = Kind::KeyValue;
const RESOURCE: Kind = Kind::Message(&[(1, ATTRIBUTES)]);
const SCOPE: Kind = Kind::Message(&[(3, ATTRIBUTES)]);
const EXEMPLAR: Kind = Kind::Message(&[(7, ATTRIBUTES)]);
const NUMBER_POINT: Kind = Kind::Message(&[(7, ATTRIBUTES), (5, EXEMPLAR)]);
const HISTOGRAM_POINT: Kind = Kind::Message(&[(9, ATTRIBUTES), (8, EXEMPLAR)]);
const EXPONENTIAL_POINT: Kind = Kind::Message(&[(1, ATTRIBUTES), (11, EXEMPLAR)]);
const SUMMARY_POINT: Kind = Kind::Message(&[(7, ATTRIBUTES)]);
const METRIC: Kind = Kind::Message(&[
    (5, Kind::Message(&[(1, NUMBER_POINT)])),
    (7, Kind::Message(&[(1, NUMBER_POINT)])),
    (9, Kind::Message(&[(1, HISTOGRAM_POINT)])),
    (10, Kind::Message(&[(1, EXPONENTIAL_POINT)])),
    (11, Kind::Message(&[(1, SUMMARY_POINT)])),
    (12, ATTRIBUTES),
]);
/// `ExportMetricsServiceRequest`.
const METRICS_REQUEST: Kind = Kind::Message(&[(
    1,
    Kind::Message(&[(1, RESOURCE), (2, Kind::Message(&[(1, SCOPE), (2, METRIC)]))]),
)]);
const LOG_RECORD: Kind = Kind::Message(&[(5, Kind::AnyValue), (6, ATTRIBUTES)]);
/// `ExportLogsServiceRequest`.
const LOGS_REQUEST: Kind = Kind::Message(&[(
    1,
    Kind::Message(&[(1, RESOURCE), (2, Kind::Message(&[(1, SCOPE), (2, LOG_RECORD)]))]),
)]);

/// `AnyValue`'s array (`ArrayValue`, field 5) and key-value list (`KeyValueList`, field 6): the
/// fields through which it nests.
const ARRAY_VALUE: u32 = 5;
const KVLIST_VALUE: u32 = 6;

/// A request re-encoded with its too-deep values emptied.
#[derive(Debug, PartialEq, Eq)]
pub struct Flattened {
    pub request: Vec<u8>,
    /// The values emptied.
    pub emptied: u64,
}

/// A metrics request with its too-deep values emptied; `None` when none is too deep.
pub fn flatten_metrics(buf: &[u8]) -> Result<Option<Flattened>, WireError> {
    flatten(buf, METRICS_REQUEST)
}

/// A logs request with its too-deep values (bodies included) emptied.
pub fn flatten_logs(buf: &[u8]) -> Result<Option<Flattened>, WireError> {
    flatten(buf, LOGS_REQUEST)
}

fn flatten(buf: &[u8], kind: Kind) -> Result<Option<Flattened>, WireError> {
    if !too_deep(buf, kind, 0)? {
        return Ok(None);
    }
    let mut request = Vec::with_capacity(buf.len());
    let mut emptied = 0;
    copy(buf, kind, 0, &mut request, &mut emptied)?;
    Ok(Some(Flattened { request, emptied }))
}

/// The fields of a message of `kind` to read as messages: the schema's, or an `AnyValue`'s and a
/// `KeyValue`'s own.
fn child(kind: Kind, field: u32) -> Option<Kind> {
    match kind {
        Kind::Message(children) => children.iter().find(|(f, _)| *f == field).map(|(_, k)| *k),
        Kind::KeyValue => (field == 2).then_some(Kind::AnyValue),
        // An ArrayValue's values and a KeyValueList's key-values, one level down.
        Kind::AnyValue => None,
    }
}

/// Whether any `AnyValue` in `buf` (a message of `kind`) is nested deeper than the limit.
/// `depth` counts the `AnyValue`s around `buf`.
fn too_deep(buf: &[u8], kind: Kind, depth: usize) -> Result<bool, WireError> {
    if let Kind::AnyValue = kind {
        if depth >= MAX_VALUE_DEPTH {
            return Ok(true);
        }
        for field in Fields::new(buf) {
            let (number, value) = field?;
            let inner = match number {
                ARRAY_VALUE => Kind::AnyValue,
                KVLIST_VALUE => Kind::KeyValue,
                _ => continue,
            };
            // ArrayValue { repeated AnyValue values = 1 } / KeyValueList { repeated KeyValue values = 1 }
            for entry in Fields::new(value.bytes(number)?) {
                let (1, entry) = entry? else { continue };
                if too_deep(entry.bytes(1)?, inner, depth + 1)? {
                    return Ok(true);
                }
            }
        }
        return Ok(false);
    }
    for field in Fields::new(buf) {
        let (number, value) = field?;
        if let Some(inner) = child(kind, number)
            && too_deep(value.bytes(number)?, inner, depth)?
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Copies `buf` (a message of `kind`) into `out`, emptying each `AnyValue` at the limit.
fn copy(buf: &[u8], kind: Kind, depth: usize, out: &mut Vec<u8>, emptied: &mut u64) -> Result<(), WireError> {
    for field in Fields::new(buf) {
        let (number, value) = field?;
        let inner = match kind {
            Kind::AnyValue => match number {
                ARRAY_VALUE => Some(Kind::Message(&[(1, Kind::AnyValue)])),
                KVLIST_VALUE => Some(Kind::Message(&[(1, Kind::KeyValue)])),
                _ => None,
            },
            _ => child(kind, number),
        };
        match (inner, value) {
            (Some(inner), Value::Bytes(bytes)) => {
                let mut nested = Vec::new();
                // An ArrayValue or KeyValueList is one level further in for what it holds.
                let next = if let Kind::AnyValue = kind {
                    depth + 1
                } else {
                    depth
                };
                if let Kind::AnyValue = inner
                    && next >= MAX_VALUE_DEPTH
                {
                    *emptied += 1;
                } else {
                    copy(bytes, inner, next, &mut nested, emptied)?;
                }
                encode_key(number, WireType::LengthDelimited, out);
                encode_varint(nested.len() as u64, out);
                out.extend_from_slice(&nested);
            }
            (_, Value::Varint(v)) => {
                encode_key(number, WireType::Varint, out);
                encode_varint(v, out);
            }
            (_, Value::Fixed64(v)) => {
                encode_key(number, WireType::SixtyFourBit, out);
                out.extend_from_slice(&v.to_le_bytes());
            }
            (_, Value::Fixed32(v)) => {
                encode_key(number, WireType::ThirtyTwoBit, out);
                out.extend_from_slice(&v.to_le_bytes());
            }
            (_, Value::Bytes(bytes)) => {
                encode_key(number, WireType::LengthDelimited, out);
                encode_varint(bytes.len() as u64, out);
                out.extend_from_slice(bytes);
            }
            // Groups are deprecated and no OTLP message has one: nothing reads them.
            (_, Value::Group) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, KeyValueList, any_value};
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::metrics::v1::{
        Exemplar, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, metric, number_data_point,
    };
    use prost::Message;

    /// A value `levels` arrays (or, alternately, key-value lists) deep around a string.
    fn nested(levels: usize) -> AnyValue {
        nested_as(levels, |level| level % 2 == 0)
    }

    /// The same, with an array at the levels `array` says, a key-value list at the others.
    fn nested_as(levels: usize, array: impl Fn(usize) -> bool) -> AnyValue {
        let mut value = AnyValue {
            value: Some(any_value::Value::StringValue("leaf".into())),
        };
        for level in 0..levels {
            value = AnyValue {
                value: Some(if array(level) {
                    any_value::Value::ArrayValue(ArrayValue { values: vec![value] })
                } else {
                    any_value::Value::KvlistValue(KeyValueList {
                        values: vec![KeyValue {
                            key: "k".into(),
                            value: Some(value),
                            ..Default::default()
                        }],
                    })
                }),
            };
        }
        value
    }

    fn attribute(key: &str, value: AnyValue) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(value),
            ..Default::default()
        }
    }

    fn depth_of(value: &AnyValue) -> usize {
        match &value.value {
            Some(any_value::Value::ArrayValue(a)) => 1 + a.values.iter().map(depth_of).max().unwrap_or(0),
            Some(any_value::Value::KvlistValue(l)) => {
                1 + l
                    .values
                    .iter()
                    .filter_map(|kv| kv.value.as_ref())
                    .map(depth_of)
                    .max()
                    .unwrap_or(0)
            }
            _ => 0,
        }
    }

    fn gauge_request(levels: usize) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![Metric {
                        name: "queue.depth".into(),
                        data: Some(metric::Data::Gauge(Gauge {
                            data_points: vec![NumberDataPoint {
                                attributes: vec![
                                    attribute("deep", nested(levels)),
                                    attribute("shallow", nested(2)),
                                ],
                                time_unix_nano: 1_767_571_200_000_000_000,
                                value: Some(number_data_point::Value::AsDouble(7.5)),
                                ..Default::default()
                            }],
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn a_request_within_the_limit_is_left_as_it_is() {
        let buf = gauge_request(MAX_VALUE_DEPTH - 1).encode_to_vec();
        assert_eq!(flatten_metrics(&buf), Ok(None));
        assert!(flatten_metrics(&gauge_request(MAX_VALUE_DEPTH).encode_to_vec()).is_ok_and(|f| f.is_some()));
    }

    /// The deepest a flattened request can be: key-value lists at every level (three messages
    /// each), in an exemplar's filtered attributes (the most messages around them).
    #[test]
    fn the_deepest_flattened_request_decodes() {
        let mut request = gauge_request(0);
        if let Some(metric::Data::Gauge(gauge)) =
            &mut request.resource_metrics[0].scope_metrics[0].metrics[0].data
        {
            gauge.data_points[0].exemplars = vec![Exemplar {
                filtered_attributes: vec![attribute("deep", nested_as(500, |_| false))],
                ..Default::default()
            }];
        }
        let buf = request.encode_to_vec();
        let Flattened {
            request: flat,
            emptied,
        } = flatten_metrics(&buf).expect("well formed").expect("too deep");
        assert_eq!(emptied, 1);
        assert!(ExportMetricsServiceRequest::decode(&flat[..]).is_ok());
    }

    #[test]
    fn a_value_nested_past_prosts_limit_is_emptied_and_the_point_kept() {
        let buf = gauge_request(200).encode_to_vec();
        assert!(
            ExportMetricsServiceRequest::decode(&buf[..]).is_err(),
            "prost refuses the whole request"
        );
        let Flattened {
            request: flat,
            emptied,
        } = flatten_metrics(&buf).expect("well formed").expect("too deep");
        assert_eq!(emptied, 1);
        let request = ExportMetricsServiceRequest::decode(&flat[..]).expect("decodes once flattened");
        let metric = &request.resource_metrics[0].scope_metrics[0].metrics[0];
        let Some(metric::Data::Gauge(gauge)) = &metric.data else {
            panic!("the gauge is kept: {metric:?}");
        };
        let point = &gauge.data_points[0];
        assert_eq!(point.value, Some(number_data_point::Value::AsDouble(7.5)));
        assert_eq!(point.time_unix_nano, 1_767_571_200_000_000_000);
        let deep = point.attributes[0].value.as_ref().expect("a value");
        assert_eq!(depth_of(deep), MAX_VALUE_DEPTH, "cut at the limit");
        assert_eq!(
            point.attributes[1],
            attribute("shallow", nested(2)),
            "the rest untouched"
        );
    }

    #[test]
    fn a_log_body_nested_too_deep_is_emptied_too() {
        let request = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                scope_logs: vec![ScopeLogs {
                    log_records: vec![LogRecord {
                        body: Some(nested(150)),
                        attributes: vec![attribute("deep", nested(150))],
                        severity_text: "ERROR".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let buf = request.encode_to_vec();
        let Flattened {
            request: flat,
            emptied,
        } = flatten_logs(&buf).expect("well formed").expect("too deep");
        assert_eq!(emptied, 2);
        let decoded = ExportLogsServiceRequest::decode(&flat[..]).expect("decodes once flattened");
        let record = &decoded.resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!(record.severity_text, "ERROR");
        assert_eq!(depth_of(record.body.as_ref().expect("a body")), MAX_VALUE_DEPTH);
    }

    #[test]
    fn malformed_framing_is_still_an_error() {
        let mut buf = gauge_request(200).encode_to_vec();
        buf.truncate(buf.len() - 3);
        assert!(flatten_metrics(&buf).is_err());
    }
}
