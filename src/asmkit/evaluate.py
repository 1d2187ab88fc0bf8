"""Retrieval accuracy: mAP and mP@k (revisited protocol), UKBench N-S score.

Pure functions over integer rankings, following the semantics of the revisited
Oxford/Paris evaluation code (Radenović et al., CVPR 2018; docs/math.md §7):

- junk images are removed from a query's ranking before anything is measured;
- average precision integrates the precision/recall curve with the trapezoidal rule,
  taking at every positive the mean of the precision at the rank before it and at it;
- mP@k is the precision at ``min(k, rank of the last positive)``, so a query with fewer
  than k positives, all retrieved first, scores 1;
- queries without positives are left out of the means.

Ground truth is read from ``gt.json`` in the format of the shared data sets (``images``,
``queries``, ``positives``, ``junk``, optional ``groups`` and ``easy``/``hard``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ._io import read_json
from ._validation import ArgumentError, FileFormatError

__all__ = [
    "GroundTruth",
    "load_ground_truth",
    "average_precision",
    "mean_average_precision",
    "ns_score",
    "evaluate",
    "KAPPAS",
    "PROTOCOLS",
]

logger = logging.getLogger(__name__)

#: The k of mP@k reported by default.
KAPPAS = (1, 5, 10)
#: The revisited Oxford/Paris protocols.
PROTOCOLS = ("easy", "medium", "hard")


@dataclass(frozen=True)
class GroundTruth:
    """Ground truth of a retrieval data set.

    Every per-query list holds indices into :attr:`images`.

    Attributes
    ----------
    images : list of str
        The database images (relative paths), in index order.
    queries : list of str
        The query images, one per row of a full ranking matrix.
    positives : list of ndarray of int64
        ``positives[q]``: images relevant to query q.
    junk : list of ndarray of int64
        ``junk[q]``: images ignored for query q (removed from its ranking).
    groups : list of ndarray of int64 or None
        Groups of images showing the same object (UKBench), or None.
    query_groups : list of ndarray of int64 or None
        ``query_groups[q]``: the group of query q (the query included when it is a
        database image); None when there are no groups.
    easy, hard : list of ndarray of int64 or None
        Easy and hard positives per query (revisited Oxford/Paris), or None.
    families : dict of str to list of ndarray of int64, or None
        ``families[f][q]``: the positives of query q that belong to family f (a kind of
        transformation, from the ``families`` key of gt.json that maps each positive image
        to its family name), or None.
    name : str
        The data set's name (``name`` in gt.json, else the folder name).
    root : Path or None
        The folder that holds gt.json; image paths are relative to it.
    """

    images: list[str]
    queries: list[str]
    positives: list[np.ndarray]
    junk: list[np.ndarray]
    groups: list[np.ndarray] | None = None
    query_groups: list[np.ndarray] | None = None
    easy: list[np.ndarray] | None = None
    hard: list[np.ndarray] | None = None
    families: dict[str, list[np.ndarray]] | None = None
    name: str = ""
    root: Path | None = None

    @property
    def n_queries(self) -> int:
        """Number of queries."""
        return len(self.queries)

    @property
    def has_protocols(self) -> bool:
        """Whether the Easy/Medium/Hard protocols are available."""
        return self.easy is not None and self.hard is not None

    def image_paths(self) -> list[Path]:
        """Absolute paths of the database images (requires :attr:`root`)."""
        if self.root is None:
            raise ArgumentError("gt: ground truth has no root folder; image paths are unknown")
        return [self.root / name for name in self.images]

    def family(self, name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Positives and junk of each query for one family of :attr:`families`: the
        family's positives, and the query's other positives counted as junk.

        Returns
        -------
        positives, junk : list of ndarray of int64
        """
        if self.families is None or name not in self.families:
            raise ArgumentError(f"family: {name!r} is not a family of the ground truth")
        positives = self.families[name]
        junk = [np.union1d(j, np.setdiff1d(p, f)) for j, p, f in zip(self.junk, self.positives, positives)]
        return positives, junk

    def protocol(self, name: str | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Positives and junk of each query under a protocol.

        Parameters
        ----------
        name : {None, "easy", "medium", "hard"}
            None gives :attr:`positives` and :attr:`junk` as stored. Easy: positives =
            easy, junk = junk + hard. Medium: positives = easy + hard, junk = junk.
            Hard: positives = hard, junk = junk + easy.

        Returns
        -------
        positives, junk : list of ndarray of int64
        """
        if name is None:
            return self.positives, self.junk
        if name not in PROTOCOLS:
            raise ArgumentError(f"protocol: expected one of {PROTOCOLS} or None, got {name!r}")
        if not self.has_protocols:
            raise ArgumentError(f"protocol: {name!r} needs 'easy' and 'hard' lists in the ground truth")
        if name == "easy":
            pos = self.easy
            junk = [np.union1d(j, h) for j, h in zip(self.junk, self.hard)]
        elif name == "medium":
            pos = [np.union1d(e, h) for e, h in zip(self.easy, self.hard)]
            junk = self.junk
        else:
            pos = self.hard
            junk = [np.union1d(j, e) for j, e in zip(self.junk, self.easy)]
        return list(pos), list(junk)


# ----------------------------------------------------------------------------- loading


def _per_query(data: Mapping[str, Any], key: str, queries: list[str], path: Path) -> list[Any]:
    """A per-query entry given either as {query: [...]} or as a list in query order."""
    value = data[key]
    if isinstance(value, dict):
        missing = [q for q in queries if q not in value]
        if missing:
            raise FileFormatError(path, f"key {key!r} has no entry for query {missing[0]!r}")
        extra = sorted(set(value) - set(queries))
        if extra:
            raise FileFormatError(path, f"key {key!r} names {extra[0]!r}, which is not a query")
        return [value[q] for q in queries]
    if isinstance(value, list):
        if len(value) != len(queries):
            raise FileFormatError(path, f"key {key!r} has {len(value)} entries for {len(queries)} queries")
        return value
    raise FileFormatError(path, f"key {key!r} must be an object keyed by query or a list")


def _indices(names: Any, index: Mapping[str, int], path: Path, where: str) -> np.ndarray:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FileFormatError(path, f"{where} must be a list of image names")
    out = np.empty(len(names), dtype=np.int64)
    for i, n in enumerate(names):
        if n not in index:
            raise FileFormatError(path, f"{where} names {n!r}, which is not in 'images'")
        out[i] = index[n]
    return np.unique(out)


def load_ground_truth(folder: str | Path) -> GroundTruth:
    """Read ``folder/gt.json`` (or a gt.json path) in the shared data-set format.

    Parameters
    ----------
    folder : str or Path
        The data-set folder, or the JSON file itself.

    Returns
    -------
    GroundTruth

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    asmkit.FileFormatError
        If the file is not UTF-8 JSON, or a key is missing or inconsistent; the message
        names the file and the key.
    """
    path = Path(folder)
    if path.is_dir():
        path = path / "gt.json"
    if not path.is_file():
        raise FileNotFoundError(f"ground truth not found: {path}")
    data = read_json(path, "a ground-truth file")
    if not isinstance(data, dict):
        raise FileFormatError(path, "expected a JSON object at the top level")
    for key in ("images", "queries", "positives", "junk"):
        if key not in data:
            raise FileFormatError(path, f"missing key {key!r}")
    images, queries = data["images"], data["queries"]
    for key, value in (("images", images), ("queries", queries)):
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise FileFormatError(path, f"key {key!r} must be a list of image names")
    if len(set(images)) != len(images):
        raise FileFormatError(path, "key 'images' lists an image more than once")
    if len(set(queries)) != len(queries):
        raise FileFormatError(path, "key 'queries' lists a query more than once")
    index = {n: i for i, n in enumerate(images)}

    def lists(key: str) -> list[np.ndarray]:
        return [
            _indices(v, index, path, f"{key}[{q!r}]") for q, v in zip(queries, _per_query(data, key, queries, path))
        ]

    positives, junk = lists("positives"), lists("junk")
    easy = hard = None
    if ("easy" in data) != ("hard" in data):
        raise FileFormatError(path, "keys 'easy' and 'hard' must be given together")
    if "easy" in data:
        easy, hard = lists("easy"), lists("hard")

    groups = query_groups = None
    if "groups" in data:
        raw = data["groups"]
        if not isinstance(raw, list):
            raise FileFormatError(path, "key 'groups' must be a list of lists of image names")
        groups = [_indices(g, index, path, f"groups[{i}]") for i, g in enumerate(raw)]
        group_of: dict[str, int] = {}
        for gi, g in enumerate(raw):
            for n in g:
                if n in group_of and group_of[n] != gi:
                    raise FileFormatError(path, f"key 'groups': image {n!r} is in two groups")
                group_of[n] = gi
        query_groups = []
        for q in queries:
            if q not in group_of:
                raise FileFormatError(path, f"key 'groups': query {q!r} is in no group")
            query_groups.append(groups[group_of[q]])

    families = None
    if "families" in data:
        raw = data["families"]
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise ValueError(f"{path}: key 'families' must map image names to family names")
        fam_of = np.full(len(images), "", dtype=object)
        named = _indices(list(raw), index, path, "families")
        fam_of[named] = [raw[images[i]] for i in named]
        families = {f: [p[fam_of[p] == f] for p in positives] for f in sorted(set(raw.values()))}

    name = data.get("name", path.parent.name)
    return GroundTruth(
        images=list(images),
        queries=list(queries),
        positives=positives,
        junk=junk,
        groups=groups,
        query_groups=query_groups,
        easy=easy,
        hard=hard,
        families=families,
        name=str(name),
        root=path.parent,
    )


# ----------------------------------------------------------------------------- metrics


def _as_ranks(ranks: Any, name: str = "ranks") -> np.ndarray:
    arr = np.asarray(ranks)
    if arr.ndim != 2:
        raise ArgumentError(f"{name}: expected a 2-D integer array [Q, N], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ArgumentError(f"{name}: expected integer image indices, got dtype {arr.dtype}")
    if arr.size and arr.min() < -1:
        raise ArgumentError(f"{name}: indices must be >= 0 (or -1 for padding), got {arr.min()}")
    return arr.astype(np.int64, copy=False)


def _positive_positions(ranked_ids: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the positives in the ranking once junk is removed.

    An image listed both as positive and as junk counts as positive, as in the
    revisited benchmark code. Padding (-1) is dropped.
    """
    ranked = ranked_ids[ranked_ids >= 0]
    drop = np.isin(ranked, junk) & ~np.isin(ranked, positives)
    ranked = ranked[~drop]
    return np.flatnonzero(np.isin(ranked, positives))


def _ap_from_positions(pos: np.ndarray, n_positives: int) -> float:
    # Trapezoid between recall j/n and (j+1)/n: precision j/r just before the positive
    # at 0-based rank r (1 when r = 0) and (j+1)/(r+1) at it.
    j = np.arange(len(pos), dtype=np.float64)
    r = pos.astype(np.float64)
    before = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
    at = (j + 1.0) / (r + 1.0)
    return float(np.sum(before + at) / (2.0 * n_positives))


def _precision_at(pos: np.ndarray, kappas: Sequence[int]) -> list[float]:
    if len(pos) == 0:
        return [0.0] * len(kappas)
    last = int(pos[-1]) + 1  # 1-based rank of the last retrieved positive
    out = []
    for k in kappas:
        kq = min(last, k)
        out.append(float(np.count_nonzero(pos < kq)) / kq)
    return out


def average_precision(ranked_ids: Any, positives: Any, junk: Any = ()) -> float:
    """Average precision of one ranking (revisited benchmark semantics).

    Parameters
    ----------
    ranked_ids : array_like of int, shape [N]
        Image indices, best first; -1 entries (padding) are ignored.
    positives : array_like of int
        Relevant image indices. Positives missing from the ranking count as never
        retrieved.
    junk : array_like of int
        Image indices removed from the ranking before measuring.

    Returns
    -------
    float
        AP in [0, 1]; NaN when there are no positives.
    """
    ranked = np.asarray(ranked_ids, dtype=np.int64).ravel()
    pos_set = np.unique(np.asarray(positives, dtype=np.int64).ravel())
    junk_set = np.unique(np.asarray(junk, dtype=np.int64).ravel())
    if len(pos_set) == 0:
        return math.nan
    return _ap_from_positions(_positive_positions(ranked, pos_set, junk_set), len(pos_set))


def _row_queries(gt: GroundTruth, n_rows: int, query_indices: Any) -> np.ndarray:
    if query_indices is None:
        if n_rows != gt.n_queries:
            raise ArgumentError(
                f"ranks: {n_rows} rows for {gt.n_queries} queries; pass query_indices to evaluate a subset"
            )
        return np.arange(n_rows, dtype=np.int64)
    qi = np.asarray(query_indices)
    if qi.ndim != 1 or not np.issubdtype(qi.dtype, np.integer):
        raise ArgumentError("query_indices: expected a 1-D integer array")
    if len(qi) != n_rows:
        raise ArgumentError(f"query_indices: {len(qi)} entries for {n_rows} rows of ranks")
    if len(qi) and (qi.min() < 0 or qi.max() >= gt.n_queries):
        raise ArgumentError(f"query_indices: must lie in [0, {gt.n_queries})")
    return qi.astype(np.int64)


def _check_ids(ranks: np.ndarray, gt: GroundTruth) -> None:
    if ranks.size and ranks.max() >= len(gt.images):
        raise ArgumentError(f"ranks: index {int(ranks.max())} out of range for {len(gt.images)} images")


def _map_lists(
    ranks: np.ndarray,
    positives: Sequence[np.ndarray],
    junk: Sequence[np.ndarray],
    kappas: Sequence[int],
) -> tuple[float, dict[int, float], int]:
    """mAP, mP@k and the number of queries that had positives."""
    aps, prs = [], []
    for row, pos_set, junk_set in zip(ranks, positives, junk):
        if len(pos_set) == 0:
            continue
        pos = _positive_positions(row, pos_set, junk_set)
        aps.append(_ap_from_positions(pos, len(pos_set)))
        prs.append(_precision_at(pos, kappas))
    n_empty = len(ranks) - len(aps)
    if n_empty:
        logger.warning("%d of %d queries have no positives; left out of the mean", n_empty, len(ranks))
    if not aps:
        return math.nan, {k: math.nan for k in kappas}, 0
    mp = np.mean(np.asarray(prs), axis=0)
    return float(np.mean(aps)), {k: float(v) for k, v in zip(kappas, mp)}, len(aps)


def _check_kappas(kappas: Sequence[int]) -> tuple[int, ...]:
    if not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1 for k in kappas):
        raise ArgumentError(f"kappas: expected positive integers, got {kappas!r}")
    return tuple(int(k) for k in kappas)


