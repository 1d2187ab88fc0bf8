"""Tests for asmkit.demo: files, ground-truth consistency, determinism."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")

from asmkit import demo  # noqa: E402
from asmkit._validation import ArgumentError, DependencyError  # noqa: E402
from asmkit.demo import DEMO_PHOTOS, build_demo_set  # noqa: E402
from asmkit.evaluate import evaluate, load_ground_truth  # noqa: E402

PHOTOS = ["astronaut", "coins", "motorcycle"]


def digests(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "set"
    return build_demo_set(out, seed=3, n_variants=3, max_size=96, photos=PHOTOS)


def test_files_and_ground_truth(small_set):
    gt_data = json.loads((small_set / "gt.json").read_text())
    assert gt_data["images"] == [f"images/{p}_{v}.jpg" for p in PHOTOS for v in range(3)]
    for name in gt_data["images"]:
        with Image.open(small_set / name) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert max(im.size) <= 96 and min(im.size) >= 16
    gt = load_ground_truth(small_set)
    assert gt.queries == [f"images/{p}_0.jpg" for p in PHOTOS]
    for q, name in enumerate(gt.queries):
        photo = name.split("/")[1].rsplit("_", 1)[0]
        assert [gt.images[i] for i in gt.positives[q]] == [f"images/{photo}_{v}.jpg" for v in (1, 2)]
        assert [gt.images[i] for i in gt.junk[q]] == [name]
        assert gt.images.index(name) in gt.query_groups[q].tolist()
        assert len(gt.query_groups[q]) == 3
    # an oracle ranking (query, then its group, then the rest) is perfect
    n = len(gt.images)
    ranks = []
    for q in range(gt.n_queries):
        group = gt.query_groups[q].tolist()
        ranks.append(group + [i for i in range(n) if i not in group])
    res = evaluate(np.array(ranks), gt)
    assert res["map"] == pytest.approx(1.0) and res["ns_score"] == pytest.approx(3.0)


def test_variants_differ_from_each_other(small_set):
    a = np.asarray(Image.open(small_set / "images/astronaut_0.jpg"))
    b = np.asarray(Image.open(small_set / "images/astronaut_1.jpg"))
    assert a.shape != b.shape or np.abs(a.astype(int) - b.astype(int)).mean() > 5


def test_deterministic_for_a_seed(tmp_path, small_set):
    again = build_demo_set(tmp_path / "again", seed=3, n_variants=3, max_size=96, photos=PHOTOS)
    assert digests(again) == digests(small_set)
    other = build_demo_set(tmp_path / "other", seed=4, n_variants=3, max_size=96, photos=PHOTOS)
    assert digests(other)["images/astronaut_1.jpg"] != digests(small_set)["images/astronaut_1.jpg"]


def test_a_view_does_not_depend_on_the_other_photos(tmp_path, small_set):
    alone = build_demo_set(tmp_path / "alone", seed=3, n_variants=2, max_size=96, photos=["coins"])
    assert digests(alone)["images/coins_1.jpg"] == digests(small_set)["images/coins_1.jpg"]


def test_all_photos_load(tmp_path):
    out = build_demo_set(tmp_path, n_variants=2, max_size=32)
    assert len(load_ground_truth(out).queries) == len(DEMO_PHOTOS) >= 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_variants": 1}, "n_variants"),
        ({"seed": -1}, "seed"),
        ({"max_size": 8}, "max_size"),
        ({"photos": ["lena"]}, "photos"),
        ({"photos": []}, "photos"),
    ],
)
def test_argument_errors(tmp_path, kwargs, message):
    with pytest.raises(ArgumentError, match=f"^{message}: "):
        build_demo_set(tmp_path, **kwargs)


def test_missing_scikit_image_is_a_clear_error(tmp_path, monkeypatch):
    def no_skimage(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(demo.importlib, "import_module", no_skimage)
    with pytest.raises(DependencyError, match=r"pip install 'asmkit\[demo\]'"):
        build_demo_set(tmp_path, photos=["coins"])
