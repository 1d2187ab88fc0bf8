"""Regional ASMK (asmkit.regions): aggregation against ASMK and a plain NumPy twin, region
membership and its counts, the region sources, and box files."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import reference_numpy as ref

from asmkit import Codebook
from asmkit._validation import ArgumentError, FileFormatError
from asmkit.kernel import aggregate, prepare_descriptors
from asmkit.regions import (
    Regions,
    aggregate_regions,
    grid_boxes,
    in_box,
    propose_boxes,
    read_box_file,
    region_boxes,
    regions_for_features,
    regions_from_boxes,
)

SIDE = 100.0


def _images(centroids, n_images=6, per_image=40, seed=0):
    """Descriptors near a small codebook, and keypoints spread over a SIDE x SIDE image."""
    rng = np.random.default_rng(seed)
    images = ref.make_images(n_images, per_image, centroids.shape[1], seed=seed, centroids=centroids)
    points = [(rng.random((len(v), 2)) * SIDE).astype(np.float32) for v in images]
    return images, points


def _aggregate_both(centroids, images, regions, binary, m=1):
    desc = prepare_descriptors(images, dim=centroids.shape[1])
    words = Codebook(centroids).quantize(desc.vecs, m)
    plain = aggregate(desc.vecs, words, desc.starts, desc.order, centroids, binary=binary)
    regional = aggregate_regions(desc.vecs, words, desc.starts, desc.order, centroids, regions, binary=binary)
    return desc, words, plain, regional


def _twin(vecs, assign, centroids, region_members, binary):
    """Steps 1-4 of docs/regions.md with plain loops: per region the float32 residual sums
    in descriptor order (reference_numpy), the region's float64 norm over all its words,
    the scaled sums added per word in region order, then ASMK's per-word step."""
    total: dict[int, np.ndarray] = {}
    for members in region_members:
        if len(members) == 0:
            continue
        sums = ref.residual_sums(vecs[members], assign[members], centroids)
        norm = math.sqrt(sum(float(a) * float(a) for v in sums.values() for a in v))
        scale = np.float32(1.0 / norm) if norm > 0 else np.float32(0.0)
        for word, v in sums.items():
            prev = total.get(word, np.zeros(vecs.shape[1], dtype=np.float32))
            total[word] = (prev + v * scale).astype(np.float32)
    words = sorted(total)
    if binary:
        return words, [ref.pack(total[w] > 0) for w in words]
    return words, [ref.normalize(total[w]) for w in words]


@pytest.mark.parametrize("m", [1, 3])
def test_whole_image_region_is_asmk_star_bit_for_bit(centroids40, m):
    images, points = _images(centroids40)
    regions = regions_from_boxes(points, [np.empty((0, 4))] * len(images))
    _, _, plain, regional = _aggregate_both(centroids40, images, regions, binary=True, m=m)
    np.testing.assert_array_equal(regional.offsets, plain.offsets)
    np.testing.assert_array_equal(regional.words, plain.words)
    np.testing.assert_array_equal(regional.data, plain.data)


def test_whole_image_region_is_asmk_up_to_epsilon(centroids40):
    images, points = _images(centroids40)
    regions = regions_from_boxes(points, [[] for _ in images])
    desc, words, plain, regional = _aggregate_both(centroids40, images, regions, binary=False)
    np.testing.assert_array_equal(regional.words, plain.words)
    # ASMK adds its epsilon to ‖V(c)‖, R-ASMK to the norm of the region-normalised V(c) / ‖V‖:
    # the two differ by about epsilon / ‖V(c) / ‖V‖‖, plus float32 rounding.
    image_norm = np.empty(len(plain.words))
    for i in range(desc.n_images):
        rows = slice(plain.offsets[i], plain.offsets[i + 1])
        raw = np.stack(
            list(ref.residual_sums(images[i], words[desc.starts[i] : desc.starts[i + 1]], centroids40).values())
        )
        image_norm[rows] = np.linalg.norm(raw.astype(np.float64), axis=1) / np.linalg.norm(raw.astype(np.float64))
    bound = 1e-6 / image_norm + 1e-6
    assert np.all(np.abs(regional.data - plain.data).max(axis=1) <= bound)
    assert np.abs(regional.data - plain.data).max() <= 1e-4


