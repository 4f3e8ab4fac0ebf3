#!/usr/bin/env bash
# Heap profile of the series bench's daemon: what is live, by part of the daemon, at the moment
# the bench reads RSS (BENCHMARKS.md, "Memory and disk per series"). Needs heaptrack (Debian's
# package) and runs the daemon built with the system allocator, which heaptrack can see.
#   bash benches/heap/profile.sh [series, default 10000]
set -euo pipefail
cd "$(dirname "$0")/../.."
series=${1:-10000}
out=$(mktemp -d)
cargo bench --bench series --no-run --features system-allocator 2>&1 | tail -1
cp target/release/canaryd "$out/canaryd"
bench=$(cargo bench --bench series --no-run --features system-allocator --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="series" and m.get("executable"): print(m["executable"])')
preload=$(dirname "$(command -v heaptrack)")/../lib/heaptrack/libheaptrack_preload.so
# The bench kills the daemon once it has read it (SERIES_NO_RESTART): what was live then is
# what heaptrack reports as never freed.
cat > "$out/wrap.sh" <<WRAP
#!/usr/bin/env bash
LD_PRELOAD=$preload DUMP_HEAPTRACK_OUTPUT=$out/live.raw exec "$out/canaryd" "\$@"
WRAP
chmod +x "$out/wrap.sh"
row=$(CANARYD_BIN="$out/wrap.sh" SERIES_NO_RESTART=1 SERIES_SIZES="$series" "$bench" --bench | tail -1)
echo "$row"
held=$(awk '{print $1}' <<<"$row")
"$(dirname "$preload")/libexec/heaptrack_interpret" < "$out/live.raw" | gzip > "$out/live.gz"
rm "$out/live.raw"
heaptrack_print -f "$out/live.gz" --flamegraph-cost-type leaked -F "$out/live.txt" > /dev/null
python3 benches/heap/by_part.py "$out/live.txt" "$held"
echo "the profile: $out/live.gz (heaptrack_print or heaptrack_gui read it)"
