"""Visual codebook: faiss k-means training and exact multiple-assignment quantization (ASMK.md §1)."""

from __future__ import annotations

import logging
import os
import threading
import warnings

import faiss
import numpy as np

from . import _kernels, storage
from .kernel import check_vecs
from .params import parse_size

__all__ = ["Codebook"]

logger = logging.getLogger(__name__)

#: Descriptors per faiss search call (bounds its [rows, m] outputs: 4 MiB at m = 5).
_QUANTIZE_ROWS = 1 << 16
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
#: faiss computes distances as |x|^2 + |c|^2 - 2 x.c in float32 (BLAS), so two words whose
#: distances differ by less than its rounding error come out in an order that depends on
#: the BLAS tiling (docs/performance.md). Measured on all 1.2 M UKBench RootSIFT
#: descriptors (K = 4096, 6 nearest each), faiss's error never exceeded 6.9e-7 of
#: |x|^2 + max |c|^2 (D = 128); it grows like sqrt(D). Rows whose deciding gap is below
#: this many times sqrt(D) of that scale (4.5e-6 at D = 128: over 3x the largest gap error
#: seen) are left to faiss.
_TIE_EPS_PER_SQRT_DIM = 4e-7
#: Rounding allowance of the float32 lower bounds, relative to the same scale.
_BOUND_MARGIN = 1e-4


def _tie_eps(scale: np.ndarray, dim: int) -> np.ndarray:
    """float64 [n]: the gap below which faiss's rounding decides (``_TIE_EPS_PER_SQRT_DIM``)."""
    return _TIE_EPS_PER_SQRT_DIM * np.sqrt(dim) * scale


def _tied(found_dist, m: int, eps, nearest_first: bool):
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


def _check_segments(segments, n: int) -> np.ndarray:
    """int64 [S + 1] batch offsets: ``segments`` validated, or one batch per 65 536 rows."""
    if segments is None:
        return np.append(np.arange(0, n, _QUANTIZE_ROWS, dtype=np.int64), n) if n else np.zeros(2, np.int64)
    segments = np.asarray(segments)
    if (segments.ndim != 1 or len(segments) < 2 or segments.dtype.kind not in "iu" or segments[0] != 0
            or segments[-1] != n or np.any(np.diff(segments) < 0)):
        raise ValueError(f"segments: expected increasing row offsets from 0 to {n}, got {segments!r}")
    return segments.astype(np.int64)


#: Query rows per BLAS block of faiss's batched searches whose rounding does not matter
#: (``Codebook._faiss_block``): its [rows, 1024] float32 distance buffer is 2 MiB.
_BATCH_QUERY_BS = 512
#: Serialises the calls that change faiss's process-wide BLAS settings for one call
#: (``_faiss_search_rows``, ``Codebook._faiss_block``): two threads doing so at once could
#: leave the wrong value behind.
_FAISS_SETTINGS = threading.Lock()


def _faiss_search_rows(index, vecs, local, seg_size, m):
    """faiss's (dist float32 [t, m], words int64 [t, m]) for rows ``vecs`` float32 [t, D]
    as faiss gives them when called once on each row's segment, the row being at offset
    ``local`` int64 [t] of its segment of ``seg_size`` int64 [t] rows, without searching
    the rest of the segments."""
    with _FAISS_SETTINGS:
        return _faiss_search_rows_locked(index, vecs, local, seg_size, m)