def mean_average_precision(
    ranks: Any,
    gt: GroundTruth,
    *,
    query_indices: Any = None,
    protocol: str | None = None,
    kappas: Sequence[int] = KAPPAS,
) -> tuple[float, dict[int, float]]:
    """mAP and mP@k of rankings against the ground truth.

    Parameters
    ----------
    ranks : array_like of int, shape [Q, N]
        Row q ranks database images (indices into ``gt.images``) for query
        ``gt.queries[q]`` (or ``query_indices[q]``), best first; -1 is padding. Rows may
        be truncated (top-k): positives not in a row count as never retrieved.
    gt : GroundTruth
    query_indices : array_like of int, shape [Q], optional
        The query (index into ``gt.queries``) of each row, to evaluate a subset.
    protocol : {None, "easy", "medium", "hard"}
        Which positives and junk to use (see :meth:`GroundTruth.protocol`).
    kappas : sequence of int
        The k of mP@k.

    Returns
    -------
    map : float
        Mean AP over queries that have positives (NaN if none has).
    mp_at_k : dict of int to float
        Mean precision at each k (revisited semantics, see the module docstring).
    """
    arr = _as_ranks(ranks)
    _check_ids(arr, gt)
    rows = _row_queries(gt, arr.shape[0], query_indices)
    positives, junk = gt.protocol(protocol)
    mean_ap, mp, _ = _map_lists(arr, [positives[q] for q in rows], [junk[q] for q in rows], _check_kappas(kappas))
    return mean_ap, mp


