"""The ``pvu`` command: one sub-command per job."""

from __future__ import annotations

import typer

from jobs.cache import cache
from jobs.evaluate import evaluate_command
from jobs.info import info
from jobs.label_remap import label_remap
from jobs.plan import plan
from jobs.shards import shards
from jobs.train_head import train_head

app = typer.Typer(
    help="pvu: pretrained visual uncertainties, cached at scale.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Cache a frozen backbone's embeddings and losses, train an uncertainty head, evaluate it."""


app.command("cache")(cache)
app.command("train-head")(train_head)
app.command("shards")(shards)
app.command("label-remap")(label_remap)
app.command("evaluate")(evaluate_command)
app.command("info")(info)
app.command("plan")(plan)
