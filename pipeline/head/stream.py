"""Shuffled, resumable batches of (embedding, loss) streamed from one or more pvu caches.

Each pass over the cache follows :mod:`pipeline.head.shuffle`: every window interleaves a
slice of each of ``spread`` row groups (about ``shuffle_rows`` rows held), so batches mix rows
from all over the cache whatever order its shards were written in. I/O threads read and decode
row groups into a fixed pool of slots, in their stored dtype (float16); a background thread
(:func:`pipeline.prefetch.prefetch`) plans each window as pool row indices. The caller's thread
gathers a batch's rows from the pool, still in the stored dtype, with torch's own threads (no
reader thread competes with the training step for them), and gives a slot back to the readers
once the last batch that needs it is gathered; the training step widens the batch on the
device it trains on (half the bytes to copy there, and no float32 pass for a bfloat16 step). A
cache no larger than ``shuffle_rows`` is held whole and decoded once: later passes deal its
groups again from the pool, with no reading. Memory is about ``(shuffle_rows +
(io_threads + prefetch_windows + 1) x group rows) x D x 2`` bytes. The position ``(pass,
window, offset)`` is a small JSON-able state, so a run can stop and resume at any row. Rows
whose ``key`` hashes below ``val_fraction`` are the validation slice and never appear in
training batches, in any epoch.
"""

from __future__ import annotations

import queue
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from pipeline.cache.index import CacheIndex, RowGroupRef
from pipeline.head import shuffle
from pipeline.head.rows import GroupRows, read_group
from pipeline.prefetch import prefetch

_VAL_ORDER_SEED = 0x7A1


@dataclass(frozen=True)
class StreamConfig:
    """How to stream a cache: rows held for shuffling, read-ahead, validation slice, extras."""

    seed: int = 0
    shuffle_rows: int = 3_145_728
    prefetch_windows: int = 4
    val_fraction: float = 0.01
    io_threads: int = 8
    extra_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.shuffle_rows < 1:
            raise ValueError(f"shuffle_rows must be >= 1, got {self.shuffle_rows}")
        if self.prefetch_windows < 1:
            raise ValueError(f"prefetch_windows must be >= 1, got {self.prefetch_windows}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {self.io_threads}")


@dataclass(frozen=True)
class StreamState:
    """Position of the next unread training row: pass, window within the pass, row within it;
    and the rows dropped as non-finite before it, every pass counted (not part of the position:
    a resumed run's count goes on from it)."""

    pass_index: int = 0
    window: int = 0
    offset: int = 0
    nonfinite: int = field(default=0, compare=False)

    def to_json(self) -> dict[str, int]:
        """The state as a plain dict (for checkpoints)."""
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> StreamState:
        """Inverse of :meth:`to_json`."""
        position = (int(doc["pass_index"]), int(doc["window"]), int(doc["offset"]))
        return cls(*position, int(doc.get("nonfinite", 0)))  # older checkpoints: none counted


@dataclass
class Batch:
    """Training rows: embeddings ``(B, D)`` in the cache's stored dtype (float16 or float32),
    float32 losses ``(B,)``, extra columns."""

    embedding: torch.Tensor
    loss: torch.Tensor
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.loss)


@dataclass
class StreamStats:
    """What the reader saw: rows delivered, passes begun (rows dropped as non-finite are
    counted in :attr:`StreamState.nonfinite`, which a checkpoint keeps)."""

    rows: int = 0
    passes_started: int = 0


@dataclass
class _Window:
    """One window's plan: its rows as pool indices, their losses and extras, in window order;
    ``retired`` are the pool slots that are free once the window's rows are gathered."""

    pass_index: int
    window: int
    last_in_pass: bool
    rows: np.ndarray
    loss: torch.Tensor
    extras: dict[str, np.ndarray]
    nonfinite: int  # rows dropped from the group that joins the window (each group once a pass)
    retired: list[int]

    def __len__(self) -> int:
        return len(self.loss)


@dataclass(frozen=True)
class _Decoded:
    """A row group decoded into pool slot ``slot``."""

    slot: int
    rows: GroupRows


@dataclass(frozen=True)
class _Held:
    """A decoded group as one pass deals it: its training rows as flat pool indices, in order."""

    group: _Decoded
    order: np.ndarray


