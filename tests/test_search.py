import numpy as np
import pytest
import reference_numpy as ref
from reference_numpy import flatten, make_images

from asmkit import Codebook, Index, Params, merge_topk, similarity_matrix
from asmkit.kernel import aggregate_images


def assert_same_ranking(scores, ids, expected_scores_by_id, atol):
    """Our (scores, ids) row against a {id: score} dict: same scores, same order up to ties."""
    ranked = sorted(expected_scores_by_id.items(), key=lambda t: (-np.float32(t[1]), t[0]))
    assert len(ids) == len(ranked)
    for j, (image_id, score) in enumerate(ranked):
        assert abs(scores[j] - expected_scores_by_id[ids[j]]) <= atol
        # A different id at rank j is allowed only for an (almost) exact tie.
        assert ids[j] == image_id or abs(expected_scores_by_id[ids[j]] - score) <= atol


CASES = [
    # (binary, use_idf, alpha, tau)
    (True, False, 3.0, 0.0),
    (True, True, 3.0, 0.0),
    (True, False, 1.0, 0.0),
    (True, False, 3.0, 0.2),
    (True, True, 3.0, -0.5),
    (False, False, 3.0, 0.0),
    (False, True, 3.0, 0.0),
    (False, False, 1.0, 0.2),
    (False, True, 3.0, -0.5),
    (True, False, 2.5, -0.5),
]


@pytest.mark.parametrize("binary,use_idf,alpha,tau", CASES)
def test_search_matches_twin(centroids40, binary, use_idf, alpha, tau):
    params = Params(binary=binary, use_idf=use_idf, alpha=alpha, tau=tau, ma_database=1, ma_query=3)
    db_images = make_images(12, 10, 40, seed=21, centroids=centroids40)
    q_images = make_images(4, 10, 40, seed=22, centroids=centroids40)
    index = Index(Codebook(centroids40), params)
    index.add(*flatten(db_images))
    scores, ids = index.search(q_images)
    twin = ref.Database(list(enumerate(db_images)), centroids40, binary=binary, use_idf=use_idf)
    for q, qvecs in enumerate(q_images):
        expected = twin.score(qvecs, m=3, alpha=alpha, tau=tau)
        assert_same_ranking(scores[q], ids[q], expected, atol=1e-6)
    # The same images as queries: each ranks itself first.
    self_scores, self_ids = index.search(db_images[:3], k=1)
    if tau <= 0.0 and alpha == 3.0:
        assert self_ids[:, 0].tolist() == [0, 1, 2]


def test_search_dim_100_multiple_assignment_database(centroids100):
    params = Params(binary=True, ma_database=2, ma_query=4, use_idf=True)
    db_images = make_images(9, 12, 100, seed=5, centroids=centroids100)
    q_images = make_images(3, 12, 100, seed=6, centroids=centroids100)
    index = Index(Codebook(centroids100), params)
    index.add(db_images)
    scores, ids = index.search(q_images)
    twin = ref.Database(list(enumerate(db_images)), centroids100, binary=True, use_idf=True, m=2)
    for q, qvecs in enumerate(q_images):
        assert_same_ranking(scores[q], ids[q], twin.score(qvecs, m=4, alpha=3.0, tau=0.0), atol=1e-6)


def test_empty_words_and_unseen_query_words(centroids40):
    # The database uses only half of the words; query words with empty posting lists
    # still count in the query normalisation n_q.
    half = centroids40[:8]
    db_images = make_images(6, 8, 40, seed=8, centroids=half)
    q_images = make_images(2, 8, 40, seed=9, centroids=centroids40)
    params = Params(binary=True, use_idf=True, ma_query=2)
    index = Index(Codebook(centroids40), params)
    index.add(db_images)
    assert index.stats["empty_vw"] > 0
    scores, ids = index.search(q_images)
    twin = ref.Database(list(enumerate(db_images)), centroids40, binary=True, use_idf=True)
    for q, qvecs in enumerate(q_images):
        assert_same_ranking(scores[q], ids[q], twin.score(qvecs, m=2, alpha=3.0, tau=0.0), atol=1e-6)


