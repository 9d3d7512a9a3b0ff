"""The ``pvu`` command: one sub-command per job (``python -m jobs.cli`` is the same command)."""

from __future__ import annotations

from typing import Annotated

import typer

from jobs.cache import cache, project_version
from jobs.demo import demo
from jobs.evaluate import evaluate_command
from jobs.info import info
from jobs.label_remap import label_remap
from jobs.plan import plan
from jobs.shards import shards
from jobs.train_head import train_head

app = typer.Typer(
    name="pvu",
    help="pvu: pretrained visual uncertainties, cached at scale.",
    no_args_is_help=True,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"pvu {project_version()}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print pvu's version."
        ),
    ] = False,
) -> None:
    """Cache a frozen backbone's embeddings and losses, train an uncertainty head, evaluate it."""


app.command("cache")(cache)
app.command("train-head")(train_head)
app.command("shards")(shards)
app.command("label-remap")(label_remap)
app.command("evaluate")(evaluate_command)
app.command("info")(info)
app.command("plan")(plan)
app.command("demo")(demo)

if __name__ == "__main__":
    app(prog_name="pvu")
