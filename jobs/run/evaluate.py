"""``pvu evaluate``: R-AUROC, Recall@1, baselines, the paper's analyses and applications.

Reads eval caches (``pvu cache --augment eval``), scores every row with each exported head and
the training-free baselines, and writes ``<report>/report.json`` (schemas/report.schema.json),
``<report>/report.md`` and figures. Never touches an image.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Literal

import fsspec
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from jobs import project_version
from jobs.config import PathOrUrl, check_path, comma_separated_ints, first_repeated
from jobs.preflight import (
    INSIDE_A_CACHE,
    check_not_in_a_cache,
    check_not_inside,
    check_output_folder,
    check_storage,
)
from jobs.terminal import command_line, console, progress_bar, resolve_device
from pipeline.cache.lock import RunLock
from pipeline.evaluate.report import write_report
from pipeline.evaluate.runner import UPSTREAM, EvaluateOptions, Evaluation, evaluate
from pipeline.head.export import unfinished_run
from pipeline.retry import exists

log = logging.getLogger("pvu.evaluate")

MAX_SEED = 2**32 - 1
"""The largest --seed: scikit-learn's t-SNE takes no larger ``random_state``."""


class EvaluateJobConfig(BaseModel):
    """The evaluate job's configuration, validated before anything runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: list[str] = Field(min_length=1)  # NAME=URL, each URL a PathOrUrl
    head: list[PathOrUrl] = Field(default_factory=list)
    upstream: PathOrUrl | None = None
    report: PathOrUrl = "report"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    deterioration: list[PathOrUrl] = Field(default_factory=list)
    ambiguity: Literal["auto", "column", "real", "none"] = "auto"
    ambiguity_threshold: float = Field(default=0.0, allow_inf_nan=False)
    reject_fraction: float = Field(default=0.1, gt=0, lt=1)
    tsne_dataset: str | None = None
    tsne_classes: tuple[int, ...] | None = None
    tsne_points: int = Field(default=1500, ge=10)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    threads: int | None = Field(default=None, ge=1)
    block_mb: int = Field(default=256, ge=1)

    @field_validator("dataset")
    @classmethod
    def _named_urls(cls, value: list[str]) -> list[str]:
        names = []
        for item in value:
            name, sep, url = item.partition("=")
            if not sep or not name:
                raise ValueError(f"expected NAME=CACHE_URL, got {item!r}")
            try:
                check_path(url)
            except ValueError as error:
                raise ValueError(f"{item!r}: {error}") from None
            if name == UPSTREAM:
                raise ValueError(f"{item!r}: the name {UPSTREAM!r} is kept for --upstream")
            names.append(name)
        repeated = {n for n in names if names.count(n) > 1}
        if repeated:
            raise ValueError(f"dataset name(s) given twice: {', '.join(sorted(repeated))}")
        return value

    @field_validator("deterioration")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        caches = [_one_spelling(url) for url in value]
        repeated = sorted({value[i] for i, cache in enumerate(caches) if caches.count(cache) > 1})
        if repeated:
            raise ValueError(f"cache(s) given twice: {', '.join(repeated)}; give each once")
        return value

    @field_validator("head")
    @classmethod
    def _heads_exist_once(cls, value: list[str]) -> list[str]:
        for path in value:
            if not (Path(path) / "head.json").is_file() and "://" not in path:
                why = f"{path} is not an exported head (no head.json in it)"
                raise ValueError(unfinished_run(path) or why)
        heads = [_one_spelling(path) for path in value]
        twice = first_repeated(heads)
        if twice is not None:  # scored and reported twice, as head:<folder>#1 and #2
            given = list(
                dict.fromkeys(p for p, head in zip(value, heads, strict=True) if head == twice)
            )
            spelled = f" (as {' and '.join(given)})" if len(given) > 1 else ""
            raise ValueError(f"head {given[0]} is given twice{spelled}: give each head once")
        return value

    @field_validator("tsne_classes", mode="before")
    @classmethod
    def _parse_classes(cls, value: Any) -> Any:
        return comma_separated_ints(value, "class labels like 0,1,2")

    @model_validator(mode="after")
    def _consistent(self) -> EvaluateJobConfig:
        resolve_device(self.device)
        names = [name for name, _ in self.named_datasets()]
        names += [UPSTREAM] if self.upstream else []
        if self.tsne_dataset is not None and self.tsne_dataset not in names:
            given = f"--tsne-dataset {self.tsne_dataset!r}"
            raise ValueError(f"{given} is none of the datasets ({', '.join(names)})")
        return self

    def named_datasets(self) -> tuple[tuple[str, str], ...]:
        """``(name, url)`` of every ``--dataset``."""
        return tuple((name, url) for name, _, url in (d.partition("=") for d in self.dataset))

    def resolved_device(self) -> str:
        """``cpu`` or ``cuda``, with ``auto`` resolved to CUDA when available."""
        return resolve_device(self.device)

    def to_options(self) -> EvaluateOptions:
        """The pipeline's :class:`EvaluateOptions` for this job."""
        return EvaluateOptions(
            heads=tuple(self.head),
            datasets=self.named_datasets(),
            upstream=self.upstream,
            deteriorated=tuple(self.deterioration),
            reject_fraction=self.reject_fraction,
            ambiguity=self.ambiguity,
            ambiguity_threshold=self.ambiguity_threshold,
            tsne_dataset=self.tsne_dataset,
            tsne_classes=self.tsne_classes,
            tsne_points=self.tsne_points,
            seed=self.seed,
            device=self.resolved_device(),
            block_bytes=self.block_mb * 2**20,
        )