@pytest.mark.parametrize("binary", [True, False])
def test_overlapping_boxes_agree_with_numpy_twin(centroids40, binary):
    images, points = _images(centroids40, n_images=5, per_image=50, seed=3)
    rng = np.random.default_rng(7)
    boxes = []
    for _ in images:
        x0, y0 = rng.random(2) * 50
        # Three boxes sharing a corner area, plus one nested in the first.
        boxes.append(
            [
                [x0, y0, x0 + 45, y0 + 45],
                [x0 + 20, y0 + 20, x0 + 60, y0 + 50],
                [x0 + 10, y0, x0 + 50, y0 + 30],
                [x0 + 5, y0 + 5, x0 + 25, y0 + 25],
            ]
        )
    regions = regions_from_boxes(points, boxes, [(SIDE, SIDE)] * len(images))
    assert regions.n_regions > 3 * len(images)
    desc, words, _, regional = _aggregate_both(centroids40, images, regions, binary=binary, m=2)
    for i, vecs in enumerate(images):
        assign = words[desc.starts[i] : desc.starts[i + 1]]
        members = [np.arange(len(vecs))] + [np.flatnonzero(in_box(points[i], box)) for box in boxes[i]]
        twin_words, twin_data = _twin(vecs, assign, centroids40, members, binary)
        rows = slice(regional.offsets[i], regional.offsets[i + 1])
        np.testing.assert_array_equal(regional.words[rows], twin_words)
        if binary:
            np.testing.assert_array_equal(regional.data[rows], np.stack(twin_data))
        else:
            np.testing.assert_allclose(regional.data[rows], np.stack(twin_data), atol=1e-6)


def test_feature_in_two_regions_counts_in_both():
    # Two words on the x axis: the first two features are near the first word, the last one
    # near the second word. The middle feature lies in both boxes, the others in one each.
    centroids = np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32)
    vecs = np.array([[1.0, 0.0], [0.0, 1.0], [10.0, 2.0]], dtype=np.float32)
    points = np.array([[10, 10], [50, 50], [90, 90]], dtype=np.float32)
    boxes = [[0, 0, 60, 60], [40, 40, 100, 100]]
    regions = regions_from_boxes([points], [boxes], whole_image=False)
    np.testing.assert_array_equal(regions.members, [0, 1, 1, 2])
    desc = prepare_descriptors([vecs])
    words = Codebook(centroids).quantize(desc.vecs, 1)
    agg = aggregate_regions(desc.vecs, words, desc.starts, desc.order, centroids, regions, binary=False)
    # The first region sums both residuals of the first word; the second region holds the
    # middle feature's residual at the first word and the last feature's at the second: the
    # middle feature's residual enters the first word once per region.
    w0 = np.array([1.0, 1.0]) / math.sqrt(2) + np.array([0.0, 1.0]) / math.sqrt(5)
    np.testing.assert_array_equal(agg.words, [0, 1])
    np.testing.assert_allclose(agg.data[0], w0 / np.linalg.norm(w0), atol=1e-5)
    np.testing.assert_allclose(agg.data[1], [0.0, 1.0], atol=1e-5)


def test_empty_and_outside_boxes_are_counted():
    points = [np.array([[10, 10], [20, 20]], dtype=np.float32), np.empty((0, 2), dtype=np.float32)]
    boxes = [
        [
            [-10, -10, 15, 15],  # clipped, holds the first feature
            [50, 50, 60, 60],  # inside, no feature: empty
            [200, 200, 300, 300],  # outside the image: dropped
            [90, 90, 150, 150],
        ],  # clipped, no feature: empty
        [[0, 0, 10, 10]],  # an image without features: its box and whole image are empty
    ]
    regions = regions_from_boxes(points, boxes, [(100, 100), (100, 100)])
    assert (regions.n_boxes, regions.n_clipped, regions.n_outside, regions.n_empty) == (5, 2, 1, 4)
    np.testing.assert_array_equal(regions.regions_per_image(), [2, 0])
    np.testing.assert_array_equal(regions.members, [0, 1, 0])
    centroids = np.zeros((1, 2), dtype=np.float32)
    desc = prepare_descriptors([np.ones((2, 2), np.float32), np.empty((0, 2), np.float32)])
    agg = aggregate_regions(
        desc.vecs, np.zeros((2, 1), np.int64), desc.starts, desc.order, centroids, regions, binary=True
    )
    np.testing.assert_array_equal(agg.offsets, [0, 1, 1])


