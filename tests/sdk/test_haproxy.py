"""End to end with real parts: HAProxy in front of a stable and a canary backend, each instrumented
with the OpenTelemetry Python SDK and exporting to canaryd; when the canary starts failing,
canaryd's `haproxy` subscription must set its weight to 0 through HAProxy's runtime API, and
traffic through HAProxy must then all reach the stable backend.

Also measures what BENCHMARKS.md reports: the wall time from the first failing request to weight 0,
and the time from an event being decided to its webhook POST (median, p99). The figures are
written to ``target/act-figures.json``.

Needs the ``haproxy`` binary (Debian package ``haproxy``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from sdk_harness import REPO_ROOT, Canaryd, eventually, prometheus_samples, start_canaryd, stop_canaryd

HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None
)
pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy; .ci/run installs it)"
)

APP = "shop"
ENV = "prod"
STABLE, CANARY = "1.0.0", "1.1.0"
FIGURES = REPO_ROOT / "target" / "act-figures.json"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_figure(name: str, value: Any) -> None:
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    figures = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    figures[name] = value
    FIGURES.write_text(json.dumps(figures, indent=1, sort_keys=True))
    print(f"{name}: {value}")


def api(daemon: Canaryd, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{daemon.http}{path}", data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with _OPENER.open(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw) if raw else None


class Backend:
    """A small HTTP service of one version, traced with the OpenTelemetry SDK into canaryd."""

    def __init__(self, daemon: Canaryd, version: str) -> None:
        self.version = version
        self.failing = threading.Event()
        self.first_failure: float | None = None
        resource = Resource.create(
            {"service.name": APP, "service.version": version, "deployment.environment.name": ENV}
        )
        self.provider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(endpoint=f"http://{daemon.otlp_http}/v1/traces")
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
        tracer = self.provider.get_tracer("canaryd-e2e")
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                with tracer.start_as_current_span("GET /api/items", kind=SpanKind.SERVER) as span:
                    span.set_attribute("http.request.method", "GET")
                    span.set_attribute("http.route", "/api/items")
                    status = 200
                    if backend.failing.is_set():
                        status = 500
                        if backend.first_failure is None:
                            backend.first_failure = time.monotonic()
                        span.set_status(Status(StatusCode.ERROR))
                    span.set_attribute("http.response.status_code", status)
                    body = backend.version.encode()
                    self.send_response(status)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.provider.shutdown()


def runtime_command(admin: int, line: str) -> str:
    """One command to HAProxy's runtime API on loopback TCP, its whole answer."""
    with socket.create_connection(("127.0.0.1", admin), timeout=5) as s:
        s.sendall(line.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def run_haproxy(config: Path, log_path: Path, admin: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts HAProxy on `config` in the foreground, logging to `log_path`, and waits until its
    runtime API on port `admin` answers; fails the test if it exits or never does."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            pytest.fail(f"haproxy exited: {log_path.read_text()}", pytrace=False)
        try:
            runtime_command(admin, "show info")
            return proc
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"haproxy's runtime API never answered: {log_path.read_text()}", pytrace=False)
            time.sleep(0.05)


class Haproxy:
    """HAProxy on loopback: one frontend, the two backends at 90/10, the runtime API on TCP."""

    def __init__(self, workdir: Path, stable_port: int, canary_port: int) -> None:
        self.front = free_port()
        self.admin = free_port()
        config = workdir / "haproxy.cfg"
        config.write_text(
            f"""global
    stats socket ipv4@127.0.0.1:{self.admin} level admin
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend front
    bind 127.0.0.1:{self.front}
    default_backend {APP}
backend {APP}
    balance roundrobin
    server stable 127.0.0.1:{stable_port} weight 90
    server canary 127.0.0.1:{canary_port} weight 10
"""
        )
        self.log = workdir / "haproxy.log"
        self.proc = run_haproxy(config, self.log, self.admin)

    def command(self, line: str) -> str:
        return runtime_command(self.admin, line)

    def weight(self, server: str) -> int:
        return int(self.command(f"get weight {APP}/{server}").split()[0])

    def request(self) -> tuple[int, str]:
        try:
            with _OPENER.open(f"http://127.0.0.1:{self.front}/api/items", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Traffic:
    """A client sending requests through HAProxy at a steady pace until stopped."""

    def __init__(self, haproxy: Haproxy, per_second: float) -> None:
        self.stop = threading.Event()
        self.answers: list[tuple[int, str]] = []
        self.thread = threading.Thread(target=self.run, args=(haproxy, 1.0 / per_second), daemon=True)
        self.thread.start()

    def run(self, haproxy: Haproxy, gap: float) -> None:
        # Pacing the load, not waiting on a condition.
        next_at = time.monotonic()
        while not self.stop.is_set():
            self.answers.append(haproxy.request())
            next_at += gap
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Canaryd, Backend, Backend, Haproxy]]:
    daemon = start_canaryd(
        tmp_path,
        [
            "--haproxy-servers",
            f"{ENV}/{APP}/*={APP}/canary+stable",
            # The SDK's exports arrive within a fraction of a second: close buckets soon after.
            "--allowed-lateness-secs",
            "1",
            # Weights a person or a reload changed are put back within a second.
            "--haproxy-reconcile-secs",
            "1",
        ],
    )
    stable = Backend(daemon, STABLE)
    canary = Backend(daemon, CANARY)
    haproxy = Haproxy(tmp_path, stable.port, canary.port)
    try:
        yield daemon, stable, canary, haproxy
    finally:
        haproxy.close()
        stable.close()
        canary.close()
        stop_canaryd(daemon)


