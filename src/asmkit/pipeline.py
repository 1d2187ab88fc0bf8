"""End-to-end workflows behind the command line: index, query, scores, pairs, eval.

Each function's keyword arguments mirror the flags of its ``asmkit`` subcommand (as hloc
does), so a pipeline can be scripted in Python or run from the shell with the same names.
Steps talk through files keyed by image name: a feature store (HDF5), the codebook and the
index, so that any step can be resumed or rerun without repeating the ones before it.

An index *workspace* is a folder::

    pipeline.json    the resolved preset (features + ASMK params) and the image root
    extractor.pt     deep presets only: the retrieval head with its learned whitening
    whitening.npz    sift presets with whitening only
    features.h5      local features of the indexed images (resumable)
    codebook.asmkit  the codebook (reused by --add and reruns)
    index.asmkit     the inverted file

A hybrid preset's workspace holds one such folder per member preset and a ``pipeline.json``
naming the members and the fusion (:func:`workspace_hybrid`, docs/formats.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ._io import write_text_atomic
from ._validation import ArgumentError, FileFormatError, check_int
from .codebook import Codebook
from .config import PipelineConfig, load_config
from .features import FeatureStore, ImageFeatures, extract_features, image_names, list_images
from .features.factory import (
    Features,
    build_extractor,
    database_options,
    extraction_settings,
    feature_options,
    query_turns,
)
from .hybrid import HybridSpec, column_sample, column_stats, fuse, hybrid_spec, needs_columns
from .index import Index
from .pairs import SparseScores
from .regions import Regions, in_box, regions_for_features
from .storage import StorageError

logger = logging.getLogger(__name__)

__all__ = [
    "build_index",
    "common_names",
    "compute_scores",
    "evaluate_dataset",
    "anchor_scorer",
    "fit_codebook_size",
    "hybrid_columns",
    "index_topk",
    "score_blocks",
    "make_pairs",
    "open_workspace",
    "query_index",
    "run_demo",
    "workspace_extractor_path",
    "workspace_hybrid",
]

_PIPELINE = "pipeline.json"
_GEOMETRY = "geometry.asmkit"  # keypoints, words and signatures for spatial verification
_VERIFY = "verify"  # the verification features' store, codebook and extractor (PipelineConfig.verify)


# ------------------------------------------------------------------------------ extractors


def _image_set_key(paths: Sequence[Path]) -> str:
    """SHA-256 of every image's absolute path and size: two image sets never share a learned
    whitening, and one set spelled from another working directory still finds its own."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            size = os.stat(path).st_size
        except OSError:
            size = -1  # unreadable now; extraction reports it
        digest.update(f"{Path(path).resolve()}\0{size}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _whitening_key(cfg: PipelineConfig, image_set: str) -> str | None:
    """What a learned whitening depends on, hashed; None when the preset learns none."""
    options = database_options(cfg.features)
    if options.get("whitening_dim") is None and options["type"] != "deep":
        return None
    return _digest({"features": options, "images": image_set, "seed": cfg.params.seed})


def _digest(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _build_extractor(
    cfg: PipelineConfig,
    *,
    saved: Path | None,
    sample: Sequence[Path] = (),
    model: str | os.PathLike | None = None,
    device: str = "cpu",
) -> Features:
    gpu_of(device)  # a bad value fails before any work
    return build_extractor(cfg.features, sample=sample, saved=saved, model=model, device=device, seed=cfg.params.seed)


def workspace_extractor_path(cfg: PipelineConfig, folder: Path) -> Path:
    """Where ``asmkit index`` keeps what its extractor learned: the deep head, or the SIFT
    whitening."""
    return folder / ("extractor.pt" if feature_options(cfg.features)["type"] == "deep" else "whitening.npz")


# ------------------------------------------------------------------------------ helpers


def _images(source: str | os.PathLike) -> tuple[list[Path], Path]:
    """Image paths of a folder or list file, and the root their names are relative to."""
    paths = list_images(source)
    src = Path(source)
    root = src if src.is_dir() else src.parent
    return paths, root


def _extract_into(paths, root, extractor, store_path: Path, workers) -> tuple[FeatureStore, list[str], list]:
    store = FeatureStore(store_path, extractor.config(), overwrite_on_mismatch=True)
    # Progress bars follow the log level, so `asmkit -q` prints nothing but errors.
    result = extract_features(
        paths, extractor, root=root, store=store, workers=workers, progress=logger.isEnabledFor(logging.INFO)
    )
    failed = {name for name, _ in result.failed}
    names = [n for n in image_names(paths, root) if n not in failed and store.has(n)]
    return store, names, result.failed


def gpu_of(device: str) -> int | None:
    """The GPU id of a ``--device`` value: None for ``"cpu"``, N for ``"cuda"`` (0) or
    ``"cuda:N"``."""
    if device == "cpu":
        return None
    if device == "cuda":
        return 0
    head, _, index = str(device).partition(":")
    if head == "cuda" and index.isdigit():
        return int(index)
    raise ArgumentError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")


def _on_device(cb: Codebook, device: str) -> Codebook:
    """``cb`` quantizing on ``device``'s GPU (``Codebook(..., gpu=N)``), or ``cb`` on the CPU."""
    gpu = gpu_of(device)
    return cb if gpu is None else Codebook(cb.centroids, gpu=gpu)


#: faiss asks for at least this many training points per word (fewer leave words that
#: stand for one or two descriptors); a size not chosen by the user is fitted to it.
MIN_POINTS_PER_WORD = 39
#: k-means trains on at most this many descriptors per word, sampled (the reference
#: also trains on a sample; faiss advises a few dozen to a few hundred per word, and on
#: UKBench twice as many gave the same mAP within noise: docs/performance.md).
TRAIN_POINTS_PER_WORD = 64
#: k-means assigns with the pruned exact search (``Codebook.train(pruned=True)``): faiss's
#: algorithm for less CPU time, not faiss's centroids; part of the saved codebooks' keys.
KMEANS_PRUNED = True


def fit_codebook_size(n_descriptors: int, size: int) -> int:
    """The codebook size used when the user chose none: ``size`` (the preset's), or the
    largest power of two that leaves at least ``MIN_POINTS_PER_WORD`` training
    descriptors per word, whichever is smaller (at least 1)."""
    fit = 1
    while fit * 2 <= size and fit * 2 * MIN_POINTS_PER_WORD <= n_descriptors:
        fit *= 2
    return size if size * MIN_POINTS_PER_WORD <= n_descriptors else fit


def _training_sample(parts: Sequence[np.ndarray], n: int, seed: int) -> np.ndarray:
    """``n`` rows drawn without replacement from the row-wise concatenation of ``parts``
    (float32 ``[N_i, D]`` each), without building that concatenation; float32 ``[n, D]``."""
    counts = np.array([len(p) for p in parts], dtype=np.int64)
    total = int(counts.sum())
    if n >= total:
        return np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0])
    rows = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    # The rows are sorted, so each part's rows are one slice of them: no per-part mask
    # over all n rows (thousands of parts when each image is one).
    bounds = np.searchsorted(rows, offsets)
    out = np.empty((n, parts[0].shape[1]), dtype=np.float32)
    for k in np.flatnonzero(np.diff(bounds)):
        begin, end = bounds[k], bounds[k + 1]
        np.take(parts[k], rows[begin:end] - offsets[k], axis=0, out=out[begin:end])
    return out


def _get_codebook(
    cfg: PipelineConfig,
    *,
    given: str | os.PathLike | None = None,
    model_codebook: np.ndarray | None = None,
    saved: Path | None = None,
    training: Any = None,
    dim: int | None = None,
) -> tuple[Codebook, str]:
    """The codebook of a run, and where it came from, in this order: ``given`` (--codebook),
    the model's, one ``saved`` before, or k-means on a sample of ``training()`` (a list of
    float32 ``[N_i, D]`` descriptor arrays), then saved to ``saved``. ``dim`` is the
    descriptors' ``D``, which a ``given`` codebook must have."""
    if given is not None:
        cb = _load_codebook(given)
        # Caught here, the mistake names the file; Index.add would only name its argument.
        if dim is not None and cb.dim != dim:
            raise FileFormatError(given, f"codebook of dimension {cb.dim}, the features have {dim}")
        return cb, f"given ({given})"
    if model_codebook is not None:
        return Codebook(model_codebook), "the model's codebook"
    if saved is not None and saved.exists():
        return Codebook.load(saved), f"saved ({saved})"
    parts = [p for p in training() if len(p)]
    n = sum(len(p) for p in parts)
    p = cfg.params
    size = p.codebook_size
    if not cfg.codebook_size_chosen:
        size = fit_codebook_size(n, size)
        if size < p.codebook_size:
            logger.info(
                "codebook: %d words instead of the preset's %d, for %d training descriptors "
                "(%d per word at least; --codebook-size overrides)",
                size,
                p.codebook_size,
                n,
                MIN_POINTS_PER_WORD,
            )
    if size > n:
        raise ArgumentError(f"--codebook-size: {size} words but only {n} training descriptors; use a smaller codebook")
    if size * MIN_POINTS_PER_WORD > n:
        logger.warning("codebook: %d words from %d descriptors, fewer than %d per word", size, n, MIN_POINTS_PER_WORD)
    vecs = _training_sample(parts, min(n, TRAIN_POINTS_PER_WORD * size), p.seed)
    logger.info("training a %d-word codebook on %d of %d descriptors", size, len(vecs), n)
    cb = Codebook.train(vecs, size, iters=p.kmeans_iters, seed=p.seed, pruned=KMEANS_PRUNED)
    if saved is not None:
        cb.save(saved)
    return cb, f"{len(vecs)} of {n} descriptors"


def _load_codebook(path: str | os.PathLike) -> Codebook:
    path = Path(path)
    if path.suffix == ".pkl":
        from .compat.legacy import LegacyFormatError, codebook_from_legacy, load_legacy_pickle

        state = load_legacy_pickle(path)
        try:
            return codebook_from_legacy(state)
        except LegacyFormatError as exc:
            # The state's own message does not know which file it came from.
            raise FileFormatError(path, f"not a reference ASMK codebook pickle ({exc})") from None
    return Codebook.load(path)


