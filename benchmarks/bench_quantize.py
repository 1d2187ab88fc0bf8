"""Quantization of a database and its queries: time, tied rows, and whether the words
depend on how the descriptors are batched.

Times ``Codebook.assign(...).settle()`` as the engine calls it: the database side
(``Index.add``: m = ``--ma-database``, one call), the query side (``Index.search``: m =
``--ma-query``, each image its own segment, only the set of words) and both at once
(``similarity_matrix``: m = ``--ma-query`` per image, nearest word first). Then the query
words again with the images in blocks of ``--block`` images, one image per call, and on one
faiss / numba thread, and the database words in blocks of ``--block`` images: the rows
whose words (nearest word, or set of m) differ from the single call's are counted; with
``--faiss`` also those that differ from faiss called as the reference calls it. Run as::

    python -m benchmarks.bench_quantize --data ../shared/datasets/ukbench2000 --per-image 1000 \
        --codebook CODEBOOK.asmkit

Without ``--codebook`` a codebook of ``--codebook-size`` words is trained with faiss on
128 descriptors per word (seeded) and kept under ``--cache``.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import faiss
import numba
import numpy as np

from asmkit import Codebook

from ._common import Recorder, add_data_args, add_run_args, command_line, load_data, sample_rows, timed, write_json


def _codebook(args, vecs: np.ndarray) -> Codebook:
    if args.codebook is not None:
        return Codebook.load(args.codebook)
    key = hashlib.sha256(f"{vecs.shape}{vecs[:: max(1, len(vecs) // 997)].tobytes()!r}".encode()).hexdigest()[:12]
    path = args.cache / f"quantize-codebook-{args.codebook_size}-{key}.asmkit"
    if path.is_dir():
        return Codebook.load(path)
    book = Codebook.train(sample_rows(vecs, 128 * args.codebook_size, args.seed), args.codebook_size)
    book.save(path)
    return book


def _differ(words: np.ndarray, expected: np.ndarray, nearest_first: bool) -> int:
    """Rows whose set of words (and with ``nearest_first`` nearest word) differ."""
    rows = np.any(np.sort(words, axis=1) != np.sort(expected, axis=1), axis=1)
    if nearest_first:
        rows |= words[:, 0] != expected[:, 0]
    return int(rows.sum())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, synthetic=1000, per_image=1000)
    add_run_args(parser, repeat=1)
    parser.add_argument("--codebook", type=Path, help="codebook (.asmkit) to quantize with")
    parser.add_argument("--codebook-size", type=int, default=4096, help="words when training one (default 4096)")
    parser.add_argument("--ma-database", type=int, default=1)
    parser.add_argument("--ma-query", type=int, default=5)
    parser.add_argument("--block", type=int, default=256, help="images per call for the batching check")
    parser.add_argument("--faiss", action="store_true", help="also count the rows whose words differ from faiss's")
    args = parser.parse_args(argv)

    data = load_data(args)
    vecs, starts = data.vecs, data.starts()
    book = _codebook(args, vecs)
    record = Recorder()
    record("command", command_line())
    record("descriptors", len(vecs), f"rows of {data.n_images} images ({data.source})")
    record("codebook", book.size, "words")
    book.quantize(vecs[:2000], args.ma_query)  # numba compilation and the bound's tables

    def run(m, segments=None, nearest_first=True):
        def call():
            assignment = book.assign(vecs, m, segments=segments, nearest_first=nearest_first)
            tied = assignment.tied.size
            return assignment.settle(), tied

        timing = timed(call, args.repeat)
        return timing, *timing.result

    cases = {
        "database": (args.ma_database, None, True),
        "query": (args.ma_query, starts, False),
        "both": (args.ma_query, starts, True),
    }
    words = {}
    for name, (m, segments, nearest_first) in cases.items():
        timing, words[name], tied = run(m, segments, nearest_first)
        record(f"{name} (m={m}): wall", timing.best, "s")
        record(f"{name} (m={m}): cpu", timing.cpu, "s")
        record(f"{name} (m={m}): tied rows", tied)

    # The query words again, batched otherwise: per block of images, per image, one thread.
    expected = words["query"]
    got = np.empty_like(expected)
    for begin in range(0, data.n_images, args.block):
        end = min(begin + args.block, data.n_images)
        seg = starts[begin : end + 1] - starts[begin]
        got[starts[begin] : starts[end]] = book.quantize(
            vecs[starts[begin] : starts[end]], args.ma_query, segments=seg, nearest_first=False
        )
    record(f"query: rows differing, blocks of {args.block} images", _differ(got, expected, False))
    for i in range(data.n_images):
        got[starts[i] : starts[i + 1]] = book.quantize(
            vecs[starts[i] : starts[i + 1]], args.ma_query, nearest_first=False
        )
    record("query: rows differing, one call per image", _differ(got, expected, False))
    # The database words with the images in blocks (as Ray workers or Index.add in parts
    # quantize them).
    database = np.empty_like(words["database"])
    for begin in range(0, data.n_images, args.block):
        rows = slice(starts[begin], starts[min(begin + args.block, data.n_images)])
        database[rows] = book.quantize(vecs[rows], args.ma_database)
    record(f"database: rows differing, blocks of {args.block} images", _differ(database, words["database"], True))
    threads = numba.get_num_threads(), faiss.omp_get_max_threads()
    numba.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        _, one_thread, _ = run(args.ma_query, starts, False)
        _, database_one_thread, _ = run(args.ma_database)
    finally:
        numba.set_num_threads(threads[0])
        faiss.omp_set_num_threads(threads[1])
    record("query: rows differing, one thread", _differ(one_thread, expected, False))
    record("database: rows differing, one thread", _differ(database_one_thread, words["database"], True))
    if args.faiss:
        # faiss called as the reference calls it: the database in one call, each query image
        # in its own; a row differs only where float32 rounding decides its words.
        flat = faiss.IndexFlatL2(book.dim)
        flat.add(book.centroids)
        reference = flat.search(vecs, args.ma_database)[1]
        record("database: rows differing from faiss's one call", _differ(reference, words["database"], True))
        reference = np.concatenate(
            [flat.search(vecs[starts[i] : starts[i + 1]], args.ma_query)[1] for i in range(data.n_images)]
        )
        record("query: rows differing from faiss's call per image", _differ(reference, expected, False))
    write_json(args.out, record.values)


if __name__ == "__main__":
    main()
