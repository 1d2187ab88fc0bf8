"""asmkit's own stages, timed one at a time: quantize, search, scores, features.

``--stage quantize``
    ``Codebook.quantize`` against faiss ``IndexFlatL2`` called as the reference calls it:
    the database in one call (MA 1) and each query image in its own call (MA ``--ma-query``,
    ``segments`` = the image boundaries on asmkit's side). Prints both times, their ratio
    and how many rows get other words (column 0 for the database, the set of words for the
    queries: what ASMK uses). Needs no ``asmk``.
``--stage search``
    Build (``Index.add``) and query (``Index.search`` of ``--queries`` images, batched and
    one image per call), with the query split into quantization, aggregation and scoring
    (the public building blocks ``Index`` is made of), ns per posting entry, and the traced
    peak memory of build and query. ``--reference`` also times the reference ``asmk``'s
    stages (its codebook holding the same centroids) on ``--ref-queries`` images.
``--stage scores``
    The all-vs-all matrix, ``asmkit.similarity_matrix`` (quantize once with MA 5, column 0
    for the database), end to end with its peak RSS above entry. ``--kernels`` adds the
    stages one by one and the query-major and word-major scoring kernels on the same
    aggregates (alternated ``--repeat`` times, checked bit-identical). ``--ref-queries N``
    (N > 0) times the reference pipeline (``ASMKMethod.build_ivf`` on all images,
    ``query_ivf`` on N evenly spaced ones, extrapolated linearly to all) and compares rows.
``--stage features``
    RootSIFT extraction (``asmkit.features``) of the images of ``--data``: wall and CPU
    time, images per second.

The codebook is trained here (faiss k-means, ``--kmeans-iters`` on ``--train-sample``
descriptors); its training is never timed. Examples (from the repository root)::

    python -m benchmarks.bench_engine --stage quantize --data ../shared/datasets/ukbench2000 \\
        --per-image 1000 --codebook-size 4096
    python -m benchmarks.bench_engine --stage search --synthetic 1000 --reference
    python -m benchmarks.bench_engine --stage scores --data ../shared/datasets/ukbench2000 \\
        --per-image 1000 --codebook-size 4096 --ref-queries 100
    python -m benchmarks.bench_engine --stage features --data ../shared/datasets/ukbench2000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks._common import (
    Recorder,
    StagePeak,
    add_data_args,
    add_run_args,
    aggregate_all,
    best_of,
    command_line,
    evenly_spaced,
    load_data,
    machine_info,
    machine_line,
    reference_codebook,
    sample_rows,
    status_mib,
    timed,
    traced_peak_mib,
    write_json,
)


def train_codebook(args, data, record):
    from asmkit import Codebook

    train = sample_rows(data.vecs, args.train_sample, args.seed)
    t = time.perf_counter()
    book = Codebook.train(train, args.codebook_size, iters=args.kmeans_iters, seed=args.seed)
    record("codebook training (excluded)", time.perf_counter() - t, "s")
    return book


def params_of(args, book):
    from asmkit import Params

    return Params(
        codebook_size=book.size,
        binary=not args.real,
        use_idf=False,
        alpha=3.0,
        tau=0.0,
        ma_database=1,
        ma_query=args.ma_query,
    )


# -- quantize ----------------------------------------------------------------------------------


def stage_quantize(args, data, record) -> None:
    import faiss

    book = train_codebook(args, data, record)
    vecs, starts = data.vecs, data.starts()
    flat = faiss.IndexFlatL2(book.dim)
    flat.add(book.centroids)
    # Compile the kernels and choose the bound widths outside the timings.
    book.quantize(vecs[:4096], 1)
    book.quantize(vecs[:4096], args.ma_query, nearest_first=False)

    t_ref_db, ref_db = best_of(lambda: flat.search(vecs, 1)[1], args.repeat)
    t_db, db = best_of(lambda: book.quantize(vecs, 1), args.repeat)
    t_ref_q, ref_q = best_of(
        lambda: np.concatenate([flat.search(vecs[s:e], args.ma_query)[1] for s, e in zip(starts[:-1], starts[1:])]),
        args.repeat,
    )
    t_q, q = best_of(lambda: book.quantize(vecs, args.ma_query, segments=starts, nearest_first=False), args.repeat)

    record("descriptors", len(vecs))
    record("images", len(starts) - 1)
    pruned = book._pruned_search() if hasattr(book, "_pruned_search") else None  # report only
    for m, width in sorted(getattr(pruned, "_width", {}).items()):
        record(f"bound width at m = {m}", width if width is not None else "faiss")
    record("database MA 1: faiss, one call", t_ref_db, "s")
    record("database MA 1: asmkit", t_db, "s")
    record("database ratio", t_ref_db / t_db, "x")
    record("database rows with another word", int((db[:, 0] != ref_db[:, 0]).sum()))
    record(f"queries MA {args.ma_query}: faiss, one call per image", t_ref_q, "s")
    record(f"queries MA {args.ma_query}: asmkit", t_q, "s")
    record("queries ratio", t_ref_q / t_q, "x")
    record("query rows with another word set", int((np.sort(q, 1) != np.sort(ref_q, 1)).any(axis=1).sum()))


# -- search ------------------------------------------------------------------------------------


def stage_search(args, data, record) -> None:
    from asmkit import Index
    from asmkit import kernel as akernel
    from asmkit import search as asearch
    from asmkit.ivf import image_norms

    book = train_codebook(args, data, record)
    params = params_of(args, book)
    vecs, image_ids = data.vecs, data.image_ids
    uniq = np.unique(image_ids)
    q_ids = evenly_spaced(uniq, args.queries)
    q_rows = np.flatnonzero(np.isin(image_ids, q_ids))
    qv, qi = vecs[q_rows], image_ids[q_rows]
    nq = len(q_ids)

    warm = Index(book, params)  # numba loads (or compiles) its kernels on first use
    warm.add(vecs[:5000], image_ids[:5000])
    warm.search(vecs[:5000], image_ids[:5000], k=10)

    t_build, index = best_of(lambda: _built(Index, book, params, vecs, image_ids), args.repeat)
    ivf = index.inverted_file
    record("database posting entries", ivf.n_entries)
    record("build (Index.add)", t_build, "s")
    build_split(book, params, vecs, image_ids, record)

    t, _ = best_of(lambda: index.search(qv, qi, k=100), args.repeat)
    record(f"query (Index.search, {nq} images batched)", 1e3 * t / nq, "ms/query")
    desc = akernel.prepare_descriptors(qv, qi, dim=book.dim)
    t, qa = best_of(lambda: book.quantize(desc.vecs, args.ma_query), args.repeat)
    record("  query: quantize", 1e3 * t / nq, "ms/query")
    t_agg, aggs = best_of(lambda: aggregate_all(book, desc, qa, params.binary), args.repeat)
    record("  query: aggregate", 1e3 * t_agg / nq, "ms/query")
    sqrt_norms = np.sqrt(image_norms(ivf, index.idf, len(index)))
    t_score, _ = best_of(
        lambda: asearch.score_aggregates(ivf, index.idf, sqrt_norms, index.ids, aggs, params, dim=book.dim, k=100),
        args.repeat,
    )
    touched = int(np.diff(ivf.offsets)[aggs.words].sum())
    record("  query: score (k = 100)", 1e3 * t_score / nq, "ms/query")
    record("  scoring, ns per posting entry", 1e9 * t_score / max(touched, 1), "ns")
    record("  query: aggregate + score", 1e3 * (t_agg + t_score) / nq, "ms/query")
    bounds = [q_rows[qi == q] for q in q_ids[: args.ref_queries]]
    t = timed(lambda: [index.search(vecs[r], image_ids[r], k=100) for r in bounds], 1).best
    record(f"query, one image per call ({len(bounds)} images)", 1e3 * t / len(bounds), "ms/query")
    record(
        "query peak traced memory (all queries batched)", traced_peak_mib(lambda: index.search(qv, qi, k=100)), "MiB"
    )
    record(
        "build peak traced memory (Index.add)",
        traced_peak_mib(lambda: _built(Index, book, params, vecs, image_ids)),
        "MiB",
    )
    if args.reference:
        search_reference(args, book, vecs, image_ids, q_ids, record)


def build_split(book, params, vecs, image_ids, record) -> None:
    """The build's stages one at a time, through the building blocks ``Index.add`` uses."""
    from asmkit import kernel as akernel
    from asmkit.ivf import InvertedFile

    d_all = akernel.prepare_descriptors(vecs, image_ids, dim=book.dim)
    t, a1 = best_of(lambda: book.quantize(d_all.vecs, 1), 1)
    record("  build: quantize", t, "s")
    t, ag = best_of(lambda: aggregate_all(book, d_all, a1, params.binary), 1)
    record("  build: aggregate", t, "s")
    t, _ = best_of(lambda: InvertedFile.from_aggregates(ag, np.arange(d_all.n_images), book.size), 1)
    record("  build: inverted file", t, "s")


