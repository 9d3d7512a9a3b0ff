"""``make demo``: the whole recipe on bundled real data, on a local Ray, in a few minutes on a CPU.

1. Write WebDataset shards of scikit-learn's digits (as RGB PNGs) to ``<output>/shards``.
2. Train a tiny timm classifier on them in seconds (the frozen, "pretrained" backbone).
3. Cache embeddings and losses of augmented epochs with ``pvu cache`` on local Ray.
4. Train the uncertainty head on that cache on the CPU with ``pvu train-head`` and export it;
   print its validation pair-ordering accuracy and Spearman correlation next to an untrained
   head's.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from pydantic import BaseModel, ConfigDict, Field

from jobs.cache import CacheJobConfig, run_cache
from jobs.config import CONFIGS, ConfigFile, job_config, load_job_config, read_config_file
from jobs.terminal import Verbose, console, reported, setup_logging
from jobs.train_head import TrainHeadConfig, run_train_head
from pipeline.cache.decode import decode_image
from pipeline.cache.samples import iter_samples
from pipeline.demo.backbone import save_backbone, train_tiny_backbone
from pipeline.demo.data import write_digit_shards
from pipeline.head.train import TrainResult

log = logging.getLogger("pvu.demo")

DEMO_CACHE = CONFIGS / "demo" / "cache.yaml"
DEMO_HEAD = CONFIGS / "demo" / "train-head.yaml"
_CACHE_SETTINGS = read_config_file(str(DEMO_CACHE), CacheJobConfig)
BACKBONE: str = _CACHE_SETTINGS["backbone"]
INPUT_SIZE: int = _CACHE_SETTINGS["input_size"]
DEMO_PARTS = ("shards", "backbone", "cache", "head")


def load_shard_images(urls: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images (N, H, W, 3) and labels of every sample in ``urls``."""
    images, labels = [], []
    for url in urls:
        for sample in iter_samples(url, counts=Counter()):
            images.append(np.asarray(decode_image(sample.image, key=sample.key)))
            labels.append(sample.label)
    return np.stack(images), np.array(labels)


def run_demo(
    output: Path, *, shards: int = 8, per_shard: int = 128, epochs: int = 4, head_episodes: int = 30
) -> TrainResult:
    """Shards -> tiny backbone -> cache -> head under ``output``, each step from scratch."""
    output = output.resolve()
    for step in DEMO_PARTS:
        shutil.rmtree(output / step, ignore_errors=True)
    urls = write_digit_shards(str(output / "shards"), shards=shards, per_shard=per_shard)
    console.print(f"[bold]1/4[/bold] wrote {len(urls)} shards of digits to {output / 'shards'}")
    images, labels = load_shard_images(urls)
    model = train_tiny_backbone(images, labels, name=BACKBONE, size=INPUT_SIZE)
    weights = save_backbone(model, str(output / "backbone" / "backbone.safetensors"))
    console.print(f"[bold]2/4[/bold] trained a tiny {BACKBONE} on {len(images)} images: {weights}")
    config = load_job_config(
        CacheJobConfig,
        str(DEMO_CACHE),
        shards=str(output / "shards"),
        weights=weights,
        output=str(output / "cache"),
        epochs=epochs,
    )
    if run_cache(config).failed:
        raise RuntimeError("some cache units failed; see the summary above")
    console.print(f"[bold]3/4[/bold] cached {epochs} augmented epochs to {config.output}")
    result = run_train_head(
        load_job_config(
            TrainHeadConfig,
            str(DEMO_HEAD),
            cache=[config.output],
            output=str(output / "head"),
            episodes=head_episodes,
        )
    )
    untrained, trained = result.metrics[0], result.metrics[-1]
    console.print(
        f"[bold]4/4[/bold] head exported to {output / 'head'}; on held-out digits "
        f"(pair-ordering accuracy / Spearman): untrained "
        f"{untrained['val_pair_accuracy']:.3f} / {untrained['val_spearman']:.3f}, trained "
        f"{trained['val_pair_accuracy']:.3f} / {trained['val_spearman']:.3f}"
    )
    return result


class DemoConfig(BaseModel):
    """The demo's sizes; the cache and head settings are jobs/configs/demo/*.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: Path = Path("demo-output")
    shards: int = Field(default=8, ge=1)
    per_shard: int = Field(default=128, ge=8)
    epochs: int = Field(default=4, ge=1)
    head_episodes: int = Field(default=30, ge=3)


def demo(
    ctx: typer.Context,
    output: Annotated[
        Path, typer.Option(help="Folder for shards, backbone, cache and head.")
    ] = Path("demo-output"),
    shards: Annotated[int, typer.Option(help="Number of digit shards.")] = 8,
    per_shard: Annotated[int, typer.Option(help="Images per shard.")] = 128,
    epochs: Annotated[int, typer.Option(help="Augmentation epochs to cache.")] = 4,
    head_episodes: Annotated[int, typer.Option(help="Head training episodes.")] = 30,
    config: ConfigFile = None,
    verbose: Verbose = False,
) -> None:
    """Run the pvu recipe end to end on scikit-learn's digits (re-running starts afresh)."""
    setup_logging(verbose)
    job = job_config(DemoConfig, ctx)
    with reported("demo", verbose=verbose):
        run_demo(job.output, **job.model_dump(exclude={"output"}))


def main() -> None:
    """``python -m jobs.demo`` (what ``make demo`` runs)."""
    typer.run(demo)


if __name__ == "__main__":
    main()
