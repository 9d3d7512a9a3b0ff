"""``pvu train-head``: fit the uncertainty head on a streamed cache, on CPU or one GPU.

Never touches an image: reads (embedding, loss) rows of one or more caches, trains with the
paper's ranking loss and schedule (appendix A), checkpoints at every episode end, and exports
``<output>/head.safetensors`` + ``<output>/head.json`` (attach with
``pipeline.head.export.attach_head``). Re-run with ``--resume`` to continue an interrupted run.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from rich.progress import (
    BarColumn,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from jobs.config import PathOrUrl, comma_separated_ints
from jobs.preflight import (
    INSIDE_A_CACHE,
    check_not_in_a_cache,
    check_not_inside,
    check_output_folder,
    check_storage,
)
from jobs.terminal import (
    command_line,
    console,
    progress_bar,
    resolve_device,
)
from pipeline.head.stream import StreamConfig
from pipeline.head.train import (
    RunOptions,
    ScheduleConfig,
    TrainConfig,
    TrainResult,
    fit_head,
    keep_freed_memory,
)

log = logging.getLogger("pvu.train_head")


class TrainHeadConfig(BaseModel):
    """The train-head job's configuration, validated before anything runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache: list[PathOrUrl] = Field(min_length=1)
    output: PathOrUrl
    loss: Literal["ranking", "l2"] = "ranking"
    episodes: int = Field(default=460, ge=1)
    episode_size: int = Field(default=200_000, ge=1)
    batch_size: int = Field(default=2048, ge=2)
    lr: float = Field(default=2.8e-3, gt=0)
    warmup_lr: float = Field(default=1e-4, ge=0)
    min_lr: float = Field(default=1e-8, ge=0)
    warmup_episodes: int = Field(default=25, ge=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    betas: tuple[float, float] = (0.8, 0.95)
    hidden: tuple[int, ...] = (512, 512)
    margin: float = Field(default=0.1, ge=0)
    leeway: float = Field(default=0.0, ge=0)
    seed: int = Field(default=0, ge=0)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    threads: int | None = Field(default=None, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    resume: bool = False
    stop_after: int | None = Field(default=None, ge=1)
    val_fraction: float = Field(default=0.01, ge=0, lt=1)
    val_rows: int = Field(default=20_000, ge=0)
    shuffle_rows: int = Field(default=3_145_728, ge=1)
    prefetch: int = Field(default=4, ge=1)
    io_threads: int = Field(default=8, ge=1)

    @field_validator("hidden", mode="before")
    @classmethod
    def _parse_hidden(cls, value: Any) -> Any:
        return comma_separated_ints(value, "widths like 512,512")

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError(f"each beta must be in [0, 1), got {value}")
        return value

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(width < 1 for width in value):
            raise ValueError(f"widths must be >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainHeadConfig:
        if self.warmup_episodes >= self.episodes:
            raise ValueError(
                f"--warmup-episodes ({self.warmup_episodes}) must be less than --episodes "
                f"({self.episodes}); for a short run give fewer, or --warmup-episodes 0"
            )
        for flag, rate in (("--min-lr", self.min_lr), ("--warmup-lr", self.warmup_lr)):
            if rate > self.lr:
                raise ValueError(
                    f"{flag} ({rate:g}) must be at most --lr ({self.lr:g}): the schedule "
                    "warms up from --warmup-lr to --lr, then decays to --min-lr"
                )
        if self.batch_size > self.episode_size:
            raise ValueError(
                f"--batch-size ({self.batch_size}) must be at most --episode-size "
                f"({self.episode_size}): an episode is one batch of that size at most"
            )
        odd = [f"{flag} ({n})" for flag, n in (("--batch-size", self.batch_size),
               ("--episode-size", self.episode_size)) if n % 2]  # fmt: skip
        if self.loss == "ranking" and odd:
            raise ValueError(
                f"{' and '.join(odd)} must be even for --loss ranking, which pairs a batch's "
                "rows two by two: a row left over in each batch (or the episode's last) would "
                "go unused, and a last batch of one row steps the optimizer on no pair"
            )
        resolve_device(self.device)
        return self

    def resolved_device(self) -> str:
        """``cpu`` or ``cuda``, with ``auto`` resolved to CUDA when available."""
        return resolve_device(self.device)

    def to_train_config(self) -> TrainConfig:
        """The pipeline's :class:`TrainConfig` for this job."""
        return TrainConfig(
            hidden=self.hidden,
            loss=self.loss,
            margin=self.margin,
            leeway=self.leeway,
            schedule=ScheduleConfig(
                episodes=self.episodes,
                episode_size=self.episode_size,
                batch_size=self.batch_size,
                lr=self.lr,
                warmup_lr=self.warmup_lr,
                min_lr=self.min_lr,
                warmup_episodes=self.warmup_episodes,
                betas=self.betas,
                weight_decay=self.weight_decay,
            ),
            stream=StreamConfig(
                seed=self.seed,
                shuffle_rows=self.shuffle_rows,
                prefetch_windows=self.prefetch,
                val_fraction=self.val_fraction,
                io_threads=self.io_threads,
            ),
            val_rows=self.val_rows,
            precision=self.precision,
        )


class RateColumn(ProgressColumn):
    """Samples per second of a rich task."""

    def render(self, task: Task) -> Text:
        """The task's speed as ``12,345 samples/s``."""
        return Text(f"{task.speed or 0:,.0f} samples/s", style="progress.data.speed")


def run_train_head(config: TrainHeadConfig) -> TrainResult:
    """Run the job for a validated ``config``, with a progress bar and per-episode lines."""
    for url in config.cache:
        check_storage(url, flag="--cache", must_exist=True)
    check_output_folder(config.output, flag="--output")
    for url in config.cache:
        check_not_inside(
            config.output, url, flag="--output", folder_flag="--cache", why=INSIDE_A_CACHE
        )
    check_not_in_a_cache(config.output, flag="--output", itself=True)  # nor another cache
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    keep_freed_memory()
    train_config = config.to_train_config()
    schedule = train_config.schedule
    columns = [
        TextColumn("[bold]train-head"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    plain = "train-head: {task.completed:,.0f}/{task.total:,.0f} samples"
    with progress_bar(*columns, plain=plain, transient=False) as progress:
        # shown from where the run starts (a resumed one's episodes done), once fit_head knows
        # it: a resumed bar counted from 0, and its jump back up read as a burst of samples/s
        task = progress.add_task(
            "train", total=schedule.episodes * schedule.episode_size, visible=False
        )

        def on_episode(record: dict[str, Any]) -> None:
            progress.update(task, completed=record["samples"])
            console.print(_episode_line(record), soft_wrap=True)

        options = RunOptions(
            device=config.resolved_device(),
            owner=command_line(),
            resume=config.resume,
            stop_after=config.stop_after,
            on_start=lambda done: progress.reset(task, completed=done, visible=True),
            on_batch=lambda n: progress.advance(task, n),
            on_episode=on_episode,
        )
        result = fit_head(config.cache, config.output, train_config, options)
    first = result.metrics[0] if result.metrics else {}
    last = result.metrics[-1] if result.metrics else {}
    if result.finished:
        console.print(
            f"head exported to {config.output} (head.safetensors, head.json)", soft_wrap=True
        )
    else:
        console.print(
            f"stopped after episode {result.episodes}; continue with --resume", soft_wrap=True
        )
    if first.get("episode") == 0 and last is not first:
        console.print(
            f"validation pair accuracy / spearman: untrained {_fmt(first['val_pair_accuracy'])}"
            f" / {_fmt(first['val_spearman'])} -> trained {_fmt(last['val_pair_accuracy'])}"
            f" / {_fmt(last['val_spearman'])}",
            soft_wrap=True,
        )
    return result


def _episode_line(record: dict[str, Any]) -> str:
    return (
        f"episode {record['episode']}: loss {record['train_loss']:.5f} lr {record['lr']:.2e} "
        f"val pair-acc {_fmt(record['val_pair_accuracy'])} "
        f"spearman {_fmt(record['val_spearman'])} passes {record['passes']:.2f} "
        f"({record['samples_per_s']:,.0f} samples/s)"
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"
