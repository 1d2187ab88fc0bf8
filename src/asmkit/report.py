"""A static HTML report of retrieval results.

One self-contained file: thumbnails are embedded as base64 JPEG data URIs and the
precision-recall curve is inline SVG, so the report opens in any browser, offline, with
no server. With ground truth, results get green (positive), red (negative) or gray
(junk) borders and the page starts with the accuracy summary.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from ._io import load_npz, read_lines, write_text_atomic
from ._validation import ArgumentError, FileFormatError, check_int
from .evaluate import GroundTruth, evaluate, load_ground_truth
from .pairs import SparseScores

__all__ = ["write_report", "precision_recall_curve", "main"]

logger = logging.getLogger(__name__)

_RECALL_LEVELS = np.linspace(0.0, 1.0, 21)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.4em; margin: 0 0 .6em; }
h2 { font-size: 1.1em; margin: .8em 0 .4em; }
table.summary { border-collapse: collapse; margin-bottom: 1em; }
table.summary td, table.summary th { border: 1px solid #ccc; padding: .25em .7em; text-align: right; }
table.summary th { background: #f2f2f2; text-align: left; }
.row { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 6px;
       padding: 8px 0; border-top: 1px solid #ddd; }
figure { margin: 0; font-size: 11px; text-align: center; }
figure img { display: block; border: 4px solid #bbb; background: #eee; }
figure.query img { border-color: #1f5fbf; }
figure.hit.pos img { border-color: #1a9a3a; }
figure.hit.neg img { border-color: #d12a2a; }
figure.hit.junk img { border-color: #888; }
figure.query { margin-right: 14px; }
figcaption { word-break: break-all; }
.score { font-weight: 600; }
.pr svg { background: #fafafa; border: 1px solid #ddd; }
"""

# Counts the decoded result thumbnails once the page has loaded, so a headless browser
# (or a curious reader of the DOM) can check that the embedded images really decode.
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.result');
  var ok = 0;
  imgs.forEach(function (im) { if (im.complete && im.naturalWidth > 0) { ok += 1; } });
  document.body.setAttribute('data-loaded-results', String(ok));
});
"""


def _jpeg_data_uri(image: Image.Image, quality: int = 80) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _placeholder(size: int) -> str:
    image = Image.new("RGB", (size, size), (225, 225, 225))
    draw = ImageDraw.Draw(image)
    draw.line([(0, 0), (size - 1, size - 1)], fill=(170, 60, 60), width=3)
    draw.line([(0, size - 1), (size - 1, 0)], fill=(170, 60, 60), width=3)
    return _jpeg_data_uri(image)


class _Thumbnails:
    """Thumbnails as data URIs, each image read and encoded once."""

    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.size = size
        self.cache: dict[str, tuple[str, bool]] = {}
        self.missing: list[str] = []
        self._placeholder: str | None = None

    def __call__(self, name: str) -> tuple[str, bool]:
        """(data URI, whether the image could be read)."""
        if name not in self.cache:
            path = self.root / name
            try:
                with Image.open(path) as im:
                    im = ImageOps.exif_transpose(im)
                    im = im.convert("RGB")
                    im.thumbnail((self.size, self.size))
                    self.cache[name] = (_jpeg_data_uri(im), True)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                # A report must not die on one bad file: show a placeholder instead.
                logger.warning("report: cannot read image %s (%s)", path, exc)
                self.missing.append(name)
                if self._placeholder is None:
                    self._placeholder = _placeholder(self.size)
                self.cache[name] = (self._placeholder, False)
        return self.cache[name]


def precision_recall_curve(
    ranked_ids: Sequence[np.ndarray], positives: Sequence[np.ndarray], junk: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Mean interpolated precision over queries at 21 recall levels.

    Junk is removed from each ranking first; the precision at recall r is the best
    precision at any recall >= r (0 where r is never reached). Queries without
    positives are skipped.

    Parameters
    ----------
    ranked_ids : sequence of ndarray of int
        Per query, image ids best first (-1 = padding).
    positives, junk : sequence of ndarray of int
        Per query.

    Returns
    -------
    recall : ndarray of float64, shape [21]
        0, 0.05, ..., 1.
    precision : ndarray of float64, shape [21]
        NaN everywhere when no query has positives.
    """
    curves = []
    for row, pos, jnk in zip(ranked_ids, positives, junk):
        pos = np.asarray(pos)
        if len(pos) == 0:
            continue
        row = np.asarray(row)
        row = row[row >= 0]
        row = row[~(np.isin(row, jnk) & ~np.isin(row, pos))]
        hit = np.isin(row, pos)
        tp = np.cumsum(hit)
        precision = tp / np.arange(1, len(row) + 1)
        recall = tp / len(pos)
        interp = np.zeros_like(_RECALL_LEVELS)
        for li, level in enumerate(_RECALL_LEVELS):
            reached = recall >= level - 1e-12
            if reached.any():
                interp[li] = precision[reached].max()
        curves.append(interp)
    if not curves:
        return _RECALL_LEVELS.copy(), np.full_like(_RECALL_LEVELS, np.nan)
    return _RECALL_LEVELS.copy(), np.mean(curves, axis=0)


