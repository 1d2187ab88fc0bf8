"""Where ``asmkit scores`` spends its time, stage by stage, from image files (docs/performance.md).

    python -m benchmarks.studies.scores_stages --data ../shared/datasets/ukbench2000 [--split 200]
    python -m benchmarks.studies.scores_stages --data ../shared/datasets/ukbench2000 \\
        --features FILE.h5 --kmeans 128:10:pruned,128:10,96:10,64:10,64:5

The first form runs the steps of ``asmkit.pipeline.compute_scores`` (default ``sift`` preset)
one at a time, each timed in wall and process CPU seconds (all threads): extraction into a
fresh feature store in a temporary folder (the cold cache of ``asmkit scores``), reading the
descriptors back, the k-means sample and training (as the pipeline trains), the
all-vs-all matrix and saving it.
``--split N`` first extracts N images in one thread, timing decode, SIFT, RootSIFT and the
store's write of each image (thread CPU time), which the threaded extraction cannot split.

The second form takes the descriptors of a feature store written before (``--features``;
the cache of ``asmkit scores`` on the data set's ``images/``) and, for each ``P:I`` of
``--kmeans``, trains the codebook on P descriptors per word with I iterations (faiss's
k-means, or ``P:I:pruned`` for ``Codebook.train(pruned=True)``), then reports
the k-means time and the UKBench mAP and N-S of the all-vs-all matrix (every image a query).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from asmkit import Codebook
from asmkit.config import load_config
from asmkit.evaluate import evaluate, load_ground_truth
from asmkit.features import FeatureStore, ImageFeatures, SiftExtractor, extract_features, image_names, list_images
from asmkit.features.io import load_image
from asmkit.features.sift import root_sift
from asmkit.pipeline import KMEANS_PRUNED, TRAIN_POINTS_PER_WORD, _training_sample
from asmkit.search import similarity_matrix


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> dict:
    wall, cpu = clock()
    return {"wall_s": round(wall - start[0], 2), "cpu_s": round(cpu - start[1], 2)}


def split_extraction(paths: list[Path], extractor: SiftExtractor, folder: Path) -> dict:
    """Thread CPU ms per image of each step of ``SiftExtractor.extract`` and of the store's
    write, in one thread."""
    steps = dict.fromkeys(["decode", "gray", "sift", "keypoints", "rootsift", "store_write"], 0.0)
    detector = extractor._detector()
    store = FeatureStore(folder / "split.h5", extractor.config())
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    for name, path in zip(image_names(paths), paths):
        t = time.thread_time()
        image = load_image(path)
        steps["decode"] += time.thread_time() - t
        t = time.thread_time()
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        steps["gray"] += time.thread_time() - t
        t = time.thread_time()
        keypoints, descriptors = detector.detectAndCompute(gray, None)
        steps["sift"] += time.thread_time() - t
        t = time.thread_time()
        geometry = np.array([(k.pt[0], k.pt[1], k.size, k.angle) for k in keypoints], dtype=np.float32)
        response = np.array([k.response for k in keypoints], dtype=np.float32)
        order = np.lexsort((*geometry.T[::-1], -response))[: extractor.max_features]
        steps["keypoints"] += time.thread_time() - t
        t = time.thread_time()
        descriptors = root_sift(descriptors[order])
        steps["rootsift"] += time.thread_time() - t
        t = time.thread_time()
        store.put(name, ImageFeatures(descriptors, geometry[order], response[order]))
        steps["store_write"] += time.thread_time() - t
    cv2.setNumThreads(previous)
    store.close()
    return {f"{key}_ms_per_image": round(1e3 * value / len(paths), 2) for key, value in steps.items()}


def stages(args) -> dict:
    cfg = load_config("sift")
    paths = list_images(args.images)[: args.limit]
    extractor = SiftExtractor(**{k: v for k, v in cfg.features.items() if k != "type"})
    out: dict = {"images": len(paths), "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="asmkit_stages_") as tmp:
        folder = Path(tmp)
        if args.split:
            out["split"] = split_extraction(paths[: args.split], extractor, folder)
        store = FeatureStore(folder / "features.h5", extractor.config())
        start = clock()
        result = extract_features(paths, extractor, root=args.images, store=store, workers=args.workers, progress=False)
        out["extract"] = since(start)
        names = [n for n in image_names(paths, args.images) if store.has(n)]
        start = clock()
        vecs, ids = store.stack(names)
        out["read_back"] = since(start)
        store.close()
        out["failed"] = len(result.failed)
        out["descriptors"] = len(vecs)
        size = cfg.params.codebook_size
        start = clock()
        sample = _training_sample([vecs], min(len(vecs), TRAIN_POINTS_PER_WORD * size), cfg.params.seed)
        out["kmeans_sample"] = since(start)
        start = clock()
        codebook = Codebook.train(
            sample, size, iters=cfg.params.kmeans_iters, seed=cfg.params.seed, pruned=KMEANS_PRUNED
        )
        out["kmeans"] = {
            **since(start),
            "points_per_word": TRAIN_POINTS_PER_WORD,
            "iters": cfg.params.kmeans_iters,
            "pruned": KMEANS_PRUNED,
        }
        start = clock()
        matrix = similarity_matrix(codebook, vecs, ids, cfg.params)
        out["scores"] = since(start)
        start = clock()
        np.save(folder / "s.npy", matrix)
        out["save"] = since(start)
    out["load_average_end"] = os.getloadavg()
    return out


def kmeans_sweep(args) -> list[dict]:
    cfg = load_config("sift")
    gt = load_ground_truth(args.data)
    if gt.queries != gt.images:
        raise SystemExit("--kmeans: needs a data set whose every image is a query (UKBench)")
    with FeatureStore(args.features, None) as store:
        db = [store.get(Path(n).relative_to("images").as_posix()).descriptors for n in gt.images]
    rows = []
    for spec in args.kmeans.split(","):
        per_word, iters, *how = spec.split(":")
        pruned = how == ["pruned"]
        start = clock()
        size = cfg.params.codebook_size
        sample = _training_sample([d for d in db if len(d)], int(per_word) * size, cfg.params.seed)
        codebook = Codebook.train(sample, size, iters=int(iters), seed=cfg.params.seed, pruned=pruned)
        row = {"points_per_word": int(per_word), "iters": int(iters), "pruned": pruned, "kmeans": since(start)}
        matrix = similarity_matrix(codebook, db, params=cfg.params)
        metrics = evaluate(np.argsort(-matrix, axis=1, kind="stable"), gt)
        row.update(map=round(metrics["map"], 4), ns=round(metrics["ns_score"], 4))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="a UKBench-style folder (images/ and gt.json)")
    p.add_argument("--workers", type=int, default=None, help="extraction threads (default: extract_features')")
    p.add_argument("--split", type=int, default=200, help="images of the one-thread split of extraction (0: none)")
    p.add_argument("--limit", type=int, default=None, help="the first N images only (a quick check)")
    p.add_argument("--features", type=Path, help="a feature store of the data set's images/ (k-means sweep)")
    p.add_argument("--kmeans", help="comma-separated POINTS_PER_WORD:ITERS to train and evaluate")
    args = p.parse_args(argv)
    args.images = args.data / "images"
    if args.kmeans:
        if args.features is None:
            raise SystemExit("--kmeans needs --features")
        kmeans_sweep(args)
    else:
        print(json.dumps(stages(args), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
