"""All-vs-all ASMK score matrix: ``asmkit.search.similarity_matrix`` against the reference
``asmk`` pipeline (``ASMKMethod.build_ivf`` + ``query_ivf`` over every image), on the same
descriptors and ONE codebook trained here (its training is excluded from every timing).

What is timed:

- **asmkit, end to end**: one ``similarity_matrix(codebook, vecs, image_ids, params)`` call
  (quantize every descriptor once with m = max(MA), database = column 0, aggregate and
  score query chunks). Its peak RSS above the RSS at entry is measured by resetting the
  kernel's high-water mark (``/proc/self/clear_refs``), so it is this call's own peak; the
  dense float32 [I, I] result is part of it and reported separately.
- **asmkit, per stage** (``--stages``): quantize, build, query aggregation, and scoring with
  the query-major and the word-major kernel (minimum over ``--repeat``, same process), with
  their results checked bit-identical.
- **reference**: ``build_ivf(vecs, image_ids)`` on all images, and ``query_ivf`` on
  ``--ref-queries`` evenly spaced images; the query time is EXTRAPOLATED linearly to all
  images (the reference handles queries one image at a time, so its time is linear in the
  number of queries). The compared rows of asmkit's matrix are checked against the
  reference's scores (its ranks + scores scattered into dense rows).

Examples::

    nice -n 10 .venv/bin/python benchmarks/bench_scores.py \\
        --descriptors /tmp/ukbench_rootsift_ukbench2000_1000.npz --codebook-size 4096 --ref-queries 100
    nice -n 10 .venv/bin/python benchmarks/bench_scores.py --synthetic 20000 --per-image 50 \\
        --codebook-size 1024 --ref-queries 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1] / "src"))

import faiss  # noqa: E402
import numba  # noqa: E402

from asmkit import Codebook, Params  # noqa: E402
from asmkit import kernel as akernel  # noqa: E402
from asmkit import search as asearch  # noqa: E402
from asmkit._synthetic import clustered_descriptors  # noqa: E402
from asmkit.ivf import InvertedFile, compute_idf, image_norms  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def best(fn, repeat):
    """(minimum wall seconds, minimum CPU seconds of the process) over ``repeat`` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def load(args):
    if args.descriptors:
        with np.load(args.descriptors, allow_pickle=False) as npz:
            vec_key = "vecs" if "vecs" in npz.files else next(k for k in npz.files if npz[k].ndim == 2)
            id_key = "image_ids" if "image_ids" in npz.files else next(k for k in npz.files if npz[k].ndim == 1)
            vecs, ids = npz[vec_key], npz[id_key]
        source = args.descriptors
        if args.images:
            keep = np.isin(ids, np.unique(ids)[: args.images])
            vecs, ids = vecs[keep], ids[keep]
            source += f" (first {args.images} images)"
    else:
        vecs, ids, _ = clustered_descriptors(args.synthetic, args.per_image, args.dim, seed=args.seed)
        source = f"synthetic clustered {args.synthetic} x {args.per_image} x {args.dim}"
    # Ids 0 .. I-1 and rows grouped by image: the reference slices query images as runs of
    # equal ids and reports its ranks as ids, which then index the matrix columns directly.
    _, ids = np.unique(ids, return_inverse=True)
    order = np.argsort(ids, kind="stable")
    return np.ascontiguousarray(vecs[order], dtype=np.float32), ids[order].astype(np.int64), source


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--descriptors", help="npz with vecs float32 [N, D] and image_ids int [N]")
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic clustered images")
    p.add_argument("--images", type=int, default=None, help="with --descriptors: only the first N image ids")
    p.add_argument("--per-image", type=int, default=500, help="synthetic descriptors per image")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codebook-size", type=int, default=4096)
    p.add_argument("--kmeans-iters", type=int, default=2, help="k-means iterations (training is not timed)")
    p.add_argument("--train-sample", type=int, default=50_000)
    p.add_argument("--ma-query", type=int, default=5)
    p.add_argument("--chunk", type=int, default=256, help="similarity_matrix query chunk")
    p.add_argument("--threads", type=int, default=None, help="numba/BLAS threads for asmkit (default: numba's)")
    p.add_argument("--ref-threads", type=int, default=2, help="faiss OpenMP threads for the reference")
    p.add_argument("--ref-queries", type=int, default=50, help="reference query images timed (0: skip reference)")
    p.add_argument("--stages", action="store_true", help="also time asmkit per stage and both scoring kernels")
    p.add_argument("--repeat", type=int, default=3, help="repeats of the scoring-kernel comparison (minimum)")
    p.add_argument("--out", help="write the numbers as JSON here")
    args = p.parse_args(argv)

    results: dict[str, object] = {}

    def record(name, value, unit=""):
        results[name] = value
        numeric = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
        shown = f"{value:12.4g}" if numeric else f"{value!s:>12}"
        print(f"{name:56s} {shown} {unit}", flush=True)

    if args.threads:
        numba.set_num_threads(args.threads)
    vecs, ids, source = load(args)
    n_images = int(ids[-1]) + 1 if len(ids) else 0
    record("source", source)
    record("images", n_images)
    record("descriptors", len(vecs))
    record("numba threads", numba.get_num_threads())

    rng = np.random.default_rng(args.seed)
    sample = vecs[rng.choice(len(vecs), min(args.train_sample, len(vecs)), replace=False)]
    t = time.perf_counter()
    book = Codebook.train(sample, args.codebook_size, iters=args.kmeans_iters, seed=args.seed)
    record("codebook training (excluded)", time.perf_counter() - t, "s")
    del sample
    params = Params(codebook_size=book.size, binary=True, use_idf=False, alpha=3.0, tau=0.0,
                    ma_database=1, ma_query=args.ma_query)

    # Compile every kernel on tiny data first (numba caches on disk, but loading costs too).
    t = time.perf_counter()
    few = ids < min(n_images, 4)
    for order in ("query", "word"):
        asearch.similarity_matrix(book, vecs[few], ids[few], params, order=order)
    record("warm-up / JIT (excluded)", time.perf_counter() - t, "s")

    # -- asmkit end to end ---------------------------------------------------------------------
    have_hwm = reset_peak_rss()
    rss0 = _status_kib("VmRSS")
    t, c = time.perf_counter(), time.process_time()
    matrix = asearch.similarity_matrix(book, vecs, ids, params, chunk=args.chunk)
    t_asmkit, c_asmkit = time.perf_counter() - t, time.process_time() - c
    peak = _status_kib("VmHWM")
    record("asmkit similarity_matrix", t_asmkit, "s")
    record("asmkit similarity_matrix, CPU time (all threads)", c_asmkit, "s")
    if have_hwm:
        extra = (peak - rss0) / 1024
        record("asmkit peak RSS above entry", extra, "MiB")
        record("  of which the float32 result matrix", matrix.nbytes / 2**20, "MiB")
        record("  working memory beyond the result", extra - matrix.nbytes / 2**20, "MiB")
    else:
        record("asmkit peak RSS of the process", _status_kib("VmHWM") / 1024, "MiB")

    if args.stages:
        stages(args, book, params, vecs, ids, matrix, record)

    # -- reference ---------------------------------------------------------------------------
    if args.ref_queries > 0:
        reference(args, book, params, vecs, ids, n_images, matrix, t_asmkit, c_asmkit, record, results)

    if args.out:
        with open(args.out, "w") as f:
            json.dump({k: (v.item() if isinstance(v, np.generic) else v) for k, v in results.items()}, f, indent=1)
    return 0


