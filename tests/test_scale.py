"""The premise of benchmarks/bench_scale.py: without idf, a database built as separate
indexes of disjoint images (each with its own adds) and searched part by part gives, once
merged by ``merge_topk``, exactly the result of one index holding every image."""

import numpy as np
import pytest
from reference_numpy import make_images

from asmkit import Codebook, Index, Params, merge_topk


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
