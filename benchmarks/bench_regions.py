"""Regional ASMK* (R-ASMK*) against ASMK* on cluttered composites and on UKBench.

Cluttered composites: ``--composites`` UKBench groups are objects, the other groups give
the backgrounds. Composite k pastes one view of object k, scaled to a random fraction in
[``--min-frac``, ``--max-frac``] of the background's sides (UKBench images are all
640 x 480, so the aspect ratio is kept), at a random place into one background photo.
The database is the composites; the queries are each object's three other views, each
with one positive (its composite); the pasted box is the oracle region. Everything is
seeded by ``--seed``. Features: OpenCV RootSIFT (``asmkit.features.SiftExtractor``, at
most ``--per-image`` per image), cached under ``--cache``; the codebook (``--codebook-size``
words) is trained on ``--train-sample`` database descriptors.

Methods: ASMK*; R-ASMK* with the oracle boxes, the R-MAC grid (``--grid-levels``) and the
density proposals (``--proposals`` boxes), with the whole image as a region too and, for
the oracle and the proposals, without it; and "regional search" (every oracle or grid
region and the whole image its own item, an image scores the maximum over its items).
Build times are the fastest of ``--repeat`` builds, after an untimed build of each kind. Reported: mAP, index bytes per image, build seconds (regions,
quantization, aggregation, inverted file).

``--ukbench`` also runs the UKBench images of ``--data`` as usual (every image a query,
the three others of its group positive, itself ignored) with and without regions.

Example (from the repository root)::

    python -m benchmarks.bench_regions --data ../shared/datasets/ukbench2000 --composites 300 \\
        --ukbench --out regions.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from asmkit import Codebook, Index
from asmkit.evaluate import average_precision
from asmkit.features import SiftExtractor, load_image
from asmkit.regions import region_boxes, regions_from_boxes
from benchmarks._common import (
    DEFAULT_CACHE,
    Recorder,
    add_run_args,
    command_line,
    machine_info,
    machine_line,
    sample_rows,
    write_json,
)

PRESET = "asmk_star"


def _paste(background: np.ndarray, obj: np.ndarray, frac: float, rng) -> tuple[np.ndarray, list[float]]:
    import cv2

    h, w = background.shape[:2]
    ow, oh = max(8, round(frac * w)), max(8, round(frac * h))
    small = cv2.resize(obj, (ow, oh), interpolation=cv2.INTER_AREA)
    x0 = int(rng.integers(0, w - ow + 1))
    y0 = int(rng.integers(0, h - oh + 1))
    out = background.copy()
    out[y0 : y0 + oh, x0 : x0 + ow] = small
    return out, [float(x0), float(y0), float(x0 + ow), float(y0 + oh)]


def _pack(feats: list) -> dict:
    """Per-image features as flat arrays (an npz cache entry)."""
    return {
        "desc": np.concatenate([f.descriptors for f in feats]),
        "kp": np.concatenate([f.keypoints for f in feats]),
        "attn": np.concatenate([f.attention for f in feats]),
        "counts": np.array([len(f) for f in feats], dtype=np.int64),
    }


def _unpack(npz, prefix: str) -> tuple[list, list, list]:
    bounds = np.cumsum(npz[prefix + "counts"])[:-1]
    return tuple(np.split(npz[prefix + key], bounds) for key in ("desc", "kp", "attn"))


def composites(data: Path, n: int, min_frac: float, max_frac: float, per_image: int, seed: int, cache: Path) -> dict:
    """Composite database and object-view queries with their features (cached)."""
    cache_file = cache / f"regions_composites_{data.name}_{n}_{min_frac}_{max_frac}_{per_image}_{seed}.npz"
    if not cache_file.exists():
        gt = json.loads((data / "gt.json").read_text())
        groups = gt["groups"]
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(groups))
        objects, backgrounds = order[:n], order[n:]
        bg_images = [p for g in backgrounds for p in groups[g]]
        if n > len(bg_images):
            raise SystemExit(f"--composites {n}: only {len(bg_images)} background images left")
        bg_pick = rng.permutation(len(bg_images))[:n]
        extractor = SiftExtractor(max_features=per_image)
        db, boxes, q, q_of = [], [], [], []
        t0 = time.perf_counter()
        for k, g in enumerate(objects):
            views = groups[g]
            shown = int(rng.integers(0, len(views)))
            frac = float(rng.uniform(min_frac, max_frac))
            image, box = _paste(load_image(data / bg_images[bg_pick[k]]), load_image(data / views[shown]), frac, rng)
            db.append(extractor.extract(image))
            boxes.append(box)
            for v, path in enumerate(views):
                if v != shown:
                    q.append(extractor.extract(load_image(data / path)))
                    q_of.append(k)
        cache.mkdir(parents=True, exist_ok=True)
        arrays = {"db_" + key: value for key, value in _pack(db).items()}
        arrays.update({"q_" + key: value for key, value in _pack(q).items()})
        np.savez(cache_file, boxes=np.array(boxes), q_of=np.array(q_of, dtype=np.int64), **arrays)
        print(
            f"extracted {len(db)} composites and {len(q)} queries in {time.perf_counter() - t0:.0f} s -> {cache_file}",
            flush=True,
        )
    with np.load(cache_file, allow_pickle=False) as npz:
        db_desc, db_kp, db_attn = _unpack(npz, "db_")
        q_desc, _, _ = _unpack(npz, "q_")
        return {
            "db_desc": db_desc,
            "db_kp": db_kp,
            "db_attn": db_attn,
            "boxes": npz["boxes"],
            "q_desc": q_desc,
            "q_of": npz["q_of"],
            "sizes": [(640.0, 480.0)] * len(db_desc),
        }


def ukbench_features(data: Path, per_image: int, cache: Path) -> dict:
    """RootSIFT with keypoints of every image of ``data/gt.json`` (cached)."""
    cache_file = cache / f"regions_ukbench_{data.name}_{per_image}.npz"
    gt = json.loads((data / "gt.json").read_text())
    if not cache_file.exists():
        extractor = SiftExtractor(max_features=per_image)
        t0 = time.perf_counter()
        feats = [extractor.extract(load_image(data / p)) for p in gt["images"]]
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(cache_file, **_pack(feats))
        print(f"extracted {len(feats)} images in {time.perf_counter() - t0:.0f} s -> {cache_file}", flush=True)
    with np.load(cache_file, allow_pickle=False) as npz:
        desc, kp, attn = _unpack(npz, "")
    sizes = []
    for p in gt["images"]:
        from PIL import Image

        with Image.open(data / p) as im:
            sizes.append((float(im.size[0]), float(im.size[1])))
    return {"desc": desc, "kp": kp, "attn": attn, "sizes": sizes, "images": gt["images"]}


def build(
    codebook: Codebook, desc: list, boxes: list | None, kp: list, sizes: list, whole_image: bool = True
) -> tuple[Index, float]:
    """(index, build seconds): ASMK* without boxes, R-ASMK* with (the whole image a region too
    unless ``whole_image`` is False)."""
    index = Index(codebook, PRESET)
    ids = np.arange(len(desc), dtype=np.int64)
    t0 = time.perf_counter()
    if boxes is None:
        index.add(desc, ids)
    else:
        index.add(desc, ids, regions=regions_from_boxes(kp, boxes, sizes, whole_image=whole_image))
    return index, time.perf_counter() - t0


def warm_up(codebook: Codebook, desc: list, kp: list, sizes: list) -> None:
    """Untimed builds of every image with both aggregations: the compiled kernels are loaded
    and the quantizer has done its first-use set-up before anything is timed."""
    build(codebook, desc, None, kp, sizes)
    build(codebook, desc, [np.empty((0, 4))] * len(desc), kp, sizes)


def timed_build(
    codebook: Codebook, desc: list, boxes: list | None, kp: list, sizes: list, whole_image: bool, repeat: int
) -> tuple[Index, float]:
    """``build`` ``repeat`` times: the last index and the fastest build's seconds."""
    runs = [build(codebook, desc, boxes, kp, sizes, whole_image) for _ in range(max(1, repeat))]
    return runs[-1][0], min(seconds for _, seconds in runs)


