"""The workflows of asmkit.pipeline: codebook sizing and sampling, feature and whitening
caches, progress in logs, and the one extractor factory behind the presets."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage")

from asmkit import PRESETS, Params  # noqa: E402
from asmkit._validation import ArgumentError, FileFormatError  # noqa: E402
from asmkit.config import load_config, preset_names  # noqa: E402
from asmkit.demo import build_demo_set  # noqa: E402
from asmkit.features import ImageFeatures, extract_features  # noqa: E402
from asmkit.features.factory import extraction_settings, feature_options  # noqa: E402
from asmkit.pipeline import (  # noqa: E402
    MIN_POINTS_PER_WORD,
    TRAIN_POINTS_PER_WORD,
    _image_set_key,
    _training_sample,
    build_index,
    compute_scores,
    evaluate_dataset,
    fit_codebook_size,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return build_demo_set(root / "data", seed=1, photos=["astronaut", "coffee", "chelsea", "rocket"], max_size=320)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ASMKIT_CACHE", str(folder))
    return folder


# -- codebook size and training sample -----------------------------------------------------


@pytest.mark.parametrize(
    "n, size, expected",
    [
        (26_000, 4096, 512),  # the demo set: 512 words keep >= 39 descriptors each
        (1_200_000, 4096, 4096),  # enough data: the preset's size
        (4096 * MIN_POINTS_PER_WORD, 4096, 4096),
        (4096 * MIN_POINTS_PER_WORD - 1, 4096, 2048),
        (100, 4096, 2),
        (10, 4096, 1),
        (1_000_000, 100, 100),  # never above the preset's size
    ],
)
def test_fit_codebook_size(n, size, expected):
    assert fit_codebook_size(n, size) == expected


def test_unchosen_codebook_size_follows_the_data_quietly(demo, tmp_path, caplog, capfd):
    with caplog.at_level(logging.INFO, logger="asmkit"):
        summary = build_index(demo / "images", out=tmp_path / "ws")
    [(_, n_desc)] = _training_lines(caplog)
    assert summary["codebook_size"] == fit_codebook_size(n_desc, 4096) < 4096
    assert any("instead of the preset's 4096" in r.getMessage() for r in caplog.records)
    # faiss prints "please provide at least ... training points" past logging when a
    # codebook is too large for its data; a fitted size never is.
    assert "please provide" not in capfd.readouterr().err


def test_chosen_codebook_size_is_kept(demo, tmp_path):
    assert build_index(demo / "images", out=tmp_path / "ws", codebook_size=64)["codebook_size"] == 64
    with pytest.raises(ArgumentError, match="--codebook-size"):
        build_index(demo / "images", out=tmp_path / "ws2", codebook_size="1M")


def test_codebook_is_trained_on_a_sample(demo, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="asmkit"):
        build_index(demo / "images", out=tmp_path / "ws", codebook_size=16)
    [(used, total)] = _training_lines(caplog)
    assert used == 16 * TRAIN_POINTS_PER_WORD < total


def test_training_sample_does_not_depend_on_how_rows_are_split():
    rng = np.random.default_rng(0)
    parts = [rng.random((int(n), 8), dtype=np.float32) for n in rng.integers(0, 40, size=50)]
    parts[3] = parts[3][:0]
    whole = np.concatenate(parts)
    sample = _training_sample(parts, 300, seed=7)
    # The same rows as from the concatenation (the scores and eval paths split the
    # descriptors differently), distinct, in the concatenation's order.
    np.testing.assert_array_equal(sample, _training_sample([whole], 300, seed=7))
    rows = [int(np.flatnonzero((whole == row).all(axis=1))[0]) for row in sample]
    assert rows == sorted(set(rows)) and len(rows) == 300
    np.testing.assert_array_equal(_training_sample(parts, len(whole), seed=7), whole)


def _training_lines(caplog):
    """(descriptors used, descriptors available) of each "training a K-word codebook" log line."""
    found = [
        re.search(r"training a \d+-word codebook on (\d+) of (\d+) descriptors", r.getMessage()) for r in caplog.records
    ]
    return [(int(m[1]), int(m[2])) for m in found if m]


# -- caches ----------------------------------------------------------------------------------


def test_whitening_presets_reuse_the_stored_features(demo, cache, caplog):
    first = evaluate_dataset(demo, preset="sift", codebook_size=64)
    with caplog.at_level(logging.INFO, logger="asmkit"):
        second = evaluate_dataset(demo, preset="sift_hq", codebook_size=64)
    assert first["n_queries"] == second["n_queries"]
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("extracted ")]
    assert summaries and all(s.startswith("extracted 0 images") for s in summaries)
    skipped = [r.getMessage() for r in caplog.records if "already in the feature store" in r.getMessage()]
    assert skipped and skipped[0].split()[0] == skipped[0].split()[2]  # "N of N images"


def test_whitening_is_keyed_on_every_image(demo, tmp_path):
    images = tmp_path / "imgs"
    shutil.copytree(demo / "images", images)
    folder = tmp_path / "c"
    compute_scores(images, out=tmp_path / "a.npy", preset="sift_hq", codebook_size=32, cache=folder)
    assert len(list(folder.glob("whitening-*.npz"))) == 1
    compute_scores(images, out=tmp_path / "a.npy", preset="sift_hq", codebook_size=32, cache=folder)
    assert len(list(folder.glob("whitening-*.npz"))) == 1  # same images: reused
    # The same names and count, one file changed (past the first five): a new whitening.
    last = sorted(images.iterdir())[-1]
    last.write_bytes(sorted(images.iterdir())[0].read_bytes())
    compute_scores(images, out=tmp_path / "a.npy", preset="sift_hq", codebook_size=32, cache=folder)
    assert len(list(folder.glob("whitening-*.npz"))) == 2


# -- progress in a log -----------------------------------------------------------------------


class _Mean:
    name = "mean"
    max_size = None

    def config(self):
        return {"extractor": "mean"}

    def extract(self, image):
        vec = image.reshape(-1, 3).mean(0, keepdims=True).astype(np.float32)
        return ImageFeatures(descriptors=vec, keypoints=np.zeros((1, 4), np.float32))


def test_progress_is_a_few_log_lines_when_stderr_is_not_a_terminal(demo, caplog, capfd):
    with caplog.at_level(logging.INFO, logger="asmkit"):
        result = extract_features(demo / "images", _Mean(), progress=True)
    assert len(result.extracted) > 10
    assert capfd.readouterr().err == ""  # no bar redrawn line by line into the log
    lines = [r.getMessage() for r in caplog.records if r.name == "asmkit.features.extract"]
    assert len(lines) <= 2 and lines[-1].startswith(f"extracted {len(result.extracted)} images")


# -- presets and config files ----------------------------------------------------------------


def test_one_preset_system():
    assert set(PRESETS) == set(preset_names()) >= {"sift", "sift_hq", "deep", "mast3r", "asmk_star"}
    for name in preset_names():
        assert Params.preset(name) == PRESETS[name] == load_config(name).params
    assert PRESETS["asmk_star"] == Params()
    assert Params.preset("sift", codebook_size=1024).codebook_size == 1024
    with pytest.raises(ArgumentError, match="unknown preset 'how'"):
        Params.preset("how")


def test_feature_cache_key_leaves_out_whitening_only():
    assert extraction_settings(load_config("sift").features) == extraction_settings(load_config("sift_hq").features)
    assert extraction_settings({"type": "sift", "max_features": 500}) != extraction_settings(
        load_config("sift").features
    )
    # Deep features carry their whitening: nothing is left out.
    assert extraction_settings({"type": "deep"}) == feature_options({"type": "deep"})


def test_deep_defaults_are_the_deep_preset():
    assert feature_options({"type": "deep"}) == load_config("deep").features
    assert feature_options({"type": "deep", "nfeat": 100})["nfeat"] == 100


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[asmk\nalpha = 3", "invalid TOML"),
        ("asmk = 3\n", "[asmk] must be a table"),
        ("[asmkk]\n", "unknown section(s) asmkk"),
        ("[asmk]\nalpha = 'high'\n", "alpha: expected a finite number"),
        ("[asmk]\nma_query = 2.5\n", "ma_query: expected an int"),
        ("[asmk]\nalpah = 3\n", "alpah"),
        ("[features]\nmax_featurs = 10\n", "max_featurs"),
        ("[features]\ntype = 'surf'\n", "features.type"),
        ("[features]\ntype = 'sift'\nwhitening_dim = 'all'\n", "features.whitening_dim"),
        ("description = 3\n", "description must be a string"),
    ],
)
def test_bad_config_file_names_the_file(tmp_path, text, fragment):
    path = tmp_path / "my.toml"
    path.write_text(text)
    with pytest.raises(FileFormatError) as info:
        load_config("sift", path)
    assert str(info.value).startswith(f"{path}: ") and fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_config_json_and_binary(tmp_path):
    path = tmp_path / "my.json"
    path.write_text("{not json")
    with pytest.raises(FileFormatError, match="invalid JSON"):
        load_config("sift", path)
    path = tmp_path / "my.toml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(FileFormatError, match="not a text file"):
        load_config("sift", path)


def test_bad_override_is_an_argument_error():
    with pytest.raises(ArgumentError, match="codebook_size"):
        load_config("sift", codebook_size="lots")
    assert load_config("sift").codebook_size_chosen is False
    assert load_config("sift", codebook_size=64).codebook_size_chosen is True


def test_an_image_set_spelled_relative_or_absolute_shares_its_cache_keys(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"x" * 10)
    monkeypatch.chdir(tmp_path)
    relative = _image_set_key([Path("images/a.jpg")])
    assert relative == _image_set_key([tmp_path / "images" / "a.jpg"])
    (tmp_path / "images" / "a.jpg").write_bytes(b"x" * 11)
    assert _image_set_key([Path("images/a.jpg")]) != relative


# -- images without features -----------------------------------------------------------------


def test_an_image_without_features_keeps_its_place(demo, tmp_path):
    # A flat grey photo has no SIFT keypoint: it is indexed and scored as an image with no
    # words (scores 0), and every other image keeps its row, column and name.
    from PIL import Image

    from asmkit.pipeline import query_index

    images = tmp_path / "images"
    shutil.copytree(demo / "images", images)
    Image.fromarray(np.full((200, 240, 3), 128, np.uint8)).save(images / "aaa_flat.jpg")
    ws = tmp_path / "ws"
    summary = build_index(images, out=ws)
    n = len(list(images.iterdir()))
    assert summary["images"] == n and not summary["failed"]
    out = tmp_path / "s.npy"
    compute_scores(images, out=out)
    matrix, names = np.load(out), (tmp_path / "s.npy.names.txt").read_text().split()
    assert matrix.shape == (n, n) and len(names) == n and names[0] == "aaa_flat.jpg"
    assert not matrix[0].any() and not matrix[:, 0].any()
    for i in (1, n - 1):
        hits = query_index(ws, [images / names[i]], top=n)["results"][0]["results"]
        got = {h["name"]: h["score"] for h in hits}
        np.testing.assert_allclose([got[name] for name in names], matrix[i], atol=1e-5)
