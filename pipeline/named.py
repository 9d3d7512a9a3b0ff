"""Many like problems (images left out, damaged units) in few log lines: the first
:data:`NAMED` of a kind are named one line each, the rest counted in one line; counts said
as words are (:func:`counted`), and settings as a user types them (:func:`as_typed`)."""

from __future__ import annotations

import json
import logging
from typing import Any

#: Like problems named one line each; the rest are logged at debug level (``--verbose``).
NAMED = 10


def named_level(seen: int) -> int:
    """The level of a problem's log line after ``seen`` of its kind: a warning for the first
    :data:`NAMED`, debug for the rest."""
    return logging.WARNING if seen < NAMED else logging.DEBUG


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` with thousands separators and ``noun``, or its ``plural`` (``noun`` + ``s``
    unless given) where ``count`` is not 1: ``1 image``, ``2 images``, ``1,024 images``."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


def as_typed(value: Any) -> str:
    """A setting's ``value`` in a message, as a user types it as a flag or in a config file,
    not as Python's repr: text bare, a list's items comma-separated (``--hidden 512,512``), a
    mapping as JSON (``--model-kwargs``), booleans as YAML's, ``none`` where unset."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(map(as_typed, value)) or "none"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)
