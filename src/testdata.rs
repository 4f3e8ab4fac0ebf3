//! Generated OTLP requests, deterministic from a seed, for benchmarks, load generators and tests.
//!
//! Shaped like what an instrumented HTTP service sends: per request one SERVER span with the HTTP
//! semantic-convention attributes and CLIENT children calling a database or another service, under
//! resources that carry the full identity. No randomness source beyond a seeded xorshift, so the
//! same seed always yields the same bytes.

pub use canaryd_engine::rng::Rng;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics,
    ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};

/// 2026-01-05T00:00:00Z, a Monday: where generated event time starts unless told otherwise.
pub const EPOCH_NS: u64 = 1_767_571_200_000_000_000;

pub fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..KeyValue::default()
    }
}

pub fn kv_int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..KeyValue::default()
    }
}

/// A resource with the identity attributes canaryd reads, plus an instance id.
pub fn resource(env: &str, app: &str, version: &str) -> Resource {
    Resource {
        attributes: vec![
            kv("service.name", app),
            kv("service.version", version),
            kv("deployment.environment.name", env),
            kv("service.instance.id", &format!("{app}-{version}-0")),
            // What an SDK's default resource detectors add.
            kv("telemetry.sdk.name", "opentelemetry"),
            kv("telemetry.sdk.language", "rust"),
            kv("telemetry.sdk.version", "0.31.0"),
            kv("host.name", &format!("node-{}", app.len() % 7)),
            kv("host.arch", "amd64"),
            kv("os.type", "linux"),
            kv_int("process.pid", 4242),
            kv("process.runtime.name", "rustc"),
        ],
        ..Resource::default()
    }
}

/// What a generated trace request looks like.
#[derive(Clone, Debug)]
pub struct TraceShape {
    pub env: String,
    pub apps: usize,
    pub versions_per_app: usize,
    pub operations: usize,
    /// Spans in the whole request, SERVER and CLIENT together.
    pub spans: usize,
    /// Attributes per span (at least the semantic-convention ones, padded with others).
    pub attributes: usize,
    /// Share of requests that fail with a 500.
    pub error_rate: f64,
    /// Event time of the first span.
    pub start_ns: u64,
    /// Mean event time between two requests of one resource.
    pub request_gap_ns: u64,
    /// What the attributes past the semantic conventions' few hold.
    pub detail: SpanDetail,
}

/// What a generated span's other attributes hold, and so its size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpanDetail {
    /// Short made-up ones (`app.attr0` = `value-123`): about 400 bytes a span encoded.
    #[default]
    Lean,
    /// What an agent's HTTP and database instrumentations record, at their usual lengths: a
    /// browser's user agent, the path and client address, the thread, the W3C flags, and a
    /// database call's query text. About 600 bytes a span encoded.
    Sdk,
}

impl Default for TraceShape {
    fn default() -> Self {
        TraceShape {
            env: "prod".into(),
            apps: 4,
            versions_per_app: 2,
            operations: 12,
            spans: 512,
            attributes: 10,
            error_rate: 0.01,
            start_ns: EPOCH_NS,
            request_gap_ns: 6_000_000,
            detail: SpanDetail::Lean,
        }
    }
}

/// One app's traffic from `start_ns`, a request a second: `exports` trace export requests of 512
/// spans (256 seconds each), one after the other in event time, failing at `error_rate`. Returns
/// them and the event time after the last.
pub fn app_traffic(start_ns: u64, exports: u64, error_rate: f64) -> (Vec<ExportTraceServiceRequest>, u64) {
    let mut shape = TraceShape {
        apps: 1,
        versions_per_app: 1,
        request_gap_ns: 1_000_000_000,
        error_rate,
        start_ns,
        ..TraceShape::default()
    };
    let mut requests = Vec::new();
    for seed in 0..exports {
        let request = trace_request(&shape, seed + start_ns);
        let last_end = request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .map(|s| s.end_time_unix_nano)
            .max()
            .unwrap_or(shape.start_ns);
        shape.start_ns = last_end + 1;
        requests.push(request);
    }
    (requests, shape.start_ns)
}

