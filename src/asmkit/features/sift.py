"""OpenCV SIFT and RootSIFT local features (docs/math.md §6, "classic").

RootSIFT (Arandjelović & Zisserman, CVPR 2012) maps a SIFT descriptor x to
``sqrt(x / ‖x‖₁)``: comparing RootSIFT vectors with the Euclidean distance is comparing
SIFT with the Hellinger kernel. The result already has unit L2 norm, so no further
normalisation is needed.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from .._validation import ArgumentError, check_bool, check_float, check_int
from .extract import ImageFeatures
from .whitening import PCAWhitening

__all__ = ["SiftExtractor", "root_sift"]

#: Dimensionality of OpenCV's SIFT descriptor.
SIFT_DIM = 128


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT: L1-normalise each row, then take the element-wise square root.

    Parameters
    ----------
    descriptors : numpy.ndarray
        Non-negative float ``[n, D]`` (SIFT histograms).

    Returns
    -------
    numpy.ndarray
        float32 ``[n, D]`` with unit L2 norm per row (all-zero rows stay zero).
    """
    descriptors = np.asarray(descriptors, dtype=np.float32)
    if descriptors.ndim != 2:
        raise ArgumentError(f"descriptors: expected a 2-D array [n, D], got shape {descriptors.shape}")
    # OpenCV never returns negative bins, but clipping keeps sqrt defined for any input.
    descriptors = np.maximum(descriptors, 0.0)
    l1 = descriptors.sum(axis=1, keepdims=True)
    return np.sqrt(descriptors / np.maximum(l1, 1e-12)).astype(np.float32, copy=False)


