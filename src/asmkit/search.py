"""Selective match kernel scoring, top-k, and the all-vs-all similarity matrix (ASMK.md §3-4).

Scores follow the reference's ``IVF.search`` arithmetic (see ``_kernels.search_kernel``),
with two documented differences where the reference divides by zero: a query without
descriptors, or whose idf-weighted word count n_q is 0, scores 0 against every image, and
an image with n_d = 0 scores 0. Results are ranked by decreasing float32 score, ties by
ascending image id, so that top-k lists of index shards merge (``merge_topk``) into exactly
the whole index's list.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np

from . import _kernels
# Rows per quantize call in similarity_matrix (bounds its int64 word temporaries): the
# codebook's own block size, so that the pieces are the segments one call would use.
from .codebook import _QUANTIZE_ROWS, Codebook
from .ivf import InvertedFile, compute_idf, image_norms
from .kernel import Aggregates, Descriptors, aggregate, n_hamming_bits, prepare_descriptors
from .params import Params

__all__ = ["as_params", "check_k", "score_aggregates", "aggregate_images", "similarity_matrix", "merge_topk"]

logger = logging.getLogger(__name__)

_EMPTY_CODES = np.empty((0, 0), dtype=np.uint64)
_EMPTY_REAL = np.empty((0, 0), dtype=np.float32)

#: Word-major scoring: queries per block (each posting list is read once per block; 64
#: gave the best times on 2000- and 10 000-image databases, docs/performance.md), and the
#: largest float64 [S, block] score tile per thread, which shrinks blocks for large S.
WORD_MAJOR_BLOCK = 64
TILE_BYTES = 1 << 23
#: "auto" scores word-major when a posting list would be shared by at least
#: ``MIN_WORD_MAJOR_GROUP`` queries of a block on average (block × words per query / K),
#: and the posting data (codes + slots) exceeds ``MIN_WORD_MAJOR_IVF_BYTES``: below that
#: the inverted file stays in the last-level cache and query-major scoring was as fast or
#: faster (docs/performance.md, "All-vs-all scores").
MIN_WORD_MAJOR_GROUP = 8
MIN_WORD_MAJOR_IVF_BYTES = 1 << 24
_ORDERS = ("auto", "query", "word")


def as_params(params) -> Params:
    """``Params`` from None (defaults), a preset name, a flat dict, or a ``Params``.

    Raises
    ------
    ValueError
        Unknown preset or parameter names (naming them).
    TypeError
        Anything else.
    """
    if params is None:
        return Params()
    if isinstance(params, Params):
        return params
    if isinstance(params, str):
        return Params.preset(params)
    if isinstance(params, Mapping):
        return Params.from_dict(params)
    raise TypeError(f"params: expected Params, a preset name or a dict, got {type(params).__name__}")


def check_k(k, *, name: str = "k") -> int | None:
    """Validate a result count: None or a positive int."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive int or None, got {k!r}")
    if k < 1:
        raise ValueError(f"{name}: must be at least 1, got {k}")
    return int(k)


def _readonly(array: np.ndarray) -> np.ndarray:
    """A C-contiguous read-only view, so that in-memory and memory-mapped arrays give the
    numba kernels one signature (and one cached compilation)."""
    view = np.ascontiguousarray(np.asarray(array)).view()
    view.flags.writeable = False
    return view


def aggregate_images(codebook: Codebook, desc: Descriptors, assignments: np.ndarray, binary: bool,
                     begin: int = 0, end: int | None = None) -> Aggregates:
    """Aggregate images ``begin .. end - 1`` of ``desc`` given all rows' assignments.

    Parameters
    ----------
    codebook : Codebook
    desc : Descriptors
    assignments : int64 [N, m]
        Words of every row of ``desc.vecs``.
    binary : bool
    begin, end : int
        Image label range (default: all images).
    """
    end = desc.n_images if end is None else end
    return aggregate(desc.vecs, assignments, desc.starts[begin : end + 1], desc.order, codebook.centroids,
                     binary=binary)


