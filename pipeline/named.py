"""Many like problems (images left out, damaged units) in few log lines: the first
:data:`NAMED` of a kind are named one line each, the rest counted in one line."""

from __future__ import annotations

import logging

#: Like problems named one line each; the rest are logged at debug level (``--verbose``).
NAMED = 10


def named_level(seen: int) -> int:
    """The level of a problem's log line after ``seen`` of its kind: a warning for the first
    :data:`NAMED`, debug for the rest."""
    return logging.WARNING if seen < NAMED else logging.DEBUG
