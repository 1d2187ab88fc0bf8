"""Spatial verification on UKBench-2000: mAP before / after re-ranking and ms per query.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_verify.py --cache ~/.cache/asmkit/eval/<key> \
        [--queries 2000] [--top 100] [--model affine] [--threshold 8] [--matcher words|mnn] \
        [--expand 1 2 3] [--plain-expand 1 2]

``--cache`` is the folder ``asmkit eval`` filled (features.h5, codebook-*.asmkit): run
``asmkit eval /work/shared/datasets/ukbench2000 --preset sift`` once first. Prints one JSON
line: the settings, mAP / N-S before and after on the chosen queries (evenly spaced), the
verification time per query, and the geometry store's bytes per image; with ``--expand``
one more line per N: mAP after query expansion and its CPU time per query (one query at a
time, each expansion image searched as ``asmkit query --expand`` does).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from asmkit import Codebook, Index
from asmkit.config import load_config
from asmkit.evaluate import evaluate, load_ground_truth
from asmkit.features import FeatureStore
from asmkit.geometry import GeometryStore, feature_words
from asmkit.verify import (
    Reranked,
    VerifyOptions,
    expand,
    fit_model,
    mutual_nn_matches,
    order_by_inliers,
    rerank,
)


def words_of(codebook: Codebook, feats: dict, path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each image's words and signatures (``feature_words``; cached in ``path``)."""
    if not path.is_file():
        words, sigs = feature_words(codebook, [feats[i].descriptors for i in range(len(feats))])
        np.savez(
            path, words=np.concatenate(words), signatures=np.concatenate(sigs), counts=np.array([len(w) for w in words])
        )
    with np.load(path, allow_pickle=False) as data:
        cuts = np.cumsum(data["counts"])[:-1]
        return np.split(data["words"], cuts), np.split(data["signatures"], cuts)


def mnn_inliers(feats, queries, ids, top, opts: VerifyOptions) -> np.ndarray:
    """Inliers with mutual-nearest-neighbour correspondences (needs every descriptor)."""
    out = np.full((len(queries), top), -1, np.int32)

    def one(row):
        q = queries[row]
        for c in range(top):
            d = int(ids[row, c])
            pairs = mutual_nn_matches(feats[q].descriptors, feats[d].descriptors)
            if pairs.shape[0] < opts.min_inliers:
                out[row, c] = 0
                continue
            fit = fit_model(
                feats[q].keypoints[pairs[:, 0], :2],
                feats[d].keypoints[pairs[:, 1], :2],
                opts.model,
                threshold=opts.threshold,
                max_iters=opts.max_iters,
                confidence=opts.confidence,
                pairs=pairs,
            )
            out[row, c] = fit.inliers

    with ThreadPoolExecutor(opts.n_threads) as pool:
        list(pool.map(one, range(len(queries))))
    return out


