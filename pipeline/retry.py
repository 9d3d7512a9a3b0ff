"""Retry of storage calls: transient errors back off and retry, permanent ones fail at once."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import NoReturn, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors no retry can fix: the object is not there, or we may not read it.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
#: Errors worth another try (``ConnectionError`` and ``TimeoutError`` are ``OSError`` too).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError,)

_jitter = random.Random()  # private: the global ``random`` is seeded per sample elsewhere


def retry(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 30.0,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn()``; retry transient storage errors with exponential backoff and jitter.

    ``what`` names the operation and its URL (``"open s3://b/x.tar"``); it is logged with every
    retry and prefixed to the message of the error finally raised. Permanent errors
    (``FileNotFoundError``, ``PermissionError``, ...) and non-storage errors are not retried;
    a transient error that outlasts ``attempts`` is re-raised as permanent.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if base_delay < 0:
        raise ValueError(f"base_delay must be >= 0, got {base_delay}")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except PERMANENT_ERRORS as error:
            _reraise(error, f"{what} failed")
        except TRANSIENT_ERRORS as error:
            if attempt == attempts:
                logger.error("%s failed after %d attempts: %r", what, attempts, error)
                _reraise(error, f"{what} failed after {attempts} attempts")
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * _jitter.uniform(0.5, 1.0)
            logger.warning(
                "%s: %r (attempt %d of %d), retrying in %.2fs",
                what,
                error,
                attempt,
                attempts,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _reraise(error: BaseException, context: str) -> NoReturn:
    """Raise the same kind of error with ``context`` prefixed to its message, chained to it."""
    try:
        wrapped = type(error)(f"{context}: {type(error).__name__}: {error}")
    except Exception:  # an exception type with an unusual constructor: raise it unchanged
        raise error from None
    raise wrapped from error
