"""Time RootSIFT extraction of the UKBench-2000 images (issue "Local features" target: <= 60 s).

    nice -n 10 .venv/bin/python benchmarks/bench_sift.py [--data DIR] [--workers N] [--store PATH]

Prints wall time, images/s and descriptors per image. With --store the descriptors are also
written to an HDF5 feature store (what the study script reuses).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import time
from pathlib import Path

import cv2
import numpy as np

from asmkit.features import FeatureStore, SiftExtractor, extract_features, list_images


def result_workers(workers: int | None) -> int:
    return workers if workers is not None else min(4, os.cpu_count() or 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/datasets/ukbench2000/images")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--max-features", type=int, default=1000)
    parser.add_argument("--store", default=None, help="also write an HDF5 feature store here (overwritten)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    paths = list_images(args.data)
    extractor = SiftExtractor(max_features=args.max_features, root=True)
    store = None
    if args.store:
        Path(args.store).unlink(missing_ok=True)
        store = FeatureStore(args.store, extractor.config())
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = extract_features(paths, extractor, root=args.data, store=store, workers=args.workers, progress=False, keep=False)
    seconds = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    load = os.getloadavg()[0]
    counts = [len(store.get(n)) for n in result.extracted] if store else []
    if store:
        store.close()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; opencv {cv2.__version__}")
    print(f"images: {len(result.extracted)} extracted, {len(result.failed)} failed")
    print(f"wall time: {seconds:.1f} s  ({result.images_per_second:.1f} images/s); load average {load:.1f}")
    # On a shared machine the wall time depends on the other jobs; CPU time / cores is the
    # wall time this run would take with the cores to itself.
    print(f"CPU time: {cpu:.1f} s, i.e. {cpu / min(os.cpu_count() or 1, result_workers(args.workers)):.1f} s on idle cores")
    if counts:
        print(f"descriptors per image: mean {np.mean(counts):.1f}, total {int(np.sum(counts))}")


if __name__ == "__main__":
    main()
