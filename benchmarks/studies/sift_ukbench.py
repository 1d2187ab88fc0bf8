"""UKBench-2000 study of RootSIFT + ASMK* settings (codebook size, features per image, idf, whitening).

    python -m benchmarks.studies.sift_ukbench --data ../shared/datasets/ukbench2000 [--configs base,idf,...]

Protocol (docs/math.md §7): every image is a query and junk in its own ranking; mAP over the 3
other images of its group; N-S = group members (query included) in the top 4. The codebook is
trained (faiss k-means, 10 iterations) on a random sample of the same images' descriptors.
RootSIFT descriptors (``asmkit.features``) are cached per features-per-image setting in HDF5
stores under --cache, with the codebooks, so reruns only pay for indexing and search.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asmkit import Codebook, Params
from asmkit.evaluate import average_precision, ns_score
from asmkit.features import FeatureStore, PCAWhitening, SiftExtractor, extract_features, list_images
from benchmarks._common import DEFAULT_CACHE

logger = logging.getLogger("study_sift")


@dataclass(frozen=True)
class Setting:
    max_features: int = 1000
    codebook_size: int = 4096
    use_idf: bool = False
    whiten_dim: int | None = None  # None: no whitening
    shrinkage: float = 1.0
    binary: bool = True  # ASMK* (False: real-valued ASMK)


SETTINGS = {
    "base": Setting(),
    "idf": Setting(use_idf=True),
    "real": Setting(binary=False),
    "real_idf": Setting(binary=False, use_idf=True),
    "k8k": Setting(codebook_size=8192),
    "k8k_idf": Setting(codebook_size=8192, use_idf=True),
    "mf2000_idf": Setting(max_features=2000, use_idf=True),
    "mf2000_real_idf": Setting(max_features=2000, binary=False, use_idf=True),
    "mf2000_real": Setting(max_features=2000, binary=False),
    "real_pw128_s05": Setting(binary=False, whiten_dim=128, shrinkage=0.5),
    "real_idf_pw128_s05": Setting(binary=False, use_idf=True, whiten_dim=128, shrinkage=0.5),
    "k16k": Setting(codebook_size=16384),
    "k16k_idf": Setting(codebook_size=16384, use_idf=True),
    "pw128_s05": Setting(whiten_dim=128, shrinkage=0.5),
    "idf_pw128_s05": Setting(use_idf=True, whiten_dim=128, shrinkage=0.5),
    "pw64_s05": Setting(whiten_dim=64, shrinkage=0.5),
    "k16k_idf_pw128_s05": Setting(codebook_size=16384, use_idf=True, whiten_dim=128, shrinkage=0.5),
    "mf2000": Setting(max_features=2000),
    "mf2000_k16k_idf": Setting(max_features=2000, codebook_size=16384, use_idf=True),
}


def load_descriptors(data: Path, cache: Path, max_features: int, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    extractor = SiftExtractor(max_features=max_features, root=True)
    with FeatureStore(cache / f"rootsift_{max_features}.h5", extractor.config()) as store:
        result = extract_features([data / n for n in names], extractor, root=data, store=store, progress=False)
        if result.failed:
            raise RuntimeError(f"extraction failed for {result.failed}")
        return store.stack(names)


def rank_with_asmkit(index_cls, setting: Setting, codebook, vecs, image_ids, n_images: int) -> np.ndarray:
    params = Params.preset("sift", codebook_size=setting.codebook_size, use_idf=setting.use_idf, binary=setting.binary)
    index = index_cls(codebook, params)
    index.add(vecs, image_ids)
    _, ranks = index.search(vecs, image_ids, k=n_images)
    return ranks


def rank_with_reference(setting: Setting, codebook, vecs, image_ids, n_images: int) -> np.ndarray:
    from asmk import asmk_method
    from asmk import codebook as ref_codebook
    from asmk import index as ref_index

    params = Params.preset(
        "sift", codebook_size=setting.codebook_size, use_idf=setting.use_idf, binary=setting.binary
    ).to_reference()
    # Give the reference the same codebook instead of letting it train its own.
    cdb = ref_codebook.Codebook(ref_index.initialize_index(gpu_id=None), size=setting.codebook_size)
    cdb.index(codebook.centroids.copy())
    method = asmk_method.ASMKMethod(params, {}, codebook=cdb)
    method = method.build_ivf(vecs, image_ids)
    _, query_ids, ranks, _ = method.query_ivf(vecs, image_ids)
    assert np.array_equal(query_ids, np.arange(n_images))
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="UKBench-style folder (gt.json, images/)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE / "sift_study"), help="feature stores and codebooks")
    parser.add_argument(
        "--configs", default="base,idf,pw128_s05,real,real_idf,mf2000_real_idf,real_pw128_s05,real_idf_pw128_s05"
    )
    parser.add_argument("--train-sample", type=int, default=500_000, help="descriptors sampled for k-means")
    parser.add_argument(
        "--engine",
        choices=["asmkit", "reference"],
        default="asmkit",
        help="rank with asmkit.Index or with the reference asmk (same codebook)",
    )
    parser.add_argument("--codebook-size", type=int, default=None, help="override every setting's K")
    parser.add_argument("--out", default=None, help="append one JSON line per setting here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    data, cache = Path(args.data), Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    gt = json.loads((data / "gt.json").read_text())
    names = [Path(p).relative_to("images").as_posix() for p in gt["images"]]
    assert [p.name for p in list_images(data / "images")] == names
    index_of = {p: i for i, p in enumerate(gt["images"])}
    groups = [np.array([index_of[p] for p in group]) for group in gt["groups"]]
    group_of = {i: g for g in groups for i in g}
    n_images = len(names)

    index_cls = None
    if args.engine == "asmkit":
        from asmkit import Index as index_cls
    engine = "asmkit" if index_cls is not None else "reference asmk 0.1.1"
    logger.info("engine: %s", engine)

    rows = []
    for key in args.configs.split(","):
        setting = SETTINGS[key]
        if args.codebook_size:
            setting = dataclasses.replace(setting, codebook_size=args.codebook_size)
        vecs, image_ids = load_descriptors(data / "images", cache, setting.max_features, names)
        rng = np.random.default_rng(0)
        sample = vecs[np.sort(rng.choice(len(vecs), min(args.train_sample, len(vecs)), replace=False))]
        if setting.whiten_dim is not None:
            whitening = PCAWhitening.learn(sample, dim=setting.whiten_dim, shrinkage=setting.shrinkage)
            vecs, sample = whitening.apply(vecs), whitening.apply(sample)
        # idf and the kernel do not change the codebook: train once per descriptor setting.
        white = "none" if setting.whiten_dim is None else f"pw{setting.whiten_dim}_s{setting.shrinkage}"
        cached = cache / f"codebook_mf{setting.max_features}_k{setting.codebook_size}_{white}_n{len(sample)}.npy"
        start = time.perf_counter()
        if cached.exists():
            codebook = Codebook(np.load(cached))
        else:
            codebook = Codebook.train(sample, setting.codebook_size, iters=10, seed=1234)
            np.save(cached, codebook.centroids)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        if index_cls is not None:
            ranks = rank_with_asmkit(index_cls, setting, codebook, vecs, image_ids, n_images)
        else:
            ranks = rank_with_reference(setting, codebook, vecs, image_ids, n_images)
        search_s = time.perf_counter() - start
        aps = [average_precision(ranks[q], [i for i in group_of[q] if i != q], junk=[q]) for q in range(n_images)]
        row = {
            "setting": key,
            **setting.__dict__,
            "descriptors": int(len(vecs)),
            "mAP": float(np.mean(aps)),
            "N-S": ns_score(ranks, [group_of[q] for q in range(n_images)]),
            "train_s": round(train_s, 1),
            "index+search_s": round(search_s, 1),
            "engine": engine,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as out:
                out.write(json.dumps(row) + "\n")

    print("\n| setting | features/img | K | kernel | idf | whitening | descriptors | mAP | N-S |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        white = "none" if r["whiten_dim"] is None else f"PCA {r['whiten_dim']}-D, s={r['shrinkage']}"
        print(
            f"| {r['setting']} | {r['max_features']} | {r['codebook_size']} | {'ASMK*' if r['binary'] else 'ASMK'} "
            f"| {'yes' if r['use_idf'] else 'no'} "
            f"| {white} | {r['descriptors']} | {r['mAP']:.4f} | {r['N-S']:.3f} |"
        )


if __name__ == "__main__":
    main()