def stages(args, book, params, vecs, ids, matrix, record):
    """asmkit's stages one by one, and the two scoring kernels on the same aggregates."""
    desc = akernel.prepare_descriptors(vecs, ids, dim=book.dim)
    t = time.perf_counter()
    assign = book.quantize(desc.vecs, max(params.ma_query, params.ma_database))
    record("stage: quantize (m = max MA, once)", time.perf_counter() - t, "s")
    t = time.perf_counter()
    db = np.ascontiguousarray(assign[:, :1])
    aggs = asearch.aggregate_images(book, desc, db, params.binary)
    ivf = InvertedFile.from_aggregates(aggs, np.arange(desc.n_images, dtype=np.int64), book.size)
    idf = compute_idf(ivf.counts, desc.n_images, params.use_idf)
    sqrt_norms = np.sqrt(image_norms(ivf, idf, desc.n_images))
    record("stage: build (aggregate + inverted file)", time.perf_counter() - t, "s")
    del aggs, db
    q_assign = np.ascontiguousarray(assign[:, : params.ma_query])
    del assign
    t_agg, c_agg = best(lambda: asearch.aggregate_images(book, desc, q_assign, params.binary), args.repeat)
    queries = asearch.aggregate_images(book, desc, q_assign, params.binary)
    record("stage: query aggregation (all images)", t_agg, "s")
    record("stage: query aggregation, CPU", c_agg, "s")
    touched = int(np.diff(ivf.offsets)[queries.words].sum())
    record("posting entries scored (all queries)", touched)
    n = desc.n_images
    # The two kernels alternate within each repeat, so that both see the same load.
    dense = {order: np.zeros((n, n), dtype=np.float32) for order in ("query", "word")}
    walls = {order: [] for order in dense}
    cpus = {order: [] for order in dense}
    for _ in range(args.repeat):
        for order, out in dense.items():
            out[:] = 0
            t, c = time.perf_counter(), time.process_time()
            asearch.score_aggregates(ivf, idf, sqrt_norms, desc.image_ids, queries, params, dim=book.dim,
                                     dense_out=out, order=order)
            walls[order].append(time.perf_counter() - t)
            cpus[order].append(time.process_time() - c)
    for order in dense:
        t_score, c_score = min(walls[order]), min(cpus[order])
        record(f"stage: scoring, {order}-major kernel (min of {args.repeat})", t_score, "s")
        record(f"stage: scoring, {order}-major kernel, CPU", c_score, "s")
        record(f"  ns per posting entry ({order}-major)", 1e9 * t_score / max(touched, 1), "ns")
        record(f"  ns per posting entry ({order}-major), CPU", 1e9 * c_score / max(touched, 1), "ns")
        record(f"  aggregate + search per query ({order}-major)", 1e3 * (t_agg + t_score) / n, "ms")
        record(f"  aggregate + search per query ({order}-major), CPU", 1e3 * (c_agg + c_score) / n, "ms")
    record("word-major == query-major (bit-identical)", bool(np.array_equal(dense["query"], dense["word"])))
    record("per-stage == similarity_matrix (bit-identical)", bool(np.array_equal(dense["query"], matrix)))


