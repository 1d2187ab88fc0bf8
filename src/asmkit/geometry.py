"""``GeometryStore``: the keypoints and visual words of database images, for spatial verification.

State (all arrays, no per-image Python objects):

- ``ids`` int64 [S], ascending image ids (the index's ids when attached to an ``Index``);
- ``offsets`` int64 [S + 1]: image ``ids[s]`` owns rows ``offsets[s]:offsets[s + 1]``;
- ``keypoints`` float32 [F, 4]: x, y (pixels of the image the features were extracted
  from), scale, angle (degrees); deep features give their cell centres;
- ``words`` int32 [F]: the visual word of each feature (column 0 of the database
  quantization), ascending within each image, so that two images' tentative
  correspondences are one merge of two sorted lists (``asmkit.verify.word_matches``);
- ``signatures`` uint64 [F, W]: the signs of each descriptor's residual to its word,
  packed (``asmkit.kernel.pack_bits``; W = ceil(D / 64)), as in Hamming embedding: two
  features of one word whose signatures differ in many bits are no correspondence.

Descriptors themselves are not kept: word + signature correspondences take 20 bytes a
feature instead of 4 D (see docs/verify.md for what each choice measured). Saved as an asmkit directory of kind ``"geometry"``
(``asmkit.storage``: atomic, checksummed, memory-mapped on load).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from . import storage
from ._validation import ArgumentError, FileFormatError, check_ids, check_int
from .codebook import Codebook
from .kernel import pack_bits

__all__ = ["GeometryStore", "feature_words", "sort_by_word"]

_KIND = "geometry"


def sort_by_word(
    keypoints, words, signatures=None, *, name: str = "keypoints"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's features, checked and ordered by ascending word (stable).

    Parameters
    ----------
    keypoints : float32 [n, 4] (or [n, >= 2]: missing scale and angle become 1 and 0)
    words : int [n]
        Visual words, non-negative.
    signatures : uint64 [n, W], optional
        Binary signatures (``feature_words``); None gives W = 0 (no Hamming check).

    Returns
    -------
    keypoints : float32 [n, 4], C-contiguous
    words : int32 [n], ascending
    signatures : uint64 [n, W]

    Raises
    ------
    ArgumentError
        Shapes that do not match, non-finite keypoints or negative words (naming ``name``).
    """
    kp = np.asarray(keypoints)
    if kp.dtype.kind not in "fiu" or kp.ndim != 2 or kp.shape[1] < 2 or kp.shape[1] > 4:
        raise ArgumentError(f"{name}: expected a float array [n, 2..4] (x, y, scale, angle), got {kp.dtype} {kp.shape}")
    w = np.asarray(words)
    if w.dtype.kind not in "iu" or w.ndim != 1 or w.shape[0] != kp.shape[0]:
        raise ArgumentError(f"{name}: expected {kp.shape[0]} integer words, got {w.dtype} {w.shape}")
    full = np.zeros((kp.shape[0], 4), dtype=np.float32)
    full[:, 2] = 1.0
    full[:, : kp.shape[1]] = kp
    if not np.isfinite(full).all():
        raise ArgumentError(f"{name}: contains NaN or infinite values")
    if w.size and (w.min() < 0 or w.max() > np.iinfo(np.int32).max):
        raise ArgumentError(f"{name}: words must be non-negative int32 values")
    sig = np.empty((kp.shape[0], 0), np.uint64) if signatures is None else np.asarray(signatures)
    if sig.dtype != np.uint64 or sig.ndim != 2 or sig.shape[0] != kp.shape[0]:
        raise ArgumentError(f"{name}: expected uint64 signatures [{kp.shape[0]}, W], got {sig.dtype} {sig.shape}")
    order = np.argsort(w, kind="stable")
    return np.ascontiguousarray(full[order]), w[order].astype(np.int32), np.ascontiguousarray(sig[order])


