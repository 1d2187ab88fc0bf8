"""Spatial verification: matching, robust fits, re-ranking, bad input."""

from __future__ import annotations

import json
import logging
import shutil

import cv2
import numpy as np
import pytest
from cli_json import run_json

from asmkit import Codebook
from asmkit._validation import ArgumentError
from asmkit.cli import main
from asmkit.geometry import GeometryStore, feature_words, sort_by_word
from asmkit.verify import (
    VerifyOptions,
    fit_model,
    mutual_nn_matches,
    rerank,
    word_matches,
)

H_TRUE = np.array([[0.9, 0.12, 40.0], [-0.08, 1.05, 25.0], [2e-4, -1e-4, 1.0]])
A_TRUE = np.array([[0.9, 0.12, 40.0], [-0.08, 1.05, 25.0], [0.0, 0.0, 1.0]])


def project(h: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return cv2.perspectiveTransform(xy[None].astype(np.float64), h)[0]


def homography_pair(rng, n_true=150, n_noise=300, n_words=4096, noise_px=0.5, h=H_TRUE):
    """Two images' (keypoints, words): n_true features related by h (same word each),
    n_noise features per image with random positions and words."""
    xy = rng.uniform(0, 640, (n_true, 2))
    words_true = rng.choice(n_words, n_true, replace=False)
    xy_b = project(h, xy) + rng.normal(0, noise_px, (n_true, 2))

    def image(xy_part):
        noise = rng.uniform(0, 640, (n_noise, 2))
        kp = np.zeros((n_true + n_noise, 4), np.float32)
        kp[:, :2] = np.concatenate([xy_part, noise])
        kp[:, 2] = 4.0
        words = np.concatenate([words_true, rng.integers(0, n_words, n_noise)])
        return kp, words

    return image(xy), image(xy_b)


# ------------------------------------------------------------------------------ matching


def numpy_word_matches(q_words, d_words, cap, q_sigs=None, d_sigs=None, max_hamming=0):
    """Plain-loop twin of asmkit._kernels.word_matches for one candidate."""
    out = []
    for w in np.intersect1d(q_words, d_words):
        found = 0
        for i in np.flatnonzero(q_words == w):
            for j in np.flatnonzero(d_words == w):
                bits = 0 if q_sigs is None else sum((int(a) ^ int(b)).bit_count() for a, b in zip(q_sigs[i], d_sigs[j]))
                if found < cap * cap and bits <= max_hamming:
                    out.append((i, j))
                    found += 1
    return np.array(out, dtype=np.int32).reshape(-1, 2)


@pytest.mark.parametrize("cap", [1, 2, 5])
def test_word_matches_equal_the_numpy_twin(cap):
    rng = np.random.default_rng(cap)
    q = np.sort(rng.integers(0, 50, 300)).astype(np.int32)
    d = np.sort(rng.integers(0, 50, 200)).astype(np.int32)
    got = word_matches(q, d, max_per_word=cap)
    np.testing.assert_array_equal(got, numpy_word_matches(q, d, cap))
    assert (q[got[:, 0]] == d[got[:, 1]]).all()
    q_sigs = rng.integers(0, 2**63, (300, 2), dtype=np.uint64)
    d_sigs = rng.integers(0, 2**63, (200, 2), dtype=np.uint64)
    got = word_matches(q, d, query_signatures=q_sigs, db_signatures=d_sigs, max_per_word=cap, max_hamming=60)
    np.testing.assert_array_equal(got, numpy_word_matches(q, d, cap, q_sigs, d_sigs, 60))
    assert got.shape[0] > 0
    assert word_matches(q, d, query_signatures=q_sigs, db_signatures=d_sigs, max_hamming=0).shape == (0, 2)


def test_signatures_keep_the_features_of_similar_descriptors():
    codebook = Codebook(np.eye(4, dtype=np.float32))
    base = np.array([[0.9, 0.1, 0.3, 0.2], [0.1, 0.8, 0.2, 0.3]], np.float32)
    near = base + 0.01
    far = np.array([[0.9, -0.1, -0.3, -0.2], [-0.1, 0.8, -0.2, -0.3]], np.float32)
    (w_q, w_near, w_far), (s_q, s_near, s_far) = feature_words(codebook, [base, near, far])
    np.testing.assert_array_equal(w_q, [0, 1])
    np.testing.assert_array_equal(w_near, w_q)
    np.testing.assert_array_equal(w_far, w_q)
    same = word_matches(w_q, w_near, query_signatures=s_q, db_signatures=s_near, max_hamming=0)
    np.testing.assert_array_equal(same, [[0, 0], [1, 1]])
    assert word_matches(w_q, w_far, query_signatures=s_q, db_signatures=s_far, max_hamming=1).shape == (0, 2)


def test_word_matches_cap_bounds_a_burst():
    q = np.zeros(40, np.int32)
    d = np.zeros(30, np.int32)
    assert word_matches(q, d, max_per_word=5).shape == (25, 2)


def test_word_matches_refuses_unsorted_words():
    with pytest.raises(ArgumentError, match="query_words"):
        word_matches(np.array([3, 1]), np.array([1, 3]))


def test_mutual_nn_matches_find_the_shuffled_copy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(100, 32)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    perm = rng.permutation(100)
    pairs = mutual_nn_matches(a, a[perm], ratio=0.9)
    assert pairs.shape == (100, 2)
    np.testing.assert_array_equal(perm[pairs[:, 1]], pairs[:, 0])


# ------------------------------------------------------------------------------ fitting


@pytest.mark.parametrize("model, truth", [("homography", H_TRUE), ("affine", A_TRUE)])
def test_known_model_gives_its_inliers_and_is_recovered(model, truth):
    rng = np.random.default_rng(1)
    (kp_a, w_a), (kp_b, w_b) = homography_pair(rng, h=truth)
    kp_a, w_a, _ = sort_by_word(kp_a, w_a)
    kp_b, w_b, _ = sort_by_word(kp_b, w_b)
    pairs = word_matches(w_a, w_b)
    fit = fit_model(kp_a[pairs[:, 0], :2], kp_b[pairs[:, 1], :2], model, threshold=3.0, pairs=pairs)
    assert 140 <= fit.inliers <= 160
    grid = np.stack(np.meshgrid(np.linspace(0, 640, 5), np.linspace(0, 640, 5)), -1).reshape(-1, 2)
    assert np.abs(project(fit.matrix, grid) - project(truth, grid)).max() < 2.0


def test_shuffled_correspondences_give_about_no_inliers():
    rng = np.random.default_rng(2)
    (kp_a, w_a), (kp_b, w_b) = homography_pair(rng)
    kp_b = kp_b[rng.permutation(len(kp_b))]
    kp_a, w_a, _ = sort_by_word(kp_a, w_a)
    kp_b, w_b, _ = sort_by_word(kp_b, w_b)
    pairs = word_matches(w_a, w_b)
    for model in ("homography", "affine"):
        fit = fit_model(kp_a[pairs[:, 0], :2], kp_b[pairs[:, 1], :2], model, threshold=3.0, pairs=pairs)
        assert fit.inliers <= 8


def test_fundamental_matrix_of_two_views():
    rng = np.random.default_rng(3)
    pts = np.c_[rng.uniform(-2, 2, (200, 2)), rng.uniform(4, 8, 200)]
    k = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    rot, _ = cv2.Rodrigues(np.array([0.0, 0.2, 0.05]))
    a = (k @ pts.T).T
    b = (k @ (rot @ pts.T + np.array([[1.0], [0.1], [0.2]]))).T
    xy_a, xy_b = a[:, :2] / a[:, 2:], b[:, :2] / b[:, 2:]
    fit = fit_model(xy_a, xy_b, "fundamental", threshold=1.0)
    assert fit.inliers >= 190

    def homog(p):
        return np.c_[p, np.ones(len(p))]

    residual = np.abs(np.sum(homog(xy_b) @ fit.matrix * homog(xy_a), axis=1))
    assert np.median(residual) < 1e-2


@pytest.mark.parametrize("model", ["homography", "affine", "similarity", "fundamental"])
def test_hard_geometry_gives_no_fit_and_no_error(model):
    rng = np.random.default_rng(4)
    few = rng.uniform(0, 100, (2, 2))
    line = np.c_[np.linspace(0, 100, 50), np.linspace(0, 50, 50)]
    same = np.ones((30, 2))
    for src, dst in ((few, few + 1), (line, line * 2 + 3), (same, same), (same, rng.uniform(0, 100, (30, 2)))):
        fit = fit_model(src, dst, model, threshold=2.0)
        assert fit.inliers == 0 or fit.matrix is not None
        assert fit.inliers <= max(3, src.shape[0])
    assert fit_model(few, few + 1, model).inliers == 0
    assert fit_model(same, same, model).inliers == 0


def test_fit_refuses_bad_shapes():
    with pytest.raises(ArgumentError, match="db_points"):
        fit_model(np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(ArgumentError, match="model"):
        fit_model(np.zeros((5, 2)), np.zeros((5, 2)), "projective")


# ------------------------------------------------------------------------------ re-ranking


def database(rng, n_images=30, relevant=(3, 11, 20)):
    """A store where `relevant` images are H_TRUE views of the query, the others noise."""
    (q_kp, q_w), (kp_b, w_b) = homography_pair(rng)
    store = GeometryStore()
    kps, words = [], []
    for i in range(n_images):
        if i in relevant:
            kps.append(kp_b)
            words.append(w_b)
        else:
            kps.append(rng.uniform(0, 640, (450, 4)).astype(np.float32))
            words.append(rng.integers(0, 4096, 450))
    store.add(np.arange(n_images), kps, words)
    return store, q_kp, q_w


def test_rerank_moves_verified_images_up_and_only_reorders_the_top():
    rng = np.random.default_rng(5)
    store, q_kp, q_w = database(rng)
    ids = rng.permutation(30)[None].astype(np.int64)
    scores = np.sort(rng.random(30))[::-1][None].astype(np.float32)
    out = rerank(store, [q_kp], [q_w], ids, scores, top=20, options=VerifyOptions(model="homography", threshold=3.0))
    top_before = set(ids[0, :20].tolist())
    assert set(out.ids[0, :20].tolist()) == top_before
    np.testing.assert_array_equal(out.ids[0, 20:], ids[0, 20:])
    relevant_in_top = [i for i in ids[0, :20] if i in (3, 11, 20)]
    assert out.ids[0, : len(relevant_in_top)].tolist() == sorted(
        relevant_in_top, key=lambda i: int(np.flatnonzero(ids[0] == i)[0])
    )
    assert (out.inliers[0, : len(relevant_in_top)] >= 140).all()
    assert (out.inliers[0, 20:] == -1).all()
    # Scores travel with their images.
    by_id = dict(zip(ids[0].tolist(), scores[0].tolist()))
    assert all(by_id[i] == s for i, s in zip(out.ids[0].tolist(), out.scores[0].tolist()))


def test_rerank_keeps_unverified_candidates_in_asmk_order_and_scores():
    rng = np.random.default_rng(6)
    store, q_kp, q_w = database(rng, relevant=())
    # A candidate with 2 features, one with collinear keypoints, one missing from the store.
    store.remove([5, 6])
    store.add([5], [np.zeros((2, 4), np.float32)], [q_w[:2]])
    line = np.zeros((100, 4), np.float32)
    line[:, 0] = np.arange(100)
    store.add([6], [line], [q_w[:100]])
    ids = np.array([[6, 5, 99, 0, 1, 2, -1]], np.int64)
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, -np.inf]], np.float32)
    out = rerank(store, [q_kp], [q_w], ids, scores, top=10, options=VerifyOptions(threads=2))
    np.testing.assert_array_equal(out.ids, ids)
    np.testing.assert_array_equal(out.scores, scores)
    assert out.inliers[0, -1] == -1


