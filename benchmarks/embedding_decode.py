"""What the float16 embedding's Parquet encoding costs the head trainer to decode, per row.

Writes one synthetic unit (D=768) with the writer's options but each (encoding, compression)
of the embedding column, and reports its size against raw float16 and the CPU microseconds
per row to decode it with pyarrow and with ``pipeline.head.pages`` (what the trainer uses),
best of ``--repeats``.

    .venv/bin/python benchmarks/embedding_decode.py
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.writer import PARQUET_OPTIONS
from pipeline.demo.synthetic import SyntheticCache, synthetic_rows
from pipeline.head.pages import EMBEDDING_LEAF, read_embedding

CHOICES = [
    ("PLAIN", "zstd"),
    ("PLAIN", "none"),
    ("PLAIN", "snappy"),
    ("PLAIN", "lz4"),
    ("BYTE_STREAM_SPLIT", "zstd"),
    ("BYTE_STREAM_SPLIT", "none"),
]


def _best(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        fn()
        best = min(best, time.process_time() - started)
    return best


def decode_pyarrow(data: bytes) -> None:
    """Every row group's embeddings through pyarrow, as NumPy."""
    reader = pq.ParquetFile(pa.BufferReader(data))
    for g in range(reader.metadata.num_row_groups):
        column = reader.read_row_group(g, use_threads=False).column(0)
        column.combine_chunks().flatten().to_numpy()


def decode_pages(data: bytes, dim: int) -> bool:
    """Every row group's embeddings through the page decoder; False where it falls back."""
    metadata = pq.read_metadata(pa.BufferReader(data))
    for g in range(metadata.num_row_groups):
        got = read_embedding(io.BytesIO(data), metadata, g, dim=dim, dtype=np.dtype("float16"))
        if got is None:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rows", type=int, default=16_384)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    spec = SyntheticCache(dim=args.dim, samples_per_shard=args.rows, shards=1, epochs=1)
    table = synthetic_rows(spec, 0, 0).select(["embedding"])
    print(f"{args.rows:,} rows, D={args.dim}, 4,096-row groups; CPU us per row, best of repeats")
    for encoding, compression in CHOICES:
        buffer = io.BytesIO()
        options = PARQUET_OPTIONS | {
            "compression": compression,
            "use_dictionary": False,
            "column_encoding": {EMBEDDING_LEAF: encoding},
        }
        pq.write_table(table, buffer, **options)
        data = buffer.getvalue()
        fast = decode_pages(data, args.dim)
        pages = _best(lambda d=data: decode_pages(d, args.dim), args.repeats) if fast else None
        size = len(data) / (args.rows * 2 * args.dim)
        print(
            f"  {encoding:17} {compression:6}: {size:.3f}x raw float16; pyarrow "
            f"{_best(lambda d=data: decode_pyarrow(d), args.repeats) / args.rows * 1e6:5.2f} "
            "us/row, pages "
            + (f"{pages / args.rows * 1e6:5.2f} us/row" if pages else "fall back to pyarrow")
        )


if __name__ == "__main__":
    main()
