"""PCA whitening with shrinkage (docs/math.md §6).

Learned from descriptors ``X`` (``[N, D]``): mean ``m``, covariance
``C = (X − m)ᵀ(X − m) / N``, eigen-decomposition ``C = E diag(λ) Eᵀ`` with eigenvalues in
descending order and clipped below at 1e-14, projection ``P = diag(λ^(−s/2)) Eᵀ`` keeping
its first ``d`` rows. Applying it maps ``x ↦ (x − m) Pᵀ`` and L2-normalises the result.
``s = 1`` whitens fully (unit covariance), ``s < 1`` shrinks towards plain PCA (``s = 0``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .._io import load_npz
from .._validation import ArgumentError, FileFormatError, check_float, check_int

__all__ = ["PCAWhitening"]

#: Eigenvalues are clipped below at this value so that directions without variance do
#: not blow up.
EIGENVALUE_FLOOR = 1e-14


def _l2_normalize(vecs: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    # An all-zero row stays zero instead of becoming NaN.
    return vecs / np.maximum(norms, 1e-12)


class PCAWhitening:
    """A learned PCA-whitening projection.

    Build it with :meth:`learn` (or :meth:`from_arrays` / :meth:`load`).

    Attributes
    ----------
    mean_ : numpy.ndarray
        float64 ``[D]``, the training mean.
    projection_ : numpy.ndarray
        float64 ``[d, D]``, the first ``d`` rows of ``P``.
    eigenvalues_ : numpy.ndarray
        float64 ``[D]``, covariance eigenvalues, descending, clipped at 1e-14.
    shrinkage : float
        The exponent ``s`` used to build ``P``.
    """

    def __init__(self, mean: np.ndarray, projection: np.ndarray, eigenvalues: np.ndarray, shrinkage: float) -> None:
        mean = np.asarray(mean, dtype=np.float64)
        projection = np.asarray(projection, dtype=np.float64)
        eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
        if mean.ndim != 1:
            raise ArgumentError(f"mean: expected a 1-D array, got shape {mean.shape}")
        dim = mean.shape[0]
        if projection.ndim != 2 or projection.shape[1] != dim or not 1 <= projection.shape[0] <= dim:
            raise ArgumentError(f"projection: expected shape (d, {dim}) with 1 <= d <= {dim}, got {projection.shape}")
        if eigenvalues.shape != (dim,):
            raise ArgumentError(f"eigenvalues: expected shape ({dim},), got {eigenvalues.shape}")
        for name, array in (("mean", mean), ("projection", projection), ("eigenvalues", eigenvalues)):
            if not np.all(np.isfinite(array)):
                raise ArgumentError(f"{name}: contains NaN or infinite values")
        self.mean_ = mean
        self.projection_ = projection
        self.eigenvalues_ = eigenvalues
        self.shrinkage = _check_shrinkage(shrinkage)

    @property
    def input_dim(self) -> int:
        """Input dimensionality D."""
        return self.mean_.shape[0]

    @property
    def output_dim(self) -> int:
        """Output dimensionality d."""
        return self.projection_.shape[0]

    @classmethod
    def learn(cls, vecs: np.ndarray, *, dim: int | None = None, shrinkage: float = 1.0) -> "PCAWhitening":
        """Learn the whitening from training descriptors.

        Parameters
        ----------
        vecs : numpy.ndarray
            float ``[N, D]`` training descriptors, N >= 2.
        dim : int, optional
            Output dimensionality d (1 <= d <= D); default D.
        shrinkage : float
            Exponent s in [0, 1]: 1 whitens fully, 0 only rotates onto the principal axes.

        Returns
        -------
        PCAWhitening

        Raises
        ------
        asmkit.ArgumentError
            On a wrong shape, non-finite values, too few rows, or ``dim``/``shrinkage`` of the
            wrong type or out of range.
        """
        vecs = np.asarray(vecs)
        if vecs.ndim != 2 or vecs.shape[1] < 1:
            raise ArgumentError(f"vecs: expected a 2-D array [N, D], got shape {vecs.shape}")
        if vecs.shape[0] < 2:
            raise ArgumentError(f"vecs: need at least 2 descriptors to learn whitening, got {vecs.shape[0]}")
        x = vecs.astype(np.float64)
        if not np.all(np.isfinite(x)):
            raise ArgumentError("vecs: contains NaN or infinite values")
        full_dim = x.shape[1]
        dim = full_dim if dim is None else check_int(dim, "dim", min=1, max=full_dim)
        shrinkage = _check_shrinkage(shrinkage)

        mean = x.mean(axis=0)
        centred = x - mean
        covariance = centred.T @ centred / x.shape[0]
        covariance = (covariance + covariance.T) / 2  # exact symmetry for eigh
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues = np.maximum(eigenvalues[order], EIGENVALUE_FLOOR)
        eigenvectors = eigenvectors[:, order]
        projection = (eigenvalues ** (-shrinkage / 2))[:, None] * eigenvectors.T
        return cls(mean, projection[:dim], eigenvalues, shrinkage)

    def apply(self, vecs: np.ndarray, *, normalize: bool = True) -> np.ndarray:
        """Whiten descriptors.

        Parameters
        ----------
        vecs : numpy.ndarray
            float ``[N, D]``.
        normalize : bool
            L2-normalise the rows of the result (the method's definition); False gives the
            raw projection, whose covariance is the identity on the training data for s = 1.

        Returns
        -------
        numpy.ndarray
            float32 ``[N, d]``, C-contiguous.
        """
        vecs = np.asarray(vecs)
        if vecs.ndim != 2 or vecs.shape[1] != self.input_dim:
            raise ArgumentError(f"vecs: expected shape [N, {self.input_dim}], got {vecs.shape}")
        projected = (vecs.astype(np.float64) - self.mean_) @ self.projection_.T
        if normalize:
            projected = _l2_normalize(projected)
        return np.ascontiguousarray(projected, dtype=np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The learned state as plain arrays (``mean``, ``projection``, ``eigenvalues``, ``shrinkage``)."""
        return {
            "mean": self.mean_.copy(),
            "projection": self.projection_.copy(),
            "eigenvalues": self.eigenvalues_.copy(),
            "shrinkage": np.array(self.shrinkage, dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "PCAWhitening":
        """Inverse of :meth:`to_arrays`; raises ``asmkit.ArgumentError`` on a missing key or bad shape."""
        missing = sorted({"mean", "projection", "eigenvalues", "shrinkage"} - set(arrays))
        if missing:
            raise ArgumentError(f"whitening arrays: missing {', '.join(missing)}")
        shrinkage = np.asarray(arrays["shrinkage"])
        if shrinkage.size != 1:
            raise ArgumentError(f"whitening arrays: shrinkage must be a scalar, got shape {shrinkage.shape}")
        return cls(arrays["mean"], arrays["projection"], arrays["eigenvalues"], float(shrinkage.reshape(())))

    def save(self, path: str | os.PathLike) -> None:
        """Write to a ``.npz`` file (no pickle)."""
        np.savez(Path(path), **self.to_arrays())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PCAWhitening":
        """Read a file written by :meth:`save` (pickled content is refused).

        Raises
        ------
        FileNotFoundError
            If ``path`` is not a file.
        asmkit.FileFormatError
            If it is not a whitening ``.npz`` (another format, truncated, pickled content,
            missing or malformed arrays).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"whitening file not found: {path}")
        arrays = load_npz(path, "a whitening file")
        try:
            return cls.from_arrays(arrays)
        except ValueError as error:
            raise FileFormatError(path, f"not a whitening file ({error})") from None

    def config(self) -> dict:
        """A small JSON-able summary, used in extractor configs for cache invalidation."""
        return {
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "shrinkage": self.shrinkage,
            # Fingerprint of the learned projection: different training data, different features.
            "sha256": hashlib.sha256(
                np.ascontiguousarray(self.projection_).tobytes() + np.ascontiguousarray(self.mean_).tobytes()
            ).hexdigest()[:16],
        }

    def __repr__(self) -> str:
        return f"PCAWhitening(input_dim={self.input_dim}, output_dim={self.output_dim}, shrinkage={self.shrinkage})"


def _check_shrinkage(shrinkage) -> float:
    return check_float(shrinkage, "shrinkage", min=0.0, max=1.0)
