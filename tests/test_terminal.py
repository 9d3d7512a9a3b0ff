"""What the jobs write where stderr is no terminal: ``ray job logs``, ``kubectl logs``, a file."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import typer
from rich.console import Console
from rich.progress import BarColumn, TextColumn
from typer.testing import CliRunner

from jobs import terminal
from jobs.cli import app


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


def _said(monkeypatch) -> io.StringIO:
    log = io.StringIO()
    monkeypatch.setattr(terminal, "console", Console(file=log, width=200))
    return log


def test_a_second_ctrl_c_does_not_cut_the_unwinding_short(monkeypatch) -> None:
    """A second Ctrl-C (or one during the exit) broke off what the first one's unwinding
    saves, printed a traceback and left a local Ray's agents running."""
    said, unwound = _said(monkeypatch), False
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(typer.Exit) as ended, terminal.reported("cache", verbose=False):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        finally:  # the manifest's last write, the lock's release
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            unwound = True
    assert ended.value.exit_code == 130 and unwound
    assert "cache: interrupted" in said.getvalue()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_sigterm_while_ray_starts_ends_the_job_as_its_own_handler_does(monkeypatch) -> None:
    """ray.init first installs a SIGTERM handler that exits with code 15: a SIGTERM then
    ended `pvu cache` with that code and no word, its Ray half started."""

    def ray_init() -> None:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # as Ray's
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    said = _said(monkeypatch)
    before = signal.getsignal(signal.SIGTERM)
    stop = pytest.raises(typer.Exit)
    with stop as ended, terminal.reported("cache", verbose=False), terminal.sigterm_in_ray_init():
        ray_init()
    assert ended.value.exit_code == 143 and "cache: terminated" in said.getvalue()
    assert signal.getsignal(signal.SIGTERM) is before


def test_starting_ray_leaves_the_signal_handlers_as_they_were() -> None:
    """Outside a job's `reported` (a notebook, a test calling run_cache), starting Ray left
    pvu's handlers on Ctrl-C: after one Ctrl-C, Ctrl-C and SIGTERM were ignored for good."""
    before = [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)]
    with terminal.sigterm_in_ray_init():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # as Ray's
    assert [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)] == before


def test_a_second_signal_after_one_in_ray_init_is_ignored_too(monkeypatch) -> None:
    """Starting Ray put pvu's handler back after a Ctrl-C inside it: a second one then broke
    off the unwinding again."""
    _said(monkeypatch)
    unwound = False
    with pytest.raises(typer.Exit) as ended, terminal.reported("cache", verbose=False):
        try:
            with terminal.sigterm_in_ray_init():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        finally:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            unwound = True
    assert ended.value.exit_code == 130 and unwound


def test_log_records_are_one_line_each_where_stderr_is_no_terminal() -> None:
    """Rich wrapped each record into a padded 80-column box in `ray job logs`: a skipped
    sample's URL was cut over lines that `grep` could not find."""
    message = "skipped sample " + "/".join(["s3://bucket/prefix"] + ["segment"] * 12)
    script = (
        "import logging; from jobs.terminal import setup_logging; setup_logging(verbose=False); "
        f"logging.getLogger('pipeline.cache.unit').warning({message!r}); "
        "logging.getLogger('botocore.credentials').info('Found credentials')"  # every S3 run
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    lines = run.stderr.splitlines()
    assert run.returncode == 0 and len(lines) == 1, run.stderr
    assert lines[0].endswith(f" WARNING {message}")


def test_a_summary_value_is_written_whole_at_80_columns() -> None:
    """The cache summary cut its output URL with '...' where stderr is a log file (80
    columns): the demo's 17 deterioration caches could not be told apart in its log."""
    url = "s3://bucket/" + "/".join(["deterioration-blur-0.25"] * 6) + "/cache"
    log = io.StringIO()
    table = terminal.summary_table("pvu cache: summary")
    table.add_row("output", url)
    Console(file=log, width=80).print(table)
    cells = [line.split("│") for line in log.getvalue().splitlines() if line.count("│") == 3]
    assert "".join(cell[2].strip() for cell in cells) == url


class _Interrupted(types.ModuleType):
    """A job's heavy module whose import a Ctrl-C cuts short."""

    def __getattr__(self, name: str) -> object:
        raise KeyboardInterrupt


@pytest.mark.parametrize("job", ["cache", "train-head", "evaluate", "plan", "demo", "label-remap"])
def test_a_ctrl_c_while_the_job_imports_torch_says_so(monkeypatch, job: str) -> None:
    """Ctrl-C in a job's first seconds, while torch, timm and Ray import, exited 130 without
    a word."""
    module = f"jobs.run.{job.replace('-', '_')}"
    monkeypatch.setitem(sys.modules, module, _Interrupted(module))
    result = CliRunner().invoke(app, [job])
    assert result.exit_code == 130
    assert result.output.startswith(f"{job}: interrupted"), result.output


@pytest.mark.usefixtures("wide_console")
@pytest.mark.parametrize("folder", ["runs/[exp1]", "odd[/x]"])
def test_paths_with_square_brackets_are_printed_as_they_are(tmp_path, monkeypatch, folder) -> None:
    """rich took ``[exp1]`` in a path for markup (``runs//cache`` printed) and ended a job whose
    work was done with a MarkupError traceback, exit 1, on ``[/x]``."""
    from PIL import Image
    from support import pvu

    from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache

    monkeypatch.chdir(tmp_path)  # short paths: the summary keeps each on one line
    root = Path(folder)
    write_synthetic_cache(str(root / "cache"), SyntheticCache(dim=4, samples_per_shard=4, shards=1))
    result = pvu("info", str(root / "cache"))
    assert result.exit_code == 0, result.output
    assert f"pvu info: {root / 'cache'}" in result.stdout

    Path("images/cat").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (16, 16), (i * 100, 0, 0)).save(f"images/cat/{i}.png")
    result = pvu("shards", "--input", "images", "--output", str(root / "shards"))
    assert result.exit_code == 0, result.output
    assert f"{root / 'shards'} (1 shard, classes.json)" in result.output


def test_train_heads_episode_lines_are_one_line_each_at_80_columns(tmp_path, monkeypatch) -> None:
    """Each episode's line reaches a log (80 columns, no terminal) whole: it was cut before
    its speed, so ``grep episode`` lost the end of every record."""
    from support import pvu

    from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache

    monkeypatch.setattr(terminal.console, "width", 80)
    cache = str(tmp_path / "cache")
    write_synthetic_cache(cache, SyntheticCache(dim=4, samples_per_shard=32, shards=2))
    flags = ["--episodes", "2", "--episode-size", "32", "--batch-size", "16", "--hidden", "4"]
    flags += ["--warmup-episodes", "1", "--val-fraction", "0.2"]
    result = pvu("train-head", "--cache", cache, "--output", str(tmp_path / "head"), *flags)
    assert result.exit_code == 0, result.output
    episodes = [line for line in result.output.splitlines() if line.startswith("episode ")]
    assert len(episodes) == 2 and all(line.endswith(" samples/s)") for line in episodes)