def reference(args, book, params, vecs, ids, n_images, matrix, t_asmkit, c_asmkit, record, results):
    from asmk import asmk_method, codebook as ref_codebook, index as ref_index

    faiss.omp_set_num_threads(args.ref_threads)
    cdb = ref_codebook.Codebook(ref_index.FaissL2Index(), size=book.size)
    cdb.index(book.centroids.copy())
    method = asmk_method.ASMKMethod(params.to_reference(), {}, codebook=cdb)
    t, c = time.perf_counter(), time.process_time()
    built = method.build_ivf(vecs, ids.copy())
    t_build, c_build = time.perf_counter() - t, time.process_time() - c
    record("reference build_ivf (all images)", t_build, "s")
    record("reference build_ivf, CPU time", c_build, "s")
    chosen = np.unique(np.linspace(0, n_images - 1, min(args.ref_queries, n_images)).round().astype(np.int64))
    rows = np.flatnonzero(np.isin(ids, chosen))
    t, c = time.perf_counter(), time.process_time()
    _, images, ranks, scores = built.query_ivf(vecs[rows], ids[rows].copy())
    t_query, c_query = time.perf_counter() - t, time.process_time() - c
    t_query_all = t_query * n_images / len(chosen)
    c_query_all = c_query * n_images / len(chosen)
    record(f"reference query_ivf ({len(chosen)} images, measured)", t_query, "s")
    record(f"reference query_ivf (all {n_images}, extrapolated)", t_query_all, "s")
    t_ref = t_build + t_query_all
    record("reference total (build + extrapolated queries)", t_ref, "s")
    record("RATIO reference / asmkit (end to end, wall)", t_ref / t_asmkit, "x")
    record("reference total CPU time (build + extrapolated queries)", c_build + c_query_all, "s")
    record("RATIO reference / asmkit (end to end, CPU time)", (c_build + c_query_all) / c_asmkit, "x")
    # The reference's own per-query stages, on the same query images (quantization apart).
    kern, ivf, cdb = built.kernel, built.inverted_file, built.codebook
    sim = lambda *x: kern.similarity(*x, alpha=params.alpha, similarity_threshold=params.tau)  # noqa: E731
    t_as = c_as = 0.0
    for q in chosen:
        qv = vecs[ids == q]
        _, qw = cdb.quantize(qv, multiple_assignment=params.ma_query)[:2]
        t, c = time.perf_counter(), time.process_time()
        ivf.search(*kern.aggregate_image(qv, qw), similarity_func=sim, topk=None)
        t_as, c_as = t_as + time.perf_counter() - t, c_as + time.process_time() - c
    record("reference aggregate + search per query", 1e3 * t_as / len(chosen), "ms")
    record("reference aggregate + search per query, CPU", 1e3 * c_as / len(chosen), "ms")
    for key in ("  aggregate + search per query (query-major)", "  aggregate + search per query (word-major)"):
        if key in results:
            record(f"RATIO reference / asmkit aggregate + search ({key.split('(')[1][:-1]}, wall)",
                   1e3 * t_as / len(chosen) / results[key], "x")
            record(f"RATIO reference / asmkit aggregate + search ({key.split('(')[1][:-1]}, CPU)",
                   1e3 * c_as / len(chosen) / results[key + ", CPU"], "x")
    worst = 0.0
    for image, rank, score in zip(images, ranks, scores):
        row = np.zeros(n_images, dtype=np.float64)
        row[rank] = score
        worst = max(worst, float(np.max(np.abs(matrix[image].astype(np.float64) - row))))
    record(f"max |asmkit - reference| over {len(images)} rows", worst)


if __name__ == "__main__":
    raise SystemExit(main())
