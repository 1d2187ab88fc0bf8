"""HDF5 feature store keyed by image name, resumable and checked against the extractor config.

Layout (readable with any HDF5 tool, in the spirit of hloc's feature files)::

    /                          attrs: format="asmkit.features", format_version=1,
                                      config=<extractor config as JSON>
    /<image name>/descriptors  float32 [n, D]
    /<image name>/keypoints    float32 [n, 4]   (optional)
    /<image name>/attention    float32 [n]      (optional)
    /<image name>/global_descriptor float32 [G] (optional)

Image names are relative posix paths, so ``a/b.jpg`` is the group ``b.jpg`` inside the
group ``a``. ``descriptors`` is written last and the file is flushed after every image, so
an interrupted extraction resumes from the images whose ``descriptors`` exist.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import h5py
import numpy as np

from .._validation import ArgumentError, FileFormatError
from .extract import ImageFeatures

__all__ = ["FeatureStore"]

logger = logging.getLogger(__name__)

FORMAT = "asmkit.features"
FORMAT_VERSION = 1
_OPTIONAL = ("keypoints", "attention", "global_descriptor")


def _normalise_config(config: Mapping, what: str) -> dict:
    if not isinstance(config, Mapping):
        raise ArgumentError(f"{what}: expected a dict, got {type(config).__name__}")
    try:
        # A JSON round trip makes tuples lists, so equal settings compare equal after reload.
        return json.loads(json.dumps(dict(config), sort_keys=True))
    except (TypeError, ValueError) as error:
        raise ArgumentError(f"{what}: not JSON-serialisable ({error})") from None


def _differing_keys(stored: dict, requested: dict) -> list[str]:
    return sorted(key for key in set(stored) | set(requested) if stored.get(key, ...) != requested.get(key, ...))


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise ArgumentError(f"name: expected a str, got {type(name).__name__}")
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ArgumentError(f"name: {name!r} is not a relative path like 'dir/image.jpg'")
    return name


class FeatureStore:
    """Local features of many images in one HDF5 file.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.h5`` file; created (with its folder) when missing.
    config : dict or None
        The extractor's ``config()``. A new file records it; an existing file must have
        been written with an equal config. None opens an existing file read-only without
        checking (for readers that do not know the extractor).
    overwrite_on_mismatch : bool
        When the existing file's config differs: False (default) raises ``FileFormatError``;
        True deletes the file and starts an empty one.

    Raises
    ------
    FileNotFoundError
        If ``config`` is None and the file does not exist.
    asmkit.ArgumentError
        If ``config`` is not a JSON-serialisable dict.
    asmkit.FileFormatError
        If the existing file is not a feature store, or its config differs (the message
        names the path and the differing keys).

    Examples
    --------
    >>> with FeatureStore("feats.h5", extractor.config()) as store:   # doctest: +SKIP
    ...     extract_features(paths, extractor, store=store)
    ...     vecs, image_ids = store.stack(store.names())
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: Mapping | None,
        *,
        overwrite_on_mismatch: bool = False,
    ) -> None:
        self.path = Path(path)
        self.read_only = config is None
        if self.read_only:
            if not self.path.is_file():
                raise FileNotFoundError(f"feature store not found: {self.path}")
            self._file = self._open("r")
            self._check_format()
            self._config = self._stored_config()
            return

        requested = _normalise_config(config, "config")
        if self.path.exists():
            try:
                self._file = self._open("a")
                self._check_format()
                stored = self._stored_config()
                mismatch = _differing_keys(stored, requested) if stored != requested else None
            except FileFormatError:
                if not overwrite_on_mismatch:
                    raise
                mismatch = ["<not a readable feature store>"]
            if mismatch is not None:
                if hasattr(self, "_file") and self._file.id.valid:
                    self._file.close()
                if not overwrite_on_mismatch:
                    raise FileFormatError(
                        self.path,
                        f"a feature store written with a different extractor config "
                        f"(differing keys: {', '.join(mismatch)}); use another path or pass "
                        f"overwrite_on_mismatch=True to discard it",
                    )
                logger.warning("feature store %s: config differs (%s), starting afresh", self.path, ", ".join(mismatch))
                self.path.unlink()
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self._open("w")
            self._file.attrs["format"] = FORMAT
            self._file.attrs["format_version"] = FORMAT_VERSION
            self._file.attrs["config"] = json.dumps(requested, sort_keys=True)
            self._file.flush()
        self._config = requested

    # -- opening ----------------------------------------------------------------------------

    def _open(self, mode: str) -> h5py.File:
        try:
            return h5py.File(self.path, mode)
        except BlockingIOError:
            # HDF5's file lock: another process reads or writes the store. Not a damaged
            # file, so never a reason to discard it (``overwrite_on_mismatch``).
            raise BlockingIOError(
                f"feature store {self.path} is in use by another process (HDF5 file lock); "
                f"wait for it to finish, or use another cache folder"
            ) from None
        except OSError as error:
            raise FileFormatError(self.path, f"not a feature store (cannot open as HDF5: {error})") from None

    def _check_format(self) -> None:
        found = self._file.attrs.get("format")
        if found != FORMAT:
            self._file.close()
            raise FileFormatError(self.path, f"not an asmkit feature store (format attribute {found!r})")
        version = int(self._file.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            self._file.close()
            raise FileFormatError(self.path, f"feature store of unsupported format_version {version}")

    def _stored_config(self) -> dict:
        try:
            return json.loads(self._file.attrs["config"])
        except (KeyError, ValueError):
            self._file.close()
            raise FileFormatError(self.path, "feature store with a missing or invalid config attribute") from None

    @property
    def config(self) -> dict:
        """The extractor config the store was written with."""
        return dict(self._config)

    # -- access -----------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        """Whether the image's features are complete in the store."""
        node = self._file.get(_check_name(name))
        return isinstance(node, h5py.Group) and isinstance(node.get("descriptors"), h5py.Dataset)

    __contains__ = has

    def put(self, name: str, feats: ImageFeatures) -> None:
        """Store (or replace) one image's features and flush the file."""
        if self.read_only:
            raise ArgumentError(f"config: feature store {self.path} was opened read-only (config=None)")
        _check_name(name)
        if not isinstance(feats, ImageFeatures):
            raise ArgumentError(f"feats: expected ImageFeatures, got {type(feats).__name__}")
        parts = name.split("/")
        for depth in range(1, len(parts)):
            if self.has("/".join(parts[:depth])):
                raise ArgumentError(f"name: {name!r} lies inside image {'/'.join(parts[:depth])!r} in {self.path}")
        if name in self._file:
            if not (self.has(name) or self._is_partial(name)):
                raise ArgumentError(f"name: {name!r} clashes with a folder of other images in {self.path}")
            del self._file[name]
        group = self._file.create_group(name)
        for key in _OPTIONAL:
            value = getattr(feats, key)
            if value is not None:
                group.create_dataset(key, data=value)
        # Written last: its presence marks the image as complete (see has()).
        group.create_dataset("descriptors", data=feats.descriptors)
        self._file.flush()

    def _is_partial(self, name: str) -> bool:
        """A group left by an interrupted put: only optional datasets, no sub-groups."""
        group = self._file[name]
        return isinstance(group, h5py.Group) and all(
            key in _OPTIONAL and isinstance(group[key], h5py.Dataset) for key in group
        )

    def get(self, name: str) -> ImageFeatures:
        """One image's features; ``KeyError`` naming the image when absent."""
        if not self.has(name):
            raise KeyError(f"image {name!r} is not in feature store {self.path}")
        group = self._file[name]
        optional = {key: group[key][()] if key in group else None for key in _OPTIONAL}
        return ImageFeatures(descriptors=group["descriptors"][()], **optional)

    def names(self) -> list[str]:
        """Names of all complete images, sorted."""
        found: list[str] = []

        def visit(name: str, node) -> None:
            if isinstance(node, h5py.Dataset) and name.endswith("/descriptors"):
                found.append(name[: -len("/descriptors")])

        self._file.visititems(visit)
        return sorted(found)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def stack(self, names: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate the descriptors of several images.

        Parameters
        ----------
        names : iterable of str, optional
            The images, in order; default ``self.names()``.

        Returns
        -------
        vecs : numpy.ndarray
            float32 ``[N, D]``, C-contiguous.
        image_ids : numpy.ndarray
            int64 ``[N]``: row r belongs to ``names[image_ids[r]]`` (image i has id i,
            also when it has no descriptors).

        Raises
        ------
        KeyError
            If a name is not in the store.
        asmkit.ArgumentError
            If ``names`` is empty.
        asmkit.FileFormatError
            If the images' descriptor dimensions differ.
        """
        names = self.names() if names is None else list(names)
        if not names:
            raise ArgumentError(f"names: no images to stack from {self.path}")
        datasets = []
        for name in names:
            if not self.has(name):
                raise KeyError(f"image {name!r} is not in feature store {self.path}")
            datasets.append(self._file[name]["descriptors"])
        dims = {d.shape[1] for d in datasets}
        if len(dims) != 1:
            raise FileFormatError(self.path, f"descriptor dimensions differ across images ({sorted(dims)})")
        counts = np.array([d.shape[0] for d in datasets], dtype=np.int64)
        vecs = np.empty((int(counts.sum()), dims.pop()), dtype=np.float32)
        start = 0
        for dataset, count in zip(datasets, counts):
            if count:
                dataset.read_direct(vecs, dest_sel=np.s_[start : start + count])
            start += count
        image_ids = np.repeat(np.arange(len(names), dtype=np.int64), counts)
        return vecs, image_ids

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        if self._file.id.valid:
            if not self.read_only:
                self._file.flush()
            self._file.close()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._file.id.valid else "closed"
        return f"FeatureStore({str(self.path)!r}, {len(self) if state == 'open' else '?'} images, {state})"
