"""ASMK* at 10k, 100k and 1M images on one machine: build, memory, disk, load, query latency.

The images are synthetic aggregates (issue 13, section 2): ``WORDS`` = 65 536 visual words,
each image a set of distinct words drawn from a skewed word-frequency model fitted on
UKBench RootSIFT (``MODEL``; refit with ``--refit``), with random 128-bit codes. They are
added through ``Index.add_aggregates`` in batches of ``--batch`` images, into index parts
of at most ``--part`` images (``--part 1000000``: one index): with ``use_idf`` off (the
ASMK* default) idf is 1 and every image's norm depends on that image alone, so the parts
searched one after another and merged by ``merge_topk`` give exactly one whole index's
result (tests/test_scale.py); smaller parts keep each query's score row in the cache.

Each size runs in its own process (so its peak resident memory is its own) and reports:
build rate, peak and final resident memory, bytes per image on disk (``Index.save``),
load time with mmap (``verify`` off and on, warm page cache), and the latency of one
query per call, k = 100, on the numba threads of this machine (``score_aggregates`` on the
loaded parts, ``order="auto"``: one query's posting lists split by slot range over the
threads), p50 and p99. Measured on the same index and queries:

- ``one_thread``: ``order="query"``, each query on one thread (identical results, checked
  on the first ``--check`` queries);
- ``prune``: the query's words among the ``--prune`` most frequent ones skipped (stop
  words; this changes results, its mAP cost is measured on UKBench in docs/scale.md).

Usage::

    PYTHONPATH=src python benchmarks/bench_scale.py --sizes 10000 100000 1000000
    PYTHONPATH=src python benchmarks/bench_scale.py --one 1000000 --part 1000000 --queries 50 --check 3 --prune
    PYTHONPATH=src python benchmarks/bench_scale.py --quantize
    PYTHONPATH=src python benchmarks/bench_scale.py --refit ../shared/datasets/ukbench2000 --train-stride 5 --fit-words 8192
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import psutil
from numba import njit

from asmkit import Codebook, Index
from asmkit.kernel import Aggregates
from asmkit.search import merge_topk, score_aggregates

WORDS = 65536
DIM = 128
K_RESULTS = 100
#: Fitted by ``--refit`` (the command in docs/scale.md): document frequency by rank
#: df(r) ∝ (r / K + offset)^-shape, the spread of distinct words per database image
#: (coefficient of variation), and the distinct words of a query (``QUERY_DESCRIPTORS``
#: descriptors, multiple assignment as ``Params.ma_query``) over those of a database
#: image. ``DISTINCT_MEAN`` is the issue's figure (the UKBench images, with the sift
#: preset's descriptor cap, give more).
MODEL = {"shape": 3.271, "offset": 1.2177, "distinct_cv": 0.566, "query_ratio": 3.278}
DISTINCT_MEAN = 384
QUERY_DESCRIPTORS = 500
SEED = 1234


@njit(cache=True)
def _draw_words(cdf, word_of_rank, n_words, seed, offsets, out):
    """Distinct words per image, drawn by rank from ``cdf`` (rejecting repeats), sorted.

    Parameters
    ----------
    cdf : float64 [K]
        Cumulative word probability by rank (last = 1).
    word_of_rank : int64 [K]
    n_words : int64 [I]
        Distinct words of each image (each < K).
    seed : int
    offsets : int64 [I + 1]
    out : int64 [offsets[-1]]
        Filled with each image's words, ascending.
    """
    np.random.seed(seed)
    n_total = cdf.shape[0]
    taken = np.full(n_total, -1, dtype=np.int64)
    for i in range(n_words.shape[0]):
        begin = offsets[i]
        got = 0
        while got < n_words[i]:
            rank = min(np.searchsorted(cdf, np.random.random(), side="right"), n_total - 1)
            word = word_of_rank[rank]
            if taken[word] != i:
                taken[word] = i
                out[begin + got] = word
                got += 1
        out[begin : begin + got].sort()


class WordModel:
    """Synthetic ASMK* images: skewed distinct words, random packed 128-bit codes."""

    def __init__(self, model: dict, n_words: int = WORDS, seed: int = SEED) -> None:
        rank = np.arange(1, n_words + 1, dtype=np.float64) / n_words
        weight = (rank + model["offset"]) ** -model["shape"]
        self.cdf = np.cumsum(weight) / weight.sum()
        self.word_of_rank = np.random.default_rng(seed).permutation(n_words).astype(np.int64)
        self.model = model
        self.n_words = n_words

    def images(self, n_images: int, seed: int, mean: float) -> Aggregates:
        """``n_images`` images of about ``mean`` distinct words each.

        Returns
        -------
        Aggregates
            Words int64 ascending per image; codes uint64 [M, 2].
        """
        rng = np.random.default_rng(seed)
        counts = rng.normal(mean, self.model["distinct_cv"] * mean, n_images)
        counts = np.clip(np.rint(counts), 1, self.n_words // 2).astype(np.int64)
        offsets = np.zeros(n_images + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        words = np.empty(int(offsets[-1]), dtype=np.int64)
        _draw_words(self.cdf, self.word_of_rank, counts, seed, offsets, words)
        codes = rng.integers(0, np.iinfo(np.uint64).max, size=(words.shape[0], 2), dtype=np.uint64, endpoint=True)
        return Aggregates(offsets, words, codes)

    def queries(self, n_queries: int, seed: int) -> list[Aggregates]:
        """One single-image Aggregates per query (the words of 500 descriptors at m = 5)."""
        batch = self.images(n_queries, seed, DISTINCT_MEAN * self.model["query_ratio"])
        return [
            Aggregates(np.array([0, e - b], dtype=np.int64), batch.words[b:e], batch.data[b:e])
            for b, e in zip(batch.offsets[:-1], batch.offsets[1:])
        ]


def random_codebook(seed: int = SEED) -> Codebook:
    """K random unit centroids: the engine needs a codebook; scan costs do not depend on it."""
    centroids = np.random.default_rng(seed).standard_normal((WORDS, DIM)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return Codebook(centroids)


def peak_rss_gb() -> float:
    """The process's peak resident memory so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_gb() -> float:
    return psutil.Process().memory_info().rss / 2**30


