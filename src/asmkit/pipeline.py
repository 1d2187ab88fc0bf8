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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .codebook import Codebook
from .config import PipelineConfig, load_config
from .features import FeatureStore, PCAWhitening, SiftExtractor, extract_features, image_names, list_images, load_image
from .features.io import ImageLoadError
from ._io import write_text_atomic
from .index import Index
from .storage import StorageError
from ._validation import check_int

logger = logging.getLogger(__name__)

__all__ = [
    "build_index",
    "compute_scores",
    "evaluate_dataset",
    "make_extractor",
    "make_pairs",
    "query_index",
    "run_demo",
]

_PIPELINE = "pipeline.json"
_GEOMETRY = "geometry.asmkit"  # keypoints, words and signatures for spatial verification
_WHITENING_SAMPLE = 200  # images used to learn whitening without labels


# ------------------------------------------------------------------------------ extractors


def _sample(paths: Sequence[Path], n: int, seed: int) -> list[Path]:
    if len(paths) <= n:
        return list(paths)
    rng = np.random.default_rng(seed)
    return [paths[i] for i in sorted(rng.choice(len(paths), n, replace=False))]


def _sample_images(paths: Sequence[Path], max_size: int | None):
    """Decoded sample images; broken files are skipped (they are reported at extraction)."""
    for path in paths:
        try:
            yield load_image(path, max_size=max_size)
        except ImageLoadError:
            continue


def _sift_extractor(opts: dict[str, Any], folder: Path | None, sample: Sequence[Path], seed: int) -> SiftExtractor:
    opts = dict(opts)
    dim = opts.pop("whitening_dim", None)
    shrinkage = opts.pop("whitening_shrinkage", 1.0)
    if dim is None:
        return SiftExtractor(**opts)
    saved = folder / "whitening.npz" if folder is not None else None
    if saved is not None and saved.is_file():
        return SiftExtractor(**opts, whitening=PCAWhitening.load(saved))
    raw = SiftExtractor(**opts)
    vecs = [raw.extract(img).descriptors for img in _sample_images(_sample(sample, _WHITENING_SAMPLE, seed), raw.max_size)]
    if not vecs:
        raise ValueError("images: no readable image to learn the whitening from")
    whitening = PCAWhitening.learn(np.concatenate(vecs), dim=dim, shrinkage=shrinkage)
    if saved is not None:
        whitening.save(saved)
    return SiftExtractor(**opts, whitening=whitening)


def _deep_extractor(opts: dict[str, Any], folder: Path | None, sample: Sequence[Path], seed: int, device: str):
    try:
        from .features.backbones import EfficientNetLite0
        from .features.deep import DeepExtractor
    except ImportError as exc:
        raise ImportError(f"the deep preset needs torch: pip install 'asmkit[deep]' ({exc})") from None
    opts = dict(opts)
    device = opts.pop("device", device)  # a config's features.device wins over --device
    saved = folder / "extractor.pt" if folder is not None else None
    if saved is not None and saved.is_file():
        return DeepExtractor.load(saved, device=device)
    backbone_name = opts.pop("backbone", "efficientnet_lite0")
    if backbone_name != "efficientnet_lite0":
        raise ValueError(f"features.backbone: only 'efficientnet_lite0' is built in, got {backbone_name!r}")
    backbone = EfficientNetLite0(stage=opts.pop("stage", "stride16"))
    dim = opts.pop("whitening_dim", 128)
    shrinkage = opts.pop("whitening_shrinkage", 1.0)
    opts.pop("whitening_images", None)
    if "scales" in opts:
        opts["scales"] = tuple(opts["scales"])
    extractor = DeepExtractor(backbone, device=device, **opts)
    images = _sample_images(_sample(sample, _WHITENING_SAMPLE, seed), extractor.max_size)
    extractor.learn_whitening(images, dim=dim, shrinkage=shrinkage)
    if saved is not None:
        extractor.save(saved)
    return extractor


