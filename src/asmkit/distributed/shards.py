"""An index sharded across Ray actors, its directory format, and all-vs-all top-k as
query-block tasks.

Shards are the read-only parts of ``Index.split``: each keeps the whole index's idf, N
and image norms, so the top-k lists of the shards merge (``asmkit.merge_topk``) into
exactly the whole index's ``Index.search`` result.

A sharded index directory::

    shards.json         {"format": "asmkit-shards", "format_version": 1, "images": N,
                         "shards": [{"dir": "shard-00000", "images": n, "first_id": a,
                                     "last_id": b}, ...]}
    shard-00000/        one shard, an ``Index.save`` directory (idf and N of the whole)
    shard-00001/
    ...

It is written into a sibling temporary directory and moved into place, so an interrupted
save leaves the previous content (or nothing) at the path, never a partial directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._validation import ArgumentError, check_int
from ..index import Index
from ..kernel import Aggregates, prepare_descriptors
from ..quantizer import set_settle_threads, settle_threads
from ..search import merge_topk, score_aggregates
from ..storage import StorageError
from ._ray import gather, remote_task, require_ray

__all__ = ["SHARDS_MANIFEST", "ShardedIndex", "is_sharded", "read_manifest", "save_shards", "scores_topk"]

SHARDS_MANIFEST = "shards.json"
_FORMAT = "asmkit-shards"
_FORMAT_VERSION = 1


def _shard_dir(i: int) -> str:
    return f"shard-{i:05d}"


def is_sharded(path: str | os.PathLike) -> bool:
    """True when ``path`` is a sharded index directory (it holds ``shards.json``)."""
    return (Path(path) / SHARDS_MANIFEST).is_file()


def _entry(shard: Index, i: int) -> dict[str, Any]:
    ids = shard.ids
    return {
        "dir": _shard_dir(i),
        "images": len(shard),
        "first_id": int(ids[0]) if ids.size else None,
        "last_id": int(ids[-1]) if ids.size else None,
    }


class _AtomicDir:
    """A directory written under a temporary sibling name and moved to ``path`` on
    success (an existing sharded directory there is replaced); removed on failure."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.exists() and not is_sharded(self.path):
            raise ArgumentError(f"path: {self.path} exists and is not a sharded asmkit index; refusing to replace it")
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
        had_old = self.path.exists()
        if had_old:
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if had_old:
            shutil.rmtree(old, ignore_errors=True)


