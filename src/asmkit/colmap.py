"""COLMAP databases from verified pairs, and reconstruction with pycolmap (extra ``[sfm]``).

The shape follows hloc's ``reconstruction.py``: asmkit imports the images (cameras from
EXIF, or COLMAP's default focal length), writes each image's keypoints, each verified
pair's tentative matches and its two-view geometry (the fundamental matrix and its inlier
matches), and COLMAP's incremental mapper then reconstructs from the database without
matching again::

    asmkit pairs IMAGES --out pairs.txt --graph complete --verify --colmap-db sfm/database.db
    python -c "import pycolmap; pycolmap.incremental_mapping('sfm/database.db', IMAGES, 'sfm/models')"

Keypoints go in as given, plus half a pixel: OpenCV puts pixel centres on integers, COLMAP
on half-integers. They must be in the pixels of the image files (features extracted
without downscaling, or rescaled by the caller).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._validation import ArgumentError, DependencyError
from .verify import PairGeometry

__all__ = ["reconstruct", "write_database"]

logger = logging.getLogger(__name__)


def _pycolmap():
    try:
        import pycolmap
    except ImportError as exc:
        raise DependencyError(f"COLMAP output needs pycolmap: pip install 'asmkit[sfm]' ({exc})") from None
    return pycolmap


def write_database(
    path: str | os.PathLike,
    image_dir: str | os.PathLike,
    keypoints: Mapping[str, np.ndarray],
    pairs: Sequence[PairGeometry],
    *,
    min_inliers: int = 15,
    camera_mode: str = "auto",
) -> dict[str, Any]:
    """Write a COLMAP database: images, keypoints, matches and two-view geometries.

    The database is built in a sibling temporary file and moved into place, so an
    interrupted write leaves the previous file (if any).

    Parameters
    ----------
    path : path
        The ``.db`` file (replaced when it exists).
    image_dir : path
        The folder the image names are relative to.
    keypoints : mapping of str to float32 [n, >= 2]
        Each image's keypoints (x, y first), indexed by the pairs' matches.
    pairs : sequence of PairGeometry
        From ``asmkit.verify.verify_pairs``. Every pair's matches are written; pairs with
        at least ``min_inliers`` inliers and a fundamental matrix also get a two-view
        geometry (the ones the mapper uses).
    min_inliers : int
    camera_mode : {"auto", "single", "per_folder", "per_image"}
        COLMAP's camera sharing (``auto``: one camera per size and EXIF model).

    Returns
    -------
    dict
        ``{"database", "images", "matched_pairs", "verified_pairs"}``.
    """
    pycolmap = _pycolmap()
    modes = {
        "auto": pycolmap.CameraMode.AUTO,
        "single": pycolmap.CameraMode.SINGLE,
        "per_folder": pycolmap.CameraMode.PER_FOLDER,
        "per_image": pycolmap.CameraMode.PER_IMAGE,
    }
    if camera_mode not in modes:
        raise ArgumentError(f"camera_mode: expected one of {', '.join(modes)}, got {camera_mode!r}")
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image_dir: no such folder: {image_dir}")
    names = sorted(keypoints)
    missing = sorted({n for p in pairs for n in (p.name_a, p.name_b)} - set(names))
    if missing:
        raise ArgumentError(f"pairs: images without keypoints: {missing[:10]}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    verified = 0
    try:
        pycolmap.Database.open(tmp).close()  # import_images wants an existing database
        pycolmap.import_images(tmp, image_dir, camera_mode=modes[camera_mode], image_names=names)
        db = pycolmap.Database.open(tmp)
        try:
            image_id = {image.name: image.image_id for image in db.read_all_images()}
            absent = [n for n in names if n not in image_id]
            if absent:
                raise ArgumentError(f"keypoints: images COLMAP could not import from {image_dir}: {absent[:10]}")
            for name in names:
                kp = np.asarray(keypoints[name], dtype=np.float32)
                db.write_keypoints(image_id[name], np.ascontiguousarray(kp[:, :2] + 0.5))
            for pair in pairs:
                a, b = image_id[pair.name_a], image_id[pair.name_b]
                if pair.matches.shape[0] == 0:
                    continue
                db.write_matches(a, b, pair.matches.astype(np.uint32))
                if pair.inliers >= min_inliers and pair.matrix is not None:
                    geometry = pycolmap.TwoViewGeometry()
                    geometry.config = pycolmap.TwoViewGeometryConfiguration.UNCALIBRATED
                    geometry.F = pair.matrix
                    geometry.inlier_matches = pair.matches[pair.mask].astype(np.uint32)
                    db.write_two_view_geometry(a, b, geometry)
                    verified += 1
        finally:
            db.close()
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %d images and %d verified pairs to %s", len(names), verified, target)
    return {
        "database": str(target),
        "images": len(names),
        "matched_pairs": sum(p.matches.shape[0] > 0 for p in pairs),
        "verified_pairs": verified,
    }


def reconstruct(database: str | os.PathLike, image_dir: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Run COLMAP's incremental mapper (pycolmap) on a database written by ``write_database``.

    Parameters
    ----------
    database, image_dir : path
    out : path
        Folder for the models (``out/0``, ``out/1``, ... as COLMAP writes them).

    Returns
    -------
    dict
        ``{"models", "registered", "points", "registered_images"}`` of the largest model
        (0 registered when the mapper found none).
    """
    pycolmap = _pycolmap()
    if not Path(database).is_file():
        raise FileNotFoundError(f"database: no such file: {database}")
    Path(out).mkdir(parents=True, exist_ok=True)
    models = pycolmap.incremental_mapping(database, image_dir, out)
    if not models:
        return {"models": 0, "registered": 0, "points": 0, "registered_images": []}
    best = max(models.values(), key=lambda rec: rec.num_reg_images())
    names = sorted(best.images[i].name for i in best.reg_image_ids())
    return {
        "models": len(models),
        "registered": best.num_reg_images(),
        "points": best.num_points3D(),
        "registered_images": names,
    }
