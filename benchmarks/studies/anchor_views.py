"""Anchored fusion with several deep views: the ``hybrid_all`` preset, compared on one data set.

Computes the similarities of SIFT, upright deep features and deep features at four rotations
as ``asmkit eval DATA --preset <member>`` does (cached features and codebooks), and deep's
scores of the queries turned by quarter turns as ``--preset deep_qrot`` does, and evaluates
the anchored fusions over them (docs/robustness.md)::

    PYTHONPATH=src python -m benchmarks.studies.anchor_views bench_out/robust_large bench_out/robust_large_views

Rules (``z``: a member's ``mutual_max`` standardisation, the smaller of its row and column
z-scores, :mod:`asmkit.hybrid`; T: the threshold; every rule adds the larger of its two
terms, as ``anchored_max`` does):

- ``sift + deep`` / ``sift + deep_rot``: ``anchored_max`` of the pair (the second at T = 3
  is the ``hybrid_anchored`` preset).
- ``pooled-T``: sift's ``z`` plus ``max(max(z_deep, z_deep_rot) - T, 0)``: the two deep
  views pooled by their maximum, then thresholded (``anchored_max`` with three members;
  ``pooled-3`` is the ``hybrid_all`` preset).
- ``summed-T``: sift's ``z`` plus ``max(z_deep - T, 0) + max(z_deep_rot - T, 0)``: the
  views' excesses summed.
- ``mutual_max``: the three members' ``mutual_max``.
- ``sift + turned views``: sift's ``z`` plus ``max(max_r z_deep,r - 3, 0)``, where
  ``z_deep,r`` is deep's score of the query turned by r (0, 90, 180, 270 degrees: the
  ``deep_qrot`` preset's rows) against deep's upright database, each standardised with
  deep's own column statistics: ``deep_qrot`` as an ``anchored_max`` member whose four
  rotations are four views, and a database extracted once.
- ``sift + deep_qrot``: as ``sift + deep``, with ``deep_qrot``'s best-rotation matrix
  standardised with deep's column statistics.

Prints per rule the mAP, the per-family mAP and the families where the rule is below the
best of the three members, and writes them to ``OUT/views.json``. A family's mAP moves by a
whole query's AP, so each rule is also compared query by query: per family, against the
member with the best mAP there, the number of queries whose AP is lower and higher
(``queries_by_family``; printed summed over the families), to tell a rule that trails a
member from one that loses a query here and gains one there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from asmkit.config import load_config
from asmkit.evaluate import average_precision, load_ground_truth
from asmkit.features.factory import query_turns
from asmkit.hybrid import fuse
from asmkit.index import Index
from asmkit.params import preset_table

from .robust_fusion import dataset_matrix, member_matrix, rule_metrics

MEMBERS = ("sift", "deep", "deep_rot")
THRESHOLDS = (2, 3, 4, 5)
#: The turns of the query beside upright: the ``deep_qrot`` preset's.
TURNS = query_turns(preset_table("deep_qrot")["features"])


def turned_rows(data: str) -> list[np.ndarray]:
    """float64 [Q, N] per turn of :data:`TURNS`: deep's scores of the queries turned by it
    against deep's upright database (``asmkit eval DATA --preset deep_qrot``'s rows;
    turned features cached beside deep's)."""
    gt = load_ground_truth(data)
    out = dataset_matrix(data, "deep")
    try:
        index = Index(out.codebook, load_config("deep").params)
        index.add(out.db)
        return [index.similarity_matrix(out.turned(gt.queries, r)).astype(np.float64) for r in TURNS]
    finally:
        out.store.close()


