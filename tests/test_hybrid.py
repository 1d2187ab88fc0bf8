"""Hybrid presets: fusion of per-member similarities, through eval, scores, index, query and pairs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("skimage")

from cli_json import run_json  # noqa: E402

import asmkit.hybrid as hybrid  # noqa: E402
import asmkit.pipeline as pipeline  # noqa: E402
from asmkit._validation import ArgumentError  # noqa: E402
from asmkit.demo import build_demo_set  # noqa: E402
from asmkit.hybrid import (  # noqa: E402
    COLUMN_SAMPLE,
    FUSIONS,
    RRF_K,
    HybridSpec,
    column_sample,
    column_stats,
    fuse,
    hybrid_spec,
    needs_columns,
)
from asmkit.index import Index  # noqa: E402
from asmkit.pairs import SparseScores  # noqa: E402
from asmkit.storage import StorageError  # noqa: E402


def test_score_fusion_ignores_each_members_scale():
    a = np.array([[0.9, 0.1, 0.2], [0.1, 0.8, 0.3]])
    b = np.array([[0.2, 0.1, 0.5], [0.1, 0.2, 0.6]])
    # Multiplying a member by 1000 changes nothing: rows are standardised first.
    np.testing.assert_allclose(fuse([a, b]), fuse([1000 * a, b]), atol=1e-5)
    z = lambda m: (m - m.mean(1, keepdims=True)) / m.std(1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(fuse([a, b], "score"), z(a) + z(b), atol=1e-5)
    assert fuse([a, b]).dtype == np.float32


def test_robust_fusion_centres_on_the_median_and_scales_by_the_mad():
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 40)), rng.random((3, 40)) ** 3

    def reference(m):
        med = np.median(m, axis=1, keepdims=True)
        return (m - med) / (1.4826 * np.median(np.abs(m - med), axis=1, keepdims=True))

    np.testing.assert_allclose(fuse([a, b], "robust"), reference(a) + reference(b), rtol=1e-5, atol=1e-5)
    # Most of the row tied (zero MAD): the spread of the 90th percentile over the median
    # (the 75th is tied too) in normal units scales it; the 0.6 there is 0.6 of the way
    # from the fourth sorted value to the fifth.
    c = np.array([[0.0, 0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(fuse([c], "robust"), c / (0.6 / 1.2816), rtol=1e-6)
    np.testing.assert_allclose(fuse([np.ones((1, 5))], "robust"), 0)
    # Every tabled quantile tied: the standard deviation is the last resort.
    d = np.zeros((1, 200))
    d[0, 5] = 1.0
    np.testing.assert_allclose(fuse([d], "robust"), d / d.std(), rtol=1e-6)


def test_a_sparse_rows_matches_are_scaled_by_its_noise_not_by_themselves():
    # A SIFT-like member: an image sharing no visual word with most of the database
    # scores 0 against them (zero MAD) and far above 0 against its few true copies. The
    # standard deviation, inflated by those copies, would shrink its match to the level
    # to six units; the quantile spread (here the 75th percentile's: 57 of 100 tied)
    # keeps it far out.
    rng = np.random.default_rng(2)
    sparse = np.zeros((1, 100))
    sparse[0, 60:] = rng.uniform(0.001, 0.002, 40)
    sparse[0, [3, 4, 5]] = 1.0
    z = fuse([sparse], "robust")[0]
    scale = (np.quantile(sparse, 0.75) - 0.0) / 0.6745
    np.testing.assert_allclose(z[3], 1.0 / scale, rtol=1e-5)
    assert 1.0 / sparse.std() < 6 and z[3] > 100


def test_robust_max_fusion_adds_the_largest_standardised_score():
    rng = np.random.default_rng(3)
    a, b, c = rng.normal(size=(4, 30)), 5 * rng.normal(size=(4, 30)) + 2, rng.gamma(1.0, size=(4, 30))

    def standardised(m):
        med = np.median(m, axis=1, keepdims=True)
        return (m - med) / (1.4826 * np.median(np.abs(m - med), axis=1, keepdims=True))

    z = [standardised(m) for m in (a, b, c)]
    reference = z[0] + z[1] + z[2] + np.maximum(np.maximum(z[0], z[1]), z[2])
    np.testing.assert_allclose(fuse([a, b, c], "robust_max"), reference, rtol=1e-5, atol=1e-5)
    # A member sure of one candidate keeps it first though the other scores it as noise.
    sure, noise = np.zeros((1, 20)), rng.normal(size=(1, 20))
    sure[0, :10] = rng.normal(scale=0.01, size=10)
    sure[0, 7] = 50.0
    noise[0, 7] = noise.min()
    assert fuse([sure, noise], "robust_max")[0].argmax() == 7


def _spread_reference(values):
    """Median and robust scale of one 1-D array: the MAD, else the first positive upper
    quantile spread in normal units, else the standard deviation."""
    med = np.median(values)
    scale = 1.4826 * np.median(np.abs(values - med))
    for q, normal_q in ((0.75, 0.6745), (0.9, 1.2816), (0.95, 1.6449), (0.99, 2.3263)):
        if scale > 0:
            break
        scale = (np.quantile(values, q) - med) / normal_q
    return med, scale if scale > 0 else values.std()


def _mutual_reference(m, sample_rows, sample):
    """A loop-by-loop twin of mutual_max's per-member score: min(row z, column z), the
    column scales floored at COLUMN_SCALE_FLOOR times their median."""
    cols = []
    for j in range(m.shape[1]):
        others = np.array([sample_rows[s, j] for s in range(len(sample)) if sample[s] != j])
        cols.append(_spread_reference(others))
    floor = 0.5 * np.median([scale for _, scale in cols if scale > 0])
    out = np.empty_like(m)
    for q in range(m.shape[0]):
        med, row_scale = _spread_reference(m[q])
        for j in range(m.shape[1]):
            col_med, col_scale = cols[j]
            out[q, j] = min((m[q, j] - med) / row_scale, (m[q, j] - col_med) / max(col_scale, floor))
    return out


def test_mutual_max_standardises_by_row_and_by_column():
    rng = np.random.default_rng(5)
    n = 25
    # The third member is sparse (mostly exact zeros), so its rows and columns take the
    # quantile fallback; two sample rows without zeros keep every column from being constant.
    sparse = rng.gamma(2.0, size=(n, n)) * (rng.random((n, n)) < 0.3)
    sparse[[4, 9]] += 1.0
    fulls = [rng.gamma(2.0, size=(n, n)), rng.normal(size=(n, n)) ** 2, sparse]
    queries = [3, 7, 20]
    sample = np.array([0, 4, 9, 13, 18, 24])
    columns = [column_stats(f[sample], sample) for f in fulls]
    z = [_mutual_reference(f[queries], f[sample], sample) for f in fulls]
    expected = z[0] + z[1] + z[2] + np.maximum(np.maximum(z[0], z[1]), z[2])
    np.testing.assert_allclose(fuse([f[queries] for f in fulls], "mutual_max", columns), expected, rtol=1e-5, atol=1e-5)


def test_anchored_max_counts_later_members_only_above_the_threshold():
    rng = np.random.default_rng(9)
    n = 25
    fulls = [rng.gamma(2.0, size=(n, n)), rng.normal(size=(n, n)) ** 2]
    queries = [2, 11]
    sample = np.array([0, 5, 10, 15, 20, 24])
    columns = [column_stats(f[sample], sample) for f in fulls]
    z = [_mutual_reference(f[queries], f[sample], sample) for f in fulls]
    second = np.maximum(z[1] - hybrid.ANCHOR_THRESHOLD, 0)
    expected = z[0] + second + np.maximum(z[0], second)
    got = fuse([f[queries] for f in fulls], "anchored_max", columns)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ArgumentError, match="anchored_max"):
        fuse([f[queries] for f in fulls], "anchored_max")


def test_anchored_max_pools_the_later_members_by_their_maximum():
    rng = np.random.default_rng(12)
    n = 25
    fulls = [rng.gamma(2.0, size=(n, n)), rng.normal(size=(n, n)) ** 2, rng.gamma(1.0, size=(n, n)) ** 2]
    queries = [1, 8, 17]
    # A copy that both later members are confident of: pooled, it counts once.
    fulls[1][8, 5] += 20.0
    fulls[2][8, 5] += 30.0
    sample = np.array([0, 6, 12, 18, 24])
    columns = [column_stats(f[sample], sample) for f in fulls]
    z = [_mutual_reference(f[queries], f[sample], sample) for f in fulls]
    pooled = np.maximum(np.maximum(z[1], z[2]) - hybrid.ANCHOR_THRESHOLD, 0)
    expected = z[0] + pooled + np.maximum(z[0], pooled)
    got = fuse([f[queries] for f in fulls], "anchored_max", columns)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The pooled term is not the sum of the later members' excesses.
    summed = z[0] + sum(np.maximum(x - hybrid.ANCHOR_THRESHOLD, 0) for x in z[1:])
    assert not np.allclose(got, summed + np.maximum(z[0], pooled), atol=1e-3)


def test_anchored_max_keeps_the_anchors_match_above_the_others_mistakes():
    rng = np.random.default_rng(10)
    n, match, mistake, blurred = 300, 40, 90, 150
    a, b = rng.normal(size=(n, n)), rng.normal(size=(n, n))
    # The anchor finds the match clearly; the second member is noise on it and confident
    # about a wrong image, a mistake as large as the anchor's evidence.
    a[0, match] += 9.0
    b[0, mistake] += 9.5
    # A copy only the second member finds, far above its noise.
    b[0, blurred] += 14.0
    sample = column_sample(n)
    columns = [column_stats(m[sample], sample) for m in (a, b)]
    mutual = fuse([a[:1], b[:1]], "mutual_max", columns)[0]
    anchored = fuse([a[:1], b[:1]], "anchored_max", columns)[0]
    mutual[0] = anchored[0] = -np.inf  # the query itself
    assert mutual[mistake] > mutual[match]
    assert anchored[match] > anchored[mistake]
    assert np.argsort(-anchored)[:2].tolist() == [blurred, match]


def test_mutual_max_demotes_an_image_that_matches_everything():
    rng = np.random.default_rng(6)
    n, hub, match = 200, 11, 40
    # One member scores a hub (a database image similar to every image) far above the
    # query's true match, which both members score moderately above their noise.
    a, b = rng.normal(size=(n, n)), rng.normal(size=(n, n))
    b[:, hub] += 10.0
    a[0, match] += 4.0
    b[0, match] += 4.0
    sample = column_sample(n)
    columns = [column_stats(m[sample], sample) for m in (a, b)]
    robust = fuse([a[:1], b[:1]], "robust_max")[0]
    mutual = fuse([a[:1], b[:1]], "mutual_max", columns)[0]
    robust[0] = mutual[0] = -np.inf  # the query itself
    assert robust.argmax() == hub
    # Against its own column the hub's score is ordinary; the match stands out both ways.
    assert mutual.argmax() == match and np.argsort(-mutual).tolist().index(hub) > 5


def test_a_quiet_columns_scale_is_floored_at_half_the_median():
    # Image 5 scores near 0 against every image (few features): without a floor a chance
    # score of 0.05 would stand hundreds of deviations out of its column.
    rng = np.random.default_rng(12)
    rows = rng.normal(1.0, 0.2, size=(40, 60))
    rows[:, 5] = rng.normal(0.0, 1e-4, size=40)
    sample = np.arange(40)
    stats = column_stats(rows, sample)
    raw = np.array([_spread_reference(np.delete(rows[:, j], j) if j < 40 else rows[:, j])[1] for j in range(60)])
    assert raw[5] < 1e-3
    np.testing.assert_allclose(stats[1, 5], 0.5 * np.median(raw), rtol=1e-9)
    # Every other column is above the floor and keeps its own scale.
    np.testing.assert_allclose(np.delete(stats[1], 5), np.delete(raw, 5), rtol=1e-9)


def test_column_sample_and_stats(monkeypatch):
    assert column_sample(5).tolist() == [0, 1, 2, 3, 4] and column_sample(0).size == 0
    big = column_sample(10 * COLUMN_SAMPLE)
    assert len(big) == COLUMN_SAMPLE and big[0] == 0 and big[-1] == 10 * COLUMN_SAMPLE - 1
    assert np.all(np.diff(big) > 0)
    rows = np.array([[9.0, 1.0, 1.0, 0.0], [1.0, 9.0, 3.0, 0.0]])
    stats = column_stats(rows, np.array([0, 1]))
    # Self-matches (9.0) left out; a column of one value falls back to its deviation, 0.
    np.testing.assert_allclose(stats, [[1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 1.4826, 0.0]])
    with pytest.raises(ArgumentError, match="column_stats"):
        column_stats(rows, np.array([0, 4]))
    # Column blocks (bounded memory for large databases) give the same statistics.
    rng = np.random.default_rng(8)
    wide, sample = rng.gamma(2.0, size=(7, 50)), np.array([0, 9, 17, 26, 33, 41, 49])
    whole = column_stats(wide, sample)
    monkeypatch.setattr(hybrid, "COLUMN_BLOCK", 7 * 4)
    np.testing.assert_array_equal(column_stats(wide, sample), whole)
    # One database image: its column holds only its self-match, so it carries no evidence.
    lone = column_stats(np.array([[1.0]]), np.array([0]))
    np.testing.assert_array_equal(lone, [[0.0], [0.0]])
    np.testing.assert_array_equal(fuse([np.array([[1.0]])] * 2, "mutual_max", [lone, lone]), [[0.0]])


def test_rank_fusion_is_reciprocal_rank():
    a = np.array([[0.9, 0.1, 0.2]])
    b = np.array([[0.2, 0.1, 0.5]])
    expected = [[1 / (RRF_K + 1) + 1 / (RRF_K + 2), 2 / (RRF_K + 3), 1 / (RRF_K + 2) + 1 / (RRF_K + 1)]]
    np.testing.assert_allclose(fuse([a, b], "rank"), expected, rtol=1e-6)


def test_constant_rows_carry_no_evidence():
    a = np.array([[0.9, 0.1, 0.2]])
    np.testing.assert_allclose(fuse([a, np.zeros_like(a)]), fuse([a]), atol=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        dict(matrices=[]),
        dict(matrices=[np.zeros((2, 3)), np.zeros((3, 2))]),
        dict(matrices=[np.zeros((2, 3))], fusion="max"),
        dict(matrices=[np.zeros((2, 3))], fusion="mutual_max"),
        dict(matrices=[np.zeros((2, 3))], fusion="mutual_max", columns=[np.zeros((2, 2))]),
    ],
)
def test_bad_fusion_input(bad):
    with pytest.raises(ArgumentError):
        fuse(**bad)


def test_shipped_hybrid_presets():
    spec = hybrid_spec("hybrid")
    assert spec.members == ("sift", "deep_rot") and spec.fusion == "mutual_max" and spec.fusion in FUSIONS
    assert hybrid_spec("hybrid_fast").fusion == "mutual_max"
    assert hybrid_spec("hybrid_rank").fusion == "rank"
    assert hybrid_spec("hybrid_anchored").members == ("sift", "deep_rot")
    assert hybrid_spec("hybrid_anchored").fusion == "anchored_max"
    assert hybrid_spec("hybrid_fast").members == ("sift", "deep")
    assert hybrid_spec("hybrid_all").members == ("sift", "deep", "deep_rot")
    assert hybrid_spec("hybrid_all").fusion == "anchored_max"
    assert hybrid_spec("sift") is None and hybrid_spec("no-such-preset") is None
    with pytest.raises(ArgumentError, match="members"):
        HybridSpec(["sift"])
    with pytest.raises(ArgumentError, match="not a plain preset"):
        HybridSpec(["sift", "hybrid"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    return build_demo_set(root / "data", seed=1, photos=["astronaut", "coffee", "chelsea", "rocket"], max_size=320)


@pytest.fixture(
    params=[
        (("sift", "sift_hq"), "score"),
        (("sift", "sift_hq"), "mutual_max"),
        (("sift", "sift_hq"), "anchored_max"),
        (("sift", "sift_hq", "asmk_star"), "anchored_max"),
    ],
    ids=["score", "mutual_max", "anchored_max", "anchored_max-3"],
)
def sift_pair(monkeypatch, request):
    """A hybrid of the SIFT presets, so that the pipeline seams run without torch; with a
    row-wise fusion and with the two that need the database's column statistics, and with
    three members as `hybrid_all` has."""
    members, fusion = request.param
    spec = HybridSpec(list(members), fusion)
    monkeypatch.setattr(pipeline, "hybrid_spec", lambda preset: spec if preset == "hybrid" else None)
    return spec


def test_hybrid_eval_fuses_members(demo, sift_pair, tmp_path):
    res = pipeline.evaluate_dataset(demo, preset="hybrid", cache=tmp_path / "c")
    assert res["preset"] == "hybrid" and res["params"]["hybrid"] == sift_pair.to_dict()
    assert set(res["codebook_trained_on"]) == set(sift_pair.members)
    assert 0.0 < res["map"] <= 1.0 and "fusion_s" in res["timings"]
    with pytest.raises(ArgumentError, match="codebook-size"):
        pipeline.evaluate_dataset(demo, preset="hybrid", codebook_size=64)


def test_hybrid_scores_are_the_fusion_of_the_members(demo, sift_pair, tmp_path):
    out = tmp_path / "s.npy"
    res = pipeline.compute_scores(demo / "images", out=out, preset="hybrid")
    fused = np.load(out)
    members = [np.load(res["members"][m]) for m in sift_pair.members]
    sample = column_sample(len(fused))
    columns = [column_stats(m[sample], sample) for m in members]
    np.testing.assert_allclose(fused, fuse(members, sift_pair.fusion, columns), atol=1e-5)
    assert fused.shape == (res["images"], res["images"])
    pairs = pipeline.make_pairs(out=tmp_path / "pairs.txt", scores=out, top=2)
    assert pairs["n_pairs"] > 0


@pytest.fixture
def workspace(demo, sift_pair, tmp_path):
    """A hybrid index of the demo images (members sift and sift_hq, and asmk_star for
    three)."""
    ws = tmp_path / "ws"
    summary = pipeline.build_index(demo / "images", out=ws, preset="hybrid")
    return ws, summary


def test_hybrid_index_holds_one_workspace_per_member(workspace, sift_pair):
    ws, summary = workspace
    assert summary["hybrid"]["members"] == list(sift_pair.members)
    # Column statistics are stored only for the fusion that needs them, one per member.
    assert (ws / "columns.npz").is_file() == needs_columns(summary["hybrid"]["fusion"])
    if needs_columns(summary["hybrid"]["fusion"]):
        assert set(sift_pair.members) <= set(np.load(ws / "columns.npz").files)
    assert set(summary["codebook_size"]) == set(sift_pair.members)
    for m in sift_pair.members:
        assert pipeline.open_workspace(ws / m)[1].name == m
        assert summary["members"][m]["images"] == summary["images"] > 0
    assert pipeline.workspace_hybrid(ws).members == sift_pair.members
    assert pipeline.workspace_hybrid(ws / "sift") is None
    # The folder itself is no plain workspace: code that needs one says so.
    with pytest.raises(StorageError, match="hybrid"):
        pipeline.open_workspace(ws)


def test_hybrid_query_equals_the_scores_row(demo, workspace, tmp_path):
    ws, summary = workspace
    res = pipeline.compute_scores(demo / "images", out=tmp_path / "s.npy", preset="hybrid")
    names = (tmp_path / "s.npy.names.txt").read_text().split()
    matrix = np.load(tmp_path / "s.npy")
    rows = [0, len(names) - 1]
    q = pipeline.query_index(ws, [demo / "images" / names[i] for i in rows], top=len(names))
    assert res["images"] == len(q["results"][0]["results"]) == summary["images"]
    for i, result in zip(rows, q["results"]):
        got = {r["name"]: r["score"] for r in result["results"]}
        np.testing.assert_allclose([got[n] for n in names], matrix[i], atol=1e-5)
        assert [r["score"] for r in result["results"]] == sorted(got.values(), reverse=True)
    top = pipeline.query_index(ws, [demo / "images" / names[0]], top=2)["results"][0]["results"]
    assert top == q["results"][0]["results"][:2]


def test_hybrid_query_reranks_the_fused_top_with_the_first_members_geometry(demo, workspace):
    ws, summary = workspace
    query = sorted((demo / "images").iterdir())[0]
    n = summary["images"]
    fused = pipeline.query_index(ws, [query], top=n)["results"][0]["results"]
    got = pipeline.query_index(ws, [query], top=n, rerank=6)["results"][0]["results"]
    # Only the fused top 6 are reordered, the rest keep the fused order and scores.
    assert {r["name"] for r in got[:6]} == {r["name"] for r in fused[:6]}
    assert got[6:] == [{**r, "inliers": -1} for r in fused[6:]]
    # Inliers are those the sift member's own verification finds for the same image pair.
    alone = pipeline.query_index(ws / "sift", [query], top=n, rerank=n)["results"][0]["results"]
    inliers = {r["name"]: r["inliers"] for r in alone}
    assert all(r["inliers"] == inliers[r["name"]] for r in got[:6])
    verified = [r["inliers"] for r in got[:6] if r["inliers"] >= 15]
    assert verified and verified == sorted(verified, reverse=True)
    assert [r["inliers"] for r in got[: len(verified)]] == verified
    expanded = pipeline.query_index(ws, [query], top=n, rerank=6, expand=1)["results"][0]["results"]
    # The verified head stays; its scores become expanded scores.
    head = [(r["name"], r["inliers"]) for r in got[: len(verified)]]
    assert [(r["name"], r["inliers"]) for r in expanded[: len(verified)]] == head
    assert {r["name"] for r in expanded} == {r["name"] for r in fused}


def test_hybrid_add_grows_every_member(demo, sift_pair, tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    photos = sorted((demo / "images").iterdir())
    for f in photos[:6]:
        shutil.copy(f, src / f.name)
    ws = tmp_path / "ws"
    pipeline.build_index(src, out=ws, preset="hybrid")
    for f in photos[6:]:
        shutil.copy(f, src / f.name)
    summary = pipeline.build_index(src, out=ws, add=True)
    assert summary["added"] == len(photos) - 6 and summary["images"] == len(photos)
    for m in sift_pair.members:
        assert len(Index.load(ws / m / "index.asmkit").keys) == len(photos)
    if needs_columns(sift_pair.fusion):
        # The column statistics follow the grown members, and are checked against them.
        assert np.load(ws / "columns.npz")["sift"].shape == (2, len(photos))
        (ws / "columns.npz").unlink()
        with pytest.raises(StorageError, match=r"columns\.npz.*--add"):
            pipeline.query_index(ws, [photos[0]])
        pipeline.build_index(src, out=ws, add=True)
        assert pipeline.query_index(ws, [photos[0]], top=1)["results"][0]["results"][0]["name"] == photos[0].name
        # Statistics an older asmkit wrote (no version: the standard deviation fallback)
        # are refused, not fused with.
        old = dict(np.load(ws / "columns.npz"))
        del old["_version"]
        np.savez(ws / "columns.npz", **old)
        with pytest.raises(StorageError, match=r"columns\.npz.*another asmkit version.*--add"):
            pipeline.query_index(ws, [photos[0]])


def test_hybrid_workspace_names_a_missing_member(workspace, demo):
    ws, _ = workspace
    shutil.rmtree(ws / "sift_hq")
    image = next((demo / "images").iterdir())
    with pytest.raises(FileNotFoundError, match=r"sift_hq.*pipeline\.json"):
        pipeline.query_index(ws, [image])
    with pytest.raises(FileNotFoundError, match="sift_hq"):
        pipeline.build_index(demo / "images", out=ws, add=True)


def test_hybrid_pairs_and_top_scores_are_those_of_the_fused_matrix(demo, workspace, tmp_path):
    ws, _ = workspace
    dense = tmp_path / "s.npy"
    pipeline.compute_scores(demo / "images", out=dense, preset="hybrid")
    names = dense.with_name(dense.name + ".names.txt").read_text().split()
    expected = SparseScores.from_dense(np.load(dense), 3)
    # Sparse scores of the image folder (k-NN per block, fused block by block) and of the index.
    pipeline.compute_scores(demo / "images", out=tmp_path / "t.npz", preset="hybrid", top=3)
    for sparse, sparse_names in (SparseScores.load(tmp_path / "t.npz"), pipeline._sparse_scores(ws, 3)[:2]):
        assert sparse_names == names
        np.testing.assert_array_equal(sparse.ids, expected.ids)
        np.testing.assert_allclose(sparse.scores, expected.scores, atol=1e-5)
    from_dense = pipeline.make_pairs(out=tmp_path / "p0.txt", scores=dense, graph="knn-2")
    for source, preset in ((demo / "images", "hybrid"), (ws, "sift")):
        res = pipeline.make_pairs(source, out=tmp_path / "p.txt", graph="knn-2", preset=preset)
        assert res["n_pairs"] == from_dense["n_pairs"] > 0
        assert (tmp_path / "p.txt").read_text() == (tmp_path / "p0.txt").read_text()
    # Verification runs on the first member's (SIFT) features.
    res = pipeline.make_pairs(demo / "images", out=tmp_path / "v.txt", graph="knn-2", preset="hybrid", verify=True)
    assert res["n_tested"] == from_dense["n_pairs"] and (tmp_path / "v.txt.inliers.txt").is_file()


def test_hybrid_through_the_command_line(demo, sift_pair, tmp_path, capsys):
    from asmkit.cli import main

    ws = tmp_path / "ws"
    assert main(["index", str(demo / "images"), "--out", str(ws), "--preset", "hybrid"]) == 0
    assert "codebook sift " in capsys.readouterr().out
    image = sorted((demo / "images").iterdir())[0]
    res = run_json(capsys, ["query", str(ws), str(image), "--top", "3", "--json"])
    assert res["hybrid"]["members"] == list(sift_pair.members) and len(res["results"][0]["results"]) == 3
    assert res["results"][0]["results"][0]["name"] == image.name