def index_bytes(index: Index) -> int:
    ivf = index.inverted_file
    return int(ivf.data.nbytes + ivf.slots.nbytes + ivf.offsets.nbytes)


def ranks_of(index: Index, queries: list) -> np.ndarray:
    return index.search(queries, k=None)[1]


def regional_search(codebook: Codebook, desc: list, kp: list, boxes: list, n_queries_desc: list):
    """Every region (and the whole image) its own item; an image scores its best item.
    Returns (ranked image ids int64 [Q, I], bytes, build seconds)."""
    items, owner = [], []
    t0 = time.perf_counter()
    for i, (d, points, image_boxes) in enumerate(zip(desc, kp, boxes)):
        items.append(d)
        owner.append(i)
        for x0, y0, x1, y1 in image_boxes:
            inside = (points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1)
            if inside.any():
                items.append(d[inside])
                owner.append(i)
    index = Index(codebook, PRESET)
    index.add(items, np.arange(len(items), dtype=np.int64))
    seconds = time.perf_counter() - t0
    scores, item_ids = index.search(n_queries_desc, k=None)
    owner = np.asarray(owner)
    best = np.full((scores.shape[0], len(desc)), -np.inf, dtype=np.float32)
    for q in range(scores.shape[0]):
        np.maximum.at(best[q], owner[item_ids[q]], scores[q])
    ranked = np.argsort(-best, axis=1, kind="stable")
    return ranked, index_bytes(index), seconds


def train(desc: list, size: int, sample: int, seed: int) -> Codebook:
    return Codebook.train(sample_rows(np.concatenate(desc), sample, seed), size, seed=seed)


