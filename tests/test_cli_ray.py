"""``--ray``: scores, pairs and eval scored on a local Ray cluster equal the single-process run."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("asmkit.distributed")
pytest.importorskip("skimage")

from cli_json import run_json

from asmkit.demo import build_demo_set  # noqa: E402

SMALL = ["--codebook-size", "64"]


def test_ray_runs_equal_the_single_process_ones(tmp_path, capsys):
    data = build_demo_set(tmp_path / "data", seed=1, photos=["astronaut", "coffee", "chelsea"], max_size=256)
    images, cache = str(data / "images"), str(tmp_path / "c")
    ray = ["--ray", "--ray-cpus", "2"]
    # Keep one local cluster for the whole test: connect() reuses a running one.
    from asmkit.distributed import connect

    with connect(None, num_cpus=2):
        for out, extra in (("d.npy", []), ("s.npz", ["--top", "3"])):
            run_json(
                capsys,
                ["-q", "scores", images, "--out", str(tmp_path / out), "--cache", cache, *SMALL, *extra, "--json"],
            )
            run_json(
                capsys,
                [
                    "-q",
                    "scores",
                    images,
                    "--out",
                    str(tmp_path / f"ray-{out}"),
                    "--cache",
                    cache,
                    *SMALL,
                    *extra,
                    *ray,
                    "--json",
                ],
            )
        assert np.array_equal(np.load(tmp_path / "d.npy"), np.load(tmp_path / "ray-d.npy"))
        with np.load(tmp_path / "s.npz") as a, np.load(tmp_path / "ray-s.npz") as b:
            assert sorted(a.files) == sorted(b.files)
            assert all(np.array_equal(a[key], b[key]) for key in a.files)

        for name, extra in (("p.txt", []), ("ray-p.txt", ray)):
            run_json(
                capsys,
                [
                    "-q",
                    "pairs",
                    images,
                    "--out",
                    str(tmp_path / name),
                    "--graph",
                    "retrieval-2-2",
                    "--cache",
                    cache,
                    *SMALL,
                    *extra,
                    "--json",
                ],
            )
        assert (tmp_path / "p.txt").read_text() == (tmp_path / "ray-p.txt").read_text()

        plain = run_json(capsys, ["-q", "eval", str(data), "--cache", cache, *SMALL, "--json"])
        on_ray = run_json(capsys, ["-q", "eval", str(data), "--cache", cache, *SMALL, *ray, "--json"])
        assert on_ray["map"] == plain["map"] and on_ray["mp"] == plain["mp"]
