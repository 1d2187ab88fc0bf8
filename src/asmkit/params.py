"""Typed, validated ASMK parameters, and the presets they come from.

One flat, frozen object instead of the reference's nested dicts; ``to_reference`` and
``from_reference`` translate to and from that layout (see ``asmkit.compat``).

The presets are the TOML files of ``asmkit/presets``: each names a feature extractor
(``[features]``, read by :mod:`asmkit.config`) and ASMK parameters (``[asmk]``, read here).
``Params.preset(name)`` and ``PRESETS[name]`` are the ``[asmk]`` table of that file, so
that the Python API and ``--preset`` share one set of names and values.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any, Mapping

from ._validation import ArgumentError, check_bool, check_float, check_int

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["Params", "PRESETS", "as_params", "parse_size", "preset_names", "preset_table"]

_SIZE_SUFFIX = {"k": 1024, "K": 1024, "M": 1024**2}


def parse_size(size: int | str) -> int:
    """Codebook size from an int or a string such as ``"64k"`` (65536) or ``"1M"``.

    Raises
    ------
    ArgumentError
        If the value is not a positive integer or such a string.
    """
    if isinstance(size, bool):
        raise ArgumentError(f"codebook_size: expected an int or a string like '64k', got {size!r}")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        text = size.strip()
        try:
            if text and text[-1] in _SIZE_SUFFIX:
                value = int(text[:-1]) * _SIZE_SUFFIX[text[-1]]
            else:
                value = int(text)
        except ValueError:
            raise ArgumentError(f"codebook_size: expected an int or a string like '64k', got {size!r}") from None
    else:
        raise ArgumentError(f"codebook_size: expected an int or a string like '64k', got {size!r}")
    if value < 1:
        raise ArgumentError(f"codebook_size: must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class Params:
    """ASMK parameters (docs/math.md sections 1-4).

    Attributes
    ----------
    codebook_size : int
        Number of visual words k (strings like ``"64k"`` are accepted).
    binary : bool
        ASMK* (binarised aggregates, Hamming similarity) when True, real ASMK otherwise.
    use_idf : bool
        Weight words by idf[c] = log(N / counts[c])**2.
    alpha : float
        Selectivity exponent α.
    tau : float
        Selectivity threshold τ: word similarities below it count 0.
    ma_database : int
        Multiple assignment (nearest words per descriptor) for database images.
    ma_query : int
        Multiple assignment for query images.
    kmeans_iters : int
        k-means iterations for codebook training (the reference uses 10).
    seed : int
        Seed for k-means initialisation.
    topk : int or None
        Results per query; None ranks the whole database.
    """

    codebook_size: int = 65536
    binary: bool = True
    use_idf: bool = False
    alpha: float = 3.0
    tau: float = 0.0
    ma_database: int = 1
    ma_query: int = 5
    kmeans_iters: int = 10
    seed: int = 1234
    topk: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # the dataclass is frozen; checks store the coerced values
        set_(self, "codebook_size", parse_size(self.codebook_size))
        set_(self, "binary", check_bool(self.binary, "binary"))
        set_(self, "use_idf", check_bool(self.use_idf, "use_idf"))
        set_(self, "alpha", check_float(self.alpha, "alpha", min=0.0, min_open=True))
        set_(self, "tau", check_float(self.tau, "tau", min=-1.0, max=1.0))
        for name in ("ma_database", "ma_query", "kmeans_iters"):
            set_(self, name, check_int(getattr(self, name), name, min=1))
        set_(self, "seed", check_int(self.seed, "seed"))
        set_(self, "topk", check_int(self.topk, "topk", min=1, none=True))

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Params":
        """Build from a flat mapping; unknown keys raise ``ArgumentError`` naming them."""
        if not isinstance(values, Mapping):
            raise ArgumentError(f"params: expected a mapping of parameters, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ArgumentError(
                f"unknown parameter(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}"
            )
        return cls(**dict(values))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "Params":
        """The ``[asmk]`` table of a preset (see :func:`preset_names`), with optional overrides.

        Raises
        ------
        ArgumentError
            Unknown preset (the message lists them) or a bad override.
        """
        if name not in PRESETS:
            raise ArgumentError(f"preset: unknown preset {name!r}; expected one of {', '.join(sorted(PRESETS))}")
        return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]

    def replace(self, **changes: Any) -> "Params":
        """A copy with some fields changed (validated again)."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON/TOML-serialisable dict; ``Params.from_dict`` inverts it."""
        return dataclasses.asdict(self)

    # -- the reference package's nested layout ----------------------------------------------

    def to_reference(self) -> dict[str, Any]:
        """The reference ``asmk`` params dict (``index``, ``train_codebook``, ``build_ivf``, ``query_ivf``)."""
        return {
            "index": {"gpu_id": None},
            "train_codebook": {"codebook": {"size": self.codebook_size}},
            "build_ivf": {
                "kernel": {"binary": self.binary},
                "ivf": {"use_idf": self.use_idf},
                "quantize": {"multiple_assignment": self.ma_database},
                "aggregate": {},
            },
            "query_ivf": {
                "quantize": {"multiple_assignment": self.ma_query},
                "aggregate": {},
                "search": {"topk": self.topk},
                "similarity": {"similarity_threshold": self.tau, "alpha": self.alpha},
            },
        }

    @classmethod
    def from_reference(cls, params: Mapping[str, Any]) -> "Params":
        """Translate the reference's nested params dict; missing sections take defaults.

        Raises ``ArgumentError`` naming any key this engine does not understand.
        """
        allowed = {
            "index": {"gpu_id"},
            "train_codebook": {"codebook"},
            "build_ivf": {"kernel", "ivf", "quantize", "aggregate"},
            "query_ivf": {"quantize", "aggregate", "search", "similarity"},
        }
        for section, value in params.items():
            if section not in allowed:
                # The reference's example YAMLs carry experiment settings beside the steps.
                continue
            if not isinstance(value, Mapping):
                raise ArgumentError(f"params[{section!r}]: expected a dict, got {type(value).__name__}")
            extra = sorted(set(value) - allowed[section])
            if extra:
                raise ArgumentError(f"params[{section!r}]: unknown key(s) {', '.join(extra)}")

        def get(path: tuple[str, ...], default: Any) -> Any:
            node: Any = params
            for key in path:
                if not isinstance(node, Mapping) or key not in node:
                    return default
                node = node[key]
            return default if node is None and default is not None else node

        binary = get(("build_ivf", "kernel", "binary"), True)
        binary = {"bin": True, "nobin": False}.get(binary, binary) if isinstance(binary, str) else binary
        return cls(
            codebook_size=get(("train_codebook", "codebook", "size"), 65536),
            binary=bool(binary),
            use_idf=bool(get(("build_ivf", "ivf", "use_idf"), False)),
            alpha=get(("query_ivf", "similarity", "alpha"), 3.0),
            tau=get(("query_ivf", "similarity", "similarity_threshold"), 0.0),
            ma_database=int(get(("build_ivf", "quantize", "multiple_assignment"), 1)),
            ma_query=int(get(("query_ivf", "quantize", "multiple_assignment"), 5)),
            topk=get(("query_ivf", "search", "topk"), None),
        )


