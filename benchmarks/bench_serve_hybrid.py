"""Search latency of a served hybrid workspace against its members served alone.

In-process, one query at a time (no HTTP): for each query image, the features
(``featurize``: every member's extractor for the hybrid) and the search (``search``: every
member's similarity row, fused, for the hybrid; ``Index.search`` for a member alone).
Builds the hybrid workspace first when ``--index`` does not exist::

    python -m benchmarks.bench_serve_hybrid --index bench_out/hybrid_large \\
        --images bench_out/robust_large/images --preset hybrid_fast --queries 50

Query images: the first ``--queries`` files of ``--images`` (sorted by name) whose names
hold neither ``__`` nor ``distractor`` (the originals of a robustness set), else any.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from asmkit.features import list_images
from asmkit.pipeline import build_index, workspace_hybrid
from asmkit.serve import ServedHybrid, ServedIndex, Settings


def measure(served, images: list[Path], k: int) -> dict[str, float]:
    """p50 / p90 milliseconds of featurize and search over ``images``."""
    features, search = [], []
    for path in images:
        data = path.read_bytes()
        t0 = time.perf_counter()
        vecs = served.featurize(data)
        t1 = time.perf_counter()
        served.search(vecs, k)
        features.append(t1 - t0)
        search.append(time.perf_counter() - t1)
    ms = lambda xs, q: 1000.0 * float(np.quantile(xs, q))  # noqa: E731
    return {
        "features_p50_ms": ms(features, 0.5),
        "search_p50_ms": ms(search, 0.5),
        "search_p90_ms": ms(search, 0.9),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, type=Path, help="hybrid workspace (built from --images if missing)")
    parser.add_argument("--images", required=True, type=Path, help="images to index, and the queries")
    parser.add_argument("--preset", default="hybrid_fast", help="hybrid preset when building")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args(argv)
    if not (args.index / "pipeline.json").exists():
        t0 = time.perf_counter()
        build_index(args.images, out=args.index, preset=args.preset)
        print(f"built {args.index} in {time.perf_counter() - t0:.0f} s", flush=True)
    spec = workspace_hybrid(args.index)
    if spec is None:
        parser.error(f"--index: {args.index} is not a hybrid workspace")
    paths = [Path(p) for p in list_images(args.images)]
    originals = [p for p in paths if "__" not in p.name and "distractor" not in p.name] or paths
    queries = sorted(originals)[: args.queries]
    runs = [("hybrid", lambda: ServedHybrid(args.index, Settings()))]
    runs += [(m, lambda m=m: ServedIndex(args.index / m, Settings())) for m in spec.members]
    results = {}
    for label, open_served in runs:
        served = open_served()
        try:
            results[label] = measure(served, queries, args.k)
            images = len(served)
        finally:
            served.close()
        r = results[label]
        print(
            f"{label:10s} {images} images: features p50 {r['features_p50_ms']:.1f} ms, "
            f"search p50 {r['search_p50_ms']:.1f} ms, p90 {r['search_p90_ms']:.1f} ms",
            flush=True,
        )
    members = sum(results[m]["search_p50_ms"] for m in spec.members)
    print(f"hybrid search / sum of the members' searches: {results['hybrid']['search_p50_ms'] / members:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