def build_parts(model: WordModel, n_images: int, part: int, batch: int, folder: Path) -> dict:
    """Build and save the index parts of ``n_images`` images; time the adds alone."""
    codebook = random_codebook()
    add_s = gen_s = 0.0
    paths = []
    for first in range(0, n_images, part):
        index = Index(codebook)
        for begin in range(first, min(first + part, n_images), batch):
            end = min(begin + batch, first + part, n_images)
            t0 = time.perf_counter()
            images = model.images(end - begin, SEED + begin, DISTINCT_MEAN)
            t1 = time.perf_counter()
            index.add_aggregates(images, np.arange(begin, end, dtype=np.int64))
            t2 = time.perf_counter()
            gen_s, add_s = gen_s + t1 - t0, add_s + t2 - t1
            del images
        rss_built = rss_gb()
        paths.append(folder / f"part{len(paths)}")
        index.save(paths[-1])
        del index
    disk = sum(f.stat().st_size for p in paths for f in p.iterdir())
    return {"paths": paths, "add_s": add_s, "gen_s": gen_s, "rss_built_gb": rss_built, "disk": disk}


class Part:
    """One loaded index part, with the arrays a search reads (taken once, not per query)."""

    def __init__(self, path: Path, verify: bool) -> None:
        self.index = Index.load(path, mmap=True, verify=verify)
        self.ivf = self.index.inverted_file
        self.idf = self.index.idf
        self.sqrt_norms = np.sqrt(self.index.norms)
        self.ids = self.index.ids

    def search(self, query: Aggregates, order: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        return score_aggregates(
            self.ivf, self.idf, self.sqrt_norms, self.ids, query, self.index.params, dim=DIM, k=K_RESULTS, order=order
        )


def search_all(parts: list[Part], query: Aggregates, order: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """The whole database's top-k: every part searched, the results merged."""
    results = [p.search(query, order) for p in parts]
    return results[0] if len(results) == 1 else merge_topk(results, K_RESULTS)


def prune_query(query: Aggregates, stop: np.ndarray) -> Aggregates:
    """The query without its rows whose word is a stop word (bool [K])."""
    keep = ~stop[query.words]
    return Aggregates(np.array([0, int(keep.sum())], dtype=np.int64), query.words[keep], query.data[keep])


def latencies(fn, queries) -> dict:
    """p50 / p99 wall milliseconds of ``fn(query)`` over the queries, after one warm-up
    call, and the process CPU milliseconds per query (all threads): on a shared machine
    the wall time also counts the waits for a core, the CPU time does not."""
    fn(queries[0])
    times = []
    cpu0 = time.process_time()
    for query in queries:
        t0 = time.perf_counter()
        fn(query)
        times.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / len(queries)
    ms = np.array(times) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "cpu_ms": round(1e3 * cpu, 2),
    }


def run_size(n_images: int, args) -> dict:
    """All measurements at one size (run in a fresh process)."""
    model = WordModel(MODEL)
    folder = Path(tempfile.mkdtemp(prefix=f"scale{n_images}_", dir=args.tmp))
    try:
        built = build_parts(model, n_images, args.part, args.batch, folder)
        peak_build = peak_rss_gb()
        t0 = time.perf_counter()
        parts = [Part(p, verify=False) for p in built["paths"]]
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for p in built["paths"]:
            Index.load(p, mmap=True, verify=True)
        load_verify_s = time.perf_counter() - t0
        queries = model.queries(args.queries, SEED - 1)
        counts = np.zeros(WORDS, dtype=np.int64)
        for p in parts:
            counts += p.ivf.counts
        entries = [int(counts[q.words].sum()) for q in queries]
        out = {
            "images": n_images,
            "parts": len(parts),
            "entries": int(counts.sum()),
            "build_img_per_s": round(n_images / built["add_s"], 1),
            "generate_s": round(built["gen_s"], 1),
            "add_s": round(built["add_s"], 1),
            "peak_rss_build_gb": round(peak_build, 2),
            "rss_built_gb": round(built["rss_built_gb"], 2),
            "bytes_per_image": round(built["disk"] / n_images, 1),
            "load_mmap_s": round(load_s, 3),
            "load_verify_s": round(load_verify_s, 3),
            "query_words": round(float(np.mean([q.words.shape[0] for q in queries])), 1),
            "entries_per_query": int(np.mean(entries)),
            "max_df": int(counts.max()),
        }
        out["query"] = latencies(lambda q: search_all(parts, q), queries)
        threads = numba.get_num_threads()
        if args.check:
            for q in queries[: args.check]:
                split, plain = search_all(parts, q), search_all(parts, q, "query")
                assert np.array_equal(plain[1], split[1]) and np.array_equal(plain[0], split[0]), "split differs"
        out["one_thread"] = latencies(lambda q: search_all(parts, q, "query"), queries)
        for fraction in args.prune:
            stop = np.zeros(WORDS, dtype=bool)
            stop[np.argsort(counts)[::-1][: round(fraction * WORDS)]] = True
            pruned = [prune_query(q, stop) for q in queries]
            kept = np.mean([int(counts[q.words].sum()) / max(e, 1) for q, e in zip(pruned, entries)])
            out[f"prune{fraction}"] = {
                **latencies(lambda q: search_all(parts, q), pruned),
                "entries_kept": round(float(kept), 3),
            }
        out["rss_after_queries_gb"] = round(rss_gb(), 2)
        out["peak_rss_gb"] = round(peak_rss_gb(), 2)
        out["threads"], out["load_avg"] = threads, round(os.getloadavg()[0], 1)
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fit_rank_curve(df: np.ndarray) -> tuple[float, float]:
    """(shape, offset) of df(r) ∝ (r / K + offset)^-shape, least squares on log df.

    Parameters
    ----------
    df : int64 [K]
        Document frequency of each word (any order).
    """
    from scipy.optimize import least_squares

    ranked = np.sort(df)[::-1].astype(np.float64)
    ranked = ranked[ranked > 0]
    rel = np.arange(1, ranked.shape[0] + 1) / df.shape[0]
    target = np.log(ranked / ranked[0])

    def residual(p):
        curve = -p[0] * np.log(rel + np.exp(p[1]))
        return curve - curve[0] - target

    fit = least_squares(residual, x0=[1.0, np.log(0.01)])
    return float(fit.x[0]), float(np.exp(fit.x[1]))


def refit(dataset: str, train_stride: int, n_words: int) -> dict:
    """Fit ``MODEL`` on real RootSIFT (the ``sift`` preset's extractor).

    A codebook of ``n_words`` words is trained on every ``train_stride``-th image; every
    image is then quantized with m = 1 (database side: document frequencies, distinct
    words per image) and its first 500 descriptors with m = 5 (query side).
    """
    from asmkit.features import SiftExtractor, list_images, load_image

    paths = list_images(Path(dataset) / "images")
    extractor = SiftExtractor(max_features=1000)
    feats = [extractor.extract(load_image(p)).descriptors for p in paths]
    codebook = Codebook.train(np.concatenate(feats[::train_stride]), n_words)
    db_words = [np.unique(codebook.quantize(f, 1)) for f in feats]
    query_words = [np.unique(codebook.quantize(f[:QUERY_DESCRIPTORS], 5)) for f in feats]
    shape, offset = fit_rank_curve(np.bincount(np.concatenate(db_words), minlength=n_words))
    distinct = np.array([w.shape[0] for w in db_words], dtype=np.float64)
    ratio = float(np.mean([q.shape[0] / max(d.shape[0], 1) for q, d in zip(query_words, db_words)]))
    return {
        "shape": round(shape, 3),
        "offset": round(offset, 4),
        "distinct_cv": round(float(distinct.std() / distinct.mean()), 3),
        "query_ratio": round(ratio, 3),
        "images": len(paths),
        "distinct_mean": round(float(distinct.mean()), 1),
    }


def time_quantize() -> dict:
    """One query's quantization: 500 random descriptors, m = 5, against K random words."""
    codebook = random_codebook()
    vecs = np.random.default_rng(SEED).standard_normal((QUERY_DESCRIPTORS, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    codebook.quantize(vecs, 5)
    times, cpu = [], []
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time()
        codebook.quantize(vecs, 5)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "quantize_500x5_ms": round(1e3 * float(np.median(times)), 1),
        "cpu_ms": round(1e3 * float(np.median(cpu)), 1),
        "threads": numba.get_num_threads(),
        "load_avg": round(os.getloadavg()[0], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000, 1000000])
    parser.add_argument("--part", type=int, default=250000, help="images per index part")
    parser.add_argument("--batch", type=int, default=50000, help="images per add_aggregates call")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--prune", type=float, nargs="*", default=[0.01], help="stop-word fractions of K")
    parser.add_argument("--check", type=int, default=20, help="queries whose split and one-thread results are compared")
    parser.add_argument("--tmp", default=None, help="folder for the saved parts")
    parser.add_argument("--quantize", action="store_true")
    parser.add_argument("--refit", metavar="DATASET", help="fit MODEL on this UKBench folder and print it")
    parser.add_argument("--train-stride", type=int, default=5, help="--refit: codebook trained on every n-th image")
    parser.add_argument("--fit-words", type=int, default=8192, help="--refit: codebook size")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.refit:
        print(json.dumps(refit(args.refit, args.train_stride, args.fit_words)))
        return
    if args.quantize:
        print(json.dumps(time_quantize()))
        return
    if args.one:
        print(json.dumps(run_size(args.one, args)))
        return
    for n in args.sizes:
        child = [
            sys.executable,
            __file__,
            "--one",
            str(n),
            "--part",
            str(args.part),
            "--batch",
            str(args.batch),
            "--queries",
            str(args.queries),
            "--check",
            str(args.check),
            "--prune",
            *map(str, args.prune),
        ]
        if args.tmp:
            child += ["--tmp", args.tmp]
        print(subprocess.run(child, check=True, capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