def _built(index_cls, book, params, vecs, image_ids):
    index = index_cls(book, params)
    index.add(vecs, image_ids)
    return index


def search_reference(args, book, vecs, image_ids, q_ids, record) -> None:
    """The reference package's own stages on the same codebook and descriptors."""
    from asmk import inverted_file as ref_ivf
    from asmk import kernel as ref_kernel

    cdb = reference_codebook(book.centroids)
    kern = ref_kernel.ASMKKernel(cdb, binary=not args.real)
    ivf = ref_ivf.IVF.initialize_empty(codebook_size=book.size, use_idf=False)
    t = time.perf_counter()
    des, words = cdb.quantize(vecs, multiple_assignment=1)[:2]
    agg = kern.aggregate(des, words, image_ids.copy())
    ivf.add(*agg)
    record("REF build (quantize + aggregate + IVF.add)", time.perf_counter() - t, "s")
    del agg, des, words
    sim = lambda *x: kern.similarity(*x, alpha=3.0, similarity_threshold=0.0)  # noqa: E731
    tq = ta = ts = 0.0
    chosen = evenly_spaced(q_ids, args.ref_queries)
    for q in chosen:
        qv = vecs[image_ids == q]
        t0 = time.perf_counter()
        _, qw = cdb.quantize(qv, multiple_assignment=args.ma_query)[:2]
        t1 = time.perf_counter()
        qa, qwords = kern.aggregate_image(qv, qw)
        t2 = time.perf_counter()
        ivf.search(qa, qwords, similarity_func=sim, topk=None)
        t3 = time.perf_counter()
        tq, ta, ts = tq + t1 - t0, ta + t2 - t1, ts + t3 - t2
    n = len(chosen)
    record("REF query: quantize", 1e3 * tq / n, "ms/query")
    record("REF query: aggregate", 1e3 * ta / n, "ms/query")
    record("REF query: search", 1e3 * ts / n, "ms/query")
    record("REF query", 1e3 * (tq + ta + ts) / n, "ms/query")


