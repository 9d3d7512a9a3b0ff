"""Images held in a Parquet table's bytes, as the Hugging Face Hub publishes datasets: a
column of ``struct<bytes: binary, path: string>`` (``datasets``' ``Image`` feature; ``bytes``
null where only a path is given) or of plain ``binary``.

Listing reads the struct's paths and the labels only, by batches; an image's bytes are read
when it is converted (:meth:`HeldTable.image`): its whole row group's images, read once and
kept until each of the group's rows has been asked for (at most ``HELD_BYTES`` of them kept,
by all the files of a table in parts together: they share one :class:`Kept`). A shuffled
conversion asks in :func:`window_order`, which reads each row group once, of any file: the
table is never read whole, nor any part of it twice.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
from collections import OrderedDict

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.retry import retry

#: Rows read at once where a table's first value is sampled.
BATCH_ROWS = 16
#: Image bytes (by the Parquet footer) of the row groups whose rows a shuffle mixes together.
WINDOW_BYTES = 256 << 20
#: Image bytes a table keeps read: two windows, the one converted and the next begun.
HELD_BYTES = 2 * WINDOW_BYTES

log = logging.getLogger(__name__)


def is_binary(data_type: pa.DataType) -> bool:
    """Whether ``data_type`` holds bytes: ``binary``, ``large_binary`` or ``binary_view``."""
    return (
        pa.types.is_binary(data_type)
        or pa.types.is_large_binary(data_type)
        or pa.types.is_binary_view(data_type)
    )


def is_text(data_type: pa.DataType) -> bool:
    """Whether ``data_type`` holds text: ``string``, ``large_string`` or ``string_view``."""
    return (
        pa.types.is_string(data_type)
        or pa.types.is_large_string(data_type)
        or pa.types.is_string_view(data_type)
    )


def is_image_struct(data_type: pa.DataType) -> bool:
    """Whether ``data_type`` is ``struct<bytes: binary[, path: string]>`` (any field order)."""
    if not pa.types.is_struct(data_type):
        return False
    fields = {data_type.field(i).name: data_type.field(i).type for i in range(data_type.num_fields)}
    path = fields.pop("path", pa.string())
    return set(fields) == {"bytes"} and is_binary(fields["bytes"]) and is_text(path)


def parquet_schema(url: str) -> pa.Schema:
    """The schema of the Parquet table at ``url``, from its footer alone."""

    def read() -> pa.Schema:
        with fsspec.open(url, "rb") as handle:
            return pq.ParquetFile(handle).schema_arrow

    return retry(read, what=f"read {url}")


def holds_text(url: str, column: str) -> bool:
    """Whether the binary ``column`` of the Parquet table at ``url`` holds text (paths written
    as bytes), not images: its first value is UTF-8 without a NUL, which no image is."""

    def read() -> bool:
        with fsspec.open(url, "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(BATCH_ROWS, columns=[column]):
                for value in batch.column(0).to_pylist():
                    if value is None:
                        continue
                    try:
                        return b"\0" not in value and bool(value.decode())
                    except UnicodeDecodeError:
                        return False
        return False

    return retry(read, what=f"read {url}")


class Kept:
    """The row groups' images read and kept by the :class:`HeldTable` s sharing it (the files
    of one table in parts), by ``(table, group)``, at most ``HELD_BYTES`` of them, and the lock
    that guards them and the tables' counts."""

    def __init__(self) -> None:
        self.groups: OrderedDict[tuple[HeldTable, int], list[bytes | None]] = OrderedDict()
        self.lock = threading.Lock()


