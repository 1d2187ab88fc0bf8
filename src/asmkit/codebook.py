"""Visual codebook: faiss k-means training and exact multiple-assignment quantization (docs/math.md §1).

``Codebook.assign`` is the one quantizer contract of the engine: it returns an
``Assignment`` whose words are final except for the rows float32 rounding ties
(``Assignment.tied``), which ``Assignment.settle`` gives faiss's words. The backends that
fill the words implement ``asmkit.quantizer.Quantizer``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence

import faiss
import numpy as np

from . import storage
from ._validation import ArgumentError, check_bool, check_int, check_vecs
from .params import parse_size
from .quantizer import FaissQuantizer, PrunedQuantizer, Quantizer, settle_rows, tie_eps

__all__ = ["Assignment", "Codebook"]

logger = logging.getLogger(__name__)

#: Descriptors per faiss search call (bounds its [rows, m] outputs: 4 MiB at m = 5).
QUANTIZE_ROWS = 1 << 16


def _check_segments(segments, n: int) -> np.ndarray:
    """int64 [S + 1] batch offsets: ``segments`` validated, or one batch per
    ``QUANTIZE_ROWS`` rows."""
    if segments is None:
        return np.append(np.arange(0, n, QUANTIZE_ROWS, dtype=np.int64), n) if n else np.zeros(2, np.int64)
    segments = np.asarray(segments)
    if (
        segments.ndim != 1
        or len(segments) < 2
        or segments.dtype.kind not in "iu"
        or segments[0] != 0
        or segments[-1] != n
        or np.any(np.diff(segments) < 0)
    ):
        raise ArgumentError(f"segments: expected increasing row offsets from 0 to {n}, got {segments!r}")
    return segments.astype(np.int64)


class Assignment:
    """The words of N descriptors (``Codebook.assign``), some provisional until ``settle``.

    Attributes
    ----------
    words : int64 [N, m]
        The m nearest words of each row, nearest first. The rows listed in ``tied`` hold
        provisional words until ``settle``.
    tied : int64 [t]
        The rows whose set of m words (or, when assigned ``nearest_first``, whose nearest
        word) float32 rounding decides: faiss's words for them depend on the batch faiss
        is called on. Empty once settled.
    distances : float32 [N, m] or None
        Squared distances, when asked for (``Codebook.quantize(return_distances=True)``).
    """

    def __init__(
        self,
        words: np.ndarray,
        tied: np.ndarray,
        distances: np.ndarray | None,
        tied_vecs: np.ndarray,
        local: np.ndarray,
        seg_size: np.ndarray,
        settle: Callable[..., tuple[np.ndarray, np.ndarray]],
    ) -> None:
        self.words = words
        self.tied = tied
        self.distances = distances
        # What settling needs of each tied row: its descriptor, its offset in its segment
        # and the segment's size (the layout of the faiss call to reproduce).
        self._tied_vecs = tied_vecs
        self._local = local
        self._seg_size = seg_size
        self._settle = settle

    @property
    def m(self) -> int:
        return int(self.words.shape[1])

    def __len__(self) -> int:
        return int(self.words.shape[0])

    def settle(self) -> np.ndarray:
        """Replace the tied rows' provisional words by faiss's (in place) and return
        ``words`` int64 [N, m], final: column 0 and the set of m words of each row equal
        faiss's call on the row's segment."""
        if self.tied.size:
            dist, self.words[self.tied] = self._settle(self._tied_vecs, self._local, self._seg_size, self.m)
            if self.distances is not None:
                self.distances[self.tied] = dist
            self.tied = np.zeros(0, dtype=np.int64)
        return self.words

    def tied_part(self) -> Assignment:
        """An ``Assignment`` of the tied rows alone (their provisional words, copied), to
        settle later, possibly joined with others (``Assignment.concatenate``) so that
        rows of many calls share faiss's batches."""
        return Assignment(
            self.words[self.tied],
            np.arange(self.tied.size, dtype=np.int64),
            None,
            self._tied_vecs,
            self._local,
            self._seg_size,
            self._settle,
        )

    @staticmethod
    def concatenate(parts: Sequence[Assignment]) -> Assignment:
        """The rows of several assignments of one codebook and one m, in order."""
        if not parts:
            raise ArgumentError("parts: need at least one Assignment")
        offsets = np.cumsum([0] + [len(part) for part in parts[:-1]])
        return Assignment(
            np.concatenate([part.words for part in parts]),
            np.concatenate([part.tied + offset for part, offset in zip(parts, offsets)]),
            None,
            np.concatenate([part._tied_vecs for part in parts]),
            np.concatenate([part._local for part in parts]),
            np.concatenate([part._seg_size for part in parts]),
            parts[0]._settle,
        )


