"""Building an index on a Ray cluster: workers extract, quantize and aggregate batches of
images, and send back the compact aggregates (``asmkit.kernel.aggregate_images``), never
the raw descriptors; the driver adds them with ``Index.add_aggregates``.

Each worker is an actor that builds its extractor once (from a picklable factory) and its
codebook once, then handles batches of image paths. A worker that dies (killed, out of
memory, node lost) is restarted and its batches are retried by Ray; the driver adds the
images only when every batch has come back, so the index is the same as that of a run
without faults, and a failed run writes nothing.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .._validation import ArgumentError, check_bool, check_choice, check_int
from ..codebook import Codebook
from ..features import extract_features, image_names
from ..index import Index
from ..kernel import Aggregates, aggregate_images
from ..params import as_params
from ..quantizer import set_settle_threads, settle_threads
from ._ray import gather, require_ray

__all__ = ["IndexBuild", "build_index", "concat_aggregates", "sample_descriptors"]

_DEVICES = ("cpu", "cuda")


@dataclass
class IndexBuild:
    """Outcome of :func:`build_index`.

    Attributes
    ----------
    index : Index
        Image ``i`` of the readable images (input order) has id ``start + i`` and its
        name (the path relative to ``root``) as key.
    failed : list of (str, str)
        ``(name, reason)`` of the images that could not be read or extracted.
    codebook_trained : bool
        True when the codebook was trained on a sample in this call.
    queries : Aggregates or None
        With ``build_index(..., queries=True)``: the query-side aggregates of the indexed
        images (``aggregate_images(..., side="query")``), in ``index.ids`` order, for
        :func:`asmkit.distributed.scores_topk` (all-vs-all without a second extraction).
    """

    index: Index
    failed: list[tuple[str, str]] = field(default_factory=list)
    codebook_trained: bool = False
    queries: Aggregates | None = None


class _Worker:
    """One extraction worker (``ray.remote`` is applied on first use); it settles tied
    rows on the driver's faiss thread count ``settle`` (``asmkit.quantizer.settle_threads``)."""

    def __init__(self, extractor_factory: Callable[[], Any], params, device: str, settle: int) -> None:
        set_settle_threads(settle)
        self.extractor = extractor_factory()
        self.params = params
        # Ray gives a GPU actor its GPU as device 0 (CUDA_VISIBLE_DEVICES).
        self.gpu = 0 if device == "cuda" else None
        self.codebook: Codebook | None = None
        self.codebook_token: str | None = None

    def extract(self, paths: list[str], root: str) -> tuple[list[str], list[tuple[str, str]], list[np.ndarray]]:
        """(extracted names, failed (name, reason), float32 [n_i, D] descriptors) of a batch."""
        result = extract_features(paths, self.extractor, root=root, workers=1, progress=False, keep=True)
        return result.extracted, result.failed, [result.features[n].descriptors for n in result.extracted]

    def aggregate(self, paths: list[str], root: str, token: str, centroids: np.ndarray, queries: bool):
        """(extracted names, failed (name, reason), database-side aggregates, query-side
        aggregates or None) of a batch.

        ``centroids`` float32 [K, D] come with every batch (one object in the store, read
        without a copy), so that a worker restarted after the codebook was trained has
        it; ``token`` names the codebook, which is built once per worker."""
        if token != self.codebook_token:
            self.codebook, self.codebook_token = Codebook(centroids, gpu=self.gpu), token
        names, failed, descriptors = self.extract(paths, root)
        # One row per image and word (binary codes of D / 8 bytes for ASMK*), which
        # Index.add_aggregates turns into the index Index.add would build.
        database_side = aggregate_images(self.codebook, descriptors, None, self.params, side="database")
        query_side = aggregate_images(self.codebook, descriptors, None, self.params, side="query") if queries else None
        return names, failed, database_side, query_side


def concat_aggregates(parts: Sequence[Aggregates]) -> Aggregates:
    """The aggregates of several batches of images, one batch after the other.

    Parameters
    ----------
    parts : sequence of Aggregates
        At least one; all binary or all real, of one dimension.

    Returns
    -------
    Aggregates
        ``sum(I_j)`` images.
    """
    bases = np.cumsum([0] + [p.words.shape[0] for p in parts[:-1]])
    offsets = np.concatenate([[0]] + [p.offsets[1:] + base for p, base in zip(parts, bases)]).astype(np.int64)
    return Aggregates(offsets, np.concatenate([p.words for p in parts]), np.concatenate([p.data for p in parts]))


