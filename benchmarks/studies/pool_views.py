"""The views study pooled over several data sets: each rule's mAP per family over the queries
of every set, as if the sets were one benchmark (docs/robustness.md)::

    PYTHONPATH=src python -m benchmarks.studies.pool_views bench_out/robust_small bench_out/robust_full \
        bench_out/robust_large bench_out/robust_large_s1 ...

Reads ``DATA_views/views.json`` beside each data folder (written by
:mod:`benchmarks.studies.anchor_views`) and the folder's ``gt.json``. A family's pooled mAP
weights each set's mAP by the number of its queries that have a positive of that family,
which is the mean AP over all those queries. Prints per rule the pooled mAP, the pooled mAP
per family and the families where it is below the best of the members.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from asmkit.evaluate import load_ground_truth

from .anchor_views import MEMBERS


def pooled(sets: list[tuple[dict, dict[str, int], int]]) -> dict[str, dict]:
    """Per rule, ``{"map", "families"}`` pooled over ``sets``: per set its views.json
    results, its queries per family and its number of queries."""
    out = {}
    for rule in sets[0][0]:
        total = sum(n for _, _, n in sets)
        row = {"map": sum(results[rule]["map"] * n for results, _, n in sets) / total, "families": {}}
        for family in sets[0][1]:
            weight = sum(counts[family] for _, counts, _ in sets)
            row["families"][family] = (
                sum(results[rule]["families"][family] * counts[family] for results, counts, _ in sets) / weight
            )
        out[rule] = row
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+", help="data set folders, each with a DATA_views/views.json beside it")
    args = parser.parse_args(argv)
    sets = []
    for data in args.data:
        gt = load_ground_truth(data)
        results = json.loads((Path(f"{str(data).rstrip('/')}_views") / "views.json").read_text())
        counts = {f: sum(len(p) > 0 for p in positives) for f, positives in gt.families.items()}
        sets.append((results, counts, len(gt.queries)))
    rows = pooled(sets)
    for rule, row in rows.items():
        fams = row["families"]
        below = [f for f, v in fams.items() if v < max(rows[m]["families"][f] for m in MEMBERS) - 1e-12]
        print(f"{rule:20s} map {row['map']:.4f}", " ".join(f"{f} {v:.4f}" for f, v in fams.items()), end=" ")
        print("" if rule in MEMBERS else ("| below: " + ", ".join(below) if below else "| at or above every member"))


if __name__ == "__main__":
    main()
