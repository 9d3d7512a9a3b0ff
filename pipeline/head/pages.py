"""The embedding column of one Parquet row group, decoded straight from its pages into NumPy.

pyarrow decodes a ``fixed_size_list<float16>[D]`` column through its generic list reader,
which walks repetition and definition levels value by value: about 3 us of CPU per row at
D=768, most of the head trainer's reading cost. A fixed-size list without nulls needs none of
that: each data page is (decompressed) levels followed by the values, PLAIN (bytes back to
back) or BYTE_STREAM_SPLIT (one stream per byte of the value). :func:`read_embedding` reads
the column chunk's bytes with one ranged read, skips the levels and copies the values into a
``(rows, D)`` array: one decompression and one copy. From a plain file (a local cache), an
uncompressed PLAIN chunk is read page by page instead, each page's values straight into the
array: one copy, from the page cache. Each page's values are checked for NaN/inf as they land,
while still in the CPU's cache (a check of the whole group afterwards reads it back from
memory), and against the page's CRC-32 where the writer stored one (ISA-L's, 0.14 us per
768-wide row); a page that fails it goes to pyarrow, which verifies it too and raises. Pages it
does not understand (dictionary-encoded, nulls, other encodings or codecs) return ``None`` so
the caller falls back to pyarrow; the result is bit-identical either way (tested).
"""

from __future__ import annotations

import io
import struct
import threading
from collections.abc import Callable
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from isal.isal_zlib import crc32

from schemas import leaf_column

EMBEDDING_LEAF = "embedding.list.element"

_CODECS = {
    "UNCOMPRESSED": None,
    "ZSTD": "zstd",
    "SNAPPY": "snappy",
    "GZIP": "gzip",
    "BROTLI": "brotli",
    "LZ4_RAW": "lz4_raw",
}
_PLAIN, _RLE, _BYTE_STREAM_SPLIT = 0, 3, 9
_DATA_PAGE, _DATA_PAGE_V2 = 0, 3
_CRC = 4  # the page header's optional CRC-32 of the page body as stored (a signed i32)
_WIDTH = {"FIXED_LEN_BYTE_ARRAY": 2, "FLOAT": 4}  # float16 is FLBA(2); float32 is FLOAT
_scratch = threading.local()  # each reading thread's column-chunk buffer
_HEADER_PROBE = 1024  # bytes read to parse a page header; a longer one takes the buffered path
_HEADER_ERRORS = (IndexError, KeyError, ValueError, struct.error)  # a page header not parsed


class Embedding(NamedTuple):
    """A row group's decoded embeddings, and whether every value is finite (no NaN/inf)."""

    values: np.ndarray
    finite: bool


def all_finite(values: np.ndarray) -> bool:
    """Whether no value is NaN/inf; float16 is checked on its exponent bits, with no temporary."""
    if values.dtype == np.float16:
        # NaN/inf have every exponent bit set: the positive ones are 0x7C00-0x7FFF, the
        # largest int16 values, the negative ones 0xFC00-0xFFFF, the largest uint16 values
        positive, unsigned = values.view(np.int16), values.view(np.uint16)
        return bool(positive.max(initial=0) < 0x7C00 and unsigned.max(initial=0) < 0xFC00)
    return bool(np.isfinite(values).all())


def read_embedding(
    handle: BinaryIO,
    metadata: pq.FileMetaData,
    group: int,
    *,
    dim: int,
    dtype: np.dtype,
    out: np.ndarray | None = None,
) -> Embedding | None:
    """Row group ``group``'s embeddings as a ``(rows, dim)`` array, or None if not fast-path.

    Decodes into ``out`` (a ``(rows or more, dim)`` array of ``dtype``) when given.
    """
    column = leaf_column(metadata, EMBEDDING_LEAF)
    chunk = metadata.row_group(group).column(column)
    width = _WIDTH.get(chunk.physical_type)
    if chunk.compression not in _CODECS or chunk.has_dictionary_page or width != dtype.itemsize:
        return None
    descriptor = metadata.schema.column(column)
    levels = (descriptor.max_repetition_level > 0) + (descriptor.max_definition_level > 0)
    rows = metadata.row_group(group).num_rows
    start, size = chunk.data_page_offset, chunk.total_compressed_size
    codec = _CODECS[chunk.compression]
    target = np.empty((rows, dim), dtype=dtype) if out is None else out[:rows]
    flat = target.reshape(-1)  # a view: ``out`` rows are contiguous
    filled, finite = -1, False
    if codec is None and isinstance(handle, io.RawIOBase | io.BufferedIOBase):
        filled, finite = _read_plain_pages(handle, start, size, flat, levels)
    if filled != len(flat):
        handle.seek(start)
        filled, finite = _decode_pages(_read_into_scratch(handle, size), flat, codec, levels)
    return Embedding(target, finite) if filled == len(flat) else None


