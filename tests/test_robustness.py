"""Robustness levers: rotation-pooled deep features, per-family evaluation, the benchmark set."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asmkit._validation import ArgumentError
from asmkit.evaluate import average_precision, evaluate, load_ground_truth
from asmkit.features.factory import feature_options

ROOT = Path(__file__).resolve().parents[1]


def _photo(h: int = 96, w: int = 128) -> np.ndarray:
    """uint8 [h, w, 3]: smooth structure plus texture, so attention has clear maxima."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 60 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 11.0)[..., None]
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def test_rotations_make_deep_features_invariant_to_quarter_turns():
    pytest.importorskip("torch")
    from asmkit.features.factory import deep_extractor

    ext = deep_extractor(rotations=[0, 90, 180, 270], nfeat=40)
    img = _photo()
    a = ext.extract(img)
    b = ext.extract(np.ascontiguousarray(np.rot90(img)))
    # The same four images go through the backbone, so the same features come out.
    np.testing.assert_allclose(np.sort(a.attention), np.sort(b.attention), atol=1e-5)
    order_a, order_b = np.lexsort(a.descriptors.T), np.lexsort(b.descriptors.T)
    np.testing.assert_allclose(a.descriptors[order_a], b.descriptors[order_b], atol=1e-4)
    # Keypoints are in each input's own pixels: b's are a's turned by 90 degrees
    # counter-clockwise (x' = y, y' = W - x).
    h, w = img.shape[:2]
    assert (a.keypoints[:, 0].max() <= w) and (a.keypoints[:, 1].max() <= h)
    expected = np.stack([a.keypoints[order_a, 1], w - a.keypoints[order_a, 0]], axis=1)
    np.testing.assert_allclose(b.keypoints[order_b, :2], expected, atol=1e-3)


def test_any_angle_turns_onto_a_grey_canvas_and_maps_points_back():
    torch = pytest.importorskip("torch")
    from asmkit.features.deep import _rotate

    h, w = 24, 40
    x = torch.zeros(1, 3, h, w)
    x[..., 5:8, 30:33] = 1.0
    # Through the resampling path a quarter turn is torch.rot90's (counter-clockwise).
    turned, frame, back = _rotate(x, 90, h, w)
    assert frame == (w, h)
    np.testing.assert_allclose(turned.numpy(), torch.rot90(x, 1, dims=(-2, -1)).numpy(), atol=1e-5)
    turned, frame, back = _rotate(x, 30, h, w)
    # The canvas holds the whole image, grey outside it.
    assert frame[0] >= h * np.cos(np.pi / 6) + w * 0.5 - 1 and frame[1] >= w * np.cos(np.pi / 6) + h * 0.5 - 1
    assert turned[0, :, 0, 0].tolist() == pytest.approx([0.5] * 3)
    # The bright patch's centre in the canvas maps back to its centre in the image.
    ys, xs = np.nonzero(turned[0, 0].numpy() > 0.75)
    px, py, inside = back(torch.tensor([xs.mean() + 0.5]), torch.tensor([ys.mean() + 0.5]))
    assert bool(inside[0]) and abs(px.item() - 31.5) < 1.0 and abs(py.item() - 6.5) < 1.0
    # Counter-clockwise: a point right of the centre moves up.
    assert ys.mean() + 0.5 < frame[0] / 2
    assert not bool(back(torch.tensor([0.5]), torch.tensor([0.5]))[2][0])


def test_features_at_any_angle_keep_their_keypoints_in_the_image():
    pytest.importorskip("torch")
    from asmkit.features.factory import deep_extractor

    img = _photo()
    h, w = img.shape[:2]
    # Without the upscaled view of small images, so that each rotation is one view.
    ext = deep_extractor(rotations=[0, 45, 135], nfeat=200, upscale_below=0)
    feats = ext.extract(img)
    kp = feats.keypoints
    # The upright pass has 48 tokens; the turned ones add those of their canvas in the image.
    assert 48 < len(kp) <= 200
    assert (kp[:, 0] >= 0).all() and (kp[:, 0] < w).all() and (kp[:, 1] >= 0).all() and (kp[:, 1] < h).all()
    # The upright pass's tokens are among them, at their own centres.
    upright = deep_extractor(rotations=[0], nfeat=200, upscale_below=0).extract(img)
    assert {tuple(p) for p in np.round(upright.keypoints[:, :2], 2)} <= {tuple(p) for p in np.round(kp[:, :2], 2)}


