"""Best rotation's score: the query run at four rotations against an upright database.

A lever of docs/robustness.md ("Levers of the deep preset"), shipped as the ``deep_qrot``
preset: the database keeps the ``deep`` preset's upright features, extracted once; each
query is also extracted rotated by 90, 180 and 270 degrees with the same extractor
(whitening included), each rotation is searched, and a database image's score is the best
of the four. Against ``deep`` (the upright query alone) and ``deep_rot`` (every image at
four rotations, one pooled top 500), each as ``asmkit eval --preset P`` computes it::

    PYTHONPATH=src python -m benchmarks.studies.query_rotations bench_out/robust_large

Prints mAP and per-family mAP of each, and the seconds the turned queries took (their
extraction, or reading their cache on a rerun, and their searches).
"""

from __future__ import annotations

import argparse

import numpy as np

from asmkit.evaluate import evaluate, load_ground_truth
from asmkit.features.factory import query_turns
from asmkit.params import preset_table

from .robust_fusion import dataset_matrix

RULES = {"deep": "deep", "best rotation": "deep_qrot", "deep_rot": "deep_rot"}


def best_rotation(data: str) -> tuple[dict[str, np.ndarray], float]:
    """float32 ``[Q, N]`` per rule (``deep``, ``best rotation``, ``deep_rot``) and the
    seconds of the turned queries."""
    mats, seconds = {}, 0.0
    for rule, preset in RULES.items():
        out = dataset_matrix(data, preset)
        out.store.close()
        mats[rule] = out.matrix
        seconds += out.timings.get("query_turns_s", 0.0)
    return mats, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="data set folder (images/ + gt.json)")
    args = parser.parse_args(argv)
    gt = load_ground_truth(args.data)
    mats, seconds = best_rotation(args.data)
    for rule, matrix in mats.items():
        metrics = evaluate(np.argsort(-matrix, axis=1, kind="stable"), gt)
        families = " ".join(f"{f} {v['map']:.3f}" for f, v in metrics.get("families", {}).items())
        print(
            f"{rule:14s} map {metrics['map']:.4f}",
            f"ns {metrics['ns_score']:.3f}" if "ns_score" in metrics else "",
            families,
        )
    turns = len(query_turns(preset_table("deep_qrot")["features"]))
    print(
        f"turned queries: {len(gt.queries)} x {turns}, extracted (or read from the cache) and searched in {seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
