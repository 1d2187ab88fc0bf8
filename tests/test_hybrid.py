"""Hybrid presets: fusion of per-member similarities, through eval and scores."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("skimage")

import asmkit.pipeline as pipeline  # noqa: E402
from asmkit._validation import ArgumentError  # noqa: E402
from asmkit.demo import build_demo_set  # noqa: E402
from asmkit.hybrid import FUSIONS, RRF_K, HybridSpec, fuse, hybrid_spec  # noqa: E402


def test_score_fusion_ignores_each_members_scale():
    a = np.array([[0.9, 0.1, 0.2], [0.1, 0.8, 0.3]])
    b = np.array([[0.2, 0.1, 0.5], [0.1, 0.2, 0.6]])
    # Multiplying a member by 1000 changes nothing: rows are standardised first.
    np.testing.assert_allclose(fuse([a, b]), fuse([1000 * a, b]), atol=1e-5)
    z = lambda m: (m - m.mean(1, keepdims=True)) / m.std(1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(fuse([a, b], "score"), z(a) + z(b), atol=1e-5)
    assert fuse([a, b]).dtype == np.float32


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
    ],
)
def test_bad_fusion_input(bad):
    with pytest.raises(ArgumentError):
        fuse(**bad)


def test_shipped_hybrid_presets():
    spec = hybrid_spec("hybrid")
    assert spec.members == ("sift", "deep_rot") and spec.fusion in FUSIONS
    assert hybrid_spec("hybrid_rank").fusion == "rank"
    assert hybrid_spec("sift") is None and hybrid_spec("no-such-preset") is None
    with pytest.raises(ArgumentError, match="members"):
        HybridSpec(["sift"])
    with pytest.raises(ArgumentError, match="not a plain preset"):
        HybridSpec(["sift", "hybrid"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    return build_demo_set(root / "data", seed=1, photos=["astronaut", "coffee", "chelsea", "rocket"], max_size=320)


@pytest.fixture
def sift_pair(monkeypatch):
    """A hybrid of the two SIFT presets, so that the pipeline seams run without torch."""
    spec = HybridSpec(["sift", "sift_hq"], "score")
    monkeypatch.setattr(pipeline, "hybrid_spec", lambda preset: spec if preset == "hybrid" else None)
    return spec


def test_hybrid_eval_fuses_members(demo, sift_pair, tmp_path):
    res = pipeline.evaluate_dataset(demo, preset="hybrid", cache=tmp_path / "c")
    assert res["preset"] == "hybrid" and res["params"]["hybrid"] == sift_pair.to_dict()
    assert set(res["codebook_trained_on"]) == {"sift", "sift_hq"}
    assert 0.0 < res["map"] <= 1.0 and "fusion_s" in res["timings"]
    with pytest.raises(ArgumentError, match="codebook-size"):
        pipeline.evaluate_dataset(demo, preset="hybrid", codebook_size=64)


def test_hybrid_scores_are_the_fusion_of_the_members(demo, sift_pair, tmp_path):
    out = tmp_path / "s.npy"
    res = pipeline.compute_scores(demo / "images", out=out, preset="hybrid")
    fused = np.load(out)
    members = [np.load(res["members"][m]) for m in ("sift", "sift_hq")]
    np.testing.assert_allclose(fused, fuse(members, "score"), atol=1e-5)
    assert fused.shape == (res["images"], res["images"])
    pairs = pipeline.make_pairs(out=tmp_path / "pairs.txt", scores=out, top=2)
    assert pairs["n_pairs"] > 0


def test_hybrid_index_is_refused(demo, tmp_path):
    with pytest.raises(ArgumentError, match="hybrid"):
        pipeline.build_index(demo / "images", out=tmp_path / "idx", preset="hybrid")