def make_extractor(
    config: PipelineConfig,
    *,
    folder: Path | None = None,
    sample: Sequence[Path] = (),
    model: str | os.PathLike | None = None,
    device: str = "cpu",
):
    """The local-feature extractor of a preset.

    Parameters
    ----------
    config : PipelineConfig
    folder : Path, optional
        Workspace: a learned whitening / head saved there is reused, a new one is saved.
    sample : sequence of Path
        Images to learn whitening from (no labels needed), when one must be learned.
    model : path, optional
        MASt3R retrieval checkpoint (``mast3r`` preset).
    device : str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``: where deep features are computed (SIFT runs
        on the CPU; a ``device`` in the config's features wins).

    Returns
    -------
    extractor, codebook or None
        The codebook comes with a MASt3R checkpoint (its ``<name>_codebook.pkl``).
    """
    gpu_of(device)  # a bad value fails before any work
    opts = {k: v for k, v in config.features.items() if k != "type"}
    kind = config.features.get("type", "sift")
    seed = config.params.seed
    if kind == "sift":
        return _sift_extractor(opts, folder, sample, seed), None
    if kind == "deep":
        return _deep_extractor(opts, folder, sample, seed, device), None
    if kind == "mast3r":
        if model is None:
            raise ValueError("--model: the mast3r preset needs a MASt3R retrieval checkpoint")
        try:
            from .features.backbones import load_mast3r_checkpoint
            from .features.deep import DeepExtractor
        except ImportError as exc:
            raise ImportError(f"the mast3r preset needs torch: pip install 'asmkit[deep]' ({exc})") from None
        loaded = load_mast3r_checkpoint(model)
        extractor = DeepExtractor(loaded.backbone, loaded.head, nfeat=loaded.head.nfeat, max_size=loaded.imsize,
                                  name="mast3r", device=device)
        codebook = Codebook(loaded.codebook) if loaded.codebook is not None else None
        return extractor, codebook
    raise ValueError(f"features.type: expected sift, deep or mast3r, got {kind!r}")


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
    result = extract_features(paths, extractor, root=root, store=store, workers=workers,
                              progress=logger.isEnabledFor(logging.INFO))
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
    raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")


def _on_device(cb: Codebook, device: str) -> Codebook:
    """``cb`` quantizing on ``device``'s GPU (``Codebook(..., gpu=N)``), or ``cb`` on the CPU."""
    gpu = gpu_of(device)
    return cb if gpu is None else Codebook(cb.centroids, gpu=gpu)


def _train_codebook(vecs: np.ndarray, config: PipelineConfig) -> Codebook:
    p = config.params
    size = p.codebook_size
    if size > len(vecs):
        raise ValueError(
            f"--codebook-size: {size} words but only {len(vecs)} training descriptors; use a smaller codebook"
        )
    logger.info("training a %d-word codebook on %d descriptors", size, len(vecs))
    return Codebook.train(vecs, size, iters=p.kmeans_iters, seed=p.seed)


def _load_codebook(path: str | os.PathLike) -> Codebook:
    path = Path(path)
    if path.suffix == ".pkl":
        from .compat.legacy import codebook_from_legacy, load_legacy_pickle

        return codebook_from_legacy(load_legacy_pickle(path))
    return Codebook.load(path)


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _cache_dir(kind: str, key: dict[str, Any]) -> Path:
    base = Path(os.environ.get("ASMKIT_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asmkit"))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = base / kind / digest
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _add_geometry(path: Path, index: Index, store: FeatureStore, names: list[str], add: bool):
    """The workspace's geometry store (``asmkit.geometry``) with the images ``names`` added
    under their index ids; with ``add`` the saved one grows, and images already in it stay."""
    from .geometry import GeometryStore, feature_words

    geometry = GeometryStore.load(path, mmap=False) if add and path.is_dir() else GeometryStore()
    ids = np.array([index.id_of(n) for n in names], dtype=np.int64)
    fresh = ~np.isin(ids, geometry.ids)
    feats = [store.get(n) for n, keep in zip(names, fresh) if keep]
    kp = [f.keypoints if f.keypoints is not None else np.empty((0, 4), np.float32) for f in feats]
    # Features without keypoints cannot be verified: such an image gets none.
    words, sigs = feature_words(index.codebook, [f.descriptors if f.keypoints is not None else f.descriptors[:0]
                                                 for f in feats])
    geometry.add(ids[fresh], kp, words, sigs)
    logger.info("geometry store: %d images, %.0f bytes per image", len(geometry), geometry.bytes_per_image)
    return geometry