def _one_spelling(url: str) -> str:
    """``url`` as one spelling of what it names: a local path resolved (``h/``, ``./h`` and a
    link to ``h`` are ``h``), a URL without its trailing slash."""
    return url.rstrip("/") if "://" in url else os.path.realpath(url)


def run_evaluate(config: EvaluateJobConfig) -> Evaluation:
    """Run the job for a validated ``config`` under progress bars; print the summary."""
    inputs = [(f"--dataset {name}=", url) for name, url in config.named_datasets()]
    inputs += [("--deterioration", url) for url in config.deterioration]
    inputs += [("--upstream", config.upstream)] if config.upstream else []
    for flag, url in inputs:  # before hours of work on the datasets ahead of a typo
        check_storage(url, flag=flag, must_exist=True)
    check_output_folder(config.report, flag="--report")
    for flag, url in inputs:
        check_not_inside(config.report, url, flag="--report", folder_flag=flag, why=INSIDE_A_CACHE)
    check_not_in_a_cache(config.report, flag="--report", itself=True)  # nor another cache
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    fs, folder = fsspec.core.url_to_fs(config.report)
    created = not exists(fs, folder)  # the lock creates it: a run that fails removes it again
    try:
        # one run per report folder, as pvu cache and train-head hold theirs: two interleaved
        with RunLock(config.report, owner=command_line()):
            evaluation = _evaluate(config)
            path = write_report(evaluation, config.report, pvu_version=project_version())
    except BaseException:
        if created:
            _remove_if_empty(fs, folder)
        raise
    console.print(summary(evaluation.report))
    console.print(f"report: {path} (and report.json, figures) in {config.report}", soft_wrap=True)
    return evaluation


def _remove_if_empty(fs: fsspec.AbstractFileSystem, folder: str) -> None:
    """Remove ``folder`` if it holds nothing (an object store holds no empty folder); left as
    it is where that fails, the run's own error standing."""
    with contextlib.suppress(OSError):
        if not fs.ls(folder, detail=False):
            fs.rmdir(folder)


def _evaluate(config: EvaluateJobConfig) -> Evaluation:
    """The evaluation of ``config``, under progress bars."""
    with progress_bar(
        TextColumn("[bold]evaluate[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        plain="evaluate {task.description}: {task.completed:,.0f}/{task.total:,.0f}",
    ) as progress:

        def track(description: str, total: int) -> Any:
            task = progress.add_task(description, total=total)
            return lambda n: progress.advance(task, n)

        return evaluate(config.to_options(), track=track)


def summary(report: dict[str, Any]) -> Table:
    """R-AUROC per dataset and source, Recall@1 and the first source's safe-retrieval gain."""
    sources = [s["name"] for s in report["sources"]]
    rejected = report["settings"]["reject_fraction"]
    table = Table(
        title="pvu evaluate: R-AUROC (Recall@1; 1-NN error of all queries -> with the "
        f"{rejected:g} most uncertain rejected, class-agnostic)"
    )
    table.add_column("dataset", no_wrap=True)
    table.add_column("Recall@1", no_wrap=True)
    for column in [*sources, f"1-NN error ({sources[0]})"]:
        table.add_column(column, overflow="fold")  # head:<folder> names whole at 80 columns
    for d in report["datasets"]:
        errors = d["sources"][sources[0]]["safe_retrieval"]["class_agnostic"]
        table.add_row(
            d["name"],
            _fmt(d["recall_at_1"]),
            *(_fmt(d["sources"][s]["r_auroc"]) for s in sources),
            f"{_fmt(errors['full'])} -> {_fmt(errors['clean_database'])}",
        )
    return table


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
