"""Tests for asmkit.pairs: scene graphs against plain-loop references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from asmkit.pairs import (
    GraphSpec,
    pair_indices,
    pairs_from_scores,
    parse_graph,
    select_anchors,
    write_pairs,
)


def random_scores(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    # a little asymmetry, as ASMK scores with different query/database assignment have
    return (s + 0.01 * rng.normal(size=s.shape)).astype(np.float32)


# ----------------------------------------------------------------- plain-loop references


def loop_knn(s, k):
    n = len(s)
    out = set()
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: (-float(s[i, j]), j))
        for j in others[:k]:
            out.add((min(i, j), max(i, j)))
    return out


def loop_anchors(s, na):
    # Centrality averages rows and columns; the farthest point is judged by the anchors'
    # rows alone (anchor = query), so that a sparse run scores only the anchors.
    n = len(s)
    sym = [[(float(s[i, j]) + float(s[j, i])) / 2 for j in range(n)] for i in range(n)]
    central = [sum(sym[i][j] for j in range(n) if j != i) for i in range(n)]
    anchors = [max(range(n), key=lambda i: central[i])] if na > 0 else []
    while len(anchors) < min(na, n):
        rest = [i for i in range(n) if i not in anchors]
        anchors.append(min(rest, key=lambda i: max(float(s[a, i]) for a in anchors)))
    return anchors


def loop_retrieval(s, na, k):
    anchors = loop_anchors(s, na)
    out = {(min(a, b), max(a, b)) for a, b in itertools.combinations(anchors, 2)}
    for i in range(len(s)):
        if not anchors or i in anchors:
            continue
        a = max(anchors, key=lambda a: float(s[a, i]))
        out.add((min(i, a), max(i, a)))
    return out | loop_knn(s, k)


def as_set(idx):
    return {tuple(p) for p in idx.tolist()}


# ----------------------------------------------------------------- parsing


def test_parse_graph():
    assert parse_graph("knn-5") == GraphSpec("knn", k=5)
    assert parse_graph("retrieval-20-10") == GraphSpec("retrieval", k=10, n_anchors=20)
    assert parse_graph("sequential-3+retrieval-4") == GraphSpec("sequential", k=4, window=3)
    assert parse_graph("sequential-2") == GraphSpec("sequential", window=2)
    assert parse_graph("complete") == GraphSpec("complete")
    for text in ("knn-5", "retrieval-20-10", "sequential-3+retrieval-4", "sequential-2", "complete"):
        assert str(parse_graph(text)) == text
    for bad in ("knn", "knn-0", "retrieval-3", "swin-3", "sequential-0", "retrieval-0-0", 5):
        with pytest.raises(ValueError, match="graph"):
            parse_graph(bad)


# ----------------------------------------------------------------- graphs


@pytest.mark.parametrize("seed", range(3))
def test_knn_matches_loop(seed):
    s = random_scores(15, seed)
    for k in (1, 3, 20):
        assert as_set(pair_indices(s, f"knn-{k}")) == loop_knn(s, k)


@pytest.mark.parametrize("seed", range(3))
def test_retrieval_matches_loop(seed):
    s = random_scores(20, seed)
    for na, k in ((4, 2), (1, 1), (25, 0), (0, 3)):
        got = as_set(pair_indices(s, GraphSpec("retrieval", k=k, n_anchors=na)))
        assert got == loop_retrieval(s, na, k), (na, k)
    assert select_anchors(s, 5).tolist() == loop_anchors(s, 5)


def test_complete_and_sequential():
    s = random_scores(6)
    assert as_set(pair_indices(s, "complete")) == set(itertools.combinations(range(6), 2))
    seq = as_set(pair_indices(s, "sequential-2"))
    assert seq == {(i, j) for i in range(6) for j in range(i + 1, min(i + 3, 6))}
    both = as_set(pair_indices(s, "sequential-2+retrieval-2"))
    assert both == seq | loop_knn(s, 2)
    assert as_set(pair_indices(s, "sequential-50")) == set(itertools.combinations(range(6), 2))


def test_pairs_are_canonical_sorted_and_deterministic():
    s = random_scores(30, 1)
    for graph in ("knn-4", "retrieval-5-3", "sequential-2+retrieval-3", "complete"):
        idx = pair_indices(s, graph)
        assert idx.dtype == np.int64 and idx.shape[1] == 2
        assert np.all(idx[:, 0] < idx[:, 1])  # no self pairs, (a, b) == (b, a) once
        as_tuples = [tuple(p) for p in idx.tolist()]
        assert as_tuples == sorted(set(as_tuples))
        assert np.array_equal(idx, pair_indices(s.copy(), graph))


def test_ties_break_towards_lower_index():
    s = np.zeros((5, 5), dtype=np.float32)
    # every image's nearest other image is 0 (image 0's is 1)
    assert as_set(pair_indices(s, "knn-1")) == {(0, 1), (0, 2), (0, 3), (0, 4)}
    assert as_set(pair_indices(s, "knn-2")) == {(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (0, 4), (1, 4)}


def test_tiny_inputs():
    assert pair_indices(np.ones((1, 1)), "retrieval-3-2").shape == (0, 2)
    assert pair_indices(np.ones((0, 0)), "knn-2").shape == (0, 2)
    assert as_set(pair_indices(np.ones((2, 2)), "knn-5")) == {(0, 1)}


# ----------------------------------------------------------------- regressions (MASt3R)


def test_self_is_never_a_neighbour_and_k_others_are_kept():
    # With self-similarity the largest score, an argsort over the row returns the image
    # itself first; taking the first k then yields only k - 1 real neighbours.
    s = random_scores(8, 3)
    np.fill_diagonal(s, 10.0)
    nn_pairs = pair_indices(s, "knn-2")
    degree = np.bincount(nn_pairs.ravel(), minlength=8)
    assert np.all(degree >= 2)
    # ...and a self-score lower than everything must not matter either
    np.fill_diagonal(s, -10.0)
    assert np.array_equal(pair_indices(s, "knn-2"), nn_pairs)


def test_non_anchor_links_to_its_nearest_anchor_not_farthest():
    # naver/mast3r issue #55: non-key images were joined to the *most distant* key image
    # (argmax on a distance matrix). Two tight clusters {0, 1, 2} and {3, 4, 5}.
    s = np.full((6, 6), 0.1, dtype=np.float32)
    s[:3, :3] = 0.9
    s[3:, 3:] = 0.8
    np.fill_diagonal(s, 1.0)
    anchors = select_anchors(s, 2)
    assert {int(anchors[0]) // 3, int(anchors[1]) // 3} == {0, 1}  # one per cluster
    pairs = as_set(pair_indices(s, "retrieval-2-0"))
    for i in range(6):
        if i in anchors:
            continue
        linked = {a for a in anchors.tolist() if (min(i, a), max(i, a)) in pairs}
        assert linked == {a for a in anchors.tolist() if a // 3 == i // 3}


def test_names_follow_matrix_order_not_sort_order():
    # The matrix is in list order; mapping indices through sorted names would pair the
    # wrong images. 'zeta' and 'alpha' are the similar pair.
    names = ["zeta", "mid", "alpha"]
    s = np.array([[1.0, 0.1, 0.9], [0.1, 1.0, 0.2], [0.9, 0.2, 1.0]])
    assert pairs_from_scores(s, names, "knn-1") == [("zeta", "alpha"), ("mid", "alpha")]


@pytest.mark.parametrize("graph", ["knn-3", "retrieval-4-2", "complete"])
def test_permuting_images_permutes_pairs(graph):
    s = random_scores(16, 7)
    names = [f"img{i:02d}.jpg" for i in range(16)]
    perm = np.random.default_rng(0).permutation(16)
    before = {frozenset(p) for p in pairs_from_scores(s, names, graph)}
    after = pairs_from_scores(s[np.ix_(perm, perm)], [names[p] for p in perm], graph)
    assert {frozenset(p) for p in after} == before


# ----------------------------------------------------------------- validation and I/O


def test_validation_errors():
    s = random_scores(4)
    names = list("abcd")
    with pytest.raises(ValueError, match="scores: expected a square"):
        pairs_from_scores(s[:3], names, "knn-1")
    with pytest.raises(ValueError, match="names: 3 names"):
        pairs_from_scores(s, names[:3], "knn-1")
    with pytest.raises(ValueError, match="names: image names must be unique"):
        pairs_from_scores(s, list("abca"), "knn-1")
    bad = s.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="scores: .*NaN"):
        pairs_from_scores(bad, names, "knn-1")
    with pytest.raises(ValueError, match="graph: unknown"):
        pairs_from_scores(s, names, "star-3")


def test_write_pairs(tmp_path):
    s = random_scores(6)
    names = [f"dir/img{i}.jpg" for i in range(6)]
    out = tmp_path / "sub" / "pairs.txt"
    pairs = pairs_from_scores(s, names, "knn-2")
    write_pairs(out, pairs)
    lines = out.read_text().splitlines()
    assert [tuple(line.split(" ")) for line in lines] == pairs
    assert not [p for p in out.parent.iterdir() if p.name != "pairs.txt"]  # no temp left
    with pytest.raises(ValueError, match="whitespace"):
        write_pairs(tmp_path / "bad.txt", [("a b", "c")])
    assert not (tmp_path / "bad.txt").exists()
