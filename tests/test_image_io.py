"""Image loading, listing and batch extraction over broken folders."""

from __future__ import annotations

import io
import logging
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from broken_files import make_broken_folder, png_header_only, textured_image  # noqa: E402

from asmkit._validation import ArgumentError, FileFormatError  # noqa: E402
from asmkit.features import (  # noqa: E402
    ImageFeatures,
    ImageLoadError,
    extract_features,
    image_names,
    list_images,
    load_image,
)


def save(path: Path, image: Image.Image, fmt: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)
    return path


@pytest.fixture
def rgb() -> np.ndarray:
    return textured_image(np.random.default_rng(1), 64, 40)


# -- load_image: formats and modes ----------------------------------------------------------


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("BMP", ".bmp"), ("TIFF", ".tif"), ("WEBP", ".webp")])
def test_lossless_formats_round_trip(tmp_path, rgb, fmt, suffix):
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    path = save(tmp_path / f"a{suffix}", Image.fromarray(rgb), fmt, **kwargs)
    loaded = load_image(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (40, 64, 3) and loaded.flags.c_contiguous
    np.testing.assert_array_equal(loaded, rgb)


def test_jpeg_loads_close_to_source(tmp_path, rgb):
    loaded = load_image(save(tmp_path / "a.jpg", Image.fromarray(rgb), quality=95))
    assert loaded.shape == (40, 64, 3)
    assert np.abs(loaded.astype(int) - rgb).mean() < 12


def test_grayscale_becomes_three_equal_channels(tmp_path, rgb):
    gray = rgb[:, :, 0]
    loaded = load_image(save(tmp_path / "g.png", Image.fromarray(gray)))
    for channel in range(3):
        np.testing.assert_array_equal(loaded[:, :, channel], gray)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]] * 16, dtype=np.uint16).repeat(4, axis=1)
    loaded = load_image(save(tmp_path / "g16.png", Image.fromarray(values)))
    np.testing.assert_array_equal(loaded[0, ::4, 0], [0, 1, 128, 255])


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red, half of it fully transparent, half opaque
    rgba[:, :10, 3] = 0
    rgba[:, 10:, 3] = 255
    loaded = load_image(save(tmp_path / "a.png", Image.fromarray(rgba, mode="RGBA")))
    np.testing.assert_array_equal(loaded[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(loaded[0, 15], [200, 0, 0])


def test_palette_and_cmyk(tmp_path, rgb):
    image = Image.fromarray(rgb)
    palette = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    np.testing.assert_array_equal(load_image(save(tmp_path / "p.png", palette)), np.asarray(palette.convert("RGB")))
    cmyk = load_image(save(tmp_path / "c.jpg", image.convert("CMYK"), quality=95))
    assert cmyk.shape == rgb.shape
    assert np.abs(cmyk.astype(int) - rgb).mean() < 20


def test_exif_orientation_is_applied(tmp_path, rgb):
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise
    loaded = load_image(save(tmp_path / "r.jpg", Image.fromarray(rgb), quality=95, exif=exif.tobytes()))
    assert loaded.shape == (64, 40, 3)
    expected = np.rot90(rgb, k=-1)
    assert np.abs(loaded.astype(int) - expected).mean() < 12


def test_max_size_keeps_aspect_and_never_upscales(tmp_path):
    big = textured_image(np.random.default_rng(0), 400, 300)
    for suffix in (".png", ".jpg"):
        path = save(tmp_path / f"big{suffix}", Image.fromarray(big))
        assert load_image(path, max_size=100).shape == (75, 100, 3)
        assert load_image(path, max_size=1000).shape == (300, 400, 3)


# -- load_image: failures -------------------------------------------------------------------


def test_bad_files_raise_with_reason(tmp_path, rgb):
    good_jpeg = io.BytesIO()
    Image.fromarray(rgb).save(good_jpeg, format="JPEG")
    cases = {
        "missing.jpg": (None, "file not found"),
        "empty.jpg": (b"", "empty file"),
        "text.jpg": (b"hello, world\n", "not a recognised image format"),
        "truncated.jpg": (good_jpeg.getvalue()[: len(good_jpeg.getvalue()) // 2], "truncated"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(ImageLoadError) as info:
            load_image(path)
        assert info.value.path == path
        assert reason in info.value.reason
        assert str(path) in str(info.value)
        # A user error for the command line, like any other file that is not what it should be.
        assert isinstance(info.value, FileFormatError)


def test_image_load_error_survives_pickling(tmp_path):
    # Worker processes send it back pickled; its two-argument constructor must round-trip.
    error = pickle.loads(pickle.dumps(ImageLoadError(tmp_path / "a.jpg", "truncated image data")))
    assert isinstance(error, ImageLoadError) and isinstance(error, FileFormatError)
    assert error.path == tmp_path / "a.jpg" and error.reason == "truncated image data"
    assert str(error) == f"{tmp_path / 'a.jpg'}: truncated image data"


def test_tiny_image_is_rejected(tmp_path):
    path = save(tmp_path / "one.png", Image.new("RGB", (1, 1)))
    with pytest.raises(ImageLoadError, match="too small: 1x1"):
        load_image(path)
    # 20 px passes by default, but not with a larger min_side; nor after downscaling.
    path = save(tmp_path / "small.png", Image.new("RGB", (40, 20)))
    assert load_image(path).shape == (20, 40, 3)
    with pytest.raises(ImageLoadError, match="at least 32 px"):
        load_image(path, min_side=32)
    with pytest.raises(ImageLoadError, match="too small"):
        load_image(path, max_size=20)


def test_decompression_bomb_header_rejected_without_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(20000, 20000))
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(path)
    # The configurable limit applies below Pillow's own guard too.
    path = tmp_path / "medium.png"
    path.write_bytes(png_header_only(3000, 3000))
    with pytest.raises(ImageLoadError, match="max_pixels=1000000"):
        load_image(path, max_pixels=1_000_000)


def test_invalid_arguments(tmp_path):
    for kwargs in ({"max_size": 0}, {"max_size": 1.5}, {"max_pixels": -1}, {"min_side": True}):
        with pytest.raises(ArgumentError, match=next(iter(kwargs))):
            load_image(tmp_path / "x.png", **kwargs)


# -- list_images and names ------------------------------------------------------------------


def test_list_images_folder_recursive_sorted(tmp_path, rgb):
    for name in ("b.jpg", "a/z.PNG", "a/y.webp", ".hidden/c.jpg", "._d.jpg", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    names = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert names == ["a/y.webp", "a/z.PNG", "b.jpg"]


def test_list_images_from_list_file(tmp_path):
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "images.txt"
    listing.write_text("# my images\n\nimgs/b.jpg\n  /abs/a.png  \n# end\n")
    assert list_images(listing) == [tmp_path / "lists" / "imgs" / "b.jpg", Path("/abs/a.png")]


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileFormatError, match="empty: no images found"):
        list_images(tmp_path / "empty")
    listing = tmp_path / "list.txt"
    listing.write_text("# only comments\n\n")
    with pytest.raises(FileFormatError, match="list.txt: not an image list: it names no images"):
        list_images(listing)
    listing.write_text("a.jpg\na.jpg\n")
    with pytest.raises(FileFormatError, match="list.txt: line 2"):
        list_images(listing)
    listing.write_bytes(b"\x80\x81 binary")
    with pytest.raises(FileFormatError, match="list.txt: not an image list: not a UTF-8 text file"):
        list_images(listing)
    # A single image is not a list, even when its bytes happen to be valid UTF-8.
    (tmp_path / "photo.jpg").write_text("a.jpg\n")
    with pytest.raises(FileFormatError, match="photo.jpg: is an image, not a folder"):
        list_images(tmp_path / "photo.jpg")


def test_image_names(tmp_path):
    paths = [tmp_path / "x" / "a.jpg", tmp_path / "x" / "s" / "b.jpg"]
    assert image_names(paths) == ["a.jpg", "s/b.jpg"]
    assert image_names(paths, root=tmp_path) == ["x/a.jpg", "x/s/b.jpg"]
    with pytest.raises(ArgumentError, match="root: image .* is not inside root"):
        image_names(paths, root=tmp_path / "x" / "s")


# -- extract_features over a broken folder ----------------------------------------------------


class MeanColour:
    """A trivial extractor: one 3-D descriptor, the mean colour (independent of SIFT)."""

    name = "mean_colour"
    max_size = None

    def config(self) -> dict:
        return {"extractor": self.name}

    def extract(self, image: np.ndarray) -> ImageFeatures:
        return ImageFeatures(descriptors=image.reshape(-1, 3).mean(axis=0, keepdims=True))


@pytest.mark.parametrize("thread_safe", [False, True])
def test_extract_skips_exactly_the_bad_files(tmp_path, caplog, thread_safe):
    folder = make_broken_folder(tmp_path / "imgs", n_good=3, seed=3)
    extractor = MeanColour()
    extractor.thread_safe = thread_safe
    with caplog.at_level(logging.INFO, logger="asmkit.features.extract"):
        result = extract_features(tmp_path / "imgs", extractor, workers=2, progress=False)
    assert sorted(result.extracted) == sorted(folder.good)
    assert set(result.features) == set(folder.good)
    failed = dict(result.failed)
    assert set(failed) == set(folder.bad)
    for name, fragment in folder.bad.items():
        assert fragment in failed[name], (name, failed[name])
    # The features are those of load_image, in input order.
    for name in folder.good:
        expected = load_image(folder.root / name).reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(result.features[name].descriptors[0], expected, rtol=1e-6)
    assert result.extracted == [n for n in image_names(list_images(folder.root), folder.root) if n in folder.good]
    assert f"{len(folder.good)} images" in caplog.text and f"{len(folder.bad)} failed" in caplog.text


def test_extract_reports_extractor_errors_and_goes_on(tmp_path):
    folder = make_broken_folder(tmp_path, n_good=2, seed=0, n_bad_each=0)

    class Picky(MeanColour):
        def extract(self, image):
            if image.shape[0] > image.shape[1]:  # only the EXIF-rotated file is portrait
                raise RuntimeError("portrait not supported")
            return super().extract(image)

    result = extract_features([folder.root / n for n in folder.good], Picky(), root=folder.root, progress=False)
    assert result.failed == [("exif_rotated.jpg", "feature extraction failed (RuntimeError: portrait not supported)")]
    assert len(result.extracted) == len(folder.good) - 1


def test_extract_rejects_bad_arguments(tmp_path):
    with pytest.raises(ArgumentError, match="extractor: expected an object"):
        extract_features([], object(), progress=False)
    with pytest.raises(ArgumentError, match="workers"):
        extract_features([], MeanColour(), workers=0, progress=False)

    class Wrong(MeanColour):
        def extract(self, image):
            return image

    path = save(tmp_path / "a.png", Image.new("RGB", (32, 32)))
    with pytest.raises(ArgumentError, match="extractor: .* expected ImageFeatures"):
        extract_features([path], Wrong(), progress=False)


@pytest.mark.slow
def test_extract_hundred_broken_files(tmp_path):
    folder = make_broken_folder(tmp_path, n_good=40, seed=7, n_bad_each=20)
    assert len(folder.bad) == 100
    result = extract_features(tmp_path, MeanColour(), workers=3, progress=False)
    assert sorted(result.extracted) == sorted(folder.good)
    assert {name for name, _ in result.failed} == set(folder.bad)


class BatchedMeanColour(MeanColour):
    """MeanColour that asks for batches, records them, and fails a batch holding a
    portrait image (extract alone fails on it too)."""

    batched = True
    batch_size = 3

    def __init__(self):
        self.batches = []

    def extract(self, image):
        if image.shape[0] > image.shape[1]:
            raise RuntimeError("portrait not supported")
        return super().extract(image)

    def extract_batch(self, images):
        self.batches.append(len(images))
        return [self.extract(image) for image in images]


def test_batched_extractors_get_batches_and_one_bad_image_costs_only_itself(tmp_path):
    folder = make_broken_folder(tmp_path / "imgs", n_good=7, seed=5)
    batched = BatchedMeanColour()
    result = extract_features(tmp_path / "imgs", batched, workers=2, progress=False)

    class Single(BatchedMeanColour):
        batched = False

    single = Single()
    expected = extract_features(tmp_path / "imgs", single, workers=2, progress=False)
    assert single.batches == []  # not batched: extract() per image
    assert max(batched.batches) == 3 and sum(batched.batches) >= len(folder.good)
    # Same images extracted, failed (load errors and the portrait one), order and features.
    assert result.extracted == expected.extracted
    assert dict(result.failed) == dict(expected.failed)
    assert "exif_rotated.jpg" in dict(result.failed) and set(folder.bad) < set(dict(result.failed))
    for name in result.extracted:
        np.testing.assert_array_equal(result.features[name].descriptors, expected.features[name].descriptors)
