"""asmkit.compat accepts every call the reference's ASMKMethod accepts (issue 10, section 4):
the same public methods with the same parameters, the call shapes of the reference's
docstrings and examples, and the same metadata keys at every step and cache branch."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest

from asmkit import compat
from asmkit._synthetic import clustered_descriptors
from asmkit._validation import ArgumentError
from asmkit.compat import ASMKMethod

from .test_compat import D, _params, _tie_aware_agreement


@pytest.fixture(scope="module")
def data():
    train, _, _ = clustered_descriptors(20, 60, D, images_per_group=4, seed=7)
    vecs, imids, _ = clustered_descriptors(24, 40, D, images_per_group=4, seed=3)
    qvecs, qimids, _ = clustered_descriptors(6, 30, D, images_per_group=2, seed=4)
    return train, vecs, imids, qvecs, qimids


def _implementations():
    """(name, ASMKMethod class) of asmkit.compat, and of the reference when installed."""
    impls = [("asmkit", ASMKMethod)]
    try:
        import asmk
    except ImportError:
        return impls
    return impls + [("asmk", asmk.ASMKMethod)]


def _reference():
    return pytest.importorskip("asmk").ASMKMethod


def _shape(func):
    return [(p.name, p.kind, p.default) for p in inspect.signature(func).parameters.values()]


def _public_names(cls):
    return sorted(name for name in vars(cls) if not name.startswith("_")) + ["__init__"]


# -- the same methods and parameters ------------------------------------------------------


@pytest.mark.parametrize("name", ["ASMKMethod", "IvfBuilder"])
def test_public_methods_have_the_reference_signatures(name):
    reference = getattr(pytest.importorskip("asmk.asmk_method"), name)
    ours = getattr(compat, name)
    names = _public_names(reference)
    assert [n for n in names if n not in vars(ours)] == []
    for n in names:
        ref_attr, our_attr = inspect.getattr_static(reference, n), inspect.getattr_static(ours, n)
        # staticmethod, classmethod, property or plain function, as in the reference.
        assert type(our_attr) is type(ref_attr), n
        if not isinstance(ref_attr, property):
            assert _shape(getattr(ours, n)) == _shape(getattr(reference, n)), n


def test_instance_attributes_of_the_reference_exist_at_every_step(data):
    reference = _reference()
    train, vecs, imids, _, _ = data
    ref = reference.initialize_untrained(_params()).train_codebook(train.copy())
    ref_builder = ref.create_ivf_builder()
    ref_built = ref.build_ivf(vecs.copy(), imids.copy())
    ours = ASMKMethod.initialize_untrained(_params()).train_codebook(train)
    builder = ours.create_ivf_builder()
    built = ours.build_ivf(vecs, imids)
    for ref_obj, obj in ((ref, ours), (ref_builder, builder), (ref_built, built)):
        assert [a for a in vars(ref_obj) if not hasattr(obj, a)] == []
    assert builder.loaded_from_cache is ref_builder.loaded_from_cache is False
    assert built.kernel.binary is True and ref_built.kernel.binary is True
    assert built.inverted_file.stats == pytest.approx(ref_built.inverted_file.stats)
    assert built.inverted_file.n_images == ref_built.inverted_file.n_images == 24


# -- the same metadata keys at every step -------------------------------------------------


def _steps(cls, tmp_path, data):
    """Each step and cache branch, as a client that caches everything runs them."""
    train, vecs, imids, qvecs, qimids = (a.copy() for a in data)
    tmp_path.mkdir()
    untrained = cls.initialize_untrained(_params())
    trained = untrained.train_codebook(train, cache_path=str(tmp_path / "codebook.pkl"))
    loaded = untrained.train_codebook(cache_path=str(tmp_path / "codebook.pkl"))
    built = loaded.build_ivf(vecs, imids, cache_path=str(tmp_path / "ivf.pkl"))
    reloaded = loaded.build_ivf(cache_path=str(tmp_path / "ivf.pkl"))
    query_metadata = reloaded.query_ivf(qvecs, qimids)[0]
    return trained, loaded, built, reloaded, query_metadata


def test_metadata_keys_match_the_reference_at_every_step(data, tmp_path):
    reference = _reference()
    ref = _steps(reference, tmp_path / "asmk", data)
    ours = _steps(ASMKMethod, tmp_path / "asmkit", data)
    for step, i in (("train_codebook", 0), ("train_codebook", 1), ("build_ivf", 2), ("build_ivf", 3)):
        assert sorted(ours[i].metadata) == sorted(ref[i].metadata)
        assert sorted(ours[i].metadata[step]) == sorted(ref[i].metadata[step]), (step, i)
    assert sorted(ours[4]) == sorted(ref[4]) == ["query_avg_time"]

    trained, loaded, built, reloaded, _ = ours
    assert sorted(trained.metadata["train_codebook"]) == ["cluster_time", "index_class", "index_time", "train_time"]
    assert sorted(loaded.metadata["train_codebook"]) == ["index_class", "load_time"]
    assert sorted(built.metadata["build_ivf"]) == ["index_time", "ivf_stats"]
    assert sorted(reloaded.metadata["build_ivf"]) == ["ivf_stats", "load_time"]
    meta = trained.metadata["train_codebook"]
    assert meta["train_time"] == pytest.approx(meta["cluster_time"] + meta["index_time"])
    assert meta["cluster_time"] > 0 and meta["index_time"] > 0
    assert meta["index_class"] == ref[0].metadata["train_codebook"]["index_class"] == "FaissL2Index"
    # Same codebook (faiss k-means, same seed), so the same posting lists.
    for i in (2, 3):
        assert sorted(ours[i].metadata["build_ivf"]["ivf_stats"]) == sorted(ref[i].metadata["build_ivf"]["ivf_stats"])
        assert ours[i].metadata["build_ivf"]["ivf_stats"] == pytest.approx(ref[i].metadata["build_ivf"]["ivf_stats"])
    # Earlier steps' metadata is carried along.
    assert reloaded.metadata["train_codebook"] == loaded.metadata["train_codebook"]


# -- the call shapes of the reference's docstrings and examples ---------------------------


def test_train_codebook_call_shapes(data, tmp_path):
    train = data[0]
    centroids = {}
    for name, cls in _implementations():
        path = str(tmp_path / f"{name}_codebook.pkl")
        fresh = cls.initialize_untrained(_params())
        shapes = {
            "positional": fresh.train_codebook(train.copy()),
            "cache written": fresh.train_codebook(train.copy(), cache_path=path),
            # A client that always loads its cached codebook passes no vectors at all.
            "cache, no vectors": fresh.train_codebook(cache_path=path),
            "cache, None": fresh.train_codebook(None, cache_path=path),
        }
        for shape, method in shapes.items():
            np.testing.assert_array_equal(method.codebook.centroids, shapes["positional"].codebook.centroids, shape)
        assert "load_time" in shapes["cache, no vectors"].metadata["train_codebook"]
        override = cls.initialize_untrained({"index": {"gpu_id": None}}).train_codebook(
            train.copy(), step_params={"codebook": {"size": 16}}
        )
        assert override.codebook.centroids.shape == (16, D)
        assert override.params["train_codebook"] == {"codebook": {"size": 16}}
        centroids[name] = shapes["positional"].codebook.centroids
    if "asmk" in centroids:
        np.testing.assert_array_equal(centroids["asmkit"], centroids["asmk"])


def _image_chunks(imids, n):
    """Row slices of about len(imids) / n rows that never split an image."""
    bounds = np.searchsorted(imids, np.linspace(imids.min(), imids.max() + 1, n + 1).astype(int))
    return [slice(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def test_build_ivf_call_shapes(data, tmp_path):
    train, vecs, imids, qvecs, qimids = data
    results = {}
    for name, cls in _implementations():
        path = str(tmp_path / f"{name}_ivf.pkl")
        trained = cls.initialize_untrained(_params()).train_codebook(train.copy())
        shapes = {
            "positional": trained.build_ivf(vecs.copy(), imids.copy()),
            "cache written": trained.build_ivf(vecs.copy(), imids.copy(), cache_path=path),
            "cache, no columns": trained.build_ivf(cache_path=path),
            "cache, None": trained.build_ivf(None, None, cache_path=path),
            "step_params": trained.build_ivf(vecs.copy(), imids.copy(), step_params=_params()["build_ivf"]),
        }
        # The pieces build_ivf is made of, as MASt3R and HOW call them: an image per chunk
        # at most, several add calls.
        builder = trained.create_ivf_builder(cache_path=None, step_params=None)
        assert not builder.loaded_from_cache
        for rows in _image_chunks(imids, 5):
            builder.add(vecs[rows].copy(), imids[rows].copy())
        shapes["builder"] = trained.add_ivf_builder(builder)
        assert trained.create_ivf_builder(cache_path=path).loaded_from_cache
        query = {shape: method.query_ivf(qvecs.copy(), qimids.copy()) for shape, method in shapes.items()}
        for shape, (_, _images, ranks, scores) in query.items():
            np.testing.assert_array_equal(ranks, query["positional"][2], shape)
            np.testing.assert_allclose(scores, query["positional"][3], atol=1e-6, err_msg=shape)
            assert shapes[shape].metadata["build_ivf"]["ivf_stats"]["images"] == 24
        results[name] = query["positional"]
    if "asmk" in results:
        _, _, ref_ranks, ref_scores = results["asmk"]
        _tie_aware_agreement(ref_ranks, ref_scores, results["asmkit"][2], results["asmkit"][3])


def test_query_ivf_call_shapes(data):
    train, vecs, imids, qvecs, qimids = data
    method = ASMKMethod.initialize_untrained(_params(topk=7)).train_codebook(train).build_ivf(vecs, imids)
    _, images, ranks, scores = method.query_ivf(qvecs, qimids)
    assert ranks.shape == scores.shape == (6, 7)
    _, images2, ranks2, scores2 = method.query_ivf(qvecs, qimids, step_params=_params(topk=7)["query_ivf"], progress=2)
    np.testing.assert_array_equal(images2, images)
    np.testing.assert_array_equal(ranks2, ranks)
    np.testing.assert_array_equal(scores2, scores)
    # The reference's static helper, with the method's own objects.
    images3, ranks3, scores3 = ASMKMethod.accumulate_scores(
        method.codebook, method.kernel, method.inverted_file, qvecs, qimids, params=method.params["query_ivf"]
    )
    np.testing.assert_array_equal(images3, images)
    np.testing.assert_array_equal(ranks3, ranks)
    np.testing.assert_array_equal(scores3, scores)
    with pytest.raises(ArgumentError, match="query_ivf dict"):
        ASMKMethod.accumulate_scores(method.codebook, method.kernel, method.inverted_file, qvecs, qimids, params=None)


def test_search_without_topk_ranks_everything(data):
    # Kinder than the reference, whose IVF.search requires topk (TypeError).
    train, vecs, imids, qvecs, qimids = data
    method = ASMKMethod.initialize_untrained(_params(topk=3)).train_codebook(train).build_ivf(vecs, imids)
    no_topk = {**_params()["query_ivf"], "search": {}}
    _, _, ranks, scores = method.query_ivf(qvecs, qimids, step_params=no_topk)
    _, _, all_ranks, all_scores = method.query_ivf(qvecs, qimids, step_params=_params(topk=None)["query_ivf"])
    assert ranks.shape == (6, 24)
    np.testing.assert_array_equal(ranks, all_ranks)
    np.testing.assert_array_equal(scores, all_scores)
    try:
        import asmk
    except ImportError:
        return
    ref = asmk.ASMKMethod.initialize_untrained(_params()).train_codebook(train.copy())
    ref = ref.build_ivf(vecs.copy(), imids.copy())
    with pytest.raises(TypeError, match="topk"):
        ref.query_ivf(qvecs.copy(), qimids.copy(), step_params=no_topk)


# -- the reference's example client -------------------------------------------------------


def _demo_how(cls, desc, exp_path, log):
    """The steps of the reference's examples/demo_how.py, reading the metadata it reads."""
    asmk = cls.initialize_untrained(_params())

    asmk = asmk.train_codebook(desc["train"], cache_path=f"{exp_path}/codebook.pkl")
    metadata = asmk.metadata["train_codebook"]
    log.append(f"Using {metadata['index_class']} index")
    if "load_time" in metadata:
        log.append("Loaded pre-trained codebook")
    else:
        log.append(f"Codebook trained in {metadata['train_time']:.1f}s")
        log.append(f"clustered in {metadata['cluster_time']:.1f}s and indexed in {metadata['index_time']:.1f}s")

    asmk_dataset = asmk.build_ivf(desc["vecs"], desc["imids"], cache_path=f"{exp_path}/ivf_synthetic.pkl")
    metadata = asmk_dataset.metadata["build_ivf"]
    if "load_time" in metadata:
        log.append("Loaded indexed ivf")
    else:
        log.append(f"Indexed descriptors in {metadata['index_time']:.2f}s")
    log.append(f"IVF stats: {metadata['ivf_stats']}")

    metadata, _images, ranks, scores = asmk_dataset.query_ivf(desc["qvecs"], desc["qimids"])
    log.append(f"Average query time (quant+aggr+search) is {metadata['query_avg_time']:.3f}s")
    return ranks.T, scores


