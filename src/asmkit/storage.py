"""On-disk format: a directory of raw ``.npy`` arrays plus ``manifest.json``.

No pickle anywhere: arrays are written with ``allow_pickle=False`` and read back the same
way, optionally memory-mapped. Every array's dtype, shape, byte size and SHA-256 are kept in
the manifest, so a truncated or corrupted file is reported by name instead of silently
producing wrong scores. Saves are atomic: the new content is written into a sibling
temporary directory and swapped into place, so an interrupted save leaves the previous
content readable.

Layout of ``<path>/manifest.json``::

    {"format": "asmkit", "kind": "index", "format_version": 1, "meta": {...},
     "arrays": {"<name>": {"file": "<name>.npy", "dtype": "<f4", "shape": [M, D],
                           "nbytes": 123, "sha256": "..."}}}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ._validation import ArgumentError, AsmkitError

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "StorageError", "save_arrays", "load_arrays"]

logger = logging.getLogger(__name__)

FORMAT = "asmkit"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# Array names become file names; keep them portable and free of path separators.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_HASH_CHUNK = 1 << 22


class StorageError(AsmkitError, ValueError):
    """A stored asmkit directory is invalid, of the wrong kind, truncated or corrupted.

    Its message starts with the offending file or directory.
    """


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the renames durable; not every platform supports it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_array(name: str, array: Any) -> np.ndarray:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name == Path(MANIFEST).stem:
        raise ArgumentError(f"arrays: invalid array name {name!r} (letters, digits, '_', '.', '-')")
    if not isinstance(array, np.ndarray):
        raise ArgumentError(f"arrays[{name!r}]: expected a numpy array, got {type(array).__name__}")
    if array.dtype.hasobject or array.dtype.fields is not None:
        raise ArgumentError(
            f"arrays[{name!r}]: dtype {array.dtype} is not storable (object/structured dtypes would need pickle)"
        )
    return array


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        # copy(order="C") rather than ascontiguousarray, which turns 0-d arrays into 1-d.
        np.save(fh, array if array.flags.c_contiguous else array.copy(order="C"), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())


def save_arrays(
    path: str | os.PathLike,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    *,
    kind: str,
) -> None:
    """Atomically write arrays and metadata as an asmkit directory.

    Parameters
    ----------
    path : str or path-like
        Target directory. An existing asmkit directory there is replaced; any other
        existing file or non-asmkit directory is refused.
    arrays : mapping of str to numpy.ndarray
        Arrays of any numeric or bool dtype and any shape. Names must be plain file-name
        stems (letters, digits, ``_``, ``.``, ``-``).
    meta : mapping
        JSON-serialisable metadata (parameters, counts, ...), stored verbatim.
    kind : str
        What the directory holds (``"index"``, ``"codebook"``, ...); checked on load.

    Raises
    ------
    asmkit.ArgumentError
        On an invalid name, a value of ``arrays`` that is not a numpy array, an
        object/structured dtype, or non-JSON metadata.
    StorageError
        If the target exists and is not an asmkit directory.
    """
    if not isinstance(kind, str) or not kind:
        raise ArgumentError(f"kind: expected a non-empty string, got {kind!r}")
    checked = {name: _check_array(name, array) for name, array in arrays.items()}
    target = Path(path)
    if target.exists() and not (target.is_dir() and (target / MANIFEST).is_file()):
        raise StorageError(f"{target}: exists and is not an asmkit directory; refusing to replace it")
    try:
        meta_json = json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ArgumentError(f"meta: not JSON-serialisable ({exc})") from None

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        entries = {}
        for name, array in checked.items():
            file_name = f"{name}.npy"
            file_path = tmp / file_name
            _write_npy(file_path, array)
            entries[name] = {
                "file": file_name,
                "dtype": array.dtype.str,
                "shape": list(array.shape),
                "nbytes": file_path.stat().st_size,
                "sha256": _sha256(file_path),
            }
        manifest = {
            "format": FORMAT,
            "kind": kind,
            "format_version": FORMAT_VERSION,
            "meta": meta_json,
            "arrays": entries,
        }
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    # Swap: move the old directory aside first, so that at every instant either the old or
    # the new complete directory sits at `target` (or the old one sits in `old` if we die
    # between the two renames; it is restored on the next failure path below).
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    had_old = target.exists()
    if had_old:
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if had_old:
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    if had_old:
        shutil.rmtree(old, ignore_errors=True)
    logger.debug("saved %d arrays to %s (kind=%s)", len(checked), target, kind)


def _read_manifest(target: Path) -> dict[str, Any]:
    manifest_path = target / MANIFEST
    if not manifest_path.is_file():
        raise StorageError(f"{target}: not an asmkit directory (no {MANIFEST})")
    try:
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        raise StorageError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StorageError(f"{manifest_path}: not an asmkit manifest (format field missing or wrong)")
    return manifest


def _expected_npy_size(dtype: np.dtype, shape: tuple[int, ...], file_path: Path) -> tuple[int, int]:
    """(header length, data bytes) as read from the .npy header."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(file_path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version not in readers:
                raise ValueError(f"unsupported .npy version {version}")
            file_shape, _, file_dtype = readers[version](fh)
        except (ValueError, EOFError) as exc:
            raise StorageError(f"{file_path}: not a readable .npy file ({exc})") from None
        header_len = fh.tell()
    if file_dtype.hasobject:
        raise StorageError(f"{file_path}: object dtype refused (would need pickle)")
    if file_dtype != dtype or tuple(file_shape) != shape:
        raise StorageError(f"{file_path}: holds {file_dtype} {tuple(file_shape)} but the manifest says {dtype} {shape}")
    return header_len, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def load_arrays(
    path: str | os.PathLike,
    *,
    kind: str,
    mmap: bool = True,
    verify: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read an asmkit directory written by :func:`save_arrays`.

    Parameters
    ----------
    path : str or path-like
        The directory.
    kind : str
        Expected kind; a directory of another kind is refused.
    mmap : bool
        Memory-map the arrays read-only (fast load; pages are read on first touch).
        With False, arrays are read into memory and are writable.
    verify : bool
        Check every file's SHA-256 against the manifest (reads every byte once). Sizes,
        dtypes and shapes are checked either way.

    Returns
    -------
    arrays : dict of str to numpy.ndarray
        The arrays, by name.
    meta : dict
        The metadata given to :func:`save_arrays`.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    StorageError
        (a ``ValueError``) naming the offending file if the directory is not an asmkit
        directory, has another kind or a newer format version, or an array file is
        missing, truncated, of the wrong dtype/shape, or corrupted.
    """
    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(f"{target}: no such asmkit directory")
    if not target.is_dir():
        raise StorageError(f"{target}: not an asmkit directory (it is a file)")
    manifest = _read_manifest(target)
    manifest_path = target / MANIFEST
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StorageError(f"{manifest_path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise StorageError(
            f"{manifest_path}: format_version {version} is newer than this asmkit supports "
            f"({FORMAT_VERSION}); upgrade asmkit"
        )
    if manifest.get("kind") != kind:
        raise StorageError(f"{manifest_path}: holds a {manifest.get('kind')!r}, expected a {kind!r}")
    entries = manifest.get("arrays")
    meta = manifest.get("meta")
    if not isinstance(entries, dict) or not isinstance(meta, dict):
        raise StorageError(f"{manifest_path}: malformed manifest ('arrays' and 'meta' must be objects)")

    arrays: dict[str, np.ndarray] = {}
    for name, entry in entries.items():
        try:
            file_name = entry["file"]
            dtype = np.dtype(entry["dtype"])
            shape = tuple(int(s) for s in entry["shape"])
            nbytes = int(entry["nbytes"])
            sha = str(entry["sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StorageError(f"{manifest_path}: malformed entry for array {name!r} ({exc})") from None
        if not isinstance(file_name, str) or Path(file_name).name != file_name:
            raise StorageError(f"{manifest_path}: array {name!r} has an invalid file name {file_name!r}")
        if dtype.hasobject:
            raise StorageError(f"{manifest_path}: array {name!r} has object dtype (would need pickle)")
        file_path = target / file_name
        if not file_path.is_file():
            raise StorageError(f"{file_path}: missing array file (listed in {MANIFEST})")
        size = file_path.stat().st_size
        if size != nbytes:
            raise StorageError(f"{file_path}: {size} bytes but the manifest says {nbytes} (truncated or replaced)")
        header_len, data_bytes = _expected_npy_size(dtype, shape, file_path)
        if header_len + data_bytes != size:
            raise StorageError(f"{file_path}: size does not match its header (truncated)")
        if verify and _sha256(file_path) != sha:
            raise StorageError(f"{file_path}: SHA-256 mismatch (corrupted)")
        if mmap and data_bytes == 0:
            # numpy cannot memory-map an empty array; an empty one costs nothing to read.
            array = np.load(file_path, allow_pickle=False)
        else:
            array = np.load(file_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        arrays[name] = array
    logger.debug("loaded %d arrays from %s (kind=%s, mmap=%s)", len(arrays), target, kind, mmap)
    return arrays, meta
