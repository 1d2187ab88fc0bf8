import numpy as np
import pytest
import reference_numpy as ref
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from reference_numpy import make_images

from asmkit.kernel import (
    aggregate,
    hamming_similarity,
    n_hamming_bits,
    pack_bits,
    prepare_descriptors,
    unpack_bits,
)


def _aggregate_all(images, centroids, m, binary, ids=None):
    desc = prepare_descriptors(images, ids, dim=centroids.shape[1])
    assign = ref.quantize(desc.vecs, centroids, m) if len(desc.vecs) else np.empty((0, m), np.int64)
    return desc, assign, aggregate(desc.vecs, assign, desc.starts, desc.order, centroids, binary=binary)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("fixture", ["centroids40", "centroids100"])
def test_aggregate_matches_twin(request, fixture, m, binary):
    centroids = request.getfixturevalue(fixture)
    images = make_images(6, 12, centroids.shape[1], seed=m, centroids=centroids, empty=(2,))
    desc, assign, agg = _aggregate_all(images, centroids, m, binary)
    assert agg.offsets.tolist()[0] == 0 and agg.offsets[3] == agg.offsets[2]  # image 2 is empty
    for i, vecs in enumerate(images):
        rows = slice(agg.offsets[i], agg.offsets[i + 1])
        image_assign = ref.quantize(vecs, centroids, m) if len(vecs) else np.empty((0, m), np.int64)
        words, aggs = ref.aggregate_image(vecs, image_assign, centroids, binary)
        assert agg.words[rows].tolist() == words
        if not words:
            assert agg.offsets[i + 1] == agg.offsets[i]
        elif binary:
            np.testing.assert_array_equal(agg.data[rows], np.array(aggs))
        else:
            np.testing.assert_allclose(agg.data[rows], np.array(aggs), rtol=0, atol=2e-7)


def test_aggregate_rows_need_not_be_contiguous(centroids40):
    images = make_images(4, 10, 40, seed=3, centroids=centroids40)
    vecs, ids = np.concatenate(images), np.concatenate([np.full(len(v), 10 * i + 5) for i, v in enumerate(images)])
    shuffle = np.random.default_rng(0).permutation(len(vecs))
    _, _, grouped = _aggregate_all(images, centroids40, 2, True, None)
    desc = prepare_descriptors(vecs[shuffle], ids[shuffle], dim=40)
    assert desc.image_ids.tolist() == [5, 15, 25, 35]
    assign = ref.quantize(desc.vecs, centroids40, 2)
    mixed = aggregate(desc.vecs, assign, desc.starts, desc.order, centroids40, binary=False)
    np.testing.assert_array_equal(mixed.words, grouped.words)
    # Descriptor order within an image changed, so float32 sums may differ by rounding.
    _, _, grouped_real = _aggregate_all(images, centroids40, 2, False)
    np.testing.assert_allclose(mixed.data, grouped_real.data, atol=1e-5)


@pytest.mark.parametrize("ids", [[3, 3, 7, 7, 7, 9], [7, 3, 9, 7, 3, 7], [5, 5, 5, 5, 5, 5]])
def test_grouping_of_sorted_and_unsorted_ids(ids):
    # Sorted ids take a path without sorting; both give the same grouping and labels.
    ids = np.array(ids)
    vecs = np.arange(len(ids) * 4, dtype=np.float32).reshape(len(ids), 4)
    desc = prepare_descriptors(vecs, ids, dim=4)
    unique = np.unique(ids)
    assert desc.image_ids.tolist() == unique.tolist()
    for i, image in enumerate(unique):
        rows = desc.order[desc.starts[i] : desc.starts[i + 1]]
        assert rows.tolist() == np.flatnonzero(ids == image).tolist()  # input order kept
    np.testing.assert_array_equal(desc.labels, np.searchsorted(unique, ids))


