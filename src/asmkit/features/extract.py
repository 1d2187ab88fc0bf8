"""The extractor interface and batch extraction over many image files.

An *extractor* is any object with

- ``name: str`` — a short identifier (``"rootsift"``, ``"how_effnet"``);
- ``config() -> dict`` — JSON-serialisable settings; a feature store remembers them and
  refuses to mix features computed with different settings;
- ``extract(image) -> ImageFeatures`` — ``image`` is uint8 ``[H, W, 3]`` RGB;
- optionally ``max_size: int | None`` — the loader downscales images so that their longer
  side is at most this (``None``: full resolution);
- optionally ``thread_safe: bool`` — True when ``extract`` may run in several threads at
  once (OpenCV and NumPy release the GIL); such extractors run in the worker threads,
  others run in the calling thread while the workers decode the next images;
- optionally ``batched: bool`` with ``batch_size: int`` and
  ``extract_batch(images) -> list[ImageFeatures]`` — True when several images per call
  are faster (a network on a GPU); the calling thread then hands it up to ``batch_size``
  decoded images at a time.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, runtime_checkable

import numpy as np
from tqdm.auto import tqdm

from .._validation import ArgumentError
from .io import ImageLoadError, list_images, load_image

__all__ = ["ExtractionResult", "Extractor", "FeatureSink", "ImageFeatures", "extract_features", "image_names"]

logger = logging.getLogger(__name__)


def _as_float32(value: Any, name: str, ndim: int) -> np.ndarray:
    array = np.ascontiguousarray(value, dtype=np.float32)
    if array.ndim != ndim:
        raise ArgumentError(f"{name}: expected a {ndim}-D array, got shape {array.shape}")
    return array


@dataclass
class ImageFeatures:
    """Local features of one image.

    Attributes
    ----------
    descriptors : numpy.ndarray
        float32 ``[n, D]``, C-contiguous; ``n`` may be 0.
    keypoints : numpy.ndarray or None
        float32 ``[n, 4]``: x, y (pixels of the loaded image), scale, angle (degrees).
    attention : numpy.ndarray or None
        float32 ``[n]``: per-feature strength (attention for deep features, detector
        response for SIFT).
    global_descriptor : numpy.ndarray or None
        float32 ``[G]``: one vector for the whole image.
    """

    descriptors: np.ndarray
    keypoints: np.ndarray | None = None
    attention: np.ndarray | None = None
    global_descriptor: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.descriptors = _as_float32(self.descriptors, "descriptors", 2)
        n = self.descriptors.shape[0]
        if self.keypoints is not None:
            self.keypoints = _as_float32(self.keypoints, "keypoints", 2)
            if self.keypoints.shape != (n, 4):
                raise ArgumentError(f"keypoints: expected shape ({n}, 4), got {self.keypoints.shape}")
        if self.attention is not None:
            self.attention = _as_float32(self.attention, "attention", 1)
            if self.attention.shape != (n,):
                raise ArgumentError(f"attention: expected shape ({n},), got {self.attention.shape}")
        if self.global_descriptor is not None:
            self.global_descriptor = _as_float32(self.global_descriptor, "global_descriptor", 1)

    def __len__(self) -> int:
        return self.descriptors.shape[0]

    @property
    def dim(self) -> int:
        """Descriptor dimensionality D."""
        return self.descriptors.shape[1]


@runtime_checkable
class Extractor(Protocol):
    """What ``extract_features`` needs from an extractor (see the module docstring)."""

    name: str

    def config(self) -> dict: ...

    def extract(self, image: np.ndarray) -> ImageFeatures: ...


class FeatureSink(Protocol):
    """Where ``extract_features`` writes features: :class:`asmkit.features.store.FeatureStore`
    is one (named by protocol, so that this module does not import the store, which imports
    :class:`ImageFeatures` from here)."""

    path: Path

    @property
    def config(self) -> dict: ...

    def has(self, name: str) -> bool: ...

    def put(self, name: str, feats: ImageFeatures) -> None: ...


@dataclass
class ExtractionResult:
    """Outcome of :func:`extract_features`.

    Attributes
    ----------
    features : dict of str to ImageFeatures
        Features of the images extracted in this call, by image name (kept in memory only
        when requested; see ``keep``).
    failed : list of (str, str)
        ``(name, reason)`` for every image that was skipped because it could not be used.
    extracted : list of str
        Names of the images extracted in this call, in input order.
    already_stored : list of str
        Names skipped because the store already held them (resume).
    seconds : float
        Wall-clock time of the extraction.
    """

    features: dict[str, ImageFeatures] = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)
    extracted: list[str] = field(default_factory=list)
    already_stored: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Extracted (not skipped) images per second of wall-clock time."""
        return len(self.extracted) / self.seconds if self.seconds > 0 else 0.0


