"""Deep local features: the MASt3R / HOW-style retrieval head over a backbone (docs/math.md §6).

Pipeline of :class:`RetrievalHead` on backbone tokens ``[B, N, C]`` (a conv map ``[B, C, h, w]``
is first optionally smoothed by a k x k average, as HOW does, then flattened row-major):

    pre-whitening (optional)  ->  MLP projector (optional, optionally residual)
    ->  attention = ||projected token||_2  ->  post-whitening (optional, may reduce dims)
    ->  L2 normalisation (optional)

then the ``nfeat`` tokens of highest attention are kept (:func:`how_select_local`), and the
global descriptor is the weighted SPoC ``normalise(sum_i a_i f_i)`` (:func:`weighted_spoc`).

Without a trained projector, the practical default is HOW's training-free recipe: backbone
map -> attention = L2 norm -> top-k -> PCA whitening learned on sample images (with
shrinkage, :meth:`DeepExtractor.learn_whitening`) -> L2 normalisation.

:class:`DeepExtractor` implements the extractor interface of :mod:`asmkit.features.extract`
with multi-scale inference as in HOW: the image is downscaled to ``max_size``, run at each
scale, attention is normalised by its maximum over all scales, and the top ``nfeat`` over all
scales are kept (or, with ``selection="per_view"``, an equal share from each scale and
rotation). Keypoints are token centres in the input image's pixels. The ``deep`` preset's
extractor is built by :func:`asmkit.features.factory.deep_extractor`.

torch is imported when this module is imported; ``asmkit.features`` itself never imports it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .._validation import ArgumentError, DependencyError, FileFormatError, check_choice

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise DependencyError("asmkit.features.deep needs PyTorch; install it with: pip install 'asmkit[deep]'") from exc

from .extract import ImageFeatures
from .io import load_image
from .torch_files import load_torch_file
from .whitening import PCAWhitening

__all__ = [
    "Whitener",
    "RetrievalHead",
    "DeepExtractor",
    "how_select_local",
    "weighted_spoc",
    "resolve_nfeat",
]

logger = logging.getLogger(__name__)

_FORMAT = "asmkit-deep-extractor"
#: How the top features are chosen among several scales and rotations (:class:`DeepExtractor`).
SELECTIONS = ("joint", "per_view")
_HEAD_FORMAT = "asmkit-retrieval-head"


def resolve_nfeat(nfeat: float, n_tokens: int) -> int:
    """Number of features to keep out of ``n_tokens``.

    ``nfeat >= 1`` is a count; ``-1 <= nfeat < 0`` a fraction ``-nfeat`` of the tokens (the
    MASt3R convention). The result is clipped to ``n_tokens``.

    Raises
    ------
    asmkit.ArgumentError
        If ``nfeat`` is 0, below -1, or a non-integral count.
    """
    _check_nfeat(nfeat)
    count = int(-nfeat * n_tokens) if nfeat < 0 else int(nfeat)
    return min(count, n_tokens)


def _check_nfeat(nfeat: Any) -> None:
    if isinstance(nfeat, bool) or not isinstance(nfeat, (int, float, np.integer, np.floating)):
        raise ArgumentError(f"nfeat: expected a number, got {nfeat!r}")
    if nfeat == 0 or nfeat < -1 or (nfeat > 0 and int(nfeat) != nfeat):
        raise ArgumentError(f"nfeat: expected a positive count or a fraction in [-1, 0), got {nfeat!r}")


def how_select_local(feat: torch.Tensor, attn: torch.Tensor, nfeat: float):
    """Keep the ``nfeat`` features of highest attention per image.

    Parameters
    ----------
    feat : torch.Tensor
        ``[B, N, D]`` features.
    attn : torch.Tensor
        ``[B, N]`` attention.
    nfeat : int or float
        Count, or ``-fraction`` of N (see :func:`resolve_nfeat`).

    Returns
    -------
    (features ``[B, k, D]``, attention ``[B, k]``, indices int64 ``[B, k]``), sorted by
    decreasing attention.
    """
    k = resolve_nfeat(nfeat, feat.shape[1])
    top_attn, idx = torch.topk(attn, k, dim=1, sorted=True)
    top_feat = torch.gather(feat, 1, idx.unsqueeze(-1).expand(-1, -1, feat.shape[2]))
    return top_feat, top_attn, idx


def weighted_spoc(feat: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Weighted SPoC: ``L2normalise(sum_i attn_i * feat_i)``, ``[B, N, D], [B, N] -> [B, D]``."""
    return F.normalize((feat * attn.unsqueeze(-1)).sum(dim=1), dim=-1)


