"""Plain-loop NumPy twin of the ASMK spec (docs/math.md §1-4), independent of asmkit.

Slow and obvious on purpose: the tests compare every asmkit stage against it. It follows
the same float32 rounding points as the spec (residual sums in float32 in descriptor
order, Hamming similarity rounded to float32, σ(u) rounded to float32, per-entry weights
rounded to float32 and summed in float64).
"""

from __future__ import annotations

import math

import numpy as np


def quantize(vecs, centroids, m):
    """m nearest centroids per row by brute-force float64 squared distances, nearest first."""
    out = np.empty((len(vecs), m), dtype=np.int64)
    for i, x in enumerate(vecs):
        dists = [float(np.sum((x.astype(np.float64) - c.astype(np.float64)) ** 2)) for c in centroids]
        out[i] = sorted(range(len(centroids)), key=lambda j: (dists[j], j))[:m]
    return out


def residual_sums(vecs, assign, centroids):
    """{word: float32 [D] sum of (x - centroid) over the rows listing that word, in row order}."""
    sums = {}
    for x, words in zip(vecs, assign):
        for word in sorted(set(int(w) for w in words)):
            acc = sums.get(word, np.zeros(vecs.shape[1], dtype=np.float32))
            sums[word] = (acc + (x - centroids[word])).astype(np.float32)
    return dict(sorted(sums.items()))


def pack(bits):
    """bool [D] -> list of uint64 words, MSB first, zero padding."""
    words = []
    for start in range(0, len(bits), 64):
        value = 0
        for t, bit in enumerate(bits[start : start + 64]):
            if bit:
                value |= 1 << (63 - t)
        words.append(value)
    return np.array(words, dtype=np.uint64)


def normalize(v):
    """v / (‖v‖ + 1e-6) with a plain float64 norm."""
    norm = math.sqrt(sum(float(a) * float(a) for a in v))
    return (v / np.float32(norm + 1e-6)).astype(np.float32)


def aggregate_image(vecs, assign, centroids, binary):
    """(words ascending, list of codes (uint64 [W]) or normalised float32 [D] vectors)."""
    sums = residual_sums(vecs, assign, centroids)
    words = list(sums)
    if binary:
        return words, [pack(sums[w] > 0) for w in words]
    return words, [normalize(sums[w]) for w in words]


def hamming(a, b):
    return sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(a, b))


def similarity(qa, da, binary, dim):
    """u between two aggregates, rounded as the reference rounds it."""
    if binary:
        n_bits = 32 * math.ceil(dim / 32)
        hdist = np.float32(hamming(qa, da) / n_bits)
        return np.float32(np.float32(-2.0) * hdist + np.float32(1.0))
    return np.float32(sum(float(a) * float(b) for a, b in zip(qa, da)))


def selectivity(u, alpha, tau):
    """σ(u) = u**α if u >= τ else None (no match); float32."""
    if u < np.float32(tau):
        return None
    if u >= 0 or float(alpha).is_integer():
        return np.float32(float(u) ** alpha)
    return np.float32(-((-float(u)) ** alpha))


class Database:
    """Database built image by image: aggregates, counts, idf, norms."""

    def __init__(self, images, centroids, *, binary, use_idf, m=1):
        """images: list of (image_id, float32 [n, D]) in any order."""
        self.binary = binary
        self.dim = centroids.shape[1]
        self.centroids = centroids
        self.entries = {}  # image id -> {word: aggregate}
        for image_id, vecs in images:
            assign = quantize(vecs, centroids, m) if len(vecs) else np.empty((0, m), np.int64)
            words, aggs = aggregate_image(vecs, assign, centroids, binary)
            self.entries[image_id] = dict(zip(words, aggs))
        n_images = len(self.entries)
        k = centroids.shape[0]
        self.counts = np.zeros(k, dtype=np.int64)
        for words in self.entries.values():
            for w in words:
                self.counts[w] += 1
        self.idf = np.ones(k, dtype=np.float32)
        if use_idf:
            for w in range(k):
                if self.counts[w]:
                    self.idf[w] = np.float32(math.log(n_images / self.counts[w]) ** 2)
        self.norms = {}
        for image_id, words in self.entries.items():
            total = 0.0
            for w in sorted(words):
                total += float(self.idf[w])
            self.norms[image_id] = total

    def score(self, qvecs, *, m, alpha, tau):
        """{image id: float64 score} for one query image."""
        scores = {image_id: 0.0 for image_id in self.entries}
        if len(qvecs) == 0:
            return scores
        assign = quantize(qvecs, self.centroids, m)
        words, aggs = aggregate_image(qvecs, assign, self.centroids, self.binary)
        q_norm = np.float32(0.0)
        for w, qa in zip(words, aggs):
            q_norm = np.float32(q_norm + self.idf[w])
            for image_id, entries in self.entries.items():
                if w not in entries:
                    continue
                sigma = selectivity(similarity(qa, entries[w], self.binary, self.dim), alpha, tau)
                if sigma is None or self.norms[image_id] <= 0:
                    continue
                weighted = np.float32(sigma * self.idf[w])
                scores[image_id] += float(np.float32(float(weighted) / math.sqrt(self.norms[image_id])))
        scale = float(np.float32(math.sqrt(float(q_norm))))
        return {i: (s / scale if scale > 0 else 0.0) for i, s in scores.items()}


# -- synthetic data shared by the tests --------------------------------------------------


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
