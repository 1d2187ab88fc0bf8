"""GeometryStore: add, remove, lookup, atomic save and memory-mapped load."""

from __future__ import annotations

import numpy as np
import pytest

from asmkit._validation import ArgumentError, FileFormatError
from asmkit.geometry import GeometryStore, sort_by_word
from asmkit.storage import StorageError, save_arrays


def image(rng, n):
    kp = rng.uniform(0, 500, (n, 4)).astype(np.float32)
    return kp, rng.integers(0, 64, n)


def filled(rng, ids=(4, 1, 9), sizes=(5, 0, 7)):
    store = GeometryStore()
    parts = [image(rng, n) for n in sizes]
    store.add(np.array(ids), [p[0] for p in parts], [p[1] for p in parts])
    return store, dict(zip(ids, parts))


def same_features(store, image_id, part):
    kp, words, _ = store.get(image_id)
    want_kp, want_words, _ = sort_by_word(*part)
    np.testing.assert_array_equal(kp, want_kp)
    np.testing.assert_array_equal(words, want_words)


def test_add_groups_images_by_ascending_id_and_sorts_words():
    rng = np.random.default_rng(0)
    store, parts = filled(rng)
    np.testing.assert_array_equal(store.ids, [1, 4, 9])
    np.testing.assert_array_equal(store.offsets, [0, 0, 5, 12])
    for image_id, part in parts.items():
        same_features(store, image_id, part)
        assert np.all(np.diff(store.get(image_id)[1]) >= 0)
    store.add([2], *zip(image(rng, 3)))
    np.testing.assert_array_equal(store.ids, [1, 2, 4, 9])
    for image_id, part in parts.items():
        same_features(store, image_id, part)


def test_remove_keeps_the_other_images():
    rng = np.random.default_rng(1)
    store, parts = filled(rng)
    store.remove([4])
    np.testing.assert_array_equal(store.ids, [1, 9])
    same_features(store, 9, parts[9])
    with pytest.raises(ArgumentError, match="not in the geometry store"):
        store.remove([4])
    with pytest.raises(ArgumentError, match="already in the geometry store"):
        store.add([9], [np.zeros((1, 4))], [[0]])


def test_signatures_follow_their_features(tmp_path):
    rng = np.random.default_rng(4)
    kp, words = image(rng, 6)
    sigs = rng.integers(0, 2**63, (6, 2), dtype=np.uint64)
    store = GeometryStore()
    store.add([7, 2], [kp, kp[:2]], [words, words[:2]], [sigs, sigs[:2]])
    order = np.argsort(words, kind="stable")
    np.testing.assert_array_equal(store.get(7)[2], sigs[order])
    store.remove([2])
    store.save(tmp_path / "geo")
    np.testing.assert_array_equal(GeometryStore.load(tmp_path / "geo").get(7)[2], sigs[order])
    assert store.nbytes == 6 * (16 + 4 + 16) + 8 + 2 * 8
    with pytest.raises(ArgumentError, match="signatures"):
        store.add([3], [kp[:1]], [words[:1]], [np.zeros((1, 3), np.uint64)])


def test_bytes_per_image_is_what_the_arrays_hold():
    rng = np.random.default_rng(2)
    store, _ = filled(rng, ids=(0, 1), sizes=(10, 30))
    # 16 bytes of keypoint and 4 of word per feature; an id and an offset per image.
    assert store.nbytes == 40 * 20 + 2 * 8 + 3 * 8
    assert store.bytes_per_image == store.nbytes / 2


def test_save_load_round_trip_memory_mapped(tmp_path):
    rng = np.random.default_rng(3)
    store, parts = filled(rng)
    store.save(tmp_path / "geo")
    loaded = GeometryStore.load(tmp_path / "geo")
    assert isinstance(loaded.keypoints.base, np.memmap) or isinstance(loaded.keypoints, np.memmap)
    for image_id, part in parts.items():
        same_features(loaded, image_id, part)
    loaded.add([20], *zip(image(rng, 2)))  # a memory-mapped store still grows
    loaded.save(tmp_path / "geo")  # and replaces its own directory atomically
    assert len(GeometryStore.load(tmp_path / "geo")) == 4


def test_load_refuses_inconsistent_or_wrong_directories(tmp_path):
    arrays = {
        "ids": np.array([0, 1]),
        "offsets": np.array([0, 3, 2]),
        "keypoints": np.zeros((2, 4), np.float32),
        "words": np.zeros(2, np.int32),
    }
    save_arrays(tmp_path / "bad", arrays, {}, kind="geometry")
    with pytest.raises(FileFormatError, match="bad"):
        GeometryStore.load(tmp_path / "bad")
    save_arrays(tmp_path / "other", arrays, {}, kind="index")
    with pytest.raises(StorageError, match="expected a 'geometry'"):
        GeometryStore.load(tmp_path / "other")


def test_bad_input_names_the_argument():
    store = GeometryStore()
    with pytest.raises(ArgumentError, match=r"keypoints\[0\]"):
        store.add([0], [np.full((2, 4), np.nan)], [[1, 2]])
    with pytest.raises(ArgumentError, match=r"keypoints\[0\]"):
        store.add([0], [np.zeros((2, 4))], [[1]])
    with pytest.raises(ArgumentError, match="keypoints"):
        store.add([0, 1], [np.zeros((2, 4))], [[1, 2]])
    with pytest.raises(ArgumentError, match="image_ids"):
        store.add([-1], [np.zeros((1, 4))], [[1]])
    with pytest.raises(ArgumentError, match="image_ids"):
        store.get(3)


def test_two_column_keypoints_get_unit_scale_and_zero_angle():
    kp, words, sigs = sort_by_word(np.array([[5.0, 6.0], [1.0, 2.0]]), np.array([9, 3]))
    assert sigs.shape == (2, 0)
    np.testing.assert_array_equal(kp, [[1, 2, 1, 0], [5, 6, 1, 0]])
    np.testing.assert_array_equal(words, [3, 9])