def _faiss_search_rows_locked(index, vecs, local, seg_size, m):
    """See ``_faiss_search_rows``.

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
    # The BLAS tiling also depends on the thread count: each batch gets the threads that
    # ``Codebook.quantize`` gives faiss for the whole segment.
    parallel = seg_size * index.ntotal * d >= _kernels.MIN_PARALLEL_MACS
    for s, par in sorted(set(zip(size.tolist(), parallel.tolist()))):
        in_group = (size == s) & (parallel == par)
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
            with _kernels.faiss_thread_budget(_kernels.MIN_PARALLEL_MACS if par else 0):
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


class _PrunedSearch:
    """Exact nearest words of a codebook with a fraction of the full product's flops.

    Descriptors and centroids are centred and rotated onto the centroids' principal axes.
    On the first ``h`` axes the squared distance is computed as usual; the remaining axes
    are bounded by the difference of the two tail norms (reverse triangle inequality)::

        |x - c|^2 >= |x_h - c_h|^2 + (|x_t| - |c_t|)^2

    a product of width h + 1 instead of D. The exact float64 distance is computed only for
    words whose bound can beat the m-th nearest (``_kernels.pruned_nearest``). Local
    descriptors concentrate their energy on few axes (RootSIFT with h = 15 leaves about 50
    of 4096 words to check), so this costs a fraction of faiss's exhaustive search.

    The words are faiss's: a row whose nearest word, or whose set of m nearest, is decided
    by less than the float32 rounding of faiss's own formula (``_TIE_EPS_PER_SQRT_DIM``) is
    searched again with faiss, laid out as faiss would have met it (``_faiss_search_rows``). So
    column 0 and the set of m words of ``search(vecs)`` equal one faiss call on ``vecs``;
    only columns 1..m-1 may order two words that tie within rounding differently (by their
    exact distance), which no ASMK result depends on.
    """

    def __init__(self, centroids: np.ndarray, max_sq: float) -> None:
        self._centroids = centroids
        self._max_sq = max_sq  # max |c|^2: with |x|^2, the scale of the rounding tolerances
        self._mean = centroids.mean(axis=0, dtype=np.float64)
        # Principal axes first: they carry most of the distance, so the bound is tight.
        centred = centroids.astype(np.float64) - self._mean
        _, axes = np.linalg.eigh(centred.T @ centred)
        self._axes = np.ascontiguousarray(axes[:, ::-1])
        self._sq = np.einsum("ij,ij->i", centred, centred)
        self._sq32 = self._sq.astype(np.float32)
        self._width: dict[int, int | None] = {}
        self._tables: dict[int, np.ndarray] = {}
        self._heads: dict[int, np.ndarray] = {}

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
                np.maximum(self._sq[begin : begin + step] - np.einsum("ij,ij->i", head, head), 0.0))
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
                # In units of one multiply-add of faiss's product (measured on RootSIFT,
                # docs/performance.md): the bound product plus a pass over the bounds per
                # word, the projection, and a float64 distance per checked word at about a
                # tenth of the product's speed.
                cost = k * (width + 7) + d * width + 10.0 * n_checked * d
                if cost < best_cost:
                    best, best_cost = width, cost
            self._width[m] = best
            logger.debug("pruned search m=%d: width %s (estimated cost %.0f of %d)", m, best, best_cost, k * d)
        return self._width[m]

    def search(self, vecs: np.ndarray, m: int, dist: np.ndarray, words: np.ndarray,
               nearest_first: bool = True) -> np.ndarray | None:
        """Fill ``dist`` float32 [n, m] and ``words`` int64 [n, m] with the exact m nearest
        words; return the rows (int64) whose deciding gap is within float32 rounding, for
        faiss to order (``_faiss_search_rows``). None, untouched, when pruning would not
        pay off for these descriptors."""
        k = self._centroids.shape[0]
        if m + 1 > k or len(vecs) == 0:
            return None
        width = self._choose_width(vecs, m)
        if width is None:
            return None
        ambiguous = np.empty(len(vecs), dtype=np.bool_)
        # Budgeted like the faiss search it replaces.
        with _kernels.thread_budget(len(vecs) * k * vecs.shape[1], _kernels.MIN_PARALLEL_MACS):
            table = self._table(width)
            _kernels.pruned_nearest(
                vecs, self._mean, self._heads[width], table, self._sq32, self._centroids, self._max_sq,
                _BOUND_MARGIN, _tie_eps(1.0, vecs.shape[1]), nearest_first,
                4 * _kernels.numba.get_num_threads(), words, dist, ambiguous,
            )
        return np.flatnonzero(ambiguous)


def _faiss_gpu_count() -> int:
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except RuntimeError:
        return 0


def _resolve_gpu(gpu) -> tuple[str, int] | None:
    """Where to quantize: ("faiss", id) with faiss-gpu, else ("torch", id) with a CUDA
    build of torch, else None (CPU) with one warning when a GPU was requested."""
    if gpu is None:
        return None
    if isinstance(gpu, bool) or not isinstance(gpu, (int, np.integer)) or gpu < 0:
        raise ValueError(f"gpu: expected None or a non-negative GPU id, got {gpu!r}")
    gpu = int(gpu)
    if gpu < _faiss_gpu_count():
        return ("faiss", gpu)
    from .gpu import cuda_device_count

    if gpu < cuda_device_count():
        return ("torch", gpu)
    warnings.warn(
        f"gpu: no GPU {gpu} available to faiss or torch (CPU builds or no device); using the CPU",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def _faiss_gpu_of(device: tuple[str, int] | None) -> int | None:
    """The faiss GPU id of a ``_resolve_gpu`` result, None unless faiss-gpu runs it."""
    return device[1] if device is not None and device[0] == "faiss" else None


def _flat_index(dim: int, gpu: int | None):
    if gpu is None:
        return faiss.IndexFlatL2(dim)
    config = faiss.GpuIndexFlatConfig()
    config.device = gpu
    return faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), dim, config)


class Codebook:
    """A set of K visual words (centroids) with exact L2 quantization.

    Parameters
    ----------
    centroids : float32 [K, D]
        The visual words; float64/integer input is converted.
    gpu : int, optional
        GPU id for quantization: faiss-gpu's when faiss has that GPU, else CUDA through
        torch (``asmkit.gpu``, the CPU reference's words); the CPU with one warning when
        neither has it.

    Attributes
    ----------
    centroids : float32 [K, D]
    size : int
        K.
    dim : int
        D.
    prune : bool
        CPU quantization skips words by a lower bound (``_PrunedSearch``, same words as
        faiss's exhaustive search, several times fewer flops); False searches
        exhaustively with faiss alone. Default True.
    """

    def __init__(self, centroids, *, gpu: int | None = None) -> None:
        centroids = check_vecs(centroids, name="centroids")
        if centroids.shape[0] == 0:
            raise ValueError("centroids: a codebook needs at least one centroid")
        if not centroids.flags.writeable:
            # A memory-mapped codebook is read-only; numba compiles every kernel once more
            # for read-only arrays (the pruned search: 3 s), so it is read into memory
            # (at most a few tens of MB; the inverted file stays mapped).
            centroids = centroids.copy()
        self._centroids = centroids
        self._device = _resolve_gpu(gpu)
        self._index = None
        self._torch = None
        self._pruned = None
        self._max_sq = None
        self.prune = True

    @property
    def centroids(self) -> np.ndarray:
        return self._centroids

    @property
    def size(self) -> int:
        return int(self._centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self._centroids.shape[1])

    def __repr__(self) -> str:
        return f"Codebook(size={self.size}, dim={self.dim})"

    @classmethod
    def train(cls, vecs, size, *, iters: int = 10, seed: int = 1234, gpu: int | None = None) -> "Codebook":
        """k-means on training descriptors with faiss, as the reference trains its codebook.

        Parameters
        ----------
        vecs : float32 [N, D]
            Training descriptors (N >= size).
        size : int or str
            Number of words K, e.g. ``4096`` or ``"64k"``.
        iters : int
            k-means iterations (the reference uses 10).
        seed : int
            faiss k-means seed (faiss and the reference default to 1234).
        gpu : int, optional
            GPU id: k-means on faiss-gpu's device when faiss has it (otherwise on the CPU);
            quantization as for ``Codebook(..., gpu=...)``.

        Returns
        -------
        Codebook

        Raises
        ------
        ValueError
            Bad ``vecs`` (see ``check_vecs``), ``size`` larger than the number of training
            vectors, or bad ``iters``/``seed``.
        """
        k = parse_size(size)
        vecs = check_vecs(vecs, name="vecs")
        if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 1:
            raise ValueError(f"iters: expected a positive int, got {iters!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        if vecs.shape[0] < k:
            raise ValueError(f"vecs: {vecs.shape[0]} training vectors cannot make {k} clusters (size)")
        device = _resolve_gpu(gpu)
        dim = vecs.shape[1]
        clustering = faiss.Clustering(dim, k)
        clustering.verbose = False
        clustering.niter = int(iters)
        # faiss keeps the seed in an int32 field.
        clustering.seed = int(seed) % (2**31)
        index = _flat_index(dim, _faiss_gpu_of(device))
        logger.info("k-means: %d vectors of dim %d into %d words, %d iterations", vecs.shape[0], dim, k, iters)
        clustering.train(vecs, index)
        centroids = faiss.vector_float_to_array(clustering.centroids).reshape(k, dim)
        book = cls(centroids)
        book._device = device
        return book

    def _search_index(self):
        if self._index is None:
            index = _flat_index(self.dim, _faiss_gpu_of(self._device))
            index.add(self._centroids)
            self._index = index
        return self._index

    def _pruned_search(self) -> _PrunedSearch | None:
        if self._device is not None or not self.prune or self.size < _PRUNE_MIN_WORDS:
            return None
        if self._pruned is None:
            self._pruned = _PrunedSearch(self._centroids, self._max_c_sq())
        return self._pruned

    def _torch_search(self):
        """The CUDA quantizer (``asmkit.gpu.TorchQuantizer``) when the codebook runs on a
        GPU through torch, else None."""
        if self._device is None or self._device[0] != "torch":
            return None
        if self._torch is None:
            from .gpu import TorchQuantizer

            self._torch = TorchQuantizer(self._centroids, f"cuda:{self._device[1]}", _tie_eps(1.0, self.dim))
        return self._torch

    def _max_c_sq(self) -> float:
        if self._max_sq is None:
            self._max_sq = float(np.einsum("ij,ij->i", self._centroids, self._centroids, dtype=np.float64).max())
        return self._max_sq

    def _tie_scale(self, vecs: np.ndarray) -> np.ndarray:
        """float64 [n]: |x|^2 + max |c|^2, the scale of faiss's float32 rounding error.

        |x|^2 is summed in float32, a fifth of the time of a float64 einsum (which casts
        every element): a tolerance's scale needs no more precision."""
        return np.einsum("ij,ij->i", vecs, vecs).astype(np.float64) + self._max_c_sq()

    def _faiss_block(self, vecs, m, index, several, dist, words, nearest_first) -> np.ndarray:
        """faiss's exhaustive search of a block in one call (large BLAS products, fast).

        When the block holds ``several`` segments, m + 1 words are searched and the rows
        whose deciding gap lies within float32 rounding are returned, for a search as their
        segment's own call would do it (``_faiss_search_rows``)."""
        extra = int(m < self.size and several)
        if several and _faiss_gpu_of(self._device) is None:
            # Rows whose order this call's rounding decides are searched again per segment,
            # so the layout is free: faiss's BLAS blocks of _BATCH_QUERY_BS rows instead of
            # 4096 keep its distance buffer at 2 MiB instead of 16 (a process-wide setting,
            # restored right after, under the lock that serialises such overrides).
            with _FAISS_SETTINGS, _kernels.faiss_thread_budget(len(vecs) * self.size * self.dim):
                default = faiss.cvar.distance_compute_blas_query_bs
                faiss.cvar.distance_compute_blas_query_bs = min(default, _BATCH_QUERY_BS)
                try:
                    found_dist, found_words = index.search(vecs, m + extra)
                finally:
                    faiss.cvar.distance_compute_blas_query_bs = default
        else:
            with _kernels.faiss_thread_budget(len(vecs) * self.size * self.dim):
                found_dist, found_words = index.search(vecs, m + extra)
        dist[:], words[:] = found_dist[:, :m], found_words[:, :m]
        if not several:
            return np.zeros(0, dtype=np.int64)  # the block is its segment's own call
        tied = _tied(found_dist, m, _tie_eps(self._tie_scale(vecs), self.dim), nearest_first)
        return np.zeros(0, dtype=np.int64) if tied is None else np.flatnonzero(tied)

    def quantize(self, vecs, m: int = 1, *, return_distances: bool = False, segments=None,
                 nearest_first: bool = True):
        """The m nearest words of each descriptor (exact L2, as faiss ``IndexFlatL2``).

        On the CPU, words that cannot be nearest are skipped by a lower bound
        (``_PrunedSearch``); the other rows, or all of them when that would not pay off,
        are searched by faiss. The result is faiss's in either case: where two distances
        agree to within float32 rounding, the words come out in the order faiss gives them
        when called once per segment (faiss's rounding depends on the batch it is given).

        Parameters
        ----------
        vecs : float32 [N, D]
            Descriptors (all images at once).
        m : int
            Multiple assignment. With ``m > K`` every word is returned (m is clipped to K).
        return_distances : bool
            Also return the squared distances.
        segments : int64 [S + 1], optional
            Row offsets (0 first, N last) of the batches whose faiss call to reproduce at
            float32 ties: the reference quantizes its database in one call and each query
            image in its own. Default: one call per 65 536 rows.
        nearest_first : bool
            False when only the set of m words matters (query-side multiple assignment):
            column 0 may then hold another of two words tied within float32 rounding with
            it, which saves re-searching those rows with faiss.

        Returns
        -------
        words : int64 [N, min(m, K)]
            Word ids, nearest first (column 0 is the hard assignment). Columns 1..m-2 may
            order two words that tie within float32 rounding differently from faiss: only
            column 0 and the set of m words enter ASMK.
        distances : float32 [N, min(m, K)]
            Only with ``return_distances``.
        """
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"m: expected a positive int, got {m!r}")
        vecs = check_vecs(vecs, name="vecs", dim=self.dim)
        return self._quantize(vecs, int(m), segments, nearest_first, return_distances)

    def _quantize(self, vecs, m, segments=None, nearest_first=True, return_distances=False):
        """``quantize`` for descriptors already checked (``check_vecs``): engine callers
        that validated them once (``prepare_descriptors``) skip a second pass over them."""
        m = min(m, self.size)
        segments = _check_segments(segments, vecs.shape[0])
        words, dist, redo = self._quantize_unsettled(vecs, m, segments, nearest_first, return_distances)
        if redo.size:
            seg = np.searchsorted(segments, redo, side="right") - 1
            dist_redo, words[redo] = self._settle(vecs[redo], redo - segments[seg], segments[seg + 1] - segments[seg], m)
            if return_distances:
                dist[redo] = dist_redo
        return (words, dist) if return_distances else words

    def _quantize_unsettled(self, vecs, m, segments, nearest_first, return_distances=False):
        """``quantize`` without its last step: (words int64 [N, m], dist float32 [N or 0, m],
        rows int64 [t]) where the listed rows' words are provisional, tied within float32
        rounding; ``_settle`` gives faiss's. ``vecs`` and ``segments`` are checked by the
        caller; m is clipped to K as in ``quantize``."""
        m = min(int(m), self.size)
        n = vecs.shape[0]
        words = np.empty((n, m), dtype=np.int64)
        dist = np.empty((n if return_distances else 0, m), dtype=np.float32)
        index = self._search_index()
        pruned = None if self._one_blas_block(segments) else self._pruned_search()
        on_torch = self._torch_search()
        # Blocks of whole segments, about _QUANTIZE_ROWS rows each, bound the per-row
        # temporaries (faiss's outputs, the pruned search's flags). Rows tied within float32
        # rounding are left for one _settle call over the whole call (or several calls), so
        # that rows of many blocks share faiss's batches.
        flagged = []
        first = 0
        while first < len(segments) - 1:
            last = max(first + 1, int(np.searchsorted(segments, segments[first] + _QUANTIZE_ROWS, side="right")) - 1)
            begin, end = int(segments[first]), int(segments[last])
            block_words = words[begin:end]
            block_dist = dist[begin:end] if return_distances else np.empty((end - begin, m), dtype=np.float32)
            if on_torch is not None:
                # Its float32 rounding is never faiss's: its tied rows are always settled.
                rows = on_torch.search(vecs[begin:end], m, block_dist, block_words, nearest_first)
            else:
                rows = None if pruned is None else pruned.search(vecs[begin:end], m, block_dist, block_words,
                                                                 nearest_first)
            if rows is None:
                rows = self._faiss_block(vecs[begin:end], m, index, last - first > 1, block_dist, block_words,
                                         nearest_first)
            flagged.append(rows + begin)
            first = last
        redo = np.concatenate(flagged) if flagged else np.zeros(0, dtype=np.int64)
        return words, dist, redo

    def _one_blas_block(self, segments: np.ndarray) -> bool:
        """Whether the call is one segment that faiss searches as one BLAS block (a query
        image of >= 1000 descriptors at D = 128, searched alone). A tied row of such a
        segment is searched again as faiss's call of the whole segment, which costs that
        call itself, and such images hold a tied row most of the time (84 % for 1000
        RootSIFT descriptors at K = 4096): faiss's own call is then cheaper than the
        bound plus the redo."""
        n = int(segments[-1])
        return (len(segments) == 2 and n * self.dim >= faiss.cvar.distance_compute_blas_threshold
                and n <= faiss.cvar.distance_compute_blas_query_bs)

    def _settle(self, vecs, local, seg_size, m):
        """faiss's (dist float32 [t, m], words int64 [t, m]) for descriptors ``vecs`` float32
        [t, D], each at offset ``local`` of a segment of ``seg_size`` rows (int64 [t]) that
        faiss searches in one call (``quantize``'s segments)."""
        return _faiss_search_rows(self._search_index(), vecs, local, seg_size, m)

    def save(self, path: str | os.PathLike) -> None:
        """Write the centroids as an asmkit directory (kind ``"codebook"``)."""
        storage.save_arrays(path, {"centroids": self._centroids}, {"size": self.size, "dim": self.dim}, kind="codebook")

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True, gpu: int | None = None) -> "Codebook":
        """Read a codebook written by ``save``.

        Raises
        ------
        FileNotFoundError, asmkit.storage.StorageError
            Missing, corrupted or wrong-kind directory.
        """
        arrays, _ = storage.load_arrays(path, kind="codebook", mmap=False, verify=verify)
        if "centroids" not in arrays:
            raise storage.StorageError(f"{path}: codebook directory without a 'centroids' array")
        return cls(arrays["centroids"], gpu=gpu)