/// The stack trace a failed request's exception event carries (about 400 bytes, as a short Java
/// trace is).
const STACKTRACE: &str = "java.sql.SQLTransientConnectionException: connection is not available\n\
    \tat com.zaxxer.hikari.pool.HikariPool.createTimeoutException(HikariPool.java:696)\n\
    \tat com.zaxxer.hikari.pool.HikariPool.getConnection(HikariPool.java:181)\n\
    \tat com.example.shop.orders.OrderRepository.find(OrderRepository.java:42)\n\
    \tat com.example.shop.orders.OrderController.get(OrderController.java:27)\n";

/// A trace export request of `shape.spans` spans spread over the shape's apps and versions: each
/// request is a SERVER span followed by one CLIENT child; a failed one records an exception event.
pub fn trace_request(shape: &TraceShape, seed: u64) -> ExportTraceServiceRequest {
    let mut rng = Rng::new(seed);
    let resources = (shape.apps * shape.versions_per_app).max(1);
    let per_resource = shape.spans.div_ceil(resources);
    let mut left = shape.spans;
    let mut resource_spans = Vec::new();
    for r in 0..resources {
        let app = format!("app-{}", r / shape.versions_per_app.max(1));
        let version = format!("1.{}.0", r % shape.versions_per_app.max(1));
        let n = per_resource.min(left);
        left -= n;
        let mut spans = Vec::with_capacity(n);
        let mut time = shape.start_ns;
        while spans.len() < n {
            let trace_id: Vec<u8> = (0..2).flat_map(|_| rng.next_u64().to_be_bytes()).collect();
            let server_id = rng.next_u64().to_be_bytes().to_vec();
            let op = rng.below(shape.operations.max(1) as u64);
            let duration = 1_000_000 + rng.below(50_000_000);
            let failed = rng.unit() < shape.error_rate;
            time += 1 + rng.below(2 * shape.request_gap_ns);
            let route = format!("/api/v1/resource{op}/{{id}}");
            let sdk = shape.detail == SpanDetail::Sdk;
            let mut attributes = vec![
                kv("http.request.method", "GET"),
                kv("http.route", &route),
                kv_int("http.response.status_code", if failed { 500 } else { 200 }),
                kv("url.scheme", "https"),
                kv("server.address", "shop.example.internal"),
                kv_int("server.port", 443),
                kv(
                    "user_agent.original",
                    if sdk {
                        BROWSER_USER_AGENT
                    } else {
                        "Mozilla/5.0 (X11; Linux x86_64) canaryd-bench"
                    },
                ),
            ];
            if sdk {
                // An id as many APIs have them: a UUID.
                let id = format!("{:016x}{:016x}", rng.next_u64(), rng.next_u64());
                let id = format!(
                    "{}-{}-{}-{}-{}",
                    &id[..8],
                    &id[8..12],
                    &id[12..16],
                    &id[16..20],
                    &id[20..]
                );
                attributes.extend([
                    kv("url.path", &format!("/api/v1/resource{op}/{id}")),
                    kv(
                        "client.address",
                        &format!("10.42.{}.{}", rng.below(256), rng.below(256)),
                    ),
                    kv("thread.name", &format!("http-nio-8080-exec-{}", rng.below(200))),
                ]);
            }
            pad_attributes(&mut attributes, shape.attributes, &mut rng);
            spans.push(Span {
                trace_id: trace_id.clone(),
                span_id: server_id.clone(),
                name: format!("GET {route}"),
                kind: span::SpanKind::Server as i32,
                start_time_unix_nano: time,
                end_time_unix_nano: time + duration,
                attributes,
                // A failed request records its exception, as the SDKs' instrumentations do.
                events: if failed {
                    vec![span::Event {
                        time_unix_nano: time + duration - 1_000,
                        name: "exception".into(),
                        attributes: vec![
                            kv("exception.type", "java.sql.SQLTransientConnectionException"),
                            kv(
                                "exception.message",
                                "connection is not available, request timed out after 30000ms",
                            ),
                            kv("exception.stacktrace", STACKTRACE),
                        ],
                        dropped_attributes_count: 0,
                    }]
                } else {
                    Vec::new()
                },
                status: failed.then(|| Status {
                    code: status::StatusCode::Error as i32,
                    message: "internal error".into(),
                }),
                // Sampled, the parent remote (W3C flags and the parent's remoteness, as SDKs send them).
                flags: if sdk { 0x301 } else { 0 },
                ..Span::default()
            });
            if spans.len() < n {
                let mut attributes = vec![
                    kv("db.system.name", "postgresql"),
                    kv("db.namespace", "orders"),
                    kv("db.operation.name", "SELECT"),
                    kv("server.address", "orders-db.internal"),
                    kv_int("server.port", 5432),
                ];
                if sdk {
                    attributes.extend([
                        kv("db.collection.name", "orders"),
                        kv("db.query.text", ORDERS_QUERY),
                        kv("thread.name", &format!("http-nio-8080-exec-{}", rng.below(200))),
                    ]);
                }
                pad_attributes(&mut attributes, shape.attributes, &mut rng);
                spans.push(Span {
                    trace_id,
                    span_id: rng.next_u64().to_be_bytes().to_vec(),
                    parent_span_id: server_id,
                    name: "SELECT orders".into(),
                    kind: span::SpanKind::Client as i32,
                    start_time_unix_nano: time + 100_000,
                    end_time_unix_nano: time + duration / 2,
                    attributes,
                    // Sampled, the parent local.
                    flags: if sdk { 0x101 } else { 0 },
                    ..Span::default()
                });
            }
        }
        resource_spans.push(ResourceSpans {
            resource: Some(resource(&shape.env, &app, &version)),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope()),
                spans,
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        });
    }
    ExportTraceServiceRequest { resource_spans }
}

