"""Event time with two real SDK exporters on different batching delays (issue 20, item 1).

One app, two versions, each exporting through the OpenTelemetry Python SDK's BatchSpanProcessor
over OTLP/HTTP: the stable (1.0.0) with the SDK's default 5 s schedule delay, the canary (1.1.0)
with 0.5 s, into a daemon that allows 2 s of lateness (`--allowed-lateness-secs 2`). Nothing may be
dropped as late: every 5 s batch of the stable arrives with spans up to 5 s old, but buckets close
only once every active source (a version's exporter) has passed them, and the stable has not.

Why this would fail with a per-app watermark: closing buckets 2 s behind the latest event time any
source reached lets the canary, which exports every half second, push the watermark to within
about 2.5 s of now, so each stable batch finds most of its 5 s of spans in closed buckets (about
three fifths of them late). The test shows it with a control daemon, fed the very same spans (each
provider has one processor per daemon), whose `--source-idle-secs 1` stops the silent stable from
counting after 1 s, which is a per-app watermark in effect: there the stable's spans are late.

As in a deploy, the stable exports before the canary starts: a source canaryd has never heard from
cannot hold buckets back, so a stable starting together with a fast canary could lose part of its
first batch whatever the watermark.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

from sdk_harness import (
    Canaryd,
    app_view,
    assert_exported,
    eventually,
    find_app,
    prometheus_samples,
    recording,
    start_canaryd,
    stop_canaryd,
    version_counts,
    wait_for_app,
)

STABLE, CANARY = "1.0.0", "1.1.0"
ROUTE = "/api/items"
LATENESS = ["--allowed-lateness-secs", "2"]
LATE_METRIC = "canaryd_late_observations_total"
# Requests per second of each version, and how long both run together (wall time).
RATE = 25
BOTH_FOR_S = 16.0
# The SDK's default schedule delay (OTEL_BSP_SCHEDULE_DELAY unset: sdk_harness clears OTEL_*).
DEFAULT_DELAY_S = 5.0


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[tuple[Canaryd, Canaryd]]:
    """The daemon under test, and the control whose watermark is per app in effect."""
    (tmp_path / "subject").mkdir()
    (tmp_path / "control").mkdir()
    subject = start_canaryd(tmp_path / "subject", LATENESS)
    try:
        control = start_canaryd(tmp_path / "control", [*LATENESS, "--source-idle-secs", "1"])
        try:
            yield subject, control
        finally:
            stop_canaryd(control)
    finally:
        stop_canaryd(subject)


class Version:
    """One version of the app: its own TracerProvider, with one BatchSpanProcessor (and recording
    exporter) per daemon, all with the same schedule delay (None: the SDK's default)."""

    def __init__(self, app: str, version: str, daemons: tuple[Canaryd, ...], delay_ms: int | None) -> None:
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": app, "service.version": version}),
            shutdown_on_exit=False,
        )
        self.exporters = []
        self.processors = []
        for daemon in daemons:
            exporter = recording(OTLPSpanExporter)(endpoint=f"http://{daemon.otlp_http}/v1/traces", timeout=10)
            options = {} if delay_ms is None else {"schedule_delay_millis": delay_ms}
            processor = BatchSpanProcessor(exporter, **options)
            self.provider.add_span_processor(processor)
            self.exporters.append(exporter)
            self.processors.append(processor)
        self.tracer = self.provider.get_tracer("canaryd.tests.event_time")
        self.sent = 0
        self.closed = False

    def delays_s(self) -> set[float]:
        """The schedule delays the processors really use (the SDK keeps them on its batch worker)."""
        return {p._batch_processor._schedule_delay for p in self.processors}  # noqa: SLF001

    def request(self) -> None:
        with self.tracer.start_as_current_span(
            f"GET {ROUTE}",
            kind=SpanKind.SERVER,
            attributes={"http.request.method": "GET", "http.route": ROUTE, "http.response.status_code": 200},
        ):
            pass
        self.sent += 1

    def close(self) -> None:
        """Shutting a provider down exports what its processors still hold, then stops them."""
        if not self.closed:
            self.closed = True
            self.provider.shutdown()


