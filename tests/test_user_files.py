"""Every file argument of the command line, given a file of the wrong kind, is a user error:
status 2 and one line on stderr naming the file, no traceback. And a bug is not a user
error: it propagates with its traceback."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asmkit import pipeline
from asmkit._validation import ArgumentError, FileFormatError
from asmkit.cli import main
from asmkit.codebook import Codebook

from .broken_files import textured_image

#: Kinds of wrong file, each written by ``wrong_file``.
KINDS = ["text", "empty", "codebook_pkl", "random_pickle", "directory", "png", "truncated_npy"]


def wrong_file(kind: str, folder: Path, suffix: str = "") -> Path:
    """A file (or folder) of ``kind`` in ``folder``, named ``wrong_<kind><suffix>``."""
    path = folder / f"wrong_{kind}{suffix}"
    if kind == "text":
        path.write_text("this is a text file, not what asmkit expects\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "codebook_pkl":
        # The reference's codebook state_dict, as its io_helpers.save_pickle writes it.
        centroids = np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32)
        path.write_bytes(pickle.dumps({"type": "Codebook", "params": {"size": 16}, "state": {"centroids": centroids}}))
    elif kind == "random_pickle":
        path.write_bytes(pickle.dumps({"weights": np.arange(10), "note": "not a checkpoint"}))
    elif kind == "directory":
        path.mkdir()
        (path / "readme.txt").write_text("a folder where a file is expected\n")
    elif kind == "png":
        Image.fromarray(textured_image(np.random.default_rng(1), 64, 48)).save(path, format="PNG")
    elif kind == "truncated_npy":
        with open(path, "wb") as fh:
            np.save(fh, np.random.default_rng(2).standard_normal((40, 40)).astype(np.float32))
        path.write_bytes(path.read_bytes()[:300])
    else:
        raise AssertionError(kind)
    return path


def assert_user_error(capsys, argv: list[str], path: Path) -> str:
    """Run the CLI in-process: status 2, one stderr line naming ``path``; returns the line."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    # Nor any hint to load the file unsafely (torch's weights_only, numpy's allow_pickle).
    assert "Traceback" not in err and "weights_only" not in err and "allow_pickle" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert ": error: " in lines[0] and str(path) in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(textured_image(rng, 160, 120)).save(folder / f"im{i}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def workspace(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ws") / "index"
    assert main(["-q", "index", str(images), "--out", str(out), "--codebook-size", "16"]) == 0
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    # Shared by the --codebook cases: the images are extracted once.
    return tmp_path_factory.mktemp("cache")


# -- --model --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_model(kind, images, tmp_path, capsys):
    pytest.importorskip("torch")
    path = wrong_file(kind, tmp_path, "" if kind.endswith("pkl") or kind == "directory" else ".pth")
    assert_user_error(
        capsys,
        ["-q", "scores", str(images), "--out", str(tmp_path / "s.npy"), "--preset", "mast3r", "--model", str(path)],
        path,
    )


def test_model_codebook_pickle_in_a_real_process(images, tmp_path):
    # The case of the issue, as a new user meets it: the console script, not main().
    pytest.importorskip("torch")
    path = wrong_file("codebook_pkl", tmp_path, ".pkl")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "asmkit.cli",
            "-q",
            "scores",
            str(images),
            "--out",
            str(tmp_path / "s.npy"),
            "--preset",
            "mast3r",
            "--model",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "weights_only" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("asmkit scores: error: ") and str(path) in last


# -- --codebook -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "codebook_pkl"])
def test_codebook(kind, images, cache, tmp_path, capsys):
    # A .pkl goes to the reference-format reader, anything else to the asmkit one.
    path = wrong_file(kind, tmp_path, ".pkl" if kind == "random_pickle" else "")
    assert_user_error(
        capsys,
        ["-q", "scores", str(images), "--out", str(tmp_path / "s.npy"), "--cache", str(cache), "--codebook", str(path)],
        path,
    )


