"""Quantization alone: asmkit's pruned exact search against faiss as the reference calls it.

The reference ``asmk`` quantizes the database in one faiss ``IndexFlatL2`` call (MA 1) and
each query image in its own call (MA 5). This script does the same with faiss, then
``Codebook.quantize`` on the same rows (``segments`` = image boundaries for the queries),
and prints both times, their ratio, and how many rows differ (column 0 for the database,
the set of words for the queries: what ASMK uses).

Example (the UKBench RootSIFT cache written by bench_reference.py)::

    .venv/bin/python benchmarks/bench_quantize.py \\
        --descriptors /tmp/ukbench_rootsift_ukbench2000_1000.npz --codebook-size 4096
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--descriptors", type=Path, required=True,
                        help="npz with vecs float32 [N, D] and image_ids int64 [N] (images contiguous)")
    parser.add_argument("--codebook-size", type=int, default=4096)
    parser.add_argument("--train-sample", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ma-query", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()

    import faiss

    from asmkit import Codebook

    with np.load(args.descriptors, allow_pickle=False) as npz:
        vecs = np.ascontiguousarray(npz["vecs"], dtype=np.float32)
        ids = np.asarray(npz["image_ids"])
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ids)) + 1, [len(ids)]]).astype(np.int64)
    rng = np.random.default_rng(args.seed)
    train = vecs[np.sort(rng.choice(len(vecs), min(args.train_sample, len(vecs)), replace=False))]
    book = Codebook.train(train, args.codebook_size)
    index = faiss.IndexFlatL2(book.dim)
    index.add(book.centroids)
    # Compile the kernels and choose the bound width outside the timings.
    book.quantize(vecs[:4096], 1)
    book.quantize(vecs[:4096], args.ma_query, nearest_first=False)

    t = time.perf_counter()
    ref_db = index.search(vecs, 1)[1]
    t_ref_db = time.perf_counter() - t
    t = time.perf_counter()
    db = book.quantize(vecs, 1)
    t_db = time.perf_counter() - t

    t = time.perf_counter()
    ref_q = np.concatenate([index.search(vecs[s:e], args.ma_query)[1] for s, e in zip(starts[:-1], starts[1:])])
    t_ref_q = time.perf_counter() - t
    t = time.perf_counter()
    q = book.quantize(vecs, args.ma_query, segments=starts, nearest_first=False)
    t_q = time.perf_counter() - t

    pruned = book._pruned_search()
    widths = dict(pruned._width) if pruned is not None else {}
    result = {
        "descriptors": int(len(vecs)), "images": int(len(starts) - 1), "dim": int(book.dim),
        "codebook_size": int(book.size), "bound_width": {str(k): v for k, v in widths.items()},
        "database_ma1_faiss_one_call_s": round(t_ref_db, 3), "database_ma1_asmkit_s": round(t_db, 3),
        "database_ratio": round(t_ref_db / t_db, 2),
        "database_rows_differing": int((db[:, 0] != ref_db[:, 0]).sum()),
        f"queries_ma{args.ma_query}_faiss_per_image_s": round(t_ref_q, 3),
        f"queries_ma{args.ma_query}_asmkit_s": round(t_q, 3),
        "queries_ratio": round(t_ref_q / t_q, 2),
        "query_rows_with_differing_word_sets": int((np.sort(q, 1) != np.sort(ref_q, 1)).any(axis=1).sum()),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
