"""The pruned exact quantizer (asmkit.quantizer.PrunedQuantizer, _kernels.pruned_nearest)
against faiss's exhaustive search and a float64 brute force."""

import numpy as np
import pytest
import reference_numpy as ref

from asmkit import Codebook
from asmkit.quantizer import (
    TIE_EPS_PER_SQRT_DIM,
    FaissQuantizer,
    PrunedQuantizer,
    settle_rows,
)

faiss = pytest.importorskip("faiss")


def _spectral(n, dim, seed, *, decay=0.85, scale=1.0):
    """Clustered, L2-normalised descriptors whose energy falls off along their principal
    axes, as local descriptors' does (the case the pruned search is for)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    spread = decay ** np.arange(dim)
    centers = rng.standard_normal((40, dim)) * spread
    x = centers[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, dim)) * spread
    x = x @ basis.T
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (x * scale).astype(np.float32)


def _brute(vecs, centroids, m):
    """float64 distances [n, K] and the m + 1 nearest (stable: lower id first on ties)."""
    x, c = vecs.astype(np.float64), centroids.astype(np.float64)
    dist = (x**2).sum(1)[:, None] + (c**2).sum(1)[None] - 2 * x @ c.T
    order = np.argsort(dist, axis=1, kind="stable")[:, : m + 1]
    return dist, order


def _faiss_words(vecs, centroids, m):
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    return index.search(vecs, m)[1]


def _assert_same_assignment(words, expected):
    """Column 0 and the set of words per row equal (all that ASMK uses); columns in between
    may order two words tied within float32 rounding differently."""
    np.testing.assert_array_equal(words[:, 0], expected[:, 0])
    np.testing.assert_array_equal(np.sort(words, axis=1), np.sort(expected, axis=1))


def _flat(centroids):
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    return index


class _Fallback:
    """faiss's exhaustive quantizer, counting the blocks the pruned one hands it."""

    def __init__(self, centroids):
        self.inner = FaissQuantizer(_flat(centroids), centroids)
        self.calls = 0

    def search(self, *args, **kwargs):
        self.calls += 1
        return self.inner.search(*args, **kwargs)


def _pruned(centroids, width=None):
    """A PrunedQuantizer of ``centroids`` and its counting fallback."""
    fallback = _Fallback(centroids)
    return PrunedQuantizer(centroids, fallback, width=width), fallback


def _search(pruned, centroids, vecs, m):
    """(dist, words) of one block searched by ``pruned``, its tied rows settled as in one
    faiss call on ``vecs``."""
    dist = np.empty((len(vecs), m), np.float32)
    words = np.empty((len(vecs), m), np.int64)
    tied = pruned.search(vecs, m, dist, words, nearest_first=True, one_segment=False)
    if tied.size:
        dist[tied], words[tied] = settle_rows(_flat(centroids), vecs[tied], tied, np.full(tied.size, len(vecs)), m)
    return dist, words


def _book(centroids, width):
    """A Codebook quantizing with a PrunedQuantizer of a fixed width."""
    book = Codebook(centroids)
    book.quantizer = _pruned(centroids, width)[0]
    return book


def _eps(vecs):
    return TIE_EPS_PER_SQRT_DIM * np.sqrt(vecs.shape[1])


def _scale(vecs, centroids):
    return (vecs.astype(np.float64) ** 2).sum(1) + (centroids.astype(np.float64) ** 2).sum(1).max()


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("scale", [1.0, 512.0])  # RootSIFT-like, raw-SIFT-like magnitudes
def test_pruned_equals_faiss_and_brute_force(m, scale):
    vecs = _spectral(3000, 128, seed=1, scale=scale)
    centroids = _spectral(1000, 128, seed=2, scale=scale)  # K not a multiple of 16
    pruned, fallback = _pruned(centroids)
    dist, words = _search(pruned, centroids, vecs, m)
    assert fallback.calls == 0, "these descriptors should take the pruned path"
    brute_dist, brute = _brute(vecs, centroids, m)
    # Away from float32 ties the words are the float64 truth, in order...
    scale_row = _scale(vecs, centroids)
    gaps = np.diff(np.take_along_axis(brute_dist, brute, axis=1), axis=1)
    clear = (gaps > _eps(vecs) * scale_row[:, None]).all(axis=1)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(words[clear], brute[clear, :m])
    # ... and everywhere they are faiss's (near-ties are handed to faiss, laid out as in
    # this one call).
    _assert_same_assignment(words, _faiss_words(vecs, centroids, m))
    np.testing.assert_allclose(dist, np.take_along_axis(brute_dist, words, axis=1), rtol=1e-5, atol=1e-5 * scale**2)