class Whitener(nn.Module):
    """Affine map ``x -> (x - m) p`` in float64, MASt3R's ``Whitener`` layout.

    Buffers ``m`` float64 ``[1, D]`` and ``p`` float64 ``[D, d]`` (``p = P^T`` restricted to
    the first d components of a PCA whitening, docs/math.md §6). Identity when freshly built.
    """

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        if not 1 <= out_dim <= dim:
            raise ArgumentError(f"out_dim: expected 1..{dim}, got {out_dim}")
        self.register_buffer("m", torch.zeros(1, dim, dtype=torch.float64))
        self.register_buffer("p", torch.eye(dim, out_dim, dtype=torch.float64))

    @property
    def out_dim(self) -> int:
        return int(self.p.shape[1])

    def set_whitening(self, whitening: PCAWhitening) -> None:
        """Load a learned :class:`~asmkit.features.whitening.PCAWhitening` (any output dim)."""
        if whitening.input_dim != self.m.shape[1]:
            raise ArgumentError(
                f"whitening: learned on {whitening.input_dim}-D features, head features are {self.m.shape[1]}-D"
            )
        device = self.m.device
        self.m = torch.from_numpy(whitening.mean_[None, :].copy()).to(device)
        self.p = torch.from_numpy(whitening.projection_.T.copy()).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Whitening amplifies low-variance directions: half precision would be too coarse.
        with torch.autocast(x.device.type, enabled=False):
            return ((x.to(torch.float64) - self.m) @ self.p).to(x.dtype)


