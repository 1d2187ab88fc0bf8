"""Time the pruned quantizer alone, for A/B comparisons of kernel changes.

``Codebook.quantize`` on the first ``--rows`` descriptors of a cache written by
``bench_reference.py`` (arrays ``vecs``), one segment, at fixed bound widths, m = 1
(nearest first) and m = 5 (set only); best of ``--repeat``. Compare two versions of
``_kernels.py`` by running this alternately with each (numba recompiles on change)::

    python benchmarks/time_pruned.py --descriptors /tmp/ukbench_rootsift_ukbench2000_1000.npz \
        --centroids /tmp/centroids.npy --label new
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--descriptors", required=True)
    parser.add_argument("--centroids", help=".npy codebook (default: k-means on a 100k sample, --codebook-size)")
    parser.add_argument("--codebook-size", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--widths", type=int, nargs=2, default=(24, 32), metavar=("W1", "W5"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--label", default="")
    args = parser.parse_args(argv)

    from asmkit import Codebook

    vecs = np.ascontiguousarray(np.load(args.descriptors)["vecs"][: args.rows], np.float32)
    if args.centroids:
        centroids = np.load(args.centroids)
    else:
        sample = np.random.default_rng(0).choice(len(vecs), min(len(vecs), 100_000), replace=False)
        centroids = Codebook.train(vecs[sample], args.codebook_size, seed=0).centroids
    book = Codebook(centroids)
    pruned = book._pruned_search()
    pruned._width[1], pruned._width[5] = args.widths
    times = {}
    for m in (1, 5):
        book.quantize(vecs[:5000], m, nearest_first=m == 1)  # compile / load the kernel
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            book.quantize(vecs, m, segments=[0, len(vecs)], nearest_first=m == 1)
            best = min(best, time.perf_counter() - start)
        times[f"m{m}_s"] = round(best, 3)
    print(args.label, times)


if __name__ == "__main__":
    main()
