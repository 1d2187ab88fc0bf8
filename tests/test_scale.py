"""The premise of benchmarks/bench_scale.py: without idf, a database built as separate
indexes of disjoint images (each with its own adds) and searched part by part gives, once
merged by ``merge_topk``, exactly the result of one index holding every image."""

import numpy as np
import pytest
import reference_numpy as ref
from reference_numpy import make_images

from asmkit import Codebook, Index, Params, merge_topk
from asmkit.ivf import InvertedFile, image_norms
from asmkit.kernel import Aggregates, aggregate_images


@pytest.mark.parametrize("binary", [True, False])
def test_independent_parts_merge_to_whole_without_idf(centroids40, binary):
    params = Params(codebook_size=16, binary=binary, use_idf=False)
    db = make_images(24, 12, 40, seed=71, centroids=centroids40)
    queries = make_images(5, 12, 40, seed=72, centroids=centroids40)
    codebook = Codebook(centroids40)
    whole = Index(codebook, params)
    whole.add(db)
    parts = []
    for begin, end in ((0, 7), (7, 16), (16, 24)):
        part = Index(codebook, params)
        part.add(db[begin:end], np.arange(begin, end))
        parts.append(part)
    scores, ids = whole.search(queries, k=10)
    merged_scores, merged_ids = merge_topk([part.search(queries, k=10) for part in parts], k=10)
    assert np.array_equal(merged_ids, ids)
    assert np.array_equal(merged_scores, scores)
    # With idf the parts' own counts differ from the whole's: the premise needs use_idf off.
    idf_params = params.replace(use_idf=True)
    whole_idf = Index(codebook, idf_params)
    whole_idf.add(db)
    part_idf = Index(codebook, idf_params)
    part_idf.add(db[:7])
    assert not np.array_equal(part_idf.idf, whole_idf.idf)


def random_ivf(rng, n_words, n_images, first_slot, binary):
    """Posting lists of images ``first_slot ..`` with random distinct words (some lists empty)."""
    words = [np.sort(rng.choice(n_words, size=rng.integers(0, n_words // 2), replace=False)) for _ in range(n_images)]
    offsets = np.zeros(n_images + 1, dtype=np.int64)
    np.cumsum([len(w) for w in words], out=offsets[1:])
    flat = np.concatenate([np.empty(0, dtype=np.int64), *words]).astype(np.int64)
    data = (
        rng.integers(0, 2**63, size=(len(flat), 2), dtype=np.uint64)
        if binary
        else rng.standard_normal((len(flat), 5)).astype(np.float32)
    )
    return InvertedFile.from_aggregates(
        Aggregates(offsets, flat, data), first_slot + np.arange(n_images, dtype=np.int64), n_words
    )


@pytest.mark.parametrize("binary", [True, False])
def test_in_place_append_equals_scatter_twin(binary):
    rng = np.random.default_rng(5)
    for n_old, n_new in ((0, 4), (9, 0), (9, 1), (30, 25)):
        old = random_ivf(rng, 12, n_old, 0, binary)
        new = random_ivf(rng, 12, n_new, n_old, binary)
        expected = ref.append_posting_lists(old.offsets, old.slots, old.data, new.offsets, new.slots, new.data)
        copied = old.append(new)
        held = old.slots.view()
        copy_of_held = held.copy()
        merged = old.append(new, in_place=True)
        for got in (copied, merged):
            for a, b in zip((got.offsets, got.slots, got.data), expected):
                np.testing.assert_array_equal(a, b)
        # A view of the old slots pins them: they were copied, not moved under the view.
        np.testing.assert_array_equal(held, copy_of_held)
        if new.n_entries and old.n_entries:
            assert merged.slots is not old.slots and merged.data is old.data
        np.testing.assert_array_equal(
            image_norms(merged, np.linspace(0.5, 2, 12, dtype=np.float32), n_old + n_new),
            ref.image_norms(*expected[:2], np.linspace(0.5, 2, 12, dtype=np.float32), n_old + n_new),
        )


@pytest.mark.parametrize("binary", [True, False])
def test_add_aggregates_in_steps_equals_one_add(centroids40, binary):
    params = Params(binary=binary, ma_query=3)
    codebook = Codebook(centroids40)
    db = make_images(20, 12, 40, seed=73, centroids=centroids40)
    queries = make_images(3, 12, 40, seed=74, centroids=centroids40)
    aggregates = [
        aggregate_images(codebook, db[b:e], np.arange(b, e), params, side="database")
        for b, e in ((0, 6), (6, 7), (7, 20))
    ]
    whole = Index(codebook, params)
    whole.add(db)
    steps = Index(codebook, params)
    steps.add_aggregates(aggregates[0], np.arange(0, 6))
    held = steps.inverted_file
    held_slots = held.slots.copy()
    before = steps.search(queries, k=4)
    steps.add_aggregates(aggregates[1], np.arange(6, 7))
    # The held lists (and the searched database) are unchanged by the add.
    np.testing.assert_array_equal(held.slots, held_slots)
    steps.add_aggregates(aggregates[2], np.arange(7, 20))
    for a, b in zip(
        (steps.inverted_file.offsets, steps.inverted_file.slots, steps.inverted_file.data),
        (whole.inverted_file.offsets, whole.inverted_file.slots, whole.inverted_file.data),
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(steps.norms, whole.norms)
    for a, b in zip(steps.search(queries, k=4), whole.search(queries, k=4)):
        np.testing.assert_array_equal(a, b)
    assert before[1].max() < 6
