"""Atomic writes of small text outputs (pairs, reports, JSON manifests)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["write_text_atomic"]


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