def preset_names() -> list[str]:
    """Names of the presets shipped with the package (one TOML file each)."""
    folder = resources.files("asmkit") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def preset_table(name: str) -> dict[str, Any]:
    """The parsed TOML of a shipped preset: ``description``, ``[features]``, ``[asmk]``.

    Raises
    ------
    ArgumentError
        Unknown preset (the message lists them).
    """
    names = preset_names()
    if name not in names:
        raise ArgumentError(f"preset: unknown preset {name!r}; expected one of {', '.join(names)}")
    return tomllib.loads((resources.files("asmkit") / "presets" / f"{name}.toml").read_text(encoding="utf-8"))


#: The ASMK parameters of every shipped preset, by name (read-only). ``asmk_star`` is the
#: reference default (HOW, ECCV'20), equal to ``Params()``.
PRESETS: Mapping[str, Params] = MappingProxyType(
    {name: Params.from_dict(preset_table(name).get("asmk", {})) for name in preset_names()}
)


def as_params(params: Any) -> Params:
    """``Params`` from None (defaults), a preset name, a flat dict, or a ``Params``.

    Raises
    ------
    ArgumentError
        Unknown preset or parameter names (naming them), or anything else.
    """
    if params is None:
        return Params()
    if isinstance(params, Params):
        return params
    if isinstance(params, str):
        return Params.preset(params)
    if isinstance(params, Mapping):
        return Params.from_dict(params)
    raise ArgumentError(f"params: expected Params, a preset name or a dict, got {type(params).__name__}")