# -- scores ------------------------------------------------------------------------------------


def stage_scores(args, data, record) -> None:
    from asmkit import similarity_matrix

    # Ids 0 .. I-1: the reference reports ranks as ids, which then index the matrix columns.
    _, ids = np.unique(data.image_ids, return_inverse=True)
    vecs, ids = data.vecs, ids.astype(np.int64)
    n_images = int(ids[-1]) + 1 if len(ids) else 0
    book = train_codebook(args, data, record)
    params = params_of(args, book)
    record("images", n_images)
    record("descriptors", len(vecs))

    t = time.perf_counter()
    few = ids < min(n_images, 4)
    for order in ("query", "word"):  # compile (or load) every kernel on tiny data first
        similarity_matrix(book, vecs[few], ids[few], params, order=order)
    record("warm-up (excluded)", time.perf_counter() - t, "s")

    with StagePeak() as peak:
        run = timed(lambda: similarity_matrix(book, vecs, ids, params, chunk=args.chunk), 1)
    matrix = run.result
    record("asmkit similarity_matrix", run.best, "s")
    record("asmkit similarity_matrix, CPU time (all threads)", run.cpu, "s")
    record("asmkit peak RSS above entry", peak.extra_mb, "MiB")
    record("  of which the float32 result matrix", matrix.nbytes / 2**20, "MiB")
    record("  working memory beyond the result", peak.extra_mb - matrix.nbytes / 2**20, "MiB")
    per_query = {}
    if args.kernels:
        per_query = scores_kernels(args, book, params, vecs, ids, matrix, record)
    if args.ref_queries:
        scores_reference(args, book, params, vecs, ids, n_images, matrix, run, per_query, record)