def test_plain_deep_features_are_not_rotation_invariant():
    pytest.importorskip("torch")
    from asmkit.features.factory import deep_extractor

    ext = deep_extractor(nfeat=40)
    img = _photo()
    a, b = ext.extract(img), ext.extract(np.ascontiguousarray(np.rot90(img)))
    assert np.abs(np.sort(a.attention) - np.sort(b.attention)).max() > 1e-3


@pytest.mark.parametrize("bad", [[360], [-45], [0, 0], [], "90", [True], [22.5]])
def test_bad_rotations_are_argument_errors(bad):
    with pytest.raises(ArgumentError, match="rotations"):
        feature_options({"type": "deep", "rotations": bad})


def _gt(tmp_path: Path) -> Path:
    images = ["q.jpg", "a_rot.jpg", "b_rot.jpg", "a_blur.jpg", "d1.jpg", "d2.jpg"]
    gt = {
        "images": images,
        "queries": ["q.jpg"],
        "positives": {"q.jpg": ["a_rot.jpg", "b_rot.jpg", "a_blur.jpg"]},
        "junk": {"q.jpg": ["q.jpg"]},
        "families": {"a_rot.jpg": "rot", "b_rot.jpg": "rot", "a_blur.jpg": "blur"},
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    return tmp_path


def test_per_family_map_counts_other_families_as_junk(tmp_path):
    gt = load_ground_truth(_gt(tmp_path))
    # Ranking: q, a_blur, d1, a_rot, d2, b_rot.
    res = evaluate(np.array([[0, 3, 4, 1, 5, 2]]), gt)
    # blur alone: a_blur is first once q (junk) and the rot positives (junk) are removed.
    assert res["families"]["blur"]["map"] == pytest.approx(1.0)
    # rot: q and a_blur are junk, as if the ranking were d1, a_rot, d2, b_rot.
    row = [0, 3, 4, 1, 5, 2]
    assert res["families"]["rot"]["map"] == pytest.approx(average_precision(row, [1, 2], [0, 3]))
    assert res["families"]["rot"]["map"] == pytest.approx(average_precision([4, 1, 5, 2], [1, 2]))
    assert res["families"]["rot"]["map"] > average_precision(row, [1, 2], [0])
    assert res["families"]["rot"]["n_queries"] == 1
    assert "families" not in evaluate(np.array([[0, 3, 4, 1, 5, 2]]), load_ground_truth(_without_families(tmp_path)))


def _without_families(folder: Path) -> Path:
    data = json.loads((folder / "gt.json").read_text())
    del data["families"]
    out = folder / "plain"
    out.mkdir()
    (out / "gt.json").write_text(json.dumps(data))
    return out


def test_families_naming_an_unknown_image_is_rejected(tmp_path):
    data = json.loads((_gt(tmp_path) / "gt.json").read_text())
    data["families"]["nope.jpg"] = "rot"
    (tmp_path / "gt.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="nope.jpg"):
        load_ground_truth(tmp_path)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_robustness", ROOT / "benchmarks" / "bench_robustness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_writes_a_loadable_set_with_one_variant_per_family(tmp_path):
    bench = _bench()
    uk = tmp_path / "uk"
    (uk / "images").mkdir(parents=True)
    groups = []
    for g in range(5):
        name = f"images/u{g}.jpg"
        Image.fromarray(_photo(60, 80)).save(uk / name)
        groups.append([name])
    (uk / "gt.json").write_text(json.dumps({"groups": groups}))
    out = bench.build(tmp_path / "set", originals=2, distractors=3, seed=1, demo=False, ukbench=uk)
    gt = load_ground_truth(out)
    assert len(gt.queries) == 2 and len(gt.images) == 2 * (1 + len(bench.FAMILIES)) + 3
    assert set(gt.families) == set(bench.FAMILIES)
    assert all(len(gt.families[f][q]) == 1 for f in gt.families for q in range(2))
    sizes = {f: Image.open(out / gt.images[int(gt.families[f][0][0])]).size for f in ("rot90", "scale_2")}
    assert sizes == {"rot90": (60, 80), "scale_2": (160, 120)}


# -- the query at several rotations (query_rotations, the deep_qrot preset) -------------------


def test_a_turned_extractor_is_the_upright_one_on_the_turned_image():
    pytest.importorskip("torch")
    from asmkit.features.factory import deep_extractor

    ext = deep_extractor(nfeat=40)
    img = _photo()
    turned = ext.turned(90).extract(img)
    upright = ext.extract(np.ascontiguousarray(np.rot90(img)))
    np.testing.assert_allclose(turned.attention, upright.attention, atol=1e-5)
    np.testing.assert_allclose(turned.descriptors, upright.descriptors, atol=1e-4)
    # The turned extractor maps its keypoints back to the image it was given: turned by 90
    # degrees counter-clockwise they are the upright extraction's (x' = y, y' = W - x).
    w = img.shape[1]
    back = np.stack([turned.keypoints[:, 1], w - turned.keypoints[:, 0]], axis=1)
    np.testing.assert_allclose(back, upright.keypoints[:, :2], atol=1e-3)


@pytest.mark.parametrize("bad", [[90, 180], [0, 0], [400], "0"])
def test_bad_query_rotations_are_argument_errors(bad):
    with pytest.raises(ArgumentError, match="query_rotations"):
        feature_options({"type": "deep", "query_rotations": bad})


def test_query_rotations_turn_the_query_side_only():
    with pytest.raises(ArgumentError, match="not with rotations"):
        feature_options({"type": "deep", "query_rotations": [0, 90], "rotations": [0, 90]})


def test_query_rotations_leave_the_database_side_alone():
    from asmkit.features.factory import extraction_settings, query_turns

    turning = {"type": "deep", "query_rotations": [0, 90, 180, 270]}
    assert query_turns(turning) == (90, 180, 270) and query_turns({"type": "deep"}) == ()
    # Stored features (and so the cache) are those of the preset without the setting.
    assert extraction_settings(turning) == extraction_settings({"type": "deep"})


def test_upscale_below_zero_turns_the_deep_presets_upscaling_off():
    from asmkit.features.factory import extraction_settings
    from asmkit.params import preset_table

    assert feature_options({"type": "deep"})["upscale_below"] == preset_table("deep")["features"]["upscale_below"]
    off = feature_options({"type": "deep", "upscale_below": 0})
    assert "upscale_below" not in off
    # Off leaves no trace in what the feature caches are keyed on, so a table that turns it
    # off shares the cache of features extracted before the option existed.
    turned_off = {**preset_table("deep_rot")["features"], "upscale_below": 0}
    assert "upscale_below" not in extraction_settings(turned_off)
    deep_upscale = preset_table("deep")["features"]["upscale_below"]
    assert extraction_settings(preset_table("deep_rot")["features"])["upscale_below"] == deep_upscale
    for bad in (-1, 1.5, "416"):
        with pytest.raises(ArgumentError, match="upscale_below"):
            feature_options({"type": "deep", "upscale_below": bad})


def test_merging_searches_of_one_database_keeps_each_image_at_its_best():
    from asmkit.search import merge_topk

    rng = np.random.default_rng(3)
    results = []
    for _ in range(3):
        ids = np.stack([rng.choice(12, 5, replace=False) for _ in range(4)]).astype(np.int64)
        results.append((rng.random((4, 5)).astype(np.float32), ids))
    results[1][1][2, 3:] = -1  # padding, never kept
    scores, ids = merge_topk(results, 6, best_of=True)
    for q in range(4):
        best: dict[int, float] = {}
        for s, i in results:
            for score, image in zip(s[q], i[q]):
                if image >= 0:
                    best[int(image)] = max(best.get(int(image), -np.inf), float(score))
        expected = sorted(best.items(), key=lambda item: (-item[1], item[0]))[:6]
        assert ids[q, : len(expected)].tolist() == [image for image, _ in expected]
        np.testing.assert_allclose(scores[q, : len(expected)], [score for _, score in expected])
        assert (ids[q, len(expected) :] == -1).all()


@pytest.fixture(scope="module")
def turned_set(tmp_path_factory):
    """A small retrieval set (the demo photos and their variants) for the deep presets."""
    pytest.importorskip("torch")
    from asmkit.demo import build_demo_set

    root = tmp_path_factory.mktemp("qrot")
    return build_demo_set(root / "data", seed=2, photos=["astronaut", "coffee", "rocket"], max_size=160)


def test_eval_scores_each_query_by_its_best_rotation(turned_set):
    from asmkit import pipeline
    from asmkit.config import load_config
    from asmkit.index import Index

    gt = load_ground_truth(turned_set)
    options = dict(
        data=turned_set, codebook=None, model=None, cache=None, workers=None, device="cpu",
        regions=None, whole_image=True, ray=None, ray_cpus=None,
    )  # fmt: skip
    turning = pipeline._dataset_matrix(gt, load_config("deep_qrot"), **options)
    upright = pipeline._dataset_matrix(gt, load_config("deep"), **options)
    try:
        # The database side is deep's: the same features and codebook.
        np.testing.assert_array_equal(upright.codebook.centroids, turning.codebook.centroids)
        index = Index(upright.codebook, load_config("deep").params)
        index.add(upright.db)
        expected = upright.matrix
        for rotation in (90, 180, 270):
            expected = np.maximum(expected, index.similarity_matrix(upright.turned(gt.queries, rotation)))
        np.testing.assert_allclose(turning.matrix, expected, atol=1e-6)
        assert (turning.matrix >= upright.matrix - 1e-6).all() and (turning.matrix > upright.matrix + 1e-6).any()
        assert "query_turns_s" in turning.timings
    finally:
        turning.store.close()
        upright.store.close()


def test_query_and_serve_search_each_rotation_and_scores_refuse(turned_set, tmp_path):
    from asmkit import pipeline
    from asmkit.features.io import load_image
    from asmkit.hybrid import HybridSpec

    images = turned_set / "images"
    ws = tmp_path / "ws"
    pipeline.build_index(images, out=ws, preset="deep_qrot")
    photo = sorted(images.iterdir())[0]
    query = tmp_path / "turned.png"
    Image.fromarray(np.ascontiguousarray(np.rot90(np.asarray(Image.open(photo).convert("RGB"))))).save(query)
    got = pipeline.query_index(ws, [query], top=5)["results"][0]["results"]
    # By hand: the workspace's extractor at each rotation, the best score per image.
    folder, feats, idx, _ = pipeline._open_for_query(ws, None, "cpu")
    image = load_image(query, max_size=feats.extractor.max_size)
    best: dict[str, float] = {}
    for rotation in (0, 90, 180, 270):
        vecs = feats.descriptors(feats.extractor.turned(rotation).extract(image).descriptors)
        scores, ids = idx.search([vecs], k=5)
        for score, key in zip(scores[0], idx.keys_of(ids[0][ids[0] >= 0])):
            best[key] = max(best.get(key, -np.inf), float(score))
    expected = sorted(best.items(), key=lambda item: -item[1])[:5]
    assert [r["name"] for r in got][:1] == [expected[0][0]]
    np.testing.assert_allclose([r["score"] for r in got], [s for _, s in expected], rtol=1e-5)
    # What takes every image as a query, or fuses over the database, refuses the setting.
    with pytest.raises(ArgumentError, match="query_rotations"):
        pipeline.compute_scores(images, out=tmp_path / "s.npy", preset="deep_qrot")
    with pytest.raises(ArgumentError, match="query_rotations"):
        pipeline.compute_scores(images, out=tmp_path / "s.npz", top=3, preset="deep_qrot")
    with pytest.raises(ArgumentError, match="query_rotations"):
        HybridSpec(["sift", "deep_qrot"])
    if importlib.util.find_spec("fastapi") is not None and importlib.util.find_spec("httpx") is not None:
        # The service answers as `asmkit query` does: every rotation, each image at its best.
        from fastapi.testclient import TestClient

        from asmkit.serve import Settings, create_app, open_served

        settings = Settings()
        with TestClient(create_app(open_served(ws, settings), settings)) as client:
            answer = client.post("/search?k=5", files={"image": ("q.png", query.read_bytes(), "image/png")})
        assert answer.status_code == 200, answer.text
        assert answer.json()["keys"] == [r["name"] for r in got]
        np.testing.assert_allclose(answer.json()["scores"], [r["score"] for r in got], rtol=1e-5)