def test_query_without_keypoints_is_skipped_with_a_warning(caplog):
    rng = np.random.default_rng(7)
    store, q_kp, q_w = database(rng)
    ids = np.arange(30)[None].astype(np.int64)[:, ::-1].copy()
    scores = np.linspace(1, 0, 30, dtype=np.float32)[None]
    with caplog.at_level(logging.WARNING, logger="asmkit.verify"):
        out = rerank(store, [None, q_kp], [np.empty(0, np.int64), q_w], np.r_[ids, ids], np.r_[scores, scores])
    assert "no keypoints" in caplog.text
    np.testing.assert_array_equal(out.ids[0], ids[0])
    assert (out.inliers[0] == -1).all()
    assert set(out.ids[1, :3].tolist()) == {3, 11, 20}


def test_rerank_refuses_bad_arguments():
    store = GeometryStore()
    ids = np.zeros((1, 3), np.int64)
    with pytest.raises(ArgumentError, match="top"):
        rerank(store, [None], [None], ids, ids.astype(np.float32), top=-1)
    with pytest.raises(ArgumentError, match="query_keypoints"):
        rerank(store, [], [], ids, ids.astype(np.float32))
    with pytest.raises(ArgumentError, match="model"):
        VerifyOptions(model="projective")


# ------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    pytest.importorskip("skimage")
    from asmkit.demo import build_demo_set

    root = tmp_path_factory.mktemp("demo")
    return build_demo_set(root / "data", seed=1, photos=["astronaut", "coffee", "chelsea", "rocket"], max_size=320)


