"""``asmkit serve`` on a hybrid workspace: searched with images as ``asmkit query`` would
answer, read-only (adds and removes answer 405), one server per workspace."""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from serve_workspace import jpeg  # noqa: E402

import asmkit.pipeline as pipeline  # noqa: E402
from asmkit._validation import ArgumentError  # noqa: E402
from asmkit.hybrid import HybridSpec  # noqa: E402
from asmkit.serve import ServedHybrid, ServedIndex, Settings, create_app, open_served  # noqa: E402


@pytest.fixture(
    scope="module",
    params=[(("sift", "sift_hq"), "mutual_max"), (("sift", "sift_hq", "asmk_star"), "anchored_max")],
    ids=["mutual_max", "anchored_max-3"],
)
def hybrid_workspace(tmp_path_factory, request) -> Path:
    """A hybrid workspace of the serve tests' textured images, of SIFT presets so that it
    runs without torch: two members fused by mutual_max, and three by anchored_max as
    `hybrid_all` has."""
    root = tmp_path_factory.mktemp("serve_hybrid")
    (root / "images").mkdir()
    for i in range(16):
        (root / "images" / f"img{i:02d}.jpg").write_bytes(jpeg(i))
    members, fusion = request.param
    spec = HybridSpec(list(members), fusion)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "hybrid_spec", lambda preset: spec if preset == "hybrid" else None)
        pipeline.build_index(root / "images", out=root / "ws", preset="hybrid")
    return root / "ws"


@contextmanager
def serving(workspace: Path):
    settings = Settings()
    with TestClient(create_app(open_served(workspace, settings), settings)) as client:
        yield client


def test_search_answers_as_query_does(hybrid_workspace):
    images = pipeline.open_workspace(hybrid_workspace / "sift")[2]
    query = images / "img05.jpg"
    expected = pipeline.query_index(hybrid_workspace, [query], top=6)["results"][0]["results"]
    with serving(hybrid_workspace) as client:
        answer = client.post("/search?k=6", files={"image": ("q.jpg", query.read_bytes(), "image/jpeg")})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["keys"] == [r["name"] for r in expected] and body["keys"][0] == "img05.jpg"
        np.testing.assert_allclose(body["scores"], [r["score"] for r in expected], rtol=1e-5)
        assert body["descriptors"] > 0
        stats = client.get("/stats").json()
        members = list(pipeline.workspace_hybrid(hybrid_workspace).members)
        assert stats["images"] == 16 and [m["preset"] for m in stats["members"]] == members
        assert client.get("/healthz").json() == {"status": "ok", "images": 16}
        assert client.get("/thumbnail", params={"key": "img05.jpg"}).headers["content-type"] == "image/jpeg"
        assert client.get("/thumbnail", params={"key": "nope.jpg"}).status_code == 404


def test_hybrid_is_read_only_and_searched_with_images(hybrid_workspace):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((5, 128), np.float32))
    with serving(hybrid_workspace) as client:
        by_vecs = client.post("/search", files={"descriptors": ("q.npy", buffer.getvalue())})
        assert by_vecs.status_code == 422 and "hybrid" in by_vecs.json()["detail"]
        added = client.post("/images", files=[("image", ("a.jpg", jpeg(99), "image/jpeg"))], data={"key": ["a.jpg"]})
        assert added.status_code == 405 and "--add" in added.json()["detail"]
        assert client.delete("/images/img01.jpg").status_code == 405
        assert client.get("/stats").json()["images"] == 16


def test_one_server_per_hybrid_workspace(hybrid_workspace):
    first = open_served(hybrid_workspace)
    try:
        assert isinstance(first, ServedHybrid)
        with pytest.raises(ArgumentError, match="already served"):
            ServedHybrid(hybrid_workspace)
    finally:
        first.close()
    plain = open_served(hybrid_workspace / "sift")
    try:
        assert isinstance(plain, ServedIndex)
    finally:
        plain.close()
    with pytest.raises(ArgumentError, match="not a hybrid workspace"):
        ServedHybrid(hybrid_workspace / "sift")
    with pytest.raises(FileNotFoundError):
        open_served(hybrid_workspace / "missing")
