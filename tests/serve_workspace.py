"""A small index workspace for the ``asmkit serve`` tests, and images to upload."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from asmkit.pipeline import build_index
from broken_files import textured_image

__all__ = ["copy_workspace", "jpeg", "make_workspace"]


def jpeg(seed: int, width: int = 160, height: int = 120) -> bytes:
    """A textured JPEG (SIFT finds a hundred or so keypoints in it), distinct per seed."""
    buffer = io.BytesIO()
    Image.fromarray(textured_image(np.random.default_rng(seed), width, height)).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def make_workspace(folder: Path, n_images: int = 12) -> Path:
    """``asmkit index`` over ``n_images`` textured JPEGs (``img00.jpg`` ..., seeds 0 ...),
    a 32-word codebook; returns the workspace folder."""
    images = folder / "images"
    images.mkdir(parents=True)
    for i in range(n_images):
        (images / f"img{i:02d}.jpg").write_bytes(jpeg(i))
    build_index(images, out=folder / "ws", codebook_size=32)
    return folder / "ws"


def copy_workspace(source: Path, target: Path) -> Path:
    """A copy of a workspace that a test may change (its image root stays the source's)."""
    shutil.copytree(source, target)
    return target
