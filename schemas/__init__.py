"""Versioned contracts of pvu: cache rows, manifest, head export (DESIGN.md section 3)."""

from schemas.documents import HEAD_SCHEMA, MANIFEST_SCHEMA, validate_head, validate_manifest
from schemas.rows import (
    PROVENANCE_KEY,
    SCHEMA_VERSION,
    UNIT_STATS_KEY,
    cache_schema,
    embedding_dim,
    read_provenance,
    with_provenance,
)

__all__ = [
    "HEAD_SCHEMA",
    "MANIFEST_SCHEMA",
    "PROVENANCE_KEY",
    "SCHEMA_VERSION",
    "UNIT_STATS_KEY",
    "cache_schema",
    "embedding_dim",
    "read_provenance",
    "validate_head",
    "validate_manifest",
    "with_provenance",
]