def _per_image(vecs: np.ndarray, ids: np.ndarray, n: int) -> list[np.ndarray]:
    """``FeatureStore.stack``'s rows (float32 [N, D], ``ids`` ascending) split into the
    ``n`` images' descriptor arrays (views); an image without descriptors gets zero rows
    and keeps its place, where array input to ``Index.add`` or ``similarity_matrix`` would
    drop it and shift every later image."""
    starts = np.searchsorted(ids, np.arange(n + 1))
    return [vecs[starts[i] : starts[i + 1]] for i in range(n)]


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _cache_dir(kind: str, key: dict[str, Any]) -> Path:
    base = Path(
        os.environ.get("ASMKIT_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asmkit")
    )
    folder = base / kind / _digest(key)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _features_for(
    paths: list[Path], root: Path, cfg: PipelineConfig, model, workers, cache: Path | None, device: str
) -> tuple[Features, FeatureStore, list[str], list, Path]:
    """Extract (or reuse cached) features of ``paths``.

    The cache folder is keyed on the image root and the extraction settings alone, so that
    presets which differ in whitening or ASMK settings share the stored features; a learned
    whitening is kept beside them under a key of every image's path and size.
    """
    folder = (
        cache
        if cache is not None
        else _cache_dir(
            "features",
            {
                "root": str(Path(root).resolve()),
                "extraction": extraction_settings(cfg.features),
                "model": None if model is None else str(Path(model).resolve()),
            },
        )
    )
    folder.mkdir(parents=True, exist_ok=True)
    wkey = _whitening_key(cfg, _image_set_key(paths))
    deep = feature_options(cfg.features)["type"] == "deep"
    saved = None if wkey is None else folder / (f"extractor-{wkey}.pt" if deep else f"whitening-{wkey}.npz")
    feats = _build_extractor(cfg, saved=saved, sample=paths, model=model, device=device)
    # A deep head's whitening is part of its features: each one gets its own store.
    store_name = f"features-{wkey}.h5" if deep else "features.h5"
    store, names, failed = _extract_into(paths, root, feats.extractor, folder / store_name, workers)
    return feats, store, names, failed, folder


def _add_geometry(
    path: Path, index: Index, store: FeatureStore, names: list[str], add: bool, describe, codebook: Codebook
):
    """The workspace's geometry store (``asmkit.geometry``) with the images ``names`` of
    ``store`` added under their index ids, their words in ``codebook``; with ``add`` the
    saved one grows, and images already in it stay. ``describe`` maps stored descriptors
    to the codebook's space (``Features.descriptors``)."""
    from .geometry import GeometryStore, feature_words

    geometry = GeometryStore.load(path, mmap=False) if add and path.is_dir() else GeometryStore()
    ids = np.array([index.id_of(n) for n in names], dtype=np.int64)
    fresh = ~np.isin(ids, geometry.ids)
    feats = [store.get(n) for n, keep in zip(names, fresh) if keep]
    kp = [f.keypoints if f.keypoints is not None else np.empty((0, 4), np.float32) for f in feats]
    # Features without keypoints cannot be verified: such an image gets none.
    words, sigs = feature_words(
        codebook,
        [describe(f.descriptors) if f.keypoints is not None else describe(f.descriptors)[:0] for f in feats],
    )
    geometry.add(ids[fresh], kp, words, sigs)
    logger.info("geometry store: %d images, %.0f bytes per image", len(geometry), geometry.bytes_per_image)
    return geometry


# ------------------------------------------------------------------------------ index / query


def _in_query_box(feats: ImageFeatures, box: Sequence[float]) -> ImageFeatures:
    """The features of a query whose keypoint lies in ``box`` (``--query-box``)."""
    if feats.keypoints is None:
        raise ArgumentError("--query-box: the query's features have no keypoints")
    keep = in_box(feats.keypoints, box)
    return ImageFeatures(
        descriptors=feats.descriptors[keep],
        keypoints=feats.keypoints[keep],
        attention=None if feats.attention is None else feats.attention[keep],
        global_descriptor=feats.global_descriptor,
    )


def _regions(
    source: str | os.PathLike | None, names: Sequence[str], store: FeatureStore, whole_image: bool
) -> Regions | None:
    """R-ASMK regions (``--regions``: "grid", "proposals" or a box file; the whole image too
    unless ``whole_image`` is False) of the named images from their stored keypoints; the
    image sizes are not stored, so the grid and the proposals cover each image's keypoint
    extent. An image not in the store (unreadable) has no region. None without a source."""
    if source is None:
        return None
    none = ImageFeatures(descriptors=np.zeros((0, 1), np.float32), keypoints=np.zeros((0, 4), np.float32))
    regions = regions_for_features(
        source, names, [store.get(n) if store.has(n) else none for n in names], whole_image=whole_image
    )
    logger.info(
        "regions: %d kept over %d images (%d boxes, %d clipped, %d outside, %d empty)",
        regions.n_regions,
        regions.n_images,
        regions.n_boxes,
        regions.n_clipped,
        regions.n_outside,
        regions.n_empty,
    )
    return regions


