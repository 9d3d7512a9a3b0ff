"""Arrow batches -> one committed Parquet file per unit: written aside, then moved into place."""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.manifest import MANIFEST_NAME
from pipeline.retry import STORAGE_ERRORS, OutputDenied, bucket_kept, make_folder, place, retry
from schemas import UNIT_STATS_KEY, cache_schema

STAGING_DIR = "_staging"
#: The largest magnitude a float16 embedding holds; beyond it the cast gives inf.
FLOAT16_MAX = float(np.finfo(np.float16).max)
ROW_GROUP_ROWS = 4096
PARQUET_OPTIONS: dict[str, Any] = {
    # zstd for every column but the embedding: zstd saves only ~8% of a float16 embedding's
    # bytes and costs the head trainer most of its reading time (BENCHMARKS.md), so it is
    # stored uncompressed and PLAIN (DuckDB 2.0 refuses BYTE_STREAM_SPLIT on float16). pvu
    # still reads caches written with a compressed or byte-stream-split embedding.
    "compression": {name: "zstd" for name in cache_schema(1).names} | {"embedding": "none"},
    "use_dictionary": ["key", "shard"],
    "row_group_size": ROW_GROUP_ROWS,
    # A CRC-32 per page: readers that check it (pvu's do) refuse a flipped byte, which
    # pyarrow and the page decoder would otherwise read as a different value.
    "write_page_checksum": True,
}


def unit_path(epoch: int, shard: str) -> str:
    """Path of a unit's file relative to the cache root (docs/design.md, storage contract)."""
    return f"epoch={epoch:04d}/{shard}.parquet"


class EmbeddingOverflow(ValueError):
    """The backbone's embeddings exceed the stored dtype: every unit would, so a run stops."""


def finite_peak(values: np.ndarray) -> float:
    """The largest finite magnitude in ``values`` (0 if none): a NaN or inf the backbone gave
    is its own, stored as it is and dropped by readers, not a sign the dtype is too narrow."""
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


def check_fits(peak: float, dtype: str, where: str) -> None:
    """Refuse embeddings whose largest finite magnitude, ``peak``, the stored ``dtype`` cannot
    hold: float16 would store them as inf, and every row would be dropped when read."""
    if dtype == "float16" and peak > FLOAT16_MAX:
        raise EmbeddingOverflow(
            f"{where}: embedding values reach {peak:.3g}, beyond float16's {FLOAT16_MAX:.0f} "
            "(they would be stored as inf); cache them with --dtype float32"
        )


def to_record_batch(
    schema: pa.Schema,
    *,
    keys: list[str],
    shard: str,
    epoch: int,
    labels: np.ndarray,
    outputs: dict[str, np.ndarray],
    ambiguity: np.ndarray | None = None,
) -> pa.RecordBatch:
    """One batch of cache rows in ``schema`` from the backbone's outputs.

    A missing ``loss`` output (dataset label space) is stored as nulls; so is a missing
    ``ambiguity`` or a NaN in it (a NaN loss stays NaN: the classifier produced it).
    """
    embedding_field = schema.field("embedding").type
    dtype = embedding_field.value_type.to_pandas_dtype()
    count = len(keys)
    if count:
        where = f"unit {shard} epoch {epoch}, keys {keys[0]}..."
        check_fits(finite_peak(outputs["embedding"]), np.dtype(dtype).name, where)
    embedding = outputs["embedding"].astype(dtype)
    columns = {
        "key": pa.array(keys, pa.string()),
        "shard": pa.array([shard] * count, pa.string()),
        "epoch": pa.array(np.full(count, epoch, np.int32)),
        "label": pa.array(labels.astype(np.int64)),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(embedding.reshape(-1)), type=embedding_field
        ),
        "loss": _float_or_nulls(outputs.get("loss"), count, nan_is_null=False),
        "pred": pa.array(outputs["pred"].astype(np.int32)),
        "max_prob": pa.array(outputs["max_prob"].astype(np.float32)),
        "entropy": pa.array(outputs["entropy"].astype(np.float32)),
        "ambiguity": _float_or_nulls(ambiguity, count, nan_is_null=True),
    }
    return pa.RecordBatch.from_pydict(columns, schema=schema)


def _float_or_nulls(values: np.ndarray | None, count: int, *, nan_is_null: bool) -> pa.Array:
    """float32 ``values``, or ``count`` nulls when there are none."""
    if values is None:
        return pa.nulls(count, pa.float32())
    return pa.array(values.astype(np.float32), from_pandas=nan_is_null)


def clear_staging(root: str) -> None:
    """Remove what crashed writers left in ``root``: its staging folder, and manifests written
    aside (``._manifest.json.<id>``) but never moved into place (call when nothing writes)."""
    fs, root_path = fsspec.core.url_to_fs(root)
    staging = f"{root_path}/{STAGING_DIR}"
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    for aside in fs.glob(f"{root_path}/.{MANIFEST_NAME}.*"):  # as Manifest.flush names them
        fs.rm(aside)


def commit_unit(
    batches: list[pa.RecordBatch], schema: pa.Schema, *, root: str, relpath: str, stats: dict
) -> int:
    """Write ``batches`` to ``root/relpath`` so that only a complete file ever appears there.

    ``stats`` (rows, skipped, source, ...) go into the footer, so the file describes itself.
    Returns the committed file's size in bytes.
    """
    fs, root_path = fsspec.core.url_to_fs(root)
    metadata = {**(schema.metadata or {}), UNIT_STATS_KEY: json.dumps(stats, sort_keys=True)}
    table = pa.Table.from_batches(batches, schema=schema).replace_schema_metadata(metadata)
    final = f"{root_path}/{relpath}"
    staging = f"{root_path}/{STAGING_DIR}/{uuid.uuid4().hex}-{relpath.replace('/', '-')}"

    def write_then_move() -> None:
        make_folder(fs, f"{root_path}/{STAGING_DIR}")
        make_folder(fs, final.rsplit("/", 1)[0])
        try:
            with fs.open(staging, "wb") as handle:
                pq.write_table(table, handle, **PARQUET_OPTIONS)
            place(fs, staging, final)  # synced: not even a power loss leaves it empty
        finally:  # a cleanup that fails (expired credentials) must not hide the write's error
            with contextlib.suppress(*STORAGE_ERRORS):
                if fs.exists(staging):
                    fs.rm(staging)

    try:
        with bucket_kept(fs, final):
            retry(write_then_move, what=f"commit {root}/{relpath}")
            return int(retry(lambda: fs.size(final), what=f"size {root}/{relpath}"))
    except PermissionError as error:
        raise OutputDenied(str(error)) from error
