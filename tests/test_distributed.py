"""asmkit.distributed on a local two-CPU Ray cluster that the module starts (no dashboard).

Identity: every distributed result equals the single-process one, exactly. Faults: a
worker that kills its own process on its first image is restarted by Ray and the index is
the same; a job whose workers always die leaves no output. Errors: Ray missing, a cluster
that does not answer, a shard missing or corrupt.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

ray = pytest.importorskip("ray")

from asmkit import Codebook, Index, Params, distributed, quantizer, similarity_matrix
from asmkit._validation import ArgumentError, AsmkitError
from asmkit.distributed import (
    ClusterUnreachableError,
    RayNotInstalledError,
    ShardedIndex,
    build_index,
    sample_descriptors,
    save_shards,
    scores_topk,
)
from asmkit.features import SiftExtractor, extract_features
from asmkit.kernel import aggregate_images
from asmkit.storage import StorageError

PARAMS = Params(use_idf=True, ma_query=3, topk=None)
N_IMAGES = 24


@pytest.fixture(scope="module")
def cluster():
    connection = distributed.connect(None, num_cpus=2)
    assert connection.started and connection.resources()["CPU"] == 2
    yield connection
    connection.close()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def data():
    """float32 [N, 32] descriptors of 60 images (0 .. 59 rows each, one image empty),
    image ids [N], and a 48-word codebook."""
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 60, size=60)
    sizes[5] = 0
    ids = np.repeat(np.arange(60, dtype=np.int64) * 3, sizes)
    vecs = rng.standard_normal((ids.shape[0], 32)).astype(np.float32)
    return vecs, ids, Codebook.train(vecs, 48, seed=3)


@pytest.fixture(scope="module")
def index(data):
    vecs, ids, codebook = data
    idx = Index(codebook, PARAMS)
    idx.add(vecs, ids)
    return idx


def _assert_same_result(got, expected):
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def _queries(data):
    """Query descriptors: the first 35 images' rows, shuffled (rows of an image keep
    their order), and their labels."""
    vecs, ids, _ = data
    keep = ids < 35 * 3
    order = np.random.default_rng(1).permutation(int(keep.sum()))
    return vecs[keep][order], ids[keep][order]


# -- sharded index ----------------------------------------------------------------------


def test_sharded_search_equals_index_search(cluster, data, index):
    qvecs, qids = _queries(data)
    with ShardedIndex.from_index(index, 3, num_cpus=0.5) as sharded:
        assert (sharded.n_shards, len(sharded)) == (3, len(index))
        for k in (1, 10, None, len(index) + 4):
            _assert_same_result(sharded.search(qvecs, qids, k=k), index.search(qvecs, qids, k=k))
        lists = [qvecs[qids == i] for i in (9, 0, 150)]
        _assert_same_result(sharded.search(lists, None, k=7), index.search(lists, None, k=7))


def test_shards_save_load_and_errors(cluster, data, index, tmp_path):
    qvecs, qids = _queries(data)
    expected = index.search(qvecs, qids, k=12)
    save_shards(index, tmp_path / "a", 2)
    with ShardedIndex.load(tmp_path / "a") as sharded:
        _assert_same_result(sharded.search(qvecs, qids, k=12), expected)
        sharded.save(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary left
    manifest = json.loads((tmp_path / "b" / "shards.json").read_text())
    assert [s["images"] for s in manifest["shards"]] == [29, 30]
    with ShardedIndex.load(tmp_path / "b") as sharded:
        _assert_same_result(sharded.search(qvecs, qids, k=12), expected)

    shutil.rmtree(tmp_path / "b" / "shard-00001")
    with pytest.raises(StorageError, match="shard-00001: shard missing"):
        ShardedIndex.load(tmp_path / "b")

    norms = tmp_path / "a" / "shard-00001" / "norms.npy"
    raw = bytearray(norms.read_bytes())
    raw[-1] ^= 0xFF
    norms.write_bytes(bytes(raw))
    with pytest.raises(StorageError, match=r"shard-00001/norms\.npy: SHA-256 mismatch"):
        ShardedIndex.load(tmp_path / "a")

    # A shard replaced by another one of the same index.
    shutil.rmtree(tmp_path / "a")
    save_shards(index, tmp_path / "a", 2)
    shutil.rmtree(tmp_path / "a" / "shard-00000")
    shutil.copytree(tmp_path / "a" / "shard-00001", tmp_path / "a" / "shard-00000")
    with pytest.raises(StorageError, match="shard-00000: holds 30 images"):
        ShardedIndex.load(tmp_path / "a")


# -- all-vs-all top-k ---------------------------------------------------------------------


def test_scores_topk_equals_index_search(cluster, data, index, tmp_path):
    vecs, ids, _ = data
    expected = index.search(vecs, ids, k=5)
    _assert_same_result(scores_topk(index, vecs, ids, 5, block=7, progress=False), expected)

    index.save(tmp_path / "index")
    out = tmp_path / "topk.npz"
    _assert_same_result(scores_topk(tmp_path / "index", vecs, ids, 5, block=16, out=out, progress=False), expected)
    with np.load(out) as saved:
        _assert_same_result((saved["scores"], saved["ids"]), expected)

    # Query-side aggregates (what build_index(..., queries=True) sends back) give the same.
    aggregates = aggregate_images(index.codebook, vecs, ids, PARAMS, side="query")
    _assert_same_result(scores_topk(index, aggregates, None, 5, block=9, progress=False), expected)

    # Each block on each shard actor, merged with merge_topk.
    save_shards(index, tmp_path / "sharded", 2)
    _assert_same_result(scores_topk(tmp_path / "sharded", aggregates, None, 5, block=25, progress=False), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "sharded", "topk.npz"]

    # The same top-k as the all-vs-all matrix of the scores command.
    _assert_same_result(similarity_matrix(index.codebook, vecs, ids, PARAMS, k=5), expected)

    whole = index.search(vecs, ids, k=None)
    got = scores_topk(index, vecs, ids, None, block=50, progress=False)
    _assert_same_result(got, whole)
    assert got[0].shape == (len(index), len(index))


def _tied_data():
    """float32 [600, 128] centroids, and [N, 128] descriptors of 6 images (ids [N]) with
    rows half-way between two words: faiss's word for them depends on its thread count."""
    rng = np.random.default_rng(81)
    sizes = [1200, 300, 1000, 40, 500, 1500]
    basis, _ = np.linalg.qr(rng.standard_normal((128, 128)))
    spread = 0.85 ** np.arange(128)
    centroids = ((rng.standard_normal((600, 128)) * spread) @ basis.T).astype(np.float32)
    vecs = ((rng.standard_normal((sum(sizes), 128)) * spread) @ basis.T).astype(np.float32)
    near = rng.choice(len(vecs), 1200, replace=False)
    vecs[near] = 0.5 * (centroids[rng.integers(0, 600, 1200)] + centroids[rng.integers(0, 600, 1200)])
    return centroids, vecs, np.repeat(np.arange(len(sizes)), sizes)


