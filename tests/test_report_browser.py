"""The HTML report rendered by headless Chromium: images decode, the page is not blank."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from headless import needs_chromium, run_chromium
from PIL import Image

from asmkit.evaluate import load_ground_truth
from asmkit.report import write_report

pytestmark = needs_chromium

GREEN = (0x1A, 0x9A, 0x3A)
RED = (0xD1, 0x2A, 0x2A)


def chromium(args, tmp_path):
    return run_chromium(args, tmp_path)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report over 12 colourful images (one of them broken) with ground truth."""
    root = tmp_path_factory.mktemp("browser")
    rng = np.random.default_rng(0)
    names = []
    for i in range(12):
        arr = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        name = f"images/im{i:02d}.jpg"
        (root / "images").mkdir(exist_ok=True)
        Image.fromarray(arr).resize((120, 90), Image.Resampling.NEAREST).save(root / name)
        names.append(name)
    (root / names[7]).write_bytes(b"\x00not an image")
    groups = [names[i : i + 4] for i in range(0, 12, 4)]
    gt = {
        "images": names,
        "queries": [g[0] for g in groups],
        "positives": {g[0]: g[1:] for g in groups},
        "junk": {g[0]: [g[0]] for g in groups},
        "groups": groups,
    }
    (root / "gt.json").write_text(json.dumps(gt))
    truth = load_ground_truth(root)
    ranks = np.array([[0, 1, 5, 2, 3, 9], [4, 7, 8, 5, 6, 0], [8, 11, 10, 3, 9, -1]])
    scores = np.linspace(1, 0, ranks.size).reshape(ranks.shape).astype(np.float32)
    out = write_report(
        root / "report.html",
        names=names,
        image_root=root,
        ranks=ranks,
        scores=scores,
        query_names=truth.queries,
        gt=truth,
        top_k=6,
    )
    return out, int((ranks >= 0).sum())


def test_dom_after_rendering_has_decoded_thumbnails(report, tmp_path):
    path, n_results = report
    proc = chromium(["--virtual-time-budget=5000", "--dump-dom", path.as_uri()], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert dom.count('<img class="result"') == n_results
    body = re.search(r"<body[^>]*>", dom).group(0)
    # written by the report's load handler: img.result with naturalWidth > 0
    loaded = re.search(r'data-loaded-results="(\d+)"', body)
    assert loaded is not None, body
    assert int(loaded.group(1)) == n_results
    assert 'class="pr-curve"' in dom


def test_screenshot_is_not_blank(report, tmp_path):
    path, _ = report
    png = tmp_path / "shot.png"
    proc = chromium([f"--screenshot={png}", "--window-size=1200,2000", path.as_uri()], tmp_path)
    assert png.is_file(), proc.stderr[-2000:]
    with Image.open(png) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1200, 2000)
        colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, thumbnails, borders, plot

    def present(target, tol=12):
        arr = np.asarray(rgb).astype(int)
        return bool((np.abs(arr - np.array(target)).max(axis=2) <= tol).sum() > 100)

    assert present(GREEN) and present(RED)  # positive and negative borders were drawn
