#!/usr/bin/env bash
# canaryd's whole test suite, as README.md gives it and .ci/run calls it:
#   1. every Rust test in the workspace (unit, integration, and each benchmark run once as a test),
#   2. the Python OpenTelemetry SDK tests against the built daemon,
#   3. the dashboard in headless Chromium (tests/browser), when /usr/bin/chromium is there.
# Needs cargo and python3 (3.10 or newer, with venv); installs the SDK into .venv on first use.
# The browser test needs node and npm, and installs playwright-core into tests/browser/node_modules.
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

echo "== dashboard in headless Chromium (tests/browser)"
chromium_bin=${CHROMIUM_PATH:-/usr/bin/chromium}
if [ ! -x "$chromium_bin" ]; then
    echo "skipped: install chromium (apt-get install chromium chromium-driver) to run the dashboard browser test"
elif ! command -v npm >/dev/null; then
    echo "skipped: install node and npm to run the dashboard browser test"
else
    lock_stamp=tests/browser/node_modules/.canaryd-package-lock.json
    if ! cmp -s tests/browser/package-lock.json "$lock_stamp" 2>/dev/null; then
        echo "== npm ci (tests/browser)"
        (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
        cp tests/browser/package-lock.json "$lock_stamp"
    fi
    CANARYD_TEST_BIN="$PWD/target/debug/canaryd" CHROMIUM_PATH="$chromium_bin" \
        CANARYD_BROWSER_OUT="$PWD/target/browser-test" node tests/browser/dashboard.test.mjs
fi
