"""Clustered synthetic local descriptors, shared by tests and benchmarks.

Real local descriptors are neither uniform nor independent across images: they crowd
around frequent patterns (which k-means turns into visual words), and images of the same
scene share many near-duplicate descriptors. The generator mimics both, so that codebook
training, posting-list lengths and rankings behave like real data rather than noise:

- ``n_modes`` global modes (unit vectors) play the role of frequent local patterns;
- each group of ``images_per_group`` images is one "scene" owning ``per_image`` scene
  patterns, each a mode plus a scene-specific offset (norm ~0.5);
- an image takes a fraction ``shared`` of its scene's patterns (plus noise of norm ~0.25)
  and fills the rest with background descriptors (a random mode plus noise of norm ~0.6);
- descriptors are L2-normalised, like SIFT/RootSIFT or HOW features.
"""

from __future__ import annotations

import numpy as np

from ._validation import check_float, check_int

__all__ = ["clustered_descriptors"]


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return x


def clustered_descriptors(
    n_images: int,
    per_image: int,
    dim: int = 128,
    *,
    images_per_group: int = 4,
    n_modes: int | None = None,
    shared: float = 0.5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate descriptors for ``n_images`` images in scenes of ``images_per_group``.

    Parameters
    ----------
    n_images : int
        Number of images (ids ``0 .. n_images - 1``).
    per_image : int
        Descriptors per image.
    dim : int
        Descriptor dimensionality D.
    images_per_group : int
        Images per scene; image i belongs to group ``i // images_per_group``.
    n_modes : int or None
        Number of global modes; default ``max(64, 4 * per_image)``.
    shared : float
        Fraction in [0, 1] of an image's descriptors drawn from its scene's patterns.
    seed : int
        Random seed; the output is a deterministic function of all arguments.

    Raises
    ------
    ArgumentError
        A count below 1, or ``shared`` outside [0, 1].

    Returns
    -------
    vecs : numpy.ndarray, float32 [n_images * per_image, D]
        L2-normalised descriptors, rows of one image contiguous, images in id order.
    image_ids : numpy.ndarray, int64 [n_images * per_image]
        Image id of each row (non-decreasing).
    groups : numpy.ndarray, int64 [n_images]
        Scene of each image.
    """
    n_images = check_int(n_images, "n_images", min=1)
    per_image = check_int(per_image, "per_image", min=1)
    dim = check_int(dim, "dim", min=1)
    images_per_group = check_int(images_per_group, "images_per_group", min=1)
    shared = check_float(shared, "shared", min=0.0, max=1.0)
    n_modes = max(64, 4 * per_image) if n_modes is None else check_int(n_modes, "n_modes", min=1)

    rng = np.random.default_rng(seed)
    modes = _normalise(rng.standard_normal((n_modes, dim)).astype(np.float32))
    groups = np.arange(n_images, dtype=np.int64) // images_per_group
    n_groups = int(groups[-1]) + 1
    n_shared = int(round(shared * per_image))

    # Noise vectors of norm ~sigma: sigma * scale * N(0, I_D).
    scale = np.float32(1.0 / np.sqrt(dim))
    # Generated one scene at a time to bound peak memory.
    vecs = np.empty((n_images * per_image, dim), dtype=np.float32)
    for g in range(n_groups):
        members = np.flatnonzero(groups == g)
        patterns = modes[rng.integers(0, n_modes, per_image)]
        patterns = _normalise(patterns + scale * 0.5 * rng.standard_normal((per_image, dim), dtype=np.float32))
        for i in members:
            rows = vecs[i * per_image : (i + 1) * per_image]
            chosen = rng.choice(per_image, n_shared, replace=False)
            rows[:n_shared] = patterns[chosen] + scale * 0.25 * rng.standard_normal((n_shared, dim), dtype=np.float32)
            n_bg = per_image - n_shared
            rows[n_shared:] = modes[rng.integers(0, n_modes, n_bg)] + scale * 0.6 * rng.standard_normal(
                (n_bg, dim), dtype=np.float32
            )
            rows[:] = _normalise(rows)
    image_ids = np.repeat(np.arange(n_images, dtype=np.int64), per_image)
    return vecs, image_ids, groups