/// A queue worker's spans over `seconds` of event time from `start_ns`: each second,
/// `per_second` messages consumed (a CONSUMER span with the messaging conventions' attributes,
/// the queues `orders` and `refunds` taking turns), each writing to its database (a CLIENT span);
/// every `fail_every`th message fails (status ERROR) when `fail_every` is not 0. No HTTP at all.
/// Latencies are drawn from `seed`'s generator, so two versions with the same settings behave
/// alike without sending the same bytes.
pub fn worker_traffic(
    identity: (&str, &str, &str),
    start_ns: u64,
    seconds: u64,
    per_second: u64,
    fail_every: u64,
    seed: u64,
) -> ExportTraceServiceRequest {
    let (env, app, version) = identity;
    let mut rng = Rng::new(seed);
    let mut spans = Vec::with_capacity((seconds * per_second * 2) as usize);
    for n in 0..seconds * per_second {
        let message = seed.wrapping_mul(1_000_003).wrapping_add(n);
        let start = start_ns + n * 1_000_000_000 / per_second.max(1);
        // 8 to 40 ms of work, 2 to 10 of it in the database.
        let work_ns = 8_000_000 + rng.below(32_000_000);
        let db_ns = 2_000_000 + rng.below(8_000_000);
        let queue = if n % 2 == 0 { "orders" } else { "refunds" };
        let trace_id = [&message.to_be_bytes()[..], &seed.to_be_bytes()[..]].concat();
        let failed = fail_every > 0 && n % fail_every == fail_every - 1;
        spans.push(Span {
            trace_id: trace_id.clone(),
            span_id: (message << 1).to_be_bytes().to_vec(),
            // The producer's span, in another service.
            parent_span_id: (message << 1 | 1).to_be_bytes().to_vec(),
            name: format!("process {queue}"),
            kind: span::SpanKind::Consumer as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: start + work_ns,
            attributes: vec![
                kv("messaging.system", "kafka"),
                kv("messaging.operation.type", "process"),
                kv("messaging.destination.name", queue),
                kv("messaging.consumer.group.name", app),
            ],
            status: failed.then(|| Status {
                code: status::StatusCode::Error as i32,
                message: "cannot settle the payment".into(),
            }),
            ..Span::default()
        });
        spans.push(Span {
            trace_id,
            span_id: (message << 1 | 1).wrapping_mul(31).to_be_bytes().to_vec(),
            parent_span_id: (message << 1).to_be_bytes().to_vec(),
            name: "INSERT ledger".into(),
            kind: span::SpanKind::Client as i32,
            start_time_unix_nano: start + 1_000_000,
            end_time_unix_nano: start + 1_000_000 + db_ns,
            attributes: vec![kv("db.system", "postgresql"), kv("server.address", "ledger-db")],
            ..Span::default()
        });
    }
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource(env, app, version)),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope()),
                spans,
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "canaryd.testdata".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..InstrumentationScope::default()
    }
}

