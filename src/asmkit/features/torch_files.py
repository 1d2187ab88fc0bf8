"""Reading torch files a user names (weights, saved heads and extractors, checkpoints)
without ever running their code, and with an error that names the file."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterable

from .._validation import DependencyError, FileFormatError

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise DependencyError("reading torch files needs PyTorch; install it with: pip install 'asmkit[deep]'") from exc

__all__ = ["load_torch_file"]

# What torch.load reads: a zip archive (torch.save since torch 1.6) or a legacy pickle
# (protocol 2 and above open with b"\x80"). torch takes any other file for a legacy one and
# fails in ways that are not errors of a file (an IndexError for a text file).
_TORCH_MAGICS = (b"PK\x03\x04", b"\x80")
# How torch.load reports a damaged or foreign file (a pickle with other classes, a text
# file, a truncated zip). Its messages suggest weights_only=False, which would run the
# file's code, so they are never passed on.
_TORCH_LOAD_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    ValueError,
    KeyError,
    AttributeError,
    UnicodeDecodeError,
    ImportError,
    TypeError,
    IndexError,
)


def load_torch_file(
    path: str | os.PathLike, what: str, *, safe_globals: Iterable[type] = (), legacy: bool = True
) -> Any:
    """The object saved in a torch file, loaded with ``weights_only=True`` onto the CPU.

    Parameters
    ----------
    path : str or path-like
    what : str
        What the file should be, for the error ("a MASt3R retrieval checkpoint").
    safe_globals : iterable of type
        Classes besides tensors and plain containers that the file may hold (for example
        ``argparse.Namespace`` in MASt3R checkpoints).
    legacy : bool
        Accept torch's legacy pickle format as well as its zip archives.

    Raises
    ------
    FileNotFoundError
        No such file.
    asmkit.FileFormatError
        Not a torch file, or a damaged or foreign one (naming ``path`` and ``what``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if not magic.startswith(_TORCH_MAGICS if legacy else _TORCH_MAGICS[:1]):
        raise FileFormatError(path, f"not {what} (not a torch file)")
    try:
        with torch.serialization.safe_globals(list(safe_globals)), warnings.catch_warnings():
            # A plain pickle (such as a codebook .pkl) makes torch warn before it fails.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except _TORCH_LOAD_ERRORS:
        kind = "a pickle, such as a codebook .pkl" if path.suffix == ".pkl" else "a damaged or foreign torch file"
        raise FileFormatError(path, f"not {what} ({kind})") from None
