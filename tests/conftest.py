"""Shared fixtures for the engine tests: small, deterministic codebooks."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

# The engine tests import their plain-NumPy twin as ``reference_numpy`` whether or not
# ``tests`` is collected as a package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def centroids40():
    """float32 [16, 40]: a small codebook of a dimension that is not a multiple of 32."""
    rng = np.random.default_rng(123)
    return rng.standard_normal((16, 40)).astype(np.float32)


@pytest.fixture(scope="session")
def centroids100():
    rng = np.random.default_rng(321)
    return rng.standard_normal((12, 100)).astype(np.float32)


@pytest.fixture(autouse=True)
def _restore_faiss_threads():
    """Give every test faiss's process default of OpenMP threads back: a test that lowers
    it (torch.set_num_threads, the CLI's --threads) would otherwise change, for the tests
    after it, the thread count their faiss and ``asmk`` references run on, and so the word
    those references pick for a float32 tie."""
    import faiss

    before = faiss.omp_get_max_threads()
    yield
    if faiss.omp_get_max_threads() != before:
        faiss.omp_set_num_threads(before)
