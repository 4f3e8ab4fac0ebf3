#!/usr/bin/env python3
"""Chooses canaryd's anomaly settings on NAB by leave-one-category-out, and scores them honestly.

Every combination of the grid below (daemon settings, passed as CANARYD_* variables) is run
through `canaryd-lab nab`, which runs the daemon's engine with the daemon's settings. For each of
NAB's categories in turn, the combination that scores best (standard profile) on the other
categories is chosen, and the held-out category is scored with it: those held-out results,
pooled, are scored by NAB's own scorer (score.py) as one set. That out-of-category figure says
how the choice carries to data it was not made on; the in-sample figure (the best combination on
every category) says how well the settings can fit. The grid's first combination is scored too.

Usage:
  scripts/nab_loco.py --lab target/release/canaryd-lab --nab ../shared/nab --out /tmp/nab-loco

Needs only Python 3's standard library; score.py is read from the NAB folder.
"""
import argparse
import csv
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys

# The settings searched, with the values tried. The novelty gate (anomaly_novelty_half_life_secs)
# stays at its default (off) because the daemon cannot bear it, whatever NAB says: it would hold
# back a second, smaller incident on a feature for days after a large one. `--with-off` searches
# it too, to show what it would be worth on NAB.
GRID = {
    "baseline_half_life_secs": [1800, 7200, 21600],
    "baseline_range_width": [0.0, 0.03, 0.06, 0.12],
    "anomaly_detect_score": [3.0, 4.0],
    "anomaly_detect_windows": [2, 1],
    "anomaly_resolve_windows": [3, 8],
}
OFF_IN_THE_DAEMON = {
    "anomaly_novelty_half_life_secs": [0, 86400],
}


def load_scorer(nab):
    spec = importlib.util.spec_from_file_location("nab_score", os.path.join(nab, "score.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Corpus:
    """NAB's files, labels and per-row weights, computed once for every combination."""

    def __init__(self, scorer, nab):
        import json

        self.scorer = scorer
        self.data = os.path.join(nab, "data")
        labels = json.load(open(os.path.join(nab, "windows.json")))
        self.files = sorted(
            os.path.join(category, name)
            for category in os.listdir(self.data)
            if os.path.isdir(os.path.join(self.data, category))
            for name in os.listdir(os.path.join(self.data, category))
            if name.endswith(".csv")
        )
        self.categories = sorted({f.split(os.sep)[0] for f in self.files})
        self.rows = {}
        self.lengths = {}
        for rel in self.files:
            with open(os.path.join(self.data, rel), newline="") as handle:
                timestamps = [scorer.parse_ts(r["timestamp"]) for r in csv.DictReader(handle)]
            windows = [(scorer.parse_ts(a), scorer.parse_ts(b)) for a, b in labels.get(rel, [])]
            self.lengths[rel] = len(timestamps)
            self.rows[rel] = {
                name: scorer.weighted_rows(timestamps, windows, profile, rel)
                for name, profile in scorer.PROFILES.items()
            }

    def score(self, results, categories, profile="standard"):
        """NAB's normalised score of the results folder over `categories` only."""
        points, keys = [], set()
        for rel in self.files:
            if rel.split(os.sep)[0] not in categories:
                continue
            scores, problem = self.scorer.load_scores(os.path.join(results, rel), self.lengths[rel])
            if problem:
                raise SystemExit("%s: %s" % (rel, problem))
            for i, (weight, key, probationary) in enumerate(self.rows[rel][profile]):
                if key is not None:
                    keys.add(key)
                if not probationary:
                    points.append((scores[i], weight, key))
        weights = self.scorer.PROFILES[profile]
        _, raw = self.scorer.best_threshold(points, weights, keys)
        if not keys:
            # A category without anomalies (artificialNoAnomaly) has no score of its own; it
            # still weighs in a pooled score through its false alarms.
            return float("nan")
        null, perfect = -weights["fn"] * len(keys), weights["tp"] * len(keys)
        return 100.0 * (raw - null) / (perfect - null)


def run_lab(lab, data, out, combination):
    env = dict(os.environ)
    for key, value in combination.items():
        env["CANARYD_" + key.upper()] = str(value)
    subprocess.run([lab, "nab", "--data", data, "--out", out], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def describe(combination):
    return ", ".join("%s=%s" % (k, v) for k, v in combination.items())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lab", required=True, help="the canaryd-lab binary")
    parser.add_argument("--nab", required=True, help="the NAB folder (data/, windows.json, score.py)")
    parser.add_argument("--out", required=True, help="a scratch folder (emptied)")
    parser.add_argument("--with-off", action="store_true",
                        help="also search the settings the daemon keeps off")
    args = parser.parse_args()
    grid = dict(GRID, **OFF_IN_THE_DAEMON) if args.with_off else GRID

    scorer = load_scorer(args.nab)
    corpus = Corpus(scorer, args.nab)
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)

    combinations = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    # by_fold[c][i]: combination i's score on every category but c; full[i]: on all of them.
    by_fold = {c: [] for c in corpus.categories}
    full = []
    for i, combination in enumerate(combinations):
        results = os.path.join(args.out, "grid", str(i))
        run_lab(args.lab, corpus.data, results, combination)
        for held_out in corpus.categories:
            training = [c for c in corpus.categories if c != held_out]
            by_fold[held_out].append(corpus.score(results, training))
        full.append(corpus.score(results, corpus.categories))
        print("%3d/%d  in-sample %6.2f  %s" % (i + 1, len(combinations), full[-1],
                                               describe(combination)), file=sys.stderr)

    # Ties go to the earlier combination, in the grid's order: a choice that does not depend on
    # how Python happens to order equal scores.
    def best(scores):
        return max(range(len(scores)), key=lambda i: (scores[i], -i))

    pooled = os.path.join(args.out, "out-of-category")
    print("| held-out category | chosen on the other four | its score there | held-out score |")
    print("|---|---|---|---|")
    for held_out in corpus.categories:
        chosen = best(by_fold[held_out])
        source = os.path.join(args.out, "grid", str(chosen), held_out)
        shutil.copytree(source, os.path.join(pooled, held_out))
        alone = corpus.score(os.path.join(args.out, "grid", str(chosen)), [held_out])
        print("| %s | %s | %.2f | %.2f |" % (held_out, describe(combinations[chosen]),
                                             by_fold[held_out][chosen], alone))
    in_sample = best(full)
    print()
    print("in-sample best: %s" % describe(combinations[in_sample]))
    print("the first combination: %s" % describe(combinations[0]))
    print()
    for title, results in (("out-of-category (pooled held-out results)", pooled),
                           ("in-sample best", os.path.join(args.out, "grid", str(in_sample))),
                           ("the first combination", os.path.join(args.out, "grid", "0"))):
        print("## %s: score.py" % title)
        sys.stdout.flush()
        subprocess.run([sys.executable, os.path.join(args.nab, "score.py"), "--data", corpus.data,
                        "--labels", os.path.join(args.nab, "windows.json"), "--results", results],
                       check=True)
        print()


if __name__ == "__main__":
    main()
