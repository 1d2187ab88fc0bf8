"""Why synthetic queries stay near 13x: the exact quantizer's options on isotropic data.

On `asmkit._synthetic` descriptors (1000 images x 500 x 128-D, K = 1024 trained on a
100k sample), times per 500k rows:

- faiss ``IndexFlatL2.search`` with k = 1 and k = 6 (the query side's m + 1), BLAS
  blocks of 512 rows as ``Codebook._faiss_block`` runs it;
- numpy's float32 product alone, a numba top-6 selection alone, and the two alternated
  per 512-row block (a BLAS + numba quantizer);
- ``Index.search`` of all 1000 images with the default quantizer, and with the pruned
  kernel forced to wider bounds (``--widths``).

Prints one line per measurement (best of ``--repeat``)::

    python benchmarks/study_synthetic_quantizer.py --widths 64 120
"""

from __future__ import annotations

import argparse

import numpy as np
from numba import njit, prange

from asmkit._kernels import _insert_sorted
from bench_engine import best  # benchmarks/ is on sys.path when this script runs


@njit(parallel=True)
def _select(ip, x_sq, c_sq, begin, out_d, out_w):
    """The m smallest of faiss's expression |x|^2 + |c|^2 - 2 x.c per row of ``ip``."""
    rows, k = ip.shape
    m = out_d.shape[1]
    for i in prange(rows):
        values, ids = out_d[begin + i], out_w[begin + i]
        for t in range(m):
            values[t] = np.inf
            ids[t] = -1
        for j in range(k):
            d = x_sq[i] + c_sq[j] - np.float32(2) * ip[i, j]
            if d < values[m - 1]:
                _insert_sorted(values, ids, d, j)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="*", default=[64, 120])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    import faiss

    from asmkit import Codebook, Index, Params
    from asmkit._synthetic import clustered_descriptors

    vecs, ids, _ = clustered_descriptors(1000, 500, 128, seed=0)
    rng = np.random.default_rng(0)
    book = Codebook.train(vecs[rng.choice(len(vecs), 100_000, replace=False)], 1024, seed=0)
    c = book.centroids
    index = faiss.IndexFlatL2(128)
    index.add(c)
    faiss.cvar.distance_compute_blas_query_bs = 512
    for k in (1, 6):
        print(f"faiss k={k}: {best(lambda: index.search(vecs, k), args.repeat)[0]:.3f} s")

    ct = np.ascontiguousarray(c.T)
    c_sq = np.einsum("ij,ij->i", c, c)
    x_sq = np.einsum("ij,ij->i", vecs, vecs)
    buf = np.empty((512, len(c)), np.float32)
    out_d = np.empty((len(vecs), 6), np.float32)
    out_w = np.empty((len(vecs), 6), np.int64)
    _select(vecs[:512] @ ct, x_sq[:512], c_sq, 0, out_d, out_w)  # compile

    def product():
        for b in range(0, len(vecs), 512):
            block = vecs[b : b + 512]
            np.matmul(block, ct, out=buf[: len(block)])

    fixed = vecs[:512] @ ct

    def select():
        for b in range(0, len(vecs) - 511, 512):
            _select(fixed, x_sq[:512], c_sq, b, out_d, out_w)

    def both():
        for b in range(0, len(vecs), 512):
            block = vecs[b : b + 512]
            _select(np.matmul(block, ct, out=buf[: len(block)]), x_sq[b : b + 512], c_sq, b, out_d, out_w)

    print(f"numpy product alone: {best(product, args.repeat)[0]:.3f} s")
    print(f"numba top-6 alone: {best(select, args.repeat)[0]:.3f} s")
    print(f"product + top-6 alternated: {best(both, 1)[0]:.3f} s")

    engine = Index(book, Params(codebook_size=1024))
    engine.add(vecs, ids)
    pruned = book._pruned_search()
    for width in [None, *args.widths]:
        if width is not None:
            pruned._width[5] = width
        engine.search(vecs[:5000], ids[:5000], k=100)  # compiles the kernel for this width's shapes
        t = best(lambda: engine.search(vecs, ids, k=100), args.repeat)[0]
        print(f"Index.search, 1000 queries, bound width {width or 'auto (faiss)'}: {t:.3f} s")


if __name__ == "__main__":
    main()
