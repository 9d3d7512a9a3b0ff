"""``make demo``: the paper in miniature, on bundled digits, local Ray and the local disk.

1. Write shards split as the paper's setting is (``pipeline.demo.sets``): pretraining classes,
   digits 0-5 and 100 rendered glyph classes (train shards; held-out digits 0-5 are the
   upstream set), and zero-shot digits 6-9; a seeded share of the images degraded at random
   strength, kind and strength stored per sample.
2. Train a tiny timm backbone on the train shards only, under the train cache's augmentation.
3. ``pvu cache`` augmented epochs of the train shards; ``pvu train-head`` on them.
4. ``pvu cache --augment eval`` the upstream set (classifier label space) and the zero-shot
   set (the dataset's own label space), both with their per-sample ambiguity, and clean
   zero-shot digits deteriorated by each kind at each strength (figure 6), all of those in
   one cache pass.
5. ``pvu evaluate`` all of it, then print R-AUROC and Recall@1 per set for the head and each
   baseline, the safe-retrieval error reduction and where the report is.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from jobs.config import CONFIGS, LocalPath, load_job_config, read_config_file
from jobs.preflight import check_output_folder
from jobs.run.cache import run_cache
from jobs.run.cache_config import CacheJobConfig
from jobs.run.evaluate import MAX_SEED, EvaluateJobConfig, run_evaluate
from jobs.run.train_head import TrainHeadConfig, run_train_head
from jobs.terminal import console, progress_bar
from pipeline.cache.augment import TransformConfig
from pipeline.cache.decode import decode_image
from pipeline.cache.deteriorate import KINDS
from pipeline.cache.samples import iter_samples
from pipeline.demo.backbone import save_backbone, train_tiny_backbone
from pipeline.demo.sets import AMBIGUITY_KEY, DemoSets, SetsConfig, write_demo_sets
from pipeline.evaluate.evalset import load_eval_set
from pipeline.evaluate.knn import nearest_neighbours, normalize
from pipeline.evaluate.metrics import neighbour_correct

log = logging.getLogger("pvu.demo")

DEMO_CACHE = CONFIGS / "demo" / "cache.yaml"
DEMO_HEAD = CONFIGS / "demo" / "train-head.yaml"
_CACHE_SETTINGS = read_config_file(str(DEMO_CACHE), CacheJobConfig)
BACKBONE: str = _CACHE_SETTINGS["backbone"]
INPUT_SIZE: int = _CACHE_SETTINGS["input_size"]
DEMO_PARTS = ("shards", "backbone", "cache", "head", "report")
#: The file that marks a folder as the demo's: only there are its parts replaced.
DEMO_MARK = ".pvu-demo"
ZERO_SHOT = "zero-shot"
CLASSIFIER_BASELINES = ("entropy", "1-max_prob")


class DemoConfig(BaseModel):
    """Sizes of the demo (the defaults are what ``make demo`` runs); the train cache and head
    settings are jobs/configs/demo/*.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: LocalPath = Path("demo-output")
    seed: int = Field(default=0, ge=0, le=MAX_SEED)  # it seeds the evaluation too
    copies: int = Field(default=2, ge=1, description="times each train digit is drawn")
    glyph_classes: int = Field(default=100, ge=0, description="pretraining glyph classes")
    glyph_images: int = Field(default=40, ge=1, description="train images per glyph class")
    degraded: float = Field(default=0.5, ge=0, le=1)
    backbone_epochs: int = Field(default=30, ge=1)
    cache_epochs: int = Field(default=4, ge=1)
    head_episodes: int = Field(default=30, ge=2)
    kinds: tuple[str, ...] = KINDS
    strengths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    clean_images: int = Field(default=240, ge=10)


@dataclass
class DemoResult:
    """What the demo produced: the report document, where it is, the backbone's quality."""

    report: dict[str, Any]
    report_dir: Path
    heldout_recall_at_1: float

    def claim_holds(self) -> bool:
        """The paper's claim in miniature: on classes the backbone never saw, the head ranks
        retrieval failures better than chance and than the classifier's own uncertainty."""
        sources = self.dataset(ZERO_SHOT)["sources"]
        head = sources["head"]["r_auroc"]  # None where every or no 1-NN is right
        return (
            head is not None
            and head > 0.5
            and all(head > (sources[b]["r_auroc"] or 0) for b in CLASSIFIER_BASELINES)
        )

    def dataset(self, name: str) -> dict[str, Any]:
        """The report entry of dataset ``name``."""
        return next(d for d in self.report["datasets"] if d["name"] == name)


@functools.cache
def _train_transform() -> TransformConfig:
    """The augmentation the backbone is pretrained under: its train cache's.

    A pretraining recipe and its cached epochs share one, so the cached losses measure what the
    backbone finds hard, not what augmentation it never saw. (The weights file does not exist
    yet; "random" stands in, as the transform does not depend on it.) Built on first use, not
    at import.
    """
    return CacheJobConfig(**_CACHE_SETTINGS | {"weights": "random"}).transform_config()


def load_shard_images(urls: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images (N, H, W, 3) and labels of every sample in ``urls``."""
    images, labels = [], []
    for url in urls:
        for sample in iter_samples(url, counts=Counter()):
            images.append(np.asarray(decode_image(sample.image, key=sample.key)))
            labels.append(sample.label)
    return np.stack(images), np.array(labels)


def clean_recall_at_1(cache: str) -> float:
    """Leave-one-out 1-NN Recall@1 among the undegraded rows (ambiguity 0) of an eval cache."""
    data = load_eval_set("clean", cache)
    clean = np.flatnonzero(data.ambiguity == 0)
    neighbours = nearest_neighbours(normalize(data.embedding[clean]))
    return float(neighbour_correct(data.labels[clean], neighbours.index).mean())


def clear_earlier_demo(output: Path) -> None:
    """Remove what an earlier demo wrote into ``output`` (its ``DEMO_MARK`` says so) and mark
    the folder as the demo's; refuse a folder whose parts of those names the demo did not
    write: they may be a user's own caches or reports."""
    present = [output / part for part in DEMO_PARTS if os.path.lexists(output / part)]
    if present and not (output / DEMO_MARK).is_file():
        raise ValueError(
            f"--output {output} holds {', '.join(path.name for path in present)}, which no "
            "earlier demo marked as its own (the demo replaces those folders); give an empty "
            "or new folder, or delete them if an older pvu's demo wrote them"
        )
    for path in present:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    output.mkdir(parents=True, exist_ok=True)
    (output / DEMO_MARK).write_text("written by pvu demo, which replaces its folders here\n")


def run_demo(config: DemoConfig) -> DemoResult:
    """Every step of the demo under ``config.output``, each from scratch."""
    output = config.output.resolve()
    check_output_folder(str(output), flag="--output")
    clear_earlier_demo(output)
    sets = _write_sets(config, output / "shards")
    weights = _train_backbone(config, sets, output / "backbone" / "backbone.safetensors")
    cache = functools.partial(_cache, config, output, weights)
    _train_head(config, output, cache("train", "train", epochs=config.cache_epochs)[0])

    evaluated = {"augment": "eval", "epochs": 1, "ambiguity_key": AMBIGUITY_KEY}
    (upstream,) = cache("upstream", "upstream", label_space="classifier", **evaluated)
    (zero_shot,) = cache("zero-shot", "zero_shot", label_space="dataset", **evaluated)
    # Clean zero-shot digits, and a copy per kind and strength from the same pass (figure 6).
    deteriorations = [
        f"{kind}:{strength},{output / 'cache' / f'{kind}-{strength:g}'}"
        for kind in config.kinds
        for strength in config.strengths
    ]
    deteriorated = cache(
        "clean", "clean", augment="eval", epochs=1, also_deteriorate=deteriorations
    )
    heldout = clean_recall_at_1(upstream)
    console.print(
        f"[bold]4/5[/bold] cached the upstream, zero-shot and {len(deteriorated)} deterioration "
        f"eval sets; the backbone's 1-NN Recall@1 on clean held-out digits: {heldout:.3f}",
        markup=True,
    )

    evaluation = run_evaluate(
        EvaluateJobConfig(
            head=[str(output / "head")],
            dataset=[f"{ZERO_SHOT}={zero_shot}"],
            upstream=upstream,
            deterioration=deteriorated,
            report=str(output / "report"),
            seed=config.seed,
        )
    )
    demo = DemoResult(evaluation.report, output / "report", heldout)
    console.print(demo_table(demo))
    return demo


def _write_sets(config: DemoConfig, shards: Path) -> DemoSets:
    """Step 1: the digit and glyph shards of every set under ``shards``."""
    sets = write_demo_sets(
        str(shards),
        SetsConfig(
            copies=config.copies,
            glyph_classes=config.glyph_classes,
            glyph_images=config.glyph_images,
            degraded=config.degraded,
            clean_images=config.clean_images,
            size=2 * INPUT_SIZE,
            seed=config.seed,
        ),
    )
    console.print(
        f"[bold]1/5[/bold] wrote digit and {config.glyph_classes}-class glyph shards to "
        f"{escape(str(shards))}",
        markup=True,
    )
    return sets


def _train_backbone(config: DemoConfig, sets: DemoSets, weights: Path) -> str:
    """Step 2: a tiny backbone pretrained on the training shards, saved at ``weights``."""
    images, labels = load_shard_images(sets.train)
    torch.set_num_threads(1)  # a model this small gains nothing from a second thread
    with progress_bar(
        TextColumn(f"[bold]2/5[/bold] training a tiny {BACKBONE}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs"),
        TimeRemainingColumn(),
        plain="demo: training the backbone, {task.completed:.0f}/{task.total:.0f} epochs",
    ) as progress:
        task = progress.add_task("epochs", total=config.backbone_epochs)
        model = train_tiny_backbone(
            images,
            labels,
            name=BACKBONE,
            size=INPUT_SIZE,
            epochs=config.backbone_epochs,
            augment=_train_transform(),
            seed=config.seed,
            on_epoch=lambda: progress.advance(task),
        )
    saved = save_backbone(model, str(weights))
    console.print(
        f"[bold]2/5[/bold] trained a tiny {BACKBONE} on {len(images)} images of "
        f"{len(sets.pretraining_classes)} classes (digits 0-5 and glyphs): {escape(str(saved))}",
        markup=True,
    )
    return saved


def _cache(
    config: DemoConfig, output: Path, weights: str, name: str, shards: str, **options: Any
) -> list[str]:
    """The demo's cache ``name`` of the shards of set ``shards`` (``pvu cache`` with the
    bundled config and ``options``), and those of its ``--also-deteriorate`` copies; their
    URLs."""
    job = load_job_config(
        CacheJobConfig,
        str(DEMO_CACHE),
        shards=str(output / "shards" / shards),
        weights=weights,
        output=str(output / "cache" / name),
        seed=config.seed,
        **options,
    )
    if run_cache(job).failed:
        raise RuntimeError(f"some units of the {name} cache failed; see the summary above")
    return [target.output for target in job.targets()]


def _train_head(config: DemoConfig, output: Path, train: str) -> None:
    """Step 3: the uncertainty head, trained on the cache at ``train``."""
    result = run_train_head(
        load_job_config(
            TrainHeadConfig,
            str(DEMO_HEAD),
            cache=[train],
            output=str(output / "head"),
            episodes=config.head_episodes,
            seed=config.seed,
        )
    )
    console.print(
        f"[bold]3/5[/bold] cached {config.cache_epochs} augmented epochs and trained the head: "
        f"held-out pair accuracy {result.metrics[-1]['val_pair_accuracy']:.3f}",
        markup=True,
    )


def _score(value: float | None) -> str:
    """An R-AUROC in the table; n/a where the report has none (every or no 1-NN right)."""
    return "n/a" if value is None else f"{value:.3f}"


def demo_table(demo: DemoResult) -> Table:
    """A column per set (R-AUROC of each source, Recall@1, safe retrieval with the head) and
    the claim; sets as columns keep it narrow enough for an 80-column terminal."""
    sources = [s["name"] for s in demo.report["sources"]]
    datasets = demo.report["datasets"]
    table = Table(title="pvu demo: the paper in miniature")
    table.add_column("R-AUROC (higher is better)")
    for entry in datasets:
        table.add_column(f"{entry['name']} (n={entry['n']})", justify="right")
    for source in sources:
        table.add_row(source, *(_score(e["sources"][source]["r_auroc"]) for e in datasets))
    table.add_section()
    table.add_row("Recall@1", *(f"{e['recall_at_1']:.3f}" for e in datasets))
    errors = [e["sources"]["head"]["safe_retrieval"]["class_agnostic"] for e in datasets]
    table.add_row(
        "1-NN error, head rejects 10%",
        *(f"{e['full']:.3f} -> {e['clean_database']:.3f}" for e in errors),
    )
    verdict = "holds" if demo.claim_holds() else "does NOT hold"
    table.caption = (
        f"claim (zero-shot head R-AUROC > 0.5 and > entropy, 1-max_prob): {verdict}; "
        f"report: {demo.report_dir / 'report.md'}"
    )
    return table
