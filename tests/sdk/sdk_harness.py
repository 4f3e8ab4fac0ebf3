"""Helpers for the OpenTelemetry Python SDK tests against the real canaryd binary (fixtures: conftest.py).

The daemon is started once per test session on port 0 (every listener), and its chosen addresses are
read from ``<data dir>/addrs.json``. Every test uses its own service names, so tests share the
daemon without seeing each other's data. The daemon processes exports asynchronously after it
acknowledges them, so every assertion on the API polls until the expected view appears (or a
deadline passes, and the last JSON seen is shown).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

READY_TIMEOUT_S = 30.0
READY_POLL_S = 0.05
SHUTDOWN_TIMEOUT_S = 20.0
API_TIMEOUT_S = 15.0
API_POLL_S = 0.1

# Counters of one version in GET /api/v1/apps.
VERSION_COUNTERS = (
    "spans",
    "requests",
    "errors",
    "calls",
    "exceptions",
    "metric_points",
    "log_records",
    "error_log_records",
)


def _isolate_environment() -> None:
    """Keep the SDK and the HTTP clients from picking up settings of the machine running the tests.

    The exporters read OTEL_* variables (endpoint, compression, headers, temporality, resource
    attributes), and requests/grpc honour proxy variables; a test must only ever talk to the daemon
    it started on 127.0.0.1.
    """
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            del os.environ[name]
    for name in ("no_proxy", "NO_PROXY"):
        current = os.environ.get(name, "")
        extra = "127.0.0.1,localhost"
        os.environ[name] = f"{current},{extra}" if current else extra
    # The SDK's own telemetry about the exporters stays off (it is off by default too).
    os.environ["OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED"] = "false"


_isolate_environment()

# urllib without any proxy, whatever the environment says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def canaryd_binary() -> Path:
    """CANARYD_BIN, else CANARYD_TEST_BIN (the name scripts/test.sh exports), else target/debug."""
    variable = next((name for name in ("CANARYD_BIN", "CANARYD_TEST_BIN") if os.environ.get(name)), None)
    path = Path(os.environ[variable]) if variable else REPO_ROOT / "target" / "debug" / "canaryd"
    if not path.is_file() or not os.access(path, os.X_OK):
        how = variable or "the default path (set CANARYD_BIN to override)"
        pytest.fail(
            f"canaryd binary not found or not executable at {path} ({how}); "
            "build it first with `cargo build` (or `cargo build --bin canaryd`)",
            pytrace=False,
        )
    return path


def log_tail(path: Path, max_bytes: int = 8000) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        return f"<cannot read {path}: {error}>"
    tail = data[-max_bytes:].decode("utf-8", errors="replace")
    prefix = "...\n" if len(data) > max_bytes else ""
    return prefix + tail


@dataclass
class Canaryd:
    """A running daemon and its addresses (each "127.0.0.1:PORT")."""

    proc: subprocess.Popen
    data_dir: Path
    log_path: Path
    otlp_grpc: str
    otlp_http: str
    http: str

    # ---- plumbing

    def log_tail(self) -> str:
        return log_tail(self.log_path)

    def fail_if_exited(self) -> None:
        rc = self.proc.poll()
        if rc is not None:
            pytest.fail(
                f"canaryd exited unexpectedly with code {rc}; log tail:\n{self.log_tail()}",
                pytrace=False,
            )

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str, bytes]:
        """GET on the API listener: (status, content type, body). HTTP errors are returned too."""
        url = f"http://{self.http}{path}"
        request = urllib.request.Request(url, method="GET")
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("Content-Type", ""), error.read()

    # ---- the API

    def apps(self, env: str | None = None) -> dict[str, Any]:
        """GET /api/v1/apps (optionally ?env=...), parsed; fails the test on a non-200 answer."""
        path = "/api/v1/apps"
        if env is not None:
            path += "?" + urllib.parse.urlencode({"env": env})
        status, _, body = self.get(path)
        if status != 200:
            pytest.fail(f"GET {path} answered {status}: {body[:2000]!r}", pytrace=False)
        try:
            parsed = json.loads(body)
        except ValueError as error:
            pytest.fail(f"GET {path} is not JSON ({error}): {body[:2000]!r}", pytrace=False)
        if not isinstance(parsed, dict) or not isinstance(parsed.get("apps"), list):
            pytest.fail(f'GET {path} has no "apps" list: {parsed!r}'[:4000], pytrace=False)
        return parsed

    def prometheus(self) -> str:
        status, content_type, body = self.get("/metrics")
        if status != 200:
            pytest.fail(f"GET /metrics answered {status}: {body[:2000]!r}", pytrace=False)
        assert content_type.startswith("text/plain"), f"GET /metrics content type {content_type!r}"
        return body.decode("utf-8")



def start_canaryd(base: Path, extra_args: list[str] | None = None, restart: bool = False) -> Canaryd:
    """Starts the daemon binary with its data in ``base``, every listener on port 0, and waits for
    its addrs.json; fails the test (after killing it) if it exits or never gets ready. With
    ``restart``, it starts again on the data an earlier one left there (logging to another file)."""
    binary = canaryd_binary()
    data_dir = base / "data"
    data_dir.mkdir(exist_ok=restart)
    log_path = base / ("canaryd.restarted.log" if restart else "canaryd.log")
    addrs_path = data_dir / "addrs.json"
    # The addresses of a daemon that ran before are not this one's.
    addrs_path.unlink(missing_ok=True)
    command = [
        str(binary),
        "serve",
        "--data-dir",
        str(data_dir),
        "--otlp-grpc-addr",
        "127.0.0.1:0",
        "--otlp-http-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--models-dir",
        str(REPO_ROOT / "models"),
        *(extra_args or []),
    ]
    # The variables that point the tests at the binary name no daemon setting.
    env = {k: v for k, v in os.environ.items() if k not in ("CANARYD_TEST_BIN", "CANARYD_BIN")}
    env.setdefault("RUST_BACKTRACE", "1")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=base,
            env=env,
        )

    def stop_hard() -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    addrs = None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while addrs is None:
        rc = proc.poll()
        if rc is not None:
            pytest.fail(
                f"canaryd exited with code {rc} before writing {addrs_path}\n"
                f"command: {' '.join(command)}\nlog tail:\n{log_tail(log_path)}",
                pytrace=False,
            )
        if addrs_path.exists():
            try:
                addrs = json.loads(addrs_path.read_text())
            except (OSError, ValueError):
                addrs = None  # the write is atomic, but read again rather than trust that
        if addrs is None:
            if time.monotonic() > deadline:
                stop_hard()
                pytest.fail(
                    f"canaryd wrote no {addrs_path} within {READY_TIMEOUT_S:.0f} s\n"
                    f"command: {' '.join(command)}\nlog tail:\n{log_tail(log_path)}",
                    pytrace=False,
                )
            time.sleep(READY_POLL_S)

    missing = [key for key in ("otlp_grpc", "otlp_http", "http") if not isinstance(addrs.get(key), str)]
    if missing:
        stop_hard()
        pytest.fail(f"addrs.json lacks {missing}: {addrs!r}", pytrace=False)
    for key in ("otlp_grpc", "otlp_http", "http"):
        if not re.fullmatch(r"127\.0\.0\.1:[1-9][0-9]*", addrs[key]):
            stop_hard()
            pytest.fail(f"addrs.json {key} is not 127.0.0.1:<port>: {addrs!r}", pytrace=False)
    return Canaryd(
        proc=proc,
        data_dir=data_dir,
        log_path=log_path,
        otlp_grpc=addrs["otlp_grpc"],
        otlp_http=addrs["otlp_http"],
        http=addrs["http"],
    )


def stop_canaryd(daemon: Canaryd) -> None:
    """SIGTERM, as the contract has it: the daemon drains and exits 0 (else the test fails)."""
    proc = daemon.proc
    rc = proc.poll()
    if rc is not None:
        pytest.fail(
            f"canaryd had already exited (code {rc}) before SIGTERM; log tail:\n{daemon.log_tail()}",
            pytrace=False,
        )
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(
            f"canaryd did not exit within {SHUTDOWN_TIMEOUT_S:.0f} s of SIGTERM (killed); "
            f"log tail:\n{daemon.log_tail()}",
            pytrace=False,
        )
    if rc != 0:
        pytest.fail(
            f"canaryd exited with code {rc} after SIGTERM (expected 0); log tail:\n{daemon.log_tail()}",
            pytrace=False,
        )


# ---------------------------------------------------------------------------------------------
# Polling


def eventually(
    daemon: Canaryd,
    what: str,
    fetch: Callable[[], Any],
    check: Callable[[Any], str | None],
    timeout: float = API_TIMEOUT_S,
    show: Callable[[Any], Any] | None = None,
) -> Any:
    """Poll ``fetch`` until ``check`` returns None (no mismatch); return the snapshot that matched.

    On timeout the test fails with the last mismatch and the last snapshot seen (through ``show``,
    when given, to cut it down to what matters).
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    mismatch = "nothing fetched yet"
    while True:
        daemon.fail_if_exited()
        try:
            last = fetch()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            mismatch = f"request failed: {error!r}"
        else:
            mismatch = check(last)
            if mismatch is None:
                return last
        if time.monotonic() > deadline:
            if show is not None and last is not None:
                try:
                    last = show(last)
                except Exception as error:  # noqa: BLE001 - only a description
                    last = f"{last!r} (and showing it failed: {error!r})"
            try:
                shown = last if isinstance(last, str) else json.dumps(last, indent=1, sort_keys=True)
            except (TypeError, ValueError):
                shown = repr(last)
            if len(shown) > 12000:
                shown = shown[:12000] + "\n...(cut)"
            pytest.fail(
                f"{what}: not reached within {timeout:.0f} s.\nlast mismatch: {mismatch}\nlast seen:\n{shown}",
                pytrace=False,
            )
        time.sleep(API_POLL_S)


