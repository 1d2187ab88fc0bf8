"""Hybrid presets: several feature types over the same images, their similarities fused.

A hybrid preset is a TOML file of ``asmkit/presets`` with a ``[hybrid]`` table instead of
``[features]``::

    [hybrid]
    members = ["sift", "deep_rot"]   # presets, each with its own codebook and inverted file
    fusion = "mutual_max"            # or "anchored_max", "robust_max", "score", "robust", "rank"

The pipeline (:mod:`asmkit.pipeline`) computes one query x database similarity matrix per
member and hands them to :func:`fuse`:

- ``score``: normalised late fusion. Each member's row (one query) is standardised over
  the database (minus its mean, divided by its standard deviation), so that a feature type
  whose similarities happen to be larger does not dominate; the standardised rows are
  summed. A match that stands out from the distractors in either member stands out in the
  sum.
- ``robust``: as ``score``, but each row is centred on its median and scaled by its median
  absolute deviation (times :data:`MAD_TO_STD`; an upper quantile's spread where that is
  0, :func:`_spread`). The median and the MAD describe the distractors alone, where the mean and the standard
  deviation also take in the few true matches, whose large scores inflate the deviation
  most for the member that separates them best; so a member whose matches stand far out
  of its noise (SIFT on hard copies) is no longer flattened to the level of one whose
  scores are spread (deep features on edits they do not survive).
- ``robust_max``: the ``robust`` sum plus, per candidate, the largest of the members'
  standardised scores. A candidate that one member is sure of and the other scores as
  noise (a hard copy that only SIFT survives, a blurred one that only deep features
  survive) then keeps most of its lead, while candidates both members rank high still
  add up; on the hard copies it loses less to the better member than ``robust``, at a
  small cost on upright photos (docs/robustness.md).
- ``mutual_max``: as ``robust_max``, but each member's score is first standardised twice,
  against the query's scores (the row, as ``robust``) and against the database image's
  own scores (its column: median and MAD of its similarities to a fixed sample of the
  database, the MAD at least :data:`COLUMN_SCALE_FLOOR` of the typical one,
  :func:`column_stats`), and the smaller of the two kept. A pair then counts
  only as much as it stands out for both images. An image that is similar to many
  (a textured or cluttered photo whose deep features match everything) is no longer
  taken for a match of every query it scores high for, while a true match stands out
  from both sides. It needs the column statistics (``columns``), which depend on the
  database only: :mod:`asmkit.pipeline` computes them with the scores (``eval``,
  ``scores``, ``pairs``) or stores them in the workspace (``index``).
- ``anchored_max``: the first member anchors the ranking. Each member's score is
  standardised as for ``mutual_max``; the first member's counts whole; the other members'
  are pooled by their maximum, which counts only by how far it exceeds
  :data:`ANCHOR_THRESHOLD`; the two terms are summed, plus the larger of them. A second
  member that is noise on an edit (deep features on a photo shrunk, warped and blurred at
  once) then cannot push the first member's match down with its confident mistakes, while
  what it is sure of (a blurred copy the first member misses) still counts. Pooled by the
  maximum, several views of one feature type (deep features upright and at four
  rotations) add the most confident view's evidence, not the same evidence once per view.
  It trades a little on upright photos, where the second member's moderate scores were
  evidence too (docs/robustness.md).
- ``rank``: reciprocal rank fusion, ``sum_m 1 / (RRF_K + rank_m)`` with ranks from 1; it
  ignores score magnitudes altogether.

Every fusion works on each row alone (``mutual_max`` given the database's column
statistics), so fusing row blocks gives the rows of the fused matrix (how ``pairs`` and
``scores --top`` fuse without an N x N array).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from ._validation import ArgumentError, check_choice
from .features.factory import query_turns
from .params import preset_names, preset_table

__all__ = [
    "ANCHOR_THRESHOLD",
    "COLUMN_SAMPLE",
    "COLUMN_SCALE_FLOOR",
    "FUSIONS",
    "MAD_TO_STD",
    "RRF_K",
    "TAIL_QUANTILES",
    "HybridSpec",
    "column_sample",
    "column_stats",
    "fuse",
    "hybrid_spec",
    "needs_columns",
]

#: Fusion methods of :func:`fuse`.
FUSIONS = ("score", "robust", "robust_max", "mutual_max", "anchored_max", "rank")
#: Database images whose scores estimate every image's column statistics
#: (:func:`column_sample`): enough for a stable median and MAD, few enough that computing
#: them costs a few hundred queries whatever the database size.
COLUMN_SAMPLE = 512
#: Values of the sample's rows that :func:`column_stats` holds as float64 at a time.
COLUMN_BLOCK = 1 << 24
#: The median absolute deviation of normal data times this is its standard deviation.
MAD_TO_STD = 1.4826
#: Upper quantiles of a row whose MAD is 0, tried in turn, each with the standard normal's
#: quantile at that level, which turns its distance above the median into a scale.
TAIL_QUANTILES = ((0.75, 0.6745), (0.9, 1.2816), (0.95, 1.6449), (0.99, 2.3263))
#: A column's scale is at least this fraction of the median column scale of its member:
#: an image with few features (a smooth object on a plain background) scores near 0
#: against almost every image, and without a floor a chance match would stand as far out
#: of its quiet column as a true copy stands out of its own.
COLUMN_SCALE_FLOOR = 0.5
#: ``anchored_max``: standardised scores of the members after the first count only above
#: this, a level that the deep members' non-matches rarely reach (docs/robustness.md).
ANCHOR_THRESHOLD = 3.0
#: The constant of reciprocal rank fusion (Cormack et al., SIGIR 2009): it damps the weight
#: of the very first ranks.
RRF_K = 60


class HybridSpec:
    """The ``[hybrid]`` table of a preset, checked.

    Attributes
    ----------
    members : tuple of str
        Member preset names (each a plain, non-hybrid preset).
    fusion : str
        One of :data:`FUSIONS`.
    """

    def __init__(self, members: Sequence[str], fusion: str = "score"):
        if isinstance(members, str) or not isinstance(members, Sequence) or len(members) < 2:
            raise ArgumentError(f"hybrid.members: expected at least two preset names, got {members!r}")
        names = preset_names()
        for m in members:
            if m not in names or "hybrid" in preset_table(m):
                raise ArgumentError(
                    f"hybrid.members: {m!r} is not a plain preset; expected some of "
                    f"{', '.join(n for n in names if 'hybrid' not in preset_table(n))}"
                )
            if query_turns(preset_table(m).get("features", {})):
                # Fusion works on score matrices whose columns are standardised over the
                # database as queries, which such a member would extract at every rotation.
                raise ArgumentError(f"hybrid.members: {m!r} searches queries at several rotations (query_rotations)")
        self.members = tuple(members)
        self.fusion = check_choice(fusion, "hybrid.fusion", FUSIONS)

    def to_dict(self) -> dict[str, Any]:
        """``{"members": [...], "fusion": ...}`` (JSON-able)."""
        return {"members": list(self.members), "fusion": self.fusion}


def hybrid_spec(preset: str | None) -> HybridSpec | None:
    """The hybrid spec of a shipped preset, or None when ``preset`` is not a hybrid one.

    Raises
    ------
    ArgumentError
        A hybrid table with bad members or fusion.
    """
    if preset is None or preset not in preset_names():
        return None
    table = preset_table(preset).get("hybrid")
    if table is None:
        return None
    return HybridSpec(table.get("members", ()), table.get("fusion", "score"))


def needs_columns(fusion: str) -> bool:
    """Whether :func:`fuse` needs the database's column statistics for ``fusion``."""
    return fusion in ("mutual_max", "anchored_max")


