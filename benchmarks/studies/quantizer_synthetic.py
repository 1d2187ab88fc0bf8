"""The exact quantizer's options on isotropic data (why synthetic queries stay near 13x).

On clustered synthetic descriptors (default 1000 images x 500 x 128-D, K = 1024 trained
on a 100k sample), times for all rows:

- faiss ``IndexFlatL2.search`` with k = 1 and k = 6 (the query side's m + 1), BLAS
  blocks of 512 rows as ``Codebook._faiss_block`` runs it;
- numpy's float32 product alone, a numba top-6 selection alone, and the two alternated
  per 512-row block (a BLAS + numba quantizer);
- ``Index.search`` of all images with the default quantizer, and with the pruned
  kernel forced to wider bounds (``--widths``).

Prints one line per measurement (best of ``--repeat``). Uses internals: the pruned
search's width table (``Codebook._pruned_search``) and ``asmkit._kernels._insert_sorted``::

    python -m benchmarks.studies.quantizer_synthetic --widths 120 --repeat 2
"""

from __future__ import annotations

import argparse

import numpy as np
from numba import njit, prange

from asmkit._kernels import _insert_sorted
from benchmarks._common import add_data_args, add_run_args, best_of, load_data, sample_rows


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
    add_data_args(parser, synthetic=1000, per_image=500)
    add_run_args(parser, repeat=3)
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--widths", type=int, nargs="*", default=[64, 120])
    args = parser.parse_args(argv)

    import faiss

    from asmkit import Codebook, Index, Params

    data = load_data(args)
    vecs, ids = data.vecs, data.image_ids
    book = Codebook.train(sample_rows(vecs, 100_000, args.seed), args.codebook_size, seed=args.seed)
    c = book.centroids
    index = faiss.IndexFlatL2(book.dim)
    index.add(c)
    faiss.cvar.distance_compute_blas_query_bs = 512
    for k in (1, 6):
        print(f"faiss k={k}: {best_of(lambda: index.search(vecs, k), args.repeat)[0]:.3f} s")

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

    print(f"numpy product alone: {best_of(product, args.repeat)[0]:.3f} s")
    print(f"numba top-6 alone: {best_of(select, args.repeat)[0]:.3f} s")
    print(f"product + top-6 alternated: {best_of(both, 1)[0]:.3f} s")

    engine = Index(book, Params(codebook_size=book.size))
    engine.add(vecs, ids)
    pruned = book._pruned_search()
    for width in [None, *args.widths]:
        if width is not None:
            pruned._width[5] = width
        engine.search(vecs[:5000], ids[:5000], k=100)  # compiles the kernel for this width's shapes
        t = best_of(lambda: engine.search(vecs, ids, k=100), args.repeat)[0]
        print(f"Index.search, {data.n_images} queries, bound width {width or 'auto (faiss)'}: {t:.3f} s")


if __name__ == "__main__":
    main()
