"""asmkit against the reference ``asmk`` package: same descriptors, same codebook, one run.

Each side runs in its own subprocess, so each side's peak RSS (``ru_maxrss``) is its own;
the input descriptors are loaded by both, and the RSS right after loading them is printed
too, so the pipeline's own share is the difference.

Usage (from the repository root)::

    python -m benchmarks.bench_reference --synthetic 1000 --per-image 500 --codebook-size 1024 \
        --ref-queries 250
    python -m benchmarks.bench_reference --data ../shared/datasets/ukbench2000 --per-image 1000 \
        --codebook-size 4096 --ref-queries 200
    python -m benchmarks.bench_reference --load-test 5000

Stages (both sides):
- codebook: k-means (10 iterations) on ``--train-sample`` descriptors. Each side trains its
  own and is timed; then both use the reference's centroids, so the rest is comparable.
- build: quantization (m = 1), aggregation and inverted-file construction of all images.
- query: every image is a query (UKBench protocol; for synthetic data too). The reference is
  slow (tens of ms per query), so ``--ref-queries N`` times it on N evenly spaced queries;
  asmkit is timed on all queries in one batched call (``query_ms``, split into quantize /
  aggregate / search by calling those building blocks separately), and on the same N
  queries one image per call (``query_single_ms``), whose results are compared with the
  reference's.
- memory: peak RSS of each side's process (``peak_rss_mb``, ru_maxrss), RSS after imports
  and after loading the inputs, and the peak RSS above the entry RSS during build and query
  (``*_peak_extra_mb``; Linux VmHWM, reset per stage through /proc/self/clear_refs).
- asmkit first runs every code path on tiny data and the build once on the real data,
  untimed (``warmup_s``), so that numba compilation and the first calls of faiss and of
  the thread pools are not charged to the timed stages. ``build_cpu_s``: the build's
  process CPU time (all threads), a ratio less sensitive than the wall time to other jobs.
- save / load (memory-mapped for asmkit, pickle for the reference) and the first query's
  latency after loading.
- ``--gpu N``: asmkit quantizes on GPU N (``Codebook(..., gpu=N)``), the reference on the
  CPU; asmkit's RSS then includes torch and its CUDA context.
  ``benchmarks/gpu_check.sh`` (``REFERENCE=1``) runs this on a GPU machine.
- ``--load-test N``: asmkit only; a saved synthetic index of N images is opened in a fresh
  process (``Index.load``, memory-mapped, with and without checksums) and queried twice.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import (
    StagePeak,
    add_data_args,
    add_run_args,
    aggregate_all,
    command_line,
    evenly_spaced,
    load_data,
    machine_info,
    max_rss_mib,
    reference_codebook,
    sample_rows,
    status_mib,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]


# -- inputs -----------------------------------------------------------------------------------


def prepare_inputs(args, work: Path) -> dict:
    data = load_data(args)
    vecs, image_ids = data.vecs, data.image_ids
    n_images = int(image_ids.max()) + 1
    ref_queries = evenly_spaced(np.arange(n_images, dtype=np.int64), args.ref_queries)
    train = sample_rows(vecs, args.train_sample, args.seed)
    np.save(work / "vecs.npy", vecs)
    np.save(work / "image_ids.npy", image_ids)
    np.save(work / "train.npy", train)
    np.save(work / "ref_queries.npy", ref_queries)
    return {
        "source": data.source,
        "n_descriptors": int(len(vecs)),
        "n_images": n_images,
        "dim": int(vecs.shape[1]),
        "train_sample": int(len(train)),
        "group_size": data.group_size,
        "ref_queries": int(len(ref_queries)),
    }


# -- workers (one per side, in a subprocess) -------------------------------------------------


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _select_rows(image_ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isin(image_ids, wanted))


def worker_reference(work: Path, cfg: dict) -> dict:
    from asmk import codebook as cdb_pkg
    from asmk import index as idx_pkg
    from asmk import inverted_file as ivf_pkg
    from asmk import kernel as kern_pkg

    imports_mb = status_mib("VmRSS")
    vecs = np.load(work / "vecs.npy")
    image_ids = np.load(work / "image_ids.npy")
    train = np.load(work / "train.npy")
    ref_queries = np.load(work / "ref_queries.npy")
    out: dict = {"rss_after_imports_mb": imports_mb, "rss_after_inputs_mb": status_mib("VmRSS")}
    k = cfg["codebook_size"]

    t = time.perf_counter()
    trained = cdb_pkg.Codebook(idx_pkg.FaissL2Index(), size=k)
    trained.train(train)
    out["codebook_s"] = time.perf_counter() - t
    np.save(work / "centroids.npy", trained.centroids)
    del trained

    cdb = reference_codebook(np.load(work / "centroids.npy"))
    kern = kern_pkg.ASMKKernel(cdb, binary=cfg["binary"])
    ivf = ivf_pkg.IVF.initialize_empty(codebook_size=k, use_idf=cfg["idf"])

    with StagePeak() as peak:
        cpu = time.process_time()
        t = time.perf_counter()
        des, words = cdb.quantize(vecs, multiple_assignment=1)[:2]
        out["build_quantize_s"] = time.perf_counter() - t
        t = time.perf_counter()
        agg = kern.aggregate(des, words, image_ids.copy())
        out["build_aggregate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ivf.add(*agg)
        out["build_ivf_s"] = time.perf_counter() - t
        out["build_cpu_s"] = time.process_time() - cpu
        del agg, des, words
    out["build_s"] = out["build_quantize_s"] + out["build_aggregate_s"] + out["build_ivf_s"]
    out["build_peak_extra_mb"] = peak.extra_mb

    sim = {"alpha": cfg["alpha"], "similarity_threshold": cfg["tau"]}
    similarity = lambda *x: kern.similarity(*x, **sim)  # noqa: E731 - the reference's calling shape
    order = np.argsort(image_ids, kind="stable")
    sorted_ids = image_ids[order]
    bounds = np.searchsorted(sorted_ids, np.stack([ref_queries, ref_queries + 1]))
    tq = ta = ts = 0.0
    ranks_all, scores_all = [], []
    with StagePeak() as peak:
        for _q, (lo, hi) in enumerate(bounds.T):
            qv = vecs[order[lo:hi]]
            t0 = time.perf_counter()
            _, qw = cdb.quantize(qv, multiple_assignment=cfg["ma_query"])[:2]
            t1 = time.perf_counter()
            qa, qwords = kern.aggregate_image(qv, qw)
            t2 = time.perf_counter()
            ranks, scores = ivf.search(qa, qwords, similarity_func=similarity, topk=None)
            t3 = time.perf_counter()
            tq, ta, ts = tq + t1 - t0, ta + t2 - t1, ts + t3 - t2
            ranks_all.append(ranks)
            scores_all.append(scores)
    out["query_peak_extra_mb"] = peak.extra_mb
    nq = len(ref_queries)
    out.update(
        query_quantize_ms=1e3 * tq / nq,
        query_aggregate_ms=1e3 * ta / nq,
        query_search_ms=1e3 * ts / nq,
        query_ms=1e3 * (tq + ta + ts) / nq,
        query_single_ms=1e3 * (tq + ta + ts) / nq,
        queries_timed=int(nq),
    )
    ranks_all, scores_all = np.vstack(ranks_all), np.vstack(scores_all)
    # Full score vector per query (ids 0 .. n-1), for the tie-aware rank comparison.
    full = np.zeros_like(scores_all)
    np.put_along_axis(full, ranks_all, scores_all, axis=1)
    np.save(work / "ref_full_scores.npy", full)

    # Save / load: the reference's own format (pickled state dicts).
    path = work / "ref_ivf.pkl"
    t = time.perf_counter()
    with open(path, "wb") as fh:
        pickle.dump(ivf.state_dict(), fh)
    out["save_s"] = time.perf_counter() - t
    out["index_bytes_per_image"] = path.stat().st_size / cfg["n_images"]
    del ivf
    t = time.perf_counter()
    with open(path, "rb") as fh:
        loaded = ivf_pkg.IVF.initialize_from_state(pickle.load(fh))  # noqa: S301 - our own file
    out["load_s"] = time.perf_counter() - t
    lo, hi = bounds[:, 0]
    qv = vecs[order[lo:hi]]
    t = time.perf_counter()
    _, qw = cdb.quantize(qv, multiple_assignment=cfg["ma_query"])[:2]
    loaded.search(*kern.aggregate_image(qv, qw), similarity_func=similarity, topk=None)
    out["first_query_after_load_ms"] = 1e3 * (time.perf_counter() - t)
    out["peak_rss_mb"] = max_rss_mib()
    return out


def warm_up_asmkit(work: Path, cfg: dict) -> float:
    """Run every code path once on tiny data, and the build on the real data, so that numba
    compilation (cached on disk after the first run ever) and first calls are not charged
    to the timed stages. Returns the seconds it took."""
    from asmkit import Codebook, Index, Params
    from asmkit import kernel as akernel
    from asmkit import search as asearch
    from asmkit._synthetic import clustered_descriptors

    t = time.perf_counter()
    vecs, ids, _ = clustered_descriptors(8, 40, cfg["dim"], seed=1)
    index = Index(Codebook(vecs[:16]), Params(codebook_size=16, binary=cfg["binary"], use_idf=cfg["idf"]))
    index.add(vecs, ids)
    index.search(vecs, ids, k=5)
    index.save(work / "warmup.asmkit")
    Index.load(work / "warmup.asmkit", mmap=True).search(vecs, ids, k=5)
    shutil.rmtree(work / "warmup.asmkit")
    # The word-major scoring kernel, which "auto" picks only for large inverted files.
    desc = akernel.prepare_descriptors(vecs, ids, dim=cfg["dim"])
    queries = aggregate_all(index.codebook, desc, index.codebook.quantize(desc.vecs, 3), cfg["binary"])
    asearch.score_aggregates(
        index.inverted_file,
        index.idf,
        np.sqrt(index.norms),
        index.ids,
        queries,
        index.params,
        dim=cfg["dim"],
        k=5,
        order="word",
    )
    # The timed build itself, once, untimed: the benchmark's own codebook (written by the
    # reference worker) on all the descriptors. What a 16-word codebook and a few rows leave
    # out (the pruned quantizer, the numba kernels at this size, faiss's and the thread
    # pools' first calls on full blocks) is paid here. The timed build gets a Codebook of
    # its own, so the codebook's own preparation (the pruned bound's axes and tables) stays
    # in the timed build, as it would in any process that builds an index.
    book = Codebook(np.load(work / "centroids.npy"), gpu=cfg.get("gpu"))
    Index(book, bench_params(cfg)).add(np.load(work / "vecs.npy"), np.load(work / "image_ids.npy"))
    # The query side's multiple assignment on more than one faiss BLAS block of rows (a
    # smaller segment Codebook would hand to faiss directly).
    rows = np.array(np.load(work / "vecs.npy", mmap_mode="r")[:5000])  # writable, as Index.add gets it
    book.quantize(rows, cfg["ma_query"], segments=np.array([0, len(rows)]), nearest_first=False)
    return time.perf_counter() - t


def bench_params(cfg: dict):
    """The benchmark's ASMK parameters (database MA 1)."""
    from asmkit import Params

    return Params(
        codebook_size=cfg["codebook_size"],
        binary=cfg["binary"],
        use_idf=cfg["idf"],
        alpha=cfg["alpha"],
        tau=cfg["tau"],
        ma_database=1,
        ma_query=cfg["ma_query"],
    )