def _faiss_gpu_count() -> int:
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except RuntimeError:
        return 0


def _flat_index(dim: int, gpu: int | None):
    if gpu is None:
        return faiss.IndexFlatL2(dim)
    config = faiss.GpuIndexFlatConfig()
    config.device = gpu
    return faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), dim, config)


def _gpu_quantizer(centroids: np.ndarray, gpu: int | None) -> Quantizer | None:
    """The quantizer of GPU ``gpu``: faiss-gpu's when faiss has it, else CUDA through torch
    (``asmkit.gpu.TorchQuantizer``); None for the CPU, with one warning when a GPU was
    requested that neither has."""
    gpu = check_int(gpu, "gpu", min=0, none=True)
    if gpu is None:
        return None
    if gpu < _faiss_gpu_count():
        index = _flat_index(centroids.shape[1], gpu)
        index.add(centroids)
        return FaissQuantizer(index, centroids, gpu=gpu)
    from .gpu import TorchQuantizer, cuda_device_count

    if gpu < cuda_device_count():
        return TorchQuantizer(centroids, f"cuda:{gpu}", tie_eps(1.0, centroids.shape[1]), gpu=gpu)
    warnings.warn(
        f"gpu: no GPU {gpu} available to faiss or torch (CPU builds or no device); using the CPU",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


#: How far apart the two halves of a split word start (relative, per coordinate): faiss's.
_SPLIT_EPS = 1.0 / 1024


def _lloyd(vecs: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """Lloyd's k-means of float32 ``[N, D]`` (N >= k) into float32 ``[k, D]`` centroids:
    ``iters`` rounds of nearest words (``Codebook.assign``, tied rows left provisional:
    either word is nearest within rounding) and means. A word left empty takes half of a
    populated word drawn in proportion to its rows beyond one, both moved apart by
    ``_SPLIT_EPS``, as faiss's ``Clustering`` does."""
    n, d = vecs.shape
    rng = np.random.default_rng(seed)
    centroids = vecs[np.sort(rng.choice(n, k, replace=False))]
    # The rows grouped by word, rewritten in place at every iteration (a fresh array each
    # time would fault its pages in again).
    grouped = np.empty_like(vecs)
    # The two halves of a split word move apart along alternating signs.
    sign = np.where(np.arange(d) % 2 == 0, 1.0, -1.0)
    for _ in range(iters):
        words = Codebook(centroids).assign(vecs, 1, check_finite=False).words[:, 0]
        counts = np.bincount(words, minlength=k)
        order = np.argsort(words, kind="stable")
        filled = np.flatnonzero(counts)
        starts = np.concatenate([[0], np.cumsum(counts)])[filled]
        np.take(vecs, order, axis=0, out=grouped)
        sums = np.add.reduceat(grouped, starts, axis=0, dtype=np.float64)
        centroids = centroids.astype(np.float64)
        centroids[filled] = sums / counts[filled, None]
        for empty in np.flatnonzero(counts == 0):
            spare = np.maximum(counts - 1, 0).astype(np.float64)
            if not spare.any():  # no word has a row to give: the empty word stays where it is
                break
            source = rng.choice(k, p=spare / spare.sum())
            centroids[empty] = centroids[source] * (1 + sign * _SPLIT_EPS)
            centroids[source] *= 1 - sign * _SPLIT_EPS
            counts[empty] = counts[source] // 2
            counts[source] -= counts[empty]
        centroids = centroids.astype(np.float32)
    return centroids


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
    gpu : int or None
        The GPU that quantizes; None on the CPU.
    quantizer : asmkit.quantizer.Quantizer
        The backend ``assign`` uses. On the CPU, ``PrunedQuantizer`` (same words as faiss's
        exhaustive search, several times fewer flops) when ``prune``, else
        ``FaissQuantizer``. Settable, to any object implementing the protocol.
    prune : bool
        CPU quantization skips words by a lower bound; False searches exhaustively with
        faiss alone. Default True.
    """

    def __init__(self, centroids, *, gpu: int | None = None) -> None:
        centroids = check_vecs(centroids, name="centroids")
        if centroids.shape[0] == 0:
            raise ArgumentError("centroids: a codebook needs at least one centroid")
        if not centroids.flags.writeable:
            # A memory-mapped codebook is read-only; numba compiles every kernel once more
            # for read-only arrays, so it is read into memory (a few tens of MB at most;
            # the inverted file stays mapped).
            centroids = centroids.copy()
        self._centroids = centroids
        self._flat: FaissQuantizer | None = None
        self._pruned: PrunedQuantizer | None = None
        self._chosen = _gpu_quantizer(centroids, gpu)
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

    @property
    def gpu(self) -> int | None:
        return getattr(self._chosen, "gpu", None)

    @property
    def quantizer(self) -> Quantizer:
        if self._chosen is not None:
            return self._chosen
        if self.prune:
            if self._pruned is None:
                self._pruned = PrunedQuantizer(self._centroids, self._faiss())
            return self._pruned
        return self._faiss()

    @quantizer.setter
    def quantizer(self, quantizer: Quantizer) -> None:
        if not isinstance(quantizer, Quantizer):
            raise ArgumentError(f"quantizer: expected an asmkit.quantizer.Quantizer, got {type(quantizer).__name__}")
        self._chosen = quantizer

    def __repr__(self) -> str:
        return f"Codebook(size={self.size}, dim={self.dim})"

    @classmethod
    def train(
        cls, vecs, size, *, iters: int = 10, seed: int = 1234, gpu: int | None = None, pruned: bool = False
    ) -> Codebook:
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
        pruned : bool
            On the CPU, the same k-means (Lloyd's iterations from ``size`` random training
            vectors, empty words split from populated ones as faiss splits them) with each
            assignment step done by ``Codebook.assign``, the pruned exact search: the same
            nearest words as faiss's exhaustive search, for about 2.5 times less CPU time on
            RootSIFT (docs/performance.md). The random start is numpy's, so the centroids
            are not faiss's for the same seed. Ignored with ``gpu``.

        Returns
        -------
        Codebook

        Raises
        ------
        ArgumentError
            Bad ``vecs``, ``size`` larger than the number of training vectors, or bad
            ``iters``/``seed``/``gpu``.
        """
        k = parse_size(size)
        vecs = check_vecs(vecs, name="vecs")
        iters = check_int(iters, "iters", min=1)
        seed = check_int(seed, "seed")
        gpu = check_int(gpu, "gpu", min=0, none=True)
        if vecs.shape[0] < k:
            raise ArgumentError(f"vecs: {vecs.shape[0]} training vectors cannot make {k} clusters (size)")
        if check_bool(pruned, "pruned") and gpu is None:
            logger.info(
                "k-means (pruned assignment): %d vectors of dim %d into %d words, %d iterations", *vecs.shape, k, iters
            )
            return cls(_lloyd(vecs, k, iters, seed))
        dim = vecs.shape[1]
        clustering = faiss.Clustering(dim, k)
        clustering.verbose = False
        clustering.niter = iters
        # faiss keeps the seed in an int32 field.
        clustering.seed = seed % (2**31)
        index = _flat_index(dim, gpu if gpu is not None and gpu < _faiss_gpu_count() else None)
        logger.info("k-means: %d vectors of dim %d into %d words, %d iterations", vecs.shape[0], dim, k, iters)
        clustering.train(vecs, index)
        centroids = faiss.vector_float_to_array(clustering.centroids).reshape(k, dim)
        return cls(centroids, gpu=gpu)

    def _faiss(self) -> FaissQuantizer:
        """faiss's exhaustive search on the CPU (or faiss-gpu's when it quantizes)."""
        if isinstance(self._chosen, FaissQuantizer):
            return self._chosen
        if self._flat is None:
            index = _flat_index(self.dim, None)
            index.add(self._centroids)
            self._flat = FaissQuantizer(index, self._centroids)
        return self._flat

    def settle_rows(
        self, vecs: np.ndarray, local: np.ndarray, seg_size: np.ndarray, m: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """faiss's m nearest words of rows tied within float32 rounding, as faiss's call on
        each row's segment gives them (what ``Assignment.settle`` runs).

        Parameters
        ----------
        vecs : float32 [t, D]
            The rows (checked descriptors).
        local : int64 [t]
            Each row's offset in its segment.
        seg_size : int64 [t]
            The size of each row's segment (the rows of one faiss call).
        m : int
            1 <= m <= K.

        Returns
        -------
        dist : float32 [t, m]
        words : int64 [t, m]
        """
        return settle_rows(self._faiss().index, vecs, local, seg_size, m)

    def assign(
        self, vecs, m: int = 1, *, segments=None, nearest_first: bool = True, check_finite: bool = True
    ) -> Assignment:
        """The m nearest words of each descriptor (exact L2, as faiss ``IndexFlatL2``), with
        the rows whose words float32 rounding decides left provisional until ``settle``.

        Where two distances agree to within float32 rounding, the words faiss gives depend
        on the batch it is called on. Those rows (``Assignment.tied``) hold provisional
        words; ``Assignment.settle`` replaces them by the words of faiss called once per
        segment, as the reference calls it. A caller may use the provisional words first
        and settle later (the query path scores with them, then re-scores the few images
        whose settled words differ).

        Parameters
        ----------
        vecs : float32 [N, D]
            Descriptors; float64/integer input is converted.
        m : int
            Multiple assignment. With ``m > K`` every word is returned (m is clipped to K).
        segments : int64 [S + 1], optional
            Row offsets (0 first, N last) of the batches whose faiss call to reproduce at
            float32 ties: the reference quantizes its database in one call and each query
            image in its own. Default: one call per ``QUANTIZE_ROWS`` rows.
        nearest_first : bool
            False when only the set of m words matters (query-side multiple assignment):
            column 0 may then hold another of two words tied within float32 rounding with
            it, which saves settling those rows.
        check_finite : bool
            False skips the pass over float32 C-contiguous ``vecs`` that checks for NaN
            and infinities (for descriptors checked already, ``prepare_descriptors``).

        Returns
        -------
        Assignment
            ``words`` int64 [N, min(m, K)] (nearest first) and ``tied`` int64 [t].

        Raises
        ------
        ArgumentError
            Bad ``vecs``, ``m`` or ``segments``.
        """
        m = check_int(m, "m", min=1)
        nearest_first = check_bool(nearest_first, "nearest_first")
        trusted = (
            not check_bool(check_finite, "check_finite")
            and isinstance(vecs, np.ndarray)
            and vecs.dtype == np.float32
            and vecs.ndim == 2
            and vecs.shape[1] == self.dim
            and vecs.flags.c_contiguous
        )
        if not trusted:
            vecs = check_vecs(vecs, name="vecs", dim=self.dim)
        return self._assign(vecs, m, _check_segments(segments, vecs.shape[0]), nearest_first, False)

    def quantize(self, vecs, m: int = 1, *, return_distances: bool = False, segments=None, nearest_first: bool = True):
        """``assign(vecs, m, segments=..., nearest_first=...).settle()``: the m nearest
        words of each descriptor, faiss's also at float32 ties.

        Returns
        -------
        words : int64 [N, min(m, K)]
            Word ids, nearest first (column 0 is the hard assignment). Columns 1..m-2 may
            order two words that tie within float32 rounding differently from faiss: only
            column 0 and the set of m words enter ASMK.
        distances : float32 [N, min(m, K)]
            Squared distances; only with ``return_distances``.

        Raises
        ------
        ArgumentError
            As ``assign``.
        """
        m = check_int(m, "m", min=1)
        return_distances = check_bool(return_distances, "return_distances")
        nearest_first = check_bool(nearest_first, "nearest_first")
        vecs = check_vecs(vecs, name="vecs", dim=self.dim)
        assignment = self._assign(vecs, m, _check_segments(segments, vecs.shape[0]), nearest_first, return_distances)
        words = assignment.settle()
        return (words, assignment.distances) if return_distances else words

    def _assign(self, vecs, m, segments, nearest_first, return_distances) -> Assignment:
        m = min(m, self.size)
        n = vecs.shape[0]
        words = np.empty((n, m), dtype=np.int64)
        dist = np.empty((n, m), dtype=np.float32) if return_distances else None
        quantizer = self.quantizer
        # Blocks of whole segments, about QUANTIZE_ROWS rows each, bound the per-row
        # temporaries (faiss's outputs, the pruned search's flags). Tied rows are settled
        # together, later, so that rows of many blocks share faiss's batches.
        tied = []
        first = 0
        while first < len(segments) - 1:
            last = max(first + 1, int(np.searchsorted(segments, segments[first] + QUANTIZE_ROWS, side="right")) - 1)
            begin, end = int(segments[first]), int(segments[last])
            block_dist = dist[begin:end] if return_distances else np.empty((end - begin, m), dtype=np.float32)
            rows = quantizer.search(
                vecs[begin:end],
                m,
                block_dist,
                words[begin:end],
                nearest_first=nearest_first,
                one_segment=last - first == 1,
            )
            tied.append(np.asarray(rows, dtype=np.int64) + begin)
            first = last
        tied = np.concatenate(tied) if tied else np.zeros(0, dtype=np.int64)
        seg = np.searchsorted(segments, tied, side="right") - 1
        return Assignment(
            words, tied, dist, vecs[tied], tied - segments[seg], segments[seg + 1] - segments[seg], self.settle_rows
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the centroids as an asmkit directory (kind ``"codebook"``)."""
        storage.save_arrays(path, {"centroids": self._centroids}, {"size": self.size, "dim": self.dim}, kind="codebook")

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True, gpu: int | None = None) -> Codebook:
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
