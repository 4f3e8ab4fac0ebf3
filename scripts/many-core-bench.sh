#!/usr/bin/env bash
# The ingest scaling sweeps (the default spans over gRPC and HTTP, the 600-byte ones, and the
# receivers summing at any load), time to act under load, the one writer's cost a span on a busy
# app and on the load bench's workload (its ceiling on that machine's cores) and an A/A
# calibration run, for a many-core
# machine that has no Rust toolchain (issue 16, item 5; DEVELOPERS.md "Benchmarks on a many-core
# machine").
#
#   scripts/many-core-bench.sh pack DIR   # here: release build, stripped binaries into DIR
#   DIR/many-core-bench.sh run OUT        # there: the benchmarks, logs into OUT
#
# RUN_SECONDS (default 5) is each closed-loop run; THREADS (default 1,2,4,8,16) the daemon thread
# counts of the first sweep, MORE_THREADS (default 1,8: issue 16's aim is at 8) those of the other
# two; CALIBRATION_SEEDS (default 150) the A/A seeds per condition, CALIBRATION_BUDGET (default
# 180) the seconds the calibration may take before it is cut (each condition's row is printed as
# it finishes).
set -euo pipefail

verb=${1:-}
where=${2:-}
if [[ -z "$verb" || -z "$where" ]]; then
    echo "usage: $0 pack DIR | run OUT" >&2
    exit 2
fi

newest() { ls -t "$@" 2>/dev/null | grep -v '\.d$' | head -1; }

case "$verb" in
pack)
    cd "$(dirname "$0")/.."
    cargo build --release --bin canaryd
    cargo bench --bench load --no-run
    cargo bench --bench engine --no-run
    cargo bench -p canaryd-engine --bench calibration --no-run
    mkdir -p "$where"
    strip -o "$where/canaryd" target/release/canaryd
    strip -o "$where/load" "$(newest target/release/deps/load-*)"
    strip -o "$where/engine" "$(newest target/release/deps/engine-*)"
    strip -o "$where/calibration" "$(newest target/release/deps/calibration-*)"
    cp "$0" "$where/many-core-bench.sh"
    echo "packed into $where: copy it to the machine and run $where/many-core-bench.sh run OUT"
    ;;
run)
    here=$(cd "$(dirname "$0")" && pwd)
    mkdir -p "$where"
    export CANARYD_BIN="$here/canaryd" RUST_BACKTRACE=0
    echo "cores: $(nproc); $(grep -m1 'model name' /proc/cpuinfo || true)" | tee "$where/machine.txt"
    LOAD_SECONDS=${RUN_SECONDS:-5} LOAD_THREADS=${THREADS:-1,2,4,8,16} LOAD_TRANSPORTS=grpc,http \
        "$here/load" --bench 2>&1 | tee "$where/scaling.log" | grep -E '^threads +[0-9]|^== decode'
    # The 600-byte spans of agents' instrumentations, gRPC only.
    LOAD_DETAIL=sdk LOAD_SECONDS=${RUN_SECONDS:-5} LOAD_THREADS=${MORE_THREADS:-1,8} LOAD_TRANSPORTS=grpc \
        "$here/load" --bench 2>&1 | tee "$where/scaling-sdk.log" | grep -E '^threads +[0-9]|^== decode'
    # The receivers summing what they read at any load, not only once the engine's thread is
    # busy over half the time: what that takes off the one writer, at each thread count.
    CANARYD_RECEIVERS_SUM_FROM_ENGINE_BUSY=0 LOAD_SECONDS=${RUN_SECONDS:-5} \
        LOAD_THREADS=${MORE_THREADS:-1,8} LOAD_TRANSPORTS=grpc \
        "$here/load" --bench 2>&1 | tee "$where/scaling-summing.log" | grep -E '^threads +[0-9]|^== decode'
    LOAD_SECONDS=${RUN_SECONDS:-5} LOAD_TRANSPORTS=grpc \
        "$here/load" --bench 2>&1 | tee "$where/act.log" | tail -14
    # The engine's thread alone (criterion, one core), on a busy app and on the load bench's own
    # workload added and merged: its cost a span here against the receivers' in the sweeps above
    # says how many receiving threads one writer keeps up with on this machine. Criterion writes
    # its reports under OUT.
    (cd "$where" && "$here/engine" --bench 'ingest_busy|load_' 2>&1 | tee engine.log | grep -E 'time:|thrpt:')
    CALIBRATION_SEEDS=${CALIBRATION_SEEDS:-150} CALIBRATION_DETECT_SEEDS=0 CALIBRATION_ANOMALY_SEEDS=0 \
        timeout "${CALIBRATION_BUDGET:-180}" "$here/calibration" --bench 2>&1 \
        | tee "$where/calibration.log" | grep -E '^\|' || true
    ;;
*)
    echo "usage: $0 pack DIR | run OUT" >&2
    exit 2
    ;;
esac
