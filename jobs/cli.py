"""The ``pvu`` command: one sub-command per job (``python -m jobs.cli`` is the same command).

A job's module (torch, timm, Ray, ...) is imported only when that job runs or shows its own
``--help``: ``pvu --help``, ``pvu --version`` and a mistyped command answer at once.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path
from typing import Annotated, Any

import typer

from jobs import project_version
from jobs.terminal import Verbose, run_cli

JOBS = {
    "cache": "jobs.cache:cache",
    "train-head": "jobs.train_head:train_head",
    "shards": "jobs.shards:shards",
    "label-remap": "jobs.label_remap:label_remap",
    "evaluate": "jobs.evaluate:evaluate_command",
    "info": "jobs.info:info",
    "plan": "jobs.plan:plan",
    "demo": "jobs.demo:demo",
}
"""Each sub-command's function, as ``module:function``."""


def _docstring(target: str) -> str:
    """A job function's docstring, read from its module's source without importing it."""
    module, function = target.split(":")
    source = Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")
    node = next(
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.FunctionDef) and node.name == function
    )
    return ast.get_docstring(node) or ""


class LazyJobs(typer.core.TyperGroup):
    """Lists the jobs by their docstrings; builds a job's command when it is invoked."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        for name, target in JOBS.items():
            self.add_command(typer.core.TyperCommand(name, help=_docstring(target)))

    def job(self, name: str) -> typer.core.TyperCommand:
        """The job's full command, its module imported."""
        module, function = JOBS[name].split(":")
        single = typer.Typer(add_completion=False)
        single.command(name)(getattr(importlib.import_module(module), function))
        return typer.main.get_command(single)

    def resolve_command(
        self, ctx: typer.Context, args: list[str]
    ) -> tuple[str | None, typer.core.TyperCommand | None, list[str]]:
        name, listed, rest = super().resolve_command(ctx, args)
        return name, self.job(name) if name in JOBS else listed, rest


app = typer.Typer(
    name="pvu",
    cls=LazyJobs,
    help="pvu: pretrained visual uncertainties, cached at scale.",
    no_args_is_help=True,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"pvu {project_version()}")
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print pvu's version."
        ),
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Cache a frozen backbone's embeddings and losses, train an uncertainty head, evaluate it.

    ``verbose`` is read by the job's own ``-v`` (``pvu -v info c`` is ``pvu info -v c``).
    """


def main() -> None:
    """``pvu`` itself: the app, where stdout that cannot be written ends in one line
    (``run_cli``)."""
    run_cli(lambda: app(prog_name="pvu"), "pvu")


if __name__ == "__main__":
    main()
