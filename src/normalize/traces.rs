//! Spans to requests, calls and exceptions.
//!
//! An entry span (SERVER or CONSUMER, or any span without a parent) is a request the app served;
//! a CLIENT or PRODUCER span is a call to a downstream, an edge of the call graph. A span can be
//! both (a root CLIENT span of a batch job). Other spans are counted but observed no further.
//!
//! Spans are read in place from the request's protobuf (`wire`): traces are most of what canaryd
//! receives, and a whole prost decode, which allocates every attribute key and value, cost more
//! than everything after it. Only the fields read here are looked into; a malformed one fails the
//! request as prost would.

use canaryd_engine::{
    CallObservation, DownstreamSource, ExceptionObservation, RequestObservation, ResourceObservations,
    SpanId, TraceId,
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;

use super::common::{DecodeError, ItemReader, KeyValueView, Nesting, read_request, within};
use super::wire::{Fields, WireError};
use super::{
    AttrValue, Names, NormalizeOptions, Normalized, beyond_horizon, int_attr, text_attr, value_text,
};
use std::sync::Arc;

/// Attributes that name a call's downstream, in order of preference.
const DOWNSTREAM_KEYS: [(&str, DownstreamSource); 6] = [
    ("peer.service", DownstreamSource::PeerService),
    ("server.address", DownstreamSource::ServerAddress),
    ("db.system.name", DownstreamSource::DbSystem),
    ("db.system", DownstreamSource::DbSystem),
    ("rpc.service", DownstreamSource::RpcService),
    ("messaging.system", DownstreamSource::MessagingSystem),
];

/// Whether normalization looks a span attribute up (`observe_span` and what it calls: the
/// operation, the error, the downstream), or it is the cohort attribute the options name: only
/// those attributes' values are read (`KeyValueView::read_if`). A key looked up and missing here
/// would read as absent; a debug build's lookup asserts instead.
fn span_attribute_read(key: &[u8], cohort: Option<&str>) -> bool {
    matches!(
        key,
        b"http.route"
            | b"http.request.method"
            | b"http.method"
            | b"messaging.destination.template"
            | b"messaging.destination.name"
            | b"http.response.status_code"
            | b"http.status_code"
            | b"peer.service"
            | b"server.address"
            | b"db.system.name"
            | b"db.system"
            | b"rpc.service"
            | b"messaging.system"
    ) || cohort.is_some_and(|c| c.as_bytes() == key)
}

const SPANS_BEYOND_HORIZON: &str = "spans with a time after 2262-04-11 (beyond int64 nanoseconds)";

/// A trace export as one signal's nesting, for `read_request`.
const TRACES: Nesting = Nesting {
    request: "ExportTraceServiceRequest",
    resource: "ResourceSpans",
    scope: "ScopeSpans",
};

/// Normalizes a request already decoded (a prost message, as tests and tools hold one) by reading
/// its protobuf encoding.
pub fn traces(
    request: &ExportTraceServiceRequest,
    options: &NormalizeOptions,
) -> Result<Normalized, DecodeError> {
    traces_protobuf(&request.encode_to_vec(), options)
}

/// Normalizes an `ExportTraceServiceRequest` in its protobuf encoding, reading it in place.
pub fn traces_protobuf(buf: &[u8], options: &NormalizeOptions) -> Result<Normalized, DecodeError> {
    read_request(buf, &TRACES, options, &mut Scratch::default())
}

/// Buffers reused from span to span, so a request allocates them once.
#[derive(Default)]
pub(super) struct Scratch<'a> {
    pub span_attributes: Vec<KeyValueView<'a>>,
    pub events: Vec<EventView<'a>>,
    names: Names,
}

impl<'a> ItemReader<'a> for Scratch<'a> {
    fn count(&mut self, _span: &'a [u8]) -> Result<u64, DecodeError> {
        Ok(1)
    }

    fn observe(
        &mut self,
        span: &'a [u8],
        options: &NormalizeOptions,
        obs: &mut ResourceObservations,
        out: &mut Normalized,
    ) -> Result<u64, DecodeError> {
        let span = SpanView::read(span, self, options.cohort_attribute.as_deref())?;
        match observe_span(&span, self, options, obs, &mut out.truncated) {
            Ok(()) => {
                obs.spans += 1;
                Ok(1)
            }
            Err(reason) => {
                out.reject(reason, 1);
                Ok(0)
            }
        }
    }
}

/// A span event: its name and time, and the `exception.type` attribute when it has one.
#[derive(Clone, Copy, Debug)]
pub(super) struct EventView<'a> {
    pub name: &'a [u8],
    pub time_unix_nano: u64,
    pub exception_type: Option<AttrValue<'a>>,
}

