"""``pvu label-remap``'s command line: its flags and their help.

The job itself, its config and run, is :mod:`jobs.run.label_remap`, imported only when the
command runs: torch, timm and Ray take seconds to import, ``--help`` none.
"""

from __future__ import annotations

from typing import Annotated

import typer

from jobs import names_of
from jobs.config import ConfigFile, job_config
from jobs.terminal import Verbose, console, reported, run_cli, setup_logging


def label_remap(
    ctx: typer.Context,
    classes: Annotated[
        str | None,
        typer.Option(
            metavar="FILE",
            help="Required. The shards' label names: classes.json from pvu shards, or a text "
            "file with one synset per line (label 0 first).",
        ),
    ] = None,
    head: Annotated[
        str | None,
        typer.Option(
            metavar="LIST|MODEL|FILE",
            help="Required. The head's label space: a label list timm ships (imagenet-1k, "
            "imagenet-12k, imagenet-21k, imagenet-21k-goog, ...), a timm model whose class "
            "count names one "
            "(vit_base_patch16_224.augreg_in21k: imagenet-21k-goog, 21,843 classes), or a text "
            "file of synsets.",
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            metavar="FILE",
            help="Required. Remap file to write: .json (a list) or text, one index a line.",
        ),
    ] = None,
    config: ConfigFile = None,
    verbose: Verbose = False,
) -> None:
    """Map the shards' labels to a classifier head's classes, reporting those it lacks."""
    setup_logging(verbose)
    with reported("label-remap", verbose=verbose):  # a Ctrl-C while timm imports says so too
        from jobs.run.label_remap import LabelRemapJobConfig, run_label_remap, summarize

        job = job_config(LabelRemapJobConfig, ctx)
        remap = run_label_remap(job)
    console.print(summarize(remap, job))


__getattr__ = names_of("jobs.run.label_remap")


def main() -> None:
    """``python -m jobs.label_remap``."""
    run_cli(lambda: typer.run(label_remap), "label-remap")


if __name__ == "__main__":
    main()
