"""Live heap by part of the daemon, from heaptrack's collapsed stacks (`heaptrack_print -F`).

    python3 by_part.py live.txt SERIES

Each stack counts under the first part, in the order below, one of whose frames it holds (a
frame reads `function (file.rs)`): the judge's parts come before the buckets, since closing a
bucket is what feeds them, sled's before the engine's emitter, whose writes sled keeps, and
/metrics rendering last, since the engine's thread also runs under its frames.
"""

import collections
import sys

PARTS = [
    ("sled: its metrics' histograms (fixed)", ["default (metrics.rs)"]),
    ("sled: opening (fixed)", ["open (config.rs)"]),
    ("sled: records written, in its cache", ["(emit.rs)", "(writer.rs)"]),
    ("judge: sequential evidence", ["(sequential.rs)"]),
    ("judge: history", ["(history.rs)"]),
    ("judge: checks' state", ["(latency.rs)", "(errors.rs)", "(mix.rs)", "(rates.rs)"]),
    ("baselines", ["learn (engine.rs)", "(baseline.rs)"]),
    ("catalog", ["(catalog.rs)"]),
    ("open buckets and rolling windows", ["window_resource (engine.rs)", "(window.rs)"]),
    # Last: the engine's thread runs under frames of stats.rs too (its timings).
    ("/metrics rendering", ["(stats.rs)"]),
]


def main(path: str, series: float) -> None:
    by_part: collections.Counter = collections.Counter()
    total = 0
    with open(path) as stacks:
        for line in stacks:
            stack, _, bytes_ = line.rstrip().rpartition(" ")
            n = int(bytes_)
            total += n
            part = next((name for name, frames in PARTS if any(f in stack for f in frames)), "other")
            by_part[part] += n
    print(f"total {total / 1e6:.1f} MB, {series:.0f} series")
    for part, n in by_part.most_common():
        print(f"{n / 1e6:7.2f} MB {n / series:7.0f} B a series  {part}")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