class RetrievalHead(nn.Module):
    """Retrieval head on backbone tokens (see the module docstring).

    Parameters
    ----------
    dim : int
        Backbone channels C.
    hdims : sequence of int
        Projector widths: ``Linear(C, h0), LayerNorm, GELU, ..., Linear(., h_last)``; empty for
        no projector. State-dict keys follow MASt3R (``projector.{i}.weight``).
    residual : bool
        Add the (pre-whitened) input to the projector output (needs ``hdims[-1] == dim``).
    prewhiten : bool
        A :class:`Whitener` on the input (keys ``prewhiten.m``, ``prewhiten.p``).
    postwhiten : bool or int
        A :class:`Whitener` after the attention: True keeps the width, an int reduces to that
        many dims (HOW's 128); False for none. Learn it with :meth:`set_postwhitening`.
    smoothing : int
        For conv maps: k x k average pooling before flattening (HOW uses 3); 0 or 1 for none.
    nfeat : int or float
        Default number of local features (:func:`resolve_nfeat`).
    normalize : bool
        L2-normalise the output features (MASt3R does not; its codebooks expect that).
    """

    def __init__(
        self,
        dim: int,
        *,
        hdims: Sequence[int] = (),
        residual: bool = False,
        prewhiten: bool = False,
        postwhiten: bool | int = False,
        smoothing: int = 0,
        nfeat: float = 1000,
        normalize: bool = True,
    ):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ArgumentError(f"dim: expected a positive int, got {dim!r}")
        hdims = [int(h) for h in hdims]
        if any(h < 1 for h in hdims):
            raise ArgumentError(f"hdims: expected positive widths, got {hdims!r}")
        if residual and (not hdims or hdims[-1] != dim):
            raise ArgumentError(f"residual: needs hdims[-1] == dim ({dim}), got hdims={hdims!r}")
        if (
            isinstance(smoothing, bool)
            or not isinstance(smoothing, int)
            or smoothing < 0
            or (smoothing > 1 and smoothing % 2 == 0)
        ):
            raise ArgumentError(f"smoothing: expected 0 or an odd kernel size, got {smoothing!r}")
        _check_nfeat(nfeat)
        self.dim = dim
        self.hdims = hdims
        self.residual = bool(residual)
        self.smoothing = smoothing
        self.nfeat = nfeat
        self.normalize = bool(normalize)
        self.prewhiten = Whitener(dim) if prewhiten else nn.Identity()
        layers: list[nn.Module] = []
        width = dim
        for h in hdims[:-1]:
            layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.GELU()]
            width = h
        if hdims:
            layers.append(nn.Linear(width, hdims[-1]))
        self.projector = nn.Sequential(*layers) if layers else nn.Identity()
        self.proj_dim = hdims[-1] if hdims else dim
        if postwhiten is True:
            self.postwhiten: nn.Module = Whitener(self.proj_dim)
        elif postwhiten is False or postwhiten is None:
            self.postwhiten = nn.Identity()
        elif isinstance(postwhiten, int) and 1 <= postwhiten <= self.proj_dim:
            self.postwhiten = Whitener(self.proj_dim, postwhiten)
        else:
            raise ArgumentError(f"postwhiten: expected a bool or an int in 1..{self.proj_dim}, got {postwhiten!r}")

    @property
    def out_dim(self) -> int:
        """Dimensionality of the output features."""
        return self.postwhiten.out_dim if isinstance(self.postwhiten, Whitener) else self.proj_dim

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able); ``RetrievalHead(**config)`` rebuilds the layout."""
        post = self.postwhiten.out_dim if isinstance(self.postwhiten, Whitener) else False
        return {
            "dim": self.dim,
            "hdims": list(self.hdims),
            "residual": self.residual,
            "prewhiten": isinstance(self.prewhiten, Whitener),
            "postwhiten": post,
            "smoothing": self.smoothing,
            "nfeat": self.nfeat,
            "normalize": self.normalize,
        }

    def fingerprint(self) -> str:
        """Short SHA-256 of the weights, so feature caches notice a re-learned whitening."""
        digest = hashlib.sha256()
        for key, value in sorted(self.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def set_postwhitening(self, whitening: PCAWhitening) -> None:
        """Install a learned whitening after the attention (replacing any previous one)."""
        if whitening.input_dim != self.proj_dim:
            raise ArgumentError(
                f"whitening: learned on {whitening.input_dim}-D features, the head's are {self.proj_dim}-D"
            )
        device = next(iter(self.buffers()), torch.empty(0)).device
        whitener = Whitener(self.proj_dim, whitening.output_dim).to(device)
        whitener.set_whitening(whitening)
        self.postwhiten = whitener

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone output as tokens ``[B, N, C]``; maps ``[B, C, h, w]`` are smoothed, flattened."""
        if x.ndim == 4:
            if x.shape[1] != self.dim:
                raise ArgumentError(f"features: expected {self.dim} channels, got {x.shape[1]}")
            if self.smoothing > 1:
                x = F.avg_pool2d(x, self.smoothing, stride=1, padding=self.smoothing // 2, count_include_pad=False)
            return x.flatten(2).transpose(1, 2)
        if x.ndim == 3:
            if x.shape[2] != self.dim:
                raise ArgumentError(f"features: expected {self.dim} channels, got {x.shape[2]}")
            return x
        raise ArgumentError(f"features: expected [B, C, h, w] or [B, N, C], got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, *, postwhiten: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and attention of every token.

        Parameters
        ----------
        x : torch.Tensor
            Backbone output ``[B, C, h, w]`` or ``[B, N, C]``.
        postwhiten : bool
            False returns the projected features before post-whitening and normalisation
            (what the post-whitening is learned on).

        Returns
        -------
        (features float32 ``[B, N, out_dim]``, attention float32 ``[B, N]``)
        """
        tokens = self.tokens(x).float()
        pre = self.prewhiten(tokens)
        proj = self.projector(pre)
        if self.residual:
            proj = proj + pre
        proj = proj.float()
        attention = proj.norm(dim=-1)
        if not postwhiten:
            return proj, attention
        feat = self.postwhiten(proj)
        if self.normalize:
            feat = F.normalize(feat, dim=-1)
        return feat, attention

    def forward_local(self, x: torch.Tensor, nfeat: float | None = None):
        """Top features by attention: ``(features [B, k, D], attention [B, k], indices [B, k])``."""
        feat, attn = self.forward(x)
        return how_select_local(feat, attn, self.nfeat if nfeat is None else nfeat)

    def forward_global(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted-SPoC global descriptors ``[B, out_dim]``."""
        feat, attn = self.forward(x)
        return weighted_spoc(feat, attn)

    def save(self, path: str | os.PathLike) -> None:
        """Write layout and weights to a torch file (plain tensors; read with weights_only)."""
        torch.save({"format": _HEAD_FORMAT, "config": self.config(), "state": self.state_dict()}, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str = "cpu") -> "RetrievalHead":
        """Read a file written by :meth:`save`."""
        data = _load_torch_dict(path, _HEAD_FORMAT)
        return cls._from_saved(data["config"], data["state"], map_location)

    @classmethod
    def _from_saved(cls, config: Mapping[str, Any], state: Mapping[str, Any], map_location: str) -> "RetrievalHead":
        head = cls(**dict(config))
        head.load_state_dict(state, strict=True)
        return head.to(map_location).train(False)


def _load_torch_dict(path: str | os.PathLike, fmt: str) -> dict[str, Any]:
    # torch.save writes a zip archive: a legacy pickle is never one of these files.
    data = load_torch_file(path, f"an {fmt} file", legacy=False)
    if not isinstance(data, Mapping) or data.get("format") != fmt:
        raise FileFormatError(path, f"not an {fmt} file")
    return dict(data)


class DeepExtractor:
    """Deep local features of images: a backbone and a :class:`RetrievalHead`.

    Parameters
    ----------
    backbone : torch.nn.Module
        See :mod:`asmkit.features.backbones` (takes RGB ``[B, 3, H, W]`` in [0, 1], returns a
        map or tokens, has ``out_dim`` and ``config()``).
    head : RetrievalHead, optional
        Default: the training-free head ``RetrievalHead(backbone.out_dim, smoothing=smoothing)``
        (attention = L2 norm of backbone features), to be given a whitening.
    nfeat : int or float, default 1000
        Local features per image over all scales (negative: fraction of the tokens).
    scales : sequence of float, default (1.0,)
        Inference scales, relative to the image after the ``max_size`` downscale; HOW uses
        (2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25).
    rotations : sequence of int, default (0,)
        Counter-clockwise rotations in whole degrees, distinct, in [0, 360): the image is
        also run rotated by each, and the features of every rotation and scale compete in
        one top-``nfeat`` selection (keypoints mapped back to the unrotated image). The
        backbone is not rotation invariant; this makes an image match its rotated copies,
        at one forward pass per rotation and scale. Quarter turns are exact
        (``torch.rot90``); other angles resample the image bilinearly onto a canvas that
        holds all of it (grey around it), and tokens whose centre falls outside the image
        get no attention.
    selection : {"joint", "per_view"}, default "joint"
        With several scales or rotations (views): ``"joint"`` normalises attention by its
        maximum over all views and keeps the top ``nfeat`` over all of them (HOW), so the
        view with the strongest activations can take most of the slots; ``"per_view"``
        normalises each view by its own maximum and keeps the top ``nfeat // views`` of
        each (the remainder to the first views), so that every scale and rotation is
        described whatever its activation level.
    max_size : int or None, default 1024
        Images are downscaled so that their longer side is at most this.
    upscale_below : int or None, default None
        An image whose longer side is shorter is also run upscaled (bilinear) to this
        longer side, one more scale whose tokens join the selection. A thumbnail or a
        shrunken copy then shows its content at about the scale of the full-size photo,
        where at its own size the backbone sees it several times smaller and gives few
        tokens (a 160 x 120 image has 70 at stride 16); a small crop keeps its own scale,
        which matches the photo it was cut from. Capped at ``max_size``; None: never.
    device : str, default "cpu"
    whitening : PCAWhitening or path, optional
        Post-whitening for the head (a ``.npz`` from ``PCAWhitening.save``).
    amp : bool, default True
        float16 autocast on CUDA (ignored on CPU, where it brings nothing).
    smoothing : int, default 0
        For the default head: HOW's k x k average smoothing of the map (3 in HOW).
    batch_size : int, default 8
        Images per forward pass in :meth:`extract_batch` (images of equal size only).
    """

    thread_safe = False

    def __init__(
        self,
        backbone: nn.Module,
        head: RetrievalHead | None = None,
        *,
        nfeat: float = 1000,
        scales: Sequence[float] = (1.0,),
        rotations: Sequence[int] = (0,),
        selection: str = "joint",
        max_size: int | None = 1024,
        upscale_below: int | None = None,
        device: str = "cpu",
        whitening: PCAWhitening | str | os.PathLike | None = None,
        amp: bool = True,
        smoothing: int = 0,
        batch_size: int = 8,
        name: str = "deep",
    ):
        if not isinstance(backbone, nn.Module):
            raise ArgumentError(f"backbone: expected a torch.nn.Module, got {type(backbone).__name__}")
        out_dim = getattr(backbone, "out_dim", None)
        if head is None:
            if not isinstance(out_dim, int):
                raise ArgumentError("backbone: has no int out_dim; pass a head built for its width")
            head = RetrievalHead(out_dim, smoothing=smoothing, nfeat=nfeat)
        if not isinstance(head, RetrievalHead):
            raise ArgumentError(f"head: expected a RetrievalHead, got {type(head).__name__}")
        if isinstance(out_dim, int) and out_dim != head.dim:
            raise ArgumentError(f"head: built for {head.dim}-D input, backbone gives {out_dim}-D")
        _check_nfeat(nfeat)
        try:
            scales = tuple(float(s) for s in scales)
        except (TypeError, ValueError):
            raise ArgumentError(f"scales: expected a sequence of positive numbers, got {scales!r}") from None
        if not scales or any(not np.isfinite(s) or s <= 0 for s in scales):
            raise ArgumentError(f"scales: expected a non-empty sequence of positive numbers, got {scales!r}")
        if (
            isinstance(rotations, str)
            or not rotations
            or any(isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 0 <= r < 360 for r in rotations)
            or len(set(rotations)) != len(rotations)
        ):
            raise ArgumentError(f"rotations: expected distinct whole degrees in [0, 360), got {rotations!r}")
        rotations = tuple(int(r) for r in rotations)
        selection = check_choice(selection, "selection", SELECTIONS)
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 16):
            raise ArgumentError(f"max_size: expected an int >= 16 or None, got {max_size!r}")
        if upscale_below is not None and (
            isinstance(upscale_below, bool) or not isinstance(upscale_below, int) or upscale_below < 16
        ):
            raise ArgumentError(f"upscale_below: expected an int >= 16 or None, got {upscale_below!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ArgumentError(f"batch_size: expected a positive int, got {batch_size!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ArgumentError(f"device: {device!r} requested but CUDA is not available")
        if self.device.type == "cuda" and (self.device.index or 0) >= torch.cuda.device_count():
            raise ArgumentError(f"device: {device!r} requested, but CUDA has {torch.cuda.device_count()} device(s)")
        self.backbone = backbone.to(self.device).train(False)
        self.head = head.to(self.device).train(False)
        self.nfeat = nfeat
        self.scales = scales
        self.rotations = rotations
        self.selection = selection
        self.max_size = max_size
        self.upscale_below = upscale_below
        self.amp = bool(amp)
        self.batch_size = batch_size
        self.name = name
        if whitening is not None:
            if not isinstance(whitening, PCAWhitening):
                whitening = PCAWhitening.load(whitening)
            self.head.set_postwhitening(whitening)

    # -- interface ------------------------------------------------------------------------

    @property
    def batched(self) -> bool:
        """Whether ``extract_features`` should hand over several images per call: on a
        GPU, where a forward pass of ``batch_size`` equal-sized images costs little more
        than one (on the CPU it does not pay, docs/deep.md)."""
        return self.device.type == "cuda"

    def config(self) -> dict[str, Any]:
        """JSON-able settings, including a fingerprint of the head's weights."""
        backbone_config = (
            self.backbone.config() if hasattr(self.backbone, "config") else {"name": type(self.backbone).__name__}
        )
        return {
            "name": self.name,
            "backbone": backbone_config,
            "head": self.head.config(),
            "head_sha256": self.head.fingerprint(),
            "nfeat": self.nfeat,
            "scales": list(self.scales),
            **({"rotations": list(self.rotations)} if self.rotations != (0,) else {}),
            **({"selection": self.selection} if self.selection != "joint" else {}),
            "max_size": self.max_size,
            **({"upscale_below": self.upscale_below} if self.upscale_below is not None else {}),
            "amp": self.amp and self.device.type == "cuda",
        }

    def turned(self, rotation: int) -> "DeepExtractor":
        """This extractor run on the image rotated by ``rotation`` degrees counter-clockwise
        alone (its keypoints mapped back to the unrotated image): the same backbone, head
        and whitening, the same settings otherwise. How a query is searched at several
        rotations (``[features] query_rotations``)."""
        return DeepExtractor(
            self.backbone,
            self.head,
            nfeat=self.nfeat,
            scales=self.scales,
            rotations=(rotation,),
            selection=self.selection,
            max_size=self.max_size,
            upscale_below=self.upscale_below,
            device=str(self.device),
            amp=self.amp,
            batch_size=self.batch_size,
            name=self.name,
        )

    def extract(self, image: np.ndarray) -> ImageFeatures:
        """Local features of one RGB image.

        Parameters
        ----------
        image : numpy.ndarray
            uint8 ``[H, W, 3]`` RGB.

        Returns
        -------
        ImageFeatures
            ``descriptors`` float32 ``[n, D]`` sorted by decreasing attention, ``keypoints``
            float32 ``[n, 4]`` = (x, y, cell size, 0) in the input image's pixels,
            ``attention`` float32 ``[n]`` in (0, 1] (divided by the maximum over scales),
            ``global_descriptor`` float32 ``[D]`` (weighted SPoC over all scales).
        """
        return self.extract_batch([image])[0]

    def extract_batch(self, images: Sequence[np.ndarray]) -> list[ImageFeatures]:
        """:meth:`extract` for many images; equal-sized neighbours share forward passes."""
        images = [_check_image(img, f"images[{i}]") for i, img in enumerate(images)]
        out: list[ImageFeatures | None] = [None] * len(images)
        start = 0
        while start < len(images):
            stop = start + 1
            while stop < len(images) and stop - start < self.batch_size and images[stop].shape == images[start].shape:
                stop += 1
            for i, feats in enumerate(self._extract_same_size(images[start:stop])):
                out[start + i] = feats
            start = stop
        return out  # type: ignore[return-value]

    # -- whitening ------------------------------------------------------------------------

    def raw_features(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-``nfeat`` features before post-whitening: (float32 ``[n, proj_dim]``, attention ``[n]``)."""
        feats = self._extract_same_size([_check_image(image, "image")], postwhiten=False)[0]
        return feats.descriptors, feats.attention

    def learn_whitening(
        self,
        images: Iterable[np.ndarray | str | os.PathLike],
        *,
        dim: int | None = 128,
        shrinkage: float = 1.0,
        per_image: int | None = None,
    ) -> PCAWhitening:
        """Learn the head's post-whitening by PCA (no labels) on sample images, and install it.

        Parameters
        ----------
        images : iterable of numpy.ndarray or path-like
            Sample images: uint8 ``[H, W, 3]`` RGB arrays, or files (loaded with
            :func:`asmkit.features.io.load_image` at ``max_size``).
        dim : int or None, default 128
            Output dims (clipped to the feature width); None keeps all.
        shrinkage : float, default 1.0
            Whitening exponent s (1 full, < 1 shrinks; docs/math.md §6).
        per_image : int, optional
            Use at most this many top-attention features per image (default ``nfeat``).

        Returns
        -------
        PCAWhitening
            The learned whitening (save it with ``.save`` or save the extractor).
        """
        vecs = []
        for image in images:
            if isinstance(image, (str, os.PathLike)):
                image = load_image(image, max_size=self.max_size)
            desc, _ = self.raw_features(image)
            vecs.append(desc[:per_image] if per_image is not None else desc)
        if not vecs:
            raise ArgumentError("images: no images given to learn the whitening")
        vecs_all = np.concatenate(vecs)
        if dim is not None:
            dim = min(int(dim), vecs_all.shape[1])
        whitening = PCAWhitening.learn(vecs_all, dim=dim, shrinkage=shrinkage)
        self.head.set_postwhitening(whitening)
        if not self.head.normalize:
            logger.info("head does not L2-normalise its output; whitened features stay unnormalised")
        logger.info(
            "learned %d -> %d whitening on %d features of %d images",
            whitening.input_dim,
            whitening.output_dim,
            len(vecs_all),
            len(vecs),
        )
        return whitening

    # -- persistence ----------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the head (whitening included) and settings to a torch file (no pickled objects).

        The backbone is stored by its ``config()`` only; ``load`` rebuilds it (built-in
        backbones) or takes it as an argument.
        """
        torch.save(
            {
                "format": _FORMAT,
                "backbone": self.backbone.config() if hasattr(self.backbone, "config") else {},
                "head_config": self.head.config(),
                "head": {k: v.cpu() for k, v in self.head.state_dict().items()},
                "settings": {
                    "nfeat": self.nfeat,
                    "scales": list(self.scales),
                    "rotations": list(self.rotations),
                    "selection": self.selection,
                    "max_size": self.max_size,
                    "upscale_below": self.upscale_below,
                    "amp": self.amp,
                    "batch_size": self.batch_size,
                    "name": self.name,
                },
            },
            Path(path),
        )

    @classmethod
    def load(
        cls, path: str | os.PathLike, backbone: nn.Module | None = None, *, device: str = "cpu", **overrides: Any
    ) -> "DeepExtractor":
        """Read a file written by :meth:`save`; ``overrides`` replace saved settings."""
        from .backbones import build_backbone

        data = _load_torch_dict(path, _FORMAT)
        if backbone is None:
            backbone = build_backbone(data["backbone"])
        head = RetrievalHead._from_saved(data["head_config"], data["head"], "cpu")
        settings = {**data["settings"], **overrides}
        return cls(backbone, head, device=device, **settings)

    # -- internals ------------------------------------------------------------------------

    def _to_tensor(self, images: list[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        if self.device.type == "cuda":
            # uint8 crosses the bus (4x less than float); pinned memory allows async copy.
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        x = batch.float().div_(255.0)
        if self.max_size is not None and max(x.shape[-2:]) > self.max_size:
            x = _resize(x, _scaled_hw(x.shape[-2], x.shape[-1], self.max_size / max(x.shape[-2:])))
        return x

    def _scale_size(self, h: int, w: int, scale: float) -> tuple[int, int]:
        size = _scaled_hw(h, w, scale)
        patch = getattr(self.backbone, "patch_size", None)
        if patch:
            # Token backbones need sides that are multiples of the patch size.
            size = tuple(max(patch, int(round(s / patch)) * patch) for s in size)
        return size

    @torch.inference_mode()
    def _extract_same_size(self, images: list[np.ndarray], postwhiten: bool = True) -> list[ImageFeatures]:
        in_h, in_w = images[0].shape[:2]
        x0 = self._to_tensor(images)
        scales = self.scales
        if self.upscale_below is not None:
            # A small image is also seen at photo scale, within the bound every image obeys.
            target = self.upscale_below if self.max_size is None else min(self.upscale_below, self.max_size)
            side = max(x0.shape[-2:])
            if side < target:
                scales = (*scales, target / side)
        per_scale = []
        spoc = None
        for rotation in self.rotations:
            if rotation % 90:
                x, frame, back = _rotate(x0, rotation, in_h, in_w)
            else:
                turns = rotation // 90
                x = torch.rot90(x0, turns, dims=(-2, -1)) if turns else x0
                # The input image's size as seen in this rotation's frame.
                frame = (in_w, in_h) if turns % 2 else (in_h, in_w)

                def back(cx, cy, turns=turns):
                    return (*_unrotate(cx, cy, turns, in_h, in_w), None)

            spoc = self._extract_rotation(x, frame, back, postwhiten, per_scale, spoc, scales)
        feat = torch.cat([p[0] for p in per_scale], dim=1)
        attn = torch.cat([p[1] for p in per_scale], dim=1)
        kpts = torch.cat([p[2] for p in per_scale], dim=1)
        if self.selection == "joint":
            # HOW normalises attention by its maximum over the scales (here also the
            # rotations) before the joint selection.
            attn = attn / attn.amax(dim=1, keepdim=True).clamp_min(1e-12)
            feat, attn, idx = how_select_local(feat, attn, self.nfeat)
        else:
            # Each view already kept its share, normalised by its own maximum: keep them
            # all, in order of attention.
            feat, attn, idx = how_select_local(feat, attn, feat.shape[1])
        kpts = torch.gather(kpts, 1, idx.unsqueeze(-1).expand(-1, -1, 4))
        glob = F.normalize(spoc, dim=-1).cpu().numpy() if spoc is not None else [None] * len(images)
        feat, attn, kpts = feat.cpu().numpy(), attn.cpu().numpy(), kpts.cpu().numpy()
        return [
            ImageFeatures(descriptors=feat[i], keypoints=kpts[i], attention=attn[i], global_descriptor=glob[i])
            for i in range(len(images))
        ]

    def _extract_rotation(
        self,
        x: torch.Tensor,
        frame: tuple[int | float, int | float],
        back: Callable,
        postwhiten: bool,
        per_scale: list,
        spoc: torch.Tensor | None,
        scales: tuple[float, ...],
    ) -> torch.Tensor | None:
        """Run every scale on ``x`` (float ``[B, 3, h, w]``, the image in one rotation's
        frame, of size ``frame`` (height, width) in the pixels of the image given to
        ``extract``); append each scale's top (features, attention, keypoints) to
        ``per_scale`` and return ``spoc`` plus this rotation's weighted feature sums.
        ``back(cx, cy)`` maps frame points to the unrotated image: ``(x, y, inside)``,
        ``inside`` a bool mask of the points in the image, or None when all are."""
        base_h, base_w = x.shape[-2:]
        rot_h, rot_w = frame
        views = len(scales) * len(self.rotations)
        for scale in scales:
            hs, ws = self._scale_size(base_h, base_w, scale)
            xs = x if (hs, ws) == (base_h, base_w) else _resize(x, (hs, ws))
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp and self.device.type == "cuda"):
                out = self.backbone(xs)
            out = out.float()
            grid_h, grid_w = _grid(out, hs, ws, getattr(self.backbone, "patch_size", None))
            feat, attn = self.head(out, postwhiten=postwhiten)
            cell_x, cell_y = rot_w / grid_w, rot_h / grid_h
            every = torch.arange(grid_h * grid_w, device=attn.device)
            _, _, inside = back(((every % grid_w).float() + 0.5) * cell_x, ((every // grid_w).float() + 0.5) * cell_y)
            if inside is not None:
                # Tokens of the canvas around a resampled image describe the grey fill.
                attn = attn * inside.to(attn.dtype)
            if postwhiten:
                part = (feat * attn.unsqueeze(-1)).sum(dim=1)
                spoc = part if spoc is None else spoc + part
            # Keep this scale's top candidates only: no more can survive the final selection.
            k = resolve_nfeat(self.nfeat, feat.shape[1])
            if self.selection == "per_view":
                view = len(per_scale)
                k = max(1, k // views + (view < k % views))
                attn = attn / attn.amax(dim=1, keepdim=True).clamp_min(1e-12)
            if inside is not None:
                # Every image of a batch has one size, so one count of tokens in the image.
                k = min(k, int(inside.sum()))
            top_attn, idx = torch.topk(attn, k, dim=1)
            top_feat = torch.gather(feat, 1, idx.unsqueeze(-1).expand(-1, -1, feat.shape[2]))
            # Token centres in the pixels of the image given to extract().
            cx = ((idx % grid_w).float() + 0.5) * cell_x
            cy = ((idx // grid_w).float() + 0.5) * cell_y
            cx, cy, _ = back(cx, cy)
            size = torch.full_like(cx, (cell_x * cell_y) ** 0.5)
            kpts = torch.stack([cx, cy, size, torch.zeros_like(cx)], dim=-1)
            per_scale.append((top_feat, top_attn, kpts))
        return spoc


def _check_image(image: Any, name: str) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ArgumentError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ArgumentError(f"{name}: expected uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 1:
        raise ArgumentError(f"{name}: empty image {image.shape}")
    return np.ascontiguousarray(image)


def _unrotate(cx: torch.Tensor, cy: torch.Tensor, turns: int, in_h: int, in_w: int):
    """Points of an image rotated by ``turns`` counter-clockwise quarter turns
    (``torch.rot90`` on the last two dims) back in the unrotated ``in_h x in_w`` image."""
    if turns == 1:
        return in_w - cy, cx
    if turns == 2:
        return in_w - cx, in_h - cy
    if turns == 3:
        return cy, in_h - cx
    return cx, cy


def _rotate(x: torch.Tensor, degrees: int, in_h: int, in_w: int) -> tuple[torch.Tensor, tuple, Callable]:
    """``x`` (float ``[B, 3, h, w]`` in [0, 1]: the ``in_h x in_w`` input, maybe downscaled)
    turned ``degrees`` counter-clockwise onto a canvas that holds all of it, grey around it;
    the canvas's size (height, width) in input pixels; and the map back: canvas points
    ``(cx, cy)`` in input pixels to ``(x, y, inside)`` in the unrotated input."""
    h, w = x.shape[-2:]
    theta = np.deg2rad(degrees)
    cos, sin = float(np.cos(theta)), float(np.sin(theta))

    def canvas(height: float, width: float) -> tuple[float, float]:
        return abs(width * sin) + abs(height * cos), abs(width * cos) + abs(height * sin)

    def turn_back(cx, cy, height, width):
        # Inverse of turning about the centres, y pointing down.
        out_h, out_w = canvas(height, width)
        u, v = cx - out_w / 2, cy - out_h / 2
        px, py = cos * u - sin * v + width / 2, sin * u + cos * v + height / 2
        return px, py, (px >= 0) & (px < width) & (py >= 0) & (py < height)

    out_h, out_w = (max(1, int(np.ceil(side - 1e-6))) for side in canvas(h, w))
    ys, xs = torch.meshgrid(
        torch.arange(out_h, device=x.device, dtype=torch.float32) + 0.5,
        torch.arange(out_w, device=x.device, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    # The canvas's pixel centres, shifted by the rounding of its size.
    px, py, _ = turn_back(xs - (out_w - canvas(h, w)[1]) / 2, ys - (out_h - canvas(h, w)[0]) / 2, h, w)
    grid = torch.stack([2 * px / w - 1, 2 * py / h - 1], dim=-1).expand(x.shape[0], -1, -1, -1)
    # Zero padding of x minus grey: outside the image the canvas is grey once it is added back.
    turned = F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5
    # The canvas in input pixels: the rounded tensor canvas scaled back.
    frame = (out_h * in_h / h, out_w * in_w / w)

    def back(cx: torch.Tensor, cy: torch.Tensor):
        exact_h, exact_w = canvas(in_h, in_w)
        return turn_back(cx - (frame[1] - exact_w) / 2, cy - (frame[0] - exact_h) / 2, in_h, in_w)

    return turned, frame, back


def _scaled_hw(h: int, w: int, scale: float) -> tuple[int, int]:
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Antialiasing matters when shrinking: without it small scales alias badly.
    down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=down)


def _grid(out: torch.Tensor, h: int, w: int, patch: int | None) -> tuple[int, int]:
    if out.ndim == 4:
        return int(out.shape[-2]), int(out.shape[-1])
    if not patch:
        raise ArgumentError("backbone: returns tokens [B, N, C] but has no patch_size")
    gh, gw = h // patch, w // patch
    if gh * gw != out.shape[1]:
        raise ArgumentError(f"backbone: {out.shape[1]} tokens do not form a {gh}x{gw} grid for a {h}x{w} input")
    return gh, gw
