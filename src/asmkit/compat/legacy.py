"""Read the reference ``asmk`` package's pickled state without running arbitrary code.

The reference stores codebooks and inverted files as pickles of ``state_dict()`` (MASt3R
ships its 64k codebook as ``<name>_codebook.pkl``). ``pickle.load`` on such a file would
execute whatever callable the file names. :func:`load_legacy_pickle` instead resolves only a
fixed allow-list of globals, the ones numpy needs to rebuild arrays, scalars and dtypes,
plus a few harmless builtins for plain containers; any other global is refused with
:class:`LegacyFormatError` before it is called.

:func:`codebook_from_legacy` and :func:`ivf_from_legacy` turn the loaded state into asmkit
objects and arrays.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from asmkit._validation import FileFormatError

__all__ = [
    "LegacyFormatError",
    "LegacyIVF",
    "load_legacy_pickle",
    "codebook_from_legacy",
    "ivf_from_legacy",
    "pack_uint32_codes",
]


class LegacyFormatError(FileFormatError):
    """A legacy pickle is malformed, names a global outside the allow-list, or holds a state
    that does not fit.

    A ``FileFormatError`` (so also an ``AsmkitError`` and a ``ValueError``): the message
    starts with ``path``, the pickle file, or ``"state"`` for a state passed in memory
    without its file.
    """


def _allowed_globals() -> dict[tuple[str, str], Any]:
    # numpy >= 2 writes ``numpy._core``; numpy 1.x wrote ``numpy.core``. Both names map to the
    # numpy-2 objects so that the deprecated ``numpy.core`` module is never imported.
    from numpy._core import multiarray, numeric

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = multiarray.scalar
        # Protocol-5 pickles of arrays rebuild from an in-band buffer.
        allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    # Plain containers and values. None of these can reach the file system, the
    # interpreter or the network, whatever arguments the pickle passes.
    for name, obj in (
        ("set", set),
        ("frozenset", frozenset),
        ("list", list),
        ("tuple", tuple),
        ("dict", dict),
        ("complex", complex),
        ("bytearray", bytearray),
        ("bytes", bytes),
        ("str", str),
        ("int", int),
        ("float", float),
        ("bool", bool),
        ("slice", slice),
    ):
        allowed[("builtins", name)] = obj
        allowed[("__builtin__", name)] = obj
    # Protocol-2 pickles encode bytes as _codecs.encode(text, "latin1").
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Restricting the codec keeps codec-registry lookups (and their side effects) out.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


# safe: this Unpickler never resolves a global outside ``_allowed_globals()`` (numpy array,
# scalar and dtype reconstruction, plain builtin containers); every other global, including
# os.system, eval, subprocess.* and any user class, raises before it can be called.
class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedReader, path: Path) -> None:
        super().__init__(file)
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise LegacyFormatError(
                self._path,
                f"refused global {module}.{name} (only numpy arrays, numpy scalars/dtypes and plain "
                "containers are allowed in legacy pickles)",
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise LegacyFormatError(self._path, "persistent ids are not allowed in legacy pickles")


def load_legacy_pickle(path: str | os.PathLike) -> Any:
    """Load a reference ``asmk`` pickle, admitting only numpy data and plain containers.

    Parameters
    ----------
    path : str or path-like
        A pickle written by ``asmk.io_helpers.save_pickle`` (e.g. ``Codebook.state_dict()``
        or ``IVF.state_dict()``).

    Returns
    -------
    object
        The unpickled object: dicts, lists, tuples, str/int/float/None, numpy arrays and
        numpy scalars.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    LegacyFormatError
        (a ``FileFormatError``) naming the path if the pickle names any other global (nothing it
        names is called), or is truncated or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such legacy pickle file")
    with open(path, "rb") as fh:
        try:
            return _RestrictedUnpickler(fh, path).load()
        except LegacyFormatError:
            raise
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
            MemoryError,
        ) as exc:
            raise LegacyFormatError(path, f"not a readable legacy pickle ({type(exc).__name__}: {exc})") from None


def _source(path: str | os.PathLike | None) -> str | os.PathLike:
    return "state" if path is None else path


def _state_of(state: Any, expected_type: str, path) -> Mapping[str, Any]:
    if not isinstance(state, Mapping) or "state" not in state or "type" not in state:
        raise LegacyFormatError(
            _source(path), f"expected a reference state_dict with 'type' and 'state', got {type(state).__name__}"
        )
    if state["type"] != expected_type:
        raise LegacyFormatError(_source(path), f"holds a {state['type']!r}, expected a {expected_type!r}")
    inner = state["state"]
    if not isinstance(inner, Mapping):
        raise LegacyFormatError(_source(path), "state['state']: expected a dict")
    return inner