/// A browser's user agent, as HTTP server instrumentations record it.
const BROWSER_USER_AGENT: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 \
    (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";

/// A database call's query text, parameters left out as instrumentations sanitize them.
const ORDERS_QUERY: &str = "select o1_0.id, o1_0.status, o1_0.total, o1_0.currency, o1_0.created_at, \
    o1_0.updated_at, o1_0.shipping_address_id, o1_0.version from orders o1_0 where o1_0.customer_id = $1 \
    and o1_0.status = any($2) order by o1_0.created_at desc limit $3";

fn pad_attributes(attributes: &mut Vec<KeyValue>, wanted: usize, rng: &mut Rng) {
    let mut i = 0;
    while attributes.len() < wanted {
        attributes.push(kv(
            &format!("app.attr{i}"),
            &format!("value-{}", rng.below(1_000)),
        ));
        i += 1;
    }
}

/// A metrics request for one resource: a cumulative counter, a gauge and a delta histogram, with
/// `series` attribute sets each, all at `time_ns`. The counter's total is `total` on every series.
pub fn metrics_request(
    env: &str,
    app: &str,
    version: &str,
    series: usize,
    time_ns: u64,
    total: i64,
) -> ExportMetricsServiceRequest {
    let attrs = |i: usize| vec![kv("route", &format!("/r{i}"))];
    let counter = Metric {
        name: "orders.completed".into(),
        unit: "{order}".into(),
        data: Some(metric::Data::Sum(Sum {
            data_points: (0..series)
                .map(|i| NumberDataPoint {
                    attributes: attrs(i),
                    start_time_unix_nano: EPOCH_NS,
                    time_unix_nano: time_ns,
                    value: Some(number_data_point::Value::AsInt(total)),
                    ..NumberDataPoint::default()
                })
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })),
        ..Metric::default()
    };
    let gauge = Metric {
        name: "queue.depth".into(),
        data: Some(metric::Data::Gauge(Gauge {
            data_points: (0..series)
                .map(|i| NumberDataPoint {
                    attributes: attrs(i),
                    time_unix_nano: time_ns,
                    value: Some(number_data_point::Value::AsDouble(i as f64)),
                    ..NumberDataPoint::default()
                })
                .collect(),
        })),
        ..Metric::default()
    };
    let histogram = Metric {
        name: "http.server.request.duration".into(),
        unit: "s".into(),
        data: Some(metric::Data::Histogram(Histogram {
            data_points: (0..series)
                .map(|i| HistogramDataPoint {
                    attributes: attrs(i),
                    start_time_unix_nano: time_ns.saturating_sub(10_000_000_000),
                    time_unix_nano: time_ns,
                    count: 6,
                    sum: Some(0.9),
                    bucket_counts: vec![1, 3, 2],
                    explicit_bounds: vec![0.05, 0.25],
                    ..HistogramDataPoint::default()
                })
                .collect(),
            aggregation_temporality: AggregationTemporality::Delta as i32,
        })),
        ..Metric::default()
    };
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource(env, app, version)),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope()),
                metrics: vec![counter, gauge, histogram],
                ..ScopeMetrics::default()
            }],
            ..ResourceMetrics::default()
        }],
    }
}

