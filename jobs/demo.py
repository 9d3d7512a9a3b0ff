"""``pvu demo``'s command line: its flags and their help.

The job itself, its config and run, is :mod:`jobs.run.demo`, imported only when the
command runs: torch, timm and Ray take seconds to import, ``--help`` none.
"""

from __future__ import annotations

from typing import Annotated

import typer

from jobs import names_of
from jobs.config import ConfigFile, job_config
from jobs.terminal import Verbose, reported, run_cli, setup_logging


def demo(
    ctx: typer.Context,
    output: Annotated[
        str,  # not a Path: typer makes "" the working folder, Path(".")
        typer.Option(
            metavar="DIR",
            help="Folder for shards, backbone, caches, head and report; a re-run replaces "
            "them (a folder holding any that no demo wrote is refused).",
        ),
    ] = "demo-output",
    seed: Annotated[int, typer.Option(help="Seed of the data, backbone, caches and head.")] = 0,
    config: ConfigFile = None,
    verbose: Verbose = False,
) -> None:
    """Run the paper in miniature on scikit-learn's digits (re-running starts afresh)."""
    setup_logging(verbose)
    with reported("demo", verbose=verbose):  # a Ctrl-C while torch imports says so too
        from jobs.run.demo import DemoConfig, run_demo

        run_demo(job_config(DemoConfig, ctx))


__getattr__ = names_of("jobs.run.demo")


def main() -> None:
    """``python -m jobs.demo`` (what ``make demo`` runs)."""
    run_cli(lambda: typer.run(demo), "demo")


if __name__ == "__main__":
    main()
