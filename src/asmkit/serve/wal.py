"""Write-ahead log of the served index's updates: append, fsync, then acknowledge.

The log is a folder of segment files ``<number>.wal`` (numbers ascending). A segment is a
sequence of records::

    magic  b"AWAL"      4 bytes
    length u32 (LE)     bytes of the body
    crc32  u32 (LE)     of the body
    body   op (1 byte: b"A" add, b"R" remove), key length u16 (LE), key (UTF-8),
           and for an add the image's descriptors as ``.npy`` bytes (float32 [n, D],
           written and read with ``allow_pickle=False``)

A record reaches the disk (``os.fsync``) before the update it describes is acknowledged,
so after a crash only the record being written can be incomplete: a torn last record
(short, or a checksum mismatch) is cut off on open. A damaged record followed by more
data is not a torn write but a damaged log, and opening refuses it.

Folding (``asmkit.serve.ServedIndex.fold``) saves the index, then deletes the segments it
covers; replaying a segment that is already in the saved index is harmless because replay
is last-write-wins per key (:func:`final_updates`).
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._validation import FileFormatError

__all__ = ["Record", "WriteAheadLog", "final_updates"]

logger = logging.getLogger(__name__)

_MAGIC = b"AWAL"
_HEADER = struct.Struct("<4sII")
_KEY_LEN = struct.Struct("<H")
_ADD, _REMOVE = b"A", b"R"
_SEGMENT_RE = re.compile(r"^(\d{8})\.wal$")


@dataclass(frozen=True)
class Record:
    """One update: an add (``vecs`` float32 [n, D]) or a remove (``vecs`` None)."""

    key: str
    vecs: np.ndarray | None = None

    def encode(self) -> bytes:
        """The record's bytes (header and body)."""
        key = self.key.encode("utf-8")
        if self.vecs is None:
            body = _REMOVE + _KEY_LEN.pack(len(key)) + key
        else:
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(self.vecs, dtype=np.float32), allow_pickle=False)
            body = _ADD + _KEY_LEN.pack(len(key)) + key + buffer.getvalue()
        return _HEADER.pack(_MAGIC, len(body), zlib.crc32(body)) + body


def _decode_body(body: bytes, where: str) -> Record:
    op = body[:1]
    if op not in (_ADD, _REMOVE) or len(body) < 1 + _KEY_LEN.size:
        raise FileFormatError(where, "not an asmkit log record (unknown operation)")
    (n,) = _KEY_LEN.unpack_from(body, 1)
    start = 1 + _KEY_LEN.size
    try:
        key = body[start : start + n].decode("utf-8")
    except UnicodeDecodeError:
        raise FileFormatError(where, "log record key is not UTF-8") from None
    if op == _REMOVE:
        return Record(key)
    try:
        vecs = np.load(io.BytesIO(body[start + n :]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FileFormatError(where, f"log record descriptors unreadable ({exc})") from None
    if vecs.dtype != np.float32 or vecs.ndim != 2:
        raise FileFormatError(where, f"log record descriptors: expected float32 [n, D], got {vecs.dtype} {vecs.shape}")
    return Record(key, vecs)


def _read_segment(path: Path, last: bool) -> tuple[list[Record], int]:
    """The records of a segment and the byte length of its intact part.

    A torn record at the end of the ``last`` segment ends the intact part; anywhere else
    a damaged record raises.
    """
    data = path.read_bytes()
    records, pos = [], 0
    while pos < len(data):
        header = data[pos : pos + _HEADER.size]
        torn, magic, length, body = None, b"", 0, b""
        if len(header) < _HEADER.size:
            torn = "incomplete record header"
        else:
            magic, length, crc = _HEADER.unpack(header)
            body = data[pos + _HEADER.size : pos + _HEADER.size + length]
            if magic != _MAGIC:
                torn = "bad record magic"
            elif len(body) < length:
                torn = "incomplete record body"
            elif zlib.crc32(body) != crc:
                torn = "record checksum mismatch"
        if torn is not None:
            # A torn write leaves a prefix of the record, or zeros where the file system
            # extended the file before the data reached it.
            if len(header) < _HEADER.size or magic == _MAGIC and len(body) < length:
                at_end = True
            else:
                at_end = not data[pos + (_HEADER.size + length if magic == _MAGIC else 0) :].strip(b"\0")
            if last and at_end:
                logger.warning(
                    "%s: dropping a torn last record at byte %d (%s): an update that was never acknowledged",
                    path,
                    pos,
                    torn,
                )
                return records, pos
            raise FileFormatError(path, f"damaged log record at byte {pos} ({torn}) with data after it")
        records.append(_decode_body(body, f"{path} (byte {pos})"))
        pos += _HEADER.size + length
    return records, pos


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteAheadLog:
    """The update log of one served workspace (one writer at a time).

    Parameters
    ----------
    folder : path-like
        Created if missing.

    Attributes
    ----------
    folder : pathlib.Path
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._segment = 0
        # segment number -> [records, bytes] appended by this process, until dropped
        self._counts: dict[int, list[int]] = {}

    @property
    def records(self) -> int:
        """Records appended by this process and not yet dropped."""
        return sum(c[0] for c in self._counts.values())

    @property
    def bytes(self) -> int:
        """Their size in bytes."""
        return sum(c[1] for c in self._counts.values())

    def segments(self) -> list[Path]:
        """The segment files, oldest first."""
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _SEGMENT_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def read(self) -> list[Record]:
        """Every intact record, oldest first; a torn last record is cut off the file.

        Raises
        ------
        asmkit.FileFormatError
            A damaged record that is not the last one.
        """
        segments = self.segments()
        out = []
        for i, path in enumerate(segments):
            records, intact = _read_segment(path, last=i == len(segments) - 1)
            if intact < path.stat().st_size:
                with open(path, "r+b") as fh:
                    fh.truncate(intact)
                    os.fsync(fh.fileno())
            out.extend(records)
        return out

    def append(self, records: list[Record]) -> None:
        """Write ``records`` to the open segment and fsync: once this returns they survive
        a crash. Opens a new segment when none is open."""
        if self._fd is None:
            self.rotate()
        data = b"".join(r.encode() for r in records)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        counts = self._counts.setdefault(self._segment, [0, 0])
        counts[0] += len(records)
        counts[1] += len(data)

    def rotate(self) -> int:
        """Close the open segment and open a new one; returns the new segment's number.
        Later appends go to it, so segments before it can be folded and dropped."""
        self.close()
        existing = self.segments()
        self._segment = (int(existing[-1].stem) if existing else 0) + 1
        path = self.folder / f"{self._segment:08d}.wal"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fsync_dir(self.folder)
        return self._segment

    def drop_before(self, segment: int) -> None:
        """Delete the segments numbered below ``segment`` (their updates are saved)."""
        for path in self.segments():
            if int(path.stem) < segment:
                path.unlink()
        _fsync_dir(self.folder)
        self._counts = {n: c for n, c in self._counts.items() if n >= segment}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def final_updates(records: list[Record]) -> dict[str, np.ndarray | None]:
    """The last update of each key, in the order of those last updates: the descriptors
    of an add, None for a remove. Applying these to any state the log started from, or
    to a state that already holds some of its updates, gives the same index."""
    last: dict[str, np.ndarray | None] = {}
    for record in records:
        last.pop(record.key, None)
        last[record.key] = record.vecs
    return last
