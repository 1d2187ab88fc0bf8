"""The ``asmkit`` command line. Each subcommand's flags mirror a Python function's keywords.

=========  =====================================================
index      :func:`asmkit.pipeline.build_index`
query      :func:`asmkit.pipeline.query_index`
scores     :func:`asmkit.pipeline.compute_scores`
pairs      :func:`asmkit.pipeline.make_pairs`
eval       :func:`asmkit.pipeline.evaluate_dataset`
report     :func:`asmkit.report.main`
demo       :func:`asmkit.pipeline.run_demo`
serve      :func:`asmkit.serve.serve`
=========  =====================================================

Errors a user can fix print one line on stderr, ``asmkit COMMAND: error: ...``, and exit
with status 2; ``-v`` shows the traceback as well. Those are the :class:`AsmkitError`
subclasses (a bad flag value, a file that is not what it should be, a missing optional
package) and the ``OSError`` of a file that cannot be opened. Anything else is a bug in
asmkit: its traceback is shown and the status is 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from ._validation import ArgumentError, AsmkitError, DependencyError
from .params import preset_names

logger = logging.getLogger("asmkit")

# OSError: a file that cannot be opened (missing, a folder, no permission); its message
# names the file.
_USER_ERRORS = (AsmkitError, OSError)


def _add_pipeline_flags(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    p.add_argument(
        "--preset", default="sift", help=f"one of {', '.join(preset_names())} (default sift); see `asmkit presets`"
    )
    p.add_argument("--config", help="TOML/YAML file overriding the preset ([features], [asmk])")
    p.add_argument("--codebook", help="codebook to use (.asmkit folder, or the reference's .pkl)")
    p.add_argument("--codebook-size", help="visual words when training a codebook, e.g. 4096 or 64k")
    if model:
        p.add_argument("--model", help="MASt3R retrieval checkpoint (mast3r preset)")
    p.add_argument("--workers", type=int, help="image decoding threads")
    _add_device_flag(p)


def _add_ray_flags(p: argparse.ArgumentParser, work: str = "score") -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help=f"{work} on a Ray cluster: host:port, or no value for a local one (pip install 'asmkit[ray]')",
    )
    p.add_argument("--ray-cpus", type=int, metavar="N", help="CPUs of the local Ray cluster (default: all)")


def _add_expand_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--expand",
        type=int,
        default=0,
        metavar="N",
        help="with --rerank: query expansion with the first N verified images, or the first result "
        "when none is verified (default 0: off; see docs/verify.md)",
    )


def _add_regions_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--regions",
        help="R-ASMK: database regions from grid, proposals, or a box file "
        "(JSON/CSV, image paths as named here); see docs/regions.md",
    )
    p.add_argument(
        "--no-whole-image",
        dest="whole_image",
        action="store_false",
        help="with --regions: the boxes only, the whole image is not a region",
    )


def _query_box(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise ArgumentError(f"--query-box: expected x0,y0,x1,y1 (pixels), got {text!r}")
    return box


def _add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="cpu", help="cpu (default), cuda or cuda:N: deep features and quantization on that GPU"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asmkit",
        description="Instance-level image retrieval with Aggregated Selective Match Kernels (ASMK / ASMK*).",
    )
    parser.add_argument("--version", action="version", version=f"asmkit {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress bars")
    parser.add_argument(
        "--threads", type=int, metavar="N", help="threads for torch and numba (default: theirs, usually every core)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("index", help="extract features, train a codebook, build and save an index")
    p.add_argument("images", help="image folder or list file (one path per line, # comments)")
    p.add_argument("--out", required=True, help="index workspace folder")
    p.add_argument("--train", help="images to train the codebook (and whitening) on; default: IMAGES")
    p.add_argument("--add", action="store_true", help="add IMAGES to the existing index at --out")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    _add_ray_flags(p, "extract, quantize and aggregate")
    p.add_argument(
        "--ray-sample",
        type=int,
        default=1000,
        metavar="N",
        help="with --ray: images whose descriptors train the codebook (default 1000)",
    )
    p.add_argument("--shards", type=int, metavar="N", help="with --ray: also save the index as N shards")
    _add_pipeline_flags(p)
    _add_regions_flag(p)

    p = sub.add_parser("query", help="query a saved index with image files")
    p.add_argument("index", help="index workspace folder (from `asmkit index`)")
    p.add_argument("images", nargs="+", help="query image files")
    p.add_argument("--top", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--query-box", help="x0,y0,x1,y1: aggregate each query from the features in this box only")
    p.add_argument("--model", help="MASt3R retrieval checkpoint (mast3r indexes)")
    _add_device_flag(p)
    p.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="R",
        help="re-rank the top R by spatial verification (inliers; default 0: off)",
    )
    _add_expand_flag(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("scores", help="N x N similarity matrix of an image set (row = query), or each row's K best")
    p.add_argument("images", help="image folder or list file")
    p.add_argument(
        "--out",
        required=True,
        help="output .npy (names go to <out>.names.txt), or .npz with --top (rows, cols, scores, names)",
    )
    p.add_argument("--top", type=int, help="keep each row's K best other images (sparse, O(N K) memory)")
    _add_ray_flags(p)
    p.add_argument("--cache", help="folder for features and learned whitening (default: ~/.cache/asmkit)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    _add_pipeline_flags(p)
    _add_regions_flag(p)

    p = sub.add_parser("pairs", help="image pairs for SfM from retrieval scores")
    p.add_argument("images", nargs="?", help="image folder, list file or index workspace (or give --scores)")
    p.add_argument("--out", required=True, help="pairs file (`name_a name_b` per line)")
    p.add_argument("--top", type=int, default=20, help="neighbours per image for the default knn graph")
    p.add_argument("--graph", help="knn-K | retrieval-NA-K | sequential-W[+retrieval-K] | complete")
    p.add_argument("--scores", help="scores from `asmkit scores` (.npy, or .npz with --top) instead of IMAGES")
    _add_ray_flags(p)
    p.add_argument("--cache", help="folder for features and learned whitening")
    p.add_argument(
        "--verify",
        action="store_true",
        help="keep the pairs verified by a fundamental matrix; inliers go to <out>.inliers.txt",
    )
    p.add_argument("--min-inliers", type=int, default=15, help="inliers a verified pair needs (default 15)")
    p.add_argument("--colmap-db", help="also write a COLMAP database (keypoints, matches, geometries; needs [sfm])")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    _add_pipeline_flags(p)
    _add_regions_flag(p)

    p = sub.add_parser("eval", help="mAP / mP@k / N-S of a preset on a data set with gt.json")
    p.add_argument("data", help="data-set folder holding gt.json")
    p.add_argument("--cache", help="folder for features and learned whitening")
    p.add_argument("--report", help="also write an HTML report here")
    p.add_argument("--top", type=int, default=10, help="results per query in the report")
    _add_ray_flags(p)
    p.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="R",
        help="re-rank the top R by spatial verification; --json reports before and after",
    )
    _add_expand_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_pipeline_flags(p)
    _add_regions_flag(p)

    p = sub.add_parser("report", help="static HTML page of retrieval results")
    p.add_argument("index", nargs="?", help="index workspace to query (with --queries)")
    p.add_argument("--queries", nargs="+", help="query image files (with INDEX)")
    p.add_argument(
        "--results", help="a results .npz (ids, scores), or sparse scores from `scores --top`, instead of INDEX"
    )
    p.add_argument("--gt", help="data-set folder with gt.json: colours results, adds a PR plot")
    p.add_argument("--names", help="database names file (with --results)")
    p.add_argument("--query-names", help="query names file (with --results)")
    p.add_argument("--image-root", help="folder the names are relative to (with --results)")
    p.add_argument("--top", type=int, default=10, help="results shown per query")
    p.add_argument("--out", required=True, help="HTML file to write")

    p = sub.add_parser("demo", help="index, query and evaluate a small set built from bundled photos")
    p.add_argument("--out", default="asmkit_demo", help="output folder (default ./asmkit_demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("serve", help="search an index over HTTP (a web page and a JSON API); needs asmkit[serve]")
    p.add_argument("index", help="index workspace folder (from `asmkit index`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token-file", help="file holding a bearer token that adds and removes require")
    p.add_argument("--token-reads", action="store_true", help="searches, stats and metrics require the token too")
    p.add_argument(
        "--workers", type=int, default=4, help="threads for image decoding, features and updates (default 4)"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=16,
        help="most concurrent searches run as one Index.search call (default 16; 1: one call each)",
    )
    p.add_argument("--searchers", type=int, default=2, help="threads running Index.search calls at once (default 2)")
    _add_device_flag(p)

    sub.add_parser("presets", help="list the presets")
    return parser


def _print(data: Any, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2) if as_json else text)


def _failed_lines(failed: list[dict[str, str]]) -> str:
    if not failed:
        return ""
    lines = [f"skipped {len(failed)} unreadable file(s):"] + [f"  {f['name']}: {f['reason']}" for f in failed[:20]]
    if len(failed) > 20:
        lines.append(f"  ... and {len(failed) - 20} more")
    return "\n" + "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from . import pipeline

    if args.command == "presets":
        from .config import load_config, preset_names

        names = preset_names()
        width = max(map(len, names))
        for name in names:
            print(f"{name:{width}s}  {load_config(name).description}")
        return 0

    if args.command == "index":
        summary = pipeline.build_index(
            args.images,
            out=args.out,
            preset=args.preset,
            config=args.config,
            codebook=args.codebook,
            codebook_size=args.codebook_size,
            train=args.train,
            model=args.model,
            add=args.add,
            workers=args.workers,
            device=args.device,
            regions=args.regions,
            whole_image=args.whole_image,
            ray=args.ray,
            ray_cpus=args.ray_cpus,
            ray_sample=args.ray_sample,
            shards=args.shards,
        )
        size = summary["codebook_size"]
        # A hybrid index has one codebook per member.
        sizes = ", ".join(f"{m} {n}" for m, n in size.items()) if isinstance(size, dict) else size
        _print(
            summary,
            args.json,
            f"{'added' if args.add else 'indexed'} {summary['added']} images into {summary['index']} "
            f"({summary['images']} in total, codebook {sizes}, preset {summary['preset']}); "
            + ", ".join(f"{key[:-2]} {value:.1f}s" for key, value in summary["timings"].items())
            + _failed_lines(summary["failed"]),
        )
        return 0

    if args.command == "query":
        res = pipeline.query_index(
            args.index,
            args.images,
            top=args.top,
            model=args.model,
            device=args.device,
            rerank=args.rerank,
            box=_query_box(args.query_box),
            expand=args.expand,
        )
        lines = []
        for q in res["results"]:
            lines.append(q["query"])
            lines += [
                f"  {i + 1:3d}. {r['score']:.4f}  {r['name']}"
                + (f"  ({r['inliers']} inliers)" if r.get("inliers", -1) >= 0 else "")
                for i, r in enumerate(q["results"])
            ]
        _print(res, args.json, "\n".join(lines) + _failed_lines(res["failed"]))
        return 0 if res["results"] else 1

    if args.command == "scores":
        res = pipeline.compute_scores(
            args.images,
            out=args.out,
            top=args.top,
            preset=args.preset,
            config=args.config,
            model=args.model,
            codebook=args.codebook,
            codebook_size=args.codebook_size,
            cache=args.cache,
            workers=args.workers,
            device=args.device,
            ray=args.ray,
            ray_cpus=args.ray_cpus,
            regions=args.regions,
            whole_image=args.whole_image,
        )
        t = res["timings"]
        shape = f"{res['images']}x{res['top']} top" if "top" in res else f"{res['images']}x{res['images']}"
        _print(
            res,
            args.json,
            f"wrote {shape} scores to {res['scores']} (names: {res['names']}); "
            + ", ".join(f"{key[:-2]} {value:.1f}s" for key, value in t.items())
            + _failed_lines(res["failed"]),
        )
        return 0

    if args.command == "pairs":
        res = pipeline.make_pairs(
            args.images,
            out=args.out,
            graph=args.graph,
            top=args.top,
            scores=args.scores,
            preset=args.preset,
            config=args.config,
            model=args.model,
            codebook=args.codebook,
            codebook_size=args.codebook_size,
            cache=args.cache,
            workers=args.workers,
            device=args.device,
            ray=args.ray,
            ray_cpus=args.ray_cpus,
            verify=args.verify,
            min_inliers=args.min_inliers,
            colmap_db=args.colmap_db,
            regions=args.regions,
            whole_image=args.whole_image,
        )
        text = f"wrote {res['n_pairs']} pairs ({res['graph']}) among {res['images']} images to {res['pairs']}"
        if "n_tested" in res:
            text += f"; {res['n_tested'] - res['n_pairs']} of {res['n_tested']} failed verification ({res['inliers']})"
        if "colmap" in res:
            text += f"\nCOLMAP database {res['colmap']['database']}: {res['colmap']['verified_pairs']} verified pairs"
        _print(res, args.json, text)
        return 0

    if args.command == "eval":
        res = pipeline.evaluate_dataset(
            args.data,
            preset=args.preset,
            config=args.config,
            codebook=args.codebook,
            codebook_size=args.codebook_size,
            model=args.model,
            cache=args.cache,
            workers=args.workers,
            report=args.report,
            top=args.top,
            device=args.device,
            rerank=args.rerank,
            regions=args.regions,
            whole_image=args.whole_image,
            ray=args.ray,
            ray_cpus=args.ray_cpus,
            expand=args.expand,
        )
        text = (
            f"{res['dataset']} ({res['preset']}): mAP {res['map']:.4f}, "
            f"mP@1/5/10 {res['mp']['1']:.4f}/{res['mp']['5']:.4f}/{res['mp']['10']:.4f}"
        )
        if "ns_score" in res:
            text += f", N-S {res['ns_score']:.3f}"
        for proto in ("easy", "medium", "hard"):
            if proto in res:
                text += f"\n  {proto}: mAP {res[proto]['map']:.4f}"
        if "families" in res:
            text += "\n  mAP per family: " + ", ".join(f"{f} {v['map']:.3f}" for f, v in res["families"].items())
        if "rerank" in res:
            before, info = res["before_rerank"], res["rerank"]
            text += (
                f"\nre-ranked top {info['top']}: mAP {before['map']:.4f} -> {res['map']:.4f}"
                + (f", N-S {before['ns_score']:.3f} -> {res['ns_score']:.3f}" if "ns_score" in res else "")
                + f"; verification {info['ms_per_query']:.1f} ms per query"
            )
            if "expand" in info:
                text += (
                    f"\nexpanded with {info['expand']} verified images: mAP "
                    f"{info['before_expansion']['map']:.4f} -> {res['map']:.4f}; "
                    f"{info['expand_ms_per_query']:.2f} ms per query"
                )
        text += f"\ncodebook trained on {res['codebook_trained_on']}" + _failed_lines(res["failed"])
        _print(res, args.json, text)
        return 0

    if args.command == "report":
        return _report(args)

    if args.command == "serve":
        try:
            from .serve import Settings, read_token_file, serve
        except ImportError as exc:
            raise DependencyError(f"serve: needs its extra: pip install 'asmkit[serve]' ({exc})") from None
        token = read_token_file(args.token_file) if args.token_file else None
        serve(
            args.index,
            Settings(
                host=args.host,
                port=args.port,
                token=token,
                token_reads=args.token_reads,
                workers=args.workers,
                max_batch=args.max_batch,
                searchers=args.searchers,
                device=args.device,
            ),
        )
        return 0

    if args.command == "demo":
        res = pipeline.run_demo(args.out, seed=args.seed)
        _print(
            res,
            args.json,
            f"demo: {res['images']} images, {res['queries']} queries: mAP {res['map']:.4f}\nreport: {res['report']}",
        )
        return 0
    raise AssertionError(args.command)  # argparse only admits the commands above


def _report(args: argparse.Namespace) -> int:
    from .report import main as report_main

    if args.results:
        path = report_main(
            output=args.out,
            ranks=args.results,
            gt=args.gt,
            names=args.names,
            query_names=args.query_names,
            image_root=args.image_root,
            top_k=args.top,
        )
    elif args.index and args.queries:
        import numpy as np

        from . import pipeline

        res = pipeline.query_index(args.index, args.queries, top=args.top)
        if not res["results"]:
            raise ArgumentError("--queries: no query image could be read")
        names = sorted({r["name"] for q in res["results"] for r in q["results"]})
        pos = {n: i for i, n in enumerate(names)}
        k = max(len(q["results"]) for q in res["results"])
        ids = np.full((len(res["results"]), k), -1, dtype=np.int64)
        scores = np.zeros(ids.shape, dtype=np.float32)
        for row, q in enumerate(res["results"]):
            for col, r in enumerate(q["results"]):
                ids[row, col], scores[row, col] = pos[r["name"]], r["score"]
        from .report import write_report

        # Query files may live anywhere: name every image by its absolute path.
        query_names = [str(Path(q["query"]).resolve()) for q in res["results"]]

        root = Path(res["image_root"])
        path = write_report(
            args.out,
            names=[str((root / n).resolve()) for n in names],
            image_root="/",
            ranks=ids,
            scores=scores,
            query_names=query_names,
            top_k=args.top,
        )
    else:
        raise ArgumentError("report: give INDEX with --queries, or --results")
    print(f"wrote {path}")
    return 0


def _set_threads(n: int) -> None:
    """Cap torch's and numba's threads at ``n`` (whichever of them is installed)."""
    from ._validation import check_int

    n = check_int(n, "--threads", min=1)
    import numba

    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(n)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``asmkit`` console script."""
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Python warnings go through logging (logger "py.warnings"), so that -q silences them too.
    logging.captureWarnings(True)
    if args.quiet:
        logging.getLogger("py.warnings").setLevel(logging.ERROR)
    try:
        if args.threads is not None:
            _set_threads(args.threads)
        return _run(args)
    except _USER_ERRORS as exc:
        if args.verbose:
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"asmkit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asmkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