def build_index(
    images: str | os.PathLike,
    *,
    out: str | os.PathLike,
    preset: str = "sift",
    config: str | os.PathLike | None = None,
    codebook: str | os.PathLike | None = None,
    codebook_size: int | str | None = None,
    train: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    add: bool = False,
    workers: int | None = None,
    device: str = "cpu",
    regions: str | os.PathLike | None = None,
    whole_image: bool = True,
    ray: str | None = None,
    ray_cpus: int | None = None,
    ray_sample: int = 1000,
    shards: int | None = None,
    verification: bool = True,
) -> dict[str, Any]:
    """Extract, train the codebook, build the inverted file and save the workspace ``out``.

    The workspace also gets a geometry store for ``query --rerank``: from the preset's own
    features, or, for a preset that verifies with other features (``[verify] preset``:
    the deep presets verify with SIFT), from those, extracted into ``out/verify`` with
    their own codebook. ``verification=False`` leaves the latter out (a hybrid's later
    members: the hybrid verifies with its first member).

    ``regions`` ("grid", "proposals" or a box file, docs/regions.md) indexes the images by
    R-ASMK(*), with the whole image as a region too unless ``whole_image`` is False.

    ``ray`` (``"auto"`` for a local cluster of ``ray_cpus`` CPUs, or ``host:port``):
    extraction, quantization and aggregation run on the Ray workers, which send back the
    aggregates (``asmkit.distributed.build_index``); the codebook is trained first, as
    without Ray, on the descriptors of ``ray_sample`` images drawn from ``images`` (all of
    them when there are fewer). The workspace then holds no feature store and no geometry
    store (``query --rerank`` needs them). ``shards`` N also saves the index as N shards
    in ``index.shards`` (``asmkit.distributed.ShardedIndex.load``).

    Rerunning resumes: features already in the store are not extracted again and a trained
    codebook is reused. With ``add=True`` the images not yet indexed are added to the
    existing index (whose preset is kept).

    A hybrid preset builds one workspace per member in ``out/<member>`` (each with its own
    preset's settings, so ``config``, ``codebook``, ``codebook_size`` and ``regions`` are
    refused); the summary's ``codebook_size`` and ``members`` are then per member.

    Returns
    -------
    dict
        Summary: images indexed, failed files, timings.
    """
    out = Path(out)
    spec = workspace_hybrid(out) if add else hybrid_spec(preset)
    if spec is not None:
        if ray is not None:
            raise ArgumentError("--ray: not with a hybrid preset")
        if add:
            preset = _read_manifest(out).get("preset", preset)
        _check_hybrid_options(preset, config=config, codebook=codebook, codebook_size=codebook_size, regions=regions)
        return _build_hybrid_index(
            spec, images, out=out, add=add, train=train, model=model, workers=workers, device=device, preset=preset
        )
    if ray is not None:
        if add or train is not None or regions is not None:
            given = "--add" if add else "--train" if train is not None else "--regions"
            raise ArgumentError(f"--ray: not with {given}")
        return _build_index_on_ray(
            images,
            out,
            load_config(preset, config, codebook_size=codebook_size),
            codebook=codebook,
            model=model,
            device=device,
            ray=ray,
            ray_cpus=ray_cpus,
            ray_sample=ray_sample,
            shards=shards,
        )
    if shards is not None:
        raise ArgumentError("--shards: only with --ray")
    timings: dict[str, float] = {}
    if add:
        if not (out / _PIPELINE).is_file():
            raise FileNotFoundError(f"--add: no asmkit index at {out} (missing {_PIPELINE})")
        cfg = open_workspace(out)[1]
    else:
        cfg = load_config(preset, config, codebook_size=codebook_size)
    paths, root = _images(images)
    out.mkdir(parents=True, exist_ok=True)
    train_paths = list_images(train) if train is not None else paths
    t0 = time.perf_counter()
    feats = _build_extractor(
        cfg, saved=workspace_extractor_path(cfg, out), sample=train_paths, model=model, device=device
    )
    store, names, failed = _extract_into(paths, root, feats.extractor, out / "features.h5", workers)
    timings["extract_s"] = time.perf_counter() - t0
    if not names:
        raise ArgumentError(f"{images}: no image could be read ({len(failed)} failed)")

    t0 = time.perf_counter()
    if add:
        index = Index.load(out / "index.asmkit", mmap=False, gpu=gpu_of(device))
        known = set(index.keys)
        names = [n for n in names if n not in known]
        cb = index.codebook
    else:

        def training() -> list[np.ndarray]:
            if train is None:
                return [feats.descriptors(store.get(n).descriptors) for n in names]
            tstore, tnames, _ = _extract_into(
                train_paths,
                Path(train) if Path(train).is_dir() else Path(train).parent,
                feats.extractor,
                out / "train_features.h5",
                workers,
            )
            with tstore:
                return [feats.descriptors(tstore.get(n).descriptors) for n in tnames]

        cb, _ = _get_codebook(
            cfg,
            given=codebook,
            model_codebook=feats.codebook,
            saved=out / "codebook.asmkit",
            training=training,
            dim=feats.descriptors(store.get(names[0]).descriptors).shape[1],
        )
        index = Index(_on_device(cb, device), cfg.params)
    timings["codebook_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if names:
        vecs, ids = store.stack(names)
        start = int(index.ids.max()) + 1 if len(index) else 0
        index.add(
            _per_image(feats.descriptors(vecs), ids, len(names)),
            np.arange(start, start + len(names), dtype=np.int64),
            keys=names,
            regions=_regions(regions, names, store, whole_image),
        )
        del vecs
        if cfg.verify is None:
            geometry = _add_geometry(out / _GEOMETRY, index, store, names, add, feats.descriptors, index.codebook)
    store.close()
    timings["index_s"] = time.perf_counter() - t0
    manifest = {"config": cfg.to_dict(), "image_root": str(root.resolve())}
    if cfg.verify is not None and verification:
        t0 = time.perf_counter()
        vcfg = _verify_settings(out, cfg, add)
        manifest["verify"] = vcfg.to_dict()
        if names:
            geometry = _verify_geometry(vcfg, out, paths, root, index, names, add, workers, device)
        timings["verify_features_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.save(out / "index.asmkit")
    if names and (cfg.verify is None or verification):
        geometry.save(out / _GEOMETRY)
    _write_json(out / _PIPELINE, manifest)
    timings["index_s"] += time.perf_counter() - t0
    summary = {
        "index": str(out),
        "preset": cfg.name,
        "images": len(index),
        "added": len(names),
        "failed": [{"name": n, "reason": r} for n, r in failed],
        "codebook_size": cb.size,
        "timings": timings,
    }
    logger.info("indexed %d images into %s (%d failed)", len(names), out, len(failed))
    return summary


def _build_hybrid_index(spec: HybridSpec, images, *, out: Path, add: bool, preset: str, **options: Any) -> dict:
    """:func:`build_index` of each member into ``out/<member>``, then the hybrid manifest."""
    summaries = {
        m: build_index(images, out=out / m, preset=m, add=add, verification=i == 0, **options)
        for i, m in enumerate(spec.members)
    }
    _write_json(
        out / _PIPELINE,
        {"hybrid": spec.to_dict(), "preset": preset, "image_root": str(open_workspace(out / spec.members[0])[2])},
    )
    t0 = time.perf_counter()
    if needs_columns(spec.fusion):
        _write_columns(out, spec, model=options.get("model"), device=options.get("device", "cpu"))
    first = summaries[spec.members[0]]
    failed = {f["name"]: f["reason"] for s in summaries.values() for f in s["failed"]}
    timings = {f"{m}.{k}": v for m, s in summaries.items() for k, v in s["timings"].items()}
    for key in ("extract_s", "codebook_s", "index_s"):
        timings[key] = sum(s["timings"][key] for s in summaries.values())
    timings["columns_s"] = time.perf_counter() - t0
    return {
        "index": str(out),
        "preset": preset,
        "hybrid": spec.to_dict(),
        "images": first["images"],
        "added": first["added"],
        "failed": [{"name": n, "reason": r} for n, r in sorted(failed.items())],
        "codebook_size": {m: s["codebook_size"] for m, s in summaries.items()},
        "members": summaries,
        "timings": timings,
    }


def _verify_settings(out: Path, cfg: PipelineConfig, add: bool) -> PipelineConfig:
    """The verification features' config: the workspace's own with ``add``, else the
    preset's (:meth:`PipelineConfig.verify_config`)."""
    if add and "verify" in (manifest := _read_manifest(out)):
        return PipelineConfig.from_dict(manifest["verify"])
    return cfg.verify_config()


def _verify_geometry(vcfg: PipelineConfig, out: Path, paths, root: Path, index: Index, names, add, workers, device):
    """The geometry store of a workspace whose preset verifies with other features
    (``vcfg``): they are extracted into ``out/verify/features.h5`` and quantized with
    their own codebook (``out/verify/codebook.asmkit``, trained on them the first time),
    and the images ``names`` enter the store under their ids in ``index``."""
    folder = out / _VERIFY
    folder.mkdir(parents=True, exist_ok=True)
    feats = _build_extractor(vcfg, saved=workspace_extractor_path(vcfg, folder), sample=paths, device=device)
    store, have, _ = _extract_into(paths, root, feats.extractor, folder / "features.h5", workers)
    with store:
        if not have:
            raise ArgumentError(f"{root}: no image gave {vcfg.name} features for verification")
        cb, _ = _get_codebook(
            vcfg,
            saved=folder / "codebook.asmkit",
            training=lambda: [feats.descriptors(store.get(n).descriptors) for n in have],
            dim=feats.descriptors(store.get(have[0]).descriptors).shape[1],
        )
        usable = set(have)
        missing = [n for n in names if n not in usable]
        if missing:
            logger.warning(
                "%d indexed image(s) have no %s features and cannot be verified: %s",
                len(missing),
                vcfg.name,
                ", ".join(missing[:5]),
            )
        kept = [n for n in names if n in usable]
        return _add_geometry(out / _GEOMETRY, index, store, kept, add, feats.descriptors, cb)


class _RayExtractor:
    """The workers' extractor (picklable): the workspace's, built from what the driver
    learned (``saved``), with descriptors in the codebook's space (whitened per image
    when the preset whitens)."""

    def __init__(self, cfg: PipelineConfig, saved: Path, model, device: str) -> None:
        self.features, self.seed = cfg.features, cfg.params.seed
        self.saved, self.model, self.device = saved, model, device

    def __call__(self):
        feats = build_extractor(self.features, saved=self.saved, model=self.model, device=self.device, seed=self.seed)
        return feats.extractor if feats.whitening is None else _Whitened(feats)


class _Whitened:
    """An extractor whose descriptors go through ``Features.descriptors``."""

    def __init__(self, feats: Features) -> None:
        self._feats = feats
        self.name = feats.extractor.name

    def config(self) -> dict:
        return self._feats.extractor.config()

    def extract(self, image: np.ndarray) -> ImageFeatures:
        feats = self._feats.extractor.extract(image)
        return dataclasses.replace(feats, descriptors=self._feats.descriptors(feats.descriptors))


def _build_index_on_ray(
    images, out: Path, cfg: PipelineConfig, *, codebook, model, device, ray, ray_cpus, ray_sample, shards
) -> dict[str, Any]:
    """``build_index(..., ray=...)``: see there."""
    from .distributed import build_index as build_on_workers
    from .distributed import connect, save_shards

    shards = check_int(shards, "--shards", min=1, none=True)
    paths, root = _images(images)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # What the extractor learns (a whitening) is learned here, as without Ray, and saved
    # in the workspace, where the workers read it.
    saved = workspace_extractor_path(cfg, out)
    feats = _build_extractor(cfg, saved=saved, sample=paths, model=model, device=device)
    cb = None
    if codebook is not None or feats.codebook is not None or (out / "codebook.asmkit").exists():
        cb, _ = _get_codebook(cfg, given=codebook, model_codebook=feats.codebook, saved=out / "codebook.asmkit")

    def train(vecs: np.ndarray) -> Codebook:
        return _get_codebook(cfg, saved=out / "codebook.asmkit", training=lambda: [vecs])[0]

    worker_device = "cpu" if gpu_of(device) is None else "cuda"
    with connect(None if ray == "auto" else ray, num_cpus=ray_cpus):
        build = build_on_workers(
            paths,
            _RayExtractor(cfg, saved, model, worker_device),
            cb,
            cfg.params,
            root=root,
            sample=check_int(ray_sample, "--ray-sample", min=1),
            seed=cfg.params.seed,
            device=worker_device,
            progress=logger.isEnabledFor(logging.INFO),
            train=train,
        )
    timings["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = build.index
    index.save(out / "index.asmkit")
    if shards is not None:
        save_shards(index, out / "index.shards", shards)
    _write_json(out / _PIPELINE, {"config": cfg.to_dict(), "image_root": str(root.resolve())})
    timings["save_s"] = time.perf_counter() - t0
    logger.info("indexed %d images into %s on Ray (%d failed)", len(index), out, len(build.failed))
    return {
        "index": str(out),
        "preset": cfg.name,
        "images": len(index),
        "added": len(index),
        "failed": [{"name": n, "reason": r} for n, r in build.failed],
        "codebook_size": index.codebook.size,
        **({"shards": str(out / "index.shards")} if shards is not None else {}),
        "timings": timings,
    }


#: A hybrid workspace's column statistics (fusions that :func:`asmkit.hybrid.needs_columns`),
#: one array per member.
_COLUMNS = "columns.npz"
#: The ``_version`` of ``columns.npz``: raised when :func:`asmkit.hybrid.column_stats`
#: changes its statistics, so that a query never fuses with statistics of another rule.
_COLUMNS_VERSION = 3


def _fusion_columns(spec: HybridSpec, n: int, sample_rows: Callable[[int, np.ndarray], np.ndarray]) -> list | None:
    """Each member's column statistics (float64 [2, n], :func:`asmkit.hybrid.column_stats`)
    over ``n`` database images when the spec's fusion needs them, else None.
    ``sample_rows(member, positions)`` -> float [S, n]: that member's scores of the images
    at ``positions`` against all ``n``."""
    if not needs_columns(spec.fusion):
        return None
    sample = column_sample(n)
    return [column_stats(sample_rows(i, sample), sample) for i in range(len(spec.members))]


def _write_columns(folder: Path, spec: HybridSpec, *, model, device: str) -> None:
    """``folder/columns.npz``: each member's column statistics over all of its images (its
    index order), from its stored features; written atomically after every build or add."""
    columns = {"_version": np.int64(_COLUMNS_VERSION)}
    for m in spec.members:
        _, feats, idx, _ = _open_for_query(folder / m, model, device)
        sample = column_sample(len(idx))
        rows = idx.similarity_matrix(_stored_descriptors(folder / m, feats, idx.keys_of(idx.ids[sample])))
        columns[m] = column_stats(rows, sample)
    tmp = folder / f".{_COLUMNS}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **columns)
    os.replace(tmp, folder / _COLUMNS)


def hybrid_columns(folder: Path, spec: HybridSpec, sizes: Sequence[int]) -> list | None:
    """A hybrid workspace's column statistics (float64 [2, n_m] per member, in its index
    order; written by ``asmkit index``), checked against the members' index sizes
    ``sizes``; None when the workspace's fusion needs none.

    Raises
    ------
    asmkit.storage.StorageError
        ``columns.npz`` missing, damaged or stale (naming it and the command that rewrites it).
    """
    if not needs_columns(spec.fusion):
        return None
    from ._io import load_npz

    path = folder / _COLUMNS
    rebuild = f"run `asmkit index IMAGES --out {folder} --add` to compute them"
    if not path.is_file():
        raise StorageError(f"{path}: missing (fusion {spec.fusion} needs each member's column statistics); {rebuild}")
    data = load_npz(path, "hybrid column statistics", required=spec.members)
    if int(data.get("_version", 1)) != _COLUMNS_VERSION:
        raise StorageError(f"{path}: column statistics of another asmkit version; {rebuild}")
    for m, n in zip(spec.members, sizes):
        if data[m].shape != (2, n):
            raise StorageError(f"{path}: {m} has shape {data[m].shape}, its index {n} images; {rebuild}")
    return [data[m] for m in spec.members]


def _read_manifest(folder: Path) -> dict:
    from ._io import read_json

    data = read_json(folder / _PIPELINE, f"an asmkit {_PIPELINE}")
    if not isinstance(data, dict):
        raise StorageError(f"{folder / _PIPELINE}: not an asmkit {_PIPELINE} (not a JSON object)")
    return data


def workspace_hybrid(folder: str | os.PathLike) -> HybridSpec | None:
    """The hybrid spec of a workspace that ``asmkit index --preset hybrid`` made, or None for
    a plain workspace (or a folder that is no workspace).

    A hybrid workspace holds one plain workspace per member preset, ``<folder>/<member>/``,
    and a ``pipeline.json`` with ``hybrid`` (members, fusion), ``preset`` and ``image_root``.

    Raises
    ------
    FileNotFoundError
        A member's workspace is missing (naming its ``pipeline.json``).
    asmkit.storage.StorageError
        A ``hybrid`` table that is not a valid one.
    """
    folder = Path(folder)
    if not (folder / _PIPELINE).is_file():
        return None
    manifest = _read_manifest(folder)
    table = manifest.get("hybrid")
    if table is None:
        return None
    try:
        spec = HybridSpec(table["members"], table.get("fusion", "score"))
    except (KeyError, TypeError, AttributeError, ArgumentError) as exc:
        raise StorageError(f"{folder / _PIPELINE}: not a valid hybrid table ({type(exc).__name__}: {exc})") from None
    for m in spec.members:
        if not (folder / m / _PIPELINE).is_file():
            raise FileNotFoundError(
                f"{folder}: hybrid index without its {m} member (missing {folder / m / _PIPELINE}); "
                f"rebuild it with `asmkit index IMAGES --preset {manifest.get('preset', 'hybrid')} "
                f"--out {folder}`"
            )
    return spec


def open_workspace(index: str | os.PathLike) -> tuple[Path, PipelineConfig, Path]:
    """(folder, config, image root) of an index workspace made by ``asmkit index``.

    Raises
    ------
    FileNotFoundError, asmkit.storage.StorageError
        No such folder, or not a workspace (naming it).
    """
    folder = Path(index)
    manifest = folder / _PIPELINE
    if not folder.exists():
        raise FileNotFoundError(f"index not found: {folder}")
    if not folder.is_dir():
        raise StorageError(f"{folder}: not an asmkit index workspace (a file, not a folder)")
    if not manifest.is_file():
        raise StorageError(f"{folder}: not an asmkit index workspace (missing {_PIPELINE})")
    data = _read_manifest(folder)
    if "hybrid" in data:
        raise StorageError(
            f"{folder}: a hybrid index workspace; query it with `asmkit query`, or open one of its member folders"
        )
    try:
        return folder, PipelineConfig.from_dict(data["config"]), Path(data["image_root"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StorageError(f"{manifest}: not an asmkit {_PIPELINE} ({type(exc).__name__}: {exc})") from None


def query_index(
    index: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    *,
    top: int = 10,
    model: str | os.PathLike | None = None,
    device: str = "cpu",
    rerank: int = 0,
    box: Sequence[float] | None = None,
    expand: int = 0,
) -> dict[str, Any]:
    """Query a saved index with image files.

    With ``rerank`` R > 0 the top R of each ranking are re-ranked by spatial verification
    (``asmkit.verify.rerank``, on the workspace's geometry store) before the top ``top``
    are kept; every result then also says its ``inliers`` (-1: not verified). ``expand``
    N > 0 (with ``rerank``) then expands each query with its first N verified images, or
    its first result when none is verified (``asmkit.verify.expand``; one more search per
    expansion image, on its stored features).
    ``box`` (x0, y0, x1, y1 in the pixels of the image as loaded) keeps each query's
    features inside it only.

    A hybrid workspace (:func:`workspace_hybrid`) answers with the members' fused scores,
    the row of ``compute_scores(preset=<its preset>)`` for the query image.

    Returns
    -------
    dict
        ``{"index", "image_root", "results": [{"query", "results": [{"name", "score"}]}],
        "failed": [...]}``, plus ``hybrid`` (members, fusion) for a hybrid workspace.
    """
    rerank = check_int(rerank, "rerank", min=0)
    expand = check_int(expand, "expand", min=0)
    if expand and not rerank:
        raise ArgumentError("--expand: needs --rerank (it expands with verified images)")
    spec = workspace_hybrid(index)
    if spec is not None:
        return _hybrid_query(
            Path(index), spec, images, top=top, model=model, device=device, box=box, rerank=rerank, expand=expand
        )
    folder, feats, idx, root = _open_for_query(index, model, device)
    queries, qfeats, failed = _query_features(images, feats, box)
    out = []
    if queries:
        k = max(top, rerank)
        scores, ids = idx.search([feats.descriptors(f.descriptors) for f in qfeats], k=k)
        turns = query_turns(open_workspace(folder)[1].features)
        if turns:
            scores, ids = _search_turned(idx, feats, [p for p, _ in queries], box, turns, (scores, ids), k)
        inliers = None
        if rerank:
            own = [_database_id(idx, root, Path(p)) for p, _ in queries]

            def rows_of(chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                rows_scores, rows_ids = idx.search(
                    _stored_descriptors(folder, feats, idx.keys_of(chosen)), k=ids.shape[1]
                )
                return rows_ids, rows_scores

            scores, ids, inliers = _rerank_queries(
                folder,
                idx,
                images,
                queries,
                qfeats,
                feats,
                scores,
                ids,
                rerank,
                box=box,
                device=device,
                n_expand=expand,
                own=own,
                rows_of=rows_of,
            )
        for row, ((shown, _), srow, irow) in enumerate(zip(queries, scores[:, :top], ids[:, :top])):
            found = irow >= 0
            hits = [{"name": n, "score": float(s)} for n, s in zip(idx.keys_of(irow[found]), srow[found])]
            if inliers is not None:
                for hit, count in zip(hits, inliers[row]):
                    hit["inliers"] = int(count)
            out.append({"query": shown, "results": hits})
    return {
        "index": str(folder),
        "image_root": str(root),
        "results": out,
        "failed": [{"name": n, "reason": r} for n, r in failed],
    }


def _no_query_turns(cfg: PipelineConfig) -> None:
    """All-vs-all scores take every image as a query: with ``query_rotations`` that would be
    every image extracted at each rotation, the cost the setting avoids. Refused, naming
    the preset that does it on both sides."""
    if query_turns(cfg.features):
        raise ArgumentError(
            f"preset {cfg.name}: query_rotations searches queries at several rotations; all-vs-all scores "
            "and pairs take every image as a query, so use a preset that extracts every image at each "
            "rotation (deep_rot)"
        )


def _search_turned(idx: Index, feats: Features, paths: Sequence[str], box, turns, upright, k: int):
    """``upright`` (scores float32 [Q, k], ids int64 [Q, k] of the query images ``paths``)
    merged with their searches at each rotation of ``turns``: every database image keeps
    its best score over the rotations (``[features] query_rotations``)."""
    from .search import merge_topk

    results = [upright]
    for rotation in turns:
        turned = Features(feats.extractor.turned(rotation), feats.whitening, feats.codebook)
        _, tfeats, _ = _query_features(paths, turned, box)
        results.append(idx.search([feats.descriptors(f.descriptors) for f in tfeats], k=k))
    return merge_topk(results, k, best_of=True)


def _open_for_query(index, model, device: str) -> tuple[Path, Features, Index, Path]:
    """(folder, extractor, memory-mapped index, image root) of a plain workspace."""
    folder, cfg, root = open_workspace(index)
    feats = _build_extractor(cfg, saved=workspace_extractor_path(cfg, folder), model=model, device=device)
    return folder, feats, Index.load(folder / "index.asmkit", mmap=True, gpu=gpu_of(device)), root


def _query_features(images: Sequence, feats: Features, box) -> tuple[list[tuple[str, str]], list[ImageFeatures], list]:
    """The query images' features: ``(shown path, name)`` and features of each image read
    (inside ``box`` when given), and the failed (name, reason) pairs."""
    paths = [Path(p) for p in images]
    if not paths:
        raise ArgumentError("images: no query image given")
    common = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    names = image_names([p.resolve() for p in paths], common)
    result = extract_features([p.resolve() for p in paths], feats.extractor, root=common, progress=False, keep=True)
    queries = [(str(p), n) for p, n in zip(paths, names) if n in result.features]
    qfeats = [result.features[n] for _, n in queries]
    if box is not None:
        qfeats = [_in_query_box(f, box) for f in qfeats]
    return queries, qfeats, list(result.failed)


def common_names(member_names: Sequence[Sequence[str]]) -> tuple[list[str], list[np.ndarray]]:
    """The names every hybrid member holds, in the first member's order, and each member's
    positions of them (int64 [n]: its rows and columns of those images); what a hybrid's
    scores are fused over."""
    both = set.intersection(*(set(names) for names in member_names))
    names = [n for n in member_names[0] if n in both]
    positions = []
    for member in member_names:
        position = {n: i for i, n in enumerate(member)}
        positions.append(np.array([position[n] for n in names], np.int64))
    return names, positions


def _hybrid_query(
    folder: Path, spec: HybridSpec, images, *, top: int, model, device: str, box, rerank: int = 0, expand: int = 0
) -> dict[str, Any]:
    """:func:`query_index` of a hybrid workspace: each member scores the queries against
    all of its images, the rows are fused (:func:`asmkit.hybrid.fuse`, as ``scores`` fuses
    them) over the images every member holds, and the top ``top`` of the fused row kept.
    ``rerank`` verifies the fused top R with the first member's geometry store (its
    verification features); ``expand`` then searches each expansion image's stored
    features in every member and fuses those rows too."""
    rows, keys, shown, failed, root = [], [], {}, {}, None
    opened, first_queries = [], {}
    for m in spec.members:
        _, feats, idx, member_root = _open_for_query(folder / m, model, device)
        opened.append((feats, idx))
        root = root or member_root
        queries, qfeats, member_failed = _query_features(images, feats, box)
        if not first_queries:
            first_queries = {n: (p, f) for (p, n), f in zip(queries, qfeats)}
        failed.update(member_failed)
        matrix = idx.similarity_matrix([feats.descriptors(f.descriptors) for f in qfeats]) if queries else None
        rows.append({n: matrix[i] for i, (_, n) in enumerate(queries)})
        keys.append(idx.keys)
        shown.update((n, s) for s, n in queries)
    names, columns = common_names(keys)
    stats = hybrid_columns(folder, spec, [len(idx) for _, idx in opened])
    if stats is not None:
        stats = [st[:, c] for st, c in zip(stats, columns)]
    answered = [n for n in rows[0] if all(n in r for r in rows)]
    out = []
    if answered and names:
        fused = fuse([np.stack([r[n][c] for n in answered]) for r, c in zip(rows, columns)], spec.fusion, stats)
        # Stable sort: exact ties keep the index's order, as a plain query does.
        order = np.argsort(-fused, axis=1, kind="stable")[:, : max(top, rerank)]
        scores, inliers = np.take_along_axis(fused, order, 1), None
        if rerank:
            feats0, idx0 = opened[0]
            # The first member's ids: its geometry store's.
            id_of = idx0.ids[columns[0]]
            position = {int(i): c for c, i in enumerate(id_of)}

            def rows_of(chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                chosen_names = [names[position[int(i)]] for i in chosen]
                member_rows = []
                for m, (feats, idx), c in zip(spec.members, opened, columns):
                    member_rows.append(
                        idx.similarity_matrix(_stored_descriptors(folder / m, feats, chosen_names))[:, c]
                    )
                grown = fuse(member_rows, spec.fusion, stats)
                return np.broadcast_to(id_of, grown.shape), grown

            q_paths = [first_queries[n][0] for n in answered]
            scores, ids, inliers = _rerank_queries(
                folder / spec.members[0],
                idx0,
                q_paths,
                [(first_queries[n][0], n) for n in answered],
                [first_queries[n][1] for n in answered],
                feats0,
                scores,
                id_of[order],
                rerank,
                box=box,
                device=device,
                n_expand=expand,
                own=[_database_id(idx0, root, Path(p)) for p in q_paths],
                rows_of=rows_of,
            )
            order = np.vectorize(lambda i: position.get(int(i), -1), otypes=[np.int64])(ids)
        for row, (n, srow, irow) in enumerate(zip(answered, scores[:, :top], order[:, :top])):
            hits = [{"name": names[i], "score": float(v)} for i, v in zip(irow, srow) if i >= 0]
            if inliers is not None:
                for hit, count in zip(hits, inliers[row]):
                    hit["inliers"] = int(count)
            out.append({"query": shown[n], "results": hits})
    return {
        "index": str(folder),
        "image_root": str(root),
        "hybrid": spec.to_dict(),
        "results": out,
        "failed": [{"name": n, "reason": r} for n, r in sorted(failed.items())],
    }


def _database_id(idx: Index, root: Path, path: Path) -> int:
    """The index id of the image file ``path`` when the index holds it (-1 otherwise)."""
    try:
        return idx.id_of(path.resolve().relative_to(root.resolve()).as_posix())
    except (KeyError, ValueError):
        return -1


def _stored_descriptors(folder: Path, feats: Features, names: Sequence[str]) -> list[np.ndarray]:
    """The descriptors (codebook space) of indexed images, by name, from the workspace's
    feature store."""
    with FeatureStore(folder / "features.h5", None) as store:
        return [feats.descriptors(store.get(n).descriptors) for n in names]


def _rerank_queries(
    folder: Path,
    idx: Index,
    images,
    queries,
    qfeats,
    feats,
    scores,
    ids,
    top: int,
    *,
    box,
    device,
    n_expand,
    own,
    rows_of,
):
    """``(scores, ids, inliers)`` after re-ranking the top ``top`` by spatial verification
    and, with ``n_expand`` N > 0, query expansion with N verified images (``own``: each
    query's own index id, -1 if none; a query never expands with itself; ``rows_of(ids)``
    the expansion images' ``(ids, scores)`` rows).

    The geometry store is the workspace's; the query side comes from the same features:
    ``qfeats`` (extracted with ``feats``, words in ``idx``'s codebook), or, in a workspace
    that verifies with other features (``verify`` in its ``pipeline.json``), those
    extracted from ``images`` again with that extractor and quantized with its codebook.
    """
    from .geometry import GeometryStore, feature_words
    from .verify import VerifyOptions, expand, rerank

    path = folder / _GEOMETRY
    if not path.is_dir():
        raise FileNotFoundError(f"--rerank: the index has no geometry store ({path}); rebuild it with `asmkit index`")
    geometry = GeometryStore.load(path, mmap=True, verify=False)
    codebook, describe = idx.codebook, feats.descriptors
    table = _read_manifest(folder).get("verify")
    if table is not None:
        vcfg = PipelineConfig.from_dict(table)
        vfeats = _build_extractor(vcfg, saved=workspace_extractor_path(vcfg, folder / _VERIFY), device=device)
        codebook, describe = Codebook.load(folder / _VERIFY / "codebook.asmkit"), vfeats.descriptors
        verified, extra, _ = _query_features(images, vfeats, box)
        by_name = {n: f for (_, n), f in zip(verified, extra)}
        qfeats = [by_name.get(n) for _, n in queries]
    options = VerifyOptions()
    kp = [None if f is None else f.keypoints for f in qfeats]
    words, sigs = feature_words(
        codebook,
        [
            describe(f.descriptors) if k is not None else np.zeros((0, codebook.dim), np.float32)
            for f, k in zip(qfeats, kp)
        ],
        m=options.query_m,
    )
    out = rerank(geometry, kp, words, ids, scores, query_signatures=sigs, top=top, options=options)
    if n_expand:
        out = expand(out, rows_of, n_expand, min_inliers=options.min_inliers, exclude=own)
    return out.scores, out.ids, out.inliers


# ------------------------------------------------------------------------------ scores / pairs


def compute_scores(
    images: str | os.PathLike,
    *,
    out: str | os.PathLike,
    top: int | None = None,
    preset: str = "sift",
    config: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    codebook: str | os.PathLike | None = None,
    codebook_size: int | str | None = None,
    cache: str | os.PathLike | None = None,
    workers: int | None = None,
    chunk: int = 256,
    device: str = "cpu",
    regions: str | os.PathLike | None = None,
    whole_image: bool = True,
    ray: str | None = None,
    ray_cpus: int | None = None,
) -> dict[str, Any]:
    """The all-vs-all similarities of an image set (row = query, list order).

    Without ``top``: the dense N x N matrix, ``out`` (float32 ``.npy``) and
    ``<out>.names.txt`` (one image name per line, the matrix order). With ``top=K``: each
    row's K best other images, ``out`` an ``.npz`` (see :meth:`asmkit.pairs.SparseScores.save`),
    computed ``chunk`` query images at a time against an index, in O(N K) memory beyond
    the index. Images that cannot be read are left out and reported.

    ``ray`` (``"auto"`` for a local cluster of ``ray_cpus`` CPUs, or ``host:port``) scores
    the query blocks as Ray tasks (:func:`score_blocks`); features and codebook are
    computed here as without it. The scores are those of a single process, bit for bit.

    ``regions`` ("grid", "proposals" or a box file) aggregates the database side by R-ASMK(*)
    (with the whole image too unless ``whole_image`` is False). Not with ``top`` or ``ray``.

    A hybrid preset writes each member's dense matrix beside ``out`` and their fusion to
    ``out``; with ``top`` the members are scored in row blocks, fused block by block.
    """
    spec = hybrid_spec(preset)
    if spec is not None:
        _check_hybrid_options(
            preset,
            config=config,
            codebook=codebook,
            codebook_size=codebook_size,
            cache=cache,
            regions=regions,
            ray=ray,
        )
        if top is None:
            return _hybrid_scores(spec, images, out=Path(out), model=model, workers=workers, chunk=chunk, device=device)
    out = Path(out)
    if top is not None:
        top = check_int(top, "--top", min=1)
        if regions is not None:
            raise ArgumentError("--top: not with --regions (regions score through the dense matrix)")
        if out.suffix != ".npz":
            raise ArgumentError(f"--out: sparse scores (--top) go to an .npz file, got {out}")
        sparse, names, _, failed, timings = _sparse_scores(
            images,
            top,
            preset=preset,
            config=config,
            model=model,
            codebook=codebook,
            codebook_size=codebook_size,
            cache=cache,
            workers=workers,
            chunk=chunk,
            device=device,
            ray=ray,
            ray_cpus=ray_cpus,
        )
        sparse.save(out, names)
        return {
            "scores": str(out),
            "names": str(out),
            "images": len(names),
            "top": sparse.k,
            "failed": [{"name": n, "reason": r} for n, r in failed],
            "timings": timings,
        }
    if out.suffix == ".npz":
        raise ArgumentError(f"--out: {out} is an .npz, which holds sparse scores: give --top K, or an .npy")
    from .search import similarity_matrix

    cfg = load_config(preset, config, codebook_size=codebook_size)
    _no_query_turns(cfg)
    paths, root = _images(images)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    feats, store, names, failed, folder = _features_for(
        paths, root, cfg, model, workers, Path(cache) if cache else None, device
    )
    timings["extract_s"] = time.perf_counter() - t0
    if not names:
        raise ArgumentError(f"{images}: no image could be read ({len(failed)} failed)")
    vecs, ids = store.stack(names)
    image_regions = _regions(regions, names, store, whole_image)
    store.close()
    vecs = feats.descriptors(vecs)
    t0 = time.perf_counter()
    cb, _ = _get_codebook(
        cfg,
        given=codebook,
        model_codebook=feats.codebook,
        saved=_scores_codebook(folder, cfg, [root / n for n in names], paths),
        training=lambda: [vecs],
        dim=vecs.shape[1],
    )
    timings["codebook_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cb = _on_device(cb, device)
    per_image = _per_image(vecs, ids, len(names))
    if ray is None:
        matrix = similarity_matrix(cb, per_image, None, cfg.params, chunk=chunk, regions=image_regions)
    else:
        if image_regions is not None:
            raise ArgumentError("--ray: not with --regions")
        index = Index(cb, cfg.params)
        index.add(per_image)
        matrix = _dense_from_blocks(
            score_blocks(
                index,
                lambda rows: [per_image[i] for i in rows],
                len(names),
                chunk=chunk,
                ray=ray,
                ray_cpus=ray_cpus,
            ),
            len(names),
            len(names),
        )
    timings["scores_s"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, matrix.astype(np.float32, copy=False))
    os.replace(tmp, out)
    names_path = write_text_atomic(out.with_name(out.name + ".names.txt"), "".join(n + "\n" for n in names))
    return {
        "scores": str(out),
        "names": str(names_path),
        "images": len(names),
        "features": str(store.path),
        "image_root": str(root),
        "failed": [{"name": n, "reason": r} for n, r in failed],
        "timings": timings,
    }


def _hybrid_scores(spec: HybridSpec, images, *, out: Path, **options: Any) -> dict[str, Any]:
    """:func:`compute_scores` of each member (``<out stem>.<member>.npy`` beside ``out``), fused
    over the images every member could read. ``features`` is the first member's feature store
    (what ``pairs --verify`` verifies on)."""
    from ._io import load_npy, read_lines

    members = []
    for name in spec.members:
        path = out.with_name(f"{out.stem}.{name}.npy")
        summary = compute_scores(images, out=path, preset=name, **options)
        members.append((load_npy(path, "a scores matrix"), read_lines(summary["names"], "a names file"), summary))
    names, keep = common_names([member_names for _, member_names, _ in members])
    t0 = time.perf_counter()
    matrices = [matrix[np.ix_(k, k)] for (matrix, _, _), k in zip(members, keep)]
    fused = fuse(matrices, spec.fusion, _fusion_columns(spec, len(names), lambda i, sample: matrices[i][sample]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, fused)
    os.replace(tmp, out)
    names_path = write_text_atomic(out.with_name(out.name + ".names.txt"), "".join(n + "\n" for n in names))
    failed = {f["name"]: f["reason"] for _, _, summary in members for f in summary["failed"]}
    timings = {
        f"{m}.{k}": v for m, (_, _, summary) in zip(spec.members, members) for k, v in summary["timings"].items()
    }
    timings["fusion_s"] = time.perf_counter() - t0
    return {
        "scores": str(out),
        "names": str(names_path),
        "images": len(names),
        "hybrid": spec.to_dict(),
        "members": {m: summary["scores"] for m, (_, _, summary) in zip(spec.members, members)},
        "features": members[0][2]["features"],
        "image_root": members[0][2]["image_root"],
        "failed": [{"name": n, "reason": r} for n, r in sorted(failed.items())],
        "timings": timings,
    }


def _scores_codebook(folder: Path, cfg: PipelineConfig, trained_on: Sequence[Path], paths: Sequence[Path]) -> Path:
    """Where ``scores`` and ``pairs`` keep the codebook trained on ``trained_on``, beside the
    cached features: a rerun (dense or sparse, with or without Ray) skips k-means."""
    return folder / "codebook-scores-{}.asmkit".format(
        _digest(
            {
                "images": _image_set_key(trained_on),
                "features": database_options(cfg.features),
                "whitening": _whitening_key(cfg, _image_set_key(paths)),
                "params": cfg.params.to_dict(),
                "chosen": cfg.codebook_size_chosen,
                "train_points_per_word": TRAIN_POINTS_PER_WORD,
                "kmeans_pruned": KMEANS_PRUNED,
            }
        )
    )


def index_topk(
    index: Index,
    descriptors: Callable[[range], list[np.ndarray]],
    top: int,
    *,
    chunk: int = 256,
    ray: str | None = None,
    ray_cpus: int | None = None,
) -> SparseScores:
    """Each indexed image's ``top`` best other images, its own descriptors as the query.

    Parameters
    ----------
    index : Index
        Its images are the queries too; rows and columns follow its ``ids`` order.
    descriptors : callable
        ``descriptors(range(b, e))`` -> list of float32 ``[n_i, D]``: the descriptors of
        the images at those positions of ``index.ids``.
    top, chunk : int
        Neighbours kept per image; query images scored per block (the block's dense
        ``[chunk, N]`` float32 scores are the only N-wide array).
    ray, ray_cpus
        Score the blocks as tasks on this Ray cluster (see :func:`score_blocks`).

    Returns
    -------
    SparseScores
        Identical to ``SparseScores.from_dense`` of the dense all-vs-all matrix.
    """
    return SparseScores.from_blocks(
        score_blocks(index, descriptors, len(index), chunk=chunk, ray=ray, ray_cpus=ray_cpus), len(index), top
    )


def _score_block(index: Index, vecs: list[np.ndarray]) -> np.ndarray:
    return index.similarity_matrix(vecs)


def score_blocks(
    index: Index,
    descriptors: Callable[[range], list[np.ndarray]],
    n: int,
    *,
    chunk: int = 256,
    ray: str | None = None,
    ray_cpus: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Dense scores of query images ``0 .. n - 1`` against ``index``, block by block.

    Parameters
    ----------
    index : Index
    descriptors : callable
        ``descriptors(range(b, e))`` -> list of float32 ``[n_i, D]``, the query images.
    n, chunk : int
        Query images, and query images per block.
    ray : str, optional
        Score the blocks as Ray tasks (``asmkit.distributed.connect``: ``"auto"`` starts a
        local cluster, ``host:port`` joins one); the index goes to the object store once,
        and a few blocks per CPU are in flight at a time.
    ray_cpus : int, optional
        CPUs of a local cluster.

    Yields
    ------
    (int, float32 [b, len(index)])
        First query row and the block's scores (``Index.similarity_matrix``), in order:
        the same with or without Ray.
    """
    begins = range(0, n, chunk)
    if ray is None:
        for begin in begins:
            yield begin, _score_block(index, descriptors(range(begin, min(begin + chunk, n))))
        return
    from .distributed import connect, remote_task, require_ray

    with connect(None if ray == "auto" else ray, num_cpus=ray_cpus) as conn:
        ray_module = require_ray()
        task = remote_task(_score_block, num_cpus=1)
        shared = ray_module.put(index)
        # A bounded window of blocks in flight: their descriptors are the memory cost.
        window = 2 * max(1, int(conn.resources().get("CPU", 1)))
        pending: list[tuple[int, Any]] = []
        for begin in begins:
            pending.append((begin, task.remote(shared, descriptors(range(begin, min(begin + chunk, n))))))
            if len(pending) >= window:
                first, ref = pending.pop(0)
                yield first, ray_module.get(ref)
        for first, ref in pending:
            yield first, ray_module.get(ref)


def _dense_from_blocks(blocks: Iterator[tuple[int, np.ndarray]], n_rows: int, n_cols: int) -> np.ndarray:
    out = np.empty((n_rows, n_cols), dtype=np.float32)
    for begin, block in blocks:
        out[begin : begin + len(block)] = block
    return out


def anchor_scorer(index: Index, descriptors: Callable[[range], list[np.ndarray]]) -> Callable[[int], np.ndarray]:
    """``row(i)`` -> float32 [N]: image ``i`` (a position of ``index.ids``) queried against
    the index; what farthest-point sampling of anchors asks for, one anchor at a time."""
    return lambda i: index.similarity_matrix(descriptors(range(i, i + 1)))[0]


def _store_descriptors(feats: Features, store: FeatureStore, names: Sequence[str]):
    return lambda rows: [feats.descriptors(store.get(names[i]).descriptors) for i in rows]


#: Images added to an index per call when scores are computed sparsely.
_ADD_BLOCK = 2048


def _sparse_scores(
    images,
    top: int,
    *,
    preset="sift",
    config=None,
    model=None,
    codebook=None,
    codebook_size=None,
    cache=None,
    workers=None,
    chunk=256,
    device="cpu",
    ray=None,
    ray_cpus=None,
):
    """Top-k scores of an image set, or of an index workspace's images, with no N x N array.

    Returns the SparseScores, the names (matrix order), the anchor scorer, the failed
    files and the timings.
    """
    options = dict(model=model, workers=workers, device=device)
    workspace = (Path(images) / _PIPELINE).is_file()
    spec = workspace_hybrid(images) if workspace else hybrid_spec(preset)
    if spec is None:
        index, descriptors, names, failed, timings = _scored_index(
            images, preset=preset, config=config, codebook=codebook, codebook_size=codebook_size, cache=cache, **options
        )
        t0 = time.perf_counter()
        sparse = index_topk(index, descriptors, top, chunk=chunk, ray=ray, ray_cpus=ray_cpus)
        timings["scores_s"] = time.perf_counter() - t0
        return sparse, names, anchor_scorer(index, descriptors), failed, timings
    _check_hybrid_options(preset, config=config, codebook=codebook, codebook_size=codebook_size, cache=cache, ray=ray)
    members = [_scored_index(Path(images) / m if workspace else images, preset=m, **options) for m in spec.members]
    # Each member's positions of the common names: its rows (queries) and columns alike.
    names, where = common_names([member[2] for member in members])
    t0 = time.perf_counter()

    def member_rows(i: int, rows: Sequence[int]) -> np.ndarray:
        index, describe, *_ = members[i]
        return index.similarity_matrix(describe([int(where[i][r]) for r in rows]))[:, where[i]]

    columns = _fusion_columns(spec, len(names), member_rows)

    def fused_blocks() -> Iterator[tuple[int, np.ndarray]]:
        streams = [
            score_blocks(
                index,
                lambda rows, d=describe, w=w: d([int(w[i]) for i in rows]),
                len(names),
                chunk=chunk,
                ray=ray,
                ray_cpus=ray_cpus,
            )
            for (index, describe, *_), w in zip(members, where)
        ]
        # Fusion works row by row, so fusing blocks gives the rows of the fused dense matrix.
        for blocks in zip(*streams):
            yield blocks[0][0], fuse([b[:, w] for (_, b), w in zip(blocks, where)], spec.fusion, columns)

    def anchor_row(i: int) -> np.ndarray:
        return fuse([member_rows(m, [i]) for m in range(len(members))], spec.fusion, columns)[0]

    sparse = SparseScores.from_blocks(fused_blocks(), len(names), top)
    failed = sorted({tuple(f) for member in members for f in member[3]})
    timings = {f"{m}.{k}": v for m, member in zip(spec.members, members) for k, v in member[4].items()}
    timings["scores_s"] = time.perf_counter() - t0
    return sparse, names, anchor_row, failed, timings


def _scored_index(
    images, *, preset, model, workers, device, config=None, codebook=None, codebook_size=None, cache=None
) -> tuple[Index, Callable[[Sequence[int]], list[np.ndarray]], list[str], list, dict[str, float]]:
    """The index that :func:`_sparse_scores` scores its images against: a workspace's, or
    one built of an image set's cached features. Returns the index, ``descriptors(rows)``
    of the images at those positions of ``names``, the names (the index's order), the
    failed files and the timings."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if (Path(images) / _PIPELINE).is_file():
        folder, cfg, _ = open_workspace(images)
        _no_query_turns(cfg)
        feats = _build_extractor(cfg, saved=workspace_extractor_path(cfg, folder), model=model, device=device)
        index = Index.load(folder / "index.asmkit", mmap=True, gpu=gpu_of(device))
        names, failed = index.keys, []
        store = FeatureStore(folder / "features.h5", None)
        timings["extract_s"] = time.perf_counter() - t0
        descriptors = _store_descriptors(feats, store, names)
    else:
        cfg = load_config(preset, config, codebook_size=codebook_size)
        _no_query_turns(cfg)
        paths, root = _images(images)
        feats, store, names, failed, folder = _features_for(
            paths, root, cfg, model, workers, Path(cache) if cache else None, device
        )
        timings["extract_s"] = time.perf_counter() - t0
        if not names:
            raise ArgumentError(f"{images}: no image could be read ({len(failed)} failed)")
        descriptors = _store_descriptors(feats, store, names)
        t0 = time.perf_counter()
        cb, _ = _get_codebook(
            cfg,
            given=codebook,
            model_codebook=feats.codebook,
            saved=_scores_codebook(folder, cfg, [root / n for n in names], paths),
            training=lambda: descriptors(range(len(names))),
            dim=descriptors(range(1))[0].shape[1],
        )
        timings["codebook_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = Index(_on_device(cb, device), cfg.params)
        # Added in blocks: only one block's descriptors are in memory at a time.
        for begin in range(0, len(names), _ADD_BLOCK):
            rows = range(begin, min(begin + _ADD_BLOCK, len(names)))
            index.add(descriptors(rows), np.asarray(rows, dtype=np.int64))
        timings["index_s"] = time.perf_counter() - t0
    return index, descriptors, names, failed, timings


def make_pairs(
    images: str | os.PathLike | None = None,
    *,
    out: str | os.PathLike,
    graph: str | None = None,
    top: int = 20,
    scores: str | os.PathLike | None = None,
    verify: bool = False,
    min_inliers: int = 15,
    colmap_db: str | os.PathLike | None = None,
    **score_options: Any,
) -> dict[str, Any]:
    """Image pairs for SfM (``name_a name_b`` per line) from retrieval scores.

    ``images`` is an image folder / list file or an index workspace (from ``asmkit
    index``); its scores are computed sparsely (each image's K best, the graph's K, and
    the anchors' rows as they are chosen), never as an N x N array, with
    ``score_options`` (see :func:`compute_scores`), and saved beside ``out`` as
    ``<out stem>.scores.npz``. Or ``scores``: a dense ``.npy`` from :func:`compute_scores`
    (its names file beside it) or a sparse ``.npz`` from ``compute_scores(top=K)``; from
    a sparse file alone, ``retrieval`` anchors see only the kept scores (0 elsewhere).
    ``graph`` defaults to ``knn-<top>``.

    With ``verify`` (images only; the dense matrix is computed then) every pair is verified geometrically
    (``asmkit.verify.verify_pairs``: mutual nearest neighbours, a fundamental matrix), on
    the preset's verification features (the deep presets: SIFT):
    ``out`` keeps the pairs with at least ``min_inliers`` inliers and
    ``<out>.inliers.txt`` lists every pair with its inliers. ``colmap_db`` (implies
    ``verify``; extra ``[sfm]``) also writes keypoints, matches and two-view geometries
    into a COLMAP database for pycolmap's mapper (``asmkit.colmap``).
    """
    from .pairs import pairs_from_scores, parse_graph, write_pairs

    graph = graph or f"knn-{top}"
    spec = parse_graph(graph)
    anchor_row = None
    verify = verify or colmap_db is not None
    if verify and images is None:
        raise ArgumentError("--verify: give IMAGES (pairs are verified on their features), not --scores alone")
    computed = None
    out_path = Path(out)
    if scores is None and images is None:
        raise ArgumentError("images: give an image folder / list, an index, or --scores")
    # Verification reads the feature store that the dense run reports, and regions
    # score through the dense all-vs-all path.
    dense = verify or score_options.get("regions") is not None
    if scores is None and not dense:
        options = {key: value for key, value in score_options.items() if key not in ("regions", "whole_image")}
        matrix, names, anchor_row, _, _ = _sparse_scores(images, max(spec.k, 1), **options)
        matrix.save(out_path.with_name(out_path.stem + ".scores.npz"), names)
    else:
        if scores is None:
            scores = out_path.with_name(out_path.stem + ".scores.npy")
            computed = compute_scores(images, out=scores, **score_options)
        scores = Path(scores)
        if not scores.is_file():
            raise FileNotFoundError(f"--scores: file not found: {scores}")
        if scores.suffix == ".npz":
            matrix, names = SparseScores.load(scores)
        else:
            names_path = scores.with_name(scores.name + ".names.txt")
            if not names_path.is_file():
                raise FileNotFoundError(f"--scores: names file not found: {names_path}")
            from ._io import load_npy, read_lines

            names = read_lines(names_path, "a names file")
            matrix = load_npy(scores, "a scores matrix")
    pairs = pairs_from_scores(matrix, names, spec, anchor_row=anchor_row)
    summary = {"pairs": str(out), "n_pairs": len(pairs), "graph": str(spec), "images": len(names)}
    if verify:
        computed = {**computed, "features": _pair_features(images, computed, score_options)}
        pairs = _verify_pairs(pairs, computed, out, min_inliers, colmap_db, summary)
    write_pairs(out, pairs)
    return summary


def _pair_features(images, computed: dict, score_options: dict) -> str:
    """The feature store that verifies pairs: the scores' own, or, for a preset that
    verifies with other features (a hybrid: its first member's), those of the images
    (extracted or cached)."""
    preset = score_options.get("preset", "sift")
    spec = hybrid_spec(preset)
    cfg = load_config(spec.members[0]) if spec is not None else load_config(preset, score_options.get("config"))
    vcfg = cfg.verify_config()
    if vcfg is None:
        return computed["features"]
    paths, root = _images(images)
    _, store, _, _, _ = _features_for(
        paths, root, vcfg, None, score_options.get("workers"), None, score_options.get("device", "cpu")
    )
    store.close()
    return str(store.path)


def _verify_pairs(pairs, computed: dict, out, min_inliers: int, colmap_db, summary: dict) -> list[tuple[str, str]]:
    """The pairs with at least ``min_inliers`` inliers; writes ``<out>.inliers.txt`` and the
    COLMAP database, and adds their counts to ``summary``."""
    from .verify import VerifyOptions, verify_pairs

    options = VerifyOptions(model="fundamental", threshold=4.0, min_inliers=min_inliers)
    t0 = time.perf_counter()
    with FeatureStore(computed["features"], None) as store:
        geometries = verify_pairs(pairs, store, options=options)
        keypoints = {n: store.get(n).keypoints for n in sorted({n for p in pairs for n in p})}
    kept = [(g.name_a, g.name_b) for g in geometries if g.inliers >= min_inliers]
    out = Path(out)
    inliers_path = write_text_atomic(
        out.with_name(out.name + ".inliers.txt"), "".join(f"{g.name_a} {g.name_b} {g.inliers}\n" for g in geometries)
    )
    summary.update(
        n_pairs=len(kept),
        n_tested=len(pairs),
        min_inliers=min_inliers,
        inliers=str(inliers_path),
        verify_s=time.perf_counter() - t0,
    )
    if colmap_db is not None:
        from .colmap import write_database

        if any(k is None for k in keypoints.values()):
            raise ArgumentError("--colmap-db: the features have no keypoints")
        summary["colmap"] = write_database(
            colmap_db, computed["image_root"], keypoints, geometries, min_inliers=min_inliers
        )
    return kept


# ------------------------------------------------------------------------------ evaluation


def evaluate_dataset(
    data: str | os.PathLike,
    *,
    preset: str = "sift",
    config: str | os.PathLike | None = None,
    codebook: str | os.PathLike | None = None,
    codebook_size: int | str | None = None,
    model: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    workers: int | None = None,
    report: str | os.PathLike | None = None,
    top: int = 10,
    device: str = "cpu",
    rerank: int = 0,
    regions: str | os.PathLike | None = None,
    whole_image: bool = True,
    ray: str | None = None,
    ray_cpus: int | None = None,
    expand: int = 0,
) -> dict[str, Any]:
    """mAP (and N-S, E/M/H when the ground truth has them) of a preset on a data set.

    ``regions`` ("grid", "proposals" or a box file naming images relative to the data-set
    root) aggregates the database images by R-ASMK(*) (with the whole image too unless
    ``whole_image`` is False).

    The codebook is trained on the evaluated database images' descriptors unless
    ``codebook`` is given; the result says which (``codebook_trained_on``). With
    ``rerank`` R > 0 the top R of every ranking are re-ranked by spatial verification
    (``asmkit.verify``): the metrics are then those after re-ranking, ``before_rerank``
    holds those before, and ``rerank`` the settings and the verification time. ``expand``
    N > 0 (with ``rerank``) then expands each query (``asmkit.verify.expand``); ``rerank``
    then also holds the metrics before expansion (``before_expansion``) and its time.
    ``ray``,
    ``ray_cpus``: score the queries on a Ray cluster (see :func:`compute_scores`).
    """
    from .evaluate import evaluate, load_ground_truth

    gt = load_ground_truth(data)
    if check_int(expand, "expand", min=0) and not rerank:
        raise ArgumentError("--expand: needs --rerank (it expands with verified images)")
    spec = hybrid_spec(preset)
    if spec is None:
        cfgs = [load_config(preset, config, codebook_size=codebook_size)]
    else:
        _check_hybrid_options(
            preset,
            config=config,
            codebook=codebook,
            codebook_size=codebook_size,
            regions=regions,
        )
        cfgs = [load_config(m) for m in spec.members]
    parts = [
        _dataset_matrix(
            gt,
            cfg,
            data=data,
            codebook=codebook,
            model=model,
            cache=cache,
            workers=workers,
            device=device,
            regions=regions,
            whole_image=whole_image,
            ray=ray,
            ray_cpus=ray_cpus,
        )
        for cfg in cfgs
    ]
    if spec is None:
        matrix, trained_on, failed, timings = parts[0].matrix, parts[0].trained_on, parts[0].failed, parts[0].timings
        cfg = cfgs[0]
        params: Any = cfg.params.to_dict()

        def rows_of(images: np.ndarray) -> np.ndarray:
            return parts[0].rows_of(images)
    else:
        cfg = load_config(preset)
        t0 = time.perf_counter()
        columns = _fusion_columns(spec, len(gt.images), lambda i, sample: parts[i].rows_of(sample))
        matrix = fuse([p.matrix for p in parts], spec.fusion, columns)
        trained_on = {c.name: p.trained_on for c, p in zip(cfgs, parts)}
        failed = sorted({f for p in parts for f in p.failed})
        timings = {f"{c.name}.{k}": v for c, p in zip(cfgs, parts) for k, v in p.timings.items()}
        timings["fusion_s"] = time.perf_counter() - t0

        def rows_of(images: np.ndarray) -> np.ndarray:
            # Every fusion works on each row alone: fused rows are rows of the fused matrix.
            if gt.queries == gt.images:
                return matrix[images]
            return fuse([p.rows_of(images) for p in parts], spec.fusion, columns)

        params = {"hybrid": spec.to_dict(), **{c.name: c.params.to_dict() for c in cfgs}}
    # Stable sort: exact ties keep database order, so results are reproducible.
    ranks = np.argsort(-matrix, axis=1, kind="stable")
    before_rerank = rerank_info = None
    if check_int(rerank, "rerank", min=0):
        before_rerank = evaluate(ranks, gt)
        # A hybrid verifies with its first member's verification features.
        first = cfgs[0]
        vcfg = first.verify_config() or first
        if vcfg is first:
            verifying = parts[0]
        else:
            verifying = _dataset_features(
                gt, vcfg, data=data, codebook=None, model=None, cache=None, workers=workers, device=device
            )
            timings["verify_features_s"] = verifying.timings["extract_s"] + verifying.timings["codebook_s"]
        try:
            ranks, rerank_info = _rerank_ranks(verifying, gt, matrix, ranks, rerank, n_expand=expand, rows_of=rows_of)
        finally:
            if verifying is not parts[0]:
                verifying.store.close()
        rerank_info["features"] = vcfg.name
        timings["verify_s"] = rerank_info["seconds"]
    for p in parts:
        p.store.close()
    metrics = evaluate(ranks, gt)
    result = {
        **metrics,
        "preset": cfg.name,
        "dataset": gt.name,
        "params": params,
        "codebook_trained_on": trained_on,
        "failed": [{"name": n, "reason": r} for n, r in failed],
        "timings": timings,
    }
    if before_rerank is not None:
        result["before_rerank"] = before_rerank
        result["rerank"] = rerank_info
    root = Path(gt.root)
    if report is not None:
        from .report import write_report

        k = min(top, ranks.shape[1])
        write_report(
            report,
            names=gt.images,
            image_root=root,
            ranks=ranks[:, :k],
            scores=np.take_along_axis(matrix, ranks[:, :k], axis=1),
            query_names=gt.queries,
            gt=gt,
            top_k=k,
            title=f"asmkit: {gt.name} ({cfg.name})",
            metrics=metrics,
        )
        result["report"] = str(report)
    return result


def _check_hybrid_options(preset: str, **options: Any) -> None:
    """A hybrid preset takes its members' settings: a config file or codebook would be ambiguous."""
    given = [k for k, v in options.items() if v is not None]
    if given:
        raise ArgumentError(
            f"--preset {preset}: a hybrid preset takes no --{given[0].replace('_', '-')} "
            "(each member uses its own preset's settings)"
        )


@dataclasses.dataclass
class _DatasetFeatures:
    """One preset's features and codebook on an evaluation data set (:func:`_dataset_features`),
    and, from :func:`_dataset_matrix`, its query x database similarities."""

    store: FeatureStore
    have: set
    db: list
    describe: Callable[[Sequence[str]], list]
    codebook: Codebook
    trained_on: str
    failed: list
    timings: dict
    matrix: np.ndarray | None = None
    rows_of: Callable[[np.ndarray], np.ndarray] | None = None
    turned: Callable[[Sequence[str], int], list] | None = None


def _dataset_features(gt, cfg: PipelineConfig, *, data, codebook, model, cache, workers, device) -> _DatasetFeatures:
    """The features of every image of a data set (extracted or cached) and the codebook
    (given, cached or trained on the database images' descriptors)."""
    root = Path(gt.root)
    all_names = list(dict.fromkeys(gt.images + gt.queries))
    paths = [root / n for n in all_names]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    feats, store, names, failed, cache_folder = _features_for(
        paths, root, cfg, model, workers, Path(cache) if cache else None, device
    )
    timings["extract_s"] = time.perf_counter() - t0
    have = set(names)
    if not names:
        raise ArgumentError(f"{data}: no image could be read")
    # An unreadable image stays in the ranking with no descriptors (it scores 0), so that
    # the metrics keep their meaning.
    empty = np.zeros((0, feats.descriptors(store.get(names[0]).descriptors).shape[1]), np.float32)

    def descriptors(image_names: Sequence[str]) -> list[np.ndarray]:
        return [feats.descriptors(store.get(n).descriptors) if n in have else empty for n in image_names]

    wkey = _whitening_key(cfg, _image_set_key(paths))

    def turned(image_names: Sequence[str], rotation: int) -> list[np.ndarray]:
        # Each rotation's features are cached in a store of their own beside the upright ones.
        extractor = feats.extractor.turned(rotation)
        turned_store, got, _ = _extract_into(
            [root / n for n in image_names],
            root,
            extractor,
            cache_folder / f"features-{wkey}-turn{rotation}.h5",
            workers,
        )
        try:
            present = set(got)
            return [feats.descriptors(turned_store.get(n).descriptors) if n in present else empty for n in image_names]
        finally:
            turned_store.close()

    db = descriptors(gt.images)

    t0 = time.perf_counter()
    saved = cache_folder / "codebook-{}.asmkit".format(
        _digest(
            {
                "images": _image_set_key([root / n for n in gt.images]),
                "features": database_options(cfg.features),
                "whitening": wkey,
                "params": cfg.params.to_dict(),
                "chosen": cfg.codebook_size_chosen,
                "train_points_per_word": TRAIN_POINTS_PER_WORD,
                "kmeans_pruned": KMEANS_PRUNED,
            }
        )
    )
    cb, source = _get_codebook(
        cfg, given=codebook, model_codebook=feats.codebook, saved=saved, training=lambda: db, dim=empty.shape[1]
    )
    if codebook is None and feats.codebook is None:
        n_desc = sum(len(d) for d in db)
        source = f"the evaluated images' descriptors ({n_desc} from {len(gt.images)} images; {source})"
    timings["codebook_s"] = time.perf_counter() - t0
    return _DatasetFeatures(
        store, have, db, descriptors, cb, source, [tuple(f) for f in failed], timings, turned=turned
    )


def _dataset_matrix(
    gt, cfg: PipelineConfig, *, data, codebook, model, cache, workers, device, regions, whole_image, ray, ray_cpus
) -> _DatasetFeatures:
    """:func:`_dataset_features` with the query x database similarities of one
    (non-hybrid) preset (``matrix``, float32 ``[Q, N]``) and ``rows_of(positions)``: the
    rows (float32 ``[E, N]``) of database images used as queries. The caller closes
    ``store``."""
    from .search import similarity_matrix

    out = _dataset_features(
        gt, cfg, data=data, codebook=codebook, model=model, cache=cache, workers=workers, device=device
    )
    db, descriptors = out.db, out.describe
    t0 = time.perf_counter()
    cb = _on_device(out.codebook, device)
    db_regions = _regions(regions, gt.images, out.store, whole_image)
    index = None
    if ray is not None:
        if db_regions is not None:
            raise ArgumentError("--ray: not with --regions")
        index = Index(cb, cfg.params)
        index.add(db)
        matrix = _dense_from_blocks(
            score_blocks(
                index,
                lambda rows: descriptors([gt.queries[i] for i in rows]),
                len(gt.queries),
                ray=ray,
                ray_cpus=ray_cpus,
            ),
            len(gt.queries),
            len(gt.images),
        )
    elif gt.queries == gt.images:
        matrix = similarity_matrix(cb, db, params=cfg.params, regions=db_regions)
    else:
        index = Index(cb, cfg.params)
        index.add(db, regions=db_regions)
        matrix = index.similarity_matrix(descriptors(gt.queries))
    out.timings["search_s"] = time.perf_counter() - t0
    turns = query_turns(cfg.features)
    if turns:
        # Each query also searched turned; a database image keeps its best score.
        t0 = time.perf_counter()
        if index is None:
            index = Index(cb, cfg.params)
            index.add(db, regions=db_regions)
        for rotation in turns:
            matrix = np.maximum(matrix, index.similarity_matrix(out.turned(gt.queries, rotation)))
        out.timings["query_turns_s"] = time.perf_counter() - t0
    out.matrix = matrix
    if gt.queries == gt.images:

        def rows_of(images: np.ndarray) -> np.ndarray:
            return matrix[images]
    else:

        def rows_of(images: np.ndarray) -> np.ndarray:
            return index.similarity_matrix(descriptors([gt.images[i] for i in images]))

    out.rows_of = rows_of
    return out


def _rerank_ranks(verifying: _DatasetFeatures, gt, matrix, ranks, top: int, *, n_expand: int, rows_of):
    """Evaluation rankings with their top ``top`` re-ranked by spatial verification on the
    features, keypoints and codebook of ``verifying``, then (``n_expand`` > 0) expanded,
    and a summary (settings, seconds to build the geometry, to verify and to expand,
    verified candidates). ``rows_of(positions)`` gives the dense score rows (float32
    [E, N]) of database images used as queries."""
    from .evaluate import evaluate
    from .geometry import GeometryStore, feature_words
    from .verify import Reranked, VerifyOptions, expand, rerank

    store, have, cb, db = verifying.store, verifying.have, verifying.codebook, verifying.db

    def keypoints(names):
        return [store.get(n).keypoints if n in have else None for n in names]

    options = VerifyOptions()
    t0 = time.perf_counter()
    db_kp = keypoints(gt.images)
    geometry = GeometryStore.from_features(cb, db, db_kp)
    same = gt.queries == gt.images
    q_kp = db_kp if same else keypoints(gt.queries)
    q_desc = db if same else verifying.describe(gt.queries)
    q_words, q_sigs = feature_words(
        cb, [d if k is not None else d[:0] for d, k in zip(q_desc, q_kp)], m=options.query_m
    )
    geometry_s = time.perf_counter() - t0
    k = min(top, ranks.shape[1])
    t0 = time.perf_counter()
    out = rerank(
        geometry,
        q_kp,
        q_words,
        ranks[:, :k],
        np.take_along_axis(matrix, ranks[:, :k], 1),
        query_signatures=q_sigs,
        top=k,
        options=options,
    )
    seconds = time.perf_counter() - t0
    ranks = ranks.copy()
    ranks[:, :k] = out.ids
    info = {
        "top": k,
        "model": options.model,
        "threshold_px": options.threshold,
        "max_hamming": options.max_hamming,
        "min_inliers": options.min_inliers,
        "query_m": options.query_m,
        "threads": options.n_threads,
        "geometry_s": geometry_s,
        "seconds": seconds,
        "ms_per_query": 1e3 * seconds / max(len(ranks), 1),
        "geometry_bytes_per_image": geometry.bytes_per_image,
        "verified_per_query": float((out.inliers >= options.min_inliers).sum() / max(len(ranks), 1)),
    }
    if n_expand:
        info["before_expansion"] = evaluate(ranks, gt)
        position = {n: i for i, n in enumerate(gt.images)}
        inliers = np.full(ranks.shape, -1, np.int32)
        inliers[:, :k] = out.inliers
        everything = np.arange(len(gt.images))
        t0 = time.perf_counter()
        expanded = expand(
            Reranked(np.take_along_axis(matrix, ranks, 1), ranks, inliers),
            lambda images: (np.broadcast_to(everything, (len(images), everything.shape[0])), rows_of(images)),
            n_expand,
            min_inliers=options.min_inliers,
            exclude=[position.get(n, -1) for n in gt.queries],
        )
        expand_s = time.perf_counter() - t0
        ranks = expanded.ids
        info.update(expand=n_expand, expand_s=expand_s, expand_ms_per_query=1e3 * expand_s / max(len(ranks), 1))
    return ranks, info


# ------------------------------------------------------------------------------ demo


def run_demo(out: str | os.PathLike = "asmkit_demo", *, seed: int = 0) -> dict[str, Any]:
    """Build the bundled demo set, index it, query it, evaluate and write the HTML report.

    Everything lands in ``out``: ``data/`` (images + gt.json), ``index/`` (a workspace that
    ``asmkit query`` accepts) and ``report.html``.
    """
    from .demo import build_demo_set

    out = Path(out)
    data = build_demo_set(out / "data", seed=seed)
    # The codebook size follows the data (fit_codebook_size): the demo set is small.
    res = evaluate_dataset(data, preset="sift", cache=out / "cache", report=out / "report.html")
    build_index(data / "images", out=out / "index", preset="sift")
    return {
        "images": len(list((data / "images").iterdir())),
        "queries": res["n_queries"],
        "map": res["map"],
        "mp": res["mp"],
        "report": str(out / "report.html"),
        "index": str(out / "index"),
        "data": str(data),
    }
