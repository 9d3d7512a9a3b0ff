"""What every job shares at the edge: the stderr console, log setup, errors users can act on."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

console = Console(stderr=True)


def setup_logging(verbose: bool) -> None:
    """Rich log lines on stderr; debug level with ``verbose``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda`` for a ``--device`` of cpu, cuda or auto (CUDA when torch sees one);
    raises ``ValueError`` for cuda on a machine without one."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch sees no CUDA device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class UserError(Exception):
    """A failure the user fixes (bad input, missing data, storage access); no traceback."""


#: Failures reported as one line with exit code 2 (a traceback only under ``--verbose``).
#: ``OSError`` covers the rest of storage: a store down for longer than the retries, a damaged
#: file; ``pipeline.retry`` names the operation and the URL in the message.
USER_ERRORS = (UserError, ValueError, OSError)


@contextmanager
def reported(job: str, *, verbose: bool, resume: str = "") -> Iterator[None]:
    """Run a job's body; a user error ends it with one ``job: message`` line and exit code 2,
    Ctrl-C with ``job: interrupted`` (and ``resume``, how to go on from there) and 130."""
    try:
        yield
    except KeyboardInterrupt:
        clause = f"; {resume}" if resume else ""
        console.print(f"[red]{job}:[/red] interrupted{clause}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=130) from None
    except USER_ERRORS as error:
        if verbose:
            console.print_exception()
        console.print(f"[red]{job}:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


Verbose = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="Debug logging; tracebacks for errors."),
]
