"""Verification with other features than the ranking's (``[verify] preset``): the deep
presets verify with SIFT keypoints, a hybrid with its first member's."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("skimage")

import asmkit.pipeline as pipeline  # noqa: E402
from asmkit._validation import FileFormatError  # noqa: E402
from asmkit.config import PipelineConfig, load_config  # noqa: E402
from asmkit.demo import build_demo_set  # noqa: E402
from asmkit.geometry import GeometryStore  # noqa: E402
from asmkit.hybrid import HybridSpec  # noqa: E402
from asmkit.index import Index  # noqa: E402


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify_features")
    return build_demo_set(root / "data", seed=2, photos=["astronaut", "coffee", "chelsea", "rocket"], max_size=320)


@pytest.fixture
def by_sift(tmp_path):
    """A config file that makes a preset verify with the sift preset's features."""
    path = tmp_path / "verify.toml"
    path.write_text('[verify]\npreset = "sift"\n')
    return path


def test_deep_presets_verify_with_sift():
    for name in ("deep", "deep_rot", "deep_rot45", "mast3r"):
        assert load_config(name).verify == "sift"
        assert load_config(name).verify_config().name == "sift"
    assert load_config("sift").verify is None and load_config("sift").verify_config() is None
    cfg = load_config("deep")
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["verify"] == {"preset": "sift"}
    assert "verify" not in load_config("sift").to_dict()


@pytest.mark.parametrize(
    "text, message",
    [
        ('[verify]\npreset = "nope"\n', "unknown preset"),
        ('[verify]\npreset = "hybrid"\n', "plain preset"),
        ('[verify]\npreset = "deep"\n', "plain preset"),
        ('[verify]\nfeatures = "sift"\n', "unknown option"),
        ('verify = "sift"\n', "table"),
    ],
)
def test_a_bad_verify_table_names_the_file(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(FileFormatError, match=message) as err:
        load_config("sift", path)
    assert str(path) in str(err.value)


def test_an_empty_verify_preset_gives_the_preset_its_own_features(tmp_path):
    path = tmp_path / "own.toml"
    path.write_text('[verify]\npreset = ""\n')
    assert load_config("deep", path).verify is None


def _hits(result):
    return [(r["name"], r["inliers"]) for r in result["results"][0]["results"]]


def test_a_workspace_verifies_with_other_features(demo, by_sift, tmp_path):
    images = sorted((demo / "images").iterdir())
    folder = tmp_path / "images"
    folder.mkdir()
    for f in images[:-3]:
        shutil.copy(f, folder / f.name)
    plain, other = tmp_path / "plain", tmp_path / "other"
    pipeline.build_index(folder, out=plain, preset="sift")
    pipeline.build_index(folder, out=other, preset="sift_hq", config=by_sift)
    for f in images[-3:]:
        shutil.copy(f, folder / f.name)
    pipeline.build_index(folder, out=plain, add=True)
    pipeline.build_index(folder, out=other, add=True)
    assert (other / "verify" / "codebook.asmkit").is_dir() and (other / "verify" / "features.h5").is_file()
    # The geometry store holds the sift features under the sift_hq index's ids.
    ours, theirs = GeometryStore.load(other / "geometry.asmkit"), GeometryStore.load(plain / "geometry.asmkit")
    index = Index.load(other / "index.asmkit")
    assert np.array_equal(np.sort(ours.ids), np.sort(index.ids)) and len(ours) == len(images)
    reference = Index.load(plain / "index.asmkit")
    for key in index.keys:
        a, b = ours.get(index.id_of(key)), theirs.get(reference.id_of(key))
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    # sift_hq's own words differ: the store is not that of its own features.
    own = tmp_path / "own"
    pipeline.build_index(folder, out=own, preset="sift_hq")
    assert not np.array_equal(GeometryStore.load(own / "geometry.asmkit").words, ours.words)

    query = images[0]
    n = len(images)
    got = pipeline.query_index(other, [query], top=n, rerank=n)
    alone = pipeline.query_index(plain, [query], top=n, rerank=n)
    # Every candidate gets the inliers the sift workspace finds for the same pair.
    assert dict(_hits(got)) == dict(_hits(alone))
    unranked = pipeline.query_index(other, [query], top=n)["results"][0]["results"]
    assert {r["name"] for r in unranked} == {name for name, _ in _hits(got)}
    expanded = pipeline.query_index(other, [query], top=n, rerank=n, expand=1)
    verified = [h for h in _hits(got) if h[1] >= 15]
    assert verified and _hits(expanded)[: len(verified)] == verified


def test_eval_verifies_with_other_features(demo, by_sift, tmp_path):
    plain = pipeline.evaluate_dataset(demo, preset="sift", rerank=10, expand=1, cache=tmp_path / "a")
    same = pipeline.evaluate_dataset(demo, preset="sift", config=by_sift, rerank=10, expand=1, cache=tmp_path / "b")
    assert same["rerank"]["features"] == plain["rerank"]["features"] == "sift"
    for key in ("map", "mp"):
        assert same[key] == plain[key] and same["before_rerank"][key] == plain["before_rerank"][key]
    assert same["rerank"]["before_expansion"] == plain["rerank"]["before_expansion"]
    other = pipeline.evaluate_dataset(demo, preset="sift_hq", config=by_sift, rerank=10, cache=tmp_path / "c")
    alone = pipeline.evaluate_dataset(demo, preset="sift_hq", rerank=10, cache=tmp_path / "d")
    assert other["before_rerank"] == alone["before_rerank"]
    # The geometry is sift's: its bytes per image are those of the sift run, not sift_hq's.
    assert other["rerank"]["geometry_bytes_per_image"] == plain["rerank"]["geometry_bytes_per_image"]
    assert "verify_features_s" in other["timings"] and "verify_features_s" not in alone["timings"]


def test_hybrid_eval_reranks_the_fused_ranking(demo, monkeypatch, tmp_path):
    spec = HybridSpec(["sift", "sift_hq"], "mutual_max")
    monkeypatch.setattr(pipeline, "hybrid_spec", lambda preset: spec if preset == "hybrid" else None)
    fused = pipeline.evaluate_dataset(demo, preset="hybrid", cache=tmp_path / "c")
    ranked = pipeline.evaluate_dataset(demo, preset="hybrid", rerank=10, expand=1, cache=tmp_path / "c")
    assert ranked["before_rerank"]["map"] == fused["map"] and ranked["rerank"]["features"] == "sift"
    assert ranked["rerank"]["verified_per_query"] > 0 and 0.0 < ranked["map"] <= 1.0


def test_pairs_verify_with_other_features(demo, tmp_path):
    # Fewer SIFT features for the ranking: their own verification finds other inliers.
    fewer, verified = tmp_path / "fewer.toml", tmp_path / "fewer_verified.toml"
    fewer.write_text("[features]\nmax_features = 200\n")
    verified.write_text('[features]\nmax_features = 200\n[verify]\npreset = "sift"\n')
    common = dict(graph="complete", verify=True, min_inliers=15)
    pipeline.make_pairs(demo / "images", out=tmp_path / "a.txt", preset="sift", **common)
    pipeline.make_pairs(demo / "images", out=tmp_path / "b.txt", preset="sift", config=verified, **common)
    pipeline.make_pairs(demo / "images", out=tmp_path / "c.txt", preset="sift", config=fewer, **common)

    def counts(name):
        lines = (tmp_path / f"{name}.txt.inliers.txt").read_text().split("\n")
        return {tuple(sorted(line.split()[:2])): int(line.split()[2]) for line in lines if line}

    assert counts("b") == counts("a") != counts("c")