def test_demo_how_flow_matches_the_reference(data, tmp_path):
    train, vecs, imids, qvecs, qimids = data
    results = {}
    for name, cls in _implementations():
        runs = []
        (tmp_path / name).mkdir()
        for _run in range(2):  # the second run loads both caches
            desc = {
                "train": train.copy(),
                "vecs": vecs.copy(),
                "imids": imids.copy(),
                "qvecs": qvecs.copy(),
                "qimids": qimids.copy(),
            }
            log = []
            runs.append((*_demo_how(cls, desc, tmp_path / name, log), log))
        (ranks_t, scores, log), (ranks_t2, scores2, log2) = runs
        assert log[0] == log2[0] == "Using FaissL2Index index"
        assert log[1].startswith("Codebook trained in") and log[3].startswith("Indexed descriptors")
        assert log2[1] == "Loaded pre-trained codebook" and log2[2] == "Loaded indexed ivf"
        assert ranks_t.shape == (24, 6)
        np.testing.assert_array_equal(ranks_t2, ranks_t)
        np.testing.assert_allclose(scores2, scores, atol=1e-6)
        results[name] = (ranks_t.T, scores)
    if "asmk" in results:
        _tie_aware_agreement(results["asmk"][0], results["asmk"][1], *results["asmkit"])


