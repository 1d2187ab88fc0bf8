"""asmkit on a CUDA GPU (through torch) against the CPU, in one run on one machine.

Times, on synthetic clustered descriptors (``asmkit._synthetic``):

- quantization of the database (MA 1) and of the query images (MA 5, one segment per
  image): faiss ``IndexFlatL2`` as the reference calls it (one call for the database,
  one per query image, on a sample of images), asmkit on the CPU, asmkit with
  ``Codebook(..., gpu=0)``; and how many rows get other words than faiss's;
- ``Index.add`` and a batched ``Index.search`` with the CPU and the GPU codebook, and
  whether their results are equal;
- optionally (``--deep``) the EfficientNet-Lite0 extractor on the CPU and on CUDA
  (float16 autocast): images per second, and the cosine of the global descriptors.

- ``--profile``: where the time of ``Codebook(..., gpu=0).quantize`` goes (cProfile, the
  top entries), for the database (MA 1) and the query images (MA 5).

Needs a CUDA build of torch; faiss may be faiss-cpu (the GPU path then goes through
torch). Without a GPU, ``Codebook(gpu=0)`` warns and runs on the CPU, and the results say
so (``gpu_active``: false): a smoke run only. Prints JSON lines, writes JSON (``--out``)::

    python -m benchmarks.bench_gpu --synthetic 2000 --per-image 1000 --codebook-size 4096 \
        --big-codebook 65536 --deep
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

import numpy as np

from benchmarks._common import (
    add_data_args,
    add_run_args,
    best_of,
    command_line,
    load_data,
    machine_info,
    sample_rows,
    write_json,
)


def _timed(fn, *args, repeat=1, sync=None, **kwargs):
    return best_of(lambda: fn(*args, **kwargs), repeat, sync=sync)


def _differing(words, expected):
    """Rows whose first word or whose set of words differs."""
    first = words[:, 0] != expected[:, 0]
    sets = np.any(np.sort(words, axis=1) != np.sort(expected, axis=1), axis=1)
    return int(np.count_nonzero(first | sets))


def quantization(vecs, ids, centroids, query_images, label, out):
    import faiss

    from asmkit import Codebook

    k = len(centroids)
    flat = faiss.IndexFlatL2(centroids.shape[1])
    flat.add(centroids)
    cpu, gpu = Codebook(centroids), Codebook(centroids, gpu=0)
    gpu.quantize(vecs[:4096], 5)  # warm-up: CUDA context, cuBLAS handles, the codebook's upload
    cpu.quantize(vecs[:4096], 5)
    t_faiss, ref_db = _timed(lambda: flat.search(vecs, 1)[1])
    t_cpu, cpu_db = _timed(cpu.quantize, vecs, 1)
    t_gpu, gpu_db = _timed(gpu.quantize, vecs, 1)
    # Queries: the reference searches each image in its own call (timed on a sample).
    starts = np.searchsorted(ids, np.arange(ids.max() + 2))
    picked = np.linspace(0, len(starts) - 2, num=query_images).astype(int)
    t_ref_q = 0.0
    for i in picked:
        t, _ = _timed(flat.search, vecs[starts[i] : starts[i + 1]], 5)
        t_ref_q += t
    t_ref_q /= len(picked)
    segments = starts
    t_cpu_q, cpu_q = _timed(cpu.quantize, vecs, 5, segments=segments, nearest_first=False)
    t_gpu_q, gpu_q = _timed(gpu.quantize, vecs, 5, segments=segments, nearest_first=False)
    ref_q = np.concatenate([flat.search(vecs[starts[i] : starts[i + 1]], 5)[1] for i in range(len(starts) - 1)])
    n_img = len(starts) - 1
    out[label] = {
        "codebook_size": k,
        "rows": len(vecs),
        "database_faiss_s": t_faiss,
        "database_asmkit_cpu_s": t_cpu,
        "database_asmkit_gpu_s": t_gpu,
        "database_rows_differing_cpu": _differing(cpu_db, ref_db),
        "database_rows_differing_gpu": _differing(gpu_db, ref_db),
        "query_faiss_per_image_ms": 1e3 * t_ref_q,
        "query_asmkit_cpu_per_image_ms": 1e3 * t_cpu_q / n_img,
        "query_asmkit_gpu_per_image_ms": 1e3 * t_gpu_q / n_img,
        # Query-side MA only uses the set of words: compare sets.
        "query_rows_differing_gpu": int(np.count_nonzero(np.any(np.sort(gpu_q, 1) != np.sort(ref_q, 1), 1))),
        "query_rows_differing_cpu": int(np.count_nonzero(np.any(np.sort(cpu_q, 1) != np.sort(ref_q, 1), 1))),
    }


def engine(vecs, ids, centroids, n_queries, out):
    from asmkit import Codebook, Index

    res = {}
    results = []
    q_rows = ids < n_queries
    for name, gpu in (("cpu", None), ("gpu", 0)):
        book = Codebook(centroids, gpu=gpu)
        warm = Index(book)  # numba's kernels compile on first use
        warm.add(vecs[:4096], ids[:4096])
        warm.search(vecs[:2048], ids[:2048], k=10)
        index = Index(book)
        t_add, _ = _timed(index.add, vecs, ids)
        t_q, found = _timed(index.search, vecs[q_rows], ids[q_rows], k=100)
        res[f"build_{name}_s"] = t_add
        res[f"query_{name}_ms"] = 1e3 * t_q / n_queries
        results.append(found)
    res["ranks_equal"] = bool(np.array_equal(results[0][1], results[1][1]))
    res["max_score_diff"] = float(
        np.max(
            np.abs(
                np.where(np.isfinite(results[0][0]), results[0][0], 0)
                - np.where(np.isfinite(results[1][0]), results[1][0], 0)
            )
        )
    )
    out["engine"] = res


def deep(out, n_images=64):
    import torch
    from skimage import data as skdata
    from skimage.transform import resize

    from asmkit.features.factory import deep_extractor

    names = ["astronaut", "coffee", "chelsea", "rocket"]
    images = []
    for i in range(n_images):
        img = getattr(skdata, names[i % len(names)])()
        img = (resize(img, (480, 640), anti_aliasing=True) * 255).astype(np.uint8)
        images.append(np.ascontiguousarray(np.roll(img, 7 * i, axis=1)))  # distinct inputs
    res = {}
    feats = {}
    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        ex = deep_extractor(device=device, batch_size=16)
        ex.extract_batch(images[:16])  # warm-up (cuDNN autotuning, allocations)
        sync = torch.cuda.synchronize if device == "cuda" else None
        t, got = _timed(ex.extract_batch, images, sync=sync, repeat=2)
        res[f"{device}_images_per_s"] = n_images / t
        feats[device] = got
    res["torch_threads_cpu"] = torch.get_num_threads()
    out["deep"] = res
    if "cuda" not in feats:
        return
    g_cpu = np.stack([f.global_descriptor for f in feats["cpu"]])
    g_gpu = np.stack([f.global_descriptor for f in feats["cuda"]])
    cos = np.sum(g_cpu * g_gpu, 1) / (np.linalg.norm(g_cpu, axis=1) * np.linalg.norm(g_gpu, axis=1))
    res["global_cosine_min"] = float(cos.min())
    res["local_counts_equal"] = all(
        len(a.descriptors) == len(b.descriptors) for a, b in zip(feats["cpu"], feats["cuda"])
    )


def profile(vecs, starts, centroids, out, top=12):
    """cProfile of ``Codebook(centroids, gpu=0).quantize``: database (MA 1), queries (MA 5)."""
    from asmkit import Codebook

    book = Codebook(centroids, gpu=0)
    book.quantize(vecs[:4096], 5)  # warm-up
    res = {}
    for m, segments in ((1, None), (5, starts)):
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.enable()
        book.quantize(vecs, m, segments=segments, nearest_first=m == 1)
        prof.disable()
        res[f"m{m}_s"] = time.perf_counter() - start
        print(f"quantize m = {m}: {res[f'm{m}_s']:.3f} s")
        pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    out["profile"] = res


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(parser, synthetic=2000, per_image=1000)
    add_run_args(parser, repeat=None)
    parser.add_argument("--codebook-size", type=int, default=4096)
    parser.add_argument("--big-codebook", type=int, default=0, help="also time quantization alone with K words")
    parser.add_argument("--query-images", type=int, default=200, help="query images timed for faiss per call")
    parser.add_argument("--engine-queries", type=int, default=500)
    parser.add_argument("--deep", action="store_true", help="also the EfficientNet-Lite0 extractor, CPU vs CUDA")
    parser.add_argument("--profile", action="store_true", help="only cProfile the GPU quantizer")
    args = parser.parse_args(argv)

    import torch

    from asmkit import Codebook
    from asmkit.gpu import cuda_device_count

    out = {
        "command": command_line(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_active": bool(cuda_device_count()),
        "torch": torch.__version__,
        "machine": machine_info(),
    }
    data = load_data(args)
    vecs, ids, starts = data.vecs, data.image_ids, data.starts()
    out["source"] = data.source
    sample = sample_rows(vecs, 100 * args.codebook_size // 4, 0)
    t_train = time.perf_counter()
    centroids = Codebook.train(sample, args.codebook_size, iters=10).centroids
    out["codebook_train_cpu_s"] = time.perf_counter() - t_train
    if args.profile:
        profile(vecs, starts, centroids, out)
        write_json(args.out, out)
        return
    quantization(vecs, ids, centroids, args.query_images, "quantize", out)
    print(json.dumps(out["quantize"]), flush=True)
    engine(vecs, ids, centroids, args.engine_queries, out)
    print(json.dumps(out["engine"]), flush=True)
    if args.big_codebook:
        # Descriptors as words: the quantization cost does not depend on how they were made.
        rng = np.random.default_rng(0)
        big = vecs[rng.choice(len(vecs), args.big_codebook, replace=False)] + np.float32(1e-3)
        rows = int(starts[min(200, len(starts) - 1)])  # the first 200 images
        quantization(vecs[:rows], ids[:rows], big, 20, "quantize_big", out)
        print(json.dumps(out["quantize_big"]), flush=True)
    if args.deep:
        deep(out)
    print(json.dumps(out, indent=1))
    write_json(args.out, out)


if __name__ == "__main__":
    main()
