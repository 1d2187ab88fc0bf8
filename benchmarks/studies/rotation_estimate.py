"""A rotation estimate that turns every image upright before deep extraction.

A lever of docs/robustness.md ("Levers of the deep preset"). The backbone is trained on
upright photos, so an image's activations may be strongest when it is upright. Each image
(database and query alike) is run at the four quarter turns through the ``deep`` preset's
backbone and head; the turn whose top ``nfeat`` attention is largest on average is taken
as upright, and the image's features are extracted at that turn alone. A codebook is
trained on those features as the pipeline trains one, and the images are searched all
against all::

    PYTHONPATH=src python -m benchmarks.studies.rotation_estimate bench_out/robust_large

Prints how often the estimate turns the originals (upright photos) and each rotated copy
back to the original's orientation, then mAP and per-family mAP of the estimate-then-
extract features against ``deep`` as ``asmkit eval`` computes it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from asmkit import pipeline
from asmkit.config import load_config
from asmkit.evaluate import evaluate, load_ground_truth
from asmkit.features.io import load_image
from asmkit.search import similarity_matrix

from .robust_fusion import dataset_matrix

#: The quarter turn (counter-clockwise) of each family's copy relative to its original.
FAMILY_TURNS = {"rot90": 1, "rot180": 2, "rot270": 3}


@torch.inference_mode()
def upright_turn(extractor, image: np.ndarray) -> int:
    """The counter-clockwise quarter turns (0-3) of ``image`` (uint8 ``[H, W, 3]``) whose
    top ``nfeat`` attention is largest on average: the estimate of its upright turn."""
    strengths = []
    for turns in range(4):
        x = extractor._to_tensor([np.ascontiguousarray(np.rot90(image, turns))])
        _, attn = extractor.head(extractor.backbone(x).float())
        k = min(int(extractor.nfeat), attn.shape[1])
        strengths.append(float(torch.topk(attn, k, dim=1).values.mean()))
    return int(np.argmax(strengths))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="data set folder (images/ + gt.json)")
    args = parser.parse_args(argv)
    gt = load_ground_truth(args.data)
    if gt.queries != gt.images and not set(gt.queries) <= set(gt.images):
        raise SystemExit(f"{args.data}: the study needs the queries among the database images")
    cfg = load_config("deep")
    root = Path(gt.root)
    paths = [root / n for n in dict.fromkeys(gt.images + gt.queries)]
    # The stored extractor (with its whitening) of `asmkit eval --preset deep`.
    feats, store, *_ = pipeline._features_for(paths, root, cfg, None, None, None, "cpu")
    store.close()
    extractor = feats.extractor
    t0 = time.perf_counter()
    turns, db = {}, []
    for name in gt.images:
        image = load_image(root / name, max_size=extractor.max_size)
        turns[name] = upright_turn(extractor, image)
        upright = np.ascontiguousarray(np.rot90(image, turns[name]))
        db.append(feats.descriptors(extractor.extract(upright).descriptors))
    seconds = time.perf_counter() - t0
    # A copy is turned back consistently when its estimate differs from its original's by
    # exactly the copy's own turn.
    consistent = {"original": [turns[q] == 0 for q in gt.queries]}
    for family, turn in FAMILY_TURNS.items():
        for q, copies in zip(gt.queries, (gt.families or {}).get(family, [])):
            consistent.setdefault(family, []).extend(
                (turns[gt.images[p]] - turns[q]) % 4 == (-turn) % 4 for p in copies
            )
    for kind, hits in consistent.items():
        print(f"turned back {kind:9s} {np.mean(hits):.3f} of {len(hits)}")
    codebook, _ = pipeline._get_codebook(cfg, training=lambda: db)
    estimated = similarity_matrix(codebook, db, params=cfg.params)
    position = {n: i for i, n in enumerate(gt.images)}
    estimated = estimated[[position[q] for q in gt.queries]]
    upright = dataset_matrix(args.data, "deep")
    upright.store.close()
    for rule, matrix in (("deep", upright.matrix), ("estimated", estimated)):
        metrics = evaluate(np.argsort(-matrix, axis=1, kind="stable"), gt)
        fams = " ".join(f"{f} {v['map']:.3f}" for f, v in metrics.get("families", {}).items())
        ns = f"ns {metrics['ns_score']:.3f}" if "ns_score" in metrics else ""
        print(f"{rule:10s} map {metrics['map']:.4f}", ns, fams)
    print(f"estimate and extraction: {len(gt.images)} images x 5 passes in {seconds:.1f} s")


if __name__ == "__main__":
    main()
