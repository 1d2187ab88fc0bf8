"""What every benchmark script shares: timing, memory, the machine, input data, arguments.

Input data comes from one of three flags (``add_data_args``):

- ``--synthetic N``: N images of clustered synthetic descriptors (``asmkit._synthetic``,
  scenes of 4 images);
- ``--data DIR``: a UKBench-style folder (``gt.json`` + ``images/``). OpenCV SIFT (at most
  ``--per-image`` keypoints) + RootSIFT of every image, computed once and cached as an
  ``.npz`` under ``--cache`` (default ``~/.cache/asmkit/benchmarks``);
- ``--descriptors FILE``: an ``.npz`` with ``vecs`` float32 [N, D] and ``image_ids`` [N]
  (the cache ``--data`` writes is one).

Rows come back grouped by image (stable sort by id).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_CACHE = Path.home() / ".cache" / "asmkit" / "benchmarks"

# -- timing ------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall seconds of ``repeat`` calls: the best (minimum) and the median, the minimum
    process CPU seconds (all threads), and the last call's result."""

    best: float
    median: float
    cpu: float
    result: object


def timed(fn, repeat: int = 1, *, sync=None) -> Timing:
    """Call ``fn()`` ``repeat`` times; ``sync()`` (e.g. ``torch.cuda.synchronize``) runs
    before each clock stops."""
    walls, cpus, out = [], [], None
    for _ in range(max(1, repeat)):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        if sync is not None:
            sync()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return Timing(min(walls), statistics.median(walls), min(cpus), out)


def best_of(fn, repeat: int = 1, *, sync=None) -> tuple[float, object]:
    """(minimum wall seconds over ``repeat`` calls, the last result)."""
    t = timed(fn, repeat, sync=sync)
    return t.best, t.result


# -- memory ------------------------------------------------------------------------------------


def traced_peak_mib(fn) -> float:
    """Peak of the Python/NumPy allocations made while ``fn()`` runs (tracemalloc), MiB."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB; NaN elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def max_rss_mib() -> float:
    """Peak RSS of this process so far (``ru_maxrss``, never reset), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class StagePeak:
    """Peak RSS above the RSS at entry, for one ``with`` block (``extra_mb``).

    Linux: the high-water mark is reset through /proc/self/clear_refs; where that is not
    permitted, ``extra_mb`` is the process's peak so far minus the entry RSS."""

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        except OSError:
            pass
        self.start = status_mib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.extra_mb = status_mib("VmHWM") - self.start
        return False


# -- machine -----------------------------------------------------------------------------------


def machine_info(*, gpu: bool = False) -> dict:
    """CPU model, core counts, library versions and thread counts; CUDA devices if ``gpu``."""
    import faiss
    import numba

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "asmkit": _version("asmkit"),
        "asmk": _version("asmk"),
    }
    if gpu:
        info["cuda_devices"] = cuda_devices()
    return info


def machine_line(info: dict) -> str:
    return (
        f"{info['cpu_model']}, {info['cores']} cores, load {info['load_average_1min']:.1f}; "
        f"faiss {info['faiss']} ({info['faiss_threads']} threads), numba {info['numba']} "
        f"({info['numba_threads']} threads), numpy {info['numpy']}, asmk {info['asmk']}"
    )


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def cuda_devices() -> list[str]:
    """Names of the CUDA devices torch sees (empty without a CUDA build of torch)."""
    from asmkit.gpu import cuda_device_count

    if not cuda_device_count():
        return []
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


# -- input data --------------------------------------------------------------------------------


@dataclass
class Data:
    """Descriptors float32 [N, D] with their image ids int64 [N] (rows grouped by image)."""

    vecs: np.ndarray
    image_ids: np.ndarray
    source: str
    group_size: int | None = 4  # UKBench and the synthetic scenes: groups of 4 images

    @property
    def n_images(self) -> int:
        return int(np.unique(self.image_ids).shape[0])

    def starts(self) -> np.ndarray:
        """int64 [I + 1]: row boundaries of the images (rows are grouped by image)."""
        change = np.flatnonzero(np.diff(self.image_ids)) + 1
        return np.concatenate([[0], change, [len(self.image_ids)]]).astype(np.int64)


def add_data_args(parser: argparse.ArgumentParser, *, synthetic: int | None = 1000, per_image: int = 500) -> None:
    """--synthetic / --data / --descriptors (one of them), and what shapes them."""
    src = parser.add_argument_group("input data (one of --synthetic, --data, --descriptors)")
    excl = src.add_mutually_exclusive_group()
    excl.add_argument(
        "--synthetic",
        type=int,
        metavar="N_IMAGES",
        help=f"clustered synthetic images (default {synthetic} when no other source is given)",
    )
    excl.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="UKBench-style folder (gt.json, images/): RootSIFT of every image, cached",
    )
    excl.add_argument("--descriptors", type=Path, metavar="NPZ", help="npz with vecs float32 [N, D] and image_ids [N]")
    src.add_argument(
        "--per-image",
        type=int,
        default=per_image,
        help="descriptors per synthetic image; SIFT keypoints per image with --data",
    )
    src.add_argument("--dim", type=int, default=128, help="synthetic descriptor dimension")
    src.add_argument("--images", type=int, default=None, help="keep only the first N images")
    src.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder for the --data descriptor cache")
    parser.set_defaults(_synthetic_default=synthetic)


