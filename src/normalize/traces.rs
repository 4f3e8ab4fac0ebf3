//! Spans to requests, calls and exceptions.
//!
//! An entry span (SERVER or CONSUMER, or any span without a parent) is a request the app served;
//! a CLIENT or PRODUCER span is a call to a downstream, an edge of the call graph. A span can be
//! both (a root CLIENT span of a batch job). Other spans are counted but observed no further.

use canaryd_engine::{
    CallObservation, DownstreamSource, ExceptionObservation, RequestObservation, ResourceObservations,
    SpanId, TraceId,
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode};

use super::{
    IdentityReader, NO_SERVICE_NAME, NormalizeOptions, Normalized, beyond_horizon, cut_to, int_attr,
    string_attr,
};

/// Attributes that name a call's downstream, in order of preference.
const DOWNSTREAM_KEYS: [(&str, DownstreamSource); 6] = [
    ("peer.service", DownstreamSource::PeerService),
    ("server.address", DownstreamSource::ServerAddress),
    ("db.system.name", DownstreamSource::DbSystem),
    ("db.system", DownstreamSource::DbSystem),
    ("rpc.service", DownstreamSource::RpcService),
    ("messaging.system", DownstreamSource::MessagingSystem),
];

const SPANS_BEYOND_HORIZON: &str = "spans with a time after 2262-04-11 (beyond int64 nanoseconds)";

pub fn traces(request: &ExportTraceServiceRequest, options: &NormalizeOptions) -> Normalized {
    let mut out = Normalized::default();
    let reader = IdentityReader { options };
    for resource_spans in &request.resource_spans {
        let spans = resource_spans.scope_spans.iter().flat_map(|s| &s.spans);
        let Some((identity, instance)) = reader.read(resource_spans.resource.as_ref(), &mut out.truncated)
        else {
            out.reject(NO_SERVICE_NAME, spans.count() as u64);
            continue;
        };
        let mut obs = ResourceObservations::new(identity);
        obs.instance = instance;
        for span in spans {
            match observe_span(span, options, &mut obs, &mut out.truncated) {
                Ok(()) => obs.spans += 1,
                Err(reason) => out.reject(reason, 1),
            }
        }
        if obs.spans > 0 {
            out.accepted += obs.spans;
            out.batch.resources.push(obs);
        }
    }
    out
}

fn observe_span(
    span: &Span,
    options: &NormalizeOptions,
    obs: &mut ResourceObservations,
    truncated: &mut u64,
) -> Result<(), &'static str> {
    let trace_id: [u8; 16] = span
        .trace_id
        .as_slice()
        .try_into()
        .map_err(|_| "spans with a trace_id that is not 16 bytes")?;
    let span_id: [u8; 8] = span
        .span_id
        .as_slice()
        .try_into()
        .map_err(|_| "spans with a span_id that is not 8 bytes")?;
    if span.end_time_unix_nano == 0 {
        return Err("spans without end_time_unix_nano");
    }
    if span.end_time_unix_nano < span.start_time_unix_nano {
        return Err("spans that end before they start");
    }
    if beyond_horizon(span.end_time_unix_nano)
        || span
            .events
            .iter()
            .any(|e| e.name == "exception" && beyond_horizon(e.time_unix_nano))
    {
        return Err(SPANS_BEYOND_HORIZON);
    }
    let time = span.end_time_unix_nano;
    let duration_ns = span.end_time_unix_nano - span.start_time_unix_nano;
    let max = options.max_attribute_value_len;
    let kind = SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified);
    let is_root = span.parent_span_id.is_empty();
    let attrs = &span.attributes;
    let error = is_error(span);
    let operation = operation_of(span, max, truncated);
    obs.saw(time);

    if is_root || matches!(kind, SpanKind::Server | SpanKind::Consumer) {
        obs.requests.push(RequestObservation {
            operation: operation.clone(),
            time,
            duration_ns,
            error,
            trace_id: TraceId(trace_id),
            span_id: SpanId(span_id),
        });
    }
    if matches!(kind, SpanKind::Client | SpanKind::Producer) {
        let (downstream, source) = DOWNSTREAM_KEYS
            .iter()
            .find_map(|(key, source)| {
                string_attr(attrs, key)
                    .filter(|v| !v.is_empty())
                    .map(|v| (v, *source))
            })
            .unwrap_or_else(|| (span.name.clone(), DownstreamSource::SpanName));
        obs.calls.push(CallObservation {
            downstream: cut_to(&downstream, max, truncated),
            source,
            time,
            duration_ns,
            error,
            trace_id: TraceId(trace_id),
        });
    }
    for event in span.events.iter().filter(|e| e.name == "exception") {
        let exception_type = string_attr(&event.attributes, "exception.type")
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "unknown".into());
        let event_time = if event.time_unix_nano == 0 {
            time
        } else {
            event.time_unix_nano
        };
        obs.saw(event_time);
        obs.exceptions.push(ExceptionObservation {
            exception_type: cut_to(&exception_type, max, truncated),
            operation: operation.clone(),
            time: event_time,
        });
    }
    Ok(())
}

/// Status ERROR, or an HTTP status of 500 or more (current or older attribute name).
fn is_error(span: &Span) -> bool {
    let status_error = span
        .status
        .as_ref()
        .is_some_and(|s| s.code == StatusCode::Error as i32);
    let http_status = int_attr(&span.attributes, "http.response.status_code")
        .or_else(|| int_attr(&span.attributes, "http.status_code"));
    status_error || http_status.is_some_and(|code| code >= 500)
}

/// `METHOD route` when the span carries `http.route`, else the span name.
fn operation_of(span: &Span, max: usize, truncated: &mut u64) -> String {
    let attrs = &span.attributes;
    let Some(route) = string_attr(attrs, "http.route").filter(|r| !r.is_empty()) else {
        return cut_to(&span.name, max, truncated);
    };
    let method = string_attr(attrs, "http.request.method").or_else(|| string_attr(attrs, "http.method"));
    let operation = match method {
        Some(m) if !m.is_empty() => format!("{m} {route}"),
        _ => route,
    };
    cut_to(&operation, max, truncated)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{kv, kv_int, resource};
    use super::*;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status, span::Event};

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
        let out = traces(&request(Some("shop"), spans), &NormalizeOptions::default());
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
        assert_eq!(r.operation, "GET /orders/{id}");
        assert_eq!((r.time, r.duration_ns, r.error), (3_000, 2_000, true));
        assert_eq!(obs.seen, Some((3_000, 3_000)));
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
        assert_eq!(obs.requests[0].operation, "job");
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
        let names: Vec<(&str, DownstreamSource)> = obs
            .calls
            .iter()
            .map(|c| (c.downstream.as_str(), c.source))
            .collect();
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
        assert_eq!(obs.exceptions[0].exception_type, "ValueError");
        assert_eq!(obs.exceptions[0].operation, "pay");
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
        );
        assert_eq!((out.accepted, out.rejected), (1, 2));
        assert_eq!(out.rejections.get(SPANS_BEYOND_HORIZON), Some(&2));
        let obs = &out.batch.resources[0];
        assert_eq!(obs.requests.len(), 1);
        assert!(obs.requests.iter().all(|r| r.operation == "c"));
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
        let out = traces(&req, &NormalizeOptions::default());
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