def test_topk_padding_and_empty_query(centroids40):
    index = Index(Codebook(centroids40), Params(ma_query=2))
    images = make_images(3, 8, 40, seed=1, centroids=centroids40)
    index.add(images)
    scores, ids = index.search([images[0], np.empty((0, 40), np.float32)], k=5)
    assert scores.shape == ids.shape == (2, 5) and scores.dtype == np.float32 and ids.dtype == np.int64
    assert ids[0, :3].tolist()[0] == 0 and ids[0, 3:].tolist() == [-1, -1]
    assert np.all(np.isneginf(scores[:, 3:]))
    # No descriptors: scores 0 against everything, ties by ascending id.
    assert scores[1, :3].tolist() == [0.0, 0.0, 0.0] and ids[1, :3].tolist() == [0, 1, 2]


def test_empty_database():
    book = Codebook(np.eye(4, dtype=np.float32))
    index = Index(book)
    q = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    scores, ids = index.search(q, np.zeros(5, np.int64), k=3)
    assert ids.tolist() == [[-1, -1, -1]] and np.all(np.isneginf(scores))
    scores, ids = index.search(q, np.zeros(5, np.int64))
    assert ids.shape == (1, 0)


def test_reference_tie_order_and_full_ranking(centroids40):
    index = Index(Codebook(centroids40), Params(ma_query=3))
    images = make_images(7, 10, 40, seed=31, centroids=centroids40)
    index.add(images, image_ids=np.array([70, 10, 60, 20, 50, 30, 40]))
    scores, ids = index.search(images[:2])
    assert sorted(ids[0].tolist()) == [10, 20, 30, 40, 50, 60, 70]
    for row_s, row_i in zip(scores, ids):
        keys = list(zip((-row_s).tolist(), row_i.tolist()))
        assert keys == sorted(keys)


@pytest.mark.parametrize("binary", [True, False])
def test_similarity_matrix_equals_index_search(centroids40, binary):
    params = Params(binary=binary, ma_database=1, ma_query=3, use_idf=True)
    images = make_images(10, 10, 40, seed=41, centroids=centroids40, empty=(4,))
    vecs, labels = flatten([im for im in images], ids=range(len(images)))
    book = Codebook(centroids40)
    index = Index(book, params)
    index.add(images)
    dense = similarity_matrix(book, images, params=params, chunk=3)
    assert dense.shape == (10, 10) and dense.dtype == np.float32
    full_scores, full_ids = index.search(images)
    for q in range(10):
        np.testing.assert_array_equal(dense[q, full_ids[q]], full_scores[q])
    assert np.all(dense[4] == 0) and np.all(dense[:, 4] == 0)
    # Array input: image 4 has no rows there, so 9 images; top-k rows agree with the dense rows.
    dense_arr = similarity_matrix(book, vecs, labels, params)
    assert dense_arr.shape == (9, 9)
    present = np.array([i for i in range(10) if i != 4])
    scores, ids = similarity_matrix(book, vecs, labels, params, k=3, chunk=4)
    assert ids.shape == (9, 3)
    for row in range(9):
        order = sorted(range(9), key=lambda j: (-dense_arr[row, j], present[j]))[:3]
        np.testing.assert_array_equal(ids[row], present[order])
        np.testing.assert_array_equal(scores[row], dense_arr[row, order])
    # Index.similarity_matrix: columns in ascending id order.
    np.testing.assert_array_equal(index.similarity_matrix(images, chunk=4), dense)


