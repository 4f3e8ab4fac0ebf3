#!/usr/bin/env bash
# canaryd's whole test suite, as README.md gives it and .ci/run calls it:
#   1. every Rust test in the workspace (unit, integration, and each benchmark run once as a test),
#   2. the Python OpenTelemetry SDK tests against the built daemon.
# Needs cargo and python3 (3.10 or newer, with venv); installs the SDK into .venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${CANARYD_TEST_VENV:-.venv}
stamp="$venv/.requirements.txt"
if ! cmp -s tests/requirements.txt "$stamp" 2>/dev/null; then
    echo "== installing the Python test requirements into $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
    cp tests/requirements.txt "$stamp"
fi

echo "== cargo test (workspace, all targets)"
cargo test --workspace --all-targets --locked

echo "== OpenTelemetry SDK tests (pytest)"
CANARYD_TEST_BIN="$PWD/target/debug/canaryd" "$venv/bin/python" -m pytest -q tests/sdk
