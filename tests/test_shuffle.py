"""Batches do not depend on the shards being pre-shuffled: mixing, and the head it trains."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.index import open_cache
from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache
from pipeline.head.stream import CacheStream, StreamConfig
from pipeline.head.train import ScheduleConfig, TrainConfig, fit_head

# 40 classes of 100 images in 64 row groups of 125 rows: about 1.25 classes per group when
# the shards are sorted by class.
SPEC = SyntheticCache(
    dim=32, samples_per_shard=500, shards=8, epochs=2, row_group_rows=125, classes=40
)
HALF = SPEC.images * SPEC.epochs // 2


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("layouts")
    urls = {}
    for order in ("sorted", "shuffled"):
        urls[order] = str(root / order)
        write_synthetic_cache(urls[order], dataclasses.replace(SPEC, order=order))
    return urls


def _uniform_distinct(labels: np.ndarray, batch: int) -> float:
    """Expected distinct classes in ``batch`` rows drawn uniformly from ``labels``."""
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    return float(np.sum(1.0 - (1.0 - counts / len(labels)) ** batch))


def _distinct(url: str, shuffle_rows: int, batch: int = 64, batches: int = 40) -> float:
    config = StreamConfig(seed=1, shuffle_rows=shuffle_rows, extra_columns=("label",))
    with CacheStream(open_cache([url]), config) as stream:
        return statistics.mean(
            len(set(stream.next_batch(batch).extras["label"].tolist())) for _ in range(batches)
        )


def test_batches_from_class_sorted_shards_mix_classes_like_a_uniform_shuffle(
    caches: dict[str, str],
) -> None:
    labels = np.repeat(np.arange(SPEC.classes), SPEC.images // SPEC.classes)
    uniform = _uniform_distinct(labels, 64)
    # hold half the cache: 32 of 64 groups, which span the 40 classes (in an epoch's order)
    assert _distinct(caches["shuffled"], HALF) >= 0.9 * uniform
    assert _distinct(caches["sorted"], HALF) >= 0.8 * uniform
    one_group = _distinct(caches["sorted"], SPEC.row_group_rows)
    assert one_group < 0.3 * uniform, "holding one group at a time leaves batches of 1-2 classes"


def _val_spearman(url: str, output: Path, *, seed: int, shuffle_rows: int) -> float:
    config = TrainConfig(
        hidden=(64, 64),
        schedule=ScheduleConfig(episodes=5, episode_size=3000, batch_size=256, warmup_episodes=1),
        stream=StreamConfig(seed=seed, shuffle_rows=shuffle_rows, val_fraction=0.2),
        val_rows=2000,
    )
    return fit_head([url], str(output), config).metrics[-1]["val_spearman"]


@pytest.mark.slow
def test_head_from_class_sorted_shards_ranks_as_well_as_from_shuffled(
    caches: dict[str, str], tmp_path: Path
) -> None:
    runs = {
        order: [
            _val_spearman(caches[order], tmp_path / f"{order}{seed}", seed=seed, shuffle_rows=HALF)
            for seed in (0, 1)
        ]
        for order in ("sorted", "shuffled")
    }
    noise = max(0.02, 2 * max(abs(a - b) for a, b in runs.values()))
    assert abs(statistics.mean(runs["sorted"]) - statistics.mean(runs["shuffled"])) <= noise, runs
    # the same check fails for a reader that holds one row group at a time (the old layout risk)
    one_group = _val_spearman(
        caches["sorted"], tmp_path / "one", seed=0, shuffle_rows=SPEC.row_group_rows
    )
    assert statistics.mean(runs["shuffled"]) - one_group > noise, (runs, one_group)