def test_image_without_whole_region_keeps_only_its_boxes_words():
    centroids = np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32)
    vecs = np.array([[1.0, 0.0], [10.0, 1.0]], dtype=np.float32)
    points = np.array([[10, 10], [90, 90]], dtype=np.float32)
    regions = regions_from_boxes([points], [[[0, 0, 50, 50]]], whole_image=False)
    desc = prepare_descriptors([vecs])
    words = Codebook(centroids).quantize(desc.vecs, 1)
    agg = aggregate_regions(desc.vecs, words, desc.starts, desc.order, centroids, regions, binary=True)
    np.testing.assert_array_equal(agg.words, [0])


def test_without_whole_image_an_image_without_boxes_keeps_the_whole_image():
    points = [np.array([[10, 10], [20, 20]], dtype=np.float32)] * 3
    boxes = [[[0, 0, 15, 15]], [], [[200, 200, 300, 300]]]
    regions = regions_from_boxes(points, boxes, [(100, 100)] * 3, whole_image=False)
    np.testing.assert_array_equal(regions.regions_per_image(), [1, 1, 1])
    np.testing.assert_array_equal(regions.members, [0, 0, 1, 0, 1])
    assert regions.n_outside == 1


def test_regions_must_match_the_images(centroids40):
    images, points = _images(centroids40, n_images=2)
    desc = prepare_descriptors(images)
    words = Codebook(centroids40).quantize(desc.vecs, 1)
    one = regions_from_boxes(points[:1], [[]])
    with pytest.raises(ArgumentError, match="regions: describes 1 images"):
        aggregate_regions(desc.vecs, words, desc.starts, desc.order, centroids40, one, binary=True)
    too_far = Regions(np.array([0, 1, 1]), np.array([0, 1]), np.array([len(images[0])], dtype=np.int32))
    with pytest.raises(ArgumentError, match="image 0 has"):
        aggregate_regions(desc.vecs, words, desc.starts, desc.order, centroids40, too_far, binary=True)
    with pytest.raises(ArgumentError, match=r"boxes\[0\]: box 0"):
        regions_from_boxes(points[:1], [[[5, 5, 1, 9]]])


def test_grid_boxes_cover_the_image_with_overlap():
    boxes = grid_boxes(640, 480, levels=3)
    assert boxes.shape == (20, 4)
    assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= 640 and boxes[:, 3].max() <= 480
    sides = np.unique(np.round(boxes[:, 2] - boxes[:, 0], 6))
    np.testing.assert_allclose(sides, [240, 320, 480])
    level3 = boxes[np.isclose(boxes[:, 2] - boxes[:, 0], 240)]
    xs = np.unique(level3[:, 0])
    assert np.all(np.diff(xs) <= 240 * 0.6 + 1e-9)


def test_proposals_find_the_dense_patch():
    rng = np.random.default_rng(0)
    background = rng.random((300, 2)) * [640, 480]
    patch = rng.random((300, 2)) * [160, 120] + [400, 300]
    boxes = propose_boxes(np.concatenate([background, patch]), 640, 480, n=4)
    assert 1 <= len(boxes) <= 4
    x0, y0, x1, y1 = boxes[0]
    ix = max(0.0, min(x1, 560) - max(x0, 400))
    iy = max(0.0, min(y1, 420) - max(y0, 300))
    assert ix * iy / ((x1 - x0) * (y1 - y0) + 160 * 120 - ix * iy) > 0.5
    assert len(propose_boxes(np.empty((0, 2)), 640, 480)) == 0