def run_composites(args, rec: Recorder) -> dict:
    data = composites(args.data, args.composites, args.min_frac, args.max_frac, args.per_image, args.seed, args.cache)
    codebook = train(data["db_desc"], args.codebook_size, args.train_sample, args.seed)
    n = len(data["db_desc"])
    positives = [[int(k)] for k in data["q_of"]]
    oracle = [b[None, :] for b in data["boxes"]]
    grid = region_boxes("grid", [""] * n, data["db_kp"], data["sizes"], grid_levels=args.grid_levels)
    proposals = region_boxes(
        "proposals", [""] * n, data["db_kp"], data["sizes"], weights=data["db_attn"], n_proposals=args.proposals
    )
    methods = {
        "ASMK*": (None, True),
        "R-ASMK* oracle": (oracle, True),
        "R-ASMK* oracle, no whole image": (oracle, False),
        "R-ASMK* grid": (grid, True),
        "R-ASMK* proposals": (proposals, True),
        "R-ASMK* proposals, no whole image": (proposals, False),
    }
    warm_up(codebook, data["db_desc"], data["db_kp"], data["sizes"])
    rows = {}
    for name, (boxes, whole_image) in methods.items():
        index, seconds = timed_build(
            codebook, data["db_desc"], boxes, data["db_kp"], data["sizes"], whole_image, args.repeat
        )
        ranks = ranks_of(index, data["q_desc"])
        rows[name] = {
            "map": float(np.mean([average_precision(r, p) for r, p in zip(ranks, positives)])),
            "bytes_per_image": index_bytes(index) / n,
            "build_s": seconds,
        }
    for name, boxes in (("oracle", oracle), ("grid", grid)):
        ranked, nbytes, seconds = regional_search(codebook, data["db_desc"], data["db_kp"], boxes, data["q_desc"])
        rows[f"regional search, {name}"] = {
            "map": float(np.mean([average_precision(r, p) for r, p in zip(ranked, positives)])),
            "bytes_per_image": nbytes / n,
            "build_s": seconds,
        }
    for name, row in rows.items():
        rec(f"composites {name}: mAP", row["map"])
        rec(f"composites {name}: index bytes per image", row["bytes_per_image"], "B")
        rec(f"composites {name}: build", row["build_s"], "s")
    return rows


def run_ukbench(args, rec: Recorder) -> dict:
    data = ukbench_features(args.data, args.per_image, args.cache)
    codebook = train(data["desc"], args.codebook_size, args.train_sample, args.seed)
    n = len(data["desc"])
    group = np.arange(n) // 4
    sources = {
        "ASMK*": None,
        "R-ASMK* grid": region_boxes("grid", data["images"], data["kp"], data["sizes"], grid_levels=args.grid_levels),
        "R-ASMK* proposals": region_boxes(
            "proposals", data["images"], data["kp"], data["sizes"], weights=data["attn"], n_proposals=args.proposals
        ),
    }
    warm_up(codebook, data["desc"], data["kp"], data["sizes"])
    rows = {}
    for name, boxes in sources.items():
        index, seconds = timed_build(codebook, data["desc"], boxes, data["kp"], data["sizes"], True, args.repeat)
        ranks = ranks_of(index, data["desc"])
        aps = [
            average_precision(r, np.flatnonzero((group == group[q]) & (np.arange(n) != q)), [q])
            for q, r in enumerate(ranks)
        ]
        rows[name] = {"map": float(np.mean(aps)), "bytes_per_image": index_bytes(index) / n, "build_s": seconds}
        rec(f"ukbench {name}: mAP", rows[name]["map"])
        rec(f"ukbench {name}: index bytes per image", rows[name]["bytes_per_image"], "B")
        rec(f"ukbench {name}: build", seconds, "s")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="UKBench-style folder (gt.json with groups, images)")
    parser.add_argument("--composites", type=int, default=300, help="composite database images (objects)")
    parser.add_argument("--min-frac", type=float, default=0.25, help="smallest pasted side, fraction of the photo's")
    parser.add_argument("--max-frac", type=float, default=0.45, help="largest pasted side, fraction of the photo's")
    parser.add_argument("--per-image", type=int, default=1000, help="SIFT features per image at most")
    parser.add_argument("--codebook-size", type=int, default=4096)
    parser.add_argument("--train-sample", type=int, default=200_000, help="descriptors the codebook is trained on")
    parser.add_argument("--grid-levels", type=int, default=3)
    parser.add_argument("--proposals", type=int, default=8, help="proposal boxes per image")
    parser.add_argument("--ukbench", action="store_true", help="also UKBench with and without regions")
    parser.add_argument("--skip-composites", action="store_true")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="feature cache folder")
    add_run_args(parser, repeat=2)
    args = parser.parse_args(argv)
    info = machine_info()
    print(command_line())
    print(machine_line(info))
    rec = Recorder()
    result = {"command": command_line(), "machine": info}
    if not args.skip_composites:
        result["composites"] = run_composites(args, rec)
    if args.ukbench:
        result["ukbench"] = run_ukbench(args, rec)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
