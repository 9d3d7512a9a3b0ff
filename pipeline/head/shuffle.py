"""Which rows go into which window of a pass: a shuffle that does not trust the files' order.

Row groups hold consecutive rows of one (shard, epoch); when shards are sorted by class, a
row group holds a handful of classes, so shuffling whole row groups within a buffer leaves
each batch with the classes of a few groups. Here every pass is a pure function of
``(seed, pass)``:

- the N row groups are put in a seeded order (positions ``0..N-1``), and the training rows of
  each group are permuted and cut into ``spread`` slices (``spread`` <= N);
- window ``w`` holds slice ``j`` of the group at position ``(w - j) mod N`` for every
  ``j < spread``, i.e. a ``1/spread`` share of each of ``spread`` groups, permuted again.

So each window (about one group's worth of rows) mixes ``spread`` groups from anywhere in the
cache, every training row appears exactly once per pass, and only the ``spread`` groups that
are active at a window need to be held decoded: memory is bounded by ``spread`` groups,
whatever the cache size. A group is active for ``spread`` consecutive windows; the ones that
wrap around the end of the pass are read twice per pass (once at each end).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_ORDER_SALT = 0xF11E
_GROUP_SALT = 0x6A0
_WINDOW_SALT = 0x3D0


def spread_for(rows_held: int, group_rows: Sequence[int]) -> int:
    """How many of the groups (of ``group_rows`` rows each) to interleave so that about
    ``rows_held`` rows are held at a time: all of them where they hold no more rows (a last
    group of each shard smaller than the rest kept a cache that fits from being held whole)."""
    if sum(group_rows) <= rows_held:
        return len(group_rows)
    return max(1, min(len(group_rows), rows_held // max(1, max(group_rows))))


def pass_order(groups: int, *, seed: int, pass_index: int) -> np.ndarray:
    """The row groups (indices) in the order of positions of one pass."""
    return np.random.default_rng([seed, pass_index, _ORDER_SALT]).permutation(groups)


def active(window: int, *, groups: int, spread: int) -> list[int]:
    """Positions of the groups in ``window``, by slice: element ``j`` gives slice ``j``."""
    return [(window - j) % groups for j in range(spread)]


def slice_bounds(rows: int, part: int, spread: int) -> tuple[int, int]:
    """Start and stop of slice ``part`` of ``rows`` permuted rows cut into ``spread`` slices."""
    return part * rows // spread, (part + 1) * rows // spread


def group_permutation(rows: int, *, seed: int, pass_index: int, position: int) -> np.ndarray:
    """The order in which a group's training rows are dealt to its slices in one pass."""
    return np.random.default_rng([seed, pass_index, _GROUP_SALT, position]).permutation(rows)


def window_permutation(rows: int, *, seed: int, pass_index: int, window: int) -> np.ndarray:
    """The order of the rows within one window."""
    return np.random.default_rng([seed, pass_index, _WINDOW_SALT, window]).permutation(rows)
