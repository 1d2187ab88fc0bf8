"""``asmkit serve`` in-process: the HTTP API through FastAPI's TestClient (no socket), the
write-ahead log, snapshots under concurrent updates, and a thousand bad requests."""

from __future__ import annotations

import io
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from broken_files import make_broken_folder, png_header_only
from fastapi.testclient import TestClient
from serve_workspace import copy_workspace, jpeg, make_workspace

from asmkit._validation import ArgumentError, FileFormatError
from asmkit.index import Index
from asmkit.serve import ServedIndex, Settings, check_key, create_app
from asmkit.serve.wal import Record, WriteAheadLog, final_updates

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def base_workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("serve"))


@pytest.fixture
def workspace(base_workspace, tmp_path) -> Path:
    return copy_workspace(base_workspace, tmp_path / "ws")


@contextmanager
def serving(workspace: Path, **settings):
    settings = Settings(**settings)
    with TestClient(create_app(ServedIndex(workspace, settings), settings)) as client:
        yield client


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def search_image(client, data: bytes, k: int = 5, **kw):
    return client.post(f"/search?k={k}", files={"image": ("q.jpg", data, "image/jpeg")}, **kw)


def add_images(client, pairs, headers=AUTH):
    files = [("image", (f"{key}.jpg", data, "image/jpeg")) for key, data in pairs]
    return client.post("/images", files=files, data={"key": [key for key, _ in pairs]}, headers=headers)


# ------------------------------------------------------------------------------ search


def test_search_by_image_and_by_descriptors(workspace):
    vecs = np.random.default_rng(5).standard_normal((300, 128)).astype(np.float32)
    expected_scores, expected_ids = Index.load(workspace / "index.asmkit").search([vecs], k=5)
    keys = Index.load(workspace / "index.asmkit").keys
    with serving(workspace) as client:
        by_image = search_image(client, jpeg(3))
        by_vecs = client.post("/search?k=5", files={"descriptors": ("q.npy", npy(vecs))})
    assert by_image.status_code == 200, by_image.text
    body = by_image.json()
    assert body["keys"][0] == "img03.jpg" and len(body["keys"]) == 5
    assert body["scores"] == sorted(body["scores"], reverse=True)
    assert set(body["timings"]) >= {"read_ms", "features_ms", "search_ms", "total_ms"} and body["descriptors"] > 0
    assert by_vecs.status_code == 200, by_vecs.text
    assert by_vecs.json()["keys"] == [keys[i] for i in expected_ids[0]]
    assert np.array_equal(np.float32(by_vecs.json()["scores"]), expected_scores[0])


# ------------------------------------------------------------------------------ updates


def test_add_search_remove(workspace):
    with serving(workspace, token=TOKEN) as client:
        added = add_images(client, [("new-a", jpeg(100)), ("new-b", jpeg(101))])
        assert added.status_code == 201, added.text
        assert added.json()["added"] == ["new-a", "new-b"] and added.json()["images"] == 14
        assert search_image(client, jpeg(101)).json()["keys"][0] == "new-b"
        assert add_images(client, [("new-a", jpeg(102))]).status_code == 409
        assert add_images(client, [("x", jpeg(103)), ("x", jpeg(104))]).status_code == 422
        assert client.get("/stats").json()["images"] == 14
        removed = client.delete("/images/new-b", headers=AUTH)
        assert removed.status_code == 200 and removed.json() == {"removed": "new-b", "images": 13}
        assert "new-b" not in search_image(client, jpeg(101), k=13).json()["keys"]
        assert client.delete("/images/new-b", headers=AUTH).status_code == 404
        # keys that `asmkit index` made from subfolders hold '/', and stay removable
        assert client.delete("/images/img00.jpg", headers=AUTH).json()["images"] == 12
    # a clean shutdown folds the log into the saved index
    saved = Index.load(workspace / "index.asmkit")
    assert "new-a" in saved.keys and "new-b" not in saved.keys and "img00.jpg" not in saved.keys
    assert WriteAheadLog(workspace / "serve-wal").read() == []


def test_acknowledged_updates_are_in_the_log_before_any_fold(workspace, tmp_path):
    with serving(workspace, token=TOKEN) as client:
        assert add_images(client, [("kept", jpeg(200))]).status_code == 201
        assert client.delete("/images/img01.jpg", headers=AUTH).status_code == 200
        # The process "dies" here: a copy of the folder is what a crash leaves on disk.
        crashed = copy_workspace(workspace, tmp_path / "crashed")
    assert "kept" not in Index.load(crashed / "index.asmkit").keys
    with serving(crashed) as client:
        assert search_image(client, jpeg(200)).json()["keys"][0] == "kept"
        assert client.get("/stats").json()["images"] == 12
        assert "img01.jpg" not in search_image(client, jpeg(1), k=12).json()["keys"]
    assert "kept" in Index.load(crashed / "index.asmkit").keys  # replayed, then folded on open


