"""Exact leave-one-out cosine 1-nearest neighbours, chunked over queries (memory bounded).

Definition (the report's Recall@1 and R-AUROC rest on it): every row is L2-normalised (an
all-zero row stays zero, similarity 0 to everything); for query row ``i`` the neighbour is the
database row ``j != i`` of highest cosine similarity. The query is excluded by its row index,
never by assuming the best hit is itself, so an exact duplicate of a query is a valid
neighbour. Ties: similarities within ``TIE_TOLERANCE`` of the best one count as tied (float32
products of identical rows may differ in the last bits) and the lowest row index wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.precision import exact_float32

TIE_TOLERANCE = 1e-6
BLOCK_BYTES = 256 * 2**20
"""Size of one block of query-by-database similarities; memory is this plus the embeddings."""


@dataclass(frozen=True)
class Neighbours:
    """Each query's nearest database row (-1 where none is left), its cosine similarity, and
    whether another row was within ``TIE_TOLERANCE`` of it (``tied``)."""

    index: np.ndarray
    similarity: np.ndarray
    tied: np.ndarray


def normalize(embedding: np.ndarray, *, chunk_rows: int = 65_536) -> np.ndarray:
    """Rows of ``embedding`` scaled to unit L2 norm, as a new float32 array; each row is first
    scaled by its largest value, so that float32's squares cannot overflow (values over ~1e18
    gave an infinite norm and all-zero rows)."""
    unit = np.empty(embedding.shape, np.float32)
    for start in range(0, len(embedding), chunk_rows):
        part = embedding[start : start + chunk_rows].astype(np.float32)
        peak = np.abs(part).max(axis=1, keepdims=True)
        np.divide(part, peak, out=part, where=peak > 0)
        norm = np.linalg.norm(part, axis=1, keepdims=True)
        np.divide(part, norm, out=part, where=norm > 0)
        unit[start : start + chunk_rows] = part
    return unit


def query_chunk(rows: int, *, block_bytes: int = BLOCK_BYTES) -> int:
    """Queries per block so that a block of similarities against ``rows`` stays in budget."""
    return max(1, block_bytes // (4 * max(rows, 1)))


def nearest_neighbours(
    unit: np.ndarray | torch.Tensor,
    *,
    queries: np.ndarray | None = None,
    database: np.ndarray | None = None,
    device: str = "cpu",
    block_bytes: int = BLOCK_BYTES,
    on_chunk: Callable[[int], None] | None = None,
) -> Neighbours:
    """The cosine 1-NN of each query row among the other database rows of ``unit``.

    ``unit``: (N, D) unit-norm rows (see :func:`normalize`). ``queries``: row indices to
    search for (default: all). ``database``: boolean mask (N,) of rows that may be returned
    (default: all; the others are masked out of each block, so memory does not grow).
    ``on_chunk`` is called with the number of queries done after each block.
    """
    x = torch.as_tensor(unit, device=device)
    rows = np.arange(len(x)) if queries is None else np.asarray(queries, dtype=np.int64)
    index = np.full(len(rows), -1, np.int64)
    similarity = np.full(len(rows), -np.inf, np.float32)
    tied = np.zeros(len(rows), bool)
    if len(x) == 0 or len(rows) == 0:
        return Neighbours(index, similarity, tied)
    removed = None
    if database is not None:
        removed = torch.as_tensor(np.flatnonzero(~database), device=device)
    step = min(query_chunk(len(x), block_bytes=block_bytes), len(rows))
    block = torch.empty((step, len(x)), dtype=x.dtype, device=device)
    with torch.inference_mode(), exact_float32():  # TF32 would blur similarities past ties
        for start in range(0, len(rows), step):
            picked = torch.as_tensor(rows[start : start + step], device=device)
            sim = torch.mm(x[picked], x.T, out=block[: len(picked)])
            if removed is not None:
                sim[:, removed] = -torch.inf
            best, found, close = _block_neighbours(sim, picked)
            index[start : start + len(picked)] = found.cpu().numpy()
            similarity[start : start + len(picked)] = best.cpu().numpy()
            tied[start : start + len(picked)] = close.cpu().numpy()
            if on_chunk is not None:
                on_chunk(len(picked))
    return Neighbours(index, similarity, tied)


def _block_neighbours(
    sim: torch.Tensor, own: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best similarity and column of each query row of ``sim`` (-1 where every column is
    -inf), the query's own column ``own`` excluded, and whether another column ties with it.

    Two max passes instead of a tolerance scan of the whole block: the runner-up tells which
    rows have a tie, and only those rows are scanned for their lowest tied column.
    """
    arange = torch.arange(len(own), device=sim.device)
    sim[arange, own] = -torch.inf
    best, found = sim.max(dim=1)  # the first maximal index on exact ties
    sim[arange, found] = -torch.inf
    runner_up = sim.amax(dim=1)
    tied = (runner_up >= best - TIE_TOLERANCE) & ~torch.isneginf(runner_up)
    for row in torch.nonzero(tied).flatten().tolist():
        close = torch.nonzero(sim[row] >= best[row] - TIE_TOLERANCE)[0, 0]
        found[row] = torch.minimum(found[row], close)
    found[torch.isneginf(best)] = -1
    return best, found, tied
