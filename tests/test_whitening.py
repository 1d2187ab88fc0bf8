"""PCA whitening (docs/math.md §6) against a plain NumPy reference of the formula."""

from __future__ import annotations

import numpy as np
import pytest

from asmkit._validation import ArgumentError, FileFormatError
from asmkit.features import PCAWhitening


def correlated(n: int = 2000, d: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * np.linspace(3.0, 0.1, d)[None, :]
    return (rng.normal(size=(n, d)) @ mixing.T + rng.normal(size=d) * 5).astype(np.float32)


def reference_whiten(train: np.ndarray, x: np.ndarray, dim: int, s: float) -> np.ndarray:
    """The formula written out with explicit loops over eigenpairs."""
    train = train.astype(np.float64)
    mean = train.sum(axis=0) / len(train)
    cov = np.zeros((train.shape[1], train.shape[1]))
    for row in train - mean:
        cov += np.outer(row, row)
    cov /= len(train)
    lam, vec = np.linalg.eig(cov)  # a different solver than the implementation's eigh
    lam, vec = lam.real, vec.real
    order = sorted(range(len(lam)), key=lambda i: -lam[i])
    rows = []
    for i in order[:dim]:
        rows.append(max(lam[i], 1e-14) ** (-s / 2) * vec[:, i])
    out = (x.astype(np.float64) - mean) @ np.array(rows).T
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def align_signs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Eigenvectors are defined up to sign: flip the columns of a to match b."""
    signs = np.sign(np.sum(a * b, axis=0))
    signs[signs == 0] = 1
    return a * signs


@pytest.mark.parametrize("dim,s", [(8, 1.0), (5, 1.0), (8, 0.5), (3, 0.0)])
def test_matches_reference_formula(dim, s):
    train = correlated()
    x = correlated(50, seed=1)
    white = PCAWhitening.learn(train, dim=dim, shrinkage=s)
    out = white.apply(x)
    assert out.dtype == np.float32 and out.shape == (50, dim) and out.flags.c_contiguous
    expected = reference_whiten(train, x, dim, s)
    np.testing.assert_allclose(align_signs(out.astype(np.float64), expected), expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_full_whitening_gives_identity_covariance():
    train = correlated()
    raw = PCAWhitening.learn(train).apply(train, normalize=False).astype(np.float64)
    np.testing.assert_allclose(raw.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(raw.T @ raw / len(raw), np.eye(8), atol=1e-4)


def test_shrinkage_scales_variances_by_eigenvalue_power():
    train = correlated()
    learned = PCAWhitening.learn(train, shrinkage=0.5)
    raw = learned.apply(train, normalize=False).astype(np.float64)
    variances = raw.var(axis=0)
    # Variance along eigenvector i is λ_i, scaled by λ_i^(-s): λ_i^(1-s).
    np.testing.assert_allclose(variances, learned.eigenvalues_**0.5, rtol=1e-4)
    assert np.all(np.diff(variances) < 0)  # descending order kept
    # s = 0 is plain PCA: the variances are the eigenvalues themselves.
    plain = PCAWhitening.learn(train, shrinkage=0.0).apply(train, normalize=False).astype(np.float64)
    np.testing.assert_allclose(plain.var(axis=0), learned.eigenvalues_, rtol=1e-4)


def test_reduction_keeps_leading_components():
    train = correlated()
    full = PCAWhitening.learn(train).apply(train, normalize=False)
    reduced = PCAWhitening.learn(train, dim=3).apply(train, normalize=False)
    np.testing.assert_allclose(reduced, full[:, :3], atol=1e-4)


def test_rank_deficient_input_is_clipped_not_nan():
    rng = np.random.default_rng(2)
    train = np.hstack([rng.normal(size=(100, 3)), np.zeros((100, 2))]).astype(np.float32)
    learned = PCAWhitening.learn(train)
    assert learned.eigenvalues_.min() == pytest.approx(1e-14)
    assert np.all(np.isfinite(learned.apply(train)))


def test_save_load_and_arrays_round_trip(tmp_path):
    learned = PCAWhitening.learn(correlated(), dim=4, shrinkage=0.7)
    path = tmp_path / "white.npz"
    learned.save(path)
    loaded = PCAWhitening.load(path)
    x = correlated(10, seed=3)
    np.testing.assert_array_equal(loaded.apply(x), learned.apply(x))
    assert loaded.shrinkage == 0.7 and loaded.output_dim == 4
    assert loaded.config() == learned.config()
    again = PCAWhitening.from_arrays(learned.to_arrays())
    np.testing.assert_array_equal(again.projection_, learned.projection_)


def test_load_refuses_pickles_and_bad_files(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(
        path, mean=np.zeros(3), projection=np.array([object()], dtype=object), eigenvalues=np.ones(3), shrinkage=1.0
    )
    with pytest.raises(FileFormatError, match="bad.npz"):
        PCAWhitening.load(path)
    np.savez(path, mean=np.zeros(3))
    with pytest.raises(FileFormatError, match="bad.npz: .*missing eigenvalues, projection, shrinkage"):
        PCAWhitening.load(path)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        PCAWhitening.load(tmp_path / "nope.npz")


@pytest.mark.parametrize("content", [b"", b"hello\n", b"PK\x03\x04" + b"\0" * 40, "npy", "truncated"])
def test_load_names_a_file_that_is_not_a_whitening(tmp_path, content):
    path = tmp_path / "whitening.npz"
    if content == "npy":
        with open(path, "wb") as fh:
            np.save(fh, np.zeros(3))
    elif content == "truncated":
        PCAWhitening.learn(correlated()).save(path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(FileFormatError, match="whitening.npz: not a whitening file"):
        PCAWhitening.load(path)


def test_input_validation():
    train = correlated()
    with pytest.raises(ArgumentError, match="vecs"):
        PCAWhitening.learn(train[0])
    with pytest.raises(ArgumentError, match="at least 2"):
        PCAWhitening.learn(train[:1])
    with pytest.raises(ArgumentError, match="NaN"):
        PCAWhitening.learn(np.full((4, 2), np.nan))
    with pytest.raises(ArgumentError, match="dim"):
        PCAWhitening.learn(train, dim=9)
    with pytest.raises(ArgumentError, match="dim"):
        PCAWhitening.learn(train, dim=2.0)
    with pytest.raises(ArgumentError, match="shrinkage"):
        PCAWhitening.learn(train, shrinkage=1.5)
    with pytest.raises(ArgumentError, match=r"\[N, 8\]"):
        PCAWhitening.learn(train).apply(np.zeros((2, 7)))
