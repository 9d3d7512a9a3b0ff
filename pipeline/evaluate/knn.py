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

TIE_TOLERANCE = 1e-6
BLOCK_BYTES = 256 * 2**20
"""Size of one block of query-by-database similarities; memory is this plus the embeddings."""


@dataclass(frozen=True)
class Neighbours:
    """Each query's nearest database row (-1 where none is left) and its cosine similarity."""

    index: np.ndarray
    similarity: np.ndarray


def normalize(embedding: np.ndarray, *, chunk_rows: int = 65_536) -> np.ndarray:
    """Rows of ``embedding`` scaled to unit L2 norm, as a new float32 array."""
    unit = np.empty(embedding.shape, np.float32)
    for start in range(0, len(embedding), chunk_rows):
        part = embedding[start : start + chunk_rows].astype(np.float32)
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
    (default: all). ``on_chunk`` is called with the number of queries done after each block.
    """
    x = torch.as_tensor(unit, device=device)
    n = x.shape[0]
    rows = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    blocked = None if database is None else torch.as_tensor(~np.asarray(database), device=device)
    index = np.full(len(rows), -1, np.int64)
    similarity = np.full(len(rows), -np.inf, np.float32)
    step = min(query_chunk(n, block_bytes=block_bytes), max(len(rows), 1))
    block = torch.empty((step, n), dtype=x.dtype, device=device)
    with torch.inference_mode():
        for start in range(0, len(rows), step):
            picked = torch.as_tensor(rows[start : start + step], device=device)
            sim = torch.mm(x[picked], x.T, out=block[: len(picked)])
            best, found = _block_neighbours(sim, picked, blocked)
            index[start : start + len(picked)] = found.cpu().numpy()
            similarity[start : start + len(picked)] = best.cpu().numpy()
            if on_chunk is not None:
                on_chunk(len(picked))
    return Neighbours(index, similarity)


def _block_neighbours(
    sim: torch.Tensor, picked: torch.Tensor, blocked: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best similarity and neighbour of each query row of ``sim`` (self, ``blocked`` excluded).

    Two max passes instead of a tolerance scan of the whole block: the runner-up tells which
    rows have a tie, and only those rows are scanned for their lowest tied index.
    """
    arange = torch.arange(len(picked), device=sim.device)
    sim[arange, picked] = -torch.inf
    if blocked is not None:
        sim.masked_fill_(blocked, -torch.inf)
    best, found = sim.max(dim=1)  # the first maximal index on exact ties
    sim[arange, found] = -torch.inf
    runner_up = sim.amax(dim=1)
    tied = torch.nonzero((runner_up >= best - TIE_TOLERANCE) & ~torch.isneginf(runner_up))
    for row in tied.flatten().tolist():
        close = torch.nonzero(sim[row] >= best[row] - TIE_TOLERANCE)[0, 0]
        found[row] = torch.minimum(found[row], close)
    found[torch.isneginf(best)] = -1
    return best, found
