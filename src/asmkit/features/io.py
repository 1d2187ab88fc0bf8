"""Robust image loading and image listing.

Every failure to turn a file into an RGB array raises :class:`ImageLoadError` with a
human-readable reason, so that batch extraction can skip the file and report it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .._validation import FileFormatError, check_int

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "MIN_SIDE",
    "ImageLoadError",
    "list_images",
    "load_image",
]

#: File name suffixes (lower case) that ``list_images`` treats as images.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm", ".pnm"}
)

#: Images with fewer pixels on their shorter side carry too little structure for local
#: features (a SIFT octave needs a few pixels of support); such files are reported, not used.
MIN_SIDE = 16

#: Largest accepted image, in pixels (width × height), checked on the header before decoding.
DEFAULT_MAX_PIXELS = 100_000_000

# A truncated file must be reported, not silently completed with grey pixels.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageLoadError(FileFormatError):
    """An image file that cannot be used (a :class:`asmkit.FileFormatError`, so a user error).

    Attributes
    ----------
    path : pathlib.Path
        The file.
    reason : str
        Why it was rejected (e.g. ``"truncated image data"``).
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(path, reason)
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self):
        # Keep the two-argument constructor working across process boundaries.
        return (type(self), (self.path, self.reason))


def _scaled_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    """(width, height) with the longer side at most ``max_size``, aspect kept."""
    longest = max(width, height)
    if max_size is None or longest <= max_size:
        return width, height
    scale = max_size / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _high_bit_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """Grey levels of a 16-bit / 32-bit integer or float image as uint8 [H, W]."""
    values = np.asarray(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit data (Pillow opens some 16-bit PNGs as 32-bit "I"): 65535 maps to 255.
        scaled = np.clip(values.astype(np.float64), 0, 65535) / 257.0
    else:  # "F": floating point; [0, 1] data is the common convention, else 8-bit range.
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scaled = values * 255.0 if values.size and values.max() <= 1.0 else values
        scaled = np.clip(scaled, 0, 255)
    return np.rint(scaled).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_high_bit_depth_to_uint8(image), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    return image.convert("RGB")


def load_image(
    path: str | os.PathLike,
    *,
    max_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_SIDE,
) -> np.ndarray:
    """Load an image file as an 8-bit RGB array.

    Handles JPEG, PNG, WebP, TIFF, BMP (and GIF/PNM, first frame), EXIF orientation,
    grayscale, palette, CMYK, 16-bit (scaled to 8 bit, 65535 ↦ 255) and alpha
    (composited on white).

    Parameters
    ----------
    path : str or os.PathLike
        The image file.
    max_size : int, optional
        Downscale (never upscale) so that the longer side is at most this many pixels,
        keeping the aspect ratio. JPEGs are decoded directly at a reduced DCT scale.
    max_pixels : int
        Files whose header claims more pixels (width × height) are rejected before any
        pixel is decoded (decompression-bomb guard).
    min_side : int
        Files whose shorter side (after downscaling) is below this are rejected.

    Returns
    -------
    numpy.ndarray
        uint8 ``[H, W, 3]``, RGB, C-contiguous, upright.

    Raises
    ------
    ImageLoadError
        If the file is missing, empty, not an image, truncated, too large or too small.
    asmkit.ArgumentError
        If ``max_size``, ``max_pixels`` or ``min_side`` is not a positive int.
    """
    check_int(max_size, "max_size", min=1, none=True)
    check_int(max_pixels, "max_pixels", min=1)
    check_int(min_side, "min_side", min=1)
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except OSError as error:
        raise ImageLoadError(path, f"cannot access file ({error.strerror or error})") from None
    if path.is_dir():
        raise ImageLoadError(path, "is a directory, not an image file")
    if size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")

    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    path,
                    f"image too large: {width}x{height} = {width * height} pixels exceeds "
                    f"max_pixels={max_pixels} (possible decompression bomb)",
                )
            if image.format == "JPEG" and max_size is not None:
                # Decode at 1/2, 1/4 or 1/8 scale when that still covers the target size.
                image.draft("RGB", _scaled_size(width, height, max_size))
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
            target = _scaled_size(image.width, image.height, max_size)
            if target != image.size:
                image = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
            array = np.array(image, dtype=np.uint8, copy=True)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(path, f"image too large (decompression bomb guard): {error}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        message = str(error)
        if "truncated" in message.lower():
            reason = f"truncated image data ({message})"
        else:
            reason = f"cannot decode image ({type(error).__name__}: {message})"
        raise ImageLoadError(path, reason) from None
    except MemoryError:
        raise ImageLoadError(path, "not enough memory to decode image") from None

    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageLoadError(path, f"unexpected decoded shape {array.shape}")
    if min(array.shape[:2]) < min_side:
        raise ImageLoadError(
            path,
            f"image too small: {array.shape[1]}x{array.shape[0]} pixels, the shorter side "
            f"must be at least {min_side} px",
        )
    return array


def _is_image_name(path: Path) -> bool:
    # Hidden files include macOS "._name.jpg" resource forks, which are not images.
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(source: str | os.PathLike) -> list[Path]:
    """The image files of a folder (recursively) or of a list file.

    Parameters
    ----------
    source : str or os.PathLike
        A folder: every file below it whose suffix is in ``IMAGE_EXTENSIONS``
        (case-insensitive; hidden files and folders skipped), sorted by relative path.
        Or a text file with one image path per line: blank lines and lines starting
        with ``#`` are ignored, relative paths are resolved against the list file's
        folder, order is kept. Listed files are not checked for existence here; loading
        reports missing ones.

    Returns
    -------
    list of pathlib.Path

    Raises
    ------
    FileNotFoundError
        If ``source`` does not exist.
    asmkit.FileFormatError
        If it yields no image, is not a UTF-8 text file (an image file included), or a list
        file names the same path twice; the message starts with ``source``.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"image source not found: {source}")
    if source.is_dir():
        found = []
        for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for filename in filenames:
                candidate = Path(dirpath) / filename
                if _is_image_name(candidate):
                    found.append(candidate)
        images = sorted(found, key=lambda p: p.relative_to(source).as_posix())
        if not images:
            raise FileFormatError(
                source, f"no images found in this folder (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        return images

    if _is_image_name(source):
        raise FileFormatError(source, "is an image, not a folder of images or a list file (one path per line)")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FileFormatError(source, "not an image list: not a UTF-8 text file") from None
    images, seen = [], set()
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry)
        if not path.is_absolute():
            path = source.parent / path
        if path in seen:
            raise FileFormatError(source, f"line {number}: {entry!r} is listed twice")
        seen.add(path)
        images.append(path)
    if not images:
        raise FileFormatError(source, "not an image list: it names no images")
    return images
