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

__all__ = ["write_text_atomic", "load_npy", "load_npz", "read_lines", "read_json"]

# What np.load raises on a file that is not a .npy / .npz: a wrong magic or header
# (ValueError, pickled content included since allow_pickle=False), an empty or short file
# (EOFError, or ValueError from a short read), a damaged zip archive (BadZipFile).
_NUMPY_FORMAT_ERRORS = (ValueError, EOFError, zipfile.BadZipFile)


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
    with open(path, "rb") as fh:
        try:
            data = np.load(fh, allow_pickle=False)
        except _NUMPY_FORMAT_ERRORS as exc:
            raise FileFormatError(path, f"not {what} (.npy): {exc}") from None
    if not isinstance(data, np.ndarray):
        raise FileFormatError(path, f"not {what} (.npy): it is a .npz archive")
    return data


def load_npz(path: str | os.PathLike, what: str, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every array of a ``.npz`` file, by name, read into memory without pickle.

    Raises
    ------
    OSError
        The file cannot be opened.
    asmkit.FileFormatError
        Not a ``.npz`` archive (another format, a lone ``.npy``, damaged or truncated,
        pickled objects), or one of ``required`` is missing.
    """
    with open(path, "rb") as fh:
        try:
            data = np.load(fh, allow_pickle=False)
        except _NUMPY_FORMAT_ERRORS as exc:
            raise FileFormatError(path, f"not {what} (.npz): {exc}") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise FileFormatError(path, f"not {what} (.npz): it holds a single .npy array")
        try:
            with data:
                arrays = {key: data[key] for key in data.files}
        except _NUMPY_FORMAT_ERRORS as exc:
            # A member cut short or damaged shows only when it is read.
            raise FileFormatError(path, f"not {what} (.npz): {exc}") from None
    missing = [key for key in required if key not in arrays]
    if missing:
        raise FileFormatError(path, f"not {what} (.npz): no array {', '.join(map(repr, missing))}")
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
        raise FileFormatError(path, f"not {what}: not a UTF-8 text file") from None
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
        raise FileFormatError(path, f"not {what}: not a JSON file ({exc})") from None
