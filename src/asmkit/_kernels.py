"""Numba kernels: grouping, aggregation, binary packing, selective-kernel scoring, top-k.

Everything here works on plain, already validated arrays; the public modules
(:mod:`asmkit.kernel`, :mod:`asmkit.ivf`, :mod:`asmkit.search`) check user input and
choose dtypes. Each kernel has a plain-loop NumPy twin in ``tests/reference_numpy.py``.

All kernels are compiled with ``cache=True`` so that a process that loads an index does
not pay the compile time again once any earlier process has compiled them, and with
``nogil=True``: they touch no Python object, so a search or a match running in one thread
leaves the interpreter to the others (the service parses the next requests meanwhile, and
verification runs candidates in threads).

Floating-point choices follow the reference ``asmk`` package operation by operation
(see docs/math.md): residuals are accumulated in float32 in descriptor order, the Hamming
similarity is rounded to float32 exactly as the reference rounds it, and every
per-entry contribution is rounded to float32 before it is added to a float64 score.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

__all__ = [
    "thread_budget",
    "faiss_thread_budget",
    "faiss_threads",
    "group_by_label",
    "image_norms",
    "merge_posting_lists",
    "aggregate_count",
    "aggregate_fill",
    "pack_rows",
    "popcount64",
    "search_kernel",
    "search_kernel_slots",
    "search_kernel_word_major",
    "slots_ascend",
    "sigma_table",
    "pruned_nearest",
    "word_matches",
]

_U1 = np.uint64(1)

logger = logging.getLogger(__name__)

#: Below these amounts of work (pairs to aggregate, posting entries to score) a parallel
#: kernel runs on the calling thread alone: on a busy machine, waking the other threads of
#: a parallel region can cost milliseconds, far more than the work.
MIN_PARALLEL_PAIRS = 1 << 15
MIN_PARALLEL_ENTRIES = 1 << 20


@contextlib.contextmanager
def thread_budget(work: int, min_parallel_work: int) -> Iterator[int]:
    """Context: numba threads for a kernel call (1 when ``work < min_parallel_work``).

    Yields the thread count, so that callers can size their parallel blocks.
    """
    previous = numba.get_num_threads()
    threads = previous if work >= min_parallel_work else 1
    numba.set_num_threads(threads)
    try:
        yield threads
    finally:
        numba.set_num_threads(previous)


#: Below this many multiply-adds a faiss search runs on one OpenMP thread (same reason as
#: above: one core finishes such a search before idle threads under load would wake).
MIN_PARALLEL_MACS = 1 << 26


@contextlib.contextmanager
def faiss_threads(threads: int) -> Iterator[None]:
    """Context: faiss's OpenMP on exactly ``threads`` threads, the previous count restored."""
    import faiss

    previous = faiss.omp_get_max_threads()
    if threads == previous:
        yield
        return
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def faiss_thread_budget(work: int, min_parallel_work: int = MIN_PARALLEL_MACS):
    """Context: faiss's OpenMP on one thread when ``work < min_parallel_work``, and never on
    more threads than numba currently uses (so ``numba.set_num_threads(1)`` makes the whole
    engine single-threaded, but for the calls that decide tied rows:
    ``asmkit.quantizer.settle_threads``)."""
    import faiss

    if work < min_parallel_work:
        return faiss_threads(1)
    return faiss_threads(max(1, min(faiss.omp_get_max_threads(), numba.get_num_threads())))


@intrinsic
def popcount64(typingctx, x):
    """Number of set bits of a uint64 via LLVM's ``ctpop`` (``popcnt`` where the CPU has
    it, an equivalent bit-twiddling sequence elsewhere)."""
    if not isinstance(x, types.Integer) or x.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(x), codegen


@njit(cache=True, nogil=True)
def group_by_label(labels, n_labels):
    """Stable counting sort of descriptor rows by image label.

    Parameters
    ----------
    labels : int64 [N]
        Image label of each row, in ``0 .. n_labels - 1``.
    n_labels : int
        Number of images.

    Returns
    -------
    starts : int64 [n_labels + 1]
        Image ``i`` owns ``order[starts[i]:starts[i + 1]]``.
    order : int64 [N]
        Row indices grouped by label, rows of one image in their input order.
    """
    starts = np.zeros(n_labels + 1, dtype=np.int64)
    for r in range(labels.shape[0]):
        starts[labels[r] + 1] += 1
    for i in range(n_labels):
        starts[i + 1] += starts[i]
    fill = starts[:-1].copy()
    order = np.empty(labels.shape[0], dtype=np.int64)
    for r in range(labels.shape[0]):
        lab = labels[r]
        order[fill[lab]] = r
        fill[lab] += 1
    return starts, order


@njit(cache=True, nogil=True)
def _pair_shift(m):
    """Bits that hold an assignment index 0 .. m - 1 in a pair code ``(j << shift) | a``."""
    shift = 0
    while (1 << shift) < m:
        shift += 1
    return shift