# ------------------------------------------------------------------------------ index / query


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
) -> dict[str, Any]:
    """Extract, train the codebook, build the inverted file and save the workspace ``out``.

    Rerunning resumes: features already in the store are not extracted again and a trained
    codebook is reused. With ``add=True`` the images not yet indexed are added to the
    existing index (whose preset is kept).

    Returns
    -------
    dict
        Summary: images indexed, failed files, timings.
    """
    out = Path(out)
    timings: dict[str, float] = {}
    if add:
        if not (out / _PIPELINE).is_file():
            raise FileNotFoundError(f"--add: no asmkit index at {out} (missing {_PIPELINE})")
        cfg = PipelineConfig.from_dict(json.loads((out / _PIPELINE).read_text(encoding="utf-8"))["config"])
    else:
        cfg = load_config(preset, config, codebook_size=codebook_size)
    paths, root = _images(images)
    out.mkdir(parents=True, exist_ok=True)
    train_paths = list_images(train) if train is not None else paths
    t0 = time.perf_counter()
    extractor, cb = make_extractor(cfg, folder=out, sample=train_paths, model=model, device=device)
    store, names, failed = _extract_into(paths, root, extractor, out / "features.h5", workers)
    timings["extract_s"] = time.perf_counter() - t0
    if not names:
        raise ValueError(f"{images}: no image could be read ({len(failed)} failed)")

    t0 = time.perf_counter()
    if add:
        index = Index.load(out / "index.asmkit", mmap=False, gpu=gpu_of(device))
        known = set(index.keys)
        names = [n for n in names if n not in known]
        cb = index.codebook
    else:
        index = None
        if codebook is not None:
            cb = _load_codebook(codebook)
        elif cb is None and (out / "codebook.asmkit").exists():
            cb = Codebook.load(out / "codebook.asmkit")
        if cb is None:
            if train is not None:
                tstore, tnames, _ = _extract_into(train_paths, Path(train) if Path(train).is_dir() else Path(train).parent,
                                                  extractor, out / "train_features.h5", workers)
                tvecs, _ = tstore.stack(tnames)
                tstore.close()
            else:
                tvecs, _ = store.stack(names)
            cb = _train_codebook(tvecs, cfg)
            cb.save(out / "codebook.asmkit")
        index = Index(_on_device(cb, device), cfg.params)
    timings["codebook_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if names:
        vecs, ids = store.stack(names)
        start = int(index.ids.max()) + 1 if len(index) else 0
        index.add(vecs, ids + start, keys=names)
        del vecs
        geometry = _add_geometry(out / _GEOMETRY, index, store, names, add)
    store.close()
    index.save(out / "index.asmkit")
    if names:
        geometry.save(out / _GEOMETRY)
    _write_json(out / _PIPELINE, {"config": cfg.to_dict(), "image_root": str(root.resolve())})
    timings["index_s"] = time.perf_counter() - t0
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


def _open_workspace(index: str | os.PathLike) -> tuple[Path, PipelineConfig, Path]:
    folder = Path(index)
    manifest = folder / _PIPELINE
    if not folder.exists():
        raise FileNotFoundError(f"index not found: {folder}")
    if not manifest.is_file():
        raise StorageError(f"{folder}: not an asmkit index workspace (missing {_PIPELINE})")
    data = json.loads(manifest.read_text(encoding="utf-8"))
    return folder, PipelineConfig.from_dict(data["config"]), Path(data["image_root"])


def query_index(
    index: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    *,
    top: int = 10,
    model: str | os.PathLike | None = None,
    device: str = "cpu",
    rerank: int = 0,
) -> dict[str, Any]:
    """Query a saved index with image files.

    With ``rerank`` R > 0 the top R of each ranking are re-ranked by spatial verification
    (``asmkit.verify.rerank``, on the workspace's geometry store) before the top ``top``
    are kept; every result then also says its ``inliers`` (-1: not verified).

    Returns
    -------
    dict
        ``{"index", "image_root", "results": [{"query", "results": [{"name", "score"}]}],
        "failed": [...]}``.
    """
    folder, cfg, root = _open_workspace(index)
    extractor, _ = make_extractor(cfg, folder=folder, model=model, device=device)
    idx = Index.load(folder / "index.asmkit", mmap=True, gpu=gpu_of(device))
    paths = [Path(p) for p in images]
    if not paths:
        raise ValueError("images: no query image given")
    common = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    names = image_names([p.resolve() for p in paths], common)
    result = extract_features([p.resolve() for p in paths], extractor, root=common, progress=False, keep=True)
    queries = [(str(p), n) for p, n in zip(paths, names) if n in result.features]
    out = []
    rerank = check_int(rerank, "rerank", min=0)
    if queries:
        feats = [result.features[n] for _, n in queries]
        scores, ids = idx.search([f.descriptors for f in feats], k=max(top, rerank))
        inliers = None
        if rerank:
            scores, ids, inliers = _rerank_queries(folder / _GEOMETRY, idx, feats, scores, ids, rerank)
        keys = idx.keys
        position = {int(i): p for p, i in enumerate(idx.ids)}
        for row, ((shown, _), srow, irow) in enumerate(zip(queries, scores[:, :top], ids[:, :top])):
            hits = [{"name": keys[position[int(i)]], "score": float(s)} for s, i in zip(srow, irow) if i >= 0]
            if inliers is not None:
                for hit, count in zip(hits, inliers[row]):
                    hit["inliers"] = int(count)
            out.append({"query": shown, "results": hits})
    return {
        "index": str(folder),
        "image_root": str(root),
        "results": out,
        "failed": [{"name": n, "reason": r} for n, r in result.failed],
    }


def _rerank_queries(path: Path, idx: Index, feats, scores, ids, top: int):
    """``(scores, ids, inliers)`` after re-ranking the top ``top`` by spatial verification."""
    from .geometry import GeometryStore, feature_words
    from .verify import VerifyOptions, rerank

    if not path.is_dir():
        raise FileNotFoundError(f"--rerank: the index has no geometry store ({path}); rebuild it with `asmkit index`")
    geometry = GeometryStore.load(path, mmap=True, verify=False)
    options = VerifyOptions()
    kp = [f.keypoints for f in feats]
    words, sigs = feature_words(idx.codebook, [f.descriptors if k is not None else f.descriptors[:0]
                                               for f, k in zip(feats, kp)], m=options.query_m)
    out = rerank(geometry, kp, words, ids, scores, query_signatures=sigs, top=top, options=options)
    return out.scores, out.ids, out.inliers


# ------------------------------------------------------------------------------ scores / pairs


def _features_for(paths, root, cfg: PipelineConfig, model, workers, cache: Path | None, device: str):
    """Extract (or reuse cached) features; returns extractor codebook, store, names, failed."""
    folder = cache
    if folder is None:
        folder = _cache_dir("features", {"images": [str(p) for p in paths[:5]], "n": len(paths),
                                         "root": str(Path(root).resolve()), "features": cfg.features, "model": str(model)})
    folder.mkdir(parents=True, exist_ok=True)
    extractor, cb = make_extractor(cfg, folder=folder, sample=paths, model=model, device=device)
    store, names, failed = _extract_into(paths, root, extractor, folder / "features.h5", workers)
    return cb, store, names, failed, folder


def compute_scores(
    images: str | os.PathLike,
    *,
    out: str | os.PathLike,
    preset: str = "sift",
    config: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    codebook: str | os.PathLike | None = None,
    codebook_size: int | str | None = None,
    cache: str | os.PathLike | None = None,
    workers: int | None = None,
    chunk: int = 256,
    device: str = "cpu",
) -> dict[str, Any]:
    """The all-vs-all N x N similarity matrix of an image set (row = query, list order).

    Writes ``out`` (float32 ``.npy``) and ``<out>.names.txt`` (one image name per line, the
    matrix order). Images that cannot be read are left out of both and reported.
    """
    from .search import similarity_matrix

    out = Path(out)
    cfg = load_config(preset, config, codebook_size=codebook_size)
    paths, root = _images(images)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cb, store, names, failed, folder = _features_for(paths, root, cfg, model, workers, Path(cache) if cache else None,
                                                     device)
    timings["extract_s"] = time.perf_counter() - t0
    if not names:
        raise ValueError(f"{images}: no image could be read ({len(failed)} failed)")
    vecs, ids = store.stack(names)
    store.close()
    t0 = time.perf_counter()
    if codebook is not None:
        cb = _load_codebook(codebook)
    if cb is None:
        cb = _train_codebook(vecs, cfg)
    timings["codebook_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    matrix = similarity_matrix(_on_device(cb, device), vecs, ids, cfg.params, chunk=chunk)
    timings["scores_s"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, matrix.astype(np.float32, copy=False))
    os.replace(tmp, out)
    names_path = write_text_atomic(out.with_name(out.name + ".names.txt"), "".join(n + "\n" for n in names))
    return {"scores": str(out), "names": str(names_path), "images": len(names), "features": str(store.path),
            "image_root": str(root), "failed": [{"name": n, "reason": r} for n, r in failed], "timings": timings}


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

    Either ``scores`` (a matrix written by :func:`compute_scores`, its names file beside it)
    or ``images`` (scores are computed first, with ``score_options``). ``graph`` defaults
    to ``knn-<top>``.

    With ``verify`` (images only) every pair is verified geometrically
    (``asmkit.verify.verify_pairs``: mutual nearest neighbours, a fundamental matrix):
    ``out`` keeps the pairs with at least ``min_inliers`` inliers and
    ``<out>.inliers.txt`` lists every pair with its inliers. ``colmap_db`` (implies
    ``verify``; extra ``[sfm]``) also writes keypoints, matches and two-view geometries
    into a COLMAP database for pycolmap's mapper (``asmkit.colmap``).
    """
    from .pairs import pairs_from_scores, write_pairs

    verify = verify or colmap_db is not None
    if verify and images is None:
        raise ValueError("--verify: give IMAGES (pairs are verified on their features), not --scores alone")
    computed = None
    if scores is None:
        if images is None:
            raise ValueError("images: give an image folder / list, or --scores")
        out_path = Path(out)
        scores = out_path.with_name(out_path.stem + ".scores.npy")
        computed = compute_scores(images, out=scores, **score_options)
    scores = Path(scores)
    if not scores.is_file():
        raise FileNotFoundError(f"--scores: file not found: {scores}")
    names_path = scores.with_name(scores.name + ".names.txt")
    if not names_path.is_file():
        raise FileNotFoundError(f"--scores: names file not found: {names_path}")
    names = [line for line in names_path.read_text(encoding="utf-8").splitlines() if line]
    matrix = np.load(scores, allow_pickle=False)
    graph = graph or f"knn-{top}"
    pairs = pairs_from_scores(matrix, names, graph)
    summary = {"pairs": str(out), "n_pairs": len(pairs), "graph": graph, "images": len(names)}
    if verify:
        pairs = _verify_pairs(pairs, computed, out, min_inliers, colmap_db, summary)
    write_pairs(out, pairs)
    return summary


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
    inliers_path = write_text_atomic(out.with_name(out.name + ".inliers.txt"),
                                     "".join(f"{g.name_a} {g.name_b} {g.inliers}\n" for g in geometries))
    summary.update(n_pairs=len(kept), n_tested=len(pairs), min_inliers=min_inliers, inliers=str(inliers_path),
                   verify_s=time.perf_counter() - t0)
    if colmap_db is not None:
        from .colmap import write_database

        if any(k is None for k in keypoints.values()):
            raise ValueError("--colmap-db: the features have no keypoints")
        summary["colmap"] = write_database(colmap_db, computed["image_root"], keypoints, geometries,
                                           min_inliers=min_inliers)
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
) -> dict[str, Any]:
    """mAP (and N-S, E/M/H when the ground truth has them) of a preset on a data set.

    The codebook is trained on the evaluated database images' descriptors unless
    ``codebook`` is given; the result says which (``codebook_trained_on``). With
    ``rerank`` R > 0 the top R of every ranking are re-ranked by spatial verification
    (``asmkit.verify``): the metrics are then those after re-ranking, ``before_rerank``
    holds those before, and ``rerank`` the settings and the verification time.
    """
    from .evaluate import evaluate, load_ground_truth
    from .search import similarity_matrix

    gt = load_ground_truth(data)
    cfg = load_config(preset, config, codebook_size=codebook_size)
    root = Path(gt.root)
    all_names = list(dict.fromkeys(gt.images + gt.queries))
    paths = [root / n for n in all_names]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cache_folder = Path(cache) if cache else _cache_dir(
        "eval", {"data": str(root.resolve()), "features": cfg.features, "model": str(model)})
    cb, store, names, failed, _ = _features_for(paths, root, cfg, model, workers, cache_folder, device)
    timings["extract_s"] = time.perf_counter() - t0
    have = set(names)
    # An unreadable image stays in the ranking with no descriptors (it scores 0), so that
    # the metrics keep their meaning.
    empty = np.zeros((0, store.get(names[0]).descriptors.shape[1]), np.float32) if names else None
    if empty is None:
        raise ValueError(f"{data}: no image could be read")
    db = [store.get(n).descriptors if n in have else empty for n in gt.images]

    t0 = time.perf_counter()
    if codebook is not None:
        cb = _load_codebook(codebook)
        trained_on = f"given ({codebook})"
    elif cb is not None:
        trained_on = "the model's codebook"
    else:
        p = cfg.params
        cached = cache_folder / f"codebook-{p.codebook_size}-seed{p.seed}-iter{p.kmeans_iters}.asmkit"
        if cached.exists():
            cb = Codebook.load(cached)
        else:
            # The stacked copy (620 MB for UKBench RootSIFT) lives only while k-means runs.
            cb = _train_codebook(np.concatenate(db), cfg)
            cb.save(cached)
        n_desc = sum(len(d) for d in db)
        trained_on = f"the evaluated images' descriptors ({n_desc} from {len(gt.images)} images)"
    timings["codebook_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cb = _on_device(cb, device)
    if gt.queries == gt.images:
        matrix = similarity_matrix(cb, db, params=cfg.params)
    else:
        index = Index(cb, cfg.params)
        index.add(db)
        queries = [store.get(n).descriptors if n in have else empty for n in gt.queries]
        matrix = index.similarity_matrix(queries)
    # Stable sort: exact ties keep database order, so results are reproducible.
    ranks = np.argsort(-matrix, axis=1, kind="stable")
    timings["search_s"] = time.perf_counter() - t0
    metrics = evaluate(ranks, gt)
    before_rerank = None
    if check_int(rerank, "rerank", min=0):
        before_rerank, (ranks, verify_info) = metrics, _rerank_ranks(cb, store, have, gt, db, matrix, ranks, rerank)
        metrics = evaluate(ranks, gt)
        timings["verify_s"] = verify_info["seconds"]
    store.close()
    result = {
        **metrics,
        "preset": cfg.name,
        "dataset": gt.name,
        "params": cfg.params.to_dict(),
        "codebook_trained_on": trained_on,
        "failed": [{"name": n, "reason": r} for n, r in failed],
        "timings": timings,
    }
    if before_rerank is not None:
        result["before_rerank"] = before_rerank
        result["rerank"] = verify_info
    if report is not None:
        from .report import write_report

        k = min(top, ranks.shape[1])
        write_report(report, names=gt.images, image_root=root, ranks=ranks[:, :k],
                     scores=np.take_along_axis(matrix, ranks[:, :k], axis=1), query_names=gt.queries,
                     gt=gt, top_k=k, title=f"asmkit: {gt.name} ({cfg.name})", metrics=metrics)
        result["report"] = str(report)
    return result


def _rerank_ranks(cb: Codebook, store: FeatureStore, have: set, gt, db, matrix, ranks, top: int):
    """Evaluation rankings with their top ``top`` re-ranked by spatial verification, and
    a summary (settings, seconds to build the geometry and to verify, verified candidates)."""
    from .geometry import GeometryStore, feature_words
    from .verify import VerifyOptions, rerank

    def keypoints(names):
        return [store.get(n).keypoints if n in have else None for n in names]

    options = VerifyOptions()
    t0 = time.perf_counter()
    db_kp = keypoints(gt.images)
    geometry = GeometryStore.from_features(cb, db, db_kp)
    same = gt.queries == gt.images
    q_kp = db_kp if same else keypoints(gt.queries)
    q_desc = db if same else [store.get(n).descriptors if n in have else db[0][:0] for n in gt.queries]
    q_words, q_sigs = feature_words(cb, [d if k is not None else d[:0] for d, k in zip(q_desc, q_kp)],
                                    m=options.query_m)
    geometry_s = time.perf_counter() - t0
    k = min(top, ranks.shape[1])
    t0 = time.perf_counter()
    out = rerank(geometry, q_kp, q_words, ranks[:, :k], np.take_along_axis(matrix, ranks[:, :k], 1),
                 query_signatures=q_sigs, top=k, options=options)
    seconds = time.perf_counter() - t0
    ranks = ranks.copy()
    ranks[:, :k] = out.ids
    info = {"top": k, "model": options.model, "threshold_px": options.threshold, "max_hamming": options.max_hamming,
            "min_inliers": options.min_inliers, "query_m": options.query_m, "threads": options.n_threads,
            "geometry_s": geometry_s,
            "seconds": seconds, "ms_per_query": 1e3 * seconds / max(len(ranks), 1),
            "geometry_bytes_per_image": geometry.bytes_per_image,
            "verified_per_query": float((out.inliers >= options.min_inliers).sum() / max(len(ranks), 1))}
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
    # A small codebook suits the few tens of thousands of descriptors of the demo set.
    res = evaluate_dataset(data, preset="sift", codebook_size=512, cache=out / "cache",
                           report=out / "report.html")
    build_index(data / "images", out=out / "index", preset="sift", codebook_size=512)
    return {
        "images": len(list((data / "images").iterdir())),
        "queries": res["n_queries"],
        "map": res["map"],
        "mp": res["mp"],
        "report": str(out / "report.html"),
        "index": str(out / "index"),
        "data": str(data),
    }
