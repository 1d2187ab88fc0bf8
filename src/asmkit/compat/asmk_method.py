"""``ASMKMethod``: the reference ``asmk`` package's facade, on asmkit's engine.

Code written for the reference (HOW, MASt3R retrieval) drives ASMK through
``ASMKMethod.initialize_untrained(params).train_codebook(...).build_ivf(...).query_ivf(...)``
with the reference's nested params dict, or builds the inverted file in pieces with
``create_ivf_builder`` / ``IvfBuilder.add`` / ``add_ivf_builder``. This module keeps those
methods, their signatures, return shapes and metadata keys, and runs them on
:class:`asmkit.Codebook` and :class:`asmkit.Index`.

Differences from the reference, all deliberate:

- Caller arrays are never modified (the reference shifts ``imids`` in place).
- Image ids need not be sorted or contiguous; query rows follow ``np.unique(qimids)``, which
  is the reference's order whenever its own precondition (sorted, contiguous ids) holds.
- Caches are never written as pickles. An existing ``cache_path`` that is a file is read as
  the reference's pickle through the restricted loader of :mod:`asmkit.compat.legacy`; one
  that is a directory is read as asmkit's format. A path that does not exist yet is
  computed and then written in asmkit's format (a directory) *at that path*, whatever its
  suffix, so the next call finds and loads it.
- ``params['index']['gpu_id']`` naming a GPU that neither faiss nor torch has warns once and
  runs on the CPU (the reference fails in ``faiss.StandardGpuResources``).
- ``query_ivf`` accepts a ``search`` section without ``topk`` (every database image is
  ranked; the reference raises ``TypeError``), and any other missing key takes the
  :meth:`asmkit.Params.from_reference` default.
- ``query_ivf`` scores all query images in one batch; ``progress`` is accepted and ignored.
- Scores are float32 (the reference's are float64); they agree within 1e-5.
- ``kernel`` is an :class:`asmkit.Params` (the settings the inverted file is built with) and
  ``inverted_file`` an :class:`IVF` holding an :class:`asmkit.Index`, not the reference's
  ``ASMKKernel`` and ``IVF`` objects; ``IVF.stats`` has the reference's keys.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from asmkit._validation import ArgumentError, FileFormatError, check_ids, check_int, check_vecs
from asmkit.codebook import Codebook
from asmkit.index import Index
from asmkit.kernel import prepare_descriptors
from asmkit.params import Params
from asmkit.search import score_queries

from .legacy import codebook_from_legacy, index_from_legacy, load_legacy_pickle

__all__ = ["ASMKMethod", "IVF", "IvfBuilder"]

logger = logging.getLogger(__name__)

_OFFSET_FILE = "asmk_compat.json"


def _gpu_id(params: Mapping[str, Any]) -> int | None:
    index = params.get("index") or {}
    if not isinstance(index, Mapping):
        raise ArgumentError(f"params['index']: expected a dict, got {type(index).__name__}")
    return check_int(index.get("gpu_id"), "params['index']['gpu_id']", min=0, none=True)


def _index_class(codebook: Codebook) -> str:
    """The reference's name for the quantizer ``codebook`` runs on."""
    return "FaissL2Index" if codebook.gpu is None else "FaissGpuL2Index"


def _ready(codebook: Codebook) -> None:
    # The reference builds its faiss index when it trains or loads a codebook, and times it;
    # asmkit builds its search structures on the first quantize, so one is made here.
    codebook.quantize(codebook.centroids[:1], 1)


def _columns(columns: tuple, names: tuple[str, ...], step: str) -> tuple:
    """The positional columns of a step, or ArgumentError naming the first missing one."""
    if len(columns) > len(names):
        raise ArgumentError(f"{step}: expected the columns {', '.join(names)}, got {len(columns)} positional arguments")
    columns = columns + (None,) * (len(names) - len(columns))
    for name, value in zip(names, columns):
        if value is None:
            raise ArgumentError(f"{name}: required (no cache to load from)")
    return columns


