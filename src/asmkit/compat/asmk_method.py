"""``ASMKMethod``: the reference ``asmk`` package's facade, on asmkit's engine.

Code written for the reference (HOW, MASt3R retrieval) drives ASMK through
``ASMKMethod.initialize_untrained(params).train_codebook(...).build_ivf(...).query_ivf(...)``
with the reference's nested params dict. This class keeps those calls, arguments and return
shapes, and runs them on :class:`asmkit.Codebook` and :class:`asmkit.Index`.

Differences from the reference, all deliberate:

- Caller arrays are never modified (the reference shifts ``imids`` in place).
- Image ids need not be sorted or contiguous; query rows follow ``np.unique(qimids)``, which
  is the reference's order whenever its own precondition (sorted, contiguous ids) holds.
- Caches are never pickles. ``cache_path`` of :meth:`train_codebook` reads an existing
  reference codebook pickle (a file) through the restricted loader of
  :mod:`asmkit.compat.legacy`, or an asmkit codebook directory; a path that does not exist
  yet is trained and then written in asmkit's format (a directory) *at that path*, whatever
  its suffix, so the next call finds and loads it. :meth:`build_ivf` caches likewise, as an
  asmkit index directory; a reference IVF pickle is not accepted as a cache (nor as
  distractors): rebuild it from the descriptors.
- ``query_ivf`` scores all query images in one batch; ``progress`` is accepted and ignored.
- Scores are float32 (the reference's are float64); they agree within 1e-5.
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

from asmkit.codebook import Codebook
from asmkit.index import Index
from asmkit.kernel import prepare_descriptors
from asmkit.params import Params
from asmkit.search import aggregate_images, score_aggregates

from .legacy import LegacyFormatError, codebook_from_legacy, index_from_legacy, load_legacy_pickle

__all__ = ["ASMKMethod"]

logger = logging.getLogger(__name__)

_STEPS = ("train_codebook", "build_ivf", "query_ivf")


def _gpu_id(params: Mapping[str, Any]) -> int | None:
    index = params.get("index") or {}
    if not isinstance(index, Mapping):
        raise ValueError(f"params['index']: expected a dict, got {type(index).__name__}")
    gpu = index.get("gpu_id")
    if gpu is not None and (isinstance(gpu, bool) or not isinstance(gpu, (int, np.integer)) or gpu < 0):
        raise ValueError(f"params['index']['gpu_id']: expected None or a GPU id, got {gpu!r}")
    return None if gpu is None else int(gpu)


def _as_vecs(vecs: Any, name: str) -> np.ndarray:
    if not isinstance(vecs, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array [N, D], got {type(vecs).__name__}")
    if vecs.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [N, D], got shape {vecs.shape}")
    return vecs


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
        Timings and statistics of the steps run so far.
    codebook : asmkit.Codebook, optional
    index : asmkit.Index, optional
        The inverted file built by :meth:`build_ivf`.
    imid_offset : int
        Added to database and subtracted from returned ids when the index was initialised
        with distractors (the reference's convention: distractors get negative ids).

    Attributes
    ----------
    params, metadata, codebook, index
        As given.
    """

    def __init__(
        self,
        params: Mapping[str, Any],
        metadata: Mapping[str, Any],
        *,
        codebook: Codebook | None = None,
        index: Index | None = None,
        imid_offset: int = 0,
    ) -> None:
        if not isinstance(params, Mapping):
            raise TypeError(f"params: expected a dict, got {type(params).__name__}")
        self.params = copy.deepcopy(dict(params))
        self.metadata = dict(metadata)
        self.codebook = codebook
        self.index = index
        self.imid_offset = int(imid_offset)
        # Validate now, so that a bad dict fails at construction rather than mid-pipeline.
        Params.from_reference(self.params)
        self._gpu = _gpu_id(self.params)

    @classmethod
    def initialize_untrained(cls, params: Mapping[str, Any]) -> "ASMKMethod":
        """A method with parameters only (no codebook, no inverted file).

        Raises
        ------
        ValueError
            If ``params`` holds keys the engine does not understand (naming them).
        """
        return cls(params, {})

    # -- helpers ---------------------------------------------------------------------------

    def _with_step(self, step: str, step_params: Mapping[str, Any] | None) -> dict[str, Any]:
        params = copy.deepcopy(self.params)
        if step_params is not None:
            if not isinstance(step_params, Mapping):
                raise TypeError(f"step_params: expected a dict, got {type(step_params).__name__}")
            params[step] = copy.deepcopy(dict(step_params))
        return params

    def _derive(self, params, step, step_metadata, **state) -> "ASMKMethod":
        fields = {"codebook": self.codebook, "index": self.index, "imid_offset": self.imid_offset}
        fields.update(state)
        return type(self)(params, {**self.metadata, step: step_metadata}, **fields)

    # -- steps -----------------------------------------------------------------------------

    def train_codebook(
        self,
        vecs: np.ndarray | None,
        *,
        cache_path: str | os.PathLike | None = None,
        step_params: Mapping[str, Any] | None = None,
    ) -> "ASMKMethod":
        """Train the codebook by k-means, or load it from ``cache_path``.

        Parameters
        ----------
        vecs : float32 [N, D] or None
            Training descriptors (may be None when ``cache_path`` exists).
        cache_path : str or path-like, optional
            An existing reference codebook pickle (read with the restricted loader) or asmkit
            codebook directory is loaded instead of training. A missing path is trained and
            then written there as an asmkit codebook directory (never a pickle).
        step_params : dict, optional
            Replaces ``params['train_codebook']`` for this step.

        Returns
        -------
        ASMKMethod
            A new object with the codebook; ``metadata['train_codebook']`` holds timings.

        Raises
        ------
        ValueError
            If a codebook is already trained, or a cached codebook's size differs from
            ``params['train_codebook']['codebook']['size']``.
        """
        if self.codebook is not None:
            raise ValueError("train_codebook: the codebook is already trained; start from initialize_untrained")
        params = self._with_step("train_codebook", step_params)
        engine = Params.from_reference(params)
        t0 = time.perf_counter()
        if cache_path is not None and Path(cache_path).exists():
            path = Path(cache_path)
            if path.is_dir():
                codebook = Codebook.load(path, gpu=self._gpu)
            else:
                codebook = codebook_from_legacy(load_legacy_pickle(path))
                if self._gpu is not None:
                    codebook = Codebook(codebook.centroids, gpu=self._gpu)
            if codebook.size != engine.codebook_size:
                raise ValueError(
                    f"cache_path: {path} holds a codebook of size {codebook.size}, but "
                    f"params['train_codebook']['codebook']['size'] is {engine.codebook_size}"
                )
            metadata = {"load_time": time.perf_counter() - t0}
        else:
            vecs = _as_vecs(vecs, "vecs")
            codebook = Codebook.train(vecs, engine.codebook_size, iters=engine.kmeans_iters,
                                      seed=engine.seed, gpu=self._gpu)
            metadata = {"train_time": time.perf_counter() - t0}
            if cache_path is not None:
                codebook.save(cache_path)
                logger.info("codebook cached as an asmkit directory at %s", cache_path)
        return self._derive(params, "train_codebook", metadata, codebook=codebook)

    def build_ivf(
        self,
        vecs: np.ndarray | None,
        imids: np.ndarray | None,
        *,
        cache_path: str | os.PathLike | None = None,
        distractors_path: str | os.PathLike | None = None,
        step_params: Mapping[str, Any] | None = None,
    ) -> "ASMKMethod":
        """Quantize, aggregate and index database descriptors (or load the index from cache).

        Parameters
        ----------
        vecs : float32 [N, D] or None
            Database descriptors (may be None when ``cache_path`` exists).
        imids : int [N] or None
            Non-negative image id of each row (any order; not modified).
        cache_path : str or path-like, optional
            An existing asmkit index directory is loaded instead of building, and so is an
            existing file holding the reference's pickled inverted file (restricted loader,
            ``index_from_legacy``); a missing path is built and then written there as an
            asmkit directory (with the distractor offset, if any).
        distractors_path : str or path-like, optional
            An asmkit index directory, built with the same codebook and kernel, to start
            from. As in the reference, the new images' ids are shifted by the distractor
            index's largest id + 1 and results report ``id - offset``, so distractors come
            out with negative ids.
        step_params : dict, optional
            Replaces ``params['build_ivf']`` for this step.

        Returns
        -------
        ASMKMethod
            A new object with the index; ``metadata['build_ivf']`` holds ``index_time`` (or
            ``load_time``) and ``ivf_stats``.

        Raises
        ------
        ValueError
            Steps out of order, bad ``imids``, or a cached/distractor index whose codebook or
            kernel (binary, idf, database multiple assignment) differs from this method's.
        """
        if self.codebook is None:
            raise ValueError("build_ivf: train_codebook must run first")
        if self.index is not None:
            raise ValueError("build_ivf: the inverted file is already built")
        params = self._with_step("build_ivf", step_params)
        engine = Params.from_reference(params)
        t0 = time.perf_counter()
        if cache_path is not None and Path(cache_path).is_file():
            # The reference's pickled inverted file, read by the restricted loader.
            try:
                index = index_from_legacy(load_legacy_pickle(cache_path), self.codebook, engine)
            except LegacyFormatError as exc:
                raise LegacyFormatError(f"cache_path: {cache_path}: {exc}") from None
            offset = 0
            metadata: dict[str, Any] = {"load_time": time.perf_counter() - t0}
        elif cache_path is not None and Path(cache_path).exists():
            index = Index.load(cache_path, mmap=True)
            self._check_compatible(index, engine, "cache_path", cache_path)
            offset = _read_offset(Path(cache_path))
            metadata = {"load_time": time.perf_counter() - t0}
        else:
            vecs = _as_vecs(vecs, "vecs")
            imids = np.asarray(imids)
            if imids.ndim != 1 or imids.shape[0] != vecs.shape[0] or imids.dtype.kind not in "iu":
                raise ValueError(
                    f"imids: expected {vecs.shape[0]} integer image ids (one per row of vecs), "
                    f"got {imids.dtype} {imids.shape}"
                )
            if distractors_path is not None:
                index = Index.load(distractors_path, mmap=False)
                self._check_compatible(index, engine, "distractors_path", distractors_path)
                offset = int(index.ids.max()) + 1 if len(index) else 0
            else:
                index = Index(self.codebook, engine)
                offset = 0
            # astype makes a new array: the caller's imids stay untouched.
            index.add(vecs, imids.astype(np.int64) + offset)
            metadata = {"index_time": time.perf_counter() - t0}
            if cache_path is not None:
                index.save(cache_path)
                _write_offset(Path(cache_path), offset)
        metadata["ivf_stats"] = dict(index.stats)
        return self._derive(params, "build_ivf", metadata, index=index, imid_offset=offset)

    def _check_compatible(self, index: Index, engine: Params, name: str, path) -> None:
        if not np.array_equal(index.codebook.centroids, self.codebook.centroids):
            raise ValueError(f"{name}: {path} was built with another codebook")
        for field in ("binary", "use_idf", "ma_database"):
            if getattr(index.params, field) != getattr(engine, field):
                raise ValueError(
                    f"{name}: {path} was built with {field}={getattr(index.params, field)!r}, "
                    f"but params['build_ivf'] asks for {getattr(engine, field)!r}"
                )

    def query_ivf(
        self,
        qvecs: np.ndarray,
        qimids: np.ndarray,
        *,
        step_params: Mapping[str, Any] | None = None,
        progress: int | None = None,
    ) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
        """Score every query image against the inverted file.

        Parameters
        ----------
        qvecs : float32 [Nq, D]
            Query descriptors.
        qimids : int [Nq]
            Query image id of each row (any order; not modified).
        step_params : dict, optional
            Replaces ``params['query_ivf']`` for this call (``quantize.multiple_assignment``,
            ``similarity.alpha``/``similarity_threshold``, ``search.topk``).
        progress : int, optional
            Accepted for call compatibility; all queries are scored in one batch, so there
            is no per-query progress to report.

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
        if self.index is None:
            raise ValueError("query_ivf: build_ivf must run first")
        qvecs = _as_vecs(qvecs, "qvecs")
        qimids = np.asarray(qimids)
        if qimids.ndim != 1 or qimids.shape[0] != qvecs.shape[0] or qimids.dtype.kind not in "iu":
            raise ValueError(
                f"qimids: expected {qvecs.shape[0]} integer image ids (one per row of qvecs), "
                f"got {qimids.dtype} {qimids.shape}"
            )
        params = self._with_step("query_ivf", step_params)
        # The query-side settings (m, alpha, tau, topk) come from this call; the database
        # side (binary, idf) is what the index was built with.
        engine = Params.from_reference(params)
        index = self.index
        query_params = index.params.replace(ma_query=engine.ma_query, alpha=engine.alpha, tau=engine.tau,
                                            topk=engine.topk)
        t0 = time.perf_counter()
        codebook = index.codebook
        # prepare_descriptors copies ids into its own arrays: the caller's are untouched.
        desc = prepare_descriptors(qvecs, qimids.astype(np.int64), dim=codebook.dim)
        # One faiss call per query image, as the reference makes them (float32 ties), when
        # the rows come image by image.
        contiguous = bool(np.all(desc.order == np.arange(len(desc.order))))
        assignments = codebook.quantize(desc.vecs, query_params.ma_query,
                                        segments=desc.starts if contiguous else None, nearest_first=False)
        queries = aggregate_images(codebook, desc, assignments, query_params.binary)
        scores, ids = score_aggregates(index.inverted_file, index.idf, np.sqrt(index.norms), index.ids, queries,
                                       query_params, dim=codebook.dim, k=query_params.topk)
        elapsed = time.perf_counter() - t0
        if self.imid_offset:
            ids = np.where(ids >= 0, ids - self.imid_offset, ids)
        return {"query_avg_time": elapsed / max(desc.n_images, 1)}, desc.image_ids, ids, scores


_OFFSET_FILE = "asmk_compat.json"


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
        raise ValueError(f"{side}: unreadable distractor offset ({exc})") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{side}: invalid distractor offset {value!r}")
    return value
