"""Tests for asmkit.evaluate: hand-computed numbers and a plain-loop twin."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from asmkit._validation import FileFormatError
from asmkit.evaluate import (
    GroundTruth,
    average_precision,
    evaluate,
    load_ground_truth,
    mean_average_precision,
    ns_score,
)

UKBENCH = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ukbench2000"


# ----------------------------------------------------------------- plain-loop reference


def loop_positions(ranked, positives, junk):
    """Positions of positives after junk removal, by shifting (as revisitop does)."""
    ranked = [r for r in ranked if r >= 0]
    pos = [i for i, r in enumerate(ranked) if r in positives]
    junk_pos = [i for i, r in enumerate(ranked) if r in junk and r not in positives]
    out = []
    for p in pos:
        shift = sum(1 for j in junk_pos if j < p)
        out.append(p - shift)
    return out


def loop_ap(ranked, positives, junk):
    positives, junk = set(positives), set(junk)
    if not positives:
        return math.nan
    ap = 0.0
    step = 1.0 / len(positives)
    for j, rank in enumerate(loop_positions(ranked, positives, junk)):
        p0 = 1.0 if rank == 0 else j / rank
        p1 = (j + 1) / (rank + 1)
        ap += (p0 + p1) * step / 2.0
    return ap


def loop_pk(ranked, positives, junk, k):
    pos = [p + 1 for p in loop_positions(ranked, set(positives), set(junk))]
    if not pos:
        return 0.0
    kq = min(max(pos), k)
    return sum(1 for p in pos if p <= kq) / kq


def make_gt(positives, junk, n_images, groups=None, easy=None, hard=None):
    images = [f"img{i}.jpg" for i in range(n_images)]
    arr = lambda ls: [np.asarray(sorted(set(x)), dtype=np.int64) for x in ls]  # noqa: E731
    return GroundTruth(
        images=images,
        queries=[f"q{i}" for i in range(len(positives))],
        positives=arr(positives),
        junk=arr(junk),
        query_groups=arr(groups) if groups is not None else None,
        easy=arr(easy) if easy is not None else None,
        hard=arr(hard) if hard is not None else None,
    )


# ----------------------------------------------------------------- known numbers


def test_ap_known_numbers():
    # positives at 0-based ranks 0 and 2: (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2 = 19/24
    assert average_precision([5, 9, 7], [5, 7]) == pytest.approx(19 / 24)
    # the same after removing a junk image in front
    assert average_precision([3, 5, 9, 7], [5, 7], [3]) == pytest.approx(19 / 24)
    # one positive at rank 2: trapezoid between precision 0 and 1/2
    assert average_precision([1, 2], [2]) == pytest.approx(0.25)
    # a positive that is never retrieved adds nothing but counts in recall
    assert average_precision([0, 1], [0, 8]) == pytest.approx(0.5)
    assert average_precision([0, 1, 2], [0, 1, 2]) == pytest.approx(1.0)
    assert average_precision([4, 3], [9]) == 0.0
    assert math.isnan(average_precision([1, 2], []))
    # padding is ignored
    assert average_precision([-1, 2, -1], [2]) == pytest.approx(1.0)


def test_positive_that_is_also_junk_counts_as_positive():
    assert average_precision([4, 2], [2], [2, 4]) == pytest.approx(1.0)


def test_map_and_precision_known_numbers():
    gt = make_gt(positives=[[5, 7], [2]], junk=[[3], []], n_images=10)
    ranks = np.array([[3, 5, 9, 7, 0], [1, 2, 0, 3, 4]])
    mean_ap, mp = mean_average_precision(ranks, gt)
    assert mean_ap == pytest.approx((19 / 24 + 0.25) / 2)
    # query 0: positives at 1-based ranks 1 and 3 -> P@1 = 1, P@5 = P@10 = 2/3 (k capped
    # at the last positive); query 1: positive at rank 2 -> P@1 = 0, P@5 = 1/2
    assert mp[1] == pytest.approx(0.5)
    assert mp[5] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert mp[10] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_queries_without_positives_are_left_out(caplog):
    gt = make_gt(positives=[[1], []], junk=[[], []], n_images=3)
    res = evaluate(np.array([[1, 0, 2], [0, 1, 2]]), gt)
    assert res["map"] == pytest.approx(1.0)
    assert res["n_queries"] == 1
    assert "no positives" in caplog.text


def test_ns_score_known_numbers():
    groups = [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7]]
    ranks = np.array([[0, 5, 1, 2, 3], [1, 0, 2, 3, 9], [9, 8, 7, 6, 5]])
    assert ns_score(ranks, groups) == pytest.approx((3 + 4 + 2) / 3)
    with pytest.raises(ValueError, match="at least 4 columns"):
        ns_score(ranks[:, :3], groups)
    with pytest.raises(ValueError, match="groups"):
        ns_score(ranks, groups[:2])


def test_protocols_easy_medium_hard():
    # one query; easy = {1}, hard = {2}, junk = {3}
    gt = make_gt(positives=[[1, 2]], junk=[[3]], n_images=5, easy=[[1]], hard=[[2]])
    ranks = np.array([[2, 3, 0, 1, 4]])
    res = evaluate(ranks, gt)
    # easy: junk {3, 2} removed -> [0, 1, 4], easy positive at rank 1 -> AP 0.25
    assert res["easy"]["map"] == pytest.approx(0.25)
    # medium: [2, 0, 1, 4] with positives {1, 2} -> ranks 0 and 2 -> 19/24
    assert res["medium"]["map"] == pytest.approx(19 / 24)
    # hard: junk {3, 1} removed -> [2, 0, 4] -> AP 1
    assert res["hard"]["map"] == pytest.approx(1.0)
    assert res["map"] == pytest.approx(19 / 24)
    assert set(res["mp"]) == {"1", "5", "10"}
    assert "ns_score" not in res
    with pytest.raises(ValueError, match="protocol"):
        mean_average_precision(ranks, gt, protocol="extreme")


def test_query_indices_subset():
    gt = make_gt(positives=[[1], [2], [0]], junk=[[], [], []], n_images=3)
    ranks = np.array([[0, 2, 1]])  # row is query 2: its positive 0 is first
    assert mean_average_precision(ranks, gt, query_indices=[2])[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="query_indices"):
        evaluate(ranks, gt)  # 1 row for 3 queries without query_indices
    with pytest.raises(ValueError, match="query_indices"):
        evaluate(ranks, gt, query_indices=[3])


def test_ranks_validation():
    gt = make_gt(positives=[[1]], junk=[[]], n_images=3)
    with pytest.raises(ValueError, match="ranks: expected a 2-D"):
        evaluate(np.array([1, 0, 2]), gt)
    with pytest.raises(ValueError, match="integer"):
        evaluate(np.array([[1.0, 0.0]]), gt)
    with pytest.raises(ValueError, match="out of range"):
        evaluate(np.array([[1, 7]]), gt)
    with pytest.raises(ValueError, match=">= 0"):
        evaluate(np.array([[1, -3]]), gt)


# ----------------------------------------------------------------- parity with the loop twin


@pytest.mark.parametrize("seed", range(5))
def test_parity_with_plain_loop(seed):
    rng = np.random.default_rng(seed)
    n_images, n_queries = 40, 25
    positives, junk, rows = [], [], []
    for _ in range(n_queries):
        perm = rng.permutation(n_images)
        npos, njunk = rng.integers(1, 6), rng.integers(0, 4)
        positives.append(perm[:npos].tolist())
        junk.append(perm[npos : npos + njunk].tolist())
        row = rng.permutation(n_images)
        cut = rng.integers(10, n_images + 1)  # truncated rankings, padded with -1
        rows.append(np.concatenate([row[:cut], -np.ones(n_images - cut, dtype=np.int64)]))
    ranks = np.stack(rows)
    gt = make_gt(positives, junk, n_images)
    mean_ap, mp = mean_average_precision(ranks, gt)
    ref_aps = [loop_ap(r.tolist(), p, j) for r, p, j in zip(ranks, positives, junk)]
    assert mean_ap == pytest.approx(np.mean(ref_aps), abs=1e-12)
    for k in (1, 5, 10):
        ref = np.mean([loop_pk(r.tolist(), p, j, k) for r, p, j in zip(ranks, positives, junk)])
        assert mp[k] == pytest.approx(ref, abs=1e-12)
    for r, p, j, ref in zip(ranks, positives, junk, ref_aps):
        assert average_precision(r, p, j) == pytest.approx(ref, abs=1e-12)


# ----------------------------------------------------------------- gt.json loading


def write_gt(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gt.json").write_text(json.dumps(data))
    return folder


def small_gt_dict():
    images = [f"images/{i}.jpg" for i in range(8)]
    return {
        "name": "tiny",
        "images": images,
        "queries": images[:2],
        "positives": {images[0]: images[1:4], images[1]: [images[0], images[2], images[3]]},
        "junk": {images[0]: [images[0]], images[1]: [images[1]]},
        "groups": [images[:4], images[4:]],
    }


def test_load_ground_truth_and_evaluate(tmp_path):
    folder = write_gt(tmp_path / "ds", small_gt_dict())
    gt = load_ground_truth(folder)
    assert gt.name == "tiny" and gt.root == folder
    assert gt.positives[0].tolist() == [1, 2, 3]
    assert gt.query_groups[1].tolist() == [0, 1, 2, 3]
    assert gt.image_paths()[2] == folder / "images/2.jpg"
    ranks = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [1, 4, 0, 2, 3, 5, 6, 7]])
    res = evaluate(ranks, gt)
    assert res["ns_score"] == pytest.approx((4 + 3) / 2)
    assert res["n_queries"] == 2
    # query 1: junk 1 removed -> [4, 0, 2, 3, ...] positives at ranks 1, 2, 3
    ap1 = ((0 + 0.5) + (0.5 + 2 / 3) + (2 / 3 + 3 / 4)) / 6
    assert res["map"] == pytest.approx((1.0 + ap1) / 2)


def test_load_ground_truth_list_form_and_protocols(tmp_path):
    data = small_gt_dict()
    q = data["queries"]
    data["positives"] = [data["positives"][x] for x in q]
    data["junk"] = [data["junk"][x] for x in q]
    data["easy"] = {q[0]: data["images"][1:2], q[1]: data["images"][2:3]}
    data["hard"] = {q[0]: data["images"][2:4], q[1]: data["images"][3:4]}
    gt = load_ground_truth(write_gt(tmp_path, data))
    assert gt.has_protocols
    pos, junk = gt.protocol("easy")
    assert pos[0].tolist() == [1] and junk[0].tolist() == [0, 2, 3]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("junk"), "missing key 'junk'"),
        (lambda d: d.__setitem__("images", "x"), "key 'images'"),
        (lambda d: d["positives"].pop("images/0.jpg"), "key 'positives' has no entry"),
        (lambda d: d["positives"]["images/0.jpg"].append("nope.jpg"), "'nope.jpg'"),
        (lambda d: d.__setitem__("easy", {}), "'easy' and 'hard'"),
        (lambda d: d["groups"].__setitem__(1, ["images/0.jpg"]), "two groups"),
        (lambda d: d.__setitem__("junk", [[]]), "1 entries for 2 queries"),
    ],
)
def test_load_ground_truth_errors_name_file_and_key(tmp_path, mutate, message):
    data = small_gt_dict()
    mutate(data)
    folder = write_gt(tmp_path, data)
    with pytest.raises(FileFormatError, match=message) as info:
        load_ground_truth(folder)
    assert info.value.path.endswith("gt.json")


def test_load_ground_truth_missing_and_invalid(tmp_path):
    with pytest.raises(FileNotFoundError, match="gt.json"):
        load_ground_truth(tmp_path)
    (tmp_path / "gt.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="invalid JSON"):
        load_ground_truth(tmp_path)


@pytest.mark.skipif(not (UKBENCH / "gt.json").is_file(), reason="ukbench2000 not available")
def test_ukbench_ground_truth_perfect_ranking():
    gt = load_ground_truth(UKBENCH)
    assert len(gt.images) == 2000 and gt.n_queries == 2000
    # a perfect ranking: the query, then its group, then everything else
    n = len(gt.images)
    ranks = np.empty((n, 10), dtype=np.int64)
    for q in range(n):
        group = [q] + [g for g in gt.query_groups[q].tolist() if g != q]
        rest = [i for i in range(10) if i not in group][: 10 - len(group)]
        ranks[q] = group + rest
    res = evaluate(ranks, gt)
    assert res["map"] == pytest.approx(1.0)
    assert res["ns_score"] == pytest.approx(4.0)
    assert res["mp"]["1"] == pytest.approx(1.0)
