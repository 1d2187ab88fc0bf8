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
from collections.abc import Iterable

import numpy as np

from . import storage
from ._validation import ArgumentError, check_ids, check_int
from .codebook import Codebook
from .ivf import InvertedFile, compute_idf, image_norms, ivf_stats
from .kernel import Aggregates, aggregate, n_code_words, prepare_descriptors
from .params import Params, as_params
from .regions import Regions, aggregate_regions
from .search import Database, score_queries

__all__ = ["Index"]

logger = logging.getLogger(__name__)

_KIND = "index"


def _shared(ivf: InvertedFile) -> InvertedFile:
    """``ivf`` with read-only views of its arrays, to hand out: a view references its base
    array, so ``InvertedFile.append(in_place=True)`` copies rather than grows an array
    that someone still reads."""
    views = []
    for array in (ivf.offsets, ivf.slots, ivf.data):
        view = array.view()
        view.flags.writeable = False
        views.append(view)
    return InvertedFile(*views)


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
            raise ArgumentError(f"codebook: expected an asmkit Codebook, got {type(codebook).__name__}")
        params = as_params(params)
        if params.codebook_size != codebook.size:
            logger.debug(
                "params.codebook_size %d replaced by the codebook's size %d", params.codebook_size, codebook.size
            )
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
        self._database: Database | None = None
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
        """The CSR posting lists (slot ``s`` is image ``ids[s]``), as read-only views: while
        they are held, ``add`` copies the lists instead of growing them in place."""
        return _shared(self._ivf)

    @property
    def is_shard(self) -> bool:
        """True for the read-only parts made by ``split``."""
        return self._n_idf_images is not None

    def __copy__(self) -> "Index":
        """A copy that shares the arrays but not their growth: ``add`` grows posting lists
        in place when nothing else reads them, so the copy holds read-only views, which an
        add on either index copies instead of growing (copy-on-write snapshots)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._ivf = _shared(self._ivf)
        return clone

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

    def keys_of(self, ids) -> list[str]:
        """The names of images by id (int [n]), in that order.

        Raises
        ------
        ArgumentError
            An id that is not in the index.
        """
        return self._keys[self._slots_of(np.asarray(ids, dtype=np.int64), "ids")].tolist()

    # -- modification ---------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.is_shard:
            raise ArgumentError("index: a shard made by split() is read-only; modify the whole index and split again")

    def add(
        self, vecs, image_ids=None, keys: Iterable[str] | None = None, *, regions: Regions | None = None
    ) -> np.ndarray:
        """Add images.

        Equals ``add_aggregates(aggregate_images(codebook, vecs, image_ids, params), ids,
        keys)`` (``asmkit.kernel.aggregate_images``) with the ids of
        ``prepare_descriptors``.

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
        regions : asmkit.regions.Regions, optional
            Regions of the new images, in ``keys`` order: R-ASMK(*) aggregation
            (``asmkit.regions.aggregate_regions``, docs/regions.md) instead of ASMK's.

        Returns
        -------
        int64 [I]
            The ids of the added images (in ``keys`` order).

        Raises
        ------
        ArgumentError
            Bad input, naming ``vecs``, ``image_ids`` or ``keys``; an id or key already in
            the index.
        """
        self._check_writable()
        desc = prepare_descriptors(vecs, image_ids, dim=self._codebook.dim)
        new_ids = desc.image_ids
        new_keys = self._check_new_images(new_ids, keys)
        if desc.n_images == 0:
            return new_ids
        words = self._codebook.assign(desc.vecs, self._params.ma_database, check_finite=False).settle()
        if regions is None:
            aggregates = aggregate(
                desc.vecs, words, desc.starts, desc.order, self._codebook.centroids, binary=self._params.binary
            )
        else:
            aggregates = aggregate_regions(
                desc.vecs, words, desc.starts, desc.order, self._codebook.centroids, regions, binary=self._params.binary
            )
        del words
        self._add_checked(aggregates, new_ids, new_keys)
        logger.debug("added %d images (%d descriptors); index holds %d", desc.n_images, desc.vecs.shape[0], len(self))
        return new_ids

    def add_aggregates(self, aggregates: Aggregates, image_ids, keys: Iterable[str] | None = None) -> np.ndarray:
        """Add images from their database-side aggregates.

        ``aggregates`` come from ``asmkit.kernel.aggregate_images(codebook, vecs, ids,
        params, side="database")`` with this index's codebook and params (possibly on
        another machine); the index then equals one built by ``add(vecs, ids, keys)``.

        Parameters
        ----------
        aggregates : Aggregates
            I images, rows sorted by (image, word); packed binary codes for an ASMK*
            index, float32 [M, D] for ASMK.
        image_ids : int64 [I]
            The id of each aggregated image, distinct, non-negative and new to the index.
        keys : sequence of str, optional
            Names of the new images, in ``image_ids`` order (default ``str(id)``).

        Returns
        -------
        int64 [I]
            ``image_ids``.

        Raises
        ------
        ArgumentError
            Aggregates that do not fit the index (binary/real, dimension, words), bad or
            already-present ids or keys.
        """
        self._check_writable()
        if not isinstance(aggregates, Aggregates):
            raise ArgumentError(f"aggregates: expected asmkit.kernel.Aggregates, got {type(aggregates).__name__}")
        n = aggregates.offsets.shape[0] - 1
        new_ids = check_ids(image_ids, name="image_ids", length=n)
        if np.unique(new_ids).shape[0] != n:
            raise ArgumentError("image_ids: must be distinct")
        data, words, offsets = aggregates.data, aggregates.words, aggregates.offsets
        if data.dtype != self._ivf.data.dtype or data.ndim != 2 or data.shape[1] != self._ivf.data.shape[1]:
            raise ArgumentError(
                f"aggregates: {data.dtype} {data.shape[1:]} codes do not fit this index "
                f"({self._ivf.data.dtype} {self._ivf.data.shape[1:]})"
            )
        if (
            words.ndim != 1
            or words.shape[0] != data.shape[0]
            or offsets[0] != 0
            or offsets[-1] != words.shape[0]
            or np.any(np.diff(offsets) < 0)
            or (words.size and (int(words.min()) < 0 or int(words.max()) >= self._codebook.size))
        ):
            raise ArgumentError(
                f"aggregates: inconsistent offsets or words (of a codebook of {self._codebook.size} words)"
            )
        new_keys = self._check_new_images(new_ids, keys)
        if n:
            self._add_checked(aggregates, new_ids, new_keys)
        return new_ids

    def _check_new_images(self, new_ids: np.ndarray, keys) -> np.ndarray:
        """The keys of new images (validated), after checking their ids are new."""
        clash = new_ids[np.isin(new_ids, self._ids)]
        if clash.size:
            raise ArgumentError(f"image_ids: already in the index: {clash[:10].tolist()}")
        return self._check_new_keys(keys, new_ids)

    def _add_checked(self, aggregates: Aggregates, new_ids: np.ndarray, new_keys: np.ndarray) -> None:
        n_old = len(self)
        added = InvertedFile.from_aggregates(
            aggregates, n_old + np.arange(new_ids.shape[0], dtype=np.int64), self._codebook.size
        )
        ids = np.concatenate([self._ids, new_ids])
        width = max(self._keys.dtype.itemsize, new_keys.dtype.itemsize) // 4
        keys_all = np.concatenate([self._keys.astype(f"<U{width}"), new_keys.astype(f"<U{width}")])
        # The cached database's views would keep the posting arrays from growing in place.
        self._database = None
        ivf = self._ivf.append(added, in_place=True)
        if n_old and new_ids.min() < self._ids[-1] or not np.all(np.diff(new_ids) > 0):
            # Keep slots in ascending id order: renumber the slots of the merged lists.
            order = np.argsort(ids, kind="stable")
            new_slot = np.empty_like(order)
            new_slot[order] = np.arange(order.shape[0])
            ivf = InvertedFile(ivf.offsets, new_slot[ivf.slots].astype(np.int32), ivf.data)
            ids, keys_all = ids[order], keys_all[order]
        self._set_state(ivf, ids, keys_all)

    def _check_new_keys(self, keys, new_ids: np.ndarray) -> np.ndarray:
        if keys is None:
            new_keys = np.array([str(i) for i in new_ids.tolist()], dtype=str)
        else:
            if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
                raise ArgumentError("keys: expected a sequence of str")
            keys = list(keys)
            if not all(isinstance(key, str) for key in keys):
                raise ArgumentError("keys: every key must be a str")
            if len(keys) != new_ids.shape[0]:
                raise ArgumentError(f"keys: got {len(keys)} keys for {new_ids.shape[0]} new images")
            new_keys = np.array(keys, dtype=str)
        if new_keys.size == 0:
            return np.empty(0, dtype="<U1")
        if np.unique(new_keys).shape[0] != new_keys.shape[0]:
            raise ArgumentError("keys: must be distinct")
        taken = new_keys[np.isin(new_keys, self._keys)]
        if taken.size:
            raise ArgumentError(f"keys: already in the index: {taken[:10].tolist()}")
        return new_keys

    def _set_state(self, ivf: InvertedFile, ids: np.ndarray, keys: np.ndarray) -> None:
        """Install new posting lists and recompute idf and norms exactly."""
        self._ivf = ivf
        self._ids = ids
        self._keys = keys
        self._idf = compute_idf(ivf.counts, len(ids), self._params.use_idf)
        self._norms = image_norms(ivf, self._idf, len(ids))
        self._database = None
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
                    raise ArgumentError(f"{name}: no image named {item!r} in the index") from None
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                ids.append(int(item))
            else:
                raise ArgumentError(f"{name}: expected image ids (int) or keys (str), got {item!r}")
        ids_arr = np.asarray(ids, dtype=np.int64)
        slots = np.searchsorted(self._ids, ids_arr)
        found = (
            (slots < len(self)) & (self._ids[np.minimum(slots, max(len(self) - 1, 0))] == ids_arr)
            if len(self)
            else np.zeros(ids_arr.shape, dtype=bool)
        )
        if not found.all():
            raise ArgumentError(f"{name}: image ids not in the index: {ids_arr[~found][:10].tolist()}")
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

    @property
    def database(self) -> Database:
        """What queries are scored against (``asmkit.search.score_queries``): the posting
        lists, idf, √n_d and ids, shared with the index (not copies)."""
        if self._database is None:
            self._database = Database(_shared(self._ivf), self._idf, np.sqrt(self._norms), self._ids)
        return self._database

    def search(self, vecs, image_ids=None, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rank the database images for each query image (``asmkit.search.score_queries``).

        Parameters
        ----------
        vecs : float32 [N, D] or list of float32 [n_i, D]
            Query descriptors (quantized with ``params.ma_query``, each image as its own
            faiss call, as the reference does).
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
        k = check_int(k, "k", min=1, none=True)
        k = self._params.topk if k is None else k
        desc = prepare_descriptors(vecs, image_ids, dim=self._codebook.dim, unique_ids=False)
        return score_queries(self._codebook, desc, self.database, self._params, k=k)

    def similarity_matrix(self, vecs, image_ids=None, *, k: int | None = None, chunk: int = 256):
        """Scores of query images against every database image, as a dense matrix.

        With the database images themselves as queries this is the all-vs-all matrix
        (``asmkit.search.similarity_matrix`` computes that without building an index).
        Queries go through ``asmkit.search.score_queries``, as for ``search``.

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
        k = check_int(k, "k", min=1, none=True)
        chunk = check_int(chunk, "chunk", min=1)
        desc = prepare_descriptors(vecs, image_ids, dim=self._codebook.dim, unique_ids=False)
        dense_out = np.zeros((desc.n_images, len(self)), dtype=np.float32) if k is None else None
        return score_queries(
            self._codebook, desc, self.database, self._params, k=k, dense_out=dense_out, chunk_images=chunk
        )

    # -- shards -----------------------------------------------------------------------------

    def split(self, n_shards: int) -> list[Index]:
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
        n_shards = check_int(n_shards, "n_shards", min=1)
        if n_shards > max(len(self), 1):
            raise ArgumentError(f"n_shards: {n_shards} shards for {len(self)} images")
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
    def load(cls, path: str | os.PathLike, *, mmap: bool = True, verify: bool = True, gpu: int | None = None) -> Index:
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
            "offsets": ((n_words + 1,), np.int64),
            "slots": ((None,), np.int32),
            "idf": ((n_words,), np.float32),
            "norms": ((n_images,), np.float64),
            "ids": ((n_images,), np.int64),
        }
        for name, (shape, dtype) in expected.items():
            if a[name].dtype != dtype or a[name].ndim != 1 or (shape[0] is not None and a[name].shape != shape):
                raise storage.StorageError(
                    f"{path}/{name}.npy: expected {np.dtype(dtype)} {shape}, got {a[name].dtype} {a[name].shape}"
                )
        data_dtype = np.uint64 if params.binary else np.float32
        n_entries = a["slots"].shape[0]
        offsets, slots = a["offsets"], a["slots"]
        if (
            a["data"].dtype != data_dtype
            or a["data"].shape != (n_entries, width)
            or a["keys"].shape != (n_images,)
            or a["keys"].dtype.kind != "U"
            or offsets[0] != 0
            or offsets[-1] != n_entries
            or np.any(np.diff(offsets) < 0)
            or (n_entries and (int(slots.min()) < 0 or int(slots.max()) >= n_images))
        ):
            raise storage.StorageError(f"{path}: inconsistent index arrays (posting lists, slots, codes or keys)")
        index._ivf = InvertedFile(offsets, slots, a["data"])
        index._ids, index._keys = a["ids"], a["keys"]
        index._idf, index._norms = a["idf"], a["norms"]
        idf_images = meta.get("idf_images")
        index._n_idf_images = None if idf_images is None else int(idf_images)
        return index
