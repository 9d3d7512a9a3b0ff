"""Arrow schema of one cache row, version 2 (docs/design.md 3.2), and its provenance.

Version 2 over version 1: ``loss`` is nullable (null in caches in the dataset's own label
space, which the classifier knows nothing about), a nullable ``ambiguity`` column follows
``entropy``, and the provenance records the ``label_space``. Version-1 caches (classifier
space, losses everywhere, no ``ambiguity``) stay readable.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Row schema versions pvu's readers accept."""
LABEL_SPACES = ("classifier", "dataset")
PROVENANCE_KEY = b"pvu.provenance"
UNIT_STATS_KEY = b"pvu.unit"


def cache_schema(dim: int, embedding_type: pa.DataType | None = None) -> pa.Schema:
    """The version-2 row schema for embeddings of width ``dim`` (float16 unless told otherwise)."""
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
            pa.field("loss", pa.float32(), nullable=True),
            pa.field("pred", pa.int32(), nullable=False),
            pa.field("max_prob", pa.float32(), nullable=False),
            pa.field("entropy", pa.float32(), nullable=False),
            pa.field("ambiguity", pa.float32(), nullable=True),
        ]
    )


def embedding_dim(schema: pa.Schema) -> int:
    """Width D of the ``embedding`` column of a cache schema."""
    return schema.field("embedding").type.list_size


def leaf_column(metadata: pq.FileMetaData, path: str) -> int:
    """Index of the leaf column ``path`` (``loss``, ``embedding.list.element``) in a Parquet
    file's schema; raises ``ValueError`` when it has none."""
    schema = metadata.schema
    for i in range(len(schema)):
        if schema.column(i).path == path:
            return i
    raise ValueError(f"no {path} column in the Parquet schema")


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


def read_unit_stats(metadata: dict[bytes, bytes] | None) -> dict[str, Any] | None:
    """A unit file's record of itself (``epoch``, ``shard``, ``source``, ``rows``, ``skipped``)
    from its footer's key-value ``metadata``; None where it has none (not a pvu unit, or one
    written before pvu kept it). Raises ``ValueError`` if the record is not JSON."""
    raw = (metadata or {}).get(UNIT_STATS_KEY)
    return None if raw is None else json.loads(raw)


def label_space(provenance: dict[str, Any]) -> str:
    """The label space of a cache with ``provenance``: ``classifier`` or ``dataset``.

    Version-1 caches predate the field and are all in the classifier's space.
    """
    return provenance.get("label_space") or "classifier"
