"""Regional ASMK (R-ASMK / R-ASMK*, Teichmann et al., "Detect-to-Retrieve", CVPR 2019).

A database image is described by regions (boxes in pixels, the whole image usually one
of them). Each region aggregates the residuals of the local features whose keypoint lies
inside its box; each region's aggregate is L2-normalised over all its words together;
the normalised regional aggregates are summed per visual word and the sum is normalised
(R-ASMK) or binarised (R-ASMK*) per word as ASMK does. The index keeps one row per
(image, word), as ASMK does: memory is ASMK's. docs/regions.md has the formulas and the
measurements.

This module gives:

- ``Regions``: which features of each image belong to which region (``regions_from_boxes``);
- ``aggregate_regions``: the regional aggregation, returning ``asmkit.kernel.Aggregates``
  that an index stores like ASMK's;
- the region sources: ``grid_boxes`` (R-MAC-style grid), ``propose_boxes`` (windows of
  high feature density, detector-free), ``read_box_file`` (user boxes in JSON or CSV),
  and ``region_boxes``, which picks one of them by name;
- ``in_box``: the features of a query inside a box (queries are aggregated as in ASMK,
  from the whole image or from those features).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _kernels
from ._validation import ArgumentError, FileFormatError, check_int
from .kernel import Aggregates, n_code_words, normalize_l2, prepare_descriptors
from .params import as_params

__all__ = [
    "REGION_SOURCES",
    "Regions",
    "aggregate_regions",
    "grid_boxes",
    "in_box",
    "propose_boxes",
    "read_box_file",
    "region_boxes",
    "regional_aggregates",
    "regions_for_features",
    "regions_from_boxes",
]

logger = logging.getLogger(__name__)

#: The box-free region sources ``region_boxes`` accepts by name (anything else is a file).
REGION_SOURCES = ("grid", "proposals")


@dataclass(frozen=True)
class Regions:
    """The regions of several images, as sets of their local features.

    Attributes
    ----------
    region_starts : int64 [I + 1]
        Image ``i`` owns regions ``region_starts[i]:region_starts[i + 1]``.
    member_starts : int64 [R + 1]
        Region ``r`` holds ``members[member_starts[r]:member_starts[r + 1]]``.
    members : int32 [P]
        Feature indices within their image (``0 .. n_i - 1``, the image's descriptor rows in
        input order), ascending within a region. A feature may belong to several regions.
    n_boxes : int
        Boxes given (the whole-image regions not included).
    n_clipped : int
        Boxes that reached outside their image and were clipped to it.
    n_outside : int
        Boxes with no area inside their image, dropped.
    n_empty : int
        Regions (whole image included) without any feature, dropped.
    """

    region_starts: np.ndarray
    member_starts: np.ndarray
    members: np.ndarray
    n_boxes: int = 0
    n_clipped: int = 0
    n_outside: int = 0
    n_empty: int = 0

    @property
    def n_images(self) -> int:
        return int(self.region_starts.shape[0] - 1)

    @property
    def n_regions(self) -> int:
        """Regions kept (each holds at least one feature)."""
        return int(self.member_starts.shape[0] - 1)

    def regions_per_image(self) -> np.ndarray:
        """int64 [I]: regions kept per image."""
        return np.diff(self.region_starts)


def _check_boxes(boxes, name: str) -> np.ndarray:
    """float64 [R, 4] of finite x0, y0, x1, y1 with x1 > x0 and y1 > y0."""
    arr = np.asarray(boxes, dtype=np.float64) if not isinstance(boxes, np.ndarray) else boxes
    if arr.size == 0:
        return np.empty((0, 4), dtype=np.float64)
    if arr.dtype.kind not in "fiu" or arr.ndim != 2 or arr.shape[1] != 4:
        raise ArgumentError(f"{name}: expected boxes [R, 4] (x0, y0, x1, y1), got shape {arr.shape}, dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ArgumentError(f"{name}: boxes must be finite numbers")
    bad = np.flatnonzero((arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1]))
    if bad.size:
        raise ArgumentError(f"{name}: box {int(bad[0])} {arr[bad[0]].tolist()} needs x1 > x0 and y1 > y0")
    return arr


def _check_points(points, name: str) -> np.ndarray:
    arr = np.asarray(points)
    if arr.dtype.kind not in "fiu" or arr.ndim != 2 or arr.shape[1] < 2:
        raise ArgumentError(f"{name}: expected keypoints [n, >= 2] (x, y first), got shape {arr.shape}")
    return arr[:, :2].astype(np.float64)


def in_box(keypoints, box) -> np.ndarray:
    """The features whose keypoint lies in a box (borders included).

    Parameters
    ----------
    keypoints : float32 [n, >= 2]
        x, y first (``ImageFeatures.keypoints``).
    box : sequence of 4 numbers
        x0, y0, x1, y1 in pixels.

    Returns
    -------
    bool [n]
    """
    xy = _check_points(keypoints, "keypoints")
    x0, y0, x1, y1 = _check_boxes(np.asarray([box], dtype=np.float64), "box")[0]
    return (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)


def regions_from_boxes(
    keypoints: Sequence, boxes: Sequence, sizes: Sequence | None = None, *, whole_image: bool = True
) -> Regions:
    """Regions of several images from their keypoints and boxes.

    Parameters
    ----------
    keypoints : list of float32 [n_i, >= 2]
        Per image, the keypoint of each feature (x, y in pixels first), in descriptor order.
    boxes : list of float [R_i, 4]
        Per image, boxes x0, y0, x1, y1 in the keypoints' pixels (R_i may be 0).
    sizes : list of (width, height), optional
        Image sizes: boxes are clipped to them (counted in ``n_clipped``), boxes with no
        area inside are dropped (``n_outside``). Without sizes nothing is clipped.
    whole_image : bool
        Add the whole image (every feature) as the first region of each image. When False,
        an image left without boxes (none given, or none inside it) still gets it, so that
        every image stays searchable.

    Returns
    -------
    Regions
        Regions without any feature are dropped and counted (``n_empty``).

    Raises
    ------
    asmkit._validation.ArgumentError
        Lists of different lengths, malformed keypoints or boxes (naming the image).
    """
    if len(boxes) != len(keypoints):
        raise ArgumentError(f"boxes: {len(boxes)} entries for {len(keypoints)} images")
    if sizes is not None and len(sizes) != len(keypoints):
        raise ArgumentError(f"sizes: {len(sizes)} entries for {len(keypoints)} images")
    region_counts = np.zeros(len(keypoints), dtype=np.int64)
    sets: list[np.ndarray] = []
    n_boxes = n_clipped = n_outside = n_empty = 0
    for i, (points, image_boxes) in enumerate(zip(keypoints, boxes)):
        xy = _check_points(points, f"keypoints[{i}]")
        arr = _check_boxes(image_boxes, f"boxes[{i}]")
        n_boxes += arr.shape[0]
        if sizes is not None and arr.shape[0]:
            width, height = (float(v) for v in sizes[i])
            clipped = np.clip(arr, 0.0, [width, height, width, height])
            area = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
            n_outside += int((~area).sum())
            n_clipped += int((area & np.any(clipped != arr, axis=1)).sum())
            arr = clipped[area]
        candidates = []
        if whole_image or arr.shape[0] == 0:
            candidates.append(np.arange(xy.shape[0], dtype=np.int32))
        for x0, y0, x1, y1 in arr:
            inside = (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
            candidates.append(np.flatnonzero(inside).astype(np.int32))
        for members in candidates:
            if members.size:
                sets.append(members)
                region_counts[i] += 1
            else:
                n_empty += 1
    region_starts = np.zeros(len(keypoints) + 1, dtype=np.int64)
    np.cumsum(region_counts, out=region_starts[1:])
    member_starts = np.zeros(len(sets) + 1, dtype=np.int64)
    np.cumsum([s.shape[0] for s in sets], out=member_starts[1:])
    members = np.concatenate(sets) if sets else np.empty(0, dtype=np.int32)
    return Regions(region_starts, member_starts, members, n_boxes, n_clipped, n_outside, n_empty)


def aggregate_regions(
    vecs: np.ndarray,
    assignments: np.ndarray,
    starts: np.ndarray,
    order: np.ndarray,
    centroids: np.ndarray,
    regions: Regions,
    *,
    binary: bool,
) -> Aggregates:
    """R-ASMK aggregation of images given their regions (docs/regions.md, steps 1-4).

    Per region r: V_r(c) = Σ (x - q_c) over the region's features x with c among their
    words; V_r is divided by its L2 norm over all its words together; V(c) = Σ_r V_r(c);
    then per word as ``asmkit.kernel.aggregate`` does: ``V(c) / (‖V(c)‖ + 1e-6)``, or the
    packed bits ``V(c) > 0``. An image's words are those its regions' features reach. With
    the whole image as the only region the binary codes are ASMK*'s bit for bit, and the
    real ones ASMK's up to the 1e-6 of the per-word normalisation.

    Parameters
    ----------
    vecs : float32 [N, D]
        Descriptors (C-contiguous).
    assignments : int64 [N, m]
        The m nearest words of each descriptor.
    starts, order : int64 [I + 1], int64 [N]
        Rows grouped by image (``asmkit.kernel.Descriptors``); ``starts`` may be a window
        ``starts[i0:i1 + 1]``, and ``regions`` then describes images ``i0 .. i1 - 1``.
    centroids : float32 [K, D]
    regions : Regions
        One entry per image of ``starts``; member indices below each image's row count.
    binary : bool
        R-ASMK* (packed sign bits) or R-ASMK (real, L2-normalised per word).

    Returns
    -------
    asmkit.kernel.Aggregates
        Rows sorted by (image, word).

    Raises
    ------
    asmkit._validation.ArgumentError
        ``regions`` does not match the images (count, or a member beyond an image's rows).
    """
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    assignments = np.ascontiguousarray(assignments, dtype=np.int64)
    n_images = starts.shape[0] - 1
    if not isinstance(regions, Regions):
        raise ArgumentError(f"regions: expected asmkit.regions.Regions, got {type(regions).__name__}")
    if regions.n_images != n_images:
        raise ArgumentError(f"regions: describes {regions.n_images} images, the descriptors have {n_images}")
    if regions.members.size:
        image_of_region = np.repeat(np.arange(n_images), regions.regions_per_image())
        image_of_member = np.repeat(image_of_region, np.diff(regions.member_starts))
        rows = np.diff(starts)[image_of_member]
        beyond = np.flatnonzero((regions.members < 0) | (regions.members >= rows))
        if beyond.size:
            image = int(image_of_member[beyond[0]])
            raise ArgumentError(
                f"regions: image {image} has {int(rows[beyond[0]])} descriptors, "
                f"a region lists feature {int(regions.members[beyond[0]])}"
            )
    region_starts = np.ascontiguousarray(regions.region_starts, dtype=np.int64)
    member_starts = np.ascontiguousarray(regions.member_starts, dtype=np.int64)
    members = np.ascontiguousarray(regions.members, dtype=np.int32)
    n_pairs = int(members.shape[0]) * assignments.shape[1]
    with _kernels.thread_budget(n_pairs, _kernels.MIN_PARALLEL_PAIRS) as threads:
        n_blocks = max(1, min(n_images, 4 * threads))
        n_words = _kernels.region_word_count(
            assignments, order, starts, region_starts, member_starts, members, centroids.shape[0], n_blocks
        )
        offsets = np.zeros(n_images + 1, dtype=np.int64)
        np.cumsum(n_words, out=offsets[1:])
        n_rows, dim = int(offsets[-1]), vecs.shape[1]
        words = np.empty(n_rows, dtype=np.int64)
        codes = np.empty((n_rows, n_code_words(dim)) if binary else (0, 0), dtype=np.uint64)
        real = np.empty((0, 0) if binary else (n_rows, dim), dtype=np.float32)
        used = np.zeros(n_images, dtype=np.int64)
        _kernels.region_aggregate_fill(
            vecs,
            centroids,
            assignments,
            order,
            starts,
            region_starts,
            member_starts,
            members,
            offsets,
            binary,
            n_blocks,
            words,
            codes,
            real,
            used,
        )
    return Aggregates(offsets, words, codes if binary else normalize_l2(real))


def regional_aggregates(codebook, vecs, regions: Regions, image_ids=None, params=None) -> Aggregates:
    """Quantize and aggregate database images with their regions (R-ASMK / R-ASMK*).

    The counterpart of ASMK's database-side aggregation: all rows are quantized in one
    call with ``params.ma_database``, then ``aggregate_regions``. The result goes to
    ``Index.add_aggregates`` like ASMK's aggregates.

    Parameters
    ----------
    codebook : asmkit.Codebook
    vecs : float32 [N, D] or list of float32 [n_i, D]
        Descriptors (see ``asmkit.kernel.prepare_descriptors``).
    regions : Regions
        One entry per image, in the order of the distinct ids (ascending for array input,
        list order for list input); members index the image's rows in input order.
    image_ids : int64 [N], or None / int64 [len(vecs)] for list input
    params : Params, preset name, dict or None
        ``binary`` and ``ma_database`` are used.

    Returns
    -------
    asmkit.kernel.Aggregates
    """
    params = as_params(params)
    desc = prepare_descriptors(vecs, image_ids, dim=codebook.dim)
    words = codebook.quantize(desc.vecs, params.ma_database)
    return aggregate_regions(
        desc.vecs, words, desc.starts, desc.order, codebook.centroids, regions, binary=params.binary
    )


# -- region sources -----------------------------------------------------------------------------


def grid_boxes(width: float, height: float, *, levels: int = 3, overlap: float = 0.4) -> np.ndarray:
    """R-MAC-style regions (Tolias, Sicre and Jégou, ICLR 2016): squares over several scales.

    Level l = 1 .. ``levels`` has squares of side ``2 · min(width, height) / (l + 1)``,
    laid out evenly over each axis, with as few squares as keep consecutive ones
    overlapping by at least ``overlap`` of their side.

    Parameters
    ----------
    width, height : float
        The area to cover, in pixels (an image, or the extent of its keypoints).
    levels : int
    overlap : float
        In [0, 1).

    Returns
    -------
    float64 [R, 4]
        x0, y0, x1, y1; a 640 x 480 image has 2 + 6 + 12 = 20 boxes at 3 levels.
    """
    levels = check_int(levels, "levels", min=1)
    if not (0.0 <= float(overlap) < 1.0):
        raise ArgumentError(f"overlap: expected a number in [0, 1), got {overlap!r}")
    width, height = float(width), float(height)
    if not (width > 0 and height > 0):
        raise ArgumentError(f"width, height: must be positive, got {width} x {height}")
    out = []
    for level in range(1, levels + 1):
        side = 2.0 * min(width, height) / (level + 1)
        step = side * (1.0 - float(overlap))
        positions = []
        for extent in (width, height):
            n = 1 + max(0, math.ceil((extent - side) / step - 1e-9))
            positions.append(np.linspace(0.0, extent - side, n) if n > 1 else np.array([(extent - side) / 2]))
        for y in positions[1]:
            for x in positions[0]:
                out.append((x, y, x + side, y + side))
    return np.asarray(out, dtype=np.float64)


def propose_boxes(
    keypoints,
    width: float,
    height: float,
    *,
    n: int = 8,
    weights=None,
    scales: Sequence[float] = (0.25, 0.35, 0.5),
    cells: int = 32,
    max_iou: float = 0.5,
) -> np.ndarray:
    """Detector-free proposals: the windows holding the most features beyond their share.

    Windows of the image's aspect ratio, ``scales`` of its sides, slide over a
    ``cells`` x ``cells`` lattice; a window scores the (weighted) features inside it minus
    what a uniform spread over the image would put there. The best windows are kept
    greedily, skipping those overlapping a kept one by IoU above ``max_iou``, up to ``n``.

    Parameters
    ----------
    keypoints : float32 [n_f, >= 2]
        x, y first.
    width, height : float
        The image (or keypoint extent) size in pixels.
    n : int
        Boxes kept at most.
    weights : float32 [n_f], optional
        Per-feature weight (attention, detector response); default 1.
    scales : sequence of float
        Window sides as fractions of the image's sides, in (0, 1].
    cells : int
        Lattice resolution.
    max_iou : float

    Returns
    -------
    float64 [R, 4]
        x0, y0, x1, y1 by decreasing score, R <= n; windows that score <= 0 are not kept.
    """
    n = check_int(n, "n", min=1)
    cells = check_int(cells, "cells", min=2)
    xy = _check_points(keypoints, "keypoints")
    width, height = float(width), float(height)
    if not (width > 0 and height > 0):
        raise ArgumentError(f"width, height: must be positive, got {width} x {height}")
    if xy.shape[0] == 0:
        return np.empty((0, 4), dtype=np.float64)
    w = np.ones(xy.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != xy.shape[0] or not np.isfinite(w).all() or (w < 0).any():
        raise ArgumentError(f"weights: expected {xy.shape[0]} finite non-negative numbers")
    gx = np.clip((xy[:, 0] / width * cells).astype(np.int64), 0, cells - 1)
    gy = np.clip((xy[:, 1] / height * cells).astype(np.int64), 0, cells - 1)
    grid = np.zeros((cells, cells))
    np.add.at(grid, (gy, gx), w)
    integral = np.zeros((cells + 1, cells + 1))
    integral[1:, 1:] = grid.cumsum(0).cumsum(1)
    total = integral[-1, -1]
    candidates, scores = [], []
    for scale in scales:
        if not (0.0 < float(scale) <= 1.0):
            raise ArgumentError(f"scales: expected fractions in (0, 1], got {scale!r}")
        side = max(1, round(float(scale) * cells))
        y0, x0 = np.meshgrid(np.arange(cells - side + 1), np.arange(cells - side + 1), indexing="ij")
        inside = integral[y0 + side, x0 + side] - integral[y0, x0 + side] - integral[y0 + side, x0] + integral[y0, x0]
        scores.append((inside - total * (side / cells) ** 2).ravel())
        candidates.append(np.stack([x0.ravel(), y0.ravel(), x0.ravel() + side, y0.ravel() + side], axis=1))
    score = np.concatenate(scores)
    boxes = np.concatenate(candidates).astype(np.float64) * np.array([width, height, width, height]) / cells
    kept: list[int] = []
    for j in np.argsort(-score, kind="stable"):
        if score[j] <= 0 or len(kept) == n:
            break
        if kept and _iou(boxes[j], boxes[kept]).max() > max_iou:
            continue
        kept.append(int(j))
    return boxes[kept]


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / (area + areas - inter)


def _normalise_name(name: str) -> str:
    return os.path.normpath(name.strip()).replace(os.sep, "/")


def _box_from_values(values, path, line: int) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        raise FileFormatError(path, f"line {line}: a box is 4 numbers [x0, y0, x1, y1], got {values!r}")
    try:
        box = [float(v) for v in values]
    except (TypeError, ValueError):
        raise FileFormatError(path, f"line {line}: a box is 4 numbers [x0, y0, x1, y1], got {values!r}") from None
    if isinstance(values[0], bool) or not all(math.isfinite(v) for v in box):
        raise FileFormatError(path, f"line {line}: box {values!r} has a value that is not a finite number")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise FileFormatError(path, f"line {line}: box {values!r} needs x1 > x0 and y1 > y0")
    return box


def read_box_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Boxes per image from a JSON or CSV file.

    JSON (``.json``): an object mapping an image path to a list of ``[x0, y0, x1, y1]``.
    CSV (any other name): one box per line, ``image,x0,y0,x1,y1``; a first line whose
    coordinates are not numbers is a header; ``#`` starts a comment line.

    Image paths are normalised (``./a//b.jpg`` is ``a/b.jpg``); coordinates are pixels of
    the image as loaded.

    Returns
    -------
    dict of str -> float64 [R, 4]

    Raises
    ------
    FileNotFoundError
        No such file.
    asmkit._validation.FileFormatError
        Malformed content, naming the file and the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(path, f"not UTF-8 text ({exc.reason})") from None
    out: dict[str, list[list[float]]] = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FileFormatError(path, f"line {exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise FileFormatError(path, "line 1: expected a JSON object mapping image paths to lists of boxes")
        for name, boxes in data.items():
            # JSON parsers report no positions for values: the key's first occurrence is its line.
            at = text.find(json.dumps(name))
            line = text.count("\n", 0, at) + 1 if at >= 0 else 1
            if not isinstance(boxes, list):
                raise FileFormatError(path, f"line {line}: {name!r} must map to a list of boxes")
            out.setdefault(_normalise_name(name), []).extend(_box_from_values(b, path, line) for b in boxes)
    else:
        reader = csv.reader(io.StringIO(text))
        for row in reader:
            line = reader.line_num
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) != 5:
                raise FileFormatError(path, f"line {line}: expected image,x0,y0,x1,y1 (5 fields), got {len(row)}")
            if line == 1 and not _is_number(row[1]):
                continue
            out.setdefault(_normalise_name(row[0]), []).append(_box_from_values(row[1:], path, line))
    return {name: np.asarray(boxes, dtype=np.float64).reshape(-1, 4) for name, boxes in out.items()}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _extent(points: np.ndarray, size) -> tuple[float, float]:
    """The image size, or without it the extent of the keypoints (at least one pixel)."""
    if size is not None:
        return float(size[0]), float(size[1])
    if points.shape[0] == 0:
        return 1.0, 1.0
    return max(1.0, float(points[:, 0].max()) + 1.0), max(1.0, float(points[:, 1].max()) + 1.0)


def region_boxes(
    source: str | os.PathLike | Mapping[str, np.ndarray],
    names: Sequence[str],
    keypoints: Sequence,
    sizes: Sequence | None = None,
    *,
    weights: Sequence | None = None,
    grid_levels: int = 3,
    n_proposals: int = 8,
) -> list[np.ndarray]:
    """Boxes per image from a named source.

    Parameters
    ----------
    source : "grid", "proposals", a box file path, or a mapping name -> boxes [R, 4]
    names : list of str
        Image names, as the box file names them (ignored by grid and proposals).
    keypoints : list of float32 [n_i, >= 2]
    sizes : list of (width, height), optional
        Image sizes; grid and proposals otherwise cover the extent of the keypoints.
    weights : list of float32 [n_i], optional
        Feature weights for the proposals (attention, detector response).
    grid_levels, n_proposals : int
        Settings of ``grid_boxes`` and ``propose_boxes``.

    Returns
    -------
    list of float64 [R_i, 4]
        Images the box file does not name get no boxes (the whole image only); file entries
        naming no image are logged.
    """
    if len(names) != len(keypoints):
        raise ArgumentError(f"names: {len(names)} names for {len(keypoints)} images")
    if sizes is not None and len(sizes) != len(keypoints):
        raise ArgumentError(f"sizes: {len(sizes)} entries for {len(keypoints)} images")
    if isinstance(source, str) and source in REGION_SOURCES:
        out = []
        for i, points in enumerate(keypoints):
            xy = _check_points(points, f"keypoints[{i}]")
            width, height = _extent(xy, None if sizes is None else sizes[i])
            if source == "grid":
                out.append(grid_boxes(width, height, levels=grid_levels))
            else:
                w = None if weights is None else weights[i]
                out.append(propose_boxes(xy, width, height, n=n_proposals, weights=w))
        return out
    table = source if isinstance(source, Mapping) else read_box_file(source)
    wanted = [_normalise_name(str(name)) for name in names]
    unknown = sorted(set(table) - set(wanted))
    if unknown:
        logger.warning("%d box entries name no image (first: %s)", len(unknown), unknown[0])
    empty = np.empty((0, 4), dtype=np.float64)
    return [np.asarray(table.get(name, empty), dtype=np.float64).reshape(-1, 4) for name in wanted]


def regions_for_features(
    source, names: Sequence[str], features: Sequence, sizes: Sequence | None = None, *, whole_image: bool = True
) -> Regions:
    """Regions of images from their local features and a region source (the command line's
    ``--regions``).

    Parameters
    ----------
    source : "grid", "proposals", a box file path, or a mapping name -> boxes [R, 4]
    names : list of str
        Image names as the box file names them.
    features : list of asmkit.features.ImageFeatures
        With keypoints (x, y first); ``attention`` weighs the proposals when present.
    sizes : list of (width, height), optional
    whole_image : bool

    Raises
    ------
    asmkit._validation.ArgumentError
        An image without keypoints.
    """
    keypoints, weights = [], []
    for name, feats in zip(names, features):
        if feats.keypoints is None:
            raise ArgumentError(f"regions: image {name!r} has no keypoints, regions need them")
        keypoints.append(feats.keypoints)
        weights.append(feats.attention)
    use_weights = None if any(w is None for w in weights) else weights
    boxes = region_boxes(source, names, keypoints, sizes, weights=use_weights)
    return regions_from_boxes(keypoints, boxes, sizes, whole_image=whole_image)
