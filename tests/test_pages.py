"""The embedding column decoded from Parquet pages equals pyarrow's reading, or falls back."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import damage_page_header, with_embedding

from pipeline.demo.synthetic import SyntheticCache, synthetic_rows
from pipeline.head import pages
from pipeline.head.pages import EMBEDDING_LEAF, read_embedding
from schemas import leaf_column


def _written(table: pa.Table, **options: object) -> tuple[bytes, pq.FileMetaData]:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=300, **options)
    return buffer.getvalue(), pq.read_metadata(pa.BufferReader(buffer.getvalue()))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("encoding", ["PLAIN", "BYTE_STREAM_SPLIT"])
@pytest.mark.parametrize("compression", ["zstd", "snappy", "none"])
@pytest.mark.parametrize("page_version", ["1.0", "2.0"])
@pytest.mark.parametrize("source", ["memory", "file", "fsspec"])
@pytest.mark.parametrize("checksum", [True, False], ids=["crc", "no-crc"])
def test_pages_decode_bit_identical_to_pyarrow(
    dtype: str,
    encoding: str,
    compression: str,
    page_version: str,
    source: str,
    checksum: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From an in-memory or a plain file (uncompressed PLAIN pages read page by page into
    place) and from an fsspec file (every chunk read whole, then decoded); pages with a CRC
    (as pvu writes them) pass its check, or the fast path would give up on them."""
    if source != "fsspec" and compression == "none" and encoding == "PLAIN":
        monkeypatch.setattr(pages, "_read_into_scratch", _whole_chunk_read)
    spec = SyntheticCache(dim=48, samples_per_shard=700, shards=1, epochs=1, dtype=dtype)
    data, metadata = _written(
        synthetic_rows(spec, 0, 0),
        compression=compression,
        use_dictionary=["key"],
        column_encoding={"embedding.list.element": encoding},
        data_page_version=page_version,
        write_page_checksum=checksum,
        data_page_size=8192,  # several pages per row group
    )
    reader = pq.ParquetFile(pa.BufferReader(data))
    path = tmp_path / "unit.parquet"
    path.write_bytes(data)
    for group in range(metadata.num_row_groups):
        expected = reader.read_row_group(group, columns=["embedding"]).column(0)
        expected = expected.combine_chunks().flatten().to_numpy().reshape(-1, 48)
        out = np.full((320, 48), 7, dtype=dtype)
        with _open(source, data, path) as handle:
            got = read_embedding(handle, metadata, group, dim=48, dtype=np.dtype(dtype), out=out)
        assert got is not None and np.shares_memory(got.values, out)
        assert got.values.tobytes() == expected.tobytes()
        assert got.finite


@pytest.mark.parametrize("value", [np.nan, -np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_nonfinite_value_in_any_page_is_reported(
    value: float, dtype: str, compression: str, tmp_path: Path
) -> None:
    """Read page by page (uncompressed) or the chunk whole (zstd), one NaN/inf in the middle
    page of a row group makes it not finite."""
    table = synthetic_rows(SyntheticCache(dim=48, samples_per_shard=300, dtype=dtype), 0, 0)
    embedding = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 48)
    embedding = embedding.copy()
    embedding[150, 7] = value
    data, metadata = _written(
        with_embedding(table, embedding),
        compression=compression,
        use_dictionary=["key"],
        data_page_size=8192,  # 300 rows x 48 values in 3-4 pages
    )
    path = tmp_path / "unit.parquet"
    path.write_bytes(data)
    with _open("file", data, path) as handle:
        got = read_embedding(handle, metadata, 0, dim=48, dtype=np.dtype(dtype))
    assert got is not None and not got.finite


def _whole_chunk_read(*_: object) -> None:
    raise AssertionError("read the chunk whole, not page by page into place")


def _open(source: str, data: bytes, path: Path) -> BinaryIO:
    if source == "memory":
        return io.BytesIO(data)
    if source == "file":
        return open(path, "rb", buffering=0)  # what the stream opens a local unit with
    return fsspec.open(str(path), "rb").open()


def test_a_page_header_longer_than_the_probe_reads_the_chunk_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = SyntheticCache(dim=48, samples_per_shard=700, shards=1, epochs=1)
    data, metadata = _written(
        synthetic_rows(spec, 0, 0), compression="none", use_dictionary=["key"], data_page_size=8192
    )
    expected = read_embedding(io.BytesIO(data), metadata, 0, dim=48, dtype=np.dtype("float16"))
    monkeypatch.setattr(pages, "_HEADER_PROBE", 8)  # no page header fits in 8 bytes
    got = read_embedding(io.BytesIO(data), metadata, 0, dim=48, dtype=np.dtype("float16"))
    assert expected is not None and got is not None
    assert got.values.tobytes() == expected.values.tobytes()


@pytest.mark.parametrize(("source", "compression"), [("file", "none"), ("fsspec", "zstd")])
def test_a_damaged_page_header_is_left_to_pyarrow(
    source: str, compression: str, tmp_path: Path
) -> None:
    """Page by page into place, or the chunk read whole: pyarrow then names what is wrong."""
    table = synthetic_rows(SyntheticCache(dim=48, samples_per_shard=300), 0, 0)
    data, metadata = _written(
        table, compression=compression, use_dictionary=["key"], data_page_size=8192
    )
    path = tmp_path / "unit.parquet"
    path.write_bytes(data)
    damage_page_header(path, 0)
    with _open(source, path.read_bytes(), path) as handle:
        assert read_embedding(handle, metadata, 0, dim=48, dtype=np.dtype("float16")) is None


@pytest.mark.parametrize(("source", "compression"), [("file", "none"), ("fsspec", "zstd")])
@pytest.mark.parametrize("page_version", ["1.0", "2.0"])
def test_a_page_whose_crc_fails_is_left_to_pyarrow_which_refuses_it(
    source: str, compression: str, page_version: str, tmp_path: Path
) -> None:
    table = synthetic_rows(SyntheticCache(dim=48, samples_per_shard=300), 0, 0)
    data, metadata = _written(
        table,
        compression=compression,
        use_dictionary=["key"],
        data_page_size=8192,
        data_page_version=page_version,
        write_page_checksum=True,
    )
    chunk = metadata.row_group(0).column(leaf_column(metadata, EMBEDDING_LEAF))
    damaged = bytearray(data)
    damaged[chunk.data_page_offset + chunk.total_compressed_size - 5] ^= 0x01  # one bit
    path = tmp_path / "unit.parquet"
    path.write_bytes(damaged)
    with _open(source, bytes(damaged), path) as handle:
        assert read_embedding(handle, metadata, 0, dim=48, dtype=np.dtype("float16")) is None
    reader = pq.ParquetFile(pa.BufferReader(bytes(damaged)), page_checksum_verification=True)
    with pytest.raises(OSError, match=r"(?i)crc"):
        reader.read_row_group(0, columns=["embedding"])


def test_dictionary_pages_fall_back_to_pyarrow() -> None:
    table = synthetic_rows(SyntheticCache(dim=8, samples_per_shard=50, shards=1, epochs=1), 0, 0)
    data, metadata = _written(table, use_dictionary=True)
    assert read_embedding(io.BytesIO(data), metadata, 0, dim=8, dtype=np.dtype("float16")) is None
