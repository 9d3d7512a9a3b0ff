"""One Parquet row group of a cache as NumPy arrays, split into training and held-out rows.

Rows whose ``key`` hashes below ``val_fraction`` are the validation slice, in every epoch;
rows with a NaN/inf embedding or loss are dropped, counted, and named with example keys at their
group's first read (a later pass drops them again, at debug level). The
embedding column is decoded by :mod:`pipeline.head.pages` (pyarrow where it cannot), the other
columns by pyarrow.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.cache.index import CacheFile, CacheIndex, RowGroupRef, read_unit
from pipeline.head.pages import Embedding, all_finite, read_embedding

log = logging.getLogger(__name__)

#: What a read of a unit rewritten under train-head says to run, once no pvu cache writes it.
_AGAIN = "run the same train-head command again with --resume"

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


@dataclass
class GroupRows:
    """Every row of one row group, and which of them are on the asked side of the split."""

    embedding: np.ndarray
    loss: np.ndarray
    rows: np.ndarray
    extras: dict[str, np.ndarray]
    nonfinite: int
    held_out: np.ndarray  # per row, whether it is in the validation slice (by its key's hash)


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
    hashes = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    for length in np.unique(lengths):  # keys of one length hash as one (length, rows) matrix
        rows = np.flatnonzero(lengths == length)
        h = hashes[rows]
        for byte in data[np.arange(length)[:, None] + starts[rows]]:  # byte j of every key
            h ^= byte
            h *= _FNV_PRIME
        hashes[rows] = h
    hashes ^= hashes >> np.uint64(30)
    hashes *= np.uint64(0xBF58476D1CE4E5B9)
    hashes ^= hashes >> np.uint64(27)
    hashes *= np.uint64(0x94D049BB133111EB)
    hashes ^= hashes >> np.uint64(31)
    return (hashes >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def read_group(
    index: CacheIndex,
    ref: RowGroupRef,
    *,
    extra: Sequence[str] = (),
    val_fraction: float,
    val: bool,
    out: np.ndarray | None = None,
    held_out: np.ndarray | None = None,
) -> GroupRows:
    """Row group ``ref``; ``rows`` are its held-out (``val``) or training rows, finite ones.

    The embeddings are written into ``out`` (at least ``ref.rows`` rows) when given. Given
    ``held_out`` (the group's ``GroupRows.held_out`` from an earlier read), its keys are neither
    read nor hashed again.
    """
    f = index.files[ref.file]
    columns = list(dict.fromkeys([*(["key"] if held_out is None else []), "loss", *extra]))
    fs, path = fsspec.core.url_to_fs(f.url)
    dtype = np.dtype(index.dtype)

    def read() -> tuple[Embedding | None, pa.Table]:
        with _open(fs, path) as handle:
            fast = read_embedding(
                handle, f.metadata, ref.group, dim=index.dim, dtype=dtype, out=out
            )
            parquet = pq.ParquetFile(handle, metadata=f.metadata, page_checksum_verification=True)
            wanted = columns if fast is not None else [*columns, "embedding"]
            return fast, parquet.read_row_group(ref.group, columns=wanted, use_threads=False)

    try:
        fast, table = read_unit(
            f, read, what=f"read row group {ref.group} of {f.url}", again=_AGAIN
        )
    except BaseException:
        # read's frame in the error's traceback keeps read, and through its closure ``out``
        # (a stream's whole pool, a view of it); a kept traceback would keep that allocated
        del out
        raise
    if fast is None:
        flat = table.column("embedding").combine_chunks().flatten()
        embedding = flat.to_numpy(zero_copy_only=False).reshape(-1, index.dim)
        finite = all_finite(embedding)
    else:
        embedding, finite = fast
    if out is not None and not np.shares_memory(embedding, out):
        out[: len(embedding)] = embedding
        embedding = out[: len(embedding)]
    loss = table.column("loss").to_numpy().astype(np.float32, copy=False)
    first_read = held_out is None
    if held_out is None:
        held_out = key_fraction(table.column("key")) < val_fraction
    keep = held_out if val else ~held_out
    finite_rows = True if finite else np.isfinite(embedding).all(axis=1)
    bad = keep & ~(np.isfinite(loss) & finite_rows)
    if bad.any():
        # named at the group's first read; each later pass drops the same rows (and counts them)
        level = logging.WARNING if first_read else logging.DEBUG
        if log.isEnabledFor(level):
            keys = table.column("key") if "key" in table.column_names else _keys(f, ref.group)
            examples = keys.to_numpy(zero_copy_only=False)[bad][:3].tolist()
            log.log(
                level,
                "%s row group %d: dropped %d row(s) with NaN/inf embedding or loss, e.g. keys %s",
                *(f.url, ref.group, int(bad.sum()), examples),
            )
        keep &= ~bad
    extras = {name: table.column(name).to_numpy(zero_copy_only=False) for name in extra}
    return GroupRows(embedding, loss, np.flatnonzero(keep), extras, int(bad.sum()), held_out)


def unused_rows(index: CacheIndex, ref: RowGroupRef, val_fraction: float) -> tuple[int, int]:
    """Rows of row group ``ref`` that training leaves out: ``(held out, dropped)``, those in the
    validation slice (its keys read and hashed) and the others whose loss is NaN/inf (its loss
    column read, 4 bytes a row). A row whose embedding alone is non-finite is not seen (that
    takes reading the embeddings)."""
    columns = ["key", "loss"] if val_fraction > 0 else ["loss"]
    table = _columns(index.files[ref.file], ref.group, columns)
    dropped = ~np.isfinite(table.column("loss").to_numpy().astype(np.float32, copy=False))
    if val_fraction <= 0:
        return 0, int(dropped.sum())
    held = key_fraction(table.column("key")) < val_fraction
    return int(held.sum()), int((dropped & ~held).sum())


def _keys(f: CacheFile, group: int) -> pa.ChunkedArray:
    """The ``key`` column of row group ``group`` of unit ``f``."""
    return _columns(f, group, ["key"]).column("key")


def _columns(f: CacheFile, group: int, columns: list[str]) -> pa.Table:
    """``columns`` of row group ``group`` of unit ``f``: opened as a row group read opens it,
    its footer already known."""
    fs, path = fsspec.core.url_to_fs(f.url)

    def read() -> pa.Table:
        with _open(fs, path) as handle:
            parquet = pq.ParquetFile(handle, metadata=f.metadata, page_checksum_verification=True)
            return parquet.read_row_group(group, columns=columns, use_threads=False)

    what = f"read {', '.join(columns)} of row group {group} of {f.url}"
    return read_unit(f, read, what=what, again=_AGAIN)


def _open(fs: fsspec.AbstractFileSystem, path: str) -> BinaryIO:
    """``path`` for reading: a local file as a plain one (its embedding pages are read straight
    from the page cache into place), any other through fsspec without read-ahead: each read is
    one ranged request for just the column chunk asked (s3fs's default read-ahead fetched the
    rest of the file from the chunk on, ~3x the bytes of a two-group file)."""
    if isinstance(fs, LocalFileSystem):
        return open(path, "rb", buffering=0)
    return fs.open(path, "rb", cache_type="none")