def ns_score(ranks: Any, groups: Sequence[Any]) -> float:
    """UKBench N-S score: group members among the top 4, averaged over queries.

    Parameters
    ----------
    ranks : array_like of int, shape [Q, N], N >= 4
        Rankings over the whole database, the query itself included (it counts).
    groups : sequence of array_like of int, length Q
        ``groups[q]``: the image indices of query q's group, the query included.

    Returns
    -------
    float
        In [0, 4] for groups of 4.
    """
    arr = _as_ranks(ranks)
    if len(groups) != arr.shape[0]:
        raise ArgumentError(f"groups: {len(groups)} entries for {arr.shape[0]} rows of ranks")
    if arr.shape[1] < 4:
        raise ArgumentError(f"ranks: the N-S score needs at least 4 columns, got {arr.shape[1]}")
    if arr.shape[0] == 0:
        return math.nan
    top = arr[:, :4]
    hits = [np.count_nonzero(np.isin(row[row >= 0], np.asarray(g))) for row, g in zip(top, groups)]
    return float(np.mean(hits))


def evaluate(ranks: Any, gt: GroundTruth, *, query_indices: Any = None) -> dict[str, Any]:
    """All metrics the ground truth supports, as a JSON-ready dict.

    Parameters
    ----------
    ranks : array_like of int, shape [Q, N]
        See :func:`mean_average_precision`.
    gt : GroundTruth
    query_indices : array_like of int, shape [Q], optional
        The query of each row (index into ``gt.queries``).

    Returns
    -------
    dict
        ``{"map", "mp": {"1", "5", "10"}, "n_queries"}``, plus ``"ns_score"`` when the
        ground truth has groups and ``"easy"``/``"medium"``/``"hard"`` (each with
        ``map``, ``mp`` and ``n_queries``) when it has easy/hard lists, and ``"families"``
        (family name -> ``map``, ``mp``, ``n_queries``) when it names families: a family's AP
        counts only that family's positives, the query's other positives being junk.
        ``n_queries`` counts the queries that had positives.
    """
    arr = _as_ranks(ranks)
    _check_ids(arr, gt)
    rows = _row_queries(gt, arr.shape[0], query_indices)

    def one(protocol: str | None) -> dict[str, Any]:
        positives, junk = gt.protocol(protocol)
        mean_ap, mp, n = _map_lists(arr, [positives[q] for q in rows], [junk[q] for q in rows], KAPPAS)
        return {"map": mean_ap, "mp": {str(k): v for k, v in mp.items()}, "n_queries": n}

    result = one(None)
    if gt.query_groups is not None:
        result["ns_score"] = ns_score(arr, [gt.query_groups[q] for q in rows])
    if gt.has_protocols:
        for protocol in PROTOCOLS:
            result[protocol] = one(protocol)
    if gt.families is not None:
        result["families"] = {}
        for family in gt.families:
            fam_pos, fam_junk = gt.family(family)
            mean_ap, mp, n = _map_lists(arr, [fam_pos[q] for q in rows], [fam_junk[q] for q in rows], KAPPAS)
            result["families"][family] = {"map": mean_ap, "mp": {str(k): v for k, v in mp.items()}, "n_queries": n}
    return result
