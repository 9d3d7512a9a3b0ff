"""Images held in a Parquet table's bytes, as the Hugging Face Hub publishes datasets: a
column of ``struct<bytes: binary, path: string>`` (``datasets``' ``Image`` feature; ``bytes``
null where only a path is given) or of plain ``binary``.

Listing reads the struct's paths and the labels only, by batches; an image's bytes are read
when it is converted (:meth:`HeldTable.image`): the ``BATCH_ROWS`` rows holding it, streamed
from its row group, the last ``CACHED_BATCHES`` batches kept for the rows read next. So the
table is never read whole, in any order the shuffle asks for.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
from collections import OrderedDict

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.retry import retry

#: Rows read together, from the row group that holds them.
BATCH_ROWS = 16
#: Batches kept per table for the rows read next (``--no-shuffle`` reads each batch once).
CACHED_BATCHES = 8
#: Rows a row group may hold before a shuffled read of it is warned of as slow.
LARGE_ROW_GROUP = 1_000

log = logging.getLogger(__name__)


def is_binary(data_type: pa.DataType) -> bool:
    return pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type)


def is_image_struct(data_type: pa.DataType) -> bool:
    """Whether ``data_type`` is ``struct<bytes: binary[, path: string]>`` (any field order)."""
    if not pa.types.is_struct(data_type):
        return False
    fields = {data_type.field(i).name: data_type.field(i).type for i in range(data_type.num_fields)}
    path = fields.pop("path", pa.string())
    return (
        set(fields) == {"bytes"}
        and is_binary(fields["bytes"])
        and (pa.types.is_string(path) or pa.types.is_large_string(path))
    )


def parquet_schema(url: str) -> pa.Schema:
    """The schema of the Parquet table at ``url``, from its footer alone."""

    def read() -> pa.Schema:
        with fsspec.open(url, "rb") as handle:
            return pq.ParquetFile(handle).schema_arrow

    return retry(read, what=f"read {url}")


def holds_text(url: str, column: str) -> bool:
    """Whether the binary ``column`` of the Parquet table at ``url`` holds text (paths written
    as bytes), not images: its first value is UTF-8 without a NUL, which no image is."""
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


class HeldTable:
    """The images in ``column`` of the Parquet table at ``url``, read by row; safe to share
    among threads. Holds at most ``CACHED_BATCHES`` batches of ``BATCH_ROWS`` images, and one
    more per thread reading."""

    def __init__(self, url: str, column: str) -> None:
        self.url = url
        self.column = column
        self._metadata = retry(self._read_metadata, what=f"read {url}")
        sizes = [self._metadata.row_group(i).num_rows for i in range(self._metadata.num_row_groups)]
        self._starts = [0, *itertools.accumulate(sizes)]  # each row group's first row
        largest = max(sizes, default=0)
        if largest > LARGE_ROW_GROUP:
            log.warning(
                "table %s holds up to %d rows a row group: shuffled, each image is read with "
                "its row group up to it (slow); pass --no-shuffle, or rewrite the table with "
                "pyarrow.parquet.write_table(..., row_group_size=100)",
                *(url, largest),
            )
        self._batches: OrderedDict[tuple[int, int], list[bytes | None]] = OrderedDict()
        self._lock = threading.Lock()

    def _read_metadata(self) -> pq.FileMetaData:
        with fsspec.open(self.url, "rb") as handle:
            return pq.ParquetFile(handle).metadata

    def image(self, row: int) -> bytes | None:
        """The bytes row ``row`` holds (0-based), ``None`` where they are null."""
        group = bisect.bisect_right(self._starts, row) - 1
        batch, offset = divmod(row - self._starts[group], BATCH_ROWS)
        with self._lock:
            values = self._batches.get((group, batch))
            if values is not None:
                self._batches.move_to_end((group, batch))
        if values is None:
            values = retry(lambda: self._read(group, batch), what=f"read {self.url}")
            with self._lock:
                self._batches[group, batch] = values
                while len(self._batches) > CACHED_BATCHES:
                    self._batches.popitem(last=False)
        return values[offset]

    def _read(self, group: int, batch: int) -> list[bytes | None]:
        """Batch ``batch`` of row group ``group``'s bytes, streamed from the group's start."""
        column = self.column
        with fsspec.open(self.url, "rb") as handle:
            file = pq.ParquetFile(handle, metadata=self._metadata)
            struct = pa.types.is_struct(file.schema_arrow.field(column).type)
            batches = file.iter_batches(
                BATCH_ROWS, row_groups=[group], columns=[f"{column}.bytes" if struct else column]
            )
            values = next(itertools.islice(batches, batch, None)).column(0)
        return (values.field("bytes") if struct else values).to_pylist()