def test_quantize_uses_the_pruned_path_and_agrees_with_prune_off():
    vecs = _spectral(5000, 128, seed=3)  # more than one faiss BLAS block (4096 rows)
    centroids = _spectral(512, 128, seed=4)
    on = Codebook(centroids)
    off = Codebook(centroids)
    off.prune = False
    assert isinstance(on.quantizer, PrunedQuantizer) and isinstance(off.quantizer, FaissQuantizer)
    for m in (1, 3, 5):
        _assert_same_assignment(on.quantize(vecs, m), off.quantize(vecs, m))


def test_one_blas_block_goes_to_faiss_directly():
    # A single segment that faiss searches as one BLAS block (an image of >= 1000 rows at
    # D = 128, searched alone): faiss's own call, no bound (its tied rows would cost that
    # call again). Shorter segments (faiss's direct loop) and several segments are pruned.
    centroids = _spectral(512, 128, seed=30)
    index = faiss.IndexFlatL2(128)
    index.add(centroids)
    block = _spectral(1500, 128, seed=31)
    book = Codebook(centroids)
    book.quantizer, fallback = _pruned(centroids)
    np.testing.assert_array_equal(book.quantize(block, 5, segments=[0, 1500]), index.search(block, 5)[1])
    assert fallback.calls == 1
    _assert_same_assignment(book.quantize(block[:900], 5, segments=[0, 900]), index.search(block[:900], 5)[1])
    expected = np.concatenate([index.search(block[:700], 5)[1], index.search(block[700:], 5)[1]])
    _assert_same_assignment(book.quantize(block, 5, segments=[0, 700, 1500]), expected)
    assert fallback.calls == 1


def test_pruned_matches_the_plain_loop_twin():
    vecs = _spectral(120, 64, seed=5)
    centroids = _spectral(300, 64, seed=6)
    pruned, _ = _pruned(centroids, width=16)  # forced on this small sample
    _, words = _search(pruned, centroids, vecs, 3)
    np.testing.assert_array_equal(words, ref.quantize(vecs, centroids, 3))


@pytest.mark.parametrize("m", [1, 5])
def test_partial_word_tiles_and_row_groups(m):
    # K = 1500: a full tile of 1024 words and a zero-padded one of 476, words in 94 blocks
    # of which the last holds 12; 1003 rows: groups of four rows with 3 left over.
    vecs = _spectral(1003, 96, seed=21)
    centroids = _spectral(1500, 96, seed=22)
    pruned, _ = _pruned(centroids, width=24)
    _, words = _search(pruned, centroids, vecs, m)
    _assert_same_assignment(words, _faiss_words(vecs, centroids, m))
    brute_dist, brute = _brute(vecs, centroids, m)
    gaps = np.diff(np.take_along_axis(brute_dist, brute, axis=1), axis=1)
    clear = (gaps > _eps(vecs) * _scale(vecs, centroids)[:, None]).all(axis=1)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.sort(words[clear], axis=1), np.sort(brute[clear, :m], axis=1))