def test_workers_settle_ties_on_the_drivers_thread_count(cluster):
    centroids, vecs, labels = _tied_data()
    before = quantizer.settle_threads()
    # Not the workers' own default (Ray runs them on one faiss thread).
    quantizer.set_settle_threads(2)
    try:
        assert ray.get(distributed.remote_task(quantizer.settle_threads).remote()) == 2
        index = Index(Codebook(centroids), Params(ma_query=1, topk=None))
        index.add(vecs, labels)
        expected = index.search(vecs, labels, k=None)
        _assert_same_result(scores_topk(index, vecs, labels, None, block=2, progress=False), expected)
        with ShardedIndex.from_index(index, 2, num_cpus=0.5) as sharded:
            _assert_same_result(sharded.search(vecs, labels, k=None), expected)
    finally:
        quantizer.set_settle_threads(before)


# -- build on the workers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """24 textured 96 x 96 PNGs in two folders, and one file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(11)
    paths = []
    for i in range(N_IMAGES):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        noise = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
        image = cv2.resize(noise, (96, 96), interpolation=cv2.INTER_CUBIC)
        path = folder / f"img{i:02d}.png"
        cv2.imwrite(str(path), image)
        paths.append(path)
    broken = root / "a" / "broken.jpg"
    broken.write_bytes(b"not an image")
    paths.insert(5, broken)
    return root, paths


def _sift():
    return SiftExtractor(max_features=60)


def _single_process(paths, root, codebook, start=0):
    """The index of ``paths`` built in this process, the failed images, and the
    descriptors of the indexed ones."""
    result = extract_features(paths, _sift(), root=root, progress=False)
    names = result.extracted
    vecs = [result.features[n].descriptors for n in names]
    index = Index(codebook, PARAMS)
    index.add(vecs, start + np.arange(len(names)), keys=names)
    return index, result.failed, vecs


def _assert_same_index(got: Index, expected: Index):
    assert got.keys == expected.keys
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_array_equal(got.idf, expected.idf)
    np.testing.assert_array_equal(got.norms, expected.norms)
    ivf, ref = got.inverted_file, expected.inverted_file
    for name in ("offsets", "slots", "data"):
        np.testing.assert_array_equal(getattr(ivf, name), getattr(ref, name))


@pytest.fixture(scope="module")
def codebook(images):
    root, paths = images
    result = extract_features(paths, _sift(), root=root, progress=False)
    vecs = np.concatenate([f.descriptors for f in result.features.values()])
    return Codebook.train(vecs, 32, seed=5)


