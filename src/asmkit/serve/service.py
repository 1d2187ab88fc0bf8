"""``ServedIndex``: an index workspace kept in memory, searched concurrently, updated durably.

Concurrency: searches go to one searcher thread that runs the queries waiting at that
moment as one ``Index.search`` call (``_Batcher``). A batch reads
``ServedIndex._snapshot``, an immutable ``_Snapshot`` (the ``Index`` and its key table).
An update builds a new ``Index`` from a shallow copy of the
current one (``Index.add`` / ``Index.remove`` build new arrays rather than change them),
writes the update to the log, then replaces the snapshot reference in one assignment: a
search sees the index before or after an update, never part of one. Updates are
serialised by one lock.

Durability: the update is in the write-ahead log (``asmkit.serve.wal``), fsynced, before
the call returns. ``fold`` saves the index with ``Index.save`` (atomic) and drops the log
segments it covers; opening a workspace replays what the log holds beyond the saved index.
"""

from __future__ import annotations

import copy
import fcntl
import io
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .._io import read_json
from .._validation import ArgumentError, check_vecs
from ..config import PipelineConfig
from ..features import ImageLoadError, load_image
from ..features.factory import build_extractor, query_turns
from ..hybrid import HybridSpec, fuse
from ..index import Index
from ..pipeline import common_names, gpu_of, hybrid_columns, open_workspace, workspace_extractor_path, workspace_hybrid
from .settings import Settings, check_key
from .wal import Record, WriteAheadLog, final_updates

__all__ = ["KeyConflict", "KeyNotFound", "ReadOnlyIndex", "ServedHybrid", "ServedIndex", "open_served", "read_npy"]

logger = logging.getLogger(__name__)

_INDEX = "index.asmkit"
_WAL = "serve-wal"
_LOCK = "serve.lock"
#: Longer side of the thumbnails the page shows.
THUMBNAIL_SIZE = 192


class KeyNotFound(ArgumentError):
    """No image of that key in the index."""


class KeyConflict(ArgumentError):
    """An image of that key is already in the index."""


class ReadOnlyIndex(ArgumentError):
    """The served index takes no adds or removes (a hybrid workspace)."""


def read_npy(data: bytes, name: str) -> np.ndarray:
    """The array in ``.npy`` bytes, checked before anything is allocated.

    The header must describe a plain numeric dtype and exactly the bytes that follow it,
    so that a small upload cannot claim a huge array; nothing is unpickled.

    Raises
    ------
    ArgumentError
        Not a ``.npy`` file, an object dtype, or a size that does not match the header.
    """
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = read_header(buffer)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise ArgumentError(f"{name}: not a .npy file ({exc})") from None
    if dtype.hasobject or dtype.fields is not None:
        raise ArgumentError(f"{name}: dtype {dtype} is not a plain numeric type")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if expected != len(data) - buffer.tell():
        raise ArgumentError(
            f"{name}: header says {shape} {dtype} ({expected} bytes), the file holds {len(data) - buffer.tell()}"
        )
    buffer.seek(0)
    return np.load(buffer, allow_pickle=False)


@dataclass(frozen=True)
class _Snapshot:
    """One version of the index: searches hold it for their whole duration."""

    index: Index
    ids: np.ndarray  # int64 [S] ascending, as index.ids
    keys: np.ndarray  # str [S], in ids order
    version: int

    def __contains__(self, key: str) -> bool:
        try:
            self.index.id_of(key)
        except KeyError:
            return False
        return True


def _open_extractor(
    folder: Path, device: str
) -> tuple[PipelineConfig, Path, Callable[..., np.ndarray], int | None, bool]:
    """The workspace's config, image root and feature extractor, built as ``asmkit query``
    builds it (the extractor factory, the workspace's learned whitening): (config,
    image_root, ``featurize(image, rotation=0)`` -> float32 [n, D] ready for quantization
    (``rotation``: the image turned by that many degrees, for ``query_rotations``),
    max_size, thread_safe)."""
    _, cfg, root = open_workspace(folder)
    saved = workspace_extractor_path(cfg, folder)
    feats = build_extractor(cfg.features, saved=saved, device=device, seed=cfg.params.seed)
    turned = {rotation: feats.extractor.turned(rotation) for rotation in query_turns(cfg.features)}

    def featurize(image: np.ndarray, rotation: int = 0) -> np.ndarray:
        extractor = turned[rotation] if rotation else feats.extractor
        return feats.descriptors(extractor.extract(image).descriptors)

    return (
        cfg,
        root,
        featurize,
        getattr(feats.extractor, "max_size", None),
        bool(getattr(feats.extractor, "thread_safe", False)),
    )