def test_exact_ties_are_flagged_and_resolved_by_faiss():
    centroids = _spectral(600, 64, seed=7)
    centroids[300:310] = centroids[100:110]  # duplicated words: exact ties
    vecs = np.concatenate([centroids[95:115], _spectral(400, 64, seed=8)])  # on the words themselves
    pruned, _ = _pruned(centroids, width=16)
    for m in (1, 2):
        _, words = _search(pruned, centroids, vecs, m)
        _assert_same_assignment(words, _faiss_words(vecs, centroids, m))
    # A descriptor on a duplicated word: distance 0 to both copies, faiss's order.
    assert set(words[5]) == {100, 300}


def test_descriptors_without_a_tail_and_odd_dimensions():
    # All energy in the first 6 of 37 axes: the tail norm is 0 for the descriptors and
    # nearly 0 for the words, where cancellation in |x|^2 - |head|^2 would show.
    rng = np.random.default_rng(9)
    basis, _ = np.linalg.qr(rng.standard_normal((37, 37)))
    vecs = (np.pad(rng.standard_normal((1500, 6)), ((0, 0), (0, 31))) @ basis.T).astype(np.float32)
    centroids = (
        np.pad(rng.standard_normal((700, 6)), ((0, 0), (0, 31))) @ basis.T + 1e-4 * rng.standard_normal((700, 37))
    ).astype(np.float32)
    pruned, _ = _pruned(centroids, width=8)
    for m in (1, 4):
        _, words = _search(pruned, centroids, vecs, m)
        brute_dist, brute = _brute(vecs, centroids, m)
        gaps = np.diff(np.take_along_axis(brute_dist, brute, axis=1), axis=1)
        clear = (gaps > _eps(vecs) * _scale(vecs, centroids)[:, None]).all(axis=1)
        np.testing.assert_array_equal(words[clear], brute[clear, :m])
        _assert_same_assignment(words, _faiss_words(vecs, centroids, m))


def test_isotropic_data_falls_back_to_faiss_and_forced_pruning_stays_exact():
    rng = np.random.default_rng(10)
    vecs = rng.standard_normal((800, 128)).astype(np.float32)
    centroids = rng.standard_normal((512, 128)).astype(np.float32)
    pruned, fallback = _pruned(centroids)
    # No axis carries much more energy than another: no width is worth it.
    _, words = _search(pruned, centroids, vecs, 1)
    assert fallback.calls == 1
    _assert_same_assignment(words, _faiss_words(vecs, centroids, 1))
    # Forced anyway, it checks most words but stays exact.
    pruned, fallback = _pruned(centroids, width=16)
    _, words = _search(pruned, centroids, vecs, 5)
    assert fallback.calls == 0
    _assert_same_assignment(words, _faiss_words(vecs, centroids, 5))


def test_small_codebooks_and_m_near_k_use_faiss():
    centroids = _spectral(40, 32, seed=11)
    pruned, fallback = _pruned(centroids)
    _search(pruned, centroids, _spectral(50, 32, seed=13), 1)
    assert fallback.calls == 1  # K below the words pruning needs
    centroids = _spectral(300, 32, seed=12)
    pruned, fallback = _pruned(centroids)
    _, words = _search(pruned, centroids, _spectral(50, 32, seed=13), 300)
    assert fallback.calls == 1  # m + 1 > K
    assert words.shape == (50, 300) and all(sorted(row) == list(range(300)) for row in words.tolist())


def test_rows_redone_by_faiss_round_as_in_the_full_call():
    # faiss's float32 order of two near-tied words depends on where the row sits in its
    # 4096-row block; the redo must reproduce the full call's layout, block sizes included.
    rng = np.random.default_rng(14)
    centroids = _spectral(600, 64, seed=15)
    base = _spectral(9000, 64, seed=16)
    # Rows half-way between two words (near-ties), spread over all blocks and offsets.
    a, b = rng.integers(0, 600, 400), rng.integers(0, 600, 400)
    ties = (0.5 * (centroids[a] + centroids[b])).astype(np.float32)
    at = rng.choice(len(base), 400, replace=False)
    base[at] = ties
    index = _flat(centroids)
    expected = index.search(base, 2)[1]
    rows = np.sort(at)
    _, words = settle_rows(index, base[rows], rows, np.full(len(rows), len(base)), 2)
    np.testing.assert_array_equal(words, expected[rows])
    pruned, _ = _pruned(centroids, width=16)
    for m in (1, 2):
        _assert_same_assignment(_search(pruned, centroids, base, m)[1], index.search(base, m)[1])