# ---------------------------------------------------------------------------------------------
# Views of one app in GET /api/v1/apps, to compare whole with what a test expects


def version_counts(**counts: int) -> dict[str, int]:
    """A version's expected counters: those given, and 0 for every other one."""
    unknown = set(counts) - set(VERSION_COUNTERS)
    assert not unknown, f"unknown counters {unknown}"
    return {name: counts.get(name, 0) for name in VERSION_COUNTERS}


def app_view(
    versions: dict[str, dict[str, int]],
    operations: dict[str, tuple[int, int]] | None = None,
    downstreams: dict[str, int] | None = None,
    exception_types: dict[str, int] | None = None,
    metric_series: int = 0,
) -> dict[str, Any]:
    """The expected view of one app: operations map to (requests, errors)."""
    return {
        "versions": versions,
        "operations": {op: {"requests": r, "errors": e} for op, (r, e) in (operations or {}).items()},
        "downstreams": dict(downstreams or {}),
        "exception_types": dict(exception_types or {}),
        "metric_series": metric_series,
    }


def _keyed(items: Any, key: str, fields: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(items, list):
        raise ValueError(f"{where} is not a list: {items!r}")
    out: dict[str, Any] = {}
    for item in items:
        name = item[key]
        if name in out:
            raise ValueError(f"{where} lists {key}={name!r} twice")
        out[name] = {f: item[f] for f in fields} if len(fields) > 1 else item[fields[0]]
    return out


def actual_view(app: dict[str, Any]) -> dict[str, Any]:
    """Reduce one entry of "apps" to the shape of ``app_view``; raises on a malformed entry."""
    return {
        "versions": _keyed(app["versions"], "version", VERSION_COUNTERS, "versions"),
        "operations": _keyed(app["operations"], "operation", ("requests", "errors"), "operations"),
        "downstreams": _keyed(app["downstreams"], "downstream", ("calls",), "downstreams"),
        "exception_types": _keyed(app["exception_types"], "exception_type", ("count",), "exception_types"),
        "metric_series": app["metric_series"],
    }


def find_app(apps: dict[str, Any], app: str, env: str) -> dict[str, Any] | None:
    """The one entry for (env, app); None when absent; AssertionError when listed twice."""
    matches = [a for a in apps["apps"] if a.get("app") == app and a.get("env") == env]
    assert len(matches) <= 1, f"app {app!r} in env {env!r} is listed {len(matches)} times"
    return matches[0] if matches else None


def _diff(expected: dict[str, Any], actual: dict[str, Any]) -> str | None:
    problems = []
    for section in expected:
        if expected[section] != actual.get(section):
            problems.append(f"{section}: expected {expected[section]!r}, got {actual.get(section)!r}")
    return "; ".join(problems) or None


def wait_for_app(
    daemon: Canaryd,
    app: str,
    env: str,
    expected: dict[str, Any],
    query_env: str | None = None,
) -> dict[str, Any]:
    """Poll GET /api/v1/apps until the (env, app) entry shows exactly ``expected``; return the entry."""

    def check(apps: dict[str, Any]) -> str | None:
        try:
            entry = find_app(apps, app, env)
        except AssertionError as error:
            return str(error)
        if entry is None:
            return f"no app {app!r} in env {env!r} yet"
        try:
            view = actual_view(entry)
        except (KeyError, TypeError, ValueError) as error:
            return f"malformed app entry ({error!r}): {entry!r}"
        return _diff(expected, view)

    def show(apps: dict[str, Any]) -> Any:
        matches = [a for a in apps["apps"] if a.get("app") == app and a.get("env") == env]
        if matches:
            return matches if len(matches) > 1 else matches[0]
        return {"no such app; (env, app) listed": sorted((a.get("env"), a.get("app")) for a in apps["apps"])}

    apps = eventually(
        daemon,
        f"app {app!r} in env {env!r}" + (f" (GET /api/v1/apps?env={query_env})" if query_env else ""),
        lambda: daemon.apps(env=query_env),
        check,
        show=show,
    )
    entry = find_app(apps, app, env)
    assert entry is not None
    check_timestamps(entry)
    return entry


# ---------------------------------------------------------------------------------------------
# Timestamps

_RFC3339_UTC = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?Z")


def parse_rfc3339_utc(value: Any) -> int:
    """Nanoseconds since the epoch of an RFC 3339 UTC time ending in Z (up to 9 fraction digits)."""
    assert isinstance(value, str), f"timestamp is not a string: {value!r}"
    match = _RFC3339_UTC.fullmatch(value)
    assert match, f"timestamp {value!r} is not RFC 3339 UTC like 2026-01-05T00:00:00.123456789Z"
    seconds = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    fraction = (match.group(2) or "").ljust(9, "0")
    return int(seconds.timestamp()) * 1_000_000_000 + int(fraction or "0")


def check_timestamps(entry: dict[str, Any], slack_s: float = 3600.0) -> None:
    """first_seen <= last_seen everywhere, each version inside the app's range, all near now."""
    now_ns = time.time_ns()
    slack_ns = int(slack_s * 1e9)
    app_first = parse_rfc3339_utc(entry["first_seen"])
    app_last = parse_rfc3339_utc(entry["last_seen"])
    assert app_first <= app_last, f"app first_seen after last_seen: {entry!r}"
    for when in (app_first, app_last):
        assert abs(when - now_ns) < slack_ns, f"app timestamps not within {slack_s} s of now: {entry!r}"
    for version in entry["versions"]:
        first = parse_rfc3339_utc(version["first_seen"])
        last = parse_rfc3339_utc(version["last_seen"])
        assert first <= last, f"version first_seen after last_seen: {version!r}"
        assert app_first <= first and last <= app_last, (
            f"version {version['version']!r} seen outside its app's range: {entry!r}"
        )


# ---------------------------------------------------------------------------------------------
# Prometheus text

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def prometheus_samples(text: str, metric: str) -> dict[frozenset, float]:
    """Every sample of ``metric`` in Prometheus text format, keyed by its label set."""
    samples: dict[frozenset, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match or match.group(1) != metric:
            continue
        labels_text = match.group(2) or ""
        labels = {}
        pos = 0
        while pos < len(labels_text):
            label = _LABEL.match(labels_text, pos)
            assert label, f"cannot parse labels in Prometheus line {line!r}"
            labels[label.group(1)] = label.group(2)
            pos = label.end()
        key = frozenset(labels.items())
        assert key not in samples, f"Prometheus sample listed twice: {line!r}"
        samples[key] = float(match.group(3))
    return samples


# ---------------------------------------------------------------------------------------------
# Exporters that remember what they sent


def count_items(batch: Any) -> int:
    """Spans or log records in a batch, or data points in a MetricsData."""
    resource_metrics = getattr(batch, "resource_metrics", None)
    if resource_metrics is None:
        return len(batch)
    return sum(
        len(metric.data.data_points)
        for rm in resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    )


_RECORDING_CLASSES: dict[type, type] = {}


def recording(exporter_cls: type) -> type:
    """A subclass of an OTLP exporter that records (result name, items) of every export call."""
    if exporter_cls not in _RECORDING_CLASSES:

        class Recording(exporter_cls):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.canaryd_exports: list[tuple[str, int]] = []

            def export(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
                items = count_items(batch)
                result = super().export(batch, *args, **kwargs)
                self.canaryd_exports.append((getattr(result, "name", str(result)), items))
                return result

        Recording.__name__ = Recording.__qualname__ = f"Recording{exporter_cls.__name__}"
        _RECORDING_CLASSES[exporter_cls] = Recording
    return _RECORDING_CLASSES[exporter_cls]


def assert_exported(exporter: Any, total: int, per_export: list[int] | None = None) -> None:
    """Every export call succeeded and together they carried ``total`` items.

    ``per_export`` also pins the items of each call in order (deterministic for metrics, where each
    force_flush is one collection and one export; a batch processor may split spans or logs).
    """
    exports = exporter.canaryd_exports
    failed = [e for e in exports if e[0] != "SUCCESS"]
    assert not failed, f"exports failed: {exports!r} (see the captured log for the exporter's error)"
    assert sum(items for _, items in exports) == total, (
        f"the SDK exported {exports!r}, expected {total} items in all"
    )
    if per_export is not None:
        assert [items for _, items in exports] == per_export, (
            f"the SDK exported {exports!r}, expected item counts {per_export!r}"
        )