def feature_words(codebook: Codebook, descriptors: Sequence, m: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each image's words and signatures for verification: the nearest word of every
    descriptor (column 0 of the database quantization; the ``m`` nearest for queries) and
    the signs of its residual to each of them.

    Parameters
    ----------
    codebook : Codebook
    descriptors : sequence of float32 [n_i, D]
    m : int
        Words per descriptor.

    Returns
    -------
    words : list of int32 [n_i] (m = 1) or [n_i, m]
    signatures : list of uint64 [n_i, W] (m = 1) or [n_i, m, W], W = ceil(D / 64)
    """
    if not isinstance(codebook, Codebook):
        raise ArgumentError(f"codebook: expected an asmkit Codebook, got {type(codebook).__name__}")
    m = check_int(m, "m", min=1)
    arrays = [np.asarray(d, dtype=np.float32).reshape(-1, codebook.dim) for d in descriptors]
    counts = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    vecs = np.concatenate(arrays) if arrays else np.empty((0, codebook.dim), np.float32)
    words = codebook.quantize(vecs, m).astype(np.int32) if vecs.shape[0] else np.empty((0, m), np.int32)
    signatures = pack_bits((vecs[:, None, :] > codebook.centroids[words]).reshape(-1, codebook.dim))
    signatures = signatures.reshape(vecs.shape[0], m, -1)
    if m == 1:
        words, signatures = words[:, 0], signatures[:, 0]
    cuts = np.cumsum(counts)[:-1]
    return np.split(words, cuts), np.split(signatures, cuts)


class GeometryStore:
    """Keypoints and visual words of the images of a database, grouped by image.

    Examples
    --------
    >>> store = GeometryStore()
    >>> store.add([3], [np.zeros((2, 4), np.float32)], [np.array([7, 1])])
    >>> store.get(3)[1]
    array([1, 7], dtype=int32)
    """

    def __init__(self) -> None:
        self._ids = np.empty(0, dtype=np.int64)
        self._offsets = np.zeros(1, dtype=np.int64)
        self._keypoints = np.empty((0, 4), dtype=np.float32)
        self._words = np.empty(0, dtype=np.int32)
        self._signatures = np.empty((0, 0), dtype=np.uint64)

    # -- properties ---------------------------------------------------------------------------

    @property
    def ids(self) -> np.ndarray:
        """int64 [S]: image ids, ascending (read-only view)."""
        return _readonly(self._ids)

    @property
    def offsets(self) -> np.ndarray:
        """int64 [S + 1]: image ``ids[s]`` owns feature rows ``offsets[s]:offsets[s + 1]``."""
        return _readonly(self._offsets)

    @property
    def keypoints(self) -> np.ndarray:
        """float32 [F, 4]: x, y, scale, angle of every feature, image after image."""
        return _readonly(self._keypoints)

    @property
    def words(self) -> np.ndarray:
        """int32 [F]: visual word of every feature, ascending within each image."""
        return _readonly(self._words)

    @property
    def signatures(self) -> np.ndarray:
        """uint64 [F, W]: binary signature of every feature (W = 0: none kept)."""
        return _readonly(self._signatures)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what ``save`` writes, less the file headers)."""
        return int(
            self._ids.nbytes
            + self._offsets.nbytes
            + self._keypoints.nbytes
            + self._words.nbytes
            + self._signatures.nbytes
        )

    @property
    def bytes_per_image(self) -> float:
        """``nbytes`` over the number of images (0 for an empty store)."""
        return self.nbytes / len(self) if len(self) else 0.0

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    def __repr__(self) -> str:
        return f"GeometryStore(images={len(self)}, features={self._words.shape[0]}, bytes/image={self.bytes_per_image:.0f})"

    @classmethod
    def from_features(
        cls, codebook: Codebook, descriptors: Sequence, keypoints: Sequence, image_ids=None
    ) -> GeometryStore:
        """A store of images whose features are at hand (``feature_words`` gives the words).

        Parameters
        ----------
        codebook : Codebook
        descriptors : sequence of float32 [n_i, D]
        keypoints : sequence of float32 [n_i, 4] or None
            None: an image without keypoints (stored without features).
        image_ids : int64 [I], optional
            Default ``0 .. I - 1``.
        """
        descriptors, keypoints = list(descriptors), list(keypoints)
        if len(descriptors) != len(keypoints):
            raise ArgumentError(f"keypoints: {len(keypoints)} arrays for {len(descriptors)} images")
        kp = [np.empty((0, 4), np.float32) if k is None else k for k in keypoints]
        words, sigs = feature_words(
            codebook, [d if k is not None else np.asarray(d)[:0] for d, k in zip(descriptors, keypoints)]
        )
        store = cls()
        store.add(np.arange(len(kp)) if image_ids is None else image_ids, kp, words, sigs)
        return store

    # -- lookup -------------------------------------------------------------------------------

    def slots_of(self, image_ids, *, missing: int | None = None) -> np.ndarray:
        """Positions in ``ids`` of some image ids.

        Parameters
        ----------
        image_ids : int [n]
        missing : int, optional
            Returned for ids not in the store; None raises instead.

        Returns
        -------
        int64 [n]

        Raises
        ------
        ArgumentError
            An id not in the store (with ``missing=None``).
        """
        ids = np.atleast_1d(np.asarray(image_ids, dtype=np.int64))
        slots = np.searchsorted(self._ids, ids)
        clipped = np.minimum(slots, max(len(self) - 1, 0))
        found = (slots < len(self)) & (self._ids[clipped] == ids) if len(self) else np.zeros(ids.shape, bool)
        if missing is None:
            if not found.all():
                raise ArgumentError(f"image_ids: not in the geometry store: {ids[~found][:10].tolist()}")
            return slots.astype(np.int64)
        return np.where(found, slots, missing).astype(np.int64)

    def get(self, image_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One image's features: keypoints float32 [n, 4], words int32 [n] (ascending) and
        signatures uint64 [n, W]."""
        slot = int(self.slots_of([image_id])[0])
        begin, end = self._offsets[slot], self._offsets[slot + 1]
        return self._keypoints[begin:end], self._words[begin:end], self._signatures[begin:end]

    # -- modification -------------------------------------------------------------------------

    def add(self, image_ids, keypoints: Sequence, words: Sequence, signatures: Sequence | None = None) -> None:
        """Add images.

        Parameters
        ----------
        image_ids : int64 [I]
            New ids (non-negative, not in the store, distinct).
        keypoints : sequence of float32 [n_i, 4] (or [n_i, 2]), one per image
        words : sequence of int [n_i], one per image
            Each image's visual words; features are stored ordered by word.
        signatures : sequence of uint64 [n_i, W], optional
            Each image's binary signatures (``feature_words``), W as in the store's other
            images. None: W = 0 (tentative correspondences by words alone).

        Raises
        ------
        ArgumentError
            Bad shapes or values, ids already stored, lengths that differ.
        """
        ids = check_ids(image_ids if not isinstance(image_ids, (list, tuple)) else np.asarray(image_ids, np.int64))
        keypoints, words = list(keypoints), list(words)
        signatures = [None] * len(words) if signatures is None else list(signatures)
        if not len(keypoints) == len(words) == len(signatures) == ids.shape[0]:
            raise ArgumentError(
                f"keypoints: got {len(keypoints)} keypoint, {len(words)} word and {len(signatures)} "
                f"signature arrays for {ids.shape[0]} images"
            )
        if np.unique(ids).shape[0] != ids.shape[0]:
            raise ArgumentError("image_ids: must be distinct")
        clash = ids[np.isin(ids, self._ids)]
        if clash.size:
            raise ArgumentError(f"image_ids: already in the geometry store: {clash[:10].tolist()}")
        if not ids.size:
            return
        parts = [
            sort_by_word(k, w, g, name=f"keypoints[{i}]")
            for i, (k, w, g) in enumerate(zip(keypoints, words, signatures))
        ]
        width = {p[2].shape[1] for p in parts}
        if len(self) and self._words.shape[0]:
            width.add(self._signatures.shape[1])
        if len(width) > 1:
            raise ArgumentError(f"signatures: widths {sorted(width)} differ (one codebook, one descriptor size)")
        width = width.pop()
        old_sigs = self._signatures if self._signatures.shape[1] == width else np.empty((0, width), np.uint64)
        counts = np.array([p[1].shape[0] for p in parts], dtype=np.int64)
        all_ids = np.concatenate([self._ids, ids])
        all_counts = np.concatenate([np.diff(self._offsets), counts])
        kp = np.concatenate([self._keypoints] + [p[0] for p in parts])
        wd = np.concatenate([self._words] + [p[1] for p in parts])
        sg = np.concatenate([old_sigs] + [p[2] for p in parts])
        self._install(all_ids, all_counts, kp, wd, sg)

    def remove(self, image_ids) -> None:
        """Remove images by id (all of them, or none when one is unknown).

        Raises
        ------
        ArgumentError
            An id not in the store.
        """
        slots = self.slots_of(image_ids)
        keep = np.ones(len(self), dtype=bool)
        keep[slots] = False
        rows = np.repeat(keep, np.diff(self._offsets))
        self._install(
            self._ids[keep],
            np.diff(self._offsets)[keep],
            self._keypoints[rows],
            self._words[rows],
            self._signatures[rows],
        )

    def _install(self, ids, counts, keypoints, words, signatures) -> None:
        """Set the state from images in any id order; regroup them in ascending id order."""
        order = np.argsort(ids, kind="stable")
        if np.any(order != np.arange(order.shape[0])):
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[order]
            counts = counts[order]
            # Row r of the result comes from its image's old start plus its rank in that image.
            new_starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            rows = np.repeat(starts - new_starts, counts) + np.arange(int(counts.sum()))
            ids, keypoints, words, signatures = ids[order], keypoints[rows], words[rows], signatures[rows]
        self._ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._keypoints = np.ascontiguousarray(keypoints, dtype=np.float32)
        self._words = np.ascontiguousarray(words, dtype=np.int32)
        self._signatures = np.ascontiguousarray(signatures, dtype=np.uint64)

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the store atomically as an asmkit directory of kind ``"geometry"``."""
        arrays = {
            "ids": self._ids,
            "offsets": self._offsets,
            "keypoints": self._keypoints,
            "words": self._words,
            "signatures": self._signatures,
        }
        storage.save_arrays(path, arrays, {"images": len(self), "features": int(self._words.shape[0])}, kind=_KIND)

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True, verify: bool = True) -> GeometryStore:
        """Open a store written by ``save`` (memory-mapped read-only by default).

        ``add`` and ``remove`` still work on a memory-mapped store: they build new
        in-memory arrays.

        Raises
        ------
        FileNotFoundError
            ``path`` does not exist.
        FileFormatError
            Missing, mistyped or inconsistent arrays (naming the directory).
        asmkit.storage.StorageError
            A corrupted, truncated or wrong-kind directory (naming the file).
        """
        arrays, _ = storage.load_arrays(path, kind=_KIND, mmap=mmap, verify=verify)
        shapes = {
            "ids": (np.int64, 1),
            "offsets": (np.int64, 1),
            "keypoints": (np.float32, 2),
            "words": (np.int32, 1),
            "signatures": (np.uint64, 2),
        }
        for name, (dtype, ndim) in shapes.items():
            if name not in arrays or arrays[name].dtype != dtype or arrays[name].ndim != ndim:
                raise FileFormatError(
                    path, f"not a geometry store ({name}.npy missing or not {np.dtype(dtype)} {ndim}-D)"
                )
        ids, offsets, kp, words, sigs = (arrays[n] for n in ("ids", "offsets", "keypoints", "words", "signatures"))
        n_feat = words.shape[0]
        if (
            offsets.shape != (ids.shape[0] + 1,)
            or offsets[0] != 0
            or offsets[-1] != n_feat
            or np.any(np.diff(offsets) < 0)
            or kp.shape != (n_feat, 4)
            or sigs.shape[0] != n_feat
            or np.any(np.diff(ids) <= 0)
        ):
            raise FileFormatError(path, "inconsistent geometry arrays (ids, offsets, keypoints, words, signatures)")
        store = cls()
        store._ids, store._offsets, store._keypoints, store._words, store._signatures = ids, offsets, kp, words, sigs
        return store


def _readonly(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view
