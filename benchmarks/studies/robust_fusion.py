"""Fusion rules for the hybrid preset, compared on one data set (docs/robustness.md).

Computes each member's query x database similarities once, exactly as ``asmkit eval DATA
--preset <member>`` does (cached features and codebook, codebook trained on the database
images), and evaluates every fusion rule on them::

    PYTHONPATH=src python -m benchmarks.studies.robust_fusion bench_out/robust_small bench_out/robust_small_fusion
    PYTHONPATH=src python -m benchmarks.studies.robust_fusion ../shared/datasets/ukbench2000 \\
        bench_out/ukbench_fusion --members sift deep

Prints and writes ``OUT/fusion.json``: mAP (and per-family mAP where the ground truth has
families, N-S where it has groups) of each member and rule, and each member's matrix as
``OUT/<member>.npy`` and its column statistics as ``OUT/<member>.columns.npy``.

Rules (each row is one query over the database; ``z`` standardises a row by its mean and
standard deviation, ``robust`` by its median and median absolute deviation):

- ``score``, ``rank``, ``robust``, ``mutual_max``: :func:`asmkit.hybrid.fuse` (the shipped
  fusions; ``mutual_max`` with each member's column statistics over the database, as
  ``asmkit eval`` computes them).
- ``mutual``: ``mutual_max`` without the added maximum (the sum of the members' scores,
  each the smaller of its row and column standardisation).
- ``s-norm``: ``mutual_max`` with the sum of the row and the column standardisation in
  place of the smaller (symmetric score normalisation, as in speaker verification).
- ``csls-K``: ``robust_max`` of scores minus, per database image, the mean of its K best
  scores against the column sample (cross-domain similarity local scaling, Conneau et al.,
  ICLR 2018: a hubness correction).
- ``max-z``, ``max-robust``: per candidate, the largest member's standardised score.
- ``robust + max-robust``: the robust sum plus that largest score (the confident member
  counted twice); ``lse-robust``: log(exp(z_a) + exp(z_b)) of the robust scores, a soft
  maximum.
- ``minmax``: rows scaled to [0, 1], summed.
- ``tail-z-K``: standardised by the mean and deviation of the scores below the top K.
- ``qalf-z``, ``qalf-minmax``, ``qalf-robust``: query-adaptive late fusion (Zheng et al.,
  CVPR 2015): each member weighted per query by the inverse area under its sorted score
  curve (top result left out, the rest min-max normalised): a curve that drops sharply
  after a few results is a confident one.
- ``topz-z``, ``margin-z``: each member weighted per query by its best standardised score
  other than the top one, or by that minus its tenth after it.
- ``z + relu(z_b - T)``: the first member's standardised scores, plus the second member's
  only where they exceed T; ``thresholded-z-T``: each member's standardised scores where
  they exceed T, else 0 (sum).
- ``z_a + W z_b``: the second member weighted down.
- ``anchored-T``: the first member's ``mutual_max`` score (the smaller of its row and
  column standardisation), plus the second member's only where it exceeds T (the first
  member anchors the ranking; the second adds only what it is confident of);
  ``anchored-max-T``: that sum plus the larger of the two terms, as ``mutual_max`` adds
  (the ``anchored_max`` fusion at T = 3). ``row-anchored-max-T``: the same with the first
  member's row standardisation alone (``robust``), so that its own ranking stands unless
  the second member is confident.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np

from asmkit import pipeline
from asmkit.config import load_config
from asmkit.evaluate import evaluate, load_ground_truth
from asmkit.hybrid import MAD_TO_STD, column_sample, column_stats, fuse


def _z(m: np.ndarray) -> np.ndarray:
    return (m - m.mean(1, keepdims=True)) / m.std(1, keepdims=True)


def _robust(m: np.ndarray) -> np.ndarray:
    med = np.median(m, 1, keepdims=True)
    return (m - med) / np.median(np.abs(m - med), 1, keepdims=True)


def _minmax(m: np.ndarray) -> np.ndarray:
    lo, hi = m.min(1, keepdims=True), m.max(1, keepdims=True)
    return (m - lo) / (hi - lo)


def _tail_z(m: np.ndarray, k: int) -> np.ndarray:
    tail = -np.sort(-m, 1)[:, k:]
    return (m - tail.mean(1, keepdims=True)) / tail.std(1, keepdims=True)


def _auc_weight(m: np.ndarray) -> np.ndarray:
    # The top result is left out: with the query in the database it is the query itself.
    curve = _minmax(-np.sort(-m, 1)[:, 1:])
    return 1.0 / curve.mean(1, keepdims=True)


def _nth_z(m: np.ndarray, n: int) -> np.ndarray:
    return -np.sort(-_z(m), 1)[:, n : n + 1]


def _csls(m: np.ndarray, sample_rows: np.ndarray, k: int) -> np.ndarray:
    rows = sample_rows.astype(np.float64)
    # Self-matches left out, as column_stats does.
    rows[np.arange(len(rows)), column_sample(rows.shape[1])] = -np.inf
    return m - (-np.sort(-rows, axis=0)[: min(k, len(rows) - 1)]).mean(axis=0)


def rules(a: np.ndarray, b: np.ndarray, columns: list[np.ndarray], samples: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Every fused ``[Q, N]`` matrix of the study, from two members' matrices, their
    column statistics (float64 [2, N] each) and the column sample's rows ([S, N] each)."""
    row = [_robust(m) / MAD_TO_STD for m in (a, b)]
    col = [(m - c[0]) / c[1] for m, c in zip((a, b), columns)]
    mutual = [np.minimum(r, c) for r, c in zip(row, col)]
    snorm = [r + c for r, c in zip(row, col)]

    def weighted(weight: Callable, norm: Callable) -> np.ndarray:
        return weight(a) * norm(a) + weight(b) * norm(b)

    out = {
        "score": fuse([a, b], "score"),
        "rank": fuse([a, b], "rank"),
        "robust": fuse([a, b], "robust"),
        "mutual_max": fuse([a, b], "mutual_max", columns),
        "mutual": mutual[0] + mutual[1],
        "s-norm": snorm[0] + snorm[1] + np.maximum(*snorm),
        **{f"csls-{k}": fuse([_csls(m, rows, k) for m, rows in zip((a, b), samples)], "robust_max") for k in (20, 100)},
        "max-z": np.maximum(_z(a), _z(b)),
        "max-robust": np.maximum(_robust(a), _robust(b)),
        "robust + max-robust": _robust(a) + _robust(b) + np.maximum(_robust(a), _robust(b)),
        "lse-robust": np.logaddexp(_robust(a), _robust(b)),
        "minmax": _minmax(a) + _minmax(b),
        **{f"tail-z-{k}": _tail_z(a, k) + _tail_z(b, k) for k in (5, 10, 20, 50)},
        "qalf-z": weighted(_auc_weight, _z),
        "qalf-minmax": weighted(_auc_weight, _minmax),
        "qalf-robust": weighted(_auc_weight, _robust),
        "topz-z": weighted(lambda m: _nth_z(m, 1), _z),
        "margin-z": weighted(lambda m: _nth_z(m, 1) - _nth_z(m, 11), _z),
        **{f"z + relu(z_b - {t})": _z(a) + np.maximum(_z(b) - t, 0) for t in (1, 2)},
        **{f"thresholded-z-{t}": np.where(_z(a) > t, _z(a), 0) + np.where(_z(b) > t, _z(b), 0) for t in (1, 2)},
        **{f"z_a + {w} z_b": _z(a) + w * _z(b) for w in (0.25, 0.5)},
    }
    # One member's mutual_max score is twice its own standardised score.
    za, zb = (fuse([m], "mutual_max", [c]).astype(np.float64) / 2 for m, c in zip((a, b), columns))
    for t in (1, 3):
        out[f"anchored-{t}"] = za + np.maximum(zb - t, 0)
        out[f"anchored-max-{t}"] = out[f"anchored-{t}"] + np.maximum(za, np.maximum(zb - t, 0))
    ra = fuse([a], "robust").astype(np.float64)
    for t in (2, 3):
        extra = np.maximum(zb - t, 0)
        out[f"row-anchored-max-{t}"] = ra + extra + np.maximum(ra, extra)
    return out


