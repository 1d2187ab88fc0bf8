"""Quantizer backends: the m nearest words of descriptors, with faiss's words at float32 ties.

The reference quantizes with faiss ``IndexFlatL2``, which computes |x|^2 + |c|^2 - 2 x.c in
float32. Where two words' distances agree to within that rounding, the word faiss returns
depends on the batch it was called on (the BLAS tiling of the row's block). asmkit
reproduces it in two steps:

1. a backend (``Quantizer``) fills the words of a block of rows and returns the rows whose
   deciding gap lies within float32 rounding (``tied_rows``): their words are
   provisional;
2. ``settle_rows`` searches those rows again with faiss, each laid out as faiss met it in
   its segment's own call, on ``settle_threads()`` OpenMP threads (faiss's tiling, so the
   rounding, depends on the thread count too; the setting makes the words independent of
   the caller's).

``asmkit.Codebook.assign`` drives both steps and returns an ``Assignment`` whose
``settle()`` runs the second. Backends: ``FaissQuantizer`` (faiss's exhaustive search, CPU
or faiss-gpu), ``PrunedQuantizer`` (a lower bound skips most words; CPU) and
``asmkit.gpu.TorchQuantizer`` (CUDA through torch).
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol, runtime_checkable

import faiss
import numpy as np

from . import _kernels
from ._validation import check_int

__all__ = [
    "FaissQuantizer",
    "PrunedQuantizer",
    "Quantizer",
    "max_sq_norm",
    "set_settle_threads",
    "settle_rows",
    "settle_threads",
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

    ``asmkit.Codebook.assign`` calls ``search`` on blocks of whole segments (a segment is
    the batch of rows the reference quantizes in one faiss call), then settles the tied
    rows with faiss (``settle_rows``).
    """

    def search(
        self, vecs: np.ndarray, m: int, dist: np.ndarray, words: np.ndarray, *, nearest_first: bool, one_segment: bool
    ) -> np.ndarray:
        """Fill ``dist`` float32 [n, m] and ``words`` int64 [n, m] (1 <= m <= K, nearest
        first) for rows ``vecs`` float32 [n, D]; return the tied rows, int64 [t]: those
        whose set of m words, or with ``nearest_first`` whose nearest word, float32
        rounding decides. ``one_segment``: the block is one segment, so a backend that
        computes exactly as faiss's own call on it may return no tied rows."""
        ...


#: Serialises the calls that change faiss's process-wide BLAS settings for one call
#: (``settle_rows``): two threads doing so at once could leave the wrong value behind.
_FAISS_SETTINGS = threading.Lock()
#: faiss's OpenMP threads for the calls that decide tied rows: the process's default at
#: import, what the reference's own faiss calls run with.
_SETTLE_THREADS = max(1, int(faiss.omp_get_max_threads()))


def settle_threads() -> int:
    """faiss's OpenMP thread count with which the words of tied rows are decided."""
    return _SETTLE_THREADS


def set_settle_threads(threads: int) -> None:
    """Decide the words of tied rows (``settle_rows``, and a segment searched as one block)
    with faiss on ``threads`` OpenMP threads, whatever the caller's faiss and numba thread
    counts: faiss's float32 rounding, so the word it returns for a tie, depends on its
    thread count. The default is faiss's own default in this process (the reference
    ``asmk`` runs with that one); Ray workers get the driver's value
    (``asmkit.distributed``), so that they quantize as the driver would."""
    global _SETTLE_THREADS
    _SETTLE_THREADS = check_int(threads, "threads", min=1)


def _deciding_threads(work: int) -> int:
    """faiss's threads for a call that decides words (a segment's own call, or the settling
    of its tied rows), ``work`` its multiply-adds: one below the parallel threshold, as
    ``FaissQuantizer.search`` runs a small call, else ``settle_threads()``."""
    return _SETTLE_THREADS if work >= _kernels.MIN_PARALLEL_MACS else 1


def settle_rows(index, vecs, local, seg_size, m):
    """faiss's (dist float32 [t, m], words int64 [t, m]) for rows ``vecs`` float32 [t, D]
    as faiss gives them when called once on each row's segment, the row being at offset
    ``local`` int64 [t] of its segment of ``seg_size`` int64 [t] rows, without searching
    the rest of the segments."""
    with _FAISS_SETTINGS:
        return _settle_rows_locked(index, vecs, local, seg_size, m)