def _pr_svg(recall: np.ndarray, precision: np.ndarray) -> str:
    w, h, pad = 360, 260, 40
    pw, ph = w - pad - 10, h - pad - 10

    def xy(r: float, p: float) -> tuple[float, float]:
        return pad + r * pw, 10 + (1 - p) * ph

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        'role="img" aria-label="precision-recall curve">'
    ]
    for t in np.linspace(0, 1, 6):
        x0, y0 = xy(0, t)
        x1, _ = xy(1, t)
        xv, yv0 = xy(t, 0)
        _, yv1 = xy(t, 1)
        parts += [
            f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y0:.1f}" stroke="#ddd"/>',
            f'<line x1="{xv:.1f}" y1="{yv0:.1f}" x2="{xv:.1f}" y2="{yv1:.1f}" stroke="#ddd"/>',
            f'<text x="{x0 - 6:.1f}" y="{y0 + 4:.1f}" font-size="10" text-anchor="end">{t:.1f}</text>',
            f'<text x="{xv:.1f}" y="{yv0 + 14:.1f}" font-size="10" text-anchor="middle">{t:.1f}</text>',
        ]
    parts.append(f'<rect x="{pad}" y="10" width="{pw}" height="{ph}" fill="none" stroke="#666"/>')
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(r, p) for r, p in zip(recall, precision)))
    parts.append(f'<polyline class="pr-curve" points="{points}" fill="none" stroke="#1f5fbf" stroke-width="2"/>')
    parts.append(f'<text x="{pad + pw / 2:.1f}" y="{h - 4}" font-size="11" text-anchor="middle">recall</text>')
    parts.append(
        f'<text x="12" y="{10 + ph / 2:.1f}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {10 + ph / 2:.1f})">precision</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _local_truth(
    gt: GroundTruth, names: list[str], query_names: list[str], n_columns: int
) -> tuple[GroundTruth, list[bool]]:
    """The ground truth re-indexed into ``names`` (the ranks' id space).

    Groups are kept only when ``n_columns >= 4``, as the N-S score needs a top 4.

    Ground-truth images absent from ``names`` get ids past its end: they can never be
    retrieved, yet still count as positives to find.
    """
    index = {n: i for i, n in enumerate(names)}
    extra: dict[str, int] = {}

    def remap(ids: np.ndarray) -> np.ndarray:
        out = []
        for i in ids.tolist():
            name = gt.images[i]
            if name not in index:
                extra.setdefault(name, len(names) + len(extra))
            out.append(index.get(name, extra.get(name)))
        return np.unique(np.asarray(out, dtype=np.int64))

    qpos = {q: i for i, q in enumerate(gt.queries)}
    known = [q in qpos for q in query_names]
    empty = np.empty(0, dtype=np.int64)
    positives, junk, groups = [], [], []
    for q in query_names:
        if q in qpos:
            qi = qpos[q]
            positives.append(remap(gt.positives[qi]))
            junk.append(remap(gt.junk[qi]))
            groups.append(remap(gt.query_groups[qi]) if gt.query_groups is not None else empty)
        else:
            positives.append(empty)
            junk.append(empty)
            groups.append(empty)
    local = GroundTruth(
        images=names + list(extra),
        queries=list(query_names),
        positives=positives,
        junk=junk,
        query_groups=groups if gt.query_groups is not None and n_columns >= 4 else None,
        name=gt.name,
        root=gt.root,
    )
    return local, known


