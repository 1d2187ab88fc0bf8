"""asmkit.compat.legacy: the restricted loader for the reference package's pickles."""

from __future__ import annotations

import os
import pickle
import subprocess

import numpy as np
import pytest

from asmkit.compat.legacy import (
    LegacyFormatError,
    codebook_from_legacy,
    ivf_from_legacy,
    load_legacy_pickle,
    pack_uint32_codes,
)


def _dump(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)


# -- admitted content ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_and_plain_containers_round_trip(tmp_path, protocol):
    rng = np.random.default_rng(0)
    obj = {
        "type": "X",
        "arrays": [rng.standard_normal((4, 3)).astype(np.float32), np.arange(5, dtype=np.uint32), None],
        "scalars": (np.int64(7), np.float32(1.5), np.bool_(True)),
        "plain": {
            "a": 1,
            "b": 2.5,
            "c": "s",
            "d": b"bytes",
            "e": {1, 2},
            "f": frozenset([3]),
            "g": bytearray(b"xy"),
            "h": 1 + 2j,
        },
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    }
    _dump(tmp_path / "x.pkl", obj, protocol)
    loaded = load_legacy_pickle(tmp_path / "x.pkl")
    assert loaded["type"] == "X"
    for a, b in zip(loaded["arrays"][:2], obj["arrays"][:2]):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert loaded["arrays"][2] is None
    assert loaded["scalars"] == obj["scalars"]
    assert type(loaded["scalars"][0]) is np.int64
    assert loaded["plain"] == obj["plain"]
    np.testing.assert_array_equal(loaded["fortran"], obj["fortran"])


def test_reference_codebook_pickle_loads(tmp_path):
    asmk_codebook = pytest.importorskip("asmk.codebook")
    asmk_index = pytest.importorskip("asmk.index")
    io_helpers = pytest.importorskip("asmk.io_helpers")
    rng = np.random.default_rng(1)
    centroids = rng.standard_normal((16, 8)).astype(np.float32)
    cdb = asmk_codebook.Codebook(asmk_index.FaissL2Index(), size=16)
    cdb.index(centroids)
    io_helpers.save_pickle(str(tmp_path / "cb.pkl"), cdb.state_dict())

    state = load_legacy_pickle(tmp_path / "cb.pkl")
    assert state["type"] == "Codebook"
    assert state["params"] == {"size": 16}
    np.testing.assert_array_equal(state["state"]["centroids"], centroids)

    pytest.importorskip("asmkit.codebook")
    cb = codebook_from_legacy(state)
    np.testing.assert_array_equal(cb.centroids, centroids)
    # Same nearest words as a brute-force L2 search.
    x = rng.standard_normal((30, 8)).astype(np.float32)
    d2 = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(cb.quantize(x, 1)[:, 0], d2.argmin(1))