def run(versions: list[Version], stop: threading.Event) -> None:
    """Each version serves RATE requests a second until `stop` (pacing the load, not waiting)."""
    gap = 1.0 / RATE
    next_at = time.monotonic()
    while not stop.is_set():
        for version in versions:
            version.request()
        next_at += gap
        stop.wait(max(0.0, next_at - time.monotonic()))


def requests_of(daemon: Canaryd, app: str, version: str) -> int:
    entry = find_app(daemon.apps(), app, "default")
    found = [v for v in entry["versions"] if v["version"] == version] if entry else []
    return found[0]["requests"] if found else 0


def late_of(daemon: Canaryd, app: str, version: str) -> int:
    status, _, body = daemon.get(f"/api/v1/apps/{app}/baseline?version={version}")
    assert status == 200, f"baseline of {version}: {status} {body[:500]!r}"
    return json.loads(body)["late_observations"]


def late_total(daemon: Canaryd) -> float:
    samples = prometheus_samples(daemon.prometheus(), LATE_METRIC)
    assert samples, f"{LATE_METRIC} is not on /metrics"
    return sum(samples.values())


def test_a_fast_canary_does_not_make_a_batching_stable_late(
    daemons: tuple[Canaryd, Canaryd], token: str
) -> None:
    subject, control = daemons
    app = f"shop-{token}"
    stop = threading.Event()
    with ExitStack() as stack:
        stable = Version(app, STABLE, daemons, None)
        stack.callback(stable.close)
        assert stable.delays_s() == {DEFAULT_DELAY_S}, stable.delays_s()

        # The stable alone, until both daemons have its first batch.
        load = threading.Thread(target=run, args=([stable], stop), daemon=True)
        load.start()
        for daemon in daemons:
            eventually(
                daemon,
                "the stable's first batch",
                lambda d=daemon: requests_of(d, app, STABLE),
                lambda n: None if n > 0 else "no stable requests yet",
                timeout=3 * DEFAULT_DELAY_S,
            )
        stop.set()
        load.join()

        # The canary joins, exporting every half second; both serve for BOTH_FOR_S.
        canary = Version(app, CANARY, daemons, 500)
        stack.callback(canary.close)
        assert canary.delays_s() == {0.5}, canary.delays_s()
        stop.clear()
        load = threading.Thread(target=run, args=([stable, canary], stop), daemon=True)
        load.start()
        load.join(BOTH_FOR_S)
        stop.set()
        load.join()
        # The canary goes first (its last spans are the latest), the stable's last batch after it.
        canary.close()
        stable.close()

    for version in (stable, canary):
        for exporter in version.exporters:
            assert_exported(exporter, total=version.sent)
    # At RATE a second, every one of the stable's batches was a 5 s one (none reached the SDK's
    # 512-span batch limit, which would have exported early).
    assert RATE * DEFAULT_DELAY_S < 512
    expected = app_view(
        versions={
            STABLE: version_counts(spans=stable.sent, requests=stable.sent),
            CANARY: version_counts(spans=canary.sent, requests=canary.sent),
        },
        operations={f"GET {ROUTE}": (stable.sent + canary.sent, 0)},
    )
    # Both daemons have taken every span (late ones are counted in the catalog too)...
    for daemon in daemons:
        wait_for_app(daemon, app, "default", expected)

    # ...and the one under test used them all: nothing of either version was late.
    late = {v: late_of(subject, app, v) for v in (STABLE, CANARY)}
    assert late == {STABLE: 0, CANARY: 0}, f"late observations per version: {late}\n{subject.log_tail()}"
    assert late_total(subject) == 0

    # The control, with the same spans and a per-app watermark in effect, lost stable spans: the
    # traffic above is the kind a per-app watermark drops.
    control_late = late_of(control, app, STABLE)
    assert control_late > 0, (
        f"the control daemon (--source-idle-secs 1) dropped none of the stable's {stable.sent} spans: "
        "the test no longer exercises what a per-app watermark gets wrong"
    )
    assert late_total(control) >= control_late
    print(f"stable {stable.sent} spans, canary {canary.sent}; control dropped {control_late} of the stable's")
