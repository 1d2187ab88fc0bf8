"""For the ``asmkit serve`` tests: a small index workspace, images to upload, and the
server as a real process on 127.0.0.1."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from broken_files import textured_image
from PIL import Image

from asmkit.pipeline import build_index

__all__ = ["Server", "copy_workspace", "free_port", "jpeg", "make_workspace"]

SRC = Path(__file__).resolve().parents[1] / "src"


def jpeg(seed: int, width: int = 160, height: int = 120) -> bytes:
    """A textured JPEG (SIFT finds a hundred or so keypoints in it), distinct per seed."""
    buffer = io.BytesIO()
    Image.fromarray(textured_image(np.random.default_rng(seed), width, height)).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def make_workspace(folder: Path, n_images: int = 12) -> Path:
    """``asmkit index`` over ``n_images`` textured JPEGs (``img00.jpg`` ..., seeds 0 ...),
    a 32-word codebook; returns the workspace folder."""
    images = folder / "images"
    images.mkdir(parents=True)
    for i in range(n_images):
        (images / f"img{i:02d}.jpg").write_bytes(jpeg(i))
    build_index(images, out=folder / "ws", codebook_size=32)
    return folder / "ws"


def copy_workspace(source: Path, target: Path) -> Path:
    """A copy of a workspace that a test may change (its image root stays the source's)."""
    shutil.copytree(source, target)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m asmkit.cli serve WORKSPACE`` on a free port of 127.0.0.1."""

    def __init__(self, workspace: Path, *flags: str) -> None:
        import httpx

        # A file, not a pipe: a pipe nobody reads could fill and stall the server.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - open as long as the server runs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asmkit.cli", "-q", "serve", str(workspace), "--port", str(self.port), *flags],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise AssertionError(f"server exited: {self.log.read().decode(errors='replace')[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise AssertionError("server did not answer /healthz within 120 s")

    def terminate(self) -> None:
        """SIGTERM: uvicorn shuts down (the app folds the log), then re-raises the signal."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) in (0, -signal.SIGTERM)