def test_box_files_json_and_csv(tmp_path):
    js = tmp_path / "boxes.json"
    js.write_text('{\n "./a/x.jpg": [[1, 2, 30, 40]],\n "b.jpg": [[0, 0, 5, 5], [1, 1, 2, 2]]\n}\n')
    table = read_box_file(js)
    np.testing.assert_array_equal(table["a/x.jpg"], [[1, 2, 30, 40]])
    assert table["b.jpg"].shape == (2, 4)
    cs = tmp_path / "boxes.csv"
    cs.write_text("image,x0,y0,x1,y1\n# a comment\na/x.jpg,1,2,30,40\nb.jpg,0,0,5,5\nb.jpg,1,1,2,2\n")
    table_csv = read_box_file(cs)
    assert set(table_csv) == set(table)
    for name in table:
        np.testing.assert_array_equal(table_csv[name], table[name])
    got = region_boxes(js, ["a/x.jpg", "c.jpg"], [np.zeros((0, 2))] * 2)
    assert [b.shape[0] for b in got] == [1, 0]


@pytest.mark.parametrize(
    "name, text, line",
    [
        ("bad.json", '{\n "a.jpg": [[1, 2, 3, 4]],\n "b.jpg": [[1, 2, 3]]\n}\n', 3),
        ("bad.json", '{\n "a.jpg": [[1, 2, 3, 4]],\n "b.jpg": [[5, 2, 3, 4]]\n}\n', 3),
        ("bad.json", '{\n "a.jpg": [[1, 2, 3, 4]]\n "b.jpg": []\n}\n', 3),
        ("bad.json", '{\n "a.jpg": [["x", 2, 3, 4]]\n}\n', 2),
        ("bad.json", '{\n "a.jpg": [[1, 2, NaN, 4]]\n}\n', 2),
        ("bad.csv", "a.jpg,1,2,3,4\nb.jpg,1,2,3\n", 2),
        ("bad.csv", "a.jpg,1,2,3,4\n\nb.jpg,1,2,x,4\n", 3),
        ("bad.csv", "image,x0,y0,x1,y1\nb.jpg,1,2,0,4\n", 2),
    ],
)
def test_malformed_box_file_names_file_and_line(tmp_path, name, text, line):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(FileFormatError) as info:
        read_box_file(path)
    assert str(info.value).startswith(f"{path}: line {line}:")


def test_in_box_and_region_sources_by_name():
    points = np.array([[0, 0], [5, 5], [10, 10], [11, 3]], dtype=np.float32)
    np.testing.assert_array_equal(in_box(points, [0, 0, 10, 10]), [True, True, True, False])
    grid = region_boxes("grid", ["a", "b"], [points, points], [(640, 480), None])
    assert grid[0].shape == (20, 4)
    assert grid[1][:, 2:].max() <= 12.0
    proposals = region_boxes("proposals", ["a"], [points], [(640, 480)])
    assert proposals[0].shape[1] == 4


def test_regions_for_features_uses_keypoints_and_refuses_features_without():
    from asmkit.features import ImageFeatures

    rng = np.random.default_rng(1)
    with_kp = ImageFeatures(
        descriptors=rng.random((30, 8), dtype=np.float32),
        keypoints=np.column_stack([rng.random((30, 2)) * 100, np.ones((30, 2))]).astype(np.float32),
        attention=rng.random(30, dtype=np.float32),
    )
    regions = regions_for_features("grid", ["a.jpg"], [with_kp], [(100, 100)])
    assert regions.n_boxes == len(grid_boxes(100, 100)) and regions.n_images == 1
    assert regions.member_starts[1] == 30
    without = ImageFeatures(descriptors=rng.random((3, 8), dtype=np.float32))
    with pytest.raises(ArgumentError, match="'b.jpg' has no keypoints"):
        regions_for_features("grid", ["b.jpg"], [without])


def test_index_with_whole_image_regions_searches_as_asmk_star(centroids40):
    from asmkit import Index

    images, points = _images(centroids40, n_images=8, per_image=60, seed=5)
    plain = Index(Codebook(centroids40), "asmk_star")
    plain.add(images)
    regional = Index(Codebook(centroids40), "asmk_star")
    regional.add(images, regions=regions_from_boxes(points, [[] for _ in images]))
    queries = images[:3]
    for a, b in zip(plain.search(queries, k=None), regional.search(queries, k=None)):
        np.testing.assert_array_equal(a, b)
    boxed = Index(Codebook(centroids40), "asmk_star")
    boxed.add(images, regions=regions_from_boxes(points, [[[0, 0, 40, 40]] for _ in images], whole_image=False))
    assert boxed.inverted_file.n_entries < plain.inverted_file.n_entries