def test_segments_reproduce_one_faiss_call_per_segment():
    # Query images of 300 rows (faiss's direct loop: 300 x 128 < its BLAS threshold) and of
    # 1500 rows (BLAS), with near-tied rows, as the reference quantizes one image per call.
    rng = np.random.default_rng(17)
    centroids = _spectral(800, 128, seed=18)
    sizes = [300, 1500, 7, 300, 4200, 1]
    vecs = _spectral(sum(sizes), 128, seed=19)
    near = rng.choice(len(vecs), 600, replace=False)
    a, b = rng.integers(0, 800, 600), rng.integers(0, 800, 600)
    vecs[near] = (0.5 * (centroids[a] + centroids[b])).astype(np.float32)
    segments = np.concatenate([[0], np.cumsum(sizes)])
    book = _book(centroids, 16)
    index = _flat(centroids)
    for m in (1, 5):
        expected = np.concatenate([index.search(vecs[s:e], m)[1] for s, e in zip(segments[:-1], segments[1:])])
        _assert_same_assignment(book.quantize(vecs, m, segments=segments), expected)
        off = Codebook(centroids)  # faiss on the whole block, near-ties again per segment
        off.prune = False
        _assert_same_assignment(off.quantize(vecs, m, segments=segments), expected)


@pytest.mark.parametrize("segments", [[0, 5], [1, 10], [0, 4, 3, 10], [[0, 10]], [0.0, 10.0]])
def test_bad_segments_are_rejected(segments):
    book = Codebook(_spectral(300, 32, seed=20))
    with pytest.raises(ValueError, match="segments"):
        book.quantize(_spectral(10, 32, seed=21), 1, segments=segments)


def test_set_only_assignment_keeps_the_set_of_words():
    # nearest_first=False (query side): the m words are faiss's as a set.
    rng = np.random.default_rng(22)
    centroids = _spectral(700, 64, seed=23)
    vecs = _spectral(5000, 64, seed=24)
    near = rng.choice(len(vecs), 800, replace=False)
    vecs[near] = (0.5 * (centroids[rng.integers(0, 700, 800)] + centroids[rng.integers(0, 700, 800)])).astype(
        np.float32
    )
    book = _book(centroids, 16)
    expected = _flat(centroids).search(vecs, 4)[1]
    words = book.quantize(vecs, 4, nearest_first=False, segments=[0, len(vecs)])
    np.testing.assert_array_equal(np.sort(words, axis=1), np.sort(expected, axis=1))


def test_concurrent_quantize_leaves_faiss_settings_alone():
    # Several threads re-searching short BLAS blocks at once: same words as alone, and
    # faiss's process-wide BLAS threshold restored afterwards.
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(25)
    centroids = _spectral(600, 128, seed=26)
    sizes = [1100, 1300, 1500]  # BLAS segments (>= 1000 rows at D = 128)
    vecs = _spectral(sum(sizes), 128, seed=27)
    near = rng.choice(len(vecs), 500, replace=False)
    vecs[near] = (0.5 * (centroids[rng.integers(0, 600, 500)] + centroids[rng.integers(0, 600, 500)])).astype(
        np.float32
    )
    segments = np.concatenate([[0], np.cumsum(sizes)])
    book = _book(centroids, 16)
    expected = book.quantize(vecs, 5, segments=segments, nearest_first=False)
    before = faiss.cvar.distance_compute_blas_threshold
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: book.quantize(vecs, 5, segments=segments, nearest_first=False), range(8)))
    assert faiss.cvar.distance_compute_blas_threshold == before
    for words in results:
        np.testing.assert_array_equal(np.sort(words, axis=1), np.sort(expected, axis=1))
