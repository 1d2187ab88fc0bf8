import warnings

import numpy as np
import pytest
import reference_numpy as ref

from asmkit import Codebook
from asmkit._validation import ArgumentError
from asmkit.storage import StorageError


@pytest.fixture(scope="module")
def train_vecs():
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((8, 24)) * 4
    return (centers[rng.integers(0, 8, 2000)] + rng.standard_normal((2000, 24))).astype(np.float32)


@pytest.mark.parametrize("m", [1, 3])
def test_quantize_matches_brute_force(centroids40, m):
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((200, 40)).astype(np.float32)
    words = Codebook(centroids40).quantize(vecs, m)
    assert words.dtype == np.int64 and words.shape == (200, m)
    np.testing.assert_array_equal(words, ref.quantize(vecs, centroids40, m))


def test_quantize_clips_m_to_codebook_size(centroids40):
    vecs = np.random.default_rng(2).standard_normal((5, 40)).astype(np.float32)
    words = Codebook(centroids40).quantize(vecs, 50)
    assert words.shape == (5, 16)
    assert all(sorted(row) == list(range(16)) for row in words.tolist())


def test_quantize_empty_and_float64(centroids40):
    book = Codebook(centroids40)
    assert book.quantize(np.empty((0, 40), np.float32), 5).shape == (0, 5)
    vecs = np.random.default_rng(3).standard_normal((10, 40))
    np.testing.assert_array_equal(book.quantize(vecs, 2), book.quantize(vecs.astype(np.float32), 2))


def test_train_is_deterministic_and_matches_faiss_reference_call(train_vecs):
    faiss = pytest.importorskip("faiss")
    a = Codebook.train(train_vecs, 8, iters=10, seed=7)
    b = Codebook.train(train_vecs, 8, iters=10, seed=7)
    assert a.size == 8 and a.dim == 24 and a.centroids.dtype == np.float32
    np.testing.assert_array_equal(a.centroids, b.centroids)
    # The reference's training call: faiss.Clustering, 10 iterations, on IndexFlatL2.
    clus = faiss.Clustering(24, 8)
    clus.niter, clus.seed, clus.verbose = 10, 7, False
    clus.train(train_vecs, faiss.IndexFlatL2(24))
    np.testing.assert_array_equal(a.centroids, faiss.vector_float_to_array(clus.centroids).reshape(8, 24))


def _lloyd_numpy(vecs, k, iters, seed):
    """Lloyd's k-means by brute force, with the random start of ``Codebook.train(pruned=True)``."""
    rng = np.random.default_rng(seed)
    centroids = vecs[np.sort(rng.choice(len(vecs), k, replace=False))].astype(np.float64)
    for _ in range(iters):
        words = ((vecs[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1).argmin(1)
        for word in range(k):
            if (words == word).any():
                centroids[word] = vecs[words == word].mean(0)
    return centroids


def test_pruned_train_is_lloyd_kmeans(train_vecs):
    # Clusters far apart: no distance is decided by rounding, so the words are those of
    # the brute-force reference at every step.
    a = Codebook.train(train_vecs, 8, iters=5, seed=3, pruned=True)
    np.testing.assert_allclose(a.centroids, _lloyd_numpy(train_vecs, 8, 5, 3), rtol=0, atol=1e-4)
    b = Codebook.train(train_vecs, 8, iters=5, seed=3, pruned=True)
    np.testing.assert_array_equal(a.centroids, b.centroids)


def test_pruned_train_splits_empty_words():
    # Three distinct points, one of them repeated: from a start with two words on the same
    # point, one of them is left empty and is split off a populated word.
    vecs = np.repeat(np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32), [50, 1, 1], axis=0)
    book = Codebook.train(vecs, 3, iters=3, seed=0, pruned=True)
    assert np.isfinite(book.centroids).all()
    assert len(np.unique(book.centroids, axis=0)) == 3


def test_train_size_string(train_vecs):
    vecs = np.tile(train_vecs, (1, 1))[:1500]
    assert Codebook.train(vecs, "1k", iters=1).size == 1024


def test_train_rejects_too_few_vectors(train_vecs):
    with pytest.raises(ValueError, match="size"):
        Codebook.train(train_vecs[:5], 8)


def test_train_gpu_falls_back_with_one_warning(train_vecs):
    from asmkit.codebook import _faiss_gpu_count
    from asmkit.gpu import cuda_device_count

    if _faiss_gpu_count() or cuda_device_count():
        pytest.skip("a GPU is available here")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        book = Codebook.train(train_vecs, 8, iters=2, gpu=0)
    assert len([w for w in caught if "gpu" in str(w.message)]) == 1
    assert book.quantize(train_vecs[:3], 1).shape == (3, 1)


def test_save_load_roundtrip(tmp_path, centroids40):
    book = Codebook(centroids40)
    book.save(tmp_path / "cb.asmkit")
    loaded = Codebook.load(tmp_path / "cb.asmkit")
    np.testing.assert_array_equal(loaded.centroids, centroids40)


def test_load_rejects_corruption_and_wrong_kind(tmp_path, centroids40):
    Codebook(centroids40).save(tmp_path / "cb.asmkit")
    data = tmp_path / "cb.asmkit" / "centroids.npy"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(StorageError, match="centroids.npy"):
        Codebook.load(tmp_path / "cb.asmkit")
    with pytest.raises(FileNotFoundError):
        Codebook.load(tmp_path / "missing.asmkit")


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (np.zeros((0, 4), np.float32), ValueError, "centroids"),
        (np.zeros(4, np.float32), ValueError, "centroids"),
        (np.array([[np.nan, 1.0]]), ValueError, "NaN"),
        (np.array([["a", "b"]]), ArgumentError, "centroids"),
        ([[1.0, 2.0]], ArgumentError, "centroids"),
    ],
)
def test_codebook_rejects_bad_centroids(bad, exc, match):
    with pytest.raises(exc, match=match):
        Codebook(bad)