def test_reference_ivf_pickle_flattens(tmp_path):
    inverted_file = pytest.importorskip("asmk.inverted_file")
    hamming = pytest.importorskip("asmk.hamming")
    io_helpers = pytest.importorskip("asmk.io_helpers")
    rng = np.random.default_rng(2)
    agg = rng.standard_normal((7, 100)).astype(np.float32)  # 100 bits: padded to 128
    codes32 = hamming.binarize_and_pack_2D(agg)
    words = np.array([3, 0, 3, 1, 0, 3, 2])
    imids = np.array([0, 0, 1, 1, 2, 2, 2])
    ivf = inverted_file.IVF.initialize_empty(codebook_size=5, use_idf=True)
    ivf.add(codes32, words, imids.copy())
    io_helpers.save_pickle(str(tmp_path / "ivf.pkl"), ivf.state_dict())

    flat = ivf_from_legacy(load_legacy_pickle(tmp_path / "ivf.pkl"))
    assert flat.binary and flat.use_idf and flat.n_images == 3 and flat.dim_bits == 128
    np.testing.assert_array_equal(flat.counts, [2, 1, 1, 3, 0])
    np.testing.assert_array_equal(flat.words, [0, 0, 1, 2, 3, 3, 3])
    # Entries of each word keep the order they were added in.
    order = np.array([1, 4, 3, 6, 0, 2, 5])
    np.testing.assert_array_equal(flat.image_ids, imids[order])
    # MSB-first bits: bit j of the aggregate is bit 63 - (j % 64) of uint64 word j // 64.
    bits = agg[order] > 0
    for j in range(100):
        got = (flat.vectors[:, j // 64] >> np.uint64(63 - j % 64)) & np.uint64(1)
        np.testing.assert_array_equal(got.astype(bool), bits[:, j])
    assert not (flat.vectors[:, 1] & np.uint64((1 << 28) - 1)).any()  # pad bits zero
    np.testing.assert_allclose(flat.idf, ivf.idf)


def test_pack_uint32_codes_odd_width():
    codes = np.array([[0x80000000, 0x1, 0xFFFFFFFF]], dtype=np.uint32)
    packed = pack_uint32_codes(codes)
    assert packed.dtype == np.uint64 and packed.shape == (1, 2)
    assert int(packed[0, 0]) == (0x80000000 << 32) | 0x1
    assert int(packed[0, 1]) == 0xFFFFFFFF << 32


# -- refused content ----------------------------------------------------------------------


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _SubprocessCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


@pytest.mark.parametrize(
    "payload, refused",
    [
        (_SystemCall, "refused global posix.system"),
        (_EvalCall, "refused global builtins.eval"),
        (_SubprocessCall, "refused global subprocess.call"),
    ],
)
def test_code_execution_is_refused_and_not_run(tmp_path, payload, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    # Nested inside an otherwise legitimate state dict.
    _dump(path, {"type": "Codebook", "state": {"centroids": np.zeros((2, 2), np.float32), "x": payload(marker)}})
    with pytest.raises(LegacyFormatError, match=refused) as info:
        load_legacy_pickle(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    # Sanity check that the payload does execute under plain pickle.
    if payload is _SystemCall:
        with open(path, "rb") as fh:
            pickle.load(fh)  # noqa: S301 - proves the test payload is live
        assert marker.exists()


class Arbitrary:
    def __init__(self):
        self.value = 1


def test_arbitrary_class_is_refused(tmp_path):
    path = tmp_path / "cls.pkl"
    _dump(path, [Arbitrary()])
    with pytest.raises(LegacyFormatError, match=r"refused global .*Arbitrary"):
        load_legacy_pickle(path)


def test_other_numpy_globals_are_refused(tmp_path):
    path = tmp_path / "np.pkl"
    _dump(path, np.load)
    with pytest.raises(LegacyFormatError, match="refused global numpy.load"):
        load_legacy_pickle(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pkl"):
        load_legacy_pickle(tmp_path / "nothere.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(LegacyFormatError, match="junk.pkl: not a readable legacy pickle"):
        load_legacy_pickle(tmp_path / "junk.pkl")
    _dump(tmp_path / "t.pkl", {"a": np.arange(100)})
    data = (tmp_path / "t.pkl").read_bytes()
    (tmp_path / "t.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(LegacyFormatError, match="t.pkl: not a readable legacy pickle"):
        load_legacy_pickle(tmp_path / "t.pkl")


def test_state_validation():
    with pytest.raises(LegacyFormatError, match="expected a 'Codebook'"):
        codebook_from_legacy({"type": "IVF", "state": {}})
    with pytest.raises(LegacyFormatError, match="never trained"):
        codebook_from_legacy({"type": "Codebook", "params": {"size": 4}, "state": {"centroids": None}})
    with pytest.raises(LegacyFormatError, match="expected a 2-D float array"):
        codebook_from_legacy({"type": "Codebook", "state": {"centroids": np.zeros(3)}})
    with pytest.raises(LegacyFormatError, match="expected a reference state_dict"):
        ivf_from_legacy([1, 2])
    with pytest.raises(LegacyFormatError, match="inconsistent IVF sizes"):
        ivf_from_legacy(
            {
                "type": "IVF",
                "params": {},
                "state": {
                    "ivf_vecs": [None],
                    "ivf_image_ids": [None, None],
                    "counts": np.zeros(1),
                    "idf": np.ones(1),
                    "n_images": 0,
                },
            }
        )


def test_errors_are_file_format_errors_naming_the_file(tmp_path):
    from asmkit._validation import AsmkitError, FileFormatError

    path = tmp_path / "junk.pkl"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(FileFormatError) as info:
        load_legacy_pickle(path)
    assert isinstance(info.value, (LegacyFormatError, AsmkitError, ValueError))
    assert info.value.path == str(path)
    # A state read from a file names that file; one passed alone is called "state".
    state = {"type": "Codebook", "params": {"size": 4}, "state": {"centroids": None}}
    with pytest.raises(LegacyFormatError, match=r"^.*cb\.pkl: the reference codebook was never trained") as info:
        codebook_from_legacy(state, path=tmp_path / "cb.pkl")
    assert info.value.path == str(tmp_path / "cb.pkl")
    with pytest.raises(LegacyFormatError, match="^state: holds a 'Codebook', expected a 'IVF'") as info:
        ivf_from_legacy(state)
    assert info.value.path == "state"