def _thumbnail_cache(max_pixels: int) -> Callable[[Path, int], bytes | None]:
    """``make(path, mtime_ns)`` -> JPEG bytes or None, cached: the mtime is part of the key
    so that an edited file gets a new thumbnail."""

    @lru_cache(maxsize=1024)
    def make(path: Path, mtime_ns: int) -> bytes | None:
        del mtime_ns
        try:
            image = load_image(path, max_size=THUMBNAIL_SIZE, max_pixels=max_pixels)
        except ImageLoadError:
            return None
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()

    return make


def _thumbnail_file(root: Path, key: str, make: Callable[[Path, int], bytes | None]) -> bytes | None:
    """The thumbnail of ``root/key``, None for a path outside ``root`` or not a file."""
    root = root.resolve()
    path = (root / key).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return make(path, path.stat().st_mtime_ns)


def _lock_workspace(folder: Path) -> int:
    """An exclusive lock on ``folder/serve.lock`` (one server per workspace): its fd."""
    if not folder.is_dir():
        raise FileNotFoundError(f"index not found: {folder}")
    fd = os.open(folder / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ArgumentError(f"index: {folder} is already served by another process") from None
    return fd


class _Batcher:
    """Runs the searches of concurrent requests as few ``Index.search`` calls.

    A search waits in a queue while the searcher threads work on earlier batches; a free
    thread then takes every waiting query (up to ``max_batch``) at once. A lone query
    waits for nothing. Several queries per call share the quantizer's and the scoring
    kernels' passes (word-major scoring); several threads keep the cores busy while one
    call is in a single-threaded stretch (faiss's search of one query's descriptors, the
    Python between kernels): the kernels and faiss release the GIL.
    """

    def __init__(self, run: Callable[[list[np.ndarray], int], list], max_batch: int, threads: int = 1) -> None:
        self._run = run
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._loop, name=f"asmkit-search-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, vecs: np.ndarray, k: int) -> Future:
        """A future of ``run([vecs], K)[0]`` trimmed to ``k``."""
        done: Future = Future()
        self._queue.put((vecs, k, done))
        return done

    def _loop(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            # Top-k lists are prefixes of the top-K list (a total order: score, then id).
            try:
                results = self._run([vecs for vecs, _, _ in batch], max(k for _, k, _ in batch))
            except Exception as exc:  # noqa: BLE001 - handed to the waiting requests, which raise it
                for _, _, done in batch:
                    done.set_exception(exc)
                continue
            for (_, k, done), (keys, scores) in zip(batch, results):
                done.set_result((keys[:k], scores[:k]))

    def close(self) -> None:
        """Answer every queued search, then stop the threads (one stop mark each)."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()


class ServedIndex:
    """An index workspace (from ``asmkit index``) opened for serving.

    Opening takes an exclusive lock on the workspace (one server per workspace), loads
    ``index.asmkit``, replays the write-ahead log ``serve-wal/`` and, when it held
    anything, folds it into ``index.asmkit`` at once.

    Parameters
    ----------
    folder : path-like
        The workspace.
    settings : Settings, optional
        ``device``, ``max_pixels``, ``max_key_length``, ``max_batch`` and ``searchers`` are used here.

    Raises
    ------
    FileNotFoundError
        No such folder.
    ArgumentError
        Not a workspace, or another process serves it.
    asmkit.FileFormatError
        A damaged log (a bad record that is not the last one).
    """

    def __init__(self, folder: str | os.PathLike, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.folder = Path(folder)
        self._lock_fd = _lock_workspace(self.folder)
        try:
            self._open()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _open(self) -> None:
        self.config, self.image_root, self._featurize, self._max_size, thread_safe = _open_extractor(
            self.folder, self.settings.device
        )
        #: Rotations (degrees, besides upright) each query image is also searched at.
        self.query_turns = query_turns(self.config.features)
        self._extract_lock = None if thread_safe else threading.Lock()
        index = Index.load(self.folder / _INDEX, mmap=False, gpu=gpu_of(self.settings.device))
        self._write_lock = threading.Lock()
        self._fold_lock = threading.Lock()
        self._version = 0
        self._snapshot = self._make_snapshot(index)
        self._wal = WriteAheadLog(self.folder / _WAL)
        replayed = final_updates(self._wal.read())
        if replayed:
            self._install(self._replay(index, replayed))
            logger.info("replayed %d logged updates onto %s", len(replayed), self.folder / _INDEX)
        # One search now compiles (or loads) the kernels, so the first request is not slow.
        self._snapshot.index.search([np.zeros((1, self.dim), np.float32)], k=1)
        self._batcher = _Batcher(self._search_batch, self.settings.max_batch, self.settings.searchers)
        self.last_fold = time.time()
        segment = self._wal.rotate()
        if replayed:
            self._fold_segment(segment)
        else:
            self._wal.drop_before(segment)
        self._thumbnail = _thumbnail_cache(self.settings.max_pixels)

    def _make_snapshot(self, index: Index) -> _Snapshot:
        self._version += 1
        return _Snapshot(index, index.ids, np.asarray(index.keys, dtype=str), self._version)

    def _install(self, index: Index) -> None:
        self._snapshot = self._make_snapshot(index)

    @staticmethod
    def _replay(index: Index, updates: dict[str, np.ndarray | None]) -> Index:
        """``index`` with the last update of each key applied (an add replaces)."""
        present = set(index.keys)
        gone = [key for key in updates if key in present]
        if gone:
            index.remove(gone)
        adds = [(key, vecs) for key, vecs in updates.items() if vecs is not None]
        if adds:
            start = int(index.ids.max()) + 1 if len(index) else 0
            index.add(
                [vecs for _, vecs in adds],
                np.arange(start, start + len(adds), dtype=np.int64),
                keys=[key for key, _ in adds],
            )
        return index

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._snapshot.index)

    @property
    def dim(self) -> int:
        """Descriptor dimension the codebook takes."""
        return self._snapshot.index.codebook.dim

    @property
    def pending(self) -> tuple[int, int]:
        """(records, bytes) in the log that are not yet folded into the saved index."""
        return self._wal.records, self._wal.bytes

    def featurize(self, data: bytes) -> np.ndarray:
        """float32 [n, D]: the local features of an encoded image, extracted as the index's
        images were.

        Raises
        ------
        ArgumentError
            Not an image, truncated, too many pixels (``settings.max_pixels``, checked on
            the header), too small.
        """
        return self._features(self._decode(data), 0)

    def featurize_query(self, data: bytes) -> list[np.ndarray]:
        """float32 [n_r, D] per rotation the workspace searches a query at (upright first,
        then ``query_turns``): what :meth:`search_turned` takes. Raises as :meth:`featurize`."""
        image = self._decode(data)
        return [self._features(image, rotation) for rotation in (0, *self.query_turns)]

    def _decode(self, data: bytes) -> np.ndarray:
        with tempfile.NamedTemporaryFile(prefix="asmkit-serve-") as tmp:
            tmp.write(data)
            tmp.flush()
            try:
                return load_image(tmp.name, max_size=self._max_size, max_pixels=self.settings.max_pixels)
            except ImageLoadError as exc:
                raise ArgumentError(f"image: {exc.reason}") from None

    def _features(self, image: np.ndarray, rotation: int) -> np.ndarray:
        if self._extract_lock is None:
            return self._featurize(image, rotation)
        with self._extract_lock:
            return self._featurize(image, rotation)

    def search_turned(self, vecs: list[np.ndarray], k: int) -> tuple[list[str], list[float]]:
        """``search`` of one query given at several rotations (:meth:`featurize_query`):
        every image keeps its best score over them, as ``asmkit query`` merges them."""
        best: dict[str, float] = {}
        for future in [self.submit_search(v, k) for v in vecs]:
            for key, score in zip(*future.result()):
                best[key] = max(best.get(key, -np.inf), score)
        ranked = sorted(best.items(), key=lambda item: -item[1])[:k]
        return [key for key, _ in ranked], [score for _, score in ranked]

    def search(self, vecs: np.ndarray, k: int) -> tuple[list[str], list[float]]:
        """The ``k`` best images for one query image.

        Parameters
        ----------
        vecs : float32 [n, D]
            The query's local descriptors (other numeric dtypes are converted).
        k : int

        Returns
        -------
        keys : list of str
            At most ``k``, best first.
        scores : list of float
            Their scores, decreasing.

        Raises
        ------
        ArgumentError
            ``vecs`` is not a finite 2-D numeric array of the codebook's dimension.
        """
        return self.submit_search(vecs, k).result()

    def submit_search(self, vecs: np.ndarray, k: int) -> Future:
        """``search`` without waiting: the future's result is ``search``'s.

        An event loop awaits it (``asyncio.wrap_future``) without tying up a thread.

        Raises
        ------
        ArgumentError
            At once, for the reasons ``search`` gives.
        """
        vecs = check_vecs(vecs, name="descriptors", dim=self.dim)
        return self._batcher.submit(vecs, k)

    def _search_batch(self, queries: list[np.ndarray], k: int) -> list[tuple[list[str], list[float]]]:
        """One ``Index.search`` call, on one snapshot, for the queries of a batch."""
        snap = self._snapshot
        scores, ids = snap.index.search(queries, k=k)
        out = []
        for srow, irow in zip(scores, ids):
            found = irow >= 0
            slots = np.searchsorted(snap.ids, irow[found])
            out.append((snap.keys[slots].tolist(), srow[found].astype(float).tolist()))
        return out

    def stats(self) -> dict:
        """Counts for ``GET /stats``."""
        snap = self._snapshot
        records, size = self.pending
        return {
            "images": len(snap.index),
            "version": snap.version,
            "codebook_size": snap.index.codebook.size,
            "dim": snap.index.codebook.dim,
            "preset": self.config.name,
            "posting_entries": int(snap.index.inverted_file.n_entries),
            "wal_records": records,
            "wal_bytes": size,
            "last_fold": self.last_fold,
        }

    def thumbnail(self, key: str) -> bytes | None:
        """A JPEG of the indexed image file ``image_root/key`` (longer side
        ``THUMBNAIL_SIZE``), or None when the key is unknown or the file is not readable."""
        if key not in self._snapshot:
            return None
        return _thumbnail_file(self.image_root, key, self._thumbnail)

    # -- updates -----------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Nothing: a plain workspace takes adds and removes (:meth:`ServedHybrid.check_writable` refuses them)."""

    def add(self, items: list[tuple[str, np.ndarray]]) -> int:
        """Add images (all or none), durably: when this returns they survive a crash.

        Parameters
        ----------
        items : list of (key, float32 [n, D])

        Returns
        -------
        int
            Images in the index afterwards.

        Raises
        ------
        ArgumentError
            A bad key or descriptors, or the same key twice in ``items``.
        KeyConflict
            A key already in the index.
        """
        if not items:
            raise ArgumentError("images: nothing to add")
        keys = [check_key(key, self.settings.max_key_length) for key, _ in items]
        if len(set(keys)) != len(keys):
            raise ArgumentError("key: the same key is given twice")
        vecs = [check_vecs(v, name="descriptors", dim=self.dim) for _, v in items]
        with self._write_lock:
            snap = self._snapshot
            taken = [key for key in keys if key in snap]
            if taken:
                raise KeyConflict(f"key: already in the index: {taken[0]!r}")
            index = copy.copy(snap.index)
            start = int(snap.ids[-1]) + 1 if len(snap.ids) else 0
            index.add(vecs, np.arange(start, start + len(keys), dtype=np.int64), keys=keys)
            self._wal.append([Record(key, v) for key, v in zip(keys, vecs)])
            self._install(index)
            return len(index)

    def remove(self, key: str) -> int:
        """Remove one image, durably.

        Returns
        -------
        int
            Images in the index afterwards.

        Raises
        ------
        KeyNotFound
            No image of that key.
        """
        with self._write_lock:
            snap = self._snapshot
            if not isinstance(key, str) or key not in snap:
                raise KeyNotFound(f"key: no image named {key!r} in the index")
            index = copy.copy(snap.index)
            index.remove([key])
            self._wal.append([Record(key)])
            self._install(index)
            return len(index)

    def fold(self) -> bool:
        """Save the index with the logged updates and drop the log they were in.

        Updates may go on meanwhile (they go to a new log segment). Returns False when
        there was nothing to fold.
        """
        with self._fold_lock:
            with self._write_lock:
                if not self._wal.records:
                    return False
                segment = self._wal.rotate()
            self._fold_segment(segment)
            return True

    def _fold_segment(self, segment: int) -> None:
        """Save the current snapshot (which holds every update logged before ``segment``)
        and drop those segments."""
        # The snapshot read after the rotation may hold updates logged in ``segment``
        # too: replaying them onto it later is harmless (last write wins).
        snap = self._snapshot
        t0 = time.perf_counter()
        snap.index.save(self.folder / _INDEX)
        self._wal.drop_before(segment)
        self.last_fold = time.time()
        logger.info(
            "folded the log into %s (%d images) in %.2f s",
            self.folder / _INDEX,
            len(snap.index),
            time.perf_counter() - t0,
        )

    def close(self) -> None:
        """Fold what the log holds and release the workspace."""
        if self._lock_fd is None:
            return
        self._batcher.close()
        self.fold()
        self._wal.close()
        os.close(self._lock_fd)
        self._lock_fd = None


@dataclass(frozen=True)
class _Member:
    """One member of a served hybrid workspace: its extractor and its index."""

    name: str
    featurize: Callable[[np.ndarray], np.ndarray]
    max_size: int | None
    extract_lock: threading.Lock | None
    index: Index


class ServedHybrid:
    """A hybrid workspace (``asmkit index --preset hybrid``) opened for serving, read-only.

    A query image is featurised by every member's extractor and scored against all of
    that member's images; the rows are fused with the workspace's fusion and column
    statistics over the images every member holds, as ``asmkit query WS`` fuses them, so
    the keys and scores are the query's. Concurrent searches are batched as in
    :class:`ServedIndex`. Adds and removes raise :class:`ReadOnlyIndex`: a hybrid's
    members and column statistics change together, through ``asmkit index --add`` (then
    restart the server).

    Parameters
    ----------
    folder : path-like
        The hybrid workspace.
    settings : Settings, optional
        ``device``, ``max_pixels``, ``max_batch`` and ``searchers`` are used here.

    Raises
    ------
    FileNotFoundError
        No such folder, or a member missing.
    ArgumentError
        Not a hybrid workspace, or another process serves it.
    asmkit.storage.StorageError
        Missing or stale column statistics.
    """

    def __init__(self, folder: str | os.PathLike, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.folder = Path(folder)
        spec = workspace_hybrid(self.folder) if self.folder.is_dir() else None
        if spec is None and self.folder.is_dir():
            raise ArgumentError(f"index: {self.folder} is not a hybrid workspace")
        self._lock_fd = _lock_workspace(self.folder)
        try:
            self._open(spec)
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _open(self, spec: HybridSpec) -> None:
        self.spec = spec
        device = self.settings.device
        members = []
        for name in spec.members:
            _, root, featurize, max_size, thread_safe = _open_extractor(self.folder / name, device)
            index = Index.load(self.folder / name / _INDEX, mmap=False, gpu=gpu_of(device))
            members.append(_Member(name, featurize, max_size, None if thread_safe else threading.Lock(), index))
            if name == spec.members[0]:
                self.image_root = root
        self._members = members
        names, positions = common_names([m.index.keys for m in members])
        columns = hybrid_columns(self.folder, spec, [len(m.index) for m in members])
        self._keys = np.asarray(names, dtype=str)
        self._key_set = frozenset(names)
        self._positions = positions
        self._columns = None if columns is None else [c[:, p] for c, p in zip(columns, positions)]
        self.preset = str(read_json(self.folder / "pipeline.json", "an asmkit pipeline.json").get("preset", "hybrid"))
        for m in members:
            # One search per member now compiles (or loads) the kernels.
            m.index.similarity_matrix([np.zeros((1, m.index.codebook.dim), np.float32)])
        self._batcher = _Batcher(self._search_batch, self.settings.max_batch, self.settings.searchers)
        self._thumbnail = _thumbnail_cache(self.settings.max_pixels)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def pending(self) -> tuple[int, int]:
        """(0, 0): nothing is logged, the workspace is read-only."""
        return 0, 0

    def featurize(self, data: bytes) -> list[np.ndarray]:
        """Each member's float32 [n_m, D_m] local features of an encoded image, extracted
        as its indexed images were.

        Raises
        ------
        ArgumentError
            As :meth:`ServedIndex.featurize`.
        """
        out = []
        with tempfile.NamedTemporaryFile(prefix="asmkit-serve-") as tmp:
            tmp.write(data)
            tmp.flush()
            for m in self._members:
                try:
                    image = load_image(tmp.name, max_size=m.max_size, max_pixels=self.settings.max_pixels)
                except ImageLoadError as exc:
                    raise ArgumentError(f"image: {exc.reason}") from None
                if m.extract_lock is None:
                    out.append(m.featurize(image))
                else:
                    with m.extract_lock:
                        out.append(m.featurize(image))
        return out

    def search(self, vecs: list[np.ndarray], k: int) -> tuple[list[str], list[float]]:
        """The ``k`` best images for one query image, given every member's descriptors
        (:meth:`featurize`), best first, with their fused scores."""
        return self.submit_search(vecs, k).result()

    def submit_search(self, vecs: list[np.ndarray], k: int) -> Future:
        """``search`` without waiting.

        Raises
        ------
        ArgumentError
            Not one descriptor array per member (a hybrid is searched with an image:
            each member extracts its own features), or a bad array.
        """
        if not isinstance(vecs, (list, tuple)) or len(vecs) != len(self._members):
            raise ArgumentError(
                f"descriptors: a hybrid index ({' + '.join(self.spec.members)}) is searched with an image; "
                "each member extracts its own features"
            )
        checked = [
            check_vecs(v, name=f"descriptors of {m.name}", dim=m.index.codebook.dim)
            for v, m in zip(vecs, self._members)
        ]
        return self._batcher.submit(checked, k)

    def _search_batch(self, queries: list[list[np.ndarray]], k: int) -> list[tuple[list[str], list[float]]]:
        rows = [
            m.index.similarity_matrix([q[i] for q in queries])[:, p]
            for i, (m, p) in enumerate(zip(self._members, self._positions))
        ]
        fused = fuse(rows, self.spec.fusion, self._columns)
        # Stable sort: exact ties keep the index's order, as ``asmkit query`` does.
        order = np.argsort(-fused, axis=1, kind="stable")[:, :k]
        return [(self._keys[o].tolist(), f[o].astype(float).tolist()) for o, f in zip(order, fused)]

    def stats(self) -> dict:
        """Counts for ``GET /stats``: the first member's codebook, and every member's."""
        members = [
            {
                "preset": m.name,
                "codebook_size": m.index.codebook.size,
                "dim": m.index.codebook.dim,
                "posting_entries": int(m.index.inverted_file.n_entries),
            }
            for m in self._members
        ]
        return {
            "images": len(self),
            "version": 1,
            "codebook_size": members[0]["codebook_size"],
            "dim": members[0]["dim"],
            "preset": self.preset,
            "posting_entries": sum(m["posting_entries"] for m in members),
            "wal_records": 0,
            "wal_bytes": 0,
            "last_fold": 0.0,
            "members": members,
        }

    def thumbnail(self, key: str) -> bytes | None:
        """As :meth:`ServedIndex.thumbnail`."""
        if key not in self._key_set:
            return None
        return _thumbnail_file(self.image_root, key, self._thumbnail)

    def check_writable(self) -> None:
        """Raises :class:`ReadOnlyIndex`: a hybrid workspace is served read-only."""
        raise ReadOnlyIndex(
            f"index: the hybrid workspace {self.folder} is served read-only; add images with "
            f"`asmkit index IMAGES --out {self.folder} --add`, then restart the server"
        )

    def add(self, items) -> int:
        """Refused: raises :class:`ReadOnlyIndex`."""
        self.check_writable()
        return len(self)

    def remove(self, key: str) -> int:
        """Refused: raises :class:`ReadOnlyIndex`."""
        self.check_writable()
        return len(self)

    def fold(self) -> bool:
        """Nothing to fold: False."""
        return False

    def close(self) -> None:
        """Stop the searcher threads and release the workspace."""
        if self._lock_fd is None:
            return
        self._batcher.close()
        os.close(self._lock_fd)
        self._lock_fd = None


def open_served(folder: str | os.PathLike, settings: Settings | None = None) -> ServedIndex | ServedHybrid:
    """The workspace opened for serving: :class:`ServedHybrid` for a hybrid workspace,
    :class:`ServedIndex` otherwise."""
    folder = Path(folder)
    if folder.is_dir() and workspace_hybrid(folder) is not None:
        return ServedHybrid(folder, settings)
    return ServedIndex(folder, settings)