def test_distractors_from_reference_pickles(data, tmp_path):
    # build_ivf(..., distractors_path=<the reference's IVF pickle>), and a cached reference
    # IVF pickle that was built after distractors, give the reference's ranks.
    reference = _reference()
    train, vecs, imids, qvecs, qimids = data
    cb, distractors, both = (str(tmp_path / n) for n in ("cb.pkl", "distractors.pkl", "both.pkl"))
    first, rest = imids < 8, imids >= 8
    ref = reference.initialize_untrained(_params()).train_codebook(train.copy(), cache_path=cb)
    ref.build_ivf(vecs[first], imids[first], cache_path=distractors)
    ref_both = ref.build_ivf(vecs[rest], imids[rest] - 8, distractors_path=distractors, cache_path=both)
    _, ref_images, ref_ranks, ref_scores = ref_both.query_ivf(qvecs.copy(), qimids.copy())
    assert ref_ranks.min() < 0  # distractors come out negative

    ours = ASMKMethod.initialize_untrained(_params()).train_codebook(cache_path=cb)
    built = ours.build_ivf(vecs[rest], imids[rest] - 8, distractors_path=distractors)
    cached = ours.build_ivf(cache_path=both)
    assert built.imid_offset == cached.imid_offset == 8
    for method in (built, cached):
        _, images, ranks, scores = method.query_ivf(qvecs, qimids)
        np.testing.assert_array_equal(images, ref_images)
        # Ids -8 .. 15 index the helper's 24 columns one to one (negatives from the end).
        _tie_aware_agreement(ref_ranks, ref_scores, ranks, scores)
