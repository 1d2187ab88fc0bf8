"""Fusion rules for the hybrid preset, compared on one robustness set (docs/robustness.md).

Computes all-vs-all scores of the hybrid preset's members once (``compute_scores``, which
keeps each member's matrix) and evaluates each fusion rule on the query rows::

    PYTHONPATH=src python -m benchmarks.studies.robust_fusion /tmp/rbs /tmp/rbs_fusion

Prints and writes ``OUT/fusion.json``: mAP and per-family mAP of each member and rule.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from asmkit.evaluate import evaluate, load_ground_truth
from asmkit.hybrid import fuse
from asmkit.pipeline import compute_scores


def _standardise(m: np.ndarray) -> np.ndarray:
    return (m - m.mean(1, keepdims=True)) / m.std(1, keepdims=True)


def main(data: str, out: str) -> None:
    gt = load_ground_truth(data)
    Path(out).mkdir(parents=True, exist_ok=True)
    res = compute_scores(Path(data) / "images", out=Path(out) / "hybrid.npy", preset="hybrid")
    names = Path(res["names"]).read_text().split()
    pos = {"images/" + n: i for i, n in enumerate(names)}
    qi = np.array([pos[q] for q in gt.queries])
    di = np.array([pos[n] for n in gt.images])
    members = {m: np.load(path)[np.ix_(qi, di)] for m, path in res["members"].items()}
    a, b = members.values()
    rules = {
        **members,
        "score": fuse([a, b], "score"),
        "rank": fuse([a, b], "rank"),
        "max-standardised": np.maximum(_standardise(a), _standardise(b)),
    }
    results = {}
    for rule, matrix in rules.items():
        metrics = evaluate(np.argsort(-matrix, axis=1, kind="stable"), gt)
        results[rule] = {"map": metrics["map"], "families": {f: v["map"] for f, v in metrics["families"].items()}}
        print(rule, round(metrics["map"], 3), {f: round(v, 3) for f, v in results[rule]["families"].items()})
    (Path(out) / "fusion.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