def rules(
    mats: dict[str, np.ndarray], columns: dict[str, np.ndarray], turned: list[np.ndarray]
) -> dict[str, np.ndarray]:
    """Every fused ``[Q, N]`` matrix of the study, from the three members' matrices, their
    column statistics (float64 ``[2, N]`` each) and deep's turned query rows
    (:func:`turned_rows`)."""
    # One member's mutual_max score is twice its own standardised score.
    z = {m: fuse([mats[m]], "mutual_max", [columns[m]]).astype(np.float64) / 2 for m in MEMBERS}

    def anchored(extra: np.ndarray) -> np.ndarray:
        return z["sift"] + extra + np.maximum(z["sift"], extra)

    out = {
        f"sift + {m}": fuse([mats["sift"], mats[m]], "anchored_max", [columns["sift"], columns[m]])
        for m in ("deep", "deep_rot")
    }
    for t in THRESHOLDS:
        out[f"pooled-{t}"] = anchored(np.maximum(np.maximum(z["deep"], z["deep_rot"]) - t, 0))
        out[f"summed-{t}"] = anchored(np.maximum(z["deep"] - t, 0) + np.maximum(z["deep_rot"] - t, 0))
    out["mutual_max"] = fuse([mats[m] for m in MEMBERS], "mutual_max", [columns[m] for m in MEMBERS])
    views = [z["deep"]] + [fuse([t], "mutual_max", [columns["deep"]]).astype(np.float64) / 2 for t in turned]
    out["sift + turned views"] = anchored(np.maximum(np.maximum.reduce(views) - 3, 0))
    out["sift + deep_qrot"] = fuse(
        [mats["sift"], np.maximum.reduce([mats["deep"], *turned])], "anchored_max", [columns["sift"], columns["deep"]]
    )
    return out


def family_aps(matrix: np.ndarray, gt) -> dict[str, np.ndarray]:
    """float64 [Q] per family: each query's AP counting only that family's positives
    (:meth:`asmkit.evaluate.GroundTruth.family`)."""
    ranks = np.argsort(-matrix, axis=1, kind="stable")
    out = {}
    for family in gt.families:
        positives, junk = gt.family(family)
        out[family] = np.array([average_precision(r, p, j) for r, p, j in zip(ranks, positives, junk)])
    return out


def query_counts(
    aps: dict[str, dict[str, np.ndarray]], rule: str, family_map: dict[str, dict[str, float]]
) -> dict[str, list[int]]:
    """Per family, [queries below, queries above]: the rule's per-query APs against those
    of the member with the best mAP in that family (:func:`family_aps` per rule)."""
    counts = {}
    for family, ap in aps[rule].items():
        best = aps[max(MEMBERS, key=lambda m: family_map[m][family])][family]
        counts[family] = [int(np.sum(ap < best - 1e-9)), int(np.sum(ap > best + 1e-9))]
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="data set folder (images/ + gt.json)")
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    gt = load_ground_truth(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    mats, columns = {}, {}
    for m in MEMBERS:
        matrix, columns[m], _ = member_matrix(args.data, m)
        mats[m] = matrix.astype(np.float64)
    fused = rules(mats, columns, turned_rows(args.data))
    matrices = {**mats, **fused}
    results = {rule: rule_metrics(matrix, gt) for rule, matrix in matrices.items()}
    aps = {rule: family_aps(matrix, gt) for rule, matrix in matrices.items()} if gt.families else {}
    for rule, row in results.items():
        below = (
            []
            if rule in MEMBERS
            else [
                f"{f} {v:.3f} < {max(results[m]['families'][f] for m in MEMBERS):.3f}"
                for f, v in row.get("families", {}).items()
                if v < max(results[m]["families"][f] for m in MEMBERS) - 1e-9
            ]
        )
        row["below_members"] = below
        if aps and rule not in MEMBERS:
            row["queries_by_family"] = query_counts(aps, rule, {m: results[m]["families"] for m in MEMBERS})
        print(f"{rule:18s}", " ".join(f"{k} {v:.4f}" for k, v in row.items() if k in ("map", "ns_score")), end=" ")
        print(" ".join(f"{f} {v:.3f}" for f, v in row.get("families", {}).items()), end=" ")
        if rule in MEMBERS or "families" not in row:
            print()
        else:
            print(("| below: " + ", ".join(below)) if below else "| at or above every member", end=" ")
            counts = row.get("queries_by_family", {}).values()
            print(f"| queries below / above: {sum(b for b, _ in counts)} / {sum(a for _, a in counts)}")
    (args.out / "views.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