def _read_into_scratch(handle: BinaryIO, size: int) -> memoryview:
    """Up to ``size`` bytes from ``handle``'s position, in a buffer this thread reuses: a fresh
    one per row group had the kernel fault in and zero its pages on every read."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _scratch.buffer = bytearray(size)
    view = memoryview(buffer)[:size]
    return view[: _read_into(handle, view)]


def _read_into(handle: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``handle``'s position; returns the bytes read (fewer at the end)."""
    filled = 0
    while filled < len(view) and (got := handle.readinto(view[filled:])):
        filled += got
    return filled


def _read_plain_pages(
    handle: BinaryIO, start: int, size: int, out: np.ndarray, levels: int
) -> tuple[int, bool]:
    """The ``size``-byte uncompressed chunk at ``start``, page by page: each header (and a v1
    page's level lengths) with small reads, PLAIN values straight into ``out``; returns values
    written (-1: a page it does not take) and whether they are all finite."""
    raw, width = memoryview(out.view(np.uint8)), out.itemsize
    position, end, filled, finite = start, start + size, 0, True
    while position < end:
        handle.seek(position)
        try:
            header, length = _read_struct(memoryview(handle.read(_HEADER_PROBE)), 0)
            page = _data_page(header, levels)
            if page is None:
                return -1, False
            count, encoding, skip = page
            body = position + length
            if skip is None:
                skip = _levels_size(_length_in_file(handle, body), levels)
            values = body + skip
        except _HEADER_ERRORS:  # a header longer than the probe, a short file, a damaged header
            return -1, False
        position = body + header[3]
        if encoding != _PLAIN or position - values != count * width or filled + count > len(out):
            return -1, False
        handle.seek(body if _CRC in header else values)
        levels_bytes = handle.read(values - body) if _CRC in header else b""  # ends at values
        landed = raw[filled * width : (filled + count) * width]
        if _read_into(handle, landed) != count * width or not _crc_ok(header, levels_bytes, landed):
            return -1, False
        finite = all_finite(out[filled : filled + count]) and finite
        filled += count
    return filled, finite


def _crc_ok(header: dict[int, Any], *body: bytes | memoryview) -> bool:
    """Whether a page's body, as stored (in parts), matches the CRC-32 its header may hold."""
    if _CRC not in header:
        return True
    crc = 0
    for part in body:
        crc = crc32(part, crc)
    return crc == header[_CRC] & 0xFFFFFFFF


def _levels_size(length_at: Callable[[int], int], levels: int) -> int:
    """Bytes of the ``levels`` length-prefixed RLE level runs a v1 page's body starts with;
    ``length_at(offset)`` reads the 4-byte length at ``offset`` of the body."""
    size = 0
    for _ in range(levels):
        size += 4 + length_at(size)
    return size


def _data_page(header: dict[int, Any], levels: int) -> tuple[int, int, int | None] | None:
    """A data page header's value count, encoding and, in a v2 page, the bytes of levels ahead
    of its values (None in v1, whose levels are length-prefixed runs in its decompressed body);
    None for a page the decoders do not take (another type, nulls, levels not RLE)."""
    if header[1] == _DATA_PAGE:
        page = header[5]
        if levels and (page.get(3) != _RLE or page.get(4) != _RLE):
            return None
        return page[1], page[2], None
    if header[1] == _DATA_PAGE_V2:
        page = header[8]
        if page.get(2, 0):  # nulls
            return None
        return page[1], page[4], page.get(5, 0) + page.get(6, 0)
    return None


