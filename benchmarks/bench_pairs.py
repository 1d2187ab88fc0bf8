"""All-vs-all pairs without the dense matrix: time and peak memory of sparse scores and
scene graphs on synthetic images, through the code path of ``asmkit pairs IMAGES``.

Images are made at descriptor level, one block at a time, so that the descriptors of all
images are never in memory together (as ``asmkit pairs`` reads them from its feature
store): image ``i`` belongs to scene ``i // 4``; half of its descriptors are its scene's
patterns plus noise, half random modes. Then, as ``asmkit.pipeline`` does for
``asmkit pairs IMAGES``:

1. ``Index.add`` in blocks of images (ids = list positions);
2. ``asmkit.pipeline.index_topk``: each image's ``--top`` best other images, query blocks
   of ``--chunk`` images scored against the index (the block's ``[chunk, N]`` float32 tile
   is the only N-wide array);
3. ``asmkit.pairs.pair_indices`` for each ``--graph``, with
   ``asmkit.pipeline.anchor_scorer`` scoring the anchors of ``retrieval`` graphs one at a
   time.

The codebook is trained first (faiss k-means on ``--train`` sampled descriptors) and is not
part of the timings. Peak memory is the process's maximum resident set size
(``ru_maxrss``), imports included. ``--check-dense`` also builds the dense matrix
(``asmkit.similarity_matrix``) and checks that every graph is identical: keep N small
then. Example (from the repository root)::

    python -m benchmarks.bench_pairs --images 20000 --per-image 200 --codebook-size 1024 \\
        --top 20 --graph knn-20 retrieval-50-20 sequential-5+retrieval-10
    python -m benchmarks.bench_pairs --images 600 --check-dense
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from asmkit import Codebook, Index
from asmkit.pairs import pair_indices
from asmkit.params import as_params
from asmkit.pipeline import anchor_scorer, index_topk

from ._common import command_line, machine_info, machine_line, max_rss_mib, write_json


class Images:
    """Synthetic images made on demand: ``images(range(b, e))`` -> list of float32 [n, D]."""

    def __init__(self, per_image: int, dim: int, seed: int) -> None:
        self.per_image, self.dim, self.seed = per_image, dim, seed
        rng = np.random.default_rng(seed)
        self.modes = rng.standard_normal((max(64, 4 * per_image), dim)).astype(np.float32)

    def __call__(self, rows) -> list[np.ndarray]:
        out = []
        n_shared = self.per_image // 2
        for i in rows:
            scene = np.random.default_rng([self.seed, 1, i // 4])
            own = np.random.default_rng([self.seed, 2, i])
            picks = np.concatenate(
                [scene.choice(len(self.modes), n_shared), own.choice(len(self.modes), self.per_image - n_shared)]
            )
            vecs = self.modes[picks] + 0.3 * own.standard_normal((self.per_image, self.dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            out.append(vecs)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000, help="synthetic images (N)")
    parser.add_argument("--per-image", type=int, default=200, help="descriptors per image")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--train", type=int, default=65536, help="descriptors k-means trains on")
    parser.add_argument("--preset", default="sift", help="ASMK parameters of this preset")
    parser.add_argument("--top", type=int, default=20, help="neighbours kept per image")
    parser.add_argument("--graph", nargs="+", default=["knn-20", "retrieval-50-20", "sequential-5+retrieval-10"])
    parser.add_argument("--chunk", type=int, default=256, help="query images per scored block")
    parser.add_argument("--add-block", type=int, default=2048, help="images per Index.add call")
    parser.add_argument("--check-dense", action="store_true", help="compare every graph with the dense matrix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, help="also write the results here")
    args = parser.parse_args()

    images = Images(args.per_image, args.dim, args.seed)
    n = args.images
    params = as_params(args.preset)
    train_images = np.random.default_rng(args.seed).choice(n, min(n, -(-args.train // args.per_image)), replace=False)
    train = np.concatenate(images(np.sort(train_images)))[: args.train]
    t0 = time.perf_counter()
    codebook = Codebook.train(train, args.codebook_size, seed=args.seed)
    del train
    result = {
        "command": command_line(),
        "machine": machine_info(),
        "images": n,
        "per_image": args.per_image,
        "codebook_size": args.codebook_size,
        "top": args.top,
        "codebook_s": time.perf_counter() - t0,
        "rss_after_codebook_mib": max_rss_mib(),
    }

    t0 = time.perf_counter()
    index = Index(codebook, params)
    for begin in range(0, n, args.add_block):
        rows = range(begin, min(begin + args.add_block, n))
        index.add(images(rows), np.asarray(rows, dtype=np.int64))
    result["index_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sparse = index_topk(index, images, args.top, chunk=args.chunk)
    result["topk_s"] = time.perf_counter() - t0
    result["graphs"] = {}
    row = anchor_scorer(index, images)
    for graph in args.graph:
        t0 = time.perf_counter()
        pairs = pair_indices(sparse, graph, anchor_row=row)
        result["graphs"][graph] = {"pairs": len(pairs), "s": time.perf_counter() - t0}
    result["peak_rss_mib"] = max_rss_mib()
    # Scene mates (i // 4) among each image's first 3 neighbours: the synthetic data are
    # retrievable, so the graphs are not made of noise.
    first = sparse.ids[:, :3]
    result["scene_recall_at_3"] = float(np.mean(first // 4 == np.arange(n)[:, None] // 4))
    if args.check_dense:
        from asmkit import similarity_matrix

        dense = similarity_matrix(codebook, images(range(n)), params=params)
        result["dense_identical"] = all(
            np.array_equal(pair_indices(dense, g), pair_indices(sparse, g, anchor_row=row)) for g in args.graph
        )
    print(machine_line(result["machine"]))
    print(
        f"{n} images x {args.per_image} descriptors, K={args.codebook_size}, top {args.top}: "
        f"index {result['index_s']:.1f}s, top-k {result['topk_s']:.1f}s, peak RSS {result['peak_rss_mib']:.0f} MiB "
        f"(after the codebook {result['rss_after_codebook_mib']:.0f} MiB); scene recall@3 "
        f"{result['scene_recall_at_3']:.3f}"
    )
    for graph, g in result["graphs"].items():
        print(f"  {graph}: {g['pairs']} pairs in {g['s']:.1f}s")
    if "dense_identical" in result:
        print(f"identical to the dense matrix's graphs: {result['dense_identical']}")
    write_json(Path(args.json) if args.json else None, result)


if __name__ == "__main__":
    main()
