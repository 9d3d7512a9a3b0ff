"""Every command in README.md works as written.

The README's examples run on ``make demo``'s output; here on a small demo built in a temporary
folder, in README order: each ``pvu`` command really runs (local Ray, real files), and the
Python example runs as a script. Commands for ImageNet-21k, a cluster or the user's own data
(``YOUR-BUCKET``, ``YOUR-IMAGES``, the ``in21k`` configs, ``ray job submit``) cannot run here:
they go through the real command line and the job's validation, with the shipped config
files, and stop before any work.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray
import typer
from support import pvu

import jobs.cache
import jobs.label_remap
import jobs.plan
import jobs.shards
import jobs.train_head
from jobs.run.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
JOB_MODULES = (jobs.cache, jobs.label_remap, jobs.plan, jobs.shards, jobs.train_head)


def readme_commands() -> list[list[str]]:
    """Each shell command of the README's bash blocks as argv, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def pvu_argv(argv: list[str]) -> list[str]:
    """The ``pvu`` arguments of a README command (``ray job submit ... -- python -m jobs.X``)."""
    if argv[:3] == ["ray", "job", "submit"]:
        module = argv[argv.index("--") + 3]
        return [module.removeprefix("jobs.").replace("_", "-"), *argv[argv.index("--") + 4 :]]
    assert argv[0] == "pvu", argv
    return argv[1:]


@contextmanager
def validated_only(job: str, *, verbose: bool, resume: str = "") -> Iterator[None]:
    """In place of ``jobs.terminal.reported``: the job's config was valid, stop before work."""
    raise typer.Exit(code=0)
    yield


@pytest.fixture
def demo_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder like the one ``make demo`` runs in: ``demo-output/`` and the repo's configs."""
    small = {
        "copies": 1,
        "glyph_images": 2,
        "backbone_epochs": 2,
        "cache_epochs": 2,
        "head_episodes": 3,
    }
    sizes = {"kinds": ("blur",), "strengths": (1.0,), "clean_images": 20}
    run_demo(DemoConfig(output=tmp_path / "demo-output", **small, **sizes))
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "configs").symlink_to(ROOT / "jobs" / "configs")
    (tmp_path / "cluster").symlink_to(ROOT / "cluster")
    (tmp_path / "in21k-remap.json").write_text("[0, 1]")  # as pvu label-remap would write it
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_readme_command_works_as_written(demo_folder: Path, monkeypatch) -> None:
    commands = readme_commands()
    assert commands[:2] == [["make", "demo"], ["make", "test"]]
    try:
        for argv in commands[2:]:
            args = pvu_argv(argv)
            with monkeypatch.context() as patch:
                if argv[0] == "ray" or any("YOUR-" in a or "in21k" in a for a in argv):
                    for module in JOB_MODULES:
                        patch.setattr(module, "reported", validated_only)
                result = pvu(*args)
            assert result.exit_code == 0, f"{shlex.join(argv)}\n{result.output}"
    finally:
        ray.shutdown()
    assert (demo_folder / "demo-output" / "cache-resnet18" / "_manifest.json").is_file()
    for head in ("head-l2", "head-seed1"):
        assert (demo_folder / "demo-output" / head / "head.json").is_file()
    assert (demo_folder / "demo-output" / "report-heads" / "report.md").is_file()

    [attach] = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "attach_head" in b]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", attach], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "torch.Size([4])"
