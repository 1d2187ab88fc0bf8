"""SIFT / RootSIFT extraction."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from broken_files import textured_image  # noqa: E402

from asmkit._validation import ArgumentError  # noqa: E402
from asmkit.features import PCAWhitening, SiftExtractor, extract_features, root_sift  # noqa: E402

UKBENCH = Path("/work/shared/datasets/ukbench2000")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(5)
    base = textured_image(rng, 160, 120)
    return cv2.GaussianBlur(base, (3, 3), 0)


def reference_root_sift(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x, dtype=np.float64)
    for i, row in enumerate(x.astype(np.float64)):
        total = sum(abs(v) for v in row)
        if total > 0:
            out[i] = [np.sqrt(v / total) for v in row]
    return out


def test_root_sift_matches_definition():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, size=(20, 128)).astype(np.float32)
    x[3] = 0
    out = root_sift(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference_root_sift(x), rtol=1e-6, atol=1e-7)
    norms = np.linalg.norm(out, axis=1)
    np.testing.assert_allclose(np.delete(norms, 3), 1.0, atol=1e-6)
    assert norms[3] == 0


def test_extract_matches_opencv_and_is_sorted(image):
    feats = SiftExtractor(max_features=None).extract(image)
    n = len(feats)
    assert n > 50
    assert feats.descriptors.shape == (n, 128) and feats.keypoints.shape == (n, 4) and feats.attention.shape == (n,)
    assert np.all(np.diff(feats.attention) <= 0)
    h, w = image.shape[:2]
    assert np.all((feats.keypoints[:, 0] >= 0) & (feats.keypoints[:, 0] < w))
    assert np.all((feats.keypoints[:, 1] >= 0) & (feats.keypoints[:, 1] < h))
    # Independent path: OpenCV on the same gray image, matched by keypoint geometry.
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    kps, desc = cv2.SIFT_create().detectAndCompute(gray, None)
    assert len(kps) == n
    expected = {(k.pt[0], k.pt[1], k.size, k.angle): d for k, d in zip(kps, reference_root_sift(desc))}
    for geometry, descriptor in zip(feats.keypoints, feats.descriptors):
        key = min(expected, key=lambda g: np.abs(np.array(g) - geometry).sum())
        np.testing.assert_allclose(descriptor, expected[key], atol=1e-6)


def test_max_features_keeps_highest_responses(image):
    everything = SiftExtractor(max_features=None).extract(image)
    capped = SiftExtractor(max_features=25).extract(image)
    assert len(capped) == 25
    np.testing.assert_allclose(capped.attention, everything.attention[:25])


def test_deterministic_and_grayscale_input(image):
    extractor = SiftExtractor(max_features=100)
    a, b = extractor.extract(image), extractor.extract(image)
    np.testing.assert_array_equal(a.descriptors, b.descriptors)
    np.testing.assert_array_equal(a.keypoints, b.keypoints)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(extractor.extract(gray).descriptors, a.descriptors)


def test_plain_sift_is_l2_normalised(image):
    feats = SiftExtractor(max_features=50, root=False).extract(image)
    np.testing.assert_allclose(np.linalg.norm(feats.descriptors, axis=1), 1.0, atol=1e-5)
    rooted = SiftExtractor(max_features=50).extract(image)
    assert SiftExtractor(root=False).name == "sift" and SiftExtractor().name == "rootsift"
    np.testing.assert_allclose(
        np.sqrt(feats.descriptors / feats.descriptors.sum(1, keepdims=True)), rooted.descriptors, atol=1e-5
    )


def test_whitening_is_applied_after_root_sift(image):
    base = SiftExtractor(max_features=None).extract(image)
    whitening = PCAWhitening.learn(base.descriptors, dim=32, shrinkage=0.5)
    feats = SiftExtractor(max_features=None, whitening=whitening).extract(image)
    assert feats.descriptors.shape == (len(base), 32)
    np.testing.assert_allclose(feats.descriptors, whitening.apply(base.descriptors), atol=1e-6)
    assert SiftExtractor(whitening=whitening).config()["whitening"] == whitening.config()


def test_blank_image_gives_empty_features():
    feats = SiftExtractor().extract(np.full((64, 64, 3), 128, np.uint8))
    assert feats.descriptors.shape == (0, 128) and feats.keypoints.shape == (0, 4)


def test_config_is_json_and_reflects_settings():
    a = SiftExtractor().config()
    assert json.loads(json.dumps(a)) == a
    assert a != SiftExtractor(max_features=500).config()
    assert a != SiftExtractor(max_size=640).config()


def test_validation(image):
    # A wrong type and a wrong value raise the same ArgumentError, naming the argument.
    for kwargs in (
        {"max_features": 0},
        {"max_features": 2.5},
        {"max_size": -1},
        {"root": 1},
        {"contrast_threshold": -1},
        {"edge_threshold": 0},
        {"sigma": 0},
        {"sigma": float("nan")},
        {"sigma": "1.6"},
        {"n_octave_layers": True},
    ):
        with pytest.raises(ArgumentError, match=next(iter(kwargs))):
            SiftExtractor(**kwargs)
    with pytest.raises(ArgumentError, match="whitening"):
        SiftExtractor(whitening=np.eye(128))
    with pytest.raises(ArgumentError, match="128"):
        SiftExtractor(whitening=PCAWhitening.learn(np.random.default_rng(0).normal(size=(50, 16))))
    extractor = SiftExtractor()
    with pytest.raises(ArgumentError, match="uint8"):
        extractor.extract(image.astype(np.float32))
    with pytest.raises(ArgumentError, match="shape"):
        extractor.extract(image[:, :, :2])


def test_parallel_extraction_equals_sequential(tmp_path):
    rng = np.random.default_rng(9)
    for i in range(6):
        Image.fromarray(textured_image(rng, 120, 90)).save(tmp_path / f"{i}.png")
    extractor = SiftExtractor(max_features=200)
    threads_before = cv2.getNumThreads()
    parallel = extract_features(tmp_path, extractor, workers=3, progress=False)
    assert cv2.getNumThreads() == threads_before
    sequential = extract_features(tmp_path, extractor, workers=1, progress=False)
    assert parallel.extracted == sequential.extracted == [f"{i}.png" for i in range(6)]
    for name in parallel.extracted:
        np.testing.assert_array_equal(parallel.features[name].descriptors, sequential.features[name].descriptors)


@pytest.mark.skipif(not (UKBENCH / "images").is_dir(), reason="UKBench data set not available")
def test_ukbench_image_with_max_size():
    from asmkit.features import load_image

    path = UKBENCH / "images" / "ukbench00000.jpg"
    feats = SiftExtractor(max_features=1000).extract(load_image(path))
    assert 100 < len(feats) <= 1000
    small = SiftExtractor(max_features=1000, max_size=320)
    image = load_image(path, max_size=small.max_size)
    assert image.shape == (240, 320, 3)
    assert np.all(small.extract(image).keypoints[:, 0] < 320)
