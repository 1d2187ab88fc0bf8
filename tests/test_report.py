"""Tests for asmkit.report: structure, colours, escaping, broken images, PR curve."""

from __future__ import annotations

import base64
import io
import json
import logging
import re

import numpy as np
import pytest
from PIL import Image

from asmkit._validation import ArgumentError
from asmkit.evaluate import evaluate, load_ground_truth
from asmkit.report import main, precision_recall_curve, write_report

EVIL = "evil<script>alert('x')</script>&\".jpg".replace("/", "_")


def make_images(root, n, size=(64, 48)):
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        arr[..., 0] = (np.arange(size[0]) * 4 + 30 * i) % 256
        arr[..., 1] = 40 * i % 256
        arr[..., 2] = (np.arange(size[1])[:, None] * 5) % 256
        name = f"img{i}.jpg"
        Image.fromarray(arr).save(root / name)
        names.append(name)
    return names


@pytest.fixture()
def dataset(tmp_path):
    """8 images in 2 groups of 4, a gt.json, and rankings for 2 queries."""
    root = tmp_path / "ds"
    names = make_images(root, 8)
    gt = {
        "name": "tiny",
        "images": names,
        "queries": [names[0], names[4]],
        "positives": {names[0]: names[1:4], names[4]: names[5:8]},
        "junk": {names[0]: [names[0]], names[4]: [names[4]]},
        "groups": [names[:4], names[4:]],
    }
    (root / "gt.json").write_text(json.dumps(gt))
    ranks = np.array([[0, 1, 5, 2, 3, 6], [4, 7, 0, 5, -1, -1]], dtype=np.int64)
    scores = np.array([[1.0, 0.9, 0.5, 0.4, 0.3, 0.2], [1.0, 0.8, 0.7, 0.6, -np.inf, -np.inf]], dtype=np.float32)
    return root, names, load_ground_truth(root), ranks, scores


def figures(page):
    return re.findall(r'<figure class="hit( \w+)?"><img class="result"', page)


def test_structure_and_colours(dataset, tmp_path):
    root, names, gt, ranks, scores = dataset
    out = write_report(
        tmp_path / "r" / "report.html",
        names=names,
        image_root=root,
        ranks=ranks,
        scores=scores,
        query_names=gt.queries,
        gt=gt,
        top_k=5,
        title="T & T",
    )
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    # top 5 of row 0, and the 4 real results of row 1 (padding skipped)
    assert page.count('<img class="result"') == 9
    assert page.count('<img class="query"') == 2
    assert page.count('<div class="row"') == 2
    assert 'data-results="9"' in page
    verdicts = [v.strip() for v in figures(page)]
    assert verdicts == ["junk", "pos", "neg", "pos", "pos", "junk", "pos", "neg", "pos"]
    assert "<title>T &amp; T</title>" in page
    assert "0.9000" in page  # scores are shown
    # no server needed: every image is a data URI
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) == 11 and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    thumb = Image.open(io.BytesIO(base64.b64decode(srcs[1].split(",", 1)[1])))
    assert thumb.size == (64, 48)  # smaller than thumb_size: not enlarged
    assert "<svg" in page and 'class="pr-curve"' in page


def test_summary_matches_evaluate(dataset, tmp_path):
    root, names, gt, ranks, scores = dataset
    page = write_report(
        tmp_path / "r.html", names=names, image_root=root, ranks=ranks, scores=scores, query_names=gt.queries, gt=gt
    ).read_text()
    res = evaluate(ranks, gt)
    assert f"<th>mAP</th><td>{res['map']:.4f}</td>" in page
    assert f"<th>mP@5</th><td>{res['mp']['5']:.4f}</td>" in page
    assert f"<td>{res['ns_score']:.4f}</td>" in page
    assert "on the top 6 results given" in page
    # metrics of a longer ranking, passed in, are shown instead of being recomputed
    full = {"map": 0.123456, "mp": {"1": 0.5, "5": 0.25, "10": 0.125}, "n_queries": 2}
    page = write_report(
        tmp_path / "r2.html",
        names=names,
        image_root=root,
        ranks=ranks[:, :2],
        scores=scores[:, :2],
        query_names=gt.queries,
        gt=gt,
        metrics=full,
    ).read_text()
    assert "<th>mAP</th><td>0.1235</td>" in page and "of the full ranking" in page
    assert "N-S" not in page
    with pytest.raises(ArgumentError, match="metrics"):
        write_report(
            tmp_path / "r3.html",
            names=names,
            image_root=root,
            ranks=ranks,
            scores=scores,
            query_names=gt.queries,
            metrics={"map": 1.0},
        )


def test_without_ground_truth_no_colours_no_plot(dataset, tmp_path):
    root, names, gt, ranks, scores = dataset
    page = write_report(
        tmp_path / "r.html", names=names, image_root=root, ranks=ranks, scores=scores, query_names=gt.queries, top_k=2
    ).read_text()
    assert page.count('<img class="result"') == 4
    assert set(figures(page)) == {""}
    assert "<svg" not in page and "mAP" not in page


