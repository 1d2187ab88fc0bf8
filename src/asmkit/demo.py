"""The embedded demo data set: seeded variants of photos shipped with scikit-image.

``build_demo_set`` takes a handful of real photos from ``skimage.data`` and writes, for
each, several seeded variants (rotation, perspective warp, crop, scale, brightness and
contrast, JPEG quality) as JPEGs, plus a ``gt.json`` in the format of the shared data sets:
one query per photo, the photo's other variants as positives, the query itself as junk.
It needs no download, so examples and tests can run a whole retrieval offline.

scikit-image is an optional dependency: ``pip install 'asmkit[demo]'``.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance

from ._io import write_text_atomic
from ._validation import ArgumentError, DependencyError

__all__ = ["DEMO_PHOTOS", "build_demo_set"]

logger = logging.getLogger(__name__)


def _first(name: str) -> Callable[[Any], np.ndarray]:
    return lambda data: getattr(data, name)()[0]


def _plain(name: str) -> Callable[[Any], np.ndarray]:
    return lambda data: getattr(data, name)()


#: Photos used, by name: real (not synthetic) images that give plenty of SIFT keypoints
#: and are bundled with scikit-image (no download).
DEMO_PHOTOS: dict[str, Callable[[Any], np.ndarray]] = {
    "astronaut": _plain("astronaut"),
    "coffee": _plain("coffee"),
    "chelsea": _plain("chelsea"),
    "rocket": _plain("rocket"),
    "motorcycle": _first("stereo_motorcycle"),
    "immunohistochemistry": _plain("immunohistochemistry"),
    "hubble_deep_field": _plain("hubble_deep_field"),
    "camera": _plain("camera"),
    "coins": _plain("coins"),
    "page": _plain("page"),
}


def _skimage_data() -> Any:
    try:
        return importlib.import_module("skimage.data")
    except ImportError as exc:
        raise DependencyError("the demo data set needs scikit-image: pip install 'asmkit[demo]'") from exc


def _perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> list[float]:
    """Coefficients of Pillow's PERSPECTIVE transform mapping output ``dst`` to input ``src``.

    Parameters
    ----------
    src, dst : ndarray of float64, shape [4, 2]
        Corresponding points in the input and output images.
    """
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for n, ((x, y), (u, v)) in enumerate(zip(dst, src)):
        a[2 * n] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * n + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * n], b[2 * n + 1] = u, v
    return np.linalg.solve(a, b).tolist()


def _variant(base: Image.Image, rng: np.random.Generator, max_size: int) -> tuple[Image.Image, int]:
    """One random view of ``base`` and its JPEG quality."""
    gray = (128, 128, 128)
    image = base.rotate(float(rng.uniform(-25, 25)), resample=Image.Resampling.BICUBIC, fillcolor=gray)
    w, h = image.size
    # Perspective: move each corner inwards or outwards by up to 8% of the side.
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    jitter = rng.uniform(-0.08, 0.08, size=(4, 2)) * np.array([w, h])
    image = image.transform(
        (w, h),
        Image.Transform.PERSPECTIVE,
        _perspective_coeffs(corners + jitter, corners),
        resample=Image.Resampling.BICUBIC,
        fillcolor=gray,
    )
    # Crop 70-95% of each side at a random place.
    cw, ch = (int(round(s * rng.uniform(0.70, 0.95))) for s in (w, h))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    image = image.crop((x0, y0, x0 + cw, y0 + ch))
    # Scale: longest side 60-100% of max_size.
    scale = rng.uniform(0.6, 1.0) * max_size / max(cw, ch)
    size = (max(1, int(round(cw * scale))), max(1, int(round(ch * scale))))
    image = image.resize(size, resample=Image.Resampling.LANCZOS)
    image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.7, 1.3)))
    image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.8, 1.2)))
    return image, int(rng.integers(60, 96))


def _to_pil(array: np.ndarray, max_size: int) -> Image.Image:
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    image = Image.fromarray(arr).convert("RGB")
    image.thumbnail((max_size, max_size), resample=Image.Resampling.LANCZOS)
    return image


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def build_demo_set(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_variants: int = 4,
    max_size: int = 480,
    photos: Sequence[str] | None = None,
) -> Path:
    """Build the demo retrieval set in ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Output folder; receives ``images/<photo>_<v>.jpg`` and ``gt.json``. Existing
        files of the same names are overwritten.
    seed : int
        Seed of the random views; the same seed gives byte-identical files.
    n_variants : int
        Views per photo (>= 2): view 0 is the query, the others its positives.
    max_size : int
        Longest side of the photos before the views are made (>= 32); views are 60-100%
        of it.
    photos : sequence of str, optional
        Subset of :data:`DEMO_PHOTOS` names (default: all).

    Returns
    -------
    Path
        ``out_dir``, ready for :func:`asmkit.evaluate.load_ground_truth`.

    Raises
    ------
    asmkit.DependencyError
        If scikit-image is not installed.
    asmkit.ArgumentError
        For an invalid argument, naming it.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ArgumentError(f"seed: expected a non-negative integer, got {seed!r}")
    if isinstance(n_variants, bool) or not isinstance(n_variants, (int, np.integer)) or n_variants < 2:
        raise ArgumentError(f"n_variants: expected an integer >= 2, got {n_variants!r}")
    if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < 32:
        raise ArgumentError(f"max_size: expected an integer >= 32, got {max_size!r}")
    chosen = list(DEMO_PHOTOS) if photos is None else list(photos)
    unknown = [p for p in chosen if p not in DEMO_PHOTOS]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ArgumentError(f"photos: expected distinct names among {sorted(DEMO_PHOTOS)}, got {photos!r}")
    data = _skimage_data()

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images: list[str] = []
    groups: list[list[str]] = []
    for photo_index, photo in enumerate(chosen):
        base = _to_pil(DEMO_PHOTOS[photo](data), int(max_size))
        group = []
        for v in range(int(n_variants)):
            # One generator per (seed, photo, view): a view does not depend on which
            # other photos or how many views were asked for.
            rng = np.random.default_rng([int(seed), sorted(DEMO_PHOTOS).index(photo), v])
            image, quality = _variant(base, rng, int(max_size))
            name = f"images/{photo}_{v}.jpg"
            image.save(out / name, format="JPEG", quality=quality)
            group.append(name)
        images.extend(group)
        groups.append(group)
        logger.debug("demo: %s (%d/%d)", photo, photo_index + 1, len(chosen))

    queries = [g[0] for g in groups]
    gt = {
        "name": "asmkit-demo",
        "images": images,
        "queries": queries,
        "positives": {g[0]: g[1:] for g in groups},
        "junk": {g[0]: [g[0]] for g in groups},
        "groups": groups,
        "protocol_note": (
            "One query per photo (view 0); positives = the photo's other views; the query "
            "is in the database and is junk in its own ranking."
        ),
        "source": "scikit-image sample photos (skimage.data), views generated by asmkit.demo",
        "seed": int(seed),
        "n_variants": int(n_variants),
        "max_size": int(max_size),
    }
    _write_json_atomic(out / "gt.json", gt)
    logger.info("demo: %d images of %d photos in %s", len(images), len(chosen), out)
    return out
