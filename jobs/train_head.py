"""``pvu train-head``'s command line: its flags and their help.

The job itself, its config and run, is :mod:`jobs.run.train_head`, imported only when the
command runs: torch, timm and Ray take seconds to import, ``--help`` none.
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from jobs import names_of
from jobs.config import ConfigFile, job_config
from jobs.terminal import Verbose, reported, run_cli, setup_logging


def train_head(
    ctx: typer.Context,
    cache: Annotated[
        list[str] | None,
        typer.Option(
            "--cache", metavar="URL", help="Required. Cache root (path or fsspec URL); repeatable."
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(metavar="DIR", help="Required. Run folder: checkpoint, metrics.jsonl, head."),
    ] = None,
    loss: Annotated[
        Literal["ranking", "l2"], typer.Option(help="Objective: ranking (eq. 3) or l2 (eq. 2).")
    ] = "ranking",
    episodes: Annotated[int, typer.Option(help="Episodes in the schedule.")] = 460,
    episode_size: Annotated[
        int, typer.Option(help="Samples per episode (even, for --loss ranking).")
    ] = 200_000,
    batch_size: Annotated[
        int, typer.Option(help="Samples per optimiser step (even, for --loss ranking).")
    ] = 2048,
    lr: Annotated[float, typer.Option(help="Peak learning rate after warm-up.")] = 2.8e-3,
    warmup_lr: Annotated[float, typer.Option(help="Learning rate of the first episode.")] = 1e-4,
    min_lr: Annotated[float, typer.Option(help="Floor of the cosine decay.")] = 1e-8,
    warmup_episodes: Annotated[int, typer.Option(help="Episodes of linear warm-up.")] = 25,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on biases).")] = 1e-4,
    betas: Annotated[
        tuple[float, float], typer.Option(metavar="B1 B2", help="AdamW's beta1 and beta2.")
    ] = (0.8, 0.95),
    hidden: Annotated[
        str, typer.Option(metavar="W,W,...", help="Hidden layer widths, comma-separated.")
    ] = "512,512",
    margin: Annotated[float, typer.Option(help="Ranking margin m.")] = 0.1,
    leeway: Annotated[float, typer.Option(help="Ranking leeway l (eq. 5).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of head initialisation and data order.")] = 0,
    device: Annotated[
        Literal["cpu", "cuda", "auto"], typer.Option(help="auto: CUDA when torch sees one.")
    ] = "cpu",
    threads: Annotated[
        int | None, typer.Option(help="Torch CPU threads (default: all cores).")
    ] = None,
    precision: Annotated[
        Literal["fp32", "bf16"],
        typer.Option(
            help="fp32, or bf16 autocast for the MLP (on a CPU, only with AVX-512 or AMX: "
            "others emulate bfloat16, many times slower)."
        ),
    ] = "fp32",
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue from the checkpoint in --output."),
    ] = False,
    stop_after: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Stop (resumably) once the schedule's first N episodes are done, counted from "
            "its start, also on --resume.",
        ),
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(help="Share of sample keys held out for validation.")
    ] = 0.01,
    val_rows: Annotated[
        int, typer.Option(help="Most held-out rows evaluated per episode.")
    ] = 20_000,
    shuffle_rows: Annotated[
        int,
        typer.Option(
            help="Rows held decoded for shuffling: whole row groups, interleaved so batches mix "
            "the cache whatever its shard order. Memory is about rows x D x 2 bytes (4.5 GiB "
            "at D=768); class-sorted ImageNet-21k shards need ~3M rows for batches with 0.8 "
            "of a uniform shuffle's classes, pre-shuffled shards far fewer. Refused at the "
            "start when it would not fit in the memory left (the container's limit included)."
        ),
    ] = 3_145_728,
    prefetch: Annotated[
        int, typer.Option(help="Shuffled windows (about a row group each) read ahead.")
    ] = 4,
    io_threads: Annotated[int, typer.Option(help="Parallel row-group reads.")] = 8,
    config: ConfigFile = None,
    verbose: Verbose = False,
) -> None:
    """Train the uncertainty head on cached embeddings and losses; export it for timm."""
    setup_logging(verbose)
    resume = (
        "the same command with --resume continues from the last episode's checkpoint (from "
        "the start where none was written yet)"
    )
    with reported("train-head", verbose=verbose, resume=resume):  # Ctrl-C while torch imports
        from jobs.run.train_head import TrainHeadConfig, run_train_head

        run_train_head(job_config(TrainHeadConfig, ctx))


__getattr__ = names_of("jobs.run.train_head")


def main() -> None:
    """``python -m jobs.train_head``."""
    run_cli(lambda: typer.run(train_head), "train-head")


if __name__ == "__main__":
    main()