def test_thumbnails_are_resized(tmp_path):
    names = make_images(tmp_path, 2, size=(400, 300))
    page = write_report(
        tmp_path / "r.html",
        names=names,
        image_root=tmp_path,
        ranks=np.array([[1]]),
        scores=np.array([[0.5]]),
        query_names=[names[0]],
        thumb_size=40,
    ).read_text()
    src = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)[0]
    assert Image.open(io.BytesIO(base64.b64decode(src))).size == (40, 30)


def test_names_are_escaped(tmp_path):
    names = make_images(tmp_path, 2)
    (tmp_path / names[1]).rename(tmp_path / EVIL)
    names[1] = EVIL
    page = write_report(
        tmp_path / "r.html",
        names=names,
        image_root=tmp_path,
        ranks=np.array([[1, 0]]),
        scores=np.array([[0.5, 0.1]]),
        query_names=[EVIL],
        title="<b>x</b>",
    ).read_text()
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;" in page
    assert page.count("<script>") == 1  # only the report's own loader script
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    # the file with the odd name was found and embedded, not replaced by a placeholder
    assert "data-missing" not in page


def test_broken_and_missing_images_get_placeholders(tmp_path, caplog):
    names = make_images(tmp_path, 3)
    (tmp_path / names[1]).write_bytes(b"this is not a jpeg")
    names.append("does/not/exist.jpg")
    with caplog.at_level(logging.WARNING, logger="asmkit.report"):
        page = write_report(
            tmp_path / "r.html",
            names=names,
            image_root=tmp_path,
            ranks=np.array([[1, 3, 2]]),
            scores=np.ones((1, 3)),
            query_names=[names[0]],
        ).read_text()
    assert page.count('<img class="result"') == 3
    assert page.count('data-missing="1"') == 2
    assert "does/not/exist.jpg" in caplog.text and "img1.jpg" in caplog.text
    # the placeholder is itself a valid JPEG
    missing = re.search(r'<img class="result" src="data:image/jpeg;base64,([^"]+)"[^>]*data-missing', page)
    assert Image.open(io.BytesIO(base64.b64decode(missing.group(1)))).size == (160, 160)


def test_precision_recall_curve_known_numbers():
    # positives {1, 2}; ranking [1, 9, 2]: precision 1 at recall 0.5, 2/3 at recall 1
    recall, precision = precision_recall_curve([np.array([1, 9, 2])], [np.array([1, 2])], [np.array([])])
    assert recall[0] == 0 and recall[-1] == 1 and len(recall) == 21
    assert np.allclose(precision[recall <= 0.5], 1.0)
    assert np.allclose(precision[recall > 0.5], 2 / 3)
    # junk removed first; a positive never retrieved leaves precision 0 beyond its recall
    recall, precision = precision_recall_curve([np.array([7, 1])], [np.array([1, 5])], [np.array([7])])
    assert np.allclose(precision[recall <= 0.5], 1.0) and np.allclose(precision[recall > 0.5], 0.0)
    # mean over queries; queries without positives skipped
    _, p = precision_recall_curve(
        [np.array([1, 9, 2]), np.array([7, 1]), np.array([3])],
        [np.array([1, 2]), np.array([1, 5]), np.array([], dtype=np.int64)],
        [np.array([]), np.array([7]), np.array([])],
    )
    assert p[-1] == pytest.approx((2 / 3 + 0) / 2)
    _, p = precision_recall_curve([np.array([3])], [np.array([], dtype=np.int64)], [np.array([])])
    assert np.isnan(p).all()


def test_validation_errors(dataset, tmp_path):
    root, names, gt, ranks, scores = dataset
    kw = dict(names=names, image_root=root, ranks=ranks, scores=scores, query_names=gt.queries)
    for change, message in [
        ({"scores": scores[:, :3]}, "scores: shape"),
        ({"ranks": ranks.astype(float)}, "ranks: expected a 2-D integer"),
        ({"ranks": ranks + 10}, r"ranks: ids must lie in \[-1, 8\)"),
        ({"query_names": gt.queries[:1]}, "query_names: 1 names for 2 rows"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"thumb_size": 4}, "thumb_size"),
        ({"gt": {"images": []}}, "gt: expected a GroundTruth"),
    ]:
        with pytest.raises(ArgumentError, match=message):
            write_report(tmp_path / "x.html", **{**kw, **change})
    assert not (tmp_path / "x.html").exists()


def test_main_with_results_file_and_gt_folder(dataset, tmp_path):
    root, names, gt, ranks, scores = dataset
    np.savez(tmp_path / "results.npz", ids=ranks, scores=scores)
    out = main(output=tmp_path / "m.html", ranks=tmp_path / "results.npz", gt=root, top_k=3)
    page = out.read_text()
    assert page.count('<img class="result"') == 6
    assert "mAP" in page
    with pytest.raises(ArgumentError, match="image_root"):
        main(output=tmp_path / "n.html", ranks=ranks, scores=scores, names=names, query_names=gt.queries)
    with pytest.raises(ArgumentError, match="scores"):
        main(output=tmp_path / "n.html", ranks=ranks, gt=root)
