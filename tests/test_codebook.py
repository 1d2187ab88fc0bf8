import warnings

import numpy as np
import pytest

import reference_numpy as ref
from asmkit import Codebook
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


def test_train_size_string(train_vecs):
    vecs = np.tile(train_vecs, (1, 1))[:1500]
    assert Codebook.train(vecs, "1k", iters=1).size == 1024


def test_train_rejects_too_few_vectors(train_vecs):
    with pytest.raises(ValueError, match="size"):
        Codebook.train(train_vecs[:5], 8)


def test_train_gpu_falls_back_with_one_warning(train_vecs):
    faiss = pytest.importorskip("faiss")
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is available")
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
        (np.array([["a", "b"]]), TypeError, "centroids"),
        ([[1.0, 2.0]], TypeError, "centroids"),
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
