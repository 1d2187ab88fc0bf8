"""Float32 ties made on purpose: the words, and so the scores and ranks, do not depend on
how the descriptors are batched.

Rows half-way between two words are tied within float32 rounding: the word faiss returns
for them depends on the call (a direct loop for small batches, BLAS blocks above, whose
rounding depends on a row's offset, the block's size and the thread count). asmkit gives
such rows the words of faiss's direct loop, which depend on the row alone (and are the
reference's for query images of fewer than 1000 rows), so one call, a call per image,
blocks of any size and any thread count give the same words, and every query path the
same scores.
"""

import numba
import numpy as np
import pytest

import asmkit.codebook as codebook
from asmkit import Codebook, Index, Params, search, similarity_matrix
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


def _direct_words(centroids, vecs, m):
    """faiss's words through its direct loop: batches of fewer than 1000 rows at D = 128."""
    return _faiss_words(centroids, vecs, m, np.append(np.arange(0, len(vecs), 500), len(vecs)))


def _faiss_words(centroids, vecs, m, segments):
    """faiss's words, called once per segment."""
    flat = faiss.IndexFlatL2(centroids.shape[1])
    flat.add(centroids)
    return np.concatenate([flat.search(vecs[s:e], m)[1] for s, e in zip(segments[:-1], segments[1:])])


def _assert_same_words(words, expected, nearest_first=True):
    """The set of words per row equal, and with ``nearest_first`` column 0 too (all that
    ASMK uses)."""
    np.testing.assert_array_equal(np.sort(words, axis=1), np.sort(expected, axis=1))
    if nearest_first:
        np.testing.assert_array_equal(words[:, 0], expected[:, 0])


def _ranks(dense):
    """Ids by decreasing score, ties by ascending id (the engine's order)."""
    return np.lexsort((np.broadcast_to(np.arange(dense.shape[1]), dense.shape), -dense), axis=1)


@pytest.mark.parametrize("ma_query", [1, 3])
def test_tied_rows_get_the_direct_loop_words(tied, ma_query):
    centroids, vecs, _ = tied
    book = Codebook(centroids)
    expected = _direct_words(centroids, vecs, ma_query)
    # The ties are real: faiss's words depend on its calls. For the images of fewer than
    # 1000 rows the direct loop's words are the reference's (one faiss call per image).
    one_call = _faiss_words(centroids, vecs, ma_query, [0, len(vecs)])
    per_image = _faiss_words(centroids, vecs, ma_query, _segments())
    assert np.any(np.sort(one_call, axis=1) != np.sort(per_image, axis=1))
    starts = _segments()
    small = np.concatenate([np.arange(s, e) for s, e in zip(starts[:-1], starts[1:]) if e - s < 1000])
    _assert_same_words(expected[small], per_image[small], nearest_first=False)
    assignment = book.assign(vecs, ma_query, segments=_segments(), nearest_first=False)
    assert assignment.tied.size
    words = assignment.settle()
    assert assignment.tied.size == 0
    _assert_same_words(words, expected, nearest_first=False)
    # The same rows settled later, joined with another call's (as the query path does).
    again = book.assign(vecs, ma_query, segments=_segments(), nearest_first=False)
    parts = [again.tied_part(), book.assign(vecs[:40], ma_query, nearest_first=False).tied_part()]
    settled = type(again).concatenate(parts).settle()[: parts[0].words.shape[0]]
    _assert_same_words(settled, expected[again.tied], nearest_first=False)


@pytest.mark.parametrize("prune", [True, False])
def test_words_do_not_depend_on_batches_or_threads(tied, prune, monkeypatch):
    # One call, one call per image, blocks of several sizes, one or two threads (faiss's
    # and numba's), with the pruned search or faiss's exhaustive one.
    centroids, vecs, _ = tied
    book = Codebook(centroids)
    book.prune = prune
    starts = _segments()
    for m, nearest_first in ((1, True), (3, True), (3, False)):
        expected = _direct_words(centroids, vecs, m)
        runs = {"one call": book.quantize(vecs, m, nearest_first=nearest_first)}
        runs["per image"] = np.concatenate(
            [book.quantize(vecs[s:e], m, nearest_first=nearest_first) for s, e in zip(starts[:-1], starts[1:])]
        )
        runs["image segments"] = book.quantize(vecs, m, segments=starts, nearest_first=nearest_first)
        for rows in (700, 4096):
            monkeypatch.setattr(codebook, "QUANTIZE_ROWS", rows)
            runs[f"blocks of {rows}"] = book.quantize(vecs, m, nearest_first=nearest_first)
        monkeypatch.undo()
        threads = numba.get_num_threads(), faiss.omp_get_max_threads()
        for n in (1, 2):
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
            faiss.omp_set_num_threads(n)
            try:
                runs[f"{n} threads"] = book.quantize(vecs, m, segments=starts, nearest_first=nearest_first)
            finally:
                numba.set_num_threads(threads[0])
                faiss.omp_set_num_threads(threads[1])
        for name, words in runs.items():
            try:
                _assert_same_words(words, expected, nearest_first)
            except AssertionError as error:
                raise AssertionError(f"m={m}, nearest_first={nearest_first}, {name}") from error


@pytest.mark.parametrize("ma_query", [1, 3])
def test_every_query_path_gives_the_same_scores(tied, ma_query, monkeypatch):
    centroids, vecs, labels = tied
    params = Params(binary=True, use_idf=True, ma_database=1, ma_query=ma_query)
    book = Codebook(centroids)
    index = Index(book, params)
    index.add(vecs, labels)
    n = len(SIZES)

    # The expected scores: the database and the queries aggregated from the direct loop's
    # words.
    expected_index = Index(book, params)
    desc = prepare_descriptors(vecs, labels)
    expected_index.add_aggregates(
        aggregate(vecs, _direct_words(centroids, vecs, 1), desc.starts, desc.order, centroids, binary=True),
        np.arange(n),
    )
    queries = aggregate(vecs, _direct_words(centroids, vecs, ma_query), desc.starts, desc.order, centroids, binary=True)
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
    # The database built from two batches of images (as Ray workers send them).
    halves = Index(book, params)
    half = 3
    for part in (labels < half, labels >= half):
        halves.add_aggregates(aggregate_images(book, vecs[part], labels[part], params), np.unique(labels[part]))
    got["database in two batches"] = halves.similarity_matrix(vecs, labels)
    for name, dense in got.items():
        np.testing.assert_array_equal(dense, expected, err_msg=name)
    scores, ids = index.search(vecs, labels, k=None)
    np.testing.assert_array_equal(ids, _ranks(expected))
    np.testing.assert_array_equal(scores, np.take_along_axis(expected, ids, axis=1))


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
