"""The README's API example runs as written and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs(tmp_path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    [code] = re.findall(r"## Python API\n\n```python\n(.*?)```", text, flags=re.S)
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    scores, ids, index = scope["scores"], scope["ids"], scope["index"]
    assert scores.shape == ids.shape == (2, 5)
    # Rows 0..999 are descriptors of images 0 and 1: each finds itself first.
    assert ids[:, 0].tolist() == [0, 1]
    assert len(index) == 40 and index.keys[0] == "img0.jpg"
    assert (tmp_path / "my.asmkit").is_dir()
