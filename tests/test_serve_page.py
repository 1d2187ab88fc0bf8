"""The page of ``asmkit serve`` in headless Chromium, against a real server on 127.0.0.1:
a search shows its results with decoded thumbnails, scores and times; a failed search
shows the server's message."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from headless import needs_chromium, run_chromium
from serve_workspace import Server, make_workspace

pytestmark = needs_chromium

# The page's blue: the scores and the query's border.
BLUE = (0x2A, 0x6F, 0xD1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(make_workspace(tmp_path_factory.mktemp("page")))
    yield running
    running.terminate()


def chromium(args, tmp_path):
    # The page fetches its results after load: virtual time lets those requests finish.
    return run_chromium(args, tmp_path, timeout=120, extra_flags=["--virtual-time-budget=20000"])


def body_tag(dom: str) -> str:
    return re.search(r"<body[^>]*>", dom).group(0)


def test_search_shows_results_with_thumbnails_scores_and_time(server, tmp_path):
    # ?image= makes the page search with an image of the server, as a dropped file would
    proc = chromium(["--dump-dom", server.url + "/?image=thumbnail%3Fkey%3Dimg03.jpg"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    body = body_tag(dom)
    assert 'data-state="done"' in body, dom[-3000:]
    assert 'data-results="12"' in body and 'data-loaded-results="12"' in body, body
    first = re.search(
        r'<div class="key"><span class="rank">1\.</span><span class="score">([0-9.]+)</span> ([^<]+)</div>', dom
    )
    assert first is not None and first.group(2) == "img03.jpg" and float(first.group(1)) > 0
    status = re.search(r'<div id="status" class="ok">([^<]+)</div>', dom).group(1)
    assert re.match(
        r"12 results in \d+ ms \(server \d+ ms: features \d+ ms, search [0-9.]+ ms; \d+ descriptors\)", status
    ), status
    assert re.search(r'<span id="stats">12 images · sift · 32 words</span>', dom)


def test_a_failed_search_shows_the_servers_message(server, tmp_path):
    proc = chromium(["--dump-dom", server.url + "/?image=healthz"], tmp_path)  # JSON, not an image
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert 'data-state="error"' in body_tag(dom), dom[-3000:]
    status = re.search(r'<div id="status" class="error">([^<]+)</div>', dom).group(1)
    assert status == "Search failed (422): image: not a recognised image format"


def test_screenshot_shows_thumbnails(server, tmp_path):
    png = tmp_path / "shot.png"
    proc = chromium(
        [f"--screenshot={png}", "--window-size=1200,1400", server.url + "/?image=thumbnail%3Fkey%3Dimg05.jpg"], tmp_path
    )
    assert png.is_file(), proc.stderr[-2000:]
    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    colours = np.unique(rgb.reshape(-1, 3), axis=0)
    assert len(colours) > 500  # photos, not only flat page colours

    def present(target, tol=12):
        return int((np.abs(rgb - np.array(target)).max(axis=2) <= tol).sum()) > 100

    assert present(BLUE)
