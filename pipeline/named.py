"""Many like problems (images left out, damaged units) in few log lines: the first
:data:`NAMED` of a kind are named one line each, the rest counted in one line; and counts
said as words are (:func:`counted`)."""

from __future__ import annotations

import logging

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
