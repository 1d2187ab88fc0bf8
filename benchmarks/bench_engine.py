"""Per-stage timings of the asmkit engine (quantize, aggregate, search, build), optionally
side by side with the reference ``asmk`` package on the same descriptors and codebook.

Every timing is the minimum over ``--repeat`` runs (the machine is shared and noisy), and
variants are compared in the same process. Examples::

    nice -n 10 .venv/bin/python benchmarks/bench_engine.py --images 1000 --reference
    nice -n 10 .venv/bin/python benchmarks/bench_engine.py \\
        --descriptors /tmp/ukbench_rootsift_ukbench2000_1000.npz --codebook-size 4096 --reference
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1] / "src"))

import faiss  # noqa: E402
import numba  # noqa: E402

from asmkit import Codebook, Index, Params  # noqa: E402
from asmkit import kernel as akernel  # noqa: E402
from asmkit import search as asearch  # noqa: E402
from asmkit._synthetic import clustered_descriptors  # noqa: E402
from asmkit.ivf import InvertedFile, image_norms  # noqa: E402


def best(fn, repeat: int) -> tuple[float, object]:
    """Minimum wall time of ``repeat`` calls (seconds) and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def peak_extra_mb(fn) -> float:
    """Peak of NumPy/Python allocations made while ``fn`` runs (tracemalloc), MiB."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def load_inputs(args):
    if args.descriptors:
        with np.load(args.descriptors, allow_pickle=False) as npz:
            vecs, ids = npz["vecs"], npz["image_ids"]
        if args.images:
            keep = ids < args.images
            vecs, ids = vecs[keep], ids[keep]
        return np.ascontiguousarray(vecs, np.float32), ids.astype(np.int64), f"{args.descriptors}"
    vecs, ids, _ = clustered_descriptors(args.images or 1000, args.per_image, args.dim, seed=args.seed)
    return vecs, ids, f"synthetic clustered {args.images or 1000} x {args.per_image} x {args.dim}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=None, help="synthetic images (default 1000) or first N ids")
    p.add_argument("--per-image", type=int, default=500)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--descriptors", help="npz with vecs [N, D] float32 and image_ids [N]")
    p.add_argument("--codebook-size", type=int, default=1024)
    p.add_argument("--kmeans-iters", type=int, default=4)
    p.add_argument("--train-sample", type=int, default=100_000)
    p.add_argument("--ma-query", type=int, default=5)
    p.add_argument("--real", action="store_true", help="ASMK (real aggregates) instead of ASMK*")
    p.add_argument("--queries", type=int, default=500, help="query images timed on the asmkit side")
    p.add_argument("--reference", action="store_true", help="also time the reference asmk package")
    p.add_argument("--ref-queries", type=int, default=50)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", default="1,2", help="numba/BLAS thread counts to compare, e.g. 1,2")
    p.add_argument("--skip-faiss", action="store_true", help="do not time faiss quantization variants")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    vecs, image_ids, source = load_inputs(args)
    n_images = int(np.unique(image_ids).shape[0])
    rng = np.random.default_rng(args.seed)
    train = vecs[np.sort(rng.choice(len(vecs), min(args.train_sample, len(vecs)), replace=False))]
    t = time.perf_counter()
    book = Codebook.train(train, args.codebook_size, iters=args.kmeans_iters, seed=1234)
    print(f"# {source}: {len(vecs)} descriptors, {n_images} images; K={book.size}, "
          f"k-means {args.kmeans_iters} it on {len(train)} ({time.perf_counter() - t:.1f} s)")
    print(f"# numba {numba.__version__} layer threads {numba.get_num_threads()}, faiss omp {faiss.omp_get_max_threads()}")
    params = Params(codebook_size=book.size, binary=not args.real, use_idf=False, alpha=3.0, tau=0.0,
                    ma_database=1, ma_query=args.ma_query)
    rows: list[tuple[str, float, str]] = []

    def record(name, value, unit):
        rows.append((name, value, unit))
        print(f"{name:48s} {value:12.4g} {unit}", flush=True)

    # Query set: the first --queries images (each a query against the whole database).
    uniq = np.unique(image_ids)
    q_ids = uniq[np.linspace(0, len(uniq) - 1, min(args.queries, len(uniq))).round().astype(int)]
    q_rows = np.flatnonzero(np.isin(image_ids, q_ids))
    qv, qi = vecs[q_rows], image_ids[q_rows]
    nq = len(q_ids)

    # Build once (also the reference's database).
    index = Index(book, params)
    index.add(vecs, image_ids)
    ivf = index.inverted_file
    record("database posting entries", ivf.n_entries, "")

    for threads in [int(x) for x in args.threads.split(",")]:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        tag = f"[t={threads}]"
        tq, _ = best(lambda: book.quantize(qv, args.ma_query), args.repeat)
        record(f"{tag} query quantize (batched)", 1e3 * tq / nq, "ms/query")
        desc = akernel.prepare_descriptors(qv, qi, dim=book.dim)
        qa = book.quantize(desc.vecs, args.ma_query)
        ta, aggs = best(lambda: asearch.aggregate_images(book, desc, qa, params.binary), args.repeat)
        record(f"{tag} query aggregate (batched)", 1e3 * ta / nq, "ms/query")
        sqrt_norms = np.sqrt(image_norms(ivf, index.idf, len(index)))
        ts, _ = best(lambda: asearch.score_aggregates(ivf, index.idf, sqrt_norms, index.ids, aggs, params,
                                                      dim=book.dim, k=100), args.repeat)
        touched = int(np.diff(ivf.offsets)[aggs.words].sum())
        record(f"{tag} query search (batched, k=100)", 1e3 * ts / nq, "ms/query")
        record(f"{tag} search ns per posting entry", 1e9 * ts / max(touched, 1), "ns")
        tt, _ = best(lambda: index.search(qv, qi, k=100), args.repeat)
        record(f"{tag} query total (Index.search)", 1e3 * tt / nq, "ms/query")
        one = q_rows[image_ids[q_rows] == q_ids[0]]
        t1, _ = best(lambda: index.search(vecs[one], image_ids[one], k=100), max(args.repeat, 5))
        record(f"{tag} single-query Index.search", 1e3 * t1, "ms")

        def build():
            fresh = Index(book, params)
            fresh.add(vecs, image_ids)
        tb, _ = best(build, max(1, args.repeat - 1))
        record(f"{tag} build (Index.add)", tb, "s")
        d_all = akernel.prepare_descriptors(vecs, image_ids, dim=book.dim)
        tbq, a1 = best(lambda: book.quantize(d_all.vecs, 1), 1)
        record(f"{tag} build quantize", tbq, "s")
        tba, ag = best(lambda: asearch.aggregate_images(book, d_all, a1, params.binary), 1)
        record(f"{tag} build aggregate", tba, "s")
        tbi, _ = best(lambda: InvertedFile.from_aggregates(ag, np.arange(d_all.n_images), book.size), 1)
        record(f"{tag} build ivf", tbi, "s")
        del d_all, a1, ag
        sub = image_ids < uniq[min(len(uniq) - 1, 499)] + 1
        tsm, _ = best(lambda: asearch.similarity_matrix(book, vecs[sub], image_ids[sub], params), 1)
        record(f"{tag} similarity_matrix ({int(np.unique(image_ids[sub]).shape[0])} images)", tsm, "s")
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)

    record("query peak traced memory (Index.search, all queries)",
           peak_extra_mb(lambda: index.search(qv, qi, k=100)), "MiB")
    record("build peak traced memory (Index.add)", peak_extra_mb(lambda: Index(book, params).add(vecs, image_ids)),
           "MiB")

    if not args.skip_faiss:
        fx = faiss.IndexFlatL2(book.dim)
        fx.add(book.centroids)
        per_image = [qv[qi == q] for q in q_ids[: args.ref_queries]]
        for th in (1, 2):
            faiss.omp_set_num_threads(th)
            tf, _ = best(lambda: fx.search(qv, args.ma_query), args.repeat)
            record(f"faiss batched quantize omp={th}", 1e3 * tf / nq, "ms/query")
            tp, _ = best(lambda: [fx.search(x, args.ma_query) for x in per_image], 1)
            record(f"faiss per-image quantize omp={th}", 1e3 * tp / len(per_image), "ms/query")

    if args.reference:
        reference(args, book, vecs, image_ids, q_ids, record, dict((r[0], r[1]) for r in rows))
    return 0


def reference(args, book, vecs, image_ids, q_ids, record, ours):
    """Time the reference package's own stages on the same codebook and descriptors."""
    from asmk import codebook as cdb_pkg, index as idx_pkg, inverted_file as ivf_pkg, kernel as kern_pkg

    faiss.omp_set_num_threads(2)
    cdb = cdb_pkg.Codebook(idx_pkg.FaissL2Index(), size=book.size)
    cdb.index(book.centroids.copy())
    kern = kern_pkg.ASMKKernel(cdb, binary=not args.real)
    ivf = ivf_pkg.IVF.initialize_empty(codebook_size=book.size, use_idf=False)
    tracemalloc.start()
    t = time.perf_counter()
    des, words = cdb.quantize(vecs, multiple_assignment=1)[:2]
    tq = time.perf_counter() - t
    t = time.perf_counter()
    agg = kern.aggregate(des, words, image_ids.copy())
    ta = time.perf_counter() - t
    t = time.perf_counter()
    ivf.add(*agg)
    ti = time.perf_counter() - t
    del agg, des, words
    record("REF build peak traced memory", tracemalloc.get_traced_memory()[1] / 2**20, "MiB")
    tracemalloc.stop()
    record("REF build quantize/aggregate/ivf", tq + ta + ti, "s")
    sim = lambda *x: kern.similarity(*x, alpha=3.0, similarity_threshold=0.0)  # noqa: E731
    tqs = tas = tss = 0.0
    chosen = q_ids[np.linspace(0, len(q_ids) - 1, min(args.ref_queries, len(q_ids))).round().astype(int)]
    for q in chosen:
        qv = vecs[image_ids == q]
        t0 = time.perf_counter()
        _, qw = cdb.quantize(qv, multiple_assignment=args.ma_query)[:2]
        t1 = time.perf_counter()
        qa, qwords = kern.aggregate_image(qv, qw)
        t2 = time.perf_counter()
        ivf.search(qa, qwords, similarity_func=sim, topk=None)
        t3 = time.perf_counter()
        tqs, tas, tss = tqs + t1 - t0, tas + t2 - t1, tss + t3 - t2
    n = len(chosen)
    ref = {"quantize": 1e3 * tqs / n, "aggregate": 1e3 * tas / n, "search": 1e3 * tss / n}
    ref["total"] = sum(ref.values())
    for key, value in ref.items():
        record(f"REF query {key}", value, "ms/query")
    for th in [int(x) for x in args.threads.split(",")]:
        tag = f"[t={th}]"
        ours_q = ours.get(f"{tag} query total (Index.search)")
        ours_as = ours.get(f"{tag} query aggregate (batched)", np.nan) + ours.get(f"{tag} query search (batched, k=100)",
                                                                                  np.nan)
        ours_b = ours.get(f"{tag} build (Index.add)")
        if ours_q:
            record(f"RATIO {tag} query total ref/asmkit", ref["total"] / ours_q, "x")
            record(f"RATIO {tag} aggregate+search ref/asmkit", (ref["aggregate"] + ref["search"]) / ours_as, "x")
            record(f"RATIO {tag} quantize ref/asmkit", ref["quantize"] / ours[f"{tag} query quantize (batched)"], "x")
        if ours_b:
            record(f"RATIO {tag} build ref/asmkit", (tq + ta + ti) / ours_b, "x")


if __name__ == "__main__":
    raise SystemExit(main())
