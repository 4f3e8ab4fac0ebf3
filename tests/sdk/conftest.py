"""Fixtures for the OpenTelemetry Python SDK tests against the real canaryd binary.

The daemon is started once per test session on port 0 (every listener), and its chosen addresses are
read from ``<data dir>/addrs.json``. Every test uses its own service names, so tests share the
daemon without seeing each other's data. Helpers live in sdk_harness.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid

import pytest

from sdk_harness import (
    READY_POLL_S,
    READY_TIMEOUT_S,
    SHUTDOWN_TIMEOUT_S,
    Canaryd,
    canaryd_binary,
    log_tail,
)


@pytest.fixture(scope="session")
def canaryd(tmp_path_factory: pytest.TempPathFactory):
    binary = canaryd_binary()
    base = tmp_path_factory.mktemp("canaryd")
    data_dir = base / "data"
    data_dir.mkdir()
    log_path = base / "canaryd.log"
    addrs_path = data_dir / "addrs.json"
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

    daemon = Canaryd(
        proc=proc,
        data_dir=data_dir,
        log_path=log_path,
        otlp_grpc=addrs["otlp_grpc"],
        otlp_http=addrs["otlp_http"],
        http=addrs["http"],
    )
    try:
        yield daemon
    finally:
        # Part of the contract: SIGTERM drains and exits 0.
        rc = proc.poll()
        if rc is not None:
            pytest.fail(
                f"canaryd had already exited (code {rc}) before SIGTERM; log tail:\n{log_tail(log_path)}",
                pytrace=False,
            )
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop_hard()
            pytest.fail(
                f"canaryd did not exit within {SHUTDOWN_TIMEOUT_S:.0f} s of SIGTERM (killed); "
                f"log tail:\n{log_tail(log_path)}",
                pytrace=False,
            )
        if rc != 0:
            pytest.fail(
                f"canaryd exited with code {rc} after SIGTERM (expected 0); log tail:\n{log_tail(log_path)}",
                pytrace=False,
            )


@pytest.fixture
def token() -> str:
    """A short random suffix, so that every test names its own services."""
    return uuid.uuid4().hex[:8]