class _Pool:
    """Fixed slots of decoded row groups (embedding in the stored dtype, loss in float32).

    The reader takes a free slot (waiting for one if need be); the consumer gives slots back.
    """

    def __init__(self, slots: int, rows: int, dim: int, dtype: str) -> None:
        self.slots, self.rows = slots, rows
        # torch's allocator, not NumPy's: NumPy advises huge pages for large arrays, and the
        # kernel's compaction for them made the pool's first touch ~2.5x slower (BENCHMARKS.md)
        self.embedding = torch.empty((slots * rows, dim), dtype=getattr(torch, dtype))
        self.stored = self.embedding.numpy()  # the same memory, for the decoders
        self.loss = np.empty(slots * rows, dtype=np.float32)
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.give(range(slots))

    def take(self) -> int:
        """A free slot, waiting until the consumer gives one back."""
        return self._free.get()

    def give(self, slots: Iterable[int]) -> None:
        """Return ``slots`` to the free list."""
        for slot in slots:
            self._free.put(slot)

    def slot(self, slot: int) -> slice:
        """The pool rows of ``slot``."""
        return slice(slot * self.rows, (slot + 1) * self.rows)

    def release(self) -> None:
        """Free the rows (once no reader writes them): whatever still refers to the pool, a
        traceback's frames say, then holds an empty one."""
        self.embedding = self.embedding[:0].clone()
        self.stored = self.embedding.numpy()
        self.loss = self.loss[:0].copy()


def pool_slots(groups: Sequence[RowGroupRef], config: StreamConfig) -> int:
    """Row groups a stream holds decoded at once: those of a window, the reads ahead, and those
    of the windows planned ahead of the consumer (it gives their slots back once gathered); a
    pass holds each group once."""
    spread = shuffle.spread_for(config.shuffle_rows, [ref.rows for ref in groups])
    return min(spread + config.io_threads + config.prefetch_windows + 1, len(groups))


def held_bytes(index: CacheIndex, config: StreamConfig) -> int:
    """Bytes of the rows a stream over ``index`` holds (embeddings as stored, float32 losses)."""
    groups = index.row_groups()
    row = index.dim * np.dtype(index.dtype).itemsize + 4
    return pool_slots(groups, config) * max(ref.rows for ref in groups) * row


