"""Settings of ``asmkit serve`` and the rule for the keys of uploaded images."""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .._validation import ArgumentError, check_bool, check_float, check_int

__all__ = ["Settings", "check_key", "read_token_file"]

# Unicode categories refused in keys: controls, format characters (direction overrides,
# zero-width joiners) that make two keys look alike, surrogates, line/paragraph separators.
_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


@dataclass(frozen=True)
class Settings:
    """How the service runs.

    Attributes
    ----------
    host, port : str, int
        Where ``asmkit serve`` listens (127.0.0.1 by default: reachable from this machine
        only).
    token : str or None
        Bearer token that writes (``POST /images``, ``DELETE /images/...``) require;
        None: writes are open.
    token_reads : bool
        Searches, stats, metrics and thumbnails require the token too.
    workers : int
        Threads for blocking work (feature extraction, searches, updates).
    max_request_bytes : int
        Larger request bodies get 413 before they are read.
    max_pixels : int
        Uploaded images whose header claims more pixels get 422 before decoding.
    max_k : int
        Largest ``k`` a search may ask for.
    max_batch : int
        Most concurrent searches run as one ``Index.search`` call (1: one call each).
    searchers : int
        Threads that take batches of searches, each its own ``Index.search`` call at a
        time. The kernels and faiss release the GIL, so several calls run at once: the
        query's quantization, most of a search, runs on one core per call.
    max_key_length : int
        Characters in an image key.
    fold_interval_s : float
        Seconds between folds of the write-ahead log into the saved index.
    fold_bytes : int
        Fold as soon as the log holds this many bytes.
    device : str
        ``cpu``, ``cuda`` or ``cuda:N`` for feature extraction and quantization.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    token_reads: bool = False
    workers: int = 4
    max_request_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_k: int = 1000
    max_batch: int = 16
    searchers: int = 2
    max_key_length: int = 256
    fold_interval_s: float = 300.0
    fold_bytes: int = 256 * 1024 * 1024
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ArgumentError(f"host: expected an address, got {self.host!r}")
        check_int(self.port, "port", min=0, max=65535)
        if self.token is not None and (not isinstance(self.token, str) or not self.token):
            raise ArgumentError("token: expected a non-empty string or None")
        check_bool(self.token_reads, "token_reads")
        if self.token_reads and self.token is None:
            raise ArgumentError("token_reads: needs a token (--token-file)")
        check_int(self.workers, "workers", min=1)
        check_int(self.max_request_bytes, "max_request_bytes", min=1)
        check_int(self.max_pixels, "max_pixels", min=1)
        check_int(self.max_k, "max_k", min=1)
        check_int(self.max_batch, "max_batch", min=1)
        check_int(self.searchers, "searchers", min=1)
        # A key travels in the log with an unsigned short byte length, and UTF-8 takes up
        # to four bytes a character.
        check_int(self.max_key_length, "max_key_length", min=1, max=16383)
        check_float(self.fold_interval_s, "fold_interval_s", min=0.0, min_open=True)
        check_int(self.fold_bytes, "fold_bytes", min=1)
        if not isinstance(self.device, str):
            raise ArgumentError(f"device: expected cpu, cuda or cuda:N, got {self.device!r}")


def read_token_file(path: str | os.PathLike) -> str:
    """The bearer token stored in ``path`` (surrounding whitespace removed).

    Raises
    ------
    ArgumentError
        The file is missing, unreadable, not UTF-8, or holds no token.
    """
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ArgumentError(f"--token-file: cannot read {path} ({exc})") from None
    if not token or any(c.isspace() for c in token):
        raise ArgumentError(f"--token-file: {path} must hold one token without spaces")
    return token


def check_key(key: object, max_length: int) -> str:
    """``key`` when it may name an image: 1 to ``max_length`` characters, no path
    separator, no control or invisible format character, not ``.`` or ``..``, no
    whitespace at either end.

    Raises
    ------
    ArgumentError
        Any other key; the message says why.
    """
    if not isinstance(key, str):
        raise ArgumentError(f"key: expected a string, got {type(key).__name__}")
    if not key:
        raise ArgumentError("key: must not be empty")
    if len(key) > max_length:
        raise ArgumentError(f"key: longer than {max_length} characters ({len(key)})")
    if "/" in key or "\\" in key:
        raise ArgumentError(f"key: must not contain a path separator, got {key!r}")
    if key in (".", "..") or key != key.strip():
        raise ArgumentError(f"key: not a usable name: {key!r}")
    bad = [c for c in key if unicodedata.category(c) in _REFUSED_CATEGORIES]
    if bad:
        raise ArgumentError(f"key: must not contain control characters, got {bad[0]!r} in {key!r}")
    return key