def codebook_from_legacy(state: Any, *, path: str | os.PathLike | None = None):
    """Build an :class:`asmkit.Codebook` from a reference ``Codebook.state_dict()``.

    Parameters
    ----------
    state : dict
        ``{"type": "Codebook", "params": {"size": ...}, "state": {"centroids": float32 [K, D]}}``
        as returned by :func:`load_legacy_pickle`.
    path : str or path-like, optional
        The file ``state`` was read from, named in errors.

    Returns
    -------
    asmkit.Codebook

    Raises
    ------
    LegacyFormatError
        If ``state`` is not a trained reference codebook state.
    """
    inner = _state_of(state, "Codebook", path)
    centroids = inner.get("centroids")
    if centroids is None:
        raise LegacyFormatError(_source(path), "the reference codebook was never trained (centroids is None)")
    if not isinstance(centroids, np.ndarray) or centroids.ndim != 2 or centroids.dtype.kind != "f":
        raise LegacyFormatError(
            _source(path),
            "state['state']['centroids']: expected a 2-D float array, got "
            f"{getattr(centroids, 'dtype', type(centroids).__name__)} {getattr(centroids, 'shape', '')}",
        )
    from asmkit.codebook import Codebook

    return Codebook(np.ascontiguousarray(centroids, dtype=np.float32))


def pack_uint32_codes(codes32: np.ndarray) -> np.ndarray:
    """Repack the reference's MSB-first uint32 codes as asmkit's MSB-first uint64 codes.

    Parameters
    ----------
    codes32 : numpy.ndarray, uint32 [M, W32]

    Returns
    -------
    numpy.ndarray, uint64 [M, ceil(W32 / 2)]
        Word j holds uint32 words 2j (high half) and 2j+1 (low half, zero if absent), so the
        bit order and the zero padding are preserved.
    """
    codes32 = np.asarray(codes32, dtype=np.uint32)
    if codes32.ndim != 2:
        raise ValueError(f"codes32: expected a 2-D array, got shape {codes32.shape}")
    if codes32.shape[1] % 2:
        codes32 = np.concatenate([codes32, np.zeros((codes32.shape[0], 1), np.uint32)], axis=1)
    pairs = codes32.reshape(codes32.shape[0], -1, 2).astype(np.uint64)
    return np.ascontiguousarray((pairs[:, :, 0] << np.uint64(32)) | pairs[:, :, 1])


class LegacyIVF:
    """The content of a reference ``IVF.state_dict()``, flattened to word-major arrays.

    Attributes
    ----------
    words : numpy.ndarray, int64 [M]
        Visual word of each posting entry, non-decreasing.
    image_ids : numpy.ndarray, int64 [M]
        Database image id of each entry (the reference's ``imid_offset`` already removed,
        i.e. the ids its ``search`` reports).
    vectors : numpy.ndarray, uint64 [M, W] or float32 [M, D]
        Binary codes (repacked to uint64, see :func:`pack_uint32_codes`) or real aggregates.
    binary : bool
        Whether ``vectors`` are binary codes.
    dim_bits : int
        Bits per binary code in the reference layout, 32 * W32 (0 for real aggregates).
    counts : numpy.ndarray, int64 [K]
        Entries per word.
    idf : numpy.ndarray, float32 [K]
        The reference's stored idf (ones without idf).
    n_images : int
        Number of database image slots (ids ``0 .. n_images - 1``).
    use_idf : bool
    """

    def __init__(self, words, image_ids, vectors, binary, dim_bits, counts, idf, n_images, use_idf):
        self.words = words
        self.image_ids = image_ids
        self.vectors = vectors
        self.binary = binary
        self.dim_bits = dim_bits
        self.counts = counts
        self.idf = idf
        self.n_images = n_images
        self.use_idf = use_idf