def score_aggregates(
    ivf: InvertedFile,
    idf: np.ndarray,
    sqrt_norms: np.ndarray,
    slot_ids: np.ndarray,
    queries: Aggregates,
    params: Params,
    *,
    dim: int,
    k: int | None = None,
    dense_out: np.ndarray | None = None,
    order: str = "auto",
) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
    """Score aggregated queries against an inverted file.

    Parameters
    ----------
    ivf : InvertedFile
        K posting lists over S slots.
    idf : float32 [K]
    sqrt_norms : float64 [S]
        √n_d per slot.
    slot_ids : int64 [S]
        User image id of each slot.
    queries : Aggregates
        Q query images (their rows sorted by word).
    params : Params
        ``alpha`` and ``tau`` are used.
    dim : int
        Descriptor dimension D (B = 32 · ceil(D / 32) for binary codes).
    k : int, optional
        Results per query; None ranks all S images.
    dense_out : float32 [Q, S], optional
        Zero-filled C-contiguous array: write every slot's score there instead.
    order : {"auto", "query", "word"}
        Loop order of the scoring kernel; all give bit-identical results. ``"query"``
        scores one query at a time over its posting lists (``_kernels.search_kernel``);
        ``"word"`` scores blocks of up to ``WORD_MAJOR_BLOCK`` queries word by word into a
        float64 [S, block] tile of at most ``TILE_BYTES``, reading each posting list once
        per block (``_kernels.search_kernel_word_major``); ``"auto"`` picks ``"word"``
        for binary codes of D in 65 .. 128 when the posting data exceeds
        ``MIN_WORD_MAJOR_IVF_BYTES`` (outgrows the cache) and a block's queries share
        each posting list ``MIN_WORD_MAJOR_GROUP`` times or more on average.

    Returns
    -------
    (scores float32 [Q, k], ids int64 [Q, k]) or ``dense_out``
        Top-k rows sorted by decreasing score (ties: ascending id), padded with
        -inf / -1 beyond S results.
    """
    if order not in _ORDERS:
        raise ValueError(f"order: expected one of {', '.join(_ORDERS)}, got {order!r}")
    n_queries = queries.offsets.shape[0] - 1
    n_slots = int(slot_ids.shape[0])
    if queries.data.dtype != ivf.data.dtype or queries.data.shape[1] != ivf.data.shape[1]:
        raise ValueError("queries: aggregates do not match the inverted file (binary/real or dimension)")
    dense = dense_out is not None
    if dense:
        if dense_out.shape != (n_queries, n_slots) or dense_out.dtype != np.float32:
            raise ValueError(f"dense_out: expected float32 {(n_queries, n_slots)}, got {dense_out.dtype} {dense_out.shape}")
        out_scores, out_ids, k_eff = dense_out, np.empty((0, 0), dtype=np.int64), 0
    else:
        k = n_slots if k is None else k
        k_eff = min(k, n_slots)
        out_scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
        out_ids = np.full((n_queries, k), -1, dtype=np.int64)
    if n_queries == 0 or n_slots == 0:
        return out_scores if dense else (out_scores, out_ids)

    binary = ivf.binary
    alpha = float(params.alpha)
    alpha_is_int = bool(alpha.is_integer())
    tau = np.float32(params.tau)
    if binary:
        # NaN (u < τ) becomes a zero weight: the kernel adds it without a branch.
        sigma_of_h = np.nan_to_num(_kernels.sigma_table(n_hamming_bits(dim), alpha, alpha_is_int, tau), nan=0.0)
    else:
        sigma_of_h = np.empty(0, dtype=np.float32)
    with np.errstate(divide="ignore"):
        inv_sqrt_norms = np.where(sqrt_norms > 0, 1.0 / sqrt_norms, 0.0)
    # Work estimate: posting entries the queries touch, plus the per-query pass over slots.
    work = int(np.diff(ivf.offsets)[queries.words].sum()) + n_queries * n_slots
    block = max(1, min(WORD_MAJOR_BLOCK, TILE_BYTES // (8 * n_slots)))
    if order == "auto":
        # The word-major kernel's entry-by-group loop exists for two-word binary codes
        # (D in 65 .. 128); elsewhere it scans row by row and gains nothing.
        two_words = binary and queries.data.shape[1] == 2
        large = ivf.data.nbytes + ivf.slots.nbytes > MIN_WORD_MAJOR_IVF_BYTES
        group = min(block, n_queries) * queries.words.shape[0] / (n_queries * max(ivf.offsets.shape[0] - 1, 1))
        order = "word" if two_words and large and group >= MIN_WORD_MAJOR_GROUP else "query"
    with _kernels.thread_budget(work, _kernels.MIN_PARALLEL_ENTRIES) as threads:
        if order == "word":
            # At least one block per thread, even when that shrinks the blocks.
            blocking = max(1, min(block, -(-n_queries // threads)))
            kernel = _kernels.search_kernel_word_major
        else:
            kernel, blocking = _kernels.search_kernel, min(n_queries, 4 * threads)
        kernel(
            _readonly(queries.offsets), _readonly(queries.words),
            _readonly(queries.data if binary else _EMPTY_CODES), _readonly(_EMPTY_REAL if binary else queries.data),
            _readonly(ivf.offsets), _readonly(ivf.slots),
            _readonly(ivf.data if binary else _EMPTY_CODES), _readonly(_EMPTY_REAL if binary else ivf.data),
            _readonly(idf), _readonly(inv_sqrt_norms), _readonly(slot_ids),
            bool(binary), _readonly(sigma_of_h), alpha, alpha_is_int, tau,
            int(k_eff), bool(dense), int(blocking), out_scores, out_ids,
        )
    return out_scores if dense else (out_scores, out_ids)


def _build(codebook: Codebook, desc: Descriptors, assignments: np.ndarray, params: Params):
    """Inverted file of all images of ``desc`` (slot = label), with idf and √norms."""
    aggregates = aggregate_images(codebook, desc, assignments, params.binary)
    ivf = InvertedFile.from_aggregates(aggregates, np.arange(desc.n_images, dtype=np.int64), codebook.size)
    idf = compute_idf(ivf.counts, desc.n_images, params.use_idf)
    return ivf, idf, np.sqrt(image_norms(ivf, idf, desc.n_images))


def _quantize_compact(codebook: Codebook, vecs: np.ndarray, m: int) -> np.ndarray:
    """Words of every row, quantized ``_QUANTIZE_ROWS`` rows at a time into the narrowest
    integer type that holds a word id.

    Returns
    -------
    uint16 [N, m] (K <= 65536) or int32 [N, m]
        2 (or 4) bytes per word instead of ``Codebook.quantize``'s 8 for all rows at once.
    """
    dtype = np.uint16 if codebook.size <= 1 << 16 else np.int32
    out = np.empty((vecs.shape[0], min(m, codebook.size)), dtype=dtype)
    for begin in range(0, vecs.shape[0], _QUANTIZE_ROWS):
        out[begin : begin + _QUANTIZE_ROWS] = codebook._quantize(vecs[begin : begin + _QUANTIZE_ROWS], m)
    return out


def similarity_matrix(
    codebook: Codebook,
    vecs,
    image_ids=None,
    params=None,
    *,
    k: int | None = None,
    chunk: int = 256,
    order: str = "auto",
):
    """All-vs-all ASMK scores of one image set, quantizing every descriptor once.

    The descriptors are quantized with m = max(ma_query, ma_database); the first
    ``ma_database`` columns (the nearest words) serve the database side, the first
    ``ma_query`` the query side. Queries are aggregated and scored ``chunk`` images at a
    time.

    Memory beyond the result and the input: the grouping of rows by image (16 bytes per
    descriptor), the words of every descriptor (2 bytes per word for K <= 65536), the
    database's inverted file (about 20 bytes per posting entry, binary, D <= 128), and
    per chunk the chunk's int64 words, aggregates and score tiles.

    Parameters
    ----------
    codebook : Codebook
    vecs : float32 [N, D] or list of float32 [n_i, D]
        Descriptors (see ``asmkit.kernel.prepare_descriptors``).
    image_ids : int64 [N], or None / int64 [len(vecs)] for list input
    params : Params, preset name, dict or None
    k : int, optional
        Return the top-k per row instead of the dense matrix.
    chunk : int
        Query images scored per batch.
    order : {"auto", "query", "word"}
        Scoring loop order (see ``score_aggregates``); results are identical.

    Returns
    -------
    float32 [I, I]
        Row = query, column = database image, both in the order of the distinct image
        ids (ascending for array input, list order for list input). Or, with ``k``,
        ``(scores float32 [I, k], ids int64 [I, k])``.
    """
    params = as_params(params)
    k = check_k(k)
    chunk = check_k(chunk, name="chunk")
    if order not in _ORDERS:
        raise ValueError(f"order: expected one of {', '.join(_ORDERS)}, got {order!r}")
    desc = prepare_descriptors(vecs, image_ids, dim=codebook.dim)
    words = _quantize_compact(codebook, desc.vecs, max(params.ma_query, params.ma_database))
    ivf, idf, sqrt_norms = _build(codebook, desc, words[:, : params.ma_database].astype(np.int64), params)
    n = desc.n_images
    logger.debug("similarity matrix: %d images, %d posting entries, %d-image query chunks", n, ivf.n_entries, chunk)
    if k is None:
        result = np.zeros((n, n), dtype=np.float32)
    else:
        scores = np.empty((n, k), dtype=np.float32)
        ids = np.empty((n, k), dtype=np.int64)
    for begin in range(0, n, chunk):
        end = min(begin + chunk, n)
        # Only this chunk's rows get int64 words (and, if the chunk's rows are scattered
        # in the input, a gathered copy of their descriptors).
        rows = desc.image_rows(begin, end)
        chunk_vecs = desc.vecs[rows]
        chunk_words = words[rows][:, : params.ma_query].astype(np.int64)
        queries = aggregate(chunk_vecs, chunk_words, desc.starts[begin : end + 1] - desc.starts[begin],
                            np.arange(len(chunk_vecs), dtype=np.int64), codebook.centroids, binary=params.binary)
        if k is None:
            score_aggregates(ivf, idf, sqrt_norms, desc.image_ids, queries, params, dim=codebook.dim,
                             dense_out=result[begin:end], order=order)
        else:
            scores[begin:end], ids[begin:end] = score_aggregates(ivf, idf, sqrt_norms, desc.image_ids, queries,
                                                                 params, dim=codebook.dim, k=k, order=order)
    return result if k is None else (scores, ids)


def merge_topk(results: Sequence[tuple[np.ndarray, np.ndarray]], k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k results of the same queries into one top-k.

    Ranking order is decreasing score, ties by ascending id, padding (-1) last, the same
    order ``Index.search`` uses; so merging the results of ``Index.split`` shards gives
    exactly the whole index's result.

    Parameters
    ----------
    results : sequence of (scores float32 [Q, k_i], ids int64 [Q, k_i])
    k : int, optional
        Results kept per query (default: the largest k_i).

    Returns
    -------
    scores : float32 [Q, k]
    ids : int64 [Q, k]
    """
    if not results:
        raise ValueError("results: need at least one (scores, ids) pair")
    n_queries = None
    for i, pair in enumerate(results):
        if len(pair) != 2:
            raise ValueError(f"results[{i}]: expected a (scores, ids) pair")
        s, d = np.asarray(pair[0]), np.asarray(pair[1])
        if s.ndim != 2 or s.shape != d.shape:
            raise ValueError(f"results[{i}]: scores and ids must be 2-D arrays of one shape")
        if n_queries is None:
            n_queries = s.shape[0]
        elif s.shape[0] != n_queries:
            raise ValueError(f"results[{i}]: has {s.shape[0]} queries, expected {n_queries}")
    k = check_k(k) or max(np.asarray(p[0]).shape[1] for p in results)
    scores = np.concatenate([np.asarray(p[0], dtype=np.float32) for p in results], axis=1)
    ids = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in results], axis=1)
    # Padding sorts last: its id -1 is mapped above every real id.
    tie_ids = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((tie_ids, -scores), axis=1)[:, :k]
    out_scores = np.take_along_axis(scores, order, axis=1)
    out_ids = np.take_along_axis(ids, order, axis=1)
    if out_scores.shape[1] < k:
        pad = k - out_scores.shape[1]
        out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
    return out_scores, out_ids