class HeldTable:
    """The images in ``column`` of the Parquet table at ``url``, read by row; safe to share
    among threads. Reads a row group's images once, when its first row is asked for, and keeps
    them until all its rows have been; at most ``HELD_BYTES`` of them with those of the tables
    sharing ``kept`` (the least recently used dropped beyond, and read again if asked), and one
    more row group per thread reading."""

    def __init__(self, url: str, column: str, kept: Kept | None = None) -> None:
        self.url = url
        self.column = column
        self._kept = Kept() if kept is None else kept
        self._metadata = retry(self._read_metadata, what=f"read {url}")
        groups = [self._metadata.row_group(i) for i in range(self._metadata.num_row_groups)]
        self._sizes = [group.num_rows for group in groups]
        self._starts = [0, *itertools.accumulate(self._sizes)]  # each row group's first row
        #: Each row group's image bytes, uncompressed, by the footer.
        self.group_bytes = [
            sum(
                group.column(i).total_uncompressed_size
                for i in range(group.num_columns)
                if group.column(i).path_in_schema in (column, f"{column}.bytes")
            )
            for group in groups
        ]
        largest = max(self.group_bytes, default=0)
        if largest > WINDOW_BYTES:
            log.warning(
                "table %s holds row groups of up to %s MB of images: each is read and held "
                "whole as it is converted; rewrite the table with "
                "pyarrow.parquet.write_table(..., row_group_size=100)",
                *(url, f"{largest >> 20:,}"),
            )
        self._unread: dict[int, int] = {}  # rows of a kept or failed group not yet asked for
        self._failed: dict[int, OSError] = {}  # a group whose read failed: its rows' error
        self._loading: dict[int, threading.Lock] = {}  # one thread reads a group, others wait
        self._lock = self._kept.lock

    def _read_metadata(self) -> pq.FileMetaData:
        with fsspec.open(self.url, "rb") as handle:
            return pq.ParquetFile(handle).metadata

    def group_of(self, row: int) -> int:
        """The row group that holds row ``row`` (0-based)."""
        return bisect.bisect_right(self._starts, row) - 1

    def image(self, row: int) -> bytes | None:
        """The bytes row ``row`` holds (0-based), ``None`` where they are null. ``OSError`` if
        its row group's read failed: raised for each of the group's rows, read once."""
        group = self.group_of(row)
        with self._lock:
            loading = self._loading.setdefault(group, threading.Lock())
        with loading:
            with self._lock:
                values = self._kept.groups.get((self, group))
                failed = self._failed.get(group)
            if values is None and failed is None:
                try:
                    values = retry(lambda: self._read(group), what=f"read {self.url}")
                except (OSError, pa.ArrowException) as error:
                    failed = _as_read_error(error, self.url, group)
                    with self._lock:
                        self._failed[group] = failed
                else:
                    self._keep(group, values)
        with self._lock:
            self._unread[group] = self._unread.get(group, self._sizes[group]) - 1
            if self._unread[group] <= 0:  # each row asked for: the group is done
                self._kept.groups.pop((self, group), None)
                self._failed.pop(group, None)
                del self._unread[group]
        if failed is not None:
            raise failed
        return values[row - self._starts[group]]

    def _keep(self, group: int, values: list[bytes | None]) -> None:
        """Keep ``group``'s ``values``, dropping the least recently read (of any table sharing
        ``kept``) beyond ``HELD_BYTES``."""
        kept = self._kept.groups
        with self._lock:
            kept[(self, group)] = values
            held = sum(table.group_bytes[number] for table, number in kept)
            while held > HELD_BYTES and len(kept) > 1:
                (table, dropped), _ = kept.popitem(last=False)
                held -= table.group_bytes[dropped]

    def _read(self, group: int) -> list[bytes | None]:
        """Row group ``group``'s image bytes, its image column alone."""
        column = self.column
        with fsspec.open(self.url, "rb") as handle:
            file = pq.ParquetFile(handle, metadata=self._metadata)
            struct = pa.types.is_struct(file.schema_arrow.field(column).type)
            table = file.read_row_group(group, columns=[f"{column}.bytes" if struct else column])
            values = table.column(0).combine_chunks()
        return (values.field("bytes") if struct else values).to_pylist()


def _as_read_error(error: Exception, url: str, group: int) -> OSError:
    """``error`` of reading row group ``group`` of ``url`` as an ``OSError`` (its rows are left
    out as unreadable): pyarrow raises damaged pages as ``OSError`` mostly, but a damaged
    dictionary index as ``ArrowInvalid`` (a ``ValueError``), which ended ``pvu shards``."""
    if isinstance(error, OSError):
        return error
    return OSError(f"row group {group} of {url}: {type(error).__name__}: {error}")


def window_order(rows: list[tuple[HeldTable, int]], rng: np.random.Generator) -> np.ndarray:
    """A shuffle of the positions of ``rows`` (each ``(table, row)``: of one table, or of the
    files of a table in parts) that reads each row group once, at most ``HELD_BYTES`` held: the
    row groups of all the tables in random order, and the rows of each window of consecutive
    ones, as many as hold ``WINDOW_BYTES`` of images (at least one), shuffled together."""
    groups: dict[tuple[HeldTable, int], list[int]] = {}
    for position, (table, row) in enumerate(rows):
        groups.setdefault((table, table.group_of(row)), []).append(position)
    listed = list(groups)
    order: list[np.ndarray] = []
    window: list[int] = []
    held = 0
    for table, group in (listed[i] for i in rng.permutation(len(listed)).tolist()):
        if window and held + table.group_bytes[group] > WINDOW_BYTES:
            order.append(rng.permutation(np.array(window, dtype=np.int64)))
            window, held = [], 0
        window += groups[(table, group)]
        held += table.group_bytes[group]
    order.append(rng.permutation(np.array(window, dtype=np.int64)))
    return np.concatenate(order)
