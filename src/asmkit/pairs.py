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

Pairs never contain an image twice, ``(a, b)`` and ``(b, a)`` count once, and the output
order is deterministic: ``(i, j)`` with ``i < j`` in matrix order, sorted.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ._io import write_text_atomic

__all__ = [
    "GraphSpec",
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
    ValueError
        If the string is not one of the known forms.
    """
    if isinstance(graph, GraphSpec):
        return graph
    if not isinstance(graph, str):
        raise ValueError(f"graph: expected a string such as 'knn-10', got {graph!r}")
    text = graph.strip().lower()
    if text == "complete":
        return GraphSpec("complete")
    if m := re.fullmatch(r"knn-(\d+)", text):
        k = int(m.group(1))
        if k < 1:
            raise ValueError(f"graph: knn needs k >= 1, got {graph!r}")
        return GraphSpec("knn", k=k)
    if m := re.fullmatch(r"retrieval-(\d+)-(\d+)", text):
        n_anchors, k = int(m.group(1)), int(m.group(2))
        if n_anchors == 0 and k == 0:
            raise ValueError(f"graph: retrieval needs anchors or neighbours, got {graph!r}")
        return GraphSpec("retrieval", k=k, n_anchors=n_anchors)
    if m := re.fullmatch(r"sequential-(\d+)(?:\+retrieval-(\d+))?", text):
        window, k = int(m.group(1)), int(m.group(2) or 0)
        if window < 1:
            raise ValueError(f"graph: sequential needs a window >= 1, got {graph!r}")
        return GraphSpec("sequential", k=k, window=window)
    raise ValueError(f"graph: unknown scene graph {graph!r}; expected {_GRAPH_FORMS}")


def _check_scores(scores: Any) -> np.ndarray:
    arr = np.asarray(scores)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"scores: expected a square [N, N] matrix, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"scores: expected a numeric matrix, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError("scores: the matrix contains NaN or infinite values")
    return arr


def _knn(scores: np.ndarray, k: int) -> np.ndarray:
    """The k most similar *other* images of every row, ties to the lower index.

    Returns int64 [N, min(k, N - 1)].
    """
    n = scores.shape[0]
    k = max(0, min(k, n - 1))
    out = np.empty((n, k), dtype=np.int64)
    if k == 0:
        return out
    for i in range(n):
        row = scores[i].astype(np.float64)
        # An image is not its own neighbour, whatever its self-score is.
        row[i] = -np.inf
        threshold = np.partition(row, n - k)[n - k]
        # Every candidate tied at the threshold is kept so that the lexsort, not
        # argpartition's internal order, decides which ties make the cut.
        cand = np.flatnonzero(row >= threshold)
        out[i] = cand[np.lexsort((cand, -row[cand]))][:k]
    return out


def select_anchors(scores: Any, n_anchors: int) -> np.ndarray:
    """Farthest-point sampling of anchor images on the similarities.

    The first anchor is the most central image (largest summed similarity to the
    others); each next one is the image whose best similarity to the anchors so far is
    lowest. Similarities are symmetrised, ``(S + S.T) / 2``, and self-scores ignored.

    Parameters
    ----------
    scores : array_like, shape [N, N]
        Similarities, row = query.
    n_anchors : int
        How many anchors; at most N are returned.

    Returns
    -------
    ndarray of int64, shape [min(n_anchors, N)]
        Anchor indices in selection order.
    """
    arr = _check_scores(scores)
    n = arr.shape[0]
    n_anchors = min(int(n_anchors), n)
    if n_anchors <= 0:
        return np.empty(0, dtype=np.int64)
    diag = np.diagonal(arr).astype(np.float64)
    centrality = (arr.sum(axis=1, dtype=np.float64) + arr.sum(axis=0, dtype=np.float64)) / 2 - diag
    anchors = [int(np.argmax(centrality))]
    best = np.full(n, -np.inf)
    chosen = np.zeros(n, dtype=bool)
    while True:
        a = anchors[-1]
        chosen[a] = True
        sym = (arr[a].astype(np.float64) + arr[:, a].astype(np.float64)) / 2
        best = np.maximum(best, sym)
        if len(anchors) == n_anchors:
            break
        best[chosen] = np.inf  # anchors are never picked again
        anchors.append(int(np.argmin(best)))
    return np.asarray(anchors, dtype=np.int64)


def _nearest_anchor(arr: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """For every image, its most similar anchor (symmetrised scores); int64 [N]."""
    sym = (arr[:, anchors].astype(np.float64) + arr[anchors, :].T.astype(np.float64)) / 2
    # Highest similarity, i.e. the *nearest* anchor: MASt3R once took the farthest one
    # (naver/mast3r issue #55).
    return anchors[np.argmax(sym, axis=1)]


def _canonical(i: Iterable[int] | np.ndarray, j: Iterable[int] | np.ndarray) -> np.ndarray:
    a = np.asarray(i, dtype=np.int64).ravel()
    b = np.asarray(j, dtype=np.int64).ravel()
    keep = a != b
    lo, hi = np.minimum(a, b)[keep], np.maximum(a, b)[keep]
    if len(lo) == 0:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.stack([lo, hi], axis=1), axis=0)


def pair_indices(scores: Any, graph: str | GraphSpec) -> np.ndarray:
    """Index pairs of a scene graph.

    Parameters
    ----------
    scores : array_like, shape [N, N]
        Similarities, row = query; finite.
    graph : str or GraphSpec
        See the module docstring.

    Returns
    -------
    ndarray of int64, shape [P, 2]
        Pairs ``(i, j)`` with ``i < j``, sorted, without duplicates.
    """
    arr = _check_scores(scores)
    spec = parse_graph(graph)
    n = arr.shape[0]
    parts = [np.empty((0, 2), dtype=np.int64)]
    if spec.kind == "complete":
        i, j = np.triu_indices(n, k=1)
        parts.append(_canonical(i, j))
    if spec.kind == "sequential":
        for d in range(1, min(spec.window, n - 1) + 1):
            parts.append(_canonical(np.arange(n - d), np.arange(d, n)))
    if spec.kind == "retrieval" and spec.n_anchors > 0:
        anchors = select_anchors(arr, spec.n_anchors)
        ai, aj = np.triu_indices(len(anchors), k=1)
        parts.append(_canonical(anchors[ai], anchors[aj]))
        parts.append(_canonical(np.arange(n), _nearest_anchor(arr, anchors)))
    if spec.k > 0 and spec.kind != "complete":
        nn = _knn(arr, spec.k)
        parts.append(_canonical(np.repeat(np.arange(n), nn.shape[1]), nn))
    pairs = np.concatenate(parts)
    if len(pairs) == 0:
        return pairs
    return np.unique(pairs, axis=0)


def _check_names(names: Sequence[str], n: int) -> list[str]:
    if isinstance(names, (str, bytes)):
        raise ValueError("names: expected a sequence of image names, got a single string")
    names = list(names)
    if len(names) != n:
        raise ValueError(f"names: {len(names)} names for a {n}x{n} score matrix")
    if not all(isinstance(x, str) and x for x in names):
        raise ValueError("names: every name must be a non-empty string")
    if len(set(names)) != len(names):
        raise ValueError("names: image names must be unique")
    return names


def pairs_from_scores(
    scores: Any, names: Sequence[str], graph: str | GraphSpec
) -> list[tuple[str, str]]:
    """Image-name pairs of a scene graph.

    Parameters
    ----------
    scores : array_like, shape [N, N]
        Similarities, row = query; ``scores[i, j]`` compares ``names[i]`` with
        ``names[j]`` (list order, whatever the names' sort order).
    names : sequence of str, length N
        Unique image names.
    graph : str or GraphSpec
        ``complete``, ``knn-K``, ``retrieval-NA-K``, ``sequential-W[+retrieval-K]``.

    Returns
    -------
    list of (str, str)
        Deterministic: ``(names[i], names[j])`` with ``i < j``, sorted by ``(i, j)``.

    Raises
    ------
    ValueError
        For a non-square or non-finite matrix, a names length mismatch or duplicate,
        or an unknown graph.
    """
    arr = _check_scores(scores)
    names = _check_names(names, arr.shape[0])
    idx = pair_indices(arr, graph)
    logger.info("%s: %d pairs among %d images", parse_graph(graph), len(idx), len(names))
    return [(names[i], names[j]) for i, j in idx.tolist()]


def write_pairs(path: str | Path, pairs: Iterable[tuple[str, str]]) -> Path:
    """Write ``name_a name_b`` per line (hloc / COLMAP pairs format), atomically.

    Raises
    ------
    ValueError
        If a name contains whitespace (the format could not be read back).
    """
    out = Path(path)
    lines = []
    for pair in pairs:
        a, b = pair
        for name in (a, b):
            if not isinstance(name, str) or not name or any(c.isspace() for c in name):
                raise ValueError(f"pairs: name {name!r} is empty or contains whitespace")
        lines.append(f"{a} {b}\n")
    return write_text_atomic(out, "".join(lines))