def worker_asmkit(work: Path, cfg: dict) -> dict:
    import asmkit
    from asmkit import Codebook, Index
    from asmkit import kernel as akernel
    from asmkit import search as asearch
    from asmkit.ivf import InvertedFile, compute_idf, image_norms

    out: dict = {"version": asmkit.__version__, "rss_after_imports_mb": status_mib("VmRSS")}
    out["warmup_s"] = warm_up_asmkit(work, cfg)
    out["rss_after_warmup_mb"] = status_mib("VmRSS")
    vecs = np.load(work / "vecs.npy")
    image_ids = np.load(work / "image_ids.npy")
    train = np.load(work / "train.npy")
    ref_queries = np.load(work / "ref_queries.npy")
    out["rss_after_inputs_mb"] = status_mib("VmRSS")
    params = bench_params(cfg)

    t = time.perf_counter()
    Codebook.train(train, cfg["codebook_size"], iters=10, seed=cfg["seed"])
    out["codebook_s"] = time.perf_counter() - t
    cb = Codebook(np.load(work / "centroids.npy"), gpu=cfg.get("gpu"))

    index = Index(cb, params)
    with StagePeak() as peak:
        t, cpu = time.perf_counter(), time.process_time()
        index.add(vecs, image_ids)
        out["build_s"] = time.perf_counter() - t
        out["build_cpu_s"] = time.process_time() - cpu
    out["build_peak_extra_mb"] = peak.extra_mb

    # Stage split, measured by calling the public building blocks Index.add and
    # Index.search are made of, one at a time (the sums come close to the totals above).
    t = time.perf_counter()
    desc = akernel.prepare_descriptors(vecs, image_ids, dim=cb.dim)
    assign = cb.quantize(desc.vecs, 1)
    out["build_quantize_s"] = time.perf_counter() - t
    t = time.perf_counter()
    aggs = aggregate_all(cb, desc, assign, params.binary)
    out["build_aggregate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ivf = InvertedFile.from_aggregates(aggs, np.arange(desc.n_images, dtype=np.int64), cb.size)
    idf = compute_idf(ivf.counts, desc.n_images, params.use_idf)
    sqrt_norms = np.sqrt(image_norms(ivf, idf, desc.n_images))
    out["build_ivf_s"] = time.perf_counter() - t
    del aggs, assign
    out["stats"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in dict(index.stats).items()}

    # All queries at once (the public call), then the same split as above.
    with StagePeak() as peak:
        t = time.perf_counter()
        index.search(vecs, image_ids, k=100)
        total = time.perf_counter() - t
    out["query_peak_extra_mb"] = peak.extra_mb
    n_images = cfg["n_images"]
    out.update(query_total_s=total, query_ms=1e3 * total / n_images, queries_timed=int(n_images))
    t = time.perf_counter()
    qassign = cb.quantize(desc.vecs, cfg["ma_query"])
    out["query_quantize_ms"] = 1e3 * (time.perf_counter() - t) / n_images
    t = time.perf_counter()
    queries = aggregate_all(cb, desc, qassign, params.binary)
    out["query_aggregate_ms"] = 1e3 * (time.perf_counter() - t) / n_images
    del qassign
    t = time.perf_counter()
    asearch.score_aggregates(ivf, idf, sqrt_norms, desc.image_ids, queries, params, dim=cb.dim, k=100)
    out["query_search_ms"] = 1e3 * (time.perf_counter() - t) / n_images
    del desc, queries, ivf

    # The reference's query subset, one image per call as the reference runs them: this is
    # the single-query latency, and it quantizes each query in a faiss call of the same
    # shape as the reference's. (faiss's blocked distance computation rounds differently
    # for different batch shapes, which can flip near-tied m-th nearest words; the batched
    # search above is not used for the rank comparison for that reason.)
    order = np.argsort(image_ids, kind="stable")
    bounds = np.searchsorted(image_ids[order], np.stack([ref_queries, ref_queries + 1]))
    scores, ids = [], []
    t = time.perf_counter()
    for lo, hi in bounds.T:
        rows = order[lo:hi]
        s_q, i_q = index.search(vecs[rows], image_ids[rows], k=100)
        scores.append(s_q)
        ids.append(i_q)
    out["query_single_ms"] = 1e3 * (time.perf_counter() - t) / len(ref_queries)
    np.save(work / "asmkit_scores.npy", np.vstack(scores))
    np.save(work / "asmkit_ids.npy", np.vstack(ids))

    path = work / "asmkit_index.asmkit"
    t = time.perf_counter()
    index.save(path)
    out["save_s"] = time.perf_counter() - t
    out["index_bytes_per_image"] = _dir_bytes(path) / n_images
    del index
    t = time.perf_counter()
    loaded = Index.load(path, mmap=True)
    out["load_s"] = time.perf_counter() - t
    first = _select_rows(image_ids, ref_queries[:1])
    t = time.perf_counter()
    loaded.search(vecs[first], image_ids[first], k=100)
    out["first_query_after_load_ms"] = 1e3 * (time.perf_counter() - t)
    out["peak_rss_mb"] = max_rss_mib()
    return out


def load_test(n_images: int, args) -> dict:
    """asmkit only: build an ``n_images`` index in chunks, save it, and time ``Index.load``
    (memory-mapped, with and without checksum verification) and the first query in a fresh
    process, as a user opening a saved index would."""
    from asmkit import Codebook, Index, Params
    from asmkit._synthetic import clustered_descriptors

    work = Path(tempfile.mkdtemp(prefix="asmkit_loadtest_"))
    try:
        chunk = 500
        first, _, _ = clustered_descriptors(chunk, args.per_image, args.dim, seed=args.seed)
        cb = Codebook.train(first[:: max(1, len(first) // args.train_sample)], args.codebook_size, iters=10)
        index = Index(cb, Params(codebook_size=args.codebook_size, binary=args.binary, use_idf=args.idf))
        t = time.perf_counter()
        for begin in range(0, n_images, chunk):
            vecs, ids, _ = clustered_descriptors(
                min(chunk, n_images - begin), args.per_image, args.dim, seed=args.seed + begin
            )
            index.add(vecs, ids + begin)
        build_s = time.perf_counter() - t
        path = work / "load_test.asmkit"
        index.save(path)
        np.save(work / "query.npy", vecs[ids == ids[0]])
        code = (
            "import sys, time, json, numpy as np\n"
            "t0 = time.perf_counter(); from asmkit import Index; imp = time.perf_counter() - t0\n"
            "res = {'import_s': imp}\n"
            "for verify in (True, False):\n"
            "    t = time.perf_counter(); idx = Index.load(sys.argv[1], mmap=True, verify=verify)\n"
            "    res[f'load_s_verify_{verify}'] = time.perf_counter() - t\n"
            "q = np.load(sys.argv[2])\n"
            "t = time.perf_counter(); idx.search(q, np.zeros(len(q), np.int64), k=100)\n"
            "res['first_query_ms'] = 1e3 * (time.perf_counter() - t)\n"
            "t = time.perf_counter(); idx.search(q, np.zeros(len(q), np.int64), k=100)\n"
            "res['second_query_ms'] = 1e3 * (time.perf_counter() - t)\n"
            "print(json.dumps(res))\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, str(path), str(work / "query.npy")],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result.update(
            images=len(index),
            build_s=build_s,
            index_bytes=_dir_bytes(path),
            features_per_image=args.per_image,
            codebook_size=args.codebook_size,
        )
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- comparison and report ---------------------------------------------------------------------


def compare_ranks(work: Path, ref_queries: np.ndarray, tie_tol: float = 1e-6) -> dict:
    """Top-100 agreement up to exact ties, and the largest score difference.

    Position j agrees when asmkit's id there has (within ``tie_tol``) the reference score
    that the reference's own j-th result has: then the two lists differ only by the order
    of equal scores.
    """
    full = np.load(work / "ref_full_scores.npy")
    a_scores = np.load(work / "asmkit_scores.npy").astype(np.float64)
    k = min(a_scores.shape[1], full.shape[1])
    a_scores, a_ids = a_scores[:, :k], np.load(work / "asmkit_ids.npy")[:, :k]
    ref_sorted = -np.sort(-full, axis=1)[:, :k]
    valid = a_ids >= 0
    ref_of_asm = np.where(valid, np.take_along_axis(full, np.where(valid, a_ids, 0), axis=1), np.nan)
    agree = np.abs(ref_of_asm - ref_sorted) <= tie_tol
    agree &= valid | (ref_sorted == 0)
    return {
        "queries_compared": int(len(ref_queries)),
        "top100_identical_up_to_ties": bool(agree.all()),
        "top100_queries_identical_fraction": float(agree.all(axis=1).mean()),
        "top100_positions_agreeing_fraction": float(agree.mean()),
        "max_abs_score_diff": float(np.nanmax(np.abs(np.where(valid, a_scores - ref_of_asm, 0.0)))),
    }


def ns_score(full_or_ids: np.ndarray, queries: np.ndarray, group_size: int, from_scores: bool) -> float:
    """UKBench N-S: mean number of the query's group among its top 4 (query included)."""
    top = np.argsort(-full_or_ids, axis=1, kind="stable")[:, :4] if from_scores else full_or_ids[:, :4]
    return float(((top // group_size) == (queries[:, None] // group_size)).sum(axis=1).mean())


RATIO_KEYS = [
    "codebook_s",
    "build_quantize_s",
    "build_aggregate_s",
    "build_ivf_s",
    "build_s",
    "build_cpu_s",
    "query_quantize_ms",
    "query_aggregate_ms",
    "query_search_ms",
    "query_ms",
    "query_single_ms",
    "save_s",
    "load_s",
    "first_query_after_load_ms",
    "index_bytes_per_image",
    "rss_after_imports_mb",
    "rss_after_inputs_mb",
    "build_peak_extra_mb",
    "query_peak_extra_mb",
    "peak_rss_mb",
]


def run_side(side: str, work: Path, cfg: dict) -> dict:
    # The worker runs this module again (cwd: the repository root, so that ``benchmarks`` imports).
    cmd = [sys.executable, "-m", "benchmarks.bench_reference", "--worker", side, "--work", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads((work / f"{side}.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(parser, synthetic=1000, per_image=500)
    add_run_args(parser, repeat=None)
    parser.add_argument("--codebook-size", type=int, default=1024)
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--binary", dest="binary", action="store_true", default=True, help="ASMK* (default)")
    kind.add_argument("--real", dest="binary", action="store_false", help="real-valued ASMK")
    parser.add_argument("--idf", action="store_true")
    parser.add_argument("--alpha", type=float, default=3.0)
    parser.add_argument("--tau", type=float, default=0.0)
    parser.add_argument("--ma-query", type=int, default=5)
    parser.add_argument(
        "--train-sample", type=int, default=100_000, help="descriptors sampled for k-means (both sides)"
    )
    parser.add_argument(
        "--ref-queries", type=int, default=None, help="time the reference (and compare ranks) on this many queries only"
    )
    parser.add_argument(
        "--gpu",
        type=int,
        default=None,
        help="asmkit quantizes on this GPU (Codebook(..., gpu=N)); the reference stays on the CPU",
    )
    parser.add_argument(
        "--load-test",
        type=int,
        metavar="N_IMAGES",
        help="asmkit only: time loading a saved synthetic index of N images",
    )
    parser.add_argument("--worker", choices=["reference", "asmkit"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        work = Path(args.work)
        cfg = json.loads((work / "config.json").read_text())
        fn = worker_reference if args.worker == "reference" else worker_asmkit
        (work / f"{args.worker}.json").write_text(json.dumps(fn(work, cfg)))
        return 0
    if args.load_test:
        result = load_test(args.load_test, args)
        print(json.dumps(result, indent=1))
        write_json(args.out, {"command": command_line(), "machine": machine_info(), **result})
        return 0

    work = Path(tempfile.mkdtemp(prefix="asmkit_bench_"))
    try:
        inputs = prepare_inputs(args, work)
        cfg = {
            "codebook_size": args.codebook_size,
            "binary": args.binary,
            "idf": args.idf,
            "alpha": args.alpha,
            "tau": args.tau,
            "ma_query": args.ma_query,
            "seed": args.seed,
            "gpu": args.gpu,
            **inputs,
        }
        (work / "config.json").write_text(json.dumps(cfg))
        ref = run_side("reference", work, cfg)
        ours = run_side("asmkit", work, cfg)
        ref_queries = np.load(work / "ref_queries.npy")
        agreement = compare_ranks(work, ref_queries)
        agreement["ns_reference"] = ns_score(
            np.load(work / "ref_full_scores.npy"), ref_queries, inputs["group_size"], from_scores=True
        )
        agreement["ns_asmkit"] = ns_score(
            np.load(work / "asmkit_ids.npy"), ref_queries, inputs["group_size"], from_scores=False
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratios = {k: ref[k] / ours[k] for k in RATIO_KEYS if k in ref and k in ours and ours[k] > 0}
    ratios["aggregate_plus_search_query"] = (ref["query_aggregate_ms"] + ref["query_search_ms"]) / max(
        ours["query_aggregate_ms"] + ours["query_search_ms"], 1e-9
    )
    result = {
        "command": command_line(),
        "config": cfg,
        "machine": machine_info(gpu=args.gpu is not None),
        "reference": ref,
        "asmkit": ours,
        "speedup_reference_over_asmkit": ratios,
        "agreement": agreement,
    }

    print(
        f"# {cfg['source']}; K={cfg['codebook_size']}, {'binary' if cfg['binary'] else 'real'}, "
        f"idf={'on' if cfg['idf'] else 'off'}, {cfg['n_descriptors']} descriptors"
    )
    print(
        f"# machine: {result['machine']['cpu_model']}, {result['machine']['cores']} cores, "
        f"faiss threads {result['machine']['faiss_threads']}; "
        + ("GPU not measured" if args.gpu is None else f"asmkit on GPU {args.gpu}, the reference on the CPU")
    )
    print(f"# reference timed on {ref['queries_timed']} queries, asmkit on {ours['queries_timed']}")
    print(f"{'stage':<28}{'reference':>14}{'asmkit':>14}{'ratio':>10}")
    for key in RATIO_KEYS:
        if key in ref and key in ours:
            ratio = ratios.get(key, float("nan"))
            print(f"{key:<28}{ref[key]:>14.4g}{ours[key]:>14.4g}{ratio:>9.1f}x")
    print(f"{'aggregate+search per query':<28}{'':>14}{'':>14}{ratios['aggregate_plus_search_query']:>9.1f}x")
    for key, value in agreement.items():
        print(f"{key}: {value}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
