"""asmkit.storage: directory of .npy arrays + manifest.json, atomic and checksummed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from asmkit import storage
from asmkit._validation import ArgumentError, AsmkitError
from asmkit.storage import StorageError, load_arrays, save_arrays


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "codes": rng.integers(0, 2**63, size=(50, 2), dtype=np.uint64),
        "aggregates": rng.standard_normal((50, 16)).astype(np.float32),
        "offsets": np.arange(11, dtype=np.int64),
        "flags": np.array([True, False, True]),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "scalar": np.array(3.5),
    }


def test_round_trip_and_manifest(tmp_path):
    arrays = _arrays()
    meta = {"params": {"alpha": 3.0, "binary": True}, "n_images": 10}
    target = tmp_path / "x.asmkit"
    save_arrays(target, arrays, meta, kind="index")
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["format"] == "asmkit"
    assert manifest["kind"] == "index"
    assert manifest["format_version"] == 1
    assert manifest["arrays"]["aggregates"]["shape"] == [50, 16]
    assert manifest["arrays"]["aggregates"]["dtype"] == "<f4"
    assert len(manifest["arrays"]["codes"]["sha256"]) == 64
    for mmap in (True, False):
        loaded, loaded_meta = load_arrays(target, kind="index", mmap=mmap)
        assert loaded_meta == meta
        assert set(loaded) == set(arrays)
        for name, array in arrays.items():
            assert loaded[name].dtype == array.dtype
            np.testing.assert_array_equal(loaded[name], array)


def test_mmap_is_read_only_memmap(tmp_path):
    target = tmp_path / "x"
    save_arrays(target, {"a": np.arange(1000, dtype=np.float32)}, {}, kind="index")
    loaded, _ = load_arrays(target, kind="index", mmap=True)
    assert isinstance(loaded["a"], np.memmap)
    with pytest.raises(ValueError):
        loaded["a"][0] = 1.0
    loaded, _ = load_arrays(target, kind="index", mmap=False)
    assert not isinstance(loaded["a"], np.memmap)
    loaded["a"][0] = 1.0


def test_non_contiguous_input_is_saved_by_value(tmp_path):
    base = np.arange(60, dtype=np.int32).reshape(6, 10)
    view = base[::2, 1::3]
    save_arrays(tmp_path / "x", {"v": view, "f": np.asfortranarray(base)}, {}, kind="index")
    loaded, _ = load_arrays(tmp_path / "x", kind="index")
    np.testing.assert_array_equal(loaded["v"], view)
    np.testing.assert_array_equal(loaded["f"], base)


def test_overwrite_replaces_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x"
    save_arrays(target, {"a": np.zeros(3)}, {"v": 1}, kind="index")
    save_arrays(target, {"b": np.ones(2)}, {"v": 2}, kind="index")
    loaded, meta = load_arrays(target, kind="index")
    assert set(loaded) == {"b"} and meta == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_arrays(tmp_path / "nope", kind="index")


def test_missing_manifest(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(StorageError, match="not an asmkit directory"):
        load_arrays(tmp_path / "d", kind="index")


def test_plain_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("hello")
    with pytest.raises(StorageError, match="is a file"):
        load_arrays(tmp_path / "f", kind="index")
    with pytest.raises(StorageError, match="f: exists and is not an asmkit directory"):
        save_arrays(tmp_path / "f", {}, {}, kind="index")


def test_storage_error_is_a_user_error():
    # The command line reports AsmkitError subclasses in one line; ValueError keeps older
    # `except ValueError` handlers working.
    assert issubclass(StorageError, AsmkitError) and issubclass(StorageError, ValueError)


def test_wrong_kind(tmp_path):
    save_arrays(tmp_path / "x", {"a": np.zeros(3)}, {}, kind="codebook")
    with pytest.raises(StorageError, match="expected a 'index'"):
        load_arrays(tmp_path / "x", kind="index")


def _edit_manifest(target, **changes):
    path = target / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_newer_and_invalid_format_version(tmp_path):
    target = tmp_path / "x"
    save_arrays(target, {"a": np.zeros(3)}, {}, kind="index")
    _edit_manifest(target, format_version=2)
    with pytest.raises(StorageError, match="format_version 2 is newer"):
        load_arrays(target, kind="index")
    _edit_manifest(target, format_version="1")
    with pytest.raises(StorageError, match="invalid format_version"):
        load_arrays(target, kind="index")
    _edit_manifest(target, format="other")
    with pytest.raises(StorageError, match="not an asmkit manifest"):
        load_arrays(target, kind="index")


def test_missing_array_file(tmp_path):
    target = tmp_path / "x"
    save_arrays(target, {"a": np.zeros(3), "b": np.ones(3)}, {}, kind="index")
    (target / "b.npy").unlink()
    with pytest.raises(StorageError, match=r"b\.npy: missing array file"):
        load_arrays(target, kind="index")


def test_truncated_file(tmp_path):
    target = tmp_path / "x"
    save_arrays(target, {"a": np.arange(100, dtype=np.float64)}, {}, kind="index")
    data = (target / "a.npy").read_bytes()
    (target / "a.npy").write_bytes(data[:-8])
    with pytest.raises(StorageError, match=r"a\.npy: .*truncated"):
        load_arrays(target, kind="index", verify=False)


def test_truncated_file_with_matching_manifest_size(tmp_path):
    # A manifest edited to the short size still fails: the .npy header gives the real size.
    target = tmp_path / "x"
    save_arrays(target, {"a": np.arange(100, dtype=np.float64)}, {}, kind="index")
    data = (target / "a.npy").read_bytes()
    (target / "a.npy").write_bytes(data[:-8])
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["arrays"]["a"]["nbytes"] = len(data) - 8
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StorageError, match=r"a\.npy: size does not match its header"):
        load_arrays(target, kind="index", verify=False)


@pytest.mark.parametrize("content", [b"", b"garbage!" * 20, b"\x93NUMPY\x09\x00" + b"x" * 150])
def test_array_file_that_is_not_npy(tmp_path, content):
    # Same size as in the manifest, so that only the header read can catch it.
    target = tmp_path / "x"
    save_arrays(target, {"a": np.arange(10, dtype=np.float64)}, {}, kind="index")
    (target / "a.npy").write_bytes(content)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["arrays"]["a"]["nbytes"] = len(content)
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StorageError, match=r"a\.npy: not a readable \.npy file"):
        load_arrays(target, kind="index", verify=False)


def test_flipped_byte_is_detected_only_with_verify(tmp_path):
    target = tmp_path / "x"
    array = np.arange(100, dtype=np.float32)
    save_arrays(target, {"a": array}, {}, kind="index")
    raw = bytearray((target / "a.npy").read_bytes())
    raw[-5] ^= 0x01
    (target / "a.npy").write_bytes(bytes(raw))
    with pytest.raises(StorageError, match=r"a\.npy: SHA-256 mismatch"):
        load_arrays(target, kind="index")
    loaded, _ = load_arrays(target, kind="index", verify=False)
    assert not np.array_equal(loaded["a"], array)


def test_dtype_or_shape_mismatch(tmp_path):
    target = tmp_path / "x"
    save_arrays(target, {"a": np.zeros((4, 2), dtype=np.float32)}, {}, kind="index")
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["arrays"]["a"]["shape"] = [2, 4]
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StorageError, match=r"a\.npy: holds float32 \(4, 2\) but the manifest says"):
        load_arrays(target, kind="index")


def test_path_traversal_in_manifest_is_refused(tmp_path):
    target = tmp_path / "x"
    save_arrays(target, {"a": np.zeros(3)}, {}, kind="index")
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["arrays"]["a"]["file"] = "../a.npy"
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StorageError, match="invalid file name"):
        load_arrays(target, kind="index")


def test_object_arrays_refused_on_save(tmp_path):
    with pytest.raises(ArgumentError, match=r"arrays\['o'\]: dtype object"):
        save_arrays(tmp_path / "x", {"o": np.array([1, "a"], dtype=object)}, {}, kind="index")
    with pytest.raises(ArgumentError, match="not storable"):
        save_arrays(tmp_path / "x", {"s": np.zeros(2, dtype=[("a", "i4")])}, {}, kind="index")
    assert not (tmp_path / "x").exists()


def test_object_arrays_refused_on_load(tmp_path):
    target = tmp_path / "x"
    save_arrays(target, {"a": np.zeros(3)}, {}, kind="index")
    # Forge a pickled object array behind the manifest's back.
    np.save(target / "a.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["arrays"]["a"].update(dtype="|O", shape=[2], nbytes=(target / "a.npy").stat().st_size)
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StorageError, match="object dtype"):
        load_arrays(target, kind="index", verify=False)


def test_bad_inputs_on_save(tmp_path):
    with pytest.raises(ArgumentError, match=r"arrays\['a'\]: expected a numpy array"):
        save_arrays(tmp_path / "x", {"a": [1, 2]}, {}, kind="index")
    with pytest.raises(ArgumentError, match="invalid array name"):
        save_arrays(tmp_path / "x", {"../evil": np.zeros(1)}, {}, kind="index")
    with pytest.raises(ArgumentError, match="meta: not JSON-serialisable"):
        save_arrays(tmp_path / "x", {}, {"x": object()}, kind="index")
    with pytest.raises(ArgumentError, match="kind"):
        save_arrays(tmp_path / "x", {}, {}, kind="")


def test_interrupted_save_leaves_previous_content(tmp_path, monkeypatch):
    target = tmp_path / "x"
    old = np.arange(10, dtype=np.int64)
    save_arrays(target, {"a": old}, {"v": 1}, kind="index")

    real_write = storage._write_npy
    calls = []

    def failing_write(path, array):
        calls.append(path)
        if len(calls) == 2:
            real_write(path, array[: len(array) // 2])  # a partial file, then the crash
            raise KeyboardInterrupt("simulated crash mid-write")
        real_write(path, array)

    monkeypatch.setattr(storage, "_write_npy", failing_write)
    with pytest.raises(KeyboardInterrupt):
        save_arrays(target, {"a": old + 1, "b": np.ones(100)}, {"v": 2}, kind="index")
    loaded, meta = load_arrays(target, kind="index")
    assert meta == {"v": 1}
    np.testing.assert_array_equal(loaded["a"], old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_failed_swap_restores_previous_content(tmp_path, monkeypatch):
    target = tmp_path / "x"
    save_arrays(target, {"a": np.zeros(3)}, {"v": 1}, kind="index")
    real_replace = storage.os.replace

    def failing_replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("simulated failure while swapping")
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        save_arrays(target, {"a": np.ones(3)}, {"v": 2}, kind="index")
    _, meta = load_arrays(target, kind="index")
    assert meta == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
