"""Compatibility with the reference ``asmk`` package: its ``ASMKMethod`` call shape (with
``IvfBuilder`` and the ``IVF`` it holds), and a restricted reader for its pickled codebooks
and inverted files."""

from .asmk_method import IVF, ASMKMethod, IvfBuilder
from .legacy import LegacyFormatError, codebook_from_legacy, index_from_legacy, ivf_from_legacy, load_legacy_pickle

__all__ = [
    "ASMKMethod",
    "IvfBuilder",
    "IVF",
    "LegacyFormatError",
    "load_legacy_pickle",
    "codebook_from_legacy",
    "ivf_from_legacy",
    "index_from_legacy",
]
