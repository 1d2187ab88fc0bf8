"""``asmkit serve`` as a real process on 127.0.0.1: killed with SIGKILL in the middle of a
stream of adds, restarted, every acknowledged add is there; SIGTERM folds the log."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from serve_workspace import Server, jpeg, make_workspace

from asmkit.index import Index
from asmkit.serve.wal import WriteAheadLog

TOKEN = "crash-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("crash"))


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def top_key(client: httpx.Client, url: str, image: bytes) -> str | None:
    response = client.post(url + "/search?k=1", files={"image": ("q.jpg", image, "image/jpeg")})
    assert response.status_code == 200, response.text
    keys = response.json()["keys"]
    return keys[0] if keys else None


def test_every_acknowledged_add_survives_kill_9(workspace, token_file):
    server = Server(workspace, "--token-file", str(token_file))
    acknowledged: list[str] = []
    sent: list[str] = []
    stop = threading.Event()

    def stream(worker: int) -> None:
        with httpx.Client(timeout=30) as client:
            for i in range(1000):
                if stop.is_set():
                    return
                key = f"crash-{worker}-{i:03d}"
                sent.append(key)
                try:
                    response = client.post(
                        server.url + "/images",
                        headers=AUTH,
                        files={"image": ("a.jpg", jpeg(1000 + 100 * worker + i), "image/jpeg")},
                        data={"key": key},
                    )
                except httpx.TransportError:
                    return  # the server died under this request: it was never acknowledged
                assert response.status_code == 201, response.text
                acknowledged.append(key)

    threads = [threading.Thread(target=stream, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 12 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.proc.kill()  # SIGKILL, adds in flight
    server.proc.wait(timeout=30)
    stop.set()
    for t in threads:
        t.join()
    assert len(acknowledged) >= 12
    assert WriteAheadLog(workspace / "serve-wal").segments(), "the adds were logged, not folded"

    restarted = Server(workspace, "--token-file", str(token_file))
    try:
        with httpx.Client(timeout=60) as client:
            images = client.get(restarted.url + "/stats").json()["images"]
            for key in acknowledged:
                worker, i = (int(part) for part in key.split("-")[1:])
                assert top_key(client, restarted.url, jpeg(1000 + 100 * worker + i)) == key
            # an add in flight at the kill is there whole, or not at all
            in_flight = [key for key in sent if key not in acknowledged]
            present = []
            for key in in_flight:
                worker, i = (int(part) for part in key.split("-")[1:])
                if top_key(client, restarted.url, jpeg(1000 + 100 * worker + i)) == key:
                    present.append(key)
            assert images == 12 + len(acknowledged) + len(present)
            assert len(in_flight) <= 2
    finally:
        restarted.terminate()


def test_sigterm_folds_the_log_into_the_saved_index(workspace, token_file):
    server = Server(workspace, "--token-file", str(token_file))
    try:
        with httpx.Client(timeout=30) as client:
            response = client.post(
                server.url + "/images",
                headers=AUTH,
                data={"key": "term"},
                files={"image": ("t.jpg", jpeg(5000), "image/jpeg")},
            )
            assert response.status_code == 201, response.text
    finally:
        server.terminate()
    assert "term" in Index.load(workspace / "index.asmkit").keys
    assert WriteAheadLog(workspace / "serve-wal").read() == []