@pytest.mark.parametrize("part", ["workspace", "index.asmkit", "truncated", "garbage_npy"])
def test_codebook_that_is_another_asmkit_folder_or_damaged(part, images, workspace, cache, tmp_path, capsys):
    if part == "workspace":
        path = workspace
    elif part == "index.asmkit":
        path = workspace / "index.asmkit"
    else:
        path = tmp_path / "codebook.asmkit"
        shutil.copytree(workspace / "codebook.asmkit", path)
        centroids = path / "centroids.npy"
        data = centroids.read_bytes()
        centroids.write_bytes(data[: len(data) // 2] if part == "truncated" else b"x" * len(data))
    line = assert_user_error(
        capsys,
        ["-q", "scores", str(images), "--out", str(tmp_path / "s.npy"), "--cache", str(cache), "--codebook", str(path)],
        path,
    )
    if part in ("truncated", "garbage_npy"):
        assert "centroids.npy" in line


@pytest.mark.parametrize("command", ["index", "scores"])
def test_codebook_of_another_dimension(command, images, cache, tmp_path, capsys):
    # A valid codebook for other features (SIFT is 128-D): the error names the file and both sizes.
    path = tmp_path / "codebook16.asmkit"
    Codebook(np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)).save(path)
    out = ["--out", str(tmp_path / ("ws" if command == "index" else "s.npy"))]
    extra = [] if command == "index" else ["--cache", str(cache)]
    line = assert_user_error(capsys, ["-q", command, str(images), *out, *extra, "--codebook", str(path)], path)
    assert "codebook of dimension 16, the features have 128" in line


# -- --config -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "empty"])  # an empty TOML file is a valid config
def test_config(kind, images, tmp_path, capsys):
    path = wrong_file(kind, tmp_path, ".toml")
    assert_user_error(
        capsys, ["-q", "scores", str(images), "--out", str(tmp_path / "s.npy"), "--config", str(path)], path
    )


# -- the index workspace --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_index_argument_that_is_no_workspace(kind, images, tmp_path, capsys):
    path = wrong_file(kind, tmp_path)
    assert_user_error(capsys, ["-q", "query", str(path), str(images / "im0.jpg")], path)


def _damage(ws: Path, how: str) -> Path:
    """Damage the copied workspace ``ws``; returns the file that the message must name."""
    arrays = ws / "index.asmkit"
    if how == "truncated_npy":
        target = arrays / "data.npy"
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif how == "garbage_npy":
        target = arrays / "ids.npy"
        target.write_bytes(b"\0" * target.stat().st_size)
    elif how == "flipped_byte":
        target = arrays / "data.npy"
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif how == "missing_npy":
        target = arrays / "norms.npy"
        target.unlink()
    elif how == "manifest_garbage":
        target = arrays / "manifest.json"
        target.write_text("{not json")
    elif how == "no_index":
        target = arrays
        shutil.rmtree(arrays)
    elif how == "pipeline_json_garbage":
        target = ws / "pipeline.json"
        target.write_bytes(b"\x89PNG\r\n\x1a\n")
    elif how == "pipeline_json_no_config":
        target = ws / "pipeline.json"
        target.write_text(json.dumps({"image_root": "/"}))
    elif how == "pipeline_json_list":
        target = ws / "pipeline.json"
        target.write_text("[1, 2]")
    else:
        raise AssertionError(how)
    return target


@pytest.mark.parametrize(
    "how",
    [
        "truncated_npy",
        "garbage_npy",
        "flipped_byte",
        "missing_npy",
        "manifest_garbage",
        "no_index",
        "pipeline_json_garbage",
        "pipeline_json_no_config",
        "pipeline_json_list",
    ],
)
def test_damaged_workspace(how, workspace, images, tmp_path, capsys):
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    target = _damage(ws, how)
    assert_user_error(capsys, ["-q", "query", str(ws), str(images / "im0.jpg")], target)


def test_damaged_workspace_with_add(workspace, images, tmp_path, capsys):
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    target = _damage(ws, "pipeline_json_garbage")
    assert_user_error(capsys, ["-q", "index", str(images), "--out", str(ws), "--add"], target)


# -- the image list -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_image_list(kind, tmp_path, capsys):
    path = wrong_file(kind, tmp_path)
    assert_user_error(capsys, ["-q", "index", str(path), "--out", str(tmp_path / "ws")], path)


def test_image_list_naming_a_file_twice(images, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images / 'im0.jpg'}\n{images / 'im0.jpg'}\n")
    line = assert_user_error(capsys, ["-q", "index", str(listing), "--out", str(tmp_path / "ws")], listing)
    assert "line 2" in line


# -- eval DATA ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"\x89PNG\r\n\x1a\n\0\0", id="png"),
        pytest.param(b"{not json", id="text"),
        pytest.param(b'{"queries": []}', id="missing_keys"),
        pytest.param(None, id="no_gt_json"),
    ],
)
def test_eval_data(content, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    gt = data / "gt.json"
    if content is not None:
        gt.write_bytes(content)
    assert_user_error(capsys, ["-q", "eval", str(data), "--cache", str(tmp_path / "c")], gt)


# -- pairs --scores and report --results / --names -------------------------------------------


@pytest.mark.parametrize("kind", ["text", "empty", "png", "truncated_npy", "random_pickle"])
def test_pairs_scores(kind, tmp_path, capsys):
    path = wrong_file(kind, tmp_path, ".npy")
    (tmp_path / f"{path.name}.names.txt").write_text("a.jpg\nb.jpg\n")
    assert_user_error(capsys, ["-q", "pairs", "--scores", str(path), "--out", str(tmp_path / "p.txt")], path)


def test_pairs_scores_that_is_not_square(tmp_path, capsys):
    path = tmp_path / "s.npy"
    np.save(path, np.zeros(3, np.float32))
    (tmp_path / "s.npy.names.txt").write_text("a.jpg\nb.jpg\nc.jpg\n")
    capsys.readouterr()
    assert main(["-q", "pairs", "--scores", str(path), "--out", str(tmp_path / "p.txt")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "square" in err


def test_pairs_unknown_graph(tmp_path, capsys):
    path = tmp_path / "s.npy"
    np.save(path, np.eye(3, dtype=np.float32))
    (tmp_path / "s.npy.names.txt").write_text("a.jpg\nb.jpg\nc.jpg\n")
    capsys.readouterr()
    assert main(["-q", "pairs", "--scores", str(path), "--out", str(tmp_path / "p.txt"), "--graph", "bogus"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "bogus" in err


def test_pairs_scores_with_a_binary_names_file(tmp_path, capsys):
    scores = tmp_path / "s.npy"
    np.save(scores, np.eye(2, dtype=np.float32))
    names = tmp_path / "s.npy.names.txt"
    names.write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    assert_user_error(capsys, ["-q", "pairs", "--scores", str(scores), "--out", str(tmp_path / "p.txt")], names)


@pytest.mark.parametrize("kind", ["text", "empty", "png", "truncated_npy", "npz_without_ids"])
def test_report_results(kind, images, tmp_path, capsys):
    if kind == "npz_without_ids":
        path = tmp_path / "results.npz"
        np.savez(path, scores=np.zeros((1, 2)))
    else:
        path = wrong_file(kind, tmp_path, ".npz")
    (tmp_path / "names.txt").write_text("im0.jpg\nim1.jpg\n")
    assert_user_error(
        capsys,
        [
            "-q",
            "report",
            "--results",
            str(path),
            "--names",
            str(tmp_path / "names.txt"),
            "--query-names",
            str(tmp_path / "names.txt"),
            "--image-root",
            str(images),
            "--out",
            str(tmp_path / "r.html"),
        ],
        path,
    )


def test_report_names_file_that_is_an_image(images, tmp_path, capsys):
    results = tmp_path / "results.npz"
    np.savez(results, ids=np.array([[0, 1]]), scores=np.array([[1.0, 0.5]]))
    names = wrong_file("png", tmp_path, ".txt")
    assert_user_error(
        capsys,
        [
            "-q",
            "report",
            "--results",
            str(results),
            "--names",
            str(names),
            "--query-names",
            str(names),
            "--image-root",
            str(images),
            "--out",
            str(tmp_path / "r.html"),
        ],
        names,
    )


# -- what is not a user error ---------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        TypeError("a bug"),
        AttributeError("a bug"),
        KeyError("a bug"),
        ValueError("a bug in numpy's hands"),
        IndexError("a bug"),
    ],
)
def test_a_bug_propagates(error, images, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, "compute_scores", broken)
    capsys.readouterr()
    with pytest.raises(type(error), match="a bug"):
        main(["-q", "scores", str(images), "--out", str(tmp_path / "s.npy")])
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "error",
    [
        ArgumentError("--top: must be at least 1"),
        FileFormatError("/x/y.pth", "not a checkpoint"),
        FileNotFoundError("image source not found: /x"),
        PermissionError("/x: denied"),
    ],
)
def test_user_errors_are_one_line_and_verbose_shows_the_traceback(error, images, tmp_path, monkeypatch, capsys):
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, "compute_scores", failing)
    argv = ["scores", str(images), "--out", str(tmp_path / "s.npy")]
    capsys.readouterr()
    assert main(["-q", *argv]) == 2
    assert capsys.readouterr().err == f"asmkit scores: error: {error}\n"
    # README: `-v` turns on debug logging and tracebacks.
    with pytest.raises(type(error)):
        main(["-v", *argv])


def test_a_bug_in_a_real_process_exits_1_with_its_traceback(tmp_path):
    # As the console script runs main(), with the pipeline broken beforehand.
    script = (
        "import sys, asmkit.pipeline\n"
        "def broken(*args, **kwargs):\n"
        "    raise TypeError('a bug inside asmkit')\n"
        "asmkit.pipeline.compute_scores = broken\n"
        "from asmkit.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "-q", "scores", str(tmp_path), "--out", str(tmp_path / "s.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "TypeError: a bug inside asmkit" in proc.stderr


# -- missing optional packages ----------------------------------------------------------------


def test_yaml_config_without_pyyaml(images, tmp_path, monkeypatch, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("asmk:\n  codebook_size: 16\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` now raises ImportError
    line = assert_user_error(
        capsys, ["-q", "index", str(images), "--out", str(tmp_path / "ws"), "--config", str(path)], path
    )
    assert "pip install pyyaml" in line


def test_deep_preset_without_torch(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "asmkit.features.deep", None)  # as when torch is missing
    capsys.readouterr()
    assert main(["-q", "index", str(images), "--out", str(tmp_path / "ws"), "--preset", "deep"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "the deep preset needs torch: pip install 'asmkit[deep]'" in err