def test_build_index_equals_single_process(cluster, images, codebook, tmp_path, capsys):
    root, paths = images
    expected, failed, vecs = _single_process(paths, root, codebook, start=100)
    build = build_index(
        paths,
        _sift,
        codebook,
        PARAMS,
        root=root,
        start=100,
        batch_size=5,
        progress=True,
        out=tmp_path / "index",
        queries=True,
    )
    # One bar on the driver, counting images as the batches come back.
    err = capsys.readouterr().err
    assert "index: 100%" in err and f"{len(paths)}/{len(paths)}" in err
    assert build.failed == failed and [name for name, _ in failed] == ["a/broken.jpg"]
    assert not build.codebook_trained
    _assert_same_index(build.index, expected)
    _assert_same_index(Index.load(tmp_path / "index"), expected)
    # All-vs-all from the aggregates the workers sent back, without a second extraction.
    _assert_same_result(
        scores_topk(build.index, build.queries, None, 6, progress=False), expected.search(vecs, None, k=6)
    )


def test_build_index_trains_codebook_on_sample(cluster, images):
    root, paths = images
    build = build_index(
        paths, _sift, None, PARAMS.replace(codebook_size=16), root=root, sample=10, seed=4, batch_size=4, progress=False
    )
    assert build.codebook_trained
    chosen = np.sort(np.random.default_rng(4).choice(len(paths), size=10, replace=False))
    local = extract_features([paths[i] for i in chosen], _sift(), root=root, progress=False)
    vecs = np.concatenate([local.features[n].descriptors for n in local.extracted])
    np.testing.assert_array_equal(
        sample_descriptors([paths[i] for i in chosen], _sift, root=root, workers=1, progress=False), vecs
    )
    trained = Codebook.train(vecs, 16, iters=PARAMS.kmeans_iters, seed=PARAMS.seed)
    np.testing.assert_array_equal(build.index.codebook.centroids, trained.centroids)
    _assert_same_index(build.index, _single_process(paths, root, trained)[0])
    assert build.queries is None


def test_images_through_symbolic_links_keep_their_names(cluster, images, codebook, tmp_path):
    _, paths = images
    links = tmp_path / "links"
    links.mkdir()
    linked = []
    for path in [p for p in paths if p.suffix == ".png"][:3]:
        linked.append(links / path.name)
        linked[-1].symlink_to(path)
    build = build_index(linked, _sift, codebook, PARAMS, root=links, progress=False)
    assert build.index.keys == [p.name for p in linked]
    _assert_same_index(build.index, _single_process(linked, links, codebook)[0])


# -- faults ----------------------------------------------------------------------------------


class _DyingSift(SiftExtractor):
    """SIFT whose process kills itself (SIGKILL) on its first image when ``marker`` does
    not exist yet (it creates it, so that exactly one attempt dies), or always."""

    def __init__(self, marker: str | None, always: bool = False) -> None:
        super().__init__(max_features=60)
        self.marker, self.always = marker, always

    def extract(self, image):
        if self.always:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return super().extract(image)
        os.kill(os.getpid(), signal.SIGKILL)


class _DyingFactory:
    def __init__(self, marker: str | None, always: bool = False) -> None:
        self.marker, self.always = marker, always

    def __call__(self) -> _DyingSift:
        return _DyingSift(self.marker, self.always)


def test_killed_worker_is_retried_and_the_index_is_identical(cluster, images, codebook, tmp_path):
    root, paths = images
    marker = tmp_path / "killed-once"
    build = build_index(
        paths,
        _DyingFactory(str(marker)),
        codebook,
        PARAMS,
        root=root,
        batch_size=6,
        progress=False,
        max_retries=2,
        out=tmp_path / "index",
    )
    assert marker.exists()  # a worker did die
    expected, failed, _ = _single_process(paths, root, codebook)
    assert build.failed == failed
    _assert_same_index(build.index, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "killed-once"]


def test_workers_that_always_die_leave_no_output(cluster, images, codebook, tmp_path):
    root, paths = images
    with pytest.raises(ray.exceptions.RayActorError):
        build_index(
            paths[:4],
            _DyingFactory(None, always=True),
            codebook,
            PARAMS,
            root=root,
            batch_size=2,
            workers=1,
            progress=False,
            max_retries=1,
            out=tmp_path / "index",
        )
    assert list(tmp_path.iterdir()) == []


# -- errors --------------------------------------------------------------------------------


def test_unreachable_cluster_fails_within_the_timeout():
    # In a fresh process: this one is already connected, and connect() reuses that.
    code = "from asmkit.distributed import connect\nconnect('127.0.0.1:1', timeout=2)\n"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 1
    assert "ClusterUnreachableError: ray address 127.0.0.1:1: no Ray cluster answers within 2 s" in proc.stderr
    assert elapsed < 30  # ray.init alone retries this address for minutes


def test_bad_address_is_an_argument_error(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ArgumentError, match="address: expected host:port"):
        distributed.connect("no-port-here")


def test_ray_missing_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    for call in (
        distributed.require_ray,
        distributed.connect,
        lambda: scores_topk(None, np.zeros((1, 4), np.float32), [0], 1),
    ):
        with pytest.raises(RayNotInstalledError, match=r"pip install 'asmkit\[ray\]'"):
            call()
    assert issubclass(RayNotInstalledError, AsmkitError) and issubclass(RayNotInstalledError, ImportError)
    assert issubclass(ClusterUnreachableError, AsmkitError)