def _with_step(params: Mapping[str, Any], step: str, step_params: Mapping[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(dict(params))
    if step_params is not None:
        if not isinstance(step_params, Mapping):
            raise ArgumentError(f"step_params: expected a dict, got {type(step_params).__name__}")
        out[step] = copy.deepcopy(dict(step_params))
    return out


def _write_offset(path: Path, offset: int) -> None:
    # The reference's IVF state carries its distractor offset; an asmkit index does not, so
    # the compat layer keeps it in a small side file inside the cached index directory.
    if offset:
        (path / _OFFSET_FILE).write_text(json.dumps({"imid_offset": offset}))


def _read_offset(path: Path) -> int:
    side = path / _OFFSET_FILE
    if not side.is_file():
        return 0
    try:
        value = json.loads(side.read_text())["imid_offset"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FileFormatError(side, f"unreadable distractor offset ({exc})") from None
    try:
        return check_int(value, "imid_offset", min=0)
    except ArgumentError as exc:
        raise FileFormatError(side, str(exc)) from None


class IVF:
    """An inverted file as ``ASMKMethod`` holds it: an asmkit index and the distractor offset.

    Parameters
    ----------
    index : asmkit.Index
    imid_offset : int
        Added to the ids of images indexed after distractors, and subtracted from the ids
        that searches report, so distractors come out with negative ids (the reference's
        convention).

    Attributes
    ----------
    index, imid_offset
        As given.
    """

    def __init__(self, index: Index, imid_offset: int = 0) -> None:
        if not isinstance(index, Index):
            raise ArgumentError(f"index: expected an asmkit Index, got {type(index).__name__}")
        self.index = index
        self.imid_offset = check_int(imid_offset, "imid_offset", min=0)

    @property
    def n_images(self) -> int:
        """Images in the index, distractors included."""
        return len(self.index)

    @property
    def stats(self) -> dict:
        """The reference's ``IVF.stats``: images, vectors_per_image, mean/min/max/std of
        entries per word, empty_vw, imbalance_factor_of_vw."""
        return dict(self.index.stats)


def _check_compatible(index: Index, codebook: Codebook, kernel: Params, name: str, path) -> None:
    if not np.array_equal(index.codebook.centroids, codebook.centroids):
        raise ArgumentError(f"{name}: {path} was built with another codebook")
    for field in ("binary", "use_idf", "ma_database"):
        if getattr(index.params, field) != getattr(kernel, field):
            raise ArgumentError(
                f"{name}: {path} was built with {field}={getattr(index.params, field)!r}, "
                f"but params['build_ivf'] asks for {getattr(kernel, field)!r}"
            )


def _load_index(path: Path, codebook: Codebook, kernel: Params, name: str) -> IVF:
    """An inverted file from a reference IVF pickle (a file) or an asmkit index directory."""
    if path.is_file():
        state = load_legacy_pickle(path)
        inner = state.get("state") if isinstance(state, Mapping) else None
        offset = inner.get("imid_offset", 0) if isinstance(inner, Mapping) else 0
        try:
            offset = check_int(offset, "imid_offset", min=0)
        except ArgumentError as exc:
            raise FileFormatError(path, str(exc)) from None
        if offset:
            # A reference inverted file built after distractors: its stored ids are
            # non-negative, the offset applies to what searches report, as in IVF here.
            state = {**state, "state": {**inner, "imid_offset": 0}}
        return IVF(index_from_legacy(state, codebook, kernel, path=path), offset)
    index = Index.load(path, mmap=True)
    _check_compatible(index, codebook, kernel, name, path)
    return IVF(index, _read_offset(path))


class IvfBuilder:
    """The reference's ``IvfBuilder``: an inverted file filled by one or more ``add`` calls.

    Made by :meth:`ASMKMethod.create_ivf_builder`; hand it to
    :meth:`ASMKMethod.add_ivf_builder` when every image is added.

    Parameters
    ----------
    step_params : dict
        The reference's ``build_ivf`` section (kept for ``add_ivf_builder``).
    codebook : asmkit.Codebook
    kernel : asmkit.Params
        The settings to build with (``binary``, ``use_idf``, ``ma_database``).
    cache_path : str or path-like or None
        An existing reference IVF pickle (restricted loader) or asmkit index directory is
        loaded; a missing path is written by ``save`` as an asmkit index directory.

    Attributes
    ----------
    step_params, codebook, kernel
        As given.
    ivf : IVF
        The inverted file being built.
    metadata : dict
        ``{"index_time": seconds spent in add}``, or ``{"load_time": seconds}`` when loaded.
    cache_path : path or None
        Where ``save`` writes (None when loaded from the cache).
    """

    def __init__(
        self,
        step_params: Mapping[str, Any],
        codebook: Codebook,
        kernel: Params,
        *,
        cache_path: str | os.PathLike | None,
    ) -> None:
        self.step_params = step_params
        self.codebook = codebook
        self.kernel = kernel
        if cache_path is not None and Path(cache_path).exists():
            time0 = time.perf_counter()
            self.ivf = _load_index(Path(cache_path), codebook, kernel, "cache_path")
            self.metadata: dict[str, Any] = {"load_time": time.perf_counter() - time0}
            self.cache_path = None
        else:
            self.ivf = IVF(Index(codebook, kernel))
            self.metadata = {"index_time": 0.0}
            self.cache_path = cache_path

    @property
    def loaded_from_cache(self) -> bool:
        """Whether the inverted file was loaded from ``cache_path``."""
        return "load_time" in self.metadata

    def initialize_with_distractors(self, path: str | os.PathLike) -> None:
        """Start from the distractor index at ``path`` (asmkit directory or reference pickle).

        Images added afterwards get their id plus the distractor index's largest id + 1,
        and searches report ``id - offset`` (distractors negative).

        Raises
        ------
        ArgumentError
            Images were already added or loaded, or the distractor index was built with
            another codebook or kernel.
        """
        if self.loaded_from_cache or len(self.ivf.index):
            raise ArgumentError("distractors_path: distractors must come before any image is added")
        distractors = _load_index(Path(path), self.codebook, self.kernel, "distractors_path")
        ids = distractors.index.ids
        self.ivf = IVF(distractors.index, int(ids.max()) + 1 if ids.size else 0)

    def add(self, *columns, progress: int | None = None) -> None:
        """Add descriptors of whole images.

        Parameters
        ----------
        vecs : float32 [N, D]
            Descriptors (first positional column).
        imids : int [N]
            Non-negative image id of each row (second column; any order, not modified).
            Ids must be new to the inverted file: an image is added in one call.
        progress : int, optional
            Accepted for call compatibility and ignored.

        Raises
        ------
        ValueError
            Missing, extra or malformed columns (``ArgumentError``); an id already added.
        """
        vecs, imids = _columns(columns, ("vecs", "imids"), "add")
        vecs = check_vecs(vecs, name="vecs", dim=self.codebook.dim)
        imids = check_ids(imids, name="imids", length=vecs.shape[0])
        time0 = time.perf_counter()
        self.ivf.index.add(vecs, imids + self.ivf.imid_offset)
        self.metadata["index_time"] += time.perf_counter() - time0

    def save(self) -> dict[str, Any]:
        """Write the inverted file to ``cache_path`` (if any) as an asmkit index directory.

        Returns
        -------
        dict
            ``metadata`` plus ``"ivf_stats"`` (see :attr:`IVF.stats`).
        """
        if self.cache_path is not None:
            self.ivf.index.save(self.cache_path)
            _write_offset(Path(self.cache_path), self.ivf.imid_offset)
            logger.info("inverted file cached as an asmkit directory at %s", self.cache_path)
        return {**self.metadata, "ivf_stats": self.ivf.stats}


def _search_queries(
    index: Index, qvecs: np.ndarray, qimids: np.ndarray, query_params: Params
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank ``index``'s images for each query image with ``query_params``' query side.

    Returns
    -------
    images : int64 [Q]
        Distinct query ids, ascending.
    ids : int64 [Q, n]
        Index image ids by decreasing score (ties: ascending id); n = topk, or all images.
    scores : float32 [Q, n]
    """
    desc = prepare_descriptors(qvecs, qimids, dim=index.codebook.dim)
    scores, ids = score_queries(index.codebook, desc, index.database, query_params, k=query_params.topk)
    return desc.image_ids, ids, scores


class ASMKMethod:
    """The reference's ``asmk.ASMKMethod`` call shape on asmkit's engine.

    Use :meth:`initialize_untrained`; each step returns a new object and leaves ``self``
    unchanged.

    Parameters
    ----------
    params : dict
        The reference's nested params: sections ``index`` (``gpu_id``), ``train_codebook``,
        ``build_ivf`` and ``query_ivf`` (see :meth:`asmkit.Params.from_reference`).
    metadata : dict
        Timings and statistics of the steps run so far, one dict per step.
    codebook : asmkit.Codebook, optional
    kernel : asmkit.Params, optional
        The settings the inverted file was built with.
    inverted_file : IVF, optional

    Attributes
    ----------
    params, metadata, codebook, kernel, inverted_file
        As given.
    index : asmkit.Index or None
        ``inverted_file.index``.
    imid_offset : int
        ``inverted_file.imid_offset`` (0 without an inverted file).
    """

    def __init__(
        self,
        params: Mapping[str, Any],
        metadata: Mapping[str, Any],
        *,
        codebook: Codebook | None = None,
        kernel: Params | None = None,
        inverted_file: IVF | None = None,
    ) -> None:
        if not isinstance(params, Mapping):
            raise ArgumentError(f"params: expected a dict, got {type(params).__name__}")
        self.params = copy.deepcopy(dict(params))
        self.metadata = dict(metadata)
        self.codebook = codebook
        self.kernel = kernel
        self.inverted_file = inverted_file
        # Validate now, so that a bad dict fails at construction rather than mid-pipeline.
        Params.from_reference(self.params)
        self._gpu = _gpu_id(self.params)

    @property
    def index(self) -> Index | None:
        return None if self.inverted_file is None else self.inverted_file.index

    @property
    def imid_offset(self) -> int:
        return 0 if self.inverted_file is None else self.inverted_file.imid_offset

    @classmethod
    def initialize_untrained(cls, params: Mapping[str, Any]) -> "ASMKMethod":
        """A method with parameters only (no codebook, no inverted file).

        Raises
        ------
        ValueError
            If ``params`` holds keys the engine does not understand (naming them).
        """
        return cls(params, {})

    def train_codebook(
        self, *columns, cache_path: str | os.PathLike | None = None, step_params: Mapping[str, Any] | None = None
    ) -> "ASMKMethod":
        """Train the codebook by k-means, or load it from ``cache_path``.

        Parameters
        ----------
        vecs : float32 [N, D]
            Training descriptors (the one positional column); may be omitted or None when
            ``cache_path`` exists.
        cache_path : str or path-like, optional
            An existing reference codebook pickle (read with the restricted loader) or asmkit
            codebook directory is loaded instead of training. A missing path is trained and
            then written there as an asmkit codebook directory (never a pickle).
        step_params : dict, optional
            Replaces ``params['train_codebook']`` for this step.

        Returns
        -------
        ASMKMethod
            A new object with the codebook. ``metadata['train_codebook']`` holds
            ``index_class`` ("FaissL2Index", or "FaissGpuL2Index" on a GPU) and either
            ``load_time``, or ``cluster_time``, ``index_time`` and ``train_time`` (their
            sum), in seconds.

        Raises
        ------
        ArgumentError
            A codebook is already trained, ``vecs`` is missing with no cache to load, or a
            cached codebook's size differs from ``params['train_codebook']['codebook']['size']``.
        """
        if self.codebook is not None:
            raise ArgumentError("train_codebook: the codebook is already trained; start from initialize_untrained")
        params = _with_step(self.params, "train_codebook", step_params)
        engine = Params.from_reference(params)
        if cache_path is not None and Path(cache_path).exists():
            time0 = time.perf_counter()
            path = Path(cache_path)
            if path.is_dir():
                codebook = Codebook.load(path, gpu=self._gpu)
            else:
                centroids = codebook_from_legacy(load_legacy_pickle(path), path=path).centroids
                codebook = Codebook(centroids, gpu=self._gpu)
            if codebook.size != engine.codebook_size:
                raise ArgumentError(
                    f"cache_path: {path} holds a codebook of size {codebook.size}, but "
                    f"params['train_codebook']['codebook']['size'] is {engine.codebook_size}"
                )
            _ready(codebook)
            metadata: dict[str, Any] = {"load_time": time.perf_counter() - time0}
        else:
            (vecs,) = _columns(columns, ("vecs",), "train_codebook")
            time0 = time.perf_counter()
            codebook = Codebook.train(
                vecs, engine.codebook_size, iters=engine.kmeans_iters, seed=engine.seed, gpu=self._gpu
            )
            cluster_time = time.perf_counter() - time0
            time0 = time.perf_counter()
            _ready(codebook)
            index_time = time.perf_counter() - time0
            metadata = {"index_time": index_time, "cluster_time": cluster_time, "train_time": index_time + cluster_time}
            if cache_path is not None:
                codebook.save(cache_path)
                logger.info("codebook cached as an asmkit directory at %s", cache_path)
        metadata["index_class"] = _index_class(codebook)
        return type(self)(params, {**self.metadata, "train_codebook": metadata}, codebook=codebook)

    def build_ivf(
        self,
        *columns,
        distractors_path: str | os.PathLike | None = None,
        cache_path: str | os.PathLike | None = None,
        step_params: Mapping[str, Any] | None = None,
    ) -> "ASMKMethod":
        """Quantize, aggregate and index database descriptors (or load the index from cache).

        Parameters
        ----------
        vecs : float32 [N, D]
            Database descriptors (first positional column); may be omitted or None when
            ``cache_path`` exists.
        imids : int [N]
            Non-negative image id of each row (second column; any order, not modified).
        distractors_path : str or path-like, optional
            An asmkit index directory or reference IVF pickle, built with the same codebook
            and kernel, to start from (see :meth:`IvfBuilder.initialize_with_distractors`).
        cache_path : str or path-like, optional
            An existing reference IVF pickle (restricted loader) or asmkit index directory
            is loaded instead of building; a missing path is built and then written there
            as an asmkit index directory (with the distractor offset, if any).
        step_params : dict, optional
            Replaces ``params['build_ivf']`` for this step.

        Returns
        -------
        ASMKMethod
            A new object with the inverted file; ``metadata['build_ivf']`` holds
            ``index_time`` (or ``load_time``) in seconds and ``ivf_stats``.

        Raises
        ------
        ArgumentError
            Steps out of order, missing or bad columns, or a cached/distractor index whose
            codebook or kernel (binary, idf, database multiple assignment) differs.
        asmkit.compat.LegacyFormatError
            A reference pickle that is malformed or does not fit (naming the file).
        """
        builder = self.create_ivf_builder(cache_path=cache_path, step_params=step_params)
        if not builder.loaded_from_cache:
            if distractors_path is not None:
                builder.initialize_with_distractors(distractors_path)
            builder.add(*columns)
        return self.add_ivf_builder(builder)

    def create_ivf_builder(
        self, *, cache_path: str | os.PathLike | None = None, step_params: Mapping[str, Any] | None = None
    ) -> IvfBuilder:
        """An :class:`IvfBuilder` for this codebook, to fill with ``add`` calls.

        Parameters
        ----------
        cache_path, step_params
            As for :meth:`build_ivf`.

        Raises
        ------
        ArgumentError
            No codebook yet, or the inverted file is already built.
        """
        if self.codebook is None:
            raise ArgumentError("build_ivf: train_codebook must run first")
        if self.inverted_file is not None:
            raise ArgumentError("build_ivf: the inverted file is already built")
        params = _with_step(self.params, "build_ivf", step_params)
        kernel = Params.from_reference(params).replace(codebook_size=self.codebook.size)
        return IvfBuilder(params.get("build_ivf", {}), self.codebook, kernel, cache_path=cache_path)

    def add_ivf_builder(self, ivf_builder: IvfBuilder) -> "ASMKMethod":
        """A new object holding the builder's inverted file (written to its cache, if any).

        Returns
        -------
        ASMKMethod
            ``metadata['build_ivf']`` is ``ivf_builder.save()``.
        """
        if not isinstance(ivf_builder, IvfBuilder):
            raise ArgumentError(f"ivf_builder: expected an IvfBuilder, got {type(ivf_builder).__name__}")
        metadata = ivf_builder.save()
        return type(self)(
            {**self.params, "build_ivf": ivf_builder.step_params},
            {**self.metadata, "build_ivf": metadata},
            codebook=self.codebook,
            kernel=ivf_builder.kernel,
            inverted_file=ivf_builder.ivf,
        )

    def query_ivf(
        self, *columns, step_params: Mapping[str, Any] | None = None, progress: int | None = None
    ) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
        """Score every query image against the inverted file.

        Parameters
        ----------
        qvecs : float32 [Nq, D]
            Query descriptors (first positional column).
        qimids : int [Nq]
            Query image id of each row (second column; any order, not modified).
        step_params : dict, optional
            Replaces ``params['query_ivf']`` for this call (``quantize.multiple_assignment``,
            ``similarity.alpha``/``similarity_threshold``, ``search.topk``).
        progress : int, optional
            Accepted for call compatibility; all queries are scored in one batch.

        Returns
        -------
        metadata : dict
            ``{"query_avg_time": seconds per query image}``.
        images : int64 [Q]
            Distinct query ids, ascending.
        ranks : int64 [Q, n]
            Database image ids by decreasing score (the reference's "ranks": with ids
            0 .. n-1 they are database positions), minus the distractor offset; n = topk,
            or every database image. Ties are ordered by ascending id.
        scores : float32 [Q, n]
            The matching scores.
        """
        if self.inverted_file is None:
            raise ArgumentError("query_ivf: build_ivf must run first")
        params = _with_step(self.params, "query_ivf", step_params)
        time0 = time.perf_counter()
        images, ranks, scores = self.accumulate_scores(
            self.codebook,
            self.kernel,
            self.inverted_file,
            *columns,
            params=params.get("query_ivf", {}),
            progress=progress,
        )
        metadata = {"query_avg_time": (time.perf_counter() - time0) / max(len(ranks), 1)}
        return metadata, images, ranks, scores

    @staticmethod
    def accumulate_scores(
        cdb: Codebook,
        kern: Params | None,
        ivf: IVF,
        qvecs: np.ndarray,
        qimids: np.ndarray,
        *cols,
        params: Mapping[str, Any],
        progress: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rank the inverted file's images for every query image.

        Parameters
        ----------
        cdb : asmkit.Codebook
            Must be the inverted file's codebook.
        kern : asmkit.Params or None
            Accepted for the reference's signature: the database side (binary, idf) is the
            one ``ivf`` was built with.
        ivf : IVF
        qvecs : float32 [Nq, D]
        qimids : int [Nq]
        params : dict
            The reference's ``query_ivf`` section.
        progress : int, optional
            Ignored.

        Returns
        -------
        images : int64 [Q]
        ranks : int64 [Q, n]
        scores : float32 [Q, n]
            As for :meth:`query_ivf`.
        """
        if cols:
            raise ArgumentError(
                f"query_ivf: expected the columns qvecs, qimids, got {2 + len(cols)} positional arguments"
            )
        if not isinstance(ivf, IVF):
            raise ArgumentError(f"ivf: expected an asmkit.compat IVF, got {type(ivf).__name__}")
        if cdb is not ivf.index.codebook and not np.array_equal(cdb.centroids, ivf.index.codebook.centroids):
            raise ArgumentError("cdb: not the codebook the inverted file was built with")
        if not isinstance(params, Mapping):
            raise ArgumentError(f"params: expected the query_ivf dict, got {type(params).__name__}")
        engine = Params.from_reference({"query_ivf": params})
        qvecs = check_vecs(qvecs, name="qvecs", dim=cdb.dim)
        qimids = check_ids(qimids, name="qimids", length=qvecs.shape[0])
        # The query side (m, alpha, tau, topk) comes from this call; the database side
        # (binary, idf) is what the index was built with.
        index = ivf.index
        query_params = index.params.replace(
            ma_query=engine.ma_query, alpha=engine.alpha, tau=engine.tau, topk=engine.topk
        )
        images, ranks, scores = _search_queries(index, qvecs, qimids, query_params)
        if ivf.imid_offset:
            ranks = np.where(ranks >= 0, ranks - ivf.imid_offset, ranks)
        return images, ranks, scores
