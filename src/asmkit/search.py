"""Selective match kernel scoring, top-k, and the all-vs-all similarity matrix (docs/math.md §3-4).

``score_queries`` is the one query path: every entry point that scores query images
(``Index.search``, ``Index.similarity_matrix``, ``similarity_matrix``, ``asmkit.compat``)
quantizes, aggregates and scores them there, against a ``Database``.

Scores follow the reference's ``IVF.search`` arithmetic (see ``_kernels.search_kernel``),
with two documented differences where the reference divides by zero: a query without
descriptors, or whose idf-weighted word count n_q is 0, scores 0 against every image, and
an image with n_d = 0 scores 0. Results are ranked by decreasing float32 score, ties by
ascending image id, so that top-k lists of index shards merge (``merge_topk``) into exactly
the whole index's list.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import _kernels
from ._validation import ArgumentError, check_choice, check_int
from .codebook import QUANTIZE_ROWS, Assignment, Codebook
from .ivf import InvertedFile, compute_idf, image_norms
from .kernel import (
    Aggregates,
    Descriptors,
    aggregate,
    n_hamming_bits,
    prepare_descriptors,
)
from .params import Params, as_params
from .regions import Regions, aggregate_regions

__all__ = [
    "QUERY_CHUNK_ROWS",
    "TIED_BATCH_ROWS",
    "Database",
    "merge_topk",
    "score_aggregates",
    "score_queries",
    "similarity_matrix",
]

logger = logging.getLogger(__name__)

_EMPTY_CODES = np.empty((0, 0), dtype=np.uint64)
_EMPTY_REAL = np.empty((0, 0), dtype=np.float32)

#: Word-major scoring: queries per block (each posting list is read once per block; 64
#: gave the best times, docs/performance.md "All-vs-all scores"), and the
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
_ORDERS = ("auto", "query", "word", "slots")


def _readonly(array: np.ndarray) -> np.ndarray:
    """A C-contiguous read-only view, so that in-memory and memory-mapped arrays give the
    numba kernels one signature (and one cached compilation)."""
    view = np.ascontiguousarray(np.asarray(array)).view()
    view.flags.writeable = False
    return view


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
    order : {"auto", "query", "word", "slots"}
        Loop order of the scoring kernel; all give bit-identical results. ``"query"``
        scores one query at a time over its posting lists (``_kernels.search_kernel``);
        ``"word"`` scores blocks of up to ``WORD_MAJOR_BLOCK`` queries word by word into a
        float64 [S, block] tile of at most ``TILE_BYTES``, reading each posting list once
        per block (``_kernels.search_kernel_word_major``); ``"auto"`` picks ``"word"``
        for binary codes of D in 65 .. 128 when the posting data exceeds
        ``MIN_WORD_MAJOR_IVF_BYTES`` (outgrows the cache) and a block's queries share
        each posting list ``MIN_WORD_MAJOR_GROUP`` times or more on average; ``"slots"``
        scores one query at a time, its posting lists divided among the threads by slot
        range (``_kernels.search_kernel_slots``; the slots must ascend within every
        posting list, ``InvertedFile.slots_ascend``), and ``"auto"`` picks it when there
        are fewer queries than threads (which the work, ``MIN_PARALLEL_ENTRIES`` or more,
        gets) and the slots ascend.

    Returns
    -------
    (scores float32 [Q, k], ids int64 [Q, k]) or ``dense_out``
        Top-k rows sorted by decreasing score (ties: ascending id), padded with
        -inf / -1 beyond S results.
    """
    check_choice(order, "order", _ORDERS)
    n_queries = queries.offsets.shape[0] - 1
    n_slots = int(slot_ids.shape[0])
    if queries.data.dtype != ivf.data.dtype or queries.data.shape[1] != ivf.data.shape[1]:
        raise ArgumentError("queries: aggregates do not match the inverted file (binary/real or dimension)")
    dense = dense_out is not None
    if dense:
        if dense_out.shape != (n_queries, n_slots) or dense_out.dtype != np.float32:
            raise ArgumentError(
                f"dense_out: expected float32 {(n_queries, n_slots)}, got {dense_out.dtype} {dense_out.shape}"
            )
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
    auto = order == "auto"
    if auto:
        # The word-major kernel's entry-by-group loop exists for two-word binary codes
        # (D in 65 .. 128); elsewhere it scans row by row and gains nothing.
        two_words = binary and queries.data.shape[1] == 2
        large = ivf.data.nbytes + ivf.slots.nbytes > MIN_WORD_MAJOR_IVF_BYTES
        group = min(block, n_queries) * queries.words.shape[0] / (n_queries * max(ivf.offsets.shape[0] - 1, 1))
        order = "word" if two_words and large and group >= MIN_WORD_MAJOR_GROUP else "query"
    if order == "slots" and not ivf.slots_ascend:
        raise ArgumentError('order: "slots" needs slots ascending within every posting list')
    with _kernels.thread_budget(work, _kernels.MIN_PARALLEL_ENTRIES) as threads:
        # A query-major block is one query: below one query per thread, divide each
        # query's posting lists instead.
        if auto and order == "query" and n_queries < threads and ivf.slots_ascend:
            order = "slots"
        if order == "slots":
            kernel, blocking = _kernels.search_kernel_slots, threads
        elif order == "word":
            # At least one block per thread, even when that shrinks the blocks.
            blocking = max(1, min(block, -(-n_queries // threads)))
            kernel = _kernels.search_kernel_word_major
        else:
            kernel, blocking = _kernels.search_kernel, min(n_queries, 4 * threads)
        kernel(
            _readonly(queries.offsets),
            _readonly(queries.words),
            _readonly(queries.data if binary else _EMPTY_CODES),
            _readonly(_EMPTY_REAL if binary else queries.data),
            _readonly(ivf.offsets),
            _readonly(ivf.slots),
            _readonly(ivf.data if binary else _EMPTY_CODES),
            _readonly(_EMPTY_REAL if binary else ivf.data),
            _readonly(idf),
            _readonly(inv_sqrt_norms),
            _readonly(slot_ids),
            bool(binary),
            _readonly(sigma_of_h),
            alpha,
            alpha_is_int,
            tau,
            int(k_eff),
            bool(dense),
            int(blocking),
            out_scores,
            out_ids,
        )
    return out_scores if dense else (out_scores, out_ids)


@dataclass(frozen=True)
class Database:
    """What query images are scored against: posting lists with their idf and norms.

    Attributes
    ----------
    ivf : InvertedFile
        K posting lists over S slots.
    idf : float32 [K]
    sqrt_norms : float64 [S]
        √n_d per slot.
    ids : int64 [S]
        User image id of each slot.
    """

    ivf: InvertedFile
    idf: np.ndarray
    sqrt_norms: np.ndarray
    ids: np.ndarray

    @property
    def n_images(self) -> int:
        return int(self.ids.shape[0])


#: Query descriptors per chunk of ``score_queries``: enough query images per chunk for
#: word-major scoring to pay off, few enough to bound peak memory (16 MiB of 128-D
#: float32 and its words).
QUERY_CHUNK_ROWS = 1 << 15
#: Tied query rows held back for one settling pass, so that faiss's batches are shared by
#: the rows of many chunks (2 MiB of 128-D float32).
TIED_BATCH_ROWS = 1 << 12


def score_queries(
    codebook: Codebook,
    queries: Descriptors,
    database: Database,
    params,
    *,
    k: int | None = None,
    dense_out: np.ndarray | None = None,
    chunk_images: int | None = None,
    chunk_rows: int = QUERY_CHUNK_ROWS,
    order: str = "auto",
    words: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
    """The query path: quantize, aggregate and score query images against a database.

    Each query image is quantized as its own segment with ``params.ma_query`` (the
    reference's one faiss call per query image), aggregated, and scored (``alpha``,
    ``tau``) in chunks of whole images. The chunks are scored with provisional words
    (``Codebook.assign``); the tied rows of many chunks are then settled together, and the
    few images whose settled words differ are scored again. ``Index.search``,
    ``Index.similarity_matrix``, ``similarity_matrix`` and ``asmkit.compat`` all score
    queries here, so they agree also on float32-tied rows.

    Parameters
    ----------
    codebook : Codebook
    queries : Descriptors
        Query images (``asmkit.kernel.prepare_descriptors``; ``unique_ids=False`` lets
        two list entries share an id).
    database : Database
    params : Params, preset name, dict or None
        ``ma_query``, ``binary``, ``alpha`` and ``tau`` are used; ``binary`` must match
        the database.
    k : int, optional
        Results per query; None ranks all S database images.
    dense_out : float32 [Q, S], optional
        Zero-filled C-contiguous array: write every database image's score there instead
        of ranking.
    chunk_images : int, optional
        Query images per chunk at most (bounds the memory of their aggregates).
    chunk_rows : int
        Query descriptors per chunk, about (a larger image makes a chunk alone).
    order : {"auto", "query", "word", "slots"}
        Scoring loop order (``score_aggregates``); results are identical.
    words : integer [N, >= ma_query], optional
        The settled words of every row of ``queries.vecs``, quantized as this path would
        (each image its own segment; the first ``ma_query`` columns are used): the path
        then only aggregates and scores (``similarity_matrix`` quantizes both sides at
        once).

    Returns
    -------
    (scores float32 [Q, k], ids int64 [Q, k]) or ``dense_out``
        Row = query image in ``queries.image_ids`` order. Scores decreasing, ties by
        ascending id, padding -inf / -1.
    """
    params = as_params(params)
    k = check_int(k, "k", min=1, none=True)
    chunk_images = check_int(chunk_images, "chunk_images", min=1, none=True)
    chunk_rows = check_int(chunk_rows, "chunk_rows", min=1)
    check_choice(order, "order", _ORDERS)
    n = queries.n_images
    dense = dense_out is not None
    if dense:
        if dense_out.shape != (n, database.n_images) or dense_out.dtype != np.float32:
            raise ArgumentError(
                f"dense_out: expected float32 {(n, database.n_images)}, got {dense_out.dtype} {dense_out.shape}"
            )
        scores = ids = None
    else:
        width = database.n_images if k is None else k
        scores = np.empty((n, width), dtype=np.float32)
        ids = np.empty((n, width), dtype=np.int64)

    def score(images: np.ndarray | slice, vecs: np.ndarray, words: np.ndarray, starts: np.ndarray) -> None:
        aggregates = aggregate(
            vecs, words, starts, np.arange(len(vecs), dtype=np.int64), codebook.centroids, binary=params.binary
        )
        args = (database.ivf, database.idf, database.sqrt_norms, database.ids, aggregates, params)
        if not dense:
            scores[images], ids[images] = score_aggregates(*args, dim=codebook.dim, k=k, order=order)
        elif isinstance(images, slice):
            score_aggregates(*args, dim=codebook.dim, dense_out=dense_out[images], order=order)
        else:
            block = np.zeros((len(images), database.n_images), dtype=np.float32)
            dense_out[images] = score_aggregates(*args, dim=codebook.dim, dense_out=block, order=order)

    def image_block(images: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray, np.ndarray | slice]:
        """The descriptors of some query images, grouped by image, their segment offsets
        and their rows in ``queries.vecs``."""
        if isinstance(images, slice):
            rows = queries.image_rows(images.start, images.stop)
            sizes = np.diff(queries.starts[images.start : images.stop + 1])
        else:
            sizes = queries.starts[images + 1] - queries.starts[images]
            rows = queries.order[np.concatenate([np.arange(queries.starts[i], queries.starts[i + 1]) for i in images])]
        starts = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=starts[1:])
        return queries.vecs[rows], starts, rows

    pending: list[Assignment] = []
    pending_images: list[np.ndarray] = []

    def settle_pending() -> None:
        """Settle the held-back tied rows; score again the images whose words changed."""
        if not pending:
            return
        joined = Assignment.concatenate(pending)
        images = np.concatenate(pending_images)
        pending.clear()
        pending_images.clear()
        provisional = joined.words.copy()
        settled = joined.settle()
        # A query image aggregates over the set of its words: column order plays no part.
        changed = np.any(np.sort(settled, axis=1) != np.sort(provisional, axis=1), axis=1)
        rescore = np.unique(images[changed])
        if rescore.size:
            vecs, starts, _ = image_block(rescore)
            words = codebook.assign(
                vecs, params.ma_query, segments=starts, nearest_first=False, check_finite=False
            ).settle()
            score(rescore, vecs, words, starts)

    begin = 0
    held = 0
    while begin < n:
        end = int(np.searchsorted(queries.starts, queries.starts[begin] + chunk_rows, side="right")) - 1
        end = min(max(end, begin + 1), n if chunk_images is None else begin + chunk_images, n)
        vecs, starts, rows = image_block(slice(begin, end))
        if words is not None:
            score(slice(begin, end), vecs, words[rows, : params.ma_query].astype(np.int64), starts)
            begin = end
            continue
        assignment = codebook.assign(vecs, params.ma_query, segments=starts, nearest_first=False, check_finite=False)
        score(slice(begin, end), vecs, assignment.words, starts)
        if assignment.tied.size:
            pending.append(assignment.tied_part())
            pending_images.append(begin + np.searchsorted(starts, assignment.tied, side="right") - 1)
            held += assignment.tied.size
            if held >= TIED_BATCH_ROWS:
                settle_pending()
                held = 0
        begin = end
    settle_pending()
    return dense_out if dense else (scores, ids)


def _words_of_both_sides(codebook: Codebook, desc: Descriptors, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Database words at ma_database = 1 and query words at ma_query = m from one
    quantization, both as the reference's calls give them, in ``desc.vecs`` row order.

    Each image is quantized as its own segment (the query side), nearest word first, so
    the rows whose nearest word or set of m words float32 rounding decides are known. The
    other rows' nearest word is the database call's too; the tied ones are searched again
    as the database call (one call over all rows, ``QUANTIZE_ROWS`` at a time) meets them.

    Returns
    -------
    database : int64 [N, 1]
    query : uint16 [N, min(m, K)] (K <= 65536) or int32
        2 (or 4) bytes per word: int64 words exist for one block of images at a time.
    """
    n_rows = desc.vecs.shape[0]
    database = np.empty((n_rows, 1), dtype=np.int64)
    query = np.empty((n_rows, min(m, codebook.size)), dtype=np.uint16 if codebook.size <= 1 << 16 else np.int32)
    begin = 0
    while begin < desc.n_images:
        end = int(np.searchsorted(desc.starts, desc.starts[begin] + QUANTIZE_ROWS, side="right")) - 1
        end = min(max(end, begin + 1), desc.n_images)
        rows = desc.image_rows(begin, end)
        vecs = desc.vecs[rows]
        assignment = codebook.assign(
            vecs, m, segments=desc.starts[begin : end + 1] - desc.starts[begin], check_finite=False
        )
        tied = assignment.tied
        words = assignment.settle()
        query[rows] = words
        database[rows] = words[:, :1]
        if tied.size:
            position = rows.start + tied if isinstance(rows, slice) else rows[tied]
            local = position % QUANTIZE_ROWS
            size = np.minimum(QUANTIZE_ROWS, n_rows - (position - local))
            database[position] = codebook.settle_rows(vecs[tied], local, size, 1)[1]
        begin = end
    return database, query


def similarity_matrix(
    codebook: Codebook,
    vecs,
    image_ids=None,
    params=None,
    *,
    k: int | None = None,
    chunk: int = 256,
    order: str = "auto",
    regions: Regions | None = None,
):
    """All-vs-all ASMK scores of one image set, without building an ``Index``.

    The database side is quantized as ``Index.add`` does (one call over all rows, with
    ``ma_database``), the query side as ``Index.search`` does (each image its own call,
    with ``ma_query``), and the queries are scored by ``score_queries``: the scores equal
    ``Index.similarity_matrix``'s on an index of the same images. With ``ma_database`` 1
    every descriptor is quantized once, for both sides: only the rows tied within float32
    rounding are searched again, as the database call meets them.

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
    order : {"auto", "query", "word", "slots"}
        Scoring loop order (see ``score_aggregates``); results are identical.
    regions : asmkit.regions.Regions, optional
        Regions of the images: the database side is aggregated by R-ASMK(*)
        (``asmkit.regions.aggregate_regions``), the query side from the whole images.

    Returns
    -------
    float32 [I, I]
        Row = query, column = database image, both in the order of the distinct image
        ids (ascending for array input, list order for list input). Or, with ``k``,
        ``(scores float32 [I, k], ids int64 [I, k])``.
    """
    params = as_params(params)
    k = check_int(k, "k", min=1, none=True)
    chunk = check_int(chunk, "chunk", min=1)
    check_choice(order, "order", _ORDERS)
    desc = prepare_descriptors(vecs, image_ids, dim=codebook.dim)
    if params.ma_database == 1:
        database_words, query_words = _words_of_both_sides(codebook, desc, params.ma_query)
    else:
        database_words = codebook.assign(desc.vecs, params.ma_database, check_finite=False).settle()
        query_words = None
    if regions is None:
        aggregates = aggregate(
            desc.vecs, database_words, desc.starts, desc.order, codebook.centroids, binary=params.binary
        )
    else:
        aggregates = aggregate_regions(
            desc.vecs, database_words, desc.starts, desc.order, codebook.centroids, regions, binary=params.binary
        )
    del database_words
    n = desc.n_images
    ivf = InvertedFile.from_aggregates(aggregates, np.arange(n, dtype=np.int64), codebook.size)
    del aggregates
    idf = compute_idf(ivf.counts, n, params.use_idf)
    database = Database(ivf, idf, np.sqrt(image_norms(ivf, idf, n)), desc.image_ids)
    logger.debug("similarity matrix: %d images, %d posting entries, %d-image query chunks", n, ivf.n_entries, chunk)
    dense_out = np.zeros((n, n), dtype=np.float32) if k is None else None
    return score_queries(
        codebook, desc, database, params, k=k, dense_out=dense_out, chunk_images=chunk, order=order, words=query_words
    )


def merge_topk(
    results: Sequence[tuple[np.ndarray, np.ndarray]], k: int | None = None, *, best_of: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k results of the same queries into one top-k.

    Ranking order is decreasing score, ties by ascending id, padding (-1) last, the same
    order ``Index.search`` uses; so merging the results of ``Index.split`` shards gives
    exactly the whole index's result.

    Parameters
    ----------
    results : sequence of (scores float32 [Q, k_i], ids int64 [Q, k_i])
    k : int, optional
        Results kept per query (default: the largest k_i).
    best_of : bool, default False
        The results are of one database searched several ways (a query at several
        rotations): an image found more than once keeps its best score only. Shards hold
        disjoint images, so the default keeps every entry.

    Returns
    -------
    scores : float32 [Q, k]
    ids : int64 [Q, k]
    """
    if not results:
        raise ArgumentError("results: need at least one (scores, ids) pair")
    n_queries = None
    for i, pair in enumerate(results):
        if len(pair) != 2:
            raise ArgumentError(f"results[{i}]: expected a (scores, ids) pair")
        s, d = np.asarray(pair[0]), np.asarray(pair[1])
        if s.ndim != 2 or s.shape != d.shape:
            raise ArgumentError(f"results[{i}]: scores and ids must be 2-D arrays of one shape")
        if n_queries is None:
            n_queries = s.shape[0]
        elif s.shape[0] != n_queries:
            raise ArgumentError(f"results[{i}]: has {s.shape[0]} queries, expected {n_queries}")
    k = check_int(k, "k", min=1, none=True) or max(np.asarray(p[0]).shape[1] for p in results)
    scores = np.concatenate([np.asarray(p[0], dtype=np.float32) for p in results], axis=1)
    ids = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in results], axis=1)
    # Padding sorts last: its id -1 is mapped above every real id.
    tie_ids = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((tie_ids, -scores), axis=1)
    if best_of:
        # In ranking order an image's first entry is its best: keep those (and no padding).
        out_scores = np.full((len(ids), k), -np.inf, np.float32)
        out_ids = np.full((len(ids), k), -1, np.int64)
        for row in range(len(ids)):
            ranked = ids[row, order[row]]
            _, first = np.unique(ranked, return_index=True)
            keep = np.sort(first)
            keep = order[row, keep[ranked[keep] >= 0]][:k]
            out_scores[row, : len(keep)] = scores[row, keep]
            out_ids[row, : len(keep)] = ids[row, keep]
        return out_scores, out_ids
    order = order[:, :k]
    out_scores = np.take_along_axis(scores, order, axis=1)
    out_ids = np.take_along_axis(ids, order, axis=1)
    if out_scores.shape[1] < k:
        pad = k - out_scores.shape[1]
        out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
    return out_scores, out_ids
