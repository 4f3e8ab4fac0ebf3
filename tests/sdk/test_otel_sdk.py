"""The real OpenTelemetry Python SDK, exporting over OTLP gRPC and OTLP/HTTP (protobuf) to canaryd.

Each test builds its own providers with their own service names, flushes and shuts them down
explicitly (no export thread outlives a test), checks that every export the SDK made succeeded and
carried the number of items the test expects, then polls GET /api/v1/apps until the app shows
exactly the expected counts.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcMetricExporter,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)

from sdk_harness import (
    Canaryd,
    app_view,
    assert_exported,
    eventually,
    find_app,
    prometheus_samples,
    recording,
    version_counts,
    wait_for_app,
)

TRANSPORTS = ["grpc", "http"]
ACCEPTED_METRIC = "canaryd_otlp_accepted_items_total"
FLUSH_TIMEOUT_MS = 15_000


# ---------------------------------------------------------------------------------------------
# Exporters and providers


def span_exporter(daemon: Canaryd, transport: str, compression: str | None = None) -> Any:
    if transport == "grpc":
        return recording(GrpcSpanExporter)(
            endpoint=daemon.otlp_grpc,
            insecure=True,
            compression=grpc.Compression.Gzip if compression == "gzip" else grpc.Compression.NoCompression,
            timeout=10,
        )
    return recording(HttpSpanExporter)(
        endpoint=f"http://{daemon.otlp_http}/v1/traces",
        compression=HttpCompression.Gzip if compression == "gzip" else HttpCompression.NoCompression,
        timeout=10,
    )


def metric_exporter(daemon: Canaryd, transport: str) -> Any:
    if transport == "grpc":
        return recording(GrpcMetricExporter)(
            endpoint=daemon.otlp_grpc,
            insecure=True,
            compression=grpc.Compression.NoCompression,
            timeout=10,
        )
    return recording(HttpMetricExporter)(
        endpoint=f"http://{daemon.otlp_http}/v1/metrics",
        compression=HttpCompression.NoCompression,
        timeout=10,
    )


def log_exporter(daemon: Canaryd, transport: str) -> Any:
    if transport == "grpc":
        return recording(GrpcLogExporter)(
            endpoint=daemon.otlp_grpc,
            insecure=True,
            compression=grpc.Compression.NoCompression,
            timeout=10,
        )
    return recording(HttpLogExporter)(
        endpoint=f"http://{daemon.otlp_http}/v1/logs",
        compression=HttpCompression.NoCompression,
        timeout=10,
    )


def resource(
    service: str,
    version: str | None = None,
    env: str | None = None,
    namespace: str | None = None,
    old_env: str | None = None,
) -> Resource:
    attributes: dict[str, str] = {"service.name": service}
    if version is not None:
        attributes["service.version"] = version
    if env is not None:
        attributes["deployment.environment.name"] = env
    if old_env is not None:
        attributes["deployment.environment"] = old_env
    if namespace is not None:
        attributes["service.namespace"] = namespace
    return Resource.create(attributes)


@contextmanager
def traced(exporter: Any, res: Resource) -> Iterator[Any]:
    """A tracer on its own TracerProvider; flushed at the end of the block, always shut down."""
    provider = TracerProvider(resource=res, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    try:
        yield provider.get_tracer("canaryd.tests.sdk", "0.1.0")
        assert provider.force_flush(FLUSH_TIMEOUT_MS), "TracerProvider.force_flush timed out"
    finally:
        provider.shutdown()


@contextmanager
def metered(exporter: Any, res: Resource) -> Iterator[MeterProvider]:
    """A MeterProvider whose reader never collects on its own (interval math.inf): only the test's
    force_flush calls collect and export, and shutdown exports nothing more."""
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=math.inf)
    provider = MeterProvider(resource=res, metric_readers=[reader], shutdown_on_exit=False)
    try:
        yield provider
    finally:
        provider.shutdown()


@contextmanager
def logged(exporter: Any, res: Resource, name: str) -> Iterator[logging.Logger]:
    """A dedicated stdlib logger (INFO, not propagating) wired to its own LoggerProvider through the
    SDK's LoggingHandler; flushed at the end of the block, always detached and shut down."""
    provider = LoggerProvider(resource=res, shutdown_on_exit=False)
    provider.add_log_record_processor(BatchLogRecordProcessor(exporter))
    with warnings.catch_warnings():
        # 1.45 deprecates the SDK's LoggingHandler in favour of opentelemetry-instrumentation-logging.
        warnings.simplefilter("ignore", DeprecationWarning)
        handler = LoggingHandler(level=logging.NOTSET, logger_provider=provider)
    logger = logging.getLogger(f"canaryd.tests.sdk.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield logger
        assert provider.force_flush(FLUSH_TIMEOUT_MS), "LoggerProvider.force_flush timed out"
    finally:
        logger.removeHandler(handler)
        handler.close()
        provider.shutdown()


def server_span(
    tracer: Any,
    method: str,
    route: str,
    status_code: int,
    error: bool = False,
    **kwargs: Any,
) -> Any:
    """A SERVER span named like the SDK's HTTP instrumentations do when they know only the method,
    so the operation must come from http.route and http.request.method."""
    attributes = {
        "http.request.method": method,
        "http.route": route,
        "http.response.status_code": status_code,
        "url.scheme": "http",
    }
    span_cm = tracer.start_as_current_span(method, kind=SpanKind.SERVER, attributes=attributes, **kwargs)

    @contextmanager
    def wrapper() -> Iterator[Any]:
        with span_cm as span:
            if error:
                span.set_status(Status(StatusCode.ERROR, f"HTTP {status_code}"))
            yield span

    return wrapper()


# ---------------------------------------------------------------------------------------------
# Traces


@pytest.mark.parametrize(
    "transport,compression",
    [("grpc", None), ("http", None), ("grpc", "gzip"), ("http", "gzip")],
    ids=["grpc", "http", "grpc-gzip", "http-gzip"],
)
def test_traces(canaryd: Canaryd, token: str, transport: str, compression: str | None) -> None:
    app = f"checkout-{transport}-{compression or 'plain'}-{token}"
    exporter = span_exporter(canaryd, transport, compression)
    # (method, route, status code, ERROR status); GET children are postgresql, POST ones payments.
    requests_made = [
        ("GET", "/orders/{id}", 200, False),
        ("GET", "/orders/{id}", 200, False),
        ("GET", "/orders/{id}", 500, True),
        ("GET", "/orders/{id}", 404, False),
        ("POST", "/orders", 201, False),
        ("POST", "/orders", 500, True),
        ("POST", "/orders", 200, False),
    ]
    with traced(exporter, resource(app, "1.2.0", env="prod")) as tracer:
        for index, (method, route, status_code, error) in enumerate(requests_made):
            with server_span(tracer, method, route, status_code, error=error) as span:
                if method == "GET":
                    with tracer.start_as_current_span(
                        "SELECT orders",
                        kind=SpanKind.CLIENT,
                        attributes={"db.system": "postgresql", "db.query.text": "SELECT * FROM orders WHERE id = $1"},
                    ):
                        pass
                else:
                    # peer.service comes before server.address.
                    with tracer.start_as_current_span(
                        "POST",
                        kind=SpanKind.CLIENT,
                        attributes={
                            "peer.service": "payments",
                            "server.address": "payments.internal",
                            "http.request.method": "POST",
                            "http.response.status_code": 200,
                        },
                    ):
                        pass
                if index == 0:
                    with tracer.start_as_current_span("render order", kind=SpanKind.INTERNAL):
                        pass
                if index == 2:
                    span.record_exception(ValueError("order id is not a number"))

    assert_exported(exporter, total=15)
    wait_for_app(
        canaryd,
        app,
        "prod",
        app_view(
            versions={"1.2.0": version_counts(spans=15, requests=7, errors=2, calls=7, exceptions=1)},
            operations={"GET /orders/{id}": (4, 1), "POST /orders": (3, 1)},
            downstreams={"postgresql": 4, "payments": 3},
            exception_types={"ValueError": 1},
        ),
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_trace_semantics(canaryd: Canaryd, token: str, transport: str) -> None:
    """Entry spans, operation names, errors, downstream names and exception events, case by case."""
    app = f"semantics-{transport}-{token}"
    exporter = span_exporter(canaryd, transport)
    remote_parent = set_span_in_context(
        NonRecordingSpan(
            SpanContext(
                trace_id=0x0AF7651916CD43DD8448EB211C80319C,
                span_id=0xB7AD6B7169203331,
                is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
            )
        )
    )
    with traced(exporter, resource(app, "3.0.0", env="prod")) as tracer:
        # 1. SERVER with a remote parent and only the old http.method: still an entry span.
        with tracer.start_as_current_span(
            "legacy handler",
            context=remote_parent,
            kind=SpanKind.SERVER,
            attributes={"http.method": "GET", "http.route": "/legacy/{id}", "http.status_code": 200},
        ):
            pass
        # 2. A route but no method: the operation is the route alone.
        with tracer.start_as_current_span(
            "health check", kind=SpanKind.SERVER, attributes={"http.route": "/healthz"}
        ):
            pass
        # 3. 503 without an ERROR status is an error; its CLIENT child failing is no request error.
        with server_span(tracer, "GET", "/flaky", 503):
            # 4.
            with tracer.start_as_current_span(
                "GET",
                kind=SpanKind.CLIENT,
                attributes={"server.address": "flaky-backend", "http.response.status_code": 502},
            ) as client:
                client.set_status(Status(StatusCode.ERROR, "bad gateway"))
        # 5. 500 and ERROR: one error, not two.
        with server_span(tracer, "GET", "/flaky", 500, error=True):
            # 6. An INTERNAL child in error is no request error either.
            with tracer.start_as_current_span("retry loop") as internal:
                internal.set_status(Status(StatusCode.ERROR, "gave up"))
        # 7. CONSUMER without http.route: the operation is the span name; ERROR status counts.
        with tracer.start_as_current_span(
            "process order", kind=SpanKind.CONSUMER, attributes={"messaging.system": "kafka"}
        ) as consumer:
            consumer.set_status(Status(StatusCode.ERROR, "poison message"))
        # 8. A root INTERNAL span is an entry span.
        with tracer.start_as_current_span("nightly-job", kind=SpanKind.INTERNAL):
            # 9. PRODUCER, named by messaging.system.
            with tracer.start_as_current_span(
                "publish invoices", kind=SpanKind.PRODUCER, attributes={"messaging.system": "kafka"}
            ):
                pass
            # 10. CLIENT named by rpc.service.
            with tracer.start_as_current_span(
                "inventory.Stock/Get",
                kind=SpanKind.CLIENT,
                attributes={"rpc.system": "grpc", "rpc.service": "inventory.Stock", "rpc.method": "Get"},
            ):
                pass
            # 11. server.address comes before db.system; an event that is not named "exception"
            #     is no exception, whatever its attributes.
            with tracer.start_as_current_span(
                "GET",
                kind=SpanKind.CLIENT,
                attributes={"server.address": "cache.internal", "db.system": "redis"},
            ) as cache:
                cache.add_event("retry", {"exception.type": "ConnectionResetError"})
            # 12. A CLIENT with none of the attributes: named by the span name.
            with tracer.start_as_current_span("mystery-call", kind=SpanKind.CLIENT) as mystery:
                mystery.record_exception(TimeoutError("no answer"))
            # 13. Two exception events on an INTERNAL span.
            with tracer.start_as_current_span("compute totals") as compute:
                compute.record_exception(KeyError("sku"))
                compute.record_exception(ValueError("quantity"))

    assert_exported(exporter, total=13)
    wait_for_app(
        canaryd,
        app,
        "prod",
        app_view(
            versions={"3.0.0": version_counts(spans=13, requests=6, errors=3, calls=5, exceptions=3)},
            operations={
                "GET /legacy/{id}": (1, 0),
                "/healthz": (1, 0),
                "GET /flaky": (2, 2),
                "process order": (1, 1),
                "nightly-job": (1, 0),
            },
            downstreams={
                "flaky-backend": 1,
                "kafka": 1,
                "inventory.Stock": 1,
                "cache.internal": 1,
                "mystery-call": 1,
            },
            exception_types={"TimeoutError": 1, "KeyError": 1, "ValueError": 1},
        ),
    )


def test_versions_of_one_app(canaryd: Canaryd, token: str) -> None:
    """Three TracerProviders of one service (two versions and none), over both transports."""
    app = f"billing-{token}"
    route = "/invoices/{id}"

    grpc_exporter = span_exporter(canaryd, "grpc")
    with traced(grpc_exporter, resource(app, "2.0.0")) as tracer:
        for _ in range(3):
            with server_span(tracer, "GET", route, 200):
                pass

    http_exporter = span_exporter(canaryd, "http")
    with traced(http_exporter, resource(app, "2.1.0")) as tracer:
        for index in range(5):
            with server_span(tracer, "GET", route, 500 if index == 4 else 200, error=index == 4):
                if index < 2:
                    with tracer.start_as_current_span(
                        "SELECT invoices", kind=SpanKind.CLIENT, attributes={"db.system": "postgresql"}
                    ):
                        pass

    unversioned_exporter = span_exporter(canaryd, "grpc")
    with traced(unversioned_exporter, resource(app)) as tracer:
        for _ in range(2):
            with server_span(tracer, "GET", route, 200):
                pass

    assert_exported(grpc_exporter, total=3)
    assert_exported(http_exporter, total=7)
    assert_exported(unversioned_exporter, total=2)
    expected = app_view(
        versions={
            "2.0.0": version_counts(spans=3, requests=3),
            "2.1.0": version_counts(spans=7, requests=5, errors=1, calls=2),
            "unknown": version_counts(spans=2, requests=2),
        },
        operations={f"GET {route}": (10, 1)},
        downstreams={"postgresql": 2},
    )
    entry = wait_for_app(canaryd, app, "default", expected)
    assert len(entry["versions"]) == 3
    # The same app through the env filter.
    wait_for_app(canaryd, app, "default", expected, query_env="default")


def test_namespace_and_environment(canaryd: Canaryd, token: str) -> None:
    name = f"cart-{token}"
    staging, legacy, ignored = f"staging-{token}", f"legacy-{token}", f"ignored-{token}"
    resources = [
        # (resource, spans)
        (resource(name, "1.0.0", env=staging, namespace="shop"), 2),
        # deployment.environment.name wins over the older deployment.environment.
        (resource(name, "1.0.1", env=staging, namespace="shop", old_env=ignored), 1),
        # Only the older attribute, and no namespace.
        (resource(name, "1.0.0", old_env=legacy), 1),
        # No environment at all.
        (resource(name, "1.0.0", namespace="shop"), 3),
    ]
    for res, spans in resources:
        # A provider's shutdown shuts its exporter down too: one exporter per provider.
        exporter = span_exporter(canaryd, "grpc")
        with traced(exporter, res) as tracer:
            for _ in range(spans):
                with server_span(tracer, "POST", "/cart/items", 201):
                    pass
        assert_exported(exporter, total=spans)

    wait_for_app(
        canaryd,
        f"shop/{name}",
        staging,
        app_view(
            versions={
                "1.0.0": version_counts(spans=2, requests=2),
                "1.0.1": version_counts(spans=1, requests=1),
            },
            operations={"POST /cart/items": (3, 0)},
        ),
    )
    wait_for_app(
        canaryd,
        name,
        legacy,
        app_view(versions={"1.0.0": version_counts(spans=1, requests=1)}, operations={"POST /cart/items": (1, 0)}),
    )
    wait_for_app(
        canaryd,
        f"shop/{name}",
        "default",
        app_view(versions={"1.0.0": version_counts(spans=3, requests=3)}, operations={"POST /cart/items": (3, 0)}),
    )

    # The env filter returns exactly the apps of that environment.
    staging_apps = canaryd.apps(env=staging)["apps"]
    assert [(a["env"], a["app"]) for a in staging_apps] == [(staging, f"shop/{name}")], staging_apps
    legacy_apps = canaryd.apps(env=legacy)["apps"]
    assert [(a["env"], a["app"]) for a in legacy_apps] == [(legacy, name)], legacy_apps
    assert canaryd.apps(env=ignored)["apps"] == []
    # Unfiltered: the namespaced and bare names are different apps, and nothing went to "ignored".
    everything = canaryd.apps()
    assert find_app(everything, name, staging) is None
    assert find_app(everything, f"shop/{name}", legacy) is None
    assert all(a["env"] != ignored for a in everything["apps"])
    ours = sorted((a["env"], a["app"]) for a in everything["apps"] if a["app"] in (name, f"shop/{name}"))
    assert ours == sorted([(staging, f"shop/{name}"), (legacy, name), ("default", f"shop/{name}")])


# ---------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_metrics(canaryd: Canaryd, token: str, transport: str) -> None:
    app = f"pricing-{transport}-{token}"
    exporter = metric_exporter(canaryd, transport)
    pool_usage = [0.25]

    def observe_pool(options: CallbackOptions) -> list[Observation]:
        return [Observation(pool_usage[0], {"pool": "main"})]

    with metered(exporter, resource(app, "4.2.0", env="prod")) as provider:
        meter = provider.get_meter("canaryd.tests.sdk", "0.1.0")
        orders = meter.create_counter("orders.created", unit="{order}")
        duration = meter.create_histogram("http.server.request.duration", unit="s")
        queue = meter.create_up_down_counter("queue.depth", unit="{job}")
        meter.create_observable_gauge("pool.usage", callbacks=[observe_pool], unit="1")

        orders.add(1, {"region": "eu"})
        orders.add(2, {"region": "us"})
        duration.record(0.120, {"http.route": "/quote"})
        duration.record(0.340, {"http.route": "/quote"})
        queue.add(5)
        # Collection 1 (cumulative): orders{eu}, orders{us}, duration{/quote}, queue{}, pool{main}.
        assert provider.force_flush(FLUSH_TIMEOUT_MS)

        orders.add(3, {"region": "eu"})
        orders.add(1, {"region": "apac"})  # a new series
        duration.record(0.080, {"http.route": "/quote"})
        queue.add(-2)
        pool_usage[0] = 0.5
        # Collection 2: every series again (cumulative), plus orders{apac}.
        assert provider.force_flush(FLUSH_TIMEOUT_MS)

    assert_exported(exporter, total=11, per_export=[5, 6])
    wait_for_app(
        canaryd,
        app,
        "prod",
        app_view(versions={"4.2.0": version_counts(metric_points=11)}, metric_series=6),
    )


# ---------------------------------------------------------------------------------------------
# Logs


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_logs(canaryd: Canaryd, token: str, transport: str) -> None:
    app = f"notifier-{transport}-{token}"
    exporter = log_exporter(canaryd, transport)
    with logged(exporter, resource(app, "0.9.1", env="prod"), app) as logger:
        for index in range(5):
            logger.info("sent notification %d", index)
        for index in range(2):
            logger.warning("slow provider, attempt %d", index)
        for index in range(3):
            logger.error("provider rejected message %d", index)
        logger.critical("notification queue lost")
        logger.debug("below the logger's level: never exported")

    assert_exported(exporter, total=11)
    wait_for_app(
        canaryd,
        app,
        "prod",
        app_view(versions={"0.9.1": version_counts(log_records=11, error_log_records=4)}),
    )


# ---------------------------------------------------------------------------------------------
# /metrics


def test_prometheus_accepted_items(canaryd: Canaryd, token: str) -> None:
    """Exact increments of canaryd_otlp_accepted_items_total for every signal and transport."""

    def accepted() -> dict[tuple[str, str], float]:
        samples = prometheus_samples(canaryd.prometheus(), ACCEPTED_METRIC)
        out: dict[tuple[str, str], float] = {}
        for labels, value in samples.items():
            labels = dict(labels)
            key = (labels.get("signal", ""), labels.get("transport", ""))
            out[key] = out.get(key, 0.0) + value
        return out

    before = accepted()
    app = f"promcheck-{token}"
    res = resource(app, "9.9.9", env="prod")
    sent = {
        ("traces", "grpc"): 3,
        ("traces", "http"): 4,
        ("metrics", "grpc"): 2,
        ("metrics", "http"): 3,
        ("logs", "grpc"): 2,
        ("logs", "http"): 5,
    }
    for transport in TRANSPORTS:
        exporter = span_exporter(canaryd, transport)
        with traced(exporter, res) as tracer:
            for _ in range(sent[("traces", transport)]):
                with server_span(tracer, "GET", "/ping", 200):
                    pass
        assert_exported(exporter, total=sent[("traces", transport)])

        exporter = metric_exporter(canaryd, transport)
        with metered(exporter, res) as provider:
            jobs = provider.get_meter("canaryd.tests.sdk").create_counter("jobs.done")
            for index in range(sent[("metrics", transport)]):
                jobs.add(1, {"queue": f"{transport}-{index}"})
            assert provider.force_flush(FLUSH_TIMEOUT_MS)
        assert_exported(exporter, total=sent[("metrics", transport)], per_export=[sent[("metrics", transport)]])

        exporter = log_exporter(canaryd, transport)
        with logged(exporter, res, f"{app}-{transport}") as logger:
            for index in range(sent[("logs", transport)]):
                logger.info("ping %d", index)
        assert_exported(exporter, total=sent[("logs", transport)])

    def check(after: dict[tuple[str, str], float]) -> str | None:
        problems = []
        for key, count in sent.items():
            delta = after.get(key, 0.0) - before.get(key, 0.0)
            if delta != count:
                problems.append(f'signal="{key[0]}",transport="{key[1]}": +{delta:g}, expected +{count}')
        return "; ".join(problems) or None

    after = eventually(canaryd, f"{ACCEPTED_METRIC} increments", accepted, check)
    for key in sent:
        assert after[key] > 0

    # The same data, seen through the API as one app.
    wait_for_app(
        canaryd,
        app,
        "prod",
        app_view(
            versions={"9.9.9": version_counts(spans=7, requests=7, metric_points=5, log_records=7)},
            operations={"GET /ping": (7, 0)},
            metric_series=5,
        ),
    )