def subscribe_haproxy(daemon: Canaryd, haproxy: Haproxy) -> str:
    status, sub = api(
        daemon,
        "POST",
        "/api/v1/subscriptions",
        {
            "url": f"tcp://127.0.0.1:{haproxy.admin}",
            "kind": "haproxy",
            "events": ["canaryd.canary.failed", "canaryd.canary.stage_passed", "canaryd.canary.promoted"],
        },
    )
    assert status == 201, sub
    return sub["id"]


def canary_view(daemon: Canaryd) -> dict[str, Any]:
    return api(daemon, "GET", f"/api/v1/apps/{APP}/canary?env={ENV}")[1]


def declare_and_wait_healthy(daemon: Canaryd, model: str) -> None:
    """Waits for both versions' traffic, declares the rollout with `model`, waits for `healthy`."""

    def both_versions(apps: dict[str, Any]) -> str | None:
        for app in apps["apps"]:
            if app["app"] == APP and app["env"] == ENV:
                seen = {v["version"] for v in app["versions"]}
                return None if {STABLE, CANARY} <= seen else f"versions {seen}"
        return "no app yet"

    eventually(daemon, "both versions seen", lambda: daemon.apps(ENV), both_versions, timeout=30)
    status, body = api(
        daemon,
        "PUT",
        f"/api/v1/apps/{APP}/rollout?env={ENV}",
        {"stable_version": STABLE, "canary_version": CANARY, "model": model},
    )
    assert status == 200, body
    eventually(
        daemon,
        "a healthy canary",
        lambda: canary_view(daemon),
        lambda c: None if c["state"] == "healthy" else f"state {c['state']}",
        timeout=60,
        show=lambda c: {k: c[k] for k in ("state", "score", "canary_requests")},
    )


def test_a_failing_canary_is_taken_out_of_haproxy(rig: tuple[Canaryd, Backend, Backend, Haproxy]) -> None:
    daemon, _stable, canary, haproxy = rig
    sub = subscribe_haproxy(daemon, haproxy)
    assert haproxy.weight("canary") == 10

    traffic = Traffic(haproxy, per_second=150)
    try:
        declare_and_wait_healthy(daemon, "default")
        assert haproxy.weight("canary") == 10, "a healthy canary keeps its weight"

        canary.failing.set()
        deadline = time.monotonic() + 60
        while haproxy.weight("canary") != 0:
            if time.monotonic() > deadline:
                pytest.fail(f"canary weight never reached 0; canary: {canary_view(daemon)}", pytrace=False)
            time.sleep(0.02)
        zeroed = time.monotonic()
        assert canary.first_failure is not None
        record_figure("first_failing_request_to_haproxy_weight_0_s", round(zeroed - canary.first_failure, 3))
        # The action sets the canary's weight first, then the stable's: the same action, one
        # runtime command after the other.
        while haproxy.weight("stable") != 100:
            if time.monotonic() > deadline:
                pytest.fail(f"stable weight {haproxy.weight('stable')}, not 100", pytrace=False)
            time.sleep(0.02)
        assert canary_view(daemon)["state"] == "failing"
    finally:
        traffic.close()

    # Every request from now on reaches the stable backend.
    answers = [haproxy.request() for _ in range(200)]
    assert all(a == (200, STABLE) for a in answers), {a for a in answers if a != (200, STABLE)}

    status, deliveries = api(daemon, "GET", f"/api/v1/subscriptions/{sub}/deliveries")
    assert status == 200
    failed = [d for d in deliveries["deliveries"] if d["event_type"] == "canaryd.canary.failed"]
    assert len(failed) == 1 and failed[0]["state"] == "delivered", deliveries

    # Someone puts the canary back in by hand (or a reload restores the configured weights): the
    # applied state is read again, not assumed, and the failed canary's weight put back.
    assert haproxy.command(f"set server {APP}/canary weight 10").strip() == ""
    assert haproxy.weight("canary") == 10
    deadline = time.monotonic() + 15
    while haproxy.weight("canary") != 0:
        if time.monotonic() > deadline:
            pytest.fail("the hand-set canary weight was never put back to 0", pytrace=False)
        time.sleep(0.05)
    corrected = prometheus_samples(daemon.prometheus(), "canaryd_traffic_reconciles_total")
    assert any(dict(labels).get("outcome") == "corrected" and value >= 1 for labels, value in corrected.items()), corrected