impl<'a> EventView<'a> {
    fn read(buf: &'a [u8]) -> Result<Self, WireError> {
        let mut event = EventView {
            name: b"",
            time_unix_nano: 0,
            exception_type: None,
        };
        for field in Fields::new(buf) {
            match field? {
                (1, value) => event.time_unix_nano = value.fixed64(1)?,
                (2, value) => event.name = value.bytes(2)?,
                (3, value) => {
                    let kv = KeyValueView::read_if(value.bytes(3)?, |key| key == b"exception.type")?;
                    // The first attribute with the key counts, as for any attribute lookup.
                    if kv.key == b"exception.type" && event.exception_type.is_none() {
                        event.exception_type = Some(kv.value.unwrap_or(AttrValue::Other));
                    }
                }
                _ => {}
            }
        }
        Ok(event)
    }

    fn is_exception(&self) -> bool {
        self.name == b"exception"
    }
}

/// The fields of a span that normalization reads; its attributes and events are in the scratch
/// buffers.
#[derive(Debug, Default)]
pub(super) struct SpanView<'a> {
    pub trace_id: &'a [u8],
    pub span_id: &'a [u8],
    pub parent_span_id: &'a [u8],
    /// Checked as UTF-8 only where it names something (a request without a route, a call
    /// without a downstream attribute): most spans are named by their attributes.
    pub name: &'a [u8],
    pub kind: i32,
    pub start_time_unix_nano: u64,
    pub end_time_unix_nano: u64,
    pub status_code: i32,
}

impl<'a> SpanView<'a> {
    fn read(buf: &'a [u8], scratch: &mut Scratch<'a>, cohort: Option<&str>) -> Result<Self, DecodeError> {
        let mut span = SpanView::default();
        scratch.span_attributes.clear();
        scratch.events.clear();
        for field in Fields::new(buf) {
            let (number, value) = field.map_err(within("Span"))?;
            match number {
                1 => span.trace_id = value.bytes(number).map_err(within("Span"))?,
                2 => span.span_id = value.bytes(number).map_err(within("Span"))?,
                4 => span.parent_span_id = value.bytes(number).map_err(within("Span"))?,
                5 => span.name = value.bytes(number).map_err(within("Span"))?,
                // An enum is an int32: a negative one is sign-extended, so keep the low 32 bits.
                6 => span.kind = value.varint(number).map_err(within("Span"))? as i32,
                7 => span.start_time_unix_nano = value.fixed64(number).map_err(within("Span"))?,
                8 => span.end_time_unix_nano = value.fixed64(number).map_err(within("Span"))?,
                9 => {
                    let kv = KeyValueView::read_if(value.bytes(number).map_err(within("Span"))?, |key| {
                        span_attribute_read(key, cohort)
                    })
                    .map_err(within("a span attribute"))?;
                    // An attribute left unread is never looked up: a debug build keeps it, to
                    // assert that no lookup meets one.
                    if kv.value != Some(AttrValue::Unread) || cfg!(debug_assertions) {
                        scratch.span_attributes.push(kv);
                    }
                }
                11 => {
                    let event = EventView::read(value.bytes(number).map_err(within("Span"))?)
                        .map_err(within("a span event"))?;
                    scratch.events.push(event);
                }
                15 => {
                    // Merged like any message field: a later status's code wins.
                    for field in Fields::new(value.bytes(number).map_err(within("Span"))?) {
                        if let (3, code) = field.map_err(within("Status"))? {
                            span.status_code = code.varint(3).map_err(within("Status"))? as i32;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(span)
    }
}

pub(super) fn observe_span(
    span: &SpanView<'_>,
    scratch: &mut Scratch<'_>,
    options: &NormalizeOptions,
    obs: &mut ResourceObservations,
    truncated: &mut u64,
) -> Result<(), &'static str> {
    let trace_id: [u8; 16] = span
        .trace_id
        .try_into()
        .map_err(|_| "spans with a trace_id that is not 16 bytes")?;
    let span_id: [u8; 8] = span
        .span_id
        .try_into()
        .map_err(|_| "spans with a span_id that is not 8 bytes")?;
    if span.end_time_unix_nano == 0 {
        return Err("spans without end_time_unix_nano");
    }
    if span.end_time_unix_nano < span.start_time_unix_nano {
        return Err("spans that end before they start");
    }
    if beyond_horizon(span.end_time_unix_nano)
        || scratch
            .events
            .iter()
            .any(|e| e.is_exception() && beyond_horizon(e.time_unix_nano))
    {
        return Err(SPANS_BEYOND_HORIZON);
    }
    let time = span.end_time_unix_nano;
    let duration_ns = span.end_time_unix_nano - span.start_time_unix_nano;
    let max = options.max_attribute_value_len;
    let kind = SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified);
    let is_root = span.parent_span_id.is_empty();
    let attrs = &scratch.span_attributes[..];
    let names = &mut scratch.names;
    let error = is_error(span, attrs);
    let is_request = is_root || matches!(kind, SpanKind::Server | SpanKind::Consumer);
    let exceptions = scratch.events.iter().filter(|e| e.is_exception());
    let has_exception = exceptions.clone().next().is_some();
    // Named only where a request or an exception carries it: a call is named by its downstream.
    let operation = if is_request || has_exception {
        operation_of(span, kind, attrs, names, max, truncated)?
    } else {
        Arc::from("")
    };
    let downstream = if matches!(kind, SpanKind::Client | SpanKind::Producer) {
        let (downstream, source) = match DOWNSTREAM_KEYS.iter().find_map(|(key, source)| {
            text_attr(attrs, key)
                .filter(|v| !v.is_empty())
                .map(|v| (v, *source))
        }) {
            Some(found) => found,
            None => (name_of(span)?.into(), DownstreamSource::SpanName),
        };
        Some((names.name(&downstream, max, truncated), source))
    } else {
        None
    };
    obs.saw(time);
    // The span's own cohort; a call or exception without one is given its trace's request's by
    // the engine, which sees the whole batch.
    let cohort = options
        .cohort_attribute
        .as_deref()
        .and_then(|key| text_attr(attrs, key))
        .filter(|c| !c.is_empty())
        .map(|c| names.name(&c, max, truncated));

    if is_request {
        obs.requests.push(RequestObservation {
            operation: operation.clone(),
            time,
            duration_ns,
            error,
            trace_id: TraceId(trace_id),
            span_id: SpanId(span_id),
            cohort: cohort.clone(),
        });
    }
    if let Some((downstream, source)) = downstream {
        obs.calls.push(CallObservation {
            downstream,
            source,
            time,
            duration_ns,
            error,
            trace_id: TraceId(trace_id),
            cohort: cohort.clone(),
        });
    }
    for event in exceptions {
        let exception_type = event
            .exception_type
            .and_then(value_text)
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "unknown".into());
        let event_time = if event.time_unix_nano == 0 {
            time
        } else {
            event.time_unix_nano
        };
        obs.saw(event_time);
        obs.exceptions.push(ExceptionObservation {
            exception_type: names.name(&exception_type, max, truncated),
            operation: operation.clone(),
            time: event_time,
            trace_id: TraceId(trace_id),
            cohort: cohort.clone(),
        });
    }
    Ok(())
}

/// Status ERROR, or an HTTP status of 500 or more (current or older attribute name).
fn is_error(span: &SpanView<'_>, attrs: &[KeyValueView<'_>]) -> bool {
    let status_error = span.status_code == StatusCode::Error as i32;
    let http_status =
        int_attr(attrs, "http.response.status_code").or_else(|| int_attr(attrs, "http.status_code"));
    status_error || http_status.is_some_and(|code| code >= 500)
}

/// The span's name, where it names something.
fn name_of<'a>(span: &SpanView<'a>) -> Result<&'a str, &'static str> {
    std::str::from_utf8(span.name).map_err(|_| "spans whose name, which names them, is not UTF-8")
}