def image_names(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> list[str]:
    """Names of image files: their paths relative to ``root``, with ``/`` separators.

    Parameters
    ----------
    paths : iterable of path-like
    root : path-like, optional
        Defaults to the deepest folder holding all the paths.

    Raises
    ------
    asmkit.ArgumentError
        If a path is not below ``root`` or two paths share a name.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        return []
    if root is None:
        absolute = [os.path.abspath(p) for p in paths]
        root = Path(os.path.commonpath([os.path.dirname(p) for p in absolute]))
        paths = [Path(p) for p in absolute]
    else:
        root = Path(root)
        if any(p.is_absolute() for p in paths) or root.is_absolute():
            root = Path(os.path.abspath(root))
            paths = [Path(os.path.abspath(p)) for p in paths]
    names = []
    for path in paths:
        try:
            names.append(path.relative_to(root).as_posix())
        except ValueError:
            raise ArgumentError(f"root: image {path} is not inside root {root}") from None
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ArgumentError(f"paths: image name {name!r} occurs twice")
        seen.add(name)
    return names


@contextmanager
def _single_threaded_libraries(active: bool):
    """Stop OpenCV from spawning its own threads while our workers already fill the cores."""
    cv2 = sys.modules.get("cv2")
    if not active or cv2 is None:
        yield
        return
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def _check_extractor(extractor: Any) -> None:
    missing = [attr for attr in ("name", "config", "extract") if not hasattr(extractor, attr)]
    if missing or not callable(extractor.extract) or not callable(extractor.config):
        raise ArgumentError(
            f"extractor: expected an object with name, config() and extract(image), "
            f"got {type(extractor).__name__} (missing {', '.join(missing) or 'callables'})"
        )


def extract_features(
    paths: Iterable[str | os.PathLike] | str | os.PathLike,
    extractor: Extractor,
    *,
    root: str | os.PathLike | None = None,
    store: FeatureSink | None = None,
    workers: int | None = None,
    progress: bool = True,
    keep: bool | None = None,
) -> ExtractionResult:
    """Extract local features from many image files, skipping and reporting bad files.

    Images are decoded by a pool of worker threads while features are extracted, in input
    order. A file that cannot be loaded or whose extraction raises is logged and listed in
    ``failed``; the run goes on. A summary is logged at the end.

    Parameters
    ----------
    paths : iterable of path-like, or a folder / list file
        The images. A single folder or list file is expanded by :func:`list_images`, and
        then ``root`` defaults to that folder (or the list file's folder).
    extractor : Extractor
        See the module docstring. Its ``max_size`` (if any) is passed to the loader.
    root : path-like, optional
        Image names are paths relative to it (posix). Default: the deepest common folder.
    store : FeatureStore, optional
        Images already in it are skipped (resume); each new result is written and
        flushed as soon as it is extracted.
    workers : int, optional
        Worker threads. Default: ``min(4, os.cpu_count())``.
    progress : bool
        Show progress: a tqdm bar when stderr is a terminal, otherwise (CI logs, ``2>file``)
        an INFO log line every 30 s, so that a log stays a few lines long.
    keep : bool, optional
        Keep the features in ``result.features``. Default: True without a store, False
        with one (the store holds them; read them back with ``store.get``).

    Returns
    -------
    ExtractionResult

    Raises
    ------
    asmkit.ArgumentError
        If ``extractor`` lacks the interface or returns something else than ImageFeatures,
        if ``workers`` is not a positive int, names clash (see :func:`image_names`), or
        ``store`` was opened with another config than ``extractor.config()``.
    """
    _check_extractor(extractor)
    if isinstance(paths, (str, os.PathLike)):
        source = Path(paths)
        if root is None:
            root = source if source.is_dir() else source.parent
        paths = list_images(source)
    paths = [Path(p) for p in paths]
    names = image_names(paths, root)
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ArgumentError(f"workers: expected a positive int or None, got {workers!r}")
    if keep is None:
        keep = store is None
    if store is not None and store.config != json.loads(json.dumps(extractor.config(), sort_keys=True)):
        raise ArgumentError(
            f"store: {store.path} holds features of another extractor config; "
            f"open it as FeatureStore(path, extractor.config())"
        )
    max_size = getattr(extractor, "max_size", None)
    in_workers = bool(getattr(extractor, "thread_safe", False))
    group = 1
    if not in_workers and getattr(extractor, "batched", False) and callable(getattr(extractor, "extract_batch", None)):
        group = max(1, int(getattr(extractor, "batch_size", 1)))

    result = ExtractionResult()
    todo = []
    for name, path in zip(names, paths):
        if store is not None and store.has(name):
            result.already_stored.append(name)
        else:
            todo.append((name, path))
    if result.already_stored:
        logger.info("%d of %d images already in the feature store, skipped", len(result.already_stored), len(names))

    def load(path: Path):
        return load_image(path, max_size=max_size)

    def load_and_extract(path: Path):
        return extractor.extract(load_image(path, max_size=max_size))

    task = load_and_extract if in_workers else load

    start = time.perf_counter()
    # A bounded window of pending futures keeps memory flat and results in input order.
    window = max(2 * workers, 2 * group)
    with (
        _single_threaded_libraries(in_workers and workers > 1),
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="asmkit-extract") as pool,
        _progress(len(todo), f"extract {extractor.name}", progress) as bar,
    ):
        pending: deque = deque()

        def finish_next() -> None:
            if group == 1:
                _finish(pending.popleft(), extractor, in_workers, store, keep, result)
                bar.update(1)
            else:
                items = [pending.popleft() for _ in range(min(group, len(pending)))]
                _finish_group(items, extractor, store, keep, result)
                bar.update(len(items))

        try:
            for name, path in todo:
                pending.append((name, path, pool.submit(task, path)))
                if len(pending) >= window:
                    finish_next()
            while pending:
                finish_next()
        except BaseException:
            for _, _, future in pending:
                future.cancel()
            raise
    result.seconds = time.perf_counter() - start

    logger.info(
        "extracted %d images with %s in %.1f s (%.1f images/s); %d failed, %d already stored",
        len(result.extracted),
        extractor.name,
        result.seconds,
        result.images_per_second,
        len(result.failed),
        len(result.already_stored),
    )
    if result.failed:
        shown = "; ".join(f"{name}: {reason}" for name, reason in result.failed[:10])
        more = f" (and {len(result.failed) - 10} more)" if len(result.failed) > 10 else ""
        logger.warning("%d images skipped: %s%s", len(result.failed), shown, more)
    return result


class _LogProgress:
    """A tqdm stand-in for non-terminal stderr: one log line per ``every`` seconds."""

    def __init__(self, total: int, desc: str, every: float) -> None:
        self.total, self.desc, self.every = total, desc, every
        self.done = 0
        self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            logger.info("%s: %d of %d images", self.desc, self.done, self.total)

    def __enter__(self) -> "_LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


_LOG_PROGRESS_EVERY_S = 30.0


def _progress(total: int, desc: str, enabled: bool):
    """A progress bar on a terminal; log lines elsewhere (a bar redrawn into a file is one
    line per update); nothing when not ``enabled``."""
    if enabled and not sys.stderr.isatty():
        return _LogProgress(total, desc, _LOG_PROGRESS_EVERY_S)
    return tqdm(total=total, disable=not enabled, unit="img", desc=desc)


def _finish(item, extractor, in_workers: bool, store, keep: bool, result: ExtractionResult) -> None:
    """Collect one image's outcome: extract (if not done in a worker), store, record."""
    name, path, future = item
    try:
        output = future.result()
        feats = output if in_workers else extractor.extract(output)
    except Exception as error:  # one bad image must not abort a long run
        _skip(name, path, error, result)
        return
    _record(name, feats, extractor, store, keep, result)


def _finish_group(items, extractor, store, keep: bool, result: ExtractionResult) -> None:
    """``_finish`` for consecutive images decoded in the workers, extracted in one
    ``extract_batch`` call; if that call fails, one at a time, so that only the image at
    fault is skipped."""
    loaded = []
    for name, path, future in items:
        try:
            loaded.append((name, path, future.result()))
        except Exception as error:
            _skip(name, path, error, result)
    try:
        batch = extractor.extract_batch([image for _, _, image in loaded])
    except Exception as error:
        logger.debug("a batch of %d images failed (%s); extracting them one by one", len(loaded), error)
        batch = None
    for i, (name, path, image) in enumerate(loaded):
        if batch is not None:
            _record(name, batch[i], extractor, store, keep, result)
            continue
        try:
            feats = extractor.extract(image)
        except Exception as error:
            _skip(name, path, error, result)
            continue
        _record(name, feats, extractor, store, keep, result)


def _skip(name: str, path, error: Exception, result: ExtractionResult) -> None:
    """Log and list an image that could not be loaded or whose extraction raised."""
    if isinstance(error, ImageLoadError):
        reason = error.reason
        logger.warning("skipping %s: %s", path, reason)
    else:
        reason = f"feature extraction failed ({type(error).__name__}: {error})"
        logger.warning("skipping %s: %s", path, reason, exc_info=logger.isEnabledFor(logging.DEBUG))
    result.failed.append((name, reason))


def _record(name: str, feats, extractor, store, keep: bool, result: ExtractionResult) -> None:
    """Store and list one image's features."""
    if not isinstance(feats, ImageFeatures):
        raise ArgumentError(f"extractor: {extractor.name!r} returned {type(feats).__name__}, expected ImageFeatures")
    if store is not None:
        store.put(name, feats)
    if keep:
        result.features[name] = feats
    result.extracted.append(name)