def _settle_rows_locked(index, vecs, local, seg_size, m):
    """See ``settle_rows``.

    faiss takes a direct loop when ``n * D < distance_compute_blas_threshold`` (the
    rounding of a row is then its own), and otherwise BLAS products on blocks of
    ``distance_compute_blas_query_bs`` rows (4096), where the float32 rounding of a row's
    distances depends on its offset in its block and on the block's size (the BLAS
    kernel's tiling): two words that tie within rounding can come out in either order. So
    rows of direct-loop segments are searched together in direct-loop batches, and each
    row of a BLAS segment at its own offset, in a batch of its original block's size (the
    other slots hold copies of one of its rows).
    """
    block = max(1, int(faiss.cvar.distance_compute_blas_query_bs))
    threshold = int(faiss.cvar.distance_compute_blas_threshold)
    t, d = vecs.shape
    dist = np.empty((t, m), dtype=np.float32)
    words = np.empty((t, m), dtype=np.int64)
    direct = seg_size * d < threshold
    small = np.flatnonzero(direct)
    step = max(1, (threshold - 1) // d)
    for begin in range(0, len(small), step):
        pick = small[begin : begin + step]
        with _kernels.faiss_thread_budget(len(pick) * index.ntotal * d):
            dist[pick], words[pick] = index.search(vecs[pick], m)
    rows, local, seg_size = np.flatnonzero(~direct), local[~direct], seg_size[~direct]
    offset = local % block
    size = np.minimum(block, seg_size - (local - offset))
    # The BLAS tiling also depends on the thread count: each batch gets the threads of
    # the deciding call on the whole segment.
    threads = np.array([_deciding_threads(n * index.ntotal * d) for n in seg_size.tolist()], dtype=np.int64)
    for s, n_threads in sorted(set(zip(size.tolist(), threads.tolist()))):
        in_group = (size == s) & (threads == n_threads)
        group, group_offset = rows[in_group], offset[in_group]
        # Rows sharing an offset go to successive batches.
        order = np.argsort(group_offset, kind="stable")
        first = np.searchsorted(group_offset[order], group_offset[order], side="left")
        batch_of = np.empty(len(group), dtype=np.int64)
        batch_of[order] = np.arange(len(group)) - first
        for b in range(int(batch_of.max()) + 1):
            pick = batch_of == b
            batch = np.empty((s, d), dtype=np.float32)
            batch[:] = vecs[group[pick][0]]
            batch[group_offset[pick]] = vecs[group[pick]]
            with _kernels.faiss_threads(n_threads):
                # A short final block of a BLAS call must stay on the BLAS path (a
                # process-wide faiss setting, restored right after).
                if s * d < threshold:
                    faiss.cvar.distance_compute_blas_threshold = s * d
                try:
                    batch_dist, batch_words = index.search(batch, m)
                finally:
                    faiss.cvar.distance_compute_blas_threshold = threshold
            dist[group[pick]] = batch_dist[group_offset[pick]]
            words[group[pick]] = batch_words[group_offset[pick]]
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
        self, vecs: np.ndarray, m: int, dist: np.ndarray, words: np.ndarray, *, nearest_first: bool, one_segment: bool
    ) -> np.ndarray:
        """See ``Quantizer.search``. One faiss call on the block (large BLAS products). A
        block of several segments is searched for m + 1 words, so that the rows whose
        deciding gap lies within float32 rounding can be returned as tied; a block of
        ``one_segment`` is the segment's deciding call, on ``settle_threads()`` threads
        when parallel."""
        k, d = self.index.ntotal, self.index.d
        extra = int(m < k and not one_segment)
        work = len(vecs) * k * d
        if one_segment:
            threads = _kernels.faiss_threads(_deciding_threads(work))
        else:
            threads = _kernels.faiss_thread_budget(work)
        # faiss's default BLAS blocks: smaller ones would shrink its distance buffer
        # (16 MiB) but slow the products down several times.
        with threads:
            found_dist, found_words = self.index.search(vecs, m + extra)
        dist[:], words[:] = found_dist[:, :m], found_words[:, :m]
        if one_segment:
            return np.zeros(0, dtype=np.int64)
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
    float32 rounding of faiss's own formula (``TIE_EPS_PER_SQRT_DIM``) is returned as tied,
    for ``settle_rows``. Once settled, column 0 and the set of m words equal faiss's; only
    columns 1..m-1 may order two words that tie within rounding differently (by their
    exact distance), which no ASMK result depends on.

    Where pruning would not pay off (few words, spread-out descriptors, or a segment that
    faiss searches as one BLAS block), ``search`` hands the block to ``fallback``.

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
        self, vecs: np.ndarray, m: int, dist: np.ndarray, words: np.ndarray, *, nearest_first: bool, one_segment: bool
    ) -> np.ndarray:
        """See ``Quantizer.search``: the exact m nearest words, with the rows whose
        deciding gap is within float32 rounding returned as tied."""
        k = self._centroids.shape[0]
        width = None
        worth_trying = self._fixed_width is not None or (
            k >= _PRUNE_MIN_WORDS and not (one_segment and self._one_blas_block(vecs))
        )
        if m + 1 <= k and len(vecs) and worth_trying:
            if not self._prepared:
                self._prepare()
            width = self._choose_width(vecs, m)
        if width is None:
            return self._fallback.search(vecs, m, dist, words, nearest_first=nearest_first, one_segment=one_segment)
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

    @staticmethod
    def _one_blas_block(vecs: np.ndarray) -> bool:
        """Whether faiss searches the segment ``vecs`` as one BLAS block (a query image of
        >= 1000 descriptors at D = 128, searched alone). A tied row of such a segment is
        settled by faiss's call of the whole segment, which costs that call itself, and
        such images hold a tied row most of the time: faiss's own call is then cheaper
        than the bound plus the settling."""
        n, d = vecs.shape
        return n * d >= faiss.cvar.distance_compute_blas_threshold and n <= faiss.cvar.distance_compute_blas_query_bs
