"""One factory for the feature extractors of the presets (``[features]`` tables).

A ``[features]`` table names an extractor ``type`` and its options:

- ``sift``: :class:`~asmkit.features.sift.SiftExtractor` options, plus ``whitening_dim`` /
  ``whitening_shrinkage`` for a PCA whitening learned without labels. The whitening is
  applied *after* extraction (:attr:`Features.whitening`), so that the stored RootSIFT
  depends on the extraction settings alone and presets that differ only in whitening share
  it.
- ``deep``: EfficientNet-Lite0 (offline ImageNet weights) and the training-free head; the
  whitening is learned into the head. ``rotations`` (distinct whole degrees in [0, 360))
  runs every image at each rotation and keeps the top features over all of them
  (``selection = "per_view"``: an equal share of each rotation and scale). Options left
  out take the values of the ``deep`` preset, so that :func:`deep_extractor` and
  ``--preset deep`` agree. ``query_rotations`` (whole degrees, 0 among them) leaves the
  database features alone and searches each query at each of these rotations, a database
  image scoring the best of them (:func:`query_turns`).
- ``mast3r``: a MASt3R retrieval checkpoint (``--model``), with its codebook.

Both ``whitening_*`` families take ``whitening_images`` (how many images, sampled with the
preset's seed, the whitening is learned from; default 200).

torch is imported only when a deep extractor is built.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .._validation import ArgumentError, DependencyError, check_choice, check_float, check_int
from ..params import preset_table
from .io import ImageLoadError, load_image
from .sift import SiftExtractor
from .whitening import PCAWhitening

__all__ = [
    "FEATURE_TYPES",
    "Features",
    "build_extractor",
    "deep_extractor",
    "database_options",
    "extraction_settings",
    "feature_options",
    "query_turns",
]

logger = logging.getLogger(__name__)

FEATURE_TYPES = ("sift", "deep", "mast3r")

_WHITENING = ("whitening_dim", "whitening_shrinkage", "whitening_images")
_OPTIONS = {
    "sift": {
        "max_features",
        "root",
        "max_size",
        "contrast_threshold",
        "edge_threshold",
        "n_octave_layers",
        "sigma",
        *_WHITENING,
    },
    "deep": {
        "backbone",
        "stage",
        "nfeat",
        "scales",
        "rotations",
        "query_rotations",
        "selection",
        "max_size",
        "upscale_below",
        "smoothing",
        "batch_size",
        "amp",
        "device",
        *_WHITENING,
    },
    "mast3r": {"device"},
}
_WHITENING_IMAGES = 200


@dataclass
class Features:
    """What :func:`build_extractor` returns.

    Attributes
    ----------
    extractor : Extractor
        Computes the features that are stored (see :mod:`asmkit.features.extract`).
    whitening : PCAWhitening or None
        To apply to the extractor's descriptors (float32 ``[N, D]`` in, float32
        ``[N, D']`` out) before quantization: the SIFT whitening. None when there is none
        or when the extractor applies it itself (deep).
    codebook : numpy.ndarray or None
        float32 ``[K, D']`` centroids that come with the model (MASt3R).
    """

    extractor: Any
    whitening: PCAWhitening | None = None
    codebook: np.ndarray | None = None

    def descriptors(self, vecs: np.ndarray) -> np.ndarray:
        """``vecs`` (float32 ``[N, D]``) ready for quantization: whitened when there is a whitening."""
        return vecs if self.whitening is None else self.whitening.apply(vecs)


def feature_options(features: Mapping[str, Any]) -> dict[str, Any]:
    """A ``[features]`` table checked, with ``type`` (default ``sift``) and, for ``deep``,
    the ``deep`` preset's values for the options left out.

    Raises
    ------
    ArgumentError
        Not a table, an unknown type, an unknown option (naming it), or a bad value of the
        options checked here (``whitening_*``, ``rotations``, ``selection``, ``device``,
        ``upscale_below``).
    """
    if not isinstance(features, Mapping):
        raise ArgumentError(f"features: expected a table, got {type(features).__name__}")
    kind = check_choice(features.get("type", "sift"), "features.type", FEATURE_TYPES)
    unknown = sorted(set(features) - _OPTIONS[kind] - {"type"})
    if unknown:
        raise ArgumentError(
            f"features: unknown option(s) {', '.join(unknown)} for type {kind}; "
            f"expected some of {', '.join(sorted(_OPTIONS[kind]))}"
        )
    options = dict(features)
    if kind == "deep":
        options = {**preset_table("deep")["features"], **options}
    options["type"] = kind
    check_int(options.get("whitening_dim"), "features.whitening_dim", min=1, none=True)
    check_float(options.get("whitening_shrinkage", 1.0), "features.whitening_shrinkage", min=0.0, max=1.0)
    check_int(options.get("whitening_images", _WHITENING_IMAGES), "features.whitening_images", min=1)
    for key in ("rotations", "query_rotations"):
        rotations = options.get(key, [0])
        if (
            not isinstance(rotations, (list, tuple))
            or not rotations
            or len(set(rotations)) != len(rotations)
            or any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < 360 for r in rotations)
        ):
            raise ArgumentError(f"features.{key}: expected distinct whole degrees in [0, 360), got {rotations!r}")
    if 0 not in options.get("query_rotations", [0]):
        raise ArgumentError(
            f"features.query_rotations: expected 0 among them (the query as it is), got {options['query_rotations']!r}"
        )
    if len(options.get("query_rotations", [0])) > 1 and list(options.get("rotations", [0])) != [0]:
        # A turned query is one rotation's features; the database's would pool several.
        raise ArgumentError("features.query_rotations: not with rotations (turn one side, not both)")
    if "selection" in options:
        check_choice(options["selection"], "features.selection", ("joint", "per_view"))
    if check_int(options.get("upscale_below"), "features.upscale_below", min=0, none=True) == 0:
        # 0 turns the deep preset's upscaling off: dropped, so that the features (and the
        # caches keyed on them) are those of a table that never had it.
        del options["upscale_below"]
    if "device" in options and not isinstance(options["device"], str):
        raise ArgumentError(f"features.device: expected a string such as 'cpu' or 'cuda', got {options['device']!r}")
    return options


def extraction_settings(features: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a ``[features]`` table that change the *stored* features.

    For ``sift`` the whitening is left out (it is applied after the store); a deep head's
    whitening is part of its features, so nothing is left out there. Feature caches are
    keyed on this.
    """
    options = database_options(features)
    if options["type"] == "sift":
        return {k: v for k, v in options.items() if k not in _WHITENING}
    return options


def database_options(features: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`feature_options` less ``query_rotations``, which turns only the queries: what
    the database side (stored features, whitening, codebook) depends on, so that presets
    that differ only there share it."""
    return {k: v for k, v in feature_options(features).items() if k != "query_rotations"}


def query_turns(features: Mapping[str, Any]) -> tuple[int, ...]:
    """The rotations (degrees, 0 left out) at which a ``[features]`` table also searches
    each query (``query_rotations``); empty when it searches the query as it is."""
    return tuple(r for r in feature_options(features).get("query_rotations", [0]) if r)


def deep_extractor(*, device: str = "cpu", whitening: PCAWhitening | str | os.PathLike | None = None, **options: Any):
    """EfficientNet-Lite0 + training-free head with the ``deep`` preset's settings.

    Parameters
    ----------
    device : str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    whitening : PCAWhitening or path, optional
        The head's post-whitening; without it, learn one with
        :meth:`~asmkit.features.deep.DeepExtractor.learn_whitening`.
    **options
        ``[features]`` options of type ``deep`` that override the preset's (``nfeat``,
        ``stage``, ``max_size``, ``scales``, ...); ``whitening_*`` are ignored here.

    Returns
    -------
    asmkit.features.deep.DeepExtractor

    Raises
    ------
    ArgumentError
        An unknown option or backbone.
    asmkit.DependencyError
        torch or the EfficientNet-Lite0 weights are not installed.
    """
    opts = feature_options({"type": "deep", **options})
    try:
        from .backbones import EfficientNetLite0
        from .deep import DeepExtractor
    except ImportError as exc:
        raise DependencyError(f"the deep preset needs torch: pip install 'asmkit[deep]' ({exc})") from None
    backbone = check_choice(opts["backbone"], "features.backbone", ("efficientnet_lite0",))
    kwargs = {
        k: opts[k]
        for k in ("nfeat", "selection", "max_size", "upscale_below", "smoothing", "batch_size", "amp")
        if k in opts
    }
    for key in ("scales", "rotations"):
        if key in opts:
            kwargs[key] = tuple(opts[key])
    return DeepExtractor(
        EfficientNetLite0(stage=opts["stage"]),
        device=opts.get("device", device),
        whitening=whitening,
        name=f"{backbone}",
        **kwargs,
    )


def _sample(paths: Sequence[Path], n: int, seed: int) -> list[Path]:
    if len(paths) <= n:
        return list(paths)
    rng = np.random.default_rng(seed)
    return [paths[i] for i in sorted(rng.choice(len(paths), n, replace=False))]


def _sample_images(paths: Sequence[Path], max_size: int | None) -> Iterator[np.ndarray]:
    """Decoded sample images; broken files are skipped (extraction reports them)."""
    for path in paths:
        try:
            yield load_image(path, max_size=max_size)
        except ImageLoadError:
            continue


def build_extractor(
    features: Mapping[str, Any],
    *,
    sample: Sequence[str | os.PathLike] = (),
    saved: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> Features:
    """The extractor of a ``[features]`` table, its whitening learned when it needs one.

    Parameters
    ----------
    features : mapping
        A ``[features]`` table (see the module docstring).
    sample : sequence of path
        Images to learn a whitening from (no labels needed), when one must be learned.
    saved : path, optional
        Where a learned whitening is kept: reused when the file exists, written otherwise
        (a ``.npz`` for sift, the extractor's ``.pt`` for deep). The caller names it after
        what it was learned on.
    model : path, optional
        MASt3R retrieval checkpoint (type ``mast3r``).
    device : str
        Where deep features are computed; a ``device`` in ``features`` wins.
    seed : int
        Seed of the image sample.

    Returns
    -------
    Features

    Raises
    ------
    ArgumentError
        A bad table (see :func:`feature_options`), ``mast3r`` without ``model``, or no
        readable sample image to learn the whitening from.
    """
    opts = feature_options(features)
    kind = opts.pop("type")
    dim = opts.pop("whitening_dim", None)
    shrinkage = opts.pop("whitening_shrinkage", 1.0)
    n_images = opts.pop("whitening_images", _WHITENING_IMAGES)
    saved = Path(saved) if saved is not None else None
    paths = _sample([Path(p) for p in sample], n_images, seed)
    if kind == "sift":
        extractor = SiftExtractor(**opts)
        if dim is None:
            return Features(extractor)
        if saved is not None and saved.is_file():
            return Features(extractor, PCAWhitening.load(saved))
        vecs = [extractor.extract(img).descriptors for img in _sample_images(paths, extractor.max_size)]
        if not vecs:
            raise ArgumentError("images: no readable image to learn the whitening from")
        whitening = PCAWhitening.learn(np.concatenate(vecs), dim=dim, shrinkage=shrinkage)
        logger.info("learned a %d -> %d whitening on %d images", whitening.input_dim, whitening.output_dim, len(vecs))
        if saved is not None:
            whitening.save(saved)
        return Features(extractor, whitening)
    if kind == "deep":
        device = opts.get("device", device)
        if saved is not None and saved.is_file():
            from .deep import DeepExtractor

            return Features(DeepExtractor.load(saved, device=device))
        extractor = deep_extractor(**{**opts, "device": device})
        extractor.learn_whitening(_sample_images(paths, extractor.max_size), dim=dim, shrinkage=shrinkage)
        if saved is not None:
            extractor.save(saved)
        return Features(extractor)
    if model is None:
        raise ArgumentError("--model: the mast3r preset needs a MASt3R retrieval checkpoint")
    try:
        from .deep import DeepExtractor
        from .mast3r import load_mast3r_checkpoint
    except ImportError as exc:
        raise DependencyError(f"the mast3r preset needs torch: pip install 'asmkit[deep]' ({exc})") from None
    device = opts.get("device", device)
    loaded = load_mast3r_checkpoint(model, device=device)
    extractor = DeepExtractor(
        loaded.backbone, loaded.head, nfeat=loaded.head.nfeat, max_size=loaded.imsize, name="mast3r", device=device
    )
    return Features(extractor, codebook=loaded.codebook)
