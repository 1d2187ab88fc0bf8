"""Spatial verification: re-rank the top of a ranking, and verify image pairs for SfM.

ASMK ranks database images by visual-word similarity alone. Verification fits a robust
geometric model (OpenCV's USAC estimators) to the *tentative correspondences* of a query
and a candidate, and takes the number of correspondences that agree with it, the
*inliers*, as evidence that both images show the same object.

Tentative correspondences
    ``word_matches``: features of the two images that share a visual word, at most
    ``max_per_word`` features of each side per word (a burst of repeated texture would
    otherwise give ``n * n`` pairs). ``mutual_nn_matches``: mutual nearest neighbours of
    the descriptors, for image pairs whose descriptors are at hand (SfM).
Models
    ``"homography"`` (``cv2.findHomography`` with ``USAC_MAGSAC``), ``"affine"``
    (``cv2.estimateAffine2D`` with USAC parameters, MAGSAC scoring), ``"similarity"``
    (``cv2.estimateAffinePartial2D``) for re-ranking; ``"fundamental"``
    (``cv2.findFundamentalMat`` with ``USAC_MAGSAC``) for SfM pairs.
Re-ranking
    ``rerank``: the top ``R`` of each ranking, reordered by inliers for candidates with at
    least ``min_inliers`` of them (ties broken by the ASMK score); the others keep their
    ASMK order below them. Images never leave the top ``R``; scores are not changed.
Query expansion
    ``expansion_images`` and ``expand`` (Chum et al.'s "Total Recall", in score space):
    each query's score row plus the rows of the images it expands with (its first verified
    images, or its first ranked one when none is verified). Verified images keep the head
    of the ranking; every other image, from inside or outside the top ``R``, follows by
    its expanded score.
SfM pairs
    ``verify_pairs``: mutual nearest neighbours and a fundamental matrix per pair;
    ``asmkit.colmap`` writes the result into a COLMAP database.

Candidates are verified in threads: OpenCV and the numba matcher release the GIL.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise

import cv2
import numpy as np

from ._kernels import word_matches as _word_matches_kernel
from ._validation import ArgumentError, check_choice, check_float, check_int
from .geometry import GeometryStore, sort_by_word

__all__ = [
    "MODELS",
    "Fit",
    "PairGeometry",
    "Reranked",
    "VerifyOptions",
    "expand",
    "expansion_images",
    "fit_model",
    "mutual_nn_matches",
    "order_by_inliers",
    "rerank",
    "verify_pairs",
    "word_matches",
]

logger = logging.getLogger(__name__)

MODELS = ("homography", "affine", "similarity", "fundamental")
#: Correspondences a model needs at the least (its minimal sample).
_MIN_SAMPLE = {"homography": 4, "affine": 3, "similarity": 2, "fundamental": 8}
#: A fitted homography or affine map that scales areas by more than this factor (or its
#: inverse), or mirrors the image, is a degenerate fit (points on a line, one blob), not a
#: view of the same object.
_MAX_AREA_RATIO = 100.0


@dataclass(frozen=True)
class VerifyOptions:
    """Settings of spatial verification.

    Attributes
    ----------
    model : str
        One of ``MODELS``.
    threshold : float
        Inlier threshold in pixels (reprojection error; Sampson distance for
        ``"fundamental"``).
    max_per_word : int
        At most ``max_per_word ** 2`` correspondences per word in ``word_matches``.
    max_hamming : int
        Features of one word whose signatures differ in more bits are no correspondence.
    query_m : int
        Words per query feature (``asmkit.geometry.feature_words(..., m=query_m)``), for
        the callers that make the query words: a feature then corresponds with the
        database features of any of its ``query_m`` nearest words.
    min_inliers : int
        Fewer inliers count as not verified (re-ranking) or drop the pair (SfM).
    max_iters : int
        Most USAC iterations per fit.
    confidence : float
        USAC's stopping confidence, in (0, 1).
    threads : int or None
        Threads verifying candidates (default: the CPU count).
    """

    model: str = "affine"
    threshold: float = 8.0
    max_per_word: int = 5
    max_hamming: int = 48
    query_m: int = 3
    min_inliers: int = 15
    max_iters: int = 1000
    confidence: float = 0.999
    threads: int | None = None

    def __post_init__(self) -> None:
        check_choice(self.model, "model", MODELS)
        check_float(self.threshold, "threshold", min=0.0, min_open=True)
        check_int(self.max_per_word, "max_per_word", min=1)
        check_int(self.max_hamming, "max_hamming", min=0)
        check_int(self.query_m, "query_m", min=1)
        check_int(self.min_inliers, "min_inliers", min=0)
        check_int(self.max_iters, "max_iters", min=1)
        check_float(self.confidence, "confidence", min=0.0, max=1.0, min_open=True)
        check_int(self.threads, "threads", min=1, none=True)

    @property
    def n_threads(self) -> int:
        return self.threads if self.threads is not None else max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Fit:
    """One robust fit.

    Attributes
    ----------
    inliers : int
        Correspondences that agree with the model, counted once per feature: the smaller
        of the numbers of distinct query and candidate features among them (0 when no
        model was found).
    matrix : float64 [3, 3] or None
        The model mapping query points to candidate points (the fundamental matrix with
        ``x_db^T F x_query = 0``); None when the fit failed or was degenerate.
    mask : bool [M]
        Which correspondences are inliers (all False when ``matrix`` is None).
    """

    inliers: int
    matrix: np.ndarray | None
    mask: np.ndarray


@dataclass(frozen=True)
class Reranked:
    """Rankings after re-ranking.

    Attributes
    ----------
    scores : float32 [Q, k]
        The ASMK scores, moved with their images (never changed).
    ids : int64 [Q, k]
        Database image ids; within the first ``R`` columns, verified images (at least
        ``min_inliers`` inliers) come first by decreasing inliers, then the others in their
        ASMK order.
    inliers : int32 [Q, k]
        Inliers of each image; -1 where nothing was verified (beyond ``R``, padding, a
        query without keypoints).
    """

    scores: np.ndarray
    ids: np.ndarray
    inliers: np.ndarray


# ------------------------------------------------------------------------------ matching


def word_matches(
    query_words, db_words, *, query_signatures=None, db_signatures=None, max_per_word: int = 5, max_hamming: int = 40
) -> np.ndarray:
    """Tentative correspondences: feature pairs that share a visual word and, with
    signatures, differ in at most ``max_hamming`` signature bits.

    Parameters
    ----------
    query_words, db_words : int [n], int [m]
        Each image's words, ascending (``asmkit.geometry.sort_by_word``).
    query_signatures, db_signatures : uint64 [n, W], uint64 [m, W], optional
        Binary signatures (``asmkit.geometry.feature_words``); without them words alone
        decide.
    max_per_word : int
        At most ``max_per_word ** 2`` pairs per word (the first found).
    max_hamming : int

    Returns
    -------
    int32 [M, 2]
        (query feature, database feature) positions.
    """
    cap = check_int(max_per_word, "max_per_word", min=1)
    max_hamming = check_int(max_hamming, "max_hamming", min=0)
    q = _sorted_words(query_words, "query_words")
    d = _sorted_words(db_words, "db_words")
    q_sig, d_sig = _signature_pair(query_signatures, db_signatures, q.shape[0], d.shape[0])
    _, pairs = _word_matches_kernel(
        q, q_sig, d, d_sig, np.array([0, d.shape[0]], np.int64), np.zeros(1, np.int64), cap, max_hamming
    )
    return pairs


def _signature_pair(q_sig, d_sig, n_q: int, n_d: int) -> tuple[np.ndarray, np.ndarray]:
    """Both signature arrays with one width; width 0 (no check) when either is missing."""
    if q_sig is None or d_sig is None or np.shape(q_sig)[1] == 0 or np.shape(d_sig)[1] == 0:
        return np.empty((n_q, 0), np.uint64), np.empty((n_d, 0), np.uint64)
    q_sig = np.ascontiguousarray(q_sig, dtype=np.uint64)
    d_sig = np.ascontiguousarray(d_sig, dtype=np.uint64)
    if q_sig.ndim != 2 or d_sig.ndim != 2 or q_sig.shape != (n_q, d_sig.shape[1]) or d_sig.shape[0] != n_d:
        raise ArgumentError(
            f"query_signatures: expected [{n_q}, W] and [{n_d}, W] signatures, got {q_sig.shape} and {d_sig.shape}"
        )
    return q_sig, d_sig


def _sorted_words(words, name: str) -> np.ndarray:
    w = np.asarray(words)
    if w.dtype.kind not in "iu" or w.ndim != 1:
        raise ArgumentError(f"{name}: expected a 1-D integer array, got {w.dtype} {w.shape}")
    w = w.astype(np.int32)
    if np.any(np.diff(w) < 0):
        raise ArgumentError(f"{name}: must be ascending (see asmkit.geometry.sort_by_word)")
    return w


def mutual_nn_matches(query_descriptors, db_descriptors, *, ratio: float | None = None) -> np.ndarray:
    """Tentative correspondences: mutual nearest neighbours of two images' descriptors.

    Parameters
    ----------
    query_descriptors, db_descriptors : float32 [n, D], float32 [m, D]
        L2-normalised descriptors (RootSIFT, whitened deep features).
    ratio : float, optional
        Also require Lowe's ratio test: nearest distance below ``ratio`` times the second
        nearest (in both directions' first image).

    Returns
    -------
    int32 [M, 2]
        (query feature, database feature) indices.
    """
    a = np.ascontiguousarray(query_descriptors, dtype=np.float32)
    b = np.ascontiguousarray(db_descriptors, dtype=np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ArgumentError(f"db_descriptors: expected [n, D] and [m, D] arrays, got {a.shape} and {b.shape}")
    ratio = check_float(ratio, "ratio", min=0.0, max=1.0, min_open=True, none=True)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.empty((0, 2), np.int32)
    sim = a @ b.T
    nn_ab = np.argmax(sim, axis=1)
    nn_ba = np.argmax(sim, axis=0)
    rows = np.arange(a.shape[0])
    keep = nn_ba[nn_ab] == rows
    if ratio is not None and b.shape[0] > 1:
        best = sim[rows, nn_ab]
        sim[rows, nn_ab] = -np.inf
        second = sim.max(axis=1)
        # Unit vectors: squared distance = 2 - 2 * similarity.
        keep &= np.maximum(2.0 - 2.0 * best, 0.0) < (ratio * ratio) * np.maximum(2.0 - 2.0 * second, 0.0)
    return np.stack([rows[keep], nn_ab[keep]], axis=1).astype(np.int32)


# ------------------------------------------------------------------------------ fitting


def fit_model(
    query_points,
    db_points,
    model: str = "affine",
    *,
    threshold: float = 8.0,
    max_iters: int = 1000,
    confidence: float = 0.999,
    pairs=None,
) -> Fit:
    """Fit a geometric model robustly (OpenCV USAC) to tentative correspondences.

    Never raises for hard geometry: no more correspondences than the model's minimal
    sample (which any model fits exactly), points on a line, a RANSAC that finds nothing
    or a degenerate model give ``Fit(0, None, all False)``.

    Parameters
    ----------
    query_points, db_points : float [M, 2]
        Matched point positions (x, y) in the query and the database image.
    model : str
        One of ``MODELS``.
    threshold : float
        Inlier threshold in pixels.
    max_iters : int
    confidence : float
    pairs : int [M, 2], optional
        The features behind the correspondences; inliers then count distinct features
        (a feature matched twice counts once). Without it every inlier counts.

    Returns
    -------
    Fit
    """
    check_choice(model, "model", MODELS)
    src = np.ascontiguousarray(query_points, dtype=np.float32)
    dst = np.ascontiguousarray(db_points, dtype=np.float32)
    if src.ndim != 2 or src.shape[1:] != (2,) or dst.shape != src.shape:
        raise ArgumentError(f"db_points: expected two [M, 2] arrays, got {src.shape} and {dst.shape}")
    return _fit(
        src,
        dst,
        model,
        float(threshold),
        int(max_iters),
        float(confidence),
        None if pairs is None else np.asarray(pairs),
    )


def _fit(src, dst, model, threshold, max_iters, confidence, pairs) -> Fit:
    n = src.shape[0]
    failed = Fit(0, None, np.zeros(n, dtype=bool))
    # A minimal sample fits exactly whatever the points: it is no evidence.
    if n <= _MIN_SAMPLE[model] or not (np.isfinite(src).all() and np.isfinite(dst).all()):
        return failed
    try:
        matrix, mask = _estimate(src, dst, model, threshold, max_iters, confidence)
    except cv2.error as exc:
        logger.debug("%s fit failed on %d correspondences: %s", model, n, exc)
        return failed
    if matrix is None or mask is None or not np.isfinite(matrix).all():
        return failed
    if model != "fundamental" and not _plausible(matrix):
        return failed
    mask = mask.ravel().astype(bool)
    if pairs is None:
        count = int(mask.sum())
    else:
        count = min(np.unique(pairs[mask, 0]).shape[0], np.unique(pairs[mask, 1]).shape[0])
    return Fit(count, matrix, mask)


def _estimate(src, dst, model, threshold, max_iters, confidence):
    if model == "homography":
        return cv2.findHomography(src, dst, cv2.USAC_MAGSAC, threshold, maxIters=max_iters, confidence=confidence)
    if model == "fundamental":
        matrix, mask = cv2.findFundamentalMat(src, dst, cv2.USAC_MAGSAC, threshold, confidence, max_iters)
        # Degenerate input can give several stacked 3x3 solutions; none of them is trusted.
        return (matrix, mask) if matrix is not None and matrix.shape == (3, 3) else (None, None)
    if model == "affine":
        params = cv2.UsacParams()
        params.threshold = threshold
        params.maxIterations = max_iters
        params.confidence = confidence
        params.score = cv2.SCORE_METHOD_MAGSAC
        matrix, mask = cv2.estimateAffine2D(src, dst, params=params)
    else:
        matrix, mask = cv2.estimateAffinePartial2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=threshold, maxIters=max_iters, confidence=confidence
        )
    if matrix is None:
        return None, None
    return np.vstack([matrix, [0.0, 0.0, 1.0]]), mask


def _plausible(matrix: np.ndarray) -> bool:
    """Whether a homography / affine map keeps orientation and a sane area ratio."""
    if matrix[2, 2] == 0:
        return False
    m = matrix / matrix[2, 2]
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    return 1.0 / _MAX_AREA_RATIO < det < _MAX_AREA_RATIO


# ------------------------------------------------------------------------------ re-ranking


def _verify_block(store: GeometryStore, q_kp, q_words, q_sigs, q_feature, slots, opts: VerifyOptions) -> np.ndarray:
    """Inliers (int32 [R]) of one query against the store images at ``slots``; query row
    ``r`` (one per feature and word) is feature ``q_feature[r]``."""
    d_sigs = store.signatures
    if q_sigs.shape[1] == 0 or d_sigs.shape[1] == 0:
        q_sigs, d_sigs = q_sigs[:, :0], np.empty((store.words.shape[0], 0), np.uint64)
    offsets, pairs = _word_matches_kernel(
        q_words, q_sigs, store.words, d_sigs, store.offsets, slots, opts.max_per_word, opts.max_hamming
    )
    inliers = np.zeros(slots.shape[0], dtype=np.int32)
    db_offsets, db_kp = store.offsets, store.keypoints
    need = max(opts.min_inliers, _MIN_SAMPLE[opts.model] + 1)
    for c in range(slots.shape[0]):
        own = pairs[offsets[c] : offsets[c + 1]]
        # Fewer correspondences than min_inliers can never verify: skip the fit.
        if own.shape[0] < need:
            continue
        src = q_kp[own[:, 0], :2]
        dst = db_kp[db_offsets[slots[c]] + own[:, 1], :2]
        features = np.stack([q_feature[own[:, 0]], own[:, 1]], axis=1)
        inliers[c] = _fit(src, dst, opts.model, opts.threshold, opts.max_iters, opts.confidence, features).inliers
    return inliers


def rerank(
    store: GeometryStore,
    query_keypoints: Sequence,
    query_words: Sequence,
    ids,
    scores,
    *,
    query_signatures: Sequence | None = None,
    top: int = 100,
    options: VerifyOptions | None = None,
) -> Reranked:
    """Re-rank the top of rankings by spatial verification.

    Parameters
    ----------
    store : GeometryStore
        Keypoints and words of the database images (ids as in ``ids``).
    query_keypoints : sequence of float32 [n_q, 4] (or [n_q, 2]) or None, one per query
        None or an empty array: that query is not verified (a warning is logged).
    query_words : sequence of int [n_q] or [n_q, m], one per query
        Each query feature's word, or its ``m`` words (``asmkit.geometry.feature_words``
        with ``m``): a feature then corresponds with the database features of any of them.
    query_signatures : sequence of uint64 [n_q, W] or [n_q, m, W], optional
        Each query feature's signature (``asmkit.geometry.feature_words``); without them
        (or a store without signatures) words alone make the correspondences.
    ids : int64 [Q, k]
        Rankings (``Index.search``); -1 padding is allowed.
    scores : float32 [Q, k]
        Their ASMK scores.
    top : int
        R: how many leading entries of each ranking are verified and reordered.
    options : VerifyOptions, optional

    Returns
    -------
    Reranked
    """
    opts = options if options is not None else VerifyOptions()
    if not isinstance(opts, VerifyOptions):
        raise ArgumentError(f"options: expected VerifyOptions, got {type(opts).__name__}")
    if not isinstance(store, GeometryStore):
        raise ArgumentError(f"store: expected a GeometryStore, got {type(store).__name__}")
    top = check_int(top, "top", min=0)
    ids = np.asarray(ids)
    scores = np.asarray(scores)
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or scores.shape != ids.shape:
        raise ArgumentError(
            f"ids: expected int [Q, k] with scores of the same shape, got {ids.shape} and {scores.shape}"
        )
    query_keypoints, query_words = list(query_keypoints), list(query_words)
    query_signatures = [None] * len(query_words) if query_signatures is None else list(query_signatures)
    if not len(query_keypoints) == len(query_words) == len(query_signatures) == ids.shape[0]:
        raise ArgumentError(
            f"query_keypoints: got {len(query_keypoints)} keypoint and {len(query_words)} word "
            f"arrays for {ids.shape[0]} rankings"
        )
    n_q, k = ids.shape
    r = min(top, k)
    inliers = np.full((n_q, k), -1, dtype=np.int32)
    tasks = []
    threads = opts.n_threads
    for q in range(n_q):
        kp = query_keypoints[q]
        if kp is None or len(kp) == 0:
            logger.warning("query %d has no keypoints: not verified", q)
            continue
        q_kp, q_words, q_sigs, q_feature = _query_rows(kp, query_words[q], query_signatures[q], q)
        if q_sigs.shape[1] and store.signatures.shape[1] and q_sigs.shape[1] != store.signatures.shape[1]:
            raise ArgumentError(
                f"query_signatures[{q}]: {q_sigs.shape[1]} words wide, the store's {store.signatures.shape[1]}"
            )
        slots = store.slots_of(ids[q, :r], missing=-1)
        # Few queries: split each ranking so that every thread gets candidates.
        n_blocks = max(1, min(r, threads // max(n_q, 1)))
        bounds = np.linspace(0, r, n_blocks + 1).astype(int)
        tasks += [(q, b, e, q_kp, q_words, q_sigs, q_feature, slots[b:e]) for b, e in pairwise(bounds) if e > b]

    def work(task):
        q, b, e, q_kp, q_words, q_sigs, q_feature, slots = task
        inliers[q, b:e] = _verify_block(store, q_kp, q_words, q_sigs, q_feature, slots, opts)

    if threads > 1 and len(tasks) > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, tasks))
    else:
        for task in tasks:
            work(task)
    inliers[:, :r][ids[:, :r] < 0] = -1
    order = order_by_inliers(inliers[:, :r], opts.min_inliers)
    out_ids, out_scores, out_inliers = ids.astype(np.int64, copy=True), scores.astype(np.float32, copy=True), inliers
    for array in (out_ids, out_scores, out_inliers):
        array[:, :r] = np.take_along_axis(array[:, :r], order, axis=1)
    return Reranked(out_scores, out_ids, out_inliers)


def _query_rows(keypoints, words, signatures, q: int):
    """One query's rows, one per feature and word, sorted by word: keypoints, words,
    signatures and the feature of each row (int64)."""
    words = np.asarray(words)
    kp = np.asarray(keypoints)
    if words.ndim == 2:
        if words.shape[0] != kp.shape[0]:
            raise ArgumentError(f"query_words[{q}]: {words.shape[0]} rows for {kp.shape[0]} keypoints")
        m = words.shape[1]
        rows = np.repeat(np.arange(kp.shape[0]), m)
        kp, words = kp[rows], words.reshape(-1)
        if signatures is not None:
            signatures = np.asarray(signatures).reshape(rows.shape[0], -1)
    else:
        rows = np.arange(kp.shape[0])
    q_kp, q_words, q_sigs = sort_by_word(kp, words, signatures, name=f"query_keypoints[{q}]")
    return q_kp, q_words, q_sigs, rows[np.argsort(words, kind="stable")]


def order_by_inliers(inliers, min_inliers: int) -> np.ndarray:
    """The re-ranking rule: a permutation of each row of a ranking's inliers.

    Parameters
    ----------
    inliers : int [Q, R]
        Inliers of each ranked candidate, in ASMK order (-1: not verified).
    min_inliers : int
        Fewer (and at least one) inliers count as not verified.

    Returns
    -------
    int64 [Q, R]
        Verified entries first by decreasing inliers, then the others; ties keep their
        position (the ASMK order).
    """
    inliers = np.asarray(inliers)
    verified = inliers >= max(min_inliers, 1)
    key = np.where(verified, -inliers.astype(np.int64), 1)
    return np.argsort(key, axis=1, kind="stable")


# ------------------------------------------------------------------------------ query expansion


def expansion_images(ids, inliers=None, n: int = 2, *, min_inliers: int = 15, fallback: int = 1, exclude=None):
    """The database images each query expands with (``expand``).

    Parameters
    ----------
    ids : int [Q, k]
        Rankings after re-ranking (``Reranked.ids``: verified images first, most inliers
        first); -1 padding.
    inliers : int [Q, k], optional
        ``Reranked.inliers`` (-1: not verified); None: nothing is verified (plain query
        expansion with the first ``fallback`` images).
    n : int
        Verified images (at least ``min_inliers`` inliers) a query expands with at most,
        in ranking order.
    min_inliers : int
    fallback : int
        A query with no verified image expands with its first ``fallback`` ranked images
        instead (0: not at all).
    exclude : int [Q], optional
        Each query's own database id (-1: none): a query never expands with itself.

    Returns
    -------
    int64 [Q, max(n, fallback)]
        Database ids; -1 padding.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ArgumentError(f"ids: expected int [Q, k], got {ids.dtype} {ids.shape}")
    n = check_int(n, "n", min=0)
    fallback = check_int(fallback, "fallback", min=0)
    min_inliers = check_int(min_inliers, "min_inliers", min=0)
    verified = np.zeros(ids.shape, dtype=bool)
    if inliers is not None:
        inliers = np.asarray(inliers)
        if inliers.shape != ids.shape:
            raise ArgumentError(f"inliers: expected {ids.shape}, got {inliers.shape}")
        verified = inliers >= max(min_inliers, 1)
    usable = ids >= 0
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=np.int64)
        if exclude.shape != (ids.shape[0],):
            raise ArgumentError(f"exclude: expected int [{ids.shape[0]}], got {exclude.shape}")
        usable &= ids != exclude[:, None]
    out = np.full((ids.shape[0], max(n, fallback)), -1, dtype=np.int64)
    for q in range(ids.shape[0]):
        chosen = ids[q, usable[q] & verified[q]][:n]
        if chosen.shape[0] == 0:
            chosen = ids[q, usable[q]][:fallback]
        out[q, : chosen.shape[0]] = chosen
    return out


