"""What every job shares at the edge: the consoles, log setup, errors users can act on."""

from __future__ import annotations

import atexit
import errno
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager, suppress
from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# Both consoles print text as it is: paths, URLs and class names are the user's, and rich
# markup in them (a folder ``runs/[exp1]`` printed as ``runs//``, ``[/x]`` a MarkupError after
# the work was done) is no markup; what pvu styles itself says so (``markup=True``, a ``Text``).
#: Progress, logs, summaries and errors: stderr.
console = Console(stderr=True, markup=False)
#: What a command is asked for (``pvu info``'s tables): stdout, so it can be redirected.
answer = Console(markup=False)


#: A log line where stderr is no terminal: one line a record, for ``grep`` and log collectors.
PLAIN_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(verbose: bool) -> None:
    """Log lines on stderr, debug level with ``verbose``: rich ones on a terminal, plain ones
    elsewhere (rich wrapped each message into a padded 80-column box in ``ray job logs``)."""
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(console.file)
        handler.setFormatter(logging.Formatter(PLAIN_LOG_FORMAT))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True
    )
    for name in ("botocore", "aiobotocore"):  # "Found credentials in ..." on every S3 command
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    # huggingface_hub (timm's weights from the hub) also prints through a handler of its own
    import huggingface_hub.utils.logging  # noqa: F401 - which it adds on import

    logging.getLogger("huggingface_hub").handlers.clear()


def binary_size(count: float) -> str:
    """``count`` bytes in the largest binary unit it holds at least one of (``4.89 MiB``), so a
    small cache does not read as ``0.00 GiB``, as if empty."""
    unit = "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if count < 1024:
            break
        count, unit = count / 1024, larger
    return f"{count:,.0f} B" if unit == "B" else f"{count:,.2f} {unit}"


def summary_table(title: str) -> Table:
    """A two-column table of names and values, each value whole over as many lines as it
    takes (cut with '...' at 80 columns, a URL lost where stderr is a log file)."""
    table = Table(title=title, show_header=False)
    table.add_column()
    table.add_column(overflow="fold")
    return table


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


_sigterm = threading.Event()
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop(signum: int, frame: object) -> None:
    """The first Ctrl-C or SIGTERM unwinds the job from the main thread; later ones are
    ignored, so that what the unwinding saves (a manifest, a checkpoint) and Ray's stop are
    not cut short (a second Ctrl-C left a traceback and Ray's agents running)."""
    if signum == signal.SIGTERM:
        _sigterm.set()
    ignore_stop_signals()
    raise KeyboardInterrupt  # what Ray's blocking calls let through (they mangle others)


