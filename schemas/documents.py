"""JSON schemas of the manifest and the head export, loaded from the files beside this module."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import jsonschema


def _load(name: str) -> dict[str, Any]:
    return json.loads(resources.files("schemas").joinpath(name).read_text())


MANIFEST_SCHEMA = _load("manifest.schema.json")
HEAD_SCHEMA = _load("head.schema.json")
REPORT_SCHEMA = _load("report.schema.json")


def is_newer(version: object, current: int) -> bool:
    """Whether a document's ``version`` is a format later than ``current``, the one this pvu
    writes: such a document is refused with "upgrade pvu", not called invalid."""
    return isinstance(version, int) and version > current


def validate_manifest(document: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the field at fault if ``document`` is not a valid manifest."""
    _validate(document, MANIFEST_SCHEMA, "manifest")


def validate_head(document: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the field at fault if ``document`` is not a valid head.json."""
    _validate(document, HEAD_SCHEMA, "head.json")


def validate_report(document: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the field at fault if ``document`` is not a valid report."""
    _validate(document, REPORT_SCHEMA, "report.json")


def _validate(document: dict[str, Any], schema: dict[str, Any], what: str) -> None:
    try:
        jsonschema.validate(document, schema)
    except jsonschema.ValidationError as error:
        where = "/".join(str(part) for part in error.absolute_path) or "<root>"
        raise ValueError(f"invalid {what} at {where}: {error.message}") from None
