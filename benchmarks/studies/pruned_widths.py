"""The pruned quantizer alone at fixed bound widths, for A/B comparisons of kernel changes.

``Codebook.quantize`` on the first ``--rows`` descriptors, one segment, at fixed bound
widths (``--widths W1 W5``), m = 1 (nearest first) and m = 5 (the set only); best and
median of ``--repeat``. To compare two versions of ``_kernels.py``, run this alternately
with each (numba recompiles on change), with one codebook saved by ``--save-centroids``
and read back by ``--centroids``. Uses an internal: the pruned search's width table
(``Codebook._pruned_search``)::

    python -m benchmarks.studies.pruned_widths --data ../shared/datasets/ukbench2000 \\
        --per-image 1000 --save-centroids centroids.npy --label old
    python -m benchmarks.studies.pruned_widths --data ../shared/datasets/ukbench2000 \\
        --per-image 1000 --centroids centroids.npy --label new
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks._common import add_data_args, add_run_args, load_data, sample_rows, timed, write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(parser, synthetic=None, per_image=1000)
    add_run_args(parser, repeat=5)
    parser.add_argument("--centroids", type=Path, help=".npy codebook (default: k-means on a 100k sample)")
    parser.add_argument("--save-centroids", type=Path, help="write the codebook used here as .npy")
    parser.add_argument("--codebook-size", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--widths", type=int, nargs=2, default=(24, 32), metavar=("W1", "W5"))
    parser.add_argument("--label", default="")
    args = parser.parse_args(argv)

    from asmkit import Codebook

    data = load_data(args)
    vecs = np.ascontiguousarray(data.vecs[: args.rows])
    if args.centroids:
        centroids = np.load(args.centroids)
    else:
        centroids = Codebook.train(
            sample_rows(data.vecs, 100_000, args.seed), args.codebook_size, seed=args.seed
        ).centroids
    if args.save_centroids:
        np.save(args.save_centroids, centroids)
    book = Codebook(centroids)
    pruned = book._pruned_search()
    if pruned is None:
        raise SystemExit(f"a codebook of {book.size} words is searched by faiss alone (no bound to time)")
    pruned._width[1], pruned._width[5] = args.widths
    times = {}
    for m in (1, 5):
        book.quantize(vecs[:5000], m, nearest_first=m == 1)  # compile / load the kernel
        run = timed(lambda: book.quantize(vecs, m, segments=[0, len(vecs)], nearest_first=m == 1), args.repeat)
        times[f"m{m}_best_s"], times[f"m{m}_median_s"] = round(run.best, 3), round(run.median, 3)
    print(args.label, {"rows": len(vecs), "widths": list(args.widths), **times})
    write_json(args.out, {"label": args.label, "rows": len(vecs), "widths": list(args.widths), **times})


if __name__ == "__main__":
    main()
