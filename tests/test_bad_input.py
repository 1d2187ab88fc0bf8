"""Bad input is refused at the boundary with an ArgumentError naming the argument (a wrong
type and a wrong value alike), or gives a documented result; it never reaches numba or faiss."""

import numpy as np
import pytest
from reference_numpy import make_images

from asmkit import Codebook, Index, Params, similarity_matrix
from asmkit._validation import ArgumentError


@pytest.fixture(scope="module")
def index(centroids40):
    idx = Index(Codebook(centroids40), Params(ma_query=2))
    idx.add(make_images(4, 8, 40, seed=2, centroids=centroids40))
    return idx


GOOD = np.zeros((3, 40), np.float32)
IDS = np.zeros(3, np.int64)


@pytest.mark.parametrize(
    "vecs,ids,match",
    [
        (np.full((3, 40), "a"), IDS, "vecs"),
        (np.empty((3, 40), dtype=object), IDS, "vecs"),
        (np.zeros((3, 40), np.complex64), IDS, "vecs"),
        (np.zeros(40, np.float32), IDS[:1], "vecs"),
        (np.zeros((3, 40, 1), np.float32), IDS, "vecs"),
        (np.zeros((3, 39), np.float32), IDS, "vecs"),
        (np.where(np.eye(3, 40) > 0, np.nan, 0).astype(np.float32), IDS, "NaN"),
        (np.full((3, 40), np.inf, np.float32), IDS, "vecs"),
        (np.full((3, 40), 1e300), IDS, "vecs"),  # overflows float32
        ("not an array", IDS, "vecs"),
        (GOOD, None, "image_ids"),
        (GOOD, IDS[:2], "image_ids"),
        (GOOD, np.zeros(3, np.float64), "image_ids"),
        (GOOD, np.zeros((3, 1), np.int64), "image_ids"),
        (GOOD, np.array([0, -1, 2]), "image_ids"),
        (GOOD, "abc", "image_ids"),
        ([GOOD, np.zeros((2, 41), np.float32)], None, r"vecs\[1\]"),
        ([GOOD, GOOD], [5], "image_ids"),
        ([GOOD, GOOD], [5, 5], "image_ids"),
        ([GOOD, np.full((2, 40), "x")], None, r"vecs\[1\]"),
    ],
)
def test_add_and_search_reject_bad_descriptors(centroids40, index, vecs, ids, match):
    fresh = Index(Codebook(centroids40))
    with pytest.raises(ArgumentError, match=match):
        fresh.add(vecs, ids)
    assert len(fresh) == 0
    if not (isinstance(vecs, list) and ids is not None and len(set(ids)) < len(ids)):
        with pytest.raises(ArgumentError, match=match):
            index.search(vecs, ids, k=2)


def test_float64_and_int_input_are_converted(centroids40):
    images = make_images(3, 8, 40, seed=4, centroids=centroids40)
    a, b = Index(Codebook(centroids40)), Index(Codebook(centroids40))
    a.add(images)
    b.add([im.astype(np.float64) for im in images])
    np.testing.assert_array_equal(a.inverted_file.data, b.inverted_file.data)
    ints = Index(Codebook(centroids40))
    ints.add(np.ones((2, 40), np.int32), np.array([0, 0], np.uint16))
    assert len(ints) == 1


@pytest.mark.parametrize("k", [0, -3, True, 2.5, "5"])
def test_search_rejects_bad_k(index, k):
    with pytest.raises(ArgumentError, match="k"):
        index.search(GOOD, IDS, k=k)


def test_k_larger_than_database_is_padded(index):
    scores, ids = index.search(GOOD, IDS, k=10)
    assert ids.shape == (1, 10) and ids[0, 4:].tolist() == [-1] * 6 and sorted(ids[0, :4].tolist()) == [0, 1, 2, 3]
    assert np.all(np.isneginf(scores[0, 4:]))


def test_empty_query_set(index):
    scores, ids = index.search(np.empty((0, 40), np.float32), np.empty(0, np.int64), k=3)
    assert scores.shape == ids.shape == (0, 3)
    assert index.search([], k=3)[1].shape == (0, 3)


def test_zero_query_norm_scores_zero(centroids40):
    # With idf, a word present in every database image has idf 0; a query made only of
    # such words has n_q = 0: documented result, score 0 everywhere (not NaN).
    single = np.tile(centroids40[3], (2, 1)).astype(np.float32)
    idx = Index(Codebook(centroids40), Params(use_idf=True, ma_query=1))
    idx.add([single, single])
    scores, ids = idx.search([single], k=2)
    assert scores.tolist() == [[0.0, 0.0]] and ids.tolist() == [[0, 1]]


def test_params_and_codebook_arguments(centroids40):
    with pytest.raises(ArgumentError, match="unknown preset"):
        Index(Codebook(centroids40), "no_such_preset")
    with pytest.raises(ArgumentError, match="bogus"):
        Index(Codebook(centroids40), {"bogus": 1})
    with pytest.raises(ArgumentError, match="params"):
        Index(Codebook(centroids40), 3)
    with pytest.raises(ArgumentError, match="codebook"):
        Index(centroids40)
    with pytest.raises(ArgumentError, match="chunk"):
        similarity_matrix(Codebook(centroids40), [GOOD], chunk=0)


def test_remove_and_keys_arguments(centroids40):
    idx = Index(Codebook(centroids40))
    idx.add([GOOD, GOOD])
    with pytest.raises(ArgumentError, match="ids_or_keys"):
        idx.remove([1.5])
    with pytest.raises(ArgumentError, match="ids_or_keys"):
        idx.remove(["missing"])
    with pytest.raises(ArgumentError, match="keys"):
        idx.add([GOOD], image_ids=[9], keys="abc")
    with pytest.raises(ArgumentError, match="keys"):
        idx.add([GOOD, GOOD], image_ids=[9, 10], keys=["a"])
    with pytest.raises(ArgumentError, match="keys"):
        idx.add([GOOD, GOOD], image_ids=[9, 10], keys=["a", "a"])
    assert len(idx) == 2


def test_empty_index_operations(tmp_path, centroids40):
    idx = Index(Codebook(centroids40))
    assert len(idx) == 0 and idx.stats["images"] == 0
    assert idx.similarity_matrix([GOOD]).shape == (1, 0)
    idx.save(tmp_path / "empty.asmkit")
    loaded = Index.load(tmp_path / "empty.asmkit")
    assert len(loaded) == 0 and loaded.search([GOOD], k=2)[1].tolist() == [[-1, -1]]
    with pytest.raises(FileNotFoundError):
        Index.load(tmp_path / "nothing.asmkit")
