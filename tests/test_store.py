"""HDF5 feature store and resumable extraction."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from broken_files import make_broken_folder  # noqa: E402

from asmkit._validation import ArgumentError, FileFormatError  # noqa: E402
from asmkit.features import FeatureStore, ImageFeatures, extract_features  # noqa: E402

CONFIG = {"extractor": "test", "max_features": 10, "scales": (1.0, 0.5)}


def feats(n: int, d: int = 4, seed: int = 0, full: bool = True) -> ImageFeatures:
    rng = np.random.default_rng(seed)
    return ImageFeatures(
        descriptors=rng.normal(size=(n, d)),
        keypoints=rng.normal(size=(n, 4)) if full else None,
        attention=rng.random(n) if full else None,
        global_descriptor=rng.normal(size=8) if full else None,
    )


def test_put_get_round_trip(tmp_path):
    path = tmp_path / "deep" / "f.h5"
    with FeatureStore(path, CONFIG) as store:
        store.put("a.jpg", feats(5))
        store.put("sub/b.jpg", feats(3, seed=1, full=False))
        store.put("sub/c.jpg", feats(0, seed=2))
        assert store.names() == ["a.jpg", "sub/b.jpg", "sub/c.jpg"] and len(store) == 3
        assert store.has("a.jpg") and "sub/b.jpg" in store and not store.has("sub") and not store.has("zz.jpg")
        got = store.get("a.jpg")
        expected = feats(5)
        for key in ("descriptors", "keypoints", "attention", "global_descriptor"):
            assert getattr(got, key).dtype == np.float32
            np.testing.assert_array_equal(getattr(got, key), getattr(expected, key))
        b = store.get("sub/b.jpg")
        assert b.keypoints is None and b.attention is None and b.global_descriptor is None
        assert store.get("sub/c.jpg").descriptors.shape == (0, 4)
        with pytest.raises(KeyError, match="missing.jpg"):
            store.get("missing.jpg")
        store.put("a.jpg", feats(2, seed=7))  # replace
        assert len(store.get("a.jpg")) == 2
    # Reopened read-only without knowing the config.
    with FeatureStore(path, None) as store:
        assert store.config == {"extractor": "test", "max_features": 10, "scales": [1.0, 0.5]}
        assert store.names() == ["a.jpg", "sub/b.jpg", "sub/c.jpg"]
        with pytest.raises(ArgumentError, match="config: .*read-only"):
            store.put("x.jpg", feats(1))


def test_stack_matches_concatenation(tmp_path):
    parts = {"a.jpg": feats(5, seed=1), "b.jpg": feats(0, seed=2), "c.jpg": feats(3, seed=3)}
    with FeatureStore(tmp_path / "f.h5", CONFIG) as store:
        for name, f in parts.items():
            store.put(name, f)
        order = ["c.jpg", "b.jpg", "a.jpg"]
        vecs, image_ids = store.stack(order)
        assert vecs.dtype == np.float32 and image_ids.dtype == np.int64 and vecs.flags.c_contiguous
        np.testing.assert_array_equal(vecs, np.vstack([parts[n].descriptors for n in order]))
        np.testing.assert_array_equal(image_ids, [0, 0, 0, 2, 2, 2, 2, 2])
        all_vecs, all_ids = store.stack()
        np.testing.assert_array_equal(all_ids, [0] * 5 + [2] * 3)
        with pytest.raises(KeyError, match="nope.jpg"):
            store.stack(["a.jpg", "nope.jpg"])
        with pytest.raises(ArgumentError, match="names: no images"):
            store.stack([])
        store.put("d.jpg", feats(2, d=6))
        with pytest.raises(FileFormatError, match="dimensions differ"):
            store.stack(["a.jpg", "d.jpg"])


def test_config_mismatch_raises_or_overwrites(tmp_path):
    path = tmp_path / "f.h5"
    with FeatureStore(path, CONFIG) as store:
        store.put("a.jpg", feats(2))
    with FeatureStore(path, {**CONFIG, "scales": [1.0, 0.5]}) as store:  # tuple == list after JSON
        assert store.has("a.jpg")
    changed = {**CONFIG, "max_features": 20, "extra": 1}
    with pytest.raises(FileFormatError) as info:
        FeatureStore(path, changed)
    message = str(info.value)
    assert info.value.path == str(path) and "extra, max_features" in message and "overwrite_on_mismatch" in message
    with FeatureStore(path, changed, overwrite_on_mismatch=True) as store:
        assert len(store) == 0 and store.config["max_features"] == 20


def test_rejects_foreign_files_and_bad_input(tmp_path):
    foreign = tmp_path / "other.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    with pytest.raises(FileFormatError, match="other.h5: not an asmkit feature store"):
        FeatureStore(foreign, CONFIG)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(FileFormatError, match="text.h5: not a feature store .cannot open as HDF5"):
        FeatureStore(text, CONFIG)
    with FeatureStore(text, CONFIG, overwrite_on_mismatch=True) as store:
        assert len(store) == 0
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        FeatureStore(tmp_path / "missing.h5", None)
    with pytest.raises(ArgumentError, match="config: not JSON"):
        FeatureStore(tmp_path / "x.h5", {"a": object()})
    with FeatureStore(tmp_path / "y.h5", CONFIG) as store:
        for bad in ("", "/abs.jpg", "a/../b.jpg", "a//b.jpg"):
            with pytest.raises(ArgumentError, match="name: .*relative path"):
                store.put(bad, feats(1))
        with pytest.raises(ArgumentError, match="feats: expected ImageFeatures"):
            store.put("a.jpg", np.zeros((2, 4)))
        store.put("a.jpg", feats(1))
        with pytest.raises(ArgumentError, match="name: .*inside image"):
            store.put("a.jpg/b.jpg", feats(1))
        store.put("dir/b.jpg", feats(1))
        with pytest.raises(ArgumentError, match="name: .*clashes"):
            store.put("dir", feats(1))


def test_partial_image_is_not_counted_and_is_rewritten(tmp_path):
    path = tmp_path / "f.h5"
    with FeatureStore(path, CONFIG) as store:
        store.put("a.jpg", feats(2))
    with h5py.File(path, "a") as f:  # what an interrupted put leaves behind
        f.create_group("b.jpg").create_dataset("keypoints", data=np.zeros((1, 4), np.float32))
    with FeatureStore(path, CONFIG) as store:
        assert store.names() == ["a.jpg"] and not store.has("b.jpg")
        store.put("b.jpg", feats(3))
        assert store.names() == ["a.jpg", "b.jpg"]


class CountingExtractor:
    """Mean colour per image; counts calls to check that resumed runs skip stored images."""

    name = "counting"

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after

    def config(self) -> dict:
        return {"extractor": self.name}

    def extract(self, image: np.ndarray) -> ImageFeatures:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # simulates the user stopping a long run
        self.calls += 1
        return ImageFeatures(descriptors=image.reshape(-1, 3).mean(axis=0, keepdims=True))


def test_extraction_resumes_after_interruption(tmp_path):
    folder = make_broken_folder(tmp_path / "imgs", n_good=4, seed=1)
    path = tmp_path / "feats.h5"
    interrupted = CountingExtractor(fail_after=5)
    with FeatureStore(path, interrupted.config()) as store:
        with pytest.raises(KeyboardInterrupt):
            extract_features(folder.root, interrupted, store=store, workers=1, progress=False)
    with FeatureStore(path, interrupted.config()) as store:
        assert len(store) == 5
        resumed = CountingExtractor()
        result = extract_features(folder.root, resumed, store=store, workers=2, progress=False)
        assert resumed.calls == len(folder.good) - 5
        assert len(result.already_stored) == 5 and result.features == {}
        assert {n for n, _ in result.failed} == set(folder.bad)
        assert store.names() == sorted(folder.good)
        again = CountingExtractor()
        result = extract_features(folder.root, again, store=store, progress=False, keep=True)
        assert again.calls == 0 and result.extracted == []


def test_extraction_refuses_a_store_of_another_extractor(tmp_path):
    folder = make_broken_folder(tmp_path / "imgs", n_good=1, seed=2, n_bad_each=0)
    with FeatureStore(tmp_path / "f.h5", {"extractor": "other"}) as store:
        with pytest.raises(ValueError, match="another extractor config"):
            extract_features(folder.root, CountingExtractor(), store=store, progress=False)


def test_a_store_in_use_by_another_process_is_never_discarded(tmp_path):
    # Two jobs sharing a cache folder: HDF5's lock refuses the second opener. That is not
    # a damaged file, so even overwrite_on_mismatch must keep it (it used to delete it).
    import subprocess

    path = tmp_path / "f.h5"
    with FeatureStore(path, CONFIG) as store:
        store.put("a.jpg", feats(5))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import h5py, sys; f = h5py.File({str(path)!r}, 'r'); print('open', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(BlockingIOError, match=r"f\.h5 is in use by another process"):
            FeatureStore(path, CONFIG, overwrite_on_mismatch=True)
    finally:
        holder.communicate("")
    with FeatureStore(path, None) as store:
        assert store.names() == ["a.jpg"] and len(store.get("a.jpg")) == 5
