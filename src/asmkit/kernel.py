"""Aggregation of residuals per (image, visual word) and binarisation (docs/math.md §2-3).

``aggregate`` aggregates descriptors whose words are known; ``aggregate_images`` quantizes
and aggregates images as the index does on either side, for callers that aggregate apart
from the index (``Index.add_aggregates``).

Also the validation of descriptor input shared by the index and search entry points:
``prepare_descriptors`` turns either ``(vecs [N, D], image_ids [N])`` or a list of per-image
arrays into one float32 matrix with dense image labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _kernels
from ._validation import ArgumentError, check_choice, check_ids, check_vecs
from .params import as_params

__all__ = [
    "Aggregates",
    "Descriptors",
    "aggregate",
    "aggregate_images",
    "hamming_similarity",
    "n_code_words",
    "n_hamming_bits",
    "normalize_l2",
    "pack_bits",
    "prepare_descriptors",
    "unpack_bits",
]


def n_code_words(dim: int) -> int:
    """uint64 words per packed binary code: ceil(D / 64)."""
    return (int(dim) + 63) // 64


def n_hamming_bits(dim: int) -> int:
    """B = 32 · ceil(D / 32), the bit count the reference normalises Hamming distances by."""
    return 32 * ((int(dim) + 31) // 32)


@dataclass(frozen=True)
class Descriptors:
    """Validated local descriptors of several images.

    Attributes
    ----------
    vecs : float32 [N, D]
        All descriptors, C-contiguous.
    image_ids : int64 [I]
        User id of each label: ascending unique ids for array input, the given (or
        ``0 .. I-1``) ids in list order for list input.
    starts, order : int64 [I + 1], int64 [N]
        Rows grouped by label: image ``i`` owns ``vecs[order[starts[i]:starts[i + 1]]]``.
    """

    vecs: np.ndarray
    image_ids: np.ndarray
    starts: np.ndarray
    order: np.ndarray

    @property
    def n_images(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def labels(self) -> np.ndarray:
        """int64 [N]: the image label (``0 .. I - 1``) of each row, computed on demand (the
        engine works from ``starts`` and ``order``; keeping it would cost 8 bytes a row)."""
        labels = np.empty(self.order.shape[0], dtype=np.int64)
        labels[self.order] = np.repeat(np.arange(self.n_images, dtype=np.int64), np.diff(self.starts))
        return labels

    def image_rows(self, begin: int, end: int) -> slice | np.ndarray:
        """Rows of images ``begin .. end - 1``, grouped by image: a slice when they lie in
        place in ``vecs`` (indexing then copies nothing), else int64 row indices."""
        lo, hi = int(self.starts[begin]), int(self.starts[end])
        rows = self.order[lo:hi]
        if hi == lo or (rows[0] == lo and rows[-1] == hi - 1 and bool(np.all(np.diff(rows) == 1))):
            return slice(lo, hi)
        return rows


def prepare_descriptors(vecs, image_ids=None, *, dim: int | None = None, unique_ids: bool = True) -> Descriptors:
    """Validate descriptor input in either accepted layout.

    Parameters
    ----------
    vecs : float32 [N, D] array or list of float32 [n_i, D] arrays
        Descriptors; float64/integer input is converted. A list entry may have 0 rows
        (an image without descriptors).
    image_ids : int64 [N] array, or for list input None / int64 [len(vecs)]
        Image label of each row (array input, required), or one id per list entry
        (list input; default ``0 .. len(vecs) - 1``).
    dim : int, optional
        Required descriptor dimension (the codebook's).
    unique_ids : bool
        For list input, require the ids to be distinct.

    Returns
    -------
    Descriptors

    Raises
    ------
    ArgumentError
        Naming ``vecs`` or ``image_ids``.
    """
    if isinstance(vecs, (list, tuple)):
        parts = [check_vecs(v, name=f"vecs[{i}]", dim=dim) for i, v in enumerate(vecs)]
        if parts:
            widths = {p.shape[1] for p in parts}
            if len(widths) > 1:
                raise ArgumentError(f"vecs: list entries have different dimensions {sorted(widths)}")
            width = parts[0].shape[1]
        elif dim is not None:
            width = dim
        else:
            raise ArgumentError("vecs: empty list and no descriptor dimension known")
        if image_ids is None:
            ids = np.arange(len(parts), dtype=np.int64)
        else:
            ids = check_ids(image_ids, name="image_ids", length=len(parts))
            if unique_ids and np.unique(ids).shape[0] != ids.shape[0]:
                raise ArgumentError("image_ids: list input needs one distinct id per list entry")
        counts = np.array([p.shape[0] for p in parts], dtype=np.int64)
        flat = np.concatenate(parts, axis=0) if parts else np.empty((0, width), np.float32)
        flat = np.ascontiguousarray(flat, dtype=np.float32)
        starts = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        order = np.arange(flat.shape[0], dtype=np.int64)
        return Descriptors(flat, ids, starts, order)

    if isinstance(vecs, np.ndarray):
        flat = check_vecs(vecs, name="vecs", dim=dim)
        if image_ids is None:
            raise ArgumentError("image_ids: required when vecs is one array (one image id per row)")
        ids = check_ids(image_ids, name="image_ids", length=flat.shape[0])
        if ids.shape[0] and bool(np.all(ids[1:] >= ids[:-1])):
            # Rows already grouped by ascending id (the usual layout): no sort, no labels.
            starts = np.concatenate([[0], np.flatnonzero(ids[1:] != ids[:-1]) + 1, [ids.shape[0]]])
            starts = starts.astype(np.int64)
            unique = ids[starts[:-1]]
            order = np.arange(ids.shape[0], dtype=np.int64)
        else:
            unique, labels = np.unique(ids, return_inverse=True)
            starts, order = _kernels.group_by_label(labels.astype(np.int64, copy=False).reshape(-1), unique.shape[0])
        return Descriptors(flat, unique.astype(np.int64), starts, order)

    raise ArgumentError(f"vecs: expected a float32 array [N, D] or a list of them, got {type(vecs).__name__}")


@dataclass(frozen=True)
class Aggregates:
    """Aggregated residuals of several images, rows sorted by (image, word).

    Attributes
    ----------
    offsets : int64 [I + 1]
        Image ``i`` owns rows ``offsets[i]:offsets[i + 1]``.
    words : int64 [M]
        Visual word of each row, ascending within an image.
    data : uint64 [M, ceil(D / 64)] or float32 [M, D]
        Packed binary codes (ASMK*) or L2-normalised real aggregates (ASMK).
    """

    offsets: np.ndarray
    words: np.ndarray
    data: np.ndarray

    @property
    def binary(self) -> bool:
        return self.data.dtype == np.uint64

    def image_of_rows(self) -> np.ndarray:
        """int64 [M]: image label of each row."""
        return np.repeat(np.arange(self.offsets.shape[0] - 1, dtype=np.int64), np.diff(self.offsets))


def normalize_l2(vecs: np.ndarray) -> np.ndarray:
    """Row-wise ``v / (‖v‖ + 1e-6)`` in place, float32 [M, D], with the reference's exact
    NumPy expression (so the rounding matches bit for bit)."""
    # Chunked to bound the temporary memory of np.linalg.norm on large [M, D] inputs.
    step = 1 << 16
    for begin in range(0, vecs.shape[0], step):
        block = vecs[begin : begin + step]
        block /= np.linalg.norm(block, ord=2, axis=1, keepdims=True) + 1e-6
    return vecs


def aggregate(
    vecs: np.ndarray,
    assignments: np.ndarray,
    starts: np.ndarray,
    order: np.ndarray,
    centroids: np.ndarray,
    *,
    binary: bool,
) -> Aggregates:
    """Aggregate residuals per (image, word) in one pass over all images.

    Parameters
    ----------
    vecs : float32 [N, D]
        Descriptors (C-contiguous).
    assignments : int64 [N, m]
        The m nearest words of each descriptor (``Codebook.quantize``).
    starts, order : int64 [I + 1], int64 [N]
        Rows grouped by image (see ``Descriptors``). ``starts`` may be a window
        ``starts[i0:i1 + 1]`` of a longer grouping to aggregate images ``i0 .. i1 - 1``.
    centroids : float32 [K, D]
    binary : bool
        Binarise (``V > 0``) and pack (ASMK*), else L2-normalise (ASMK).

    Returns
    -------
    Aggregates
        With ``I = len(starts) - 1`` images; an image without descriptors has no rows.
    """
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    assignments = np.ascontiguousarray(assignments, dtype=np.int64)
    n_images = starts.shape[0] - 1
    n_pairs = int(starts[-1] - starts[0]) * assignments.shape[1]
    # The kernels code a (descriptor of the image, assignment) pair as an int32
    # (j << bits(m - 1)) | a.
    largest = int(np.diff(starts).max()) if n_images else 0
    if largest << max(assignments.shape[1] - 1, 0).bit_length() >= 1 << 31:
        raise ArgumentError(
            f"vecs: an image has {largest} descriptors, too many for multiple assignment m = {assignments.shape[1]}"
        )
    with _kernels.thread_budget(n_pairs, _kernels.MIN_PARALLEL_PAIRS) as threads:
        n_blocks = min(n_images, 4 * threads)
        perm, n_words = _kernels.aggregate_count(assignments, order, starts, centroids.shape[0], n_blocks)
    offsets = np.zeros(n_words.shape[0] + 1, dtype=np.int64)
    np.cumsum(n_words, out=offsets[1:])
    n_rows = int(offsets[-1])
    dim = vecs.shape[1]
    words = np.empty(n_rows, dtype=np.int64)
    if binary:
        codes = np.empty((n_rows, n_code_words(dim)), dtype=np.uint64)
        real = np.empty((0, 0), dtype=np.float32)
    else:
        codes = np.empty((0, 0), dtype=np.uint64)
        real = np.empty((n_rows, dim), dtype=np.float32)
    with _kernels.thread_budget(n_pairs, _kernels.MIN_PARALLEL_PAIRS):
        _kernels.aggregate_fill(vecs, centroids, assignments, order, starts, perm, offsets, binary, words, codes, real)
    del perm
    data = codes if binary else normalize_l2(real)
    return Aggregates(offsets, words, data)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a boolean matrix into uint64 codes.

    Parameters
    ----------
    bits : bool [M, D]

    Returns
    -------
    uint64 [M, ceil(D / 64)]
        Bit ``t`` of a row is bit ``63 - t % 64`` of word ``t // 64`` (MSB first); the
        padding bits are zero.
    """
    bits = np.asarray(bits)
    if bits.ndim != 2:
        raise ArgumentError(f"bits: expected a 2-D array, got shape {bits.shape}")
    return _kernels.pack_rows(np.ascontiguousarray(bits, dtype=np.bool_))


def unpack_bits(codes: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of ``pack_bits``: uint64 [M, W] -> bool [M, dim]."""
    codes = np.ascontiguousarray(codes, dtype=np.uint64)
    as_bytes = codes.astype(">u8").view(np.uint8).reshape(codes.shape[0], 8 * codes.shape[1])
    return np.unpackbits(as_bytes, axis=1)[:, :dim].astype(bool)


def hamming_similarity(a: np.ndarray, b: np.ndarray, dim: int) -> np.ndarray:
    """Selective-kernel input u = 1 - 2·h/B between packed codes, rounded like the reference.

    Parameters
    ----------
    a : uint64 [P, W]
    b : uint64 [R, W]
    dim : int
        Descriptor dimension D (B = 32 · ceil(D / 32)).

    Returns
    -------
    float32 [P, R]
        ``float32(1 - 2 · float32(h / B))``.
    """
    a = np.ascontiguousarray(a, dtype=np.uint64)
    b = np.ascontiguousarray(b, dtype=np.uint64)
    xor = a[:, None, :] ^ b[None, :, :]
    as_bytes = xor.view(np.uint8)
    h = np.unpackbits(as_bytes, axis=-1).sum(axis=-1, dtype=np.int64)
    hdist = (h / n_hamming_bits(dim)).astype(np.float32)
    return (np.float32(-2.0) * hdist + np.float32(1.0)).astype(np.float32)


_SIDES = ("database", "query")


def aggregate_images(codebook, vecs, image_ids=None, params=None, *, side: str = "database") -> Aggregates:
    """Quantize and aggregate the descriptors of several images, as ``Index.add``
    (``side="database"``) or ``Index.search`` (``side="query"``) do.

    The database side quantizes all rows in one call with ``params.ma_database`` (the
    reference's one faiss call over the database); the query side quantizes each image in
    its own call with ``params.ma_query`` (the reference's one call per query image). So
    ``Index.add_aggregates(aggregate_images(codebook, vecs, ids, index.params), ...)``
    equals ``Index.add(vecs, ids)``, also where float32 rounding ties two words.

    Parameters
    ----------
    codebook : asmkit.Codebook
    vecs : float32 [N, D] or list of float32 [n_i, D]
        Descriptors (see ``prepare_descriptors``).
    image_ids : int64 [N], or None / int64 [len(vecs)] for list input
    params : Params, preset name, dict or None
        ``binary``, and ``ma_database`` or ``ma_query`` by side, are used.
    side : {"database", "query"}

    Returns
    -------
    Aggregates
        One entry per image, in the order of ``prepare_descriptors(vecs, image_ids)
        .image_ids``: ascending distinct ids for array input, list order for list input.

    Raises
    ------
    ArgumentError
        Bad descriptors, ids, params or side.
    """
    check_choice(side, "side", _SIDES)
    params = as_params(params)
    desc = prepare_descriptors(vecs, image_ids, dim=codebook.dim, unique_ids=side == "database")
    if side == "database":
        words = codebook.assign(desc.vecs, params.ma_database, check_finite=False).settle()
        return aggregate(desc.vecs, words, desc.starts, desc.order, codebook.centroids, binary=params.binary)
    grouped = desc.vecs[desc.image_rows(0, desc.n_images)]
    words = codebook.assign(
        grouped, params.ma_query, segments=desc.starts, nearest_first=False, check_finite=False
    ).settle()
    return aggregate(
        grouped, words, desc.starts, np.arange(len(grouped), dtype=np.int64), codebook.centroids, binary=params.binary
    )
