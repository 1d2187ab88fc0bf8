"""Visual codebook: faiss k-means training and exact multiple-assignment quantization (ASMK.md §1)."""

from __future__ import annotations

import logging
import os
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


def _gpu_available(gpu: int) -> bool:
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return False
    try:
        return 0 <= gpu < faiss.get_num_gpus()
    except RuntimeError:
        return False


def _resolve_gpu(gpu) -> int | None:
    """The GPU id to use, or None (CPU), warning once when a requested GPU is unavailable."""
    if gpu is None:
        return None
    if isinstance(gpu, bool) or not isinstance(gpu, (int, np.integer)) or gpu < 0:
        raise ValueError(f"gpu: expected None or a non-negative GPU id, got {gpu!r}")
    if _gpu_available(int(gpu)):
        return int(gpu)
    warnings.warn(
        f"gpu: faiss has no GPU {gpu} available (faiss-cpu build or no device); using the CPU",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


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
        faiss GPU id for quantization; falls back to the CPU with a warning when faiss has
        no such GPU.

    Attributes
    ----------
    centroids : float32 [K, D]
    size : int
        K.
    dim : int
        D.
    """

    def __init__(self, centroids, *, gpu: int | None = None) -> None:
        centroids = check_vecs(centroids, name="centroids")
        if centroids.shape[0] == 0:
            raise ValueError("centroids: a codebook needs at least one centroid")
        self._centroids = centroids
        self._gpu = _resolve_gpu(gpu)
        self._index = None

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
            faiss GPU id; CPU (with one warning) if unavailable.

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
        gpu_id = _resolve_gpu(gpu)
        dim = vecs.shape[1]
        clustering = faiss.Clustering(dim, k)
        clustering.verbose = False
        clustering.niter = int(iters)
        # faiss keeps the seed in an int32 field.
        clustering.seed = int(seed) % (2**31)
        index = _flat_index(dim, gpu_id)
        logger.info("k-means: %d vectors of dim %d into %d words, %d iterations", vecs.shape[0], dim, k, iters)
        clustering.train(vecs, index)
        centroids = faiss.vector_float_to_array(clustering.centroids).reshape(k, dim)
        book = cls(centroids)
        book._gpu = gpu_id
        return book

    def _search_index(self):
        if self._index is None:
            index = _flat_index(self.dim, self._gpu)
            index.add(self._centroids)
            self._index = index
        return self._index

    def quantize(self, vecs, m: int = 1, *, return_distances: bool = False):
        """The m nearest words of each descriptor (exact L2, faiss ``IndexFlatL2``).

        All images are searched in large batches: faiss then computes the distances with a
        few large BLAS products, about twice as fast as the reference's one call per image
        (docs/benchmarks.md). The words equal the reference's except where two distances
        agree to within float32 rounding (faiss's BLAS blocking differs with the batch).

        Parameters
        ----------
        vecs : float32 [N, D]
            Descriptors (all images at once).
        m : int
            Multiple assignment. With ``m > K`` every word is returned (m is clipped to K).
        return_distances : bool
            Also return the squared distances.

        Returns
        -------
        words : int64 [N, min(m, K)]
            Word ids, nearest first (column 0 is the hard assignment).
        distances : float32 [N, min(m, K)]
            Only with ``return_distances``.
        """
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"m: expected a positive int, got {m!r}")
        vecs = check_vecs(vecs, name="vecs", dim=self.dim)
        m = min(int(m), self.size)
        n = vecs.shape[0]
        words = np.empty((n, m), dtype=np.int64)
        dist = np.empty((n if return_distances else 0, m), dtype=np.float32)
        index = self._search_index()
        # Blocks bound faiss's [rows, m] outputs; faiss itself tiles the distance products.
        for begin in range(0, n, _QUANTIZE_ROWS):
            end = min(begin + _QUANTIZE_ROWS, n)
            with _kernels.faiss_thread_budget((end - begin) * self.size * self.dim):
                block_dist, block_words = index.search(vecs[begin:end], m)
            words[begin:end] = block_words
            if return_distances:
                dist[begin:end] = block_dist
        return (words, dist) if return_distances else words

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
