"""Query expansion after re-ranking: which images expand, the expanded scores, the order."""

from __future__ import annotations

import numpy as np
import pytest

from asmkit._validation import ArgumentError
from asmkit.verify import Reranked, expand, expansion_images


def dense_rows(matrix: np.ndarray):
    """``rows_of`` over a dense score matrix (row = database image used as a query)."""
    every = np.arange(matrix.shape[1])
    return lambda images: (np.broadcast_to(every, (len(images), every.shape[0])), matrix[images])


def numpy_expanded(matrix, q_ids, q_scores, q_inliers, chosen, min_inliers):
    """Independent reference: verified head kept, then the rest by decreasing
    q_scores + sum of the chosen images' rows (ties: ascending id), over every image."""
    n = matrix.shape[1]
    total = np.zeros(n)
    total[q_ids[q_ids >= 0]] = q_scores[q_ids >= 0]
    for v in chosen[chosen >= 0]:
        total += matrix[v]
    head = [int(i) for i, c in zip(q_ids, q_inliers) if c >= min_inliers]
    rest = sorted((i for i in range(n) if i not in head), key=lambda i: (-total[i], i))
    order = (head + rest)[: q_ids.shape[0]]
    return np.array(order), total[order]


def test_expansion_images_take_verified_first_else_the_first_result():
    ids = np.array([[7, 3, 9, 1, 4], [2, 5, 8, 0, -1], [6, 0, 2, 1, 3]], np.int64)
    inliers = np.array([[90, 40, 20, 3, -1], [9, 0, 2, -1, -1], [80, 30, 0, 0, -1]], np.int32)
    got = expansion_images(ids, inliers, 2, min_inliers=15, exclude=[-1, -1, 6])
    # Query 0: its two verified images with most inliers; query 1: none verified, its first
    # result; query 2: itself (6) never, then its only other verified image.
    np.testing.assert_array_equal(got, [[7, 3], [2, -1], [0, -1]])
    np.testing.assert_array_equal(expansion_images(ids, inliers, 2, fallback=0)[1], [-1, -1])
    # Without inliers nothing is verified: plain query expansion with the first results.
    np.testing.assert_array_equal(expansion_images(ids, None, 0, fallback=3)[0], [7, 3, 9])
    with pytest.raises(ArgumentError, match="inliers"):
        expansion_images(ids, inliers[:, :2])
    with pytest.raises(ArgumentError, match="exclude"):
        expansion_images(ids, inliers, exclude=[1])


def test_expanded_scores_equal_the_numpy_formula():
    rng = np.random.default_rng(0)
    n, k = 40, 12
    matrix = rng.random((n, n)).astype(np.float32)
    q_ids = np.stack([rng.permutation(n)[:k] for _ in range(3)]).astype(np.int64)
    q_scores = np.sort(rng.random((3, k)), axis=1)[:, ::-1].astype(np.float32)
    q_inliers = np.full((3, k), -1, np.int32)
    q_inliers[0, :2] = [60, 25]  # two verified images
    q_inliers[0, 2:6] = [4, 0, 0, 9]  # verified too few
    q_inliers[1, 3:8] = 2  # none verified: expands with its first result
    q_inliers[2, 0] = 30  # the query itself
    reranked = Reranked(q_scores, q_ids, q_inliers)
    out = expand(reranked, dense_rows(matrix), 2, min_inliers=15, exclude=[-1, -1, q_ids[2, 0]])
    # Query 2's only verified image is itself: it expands with its next result.
    chosen = [q_ids[0, :2], q_ids[1, :1], q_ids[2, 1:2]]
    for q in range(3):
        ids, scores = numpy_expanded(matrix, q_ids[q], q_scores[q], q_inliers[q], chosen[q], 15)
        np.testing.assert_array_equal(out.ids[q], ids)
        np.testing.assert_allclose(out.scores[q], scores, rtol=1e-6)
    # Verified images keep the head in re-ranking's order; the others carry their inliers
    # when re-ranking verified them, -1 otherwise.
    np.testing.assert_array_equal(out.ids[0, :2], q_ids[0, :2])
    known = dict(zip(q_ids[0].tolist(), q_inliers[0].tolist()))
    assert out.inliers[0].tolist() == [known.get(i, -1) for i in out.ids[0].tolist()]
    # Expansion brings in images from beyond the query's own results.
    assert not set(out.ids[1].tolist()) <= set(q_ids[1].tolist())


def test_no_verified_image_and_no_fallback_leaves_the_reranked_ranking():
    rng = np.random.default_rng(1)
    matrix = rng.random((20, 20)).astype(np.float32)
    ids = np.array([[4, 8, 1, 19, -1]], np.int64)
    scores = np.array([[0.9, 0.5, 0.4, 0.1, -np.inf]], np.float32)
    inliers = np.array([[14, 3, -1, 0, -1]], np.int32)
    reranked = Reranked(scores, ids, inliers)
    called = []

    def rows_of(images):
        called.append(images)
        return dense_rows(matrix)(images)

    out = expand(reranked, rows_of, 3, min_inliers=15, fallback=0)
    np.testing.assert_array_equal(out.ids, ids)
    np.testing.assert_array_equal(out.scores, scores)
    np.testing.assert_array_equal(out.inliers, inliers)
    assert not called


def test_truncated_rows_count_missing_images_as_zero():
    ids = np.array([[0, 1, 2, -1]], np.int64)
    scores = np.array([[1.0, 0.3, 0.2, -np.inf]], np.float32)
    inliers = np.array([[40, -1, -1, -1]], np.int32)
    # Image 0's own ranking reaches images 5 and 2 only (-1 padding, -inf scores).
    rows = (np.array([[0, 5, 2, -1]]), np.array([[2.0, 0.5, 0.25, -np.inf]], np.float32))
    out = expand(Reranked(scores, ids, inliers), lambda images: rows, 1)
    np.testing.assert_array_equal(out.ids, [[0, 5, 2, 1]])
    np.testing.assert_allclose(out.scores, [[3.0, 0.5, 0.45, 0.3]])
    np.testing.assert_array_equal(out.inliers, [[40, -1, -1, -1]])
    with pytest.raises(ArgumentError, match="rows_of"):
        expand(Reranked(scores, ids, inliers), lambda images: (rows[0], rows[1][:, :2]), 1)