def test_replaying_a_log_already_folded_changes_nothing(workspace):
    """A crash between the fold's save and the log's deletion replays updates that the
    saved index holds already: last write wins per key, so the result is the same."""
    with serving(workspace, token=TOKEN) as client:
        add_images(client, [("a", jpeg(300)), ("b", jpeg(301))])
        client.delete("/images/a", headers=AUTH)
        add_images(client, [("a", jpeg(302))])
        segment = WriteAheadLog(workspace / "serve-wal").segments()[-1]
        logged = segment.read_bytes()
    expected = Index.load(workspace / "index.asmkit")
    segment.write_bytes(logged)  # the log the fold dropped is back
    with serving(workspace) as client:
        assert search_image(client, jpeg(302)).json()["keys"][0] == "a"
        assert search_image(client, jpeg(301)).json()["keys"][0] == "b"
    replayed = Index.load(workspace / "index.asmkit")
    assert sorted(replayed.keys) == sorted(expected.keys)


def test_torn_last_record_is_dropped_and_a_damaged_one_refused(tmp_path):
    rng = np.random.default_rng(0)
    records = [Record(f"k{i}", rng.standard_normal((5, 8)).astype(np.float32)) for i in range(3)] + [Record("k1")]
    wal = WriteAheadLog(tmp_path / "wal")
    wal.append(records)
    wal.close()
    (segment,) = wal.segments()
    intact = segment.read_bytes()
    torn = Record("k9", rng.standard_normal((5, 8)).astype(np.float32)).encode()
    for cut in (3, 20, len(torn) - 1):
        segment.write_bytes(intact + torn[:cut])
        read = WriteAheadLog(tmp_path / "wal").read()
        assert [r.key for r in read] == ["k0", "k1", "k2", "k1"]
        assert np.array_equal(read[2].vecs, records[2].vecs) and read[3].vecs is None
        assert segment.read_bytes() == intact  # cut off, so that appends follow intact records
    segment.write_bytes(intact + b"\0" * 100)  # zeros of a file extended before its data
    assert len(WriteAheadLog(tmp_path / "wal").read()) == 4
    damaged = bytearray(intact)
    damaged[30] ^= 0xFF  # inside the first record, with records after it
    segment.write_bytes(bytes(damaged))
    with pytest.raises(FileFormatError, match="damaged log record"):
        WriteAheadLog(tmp_path / "wal").read()
    assert list(final_updates(records)) == ["k0", "k2", "k1"] and final_updates(records)["k1"] is None


def test_searches_see_an_update_whole_or_not_at_all(workspace):
    served = ServedIndex(workspace)
    try:
        query = served.featurize(jpeg(400))
        before = served.search(query, 13)
        served.add([("flip", query)])
        after = served.search(query, 13)
        served.remove("flip")
        assert before != after and after[0][0] == "flip"
        seen, stop, errors = set(), threading.Event(), []

        def searcher():
            try:
                while not stop.is_set():
                    keys, scores = served.search(query, 13)
                    seen.add((tuple(keys), tuple(scores)))
            except Exception as exc:  # noqa: BLE001 - reported below: a thread cannot fail the test itself
                errors.append(exc)

        threads = [threading.Thread(target=searcher) for _ in range(3)]
        for t in threads:
            t.start()
        for _ in range(15):
            served.add([("flip", query)])
            served.remove("flip")
        stop.set()
        for t in threads:
            t.join()
        assert not errors
        assert seen <= {(tuple(before[0]), tuple(before[1])), (tuple(after[0]), tuple(after[1]))}
    finally:
        served.close()


