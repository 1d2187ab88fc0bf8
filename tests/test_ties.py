"""Float32 ties made on purpose: every query path gives the same words, scores and ranks.

Rows half-way between two words are tied within float32 rounding: the word faiss returns
for them depends on the batch it is called on (a direct loop for images below its BLAS
threshold, BLAS blocks above, whose rounding depends on a row's offset). The reference
quantizes its database in one faiss call and each query image in its own call; every
asmkit path must give those words, hence the reference's scores and ranks.
"""

import numpy as np
import pytest

from asmkit import Codebook, Index, Params, codebook, quantizer, search, similarity_matrix
from asmkit._kernels import faiss_threads
from asmkit.kernel import aggregate, aggregate_images, prepare_descriptors

faiss = pytest.importorskip("faiss")

#: Query images of faiss's direct loop (< 1000 rows at D = 128) and of BLAS (>= 1000).
SIZES = [1200, 300, 1000, 40, 500, 1500]


@pytest.fixture(scope="module")
def tied():
    rng = np.random.default_rng(81)
    basis, _ = np.linalg.qr(rng.standard_normal((128, 128)))
    # Energy falling off along the principal axes, as local descriptors': the pruned
    # quantizer takes these.
    spread = 0.85 ** np.arange(128)
    centroids = ((rng.standard_normal((600, 128)) * spread) @ basis.T).astype(np.float32)
    vecs = ((rng.standard_normal((sum(SIZES), 128)) * spread) @ basis.T).astype(np.float32)
    near = rng.choice(len(vecs), 1200, replace=False)
    a, b = rng.integers(0, 600, 1200), rng.integers(0, 600, 1200)
    vecs[near] = 0.5 * (centroids[a] + centroids[b])
    labels = np.repeat(np.arange(len(SIZES)), SIZES)
    return centroids, vecs, labels


def _segments():
    return np.concatenate([[0], np.cumsum(SIZES)])


def _faiss_query_words(centroids, vecs, m):
    """The reference's query words: faiss called once per image."""
    flat = faiss.IndexFlatL2(128)
    flat.add(centroids)
    starts = _segments()
    return np.concatenate([flat.search(vecs[s:e], m)[1] for s, e in zip(starts[:-1], starts[1:])])


@pytest.fixture
def faiss_threads_restored():
    """The settling's thread count restored after the test (faiss's own: conftest)."""
    settle = quantizer.settle_threads()
    yield
    quantizer.set_settle_threads(settle)


def _faiss_words(centroids, vecs, m, threads, segments):
    """faiss's words called once per segment on ``threads`` OpenMP threads."""
    flat = faiss.IndexFlatL2(128)
    flat.add(centroids)
    with faiss_threads(threads):
        return np.concatenate([flat.search(vecs[s:e], m)[1] for s, e in zip(segments[:-1], segments[1:])])


@pytest.mark.parametrize("settle", [1, 2])
def test_words_depend_on_the_settle_threads_alone(tied, settle, monkeypatch, faiss_threads_restored):
    # The reference run on ``settle`` threads; asmkit with the segments in blocks of one
    # image, of several and of all, called on one or two faiss threads, pruned or not.
    centroids, vecs, _ = tied
    quantizer.set_settle_threads(settle)
    one_call = np.array([0, len(vecs)])
    expected_query = _faiss_words(centroids, vecs, 3, settle, _segments())
    expected_nearest = _faiss_words(centroids, vecs, 1, settle, _segments())
    expected_database = _faiss_words(centroids, vecs, 1, settle, one_call)
    for caller in (1, 2):
        faiss.omp_set_num_threads(caller)
        for rows in (700, 4096, codebook.QUANTIZE_ROWS):
            monkeypatch.setattr(codebook, "QUANTIZE_ROWS", rows)
            for prune in (True, False):
                book = Codebook(centroids)
                book.prune = prune
                case = f"caller threads {caller}, block rows {rows}, prune {prune}"
                query = book.quantize(vecs, 3, segments=_segments(), nearest_first=False)
                np.testing.assert_array_equal(np.sort(query, axis=1), np.sort(expected_query, axis=1), err_msg=case)
                nearest = book.quantize(vecs, 1, segments=_segments())
                np.testing.assert_array_equal(nearest, expected_nearest, err_msg=case)
                database = book.quantize(vecs, 1, segments=one_call)
                np.testing.assert_array_equal(database, expected_database, err_msg=case)


def test_settle_threads_are_checked():
    with pytest.raises(ValueError, match="threads"):
        quantizer.set_settle_threads(0)


def _ranks(dense):
    """Ids by decreasing score, ties by ascending id (the engine's order)."""
    return np.lexsort((np.broadcast_to(np.arange(dense.shape[1]), dense.shape), -dense), axis=1)