def test_duplicate_word_in_one_assignment_counts_once(centroids40):
    vecs = np.random.default_rng(4).standard_normal((3, 40)).astype(np.float32)
    assign = np.array([[1, 1], [1, 2], [2, 2]], dtype=np.int64)
    desc = prepare_descriptors([vecs], dim=40)
    agg = aggregate(desc.vecs, assign, desc.starts, desc.order, centroids40, binary=False)
    expected = ref.residual_sums(vecs, assign, centroids40)
    assert agg.words.tolist() == [1, 2]
    for row, word in enumerate([1, 2]):
        np.testing.assert_allclose(agg.data[row], ref.normalize(expected[word]), atol=2e-7)


def _ref_to_u64(packed32):
    """Reference uint32 MSB-first words -> our uint64 words (pairs of uint32, high first)."""
    packed32 = packed32.astype(np.uint64)
    if packed32.shape[1] % 2:
        packed32 = np.pad(packed32, ((0, 0), (0, 1)))
    return (packed32[:, 0::2] << np.uint64(32)) | packed32[:, 1::2]


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("fixture", ["centroids40", "centroids100"])
def test_aggregate_bit_exact_against_reference_package(request, fixture, binary):
    kernel_mod = pytest.importorskip("asmk.kernel")
    centroids = request.getfixturevalue(fixture)

    class _Book:  # the reference kernel reads only .centroids
        pass

    book = _Book()
    book.centroids = centroids
    ref_kernel = kernel_mod.ASMKKernel(book, binary=binary)
    images = make_images(5, 40, centroids.shape[1], seed=11, centroids=centroids)
    desc, assign, agg = _aggregate_all(images, centroids, 3, binary)
    for i in range(len(images)):
        rows = desc.order[desc.starts[i] : desc.starts[i + 1]]
        ades, words = ref_kernel.aggregate_image(desc.vecs[rows], assign[rows])
        sl = slice(agg.offsets[i], agg.offsets[i + 1])
        np.testing.assert_array_equal(agg.words[sl], words)
        expected = _ref_to_u64(ades) if binary else ades
        np.testing.assert_array_equal(agg.data[sl], expected)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.bool_, st.tuples(st.integers(0, 5), st.integers(1, 200))))
def test_pack_bits_matches_twin_and_roundtrips(bits):
    packed = pack_bits(bits)
    assert packed.dtype == np.uint64 and packed.shape == (bits.shape[0], (bits.shape[1] + 63) // 64)
    for row, expected in zip(packed, bits):
        np.testing.assert_array_equal(row, ref.pack(expected))
    np.testing.assert_array_equal(unpack_bits(packed, bits.shape[1]), bits)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 200).flatmap(
        lambda d: st.tuples(
            st.just(d),
            hnp.arrays(np.bool_, (3, d)),
            hnp.arrays(np.bool_, (4, d)),
        )
    )
)
def test_hamming_similarity_matches_twin(case):
    dim, a, b = case
    u = hamming_similarity(pack_bits(a), pack_bits(b), dim)
    assert u.dtype == np.float32 and u.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert u[i, j] == ref.similarity(ref.pack(a[i]), ref.pack(b[j]), True, dim)
            # u = 1 - 2h/B with the padding counted in B (docs/math.md §3).
            h = int(np.sum(a[i] != b[j]))
            assert abs(float(u[i, j]) - (1 - 2 * h / n_hamming_bits(dim))) < 1e-6


def test_hamming_similarity_matches_reference_package():
    hamming = pytest.importorskip("asmk.hamming")
    rng = np.random.default_rng(9)
    for dim in (40, 64, 100, 128):
        a = rng.standard_normal((3, dim)).astype(np.float32)
        b = rng.standard_normal((50, dim)).astype(np.float32)
        pa, pb = hamming.binarize_and_pack_2D(a), hamming.binarize_and_pack_2D(b)
        ref_u = np.stack([-2 * hamming.hamming_cdist_packed(pa[i : i + 1], pb).squeeze(0) + 1 for i in range(3)])
        ours = hamming_similarity(pack_bits(a > 0), pack_bits(b > 0), dim)
        np.testing.assert_array_equal(ours, ref_u)
