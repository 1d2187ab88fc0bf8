"""Quantization on a CUDA device through torch, for machines whose faiss has no GPU.

faiss-gpu wheels are built for one CUDA version and replace faiss-cpu's module, while a
CUDA build of torch is usually there already: the deep feature extractor needs one.
``TorchQuantizer`` computes the squared distances to every word on the device with faiss's
expansion (|x|^2 + |c|^2 - 2 x.c, a float32 matrix product, TF32 off) and keeps the m + 1
nearest. It implements ``asmkit.quantizer.Quantizer``: a row whose deciding gap lies within
float32 rounding is returned as tied, and ``Codebook.assign``'s ``Assignment.settle`` asks
faiss on the CPU for it as the reference's own call would meet it, exactly as for faiss's
own batched searches. So the words are the CPU reference's.
"""

from __future__ import annotations

import threading

import numpy as np

from .quantizer import max_sq_norm, tied_rows

__all__ = ["TorchQuantizer", "cuda_device_count"]

#: Bytes of the float32 [rows, K] distance block on the device (rows scale with 1/K:
#: 4096 rows at K = 65 536); torch.topk needs about as much again.
_BLOCK_BYTES = 1 << 30
#: Serialises the switch of torch's process-wide float32 matmul precision (and so the
#: quantizations through torch of one process).
_PRECISION = threading.Lock()


def cuda_device_count() -> int:
    """CUDA devices torch can use; 0 when torch is not installed, is a CPU build, or fails
    to load (a broken CUDA library raises OSError at import)."""
    try:
        import torch
    except (ImportError, OSError):
        return 0
    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except RuntimeError:  # a driver that fails to initialise
        return 0


class TorchQuantizer:
    """The m nearest words of descriptors, on a torch device.

    Parameters
    ----------
    centroids : float32 [K, D]
        The codebook; copied to the device once.
    device : str or torch.device
        ``"cuda:0"`` in use; ``"cpu"`` runs the same code on the CPU (tests).
    tie_eps : float
        Relative gap (of |x|^2 + max |c|^2) below which faiss's rounding decides
        (``asmkit.quantizer.tie_eps(1.0, D)``).
    gpu : int, optional
        The GPU id ``device`` stands for (``Codebook.gpu``); None for a CPU device.
    block_rows : int, optional
        Rows per float32 [rows, K] distance block on the device (default: as many as fit
        in ``_BLOCK_BYTES``, at least 256).
    """

    def __init__(
        self, centroids: np.ndarray, device, tie_eps: float, *, gpu: int | None = None, block_rows: int | None = None
    ) -> None:
        import torch

        self._torch = torch
        self.gpu = gpu
        self.device = torch.device(device)
        self._centroids = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(self.device)
        # faiss's own |c|^2 (float32 sums), and the float64 max for the tolerance scale.
        self._c_sq = (self._centroids * self._centroids).sum(dim=1)
        self._max_sq = max_sq_norm(centroids)
        self._tie_eps = float(tie_eps)
        k = centroids.shape[0]
        self._rows = max(256, _BLOCK_BYTES // (4 * k)) if block_rows is None else block_rows

    def search(
        self, vecs: np.ndarray, m: int, dist: np.ndarray, words: np.ndarray, *, nearest_first: bool, one_segment: bool
    ) -> np.ndarray:
        """See ``asmkit.quantizer.Quantizer.search``. Its float32 rounding is never faiss's,
        so tied rows are returned also for a block of ``one_segment``."""
        torch = self._torch
        k = self._centroids.shape[0]
        extra = int(m < k)
        tied_parts = []
        with _PRECISION:
            previous = torch.get_float32_matmul_precision()
            # A TF32 or bf16 product (1e-3 relative error) would order words that faiss's
            # float32 product orders the other way, beyond the tolerance that catches them.
            torch.set_float32_matmul_precision("highest")
            try:
                for begin in range(0, len(vecs), self._rows):
                    block = vecs[begin : begin + self._rows]
                    x = torch.from_numpy(np.ascontiguousarray(block)).to(self.device)
                    x_sq = (x * x).sum(dim=1)
                    # |c|^2 - 2 x.c, then + |x|^2 in place: one [rows, K] block on the
                    # device, not two (faiss adds |x|^2 + |c|^2 first: another rounding,
                    # of the size the tie tolerance allows for).
                    d = torch.addmm(self._c_sq[None], x, self._centroids.T, beta=1.0, alpha=-2.0)
                    d += x_sq[:, None]
                    found_dist, found_words = torch.topk(d, m + extra, dim=1, largest=False, sorted=True)
                    # The tolerance's scale needs no float64: it is a bound, not a distance.
                    tied = tied_rows(found_dist, m, self._tie_eps * (x_sq + self._max_sq), nearest_first)
                    end = begin + len(block)
                    dist[begin:end] = found_dist[:, :m].cpu().numpy()
                    words[begin:end] = found_words[:, :m].cpu().numpy()
                    if tied is not None:
                        tied_parts.append(torch.nonzero(tied).cpu().numpy().ravel() + begin)
            finally:
                torch.set_float32_matmul_precision(previous)
        return np.concatenate(tied_parts) if tied_parts else np.zeros(0, dtype=np.int64)
