"""Arrow schema of one cache row, version 1 (DESIGN.md 3.2), and its provenance metadata."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1
PROVENANCE_KEY = b"pvu.provenance"
UNIT_STATS_KEY = b"pvu.unit"


def cache_schema(dim: int, embedding_type: pa.DataType | None = None) -> pa.Schema:
    """The version-1 row schema for embeddings of width ``dim`` (float16 unless told otherwise)."""
    if dim <= 0:
        raise ValueError(f"embedding dim must be positive, got {dim}")
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("shard", pa.string(), nullable=False),
            pa.field("epoch", pa.int32(), nullable=False),
            pa.field("label", pa.int64(), nullable=False),
            pa.field(
                "embedding",
                pa.list_(pa.field("element", embedding_type or pa.float16(), nullable=False), dim),
                nullable=False,
            ),
            pa.field("loss", pa.float32(), nullable=False),
            pa.field("pred", pa.int32(), nullable=False),
            pa.field("max_prob", pa.float32(), nullable=False),
            pa.field("entropy", pa.float32(), nullable=False),
        ]
    )


def embedding_dim(schema: pa.Schema) -> int:
    """Width D of the ``embedding`` column of a cache schema."""
    return schema.field("embedding").type.list_size


def with_provenance(schema: pa.Schema, provenance: dict[str, Any]) -> pa.Schema:
    """``schema`` carrying ``provenance`` (backbone, weights digest, transform, seed, ...)."""
    body = {"schema_version": SCHEMA_VERSION, "embedding_dim": embedding_dim(schema), **provenance}
    return schema.with_metadata({PROVENANCE_KEY: json.dumps(body, sort_keys=True).encode()})


def read_provenance(schema: pa.Schema) -> dict[str, Any]:
    """The provenance stored in a cache file's schema; raises ``ValueError`` if it has none."""
    raw = (schema.metadata or {}).get(PROVENANCE_KEY)
    if raw is None:
        raise ValueError("not a pvu cache file: its Parquet schema carries no pvu.provenance")
    return json.loads(raw)