def column_sample(n: int) -> np.ndarray:
    """int64 ``[min(n, COLUMN_SAMPLE)]``: evenly spaced positions of ``n`` database images,
    ascending, whose rows :func:`column_stats` takes. Evenly spaced rather than random so
    that every caller (``eval``, ``scores``, ``index``) picks the same images without a
    seed."""
    return (
        np.unique(np.linspace(0, n - 1, min(n, COLUMN_SAMPLE)).round().astype(np.int64)) if n else np.zeros(0, np.int64)
    )


def column_stats(rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Each database image's centre and scale of similarity, for ``mutual_max``.

    Parameters
    ----------
    rows : numpy.ndarray
        Float ``[S, N]``: sample database images (queries) scored against the whole
        database of N images.
    positions : numpy.ndarray
        int ``[S]``: the sample images' positions among the N; their own (self-match)
        scores are left out.

    Returns
    -------
    numpy.ndarray
        float64 ``[2, N]``: per database image, the median of its scores against the sample
        and their robust scale (the median absolute deviation times :data:`MAD_TO_STD`,
        an upper quantile's spread where that is 0, see :func:`_spread`; at least
        :data:`COLUMN_SCALE_FLOOR` times the median of the positive scales; 0 where the
        scores are constant, a column that then carries no evidence).

    Raises
    ------
    ArgumentError
        Rows and positions that do not match.
    """
    rows = np.asarray(rows)
    positions = np.asarray(positions, dtype=np.int64)
    if rows.ndim != 2 or positions.shape != (len(rows),) or (len(positions) and positions.max() >= rows.shape[1]):
        raise ArgumentError(
            f"column_stats: expected [S, N] rows and S positions below N, got {rows.shape}, {positions.shape}"
        )
    out = np.zeros((2, rows.shape[1]), np.float64)
    # Column blocks: the float64 copies stay near COLUMN_BLOCK values whatever N is.
    step = max(1, COLUMN_BLOCK // max(1, len(rows)))
    for begin in range(0, rows.shape[1], step):
        block = rows[:, begin : begin + step].astype(np.float64)
        own = (positions >= begin) & (positions < begin + step)
        block[np.flatnonzero(own), positions[own] - begin] = np.nan
        with warnings.catch_warnings():
            # A column with no score but its own (a database of one image) is all NaN: no evidence.
            warnings.simplefilter("ignore", RuntimeWarning)
            centre, scale = _spread(block.T, nan=True)
        out[:, begin : begin + step] = np.nan_to_num(np.stack([centre, scale]), nan=0.0)
    live = out[1] > 0
    if live.any():
        out[1, live] = np.maximum(out[1, live], COLUMN_SCALE_FLOOR * np.median(out[1, live]))
    return out


def _spread(x: np.ndarray, nan: bool) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``[R]`` twice: each row's median and robust scale, for ``x`` float64
    ``[R, N]`` (NaN where ``nan``: values to leave out).

    The scale is the MAD times :data:`MAD_TO_STD`. Where that is 0 (more than half the row
    tied, typically at 0: a SIFT image that shares no visual word with most others), it
    is the first positive spread of an upper quantile over the median, in units of the
    normal quantile (:data:`TAIL_QUANTILES`), and the standard deviation only where every
    one of them is 0. Not the standard deviation at once: in such a row the few true
    matches are most of the variance, so a scale taken from it shrinks exactly the scores
    that stand out (a blurred or shrunken copy that SIFT finds through a few words).
    """
    median_of, quantile_of, std_of = (
        (np.nanmedian, np.nanquantile, np.nanstd) if nan else (np.median, np.quantile, np.std)
    )
    centre = median_of(x, axis=1)
    scale = MAD_TO_STD * median_of(np.abs(x - centre[:, None]), axis=1)
    tied = np.flatnonzero(~(scale > 0))
    for q, normal_q in TAIL_QUANTILES:
        if not len(tied):
            break
        scale[tied] = (quantile_of(x[tied], q, axis=1) - centre[tied]) / normal_q
        tied = tied[~(scale[tied] > 0)]
    if len(tied):
        scale[tied] = std_of(x[tied], axis=1)
    return centre, scale


def _column_z(m: np.ndarray, columns: np.ndarray) -> np.ndarray:
    centre, scale = columns
    return np.divide(m - centre, scale, out=np.zeros_like(m), where=scale > 0)


def _robust_rows(m: np.ndarray) -> np.ndarray:
    """float64 ``[Q, N]``: each row of ``m`` minus its median, over its robust scale
    (:func:`_spread`)."""
    median, scale = (v[:, None] for v in _spread(m, nan=False))
    # A constant row (an image without features) carries no evidence.
    return np.divide(m - median, scale, out=np.zeros_like(m), where=scale > 0)


def fuse(
    matrices: Sequence[np.ndarray], fusion: str = "score", columns: Sequence[np.ndarray] | None = None
) -> np.ndarray:
    """Fuse per-member similarity matrices of the same queries and database.

    Parameters
    ----------
    matrices : sequence of numpy.ndarray
        Float ``[Q, N]`` each, row q = query q, column j = database image j, higher = more
        similar; all of one shape.
    fusion : {"score", "robust", "robust_max", "mutual_max", "anchored_max", "rank"}
        See the module docstring.
    columns : sequence of numpy.ndarray, optional
        float64 ``[2, N]`` per member, its :func:`column_stats` over the same N database
        images; needed by ``mutual_max`` and ``anchored_max`` (:func:`needs_columns`),
        ignored otherwise.

    Returns
    -------
    numpy.ndarray
        float32 ``[Q, N]``, higher = more similar.

    Raises
    ------
    ArgumentError
        No matrix, matrices of different shapes, an unknown fusion, or ``mutual_max``
        without a ``[2, N]`` column array per member.
    """
    fusion = check_choice(fusion, "fusion", FUSIONS)
    if not matrices:
        raise ArgumentError("matrices: expected at least one similarity matrix")
    mats = [np.asarray(m, dtype=np.float64) for m in matrices]
    if any(m.ndim != 2 or m.shape != mats[0].shape for m in mats):
        raise ArgumentError(f"matrices: expected 2-D matrices of one shape, got {[m.shape for m in mats]}")
    out = np.zeros(mats[0].shape, np.float64)
    if fusion in ("robust_max", "mutual_max", "anchored_max"):
        rows = [_robust_rows(m) for m in mats]
        if needs_columns(fusion):
            n = mats[0].shape[1]
            if columns is None or len(columns) != len(mats) or any(np.shape(c) != (2, n) for c in columns):
                raise ArgumentError(
                    f"columns: fusion {fusion!r} needs one [2, {n}] column-statistics array per member "
                    "(asmkit.hybrid.column_stats)"
                )
            rows = [np.minimum(r, _column_z(m, np.asarray(c, np.float64))) for r, m, c in zip(rows, mats, columns)]
        if fusion == "anchored_max":
            # The later members are pooled by their maximum before the threshold: they are
            # other views of one kind of evidence (upright and rotation-pooled deep
            # features), and summed they would count it once per view.
            rows = [rows[0], np.maximum(np.max(rows[1:], axis=0) - ANCHOR_THRESHOLD, 0.0)]
        return (np.sum(rows, axis=0) + np.max(rows, axis=0)).astype(np.float32)
    for m in mats:
        if fusion == "score":
            std = m.std(axis=1, keepdims=True)
            # A constant row (an image without features) carries no evidence.
            out += np.divide(m - m.mean(axis=1, keepdims=True), std, out=np.zeros_like(m), where=std > 0)
        elif fusion == "robust":
            out += _robust_rows(m)
        else:
            # Stable ordering, so that exact ties keep database order as elsewhere.
            order = np.argsort(-m, axis=1, kind="stable")
            ranks = np.empty_like(order)
            np.put_along_axis(ranks, order, np.arange(1, m.shape[1] + 1)[None, :], axis=1)
            out += 1.0 / (RRF_K + ranks)
    return out.astype(np.float32)