/// `METHOD route` when the span carries `http.route`, else the span name.
fn operation_of(
    span: &SpanView<'_>,
    kind: SpanKind,
    attrs: &[KeyValueView<'_>],
    names: &mut Names,
    max: usize,
    truncated: &mut u64,
) -> Result<Arc<str>, &'static str> {
    // A queue consumer's work is named by what it consumes: the destination's template (for
    // per-tenant or per-partition names) or its name, as the messaging conventions define them.
    // Span names vary with the SDK ("process orders", "orders process", "receive").
    if kind == SpanKind::Consumer
        && let Some(destination) = ["messaging.destination.template", "messaging.destination.name"]
            .iter()
            .find_map(|key| text_attr(attrs, key).filter(|d| !d.is_empty()))
    {
        return Ok(names.name(&destination, max, truncated));
    }
    let Some(route) = text_attr(attrs, "http.route").filter(|r| !r.is_empty()) else {
        return Ok(names.name(name_of(span)?, max, truncated));
    };
    let method = text_attr(attrs, "http.request.method").or_else(|| text_attr(attrs, "http.method"));
    Ok(match method {
        Some(m) if !m.is_empty() => names.joined(&m, &route, max, truncated),
        _ => names.name(&route, max, truncated),
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{kv, kv_int, resource};
    use super::*;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::Event};

    fn span(name: &str, kind: SpanKind, parent: bool) -> Span {
        Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            parent_span_id: if parent { vec![3; 8] } else { vec![] },
            name: name.into(),
            kind: kind as i32,
            start_time_unix_nano: 1_000,
            end_time_unix_nano: 3_000,
            ..Span::default()
        }
    }

    fn request(service: Option<&str>, spans: Vec<Span>) -> ExportTraceServiceRequest {
        let mut attrs = vec![("service.version", "2.0")];
        if let Some(s) = service {
            attrs.push(("service.name", s));
        }
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: resource(&attrs),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        }
    }

    fn check(spans: Vec<Span>) -> ResourceObservations {
        let out = traces(&request(Some("shop"), spans), &NormalizeOptions::default()).expect("decodes");
        assert_eq!(out.rejected, 0, "{:?}", out.rejections);
        out.batch.resources.into_iter().next().expect("one resource")
    }

    #[test]
    fn server_spans_become_requests_with_route_operations() {
        let mut s = span("GET", SpanKind::Server, true);
        s.attributes = vec![
            kv("http.route", "/orders/{id}"),
            kv("http.request.method", "GET"),
            kv_int("http.response.status_code", 503),
        ];
        let obs = check(vec![s]);
        assert_eq!(obs.requests.len(), 1);
        let r = &obs.requests[0];
        assert_eq!(&*r.operation, "GET /orders/{id}");
        assert_eq!((r.time, r.duration_ns, r.error), (3_000, 2_000, true));
        assert_eq!(obs.seen, Some((3_000, 3_000)));
    }

    #[test]
    fn a_request_carries_its_cohort_from_the_configured_attribute() {
        let mut beta = span("GET", SpanKind::Server, true);
        beta.attributes = vec![kv("canary.cohort", "beta")];
        let mut empty = span("GET", SpanKind::Server, true);
        empty.attributes = vec![kv("canary.cohort", "")];
        let mut client = span("GET", SpanKind::Client, true);
        client.attributes = vec![kv("canary.cohort", "beta")];
        let obs = check(vec![
            beta.clone(),
            empty,
            span("GET", SpanKind::Server, true),
            client,
        ]);
        let cohorts: Vec<Option<&str>> = obs.requests.iter().map(|r| r.cohort.as_deref()).collect();
        assert_eq!(cohorts, vec![Some("beta"), None, None]);
        let calls: Vec<Option<&str>> = obs.calls.iter().map(|c| c.cohort.as_deref()).collect();
        assert_eq!(calls, vec![Some("beta")], "a call carries its own span's cohort");
        let mut region = span("GET", SpanKind::Server, true);
        region.attributes = vec![kv("canary.cohort", "beta"), kv("cloud.region", "eu-west-1")];
        for (attribute, want) in [(Some("cloud.region"), Some("eu-west-1")), (None, None)] {
            let options = NormalizeOptions {
                cohort_attribute: attribute.map(str::to_owned),
                ..NormalizeOptions::default()
            };
            let out = traces(&request(Some("shop"), vec![region.clone()]), &options).expect("decodes");
            let r = &out.batch.resources[0].requests[0];
            assert_eq!(r.cohort.as_deref(), want, "{attribute:?}");
        }
    }

    #[test]
    fn errors_come_from_status_or_either_status_code_attribute() {
        let mut by_status = span("a", SpanKind::Server, true);
        by_status.status = Some(Status {
            code: StatusCode::Error as i32,
            ..Status::default()
        });
        let mut by_old_attr = span("b", SpanKind::Server, true);
        by_old_attr.attributes = vec![kv("http.status_code", "500")];
        let mut client_4xx = span("c", SpanKind::Server, true);
        client_4xx.attributes = vec![kv_int("http.response.status_code", 404)];
        let obs = check(vec![by_status, by_old_attr, client_4xx]);
        let errors: Vec<bool> = obs.requests.iter().map(|r| r.error).collect();
        assert_eq!(errors, vec![true, true, false]);
    }

    #[test]
    fn root_spans_are_entries_and_internal_children_are_only_counted() {
        let obs = check(vec![
            span("job", SpanKind::Internal, false),
            span("step", SpanKind::Internal, true),
        ]);
        assert_eq!(obs.spans, 2);
        assert_eq!(obs.requests.len(), 1);
        assert_eq!(&*obs.requests[0].operation, "job");
    }

    /// Issue 14, item 6: a queue worker's CONSUMER spans are its requests, each named by what
    /// it consumes, so a worker is judged like a request handler.
    #[test]
    fn a_consumer_span_is_a_request_named_by_its_destination() {
        let with = |attrs: Vec<_>| {
            let mut s = span("process", SpanKind::Consumer, true);
            s.attributes = attrs;
            s
        };
        let obs = check(vec![
            with(vec![
                kv("messaging.system", "kafka"),
                kv("messaging.destination.name", "orders"),
            ]),
            with(vec![
                kv("messaging.destination.name", "tenant-42.invoices"),
                kv("messaging.destination.template", "{tenant}.invoices"),
            ]),
            with(vec![]),
        ]);
        let operations: Vec<&str> = obs.requests.iter().map(|r| &*r.operation).collect();
        assert_eq!(operations, ["orders", "{tenant}.invoices", "process"]);
        assert!(obs.calls.is_empty(), "consuming is not a call");
    }

    #[test]
    fn client_spans_name_their_downstream_by_preference() {
        let with = |attrs: Vec<_>| {
            let mut s = span("SELECT", SpanKind::Client, true);
            s.attributes = attrs;
            s
        };
        let obs = check(vec![
            with(vec![
                kv("server.address", "db.internal"),
                kv("peer.service", "orders-db"),
            ]),
            with(vec![kv("db.system", "postgresql"), kv("rpc.service", "x")]),
            with(vec![kv("messaging.system", "kafka")]),
            with(vec![]),
        ]);
        let names: Vec<(&str, DownstreamSource)> =
            obs.calls.iter().map(|c| (&*c.downstream, c.source)).collect();
        assert_eq!(
            names,
            vec![
                ("orders-db", DownstreamSource::PeerService),
                ("postgresql", DownstreamSource::DbSystem),
                ("kafka", DownstreamSource::MessagingSystem),
                ("SELECT", DownstreamSource::SpanName),
            ]
        );
        assert!(obs.requests.is_empty());
    }

    #[test]
    fn exception_events_are_observed_with_their_type() {
        let mut s = span("pay", SpanKind::Server, true);
        s.events = vec![
            Event {
                name: "exception".into(),
                time_unix_nano: 2_500,
                attributes: vec![kv("exception.type", "ValueError")],
                ..Event::default()
            },
            Event {
                name: "retry".into(),
                ..Event::default()
            },
        ];
        let obs = check(vec![s]);
        assert_eq!(obs.exceptions.len(), 1);
        assert_eq!(&*obs.exceptions[0].exception_type, "ValueError");
        assert_eq!(&*obs.exceptions[0].operation, "pay");
        assert_eq!(obs.seen, Some((2_500, 3_000)));
    }

    #[test]
    fn spans_with_times_beyond_the_horizon_are_rejected() {
        let mut at_the_end = span("a", SpanKind::Server, true);
        at_the_end.start_time_unix_nano = u64::MAX - 10;
        at_the_end.end_time_unix_nano = u64::MAX;
        let mut late_exception = span("b", SpanKind::Server, true);
        late_exception.events = vec![Event {
            name: "exception".into(),
            time_unix_nano: u64::MAX - 1,
            ..Event::default()
        }];
        let mut last_ok = span("c", SpanKind::Server, true);
        last_ok.start_time_unix_nano = crate::normalize::MAX_EVENT_TIME - 1;
        last_ok.end_time_unix_nano = crate::normalize::MAX_EVENT_TIME;
        let out = traces(
            &request(Some("shop"), vec![at_the_end, late_exception, last_ok]),
            &NormalizeOptions::default(),
        )
        .expect("decodes");
        assert_eq!((out.accepted, out.rejected), (1, 2));
        assert_eq!(out.rejections.get(SPANS_BEYOND_HORIZON), Some(&2));
        let obs = &out.batch.resources[0];
        assert_eq!(obs.requests.len(), 1);
        assert!(obs.requests.iter().all(|r| &*r.operation == "c"));
    }

    #[test]
    fn unusable_spans_and_nameless_resources_are_rejected_and_the_rest_kept() {
        let mut bad_id = span("a", SpanKind::Server, true);
        bad_id.trace_id = vec![1; 3];
        let mut no_end = span("b", SpanKind::Server, true);
        no_end.end_time_unix_nano = 0;
        let good = span("c", SpanKind::Server, true);
        let mut req = request(Some("shop"), vec![bad_id, no_end, good]);
        req.resource_spans
            .extend(request(None, vec![span("d", SpanKind::Server, true); 2]).resource_spans);
        let out = traces(&req, &NormalizeOptions::default()).expect("decodes");
        assert_eq!((out.accepted, out.rejected), (1, 4));
        let message = out.error_message("spans").expect("a message");
        assert!(message.starts_with("4 spans rejected: "), "{message}");
        assert!(
            message.contains("2 from a resource without service.name"),
            "{message}"
        );
        assert!(
            message.contains("1 spans without end_time_unix_nano"),
            "{message}"
        );
    }
}