def _fmt(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _summary_html(metrics: dict[str, Any] | None, n_queries: int, n_db: int, top_k: int, scope: str) -> str:
    rows = [
        ("queries shown", str(n_queries)),
        ("database images", str(n_db)),
        ("results per query", str(top_k)),
    ]
    if metrics is not None:
        rows.append(("mAP", _fmt(metrics["map"])))
        for k, v in metrics["mp"].items():
            rows.append((f"mP@{k}", _fmt(v)))
        if "ns_score" in metrics:
            rows.append(("N-S score (max 4)", _fmt(metrics["ns_score"])))
        rows.append(("queries with positives", str(metrics["n_queries"])))
        rows.append(("metrics computed", scope))
    body = "".join(f"<tr><th>{html.escape(a)}</th><td>{html.escape(b)}</td></tr>" for a, b in rows)
    return f'<table class="summary">{body}</table>'


def write_report(
    out_path: str | Path,
    *,
    names: Sequence[str],
    image_root: str | Path,
    ranks: Any,
    scores: Any,
    query_names: Sequence[str],
    gt: GroundTruth | None = None,
    top_k: int = 10,
    thumb_size: int = 160,
    title: str = "asmkit retrieval report",
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a self-contained HTML page of retrieval results.

    Parameters
    ----------
    out_path : str or Path
        The HTML file to write (atomically; parent folders are created).
    names : sequence of str, length N
        Database image names (paths relative to ``image_root``); ``ranks`` index them.
    image_root : str or Path
        Folder the image names are relative to.
    ranks : array_like of int, shape [Q, K]
        Result ids per query, best first; -1 is padding (faiss convention).
    scores : array_like of float, shape [Q, K]
        The matching scores.
    query_names : sequence of str, length Q
        Query image names (relative to ``image_root``), one per row.
    gt : GroundTruth, optional
        Ground truth, matched to queries and results by image name; adds borders, the
        accuracy summary (computed on the K results given) and a precision-recall plot.
    top_k : int
        Results shown per query.
    thumb_size : int
        Longest thumbnail side in pixels.
    title : str
        Page title.
    metrics : dict, optional
        Metrics of the full ranking (the result of :func:`asmkit.evaluate.evaluate`) to
        show in the summary instead of those recomputed on the K results given, which
        are lower when positives lie beyond K.

    Returns
    -------
    Path
        ``out_path``.

    Raises
    ------
    asmkit.ArgumentError
        For inconsistent shapes, out-of-range ids or a bad argument, naming the argument.
    """
    names = [str(n) for n in names]
    query_names = [str(n) for n in query_names]
    ids = np.asarray(ranks)
    vals = np.asarray(scores)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ArgumentError(f"ranks: expected a 2-D integer array [Q, K], got {ids.dtype} {ids.shape}")
    if vals.shape != ids.shape:
        raise ArgumentError(f"scores: shape {vals.shape} differs from ranks {ids.shape}")
    if len(query_names) != ids.shape[0]:
        raise ArgumentError(f"query_names: {len(query_names)} names for {ids.shape[0]} rows of ranks")
    if ids.size and (ids.min() < -1 or ids.max() >= len(names)):
        raise ArgumentError(f"ranks: ids must lie in [-1, {len(names)}) (len(names))")
    top_k = check_int(top_k, "top_k", min=1)
    thumb_size = check_int(thumb_size, "thumb_size", min=16)
    if gt is not None and not isinstance(gt, GroundTruth):
        raise ArgumentError(f"gt: expected a GroundTruth or None, got {type(gt).__name__}")
    root = Path(image_root)
    if not root.is_dir():
        logger.warning("report: image_root %s is not a folder; thumbnails will be placeholders", root)

    thumbs = _Thumbnails(root, thumb_size)
    if metrics is not None and (not isinstance(metrics, dict) or not {"map", "mp", "n_queries"} <= set(metrics)):
        raise ArgumentError("metrics: expected the dict returned by asmkit.evaluate.evaluate")
    local = known = None
    scope = "of the full ranking"
    pr_block = ""
    if gt is not None:
        local, known = _local_truth(gt, names, query_names, ids.shape[1])
        if not all(known):
            logger.warning("report: %d queries are not in the ground truth", known.count(False))
        if metrics is None:
            metrics = evaluate(ids, local)
            scope = f"on the top {ids.shape[1]} results given"
        recall, precision = precision_recall_curve(ids, local.positives, local.junk)
        if not np.isnan(precision).all():
            pr_block = (
                '<section class="pr"><h2>Precision–recall (mean over queries, '
                f"top {ids.shape[1]})</h2>{_pr_svg(recall, precision)}</section>"
            )

    rows_html = []
    shown = min(int(top_k), ids.shape[1])
    for q, qname in enumerate(query_names):
        uri, ok = thumbs(qname)
        esc_q = html.escape(qname)
        miss = "" if ok else ' data-missing="1"'
        cells = [
            f'<figure class="query"><img class="query" src="{uri}" alt="{esc_q}" title="{esc_q}"'
            f"{miss}><figcaption>query<br>{esc_q}</figcaption></figure>"
        ]
        pos_set = set(local.positives[q].tolist()) if local is not None and known[q] else set()
        junk_set = set(local.junk[q].tolist()) if local is not None and known[q] else set()
        for r in range(shown):
            i = int(ids[q, r])
            if i < 0:
                continue
            name = names[i]
            uri, ok = thumbs(name)
            if local is None or not known[q]:
                verdict = ""
            elif i in pos_set:
                verdict = " pos"
            elif i in junk_set:
                verdict = " junk"
            else:
                verdict = " neg"
            esc = html.escape(name)
            score = float(vals[q, r])
            miss = "" if ok else ' data-missing="1"'
            cells.append(
                f'<figure class="hit{verdict}"><img class="result" src="{uri}" alt="{esc}" '
                f'title="{esc}"{miss}>'
                f'<figcaption>#{r + 1} <span class="score">{score:.4f}</span><br>{esc}</figcaption></figure>'
            )
        rows_html.append(f'<div class="row" data-query="{esc_q}">{"".join(cells)}</div>')

    esc_title = html.escape(title)
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc_title}</title><style>{_CSS}"
        # Captions wrap at the thumbnail width instead of widening the figure.
        f"figure {{ max-width: {int(thumb_size) + 8}px; }}</style></head>\n"
        f'<body data-results="{sum(1 for _ in _iter_shown(ids, shown))}">'
        f"<h1>{esc_title}</h1>\n"
        f"{_summary_html(metrics, len(query_names), len(names), shown, scope)}\n{pr_block}\n"
        f'<section class="queries">\n' + "\n".join(rows_html) + "\n</section>\n"
        f"<script>{_SCRIPT}</script>\n</body></html>\n"
    )
    out = write_text_atomic(out_path, page)
    if thumbs.missing:
        logger.warning("report: %d images could not be read", len(thumbs.missing))
    logger.info("report: %s (%d queries, %.1f MB)", out, len(query_names), out.stat().st_size / 1e6)
    return out


def _iter_shown(ids: np.ndarray, shown: int):
    for row in ids[:, :shown]:
        yield from (i for i in row.tolist() if i >= 0)


def main(
    *,
    output: str | Path,
    ranks: str | Path | Any,
    scores: Any = None,
    gt: str | Path | GroundTruth | None = None,
    names: Sequence[str] | str | Path | None = None,
    query_names: Sequence[str] | str | Path | None = None,
    image_root: str | Path | None = None,
    top_k: int = 10,
    thumb_size: int = 160,
    title: str = "asmkit retrieval report",
) -> Path:
    """Write the HTML report; the keyword arguments mirror ``asmkit report`` flags.

    Parameters
    ----------
    output : str or Path
        The HTML file.
    ranks : str, Path or array_like of int, shape [Q, K]
        Result ids, or a ``.npz`` file with ``ids`` and ``scores`` (search results), or
        sparse scores from ``asmkit scores --top K`` (every image a query; the file's
        names are the defaults of ``names`` and ``query_names``).
    scores : array_like of float, shape [Q, K], optional
        Needed when ``ranks`` is an array.
    gt : str, Path or GroundTruth, optional
        Data-set folder (or gt.json); its ``images``, ``queries`` and folder are the
        defaults of ``names``, ``query_names`` and ``image_root``.
    names, query_names : sequence of str, or a text file with one name per line
    image_root : str or Path, optional
    top_k, thumb_size, title
        See :func:`write_report`.
    """
    truth = load_ground_truth(gt) if isinstance(gt, (str, Path)) else gt
    if isinstance(ranks, (str, Path)):
        path = Path(ranks)
        if not path.is_file():
            raise FileNotFoundError(f"results file not found: {path}")
        data = load_npz(path, "a results file with arrays 'ids' and 'scores', or sparse scores")
        if "rows" in data:
            # Sparse all-vs-all scores (`asmkit scores --top K`): every image is a query,
            # and the file names them.
            sparse, file_names = SparseScores.load(path)
            ranks, scores = sparse.ids, sparse.scores if scores is None else scores
            names = file_names if names is None else names
            query_names = file_names if query_names is None else query_names
        elif "ids" not in data:
            raise FileFormatError(
                path, "not a results file with arrays 'ids' and 'scores', or sparse scores (no array 'ids')"
            )
        else:
            ranks = data["ids"]
            if scores is None:
                scores = data.get("scores")
    if scores is None:
        raise ArgumentError("scores: required (or give a .npz results file holding them)")

    def name_list(value: Any, default: list[str] | None, arg: str) -> list[str]:
        if value is None:
            if default is None:
                raise ArgumentError(f"{arg}: required when no ground truth is given")
            return default
        if isinstance(value, (str, Path)):
            p = Path(value)
            if not p.is_file():
                raise FileNotFoundError(f"{arg} file not found: {p}")
            return read_lines(p, "a names file (one image name per line)")
        return list(value)

    db = name_list(names, truth.images if truth else None, "names")
    queries = name_list(query_names, truth.queries if truth else None, "query_names")
    if image_root is None:
        if truth is None or truth.root is None:
            raise ArgumentError("image_root: required when no ground truth is given")
        image_root = truth.root
    return write_report(
        output,
        names=db,
        image_root=image_root,
        ranks=ranks,
        scores=scores,
        query_names=queries,
        gt=truth,
        top_k=top_k,
        thumb_size=thumb_size,
        title=title,
    )
