"""``--ray``: scores, pairs and eval scored, and an index built, on a local Ray cluster equal
the single-process run."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("asmkit.distributed")
pytest.importorskip("skimage")

from cli_json import run_json

from asmkit import Index  # noqa: E402
from asmkit.demo import build_demo_set  # noqa: E402
from asmkit.distributed import connect, read_manifest  # noqa: E402
from asmkit.pipeline import query_index  # noqa: E402

SMALL = ["--codebook-size", "64"]


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module: connect() reuses a running one."""
    with connect(None, num_cpus=2) as connection:
        yield connection


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_demo_set(
        tmp_path_factory.mktemp("ray") / "data", seed=1, photos=["astronaut", "coffee", "chelsea"], max_size=256
    )


def test_ray_runs_equal_the_single_process_ones(cluster, data, tmp_path, capsys):
    images, cache = str(data / "images"), str(tmp_path / "c")
    ray = ["--ray", "--ray-cpus", "2"]
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


def test_ray_index_equals_the_single_process_one(cluster, data, tmp_path, capsys):
    images = str(data / "images")
    single, on_ray = tmp_path / "single", tmp_path / "ray"
    run_json(capsys, ["-q", "index", images, "--out", str(single), *SMALL, "--json"])
    summary = run_json(
        capsys, ["-q", "index", images, "--out", str(on_ray), *SMALL, "--ray", "--shards", "2", "--json"]
    )
    expected, got = Index.load(single / "index.asmkit"), Index.load(on_ray / "index.asmkit")
    assert summary["images"] == len(expected) and got.keys == expected.keys
    np.testing.assert_array_equal(got.ids, expected.ids)
    # The codebook trained on the same descriptors (the sample is every image here).
    np.testing.assert_array_equal(got.codebook.centroids, expected.codebook.centroids)
    for name in ("offsets", "slots", "data"):
        np.testing.assert_array_equal(getattr(got.inverted_file, name), getattr(expected.inverted_file, name))
    np.testing.assert_array_equal(got.norms, expected.norms)
    queries = sorted(str(p) for p in (data / "images").iterdir())[:4]
    assert query_index(on_ray, queries, top=5)["results"] == query_index(single, queries, top=5)["results"]
    entries = read_manifest(on_ray / "index.shards")
    assert len(entries) == 2 and sum(e["images"] for e in entries) == len(expected)


def test_index_flags_that_need_or_exclude_ray(data, tmp_path, capsys):
    from asmkit.cli import main

    images = str(data / "images")
    for extra, message in (
        (["--shards", "2"], "--shards: only with --ray"),
        (["--ray", "--add"], "--ray: not with --add"),
    ):
        assert main(["-q", "index", images, "--out", str(tmp_path / "w"), *extra]) == 2
        assert message in capsys.readouterr().err
