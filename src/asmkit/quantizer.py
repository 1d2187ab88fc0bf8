"""Quantizer backends: the m nearest words of descriptors, the same whatever the batch.

faiss ``IndexFlatL2`` computes distances in float32. On large batches it takes BLAS
products (|x|^2 + |c|^2 - 2 x.c): where two words' distances agree to within that
rounding, the word it returns depends on the call (the batch's shape, the row's offset in
it, the thread count). On small batches it takes a direct loop, where each (row, word)
distance is computed alone and the words of a row depend on the row alone. asmkit's words
are those of the direct loop, obtained in two steps:

1. a backend (``Quantizer``) fills the words of a block of rows and returns the rows whose
   deciding gap lies within float32 rounding (``tied_rows``): their words are
   provisional; every other row's words are decided by more than any rounding;
2. ``settle_rows`` searches the tied rows again with faiss's direct loop.

``asmkit.Codebook.assign`` drives both steps and returns an ``Assignment`` whose
``settle()`` runs the second. Backends: ``FaissQuantizer`` (faiss's exhaustive search, CPU
or faiss-gpu), ``PrunedQuantizer`` (a lower bound skips most words; CPU) and
``asmkit.gpu.TorchQuantizer`` (CUDA through torch).
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

import faiss
import numpy as np

from . import _kernels

__all__ = [
    "FaissQuantizer",
    "PrunedQuantizer",
    "Quantizer",
    "max_sq_norm",
    "settle_rows",
    "tie_eps",
    "tie_scale",
    "tied_rows",
]

logger = logging.getLogger(__name__)

#: Widths (leading principal axes + 1 tail norm) tried for the pruned search's bound;
#: multiples of 8, the kernel's sweep (``_kernels._bound_quad``).
_WIDTH_CHOICES = (8, 16, 24, 32, 40, 48, 64)
#: Words per tile of the bound table: four rows' bounds and the tile's table
#: (w x 1024 float32, 64-256 KiB) stay in the L2 cache at any codebook size.
_BOUND_TILE = 1024
#: Below this many words, or when the estimated cost exceeds this share of a full distance
#: product, faiss's exhaustive search is used as is.
_PRUNE_MIN_WORDS = 256
_PRUNE_MAX_COST = 0.6
#: faiss's float32 rounding error on a distance gap grows like sqrt(D) times
#: |x|^2 + max |c|^2 (docs/design.md, "Tied rows"). Rows whose deciding gap
#: is below this many times sqrt(D) of that scale are tied: faiss's rounding decides them.
#: The factor leaves a wide margin above the largest error measured.
TIE_EPS_PER_SQRT_DIM = 4e-7
#: Rounding allowance of the float32 lower bounds, relative to the same scale.
_BOUND_MARGIN = 1e-4


def tie_eps(scale, dim: int):
    """The gap below which faiss's rounding decides, for rows of ``scale`` float64 [n]
    (|x|^2 + max |c|^2; a float gives the factor at scale 1)."""
    return TIE_EPS_PER_SQRT_DIM * np.sqrt(dim) * scale


def tied_rows(found_dist, m: int, eps, nearest_first: bool):
    """bool [n] (numpy or torch, as ``found_dist``): the rows of a search's ``found_dist``
    [n, m or m + 1] whose set of m words (needs the m + 1-th) or, with ``nearest_first``,
    whose nearest word is decided by a gap within ``eps`` [n]; None when neither can be."""
    tied = None
    if found_dist.shape[1] > m:
        tied = found_dist[:, m] - found_dist[:, m - 1] <= eps
    if nearest_first and found_dist.shape[1] > 1:
        first = found_dist[:, 1] - found_dist[:, 0] <= eps
        tied = first if tied is None else tied | first
    return tied


def max_sq_norm(centroids: np.ndarray) -> float:
    """max |c|^2 over ``centroids`` float32 [K, D], summed in float64."""
    return float(np.einsum("ij,ij->i", centroids, centroids, dtype=np.float64).max())


def tie_scale(vecs: np.ndarray, max_sq: float) -> np.ndarray:
    """float64 [n]: |x|^2 + max |c|^2, the scale of faiss's float32 rounding error for rows
    ``vecs`` float32 [n, D]; |x|^2 is summed in float32 (a tolerance's scale needs no
    more precision, and a float64 einsum casts every element)."""
    return np.einsum("ij,ij->i", vecs, vecs).astype(np.float64) + max_sq


@runtime_checkable
class Quantizer(Protocol):
    """A quantizer backend: the m nearest words of a block of rows, with its tied rows.

    ``asmkit.Codebook.assign`` calls ``search`` on blocks of rows, then settles the tied
    rows with faiss's direct loop (``settle_rows``).
    """

    def search(
        self, vecs: np.ndarray, m: int, dist: np.ndarray, words: np.ndarray, *, nearest_first: bool
    ) -> np.ndarray:
        """Fill ``dist`` float32 [n, m] and ``words`` int64 [n, m] (1 <= m <= K, nearest
        first) for rows ``vecs`` float32 [n, D]; return the tied rows, int64 [t]: those
        whose set of m words, or with ``nearest_first`` whose nearest word, the backend's
        rounding may decide (a gap within ``tie_eps``). The other rows' column 0 (with
        ``nearest_first``) and set of m words must be those of the exact distances (then
        also faiss's direct loop's)."""
        ...


def settle_rows(index, vecs: np.ndarray, m: int):
    """(dist float32 [t, m], words int64 [t, m]): faiss's m nearest words of rows ``vecs``
    float32 [t, D] through its direct loop, the same in any batch and thread count.

    faiss searches a batch of fewer than ``distance_compute_blas_threshold / D`` rows with
    a direct loop: the distance of each (row, word) pair is computed alone (float32,
    sum of squared differences in a fixed order), the rows are spread over the threads
    whole, and equal distances keep the lower word id. So a row's words there depend on
    the row alone; they are also the reference's for a query image of that size. The rows
    are searched in such batches, on the CPU flat ``index``.
    """
    t, d = vecs.shape
    dist = np.empty((t, m), dtype=np.float32)
    words = np.empty((t, m), dtype=np.int64)
    step = max(1, (int(faiss.cvar.distance_compute_blas_threshold) - 1) // d)
    for begin in range(0, t, step):
        rows = slice(begin, begin + step)
        with _kernels.faiss_thread_budget((min(t, begin + step) - begin) * index.ntotal * d):
            dist[rows], words[rows] = index.search(vecs[rows], m)
    return dist, words


class FaissQuantizer:
    """faiss's exhaustive search (``IndexFlatL2``, CPU or faiss-gpu) as a ``Quantizer``.

    Parameters
    ----------
    index : faiss index
        A flat L2 index holding ``centroids``.
    centroids : float32 [K, D]
        The centroids (their largest norm scales the tie tolerance).
    gpu : int, optional
        The faiss-gpu device of ``index``; None for faiss's CPU index (whose BLAS
        settings can then be tuned per call).

    Attributes
    ----------
    index : faiss index
    gpu : int or None
    """

    def __init__(self, index, centroids: np.ndarray, *, gpu: int | None = None) -> None:
        self.index = index
        self.gpu = gpu
        self._centroids = centroids
        self._max_sq: float | None = None

    def search(
        self, vecs: np.ndarray, m: int, dist: np.ndarray, words: np.ndarray, *, nearest_first: bool
    ) -> np.ndarray:
        """See ``Quantizer.search``. One faiss call on the block (large BLAS products),
        for m + 1 words, so that the rows whose deciding gap lies within float32 rounding
        can be returned as tied."""
        k, d = self.index.ntotal, self.index.d
        extra = int(m < k)
        # faiss's default BLAS blocks: smaller ones would shrink its distance buffer
        # (16 MiB) but slow the products down several times.
        with _kernels.faiss_thread_budget(len(vecs) * k * d):
            found_dist, found_words = self.index.search(vecs, m + extra)
        dist[:], words[:] = found_dist[:, :m], found_words[:, :m]
        if self._max_sq is None:
            self._max_sq = max_sq_norm(self._centroids)
        tied = tied_rows(found_dist, m, tie_eps(tie_scale(vecs, self._max_sq), d), nearest_first)
        return np.zeros(0, dtype=np.int64) if tied is None else np.flatnonzero(tied)


class PrunedQuantizer:
    """Exact nearest words of a codebook with a fraction of the full product's flops.

    Descriptors and centroids are centred and rotated onto the centroids' principal axes.
    On the first ``h`` axes the squared distance is computed as usual; the remaining axes
    are bounded by the difference of the two tail norms (reverse triangle inequality)::

        |x - c|^2 >= |x_h - c_h|^2 + (|x_t| - |c_t|)^2

    a product of width h + 1 instead of D. The exact float64 distance is computed only for
    words whose bound can beat the m-th nearest (``_kernels.pruned_nearest``). Local
    descriptors concentrate their energy on few axes, so few words are left to check and
    this costs a fraction of faiss's exhaustive search.

    A row whose nearest word, or whose set of m nearest, is decided by less than the
    float32 rounding of faiss's formula (``TIE_EPS_PER_SQRT_DIM``) is returned as tied,
    for ``settle_rows``, as the fallback's would be: the words do not depend on which of
    the two searched a block.

    Where pruning would not pay off (few words, spread-out descriptors), ``search`` hands
    the block to ``fallback``.

    Parameters
    ----------
    centroids : float32 [K, D]
    fallback : Quantizer
        The exhaustive search over the same centroids (``FaissQuantizer``).
    width : int, optional
        The bound's width (leading axes + 1 tail norm, a multiple of 8 below D) for every
        m and every block, even where it does not pay off; None chooses one per m from a
        sample of the first block (or the fallback when none pays off).
    """

    def __init__(self, centroids: np.ndarray, fallback: Quantizer, *, width: int | None = None) -> None:
        self._fallback = fallback
        self._fixed_width = width
        self._centroids = centroids
        # The rotation and norms are computed on the first block pruning is tried on
        # (``_prepare``): a codebook whose calls all go to the fallback never pays for them.
        self._prepared = False
        self._width: dict[int, int | None] = {}
        self._tables: dict[int, np.ndarray] = {}
        self._heads: dict[int, np.ndarray] = {}

    def _prepare(self) -> None:
        centroids = self._centroids
        self._max_sq = max_sq_norm(centroids)  # with |x|^2, the scale of the rounding tolerances
        self._mean = centroids.mean(axis=0, dtype=np.float64)
        # Principal axes first: they carry most of the distance, so the bound is tight.
        centred = centroids.astype(np.float64) - self._mean
        _, axes = np.linalg.eigh(centred.T @ centred)
        self._axes = np.ascontiguousarray(axes[:, ::-1])
        self._sq = np.einsum("ij,ij->i", centred, centred)
        self._sq32 = self._sq.astype(np.float32)
        self._prepared = True

    def _table_of(self, width: int) -> np.ndarray:
        """float32 [width, K]: the words' first width - 1 coordinates and tail norm,
        computed in float64 blocks of words (a tail near 0 survives the cancellation)."""
        h = width - 1
        k, d = self._centroids.shape
        table = np.empty((width, k), dtype=np.float32)
        step = max(256, (1 << 21) // d)  # float64 [step, D] temporaries of 16 MiB at most
        for begin in range(0, k, step):
            head = (self._centroids[begin : begin + step] - self._mean) @ self._axes[:, :h]
            table[:h, begin : begin + step] = head.T
            table[h, begin : begin + step] = np.sqrt(
                np.maximum(self._sq[begin : begin + step] - np.einsum("ij,ij->i", head, head), 0.0)
            )
        return table

    def _table(self, width: int) -> np.ndarray:
        """float32 [n_tiles, width, tile]: ``_table_of`` cut into tiles of words, the last
        one padded with zeros."""
        if width not in self._tables:
            k = self._centroids.shape[0]
            tile = min(_BOUND_TILE, k)
            n_tiles = -(-k // tile)
            tiles = np.zeros((width, n_tiles * tile), dtype=np.float32)
            tiles[:, :k] = self._table_of(width)
            self._tables[width] = np.ascontiguousarray(tiles.reshape(width, n_tiles, tile).transpose(1, 0, 2))
            self._heads[width] = np.ascontiguousarray(self._axes[:, : width - 1].T)
        return self._tables[width]

    def _choose_width(self, vecs: np.ndarray, m: int) -> int | None:
        """The bound width with the least estimated work on a sample of ``vecs``, or None
        when none beats ``_PRUNE_MAX_COST`` of the full product. Chosen once per m."""
        if self._fixed_width is not None:
            return self._fixed_width
        if m not in self._width:
            k, d = self._centroids.shape
            widths = [w for w in _WIDTH_CHOICES if w < d]
            sample = vecs[np.linspace(0, len(vecs) - 1, num=min(len(vecs), 256)).astype(np.int64)]
            # The m-th nearest distance of each sample row (float32 is precise enough for
            # an estimate), 16 rows at a time so that no [rows, K] array grows large.
            c_sq = np.einsum("ij,ij->i", self._centroids, self._centroids)
            mth = np.empty(len(sample))
            for begin in range(0, len(sample), 16):
                part = sample[begin : begin + 16]
                exact = np.einsum("ij,ij->i", part, part)[:, None] + c_sq[None] - 2 * part @ self._centroids.T
                mth[begin : begin + 16] = np.partition(exact, m - 1, axis=1)[:, m - 1]
            # The sample on the principal axes ([256, D], cheap to rotate whole).
            x = (sample.astype(np.float64) - self._mean) @ self._axes
            x_sq = np.einsum("ij,ij->i", x, x)
            # Every width's table from one product at the largest width (float32 is
            # precise enough for an estimate; the chosen table is built by _table_of).
            widest = self._table_of(widths[-1])
            head_sq = np.cumsum(widest[:-1] ** 2, axis=0)
            checked = np.zeros(len(widths))
            for i, width in enumerate(widths):
                tail = np.sqrt(np.maximum(self._sq - head_sq[width - 2], 0.0))
                table = np.vstack([widest[: width - 1], tail[None]]).astype(np.float32)
                xa = np.hstack([x[:, : width - 1], np.linalg.norm(x[:, width - 1 :], axis=1)[:, None]])
                xa = (-2.0 * xa).astype(np.float32)
                for begin in range(0, len(sample), 16):
                    bound = x_sq[begin : begin + 16, None] + self._sq[None] + xa[begin : begin + 16] @ table
                    checked[i] += (bound <= mth[begin : begin + 16, None]).sum()
            checked /= len(sample)
            best, best_cost = None, _PRUNE_MAX_COST * k * d
            for width, n_checked in zip(widths, checked):
                # In units of one multiply-add of faiss's product (docs/design.md, "The bound",
                # fits the weights): the bound product plus a pass over the bounds per word,
                # the projection, and a float64 distance per checked word, ten times the
                # cost of a multiply-add of the product.
                cost = k * (width + 7) + d * width + 10.0 * n_checked * d
                if cost < best_cost:
                    best, best_cost = width, cost
            self._width[m] = best
            logger.debug("pruned search m=%d: width %s (estimated cost %.0f of %d)", m, best, best_cost, k * d)
        return self._width[m]

    def search(
        self, vecs: np.ndarray, m: int, dist: np.ndarray, words: np.ndarray, *, nearest_first: bool
    ) -> np.ndarray:
        """See ``Quantizer.search``: the exact m nearest words, with the rows whose
        deciding gap is within float32 rounding returned as tied."""
        k = self._centroids.shape[0]
        width = None
        worth_trying = self._fixed_width is not None or k >= _PRUNE_MIN_WORDS
        if m + 1 <= k and len(vecs) and worth_trying:
            if not self._prepared:
                self._prepare()
            width = self._choose_width(vecs, m)
        if width is None:
            return self._fallback.search(vecs, m, dist, words, nearest_first=nearest_first)
        tied = np.empty(len(vecs), dtype=np.bool_)
        # Budgeted like the faiss search it replaces.
        with _kernels.thread_budget(len(vecs) * k * vecs.shape[1], _kernels.MIN_PARALLEL_MACS):
            table = self._table(width)
            _kernels.pruned_nearest(
                vecs,
                self._mean,
                self._heads[width],
                table,
                self._sq32,
                self._centroids,
                self._max_sq,
                _BOUND_MARGIN,
                tie_eps(1.0, vecs.shape[1]),
                nearest_first,
                4 * _kernels.numba.get_num_threads(),
                words,
                dist,
                tied,
            )
        return np.flatnonzero(tied)