def scores_kernels(args, book, params, vecs, ids, matrix, record) -> dict:
    """asmkit's stages one by one, and the two scoring kernels on the same aggregates."""
    from asmkit import kernel as akernel
    from asmkit import search as asearch
    from asmkit.ivf import InvertedFile, compute_idf, image_norms

    desc = akernel.prepare_descriptors(vecs, ids, dim=book.dim)
    t, assign = best_of(lambda: book.quantize(desc.vecs, max(params.ma_query, params.ma_database)), 1)
    record("stage: quantize (m = max MA, once)", t, "s")
    t = time.perf_counter()
    db = np.ascontiguousarray(assign[:, :1])
    aggs = aggregate_all(book, desc, db, params.binary)
    ivf = InvertedFile.from_aggregates(aggs, np.arange(desc.n_images, dtype=np.int64), book.size)
    idf = compute_idf(ivf.counts, desc.n_images, params.use_idf)
    sqrt_norms = np.sqrt(image_norms(ivf, idf, desc.n_images))
    record("stage: build (aggregate + inverted file)", time.perf_counter() - t, "s")
    q_assign = np.ascontiguousarray(assign[:, : params.ma_query])
    agg = timed(lambda: aggregate_all(book, desc, q_assign, params.binary), args.repeat)
    queries = agg.result
    record("stage: query aggregation (all images)", agg.best, "s")
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
            asearch.score_aggregates(
                ivf, idf, sqrt_norms, desc.image_ids, queries, params, dim=book.dim, dense_out=out, order=order
            )
            walls[order].append(time.perf_counter() - t)
            cpus[order].append(time.process_time() - c)
    per_query = {}
    for order in dense:
        t_score, c_score = min(walls[order]), min(cpus[order])
        record(f"stage: scoring, {order}-major kernel", t_score, "s")
        record(f"  ns per posting entry ({order}-major)", 1e9 * t_score / max(touched, 1), "ns")
        record(f"  ns per posting entry ({order}-major), CPU", 1e9 * c_score / max(touched, 1), "ns")
        per_query[order] = 1e3 * (agg.best + t_score) / n
        record(f"  aggregate + score per query ({order}-major)", per_query[order], "ms")
    record("word-major == query-major (bit-identical)", bool(np.array_equal(dense["query"], dense["word"])))
    record("stages == similarity_matrix (bit-identical)", bool(np.array_equal(dense["query"], matrix)))
    return per_query


def scores_reference(args, book, params, vecs, ids, n_images, matrix, run, per_query, record) -> None:
    import faiss
    from asmk import asmk_method

    faiss.omp_set_num_threads(args.ref_threads)
    method = asmk_method.ASMKMethod(params.to_reference(), {}, codebook=reference_codebook(book.centroids))
    build = timed(lambda: method.build_ivf(vecs, ids.copy()), 1)
    built = build.result
    record("reference build_ivf (all images)", build.best, "s")
    chosen = evenly_spaced(np.arange(n_images, dtype=np.int64), args.ref_queries)
    rows = np.flatnonzero(np.isin(ids, chosen))
    query = timed(lambda: built.query_ivf(vecs[rows], ids[rows].copy()), 1)
    _, images, ranks, scores = query.result
    scale = n_images / len(chosen)
    record(f"reference query_ivf ({len(chosen)} images, measured)", query.best, "s")
    record(f"reference query_ivf (all {n_images}, extrapolated)", query.best * scale, "s")
    total, total_cpu = build.best + query.best * scale, build.cpu + query.cpu * scale
    record("reference total (build + extrapolated queries)", total, "s")
    record("RATIO reference / asmkit (end to end, wall)", total / run.best, "x")
    record("RATIO reference / asmkit (end to end, CPU time)", total_cpu / run.cpu, "x")
    # The reference's own aggregation + search per query, on the same images.
    kern, ivf, cdb = built.kernel, built.inverted_file, built.codebook
    sim = lambda *x: kern.similarity(*x, alpha=params.alpha, similarity_threshold=params.tau)  # noqa: E731
    t_as = 0.0
    for q in chosen:
        qv = vecs[ids == q]
        _, qw = cdb.quantize(qv, multiple_assignment=params.ma_query)[:2]
        t = time.perf_counter()
        ivf.search(*kern.aggregate_image(qv, qw), similarity_func=sim, topk=None)
        t_as += time.perf_counter() - t
    ref_as = 1e3 * t_as / len(chosen)
    record("reference aggregate + search per query", ref_as, "ms")
    for order, ours in per_query.items():
        record(f"RATIO reference / asmkit aggregate + search ({order}-major)", ref_as / ours, "x")
    worst = 0.0
    for image, rank, score in zip(images, ranks, scores):
        row = np.zeros(n_images, dtype=np.float64)
        row[rank] = score
        worst = max(worst, float(np.max(np.abs(matrix[image].astype(np.float64) - row))))
    record(f"max |asmkit - reference| over {len(images)} rows", worst)


