"""``Index``: an ASMK database of images that can grow, shrink, be searched, split and saved.

State (all arrays, no per-image Python objects):

- ``ids`` int64 [S], ascending user image ids; slot ``s`` of the inverted file is ``ids[s]``;
- ``keys`` unicode [S], the images' names (default ``str(id)``);
- the CSR inverted file (``asmkit.ivf.InvertedFile``);
- ``idf`` float32 [K] and ``norms`` float64 [S] (n_d), recomputed exactly from the current
  posting lists after every ``add``/``remove`` (the reference keeps stale idf).

N in idf is the number of images in the index, images without descriptors included (see
``asmkit.ivf``). Shards made by ``Index.split`` keep the whole index's idf, N and norms, so
their top-k lists merge (``asmkit.search.merge_topk``) into the whole index's result; they
are read-only.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

import numpy as np

from . import storage
from .codebook import Codebook
from .ivf import InvertedFile, compute_idf, image_norms, ivf_stats
from .kernel import aggregate, n_code_words, prepare_descriptors
from .params import Params
from .search import aggregate_images, as_params, check_k, score_aggregates

__all__ = ["Index"]

logger = logging.getLogger(__name__)

_KIND = "index"
#: Query descriptors per search chunk (16 MiB of 128-D float32 and, at m = 5, 1.3 MiB of
#: words): enough query images per chunk for word-major scoring to pay off, few enough to
#: bound peak memory. Measured over all queries, cold process (StagePeak): synthetic
#: 1000 x 500, K = 1024: 1.48 -> 1.32 ms per query against 1 << 14, peak +0.5 MB either
#: way (1 << 16: 1.19 ms, +2.3 MB); UKBench, K = 4096: 2.1 ms, +2.1 MB (1 << 14: +1.3 MB).
_SEARCH_CHUNK_ROWS = 1 << 15
#: Tied query rows held back for one faiss pass (``Index._settle_ties``; 2 MiB at 128-D),
#: so that faiss's batches are shared by the rows of many chunks: on UKBench (2170 tied
#: rows in 2000 query images) 2.9 -> 2.2 ms per query, peak memory +1.2 -> +1.3 MB.
_UNSETTLED_ROWS = 1 << 12


class _Unsettled:
    """Query rows whose words are provisional (tied within float32 rounding), gathered
    over search chunks: their query image, offset in it and its size, the row and its
    provisional words."""

    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, ...]] = []
        self.rows = 0

    def add(self, vecs, assignments, starts, tied, first_image) -> None:
        if not tied.size:
            return
        seg = np.searchsorted(starts, tied, side="right") - 1
        self._parts.append((seg + first_image, tied - starts[seg], (starts[seg + 1] - starts[seg]),
                            vecs[tied], assignments[tied]))
        self.rows += tied.size

    def take(self) -> tuple[np.ndarray, ...]:
        parts = [np.concatenate(column) for column in zip(*self._parts)]
        self._parts, self.rows = [], 0
        return tuple(parts)


class Index:
    """ASMK / ASMK* image index over a fixed codebook.

    Parameters
    ----------
    codebook : Codebook
        The visual words; its size overrides ``params.codebook_size``.
    params : Params, preset name, dict or None
        Kernel parameters (default ``Params()``, i.e. the ``asmk_star`` preset).

    Examples
    --------
    >>> index = Index(codebook, "asmk_star")                  # doctest: +SKIP
    >>> index.add(vecs, image_ids, keys=names)                # doctest: +SKIP
    >>> scores, ids = index.search(qvecs, qimage_ids, k=10)   # doctest: +SKIP
    """

    def __init__(self, codebook: Codebook, params=None) -> None:
        if not isinstance(codebook, Codebook):
            raise TypeError(f"codebook: expected an asmkit Codebook, got {type(codebook).__name__}")
        params = as_params(params)
        if params.codebook_size != codebook.size:
            logger.debug("params.codebook_size %d replaced by the codebook's size %d", params.codebook_size, codebook.size)
            params = params.replace(codebook_size=codebook.size)
        self._codebook = codebook
        self._params = params
        width = n_code_words(codebook.dim) if params.binary else codebook.dim
        self._ivf = InvertedFile.empty(codebook.size, width, params.binary)
        self._ids = np.empty(0, dtype=np.int64)
        self._keys = np.empty(0, dtype="<U1")
        self._idf = np.ones(codebook.size, dtype=np.float32)
        self._norms = np.empty(0, dtype=np.float64)
        self._n_idf_images: int | None = None  # set on shards: the whole index's N
        self._sqrt_norms: np.ndarray | None = None
        self._key_to_id: dict[str, int] | None = None

    # -- properties ---------------------------------------------------------------------------

    @property
    def codebook(self) -> Codebook:
        return self._codebook

    @property
    def params(self) -> Params:
        return self._params

    @property
    def ids(self) -> np.ndarray:
        """int64 [S]: the image ids, ascending (a copy)."""
        return np.array(self._ids, dtype=np.int64)

    @property
    def keys(self) -> list[str]:
        """The image names, in ascending id order."""
        return self._keys.tolist()

    @property
    def idf(self) -> np.ndarray:
        """float32 [K]: idf per word (1 everywhere without ``use_idf``; copy)."""
        return np.array(self._idf)

    @property
    def norms(self) -> np.ndarray:
        """float64 [S]: n_d = Σ idf over each image's words, in ``ids`` order (copy)."""
        return np.array(self._norms)

    @property
    def inverted_file(self) -> InvertedFile:
        """The CSR posting lists (slot ``s`` is image ``ids[s]``)."""
        return self._ivf

    @property
    def is_shard(self) -> bool:
        """True for the read-only parts made by ``split``."""
        return self._n_idf_images is not None

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    def __repr__(self) -> str:
        kind = "ASMK*" if self._params.binary else "ASMK"
        return f"Index({kind}, images={len(self)}, words={self._codebook.size}, entries={self._ivf.n_entries})"

    @property
    def stats(self) -> dict:
        """Posting-list statistics with the reference ``IVF.stats`` keys."""
        return ivf_stats(self._ivf.counts, len(self))

    def id_of(self, key: str) -> int:
        """The image id of a key.

        Raises
        ------
        KeyError
            Unknown key.
        """
        if self._key_to_id is None:
            self._key_to_id = dict(zip(self._keys.tolist(), self._ids.tolist()))
        try:
            return self._key_to_id[key]
        except (KeyError, TypeError):
            raise KeyError(f"key: no image named {key!r} in the index") from None

    # -- modification ---------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.is_shard:
            raise ValueError("index: a shard made by split() is read-only; modify the whole index and split again")

    def add(self, vecs, image_ids=None, keys: Iterable[str] | None = None) -> np.ndarray:
        """Add images.

        Parameters
        ----------
        vecs : float32 [N, D] or list of float32 [n_i, D]
            Descriptors; float64/integer input is converted. A list entry may have zero
            rows: that image is indexed without words and scores 0 against every query.
        image_ids : int64 [N] (array input, required), or None / int64 [len(vecs)]
            Row labels, or one id per list entry (default ``0 .. len(vecs) - 1``).
            Ids must be non-negative and new to the index.
        keys : sequence of str, optional
            Names of the new images, in ascending id order for array input, list order for
            list input (default ``str(id)``). Keys must be new and distinct.

        Returns
        -------
        int64 [I]
            The ids of the added images (in ``keys`` order).

        Raises
        ------
        TypeError, ValueError
            Bad input, naming ``vecs``, ``image_ids`` or ``keys``; an id or key already in
            the index.
        """
        self._check_writable()
        desc = prepare_descriptors(vecs, image_ids, dim=self._codebook.dim)
        new_ids = desc.image_ids
        clash = new_ids[np.isin(new_ids, self._ids)]
        if clash.size:
            raise ValueError(f"image_ids: already in the index: {clash[:10].tolist()}")
        new_keys = self._check_new_keys(keys, new_ids)
        if desc.n_images == 0:
            return new_ids

        assignments = self._codebook._quantize(desc.vecs, self._params.ma_database)
        aggregates = aggregate_images(self._codebook, desc, assignments, self._params.binary)
        del assignments
        n_old = len(self)
        added = InvertedFile.from_aggregates(aggregates, n_old + np.arange(desc.n_images, dtype=np.int64),
                                             self._codebook.size)
        del aggregates
        ivf = self._ivf.append(added)
        ids = np.concatenate([self._ids, new_ids])
        width = max(self._keys.dtype.itemsize, new_keys.dtype.itemsize) // 4
        keys_all = np.concatenate([self._keys.astype(f"<U{width}"), new_keys.astype(f"<U{width}")])
        if n_old and new_ids.min() < self._ids[-1] or not np.all(np.diff(new_ids) > 0):
            # Keep slots in ascending id order: renumber the slots of the merged lists.
            order = np.argsort(ids, kind="stable")
            new_slot = np.empty_like(order)
            new_slot[order] = np.arange(order.shape[0])
            ivf = InvertedFile(ivf.offsets, new_slot[ivf.slots].astype(np.int32), ivf.data)
            ids, keys_all = ids[order], keys_all[order]
        self._set_state(ivf, ids, keys_all)
        logger.debug("added %d images (%d descriptors); index holds %d", desc.n_images, desc.vecs.shape[0], len(self))
        return new_ids

    def _check_new_keys(self, keys, new_ids: np.ndarray) -> np.ndarray:
        if keys is None:
            new_keys = np.array([str(i) for i in new_ids.tolist()], dtype=str)
        else:
            if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
                raise TypeError("keys: expected a sequence of str")
            keys = list(keys)
            if not all(isinstance(key, str) for key in keys):
                raise TypeError("keys: every key must be a str")
            if len(keys) != new_ids.shape[0]:
                raise ValueError(f"keys: got {len(keys)} keys for {new_ids.shape[0]} new images")
            new_keys = np.array(keys, dtype=str)
        if new_keys.size == 0:
            return np.empty(0, dtype="<U1")
        if np.unique(new_keys).shape[0] != new_keys.shape[0]:
            raise ValueError("keys: must be distinct")
        taken = new_keys[np.isin(new_keys, self._keys)]
        if taken.size:
            raise ValueError(f"keys: already in the index: {taken[:10].tolist()}")
        return new_keys

    def _set_state(self, ivf: InvertedFile, ids: np.ndarray, keys: np.ndarray) -> None:
        """Install new posting lists and recompute idf and norms exactly."""
        self._ivf = ivf
        self._ids = ids
        self._keys = keys
        self._idf = compute_idf(ivf.counts, len(ids), self._params.use_idf)
        self._norms = image_norms(ivf, self._idf, len(ids))
        self._sqrt_norms = None
        self._key_to_id = None

    def _slots_of(self, ids_or_keys, name: str) -> np.ndarray:
        if isinstance(ids_or_keys, (str, int, np.integer)):
            ids_or_keys = [ids_or_keys]
        items = list(np.asarray(ids_or_keys).tolist()) if isinstance(ids_or_keys, np.ndarray) else list(ids_or_keys)
        ids = []
        for item in items:
            if isinstance(item, str):
                try:
                    ids.append(self.id_of(item))
                except KeyError:
                    raise ValueError(f"{name}: no image named {item!r} in the index") from None
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                ids.append(int(item))
            else:
                raise TypeError(f"{name}: expected image ids (int) or keys (str), got {item!r}")
        ids_arr = np.asarray(ids, dtype=np.int64)
        slots = np.searchsorted(self._ids, ids_arr)
        found = (slots < len(self)) & (self._ids[np.minimum(slots, max(len(self) - 1, 0))] == ids_arr) if len(self) \
            else np.zeros(ids_arr.shape, dtype=bool)
        if not found.all():
            raise ValueError(f"{name}: image ids not in the index: {ids_arr[~found][:10].tolist()}")
        return slots

    def remove(self, ids_or_keys) -> None:
        """Remove images by id or key (one, or a sequence mixing both).

        idf and norms of the remaining images are recomputed, so the index equals one
        built from scratch without these images.

        Raises
        ------
        ValueError
            An unknown id or key (nothing is removed then).
        """
        self._check_writable()
        slots = self._slots_of(ids_or_keys, "ids_or_keys")
        keep = np.ones(len(self), dtype=bool)
        keep[slots] = False
        new_slot = np.cumsum(keep) - 1
        ivf = self._ivf.select_slots(keep, new_slot)
        self._set_state(ivf, self._ids[keep], self._keys[keep])

    # -- search ------------------------------------------------------------------------------

    def _sqrt_norms_array(self) -> np.ndarray:
        if self._sqrt_norms is None:
            self._sqrt_norms = np.sqrt(self._norms)
        return self._sqrt_norms

    def _query_aggregates(self, vecs, image_ids):
        desc = prepare_descriptors(vecs, image_ids, dim=self._codebook.dim, unique_ids=False)
        assignments = self._codebook._quantize(desc.vecs, self._params.ma_query)
        return desc, assignments

    def _score_chunk(self, vecs, assignments, starts, k):
        """(scores, ids) of the query images whose rows ``vecs`` start at ``starts``."""
        queries = aggregate(vecs, assignments, starts, np.arange(len(vecs), dtype=np.int64),
                            self._codebook.centroids, binary=self._params.binary)
        return score_aggregates(self._ivf, self._idf, self._sqrt_norms_array(), self._ids, queries,
                                self._params, dim=self._codebook.dim, k=k)

    def _settle_ties(self, desc, unsettled, k, scores, ids) -> None:
        """Search again, with faiss's words, the query images where a row tied within float32
        rounding has other words in faiss's call than provisionally (a few in a thousand)."""
        if not unsettled.rows:
            return
        images, local, size, vecs, provisional = unsettled.take()
        words = self._codebook._settle(vecs, local, size, provisional.shape[1])[1]
        changed = np.any(np.sort(words, axis=1) != np.sort(provisional, axis=1), axis=1)
        redo = np.unique(images[changed])
        if not redo.size:
            return
        sizes = desc.starts[redo + 1] - desc.starts[redo]
        rows = desc.order[np.concatenate([np.arange(desc.starts[i], desc.starts[i + 1]) for i in redo])]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        chunk_vecs = desc.vecs[rows]
        assignments = self._codebook._quantize(chunk_vecs, self._params.ma_query, starts, nearest_first=False)
        scores[redo], ids[redo] = self._score_chunk(chunk_vecs, assignments, starts, k)

    def search(self, vecs, image_ids=None, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rank the database images for each query image.

        Parameters
        ----------
        vecs : float32 [N, D] or list of float32 [n_i, D]
            Query descriptors (quantized with ``params.ma_query``).
        image_ids : int64 [N] for array input (one label per row); ignored labels for list
            input (one row per list entry).
        k : int, optional
            Results per query (default ``params.topk``; None ranks the whole database).
            k larger than the database is padded.

        Returns
        -------
        scores : float32 [Q, k]
            Decreasing; ties ordered by ascending image id; -inf padding.
        ids : int64 [Q, k]
            Database image ids; -1 padding. Rows follow ``np.unique(image_ids)``, or the
            list order. An empty database gives all -1 (k columns, or 0 with k None).
        """
        k = check_k(k)
        k = self._params.topk if k is None else k
        desc = prepare_descriptors(vecs, image_ids, dim=self._codebook.dim, unique_ids=False)
        n = desc.n_images
        width = len(self) if k is None else k
        scores = np.empty((n, width), dtype=np.float32)
        ids = np.empty((n, width), dtype=np.int64)
        # Query images go through quantize -> aggregate -> score in chunks of about
        # _SEARCH_CHUNK_ROWS descriptors: peak memory stays that of one chunk's words and
        # aggregates, whatever the number of queries.
        unsettled = _Unsettled()
        begin = 0
        while begin < n:
            end = int(np.searchsorted(desc.starts, desc.starts[begin] + _SEARCH_CHUNK_ROWS, side="right")) - 1
            end = min(max(end, begin + 1), n)
            chunk_vecs = desc.vecs[desc.image_rows(begin, end)]
            starts = desc.starts[begin : end + 1] - desc.starts[begin]
            # One faiss call per query image, as the reference quantizes them (float32 ties);
            # a query image aggregates over the set of its words, column 0 plays no part.
            # Rows tied within float32 rounding keep provisional words until _settle_ties.
            assignments, _, tied = self._codebook._quantize_unsettled(
                chunk_vecs, self._params.ma_query, starts, nearest_first=False)
            scores[begin:end], ids[begin:end] = self._score_chunk(chunk_vecs, assignments, starts, k)
            unsettled.add(chunk_vecs, assignments, starts, tied, begin)
            if unsettled.rows >= _UNSETTLED_ROWS:
                self._settle_ties(desc, unsettled, k, scores, ids)
            begin = end
        self._settle_ties(desc, unsettled, k, scores, ids)
        return scores, ids

    def similarity_matrix(self, vecs, image_ids=None, *, k: int | None = None, chunk: int = 256):
        """Scores of query images against every database image, as a dense matrix.

        With the database images themselves as queries this is the all-vs-all matrix
        (``asmkit.search.similarity_matrix`` computes that without building an index).

        Parameters
        ----------
        vecs, image_ids
            Query images, as for ``search``.
        k : int, optional
            Return ``(scores [Q, k], ids [Q, k])`` per row instead.
        chunk : int
            Query images scored per batch (bounds the memory of their aggregates).

        Returns
        -------
        float32 [Q, S]
            Row = query (``np.unique(image_ids)`` or list order), column = database image
            in ``ids`` (ascending) order.
        """
        k = check_k(k)
        chunk = check_k(chunk, name="chunk")
        desc, assignments = self._query_aggregates(vecs, image_ids)
        n = desc.n_images
        if k is None:
            out = np.zeros((n, len(self)), dtype=np.float32)
        else:
            scores = np.empty((n, k), dtype=np.float32)
            ids = np.empty((n, k), dtype=np.int64)
        for begin in range(0, n, chunk):
            end = min(begin + chunk, n)
            queries = aggregate_images(self._codebook, desc, assignments, self._params.binary, begin, end)
            args = (self._ivf, self._idf, self._sqrt_norms_array(), self._ids, queries, self._params)
            if k is None:
                score_aggregates(*args, dim=self._codebook.dim, dense_out=out[begin:end])
            else:
                scores[begin:end], ids[begin:end] = score_aggregates(*args, dim=self._codebook.dim, k=k)
        return out if k is None else (scores, ids)

    # -- shards -----------------------------------------------------------------------------

    def split(self, n_shards: int) -> list["Index"]:
        """Split by image into read-only shards of near-equal image counts.

        Each shard keeps the whole index's idf, N and image norms, so searching every
        shard and merging with ``merge_topk`` gives exactly this index's ``search``.

        Parameters
        ----------
        n_shards : int
            1 .. len(self) (at least 1 for an empty index).

        Returns
        -------
        list of Index
            Shard ``j`` holds the images ``ids[bounds[j]:bounds[j + 1]]`` (ascending id
            ranges).
        """
        if isinstance(n_shards, bool) or not isinstance(n_shards, (int, np.integer)) or n_shards < 1:
            raise ValueError(f"n_shards: expected a positive int, got {n_shards!r}")
        if n_shards > max(len(self), 1):
            raise ValueError(f"n_shards: {n_shards} shards for {len(self)} images")
        bounds = (np.arange(n_shards + 1) * len(self)) // n_shards
        n_global = self._n_idf_images if self.is_shard else len(self)
        shards = []
        for begin, end in zip(bounds[:-1], bounds[1:]):
            keep = np.zeros(len(self), dtype=bool)
            keep[begin:end] = True
            new_slot = np.arange(len(self), dtype=np.int64) - begin
            shard = Index(self._codebook, self._params)
            shard._ivf = self._ivf.select_slots(keep, new_slot)
            shard._ids = self._ids[begin:end].copy()
            shard._keys = self._keys[begin:end].copy()
            shard._idf = self._idf
            shard._norms = np.array(self._norms[begin:end])
            shard._n_idf_images = int(n_global)
            shards.append(shard)
        return shards

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the index (codebook included) as an asmkit directory (kind ``"index"``).

        The arrays are stored as they are used, so ``load`` rebuilds nothing.
        """
        arrays = {
            "centroids": self._codebook.centroids,
            "offsets": self._ivf.offsets,
            "slots": self._ivf.slots,
            "data": self._ivf.data,
            "idf": self._idf,
            "norms": self._norms,
            "ids": self._ids,
            "keys": self._keys,
        }
        meta = {"params": self._params.to_dict(), "images": len(self), "idf_images": self._n_idf_images}
        storage.save_arrays(path, arrays, meta, kind=_KIND)

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True, verify: bool = True,
             gpu: int | None = None) -> "Index":
        """Open an index written by ``save``.

        Parameters
        ----------
        path : str or path-like
        mmap : bool
            Memory-map the arrays (read-only; pages load on first use). ``add``/``remove``
            still work: they build new in-memory arrays.
        verify : bool
            Check the SHA-256 of every file (reads every byte once).
        gpu : int, optional
            Quantize on this GPU (``Codebook(..., gpu=...)``).

        Raises
        ------
        FileNotFoundError
            ``path`` does not exist.
        asmkit.storage.StorageError
            Corrupted, truncated, wrong-kind or inconsistent directory (naming the file).
        """
        arrays, meta = storage.load_arrays(path, kind=_KIND, mmap=mmap, verify=verify)
        required = ("centroids", "offsets", "slots", "data", "idf", "norms", "ids", "keys")
        missing = [name for name in required if name not in arrays]
        if missing:
            raise storage.StorageError(f"{path}: index directory lacks arrays {missing}")
        try:
            params = Params.from_dict(meta["params"])
        except (KeyError, TypeError, ValueError) as exc:
            raise storage.StorageError(f"{path}/{storage.MANIFEST}: invalid params ({exc})") from None
        a = arrays
        index = cls(Codebook(np.asarray(a["centroids"]), gpu=gpu), params)
        n_words, n_images = index._codebook.size, a["ids"].shape[0]
        width = n_code_words(index._codebook.dim) if params.binary else index._codebook.dim
        expected = {
            "offsets": ((n_words + 1,), np.int64), "slots": ((None,), np.int32),
            "idf": ((n_words,), np.float32), "norms": ((n_images,), np.float64), "ids": ((n_images,), np.int64),
        }
        for name, (shape, dtype) in expected.items():
            if a[name].dtype != dtype or a[name].ndim != 1 or (shape[0] is not None and a[name].shape != shape):
                raise storage.StorageError(f"{path}/{name}.npy: expected {np.dtype(dtype)} {shape}, "
                                           f"got {a[name].dtype} {a[name].shape}")
        data_dtype = np.uint64 if params.binary else np.float32
        n_entries = a["slots"].shape[0]
        offsets, slots = a["offsets"], a["slots"]
        if (a["data"].dtype != data_dtype or a["data"].shape != (n_entries, width) or a["keys"].shape != (n_images,)
                or a["keys"].dtype.kind != "U" or offsets[0] != 0 or offsets[-1] != n_entries
                or np.any(np.diff(offsets) < 0)
                or (n_entries and (int(slots.min()) < 0 or int(slots.max()) >= n_images))):
            raise storage.StorageError(f"{path}: inconsistent index arrays (posting lists, slots, codes or keys)")
        index._ivf = InvertedFile(offsets, slots, a["data"])
        index._ids, index._keys = a["ids"], a["keys"]
        index._idf, index._norms = a["idf"], a["norms"]
        idf_images = meta.get("idf_images")
        index._n_idf_images = None if idf_images is None else int(idf_images)
        return index
