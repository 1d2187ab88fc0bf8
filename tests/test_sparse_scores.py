"""Sparse all-vs-all scores (each row's K best) give the same pair graphs as the dense matrix."""

from __future__ import annotations

import numpy as np
import pytest

from asmkit._validation import ArgumentError, FileFormatError
from asmkit.pairs import SparseScores, pair_indices, pairs_from_scores, select_anchors

from .test_pairs import random_scores

GRAPHS = [
    "knn-1",
    "knn-5",
    "retrieval-4-3",
    "retrieval-1-0",
    "retrieval-0-2",
    "sequential-2",
    "sequential-2+retrieval-3",
    "complete",
]


def sparse_of(s, k, block=7):
    return SparseScores.from_blocks(((b, s[b : b + block]) for b in range(0, len(s), block)), len(s), k)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("graph", GRAPHS)
def test_sparse_graphs_equal_dense(graph, seed):
    s = random_scores(23, seed)
    # Exact ties, which the top-k must break as the dense path does (lower index first).
    s[3, 10] = s[3, 11] = s[3, 12] = s[3].max()
    sparse = sparse_of(s, 5)
    dense_pairs = pair_indices(s, graph)
    assert np.array_equal(pair_indices(sparse, graph, anchor_row=lambda a: s[a]), dense_pairs)
    assert np.array_equal(select_anchors(sparse, 4, anchor_row=lambda a: s[a]), select_anchors(s, 4))


def test_anchors_score_only_the_anchor_rows():
    s = random_scores(30, 3)
    asked = []

    def row(a):
        asked.append(a)
        return s[a]

    anchors = select_anchors(SparseScores.from_dense(s, 2), 6, anchor_row=row)
    assert asked == anchors.tolist()


def test_top_k_rows_match_a_dense_sort_and_exclude_self():
    s = random_scores(17, 4)
    np.fill_diagonal(s, 5.0)
    sparse = sparse_of(s, 4, block=5)
    for i in range(17):
        order = sorted((j for j in range(17) if j != i), key=lambda j: (-float(s[i, j]), j))[:4]
        assert sparse.ids[i].tolist() == order
        assert np.array_equal(sparse.scores[i], s[i, order])
    with pytest.raises(ArgumentError, match="keep 4"):
        pair_indices(sparse, "knn-5")


def test_save_load_round_trip(tmp_path):
    s = random_scores(9, 5)
    sparse = SparseScores.from_dense(s, 3)
    names = [f"im{i}.jpg" for i in range(9)]
    path = sparse.save(tmp_path / "s.npz", names)
    with np.load(path, allow_pickle=False) as data:
        assert data["rows"].tolist() == np.repeat(np.arange(9), 3).tolist()
        assert data["names"].dtype.kind == "U"
    back, back_names = SparseScores.load(path)
    assert back_names == names
    assert np.array_equal(back.ids, sparse.ids) and np.array_equal(back.scores, sparse.scores)
    assert np.array_equal(back.centrality, sparse.centrality)
    assert pairs_from_scores(back, names, "knn-3") == pairs_from_scores(s, names, "knn-3")
    assert not [p for p in tmp_path.iterdir() if p.name != "s.npz"]


def test_tiny_sets_pad_rows():
    s = random_scores(3, 6)
    sparse = SparseScores.from_dense(s, 10)
    assert sparse.k == 2
    assert np.array_equal(pair_indices(sparse, "knn-10"), pair_indices(s, "knn-10"))


def test_bad_files(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(
        path,
        rows=np.zeros(2, np.int64),
        cols=np.array([0, 9]),
        scores=np.ones(2, np.float32),
        names=np.array(["a", "b"]),
        k=np.array(2),
    )
    with pytest.raises(FileFormatError, match="out of range"):
        SparseScores.load(path)
    np.savez(path, rows=np.zeros(2, np.int64), cols=np.ones(2, np.int64), scores=np.ones(2, np.float32))
    with pytest.raises(FileFormatError, match="names"):
        SparseScores.load(path)
