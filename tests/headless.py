"""Headless Chromium for the browser tests (the HTML report, the service's page)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def run_chromium(args, tmp_path: Path, *, timeout: float = 90, extra_flags=()) -> subprocess.CompletedProcess:
    """Chromium with a fresh profile under ``tmp_path``; ``args`` such as
    ``["--screenshot=x.png", url]``."""
    cmd = [CHROMIUM, *_FLAGS, *extra_flags, f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