def load_data(args: argparse.Namespace) -> Data:
    """The input chosen by ``add_data_args``'s flags."""
    if args.data is not None:
        vecs, ids = rootsift_of_folder(args.data, args.cache, args.per_image)
        source = f"UKBench RootSIFT ({args.data.name}, OpenCV SIFT nfeatures={args.per_image})"
    elif args.descriptors is not None:
        with np.load(args.descriptors, allow_pickle=False) as npz:
            vecs, ids = npz["vecs"], npz["image_ids"]
        source = f"descriptors {args.descriptors.name}"
    else:
        from asmkit._synthetic import clustered_descriptors

        n = args.synthetic or args._synthetic_default
        if n is None:
            raise SystemExit("give one of --synthetic, --data, --descriptors")
        vecs, ids, _ = clustered_descriptors(n, args.per_image, args.dim, images_per_group=4, seed=args.seed)
        source = f"synthetic clustered (asmkit._synthetic), {n} images x {args.per_image} x {args.dim}-D, groups of 4"
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    vecs, ids = np.ascontiguousarray(vecs[order], dtype=np.float32), ids[order]
    if args.images:
        keep = ids < np.unique(ids)[: args.images][-1] + 1
        vecs, ids = vecs[keep], ids[keep]
        source += f", first {args.images} images"
    return Data(vecs, ids, source)


def rootsift_of_folder(data: Path, cache: Path, nfeatures: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV SIFT (at most ``nfeatures`` per image) + RootSIFT of every image of
    ``data/gt.json``, cached as ``cache/ukbench_rootsift_<folder>_<nfeatures>.npz``.

    Plain OpenCV (not ``asmkit.features``), so the descriptors are those the reference's
    figures were measured on: image id = position in ``gt.json``."""
    cache_file = cache / f"ukbench_rootsift_{data.name}_{nfeatures}.npz"
    if cache_file.exists():
        with np.load(cache_file, allow_pickle=False) as npz:
            return npz["vecs"], npz["image_ids"]
    import cv2

    gt = json.loads((data / "gt.json").read_text())
    sift = cv2.SIFT_create(nfeatures=nfeatures)
    parts, ids = [], []
    t0 = time.perf_counter()
    for i, rel in enumerate(gt["images"]):
        img = cv2.imread(str(data / rel), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise FileNotFoundError(f"{data / rel}: unreadable image")
        _, des = sift.detectAndCompute(img, None)
        if des is None:
            continue
        des = des.astype(np.float32)
        des /= des.sum(axis=1, keepdims=True) + 1e-12  # RootSIFT: L1-normalise, square root
        parts.append(np.sqrt(des))
        ids.append(np.full(len(des), i, dtype=np.int64))
    vecs = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    image_ids = np.concatenate(ids)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(cache_file, vecs=vecs, image_ids=image_ids)
    print(
        f"extracted {len(vecs)} RootSIFT descriptors of {len(gt['images'])} images in "
        f"{time.perf_counter() - t0:.1f} s -> {cache_file}",
        file=sys.stderr,
    )
    return vecs, image_ids


def sample_rows(vecs: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``min(n, N)`` rows drawn without replacement, in their original order."""
    rng = np.random.default_rng(seed)
    return vecs[np.sort(rng.choice(len(vecs), min(n, len(vecs)), replace=False))]


def evenly_spaced(values: np.ndarray, n: int | None) -> np.ndarray:
    """``n`` evenly spaced entries of ``values`` (all of them when n is None or larger)."""
    if n is None or n >= len(values):
        return np.asarray(values)
    return np.unique(np.asarray(values)[np.linspace(0, len(values) - 1, n).round().astype(np.int64)])


def reference_codebook(centroids: np.ndarray):
    """The reference package's ``Codebook`` holding ``centroids`` (faiss L2 index, CPU)."""
    from asmk import codebook as ref_codebook
    from asmk import index as ref_index

    cdb = ref_codebook.Codebook(ref_index.FaissL2Index(), size=len(centroids))
    cdb.index(np.array(centroids, dtype=np.float32, copy=True))
    return cdb


# -- arguments and output ---------------------------------------------------------------------


def add_run_args(parser: argparse.ArgumentParser, *, repeat: int | None = 3) -> None:
    """--repeat (unless ``repeat`` is None), --seed, --out."""
    if repeat is not None:
        parser.add_argument("--repeat", type=int, default=repeat, help="timed repeats (the minimum is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results here as JSON")


def command_line() -> str:
    """The command that ran this script, as typed (module form)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([head, *sys.argv[1:]])


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path | None, result: dict) -> None:
    """Write ``result`` (numpy scalars converted) as indented JSON, when ``path`` is given."""
    if path is not None:
        Path(path).write_text(json.dumps(_plain(result), indent=1) + "\n")


class Recorder:
    """Prints one aligned line per measurement and keeps them for ``--out``."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}

    def __call__(self, name: str, value, unit: str = "") -> None:
        self.values[name] = value
        numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        shown = f"{value:12.4g}" if numeric else f"{value!s:>12}"
        print(f"{name:56s} {shown} {unit}", flush=True)


def aggregate_all(codebook, desc, assignments: np.ndarray, binary: bool):
    """``asmkit.kernel.Aggregates`` of every image of ``desc`` (``prepare_descriptors``)
    from all rows' words ``assignments`` int64 [N, m]: the aggregation stage alone, timed
    apart from quantization."""
    from asmkit.kernel import aggregate

    return aggregate(desc.vecs, assignments, desc.starts, desc.order, codebook.centroids, binary=binary)
