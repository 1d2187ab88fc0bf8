"""The torch quantizer (``asmkit.gpu.TorchQuantizer``) against faiss on real descriptors.

Runs the quantizer on any torch device (``--device cpu`` rounds differently from faiss,
as a GPU does) inside a ``Codebook`` and counts the rows whose words differ from faiss
``IndexFlatL2`` called as the reference calls it: the database in one call (MA 1), each
query image in its own call (MA 5, sets of words compared)::

    python benchmarks/check_torch_quantizer.py \\
        --descriptors /tmp/ukbench_rootsift_ukbench2000_1000.npz --codebook-size 4096

``--descriptors`` is the cache ``bench_reference.py`` writes (arrays ``vecs`` and
``image_ids``); the codebook is trained on a 100k sample of them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks._common import add_data_args, add_run_args, load_data, sample_rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(parser, synthetic=None, per_image=1000)
    add_run_args(parser, repeat=None)
    parser.add_argument("--codebook-size", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--query-images", type=int, default=600)
    args = parser.parse_args(argv)

    import faiss

    from asmkit import Codebook
    from asmkit import codebook as codebook_mod
    from asmkit.gpu import TorchQuantizer

    data = load_data(args)
    vecs, starts = data.vecs, data.starts()
    centroids = Codebook.train(sample_rows(vecs, 100_000, args.seed), args.codebook_size, seed=args.seed).centroids
    book = Codebook(centroids)
    book._device = ("torch", 0)
    book._torch = TorchQuantizer(centroids, args.device, codebook_mod._tie_eps(1.0, vecs.shape[1]))
    index = faiss.IndexFlatL2(vecs.shape[1])
    index.add(centroids)

    segments = codebook_mod._check_segments([0, len(vecs)], len(vecs))
    flagged = book._quantize_unsettled(vecs, 1, segments, True)[2]
    start = time.perf_counter()
    words = book.quantize(vecs, 1, segments=[0, len(vecs)])
    print(
        f"database: {len(vecs)} rows, {time.perf_counter() - start:.1f} s on {args.device}, "
        f"{len(flagged)} settled by faiss, "
        f"{int((words[:, 0] != index.search(vecs, 1)[1][:, 0]).sum())} differ from faiss"
    )

    starts = starts[: args.query_images + 1]
    rows = int(starts[-1])
    words = book.quantize(vecs[:rows], 5, segments=starts, nearest_first=False)
    expected = np.concatenate([index.search(vecs[a:b], 5)[1] for a, b in zip(starts[:-1], starts[1:])])
    differ = int(np.any(np.sort(words, 1) != np.sort(expected, 1), 1).sum())
    print(f"queries: {len(starts) - 1} images, {rows} rows, {differ} word sets differ from faiss")


if __name__ == "__main__":
    main()
