"""Robustness benchmark: hard copies of real photos, one transformation family at a time.

Writes a data set folder (``images/`` + ``gt.json`` in the format of the shared UKBench set,
plus ``families``) and, unless ``--build-only``, evaluates presets on it with
:func:`asmkit.pipeline.evaluate_dataset`, printing mAP per family x preset.

Queries are originals: the first image of each of ``--originals`` UKBench groups (then the
scikit-image demo photos of :data:`asmkit.demo.DEMO_PHOTOS` when ``--demo``). Every original
gets one seeded variant per family; the variants are its positives. Distractors are UKBench
images of other groups (one per group). The originals are in the database too (junk for
their own query), as in UKBench.

Families (``FAMILIES``): rotations by 90, 180, 270 and by an arbitrary angle, crops keeping
30-60% of each side, scale 0.25x and 2x, a perspective warp, strong JPEG (quality 12-40), a
Gaussian blur, and ``mix`` (four of the others composed, in random order).

Usage::

    PYTHONPATH=src python -m benchmarks.bench_robustness --out bench_out/robust_full \\
        --originals 10 --distractors 50 --presets sift deep deep_rot hybrid hybrid_rank

The ``families`` field of gt.json maps each positive image to its family name, so that
``asmkit eval DIR --json`` reports mAP per family (``families`` in its output).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

_REPO = Path(__file__).resolve().parents[1]
# The shared data sets sit beside the main checkout (../shared); worktrees are a level deeper.
UKBENCH = (
    next(
        (
            p
            for p in (_REPO.parent / "shared", _REPO.parent.parent / "shared")
            if (p / "datasets" / "ukbench2000").is_dir()
        ),
        _REPO.parent / "shared",
    )
    / "datasets"
    / "ukbench2000"
)
GRAY = (128, 128, 128)


def _rotate(angle: float) -> Callable[[Image.Image, np.random.Generator], Image.Image]:
    def apply(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if angle in (90, 180, 270):
            # Lossless transposes: the family measures rotation, not resampling.
            op = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
            return img.transpose(op[int(angle)])
        # An arbitrary angle away from the axis-aligned ones, the canvas grown to keep every pixel.
        a = float(rng.uniform(15, 75) + 90 * rng.integers(0, 4))
        return img.rotate(a, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=GRAY)

    return apply


def _crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    f = float(rng.uniform(0.3, 0.6))
    cw, ch = max(16, int(w * f)), max(16, int(h * f))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def _scale(factor: float) -> Callable[[Image.Image, np.random.Generator], Image.Image]:
    def apply(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        w, h = img.size
        return img.resize((max(16, round(w * factor)), max(16, round(h * factor))), Image.Resampling.LANCZOS)

    return apply


def _perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> list[float]:
    rows = []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.asarray(rows, float), src.reshape(-1)).tolist()


def _perspective(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], float)
    # Corners pulled in by up to a quarter of the side: a strong out-of-plane tilt.
    jitter = rng.uniform(0.0, 0.25, size=(4, 2)) * np.array([w, h]) * np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    return img.transform(
        (w, h),
        Image.Transform.PERSPECTIVE,
        _perspective_coeffs(corners, corners + jitter),
        resample=Image.Resampling.BICUBIC,
        fillcolor=GRAY,
    )


def _jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(12, 41)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(2.0, 4.0))))


def _colour(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img, np.float32) * rng.uniform(0.6, 1.4, size=3) + rng.uniform(-30, 30)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


#: family name -> transformation (PIL RGB image, generator) -> PIL RGB image.
FAMILIES: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "rot90": _rotate(90),
    "rot180": _rotate(180),
    "rot270": _rotate(270),
    "rot_any": _rotate(-1),
    "crop": _crop,
    "scale_0.25": _scale(0.25),
    "scale_2": _scale(2.0),
    "perspective": _perspective,
    "jpeg": _jpeg,
    "blur": _blur,
}
_MIXABLE = ("rot_any", "crop", "scale_0.25", "perspective", "jpeg", "blur")


def _mix(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    for name in rng.permutation(_MIXABLE)[:3]:
        img = FAMILIES[str(name)](img, rng)
    # The fourth change is always colour, which no single family covers.
    return _colour(img, rng)


FAMILIES["mix"] = _mix


def _demo_photos() -> dict[str, Image.Image]:
    import skimage.data

    from asmkit.demo import DEMO_PHOTOS

    out = {}
    for name, load in DEMO_PHOTOS.items():
        arr = np.asarray(load(skimage.data))
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr).convert("RGB")
        img.thumbnail((640, 640), Image.Resampling.LANCZOS)
        out[name] = img
    return out


def build(
    out: Path, *, originals: int, distractors: int, seed: int, demo: bool, ukbench: Path, max_side: int = 640
) -> Path:
    """Write ``out/images`` and ``out/gt.json``; return ``out``.

    ``originals`` UKBench groups give one query each (plus the demo photos when ``demo``);
    ``distractors`` further groups give one database image each. Every source image is first
    shrunk to a longer side of at most ``max_side`` (UKBench images are 640 x 480).
    """
    groups = json.loads((ukbench / "gt.json").read_text())["groups"]
    if originals + distractors > len(groups):
        raise SystemExit(f"--originals + --distractors: at most {len(groups)} UKBench groups")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))

    def load(name: str) -> Image.Image:
        img = Image.open(ukbench / name).convert("RGB")
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return img

    sources = {Path(groups[g][0]).stem: load(groups[g][0]) for g in order[:originals]}
    if demo:
        sources.update(_demo_photos())
        for img in sources.values():
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, queries, positives, junk, families, group_list = [], [], {}, {}, {}, []
    for name, img in sources.items():
        q = f"images/{name}.jpg"
        img.save(out / q, quality=92)
        images.append(q)
        queries.append(q)
        junk[q] = [q]
        group = [q]
        for fam, fn in FAMILIES.items():
            v = f"images/{name}__{fam}.jpg"
            fn(img, np.random.default_rng([seed, len(images), len(group)])).convert("RGB").save(out / v, quality=92)
            images.append(v)
            families[v] = fam
            group.append(v)
        positives[q] = group[1:]
        group_list.append(group)
    for g in order[originals : originals + distractors]:
        d = f"images/distractor_{Path(groups[g][0]).stem}.jpg"
        load(groups[g][0]).save(out / d, quality=92)
        images.append(d)
    gt = {
        "name": f"robustness-{len(sources)}x{len(FAMILIES)}+{distractors}",
        "images": images,
        "queries": queries,
        "positives": positives,
        "junk": junk,
        "groups": group_list,
        "families": families,
        "protocol_note": "Each query is an original photo; its positives are one variant per family "
        "(families[name]); the query itself is junk. Distractors are UKBench images of other objects.",
        "source": f"benchmarks/bench_robustness.py --originals {originals} --distractors {distractors} --seed {seed}"
        f" --max-side {max_side}" + (" --demo" if demo else ""),
    }
    (out / "gt.json").write_text(json.dumps(gt, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="data set folder to write")
    p.add_argument("--originals", type=int, default=20, help="UKBench groups used as queries")
    p.add_argument("--distractors", type=int, default=100, help="UKBench groups used as distractors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--demo", action="store_true", help="also use the scikit-image demo photos as originals")
    p.add_argument("--ukbench", type=Path, default=UKBENCH)
    p.add_argument("--max-side", type=int, default=640, help="shrink source images to this longer side first")
    p.add_argument("--presets", nargs="*", default=["sift", "deep"])
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    data = build(
        args.out,
        originals=args.originals,
        distractors=args.distractors,
        seed=args.seed,
        demo=args.demo,
        ukbench=args.ukbench,
        max_side=args.max_side,
    )
    if args.build_only:
        print(data)
        return 0
    from asmkit.pipeline import evaluate_dataset

    results = {}
    for preset in args.presets:
        t0 = time.perf_counter()
        res = evaluate_dataset(data, preset=preset)
        results[preset] = {
            "map": res["map"],
            "families": {k: v["map"] for k, v in res["families"].items()},
            "wall_s": time.perf_counter() - t0,
            "timings": res.get("timings"),
        }
        print(f"{preset}: mAP {res['map']:.4f} ({results[preset]['wall_s']:.0f} s)", file=sys.stderr)
    fams = list(FAMILIES)
    print("| preset | all | " + " | ".join(fams) + " |")
    print("|---" * (len(fams) + 2) + "|")
    for preset, r in results.items():
        print(f"| {preset} | {r['map']:.3f} | " + " | ".join(f"{r['families'][f]:.3f}" for f in fams) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
