"""asmkit.compat.ASMKMethod: the reference's call shape, parity with the reference package."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from asmkit._synthetic import clustered_descriptors
from asmkit._validation import ArgumentError
from asmkit.compat import ASMKMethod

K = 32
D = 64


def _params(binary=True, idf=False, topk=None, gpu_id=None):
    return {
        "index": {"gpu_id": gpu_id},
        "train_codebook": {"codebook": {"size": K}},
        "build_ivf": {
            "kernel": {"binary": binary},
            "ivf": {"use_idf": idf},
            "quantize": {"multiple_assignment": 1},
            "aggregate": {},
        },
        "query_ivf": {
            "quantize": {"multiple_assignment": 5},
            "aggregate": {},
            "search": {"topk": topk},
            "similarity": {"similarity_threshold": 0.0, "alpha": 3.0},
        },
    }


@pytest.fixture(scope="module")
def data():
    vecs, imids, _ = clustered_descriptors(24, 40, D, images_per_group=4, seed=3)
    qvecs, qimids, _ = clustered_descriptors(6, 30, D, images_per_group=2, seed=4)
    return vecs, imids, qvecs, qimids


@pytest.fixture(scope="module")
def reference_codebook(data, tmp_path_factory):
    """A codebook trained by the reference and pickled in its format."""
    asmk = pytest.importorskip("asmk")
    vecs = data[0]
    path = tmp_path_factory.mktemp("cb") / "codebook.pkl"
    asmk.ASMKMethod.initialize_untrained(_params()).train_codebook(vecs, cache_path=str(path))
    return path


def _tie_aware_agreement(ref_ranks, ref_scores, ranks, scores, tol=1e-5):
    """Ranks equal up to the order of (nearly) equal reference scores; scores within tol."""
    n_db = ref_ranks.shape[1]
    full = np.zeros((ref_ranks.shape[0], n_db))
    np.put_along_axis(full, ref_ranks, ref_scores, axis=1)
    ours_in_ref = np.take_along_axis(full, ranks, axis=1)
    np.testing.assert_allclose(scores, ours_in_ref, atol=tol, rtol=0)
    np.testing.assert_allclose(ours_in_ref, ref_scores, atol=1e-9, rtol=0)
    # Runs of tied reference scores may be permuted; every run holds the same ids.
    untied = np.abs(np.diff(ref_scores, axis=1)) > 1e-9
    for q in range(ranks.shape[0]):
        groups = np.split(np.arange(n_db), np.flatnonzero(untied[q]) + 1)
        for g in groups:
            assert set(ranks[q, g]) == set(ref_ranks[q, g])


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("idf", [False, True])
def test_parity_with_reference(data, reference_codebook, binary, idf):
    asmk = pytest.importorskip("asmk")
    vecs, imids, qvecs, qimids = data
    params = _params(binary=binary, idf=idf)

    ref = asmk.ASMKMethod.initialize_untrained(params).train_codebook(None, cache_path=str(reference_codebook))
    ref = ref.build_ivf(vecs.copy(), imids.copy())
    _, ref_images, ref_ranks, ref_scores = ref.query_ivf(qvecs.copy(), qimids.copy())

    copies = [a.copy() for a in data]
    ours = ASMKMethod.initialize_untrained(params).train_codebook(None, cache_path=reference_codebook)
    np.testing.assert_array_equal(ours.codebook.centroids, ref.codebook.centroids)
    ours = ours.build_ivf(vecs, imids)
    time0 = time.perf_counter()
    metadata, images, ranks, scores = ours.query_ivf(qvecs, qimids)
    elapsed = time.perf_counter() - time0

    for before, after in zip(copies, data):
        np.testing.assert_array_equal(before, after)  # caller arrays untouched
    # Per query image (6 of them), as the reference reports it, not the whole call.
    assert list(metadata) == ["query_avg_time"]
    assert 0 < metadata["query_avg_time"] <= elapsed / 6
    np.testing.assert_array_equal(images, ref_images)
    assert ranks.shape == ref_ranks.shape == (6, 24)
    assert scores.shape == ref_scores.shape
    assert (scores > 0).sum() > scores.size // 2  # a real signal, not all zeros
    _tie_aware_agreement(ref_ranks, ref_scores, ranks, scores)


def test_topk_and_step_params_override(data, reference_codebook):
    vecs, imids, qvecs, qimids = data
    method = ASMKMethod.initialize_untrained(_params(topk=5)).train_codebook(None, cache_path=reference_codebook)
    method = method.build_ivf(vecs, imids)
    _, _, ranks, scores = method.query_ivf(qvecs, qimids)
    assert ranks.shape == (6, 5)
    override = _params(topk=None)["query_ivf"]
    override["similarity"]["alpha"] = 1.0
    _, _, ranks1, scores1 = method.query_ivf(qvecs, qimids, step_params=override)
    assert ranks1.shape == (6, 24)
    # alpha = 1 changes the scores; the stored params are not modified by an override.
    assert not np.allclose(np.sort(scores1, axis=1)[:, -5:], np.sort(scores, axis=1))
    assert method.params["query_ivf"]["similarity"]["alpha"] == 3.0
    assert method.params["query_ivf"]["search"]["topk"] == 5


def test_query_order_and_unsorted_ids(data, reference_codebook):
    """Query rows follow np.unique(qimids), whatever the row order."""
    vecs, imids, qvecs, qimids = data
    method = ASMKMethod.initialize_untrained(_params()).train_codebook(None, cache_path=reference_codebook)
    method = method.build_ivf(vecs, imids)
    _, images, ranks, scores = method.query_ivf(qvecs, qimids)
    perm = np.random.default_rng(0).permutation(len(qimids))
    _, images2, ranks2, scores2 = method.query_ivf(qvecs[perm], qimids[perm])
    np.testing.assert_array_equal(images, images2)
    np.testing.assert_allclose(scores, scores2, atol=1e-6)


def test_steps_return_new_objects(data, tmp_path):
    vecs, imids, qvecs, qimids = data
    untrained = ASMKMethod.initialize_untrained(_params())
    trained = untrained.train_codebook(vecs)
    assert untrained.codebook is None and trained.codebook is not None
    assert "train_codebook" in trained.metadata and "train_codebook" not in untrained.metadata
    built = trained.build_ivf(vecs, imids)
    assert trained.index is None and built.index is not None
    assert built.metadata["build_ivf"]["ivf_stats"]["images"] == 24
    with pytest.raises(ArgumentError, match="already trained"):
        trained.train_codebook(vecs)
    with pytest.raises(ArgumentError, match="train_codebook must run first"):
        untrained.build_ivf(vecs, imids)
    with pytest.raises(ArgumentError, match="build_ivf must run first"):
        trained.query_ivf(qvecs, qimids)
    with pytest.raises(ArgumentError, match="already built"):
        built.build_ivf(vecs, imids)
    with pytest.raises(ArgumentError, match="imids: has 959 entries, expected 960"):
        trained.build_ivf(vecs, imids[:-1])
    with pytest.raises(ArgumentError, match="imids: required"):
        trained.build_ivf(vecs)
    with pytest.raises(ArgumentError, match="vecs: required"):
        untrained.train_codebook()
    with pytest.raises(ArgumentError, match="expected the columns qvecs, qimids, got 3"):
        built.query_ivf(qvecs, qimids, qimids)


def test_codebook_and_ivf_cache_round_trip(data, tmp_path):
    vecs, imids, qvecs, qimids = data
    cb_path, ivf_path = tmp_path / "cb.asmkit", tmp_path / "ivf.asmkit"
    first = ASMKMethod.initialize_untrained(_params()).train_codebook(vecs, cache_path=cb_path)
    assert (cb_path / "manifest.json").is_file()  # asmkit's format, not a pickle
    first = first.build_ivf(vecs, imids, cache_path=ivf_path)
    assert (ivf_path / "manifest.json").is_file()
    second = ASMKMethod.initialize_untrained(_params()).train_codebook(None, cache_path=cb_path)
    assert "load_time" in second.metadata["train_codebook"]
    np.testing.assert_array_equal(second.codebook.centroids, first.codebook.centroids)
    second = second.build_ivf(None, None, cache_path=ivf_path)
    assert "load_time" in second.metadata["build_ivf"]
    a = first.query_ivf(qvecs, qimids)
    b = second.query_ivf(qvecs, qimids)
    np.testing.assert_array_equal(a[2], b[2])
    np.testing.assert_array_equal(a[3], b[3])
    with pytest.raises(ArgumentError, match="size 32.*is 64"):
        params = _params()
        params["train_codebook"]["codebook"]["size"] = 64
        ASMKMethod.initialize_untrained(params).train_codebook(None, cache_path=cb_path)


def test_distractors_get_negative_ids(data, tmp_path):
    vecs, imids, qvecs, qimids = data
    method = ASMKMethod.initialize_untrained(_params()).train_codebook(vecs)
    method.build_ivf(vecs[imids < 8], imids[imids < 8], cache_path=tmp_path / "d.asmkit")
    both = method.build_ivf(vecs[imids >= 8], imids[imids >= 8] - 8, distractors_path=tmp_path / "d.asmkit")
    assert both.imid_offset == 8
    full = method.build_ivf(vecs, imids)
    _, _, ranks, scores = both.query_ivf(qvecs, qimids)
    _, _, full_ranks, full_scores = full.query_ivf(qvecs, qimids)
    # Same database, so the same scores; ids shifted by the offset (distractors negative).
    np.testing.assert_allclose(scores, full_scores, atol=1e-6)
    np.testing.assert_array_equal(ranks, full_ranks - 8)
    assert ranks.min() < 0


def test_gpu_request_without_gpu_falls_back_with_one_warning(data):
    # Kinder than the reference, which fails in faiss.StandardGpuResources on a CPU build.
    import faiss

    from asmkit.gpu import cuda_device_count

    if getattr(faiss, "get_num_gpus", lambda: 0)() or cuda_device_count():
        pytest.skip("a GPU is available here")
    vecs, imids, qvecs, qimids = data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        method = ASMKMethod.initialize_untrained(_params(gpu_id=0)).train_codebook(vecs)
    assert sum(issubclass(w.category, RuntimeWarning) and "gpu" in str(w.message) for w in caught) == 1
    assert method.metadata["train_codebook"]["index_class"] == "FaissL2Index"
    cpu = ASMKMethod.initialize_untrained(_params()).train_codebook(vecs)
    np.testing.assert_array_equal(method.codebook.centroids, cpu.codebook.centroids)
    _, _, ranks, scores = method.build_ivf(vecs, imids).query_ivf(qvecs, qimids)
    _, _, cpu_ranks, cpu_scores = cpu.build_ivf(vecs, imids).query_ivf(qvecs, qimids)
    np.testing.assert_array_equal(ranks, cpu_ranks)
    np.testing.assert_array_equal(scores, cpu_scores)
    try:
        import asmk
    except ImportError:
        return
    with pytest.raises(AttributeError, match="StandardGpuResources"):
        asmk.ASMKMethod.initialize_untrained(_params(gpu_id=0)).train_codebook(vecs.copy())


def test_bad_params_rejected():
    with pytest.raises(ValueError, match="unknown key"):
        ASMKMethod.initialize_untrained({"build_ivf": {"kernal": {}}})
    with pytest.raises(ArgumentError, match="gpu_id"):
        ASMKMethod.initialize_untrained({"index": {"gpu_id": "cuda"}})
    with pytest.raises(ArgumentError, match="gpu_id.*at least 0"):
        ASMKMethod.initialize_untrained({"index": {"gpu_id": -1}})
    with pytest.raises(ArgumentError, match="params"):
        ASMKMethod.initialize_untrained([1])


def test_malicious_codebook_cache_is_refused(tmp_path):
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "codebook.pkl"
    path.write_bytes(pickle.dumps({"type": "Codebook", "params": {"size": K}, "state": {"centroids": Payload()}}))
    with pytest.raises(ValueError, match="refused global"):
        ASMKMethod.initialize_untrained(_params()).train_codebook(None, cache_path=path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("idf", [False, True])
def test_reference_ivf_pickle_is_served_without_the_descriptors(data, reference_codebook, tmp_path, binary, idf):
    # A user with the reference's cached inverted file (cache_path=...pkl) switches the
    # import and queries it: same ranks and scores as the reference, no descriptors needed.
    asmk = pytest.importorskip("asmk")
    vecs, imids, qvecs, qimids = data
    params = _params(binary=binary, idf=idf)
    ivf_pkl = tmp_path / "ivf.pkl"
    ref = asmk.ASMKMethod.initialize_untrained(params).train_codebook(None, cache_path=str(reference_codebook))
    ref = ref.build_ivf(vecs.copy(), imids.copy(), cache_path=str(ivf_pkl))
    assert ivf_pkl.is_file()
    _, ref_images, ref_ranks, ref_scores = ref.query_ivf(qvecs.copy(), qimids.copy())

    ours = ASMKMethod.initialize_untrained(params).train_codebook(None, cache_path=reference_codebook)
    ours = ours.build_ivf(None, None, cache_path=ivf_pkl)
    assert "load_time" in ours.metadata["build_ivf"]
    assert ours.metadata["build_ivf"]["ivf_stats"]["images"] == 24
    _, images, ranks, scores = ours.query_ivf(qvecs, qimids)
    np.testing.assert_array_equal(images, ref_images)
    _tie_aware_agreement(ref_ranks, ref_scores, ranks, scores)
    # The same index as building from the descriptors.
    built = ASMKMethod.initialize_untrained(params).train_codebook(None, cache_path=reference_codebook)
    _, _, ranks2, scores2 = built.build_ivf(vecs, imids).query_ivf(qvecs, qimids)
    np.testing.assert_array_equal(ranks, ranks2)
    np.testing.assert_allclose(scores, scores2, atol=1e-7)


def test_reference_ivf_pickle_with_other_kernel_is_refused(data, reference_codebook, tmp_path):
    asmk = pytest.importorskip("asmk")
    from asmkit.compat import LegacyFormatError

    vecs, imids, _, _ = data
    ivf_pkl = tmp_path / "ivf.pkl"
    ref = asmk.ASMKMethod.initialize_untrained(_params(binary=True)).train_codebook(
        None, cache_path=str(reference_codebook)
    )
    ref.build_ivf(vecs.copy(), imids.copy(), cache_path=str(ivf_pkl))
    ours = ASMKMethod.initialize_untrained(_params(binary=False)).train_codebook(None, cache_path=reference_codebook)
    with pytest.raises(LegacyFormatError, match="ivf.pkl.*binary=False.*binary=True"):
        ours.build_ivf(None, None, cache_path=ivf_pkl)


def test_malicious_ivf_cache_is_refused(data, tmp_path):
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    vecs = data[0]
    path = tmp_path / "ivf.pkl"
    path.write_bytes(pickle.dumps({"type": "IVF", "params": {"use_idf": False}, "state": {"ivf_vecs": Payload()}}))
    method = ASMKMethod.initialize_untrained(_params()).train_codebook(vecs)
    with pytest.raises(ValueError, match="ivf.pkl.*refused global"):
        method.build_ivf(None, None, cache_path=path)
    assert not (tmp_path / "pwned").exists()