def test_index_keeps_geometry_and_query_reranks(demo, tmp_path, capsys):
    gt = json.loads((demo / "gt.json").read_text())
    out = tmp_path / "ws"
    images = sorted(p.name for p in (demo / "images").iterdir())
    folder = tmp_path / "images"
    folder.mkdir()
    for name in images[:-3]:
        shutil.copy(demo / "images" / name, folder / name)
    run_json(capsys, ["-q", "index", str(folder), "--out", str(out), "--codebook-size", "64", "--json"])
    first = GeometryStore.load(out / "geometry.asmkit")
    # --add grows the geometry store with the index.
    for name in images[-3:]:
        shutil.copy(demo / "images" / name, folder / name)
    run_json(capsys, ["-q", "index", str(folder), "--out", str(out), "--add", "--json"])
    geometry = GeometryStore.load(out / "geometry.asmkit")
    assert len(first) == len(images) - 3 and len(geometry) == len(images)
    assert geometry.signatures.shape[1] == 2 and geometry.bytes_per_image > 0

    query = str(demo / gt["queries"][0])
    plain = run_json(capsys, ["-q", "query", str(out), query, "--top", "8", "--json"])["results"][0]["results"]
    ranked = run_json(capsys, ["-q", "query", str(out), query, "--top", "8", "--rerank", "8", "--json"])
    hits = ranked["results"][0]["results"]
    assert sorted(h["name"] for h in hits) == sorted(h["name"] for h in plain)
    assert all("inliers" in h for h in hits)
    counts = [h["inliers"] for h in hits if h["inliers"] >= VerifyOptions().min_inliers]
    assert counts and counts == sorted(counts, reverse=True) == [h["inliers"] for h in hits[: len(counts)]]
    by_name = {h["name"]: h["score"] for h in plain}
    assert all(by_name[h["name"]] == h["score"] for h in hits)

    # Query expansion keeps the verified head and re-scores the others.
    expanded = run_json(
        capsys, ["-q", "query", str(out), query, "--top", "8", "--rerank", "8", "--expand", "2", "--json"]
    )
    grown = expanded["results"][0]["results"]
    assert [h["name"] for h in grown[: len(counts)]] == [h["name"] for h in hits[: len(counts)]]
    assert [h["score"] for h in grown[len(counts) :]] == sorted(
        (h["score"] for h in grown[len(counts) :]), reverse=True
    )
    assert all(h["score"] >= by_name.get(h["name"], 0.0) for h in grown)
    assert main(["-q", "query", str(out), query, "--expand", "2"]) == 2
    assert "--expand: needs --rerank" in capsys.readouterr().err


def test_eval_reports_before_and_after(demo, tmp_path, capsys):
    res = run_json(
        capsys,
        [
            "-q",
            "eval",
            str(demo),
            "--codebook-size",
            "64",
            "--rerank",
            "10",
            "--cache",
            str(tmp_path / "cache"),
            "--json",
        ],
    )
    assert set(res["before_rerank"]) >= {"map", "mp"}
    assert res["rerank"]["top"] == 10 and res["rerank"]["seconds"] >= 0
    assert res["map"] >= res["before_rerank"]["map"] - 0.05
    expanded = run_json(
        capsys,
        ["-q", "eval", str(demo), "--codebook-size", "64", "--rerank", "10", "--expand", "2"]
        + ["--cache", str(tmp_path / "cache"), "--json"],
    )
    assert expanded["rerank"]["before_expansion"]["map"] == res["map"]
    assert expanded["rerank"]["expand"] == 2 and expanded["rerank"]["expand_ms_per_query"] >= 0
