"""Small user files: atomic text writes, and reads that name the file when it is not what
it should be (a :class:`asmkit.FileFormatError`, never a bare numpy or zipfile error)."""

from __future__ import annotations

import json
import os
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ._validation import FileFormatError

__all__ = ["load_npy", "load_npz", "read_json", "read_lines", "write_text_atomic"]

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
# What np.load raises on a damaged file of the right magic: a bad header (ValueError), a
# short file (EOFError, or ValueError from a short read), a damaged zip archive (BadZipFile).
_NUMPY_FORMAT_ERRORS = (ValueError, EOFError, zipfile.BadZipFile)


def _load_numpy(path: str | os.PathLike, what: str, magic: bytes, kind: str):
    """The array of a ``.npy`` file, or the arrays of a ``.npz`` archive by name."""
    with open(path, "rb") as fh:
        # np.load takes any other file for a pickle, and its error then suggests
        # allow_pickle=True: never the advice to give about a file of unknown origin.
        if fh.read(len(magic)) != magic:
            raise FileFormatError(path, f"not {what} (not a {kind} file)")
        fh.seek(0)
        try:
            data = np.load(fh, allow_pickle=False)
            if isinstance(data, np.lib.npyio.NpzFile):
                with data:
                    return {key: data[key] for key in data.files}
            return data
        except _NUMPY_FORMAT_ERRORS as exc:
            raise FileFormatError(path, f"not {what} (a damaged {kind} file: {exc})") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a sibling temporary file and ``os.replace``.

    A crash leaves either the old file or the new one, never half of it. The file gets the
    usual permissions (0666 minus the umask), unlike ``tempfile.mkstemp``'s 0600, so a
    report or pairs file is readable by whoever reads the folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_npy(path: str | os.PathLike, what: str) -> np.ndarray:
    """The array of a ``.npy`` file, read into memory without pickle.

    ``what`` names the expected content (``"a scores matrix"``) in the error message.

    Raises
    ------
    OSError
        The file cannot be opened (``FileNotFoundError``, ``IsADirectoryError``, ...).
    asmkit.FileFormatError
        Not a ``.npy`` file (another format, empty, truncated, pickled objects).
    """
    return _load_numpy(path, what, _NPY_MAGIC, ".npy")


def load_npz(path: str | os.PathLike, what: str, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every array of a ``.npz`` file, by name, read into memory without pickle.

    Raises
    ------
    OSError
        The file cannot be opened.
    asmkit.FileFormatError
        Not a ``.npz`` archive (another format, damaged or truncated, pickled objects), or
        one of ``required`` is missing.
    """
    arrays = _load_numpy(path, what, _ZIP_MAGIC, ".npz")
    missing = [key for key in required if key not in arrays]
    if missing:
        raise FileFormatError(path, f"not {what} (no array {', '.join(map(repr, missing))})")
    return arrays


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped.

    Raises
    ------
    OSError
        The file cannot be opened.
    asmkit.FileFormatError
        Not UTF-8 text (an image or a binary array, say).
    """
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FileFormatError(path, f"not {what} (not UTF-8 text)") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The content of a UTF-8 JSON file.

    Raises
    ------
    OSError
        The file cannot be opened.
    asmkit.FileFormatError
        Not UTF-8 JSON.
    """
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(path, f"not {what} (invalid JSON: {exc})") from None