class SiftExtractor:
    """SIFT / RootSIFT extractor (OpenCV's DoG detector and SIFT descriptor).

    Parameters
    ----------
    max_features : int or None
        Keep at most this many keypoints, those of highest detector response (ties broken
        by position, so the selection is deterministic). None keeps all.
    root : bool
        RootSIFT (default) instead of L2-normalised SIFT.
    whitening : PCAWhitening, optional
        Applied after (Root)SIFT; the output has ``whitening.output_dim`` dimensions and
        unit L2 norm.
    max_size : int, optional
        The loader downscales images to this longer side; keypoints are in the pixel
        coordinates of the downscaled image.
    contrast_threshold, edge_threshold, n_octave_layers, sigma
        OpenCV's ``SIFT_create`` settings (defaults as OpenCV's).

    Attributes
    ----------
    name : str
        ``"rootsift"`` or ``"sift"``.
    thread_safe : bool
        True: ``extract`` may run in several threads at once (each thread gets its own
        OpenCV detector).

    Notes
    -----
    ``ImageFeatures.keypoints`` rows are (x, y, size, angle) with OpenCV's meaning: size is
    the diameter of the keypoint's neighbourhood in pixels, angle is in degrees.
    ``ImageFeatures.attention`` holds the detector response.
    """

    thread_safe = True

    def __init__(
        self,
        max_features: int | None = 1000,
        root: bool = True,
        whitening: PCAWhitening | None = None,
        max_size: int | None = None,
        contrast_threshold: float = 0.04,
        edge_threshold: float = 10.0,
        n_octave_layers: int = 3,
        sigma: float = 1.6,
    ) -> None:
        if whitening is not None:
            if not isinstance(whitening, PCAWhitening):
                raise ArgumentError(f"whitening: expected a PCAWhitening or None, got {type(whitening).__name__}")
            if whitening.input_dim != SIFT_DIM:
                raise ArgumentError(f"whitening: expects {whitening.input_dim}-D input, SIFT gives {SIFT_DIM}-D")
        self.max_features = check_int(max_features, "max_features", min=1, none=True)
        self.root = check_bool(root, "root")
        self.whitening = whitening
        self.max_size = check_int(max_size, "max_size", min=1, none=True)
        self.contrast_threshold = check_float(contrast_threshold, "contrast_threshold", min=0.0)
        self.edge_threshold = check_float(edge_threshold, "edge_threshold", min=0.0, min_open=True)
        self.n_octave_layers = check_int(n_octave_layers, "n_octave_layers", min=1)
        self.sigma = check_float(sigma, "sigma", min=0.0, min_open=True)
        self.name = "rootsift" if root else "sift"
        self._local = threading.local()

    @property
    def dim(self) -> int:
        """Output descriptor dimensionality."""
        return SIFT_DIM if self.whitening is None else self.whitening.output_dim

    def config(self) -> dict:
        """JSON-able settings (feature stores compare them to invalidate caches)."""
        return {
            "extractor": self.name,
            "max_features": self.max_features,
            "root": self.root,
            "max_size": self.max_size,
            "contrast_threshold": self.contrast_threshold,
            "edge_threshold": self.edge_threshold,
            "n_octave_layers": self.n_octave_layers,
            "sigma": self.sigma,
            "whitening": None if self.whitening is None else self.whitening.config(),
            "opencv": cv2.__version__,
        }

    def _detector(self):
        detector = getattr(self._local, "detector", None)
        if detector is None:
            detector = cv2.SIFT_create(
                nfeatures=self.max_features or 0,
                nOctaveLayers=self.n_octave_layers,
                contrastThreshold=self.contrast_threshold,
                edgeThreshold=self.edge_threshold,
                sigma=self.sigma,
            )
            self._local.detector = detector
        return detector

    def extract(self, image: np.ndarray) -> ImageFeatures:
        """Detect keypoints and describe them.

        Parameters
        ----------
        image : numpy.ndarray
            uint8 ``[H, W, 3]`` RGB (or ``[H, W]`` grayscale).

        Returns
        -------
        ImageFeatures
            ``descriptors`` float32 ``[n, dim]`` with n <= max_features, rows sorted by
            decreasing detector response; ``keypoints`` float32 ``[n, 4]``;
            ``attention`` float32 ``[n]`` (responses).
        """
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ArgumentError(f"image: expected dtype uint8, got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 3:
            gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
        elif image.ndim == 2:
            gray = np.ascontiguousarray(image)
        else:
            raise ArgumentError(f"image: expected shape [H, W, 3] or [H, W], got {image.shape}")

        keypoints, descriptors = self._detector().detectAndCompute(gray, None)
        if not keypoints:
            return ImageFeatures(
                descriptors=np.zeros((0, self.dim), np.float32),
                keypoints=np.zeros((0, 4), np.float32),
                attention=np.zeros(0, np.float32),
            )
        geometry = np.array([(k.pt[0], k.pt[1], k.size, k.angle) for k in keypoints], dtype=np.float32)
        response = np.array([k.response for k in keypoints], dtype=np.float32)
        # OpenCV's own cap (retainBest) may keep ties beyond nfeatures and its order is not
        # specified: sort by response, then by geometry, so the output is reproducible.
        order = np.lexsort((geometry[:, 3], geometry[:, 2], geometry[:, 1], geometry[:, 0], -response))
        if self.max_features is not None:
            order = order[: self.max_features]
        descriptors = np.asarray(descriptors, dtype=np.float32)[order]
        if self.root:
            descriptors = root_sift(descriptors)
        else:
            norms = np.linalg.norm(descriptors, axis=1, keepdims=True)
            descriptors = descriptors / np.maximum(norms, 1e-12)
        if self.whitening is not None:
            descriptors = self.whitening.apply(descriptors)
        return ImageFeatures(descriptors=descriptors, keypoints=geometry[order], attention=response[order])

    def __repr__(self) -> str:
        return (
            f"SiftExtractor(max_features={self.max_features}, root={self.root}, "
            f"whitening={self.whitening!r}, max_size={self.max_size})"
        )

    def __getstate__(self) -> dict:
        # OpenCV detectors cannot cross process boundaries; each process builds its own.
        state = self.__dict__.copy()
        del state["_local"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
