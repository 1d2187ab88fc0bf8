"""asmkit: fast, safe Aggregated Selective Match Kernels (ASMK / ASMK*) for image retrieval."""

from ._validation import ArgumentError, AsmkitError, DependencyError, FileFormatError
from .codebook import Codebook
from .index import Index
from .params import PRESETS, Params, parse_size
from .search import merge_topk, similarity_matrix

__version__ = "0.1.0"

__all__ = [
    "AsmkitError",
    "ArgumentError",
    "FileFormatError",
    "DependencyError",
    "Codebook",
    "Index",
    "Params",
    "PRESETS",
    "merge_topk",
    "parse_size",
    "similarity_matrix",
    "__version__",
]