def dataset_matrix(data: str, preset: str):
    """``asmkit eval DATA --preset PRESET``'s features, codebook and similarities (the
    pipeline's ``_DatasetFeatures``, cached features reused; the caller closes ``store``)."""
    return pipeline._dataset_matrix(
        load_ground_truth(data),
        load_config(preset),
        data=data,
        codebook=None,
        model=None,
        cache=None,
        workers=None,
        device="cpu",
        regions=None,
        whole_image=True,
        ray=None,
        ray_cpus=None,
    )


def rule_metrics(matrix: np.ndarray, gt) -> dict:
    """mAP of a ``[Q, N]`` similarity matrix's rankings, N-S and per-family mAP where the
    ground truth has them."""
    metrics = evaluate(np.argsort(-matrix, axis=1, kind="stable"), gt)
    row = {"map": metrics["map"]}
    if "ns_score" in metrics:
        row["ns_score"] = metrics["ns_score"]
    if "families" in metrics:
        row["families"] = {f: v["map"] for f, v in metrics["families"].items()}
    return row


def member_matrix(data: str, preset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 [Q, N]: ``asmkit eval DATA --preset PRESET``'s similarities; float64
    [2, N]: the column statistics ``asmkit eval`` gives the member in a ``mutual_max``
    hybrid; float32 [S, N]: the rows of the column sample they come from."""
    gt = load_ground_truth(data)
    out = dataset_matrix(data, preset)
    sample = column_sample(len(gt.images))
    rows = out.rows_of(sample)
    columns = column_stats(rows, sample)
    out.store.close()
    return out.matrix, columns, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="data set folder (images/ + gt.json)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--members", nargs=2, default=["sift", "deep_rot"])
    args = parser.parse_args(argv)
    gt = load_ground_truth(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    members, columns, samples = {}, [], []
    for m in args.members:
        matrix, stats, rows = member_matrix(args.data, m)
        members[m] = matrix.astype(np.float64)
        columns.append(stats)
        samples.append(rows)
        np.save(args.out / f"{m}.npy", matrix)
        np.save(args.out / f"{m}.columns.npy", stats)
    results = {}
    for rule, matrix in {**members, **rules(*members.values(), columns, samples)}.items():
        results[rule] = row = rule_metrics(matrix, gt)
        print(f"{rule:22s}", " ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "families"), end=" ")
        print(" ".join(f"{f} {v:.3f}" for f, v in row.get("families", {}).items()))
    (args.out / "fusion.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