def test_merge_topk_orders_and_pads():
    a = (np.array([[0.9, 0.5]], np.float32), np.array([[3, 8]]))
    b = (np.array([[0.5, -np.inf]], np.float32), np.array([[2, -1]]))
    scores, ids = merge_topk([a, b], k=4)
    assert ids.tolist() == [[3, 2, 8, -1]]
    assert scores[0, :3].tolist() == [np.float32(0.9), 0.5, 0.5]
    scores, ids = merge_topk([a, b], k=6)
    assert ids.tolist() == [[3, 2, 8, -1, -1, -1]]
    with pytest.raises(ValueError, match="results"):
        merge_topk([])


@pytest.mark.parametrize("binary,use_idf", [(True, False), (True, True), (False, False), (False, True)])
def test_parity_with_reference_package(binary, use_idf):
    asmk_method = pytest.importorskip("asmk.asmk_method")
    asmk_codebook = pytest.importorskip("asmk.codebook")
    asmk_index = pytest.importorskip("asmk.index")
    rng = np.random.default_rng(77)
    dim, n_words = 64, 32
    centroids = rng.standard_normal((n_words, dim)).astype(np.float32)
    db_images = make_images(40, 30, dim, seed=78, centroids=centroids, n_objects=10)
    q_images = make_images(10, 30, dim, seed=79, centroids=centroids, n_objects=10)
    vecs, labels = flatten(db_images)
    qvecs, qlabels = flatten(q_images)
    params = Params(codebook_size=n_words, binary=binary, use_idf=use_idf)

    cdb = asmk_codebook.Codebook(asmk_index.FaissL2Index(), size=n_words)
    cdb.index(centroids)
    method = asmk_method.ASMKMethod(params.to_reference(), {}, codebook=cdb)
    method = method.build_ivf(vecs, labels.copy())
    _, images, ranks, ref_scores = method.query_ivf(qvecs, qlabels.copy())

    index = Index(Codebook(centroids), params)
    index.add(vecs, labels)
    scores, ids = index.search(qvecs, qlabels)
    assert images.tolist() == list(range(10))
    for q in range(10):
        expected = dict(zip(ranks[q].tolist(), ref_scores[q].tolist()))
        # The spec asks for 1e-5; these small synthetic scores (~1e-2) agree far closer.
        assert_same_ranking(scores[q], ids[q], expected, atol=1e-7)


