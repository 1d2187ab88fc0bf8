"""Best rotation's score: the query run at four rotations against an upright database.

A lever of docs/robustness.md ("Levers of the deep preset"). The database keeps the ``deep``
preset's upright features, extracted once; each query is also extracted rotated by 90, 180
and 270 degrees with the same extractor (whitening included), each rotation is searched,
and a database image's score is the best of the four. Against ``deep`` (the upright query
alone) and ``deep_rot`` (every image at four rotations, one pooled top 500)::

    PYTHONPATH=src python -m benchmarks.studies.query_rotations bench_out/robust_large

Prints mAP and per-family mAP of each, and the seconds the three extra query passes took.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from asmkit import pipeline
from asmkit.config import load_config
from asmkit.evaluate import evaluate, load_ground_truth
from asmkit.features.io import load_image
from asmkit.index import Index

from .robust_fusion import dataset_matrix

ROTATIONS = (90, 180, 270)


def best_rotation(data: str) -> tuple[dict[str, np.ndarray], float]:
    """float32 ``[Q, N]`` per rule (``deep``, ``best rotation``, ``deep_rot``) and the
    seconds of the rotated query extractions."""
    gt = load_ground_truth(data)
    cfg = load_config("deep")
    root = Path(gt.root)
    paths = [root / n for n in dict.fromkeys(gt.images + gt.queries)]
    # The same cache keys as the evaluation, so the stored extractor (with its whitening)
    # and features are the ones `asmkit eval --preset deep` uses.
    feats, store, *_ = pipeline._features_for(paths, root, cfg, None, None, None, "cpu")
    store.close()
    upright = dataset_matrix(data, "deep")
    index = Index(upright.codebook, cfg.params)
    index.add(upright.db)
    best = upright.matrix.copy()
    t0 = time.perf_counter()
    images = [load_image(root / q, max_size=feats.extractor.max_size) for q in gt.queries]
    for rotation in ROTATIONS:
        turned = [feats.extractor.extract(np.ascontiguousarray(np.rot90(im, rotation // 90))) for im in images]
        best = np.maximum(best, index.similarity_matrix([feats.descriptors(f.descriptors) for f in turned]))
    seconds = time.perf_counter() - t0
    upright.store.close()
    rotated = dataset_matrix(data, "deep_rot")
    rotated.store.close()
    return {"deep": upright.matrix, "best rotation": best, "deep_rot": rotated.matrix}, seconds


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
    print(f"rotated queries: {len(gt.queries)} x {len(ROTATIONS)} extractions in {seconds:.1f} s")


if __name__ == "__main__":
    main()
