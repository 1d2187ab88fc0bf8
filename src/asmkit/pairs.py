"""Image pairs for structure-from-motion from an all-vs-all score matrix.

A *scene graph* says which image pairs a matcher (COLMAP, hloc, MASt3R-SfM) should try.
Graphs are named by short strings:

``complete``
    Every pair.
``knn-K``
    Every image with its K most similar other images (row = query).
``retrieval-NA-K``
    The MASt3R-SfM graph: NA anchor ("key") images chosen by farthest-point sampling on
    the similarities, all pairs among the anchors, every other image linked to its
    *nearest* anchor, plus each image's K nearest other images.
``sequential-W`` / ``sequential-W+retrieval-K``
    For video: each image with the next W images in list order, optionally plus its K
    nearest other images.

Scores come as a dense ``[N, N]`` matrix, or as :class:`SparseScores`: each row's K best
other images, which is all ``knn``, ``sequential`` and the neighbours of ``retrieval``
need, in O(N K) memory. Farthest-point sampling of anchors needs only the anchors' own
rows (the anchor as query), which the caller scores one at a time (``anchor_row``), and
every image's centrality, which :meth:`SparseScores.from_blocks` sums on the way.

Pairs never contain an image twice, ``(a, b)`` and ``(b, a)`` count once, and the output
order is deterministic: ``(i, j)`` with ``i < j`` in matrix order, sorted.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ._io import load_npz, write_text_atomic
from ._validation import ArgumentError, FileFormatError

__all__ = [
    "GraphSpec",
    "SparseScores",
    "parse_graph",
    "pair_indices",
    "pairs_from_scores",
    "select_anchors",
    "write_pairs",
]

logger = logging.getLogger(__name__)

_GRAPH_FORMS = "'complete', 'knn-K', 'retrieval-NA-K', 'sequential-W' or 'sequential-W+retrieval-K'"


@dataclass(frozen=True)
class GraphSpec:
    """A parsed scene-graph specification.

    Attributes
    ----------
    kind : {"complete", "knn", "retrieval", "sequential"}
    k : int
        Retrieval neighbours per image (0: none).
    n_anchors : int
        Anchor images of ``retrieval`` graphs.
    window : int
        Window of ``sequential`` graphs.
    """

    kind: str
    k: int = 0
    n_anchors: int = 0
    window: int = 0

    def __str__(self) -> str:
        if self.kind == "complete":
            return "complete"
        if self.kind == "knn":
            return f"knn-{self.k}"
        if self.kind == "retrieval":
            return f"retrieval-{self.n_anchors}-{self.k}"
        if self.k:
            return f"sequential-{self.window}+retrieval-{self.k}"
        return f"sequential-{self.window}"


def parse_graph(graph: str | GraphSpec) -> GraphSpec:
    """Parse a graph string such as ``"retrieval-20-10"`` (see the module docstring).

    Raises
    ------
    asmkit.ArgumentError
        If the string is not one of the known forms.
    """
    if isinstance(graph, GraphSpec):
        return graph
    if not isinstance(graph, str):
        raise ArgumentError(f"graph: expected a string such as 'knn-10', got {graph!r}")
    text = graph.strip().lower()
    if text == "complete":
        return GraphSpec("complete")
    if m := re.fullmatch(r"knn-(\d+)", text):
        k = int(m.group(1))
        if k < 1:
            raise ArgumentError(f"graph: knn needs k >= 1, got {graph!r}")
        return GraphSpec("knn", k=k)
    if m := re.fullmatch(r"retrieval-(\d+)-(\d+)", text):
        n_anchors, k = int(m.group(1)), int(m.group(2))
        if n_anchors == 0 and k == 0:
            raise ArgumentError(f"graph: retrieval needs anchors or neighbours, got {graph!r}")
        return GraphSpec("retrieval", k=k, n_anchors=n_anchors)
    if m := re.fullmatch(r"sequential-(\d+)(?:\+retrieval-(\d+))?", text):
        window, k = int(m.group(1)), int(m.group(2) or 0)
        if window < 1:
            raise ArgumentError(f"graph: sequential needs a window >= 1, got {graph!r}")
        return GraphSpec("sequential", k=k, window=window)
    raise ArgumentError(f"graph: unknown scene graph {graph!r}; expected {_GRAPH_FORMS}")


def _check_scores(scores: Any) -> np.ndarray:
    arr = np.asarray(scores)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ArgumentError(f"scores: expected a square [N, N] matrix, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ArgumentError(f"scores: expected a numeric matrix, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ArgumentError("scores: the matrix contains NaN or infinite values")
    return arr


def _top_others(row: np.ndarray, i: int, k: int) -> np.ndarray:
    """The ``k`` best columns of one float64 row other than ``i``, ties to the lower index;
    int64 [min(k, len(row) - 1)]. ``row`` is modified."""
    n = len(row)
    k = max(0, min(k, n - 1))
    if k == 0:
        return np.empty(0, dtype=np.int64)
    # An image is not its own neighbour, whatever its self-score is.
    row[i] = -np.inf
    threshold = np.partition(row, n - k)[n - k]
    # Every candidate tied at the threshold is kept so that the lexsort, not
    # argpartition's internal order, decides which ties make the cut.
    cand = np.flatnonzero(row >= threshold)
    return cand[np.lexsort((cand, -row[cand]))][:k]


def _knn(scores: np.ndarray, k: int) -> np.ndarray:
    """The k most similar *other* images of every row, ties to the lower index.

    Returns int64 [N, min(k, N - 1)].
    """
    n = scores.shape[0]
    out = np.empty((n, max(0, min(k, n - 1))), dtype=np.int64)
    for i in range(n):
        out[i] = _top_others(scores[i].astype(np.float64), i, k)
    return out


def _centrality(arr: np.ndarray) -> np.ndarray:
    """Summed similarity of each image to the others, both directions averaged; float64 [N]."""
    diag = np.diagonal(arr).astype(np.float64)
    return (arr.sum(axis=1, dtype=np.float64) + arr.sum(axis=0, dtype=np.float64)) / 2 - diag


@dataclass(frozen=True)
class SparseScores:
    """Each image's K most similar other images: the part of an all-vs-all score matrix
    that scene graphs read, in O(N K) memory.

    Attributes
    ----------
    n : int
        Images (the matrix is N x N, row = query).
    ids : ndarray of int64, shape [N, K]
        Row ``i``: the columns of its K best other images, decreasing score, ties to the
        lower index; -1 pads rows with fewer (N - 1 < K).
    scores : ndarray of float32, shape [N, K]
        Their scores; -inf on padding.
    centrality : ndarray of float64, shape [N], or None
        Each image's summed score to the others, row and column averaged (what the first
        anchor of a ``retrieval`` graph is chosen by); None when not known.
    """

    n: int
    ids: np.ndarray
    scores: np.ndarray
    centrality: np.ndarray | None = None

    @property
    def k(self) -> int:
        """Neighbours kept per image."""
        return self.ids.shape[1]

    @classmethod
    def from_dense(cls, scores: Any, k: int) -> SparseScores:
        """The K best other images of every row of a dense ``[N, N]`` matrix."""
        arr = _check_scores(scores)
        return cls.from_blocks([(0, arr)], arr.shape[0], k)

    @classmethod
    def from_blocks(cls, blocks: Iterable[tuple[int, np.ndarray]], n: int, k: int) -> SparseScores:
        """Keep the K best of each row of an N x N matrix given as row blocks.

        Parameters
        ----------
        blocks : iterable of (int, float32 [B, N])
            ``(first row, rows)``, together covering every row once; only one block is
            held at a time.
        n, k : int
            Matrix size and neighbours per row.
        """
        width = max(0, min(int(k), n - 1))
        ids = np.full((n, width), -1, dtype=np.int64)
        scores = np.full((n, width), -np.inf, dtype=np.float32)
        row_sums = np.zeros(n)
        col_sums = np.zeros(n)
        diag = np.zeros(n)
        seen = np.zeros(n, dtype=bool)
        for begin, block in blocks:
            block = np.asarray(block)
            if block.ndim != 2 or block.shape[1] != n or begin + block.shape[0] > n:
                raise ArgumentError(f"scores: a block of shape {block.shape} at row {begin} in an {n}x{n} matrix")
            rows = np.arange(begin, begin + block.shape[0])
            seen[rows] = True
            row_sums[rows] = block.sum(axis=1, dtype=np.float64)
            col_sums += block.sum(axis=0, dtype=np.float64)
            diag[rows] = block[rows - begin, rows]
            for r, i in enumerate(rows):
                top = _top_others(block[r].astype(np.float64), int(i), width)
                ids[i] = top
                scores[i] = block[r, top]
        if not seen.all():
            raise ArgumentError(f"scores: rows {np.flatnonzero(~seen)[:5].tolist()}... were never given")
        return cls(n, ids, scores, (row_sums + col_sums) / 2 - diag)

    def neighbours(self, k: int) -> np.ndarray:
        """The first ``k`` neighbours of every row; int64 [N, min(k, N - 1)].

        Raises
        ------
        asmkit.ArgumentError
            If fewer than ``k`` were kept (and N - 1 > kept).
        """
        want = max(0, min(int(k), self.n - 1))
        if want > self.k:
            raise ArgumentError(f"graph: needs the {want} best images per row, the scores keep {self.k}")
        return self.ids[:, :want]

    def row(self, i: int) -> np.ndarray:
        """Row ``i`` as far as it is known: float64 [N], 0 where no score was kept."""
        out = np.zeros(self.n)
        keep = self.ids[i] >= 0
        out[self.ids[i][keep]] = self.scores[i][keep]
        return out

    def save(self, path: str | Path, names: Sequence[str]) -> Path:
        """Write an ``.npz`` with int64 ``rows``, ``cols``, float32 ``scores`` (one entry per
        kept neighbour, row-major, best first), str ``names`` [N], int64 ``k`` and, when
        known, float64 ``centrality`` [N]; atomically, without pickles."""
        names = _check_names(names, self.n)
        keep = self.ids >= 0
        arrays = {
            "rows": np.repeat(np.arange(self.n, dtype=np.int64), keep.sum(axis=1)),
            "cols": self.ids[keep],
            "scores": self.scores[keep].astype(np.float32),
            "names": np.asarray(names, dtype=str),
            "k": np.asarray(self.k, dtype=np.int64),
        }
        if self.centrality is not None:
            arrays["centrality"] = np.asarray(self.centrality, dtype=np.float64)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npz")
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return out

    @classmethod
    def load(cls, path: str | Path) -> tuple[SparseScores, list[str]]:
        """Read a file written by :meth:`save`; returns the scores and the names.

        Raises
        ------
        asmkit.FileFormatError
            Not such a file (arrays missing, of the wrong kind, or inconsistent).
        """
        what = "a sparse scores file (from `asmkit scores --top K`)"
        data = load_npz(path, what, required=("rows", "cols", "scores", "names", "k"))
        names = data["names"]
        if names.ndim != 1 or names.dtype.kind != "U":
            raise FileFormatError(path, f"not {what} (names must be a 1-D str array)")
        n, k = len(names), int(data["k"])
        rows, cols, vals = data["rows"], data["cols"], data["scores"]
        if not (rows.shape == cols.shape == vals.shape and rows.ndim == 1) or not (
            rows.dtype.kind == cols.dtype.kind == "i" and vals.dtype.kind == "f"
        ):
            raise FileFormatError(path, f"not {what} (rows, cols, scores must be 1-D arrays of one length)")
        if len(rows) and (
            rows.min() < 0
            or rows.max() >= n
            or cols.min() < 0
            or cols.max() >= n
            or np.any(np.diff(rows) < 0)
            or not np.isfinite(vals).all()
        ):
            raise FileFormatError(path, f"not {what} (indices out of range, unsorted rows or non-finite scores)")
        counts = np.bincount(rows, minlength=n)
        if k < 0 or counts.max(initial=0) > k:
            raise FileFormatError(path, f"not {what} (more than k={k} entries in a row)")
        width = max(0, min(k, n - 1))
        ids = np.full((n, width), -1, dtype=np.int64)
        scores = np.full((n, width), -np.inf, dtype=np.float32)
        slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        ids[rows, slot] = cols
        scores[rows, slot] = vals
        centrality = data.get("centrality")
        if centrality is not None and centrality.shape != (n,):
            raise FileFormatError(path, f"not {what} (centrality of shape {centrality.shape} for {n} names)")
        return cls(n, ids, scores, centrality), [str(x) for x in names]


def _anchors(
    n: int, centrality: np.ndarray, row: Callable[[int], np.ndarray], n_anchors: int
) -> tuple[np.ndarray, np.ndarray]:
    """Farthest-point sampling; anchors int64 [NA] and their rows float64 [NA, N]."""
    n_anchors = min(int(n_anchors), n)
    if n_anchors <= 0:
        return np.empty(0, dtype=np.int64), np.empty((0, n))
    anchors = [int(np.argmax(centrality))]
    rows = []
    best = np.full(n, -np.inf)
    chosen = np.zeros(n, dtype=bool)
    while True:
        a = anchors[-1]
        chosen[a] = True
        rows.append(np.asarray(row(a), dtype=np.float64))
        best = np.maximum(best, rows[-1])
        if len(anchors) == n_anchors:
            break
        best[chosen] = np.inf  # anchors are never picked again
        anchors.append(int(np.argmin(best)))
    return np.asarray(anchors, dtype=np.int64), np.stack(rows)


def _anchor_source(
    scores: np.ndarray | SparseScores, anchor_row: Callable[[int], np.ndarray] | None
) -> tuple[np.ndarray, Callable[[int], np.ndarray]]:
    if isinstance(scores, SparseScores):
        if scores.centrality is None:
            raise ArgumentError("scores: retrieval graphs need each image's centrality, which these scores lack")
        return scores.centrality, anchor_row or scores.row
    return _centrality(scores), anchor_row or (lambda a: scores[a])


def select_anchors(scores: Any, n_anchors: int, *, anchor_row: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
    """Farthest-point sampling of anchor images on the similarities.

    The first anchor is the most central image (largest summed similarity to the
    others, rows and columns averaged, self-scores ignored); each next one is the image
    least similar to every anchor so far, as the anchors see it: the lowest best score in
    the anchors' rows (anchor = query), so that only the anchors need scoring.

    Parameters
    ----------
    scores : array_like, shape [N, N], or SparseScores
        Similarities, row = query.
    n_anchors : int
        How many anchors; at most N are returned.
    anchor_row : callable, optional
        ``anchor_row(i)`` -> float [N], row ``i`` of the full matrix: for sparse scores,
        whose rows are otherwise known only at their K best (0 elsewhere).

    Returns
    -------
    ndarray of int64, shape [min(n_anchors, N)]
        Anchor indices in selection order.
    """
    arr = scores if isinstance(scores, SparseScores) else _check_scores(scores)
    centrality, row = _anchor_source(arr, anchor_row)
    return _anchors(arr.n if isinstance(arr, SparseScores) else arr.shape[0], centrality, row, n_anchors)[0]


def _canonical(i: Iterable[int] | np.ndarray, j: Iterable[int] | np.ndarray) -> np.ndarray:
    a = np.asarray(i, dtype=np.int64).ravel()
    b = np.asarray(j, dtype=np.int64).ravel()
    keep = a != b
    lo, hi = np.minimum(a, b)[keep], np.maximum(a, b)[keep]
    if len(lo) == 0:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.stack([lo, hi], axis=1), axis=0)


def pair_indices(
    scores: Any, graph: str | GraphSpec, *, anchor_row: Callable[[int], np.ndarray] | None = None
) -> np.ndarray:
    """Index pairs of a scene graph.

    Parameters
    ----------
    scores : array_like, shape [N, N], or SparseScores
        Similarities, row = query; finite.
    graph : str or GraphSpec
        See the module docstring.
    anchor_row : callable, optional
        ``anchor_row(i)`` -> float [N], row ``i`` of the full matrix, for the anchors of
        ``retrieval`` graphs on sparse scores (see :func:`select_anchors`).

    Returns
    -------
    ndarray of int64, shape [P, 2]
        Pairs ``(i, j)`` with ``i < j``, sorted, without duplicates; the same for a dense
        matrix and for its :class:`SparseScores` with ``anchor_row``.
    """
    arr = scores if isinstance(scores, SparseScores) else _check_scores(scores)
    spec = parse_graph(graph)
    n = arr.n if isinstance(arr, SparseScores) else arr.shape[0]
    parts = [np.empty((0, 2), dtype=np.int64)]
    if spec.kind == "complete":
        i, j = np.triu_indices(n, k=1)
        parts.append(_canonical(i, j))
    if spec.kind == "sequential":
        for d in range(1, min(spec.window, n - 1) + 1):
            parts.append(_canonical(np.arange(n - d), np.arange(d, n)))
    if spec.kind == "retrieval" and spec.n_anchors > 0:
        anchors, rows = _anchors(n, *_anchor_source(arr, anchor_row), spec.n_anchors)
        ai, aj = np.triu_indices(len(anchors), k=1)
        parts.append(_canonical(anchors[ai], anchors[aj]))
        # Highest similarity, i.e. the *nearest* anchor: MASt3R once took the farthest
        # one (naver/mast3r issue #55).
        parts.append(_canonical(np.arange(n), anchors[np.argmax(rows, axis=0)]))
    if spec.k > 0 and spec.kind != "complete":
        nn = arr.neighbours(spec.k) if isinstance(arr, SparseScores) else _knn(arr, spec.k)
        parts.append(_canonical(np.repeat(np.arange(n), nn.shape[1]), nn))
    pairs = np.concatenate(parts)
    if len(pairs) == 0:
        return pairs
    return np.unique(pairs, axis=0)


def _check_names(names: Sequence[str], n: int) -> list[str]:
    if isinstance(names, (str, bytes)):
        raise ArgumentError("names: expected a sequence of image names, got a single string")
    names = list(names)
    if len(names) != n:
        raise ArgumentError(f"names: {len(names)} names for a {n}x{n} score matrix")
    if not all(isinstance(x, str) and x for x in names):
        raise ArgumentError("names: every name must be a non-empty string")
    if len(set(names)) != len(names):
        raise ArgumentError("names: image names must be unique")
    return names


def pairs_from_scores(
    scores: Any,
    names: Sequence[str],
    graph: str | GraphSpec,
    *,
    anchor_row: Callable[[int], np.ndarray] | None = None,
) -> list[tuple[str, str]]:
    """Image-name pairs of a scene graph.

    Parameters
    ----------
    scores : array_like, shape [N, N], or SparseScores
        Similarities, row = query; ``scores[i, j]`` compares ``names[i]`` with
        ``names[j]`` (list order, whatever the names' sort order).
    names : sequence of str, length N
        Unique image names.
    graph : str or GraphSpec
        ``complete``, ``knn-K``, ``retrieval-NA-K``, ``sequential-W[+retrieval-K]``.
    anchor_row : callable, optional
        See :func:`pair_indices`.

    Returns
    -------
    list of (str, str)
        Deterministic: ``(names[i], names[j])`` with ``i < j``, sorted by ``(i, j)``.

    Raises
    ------
    asmkit.ArgumentError
        For a non-square or non-finite matrix, a names length mismatch or duplicate,
        or an unknown graph.
    """
    arr = scores if isinstance(scores, SparseScores) else _check_scores(scores)
    names = _check_names(names, arr.n if isinstance(arr, SparseScores) else arr.shape[0])
    idx = pair_indices(arr, graph, anchor_row=anchor_row)
    logger.info("%s: %d pairs among %d images", parse_graph(graph), len(idx), len(names))
    return [(names[i], names[j]) for i, j in idx.tolist()]


def write_pairs(path: str | Path, pairs: Iterable[tuple[str, str]]) -> Path:
    """Write ``name_a name_b`` per line (hloc / COLMAP pairs format), atomically.

    Raises
    ------
    asmkit.ArgumentError
        If a name contains whitespace (the format could not be read back).
    """
    out = Path(path)
    lines = []
    for pair in pairs:
        a, b = pair
        for name in (a, b):
            if not isinstance(name, str) or not name or any(c.isspace() for c in name):
                raise ArgumentError(f"pairs: name {name!r} is empty or contains whitespace")
        lines.append(f"{a} {b}\n")
    return write_text_atomic(out, "".join(lines))