def _pool(extractor_factory, params, device: str, workers: int | None, max_retries: int) -> list:
    ray = require_ray()
    resources = ray.cluster_resources()
    if device == "cuda":
        n_gpus = int(resources.get("GPU", 0))
        if n_gpus < 1:
            raise ArgumentError("device: cuda, but the Ray cluster has no GPU")
        workers = n_gpus if workers is None else workers
        options = {"num_cpus": 1, "num_gpus": 1}
    else:
        workers = max(int(resources.get("CPU", 1)), 1) if workers is None else workers
        options = {"num_cpus": 1}
    actor = ray.remote(max_restarts=max_retries, max_task_retries=max_retries, **options)(_Worker)
    return [actor.remote(extractor_factory, params, device, settle_threads()) for _ in range(workers)]


def _stop(pool: list) -> None:
    ray = require_ray()
    for actor in pool:
        ray.kill(actor)


def _run(
    pool: list, method: str, paths: Sequence[Path], root: Path, batch_size: int, desc: str, progress: bool, *args: Any
) -> list:
    """``method(batch, root, *args)`` of the workers over batches of ``paths``, round
    robin; results in batch order."""
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    refs = [
        getattr(pool[j % len(pool)], method).remote([str(p) for p in batch], str(root), *args)
        for j, batch in enumerate(batches)
    ]
    return gather(refs, desc=desc, weights=[len(b) for b in batches], progress=progress)


def _check_common(paths, extractor_factory, root, batch_size, workers, device, max_retries):
    if isinstance(paths, (str, os.PathLike)):
        raise ArgumentError("paths: expected a sequence of image paths (use asmkit.features.list_images for a folder)")
    # Absolute, not resolved: a path through a symbolic link keeps its name below root.
    paths = [Path(os.path.abspath(p)) for p in paths]
    if not paths:
        raise ArgumentError("paths: no images")
    if not callable(extractor_factory):
        raise ArgumentError("extractor_factory: expected a picklable callable that returns an extractor")
    root = Path(os.path.commonpath([str(p.parent) for p in paths])) if root is None else Path(os.path.abspath(root))
    image_names(paths, root)  # names must be distinct and below root: fail before any work
    return (
        paths,
        root,
        check_int(batch_size, "batch_size", min=1),
        check_int(workers, "workers", min=1, none=True),
        check_choice(device, "device", _DEVICES),
        check_int(max_retries, "max_retries", min=0),
    )


def sample_descriptors(
    paths: Sequence[str | os.PathLike],
    extractor_factory: Callable[[], Any],
    *,
    root: str | os.PathLike | None = None,
    batch_size: int = 16,
    workers: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    max_retries: int = 3,
) -> np.ndarray:
    """Descriptors of (a sample of) images, extracted on the workers, to train a codebook.

    Parameters
    ----------
    paths : sequence of path-like
        The sample's images (the caller picks the sample).
    extractor_factory, root, batch_size, workers, device, progress, max_retries
        As for :func:`build_index`.

    Returns
    -------
    float32 [N, D]
        All descriptors of the readable images, image after image in ``paths`` order.
    """
    paths, root, batch_size, workers, device, max_retries = _check_common(
        paths, extractor_factory, root, batch_size, workers, device, max_retries
    )
    pool = _pool(extractor_factory, None, device, workers, max_retries)
    try:
        return _sample(pool, paths, root, batch_size, progress)
    finally:
        _stop(pool)


def _sample(pool: list, paths: Sequence[Path], root: Path, batch_size: int, progress: bool) -> np.ndarray:
    results = _run(pool, "extract", paths, root, batch_size, "extract sample", progress)
    parts = [vecs for _, _, descriptors in results for vecs in descriptors]
    if not parts:
        raise ArgumentError("paths: no descriptor in any sample image")
    return np.concatenate(parts).astype(np.float32, copy=False)