class CacheStream:
    """Endless shuffled training batches from a :class:`CacheIndex`, resumable at any row.

    Use as a context manager (or call :meth:`close`) so the background reader stops.
    """

    def __init__(
        self, index: CacheIndex, config: StreamConfig, state: StreamState | None = None
    ) -> None:
        self.index = index
        self.config = config
        self.stats = StreamStats()
        self._groups = index.row_groups()
        self.spread = shuffle.spread_for(config.shuffle_rows, [ref.rows for ref in self._groups])
        self._lookahead = config.io_threads
        slots = pool_slots(self._groups, config)
        group_rows = max(ref.rows for ref in self._groups)
        self._pool = _Pool(slots, group_rows, index.dim, index.dtype)
        self._io = ThreadPoolExecutor(config.io_threads, "pvu-read")
        self._state = state or StreamState()
        self._window: _Window | None = None
        # a window resumed part way was counted in the state's ``nonfinite`` as it began
        self._counted = self._state.offset > 0
        # a cache held whole (every window takes a slice of every group) is decoded once: its
        # groups stay in the pool from pass to pass, by group index
        self._held_whole = self.spread == len(self._groups)
        self._resident: dict[int, _Decoded] = {}
        # each group's validation split, packed 8 rows a byte (~11 MB at 92M rows): a group
        # read again in a later pass skips reading and hashing its keys
        self._held_out: dict[int, np.ndarray] = {}
        self._windows = prefetch(self._produce(self._state), depth=config.prefetch_windows)

    @property
    def state(self) -> StreamState:
        """Position of the next row :meth:`next_batch` will return."""
        return self._state

    def next_batch(self, size: int) -> Batch:
        """The next ``size`` training rows (crossing windows and passes as needed), gathered
        from the pool on the calling thread."""
        embedding = torch.empty((size, self.index.dim), dtype=self._pool.embedding.dtype)
        loss = torch.empty(size, dtype=torch.float32)
        extras: dict[str, list[np.ndarray]] = {name: [] for name in self.config.extra_columns}
        filled = 0
        while filled < size:
            window = self._current()
            start = self._state.offset
            stop = min(start + size - filled, len(window))
            into = slice(filled, filled + stop - start)
            rows = torch.from_numpy(window.rows[start:stop])
            torch.index_select(self._pool.embedding, 0, rows, out=embedding[into])
            loss[into] = window.loss[start:stop]
            for name, parts in extras.items():
                parts.append(window.extras[name][start:stop])
            filled = into.stop
            self._advance(window, stop)  # a window done with gives its retired slots back
        self.stats.rows += size
        return Batch(embedding, loss, {name: np.concatenate(p) for name, p in extras.items()})

    def close(self) -> None:
        """Stop the background reader and free the pool's rows: a stream closed by an error
        is still referenced by the error's frames (a notebook keeps the last one)."""
        self._pool.give(range(self._pool.slots))  # a reader waiting for a slot goes on to stop
        self._windows.close()
        self._io.shutdown(cancel_futures=True)
        self._resident.clear()  # its groups' rows are views of the pool
        self._pool.release()

    def __enter__(self) -> CacheStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _current(self) -> _Window:
        while self._window is None or self._state.offset >= len(self._window):
            if self._window is not None:
                self._advance(self._window, len(self._window))
            item = next(self._windows)
            if (item.pass_index, item.window) != (self._state.pass_index, self._state.window):
                raise RuntimeError("stream out of step with its background reader")
            self._window = item
            if not self._counted:
                tally = self._state.nonfinite + item.nonfinite
                self._state = replace(self._state, nonfinite=tally)
            self._counted = False
            if item.window == 0:
                self.stats.passes_started += 1
        return self._window

    def _advance(self, window: _Window, offset: int) -> None:
        tally = self._state.nonfinite
        if offset < len(window):
            self._state = StreamState(window.pass_index, window.window, offset, tally)
            return
        self._window = None
        self._pool.give(window.retired)
        if window.last_in_pass:
            self._state = StreamState(window.pass_index + 1, 0, 0, tally)
        else:
            self._state = StreamState(window.pass_index, window.window + 1, 0, tally)

    def _produce(self, start: StreamState) -> Iterator[_Window]:
        """Every window from ``start`` on, pass after pass (runs in the background thread)."""
        pass_index, first = start.pass_index, start.window
        while True:
            rows_in_pass = 0
            for window in self._pass(pass_index, first):
                rows_in_pass += len(window)
                yield window
            if first == 0 and rows_in_pass == 0:
                raise ValueError(
                    "no training rows: every row is held out for validation or non-finite"
                )
            pass_index, first = pass_index + 1, 0

    def _pass(self, pass_index: int, first: int) -> Iterator[_Window]:
        n, spread, seed = len(self._groups), self.spread, self.config.seed
        order = shuffle.pass_order(n, seed=seed, pass_index=pass_index)
        held: dict[int, _Held] = {}
        loading: dict[int, Future[_Decoded]] = {}
        for w in range(first, n):
            # the groups of window w, then the one newcomer of each window ahead (slice 0)
            upcoming = shuffle.active(w, groups=n, spread=spread)
            upcoming += range(w + 1, min(n, w + self._lookahead + 1))
            for position in upcoming:
                if position in held or position in loading:
                    continue
                group = order[position]
                if group in self._resident:
                    held[position] = self._dealt(self._resident[group], pass_index, position)
                else:
                    loading[position] = self._io.submit(self._load, group, self._pool.take())
            positions = shuffle.active(w, groups=n, spread=spread)
            for position in positions:
                if position not in held:
                    loaded = loading.pop(position).result()
                    held[position] = self._dealt(loaded, pass_index, position)
            window = self._plan(pass_index, w, positions, held)
            following = set(shuffle.active(w + 1, groups=n, spread=spread)) if w + 1 < n else ()
            for position in [p for p in positions if p not in following]:
                leaving = held.pop(position)
                if self._held_whole:
                    self._resident[order[position]] = leaving.group
                else:
                    window.retired.append(leaving.group.slot)
            yield window

    def _load(self, group: int, slot: int) -> _Decoded:
        """Read and decode group ``group`` (an index into the cache's groups) into pool slot
        ``slot``."""
        ref, rows, packed = self._groups[group], self._pool.slot(slot), self._held_out.get(group)
        decoded = read_group(
            self.index,
            ref,
            extra=self.config.extra_columns,
            val_fraction=self.config.val_fraction,
            val=False,
            out=self._pool.stored[rows],
            held_out=None if packed is None else np.unpackbits(packed, count=ref.rows).view(bool),
        )
        if packed is None:
            self._held_out[group] = np.packbits(decoded.held_out)
        self._pool.loss[rows][: len(decoded.loss)] = decoded.loss
        return _Decoded(slot, decoded)

    def _dealt(self, group: _Decoded, pass_index: int, position: int) -> _Held:
        """``group`` with its training rows in the order it deals them at ``position`` of
        pass ``pass_index``."""
        permutation = shuffle.group_permutation(
            len(group.rows.rows), seed=self.config.seed, pass_index=pass_index, position=position
        )
        start = self._pool.slot(group.slot).start
        return _Held(group, group.rows.rows[permutation] + start)

    def _plan(
        self, pass_index: int, w: int, positions: list[int], held: dict[int, _Held]
    ) -> _Window:
        """Window ``w``: slice ``j`` of the group at ``positions[j]``, permuted, as pool rows."""
        spread = self.spread
        parts = []
        for j, position in enumerate(positions):
            order = held[position].order
            start, stop = shuffle.slice_bounds(len(order), j, spread)
            parts.append(order[start:stop])
        permutation = shuffle.window_permutation(
            sum(map(len, parts)), seed=self.config.seed, pass_index=pass_index, window=w
        )
        rows = np.concatenate(parts)[permutation]
        extras = {}
        for name in self.config.extra_columns:
            values = [
                held[p].group.rows.extras[name][part - held[p].group.slot * self._pool.rows]
                for p, part in zip(positions, parts, strict=True)
            ]
            extras[name] = np.concatenate(values)[permutation]
        newcomer = held[positions[0]].group  # counted once per pass: at its slice 0
        return _Window(
            pass_index,
            w,
            w == len(self._groups) - 1,
            rows,
            torch.from_numpy(self._pool.loss[rows]),
            extras,
            newcomer.rows.nonfinite,
            retired=[],
        )


