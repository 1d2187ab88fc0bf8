"""Pipeline presets: a features section and an ASMK section, read from TOML (or YAML).

A preset names the local-feature extractor and its options (``[features]``) and the ASMK
parameters (``[asmk]``, see :class:`asmkit.params.Params`). ``--config FILE`` overlays a
user file on a preset, key by key.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .params import Params

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["PipelineConfig", "load_config", "preset_names"]

_SECTIONS = {"description", "features", "asmk"}


def preset_names() -> list[str]:
    """Names of the presets shipped with the package (``sift``, ``deep``, ``mast3r``)."""
    folder = resources.files("asmkit") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yml", ".yaml"):
        try:
            import yaml
        except ImportError:
            raise ImportError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use TOML") from None
        data = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: invalid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table at the top level")
    return data


def _overlay(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _overlay(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass(frozen=True)
class PipelineConfig:
    """A resolved preset.

    Attributes
    ----------
    name : str
        Preset name (or ``"custom"``).
    features : dict
        Extractor type (``"sift"``, ``"deep"`` or ``"mast3r"``) and its options.
    params : Params
        ASMK parameters.
    description : str
        One line for humans.
    """

    name: str
    features: dict[str, Any]
    params: Params
    description: str = ""
    source: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, stored beside an index so that queries use the same pipeline."""
        return {
            "name": self.name,
            "description": self.description,
            "features": dict(self.features),
            "asmk": self.params.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PipelineConfig":
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=str(data.get("name", "custom")),
            features=dict(data.get("features", {})),
            params=Params.from_dict(data.get("asmk", {})),
            description=str(data.get("description", "")),
        )


def load_config(
    preset: str | None = "sift",
    config_file: str | Path | None = None,
    **asmk_overrides: Any,
) -> PipelineConfig:
    """Resolve a preset, overlay a config file, then explicit ASMK overrides.

    Parameters
    ----------
    preset : str or None
        One of :func:`preset_names`; None starts from an empty features section and
        default ASMK parameters.
    config_file : path, optional
        TOML, YAML or JSON file with ``[features]`` and/or ``[asmk]`` tables.
    **asmk_overrides
        ASMK parameters that win over both (e.g. ``codebook_size=8192``); None values
        are ignored so that unset command-line flags change nothing.

    Raises
    ------
    ValueError
        Unknown preset, unknown section or unknown ASMK parameter, naming it.
    """
    data: dict[str, Any] = {}
    name = "custom"
    if preset is not None:
        names = preset_names()
        if preset not in names:
            raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(names)}")
        text = (resources.files("asmkit") / "presets" / f"{preset}.toml").read_text(encoding="utf-8")
        data = tomllib.loads(text)
        name = preset
    if config_file is not None:
        user = _read_file(Path(config_file))
        unknown = sorted(set(user) - _SECTIONS)
        if unknown:
            raise ValueError(
                f"{config_file}: unknown section(s) {', '.join(unknown)}; expected features, asmk, description"
            )
        data = _overlay(data, user)
    asmk = dict(data.get("asmk", {}))
    asmk.update({k: v for k, v in asmk_overrides.items() if v is not None})
    return PipelineConfig(
        name=name,
        features=dict(data.get("features", {})),
        params=Params.from_dict(asmk),
        description=str(data.get("description", "")),
        source=data,
    )
