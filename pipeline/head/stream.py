"""Shuffled, resumable batches of (embedding, loss) streamed from one or more pvu caches.

A cache (DESIGN.md 3.1) is read as a list of Parquet row groups. Each pass over the data is a
pure function of ``(seed, pass)``: the row groups of all files are permuted (so files and
epochs interleave), cut into *windows* of about ``window_rows`` rows (the shuffle buffer), and
the rows of each window are permuted again. Memory is bounded by the window size, whatever the
cache size. A background thread reads, filters and decodes the next window while the caller
trains on the current one. The position ``(pass, window, offset)`` is a small JSON-able state,
so a run can stop and resume at any row. Rows whose ``key`` hashes below ``val_fraction`` are
the validation slice and never appear in training batches, in any epoch.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.cache.index import CacheIndex, RowGroupRef
from pipeline.retry import retry

log = logging.getLogger(__name__)

_VAL_ORDER_SEED = 0x7A1
_FILE_ORDER_SALT = 0xF11E


@dataclass(frozen=True)
class StreamConfig:
    """How to stream a cache: shuffle window, prefetch depth, validation slice, extras."""

    seed: int = 0
    window_rows: int = 65_536
    prefetch_windows: int = 2
    val_fraction: float = 0.01
    io_threads: int = 8
    extra_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.window_rows < 1:
            raise ValueError(f"window_rows must be >= 1, got {self.window_rows}")
        if self.prefetch_windows < 1:
            raise ValueError(f"prefetch_windows must be >= 1, got {self.prefetch_windows}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {self.io_threads}")


@dataclass(frozen=True)
class StreamState:
    """Position of the next unread training row: pass, window within the pass, row within it."""

    pass_index: int = 0
    window: int = 0
    offset: int = 0

    def to_json(self) -> dict[str, int]:
        """The state as a plain dict (for checkpoints)."""
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> StreamState:
        """Inverse of :meth:`to_json`."""
        return cls(int(doc["pass_index"]), int(doc["window"]), int(doc["offset"]))


@dataclass
class Batch:
    """Training rows: float32 embeddings ``(B, D)``, float32 losses ``(B,)``, extra columns."""

    embedding: torch.Tensor
    loss: torch.Tensor
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.loss)


@dataclass
class StreamStats:
    """What the reader saw: rows delivered, rows dropped as non-finite (by file), passes."""

    rows: int = 0
    nonfinite: Counter[str] = field(default_factory=Counter)
    passes_started: int = 0


def key_fraction(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A stable position in [0, 1) per key: 64-bit FNV-1a of its UTF-8 bytes, splitmix-mixed."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if pa.types.is_dictionary(keys.type):
        keys = keys.dictionary_decode()
    keys = keys.cast(pa.large_string())
    n = len(keys)
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int64)[keys.offset : keys.offset + n + 1]
    data = np.frombuffer(keys.buffers()[2] or b"\0", dtype=np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    hashes = np.full(n, 0xCBF29CE484222325, dtype=np.uint64)
    prime = np.uint64(0x100000001B3)
    for j in range(int(lengths.max(initial=0))):
        active = np.flatnonzero(lengths > j)
        byte = data[starts[active] + j].astype(np.uint64)
        hashes[active] = (hashes[active] ^ byte) * prime
    hashes ^= hashes >> np.uint64(30)
    hashes *= np.uint64(0xBF58476D1CE4E5B9)
    hashes ^= hashes >> np.uint64(27)
    hashes *= np.uint64(0x94D049BB133111EB)
    hashes ^= hashes >> np.uint64(31)
    return (hashes >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def plan_pass(
    groups: Sequence[RowGroupRef], *, seed: int, pass_index: int, window_rows: int
) -> list[list[RowGroupRef]]:
    """The windows of one pass: all row groups in a seeded order, cut at ``window_rows`` rows."""
    order = np.random.default_rng([seed, pass_index, _FILE_ORDER_SALT]).permutation(len(groups))
    windows: list[list[RowGroupRef]] = []
    current: list[RowGroupRef] = []
    size = 0
    for i in order:
        current.append(groups[i])
        size += groups[i].rows
        if size >= window_rows:
            windows.append(current)
            current, size = [], 0
    if current:
        windows.append(current)
    return windows


@dataclass
class _Columns:
    embedding: np.ndarray
    loss: np.ndarray
    extras: dict[str, np.ndarray]
    nonfinite: Counter[str]


def _read_group(
    index: CacheIndex, ref: RowGroupRef, extra: Sequence[str], val_fraction: float, *, val: bool
) -> _Columns:
    """Rows of one row group on one side of the validation split, non-finite rows dropped."""
    f = index.files[ref.file]
    columns = list(dict.fromkeys(["key", "embedding", "loss", *extra]))
    fs, path = fsspec.core.url_to_fs(f.url)

    def read() -> pa.Table:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle, metadata=f.metadata).read_row_group(
                ref.group, columns=columns, use_threads=False
            )

    table = retry(read, what=f"read row group {ref.group} of {f.url}")
    flat = table.column("embedding").combine_chunks().flatten()
    embedding = flat.to_numpy(zero_copy_only=False).reshape(-1, index.dim)
    loss = table.column("loss").to_numpy().astype(np.float32, copy=False)
    keys = table.column("key")
    held_out = key_fraction(keys) < val_fraction
    keep = held_out if val else ~held_out
    bad = keep & ~(np.isfinite(loss) & _finite_rows(embedding))
    nonfinite: Counter[str] = Counter()
    if bad.any():
        nonfinite[f.url] = int(bad.sum())
        examples = keys.to_numpy(zero_copy_only=False)[bad][:3].tolist()
        log.warning(
            "%s row group %d: dropped %d row(s) with NaN/inf embedding or loss, e.g. keys %s",
            *(f.url, ref.group, int(bad.sum()), examples),
        )
        keep &= ~bad
    rows = slice(None) if keep.all() else np.flatnonzero(keep)
    extras = {name: table.column(name).to_numpy(zero_copy_only=False)[rows] for name in extra}
    return _Columns(embedding[rows], loss[rows], extras, nonfinite)


def _finite_rows(embedding: np.ndarray) -> np.ndarray:
    """True for rows with no NaN/inf; float16 is checked on its exponent bits (fast)."""
    if embedding.dtype == np.float16:
        exponent = embedding.view(np.uint16) & np.uint16(0x7C00)
        return ~(exponent == np.uint16(0x7C00)).any(axis=1)
    return np.isfinite(embedding).all(axis=1)


def _concat(parts: Sequence[_Columns], dim: int, extra: Sequence[str]) -> _Columns:
    nonfinite: Counter[str] = Counter()
    for part in parts:
        nonfinite.update(part.nonfinite)
    if not parts:
        empty = np.empty((0, dim), dtype=np.float16)
        return _Columns(empty, np.empty(0, np.float32), {n: np.empty(0) for n in extra}, nonfinite)
    return _Columns(
        np.concatenate([p.embedding for p in parts]),
        np.concatenate([p.loss for p in parts]),
        {name: np.concatenate([p.extras[name] for p in parts]) for name in extra},
        nonfinite,
    )


@dataclass
class _Window:
    pass_index: int
    window: int
    last_in_pass: bool
    embedding: torch.Tensor
    loss: torch.Tensor
    extras: dict[str, np.ndarray]
    nonfinite: Counter[str]

    def __len__(self) -> int:
        return len(self.loss)


class CacheStream:
    """Endless shuffled training batches from a :class:`CacheIndex`, resumable at any row.

    Use as a context manager (or call :meth:`close`) so the prefetch thread stops.
    """

    def __init__(
        self, index: CacheIndex, config: StreamConfig, state: StreamState | None = None
    ) -> None:
        self.index = index
        self.config = config
        self.stats = StreamStats()
        self._groups = index.row_groups()
        self._state = state or StreamState()
        self._window: _Window | None = None
        self._queue: queue.Queue[_Window | BaseException] = queue.Queue(config.prefetch_windows)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="pvu-stream", daemon=True)
        self._thread.start()

    @property
    def state(self) -> StreamState:
        """Position of the next row :meth:`next_batch` will return."""
        return self._state

    def ready(self) -> int:
        """Windows read ahead and waiting (at most ``prefetch_windows``)."""
        return self._queue.qsize()

    def next_batch(self, size: int) -> Batch:
        """The next ``size`` training rows (crossing windows and passes as needed)."""
        embeddings, losses, extras = [], [], {name: [] for name in self.config.extra_columns}
        need = size
        while need > 0:
            window = self._current()
            start = self._state.offset
            stop = min(start + need, len(window))
            embeddings.append(window.embedding[start:stop])
            losses.append(window.loss[start:stop])
            for name in extras:
                extras[name].append(window.extras[name][start:stop])
            need -= stop - start
            self._advance(window, stop)
        self.stats.rows += size
        embedding = embeddings[0] if len(embeddings) == 1 else torch.cat(embeddings)
        loss = losses[0] if len(losses) == 1 else torch.cat(losses)
        return Batch(
            embedding,
            loss,
            {name: np.concatenate(parts) for name, parts in extras.items()},
        )

    def close(self) -> None:
        """Stop the prefetch thread."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
            self._thread.join(timeout=0.05)

    def __enter__(self) -> CacheStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _current(self) -> _Window:
        while self._window is None or self._state.offset >= len(self._window):
            if self._window is not None:
                self._advance(self._window, len(self._window))
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if (item.pass_index, item.window) != (self._state.pass_index, self._state.window):
                raise RuntimeError("stream out of step with its prefetch thread")
            self._window = item
            self.stats.nonfinite.update(item.nonfinite)
            if item.window == 0:
                self.stats.passes_started += 1
        return self._window

    def _advance(self, window: _Window, offset: int) -> None:
        if offset < len(window):
            self._state = StreamState(window.pass_index, window.window, offset)
            return
        self._window = None
        if window.last_in_pass:
            self._state = StreamState(window.pass_index + 1, 0, 0)
        else:
            self._state = StreamState(window.pass_index, window.window + 1, 0)

    def _produce(self) -> None:
        try:
            with ThreadPoolExecutor(self.config.io_threads, "pvu-read") as pool:
                for window in self._windows(pool):
                    while not self._stop.is_set():
                        try:
                            self._queue.put(window, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._queue.put(error)

    def _windows(self, pool: ThreadPoolExecutor) -> Iterator[_Window]:
        cfg = self.config
        pass_index, first = self._state.pass_index, self._state.window
        while not self._stop.is_set():
            plan = plan_pass(
                self._groups, seed=cfg.seed, pass_index=pass_index, window_rows=cfg.window_rows
            )
            rows_in_pass = 0
            for w in range(first, len(plan)):
                if self._stop.is_set():
                    return
                window = self._load(pool, plan[w], pass_index, w, w == len(plan) - 1)
                rows_in_pass += len(window)
                yield window
            if first == 0 and rows_in_pass == 0:
                raise ValueError(
                    "no training rows: every row is held out for validation or non-finite"
                )
            pass_index, first = pass_index + 1, 0

    def _load(
        self, pool: ThreadPoolExecutor, refs: list[RowGroupRef], pass_index: int, w: int, last: bool
    ) -> _Window:
        cfg = self.config
        parts = list(
            pool.map(
                lambda ref: _read_group(
                    self.index, ref, cfg.extra_columns, cfg.val_fraction, val=False
                ),
                refs,
            )
        )
        cols = _concat(parts, self.index.dim, cfg.extra_columns)
        generator = torch.Generator().manual_seed(_window_seed(cfg.seed, pass_index, w))
        order = torch.randperm(len(cols.loss), generator=generator).numpy()
        # Permute and widen to float32 here, in the background, so the trainer only slices.
        return _Window(
            pass_index,
            w,
            last,
            torch.from_numpy(_gather_float32(cols.embedding, order)),
            torch.from_numpy(np.take(cols.loss, order)),
            {name: np.take(values, order) for name, values in cols.extras.items()},
            cols.nonfinite,
        )


def _gather_float32(embedding: np.ndarray, order: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """``embedding[order]`` as float32, gathered in cache-sized chunks (no full-size temporary)."""
    out = np.empty((len(order), embedding.shape[1]), dtype=np.float32)
    for start in range(0, len(order), chunk):
        out[start : start + chunk] = embedding[order[start : start + chunk]]
    return out


def _window_seed(seed: int, pass_index: int, window: int) -> int:
    return int(np.random.default_rng([seed, pass_index, window]).integers(2**62))


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
    if val_fraction <= 0 or max_rows <= 0:
        empty = _concat([], index.dim, extra_columns)
        return Batch(torch.empty(0, index.dim), torch.empty(0), empty.extras)
    groups = index.row_groups()
    order = np.random.default_rng(_VAL_ORDER_SEED).permutation(len(groups))
    parts: list[_Columns] = []
    found = 0
    with ThreadPoolExecutor(io_threads, "pvu-val") as pool:
        for start in range(0, len(order), io_threads):
            chunk = [groups[i] for i in order[start : start + io_threads]]
            for part in pool.map(
                lambda ref: _read_group(index, ref, extra_columns, val_fraction, val=True), chunk
            ):
                parts.append(part)
                found += len(part.loss)
            if found >= max_rows:
                break
    cols = _concat(parts, index.dim, extra_columns)
    return Batch(
        torch.from_numpy(cols.embedding[:max_rows]).float(),
        torch.from_numpy(cols.loss[:max_rows]).clone(),
        {name: values[:max_rows] for name, values in cols.extras.items()},
    )