/// A logs request for one resource with one record per severity number given.
pub fn logs_request(
    env: &str,
    app: &str,
    version: &str,
    severities: &[i32],
    time_ns: u64,
) -> ExportLogsServiceRequest {
    let log_records = severities
        .iter()
        .enumerate()
        .map(|(i, severity)| LogRecord {
            time_unix_nano: time_ns + i as u64,
            severity_number: *severity,
            body: Some(AnyValue {
                value: Some(any_value::Value::StringValue(format!("record {i}"))),
            }),
            ..LogRecord::default()
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(resource(env, app, version)),
            scope_logs: vec![ScopeLogs {
                scope: Some(scope()),
                log_records,
                ..ScopeLogs::default()
            }],
            ..ResourceLogs::default()
        }],
    }
}

/// An SDK's periodic metrics export for one instance: what the OpenTelemetry SDK's HTTP server
/// and database instrumentation, a runtime's gauges and a business counter send: 88 points.
/// The server duration histogram has the semantic conventions' 14 bounds and a point per method,
/// route and status (five attributes each); the business latency is an exponential histogram.
/// Values vary with `seed`; the shape does not.
pub fn sdk_metrics_request(seed: u64, time_ns: u64) -> ExportMetricsServiceRequest {
    use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
    use opentelemetry_proto::tonic::metrics::v1::{ExponentialHistogram, ExponentialHistogramDataPoint};

    const BOUNDS: [f64; 14] = [
        0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    ];
    let mut rng = Rng::new(seed);
    let start = time_ns.saturating_sub(600_000_000_000);
    let number = |attributes: Vec<KeyValue>, value: number_data_point::Value| NumberDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: time_ns,
        value: Some(value),
        ..NumberDataPoint::default()
    };
    let histogram_point = |attributes: Vec<KeyValue>, rng: &mut Rng| {
        let bucket_counts: Vec<u64> = (0..=BOUNDS.len()).map(|_| rng.below(40)).collect();
        HistogramDataPoint {
            attributes,
            start_time_unix_nano: start,
            time_unix_nano: time_ns,
            count: bucket_counts.iter().sum(),
            sum: Some(rng.below(10_000) as f64 / 100.0),
            bucket_counts,
            explicit_bounds: BOUNDS.to_vec(),
            min: Some(0.001),
            max: Some(9.5),
            ..HistogramDataPoint::default()
        }
    };
    let routes = [
        "/",
        "/cart",
        "/cart/items",
        "/checkout",
        "/orders",
        "/orders/{id}",
        "/products",
        "/products/{id}",
        "/search",
        "/login",
        "/logout",
        "/health",
    ];
    let mut server = Vec::new();
    for route in routes {
        for (method, status) in [("GET", 200), ("POST", 500)] {
            let attributes = vec![
                kv("http.request.method", method),
                kv("http.route", route),
                kv_int("http.response.status_code", status),
                kv("url.scheme", "https"),
                kv("network.protocol.version", "1.1"),
            ];
            server.push(histogram_point(attributes, &mut rng));
        }
    }
    let by_route = |rng: &mut Rng, value: fn(u64) -> number_data_point::Value| -> Vec<NumberDataPoint> {
        routes
            .iter()
            .map(|route| number(vec![kv("http.route", route)], value(rng.below(1_000))))
            .collect()
    };
    let metric = |name: &str, unit: &str, data: metric::Data| Metric {
        name: name.into(),
        unit: unit.into(),
        description: format!("{name}, as the instrumentation describes it"),
        data: Some(data),
        ..Metric::default()
    };
    let cumulative = AggregationTemporality::Cumulative as i32;
    let mut metrics = vec![
        metric(
            "http.server.request.duration",
            "s",
            metric::Data::Histogram(Histogram {
                data_points: server,
                aggregation_temporality: cumulative,
            }),
        ),
        metric(
            "http.server.active_requests",
            "{request}",
            metric::Data::Sum(Sum {
                data_points: by_route(&mut rng, |v| number_data_point::Value::AsInt(v as i64)),
                aggregation_temporality: cumulative,
                is_monotonic: false,
            }),
        ),
        metric(
            "orders.completed",
            "{order}",
            metric::Data::Sum(Sum {
                data_points: by_route(&mut rng, |v| number_data_point::Value::AsInt(v as i64)),
                aggregation_temporality: cumulative,
                is_monotonic: true,
            }),
        ),
    ];
    for (operation, table) in [
        ("SELECT", "orders"),
        ("SELECT", "products"),
        ("INSERT", "orders"),
        ("UPDATE", "carts"),
    ] {
        let attributes = vec![
            kv("db.system.name", "postgresql"),
            kv("db.operation.name", operation),
            kv("db.collection.name", table),
            kv("server.address", "db.internal"),
        ];
        let point = histogram_point(attributes, &mut rng);
        metrics.push(metric(
            "db.client.operation.duration",
            "s",
            metric::Data::Histogram(Histogram {
                data_points: vec![point],
                aggregation_temporality: cumulative,
            }),
        ));
    }
    for (name, unit) in [
        ("process.cpu.utilization", "1"),
        ("process.memory.usage", "By"),
        ("process.thread.count", "{thread}"),
        ("process.open_file_descriptor.count", "{file_descriptor}"),
        ("jvm.gc.duration", "s"),
        ("queue.depth", "{message}"),
    ] {
        let points = (0..4)
            .map(|cpu| {
                number(
                    vec![kv_int("cpu.id", cpu)],
                    number_data_point::Value::AsDouble(rng.below(100) as f64 / 7.0),
                )
            })
            .collect();
        metrics.push(metric(
            name,
            unit,
            metric::Data::Gauge(Gauge { data_points: points }),
        ));
    }
    let exponential = (0..12)
        .map(|i| {
            let counts: Vec<u64> = (0..20).map(|_| rng.below(30)).collect();
            ExponentialHistogramDataPoint {
                attributes: vec![
                    kv("payment.method", ["card", "wallet", "invoice"][i % 3]),
                    kv_int("tier", (i / 3) as i64),
                ],
                start_time_unix_nano: start,
                time_unix_nano: time_ns,
                count: counts.iter().sum(),
                sum: Some(rng.below(5_000) as f64),
                scale: 3,
                zero_count: rng.below(3),
                positive: Some(Buckets {
                    offset: -4,
                    bucket_counts: counts,
                }),
                negative: None,
                ..ExponentialHistogramDataPoint::default()
            }
        })
        .collect();
    metrics.push(metric(
        "payment.amount",
        "{EUR}",
        metric::Data::ExponentialHistogram(ExponentialHistogram {
            data_points: exponential,
            aggregation_temporality: cumulative,
        }),
    ));
    let mut resource = resource("prod", "shop", "2.4.1");
    resource.attributes.extend([
        kv("telemetry.sdk.name", "opentelemetry"),
        kv("telemetry.sdk.version", "1.31.0"),
        kv("host.name", "ip-10-0-3-17.eu-west-1.compute.internal"),
        kv_int("process.pid", 4242),
    ]);
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope()),
                metrics,
                ..ScopeMetrics::default()
            }],
            ..ResourceMetrics::default()
        }],
    }
}