@pytest.mark.parametrize("binary", [True, False])
def test_parallel_kernels_equal_serial(monkeypatch, centroids40, binary):
    import asmkit._kernels as kernels

    params = Params(binary=binary, use_idf=True, ma_query=3)
    db = make_images(30, 20, 40, seed=61, centroids=centroids40)
    queries = make_images(9, 20, 40, seed=62, centroids=centroids40)
    book = Codebook(centroids40)
    serial = Index(book, params)
    serial.add(db)
    expected = serial.search(queries, k=7), similarity_matrix(book, db, params=params, chunk=7)
    # Force every kernel onto its parallel path, whatever the machine's thread count.
    monkeypatch.setattr(kernels, "MIN_PARALLEL_PAIRS", 0)
    monkeypatch.setattr(kernels, "MIN_PARALLEL_ENTRIES", 0)
    parallel = Index(book, params)
    parallel.add(db)
    np.testing.assert_array_equal(parallel.inverted_file.data, serial.inverted_file.data)
    got = parallel.search(queries, k=7), similarity_matrix(book, db, params=params, chunk=7)
    for a, b in zip(got[0], expected[0]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("binary,use_idf,tau", [(True, False, 0.0), (True, True, -0.5), (False, True, 0.2)])
@pytest.mark.parametrize("tile_bytes", [8, 3 * 8 * 14, 1 << 23])
@pytest.mark.parametrize("fixture", ["centroids40", "centroids100"])
def test_word_major_kernel_equals_query_major_and_twin(request, monkeypatch, fixture, binary, use_idf, tau, tile_bytes):
    # D = 100 takes the kernel's two-code-word group loop, D = 40 its row-by-row loop.
    # tile_bytes sets the queries per block: 1, 3 (blocks not dividing 11 queries), all.
    import asmkit._kernels as kernels
    from asmkit import search

    centroids = request.getfixturevalue(fixture)
    dim = centroids.shape[1]
    monkeypatch.setattr(search, "TILE_BYTES", tile_bytes)
    # Parallel blocks too, whatever the machine's thread count.
    monkeypatch.setattr(kernels, "MIN_PARALLEL_ENTRIES", 0)
    params = Params(binary=binary, use_idf=use_idf, tau=tau, ma_database=1, ma_query=3)
    db_images = make_images(14, 12, dim, seed=91, centroids=centroids)
    q_images = make_images(11, 12, dim, seed=92, centroids=centroids, empty=(5,))
    index = Index(Codebook(centroids), params)
    index.add(db_images)
    # Every query in one call, so that the kernels see all 11 queries at once.
    queries = aggregate_images(index.codebook, q_images, None, params, side="query")
    database = index.database
    args = (database.ivf, database.idf, database.sqrt_norms, database.ids, queries, params)
    got = {}
    for order in ("query", "word"):
        dense = np.zeros((11, 14), dtype=np.float32)
        search.score_aggregates(*args, dim=dim, dense_out=dense, order=order)
        got[order] = dense, search.score_aggregates(*args, dim=dim, k=4, order=order)
    # Same float64 additions in the same order: bit-identical, dense and top-k.
    np.testing.assert_array_equal(got["word"][0], got["query"][0])
    np.testing.assert_array_equal(got["word"][1][0], got["query"][1][0])
    np.testing.assert_array_equal(got["word"][1][1], got["query"][1][1])
    twin = ref.Database(list(enumerate(db_images)), centroids, binary=binary, use_idf=use_idf)
    for q, qvecs in enumerate(q_images):
        expected = twin.score(qvecs, m=3, alpha=3.0, tau=tau)
        np.testing.assert_allclose(got["word"][0][q], [expected[i] for i in range(14)], rtol=0, atol=1e-6)
    assert np.all(got["word"][0][5] == 0)


def test_score_order_is_validated(centroids40):
    images = make_images(3, 5, 40, seed=3, centroids=centroids40)
    with pytest.raises(ValueError, match="order"):
        similarity_matrix(Codebook(centroids40), images, order="random")


@pytest.mark.parametrize("binary,use_idf,tau", [(True, False, 0.0), (True, True, -0.5), (False, True, 0.2)])
@pytest.mark.parametrize("fixture", ["centroids40", "centroids100"])
def test_slot_split_kernel_equals_query_major_and_twin(request, monkeypatch, fixture, binary, use_idf, tau):
    import asmkit._kernels as kernels
    from asmkit import search

    centroids = request.getfixturevalue(fixture)
    dim = centroids.shape[1]
    monkeypatch.setattr(kernels, "MIN_PARALLEL_ENTRIES", 0)
    params = Params(binary=binary, use_idf=use_idf, tau=tau, ma_database=1, ma_query=3)
    db_images = make_images(14, 12, dim, seed=93, centroids=centroids)
    q_images = make_images(3, 12, dim, seed=94, centroids=centroids, empty=(1,))
    index = Index(Codebook(centroids), params)
    index.add(db_images)
    queries = aggregate_images(index.codebook, q_images, None, params, side="query")
    database = index.database
    assert database.ivf.slots_ascend
    args = (database.ivf, database.idf, database.sqrt_norms, database.ids, queries, params)
    got = {}
    for order in ("query", "slots"):
        dense = np.zeros((3, 14), dtype=np.float32)
        search.score_aggregates(*args, dim=dim, dense_out=dense, order=order)
        got[order] = dense, search.score_aggregates(*args, dim=dim, k=5, order=order)
    np.testing.assert_array_equal(got["slots"][0], got["query"][0])
    np.testing.assert_array_equal(got["slots"][1][0], got["query"][1][0])
    np.testing.assert_array_equal(got["slots"][1][1], got["query"][1][1])
    twin = ref.Database(list(enumerate(db_images)), centroids, binary=binary, use_idf=use_idf)
    for q, qvecs in enumerate(q_images):
        expected = twin.score(qvecs, m=3, alpha=3.0, tau=tau)
        np.testing.assert_allclose(got["slots"][0][q], [expected[i] for i in range(14)], rtol=0, atol=1e-6)
    assert np.all(got["slots"][0][1] == 0)
    # Any number of parts, more than the slots included: the parts' top-k merge exactly.
    sigma = np.nan_to_num(kernels.sigma_table(32 * -(-dim // 32), 3.0, True, np.float32(tau)), nan=0.0)
    codes, real = (
        (database.ivf.data, np.empty((0, 0), np.float32))
        if binary
        else (np.empty((0, 0), np.uint64), database.ivf.data)
    )
    q_codes, q_real = (
        (queries.data, np.empty((0, 0), np.float32)) if binary else (np.empty((0, 0), np.uint64), queries.data)
    )
    for n_parts in (1, 3, 20):
        for k in (1, 5, 14):
            scores = np.full((3, k), -np.inf, dtype=np.float32)
            ids = np.full((3, k), -1, dtype=np.int64)
            kernels.search_kernel_slots(
                queries.offsets,
                queries.words,
                q_codes,
                q_real,
                database.ivf.offsets,
                database.ivf.slots,
                codes,
                real,
                database.idf,
                1.0 / database.sqrt_norms,
                database.ids,
                binary,
                sigma,
                3.0,
                True,
                np.float32(tau),
                k,
                False,
                n_parts,
                scores,
                ids,
            )
            expected_scores, expected_ids = search.score_aggregates(*args, dim=dim, k=k, order="query")
            np.testing.assert_array_equal(scores, expected_scores)
            np.testing.assert_array_equal(ids, expected_ids)


def test_slot_split_needs_ascending_slots(monkeypatch, centroids40):
    import asmkit._kernels as kernels
    from asmkit import search

    monkeypatch.setattr(kernels, "MIN_PARALLEL_ENTRIES", 0)
    params = Params(ma_query=3)
    db_images = make_images(10, 12, 40, seed=95, centroids=centroids40)
    q_images = make_images(1, 12, 40, seed=96, centroids=centroids40)
    index = Index(Codebook(centroids40), params)
    # Ids below the index's last one renumber the slots: lists no longer ascend.
    index.add(db_images[5:], np.arange(5, 10))
    index.add(db_images[:5], np.arange(5))
    database = index.database
    assert not database.ivf.slots_ascend
    queries = aggregate_images(index.codebook, q_images, None, params, side="query")
    args = (database.ivf, database.idf, database.sqrt_norms, database.ids, queries, params)
    with pytest.raises(ValueError, match="slots"):
        search.score_aggregates(*args, dim=40, k=3, order="slots")
    auto = search.score_aggregates(*args, dim=40, k=3)
    query = search.score_aggregates(*args, dim=40, k=3, order="query")
    np.testing.assert_array_equal(auto[0], query[0])
    np.testing.assert_array_equal(auto[1], query[1])


def test_every_kernel_releases_the_gil():
    # The service parses requests and verification matches candidates in threads while a
    # kernel runs; a kernel holding the GIL would serialise them.
    from numba.core.registry import CPUDispatcher

    from asmkit import _kernels

    dispatchers = {name: obj for name, obj in vars(_kernels).items() if isinstance(obj, CPUDispatcher)}
    assert {"search_kernel", "aggregate_fill", "word_matches", "pruned_nearest"} <= set(dispatchers)
    assert [name for name, obj in dispatchers.items() if not obj.targetoptions.get("nogil")] == []
