"""Checks shared by every entry point, and the one rule for the exceptions they raise.

The rule: anything a user can get wrong raises a subclass of ``AsmkitError``.
- ``ArgumentError`` (also a ``ValueError``): an argument of the wrong type or value. Its
  message starts with the argument's name. A wrong type is an ``ArgumentError`` too, so
  that ``check_int(2.5)`` and ``Params(ma_query=2.5)`` fail alike.
- ``FileFormatError`` (also a ``ValueError``): a file that exists but is not what it
  should be. Its message starts with the file's path and says what the file is not.
- ``DependencyError`` (also an ``ImportError``): an optional package a feature needs is
  not installed; the message says what to install.
A missing or unreadable file is the ``OSError`` that ``open`` raises (``FileNotFoundError``,
``PermissionError``, ...), its message naming the file.
Everything else (``TypeError``, ``AttributeError``, ...) is a bug, and the command line
shows its traceback.

This module imports nothing else of asmkit, so that every module may use it.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable

import numpy as np

__all__ = [
    "AsmkitError",
    "ArgumentError",
    "FileFormatError",
    "DependencyError",
    "check_int",
    "check_float",
    "check_bool",
    "check_choice",
    "check_vecs",
    "check_ids",
]


class AsmkitError(Exception):
    """Base class of the errors a user can cause (bad arguments, bad files)."""


class ArgumentError(AsmkitError, ValueError):
    """An argument of the wrong type or value; the message names the argument."""


class FileFormatError(AsmkitError, ValueError):
    """A file that is not what it should be; the message names the file."""

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        super().__init__(f"{os.fspath(path)}: {what}")
        self.path = os.fspath(path)


class DependencyError(AsmkitError, ImportError):
    """An optional package is not installed; the message says what to install."""


def _is_int(value: Any) -> bool:
    # bool is an int subclass, and True as a count is always a mistake.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(
    value: Any, name: str, *, min: int | None = None, max: int | None = None, none: bool = False
) -> int | None:
    """``value`` as a Python int within ``[min, max]``; None passes when ``none``.

    Raises
    ------
    ArgumentError
        Not an int (bools and floats included), or out of range.
    """
    if value is None and none:
        return None
    if not _is_int(value):
        kind = "an int" + (" or None" if none else "")
        raise ArgumentError(f"{name}: expected {kind}, got {value!r}")
    if min is not None and value < min:
        raise ArgumentError(f"{name}: must be at least {min}, got {value!r}")
    if max is not None and value > max:
        raise ArgumentError(f"{name}: must be at most {max}, got {value!r}")
    return int(value)


def check_float(
    value: Any,
    name: str,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    none: bool = False,
) -> float | None:
    """``value`` as a finite Python float within ``[min, max]`` (``(min, max]`` with
    ``min_open``); ints are accepted, bools are not; None passes when ``none``.

    Raises
    ------
    ArgumentError
        Not a finite number, or out of range.
    """
    if value is None and none:
        return None
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
    ):
        raise ArgumentError(f"{name}: expected a finite number, got {value!r}")
    value = float(value)
    if min is not None and (value <= min if min_open else value < min):
        raise ArgumentError(f"{name}: must be {'above' if min_open else 'at least'} {min}, got {value!r}")
    if max is not None and value > max:
        raise ArgumentError(f"{name}: must be at most {max}, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``value`` when it is True or False (numpy bools included).

    Raises
    ------
    ArgumentError
        Anything else (0 and 1 included: a flag given as a count is a mistake).
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """``value`` when it is one of ``choices``.

    Raises
    ------
    ArgumentError
        Not one of them (the message lists them).
    """
    choices = list(choices)
    if value not in choices:
        raise ArgumentError(f"{name}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_vecs(vecs: Any, *, name: str = "vecs", dim: int | None = None) -> np.ndarray:
    """One descriptor matrix as C-contiguous float32 ``[N, D]``.

    Integer and float dtypes are converted; anything else (strings, objects, complex,
    bool) is refused.

    Raises
    ------
    ArgumentError
        Not a numeric numpy array, not 2-D, the wrong dimension ``dim``, or non-finite
        values (also after the float32 conversion, which can overflow).
    """
    if not isinstance(vecs, np.ndarray):
        raise ArgumentError(f"{name}: expected a numpy array, got {type(vecs).__name__}")
    if vecs.dtype.kind not in "fiu":
        raise ArgumentError(f"{name}: expected a float array, got dtype {vecs.dtype}")
    if vecs.ndim != 2:
        raise ArgumentError(f"{name}: expected a 2-D array [N, D], got shape {vecs.shape}")
    if dim is not None and vecs.shape[1] != dim:
        raise ArgumentError(f"{name}: descriptors have {vecs.shape[1]} dimensions, the codebook has {dim}")
    if vecs.shape[1] == 0:
        raise ArgumentError(f"{name}: descriptors must have at least one dimension")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(vecs, dtype=np.float32)
    # In blocks of rows: one np.isfinite over all of [N, D] would allocate N·D bytes.
    step = max(1, (1 << 20) // max(out.shape[1], 1))
    for begin in range(0, out.shape[0], step):
        if not np.isfinite(out[begin : begin + step]).all():
            raise ArgumentError(f"{name}: contains NaN or infinite values (after conversion to float32)")
    return out


def check_ids(image_ids: Any, *, name: str = "image_ids", length: int | None = None) -> np.ndarray:
    """Image ids as int64 ``[length]``, non-negative (-1 marks padding in results).

    Lists, tuples and ranges of ints are accepted.

    Raises
    ------
    ArgumentError
        Not integers, not 1-D, the wrong length, or negative.
    """
    if not isinstance(image_ids, np.ndarray):
        if isinstance(image_ids, (list, tuple, range)):
            image_ids = np.asarray(image_ids)
            if image_ids.size == 0:
                image_ids = image_ids.astype(np.int64)
        else:
            raise ArgumentError(f"{name}: expected an int64 array, got {type(image_ids).__name__}")
    if image_ids.dtype.kind not in "iu":
        raise ArgumentError(f"{name}: expected an integer array, got dtype {image_ids.dtype}")
    if image_ids.ndim != 1:
        raise ArgumentError(f"{name}: expected a 1-D array, got shape {image_ids.shape}")
    if length is not None and image_ids.shape[0] != length:
        raise ArgumentError(f"{name}: has {image_ids.shape[0]} entries, expected {length}")
    if image_ids.dtype == np.uint64 and image_ids.size and image_ids.max() > np.iinfo(np.int64).max:
        raise ArgumentError(f"{name}: values must fit in int64")
    ids = image_ids.astype(np.int64, copy=False)
    if ids.size and ids.min() < 0:
        raise ArgumentError(f"{name}: must be non-negative (-1 marks padding in results)")
    return ids
