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
from pathlib import Path
from typing import Any, Mapping

from ._validation import ArgumentError, DependencyError, FileFormatError
from .features.factory import feature_options
from .params import Params, preset_names, preset_table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["PipelineConfig", "load_config", "preset_names"]

_SECTIONS = {"description", "features", "asmk", "verify"}


def _read_file(path: Path) -> dict[str, Any]:
    """A config file's top-level table (TOML, or YAML / JSON by suffix)."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FileFormatError(path, "not a text file (expected TOML, YAML or JSON)") from None
    if path.suffix in (".yml", ".yaml"):
        try:
            import yaml
        except ImportError:
            raise DependencyError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use TOML") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise FileFormatError(path, f"invalid YAML: {str(exc).splitlines()[0]}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FileFormatError(path, f"invalid JSON: {exc}") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise FileFormatError(path, f"invalid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise FileFormatError(path, f"expected a table at the top level, got {type(data).__name__}")
    unknown = sorted(set(data) - _SECTIONS)
    if unknown:
        raise FileFormatError(
            path, f"unknown section(s) {', '.join(map(str, unknown))}; expected features, asmk, verify, description"
        )
    for section in ("features", "asmk", "verify"):
        if section in data and not isinstance(data[section], dict):
            raise FileFormatError(path, f"[{section}] must be a table, got {type(data[section]).__name__}")
    if not isinstance(data.get("description", ""), str):
        raise FileFormatError(path, "description must be a string")
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
    verify : str or None
        The preset whose local features verify this one's rankings (``[verify] preset``:
        their keypoints, visual words and signatures fill the geometry store), or None for
        this preset's own features. Deep features sit on a grid of cell centres, too coarse
        to tell a true match from a similar object; SIFT keypoints are not
        (docs/verify.md).
    codebook_size_chosen : bool
        Whether the user chose ``params.codebook_size`` (a config file or an override);
        otherwise it is the preset's, and a codebook trained on fewer descriptors than it
        needs is made smaller.
    """

    name: str
    features: dict[str, Any]
    params: Params
    description: str = ""
    verify: str | None = None
    codebook_size_chosen: bool = field(default=False, compare=False)
    source: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, stored beside an index so that queries use the same pipeline."""
        out = {
            "name": self.name,
            "description": self.description,
            "features": dict(self.features),
            "asmk": self.params.to_dict(),
        }
        if self.verify is not None:
            out["verify"] = {"preset": self.verify}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PipelineConfig":
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=str(data.get("name", "custom")),
            features=dict(data.get("features", {})),
            params=Params.from_dict(data.get("asmk", {})),
            description=str(data.get("description", "")),
            verify=_verify_preset(data.get("verify", {})),
        )

    def verify_config(self) -> "PipelineConfig | None":
        """The config of the preset that verifies this one's rankings (:attr:`verify`), or
        None when this preset's own features do."""
        return None if self.verify is None else load_config(self.verify)


def _verify_preset(table: Any) -> str | None:
    """The checked ``preset`` of a ``[verify]`` table: a plain preset that verifies with its
    own features (one step, never a chain or a hybrid)."""
    if not isinstance(table, Mapping):
        raise ArgumentError(f"verify: expected a table with a preset name, got {type(table).__name__}")
    unknown = sorted(set(table) - {"preset"})
    if unknown:
        raise ArgumentError(f"verify: unknown option(s) {', '.join(map(str, unknown))}; expected preset")
    name = table.get("preset")
    # An empty name lets a config file give a preset's own features back.
    if name is None or name == "":
        return None
    if not isinstance(name, str) or name not in preset_names():
        raise ArgumentError(f"verify.preset: unknown preset {name!r}; expected one of {', '.join(preset_names())}")
    other = preset_table(name)
    if "hybrid" in other or "verify" in other:
        raise ArgumentError(f"verify.preset: {name!r} must be a plain preset that verifies with its own features")
    return name


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
    ArgumentError
        Unknown preset or bad override, naming it.
    FileFormatError
        A config file that is not TOML/YAML/JSON, has unknown sections or options, or
        values of the wrong type; the message names the file.
    """
    data: dict[str, Any] = {}
    name = "custom"
    if preset is not None:
        data = preset_table(preset)
        name = preset
    chosen = asmk_overrides.get("codebook_size") is not None
    if config_file is not None:
        path = Path(config_file)
        user = _read_file(path)
        data = _overlay(data, user)
        chosen = chosen or "codebook_size" in user.get("asmk", {})
        try:
            feature_options(data.get("features", {}))
            Params.from_dict(data.get("asmk", {}))
            _verify_preset(data.get("verify", {}))
        except ArgumentError as exc:
            raise FileFormatError(path, str(exc)) from None
    asmk = dict(data.get("asmk", {}))
    asmk.update({k: v for k, v in asmk_overrides.items() if v is not None})
    return PipelineConfig(
        name=name,
        features=dict(data.get("features", {})),
        params=Params.from_dict(asmk),
        description=str(data.get("description", "")),
        verify=_verify_preset(data.get("verify", {})),
        codebook_size_chosen=chosen,
        source=data,
    )