# -- features ----------------------------------------------------------------------------------


def stage_features(args, record) -> None:
    from asmkit.features import SiftExtractor, extract_features, list_images

    if args.data is None:
        raise SystemExit("--stage features needs --data (a folder of images, or one with images/)")
    folder = args.data / "images" if (args.data / "images").is_dir() else args.data
    paths = list_images(folder)[: args.images]
    extractor = SiftExtractor(max_features=args.per_image, root=True)
    run = timed(
        lambda: extract_features(paths, extractor, root=folder, workers=args.workers, progress=False, keep=False),
        args.repeat,
    )
    result = run.result
    record("images extracted", len(result.extracted))
    record("images failed", len(result.failed))
    record("RootSIFT extraction", run.best, "s")
    record("  images per second", len(result.extracted) / run.best, "images/s")
    record("  CPU time (all threads)", run.cpu, "s")
    record("peak RSS", status_mib("VmHWM"), "MiB")


# -- main --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--stage", required=True, choices=["quantize", "search", "scores", "features"])
    add_data_args(p, synthetic=1000, per_image=500)
    add_run_args(p, repeat=3)
    p.add_argument("--codebook-size", type=int, default=1024)
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--train-sample", type=int, default=100_000)
    p.add_argument("--ma-query", type=int, default=5)
    p.add_argument("--real", action="store_true", help="ASMK (real aggregates) instead of ASMK*")
    p.add_argument("--threads", type=int, default=None, help="numba threads (default: numba's)")
    p.add_argument("--queries", type=int, default=500, help="search: query images timed (evenly spaced)")
    p.add_argument("--reference", action="store_true", help="search: also time the reference asmk's stages")
    p.add_argument(
        "--ref-queries",
        type=int,
        default=None,
        help="search: images queried one per call (default 50); scores: reference query images "
        "(default 0: no reference)",
    )
    p.add_argument("--chunk", type=int, default=256, help="scores: similarity_matrix query chunk")
    p.add_argument("--kernels", action="store_true", help="scores: stages one by one and both scoring kernels")
    p.add_argument("--ref-threads", type=int, default=2, help="scores: faiss threads of the reference")
    p.add_argument("--workers", type=int, default=None, help="features: decoding/extraction threads")
    args = p.parse_args(argv)
    if args.ref_queries is None:
        args.ref_queries = 50 if args.stage == "search" else 0

    import numba

    if args.threads:
        numba.set_num_threads(args.threads)
    record = Recorder()
    info = machine_info()
    print(f"# machine: {machine_line(info)}")
    if args.stage == "features":
        stage_features(args, record)
    else:
        data = load_data(args)
        print(f"# {data.source}: {len(data.vecs)} descriptors, {data.n_images} images; K = {args.codebook_size}")
        {"quantize": stage_quantize, "search": stage_search, "scores": stage_scores}[args.stage](args, data, record)
    write_json(args.out, {"command": command_line(), "machine": info, "results": record.values})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