def _write_manifest(folder: Path, entries: list[dict[str, Any]]) -> None:
    manifest = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "images": sum(e["images"] for e in entries),
        "shards": entries,
    }
    with open(folder / SHARDS_MANIFEST, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def save_shards(index: Index, path: str | os.PathLike, n_shards: int) -> None:
    """Split ``index`` (``Index.split``) and save the shards as a sharded directory.

    Parameters
    ----------
    index : Index
        A whole index (not a shard).
    path : str or path-like
        The directory; an existing sharded directory there is replaced atomically.
    n_shards : int
        1 .. len(index).
    """
    if not isinstance(index, Index) or index.is_shard:
        raise ArgumentError("index: expected a whole asmkit Index (not a shard)")
    n_shards = check_int(n_shards, "n_shards", min=1)
    shards = index.split(n_shards)
    with _AtomicDir(path) as tmp:
        for i, shard in enumerate(shards):
            shard.save(tmp / _shard_dir(i))
        _write_manifest(tmp, [_entry(shard, i) for i, shard in enumerate(shards)])


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The shard entries of a sharded directory, each shard directory checked to exist.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    StorageError
        No or a malformed ``shards.json``, or a shard directory missing (named).
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such sharded index")
    manifest_path = folder / SHARDS_MANIFEST
    if not manifest_path.is_file():
        raise StorageError(f"{folder}: not a sharded asmkit index (no {SHARDS_MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest["format"] != _FORMAT or not isinstance(manifest["shards"], list) or not manifest["shards"]:
            raise ValueError("not an asmkit shard list")
        if manifest["format_version"] > _FORMAT_VERSION:
            raise ValueError(f"format_version {manifest['format_version']} is newer than this asmkit supports")
        entries = [
            {"dir": str(e["dir"]), "images": int(e["images"]), "first_id": e["first_id"], "last_id": e["last_id"]}
            for e in manifest["shards"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"{manifest_path}: malformed shard manifest ({exc})") from None
    for entry in entries:
        shard_path = folder / entry["dir"]
        if Path(entry["dir"]).name != entry["dir"]:
            raise StorageError(f"{manifest_path}: invalid shard directory name {entry['dir']!r}")
        if not shard_path.is_dir():
            raise StorageError(f"{shard_path}: shard missing (listed in {manifest_path})")
    return entries


class _Shard:
    """The actor holding one shard (``ray.remote`` is applied on first use); it settles
    the queries' tied rows on the driver's faiss thread count ``settle``
    (``asmkit.quantizer.settle_threads``)."""

    def __init__(self, source: Any, mmap: bool, verify: bool, settle: int) -> None:
        set_settle_threads(settle)
        # ``source`` is a shard (Index) or the path of a saved one. A path is loaded on
        # first use, in a method, so that a missing or corrupt shard reaches the driver as
        # its StorageError (an error in __init__ reaches it only as ActorDiedError text),
        # and a restarted actor loads it again.
        self._source, self._mmap, self._verify = source, mmap, verify
        self._index = source if isinstance(source, Index) else None

    @property
    def index(self) -> Index:
        if self._index is None:
            self._index = Index.load(self._source, mmap=self._mmap, verify=self._verify)
        return self._index

    def describe(self) -> tuple[dict[str, Any], Any]:
        return _entry(self.index, 0), self.index.params

    def search(self, vecs, image_ids, k: int):
        return self.index.search(vecs, image_ids, k=k)

    def search_block(self, block, k: int):
        return _search(self.index, block, k)

    def save(self, path: str) -> None:
        self.index.save(path)


def _actor_class(num_cpus: float, num_gpus: float):
    ray = require_ray()
    # An actor that dies (node lost, killed) is restarted once and its calls retried: a
    # shard is read-only state rebuilt from its source.
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=1, max_task_retries=1)(_Shard)


def _search(index: Index, block, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of a query block: (list of float32 [n_i, D], ids int64 [b]) descriptors,
    searched as ``Index.search`` does, or query-side ``Aggregates``, scored against the
    index's posting lists (``aggregate_images(..., side="query")`` has the words
    ``Index.search`` would use, so the scores are the same)."""
    if isinstance(block, Aggregates):
        db = index.database
        return score_aggregates(db.ivf, db.idf, db.sqrt_norms, db.ids, block, index.params, dim=index.codebook.dim, k=k)
    images, ids = block
    return index.search(images, ids, k=k)


def _block_size(block) -> int:
    return block.offsets.shape[0] - 1 if isinstance(block, Aggregates) else len(block[0])


def _query_blocks(queries, image_ids, block: int) -> list:
    """Query images in blocks of ``block`` images, in the order of ``Index.search``'s
    result rows: slices of ``Aggregates``, or (list of float32 [n_i, D], ids int64 [b])
    with the rows of an image in the order the engine aggregates them."""
    if isinstance(queries, Aggregates):
        n = queries.offsets.shape[0] - 1
        blocks = []
        for begin in range(0, n, block):
            offsets = queries.offsets[begin : min(begin + block, n) + 1]
            rows = slice(int(offsets[0]), int(offsets[-1]))
            blocks.append(Aggregates(offsets - offsets[0], queries.words[rows], queries.data[rows]))
        return blocks
    desc = prepare_descriptors(queries, image_ids, unique_ids=False)
    n = desc.n_images
    blocks = []
    for begin in range(0, n, block):
        end = min(begin + block, n)
        images = [desc.vecs[desc.order[desc.starts[i] : desc.starts[i + 1]]] for i in range(begin, end)]
        blocks.append((images, desc.image_ids[begin:end]))
    return blocks


def _empty_result(k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty((0, k), dtype=np.float32), np.empty((0, k), dtype=np.int64)


class ShardedIndex:
    """An index whose shards live in Ray actors, one shard per actor.

    Build one with :meth:`from_index` (split an in-memory index) or :meth:`load` (each
    actor loads its shard from a sharded directory). ``search`` sends the queries to every
    shard and merges the shards' top-k lists with ``merge_topk``: the result is exactly
    ``Index.search`` of the whole index. Call ``close`` (or use ``with``) to free the
    actors.

    Parameters
    ----------
    actors : list of ray.actor.ActorHandle
    entries : list of dict
        Per shard: ``images``, ``first_id``, ``last_id``.
    params : asmkit.Params
    sources : list of ray.ObjectRef, optional
        The shards in the object store (``from_index``), kept referenced so that a
        restarted actor can read its shard again.
    """

    def __init__(self, actors: list, entries: list[dict[str, Any]], params, sources: list | None = None) -> None:
        self._actors = actors
        self._entries = entries
        self.params = params
        self._sources = sources or []

    @classmethod
    def from_index(cls, index: Index, n_shards: int, *, num_cpus: float = 1, num_gpus: float = 0) -> "ShardedIndex":
        """Split ``index`` into ``n_shards`` shards (``Index.split``), one per actor.

        Parameters
        ----------
        index : Index
        n_shards : int
        num_cpus, num_gpus : float
            Resources each shard actor reserves.
        """
        if not isinstance(index, Index) or index.is_shard:
            raise ArgumentError("index: expected a whole asmkit Index (not a shard)")
        n_shards = check_int(n_shards, "n_shards", min=1)
        ray = require_ray()
        shards = index.split(n_shards)
        actor = _actor_class(num_cpus, num_gpus)
        sources = [ray.put(shard) for shard in shards]
        actors = [actor.remote(source, True, False, settle_threads()) for source in sources]
        return cls(actors, [_entry(shard, i) for i, shard in enumerate(shards)], index.params, sources)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        mmap: bool = True,
        verify: bool = True,
        num_cpus: float = 1,
        num_gpus: float = 0,
    ) -> "ShardedIndex":
        """Open a sharded directory (written by :func:`save_shards` or :meth:`save`); each
        actor loads its own shard (``Index.load``), so ``path`` must be readable by the
        workers (a shared file system on a multi-node cluster).

        Raises
        ------
        FileNotFoundError
            ``path`` does not exist.
        asmkit.storage.StorageError
            A shard missing or corrupt (naming its directory or file), or a shard that is
            not the one the manifest lists (its image count or id range differs).
        """
        folder = Path(path).resolve()
        entries = read_manifest(folder)
        actor = _actor_class(num_cpus, num_gpus)
        actors = [actor.remote(str(folder / e["dir"]), mmap, verify, settle_threads()) for e in entries]
        sharded = cls(actors, entries, None)
        try:
            found = gather([a.describe.remote() for a in actors], desc="load shards", progress=False)
            for entry, (got, _) in zip(entries, found):
                if (got["images"], got["first_id"], got["last_id"]) != (
                    entry["images"],
                    entry["first_id"],
                    entry["last_id"],
                ):
                    raise StorageError(
                        f"{folder / entry['dir']}: holds {got['images']} images (ids "
                        f"{got['first_id']}..{got['last_id']}), the manifest lists {entry['images']} "
                        f"(ids {entry['first_id']}..{entry['last_id']})"
                    )
            sharded.params = found[0][1]
        except BaseException:
            sharded.close()
            raise
        return sharded

    @property
    def n_shards(self) -> int:
        return len(self._actors)

    def __len__(self) -> int:
        return sum(e["images"] for e in self._entries)

    def __repr__(self) -> str:
        return f"ShardedIndex(shards={self.n_shards}, images={len(self)})"

    def _k(self, k: int | None) -> int:
        k = check_int(k, "k", min=1, none=True)
        k = self.params.topk if k is None else k
        # None ranks every image, as Index.search does (an empty index gives one padding
        # column here, none there: a shard answers k >= 1 only).
        return max(len(self), 1) if k is None else k

    def search(self, vecs, image_ids=None, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rank the images of every shard for each query image.

        Parameters
        ----------
        vecs, image_ids, k
            As for ``Index.search``.

        Returns
        -------
        scores : float32 [Q, k]
        ids : int64 [Q, k]
            Equal to ``Index.search`` of the whole index.
        """
        ray = require_ray()
        k = self._k(k)
        # Stored once, read by every shard.
        query_vecs, query_ids = ray.put(vecs), ray.put(image_ids)
        refs = [actor.search.remote(query_vecs, query_ids, k) for actor in self._actors]
        return merge_topk(gather(refs, desc="search shards", progress=False), k)

    def search_blocks(self, blocks: Sequence, k: int, *, progress: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
        """``search`` of several query blocks at once (all blocks are sent to all shards
        before any result is awaited), each a query-side ``Aggregates`` or (list of
        float32 [n_i, D], ids int64 [b]).

        Returns
        -------
        list of (scores float32 [b, k], ids int64 [b, k])
        """
        refs, weights = [], []
        for block in blocks:
            for actor in self._actors:
                refs.append(actor.search_block.remote(block, k))
                weights.append(_block_size(block))
        parts = gather(refs, desc="top-k", weights=weights, progress=progress)
        n = self.n_shards
        return [merge_topk(parts[j * n : (j + 1) * n], k) for j in range(len(blocks))]

    def save(self, path: str | os.PathLike) -> None:
        """Save every shard from its actor into a sharded directory (atomically; the
        workers must see ``path``: a shared file system on a multi-node cluster)."""
        target = Path(path).resolve()
        with _AtomicDir(target) as tmp:
            gather(
                [actor.save.remote(str(tmp / _shard_dir(i))) for i, actor in enumerate(self._actors)],
                desc="save shards",
                progress=False,
            )
            _write_manifest(tmp, [dict(e, dir=_shard_dir(i)) for i, e in enumerate(self._entries)])

    def close(self) -> None:
        """Stop the shard actors."""
        ray = require_ray()
        for actor in self._actors:
            ray.kill(actor)
        self._actors, self._sources = [], []

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: The index a worker process last loaded from a path, so that the query blocks a worker
#: runs one after another load (and verify) it once.
_LOADED: dict[str, Index] = {}


def _search_block(source: Any, block, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one query block against a whole index (an Index, or the path of one)."""
    if isinstance(source, str):
        if source not in _LOADED:
            _LOADED.clear()
            _LOADED[source] = Index.load(source, mmap=True, verify=True)
        source = _LOADED[source]
    return _search(source, block, k)


def _write_result(out: Path, scores: np.ndarray, ids: np.ndarray) -> None:
    """``out`` (.npz with ``scores`` and ``ids``), written whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, scores=scores, ids=ids)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def scores_topk(
    index,
    queries,
    image_ids=None,
    k: int | None = None,
    *,
    block: int = 256,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    num_cpus: float = 1,
    max_retries: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """The top-k database images of every query image, as query-block tasks.

    With the database images themselves as queries this is the top-k of each row of the
    all-vs-all similarity matrix.

    Parameters
    ----------
    index : Index, ShardedIndex, or str / path-like
        An index (sent to the workers once through the object store), the path of a
        saved index (each worker loads it, memory-mapped), a sharded directory (loaded
        into shard actors for this call), or a ShardedIndex (every block is searched on
        every shard and merged with ``merge_topk``).
    queries : float32 [N, D], list of float32 [n_i, D], or Aggregates
        Query descriptors, as for ``Index.search``; or the query-side aggregates of
        ``build_index(..., queries=True)`` (``IndexBuild.queries``), one row of the
        result per aggregated image.
    image_ids : int64 [N] for array input; ignored labels for list input; unused with
        aggregates
    k : int, optional
        Results per query (default ``params.topk``; None there ranks the whole index).
    block : int
        Query images per task.
    out : str or path-like, optional
        Also write the result as ``.npz`` (``scores``, ``ids``), atomically: a failed or
        killed run leaves no file.
    progress : bool
        A progress bar on the driver, advanced as blocks finish anywhere on the cluster.
    num_cpus : float
        CPUs each task (or, for a sharded directory, each shard actor) reserves.
    max_retries : int
        Times Ray reruns a block whose worker died.

    Returns
    -------
    scores : float32 [Q, k]
    ids : int64 [Q, k]
        Equal to ``Index.search(queries, image_ids, k)`` of the (whole) index: rows follow
        ``np.unique(image_ids)``, the list order, or the aggregates' order.
    """
    ray = require_ray()
    block = check_int(block, "block", min=1)
    max_retries = check_int(max_retries, "max_retries", min=0)
    if isinstance(index, (str, os.PathLike)) and is_sharded(index):
        with ShardedIndex.load(index, num_cpus=num_cpus) as sharded:
            return scores_topk(sharded, queries, image_ids, k, block=block, out=out, progress=progress)
    blocks = _query_blocks(queries, image_ids, block)
    if isinstance(index, ShardedIndex):
        k = index._k(k)
        parts = index.search_blocks(blocks, k, progress=progress)
    else:
        if isinstance(index, (str, os.PathLike)):
            path = str(Path(index).resolve())
            # Only for params and size: the workers load (and verify) it themselves.
            probe = Index.load(path, mmap=True, verify=False)
            source, params, size = path, probe.params, len(probe)
            del probe
        elif isinstance(index, Index):
            source, params, size = ray.put(index), index.params, len(index)
        else:
            raise ArgumentError(f"index: expected an Index, a ShardedIndex or a path, got {type(index).__name__}")
        k = check_int(k, "k", min=1, none=True)
        k = params.topk if k is None else k
        k = max(size, 1) if k is None else k
        task = remote_task(_search_block, num_cpus=num_cpus, max_retries=max_retries)
        refs = [task.remote(source, b, k) for b in blocks]
        parts = gather(refs, desc="top-k", weights=[_block_size(b) for b in blocks], progress=progress)
    scores, ids = (np.concatenate([p[i] for p in parts]) for i in (0, 1)) if parts else _empty_result(k)
    if out is not None:
        _write_result(Path(out), scores, ids)
    return scores, ids
