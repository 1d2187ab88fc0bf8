"""Study of the deep preset on UKBench-2000: EfficientNet-Lite0 features + PCA whitening + ASMK*.

Two phases, so that the expensive one runs once:

1. ``extract``: raw (un-whitened) top-attention backbone features of all 2000 images, for a
   given stage and set of scales, cached in ``--cache`` (float16).
2. ``eval``: from a cache, for each combination of the levers (features per image, whitening
   dim and shrinkage, codebook size): learn the whitening on the same images' features (no
   labels), L2-normalise, train a codebook on a sample of them, ASMK* all-vs-all (every image
   a query, junk in its own ranking), and report mAP and N-S; also the weighted-SPoC global
   descriptor mAP as a baseline.

Examples::

    nice -n 10 .venv/bin/python -m benchmarks.studies.deep_ukbench extract --stage stride16 --scales 1
    nice -n 10 .venv/bin/python -m benchmarks.studies.deep_ukbench eval --stage stride16 --scales 1 \\
        --nfeat 800 --dim 128 --shrinkage 1.0 --codebook 4096
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from benchmarks._common import DEFAULT_CACHE

log = logging.getLogger("deep_ukbench")


def cache_file(cache: Path, stage: str, scales: list[float], smoothing: int, limit: int | None) -> Path:
    tag = f"{stage}_s{'-'.join(f'{s:g}' for s in scales)}_sm{smoothing}" + (f"_n{limit}" if limit else "")
    return cache / f"deep_{tag}.npz"


def extract(args) -> None:
    import torch

    from asmkit.evaluate import load_ground_truth
    from asmkit.features import extract_features
    from asmkit.features.backbones import EfficientNetLite0
    from asmkit.features.deep import DeepExtractor, RetrievalHead

    gt = load_ground_truth(args.data)
    paths = gt.image_paths()[: args.limit]
    if args.threads:
        # The extractor leaves torch's thread count alone: the study sets it.
        torch.set_num_threads(args.threads)
    backbone = EfficientNetLite0(args.stage)
    # Raw features: no whitening, no normalisation, so that eval can whiten many ways.
    head = RetrievalHead(backbone.out_dim, smoothing=args.smoothing, normalize=False)
    ex = DeepExtractor(backbone, head, nfeat=args.keep, scales=args.scales, max_size=1024, batch_size=1)
    t0 = time.perf_counter()
    res = extract_features(paths, ex, workers=2, progress=False)
    seconds = time.perf_counter() - t0
    if res.failed:
        raise SystemExit(f"failed images: {res.failed[:5]}")
    feats = [res.features[n] for n in res.extracted]
    out = cache_file(args.cache, args.stage, args.scales, args.smoothing, args.limit)
    args.cache.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        desc=np.concatenate([f.descriptors for f in feats]).astype(np.float16),
        attn=np.concatenate([f.attention for f in feats]).astype(np.float32),
        counts=np.array([len(f) for f in feats], dtype=np.int64),
        seconds=np.array(seconds),
        threads=np.array(torch.get_num_threads()),
    )
    print(
        json.dumps(
            {
                "cache": str(out),
                "images": len(feats),
                "seconds": round(seconds, 1),
                "images_per_s": round(len(feats) / seconds, 2),
                "threads": torch.get_num_threads(),
                "mean_feats": float(np.mean([len(f) for f in feats])),
            }
        )
    )


def _rank_asmk(vecs, ids, n_images, codebook_size, seed, kernels=((3.0, 0.0, 5),)):
    """All-vs-all ASMK* ranks [n, n] for each (alpha, tau, ma_query) in ``kernels``, one
    codebook trained on a sample of ``vecs``; (ranks, engine, codebook s, index + search s)."""
    from asmkit import Codebook, Index, Params

    sample = vecs
    rng = np.random.default_rng(seed)
    if len(vecs) > args_sample:
        sample = vecs[rng.choice(len(vecs), args_sample, replace=False)]
    t0 = time.perf_counter()
    cb = Codebook.train(sample, codebook_size, iters=10, seed=Params().seed)
    t1 = time.perf_counter()
    ranks = []
    for alpha, tau, ma_query in kernels:
        params = Params.preset("asmk_star", codebook_size=codebook_size, alpha=alpha, tau=tau, ma_query=ma_query)
        index = Index(cb, params)
        index.add(vecs, ids)
        ranks.append(index.search(vecs, ids, k=n_images)[1])
    return [np.asarray(r) for r in ranks], "asmkit", t1 - t0, time.perf_counter() - t1


args_sample = 150_000


def evaluate(args) -> None:
    from asmkit.evaluate import load_ground_truth, mean_average_precision, ns_score
    from asmkit.features.whitening import PCAWhitening

    gt = load_ground_truth(args.data)
    source = args.limit if args.source_limit is None else (args.source_limit or None)
    data = np.load(cache_file(args.cache, args.stage, args.scales, args.smoothing, source))
    desc_all, attn_all, counts = data["desc"], data["attn"], data["counts"]
    if args.limit is not None:
        # Evaluate on the first images only (complete groups of 4), to compare with subset runs.
        counts = counts[: args.limit]
        desc_all, attn_all = desc_all[: counts.sum()], attn_all[: counts.sum()]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    n_images = len(counts)
    groups = [gt.query_groups[q] for q in range(n_images)]
    rows = []
    for nfeat, dim, shrink, k in itertools.product(args.nfeat, args.dim, args.shrinkage, args.codebook):
        # Cached features of an image are sorted by decreasing attention: top-n is a prefix.
        take = np.concatenate([np.arange(offsets[i], offsets[i] + min(nfeat, counts[i])) for i in range(n_images)])
        ids = np.repeat(np.arange(n_images), np.minimum(counts, nfeat))
        raw = desc_all[take].astype(np.float32)
        attn = attn_all[take]
        rng = np.random.default_rng(0)
        learn_rows = raw if len(raw) <= args_sample else raw[rng.choice(len(raw), args_sample, replace=False)]
        whitening = PCAWhitening.learn(learn_rows, dim=min(dim, raw.shape[1]), shrinkage=shrink)
        vecs = whitening.apply(raw)
        # Weighted SPoC over the kept features (baseline global descriptor).
        spoc = np.zeros((n_images, vecs.shape[1]), np.float64)
        np.add.at(spoc, ids, vecs * attn[:, None])
        spoc /= np.linalg.norm(spoc, axis=1, keepdims=True) + 1e-12
        granks = np.argsort(-(spoc @ spoc.T), axis=1, kind="stable")
        g_map, _ = mean_average_precision(granks, gt, query_indices=np.arange(n_images))
        kernels = list(itertools.product(args.alpha, args.tau, args.ma_query))
        all_ranks, engine, t_cb, t_search = _rank_asmk(vecs, ids, n_images, k, seed=0, kernels=kernels)
        for (alpha, tau, ma_query), ranks in zip(kernels, all_ranks):
            m, _ = mean_average_precision(ranks, gt, query_indices=np.arange(n_images))
            ns = ns_score(ranks, groups)
            row = {
                "images": n_images,
                "stage": args.stage,
                "scales": args.scales,
                "smoothing": args.smoothing,
                "nfeat": nfeat,
                "dim": whitening.output_dim,
                "shrinkage": shrink,
                "codebook": k,
                "alpha": alpha,
                "tau": tau,
                "ma_query": ma_query,
                "map": round(m, 4),
                "ns": round(ns, 3),
                "spoc_map": round(g_map, 4),
                "engine": engine,
                "t_codebook_s": round(t_cb, 1),
                "t_index_search_s": round(t_search, 1),
                "n_desc": int(len(vecs)),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["extract", "eval"])
    parser.add_argument("--stage", default="stride16")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--smoothing", type=int, default=0)
    parser.add_argument("--data", type=Path, required=True, help="UKBench-style folder (gt.json, images/)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE / "deep_study", help="feature caches")
    parser.add_argument("--keep", type=int, default=1000, help="features cached per image (extract)")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument(
        "--source-limit",
        type=int,
        default=None,
        help="eval: read the cache extracted with this --limit (default: --limit; 0: the full cache)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--nfeat", type=int, nargs="+", default=[800])
    parser.add_argument("--dim", type=int, nargs="+", default=[128])
    parser.add_argument("--shrinkage", type=float, nargs="+", default=[1.0])
    parser.add_argument("--codebook", type=int, nargs="+", default=[4096])
    parser.add_argument("--alpha", type=float, nargs="+", default=[3.0], help="selectivity (one codebook for all)")
    parser.add_argument("--tau", type=float, nargs="+", default=[0.0], help="similarity threshold")
    parser.add_argument("--ma-query", type=int, nargs="+", default=[5], help="query multiple assignment")
    parser.add_argument("--out", default=None, help="append result rows (JSON lines) to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads or os.cpu_count()))
    extract(args) if args.phase == "extract" else evaluate(args)


if __name__ == "__main__":
    main()