def expand_each(index: Index, feats, reranked: Reranked, n: int, fallback: int, min_inliers: int, k, exclude):
    """``expand`` one query at a time, as ``asmkit query`` does (each expansion image
    searched with its descriptors, ``k`` results): the expanded rankings and CPU seconds."""
    every = []
    c0 = time.process_time()
    for row in range(reranked.ids.shape[0]):

        def rows_of(images):
            scores, ids = index.search([feats[int(i)].descriptors for i in images], k=k)
            return ids, scores

        one = Reranked(reranked.scores[row : row + 1], reranked.ids[row : row + 1], reranked.inliers[row : row + 1])
        every.append(
            expand(one, rows_of, n, min_inliers=min_inliers, fallback=fallback, exclude=exclude[row : row + 1]).ids
        )
    return np.concatenate(every), time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/datasets/ukbench2000")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--preset", default="sift")
    parser.add_argument("--codebook", help="codebook directory (default: the cache's codebook-*.asmkit)")
    parser.add_argument(
        "--images",
        type=int,
        default=2000,
        help="database = the first N images (UKBench groups are 4 consecutive images)",
    )
    parser.add_argument("--queries", type=int, default=None, help="queries, evenly spaced (default: every image)")
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument("--model", default="affine")
    parser.add_argument("--threshold", type=float, default=8.0)
    parser.add_argument("--max-per-word", type=int, default=5)
    parser.add_argument("--min-inliers", type=int, default=8)
    parser.add_argument("--max-hamming", type=int, default=40, help="-1: words alone (no signatures)")
    parser.add_argument("--max-iters", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--matcher", default="words", choices=["words", "mnn"])
    parser.add_argument("--words-cache", help="folder for the database words (default /tmp)")
    parser.add_argument("--configs", nargs="+", help="several MODEL:THRESHOLD:MAX_HAMMING runs on one ranking")
    parser.add_argument("--ranking", help="reuse the ASMK ranking saved by an earlier --save (same queries)")
    parser.add_argument("--query-m", type=int, default=1, help="words per query feature")
    parser.add_argument("--save", help="write the inliers and ASMK rankings of the queries here (.npz)")
    parser.add_argument("--expand", type=int, nargs="*", default=[], help="query expansion with N verified images")
    parser.add_argument(
        "--expand-fallback", type=int, nargs="+", default=[1], help="images a query with none verified expands with"
    )
    parser.add_argument("--expand-k", type=int, help="results per expansion search (default: the whole database)")
    parser.add_argument("--plain-expand", type=int, nargs="*", default=[], help="also plain query expansion (top M)")
    args = parser.parse_args()

    cache = Path(args.cache).expanduser()
    gt = load_ground_truth(args.data)
    names = gt.images[: args.images]
    feature_store = FeatureStore(cache / "features.h5", None)
    feats = {i: feature_store.get(n) for i, n in enumerate(names)}
    codebook = Codebook.load(args.codebook or next(cache.glob("codebook-*.asmkit")))
    params = load_config(args.preset).params
    digest = hashlib.sha256(np.ascontiguousarray(codebook.centroids).tobytes()).hexdigest()[:12]
    words, sigs = words_of(codebook, feats, Path(args.words_cache or "/tmp") / f"words-sigs-{digest}-{len(names)}.npz")
    if args.max_hamming < 0:
        sigs = None

    geometry = GeometryStore()
    geometry.add(np.arange(len(names)), [feats[i].keypoints for i in range(len(names))], words, sigs)

    queries = np.linspace(0, len(names) - 1, args.queries or len(names)).round().astype(int)
    if args.ranking:
        with np.load(args.ranking, allow_pickle=False) as data:
            if not np.array_equal(data["queries"], queries):
                raise SystemExit(f"--ranking: {args.ranking} holds other queries")
            scores, ids = data["scores"], data["ids"]
    index = Index(codebook, params)
    index.add([feats[i].descriptors for i in range(len(names))])
    if not args.ranking:
        scores, ids = index.search([feats[int(q)].descriptors for q in queries], k=len(names))
    if args.query_m > 1:
        q_words, q_sigs = feature_words(codebook, [feats[int(q)].descriptors for q in queries], m=args.query_m)
    else:
        q_words, q_sigs = [words[int(q)] for q in queries], [sigs[int(q)] for q in queries]
    before = evaluate(ids, gt, query_indices=queries)
    # Each query is a database image: it never expands with itself.
    exclude = queries
    for m in args.plain_expand:
        unverified = Reranked(scores, ids, np.full(ids.shape, -1, np.int32))
        plain, cpu = expand_each(index, feats, unverified, 0, m, 0, args.expand_k, exclude)
        after = evaluate(plain, gt, query_indices=queries)
        line = {"plain_expand": m, "map_before": before["map"], "map_after": after["map"]}
        print(json.dumps({**line, "ns_after": after.get("ns_score"), "cpu_ms_per_query": 1e3 * cpu / len(queries)}))
    configs = args.configs or [f"{args.model}:{args.threshold}:{args.max_hamming}"]
    saved = {"queries": queries, "ids": ids[:, : args.top], "scores": scores[:, : args.top]}
    for config in configs:
        model, threshold, max_hamming = config.split(":")
        opts = VerifyOptions(
            model=model,
            threshold=float(threshold),
            max_per_word=args.max_per_word,
            min_inliers=args.min_inliers,
            max_iters=args.max_iters,
            threads=args.threads,
            max_hamming=max(int(max_hamming), 0),
        )
        use_sigs = None if sigs is None or int(max_hamming) < 0 else q_sigs
        t0 = time.perf_counter()
        c0 = time.process_time()
        out = None
        if args.matcher == "words":
            out = rerank(
                geometry,
                [feats[int(q)].keypoints for q in queries],
                q_words,
                ids,
                scores,
                query_signatures=use_sigs,
                top=args.top,
                options=opts,
            )
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            reranked = out.ids
            # Back to ASMK order, for offline study of the ordering rule.
            inliers = np.full((len(queries), args.top), -1, np.int32)
            for row in range(len(queries)):
                position = {int(i): c for c, i in enumerate(ids[row, : args.top])}
                for c, i in enumerate(out.ids[row, : args.top]):
                    inliers[row, position[int(i)]] = out.inliers[row, c]
        else:
            inliers = mnn_inliers(feats, [int(q) for q in queries], ids, args.top, opts)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            reranked = ids.copy()
            order = order_by_inliers(inliers, opts.min_inliers)
            reranked[:, : args.top] = np.take_along_axis(ids[:, : args.top], order, axis=1)
        after = evaluate(reranked, gt, query_indices=queries)
        saved[f"inliers:{config}"] = inliers
        print(
            json.dumps(
                {
                    "images": len(names),
                    "queries": len(queries),
                    "top": args.top,
                    "matcher": args.matcher,
                    "config": config,
                    "query_m": args.query_m,
                    "max_per_word": args.max_per_word,
                    "min_inliers": args.min_inliers,
                    "max_iters": args.max_iters,
                    "threads": opts.n_threads,
                    "cpus": os.cpu_count(),
                    "map_before": before["map"],
                    "ns_before": before.get("ns_score"),
                    "map_after": after["map"],
                    "ns_after": after.get("ns_score"),
                    "ms_per_query": 1e3 * seconds / len(queries),
                    "cpu_ms_per_query": 1e3 * cpu / len(queries),
                    "geometry_bytes_per_image": geometry.bytes_per_image,
                }
            ),
            flush=True,
        )
        runs = [(n, f) for f in args.expand_fallback for n in args.expand] if out is not None else []
        for n, fallback in runs:
            grown, cpu = expand_each(index, feats, out, n, fallback, opts.min_inliers, args.expand_k, exclude)
            after_expansion = evaluate(grown, gt, query_indices=queries)
            line = {"config": config, "expand": n, "fallback": fallback, "expand_k": args.expand_k}
            print(
                json.dumps(
                    {
                        **line,
                        "map_reranked": after["map"],
                        "map_expanded": after_expansion["map"],
                        "ns_expanded": after_expansion.get("ns_score"),
                        "expand_cpu_ms_per_query": 1e3 * cpu / len(queries),
                    }
                ),
                flush=True,
            )
        if args.save:
            np.savez(args.save, **saved)


if __name__ == "__main__":
    main()
