"""Where the time of ``Codebook(..., gpu=0).quantize`` goes (cProfile, top entries), and how
many rows are settled on the CPU. Same synthetic data as bench_gpu.py::

    python benchmarks/profile_gpu.py --images 2000 --features 1000 --codebook-size 4096
"""

import argparse
import cProfile
import pstats
import time

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--features", type=int, default=1000)
    parser.add_argument("--codebook-size", type=int, default=4096)
    args = parser.parse_args(argv)

    from asmkit import Codebook
    from asmkit._synthetic import clustered_descriptors

    vecs, ids, _ = clustered_descriptors(args.images, args.features, 128, seed=3)
    rng = np.random.default_rng(0)
    centroids = vecs[rng.choice(len(vecs), args.codebook_size, replace=False)] + np.float32(1e-3)
    book = Codebook(centroids, gpu=0)
    book.quantize(vecs[:4096], 5)
    for m, segments in ((1, None), (5, np.searchsorted(ids, np.arange(ids.max() + 2)))):
        words, dist, flagged = book._quantize_unsettled(vecs, m, book_segments(segments, len(vecs)), m == 1)
        print(f"m={m}: {len(flagged)} of {len(vecs)} rows settled on the CPU")
        start = time.perf_counter()
        profile = cProfile.Profile()
        profile.enable()
        book._quantize(vecs, m, segments, m == 1)
        profile.disable()
        print(f"m={m}: {time.perf_counter() - start:.3f} s")
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)


def book_segments(segments, n):
    from asmkit.codebook import _check_segments

    return _check_segments(segments, n)


if __name__ == "__main__":
    main()
