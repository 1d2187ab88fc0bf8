"""asmkit: fast, safe Aggregated Selective Match Kernels (ASMK / ASMK*) for image retrieval."""

from .params import PRESETS, Params, parse_size

__version__ = "0.1.0"

__all__ = ["Params", "PRESETS", "parse_size", "__version__"]