def test_similarity_matrix_with_regions(centroids40):
    from asmkit import Index, similarity_matrix

    images, points = _images(centroids40, n_images=6, per_image=50, seed=9)
    codebook = Codebook(centroids40)
    whole = regions_from_boxes(points, [[] for _ in images])
    np.testing.assert_array_equal(
        similarity_matrix(codebook, images, params="asmk_star", regions=whole),
        similarity_matrix(codebook, images, params="asmk_star"),
    )
    boxed = regions_from_boxes(points, [[[10, 10, 60, 60]] for _ in images])
    index = Index(codebook, "asmk_star")
    index.add(images, regions=boxed)
    np.testing.assert_array_equal(
        similarity_matrix(codebook, images, params="asmk_star", regions=boxed), index.similarity_matrix(images)
    )


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory):
    pytest.importorskip("skimage")
    from asmkit.demo import build_demo_set

    root = tmp_path_factory.mktemp("regions_demo")
    return build_demo_set(root / "data", seed=1, photos=["astronaut", "coffee", "chelsea", "rocket"], max_size=320)


def test_cli_regions_and_query_box(demo_set, tmp_path, capsys):
    from asmkit.cli import main

    images = sorted(p.name for p in (demo_set / "images").iterdir())
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({images[0]: [[10, 10, 120, 120]], "./" + images[1]: [[0, 0, 80, 60]]}))
    out = tmp_path / "index"
    for flags in (["--regions", "grid"], ["--regions", str(boxes)], ["--regions", str(boxes), "--no-whole-image"]):
        assert main(["-q", "index", str(demo_set / "images"), "--out", str(out), "--codebook-size", "64", *flags]) == 0
        shutil.rmtree(out)
    assert (
        main(
            [
                "-q",
                "index",
                str(demo_set / "images"),
                "--out",
                str(out),
                "--codebook-size",
                "64",
                "--regions",
                "proposals",
            ]
        )
        == 0
    )
    capsys.readouterr()
    query = demo_set / "images" / images[0]
    assert main(["-q", "query", str(out), str(query), "--top", "3", "--query-box", "0,0,200,200", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["results"]
    assert row["results"][0]["name"] == images[0]
    assert (
        main(
            [
                "-q",
                "scores",
                str(demo_set / "images"),
                "--out",
                str(tmp_path / "s.npy"),
                "--codebook-size",
                "64",
                "--regions",
                "grid",
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "s.npy").shape == (len(images), len(images))


def test_cli_malformed_box_file_is_one_line_naming_file_and_line(demo_set, tmp_path, capsys):
    from asmkit.cli import main

    boxes = tmp_path / "boxes.csv"
    boxes.write_text("a.jpg,1,2,30,40\nb.jpg,1,2,3\n")
    code = main(
        [
            "-q",
            "index",
            str(demo_set / "images"),
            "--out",
            str(tmp_path / "index"),
            "--codebook-size",
            "64",
            "--regions",
            str(boxes),
        ]
    )
    assert code == 2
    assert f"{boxes}: line 2:" in capsys.readouterr().err


def test_cli_bad_query_box(demo_set, tmp_path, capsys):
    from asmkit.cli import main

    out = tmp_path / "index"
    assert main(["-q", "index", str(demo_set / "images"), "--out", str(out), "--codebook-size", "64"]) == 0
    query = next((demo_set / "images").iterdir())
    assert main(["-q", "query", str(out), str(query), "--query-box", "1,2,3"]) == 2
    assert "--query-box: expected x0,y0,x1,y1" in capsys.readouterr().err
    assert main(["-q", "query", str(out), str(query), "--query-box", "5,5,1,9"]) == 2
    assert "box: box 0" in capsys.readouterr().err