@njit(cache=True, nogil=True, parallel=True)
def aggregate_count(assign, order, starts, n_words_total, n_blocks):
    """Sort each image's (descriptor, word) pairs by word and count its distinct words.

    A counting sort per image: the image's distinct words are sorted, each gets its
    output range, and pairs are dropped into place in input order (so the sort is
    stable). The word tables are allocated once per parallel block of images.

    Parameters
    ----------
    assign : int64 [N, m]
        Words of each descriptor row (multiple assignment).
    order, starts : int64 [N], int64 [I + 1]
        Grouping of rows by image (``group_by_label``); ``starts`` may be a window of a
        longer array, positions are taken relative to ``starts[0]``.
    n_words_total : int
        Codebook size K.
    n_blocks : int
        Parallel blocks of images (1 .. I).

    Returns
    -------
    perm : int32 [(starts[-1] - starts[0]) * m]
        Per image, the local pair codes ``p = (j << _pair_shift(m)) | a`` (descriptor ``j``
        of the image, assignment ``a``) stably sorted by word, so descriptors keep their
        input order within a word. A shift, not ``j * m + a``: decoding then needs no
        integer division (tens of cycles each, several per pair).
    n_words : int64 [I]
        Number of distinct words per image.
    """
    m = assign.shape[1]
    shift = _pair_shift(m)
    n_images = starts.shape[0] - 1
    base = starts[0]
    perm = np.empty((starts[n_images] - base) * m, dtype=np.int32)
    n_words = np.zeros(n_images, dtype=np.int64)
    for b in prange(n_blocks):
        # count[w] doubles as the next output position of word w once ranges are set.
        count = np.zeros(n_words_total, dtype=np.int64)
        distinct = np.empty(0, dtype=np.int64)
        for i in range((n_images * b) // n_blocks, (n_images * (b + 1)) // n_blocks):
            s = starts[i]
            n_pairs = (starts[i + 1] - s) * m
            if n_pairs == 0:
                continue
            if distinct.shape[0] < n_pairs:
                distinct = np.empty(n_pairs, dtype=np.int64)
            n_distinct = 0
            for j in range(n_pairs // m):
                row = order[s + j]
                for a in range(m):
                    word = assign[row, a]
                    if count[word] == 0:
                        distinct[n_distinct] = word
                        n_distinct += 1
                    count[word] += 1
            words = np.sort(distinct[:n_distinct])
            position = (s - base) * m
            for j in range(n_distinct):
                word = words[j]
                size = count[word]
                count[word] = position
                position += size
            for j in range(n_pairs // m):
                row = order[s + j]
                for a in range(m):
                    word = assign[row, a]
                    perm[count[word]] = (j << shift) | a
                    count[word] += 1
            for j in range(n_distinct):
                count[words[j]] = 0
            n_words[i] = n_distinct
    return perm, n_words


@njit(cache=True, nogil=True, inline="always")
def _pack_signs(acc, out):
    """Bits ``acc > 0`` into ``out`` (uint64 [ceil(D / 64)]), MSB first, padding zero.

    Branch-free (the sign bits are random, branches would mispredict), and each bit is
    shifted into place independently of the others, so the OR reduction vectorises
    instead of forming a 64-step dependency chain.
    """
    dim = acc.shape[0]
    for w in range(out.shape[0]):
        bits = np.uint64(0)
        base = 64 * w
        for t in range(min(64, dim - base)):
            bits |= np.uint64(acc[base + t] > 0) << np.uint64(63 - t)
        out[w] = bits


@njit(cache=True, nogil=True, parallel=True)
def aggregate_fill(vecs, centroids, assign, order, starts, perm, agg_offsets, binary, out_words, out_codes, out_real):
    """Residual sums per (image, word), binarised and packed or left real.

    For each image and each of its words c, V = Σ (x - centroid[c]) over the image's
    descriptors x having c among their assignments, accumulated in float32 in input
    order (as ``numpy.sum(axis=0)`` over those rows does). A descriptor listing a word
    twice contributes once.

    Parameters
    ----------
    vecs : float32 [N, D]
    centroids : float32 [K, D]
    assign : int64 [N, m]
    order, starts, perm : see ``aggregate_count``.
    agg_offsets : int64 [I + 1]
        Output rows of image ``i`` are ``agg_offsets[i]:agg_offsets[i + 1]``.
    binary : bool
        Write packed sign bits to ``out_codes`` (else raw sums to ``out_real``).
    out_words : int64 [M]
        Word of each output row (ascending within an image).
    out_codes : uint64 [M, ceil(D / 64)] (or [0, 0] when not binary)
        Bits ``V > 0``, most significant bit first, padding bits zero.
    out_real : float32 [M, D] (or [0, 0] when binary)
        The unnormalised sums V.
    """
    m = assign.shape[1]
    shift = _pair_shift(m)
    mask = (1 << shift) - 1
    dim = vecs.shape[1]
    n_images = starts.shape[0] - 1
    base = starts[0]
    for i in prange(n_images):
        s = starts[i]
        n_pairs = (starts[i + 1] - s) * m
        if n_pairs == 0:
            continue
        acc = np.zeros(dim, dtype=np.float32)
        row = agg_offsets[i]
        first = (s - base) * m
        prev_desc = -1
        for p in range(n_pairs):
            local = perm[first + p]
            desc = order[s + (local >> shift)]
            word = assign[desc, local & mask]
            # Within a word, pairs keep input order, so a word listed twice for one
            # descriptor shows up as two adjacent pairs of that descriptor: count it once.
            if desc != prev_desc:
                x = vecs[desc]
                c = centroids[word]
                for t in range(dim):
                    acc[t] += x[t] - c[t]
                prev_desc = desc
            last = p == n_pairs - 1
            if not last:
                nxt = perm[first + p + 1]
                last = assign[order[s + (nxt >> shift)], nxt & mask] != word
            if last:
                out_words[row] = word
                if binary:
                    _pack_signs(acc, out_codes[row])
                else:
                    for t in range(dim):
                        out_real[row, t] = acc[t]
                acc[:] = 0
                prev_desc = -1
                row += 1


@njit(cache=True, nogil=True, parallel=True)
def pack_rows(bits):
    """Pack a boolean matrix [M, D] into uint64 [M, ceil(D / 64)], MSB first, zero padding."""
    n, dim = bits.shape
    n_words = (dim + 63) // 64
    out = np.zeros((n, n_words), dtype=np.uint64)
    for r in prange(n):
        for t in range(dim):
            if bits[r, t]:
                out[r, t >> 6] |= _U1 << np.uint64(63 - (t & 63))
    return out


@njit(cache=True, nogil=True, inline="always")
def _worse(score_a, id_a, score_b, id_b):
    """Ranking order: higher score first, ties by ascending image id."""
    return score_a < score_b or (score_a == score_b and id_a > id_b)


@njit(cache=True, nogil=True, inline="always")
def _sift_down(heap_s, heap_i, size, pos):
    while True:
        child = 2 * pos + 1
        if child >= size:
            return
        right = child + 1
        if right < size and _worse(heap_s[right], heap_i[right], heap_s[child], heap_i[child]):
            child = right
        if _worse(heap_s[child], heap_i[child], heap_s[pos], heap_i[pos]):
            heap_s[pos], heap_s[child] = heap_s[child], heap_s[pos]
            heap_i[pos], heap_i[child] = heap_i[child], heap_i[pos]
            pos = child
        else:
            return


@njit(cache=True, nogil=True, inline="always")
def _heap_offer(heap_s, heap_i, size, k, score, ident):
    """Offer one candidate to a min-heap (root = worst kept) of capacity k; return new size."""
    if size < k:
        pos = size
        heap_s[pos] = score
        heap_i[pos] = ident
        while pos > 0:
            parent = (pos - 1) // 2
            if _worse(heap_s[pos], heap_i[pos], heap_s[parent], heap_i[parent]):
                heap_s[pos], heap_s[parent] = heap_s[parent], heap_s[pos]
                heap_i[pos], heap_i[parent] = heap_i[parent], heap_i[pos]
                pos = parent
            else:
                break
        return size + 1
    if _worse(heap_s[0], heap_i[0], score, ident):
        heap_s[0] = score
        heap_i[0] = ident
        _sift_down(heap_s, heap_i, size, 0)
    return size


@njit(cache=True, nogil=True, inline="always")
def _selective(u, alpha, alpha_is_int, tau):
    """σ(u) = u**α for u >= τ, rounded to float32 as the reference rounds it; NaN marks u < τ.

    u³ is computed as (u·u)·u in float64: u·u is exact for a float32 u, so this is the
    correctly rounded cube, like ``pow``. For u < 0 and non-integer α the reference
    computes NaN; the paper's sign(u)·|u|**α is used there instead.
    """
    if u < tau:
        return np.float32(np.nan)
    uu = np.float64(u)
    if alpha == 3.0:
        return np.float32(uu * uu * uu)
    if alpha == 1.0:
        return u
    if uu >= 0.0 or alpha_is_int:
        return np.float32(math.pow(uu, alpha))
    return np.float32(-math.pow(-uu, alpha))


@njit(cache=True, nogil=True)
def sigma_table(n_bits, alpha, alpha_is_int, tau):
    """σ for every Hamming distance h = 0 .. B of binary codes.

    u = float32(1 - 2 · float32(h / B)) as the reference rounds it.

    Returns
    -------
    float32 [B + 1]
        σ(u(h)), NaN where u(h) < τ.
    """
    table = np.empty(n_bits + 1, dtype=np.float32)
    for h in range(n_bits + 1):
        hdist = np.float32(np.float64(h) / np.float64(n_bits))
        u = np.float32(np.float32(-2.0) * hdist + np.float32(1.0))
        table[h] = _selective(u, alpha, alpha_is_int, tau)
    return table


@njit(cache=True, nogil=True, fastmath=True)
def _dot(a, b):
    """⟨a, b⟩ of float32 rows, accumulated in float64 (reassociated, so it vectorises)."""
    acc = 0.0
    for t in range(a.shape[0]):
        acc += np.float64(a[t]) * np.float64(b[t])
    return acc


@njit(cache=True, nogil=True, inline="always")
def _scan_binary(q_codes, r, begin, end, entry_slot, codes, w_idf, inv_sqrt_norms, weight_of_h, score):
    """Add one query aggregate's (row ``r``) contributions over posting entries
    ``begin .. end - 1`` to ``score``.

    Branch-free: ``weight_of_h`` holds 0 where u(h) < τ, and adding 0.0 leaves a float64
    sum unchanged, so thresholded entries need no (unpredictable) branch. Indices are
    unsigned (``begin``/``end`` are uint64 and slots are cast), so numba emits no
    negative-index wrap-around code in this loop.
    """
    n_code = q_codes.shape[1]
    if n_code == 2:
        # D in 65 .. 128 (SIFT, most deep local features): two words, unrolled.
        a0 = q_codes[r, 0]
        a1 = q_codes[r, 1]
        for e in range(begin, end):
            h = popcount64(a0 ^ codes[e, 0]) + popcount64(a1 ^ codes[e, 1])
            weighted = np.float32(weight_of_h[h] * w_idf)
            slot = np.uint64(entry_slot[e])
            score[slot] += np.float64(np.float32(np.float64(weighted) * inv_sqrt_norms[slot]))
    else:
        for e in range(begin, end):
            h = np.uint64(0)
            for t in range(n_code):
                h += popcount64(q_codes[r, t] ^ codes[e, t])
            weighted = np.float32(weight_of_h[h] * w_idf)
            slot = np.uint64(entry_slot[e])
            score[slot] += np.float64(np.float32(np.float64(weighted) * inv_sqrt_norms[slot]))


@njit(cache=True, nogil=True)
def _accumulate_binary(
    q_offsets, q_words, q_codes, q, offsets, entry_slot, codes, idf, inv_sqrt_norms, weight_of_h, score
):
    """Add query ``q``'s binary selective-kernel contributions to ``score``; return n_q.

    Kept out of the parallel loop of ``search_kernel``, where numba compiles loops less
    tightly.
    """
    q_norm = np.float32(0.0)
    for r in range(np.uint64(q_offsets[q]), np.uint64(q_offsets[q + 1])):
        word = np.uint64(q_words[r])
        w_idf = idf[word]
        q_norm += w_idf
        _scan_binary(
            q_codes,
            r,
            np.uint64(offsets[word]),
            np.uint64(offsets[word + np.uint64(1)]),
            entry_slot,
            codes,
            w_idf,
            inv_sqrt_norms,
            weight_of_h,
            score,
        )
    return q_norm


@njit(cache=True, nogil=True, inline="always")
def _scan_real(q_real, r, begin, end, entry_slot, real, w_idf, inv_sqrt_norms, alpha, alpha_is_int, tau, score):
    """Real-valued counterpart of ``_scan_binary`` (σ below τ skips the entry)."""
    for e in range(begin, end):
        sigma = _selective(np.float32(_dot(q_real[r], real[e])), alpha, alpha_is_int, tau)
        if sigma != sigma:
            continue  # below the threshold τ
        slot = np.uint64(entry_slot[e])
        weighted = np.float32(sigma * w_idf)
        score[slot] += np.float64(np.float32(np.float64(weighted) * inv_sqrt_norms[slot]))


@njit(cache=True, nogil=True)
def _accumulate_real(
    q_offsets, q_words, q_real, q, offsets, entry_slot, real, idf, inv_sqrt_norms, alpha, alpha_is_int, tau, score
):
    """Add query ``q``'s real-valued selective-kernel contributions to ``score``; return n_q."""
    q_norm = np.float32(0.0)
    for r in range(np.uint64(q_offsets[q]), np.uint64(q_offsets[q + 1])):
        word = np.uint64(q_words[r])
        w_idf = idf[word]
        q_norm += w_idf
        _scan_real(
            q_real,
            r,
            np.uint64(offsets[word]),
            np.uint64(offsets[word + np.uint64(1)]),
            entry_slot,
            real,
            w_idf,
            inv_sqrt_norms,
            alpha,
            alpha_is_int,
            tau,
            score,
        )
    return q_norm


@njit(cache=True, nogil=True)
def _query_scale(q_norm):
    """float64 of float32(√n_q): the divisor of a query's scores (0 scores everything 0)."""
    return np.float64(np.float32(math.sqrt(np.float64(q_norm))))


@njit(cache=True, nogil=True)
def _top_range(score, q_scale, lo, hi, slot_ids, k, heap_s, heap_i):
    """Sorted top-k of slots ``lo .. hi - 1`` of ``score`` into ``heap_s``/``heap_i`` (best
    first, ties by ascending id); resets those slots of ``score``. Returns the count kept."""
    valid = q_scale > 0.0
    size = 0
    for slot in range(lo, hi):
        final = np.float32(score[slot] / q_scale) if valid else np.float32(0.0)
        score[slot] = 0.0
        # Once the heap is full, most slots lose to its root: test that before the call.
        if size < k or _worse(heap_s[0], heap_i[0], final, slot_ids[slot]):
            size = _heap_offer(heap_s, heap_i, size, k, final, slot_ids[slot])
    # Heap sort: moving the worst to the end leaves the best first.
    for end in range(size - 1, 0, -1):
        heap_s[0], heap_s[end] = heap_s[end], heap_s[0]
        heap_i[0], heap_i[end] = heap_i[end], heap_i[0]
        _sift_down(heap_s, heap_i, end, 0)
    return size


@njit(cache=True, nogil=True)
def _dense_range(q, score, q_scale, lo, hi, out_scores):
    """Write slots ``lo .. hi - 1`` of query ``q``'s dense row from ``score``, and reset them."""
    valid = q_scale > 0.0
    for slot in range(lo, hi):
        out_scores[q, slot] = np.float32(score[slot] / q_scale) if valid else np.float32(0.0)
        score[slot] = 0.0


@njit(cache=True, nogil=True)
def _emit(q, score, q_norm, slot_ids, k, dense, heap_s, heap_i, out_scores, out_ids):
    """Write query ``q``'s dense row or sorted top-k from ``score``, and reset ``score``."""
    n_slots = score.shape[0]
    q_scale = _query_scale(q_norm)
    if dense:
        _dense_range(q, score, q_scale, 0, n_slots, out_scores)
        return
    size = _top_range(score, q_scale, 0, n_slots, slot_ids, k, heap_s, heap_i)
    for j in range(size):
        out_scores[q, j] = heap_s[j]
        out_ids[q, j] = heap_i[j]


@njit(cache=True, nogil=True, parallel=True)
def search_kernel(
    q_offsets,
    q_words,
    q_codes,
    q_real,
    offsets,
    entry_slot,
    codes,
    real,
    idf,
    inv_sqrt_norms,
    slot_ids,
    binary,
    weight_of_h,
    alpha,
    alpha_is_int,
    tau,
    k,
    dense,
    n_blocks,
    out_scores,
    out_ids,
):
    """Score query images against an inverted file with the selective match kernel.

    score(q, d) = Σ_c float32(float32(σ(u_c) · idf[c]) / √n_d) / float32(√n_q), summed in
    float64 over the query's words in ascending order, as the reference does (the
    division by √n_d is a multiplication by its float64 reciprocal, which rounds to the
    same float32 except in astronomically rare cases). n_q sums idf in float32 over all
    query words, empty posting lists included. A query with n_q = 0 (or no words)
    scores 0 everywhere; an image with n_d = 0 receives nothing.

    Parameters
    ----------
    q_offsets : int64 [Q + 1]
        Query ``q`` owns aggregate rows ``q_offsets[q]:q_offsets[q + 1]``.
    q_words : int64 [Mq]
        Word of each query aggregate (ascending within a query).
    q_codes : uint64 [Mq, W] or q_real : float32 [Mq, D]
        Query aggregates (the unused one is an empty [0, 0] array).
    offsets : int64 [K + 1]
        CSR posting-list offsets.
    entry_slot : int32 [E]
        Database slot of each posting entry.
    codes : uint64 [E, W] or real : float32 [E, D]
        Database aggregates per entry.
    idf : float32 [K]
    inv_sqrt_norms : float64 [S]
        1 / √n_d per database slot, 0 where n_d = 0.
    slot_ids : int64 [S]
        User image id of each slot (returned ids, tie order).
    binary : bool
    weight_of_h : float32 [B + 1]
        ``sigma_table`` with 0 in place of NaN (binary codes only).
    alpha : float64
    alpha_is_int : bool
    tau : float32
    k : int
        Results per query (top-k mode), at most S.
    dense : bool
        Write every slot's score to ``out_scores[q, slot]`` instead of top-k.
    n_blocks : int
        Query blocks run in parallel (each allocates its score buffer once), 1 .. Q.
    out_scores : float32 [Q, k] or [Q, S]
        Pre-filled with -inf (top-k mode; dense rows are written whole).
    out_ids : int64 [Q, k]
        Pre-filled with -1 (top-k mode; [0, 0] in dense mode).
    """
    n_queries = q_offsets.shape[0] - 1
    n_slots = inv_sqrt_norms.shape[0]
    for b in prange(n_blocks):
        score = np.zeros(n_slots, dtype=np.float64)
        heap_s = np.empty(max(k, 1), dtype=np.float32)
        heap_i = np.empty(max(k, 1), dtype=np.int64)
        for q in range((n_queries * b) // n_blocks, (n_queries * (b + 1)) // n_blocks):
            if binary:
                q_norm = _accumulate_binary(
                    q_offsets, q_words, q_codes, q, offsets, entry_slot, codes, idf, inv_sqrt_norms, weight_of_h, score
                )
            else:
                q_norm = _accumulate_real(
                    q_offsets,
                    q_words,
                    q_real,
                    q,
                    offsets,
                    entry_slot,
                    real,
                    idf,
                    inv_sqrt_norms,
                    alpha,
                    alpha_is_int,
                    tau,
                    score,
                )
            _emit(q, score, q_norm, slot_ids, k, dense, heap_s, heap_i, out_scores, out_ids)


@njit(cache=True, nogil=True, inline="always")
def _scan_group_binary2(
    group_a0, group_a1, group_q, n_group, begin, end, entry_slot, codes, w_idf, inv_sqrt_norms, weight_of_h, tile
):
    """Posting entries ``begin .. end - 1`` of one word against the ``n_group`` query
    aggregates of a block that have that word (two-word codes, D in 65 .. 128).

    Each entry's code, slot and 1/√n_d are loaded once for the whole group; the group's
    scores of that slot lie side by side in the slot-major tile row ``tile[slot]``.
    """
    for e in range(begin, end):
        c0 = codes[e, 0]
        c1 = codes[e, 1]
        slot = np.uint64(entry_slot[e])
        inv = inv_sqrt_norms[slot]
        row = tile[slot]
        for i in range(n_group):
            h = popcount64(group_a0[i] ^ c0) + popcount64(group_a1[i] ^ c1)
            weighted = np.float32(weight_of_h[h] * w_idf)
            row[group_q[i]] += np.float64(np.float32(np.float64(weighted) * inv))


@njit(cache=True, nogil=True)
def _score_block(
    q0,
    q1,
    q_offsets,
    q_words,
    q_codes,
    q_real,
    offsets,
    entry_slot,
    codes,
    real,
    idf,
    inv_sqrt_norms,
    slot_ids,
    binary,
    weight_of_h,
    alpha,
    alpha_is_int,
    tau,
    k,
    dense,
    out_scores,
    out_ids,
):
    """Word-major scoring of queries ``q0 .. q1 - 1`` into one float64 [S, q1 - q0] tile.

    The block's aggregate rows are visited in ascending word order (a stable sort, so
    the rows of one word keep ascending query order), and each posting list is read once
    for all the block's queries that have the word: for two-word binary codes, entry by
    entry against the whole group (``_scan_group_binary2``), otherwise row by row. Each
    query's rows still arrive in ascending word order, so every score receives the same
    float64 additions in the same order as ``search_kernel`` (bit-identical).
    """
    n_slots = inv_sqrt_norms.shape[0]
    nb = q1 - q0
    r0 = q_offsets[q0]
    n_rows = q_offsets[q1] - r0
    tile = np.zeros((n_slots, nb), dtype=np.float64)
    heap_s = np.empty(max(k, 1), dtype=np.float32)
    heap_i = np.empty(max(k, 1), dtype=np.int64)
    owner = np.empty(n_rows, dtype=np.uint64)
    for q in range(q0, q1):
        for r in range(q_offsets[q] - r0, q_offsets[q + 1] - r0):
            owner[r] = q - q0
    by_word = np.argsort(q_words[r0 : r0 + n_rows], kind="mergesort")
    two_words = binary and q_codes.shape[1] == 2
    group_a0 = np.empty(nb, dtype=np.uint64)
    group_a1 = np.empty(nb, dtype=np.uint64)
    group_q = np.empty(nb, dtype=np.uint64)
    j = 0
    while j < n_rows:
        word = np.uint64(q_words[r0 + by_word[j]])
        begin = np.uint64(offsets[word])
        end = np.uint64(offsets[word + np.uint64(1)])
        if two_words:
            n_group = 0
            while j < n_rows and q_words[r0 + by_word[j]] == word:
                r = r0 + by_word[j]
                group_a0[n_group] = q_codes[r, 0]
                group_a1[n_group] = q_codes[r, 1]
                group_q[n_group] = owner[by_word[j]]
                n_group += 1
                j += 1
            _scan_group_binary2(
                group_a0,
                group_a1,
                group_q,
                np.uint64(n_group),
                begin,
                end,
                entry_slot,
                codes,
                idf[word],
                inv_sqrt_norms,
                weight_of_h,
                tile,
            )
        else:
            r = np.uint64(r0 + by_word[j])
            score = tile[:, owner[by_word[j]]]
            if binary:
                _scan_binary(q_codes, r, begin, end, entry_slot, codes, idf[word], inv_sqrt_norms, weight_of_h, score)
            else:
                _scan_real(
                    q_real, r, begin, end, entry_slot, real, idf[word], inv_sqrt_norms, alpha, alpha_is_int, tau, score
                )
            j += 1
    for q in range(q0, q1):
        q_norm = np.float32(0.0)
        for r in range(q_offsets[q], q_offsets[q + 1]):
            q_norm += idf[q_words[r]]
        _emit(q, tile[:, q - q0], q_norm, slot_ids, k, dense, heap_s, heap_i, out_scores, out_ids)


@njit(cache=True, nogil=True, parallel=True)
def search_kernel_word_major(
    q_offsets,
    q_words,
    q_codes,
    q_real,
    offsets,
    entry_slot,
    codes,
    real,
    idf,
    inv_sqrt_norms,
    slot_ids,
    binary,
    weight_of_h,
    alpha,
    alpha_is_int,
    tau,
    k,
    dense,
    block,
    out_scores,
    out_ids,
):
    """``search_kernel`` for many queries at once, word-major within blocks of queries.

    Same arguments and results (bit-identical) as ``search_kernel``, except ``block``
    (queries per score tile, >= 1) in place of ``n_blocks``: blocks of ``block``
    consecutive queries are scored in parallel, each into its own float64 [S, block]
    tile (``_score_block``), so a posting list is read once per block instead of once
    per query. Pays off when the inverted file outgrows the cache and blocks hold tens
    of queries.
    """
    n_queries = q_offsets.shape[0] - 1
    n_blocks = (n_queries + block - 1) // block
    for b in prange(n_blocks):
        q0 = b * block
        q1 = min(q0 + block, n_queries)
        _score_block(
            q0,
            q1,
            q_offsets,
            q_words,
            q_codes,
            q_real,
            offsets,
            entry_slot,
            codes,
            real,
            idf,
            inv_sqrt_norms,
            slot_ids,
            binary,
            weight_of_h,
            alpha,
            alpha_is_int,
            tau,
            k,
            dense,
            out_scores,
            out_ids,
        )


@njit(cache=True, nogil=True, parallel=True)
def slots_ascend(offsets, entry_slot):
    """Whether the slots ascend (non-strictly) within every posting list, the premise of
    ``search_kernel_slots``.

    Parameters
    ----------
    offsets : int64 [K + 1]
    entry_slot : int32 [E]
    """
    n_words = offsets.shape[0] - 1
    bad = 0
    for c in prange(n_words):
        for e in range(offsets[c] + 1, offsets[c + 1]):
            if entry_slot[e] < entry_slot[e - 1]:
                bad += 1
                break
    return bad == 0


@njit(cache=True, nogil=True)
def _scan_slot_range(
    q_offsets,
    q_words,
    q_codes,
    q_real,
    q,
    lo,
    hi,
    offsets,
    entry_slot,
    codes,
    real,
    idf,
    inv_sqrt_norms,
    binary,
    weight_of_h,
    alpha,
    alpha_is_int,
    tau,
    score,
):
    """Add query ``q``'s contributions to slots ``lo .. hi - 1`` of ``score``: the entries of
    those slots are found in each (slot-ascending) posting list by bisection.

    Each slot receives the same float64 additions in the same order (ascending query
    word) as in ``search_kernel``. Kept out of the parallel loop, like
    ``_accumulate_binary``.
    """
    for r in range(np.uint64(q_offsets[q]), np.uint64(q_offsets[q + 1])):
        word = np.uint64(q_words[r])
        first = offsets[word]
        last = offsets[word + np.uint64(1)]
        entries = entry_slot[first:last]
        begin = np.uint64(first + np.searchsorted(entries, lo))
        end = np.uint64(first + np.searchsorted(entries, hi))
        if binary:
            _scan_binary(q_codes, r, begin, end, entry_slot, codes, idf[word], inv_sqrt_norms, weight_of_h, score)
        else:
            _scan_real(
                q_real, r, begin, end, entry_slot, real, idf[word], inv_sqrt_norms, alpha, alpha_is_int, tau, score
            )


@njit(cache=True, nogil=True, parallel=True)
def _score_parts(
    q_offsets,
    q_words,
    q_codes,
    q_real,
    q,
    q_scale,
    offsets,
    entry_slot,
    codes,
    real,
    idf,
    inv_sqrt_norms,
    slot_ids,
    binary,
    weight_of_h,
    alpha,
    alpha_is_int,
    tau,
    k,
    dense,
    score,
    part_s,
    part_i,
    part_size,
    out_scores,
):
    """Query ``q``'s slot parts in parallel (``search_kernel_slots``). Holds the parallel
    loop alone: numba turns array expressions of a parallel function (allocations,
    fills) into parallel regions of their own, each a wake-up of the threads."""
    n_slots = score.shape[0]
    n_parts = part_size.shape[0]
    for t in prange(n_parts):
        lo = (n_slots * t) // n_parts
        hi = (n_slots * (t + 1)) // n_parts
        _scan_slot_range(
            q_offsets,
            q_words,
            q_codes,
            q_real,
            q,
            np.int32(lo),
            np.int32(hi),
            offsets,
            entry_slot,
            codes,
            real,
            idf,
            inv_sqrt_norms,
            binary,
            weight_of_h,
            alpha,
            alpha_is_int,
            tau,
            score,
        )
        if dense:
            _dense_range(q, score, q_scale, lo, hi, out_scores)
        else:
            part_size[t] = _top_range(score, q_scale, lo, hi, slot_ids, k, part_s[t], part_i[t])


@njit(cache=True, nogil=True)
def search_kernel_slots(
    q_offsets,
    q_words,
    q_codes,
    q_real,
    offsets,
    entry_slot,
    codes,
    real,
    idf,
    inv_sqrt_norms,
    slot_ids,
    binary,
    weight_of_h,
    alpha,
    alpha_is_int,
    tau,
    k,
    dense,
    n_parts,
    out_scores,
    out_ids,
):
    """``search_kernel`` for a few queries: each query's posting lists split by slot range.

    Same arguments and results (bit-identical) as ``search_kernel``, except ``n_parts``
    (>= 1) in place of ``n_blocks``, and the posting lists' slots must ascend within each
    list (``slots_ascend``). Queries are scored one after another; part ``t`` of a query
    (in parallel, ``_score_parts``) owns slots ``S·t/n_parts .. S·(t+1)/n_parts - 1`` of
    the shared float64 [S] score row, adds their entries of every posting list
    (``_scan_slot_range``) and keeps their top-k; the parts' sorted lists are then
    merged. A query's entries are so divided among threads, which ``search_kernel``
    cannot do for fewer queries than threads.
    """
    n_queries = q_offsets.shape[0] - 1
    n_slots = inv_sqrt_norms.shape[0]
    width = max(k, 1)
    score = np.zeros(n_slots, dtype=np.float64)
    part_s = np.empty((n_parts, width), dtype=np.float32)
    part_i = np.empty((n_parts, width), dtype=np.int64)
    part_size = np.zeros(n_parts, dtype=np.int64)
    head = np.zeros(n_parts, dtype=np.int64)
    for q in range(n_queries):
        q_norm = np.float32(0.0)
        for r in range(q_offsets[q], q_offsets[q + 1]):
            q_norm += idf[q_words[r]]
        _score_parts(
            q_offsets,
            q_words,
            q_codes,
            q_real,
            q,
            _query_scale(q_norm),
            offsets,
            entry_slot,
            codes,
            real,
            idf,
            inv_sqrt_norms,
            slot_ids,
            binary,
            weight_of_h,
            alpha,
            alpha_is_int,
            tau,
            k,
            dense,
            score,
            part_s,
            part_i,
            part_size,
            out_scores,
        )
        if dense:
            continue
        # k-way merge of the parts' sorted lists, in the ranking's order.
        for t in range(n_parts):
            head[t] = 0
        for j in range(k):
            best = -1
            for t in range(n_parts):
                if head[t] < part_size[t] and (
                    best < 0
                    or _worse(
                        part_s[best, head[best]], part_i[best, head[best]], part_s[t, head[t]], part_i[t, head[t]]
                    )
                ):
                    best = t
            if best < 0:
                break
            out_scores[q, j] = part_s[best, head[best]]
            out_ids[q, j] = part_i[best, head[best]]
            head[best] += 1


@njit(cache=True, nogil=True)
def merge_posting_lists(offsets, new_offsets, slots, data, new_slots, new_data):
    """Merge posting lists in place: each list of the new entries goes after the same list
    of the old ones.

    The old lists fill the first ``offsets[-1]`` rows of ``slots`` and ``data``, which are
    already grown to the merged size. List ``c`` ends at ``offsets[c + 1] +
    new_offsets[c + 1]``; its old entries only move right, so the lists are moved from the
    last word to the first, each from its last entry to its first, and no entry is
    overwritten before it is read.

    Parameters
    ----------
    offsets, new_offsets : int64 [K + 1]
        CSR offsets of the old and of the new lists.
    slots : int32 [E + E']
    data : uint64 or float32 [E + E', W]
    new_slots : int32 [E']
    new_data : [E', W], the dtype of ``data``
    """
    width = data.shape[1]
    for c in range(offsets.shape[0] - 2, -1, -1):
        shift = new_offsets[c]
        begin = offsets[c]
        n_old = offsets[c + 1] - begin
        if shift > 0:
            for e in range(begin + n_old - 1, begin - 1, -1):
                slots[e + shift] = slots[e]
                for t in range(width):
                    data[e + shift, t] = data[e, t]
        tail = begin + shift + n_old
        for e in range(new_offsets[c], new_offsets[c + 1]):
            slots[tail] = new_slots[e]
            for t in range(width):
                data[tail, t] = new_data[e, t]
            tail += 1


@njit(cache=True, nogil=True)
def image_norms(offsets, entry_slot, idf, n_slots):
    """n_d = Σ idf[c] over each slot's words, in float64, words ascending.

    Parameters
    ----------
    offsets : int64 [K + 1]
    entry_slot : int32 [E]
    idf : float32 [K]
    n_slots : int

    Returns
    -------
    float64 [S]
    """
    norms = np.zeros(n_slots, dtype=np.float64)
    for c in range(offsets.shape[0] - 1):
        weight = np.float64(idf[c])
        for e in range(offsets[c], offsets[c + 1]):
            norms[entry_slot[e]] += weight
    return norms


# --- exact nearest words by lower-bound pruning (asmkit.quantizer.PrunedQuantizer) -------

#: Lower bounds are scanned in blocks of this many words (block b: words b, b + K/16, ...),
#: each with its minimum kept, so a pass over the bounds reads K / 16 minima and then only
#: the blocks that can hold a candidate.
PRUNE_BLOCK = 16
_BIG = 1e300
_FAST = {"nnan", "nsz", "reassoc", "contract"}


@njit(cache=True, nogil=True, fastmath=_FAST)
def _sq_dist(x, i, centroids, j):
    """Squared L2 distance of ``x[i]`` and ``centroids[j]``, accumulated in float64."""
    s = 0.0
    for d in range(x.shape[1]):
        t = np.float64(x[i, d]) - np.float64(centroids[j, d])
        s += t * t
    return s


@njit(cache=True, nogil=True, inline="always")
def _insert_sorted(values, ids, v, j):
    """Insert (v, j) into ascending ``values`` (fixed length, the largest falls off)."""
    last = values.shape[0] - 1
    if v >= values[last]:
        return
    t = last
    while t > 0 and values[t - 1] > v:
        values[t] = values[t - 1]
        ids[t] = ids[t - 1]
        t -= 1
    values[t] = v
    ids[t] = j


@njit(cache=True, nogil=True, fastmath=_FAST)
def _project_quad(x, i0, n_rows, mean, axes_t, cen, xa, x_sq, raw_sq):
    """Rows 0..n_rows-1 of ``xa`` := (-2 x'_head, -2 |x'_tail|), ``x_sq`` := |x'|^2 and
    ``raw_sq`` := |x|^2 for
    x' = (x[i0 + r] - mean) @ axes_t.T, in float64 so that a tail norm near 0 survives the
    cancellation. Four rows per pass over each axis (``axes_t`` float64 [h, D]), four dot
    products sharing its loads; ``cen`` is float64 [4, D] scratch."""
    h = axes_t.shape[0]
    for r in range(n_rows):
        total = 0.0
        raw = 0.0
        for d in range(x.shape[1]):
            v = np.float64(x[i0 + r, d])
            t = v - mean[d]
            cen[r, d] = t
            total += t * t
            raw += v * v
        x_sq[r] = total
        raw_sq[r] = raw
    c0, c1, c2, c3 = cen[0], cen[1], cen[2], cen[3]
    sq0 = sq1 = sq2 = sq3 = 0.0
    for k in range(h):
        a = axes_t[k]
        s0 = s1 = s2 = s3 = 0.0
        for d in range(a.shape[0]):
            v = a[d]
            s0 += c0[d] * v
            s1 += c1[d] * v
            s2 += c2[d] * v
            s3 += c3[d] * v
        xa[0, k] = -2.0 * s0
        xa[1, k] = -2.0 * s1
        xa[2, k] = -2.0 * s2
        xa[3, k] = -2.0 * s3
        sq0 += s0 * s0
        sq1 += s1 * s1
        sq2 += s2 * s2
        sq3 += s3 * s3
    xa[0, h] = -2.0 * math.sqrt(max(x_sq[0] - sq0, 0.0))
    xa[1, h] = -2.0 * math.sqrt(max(x_sq[1] - sq1, 0.0))
    xa[2, h] = -2.0 * math.sqrt(max(x_sq[2] - sq2, 0.0))
    xa[3, h] = -2.0 * math.sqrt(max(x_sq[3] - sq3, 0.0))


# fmt: off
@njit(cache=True, nogil=True, fastmath=_FAST)
def _bound_quad(xa, table, sq, o0, o1, o2, o3):
    """Lower bounds of the four rows of ``xa`` against one tile of words,
    ``o_r = sq + xa[r] @ table`` (``table`` float32 [w, >= n], ``sq`` and ``o_r``
    float32 [n]).

    Four rows per pass and eight table rows per sweep: each table value loaded feeds four
    multiply-adds and each output is loaded and stored once per eight, which keeps the
    loop on the FMA units rather than on loads and stores (docs/design.md, "Kernels")."""
    for j in range(o0.shape[0]):
        o0[j] = sq[j]
        o1[j] = sq[j]
        o2[j] = sq[j]
        o3[j] = sq[j]
    for h in range(0, xa.shape[1], 8):
        t0, t1, t2, t3 = table[h], table[h + 1], table[h + 2], table[h + 3]
        t4, t5, t6, t7 = table[h + 4], table[h + 5], table[h + 6], table[h + 7]
        a0, a1, a2, a3, a4, a5, a6, a7 = (xa[0, h], xa[0, h + 1], xa[0, h + 2], xa[0, h + 3],
                                          xa[0, h + 4], xa[0, h + 5], xa[0, h + 6], xa[0, h + 7])
        b0, b1, b2, b3, b4, b5, b6, b7 = (xa[1, h], xa[1, h + 1], xa[1, h + 2], xa[1, h + 3],
                                          xa[1, h + 4], xa[1, h + 5], xa[1, h + 6], xa[1, h + 7])
        c0, c1, c2, c3, c4, c5, c6, c7 = (xa[2, h], xa[2, h + 1], xa[2, h + 2], xa[2, h + 3],
                                          xa[2, h + 4], xa[2, h + 5], xa[2, h + 6], xa[2, h + 7])
        d0, d1, d2, d3, d4, d5, d6, d7 = (xa[3, h], xa[3, h + 1], xa[3, h + 2], xa[3, h + 3],
                                          xa[3, h + 4], xa[3, h + 5], xa[3, h + 6], xa[3, h + 7])
        for j in range(o0.shape[0]):
            v0, v1, v2, v3, v4, v5, v6, v7 = t0[j], t1[j], t2[j], t3[j], t4[j], t5[j], t6[j], t7[j]
            o0[j] += (a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3) + (a4 * v4 + a5 * v5 + a6 * v6 + a7 * v7)
            o1[j] += (b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3) + (b4 * v4 + b5 * v5 + b6 * v6 + b7 * v7)
            o2[j] += (c0 * v0 + c1 * v1 + c2 * v2 + c3 * v3) + (c4 * v4 + c5 * v5 + c6 * v6 + c7 * v7)
            o3[j] += (d0 * v0 + d1 * v1 + d2 * v2 + d3 * v3) + (d4 * v4 + d5 * v5 + d6 * v6 + d7 * v7)
# fmt: on


@njit(cache=True, nogil=True)
def _bound_rows(xa, tables, sq, bounds):
    """``bounds[r] = sq + xa[r] @ table`` for the four rows, with the table in tiles of
    words (``tables`` float32 [n_tiles, w, tile]) that stay in the L2 cache while the
    four rows use them, for codebooks of any size."""
    K = sq.shape[0]
    tile = tables.shape[2]
    for ti in range(tables.shape[0]):
        t0 = ti * tile
        t1 = min(K, t0 + tile)
        _bound_quad(xa, tables[ti], sq[t0:t1], bounds[0, t0:t1], bounds[1, t0:t1], bounds[2, t0:t1], bounds[3, t0:t1])


@njit(cache=True, nogil=True, fastmath=_FAST)
def _select_row(
    row, i, row_sq, x, centroids, margin, eps, nearest_first, blk_min, cand, top_v, top_j, reach, words, dist, tied
):
    """The exact m nearest words of ``x[i]`` given its lower bounds ``row`` (see
    ``pruned_nearest``, ``row_sq`` = |x'|^2, ``margin`` and ``eps`` the row's); returns
    the updated ``reach``. ``cand`` is int64 [K] scratch."""
    K = row.shape[0]
    m = words.shape[1]
    n_blk = blk_min.shape[0]
    # Block b holds words b, b + n_blk, b + 2 n_blk, ...: the minima are then an element-wise
    # minimum of PRUNE_BLOCK contiguous slices (vector code, no reduction per block).
    blk_min[:] = row[:n_blk]
    for t in range(1, PRUNE_BLOCK):
        seg = row[t * n_blk : min(K, (t + 1) * n_blk)]
        for b in range(seg.shape[0]):
            v = seg[b]
            blk_min[b] = v if v < blk_min[b] else blk_min[b]
    lowest = np.float32(3e38)
    for b in range(n_blk):
        lowest = blk_min[b] if blk_min[b] < lowest else lowest
    top_v[:] = _BIG
    top_j[:] = -1
    done = -_BIG
    limit = np.float64(lowest) + reach
    while True:
        # Collect first, then compute: the scan over the blocks stays a tight loop. Each
        # word is written and kept or not without a branch, whose outcome is a coin toss
        # near the limit.
        n_cand = 0
        for b in range(n_blk):
            if blk_min[b] <= limit:
                for j in range(b, K, n_blk):
                    v = np.float64(row[j])
                    cand[n_cand] = j
                    n_cand += (v <= limit) & (v > done)
        # The m-th distance found so far tightens the bound a candidate must meet.
        cut = top_v[m - 1] + eps - row_sq + margin
        for t in range(n_cand):
            j = cand[t]
            if row[j] <= cut:
                _insert_sorted(top_v, top_j, _sq_dist(x, i, centroids, j), j)
                cut = top_v[m - 1] + eps - row_sq + margin
        done = limit
        if top_v[m - 1] < _BIG:
            # Every word within eps of the m-th must be seen, to detect ties.
            needed = top_v[m - 1] + eps - row_sq + margin
            if needed <= done:
                break
            limit = needed
        else:
            limit = done + max(2.0 * (done - lowest), margin)
    for t in range(m):
        words[i, t] = top_j[t]
        dist[i, t] = top_v[t]
    # Only the nearest word (hard assignment) and the set of m words (multiple assignment)
    # enter ASMK; the order in between does not.
    tied[i] = (nearest_first and top_v[1] - top_v[0] <= eps) or top_v[m] - top_v[m - 1] <= eps
    return 0.75 * reach + 0.25 * (top_v[m - 1] + eps - row_sq + margin - lowest)


@njit(cache=True, nogil=True, parallel=True)
def pruned_nearest(
    x, mean, axes, table, sq, centroids, max_sq, margin_rate, eps_rate, nearest_first, n_chunks, words, dist, tied
):
    """Exact m nearest centroids of each row, by lower bounds on the squared distances.

    With x' = (x[i] - mean) @ axes and the same for the words (``table`` holds their first
    h coordinates and tail norm), the bound of row i and word j is
    ``|x'_head - c'_head|^2 + (|x'_tail| - |c'_tail|)^2 = |x'|^2 + sq[j] - 2 (...)``; it must
    not exceed ``||x[i] - centroids[j]||^2`` by more than ``margin`` (float32 rounding).
    Both tolerances scale with the magnitude of faiss's float32 terms,
    s_i = |x[i]|^2 + ``max_sq``: margin = ``margin_rate`` s_i, eps = ``eps_rate`` s_i.
    Per row, the K bounds are summarised by block minima (PRUNE_BLOCK words); every word
    whose bound lies below the current m-th exact distance plus ``eps`` has its distance
    computed exactly (float64), widening the threshold until no unseen word can enter.
    The m + 1 nearest are kept, so a row whose m-th and (m + 1)-th words (or, with
    ``nearest_first``, whose first and second) are not more than ``eps`` apart (a tie
    within float32 rounding, which faiss's own rounding decides) is marked in ``tied``.

    Parameters
    ----------
    x : float32 [n, D]
    mean : float64 [D]
    axes : float64 [h, D]
        The leading principal axes (orthonormal rows).
    table : float32 [n_tiles, w, tile], n_tiles * tile >= K, w >= h + 1 a multiple of 8
        (rows beyond h + 1 zero): the words' table in tiles of words (``_bound_rows``).
    sq : float32 [K]
        |c'|^2 per word.
    centroids : float32 [K, D]
    max_sq : float
        max |centroids[j]|^2.
    margin_rate, eps_rate : float
    nearest_first : bool
        Whether column 0 must be faiss's too, not only the set of m words.
    n_chunks : int
        Parallel chunks of rows (a few per thread).
    words : int64 [n, m] (output)
        Nearest first; m < K.
    dist : float32 [n, m] (output)
        Squared distances (float64 rounded to float32).
    tied : bool [n] (output)
    """
    n = x.shape[0]
    K = sq.shape[0]
    m = words.shape[1]
    n_chunks = max(1, min(n, n_chunks))
    for c in prange(n_chunks):
        xa = np.zeros((4, table.shape[1]), np.float32)
        x_sq = np.zeros(4, np.float64)
        raw_sq = np.zeros(4, np.float64)
        cen = np.zeros((4, x.shape[1]), np.float64)
        bounds = np.empty((4, K), np.float32)
        blk_min = np.empty((K + PRUNE_BLOCK - 1) // PRUNE_BLOCK, np.float32)
        cand = np.empty(K, np.int64)
        top_v = np.empty(m + 1, np.float64)
        top_j = np.empty(m + 1, np.int64)
        # How far above the smallest bound the m-th word typically lies, learnt along the
        # chunk, so that most rows need a single pass over the block minima.
        reach = 0.0
        end = ((c + 1) * n) // n_chunks
        for i0 in range((c * n) // n_chunks, end, 4):
            n_rows = min(4, end - i0)
            _project_quad(x, i0, n_rows, mean, axes, cen, xa, x_sq, raw_sq)
            _bound_rows(xa, table, sq, bounds)
            for r in range(n_rows):
                scale = raw_sq[r] + max_sq
                reach = _select_row(
                    bounds[r],
                    i0 + r,
                    x_sq[r],
                    x,
                    centroids,
                    margin_rate * scale,
                    eps_rate * scale,
                    nearest_first,
                    blk_min,
                    cand,
                    top_v,
                    top_j,
                    reach,
                    words,
                    dist,
                    tied,
                )


@njit(cache=True, nogil=True, parallel=True)
def region_word_count(assign, order, starts, region_starts, member_starts, members, n_words_total, n_blocks):
    """Distinct words per image over the features of its regions (R-ASMK, docs/regions.md).

    Parameters
    ----------
    assign : int64 [N, m]
        Words of each descriptor row.
    order, starts : int64 [N], int64 [I + 1]
        Rows grouped by image (``group_by_label``); ``starts`` may be a window.
    region_starts : int64 [I + 1]
        Image ``i`` owns regions ``region_starts[i]:region_starts[i + 1]``.
    member_starts, members : int64 [R + 1], int32 [P]
        Region ``r`` holds the image's descriptors ``members[member_starts[r]:member_starts[r + 1]]``
        (indices within the image, ``0 .. n_i - 1``).
    n_words_total : int
        Codebook size K.
    n_blocks : int
        Parallel blocks of images.

    Returns
    -------
    int64 [I]
    """
    m = assign.shape[1]
    n_images = starts.shape[0] - 1
    n_words = np.zeros(n_images, dtype=np.int64)
    for b in prange(n_blocks):
        # stamp[w] = the last image that counted word w: no reset between images.
        stamp = np.full(n_words_total, -1, dtype=np.int64)
        for i in range((n_images * b) // n_blocks, (n_images * (b + 1)) // n_blocks):
            s = starts[i]
            count = 0
            for r in range(region_starts[i], region_starts[i + 1]):
                for p in range(member_starts[r], member_starts[r + 1]):
                    row = order[s + members[p]]
                    for a in range(m):
                        word = assign[row, a]
                        if stamp[word] != i:
                            stamp[word] = i
                            count += 1
            n_words[i] = count
    return n_words


@njit(cache=True, nogil=True, parallel=True)
def region_aggregate_fill(
    vecs,
    centroids,
    assign,
    order,
    starts,
    region_starts,
    member_starts,
    members,
    agg_offsets,
    binary,
    n_blocks,
    out_words,
    out_codes,
    out_real,
    out_used,
):
    """R-ASMK: per region residual sums, each region L2-normalised as a whole, summed per word.

    For each image and each of its regions r with at least one descriptor,
    V_r(c) = Σ (x - centroid[c]) over the region's descriptors x listing c, accumulated in
    float32 in ascending descriptor order (as ``aggregate_fill``, so that one region
    holding every descriptor reproduces ASMK's sums bit for bit). The region's
    concatenation over its words is scaled by ``float32(1 / ‖V_r‖)`` (float64 norm; a
    region whose sums are all zero adds nothing) and added into the image's V(c).

    Parameters
    ----------
    vecs, centroids, assign, order, starts
        As for ``aggregate_fill``.
    region_starts, member_starts, members
        As for ``region_word_count``.
    agg_offsets : int64 [I + 1]
        Output rows of image ``i`` (from ``region_word_count``).
    binary : bool
        Write packed bits ``V > 0`` to ``out_codes`` (else the sums V to ``out_real``).
    n_blocks : int
        Parallel blocks of images.
    out_words : int64 [M]
        Word of each output row (ascending within an image).
    out_codes : uint64 [M, ceil(D / 64)] (or [0, 0] when not binary)
    out_real : float32 [M, D] (or [0, 0] when binary)
    out_used : int64 [I]
        Regions of each image that held a descriptor.
    """
    m = assign.shape[1]
    dim = vecs.shape[1]
    n_images = starts.shape[0] - 1
    for b in prange(n_blocks):
        slot = np.full(centroids.shape[0], -1, dtype=np.int64)
        for i in range((n_images * b) // n_blocks, (n_images * (b + 1)) // n_blocks):
            lo = agg_offsets[i]
            n_w = agg_offsets[i + 1] - lo
            if n_w == 0:
                continue
            s = starts[i]
            words = np.empty(n_w, dtype=np.int64)
            count = 0
            for r in range(region_starts[i], region_starts[i + 1]):
                for p in range(member_starts[r], member_starts[r + 1]):
                    row = order[s + members[p]]
                    for a in range(m):
                        word = assign[row, a]
                        if slot[word] < 0:
                            slot[word] = 0
                            words[count] = word
                            count += 1
            words.sort()
            for j in range(n_w):
                slot[words[j]] = j
                out_words[lo + j] = words[j]
            total = np.zeros((n_w, dim), dtype=np.float32)
            acc = np.zeros((n_w, dim), dtype=np.float32)
            touched = np.empty(n_w, dtype=np.int64)
            is_touched = np.zeros(n_w, dtype=np.bool_)
            used = 0
            for r in range(region_starts[i], region_starts[i + 1]):
                if member_starts[r] == member_starts[r + 1]:
                    continue
                used += 1
                n_touched = 0
                for p in range(member_starts[r], member_starts[r + 1]):
                    row = order[s + members[p]]
                    x = vecs[row]
                    for a in range(m):
                        word = assign[row, a]
                        # A descriptor listing a word twice contributes once (as in ASMK).
                        repeated = False
                        for a2 in range(a):
                            if assign[row, a2] == word:
                                repeated = True
                        if repeated:
                            continue
                        j = slot[word]
                        if not is_touched[j]:
                            is_touched[j] = True
                            touched[n_touched] = j
                            n_touched += 1
                        c = centroids[word]
                        for t in range(dim):
                            acc[j, t] += x[t] - c[t]
                sq = 0.0
                for q in range(n_touched):
                    j = touched[q]
                    for t in range(dim):
                        sq += np.float64(acc[j, t]) * np.float64(acc[j, t])
                scale = np.float32(1.0 / np.sqrt(sq)) if sq > 0.0 else np.float32(0.0)
                for q in range(n_touched):
                    j = touched[q]
                    for t in range(dim):
                        total[j, t] += acc[j, t] * scale
                        acc[j, t] = 0.0
                    is_touched[j] = False
            out_used[i] = used
            for j in range(n_w):
                if binary:
                    _pack_signs(total[j], out_codes[lo + j])
                else:
                    out_real[lo + j, :] = total[j]
                slot[words[j]] = -1


# -- spatial verification: tentative correspondences by shared visual words ------------------


@njit(cache=True, nogil=True, inline="always")
def _hamming(a, i, b, j):
    dist = 0
    for t in range(a.shape[1]):
        dist += popcount64(a[i, t] ^ b[j, t])
    return dist


@njit(cache=True, nogil=True)
def _merge_words(q_words, q_sigs, d_words, d_sigs, begin, end, cap, max_hamming, out, pos, fill):
    """Pairs ``(i, j - begin)`` with ``q_words[i] == d_words[j]`` (both ascending) whose
    signatures differ in at most ``max_hamming`` bits, at most ``cap * cap`` per word (the
    first found); written at ``out[pos:]`` when ``fill``. Returns the number of pairs."""
    n_q = q_words.shape[0]
    i = 0
    j = begin
    count = 0
    while i < n_q and j < end:
        a = q_words[i]
        b = d_words[j]
        if a < b:
            i += 1
        elif b < a:
            j += 1
        else:
            i_end = i
            while i_end < n_q and q_words[i_end] == a:
                i_end += 1
            j_end = j
            while j_end < end and d_words[j_end] == a:
                j_end += 1
            found = 0
            for x in range(i, i_end):
                for y in range(j, j_end):
                    if found < cap * cap and _hamming(q_sigs, x, d_sigs, y) <= max_hamming:
                        if fill:
                            out[pos + count, 0] = x
                            out[pos + count, 1] = y - begin
                        count += 1
                        found += 1
            i = i_end
            j = j_end
    return count


@njit(cache=True, nogil=True)
def word_matches(q_words, q_sigs, d_words, d_sigs, d_offsets, slots, cap, max_hamming):
    """Tentative correspondences of one query image with several database images.

    Parameters
    ----------
    q_words : int32 [n], ascending; q_sigs : uint64 [n, W]
        The query features' words and binary signatures.
    d_words : int32 [F], ascending within each image; d_sigs : uint64 [F, W];
    d_offsets : int64 [S + 1]
        The database images' features (``asmkit.geometry.GeometryStore``).
    slots : int64 [R]
        The candidate images (positions in the store; negative: no features).
    cap : int
        At most ``cap * cap`` pairs per word, against bursts.
    max_hamming : int
        Pairs whose signatures differ in more bits are no correspondence.

    Returns
    -------
    offsets : int64 [R + 1]
        Candidate ``c`` owns pairs ``offsets[c]:offsets[c + 1]``.
    pairs : int32 [M, 2]
        (query feature, candidate feature), both positions in their word-sorted order.
    """
    n = slots.shape[0]
    offsets = np.zeros(n + 1, np.int64)
    none = np.empty((0, 2), np.int32)
    for c in range(n):
        s = slots[c]
        found = 0
        if s >= 0:
            found = _merge_words(
                q_words, q_sigs, d_words, d_sigs, d_offsets[s], d_offsets[s + 1], cap, max_hamming, none, 0, False
            )
        offsets[c + 1] = offsets[c] + found
    pairs = np.empty((offsets[n], 2), np.int32)
    for c in range(n):
        s = slots[c]
        if s >= 0:
            _merge_words(
                q_words,
                q_sigs,
                d_words,
                d_sigs,
                d_offsets[s],
                d_offsets[s + 1],
                cap,
                max_hamming,
                pairs,
                offsets[c],
                True,
            )
    return offsets, pairs