def test_shadow_mode_reports_a_failure_and_moves_no_traffic(
    rig: tuple[Canaryd, Backend, Backend, Haproxy],
) -> None:
    daemon, _stable, canary, haproxy = rig
    sub = subscribe_haproxy(daemon, haproxy)
    traffic = Traffic(haproxy, per_second=150)
    try:
        declare_and_wait_healthy(daemon, "shadow")
        canary.failing.set()

        def failed_events(events: dict[str, Any]) -> str | None:
            return None if events["events"] else "no canary.failed yet"

        found = eventually(
            daemon,
            "a canary.failed event",
            lambda: api(daemon, "GET", f"/api/v1/events?app={APP}&env={ENV}&type=canaryd.canary.failed")[1],
            failed_events,
            timeout=60,
        )
        event = found["events"][0]
        assert event["data"]["dry_run"] is True
        eventually(
            daemon,
            "the haproxy subscription to have passed over it",
            lambda: api(daemon, "GET", f"/api/v1/subscriptions/{sub}/deliveries")[1],
            lambda d: None
            if any(x["event_id"] == event["id"] and x["state"] == "skipped" for x in d["deliveries"])
            else "not yet",
            timeout=30,
        )
        assert haproxy.weight("canary") == 10, "shadow mode moves no traffic"
    finally:
        traffic.close()


class Receiver:
    """A webhook receiver that notes when each event arrived."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, dict[str, Any]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.arrivals.append((time.time(), json.loads(body)))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


def test_decided_events_reach_webhooks_promptly(rig: tuple[Canaryd, Backend, Backend, Haproxy]) -> None:
    daemon, _stable, _canary, haproxy = rig
    receiver = Receiver()
    status, sub = api(
        daemon, "POST", "/api/v1/subscriptions", {"url": receiver.url, "events": ["canaryd.canary.started"]}
    )
    assert status == 201, sub
    for _ in range(20):
        haproxy.request()
    eventually(
        daemon,
        "the app is known",
        lambda: daemon.apps(ENV),
        lambda apps: None if any(a["app"] == APP for a in apps["apps"]) else "not yet",
        timeout=30,
    )
    # Each declaration decides a `started` event; its `time` is when it was made. One at a time,
    # each awaited, so that the figure is the path of one event, not a queue of them.
    count = 200
    for i in range(count):
        status, body = api(
            daemon,
            "PUT",
            f"/api/v1/apps/{APP}/rollout?env={ENV}",
            {"stable_version": STABLE, "canary_version": CANARY},
        )
        assert status == 200, body
        deadline = time.monotonic() + 10
        while len(receiver.arrivals) <= i:
            if time.monotonic() > deadline:
                pytest.fail(f"event {i + 1} not delivered within 10 s", pytrace=False)
            time.sleep(0.001)
    ids = [event["id"] for _, event in receiver.arrivals]
    # An operator's action is timed by the wall clock when it was taken (RFC 3339, nanoseconds,
    # UTC: text order is time order).
    times = [event["time"] for _, event in receiver.arrivals]
    assert len(set(ids)) == count and times == sorted(times), "each once, in order"
    delays = sorted(
        arrived - datetime.fromisoformat(event["time"].replace("Z", "+00:00")[:26] + "+00:00").timestamp()
        for arrived, event in receiver.arrivals
    )
    record_figure(
        "decided_to_webhook_post_ms",
        {
            "median": round(statistics.median(delays) * 1000, 2),
            "p99": round(delays[int(len(delays) * 0.99) - 1] * 1000, 2),
            "events": count,
        },
    )
    receiver.server.shutdown()