def build_index(
    paths: Sequence[str | os.PathLike],
    extractor_factory: Callable[[], Any],
    codebook: Codebook | None,
    params=None,
    *,
    root: str | os.PathLike | None = None,
    start: int = 0,
    sample: int = 200,
    seed: int = 0,
    batch_size: int = 16,
    workers: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    max_retries: int = 3,
    out: str | os.PathLike | None = None,
    queries: bool = False,
    train: Callable[[np.ndarray], Codebook] | None = None,
) -> IndexBuild:
    """Index images on the connected Ray cluster (see :func:`asmkit.distributed.connect`).

    Parameters
    ----------
    paths : sequence of path-like
        The images, in id order.
    extractor_factory : callable() -> extractor
        Picklable (a class, a ``functools.partial``, a module-level function); each worker
        calls it once. The extractor follows ``asmkit.features.Extractor``.
    codebook : Codebook or None
        None: trained first on the descriptors of ``sample`` images drawn from ``paths``
        with ``seed``, by ``train``.
    params : Params, preset name, dict or None
    root : path-like, optional
        Keys are the paths relative to it (default: their deepest common folder).
    start : int
        Id of the first image.
    sample, seed : int
        Images for the codebook, and the seed that draws them.
    batch_size : int
        Images per task.
    workers : int, optional
        Worker actors (default: one per cluster CPU, or per GPU with ``device="cuda"``).
    device : {"cpu", "cuda"}
        ``"cuda"``: one actor per GPU, quantizing on it (``Codebook(gpu=0)`` there); the
        extractor factory should build a CUDA extractor.
    progress : bool
        One progress bar on the driver, advanced as batches finish anywhere.
    max_retries : int
        Times a dead worker is restarted and its batches rerun.
    out : str or path-like, optional
        Also save the index there (``Index.save``, atomic).
    queries : bool
        Also send back the images' query-side aggregates (``IndexBuild.queries``), for an
        all-vs-all top-k: larger than the database side (``ma_query`` words per
        descriptor), still far smaller than the descriptors.
    train : callable(float32 [N, D]) -> Codebook, optional
        How the codebook is trained on the sample's descriptors (image after image, in
        ``paths`` order). Default: ``Codebook.train`` with ``params.codebook_size``,
        ``kmeans_iters`` and ``seed``.

    Returns
    -------
    IndexBuild

    Raises
    ------
    ArgumentError
        Bad arguments, or no image could be read.
    """
    paths, root, batch_size, workers, device, max_retries = _check_common(
        paths, extractor_factory, root, batch_size, workers, device, max_retries
    )
    params = as_params(params)
    start = check_int(start, "start", min=0)
    queries = check_bool(queries, "queries")
    trained = codebook is None
    if not trained and not isinstance(codebook, Codebook):
        raise ArgumentError(f"codebook: expected an asmkit Codebook or None, got {type(codebook).__name__}")
    if train is not None and not callable(train):
        raise ArgumentError(f"train: expected a callable that returns a Codebook, got {type(train).__name__}")
    if trained:
        rng = np.random.default_rng(check_int(seed, "seed"))
        chosen = np.sort(
            rng.choice(len(paths), size=min(check_int(sample, "sample", min=1), len(paths)), replace=False)
        )
    ray = require_ray()
    # One pool for the sample and the index: each worker builds its extractor once.
    pool = _pool(extractor_factory, params, device, workers, max_retries)
    try:
        if trained:
            vecs = _sample(pool, [paths[i] for i in chosen], root, batch_size, progress)
            if train is None:
                codebook = Codebook.train(vecs, params.codebook_size, iters=params.kmeans_iters, seed=params.seed)
            else:
                codebook = train(vecs)
                if not isinstance(codebook, Codebook):
                    raise ArgumentError(f"train: returned {type(codebook).__name__}, not a Codebook")
            del vecs
        index = Index(codebook, params)
        results = _run(
            pool,
            "aggregate",
            paths,
            root,
            batch_size,
            "index",
            progress,
            uuid.uuid4().hex,
            ray.put(codebook.centroids),
            queries,
        )
    finally:
        _stop(pool)
    keys = [name for names, _, _, _ in results for name in names]
    failed = [item for _, batch_failed, _, _ in results for item in batch_failed]
    if not keys:
        raise ArgumentError(f"paths: no image could be read ({len(failed)} failed)")
    index.add_aggregates(
        concat_aggregates([database_side for _, _, database_side, _ in results]),
        start + np.arange(len(keys), dtype=np.int64),
        keys=keys,
    )
    if out is not None:
        index.save(out)
    query_side = concat_aggregates([q for _, _, _, q in results]) if queries else None
    return IndexBuild(index, failed, trained, query_side)
