"""Quantization through torch (asmkit.gpu.TorchQuantizer): the CPU reference's words.

The quantizer runs the same code on any torch device; here on torch's CPU device, whose
float32 products round differently from faiss's as a GPU's do, and on CUDA where there is
one (the tests marked so skip elsewhere).
"""

import warnings

import numpy as np
import pytest

from asmkit import Codebook, quantizer
from asmkit._kernels import faiss_threads
from asmkit.codebook import _faiss_gpu_count
from asmkit.quantizer import tie_eps

torch = pytest.importorskip("torch")
faiss = pytest.importorskip("faiss")
from asmkit.gpu import TorchQuantizer, cuda_device_count  # noqa: E402  (needs torch)

needs_cuda = pytest.mark.skipif(cuda_device_count() == 0, reason="no CUDA device")


def _data(seed, n, k=600, dim=64, ties=300):
    """Clustered descriptors with rows half-way between two words (float32 near-ties) and
    rows on duplicated words (exact ties)."""
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((k, dim)).astype(np.float32)
    centroids[k // 2 : k // 2 + 10] = centroids[:10]
    vecs = (centroids[rng.integers(0, k, n)] + 0.4 * rng.standard_normal((n, dim))).astype(np.float32)
    at = rng.choice(n, ties, replace=False)
    a, b = rng.integers(0, k, ties), rng.integers(0, k, ties)
    vecs[at] = (0.5 * (centroids[a] + centroids[b])).astype(np.float32)
    vecs[at[:20]] = centroids[:20]
    return centroids, vecs


def _on_torch(centroids, device="cpu", **options):
    """A Codebook whose quantizer is a TorchQuantizer on ``device``."""
    book = Codebook(centroids)
    book.quantizer = TorchQuantizer(centroids, device, tie_eps(1.0, centroids.shape[1]), **options)
    return book


def _faiss_per_segment(centroids, vecs, m, segments):
    # On the thread count that decides tied rows: faiss's word for a tie depends on it, and
    # an earlier test (torch, the CLI's --threads) may have left OpenMP on another.
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    with faiss_threads(quantizer.settle_threads()):
        return np.concatenate([index.search(vecs[s:e], m)[1] for s, e in zip(segments[:-1], segments[1:])])


def _assert_same_assignment(words, expected):
    np.testing.assert_array_equal(words[:, 0], expected[:, 0])
    np.testing.assert_array_equal(np.sort(words, axis=1), np.sort(expected, axis=1))


@pytest.mark.parametrize("m", [1, 5])
def test_torch_quantizer_gives_faiss_words_per_segment(m):
    # One BLAS-size segment (the database), direct-loop and BLAS query images.
    centroids, vecs = _data(1, 9000)
    for segments in (np.array([0, 9000]), np.array([0, 40, 3000, 3001, 9000])):
        words = _on_torch(centroids).quantize(vecs, m, segments=segments)
        _assert_same_assignment(words, _faiss_per_segment(centroids, vecs, m, segments))


def test_tied_rows_are_flagged_for_faiss():
    centroids, vecs = _data(2, 2000)
    book = _on_torch(centroids)
    dist = np.empty((len(vecs), 1), np.float32)
    words = np.empty((len(vecs), 1), np.int64)
    tied = book.quantizer.search(vecs, 1, dist, words, nearest_first=True, one_segment=True)
    # float64 gaps: every row whose two nearest words tie within faiss's rounding is flagged.
    x, c = vecs.astype(np.float64), centroids.astype(np.float64)
    full = (x**2).sum(1)[:, None] + (c**2).sum(1)[None] - 2 * x @ c.T
    exact = np.sort(full, axis=1)
    scale = (x**2).sum(1) + (c**2).sum(1).max()
    tight = np.flatnonzero(exact[:, 1] - exact[:, 0] <= 0.1 * tie_eps(scale, 64))
    assert len(tight) >= 20  # the rows on duplicated words at least
    assert set(tight) <= set(tied.tolist())
    assert len(tied) < len(vecs) // 4
    # The other rows' words are already the exact nearest.
    rest = np.setdiff1d(np.arange(len(vecs)), tied)
    np.testing.assert_array_equal(words[rest, 0], np.argmin(full[rest], axis=1))


def test_float32_matmul_precision_is_restored():
    centroids, vecs = _data(3, 300)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        _on_torch(centroids).quantize(vecs, 2)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_blocks_of_rows_cover_every_row(monkeypatch):
    centroids, vecs = _data(4, 1000)
    book = _on_torch(centroids, block_rows=256)  # four blocks, the last one short
    expected = _on_torch(centroids).quantize(vecs, 3, return_distances=True)
    words, dist = book.quantize(vecs, 3, return_distances=True)
    np.testing.assert_array_equal(words, expected[0])
    np.testing.assert_allclose(dist, expected[1], rtol=1e-5, atol=1e-5)


def test_gpu_without_cuda_or_faiss_gpu_falls_back_with_one_warning():
    if cuda_device_count() or _faiss_gpu_count():
        pytest.skip("a GPU is available")
    centroids, vecs = _data(5, 100, ties=30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        book = Codebook(centroids, gpu=0)
    assert [str(w.message) for w in caught if "gpu" in str(w.message)] == [
        "gpu: no GPU 0 available to faiss or torch (CPU builds or no device); using the CPU"
    ]
    assert book.gpu is None and not isinstance(book.quantizer, TorchQuantizer)


@needs_cuda
@pytest.mark.parametrize("m", [1, 5])
def test_cuda_codebook_equals_the_cpu_codebook(m):
    centroids, vecs = _data(6, 20000, k=4096, dim=128, ties=2000)
    book = Codebook(centroids, gpu=0)
    assert book.gpu == 0
    segments = np.array([0, 500, 1700, 20000])
    cpu = Codebook(centroids).quantize(vecs, m, segments=segments)
    _assert_same_assignment(book.quantize(vecs, m, segments=segments), cpu)


@needs_cuda
def test_cuda_index_search_equals_cpu():
    from asmkit import Index

    centroids, vecs = _data(7, 30000, k=1024, dim=128, ties=1000)
    ids = np.repeat(np.arange(60), 500)
    results = []
    for gpu in (None, 0):
        index = Index(Codebook(centroids, gpu=gpu))
        index.add(vecs, ids)
        results.append(index.search(vecs[:5000], ids[:5000], k=20))
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-6)


@needs_cuda
def test_cuda_compat_method_equals_cpu():
    from test_compat import _params

    from asmkit.compat import ASMKMethod

    centroids, vecs = _data(8, 12000, k=512, dim=64, ties=500)
    imids = np.repeat(np.arange(24), 500)
    found = []
    for gpu_id in (None, 0):
        method = ASMKMethod.initialize_untrained(_params(gpu_id=gpu_id)).train_codebook(centroids)
        found.append(method.build_ivf(vecs, imids).query_ivf(vecs[:3000], imids[:3000]))
    np.testing.assert_array_equal(found[0][2], found[1][2])
    np.testing.assert_allclose(found[0][3], found[1][3], atol=1e-6)


def test_index_load_on_a_gpu_searches_as_on_the_cpu(tmp_path):
    from asmkit import Index

    centroids, vecs = _data(9, 6000, k=300, dim=64, ties=200)
    ids = np.repeat(np.arange(12), 500)
    index = Index(Codebook(centroids))
    index.add(vecs, ids)
    index.save(tmp_path / "i.asmkit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = Index.load(tmp_path / "i.asmkit", gpu=0)
    gpu_seen = bool(cuda_device_count() or _faiss_gpu_count())
    assert sum("gpu" in str(w.message) for w in caught) == (0 if gpu_seen else 1)
    assert (loaded.codebook.gpu is not None) == gpu_seen
    for a, b in zip(loaded.search(vecs[:1500], ids[:1500], k=5), index.search(vecs[:1500], ids[:1500], k=5)):
        np.testing.assert_array_equal(a, b)


def test_small_codebooks_and_m_beyond_k():
    rng = np.random.default_rng(10)
    centroids = rng.standard_normal((3, 16)).astype(np.float32)
    vecs = rng.standard_normal((50, 16)).astype(np.float32)
    book = _on_torch(centroids)
    words = book.quantize(vecs, 5)  # m clipped to K = 3: every word, nearest first
    assert words.shape == (50, 3)
    np.testing.assert_array_equal(np.sort(words, axis=1), np.tile(np.arange(3), (50, 1)))
    np.testing.assert_array_equal(words[:, 0], Codebook(centroids).quantize(vecs, 1)[:, 0])
    assert book.quantize(vecs[:0], 2).shape == (0, 2)
    one = _on_torch(centroids[:1])
    np.testing.assert_array_equal(one.quantize(vecs, 1), np.zeros((50, 1), np.int64))


def test_a_torch_that_fails_to_load_counts_no_device(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "torch":
            raise OSError("libcudart.so: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    assert cuda_device_count() == 0
