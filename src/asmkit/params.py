"""Typed, validated ASMK parameters with named presets.

One flat, frozen object instead of the reference's nested dicts; ``to_reference`` and
``from_reference`` translate to and from that layout (see ``asmkit.compat``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["Params", "PRESETS", "as_params", "parse_size"]

_SIZE_SUFFIX = {"k": 1024, "K": 1024, "M": 1024**2}


def parse_size(size: int | str) -> int:
    """Codebook size from an int or a string such as ``"64k"`` (65536) or ``"1M"``.

    Raises
    ------
    ValueError
        If the value is not a positive integer or such a string.
    """
    if isinstance(size, bool):
        raise ValueError(f"codebook_size: expected an int or a string like '64k', got {size!r}")
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
            raise ValueError(
                f"codebook_size: expected an int or a string like '64k', got {size!r}"
            ) from None
    else:
        raise ValueError(f"codebook_size: expected an int or a string like '64k', got {size!r}")
    if value < 1:
        raise ValueError(f"codebook_size: must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class Params:
    """ASMK parameters (ASMK.md sections 1-4).

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
        object.__setattr__(self, "codebook_size", parse_size(self.codebook_size))
        for name in ("binary", "use_idf"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        for name in ("alpha", "tau"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.alpha <= 0:
            raise ValueError(f"alpha: must be positive, got {self.alpha!r}")
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"tau: must lie in [-1, 1], got {self.tau!r}")
        for name in ("ma_database", "ma_query", "kmeans_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an int, got {self.seed!r}")
        if self.topk is not None and (
            isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1
        ):
            raise ValueError(f"topk: expected a positive int or None, got {self.topk!r}")

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Params":
        """Build from a flat mapping; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}"
            )
        return cls(**dict(values))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "Params":
        """A named preset (see ``PRESETS``) with optional overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]

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

        Raises ``ValueError`` naming any key this engine does not understand.
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
                raise ValueError(f"params[{section!r}]: expected a dict, got {type(value).__name__}")
            extra = sorted(set(value) - allowed[section])
            if extra:
                raise ValueError(f"params[{section!r}]: unknown key(s) {', '.join(extra)}")

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


#: Named presets. ``asmk_star`` is the reference default (HOW, ECCV'20); ``mast3r`` is what
#: MASt3R retrieval uses; ``sift`` suits RootSIFT at a few thousand descriptors per image.
PRESETS: dict[str, Params] = {
    "asmk_star": Params(),
    "asmk": Params(binary=False),
    "how": Params(codebook_size=65536, binary=True, use_idf=False),
    "mast3r": Params(codebook_size=65536, binary=True, use_idf=False, ma_database=1, ma_query=5),
    "sift": Params(codebook_size=4096, binary=True, use_idf=False, ma_database=1, ma_query=5),
}


def as_params(params: Any) -> Params:
    """``Params`` from None (defaults), a preset name, a flat dict, or a ``Params``.

    Raises
    ------
    ValueError
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
    raise ValueError(f"params: expected Params, a preset name or a dict, got {type(params).__name__}")
