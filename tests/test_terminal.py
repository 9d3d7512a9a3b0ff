"""What the jobs write where stderr is no terminal: ``ray job logs``, ``kubectl logs``, a file."""

from __future__ import annotations

import io
import time

from rich.console import Console
from rich.progress import BarColumn, TextColumn

from jobs import terminal


def test_progress_reaches_a_log_that_is_no_terminal(monkeypatch) -> None:
    """A rich bar draws only when it ends where stderr is a pipe: a cache run submitted with
    `ray job submit` logged nothing between its actors' start and its end, hours later."""
    log = io.StringIO()
    monkeypatch.setattr(terminal, "console", Console(file=log, width=200))
    monkeypatch.setattr(terminal, "PLAIN_PROGRESS_SECONDS", 0.05)
    plain = "cache: {task.completed:,.0f}/{task.total:,.0f} units, {task.fields[rate]}"
    with terminal.progress_bar(TextColumn("cache"), BarColumn(), plain=plain) as progress:
        task = progress.add_task("units", total=4, rate="96 images, 3.2/s")
        progress.advance(task)
        time.sleep(0.3)
        lines = [line for line in log.getvalue().splitlines() if line.startswith("cache: 1/4")]
        assert lines and lines[0].startswith("cache: 1/4 units, 96 images, 3.2/s; 0:00:00 elapsed")
        progress.advance(task, 3)
        time.sleep(0.2)
    finished = log.getvalue().count("cache: 4/4")
    assert finished == 0  # a finished task is not repeated (the bar's own last render says it)
