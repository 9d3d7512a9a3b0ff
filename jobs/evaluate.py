"""``pvu evaluate``'s command line: its flags and their help.

The job itself, its config and run, is :mod:`jobs.run.evaluate`, imported only when the
command runs: torch, timm and Ray take seconds to import, ``--help`` none.
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from jobs import names_of
from jobs.config import ConfigFile, job_config
from jobs.terminal import Verbose, reported, run_cli, setup_logging


def evaluate_command(
    ctx: typer.Context,
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME=URL",
            help="Required. NAME=CACHE_URL of an eval cache (pvu cache --augment eval); "
            "repeatable.",
        ),
    ] = None,
    head: Annotated[
        list[str] | None,
        typer.Option(
            metavar="DIR", help="Exported head folder (pvu train-head --output); repeatable."
        ),
    ] = None,
    upstream: Annotated[
        str | None,
        typer.Option(
            metavar="URL", help="Eval cache of held-out pretraining data (ID vs OOD, figure 8)."
        ),
    ] = None,
    report: Annotated[
        str,
        typer.Option(
            metavar="DIR",
            help="Folder (a local path or any fsspec URL) for report.json, report.md, figures.",
        ),
    ] = ("report"),
    device: Annotated[
        Literal["cpu", "cuda", "auto"], typer.Option(help="Device of 1-NN search and heads.")
    ] = "cpu",
    deterioration: Annotated[
        list[str] | None,
        typer.Option(
            metavar="URL",
            help="Eval cache of a deteriorated copy of one dataset (figure 6); repeatable. "
            "A clean copy is strength 0 of every kind; each cache once.",
        ),
    ] = None,
    ambiguity: Annotated[
        Literal["auto", "column", "real", "none"],
        typer.Option(
            help="Ambiguity flags (figure 7): column (the cache's ambiguity column), real "
            "(ImageNet ReaL labels by validation file name), auto (column where a cache has "
            "one, else real) or none."
        ),
    ] = "auto",
    ambiguity_threshold: Annotated[
        float, typer.Option(help="Rows whose ambiguity exceeds this count as ambiguous.")
    ] = 0.0,
    reject_fraction: Annotated[
        float, typer.Option(help="Safe retrieval: share q of most uncertain images rejected.")
    ] = 0.1,
    tsne_dataset: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Dataset of the t-SNE map (default: the first)."),
    ] = None,
    tsne_classes: Annotated[
        str | None,
        typer.Option(
            metavar="LABELS", help="Labels on the t-SNE map, e.g. 0,1,2 (default: 6 most frequent)."
        ),
    ] = None,
    tsne_points: Annotated[int, typer.Option(help="Most points on the t-SNE map.")] = 1500,
    seed: Annotated[int, typer.Option(help="Seed of the random baseline and t-SNE.")] = 0,
    threads: Annotated[
        int | None, typer.Option(help="Torch CPU threads (default: all cores).")
    ] = None,
    block_mb: Annotated[
        int,
        typer.Option(
            help="Memory of one block of similarities (the 1-NN and safe retrieval's searches), "
            "MiB."
        ),
    ] = 256,
    config: ConfigFile = None,
    verbose: Verbose = False,
) -> None:
    """Evaluate uncertainty heads and baselines on eval caches; write a report with figures."""
    setup_logging(verbose)
    with reported("evaluate", verbose=verbose):  # a Ctrl-C while torch imports says so too
        from jobs.run.evaluate import EvaluateJobConfig, run_evaluate

        run_evaluate(job_config(EvaluateJobConfig, ctx))


__getattr__ = names_of("jobs.run.evaluate")


def main() -> None:
    """``python -m jobs.evaluate``."""
    run_cli(lambda: typer.run(evaluate_command), "evaluate")


if __name__ == "__main__":
    main()