/// An SDK's logs export: `records` records of an HTTP service, each with a body of about a
/// hundred bytes, five attributes, a trace and span id and a severity (a tenth of them errors),
/// one second apart from `time_ns`.
pub fn sdk_logs_request(records: usize, seed: u64, time_ns: u64) -> ExportLogsServiceRequest {
    let mut rng = Rng::new(seed);
    let log_records = (0..records)
        .map(|i| {
            let error = rng.below(10) == 0;
            let (number, text) = if error { (17, "ERROR") } else { (9, "INFO") };
            let mut trace_id = [0u8; 16];
            for b in &mut trace_id {
                *b = rng.below(256) as u8;
            }
            LogRecord {
                time_unix_nano: time_ns + i as u64 * 1_000_000_000,
                observed_time_unix_nano: time_ns + i as u64 * 1_000_000_000 + 1_000_000,
                severity_number: number,
                severity_text: text.into(),
                body: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(format!(
                        "request {} handled in {} ms for customer c-{} (cart of {} items, region eu-west-1)",
                        rng.below(1_000_000),
                        rng.below(900),
                        rng.below(100_000),
                        rng.below(20)
                    ))),
                }),
                attributes: vec![
                    kv("http.request.method", "POST"),
                    kv("http.route", "/checkout"),
                    kv_int("http.response.status_code", if error { 500 } else { 200 }),
                    kv("code.function.name", "checkout::handle"),
                    kv("thread.name", "tokio-runtime-worker"),
                ],
                trace_id: trace_id.to_vec(),
                span_id: trace_id[..8].to_vec(),
                flags: 1,
                ..LogRecord::default()
            }
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(resource("prod", "shop", "2.4.1")),
            scope_logs: vec![ScopeLogs {
                scope: Some(scope()),
                log_records,
                ..ScopeLogs::default()
            }],
            ..ResourceLogs::default()
        }],
    }
}