def ivf_from_legacy(state: Any, *, path: str | os.PathLike | None = None) -> LegacyIVF:
    """Flatten a reference ``IVF.state_dict()`` into word-major arrays.

    Parameters
    ----------
    state : dict
        ``{"type": "IVF", "params": {"use_idf": bool}, "state": {"ivf_vecs": list of K arrays
        or None, "ivf_image_ids": list of K arrays or None, "counts": int [K], "idf": [K],
        "n_images": int, "imid_offset": int, ...}}`` as returned by :func:`load_legacy_pickle`.
        Each word's arrays are over-allocated; only the first ``counts[c]`` rows are used.
    path : str or path-like, optional
        The file ``state`` was read from, named in errors.

    Returns
    -------
    LegacyIVF

    Raises
    ------
    LegacyFormatError
        If the state is not a consistent reference IVF state.
    """
    inner = _state_of(state, "IVF", path)
    params = state.get("params") or {}
    try:
        ivf_vecs = list(inner["ivf_vecs"])
        ivf_ids = list(inner["ivf_image_ids"])
        counts = np.asarray(inner["counts"], dtype=np.int64)
        idf = np.asarray(inner["idf"], dtype=np.float32)
        n_images = int(inner["n_images"])
        offset = int(inner.get("imid_offset", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise LegacyFormatError(_source(path), f"malformed reference IVF state ({exc})") from None
    k = len(ivf_vecs)
    if len(ivf_ids) != k or counts.shape != (k,) or idf.shape != (k,):
        raise LegacyFormatError(
            _source(path),
            f"inconsistent IVF sizes (ivf_vecs {k}, ivf_image_ids {len(ivf_ids)}, "
            f"counts {counts.shape}, idf {idf.shape})",
        )
    used = [c for c in range(k) if counts[c] > 0]
    for c in used:
        vecs, ids = ivf_vecs[c], ivf_ids[c]
        if (
            not isinstance(vecs, np.ndarray)
            or not isinstance(ids, np.ndarray)
            or vecs.ndim != 2
            or len(vecs) < counts[c]
            or len(ids) < counts[c]
        ):
            raise LegacyFormatError(_source(path), f"posting list of word {c} is shorter than counts[{c}]")
    if not used:
        raise LegacyFormatError(_source(path), "the reference IVF is empty")
    sample = ivf_vecs[used[0]]
    binary = sample.dtype == np.uint32
    if not binary and sample.dtype.kind != "f":
        raise LegacyFormatError(_source(path), f"unexpected posting vector dtype {sample.dtype}")
    words = np.repeat(np.arange(k, dtype=np.int64), counts)
    image_ids = np.concatenate([np.asarray(ivf_ids[c][: counts[c]], np.int64) for c in used]) - offset
    vectors = np.concatenate([ivf_vecs[c][: counts[c]] for c in used])
    if binary:
        dim_bits = 32 * vectors.shape[1]
        vectors = pack_uint32_codes(vectors)
    else:
        dim_bits = 0
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return LegacyIVF(
        words=words,
        image_ids=image_ids,
        vectors=vectors,
        binary=bool(binary),
        dim_bits=dim_bits,
        counts=counts,
        idf=idf,
        n_images=n_images - offset,
        use_idf=bool(params.get("use_idf", False)),
    )


def index_from_legacy(state: Any, codebook, params=None, *, path: str | os.PathLike | None = None):
    """An asmkit ``Index`` holding a reference inverted file (``IVF.state_dict()``).

    The reference stores the aggregated codes per word, which is all an index needs: no
    descriptor is re-quantized. idf and image norms are recomputed from the posting lists,
    as the reference computes them for an index built in one call (where it added images in
    several calls its stored idf is stale, docs/math.md §4; asmkit's is exact).

    Parameters
    ----------
    state : dict
        A reference ``IVF.state_dict()``, e.g. from :func:`load_legacy_pickle`.
    codebook : asmkit.Codebook
        The codebook the reference index was built with (``codebook_from_legacy``).
    params : asmkit.Params or dict, optional
        Query-side settings (alpha, tau, ma_query, topk). ``binary`` and ``use_idf`` must
        agree with the state; default: the ``asmk_star`` preset with the state's.
    path : str or path-like, optional
        The file ``state`` was read from, named in errors.

    Returns
    -------
    asmkit.Index
        Image ids ``0 .. n_images - 1`` (the reference's ids minus its ``imid_offset``),
        keys ``str(id)``.

    Raises
    ------
    LegacyFormatError
        If the state does not fit the codebook or the parameters.
    """
    from asmkit.index import Index
    from asmkit.kernel import Aggregates, n_code_words
    from asmkit.params import Params, as_params

    flat = ivf_from_legacy(state, path=path)
    if params is None:
        params = Params.preset("asmk_star", binary=flat.binary, use_idf=flat.use_idf)
    params = as_params(params).replace(codebook_size=codebook.size)
    if len(flat.counts) != codebook.size:
        raise LegacyFormatError(
            _source(path), f"the inverted file has {len(flat.counts)} words, the codebook {codebook.size}"
        )
    if params.binary != flat.binary or params.use_idf != flat.use_idf:
        raise LegacyFormatError(
            _source(path),
            f"params: binary={params.binary}, use_idf={params.use_idf}, but the reference inverted file "
            f"was built with binary={flat.binary}, use_idf={flat.use_idf}",
        )
    width = n_code_words(codebook.dim) if flat.binary else codebook.dim
    if flat.vectors.shape[1] != width or (flat.binary and not codebook.dim <= flat.dim_bits < codebook.dim + 32):
        raise LegacyFormatError(
            _source(path),
            f"posting vectors of width {flat.dim_bits or flat.vectors.shape[1]} do not fit a {codebook.dim}-D codebook",
        )
    if flat.image_ids.size and flat.image_ids.min() < 0:
        raise LegacyFormatError(
            _source(path),
            "inverted files with distractors (imid_offset > 0) are not supported; rebuild from the descriptors",
        )
    if flat.image_ids.size and flat.image_ids.max() >= flat.n_images:
        raise LegacyFormatError(_source(path), f"image ids outside 0 .. {flat.n_images - 1}")
    # The posting lists, word-major, become per-image aggregates (rows sorted by image,
    # then word), which the index takes through its public entry.
    words = np.repeat(np.arange(codebook.size, dtype=np.int64), flat.counts)
    order = np.lexsort((words, flat.image_ids))
    offsets = np.zeros(flat.n_images + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat.image_ids, minlength=flat.n_images), out=offsets[1:])
    aggregates = Aggregates(offsets, words[order], np.ascontiguousarray(flat.vectors[order]))
    index = Index(codebook, params)
    index.add_aggregates(aggregates, np.arange(flat.n_images, dtype=np.int64))
    return index
