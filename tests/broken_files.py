"""Generator of folders mixing good, unusual and broken image files, for tests.

``make_broken_folder`` writes small synthetic images: good ones in many formats and modes
(which must load) and broken ones (which must be skipped and reported). It returns which is
which, so tests can check that extraction skips exactly the bad files.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["BrokenFolder", "make_broken_folder", "textured_image", "png_header_only"]

#: Broken kinds and a fragment of the reason ``load_image`` must give for each.
BAD_KINDS = {
    "truncated": "truncated",
    "empty": "empty file",
    "text": "not a recognised image format",
    "tiny": "too small",
    "bomb": "too large",
}


@dataclass
class BrokenFolder:
    """What ``make_broken_folder`` wrote.

    Attributes
    ----------
    root : pathlib.Path
    good : list of str
        Names (relative posix paths) of files that must load.
    bad : dict of str to str
        Name of each file that must fail -> a fragment of the expected reason.
    """

    root: Path
    good: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)


def textured_image(rng: np.random.Generator, width: int = 96, height: int = 72) -> np.ndarray:
    """uint8 [height, width, 3] RGB: random blocks (corners and edges, so SIFT finds keypoints)."""
    blocks = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)[:height, :width])


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width × height`` RGB pixels but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def _jpeg_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def make_broken_folder(
    directory: str | Path,
    n_good: int = 3,
    seed: int = 0,
    n_bad_each: int = 1,
    width: int = 96,
    height: int = 72,
) -> BrokenFolder:
    """Write a folder of good, unusual and broken images.

    Parameters
    ----------
    directory : path-like
        Created if missing; files go directly into it and into a ``sub/`` folder.
    n_good : int
        Plain RGB JPEGs, besides one file of each unusual kind (CMYK JPEG, 16-bit PNG,
        grayscale PNG, RGBA PNG, palette PNG, EXIF-rotated JPEG, WebP, TIFF, BMP), which
        must all load.
    seed : int
        Seed of the image content.
    n_bad_each : int
        Copies of each broken kind (truncated JPEG, zero bytes, text named .jpg, 1×1 PNG,
        PNG header claiming 20000×20000).

    Returns
    -------
    BrokenFolder
    """
    root = Path(directory)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    result = BrokenFolder(root=root)

    def write(name: str, data: bytes, bad_reason: str | None = None) -> None:
        (root / name).write_bytes(data)
        if bad_reason is None:
            result.good.append(name)
        else:
            result.bad[name] = bad_reason

    def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kwargs)
        return buffer.getvalue()

    for i in range(n_good):
        folder = "sub/" if i % 2 else ""
        write(f"{folder}good_{i:03d}.jpg", _jpeg_bytes(textured_image(rng, width, height)))

    rgb = Image.fromarray(textured_image(rng, width, height))
    write("cmyk.jpg", encoded(rgb.convert("CMYK"), "JPEG", quality=90))
    gray16 = textured_image(rng, width, height)[:, :, 0].astype(np.uint16) * 257
    write("gray16.png", encoded(Image.fromarray(gray16), "PNG"))
    write("sub/gray.png", encoded(rgb.convert("L"), "PNG"))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(textured_image(rng, width, height)[:, :, 1]))
    write("rgba.png", encoded(rgba, "PNG"))
    write("palette.png", encoded(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    write("exif_rotated.jpg", encoded(rgb, "JPEG", quality=90, exif=exif.tobytes()))
    write("image.webp", encoded(rgb, "WEBP", quality=90))
    write("sub/image.tif", encoded(rgb, "TIFF"))
    write("image.BMP", encoded(rgb, "BMP"))

    for i in range(n_bad_each):
        good_jpeg = _jpeg_bytes(textured_image(rng, width, height))
        write(f"truncated_{i:03d}.jpg", good_jpeg[: len(good_jpeg) // 2], BAD_KINDS["truncated"])
        write(f"sub/empty_{i:03d}.jpg", b"", BAD_KINDS["empty"])
        write(f"text_{i:03d}.jpg", b"this is not an image\n" * 3, BAD_KINDS["text"])
        write(f"tiny_{i:03d}.png", encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), BAD_KINDS["tiny"])
        write(f"bomb_{i:03d}.png", png_header_only(20000, 20000), BAD_KINDS["bomb"])
    return result
