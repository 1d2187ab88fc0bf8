"""MASt3R retrieval checkpoints: the head's weights (``args`` + ``model``) and the codebook
pickle beside them (``<name>_codebook.pkl``).

torch is imported when this module is imported; ``asmkit.features`` itself never imports it.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .._validation import ArgumentError, DependencyError, FileFormatError
from ..compat.legacy import load_legacy_pickle

# Before the imports of .backbones and .deep, which need torch too.
try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise DependencyError("asmkit.features.mast3r needs PyTorch; install it with: pip install 'asmkit[deep]'") from exc

from .backbones import Normalize  # noqa: E402
from .deep import RetrievalHead  # noqa: E402
from .torch_files import load_torch_file  # noqa: E402

__all__ = ["Mast3rCheckpoint", "load_mast3r_checkpoint"]

logger = logging.getLogger(__name__)

_NOT_A_CHECKPOINT = "not a MASt3R retrieval checkpoint"


@dataclass
class Mast3rCheckpoint:
    """What a MASt3R retrieval checkpoint holds, loaded.

    Attributes
    ----------
    head : asmkit.features.deep.RetrievalHead
        The head (pre-whitening, projector, post-whitening) with the checkpoint's weights.
    backbone : torch.nn.Module
        The encoder (given by the user, or built by mast3r).
    args : dict
        The checkpoint's ``args`` namespace as a dict.
    codebook : numpy.ndarray or None
        float32 ``[K, D]`` centroids from ``<name>_codebook.pkl``, when that file exists.
    imsize : int
        Image size the model expects (``args.imsize``; the long side).
    """

    head: RetrievalHead
    backbone: nn.Module
    args: dict[str, Any]
    codebook: np.ndarray | None
    imsize: int


def _codebook_path(checkpoint: Path) -> Path:
    # MASt3R names the codebook after the checkpoint minus its last "_"-separated part:
    # "foo_trainingfree.pth" -> "foo_codebook.pkl".
    parts = checkpoint.name.split("_")
    stem = "_".join(parts[:-1]) if len(parts) > 1 else checkpoint.stem
    return checkpoint.with_name(stem + "_codebook.pkl")


def _codebook_centroids(obj: Any, path: Path) -> np.ndarray:
    """Centroids from a reference ``Codebook.state_dict()``: ``{"state": {"centroids": [K, D]}}``."""
    node = obj.get("state", obj) if isinstance(obj, Mapping) else obj
    node = node.get("centroids") if isinstance(node, Mapping) else node
    if not isinstance(node, np.ndarray) or node.ndim != 2 or node.dtype.kind != "f":
        raise FileFormatError(path, "holds no [K, D] float centroid array (not a codebook)")
    return np.ascontiguousarray(node, dtype=np.float32)


def _read_checkpoint(path: Path) -> Mapping[str, Any]:
    """The checkpoint dict, read with ``weights_only=True`` (nothing else is unpickled)."""
    ckpt = load_torch_file(path, "a MASt3R retrieval checkpoint", safe_globals=[argparse.Namespace])
    if not isinstance(ckpt, Mapping) or "args" not in ckpt or "model" not in ckpt:
        raise FileFormatError(path, f"{_NOT_A_CHECKPOINT}: a torch file without 'args' and 'model'")
    if not isinstance(ckpt["model"], Mapping) or not isinstance(ckpt["args"], (argparse.Namespace, Mapping)):
        raise FileFormatError(path, f"{_NOT_A_CHECKPOINT}: 'args' or 'model' has the wrong type")
    return ckpt


def load_mast3r_checkpoint(
    path: str | os.PathLike,
    backbone: nn.Module | None = None,
    *,
    device: str = "cpu",
    codebook: bool = True,
) -> Mast3rCheckpoint:
    """Load a MASt3R retrieval checkpoint (``args`` + ``model``) and its codebook.

    Parameters
    ----------
    path : str or Path
        The ``.pth`` file: a dict with ``args`` (an ``argparse.Namespace`` with ``pretrained``,
        ``hdims`` like ``"1024"`` or ``"1024_1024"``, ``residual``, ``prewhiten``,
        ``postwhiten``, ``featweights``, ``nfeat``, ``imsize``, ``nclusters``) and ``model``
        (the head's state dict, backbone excluded). Loaded with ``weights_only=True``.
    backbone : torch.nn.Module, optional
        The encoder producing ``[B, N, C]`` tokens (or a ``[B, C, h, w]`` map); when omitted,
        ``mast3r`` must be importable and ``args.pretrained`` is loaded with it.
    device : str
        Where to put the head.
    codebook : bool
        Also read ``<name>_codebook.pkl`` beside it (reference pickle format, through the
        restricted loader) when present.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    FileFormatError
        If the file is not a MASt3R retrieval checkpoint (a codebook pickle, a text file, a
        torch file without ``args`` and ``model``), or its settings or weights do not fit
        the head.
    asmkit.ArgumentError
        If ``backbone`` is given without a way to tell its width (and the checkpoint has none).
    asmkit.DependencyError
        If no backbone is given and mast3r is not importable.
    """
    path = Path(path)
    ckpt = _read_checkpoint(path)
    args = ckpt["args"]
    args = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    state = dict(ckpt["model"])
    featweights = args.get("featweights", "l2norm")
    if featweights != "l2norm":
        raise FileFormatError(path, f"featweights {featweights!r} not supported (only 'l2norm')")

    if backbone is None:
        try:
            from mast3r.model import AsymmetricMASt3R  # type: ignore[import-not-found]
        except ImportError as exc:
            raise DependencyError(
                "backbone: not given and mast3r is not importable; install it "
                "(https://github.com/naver/mast3r) or pass the encoder module"
            ) from exc
        backbone = _Mast3rEncoder(AsymmetricMASt3R.from_pretrained(args["pretrained"]))

    hdims_arg = args.get("hdims", "")
    if isinstance(hdims_arg, str):
        hdims = [int(h) for h in hdims_arg.split("_")] if hdims_arg else []
    else:
        hdims = [int(h) for h in hdims_arg]
    # The backbone width is the pre-whitening's or the first Linear's input size.
    if "prewhiten.m" in state:
        dim = int(state["prewhiten.m"].shape[-1])
    elif "projector.0.weight" in state:
        dim = int(state["projector.0.weight"].shape[1])
    else:
        dim = int(getattr(backbone, "out_dim", getattr(backbone, "enc_embed_dim", 0)))
        if dim <= 0:
            raise ArgumentError("backbone: cannot tell its width; give it an out_dim attribute")
    head = RetrievalHead(
        dim,
        hdims=hdims,
        residual=bool(args.get("residual", False)),
        prewhiten=args.get("prewhiten") is not None,
        postwhiten=args.get("postwhiten") is not None,
        nfeat=args.get("nfeat", 300),
        # MASt3R's codebook was trained on un-normalised post-whitened features.
        normalize=False,
    )
    unknown = sorted(k for k in state if not k.startswith("backbone.") and k not in head.state_dict())
    if unknown:
        raise FileFormatError(path, f"checkpoint weights do not fit the head: unexpected {', '.join(unknown)}")
    head_state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    missing = sorted(set(head.state_dict()) - set(head_state))
    if missing:
        raise FileFormatError(path, f"checkpoint lacks head weights {', '.join(missing)}")
    head.load_state_dict(head_state, strict=True)
    head.to(device).train(False)

    centroids = None
    cb_path = _codebook_path(path)
    if codebook and cb_path.is_file():
        centroids = _codebook_centroids(load_legacy_pickle(cb_path), cb_path)
        logger.info("loaded codebook %s: %d words x %d dims", cb_path, *centroids.shape)
    elif codebook:
        logger.info("no codebook beside the checkpoint (%s)", cb_path)
    return Mast3rCheckpoint(
        head=head, backbone=backbone, args=args, codebook=centroids, imsize=int(args.get("imsize", 512))
    )


class _Mast3rEncoder(nn.Module):  # pragma: no cover - needs mast3r
    """MASt3R's ViT encoder as a token backbone (``_encode_image`` on normalised input)."""

    name = "mast3r"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.out_dim = int(model.enc_embed_dim)
        self.patch_size = int(model.patch_embed.patch_size[0])
        # dust3r normalises images to [-1, 1].
        self.normalize = Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = torch.tensor(x.shape[-2:], device=x.device).expand(x.shape[0], 2)
        return self.model._encode_image(self.normalize(x), true_shape=shape)[0]

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "patch_size": self.patch_size, "out_dim": self.out_dim}
