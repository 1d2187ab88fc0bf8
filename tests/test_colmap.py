"""COLMAP databases from verified pairs (pycolmap), and the Sacre Coeur reconstruction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from asmkit._validation import ArgumentError
from asmkit.verify import PairGeometry

pycolmap = pytest.importorskip("pycolmap")

from asmkit.colmap import reconstruct, write_database  # noqa: E402  (after the pycolmap skip)

_REPO = Path(__file__).resolve().parents[1]
SACRE_COEUR = (
    next(
        (
            p
            for p in (_REPO.parent / "shared", _REPO.parents[1] / "shared")
            if (p / "datasets" / "sacre_coeur" / "images").is_dir()
        ),
        _REPO.parent / "shared",
    )
    / "datasets"
    / "sacre_coeur"
    / "images"
)


def write_images(folder: Path, names, size=(160, 120)):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)


def test_database_holds_keypoints_matches_and_geometries(tmp_path):
    names = ["a.png", "b.png", "c.png"]
    write_images(tmp_path / "images", names)
    rng = np.random.default_rng(1)
    keypoints = {n: rng.uniform(0, 100, (50, 4)).astype(np.float32) for n in names}
    matches = np.stack([np.arange(30), np.arange(30)[::-1]], axis=1).astype(np.int32)
    mask = np.arange(30) < 20
    f = rng.normal(size=(3, 3))
    pairs = [
        PairGeometry("a.png", "b.png", matches, mask, 20, f),
        PairGeometry("b.png", "c.png", matches, mask, 20, None),  # no model: matches only
        PairGeometry("a.png", "c.png", matches, mask, 5, f),
    ]  # too few inliers: matches only
    db_path = tmp_path / "sfm" / "database.db"
    summary = write_database(db_path, tmp_path / "images", keypoints, pairs, min_inliers=15)
    assert summary == {"database": str(db_path), "images": 3, "matched_pairs": 3, "verified_pairs": 1}
    assert not list(db_path.parent.glob(".*tmp*"))
    db = pycolmap.Database.open(db_path)
    try:
        ids = {image.name: image.image_id for image in db.read_all_images()}
        np.testing.assert_allclose(db.read_keypoints(ids["a.png"])[:, :2], keypoints["a.png"][:, :2] + 0.5)
        assert db.num_matched_image_pairs() == 3
        assert db.num_verified_image_pairs() == 1
        got = db.read_two_view_geometry(ids["a.png"], ids["b.png"])
        inliers = np.asarray(got.inlier_matches)
        if ids["a.png"] > ids["b.png"]:
            inliers = inliers[:, ::-1]
        np.testing.assert_array_equal(inliers, matches[mask])
    finally:
        db.close()


def test_bad_input_names_the_argument(tmp_path):
    names = ["a.png"]
    write_images(tmp_path / "images", names)
    pair = PairGeometry("a.png", "z.png", np.zeros((0, 2), np.int32), np.zeros(0, bool), 0, None)
    with pytest.raises(ArgumentError, match="pairs"):
        write_database(tmp_path / "db.db", tmp_path / "images", {"a.png": np.zeros((1, 2))}, [pair])
    with pytest.raises(ArgumentError, match="camera_mode"):
        write_database(tmp_path / "db.db", tmp_path / "images", {"a.png": np.zeros((1, 2))}, [], camera_mode="x")
    with pytest.raises(FileNotFoundError, match="database"):
        reconstruct(tmp_path / "none.db", tmp_path / "images", tmp_path / "models")


@pytest.mark.slow
@pytest.mark.skipif(not SACRE_COEUR.is_dir(), reason="needs ../shared/datasets/sacre_coeur")
def test_sacre_coeur_registers_its_images(tmp_path, capsys):
    from asmkit.cli import main

    db = tmp_path / "database.db"
    status = main(
        [
            "-q",
            "pairs",
            str(SACRE_COEUR),
            "--out",
            str(tmp_path / "pairs.txt"),
            "--graph",
            "complete",
            "--verify",
            "--colmap-db",
            str(db),
            "--cache",
            str(tmp_path / "cache"),
            "--json",
            "--config",
            str(_REPO / "examples" / "sacre_coeur.toml"),
        ]
    )
    assert status == 0
    inliers = (tmp_path / "pairs.txt.inliers.txt").read_text().split("\n")
    assert len([line for line in inliers if line]) == 45
    result = reconstruct(db, SACRE_COEUR, tmp_path / "models")
    assert result["registered"] >= 8
    assert result["points"] > 500