def expand(
    reranked: Reranked,
    rows_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    n: int = 2,
    *,
    min_inliers: int = 15,
    fallback: int = 1,
    exclude=None,
) -> Reranked:
    """Query expansion in score space, after re-ranking.

    Each query expands with the images ``expansion_images`` chooses. Its expanded score of
    a database image is its own score plus the score the image gets from each expansion
    image used as a query; an image missing from a row (beyond that search's ``k``) gets 0
    from it. The verified images (at least ``min_inliers`` inliers) stay first, in the
    order re-ranking gave them; every other image follows by decreasing expanded score
    (ties: ascending id), whether it was in the query's ranking or comes from an expansion
    row only.

    Parameters
    ----------
    reranked : Reranked
        ``rerank``'s output, [Q, k].
    rows_of : callable
        ``rows_of(images)`` with int64 [E] distinct database ids gives the ranking of each
        image used as a query: ``(ids, scores)``, int [E, m] (-1 padding) and float [E, m]
        (``Index.search``; rows of a score matrix with ``ids`` every column's id).
    n, min_inliers, fallback, exclude
        See ``expansion_images``.

    Returns
    -------
    Reranked
        [Q, k]: the expanded scores, and the inliers re-ranking found (-1 for an image it
        did not verify). A query with no expansion image keeps its ranking and scores.
    """
    if not isinstance(reranked, Reranked):
        raise ArgumentError(f"reranked: expected Reranked, got {type(reranked).__name__}")
    q_ids, q_scores, q_inliers = reranked.ids, reranked.scores, reranked.inliers
    n_q, k = q_ids.shape
    chosen = expansion_images(q_ids, q_inliers, n, min_inliers=min_inliers, fallback=fallback, exclude=exclude)
    images = np.unique(chosen[chosen >= 0])
    expansion = np.where(chosen >= 0, np.searchsorted(images, chosen), -1)
    rows_ids, rows_scores = (np.empty((0, 0), np.int64), np.empty((0, 0))) if images.shape[0] == 0 else rows_of(images)
    rows_ids, rows_scores = np.asarray(rows_ids), np.asarray(rows_scores)
    if rows_ids.dtype.kind not in "iu" or rows_ids.shape[0] != images.shape[0] or rows_scores.shape != rows_ids.shape:
        raise ArgumentError(
            f"rows_of: expected int [{images.shape[0]}, m] ids and scores of the same shape, "
            f"got {rows_ids.dtype} {rows_ids.shape} and {rows_scores.shape}"
        )
    out_ids, out_scores, out_inliers = q_ids.copy(), q_scores.copy(), q_inliers.copy()
    for q in range(n_q):
        rows = expansion[q][expansion[q] >= 0]
        if rows.shape[0] == 0:
            continue
        head = q_ids[q, q_inliers[q] >= max(min_inliers, 1)]
        cand = np.concatenate([q_ids[q], rows_ids[rows].ravel()])
        score = np.concatenate([q_scores[q], rows_scores[rows].ravel()]).astype(np.float64)
        keep = (cand >= 0) & np.isfinite(score)
        image, which = np.unique(cand[keep], return_inverse=True)
        total = np.bincount(which, weights=score[keep], minlength=image.shape[0])
        rest = ~np.isin(image, head)
        order = np.argsort(-total[rest], kind="stable")
        tail = image[rest][order][: k - head.shape[0]]
        placed = np.concatenate([head, tail])
        out_ids[q] = -1
        out_scores[q] = -np.inf
        out_inliers[q] = -1
        out_ids[q, : placed.shape[0]] = placed
        out_scores[q, : placed.shape[0]] = total[np.searchsorted(image, placed)]
        known = q_ids[q] >= 0
        known_ids, known_inliers = q_ids[q, known], q_inliers[q, known]
        if known_ids.shape[0]:
            by_id = np.argsort(known_ids)
            at = by_id[np.minimum(np.searchsorted(known_ids, placed, sorter=by_id), known_ids.shape[0] - 1)]
            hit = known_ids[at] == placed
            out_inliers[q, : placed.shape[0]][hit] = known_inliers[at[hit]]
    return Reranked(out_scores, out_ids, out_inliers)