def test_quantize_rejects_bad_input(centroids40):
    book = Codebook(centroids40)
    with pytest.raises(ValueError, match="vecs"):
        book.quantize(np.zeros((3, 39), np.float32))
    with pytest.raises(ValueError, match="m"):
        book.quantize(np.zeros((3, 40), np.float32), 0)


def _agrees_with_faiss_up_to_ties(words, faiss_dist, faiss_words, m):
    """Rows where our m words differ from faiss's must sit on a float32-rounding tie.

    Two rankings of the same squared distances can only differ where distances are equal
    up to the rounding of float32 inner products: column 0 (the hard assignment, which
    the database side uses) may differ only if faiss's first two distances tie, and the
    set of m words only if faiss's m-th and (m + 1)-th distances tie.
    """
    tol = 8 * np.finfo(np.float32).eps * np.maximum(faiss_dist[:, : m + 1], 1.0).max(axis=1)
    first = words[:, 0] != faiss_words[:, 0]
    assert np.all(np.abs(faiss_dist[first, 1] - faiss_dist[first, 0]) <= tol[first])
    sets_differ = np.array([set(a) != set(b) for a, b in zip(words.tolist(), faiss_words[:, :m].tolist())])
    assert np.all(np.abs(faiss_dist[sets_differ, m] - faiss_dist[sets_differ, m - 1]) <= tol[sets_differ])
    return int(first.sum()), int(sets_differ.sum())


@pytest.mark.parametrize("m", [1, 5])
def test_quantize_matches_faiss_flat_l2_on_clustered_data(m):
    faiss = pytest.importorskip("faiss")
    from asmkit._synthetic import clustered_descriptors

    vecs, _, _ = clustered_descriptors(60, 100, 128, seed=11)
    # Centroids from the data itself (plus a little noise): many descriptors sit close to
    # several words, the hard case for agreement.
    rng = np.random.default_rng(12)
    centroids = vecs[rng.choice(len(vecs), 512, replace=False)] + 0.01 * rng.standard_normal((512, 128)).astype(
        np.float32
    )
    index = faiss.IndexFlatL2(128)
    index.add(centroids)
    faiss_dist, faiss_words = index.search(vecs, m + 1)
    words, dist = Codebook(centroids).quantize(vecs, m, return_distances=True)
    assert words.shape == dist.shape == (len(vecs), m)
    n_first, n_sets = _agrees_with_faiss_up_to_ties(words, faiss_dist, faiss_words, m)
    assert n_first <= 3 and n_sets <= 3  # ties are rare; a systematic difference is not
    np.testing.assert_allclose(dist, faiss_dist[:, :m], rtol=1e-5, atol=1e-5)


def test_quantize_matches_faiss_on_rootsift_like_data():
    # RootSIFT-like: non-negative, L1-normalised, square-rooted (unit L2 norm), the
    # codebook drawn from the descriptors themselves.
    faiss = pytest.importorskip("faiss")
    from asmkit._synthetic import clustered_descriptors

    vecs, _, _ = clustered_descriptors(300, 100, 128, seed=12)
    vecs = np.abs(vecs)
    vecs = np.sqrt(vecs / vecs.sum(axis=1, keepdims=True)).astype(np.float32)
    rng = np.random.default_rng(3)
    centroids = vecs[rng.choice(len(vecs), 1024, replace=False)]
    queries = vecs[::10]
    index = faiss.IndexFlatL2(128)
    index.add(centroids)
    faiss_dist, faiss_words = index.search(queries, 6)
    words = Codebook(centroids).quantize(queries, 5)
    _agrees_with_faiss_up_to_ties(words, faiss_dist, faiss_words, 5)


def test_quantize_ties_go_to_the_lower_word_id():
    # Words 1 and 3 are the same point, and 0 and 2 another: equal distances everywhere.
    centroids = np.array([[0, 0], [1, 0], [0, 0], [1, 0], [5, 5]], dtype=np.float32)
    vecs = np.array([[0.9, 0.0], [0.1, 0.0], [3.0, 3.0]], dtype=np.float32)
    words = Codebook(centroids).quantize(vecs, 4)
    np.testing.assert_array_equal(words, [[1, 3, 0, 2], [0, 2, 1, 3], [4, 1, 3, 0]])


def test_quantize_blocks_and_threads_do_not_change_the_result(monkeypatch, centroids40):
    import asmkit._kernels as kernels
    from asmkit import codebook

    vecs = np.random.default_rng(8).standard_normal((700, 40)).astype(np.float32)
    expected = Codebook(centroids40).quantize(vecs, 3)
    # Blocks of 64 rows, each searched by faiss on all its threads.
    monkeypatch.setattr(codebook, "QUANTIZE_ROWS", 64)
    monkeypatch.setattr(kernels, "MIN_PARALLEL_MACS", 0)
    np.testing.assert_array_equal(Codebook(centroids40).quantize(vecs, 3), expected)
    np.testing.assert_array_equal(expected, ref.quantize(vecs, centroids40, 3))


def test_faiss_thread_budget_restores_the_thread_count():
    faiss = pytest.importorskip("faiss")
    import asmkit._kernels as kernels

    before = faiss.omp_get_max_threads()
    with kernels.faiss_thread_budget(10, 100):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before