@pytest.mark.parametrize("ma_query", [1, 3])
def test_tied_rows_get_the_reference_words(tied, ma_query):
    centroids, vecs, _ = tied
    book = Codebook(centroids)
    expected = _faiss_query_words(centroids, vecs, ma_query)
    assignment = book.assign(vecs, ma_query, segments=_segments(), nearest_first=False)
    # The ties are real: some provisional words are not the reference's.
    assert assignment.tied.size
    differ = np.any(np.sort(assignment.words, axis=1) != np.sort(expected, axis=1), axis=1)
    assert differ.any() and set(np.flatnonzero(differ)) <= set(assignment.tied.tolist())
    words = assignment.settle()
    assert assignment.tied.size == 0
    np.testing.assert_array_equal(np.sort(words, axis=1), np.sort(expected, axis=1))
    # The same rows settled later, joined with another call's (as the query path does).
    again = book.assign(vecs, ma_query, segments=_segments(), nearest_first=False)
    parts = [again.tied_part(), book.assign(vecs[:40], ma_query, nearest_first=False).tied_part()]
    joined = type(again).concatenate(parts)
    settled = joined.settle()[: parts[0].words.shape[0]]
    np.testing.assert_array_equal(np.sort(settled, axis=1), np.sort(expected[again.tied], axis=1))


@pytest.mark.parametrize("ma_query", [1, 3])
def test_every_query_path_gives_the_same_scores(tied, ma_query, monkeypatch):
    centroids, vecs, labels = tied
    params = Params(binary=True, use_idf=True, ma_database=1, ma_query=ma_query)
    book = Codebook(centroids)
    index = Index(book, params)
    index.add(vecs, labels)
    n = len(SIZES)

    # The expected scores: the database and the queries aggregated from faiss's words.
    flat = faiss.IndexFlatL2(128)
    flat.add(centroids)
    expected_index = Index(book, params)
    database_words = flat.search(vecs, 1)[1]
    desc = prepare_descriptors(vecs, labels)
    expected_index.add_aggregates(
        aggregate(vecs, database_words, desc.starts, desc.order, centroids, binary=True), np.arange(n)
    )
    queries = aggregate(
        vecs, _faiss_query_words(centroids, vecs, ma_query), desc.starts, desc.order, centroids, binary=True
    )
    db = expected_index.database
    expected = np.zeros((n, n), np.float32)
    search.score_aggregates(db.ivf, db.idf, db.sqrt_norms, db.ids, queries, params, dim=128, dense_out=expected)

    got = {
        "Index.similarity_matrix": index.similarity_matrix(vecs, labels),
        "search.similarity_matrix": similarity_matrix(book, vecs, labels, params),
        "one image per chunk": search.score_queries(
            book, desc, index.database, params, dense_out=np.zeros((n, n), np.float32), chunk_images=1
        ),
    }
    # Tied rows settled in many small batches.
    monkeypatch.setattr(search, "TIED_BATCH_ROWS", 7)
    got["small settling batches"] = search.score_queries(
        book, desc, index.database, params, dense_out=np.zeros((n, n), np.float32), chunk_rows=600
    )
    query_aggregates = aggregate_images(book, vecs, labels, params, side="query")
    got["aggregate_images"] = np.zeros((n, n), np.float32)
    search.score_aggregates(
        index.inverted_file,
        index.idf,
        index.database.sqrt_norms,
        index.ids,
        query_aggregates,
        params,
        dim=128,
        dense_out=got["aggregate_images"],
    )
    for name, dense in got.items():
        np.testing.assert_array_equal(dense, expected, err_msg=name)
    scores, ids = index.search(vecs, labels, k=None)
    np.testing.assert_array_equal(ids, _ranks(expected))
    np.testing.assert_array_equal(scores, np.take_along_axis(expected, ids, axis=1))


@pytest.mark.parametrize("ma_query", [1, 3])
def test_ranks_equal_the_reference_package(tied, ma_query):
    asmk = pytest.importorskip("asmk")
    from asmk import codebook as asmk_codebook
    from asmk import index as asmk_index

    centroids, vecs, labels = tied
    params = Params(binary=True, use_idf=True, ma_database=1, ma_query=ma_query)
    reference_book = asmk_codebook.Codebook(asmk_index.initialize_index(None), size=600)
    reference_book.index(centroids.copy())
    reference = asmk.ASMKMethod(params.to_reference(), {}, codebook=reference_book)
    reference = reference.build_ivf(vecs.copy(), labels.copy())
    _, images, ref_ranks, ref_scores = reference.query_ivf(vecs.copy(), labels.copy())

    index = Index(Codebook(centroids), params)
    index.add(vecs, labels)
    scores, ids = index.search(vecs, labels, k=None)
    np.testing.assert_array_equal(images, np.arange(len(SIZES)))
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6, rtol=0)
    # The reference orders equal scores by its own sort; compare ranks away from ties.
    full = np.zeros_like(ref_scores)
    np.put_along_axis(full, ref_ranks, ref_scores, axis=1)
    np.testing.assert_array_equal(ids, _ranks(full.astype(np.float32)))


@pytest.mark.parametrize("ma_database", [1, 2])
def test_similarity_matrix_equals_the_index_on_shuffled_rows(tied, ma_database):
    # Rows of the images interleaved: the database call meets a tied row at another offset
    # than its image's call does.
    centroids, vecs, labels = tied
    perm = np.random.default_rng(7).permutation(len(vecs))
    vecs, labels = vecs[perm], labels[perm]
    params = Params(binary=False, ma_database=ma_database, ma_query=3)
    book = Codebook(centroids)
    index = Index(book, params)
    index.add(vecs, labels)
    expected = index.similarity_matrix(vecs, labels)
    np.testing.assert_array_equal(similarity_matrix(book, vecs, labels, params), expected)
    _, ids = similarity_matrix(book, vecs, labels, params, k=4, chunk=2)
    np.testing.assert_array_equal(ids, _ranks(expected)[:, :4])