@pytest.mark.parametrize("searchers", [1, 3])
def test_concurrent_searches_batched_equal_searches_one_by_one(workspace, searchers):
    rng = np.random.default_rng(8)
    queries = [rng.standard_normal((int(rng.integers(0, 400)), 128)).astype(np.float32) for _ in range(24)]
    ks = [int(rng.integers(1, 15)) for _ in queries]
    index = Index.load(workspace / "index.asmkit")
    keys = np.asarray(index.keys)
    expected = []
    for vecs, k in zip(queries, ks):
        scores, ids = index.search([vecs], k=k)
        found = ids[0] >= 0
        expected.append((keys[np.searchsorted(index.ids, ids[0][found])].tolist(), scores[0][found].tolist()))
    served = ServedIndex(workspace, Settings(max_batch=8, searchers=searchers))
    try:
        results = [None] * len(queries)
        barrier = threading.Barrier(len(queries))

        def run(i):
            barrier.wait()  # all at once, so that the searcher threads batch them
            results[i] = served.search(queries[i], ks[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(queries))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        served.close()
    assert results == expected


def test_one_server_per_workspace(workspace):
    served = ServedIndex(workspace)
    try:
        with pytest.raises(ArgumentError, match="already served"):
            ServedIndex(workspace)
    finally:
        served.close()
    ServedIndex(workspace).close()


# ------------------------------------------------------------------------------ security, limits


def test_token_protects_writes_and_optionally_reads(workspace):
    with serving(workspace, token=TOKEN) as client:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
            response = add_images(client, [("k", jpeg(500))], headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert client.delete("/images/img02.jpg", headers=headers).status_code == 401
        assert search_image(client, jpeg(2)).status_code == 200
        assert client.get("/stats").json()["images"] == 12
    with serving(workspace, token=TOKEN, token_reads=True) as client:
        assert search_image(client, jpeg(2)).status_code == 401
        assert client.get("/stats").status_code == 401 and client.get("/metrics").status_code == 401
        assert search_image(client, jpeg(2), headers=AUTH).status_code == 200
        assert client.get("/healthz").json() == {"status": "ok", "images": 12}


def test_limits(workspace):
    with serving(workspace, token=TOKEN, max_request_bytes=64 * 1024, max_pixels=1_000_000, max_k=50) as client:
        big = jpeg(600, 1200, 900)
        assert len(big) > 64 * 1024
        assert search_image(client, big).status_code == 413

        def chunks():  # no Content-Length: the limit counts the bytes as they come
            yield b'--bnd\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
            for _ in range(100):
                yield b"x" * 1024
            yield b"\r\n--bnd--\r\n"

        chunked = client.post(
            "/search", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=bnd"}
        )
        assert chunked.status_code == 413
        bomb = search_image(client, png_header_only(2000, 1000))
        assert bomb.status_code == 422 and "too large" in bomb.json()["detail"]
        assert search_image(client, jpeg(4), k=0).status_code == 422
        assert search_image(client, jpeg(4), k=51).status_code == 422
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "key", ["", "a/b", "a\\b", "..", ".", " lead", "trail ", "tab\there", "nul\0", "rtl\u202eoverride", "x" * 257]
)
def test_bad_keys_are_refused(key):
    with pytest.raises(ArgumentError, match="^key: "):
        check_key(key, 256)


def test_good_keys_pass():
    for key in ("img.jpg", "Ünïcödé name 12", "x" * 256, "a..b"):
        assert check_key(key, 256) == key


def test_settings_are_checked():
    with pytest.raises(ArgumentError, match="port"):
        Settings(port=70000)
    with pytest.raises(ArgumentError, match="token_reads"):
        Settings(token_reads=True)
    with pytest.raises(ArgumentError, match="workers"):
        Settings(workers=0)
    with pytest.raises(ArgumentError, match="searchers"):
        Settings(searchers=0)


def test_metrics_stats_thumbnails_and_schema(workspace):
    with serving(workspace) as client:
        search_image(client, jpeg(6))
        search_image(client, b"not an image")
        metrics = client.get("/metrics")
        thumb = client.get("/thumbnail", params={"key": "img06.jpg"})
        escape = client.get("/thumbnail", params={"key": "../images/img06.jpg"})
        schema = client.get("/openapi.json").json()
        page = client.get("/")
    assert metrics.status_code == 200
    text = metrics.text
    assert 'asmkit_requests_total{method="POST",route="/search",status="200"} 1.0' in text
    assert 'asmkit_requests_total{method="POST",route="/search",status="422"} 1.0' in text
    assert 'asmkit_request_duration_seconds_bucket{le="0.005",route="/search"}' in text
    assert "asmkit_index_images 12.0" in text
    assert (
        thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
    )
    assert escape.status_code == 404
    assert {"/search", "/images", "/images/{key}", "/stats", "/healthz", "/metrics"} <= set(schema["paths"])
    assert page.status_code == 200 and "<title>asmkit search</title>" in page.text


# ------------------------------------------------------------------------------ bad requests


def _bad_corpus(tmp_path: Path, rng: np.random.Generator) -> dict[str, list[bytes]]:
    broken = make_broken_folder(tmp_path / "broken", n_good=1, n_bad_each=2)
    images = [(broken.root / name).read_bytes() for name in broken.bad]
    good = jpeg(700)
    for _ in range(20):
        images.append(good[: int(rng.integers(0, len(good)))])  # truncated anywhere
        flipped = bytearray(good)
        for at in rng.integers(0, len(good), 8):
            flipped[at] ^= int(rng.integers(1, 256))
        images.append(bytes(flipped))
        images.append(rng.bytes(int(rng.integers(1, 4000))))
    arrays = [
        npy(np.array([{"a": 1}, None], dtype=object)),  # a pickle inside
        npy(np.zeros((5, 64), np.float32)),  # wrong dimension
        npy(np.zeros((2, 5, 128), np.float32)),
        npy(np.full((3, 128), np.nan, np.float32)),
        npy(np.array(["abc"] * 128)),
        npy(np.zeros((3, 128), np.complex64)),
        npy(np.zeros(128, np.float32)),
        npy(np.zeros((4, 128), np.float32))[:-7],  # truncated data
        npy(np.zeros((1, 128), np.float32)).replace(b"(1, 128)", b"(99999999, 128)"),  # header lies
        b"\x93NUMPY\x01\x00" + b"\xff" * 40,
        b"PK\x03\x04 not an npz",
        b"",
        jpeg(701),
    ]
    keys = ["", "a/b", "..", "tab\tkey", "nul\0key", "\u202e", "x" * 300, " pad", "c\\d", "ok-key"]
    return {"images": images, "arrays": arrays, "keys": keys}


def test_a_thousand_bad_requests_get_4xx_and_the_server_stays_healthy(workspace, tmp_path):
    rng = np.random.default_rng(14)
    corpus = _bad_corpus(tmp_path, rng)
    images, arrays, keys = corpus["images"], corpus["arrays"], corpus["keys"]
    tokens = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic eA=="},
        {"Authorization": "Bearer " + "x" * 5000},
        AUTH,
    ]
    k_values = ["0", "-1", "1001", "abc", "1e3", "", "5"]
    oversized = rng.bytes(300 * 1024)

    def pick(items):
        return items[int(rng.integers(0, len(items)))]

    def one(client):
        kind = int(rng.integers(0, 12))
        if kind == 0:
            return search_image(client, pick(images), k=pick(k_values))
        if kind == 1:
            return client.post(f"/search?k={pick(k_values)}", files={"descriptors": ("q.npy", pick(arrays))})
        if kind == 2:  # both fields, or a field that is not a file
            return client.post(
                "/search", files={"image": ("q.jpg", pick(images)), "descriptors": ("d.npy", pick(arrays))}
            )
        if kind == 3:
            return client.post("/search", data={"image": "just text"})
        if kind == 4:  # wrong content types
            content_type = pick(
                [
                    "application/json",
                    "text/plain",
                    "multipart/form-data",
                    "multipart/form-data; boundary=zz",
                    "image/jpeg",
                    "application/x-www-form-urlencoded",
                ]
            )
            return client.post("/search", content=pick(images), headers={"Content-Type": content_type})
        if kind == 5:
            return client.post("/search", files={"image": ("big.jpg", oversized)})
        if kind == 6:
            pairs = [(pick(keys), pick(images)) for _ in range(int(rng.integers(1, 3)))]
            return add_images(client, pairs, headers=pick(tokens))
        if kind == 7:  # keys and images that do not pair up
            return client.post(
                "/images", files=[("image", ("a.jpg", pick(images)))], data={"key": ["a", "b"]}, headers=AUTH
            )
        if kind == 8:
            return client.delete(
                "/images/" + pick(["nope", "..%2F..%2Fetc", "%00", "a" * 400, "img03.jpg"]), headers=pick(tokens)
            )
        if kind == 9:
            return client.get(
                "/thumbnail", params={"key": pick(["../../etc/passwd", "/etc/passwd", "", "x" * 2000, "\0"])}
            )
        if kind == 10:
            return client.request(pick(["GET", "PUT", "PATCH"]), pick(["/search", "/images", "/stats", "/nowhere"]))
        return client.post(
            "/images", content=pick(images), headers={**pick(tokens), "Content-Type": "multipart/form-data"}
        )

    statuses, change = [], 0
    with serving(workspace, token=TOKEN, max_request_bytes=256 * 1024, max_pixels=4_000_000) as client:
        for _ in range(1100):
            response = one(client)
            statuses.append(response.status_code)
            if response.status_code == 201:
                change += len(response.json()["added"])
            elif response.status_code == 200 and response.request.method == "DELETE":
                change -= 1
        assert client.get("/healthz").json()["status"] == "ok"
        assert search_image(client, jpeg(7)).json()["keys"][0] == "img07.jpg"
        images_now = client.get("/stats").json()["images"]
    assert len(statuses) >= 1000
    assert [s for s in statuses if s >= 500] == []
    codes = set(statuses)
    assert {401, 404, 405, 413, 422} <= codes, codes
    # only well-formed, authorised adds and removes changed the index
    assert images_now == 12 + change