# ------------------------------------------------------------------------------ SfM pairs


@dataclass(frozen=True)
class PairGeometry:
    """A verified image pair.

    Attributes
    ----------
    name_a, name_b : str
    matches : int32 [M, 2]
        Tentative correspondences: indices into ``a``'s and ``b``'s keypoints as given.
    mask : bool [M]
        The inliers among them.
    inliers : int
        ``Fit.inliers`` (distinct features agreeing with the model).
    matrix : float64 [3, 3] or None
        The model, mapping ``a`` to ``b`` (``x_b^T F x_a = 0`` for ``"fundamental"``).
    """

    name_a: str
    name_b: str
    matches: np.ndarray
    mask: np.ndarray
    inliers: int
    matrix: np.ndarray | None


def verify_pairs(
    pairs: Sequence[tuple[str, str]], features, *, options: VerifyOptions | None = None, ratio: float | None = 0.9
) -> list[PairGeometry]:
    """Geometric verification of image pairs (for SfM): mutual nearest neighbours of the
    descriptors, then a robust fit (by default a fundamental matrix).

    Parameters
    ----------
    pairs : sequence of (str, str)
    features : mapping of str to ImageFeatures, or an ``asmkit.features.FeatureStore``
        Each image's descriptors float32 [n, D] and keypoints float32 [n, 4] (read once
        per image, through ``features.get``).
    options : VerifyOptions, optional
        Default ``VerifyOptions(model="fundamental", threshold=4.0, min_inliers=15)``.
    ratio : float or None
        Lowe's ratio test on top of mutual nearest neighbours.

    Returns
    -------
    list of PairGeometry
        One per pair, in order; an image without keypoints, or too few correspondences,
        gives 0 inliers (and ``matrix`` None).
    """
    opts = options if options is not None else VerifyOptions(model="fundamental", threshold=4.0, min_inliers=15)
    if not isinstance(opts, VerifyOptions):
        raise ArgumentError(f"options: expected VerifyOptions, got {type(opts).__name__}")
    pairs = [(str(a), str(b)) for a, b in pairs]
    names = sorted({n for pair in pairs for n in pair})
    cache = {}
    for name in names:
        try:
            cache[name] = features.get(name)
        except KeyError:
            cache[name] = None
        if cache[name] is None:
            raise ArgumentError(f"features: no features for image {name!r}")

    def one(pair):
        a, b = (cache[n] for n in pair)
        if a.keypoints is None or b.keypoints is None:
            logger.warning("pair %s %s: no keypoints, not verified", *pair)
            matches = np.empty((0, 2), np.int32)
        else:
            matches = mutual_nn_matches(a.descriptors, b.descriptors, ratio=ratio)
        if matches.shape[0] == 0:
            return PairGeometry(pair[0], pair[1], matches, np.zeros(0, bool), 0, None)
        fit = _fit(
            a.keypoints[matches[:, 0], :2],
            b.keypoints[matches[:, 1], :2],
            opts.model,
            opts.threshold,
            opts.max_iters,
            opts.confidence,
            matches,
        )
        return PairGeometry(pair[0], pair[1], matches, fit.mask, fit.inliers, fit.matrix)

    if opts.n_threads > 1 and len(pairs) > 1:
        with ThreadPoolExecutor(opts.n_threads) as pool:
            return list(pool.map(one, pairs))
    return [one(pair) for pair in pairs]