#[cfg(test)]
mod wire_tests {
    //! The in-place reader against what protobuf allows on the wire beyond what prost writes.
    use super::super::NO_SERVICE_NAME;
    use super::*;
    use crate::testdata::{kv, resource};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span::Event};

    fn server_span(name: &str) -> Span {
        Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: name.into(),
            kind: SpanKind::Server as i32,
            start_time_unix_nano: 1_000,
            end_time_unix_nano: 3_000,
            ..Span::default()
        }
    }

    /// A request of one `ResourceSpans` whose encoding is `resource_spans`, as field 1.
    fn request_of(resource_spans: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        length_delimited(1, resource_spans, &mut buf);
        buf
    }

    fn normalize(buf: &[u8]) -> Result<Normalized, DecodeError> {
        traces_protobuf(buf, &NormalizeOptions::default())
    }

    #[test]
    fn fields_in_any_order_and_split_messages_merge_as_protobuf_says() {
        // Spans first, then the resource in two halves: a parser must merge, not take the last.
        let spans = ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![server_span("a"), server_span("b")],
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        };
        let name_half = ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "shop")],
                ..Resource::default()
            }),
            ..ResourceSpans::default()
        };
        let version_half = ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.version", "2.0"), kv("service.name", "ignored")],
                ..Resource::default()
            }),
            ..ResourceSpans::default()
        };
        let mut buf = spans.encode_to_vec();
        buf.extend(name_half.encode_to_vec());
        buf.extend(version_half.encode_to_vec());
        let out = normalize(&request_of(&buf)).expect("decodes");
        assert_eq!(out.accepted, 2);
        assert_eq!(out.batch.resources[0].identity.to_string(), "default/shop@2.0");
        // prost reads the same bytes the same way.
        let decoded = ExportTraceServiceRequest::decode(&request_of(&buf)[..]).expect("prost decodes");
        assert_eq!(normalize(&decoded.encode_to_vec()).expect("decodes"), out);
    }

    #[test]
    fn a_resource_without_a_name_rejects_its_spans_by_count() {
        let spans = ResourceSpans {
            resource: Some(resource("prod", "", "1")),
            scope_spans: vec![ScopeSpans {
                spans: vec![server_span("a"); 3],
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        };
        let out = normalize(&request_of(&spans.encode_to_vec())).expect("decodes");
        assert_eq!((out.accepted, out.rejected), (0, 3));
        assert_eq!(out.rejections.get(NO_SERVICE_NAME), Some(&3));
    }

    use super::super::common::{length_delimited, request_with_item as request_with_span};

    /// A span's name is checked as UTF-8 only where it names something: a span named by its
    /// attributes (a route, a downstream) is read whatever its name holds, as an attribute never
    /// looked up is; one that its name would name is rejected alone, the rest kept.
    #[test]
    fn a_span_name_is_read_as_utf8_only_where_it_names_the_span() {
        // Field 5 (name) again, with a byte that is not UTF-8: the later one is the name.
        let spoiled = |span: Span| {
            let mut buf = span.encode_to_vec();
            buf.extend([0x2a, 1, 0xff]);
            buf
        };
        let mut routed = server_span("GET");
        routed.attributes = vec![kv("http.route", "/a"), kv("http.request.method", "GET")];
        let client = |name: &str| Span {
            kind: SpanKind::Client as i32,
            parent_span_id: vec![3; 8],
            ..server_span(name)
        };
        let mut call = client("SELECT");
        call.attributes = vec![kv("db.system.name", "postgresql")];
        for named_by_attributes in [routed, call] {
            let out = normalize(&request_with_span(&spoiled(named_by_attributes.clone())))
                .expect("the name is not read");
            assert_eq!((out.accepted, out.rejected), (1, 0), "{named_by_attributes:?}");
        }
        let reason = "spans whose name, which names them, is not UTF-8";
        for named_by_name in [server_span("GET"), client("SELECT")] {
            let buf = request_of(
                &ResourceSpans {
                    resource: Some(Resource {
                        attributes: vec![kv("service.name", "shop")],
                        ..Resource::default()
                    }),
                    scope_spans: vec![ScopeSpans {
                        spans: vec![server_span("ok")],
                        ..ScopeSpans::default()
                    }],
                    ..ResourceSpans::default()
                }
                .encode_to_vec()
                .into_iter()
                // A second scope holding the spoiled span, merged into the same resource.
                .chain(scope_of(&spoiled(named_by_name.clone())))
                .collect::<Vec<u8>>(),
            );
            let out = normalize(&buf).expect("read, the span rejected alone");
            assert_eq!((out.accepted, out.rejected), (1, 1), "{named_by_name:?}");
            assert_eq!(out.rejections.get(reason), Some(&1));
            let obs = &out.batch.resources[0];
            assert_eq!(
                (obs.requests.len(), obs.calls.len()),
                (1, 0),
                "nothing of it kept"
            );
        }
    }

    /// `ScopeSpans` (field 2 of `ResourceSpans`) holding one span's encoding.
    fn scope_of(span: &[u8]) -> Vec<u8> {
        let mut scope = Vec::new();
        length_delimited(2, span, &mut scope);
        let mut buf = Vec::new();
        length_delimited(2, &scope, &mut buf);
        buf
    }

    #[test]
    fn a_span_that_does_not_decode_fails_the_request_with_where_and_why() {
        // The end time as a varint instead of fixed64.
        let mut span = server_span("ok").encode_to_vec();
        span.extend([0x40, 1]);
        let error = normalize(&request_with_span(&span)).expect_err("wrong wire type");
        assert_eq!(
            error.to_string(),
            "in Span: field 8 has wire type varint, expected fixed64"
        );
        // An attribute cut short.
        let mut span = server_span("ok").encode_to_vec();
        span.extend([0x4a, 4, 0x0a, 9, b'a', b'b']);
        let error = normalize(&request_with_span(&span)).expect_err("truncated attribute");
        assert_eq!(
            error.to_string(),
            "in a span attribute: the message ends inside a field"
        );
        // A request cut in the middle.
        let whole = request_with_span(&server_span("ok").encode_to_vec());
        assert!(normalize(&whole[..whole.len() - 3]).is_err());
        assert!(normalize(&whole).is_ok());
    }

    /// A span attribute's value is read only when normalization looks its key up. A fault inside
    /// a value that prost refuses (a string that is not UTF-8, an AnyValue cut short) is read
    /// past when no lookup wants that value, and the span reads as it does without the fault;
    /// in a value looked up (every such key: the route, the method, the status code, each
    /// downstream key, an exception's type, the configured cohort attribute) it still refuses
    /// the request, as prost does.
    #[test]
    fn only_the_attribute_values_looked_up_are_read() {
        const MARK: &str = "MARKMARKMARK";
        // Writes a fault's bytes over `buf` at its offset from where the mark starts.
        fn spoil(buf: &[u8], (offset, bytes): (isize, &[u8])) -> Vec<u8> {
            let mark = buf
                .windows(MARK.len())
                .position(|w| w == MARK.as_bytes())
                .expect("the mark is in the request");
            let at = mark.checked_add_signed(offset).expect("within the request");
            let mut spoiled = buf.to_vec();
            spoiled[at..at + bytes.len()].copy_from_slice(bytes);
            spoiled
        }
        // The mark's first bytes not UTF-8; and the tag and length before it (the AnyValue's
        // string field, 0x0a and 12) made a length that runs past the AnyValue's end.
        let faults: [(isize, &[u8]); 2] = [(0, &[0xff, 0xfe]), (-2, &[0x0a, 0x7f])];
        let with = |attributes: Vec<_>, kind: SpanKind, exception: bool| {
            let mut span = server_span("GET");
            span.kind = kind as i32;
            span.attributes = attributes;
            if exception {
                span.events = vec![Event {
                    name: "exception".into(),
                    time_unix_nano: 2_000,
                    attributes: vec![kv("exception.stacktrace", MARK), kv("exception.type", "E")],
                    ..Event::default()
                }];
            }
            span
        };
        let options = NormalizeOptions {
            cohort_attribute: Some("tenant.tier".into()),
            ..NormalizeOptions::default()
        };
        let read = |buf: &[u8]| traces_protobuf(buf, &options);

        // Values no lookup wants: a span attribute, an exception event's other attribute.
        let unread = [
            with(
                vec![kv("http.route", "/a"), kv("user_agent.original", MARK)],
                SpanKind::Server,
                false,
            ),
            with(vec![kv("http.route", "/a")], SpanKind::Server, true),
        ];
        for span in unread {
            let whole = request_with_span(&span.encode_to_vec());
            let clean = read(&whole).expect("reads");
            for fault in faults {
                let spoiled = spoil(&whole, fault);
                assert!(ExportTraceServiceRequest::decode(&spoiled[..]).is_err());
                assert_eq!(read(&spoiled).expect("read past"), clean, "{fault:?}");
            }
        }

        // Values looked up: each key normalization reads, on a span of the kind that reads it.
        let mut looked_up: Vec<(&str, SpanKind)> = [
            "http.route",
            "http.response.status_code",
            "http.status_code",
            "tenant.tier",
        ]
        .map(|key| (key, SpanKind::Server))
        .to_vec();
        looked_up.extend(DOWNSTREAM_KEYS.map(|(key, _)| (key, SpanKind::Client)));
        looked_up.extend(
            ["messaging.destination.template", "messaging.destination.name"]
                .map(|key| (key, SpanKind::Consumer)),
        );
        for (key, kind) in looked_up {
            let span = with(vec![kv(key, MARK)], kind, false);
            let whole = request_with_span(&span.encode_to_vec());
            for fault in faults {
                assert!(read(&spoil(&whole, fault)).is_err(), "{key}: {fault:?}");
            }
            assert!(span_attribute_read(key.as_bytes(), Some("tenant.tier")), "{key}");
        }
        let method = with(
            vec![kv("http.route", "/a"), kv("http.request.method", MARK)],
            SpanKind::Server,
            false,
        );
        let old_method = with(
            vec![kv("http.route", "/a"), kv("http.method", MARK)],
            SpanKind::Server,
            false,
        );
        let mut exception = with(vec![], SpanKind::Server, true);
        exception.events[0].attributes = vec![kv("exception.type", MARK)];
        for span in [method, old_method, exception] {
            let whole = request_with_span(&span.encode_to_vec());
            for fault in faults {
                assert!(read(&spoil(&whole, fault)).is_err(), "{span:?}: {fault:?}");
            }
        }
    }

    /// A request past `max_items_per_request` is refused at the first span past the limit, before
    /// that span is read (a span that would not decode there does not change the answer), and
    /// wherever its spans lie: in one scope, across scopes and resources, or under a resource
    /// without a service name, whose spans are rejected by count.
    #[test]
    fn a_request_past_the_item_limit_is_refused_at_the_first_span_past_it() {
        let options = NormalizeOptions {
            max_items_per_request: 3,
            ..NormalizeOptions::default()
        };
        let read = |buf: &[u8]| traces_protobuf(buf, &options);
        let good = server_span("ok").encode_to_vec();
        let mut bad = good.clone();
        bad.extend([0x40, 1]); // the end time as a varint, not fixed64
        // Encodes a resource of `scopes`, each of the spans' encodings given (a bad one stays bad).
        let resource_spans = |service: &str, scopes: &[&[&[u8]]]| {
            let mut buf = ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", service)],
                    ..Resource::default()
                }),
                ..ResourceSpans::default()
            }
            .encode_to_vec();
            for spans in scopes {
                let mut scope_buf = Vec::new();
                for span in *spans {
                    length_delimited(2, span, &mut scope_buf);
                }
                length_delimited(2, &scope_buf, &mut buf);
            }
            request_of(&buf)
        };
        let limit = Err(DecodeError::TooManyItems { limit: 3 });
        let three = resource_spans("shop", &[&[&good, &good, &good]]);
        assert_eq!(read(&three).expect("within the limit").accepted, 3);
        assert_eq!(
            read(&resource_spans("shop", &[&[&good, &good, &good, &bad]])),
            limit
        );
        assert_eq!(
            read(&resource_spans("shop", &[&[&good, &good], &[&good, &bad]])),
            limit
        );
        let mut two_resources = resource_spans("shop", &[&[&good, &good]]);
        two_resources.extend(resource_spans("", &[&[&good, &bad]]));
        assert_eq!(read(&two_resources), limit);
        // Below the limit, the bad span is read, and refuses the request for what it is.
        let error = read(&resource_spans("shop", &[&[&good, &bad]])).expect_err("undecodable");
        assert!(matches!(error, DecodeError::Wire { .. }), "{error}");
    }

    #[test]
    fn unknown_fields_and_fields_canaryd_does_not_read_are_skipped() {
        let mut span = server_span("ok").encode_to_vec();
        // Field 3 (trace_state) as a string, field 99 fixed32, field 100 a group with a varint.
        span.extend([0x1a, 2, b'k', b'v']);
        span.extend([0x9d, 0x06, 1, 2, 3, 4]);
        span.extend([0xa3, 0x06, 0x08, 1, 0xa4, 0x06]);
        let out = normalize(&request_with_span(&span)).expect("decodes");
        assert_eq!(out.accepted, 1);
        assert_eq!(&*out.batch.resources[0].requests[0].operation, "ok");
    }

    #[test]
    fn a_span_and_an_attribute_given_in_two_parts_merge_as_prost_merges_them() {
        use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
        use opentelemetry_proto::tonic::trace::v1::Status;

        // The route attribute, then an empty AnyValue for it: merged, the value stays "/a".
        let mut route = kv("http.route", "/a").encode_to_vec();
        route.extend(
            KeyValue {
                value: Some(AnyValue { value: None }),
                ..KeyValue::default()
            }
            .encode_to_vec(),
        );
        let mut first = server_span("GET");
        first.status = Some(Status {
            code: StatusCode::Error as i32,
            ..Status::default()
        });
        let mut span = first.encode_to_vec();
        length_delimited(9, &route, &mut span); // an attribute
        // The span's second part: the method, and a status without a code, which keeps ERROR.
        span.extend(
            Span {
                attributes: vec![kv("http.request.method", "GET")],
                status: Some(Status::default()),
                ..Span::default()
            }
            .encode_to_vec(),
        );
        let buf = request_with_span(&span);
        let out = normalize(&buf).expect("decodes");
        let request = &out.batch.resources[0].requests[0];
        assert_eq!((&*request.operation, request.error), ("GET /a", true));
        let decoded = ExportTraceServiceRequest::decode(&buf[..]).expect("prost decodes");
        assert_eq!(normalize(&decoded.encode_to_vec()).expect("decodes"), out);
    }

    /// Mutated requests are read as prost reads them (`assert_mutations_read_as_prost_reads`),
    /// from a request with errors and exception events.
    #[test]
    fn mutated_requests_are_read_as_prost_reads_them() {
        use crate::testdata::{TraceShape, trace_request};
        use opentelemetry_proto::tonic::trace::v1::{Status, span::Event};

        let shape = TraceShape {
            apps: 2,
            spans: 8,
            attributes: 4,
            ..TraceShape::default()
        };
        let mut request = trace_request(&shape, 7);
        for span in request
            .resource_spans
            .iter_mut()
            .flat_map(|r| &mut r.scope_spans)
            .flat_map(|s| &mut s.spans)
        {
            span.status = Some(Status {
                code: StatusCode::Error as i32,
                ..Status::default()
            });
            span.events.push(Event {
                name: "exception".into(),
                time_unix_nano: span.end_time_unix_nano,
                attributes: vec![kv("exception.type", "E")],
                ..Event::default()
            });
        }
        super::super::common::assert_mutations_read_as_prost_reads::<ExportTraceServiceRequest>(
            &request.encode_to_vec(),
            traces_protobuf,
        );
    }
}