def read_validation(
    index: CacheIndex,
    *,
    val_fraction: float,
    max_rows: int,
    io_threads: int = 8,
    extra_columns: Sequence[str] = (),
) -> Batch:
    """Up to ``max_rows`` held-out rows (key hash below ``val_fraction``), the same for any seed.

    Row groups are scanned in a fixed pseudo-random order until enough rows are found, so the
    slice spans files and epochs; non-finite rows are dropped and logged.
    """
    empty = Batch(
        torch.empty(0, index.dim, dtype=getattr(torch, index.dtype)),
        torch.empty(0),
        {n: np.empty(0) for n in extra_columns},
    )
    if val_fraction <= 0 or max_rows <= 0:
        return empty
    groups = index.row_groups()
    order = np.random.default_rng(_VAL_ORDER_SEED).permutation(len(groups))
    parts: list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = []
    found = 0
    with ThreadPoolExecutor(io_threads, "pvu-val") as pool:
        for start in range(0, len(order), io_threads):
            chunk = [groups[i] for i in order[start : start + io_threads]]
            for part in pool.map(
                lambda ref: read_group(
                    index, ref, extra=extra_columns, val_fraction=val_fraction, val=True
                ),
                chunk,
            ):  # the held-out rows alone: a whole group is ~1/val_fraction times more
                extras = {name: part.extras[name][part.rows] for name in extra_columns}
                parts.append((part.embedding[part.rows], part.loss[part.rows], extras))
                found += len(part.rows)
            if found >= max_rows:
                break
    if not found:
        return empty
    embeddings, losses, extras = zip(*parts, strict=True)
    return Batch(
        torch.from_numpy(np.concatenate(embeddings)[:max_rows]),
        torch.from_numpy(np.concatenate(losses)[:max_rows]),
        {name: np.concatenate([e[name] for e in extras])[:max_rows] for name in extra_columns},
    )
