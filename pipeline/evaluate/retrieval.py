"""Safe retrieval (paper, section 5.2 and table 1): 1-NN error after rejecting uncertain images.

Three rows per uncertainty source:

- ``full``: leave-one-out 1-NN error over every query against every other image;
- ``clean_queries``: the ``q`` most uncertain queries are rejected (not answered);
- ``clean_database``: those images are also removed from the database, so no query can
  retrieve them.

``per_class`` rejects ``floor(q * n_c)`` images in each class (the paper's protocol, which needs
labels); ``class_agnostic`` rejects ``floor(q * N)`` overall, which a deployed system can do.
Ties in uncertainty are broken in a fixed random order (seed 0), not by row: a source that
ties many rows (a constant one at the extreme) rejects a random subset of them, so the order of
the rows (sorted by class, or hard images last) cannot earn it a gain.
"""

from __future__ import annotations

import numpy as np

from pipeline.evaluate.knn import BLOCK_BYTES, Neighbours, nearest_neighbours
from pipeline.evaluate.metrics import neighbour_correct

TIE_SEED = 0
"""Seed of the random order that breaks ties in uncertainty."""


def most_uncertain(
    uncertainty: np.ndarray, fraction: float, groups: np.ndarray | None = None
) -> np.ndarray:
    """Mask of the ``fraction`` most uncertain rows, per group of ``groups`` (or overall)."""
    rejected = np.zeros(len(uncertainty), bool)
    if groups is None:
        groups = np.zeros(len(uncertainty), np.int64)
    tie_break = np.random.default_rng(TIE_SEED).permutation(len(uncertainty))
    order = np.lexsort((tie_break, uncertainty, groups))
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts, ends, strict=True):
        count = int(np.floor(fraction * (end - start) + 1e-9))
        rejected[order[end - count : end]] = True
    return rejected


def retrieval_errors(
    unit: np.ndarray,
    labels: np.ndarray,
    full: Neighbours,
    rejected: np.ndarray,
    *,
    device: str = "cpu",
    block_bytes: int = BLOCK_BYTES,
) -> dict[str, float | int]:
    """1-NN error with all queries, with ``rejected`` queries refused, and with them also
    removed from the database; ``full`` is the leave-one-out search over every row."""
    correct = neighbour_correct(labels, full.index)
    kept = ~rejected
    queries = np.flatnonzero(kept)
    index = full.index[queries].copy()
    # A query keeps its neighbour unless that neighbour was removed: removing other rows
    # cannot create a closer one. Where rows tied, removing one can move the best similarity
    # and so which rows tie with it (the tolerance is not transitive): search those again.
    stale = (index >= 0) & (rejected[np.maximum(index, 0)] | full.tied[queries])
    if stale.any():
        again = nearest_neighbours(
            unit, queries=queries[stale], database=kept, device=device, block_bytes=block_bytes
        )
        index[stale] = again.index
    cleaned = neighbour_correct(labels, index, queries)
    return {
        "full": _error(correct),
        "clean_queries": _error(correct[queries]),
        "clean_database": _error(cleaned),
        "queries": len(queries),
    }


def _error(correct: np.ndarray) -> float:
    return float(1.0 - correct.mean()) if len(correct) else float("nan")
