"""CSR inverted file: one posting list per visual word, plus counts, idf and image norms (docs/math.md §4).

Layout (``InvertedFile``): word ``c``'s posting list is ``offsets[c]:offsets[c + 1]`` of
``slots`` (the database slot of the image) and ``data`` (its aggregated code or vector).
Within a list, entries are ordered by insertion (images of one ``add`` by slot). Lists are
built with a stable sort by word and merged with vectorised index arithmetic; no entry is
ever appended one at a time.

N, the image count in idf = log(N / counts)², is the number of images in the index,
images without descriptors included. The reference uses its largest image id + 1 instead;
the two agree whenever the ids are 0 .. N-1, as in its usual use, and ours stays correct
after removals and for sparse ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernel import Aggregates

__all__ = ["InvertedFile", "compute_idf", "image_norms", "ivf_stats"]


@dataclass(frozen=True)
class InvertedFile:
    """Posting lists in compressed sparse row form.

    Attributes
    ----------
    offsets : int64 [K + 1]
        Word ``c`` owns entries ``offsets[c]:offsets[c + 1]``.
    slots : int32 [E]
        Database slot (``0 .. S-1``) of each entry.
    data : uint64 [E, ceil(D / 64)] or float32 [E, D]
        Packed binary code (ASMK*) or normalised aggregate (ASMK) of each entry.
    """

    offsets: np.ndarray
    slots: np.ndarray
    data: np.ndarray

    @property
    def n_words(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def n_entries(self) -> int:
        return int(self.slots.shape[0])

    @property
    def counts(self) -> np.ndarray:
        """int64 [K]: entries (= images) per word."""
        return np.diff(self.offsets)

    @property
    def binary(self) -> bool:
        return self.data.dtype == np.uint64

    def words_of_entries(self) -> np.ndarray:
        """int64 [E]: the word of each entry."""
        return np.repeat(np.arange(self.n_words, dtype=np.int64), self.counts)

    @classmethod
    def empty(cls, n_words: int, data_width: int, binary: bool) -> "InvertedFile":
        """An inverted file with K empty posting lists; ``data_width`` is W or D."""
        dtype = np.uint64 if binary else np.float32
        return cls(
            np.zeros(n_words + 1, dtype=np.int64),
            np.empty(0, dtype=np.int32),
            np.empty((0, data_width), dtype=dtype),
        )

    @classmethod
    def from_aggregates(cls, aggregates: Aggregates, slot_of_image: np.ndarray, n_words: int) -> "InvertedFile":
        """Posting lists from per-image aggregates by one stable sort by word.

        Parameters
        ----------
        aggregates : Aggregates
            Rows sorted by (image, word).
        slot_of_image : int64 [I]
            Database slot of each aggregated image.
        n_words : int
            K.
        """
        words = aggregates.words
        slots = slot_of_image[aggregates.image_of_rows()].astype(np.int32)
        order = np.argsort(words, kind="stable")
        offsets = np.zeros(n_words + 1, dtype=np.int64)
        np.cumsum(np.bincount(words, minlength=n_words), out=offsets[1:])
        return cls(offsets, slots[order], aggregates.data[order])

    def append(self, other: "InvertedFile") -> "InvertedFile":
        """Merge: each posting list of ``other`` goes after the same list of ``self``."""
        if other.n_entries == 0:
            return self
        offsets = self.offsets + other.offsets
        dest_self = np.arange(self.n_entries, dtype=np.int64) + other.offsets[self.words_of_entries()]
        dest_other = np.arange(other.n_entries, dtype=np.int64) + self.offsets[other.words_of_entries() + 1]
        n_total = self.n_entries + other.n_entries
        slots = np.empty(n_total, dtype=np.int32)
        slots[dest_self] = self.slots
        slots[dest_other] = other.slots
        data = np.empty((n_total,) + self.data.shape[1:], dtype=self.data.dtype)
        data[dest_self] = self.data
        data[dest_other] = other.data
        return InvertedFile(offsets, slots, data)

    def select_slots(self, keep: np.ndarray, new_slot: np.ndarray) -> "InvertedFile":
        """Keep only the entries of some slots and renumber them.

        Parameters
        ----------
        keep : bool [S]
            Slots to keep.
        new_slot : int64 [S]
            New number of each kept slot.
        """
        entry_keep = keep[self.slots]
        words = self.words_of_entries()[entry_keep]
        offsets = np.zeros(self.n_words + 1, dtype=np.int64)
        np.cumsum(np.bincount(words, minlength=self.n_words), out=offsets[1:])
        slots = new_slot[self.slots[entry_keep]].astype(np.int32)
        return InvertedFile(offsets, slots, self.data[entry_keep])


def compute_idf(counts: np.ndarray, n_images: int, use_idf: bool) -> np.ndarray:
    """idf[c] = float32(log(N / counts[c])²) for non-empty words, 1 otherwise (or everywhere
    when ``use_idf`` is False), with the reference's float64 arithmetic.

    Parameters
    ----------
    counts : int64 [K]
    n_images : int
        N.
    use_idf : bool

    Returns
    -------
    float32 [K]
    """
    idf = np.ones(counts.shape[0], dtype=np.float32)
    if use_idf and n_images > 0:
        present = counts > 0
        idf[present] = np.log(np.float64(n_images) / counts[present].astype(np.float64)) ** 2
    return idf


def image_norms(ivf: InvertedFile, idf: np.ndarray, n_slots: int) -> np.ndarray:
    """n_d = Σ idf[c] over each image's words, summed in float64 in ascending word order.

    Returns
    -------
    float64 [S]
    """
    weights = idf.astype(np.float64)[ivf.words_of_entries()]
    return np.bincount(ivf.slots, weights=weights, minlength=n_slots).astype(np.float64)


def ivf_stats(counts: np.ndarray, n_images: int) -> dict:
    """The reference's ``IVF.stats`` keys for posting-list sizes ``counts`` (int64 [K])."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    squares = float(np.square(counts, dtype=np.float64).sum())
    return {
        "images": int(n_images),
        "vectors_per_image": total / (n_images or 1),
        "mean_entries_per_vw": float(counts.mean()) if counts.size else 0.0,
        "empty_vw": int((counts == 0).sum()),
        "min_entries_per_vw": int(counts.min()) if counts.size else 0,
        "max_entries_per_vw": int(counts.max()) if counts.size else 0,
        "std_of_entries_per_vw": float(counts.std()) if counts.size else 0.0,
        "imbalance_factor_of_vw": counts.shape[0] * squares / (total**2 or 1),
    }
