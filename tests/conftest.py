"""Shared synthetic data for the engine tests: small, clustered, deterministic."""

from __future__ import annotations

import numpy as np
import pytest


def make_images(n_images, per_image, dim, *, seed=0, n_objects=None, centroids=None, empty=()):
    """Descriptors of images that show a few shared "objects".

    Images of the same object draw their descriptors from the same prototypes (plus
    noise), so they match each other more than other images. When ``centroids`` are
    given, prototypes sit near them so every word of a small codebook gets used.

    Returns
    -------
    list of float32 [n_i, dim]
        One array per image (n_i varies around ``per_image``; images in ``empty`` have 0).
    """
    rng = np.random.default_rng(seed)
    n_objects = n_objects or max(1, n_images // 3)
    if centroids is not None:
        base = centroids[rng.integers(0, len(centroids), (n_objects, 3 * per_image))]
        protos = base + 0.3 * rng.standard_normal(base.shape)
    else:
        protos = rng.standard_normal((n_objects, 3 * per_image, dim))
    images = []
    for i in range(n_images):
        if i in empty:
            images.append(np.empty((0, dim), dtype=np.float32))
            continue
        n = int(rng.integers(max(1, per_image // 2), per_image + per_image // 2 + 1))
        obj = protos[i % n_objects]
        rows = obj[rng.integers(0, obj.shape[0], n)] + 0.25 * rng.standard_normal((n, dim))
        images.append(rows.astype(np.float32))
    return images


def flatten(images, ids=None):
    """(vecs float32 [N, D], image_ids int64 [N]) from per-image arrays."""
    ids = range(len(images)) if ids is None else ids
    vecs = np.concatenate(images).astype(np.float32)
    labels = np.concatenate([np.full(len(v), i, dtype=np.int64) for v, i in zip(images, ids)])
    return vecs, labels


@pytest.fixture(scope="session")
def centroids40():
    """float32 [16, 40]: a small codebook of a dimension that is not a multiple of 32."""
    rng = np.random.default_rng(123)
    return rng.standard_normal((16, 40)).astype(np.float32)


@pytest.fixture(scope="session")
def centroids100():
    rng = np.random.default_rng(321)
    return rng.standard_normal((12, 100)).astype(np.float32)
