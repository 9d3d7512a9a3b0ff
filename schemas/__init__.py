"""Versioned contracts of pvu: cache rows, manifest, head export, evaluation report."""

from schemas.documents import (
    HEAD_SCHEMA,
    MANIFEST_SCHEMA,
    REPORT_SCHEMA,
    is_newer,
    validate_head,
    validate_manifest,
    validate_report,
)
from schemas.rows import (
    LABEL_SPACES,
    PROVENANCE_KEY,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    UNIT_STATS_KEY,
    cache_schema,
    embedding_dim,
    label_space,
    leaf_column,
    read_provenance,
    read_unit_stats,
    with_provenance,
)

__all__ = [
    "HEAD_SCHEMA",
    "LABEL_SPACES",
    "MANIFEST_SCHEMA",
    "PROVENANCE_KEY",
    "READABLE_VERSIONS",
    "REPORT_SCHEMA",
    "SCHEMA_VERSION",
    "UNIT_STATS_KEY",
    "cache_schema",
    "embedding_dim",
    "is_newer",
    "label_space",
    "leaf_column",
    "read_provenance",
    "read_unit_stats",
    "validate_head",
    "validate_manifest",
    "validate_report",
    "with_provenance",
]