def _decode_pages(
    data: memoryview, out: np.ndarray, codec: str | None, levels: int
) -> tuple[int, bool]:
    """Decode every data page of a column chunk into ``out``; returns values written (-1: no)
    and whether they are all finite."""
    position, filled, finite = 0, 0, True
    while position < len(data):
        try:
            header, position = _read_struct(data, position)
            body = data[position : position + header[3]]
            position += header[3]
            page = _data_page(header, levels)
        except _HEADER_ERRORS:  # a damaged header: pyarrow reads it or says what is wrong
            return -1, False
        if page is None or not _crc_ok(header, body):
            return -1, False
        count, encoding, skip = page
        if skip is None:
            values = _strip_levels(_decompress(body, header[2], codec), levels)
        else:
            values = body[skip:]
            if header[8].get(7, True) and codec is not None:  # v2 values may be uncompressed
                values = _decompress(values, header[2] - skip, codec)
        if filled + count > len(out) or not _place(values, out[filled : filled + count], encoding):
            return -1, False
        finite = all_finite(out[filled : filled + count]) and finite
        filled += count
    return filled, finite


def _decompress(body: memoryview, size: int, codec: str | None) -> memoryview:
    if codec is None:
        return body
    return memoryview(pa.decompress(body, decompressed_size=size, codec=codec))


def _strip_levels(page: memoryview, levels: int) -> memoryview:
    """The values of a v1 data page: skip its length-prefixed RLE level runs."""
    return page[_levels_size(lambda at: struct.unpack_from("<i", page, at)[0], levels) :]


def _length_in_file(handle: BinaryIO, body: int) -> Callable[[int], int]:
    """Reads the 4-byte level-run length at an offset of the page body at ``body`` of a file."""

    def length_at(offset: int) -> int:
        handle.seek(body + offset)
        return struct.unpack("<i", handle.read(4))[0]

    return length_at


def _place(values: memoryview, out: np.ndarray, encoding: int) -> bool:
    """Copy a page's values into ``out``; False for encodings or sizes it cannot take."""
    width = out.itemsize
    if len(values) != len(out) * width:
        return False  # nulls or a type it does not expect: let pyarrow decide
    raw = np.frombuffer(values, dtype=np.uint8)
    if encoding == _PLAIN:
        out.view(np.uint8)[:] = raw
    elif encoding == _BYTE_STREAM_SPLIT:
        _join_streams(raw.reshape(width, -1), out.view(f"<u{width}"))
    else:
        return False
    return True


def _join_streams(streams: np.ndarray, out: np.ndarray) -> None:
    """Interleave byte streams (least significant first) into little-endian words ``out``."""
    out[:] = streams[-1]
    for stream in streams[-2::-1]:
        out <<= 8
        out |= stream


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7


def _zigzag(data: memoryview, position: int) -> tuple[int, int]:
    value, position = _varint(data, position)
    return (value >> 1) ^ -(value & 1), position


def _read_value(data: memoryview, position: int, kind: int) -> tuple[Any, int]:
    """One Thrift compact-protocol value of type ``kind`` starting at ``position``."""
    if kind in (1, 2):  # booleans inside lists; in fields the type carries the value
        return data[position] == 1, position + 1
    if kind == 3:
        return data[position], position + 1
    if kind in (4, 5, 6):
        return _zigzag(data, position)
    if kind == 7:
        return None, position + 8
    if kind == 8:
        length, position = _varint(data, position)
        return bytes(data[position : position + length]), position + length
    if kind in (9, 10):
        head = data[position]
        size, element = head >> 4, head & 0x0F
        position += 1
        if size == 15:
            size, position = _varint(data, position)
        items = []
        for _ in range(size):
            item, position = _read_value(data, position, element)
            items.append(item)
        return items, position
    if kind == 12:
        return _read_struct(data, position)
    raise ValueError(f"unsupported Thrift type {kind} in a Parquet page header")


def _read_struct(data: memoryview, position: int) -> tuple[dict[int, Any], int]:
    """A Thrift compact-protocol struct as ``{field id: value}`` (page headers, in Parquet)."""
    fields: dict[int, Any] = {}
    last = 0
    while True:
        head = data[position]
        position += 1
        if head == 0:
            return fields, position
        delta, kind = head >> 4, head & 0x0F
        if delta:
            last += delta
        else:
            last, position = _zigzag(data, position)
        if kind in (1, 2):
            fields[last] = kind == 1
        else:
            fields[last], position = _read_value(data, position, kind)