/// A batch of the engine's observations (`canaryd_engine::simulate::Traffic`, the project's
/// scenario generator) as the OTLP an SDK would have sent for it: per request a SERVER span named
/// by its operation, CLIENT children calling its downstreams (`peer.service`), an INTERNAL child
/// with an `exception` event per exception, and each cumulative counter point as a Sum. Span ids
/// come from `ids`, a counter the caller keeps across batches.
pub fn otlp_of_batch(
    batch: &canaryd_engine::Batch,
    ids: &mut u64,
) -> (ExportTraceServiceRequest, Option<ExportMetricsServiceRequest>) {
    use canaryd_engine::{PointValue, Temporality};
    let mut next_id = || {
        *ids += 1;
        *ids
    };
    let mut traces = ExportTraceServiceRequest::default();
    let mut metrics = ExportMetricsServiceRequest::default();
    // The simulator's cohorts, under the default cohort attribute.
    let cohort = |name: &str| kv("canary.cohort", name);
    for r in &batch.resources {
        let (env, app, version) = (&*r.identity.env, &*r.identity.app, &*r.identity.version);
        let salt = app
            .bytes()
            .chain(version.bytes())
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
        let mut spans = Vec::with_capacity(r.requests.len() + r.calls.len() + r.exceptions.len());
        let mut span = |name: &str, kind: span::SpanKind, end: u64, duration: u64, parent: bool| {
            let id = next_id();
            Span {
                trace_id: [id.to_be_bytes(), salt.to_be_bytes()].concat(),
                span_id: id
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .wrapping_add(salt)
                    .to_be_bytes()
                    .to_vec(),
                parent_span_id: if parent {
                    salt.to_be_bytes().to_vec()
                } else {
                    Vec::new()
                },
                name: name.into(),
                kind: kind as i32,
                start_time_unix_nano: end.saturating_sub(duration),
                end_time_unix_nano: end,
                ..Span::default()
            }
        };
        for request in &r.requests {
            let mut server = span(
                &request.operation,
                span::SpanKind::Server,
                request.time,
                request.duration_ns,
                false,
            );
            server.status = request.error.then(|| Status {
                code: status::StatusCode::Error as i32,
                message: "internal error".into(),
            });
            server.attributes.extend(request.cohort.as_deref().map(cohort));
            spans.push(server);
        }
        for call in &r.calls {
            let mut client = span(
                &call.downstream,
                span::SpanKind::Client,
                call.time,
                call.duration_ns,
                true,
            );
            client.attributes = vec![kv("peer.service", &call.downstream)];
            client.attributes.extend(call.cohort.as_deref().map(cohort));
            spans.push(client);
        }
        for exception in &r.exceptions {
            let mut internal = span(
                &exception.operation,
                span::SpanKind::Internal,
                exception.time,
                1,
                true,
            );
            internal.events = vec![span::Event {
                time_unix_nano: exception.time,
                name: "exception".into(),
                attributes: vec![kv("exception.type", &exception.exception_type)],
                ..span::Event::default()
            }];
            internal
                .attributes
                .extend(exception.cohort.as_deref().map(cohort));
            spans.push(internal);
        }
        if !spans.is_empty() {
            traces.resource_spans.push(ResourceSpans {
                resource: Some(resource(env, app, version)),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            });
        }
        let sums: Vec<Metric> = r
            .metric_points
            .iter()
            .filter_map(|point| match point.value {
                PointValue::Sum {
                    temporality: Temporality::Cumulative,
                    monotonic,
                    value,
                } => Some(Metric {
                    name: point.series.name.to_string(),
                    data: Some(metric::Data::Sum(Sum {
                        data_points: vec![NumberDataPoint {
                            start_time_unix_nano: point.start_time,
                            time_unix_nano: point.time,
                            value: Some(number_data_point::Value::AsDouble(value)),
                            ..NumberDataPoint::default()
                        }],
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        is_monotonic: monotonic,
                    })),
                    ..Metric::default()
                }),
                _ => None,
            })
            .collect();
        if !sums.is_empty() {
            metrics.resource_metrics.push(ResourceMetrics {
                resource: Some(resource(env, app, version)),
                scope_metrics: vec![ScopeMetrics {
                    metrics: sums,
                    ..ScopeMetrics::default()
                }],
                ..ResourceMetrics::default()
            });
        }
    }
    let metrics = (!metrics.resource_metrics.is_empty()).then_some(metrics);
    (traces, metrics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn the_same_seed_gives_the_same_request() {
        let shape = TraceShape::default();
        assert_eq!(trace_request(&shape, 7), trace_request(&shape, 7));
        assert_ne!(trace_request(&shape, 7), trace_request(&shape, 8));
    }

    #[test]
    fn requests_have_the_asked_shape() {
        let shape = TraceShape::default();
        let request = trace_request(&shape, 1);
        let spans: Vec<&Span> = request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .collect();
        assert_eq!(spans.len(), 512);
        assert!(spans.iter().all(|s| s.attributes.len() == 10));
        assert_eq!(request.resource_spans.len(), 8);
    }

    /// The sizes BENCHMARKS.md names for each detail, within a tenth.
    #[test]
    fn each_detail_gives_the_span_size_it_names() {
        for (detail, named) in [(SpanDetail::Lean, 400.0), (SpanDetail::Sdk, 600.0)] {
            let shape = TraceShape {
                detail,
                ..TraceShape::default()
            };
            let request = trace_request(&shape, 3);
            let per_span = request.encode_to_vec().len() as f64 / shape.spans as f64;
            assert!(
                (per_span / named - 1.0).abs() < 0.1,
                "{detail:?}: {per_span:.0} bytes a span, named {named}"
            );
            let spans = request
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| &s.spans);
            assert!(spans.clone().all(|s| s.attributes.len() == shape.attributes));
        }
    }
}