def ignore_stop_signals() -> None:
    """Ignore Ctrl-C and SIGTERM from here on (in the main thread; elsewhere nothing)."""
    if threading.current_thread() is threading.main_thread():
        for signum in _STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def handle_stop_signals() -> dict[int, Any]:
    """Make Ctrl-C and SIGTERM (``ray job stop``, a pod evicted) unwind the job from the main
    thread, once; returns the handlers replaced (none in other threads, where it does
    nothing)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _stop) for signum in _STOP_SIGNALS}


@contextmanager
def sigterm_in_ray_init() -> Iterator[None]:
    """Around ``ray.init``: a SIGTERM while it runs (its handler exits with code 15, no word)
    ends the job as pvu's own handler does; the handlers it replaced are back afterwards, and
    stop signals are ignored while Ray stops at exit (interrupted, it left its agents running)."""
    main = threading.current_thread() is threading.main_thread()
    before = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS} if main else {}
    stopped = False
    try:
        yield
    except SystemExit as stop:
        if stop.code != signal.SIGTERM:
            raise
        _sigterm.set()
        stopped = True
        raise KeyboardInterrupt from None
    except KeyboardInterrupt:
        stopped = True
        raise
    finally:
        atexit.register(ignore_stop_signals)  # runs before the exit handler ray.init added
        for signum, handler in before.items():  # a job stopping: later signals stay ignored
            signal.signal(signum, signal.SIG_IGN if stopped and handler is _stop else handler)


@contextmanager
def reported(job: str, *, verbose: bool, resume: str = "") -> Iterator[None]:
    """Run a job's body; a user error ends it with one ``job: message`` line and exit code 2,
    Ctrl-C with ``job: interrupted`` (and ``resume``, how to go on from there) and 130,
    SIGTERM with ``job: terminated`` likewise and 143."""
    _sigterm.clear()
    replaced = handle_stop_signals()
    try:
        yield
    except KeyboardInterrupt:
        word, code = ("terminated", 143) if _sigterm.is_set() else ("interrupted", 130)
        clause = f"; {escape(resume)}" if resume else ""
        console.print(
            f"[red]{job}:[/red] {word}{clause}", markup=True, highlight=False, soft_wrap=True
        )
        raise typer.Exit(code=code) from None
    except USER_ERRORS as error:
        if verbose:
            console.print_exception()
        console.print(
            f"[red]{job}:[/red] {escape(str(error))}", markup=True, highlight=False, soft_wrap=True
        )
        raise typer.Exit(code=2) from None
    finally:
        for signum, handler in replaced.items():
            signal.signal(signum, handler)


#: Seconds between the plain progress lines written where stderr is no terminal.
PLAIN_PROGRESS_SECONDS = 30.0


@contextmanager
def progress_bar(*columns: ProgressColumn | str, plain: str, **options: Any) -> Iterator[Progress]:
    """A rich progress bar on :data:`console`. Where stderr is no terminal (``ray job logs``,
    ``kubectl logs``, a file), which a bar reaches only when it ends, each visible, unfinished
    task is written as the line ``plain`` (a format of ``task``) every
    ``PLAIN_PROGRESS_SECONDS``."""
    if not console.is_terminal:
        options["transient"] = True  # its last render too: the plain lines and summary say it
    with Progress(*columns, console=console, **options) as progress:
        if console.is_terminal:
            yield progress
            return
        stop = threading.Event()

        def write_lines() -> None:
            while not stop.wait(PLAIN_PROGRESS_SECONDS):
                for task in progress.tasks:
                    if task.visible and not task.finished:
                        console.print(_plain_line(plain, task), highlight=False, soft_wrap=True)

        writer = threading.Thread(target=write_lines, name="pvu-progress", daemon=True)
        writer.start()
        try:
            yield progress
        finally:
            stop.set()
            writer.join()


def counted_bar(label: str, counted: str, **options: Any) -> ContextManager[Progress]:
    """:func:`progress_bar` of ``label``: a bar, done/total ``counted`` (a format of the task:
    ``"images, {task.fields[bad]} left out"``) and the time left; as a plain line, ``label:
    done/total counted``."""
    return progress_bar(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(counted),
        TimeRemainingColumn(),
        plain=f"{label}: {{task.completed:,.0f}}/{{task.total:,.0f}} {counted}",
        **options,
    )


def _plain_line(plain: str, task: Task) -> str:
    """``plain`` for ``task``, with the time spent and, where known, the time left."""
    line = f"{plain.format(task=task)}; {timedelta(seconds=round(task.elapsed or 0))} elapsed"
    left = task.time_remaining
    return line if left is None else f"{line}, about {timedelta(seconds=round(left))} left"


def _verbose_here_or_before(ctx: typer.Context, verbose: bool) -> bool:
    """``-v`` after the command (``pvu info -v c``) or before it (``pvu -v info c``)."""
    return verbose or bool(ctx.parent and ctx.parent.params.get("verbose"))


#: ``pvu``'s and each job's ``-v``: a job's is also on where ``pvu -v`` is.
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        callback=_verbose_here_or_before,
        help="Debug logging; tracebacks for errors.",
    ),
]


def command_line() -> str:
    """The command this process runs, as typed (a lock names its holder by it)."""
    return shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])


#: What a write reports when its destination cannot take it (a pipe closed, a disk full).
OUTPUT_ERRNOS = frozenset({errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def run_cli(command: Callable[[], object], name: str) -> None:
    """Run a command line (``pvu``, ``python -m jobs.<job>``) so that stdout that cannot be
    written ends in exit code 1, no traceback (``pvu info c > /dev/full``, ``| head -1``).

    A job reports its own storage errors (``reported``), so such an error that escapes
    ``command``, or its last flush, is stdout's. A closed pipe ends quietly, as the Python docs
    advise (https://docs.python.org/3/library/signal.html#note-on-sigpipe) and as typer and rich
    already end on one with exit code 1; any other says ``NAME: cannot write to standard
    output: <reason>`` on stderr. Either way stdout then goes to devnull, where the
    interpreter's own flush at exit cannot fail again.
    """
    try:
        try:
            command()
        finally:
            if sys.stdout is not None:  # None where stdout is closed (``pvu --version >&-``)
                sys.stdout.flush()  # what is buffered fails here, not in the interpreter's exit
    except OSError as error:
        if error.errno not in OUTPUT_ERRNOS or sys.stdout is None:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if error.errno != errno.EPIPE:
            with suppress(OSError):  # stderr full as well: the exit code says it
                print(f"{name}: cannot write to standard output: {error.strerror}", file=sys.stderr)
        sys.exit(1)
