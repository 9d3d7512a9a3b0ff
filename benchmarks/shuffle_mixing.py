"""Head batches from class-sorted shards: distinct classes per batch against a uniform shuffle.

Writes two synthetic caches holding the same rows: shards sorted by class (as when shards are
built from per-class folders or per-synset archives) and the images dealt to shards at random.
Streams batches from each with ``pipeline.head.stream.CacheStream`` and reports

(a) the mean distinct classes per batch against a uniform shuffle's expectation (target >= 0.8),
    for several ``--shuffle-rows``;
(b) the training step's throughput on the class-sorted cache, streaming against in-memory
    tensors, by CPU time (as ``benchmarks/train_throughput.py``);

then projects (a) to ImageNet-21k (labels only, the same plan functions): 21,843 classes of
~600 images, 2,000 class-sorted shards in 4,096-row groups, 7 epochs.

    .venv/bin/python benchmarks/shuffle_mixing.py
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from train_throughput import in_memory_rows, pooled, time_in_memory, time_stream

from pipeline.cache.index import open_cache
from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache
from pipeline.head import shuffle
from pipeline.head.stream import CacheStream, StreamConfig
from pipeline.head.train import keep_freed_memory


def uniform_distinct(counts: np.ndarray, batch: int) -> float:
    """Expected distinct classes in ``batch`` rows drawn uniformly from rows with ``counts``."""
    counts = counts[counts > 0]
    return float(np.sum(1.0 - (1.0 - counts / counts.sum()) ** batch))


def measured_distinct(url: str, shuffle_rows: int, batch: int, batches: int) -> float:
    """Mean distinct labels per batch over ``batches`` streamed batches."""
    config = StreamConfig(seed=0, shuffle_rows=shuffle_rows, extra_columns=("label",))
    with CacheStream(open_cache([url]), config) as stream:
        return statistics.mean(
            len(np.unique(stream.next_batch(batch).extras["label"])) for _ in range(batches)
        )


def projected_distinct(
    *, classes: int, images: int, shard_images: int, group_rows: int, epochs: int,
    shuffle_rows: int, batch: int, windows: int,
) -> float:  # fmt: skip
    """Distinct classes per batch of the stream's plan over class-sorted shards, labels only."""
    groups = []  # (first image, rows) of each row group; every epoch repeats the layout
    for start in range(0, images, shard_images):
        end = min(images, start + shard_images)
        groups += [(g, min(group_rows, end - g)) for g in range(start, end, group_rows)]
    groups *= epochs
    n = len(groups)
    spread = shuffle.spread_for(shuffle_rows, [rows for _, rows in groups])
    order = shuffle.pass_order(n, seed=0, pass_index=0)
    counts = []
    for w in np.random.default_rng(1).integers(0, n, windows):
        parts = []
        for j, position in enumerate(shuffle.active(int(w), groups=n, spread=spread)):
            first, rows = groups[order[position]]
            dealt = shuffle.group_permutation(rows, seed=0, pass_index=0, position=position)
            start, stop = shuffle.slice_bounds(rows, j, spread)
            parts.append((first + dealt[start:stop]) * classes // images)
        labels = np.concatenate(parts)[
            np.random.default_rng(int(w)).permutation(sum(map(len, parts)))
        ]
        counts += [
            len(np.unique(labels[i : i + batch])) for i in range(0, len(labels) - batch + 1, batch)
        ]
    return statistics.mean(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--samples-per-shard", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=218, help="~600 images per class")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=24, help="batches counted per stream")
    parser.add_argument("--shuffle-rows", type=int, nargs="+", default=[16_384, 65_536, 2**21])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="in-memory timed steps")
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `pvu train-head` does
    spec = SyntheticCache(
        dim=args.dim,
        samples_per_shard=args.samples_per_shard,
        shards=args.shards,
        epochs=1,
        row_group_rows=4096,
        classes=args.classes,
    )
    with tempfile.TemporaryDirectory(prefix="pvu-mixing-") as tmp:
        urls = {}
        for order in ("sorted", "shuffled"):
            started = time.perf_counter()
            urls[order] = f"{tmp}/{order}"
            write_synthetic_cache(urls[order], dataclasses.replace(spec, order=order))
            print(f"{order} cache written in {time.perf_counter() - started:.0f}s")
        labels = np.arange(spec.images) * spec.classes // spec.images
        uniform = uniform_distinct(np.bincount(labels), args.batch_size)
        print(
            f"\n(a) {spec.images:,} rows, {spec.classes} classes, batch {args.batch_size}: "
            f"a uniform shuffle sees {uniform:.1f} classes per batch"
        )
        for rows in args.shuffle_rows:
            row = [f"  shuffle_rows {rows:>9,}:"]
            for order, url in urls.items():
                seen = measured_distinct(url, rows, args.batch_size, args.batches)
                row.append(f"{order} {seen:7.1f} ({seen / uniform:.2f})")
            print(" ".join(row))
        _throughput(urls["sorted"], spec.images, args)
    _projection(args.batch_size)


def _throughput(url: str, rows: int, args: argparse.Namespace) -> None:
    x, y = in_memory_rows(url, rows, torch.device("cpu"))
    args.shuffle_rows = StreamConfig.shuffle_rows
    for precision in ("fp32", "bf16"):
        ratios, memory = [], [time_in_memory(x, y, args, precision)]
        for r in range(args.repeats):
            streamed = time_stream(url, args, precision, seed=r)[0]  # the first pass, cold
            memory.append(time_in_memory(x, y, args, precision))
            ratios.append(streamed.cpu / pooled(memory[-2:]).cpu)  # the runs around it
        print(
            f"(b) class-sorted cache, {precision}: streaming / in-memory by CPU time "
            f"{', '.join(f'{q:.2f}' for q in ratios)}"
        )


def _projection(batch: int) -> None:
    images, classes = 13_000_000, 21_843
    uniform = uniform_distinct(np.full(classes, images // classes), batch)
    print(f"\nImageNet-21k projection (labels only): a uniform shuffle sees {uniform:.0f} classes")
    for rows in (524_288, 1_048_576, 2_097_152, 3_145_728, 4_194_304):
        seen = projected_distinct(
            classes=classes, images=images, shard_images=6_500, group_rows=4096, epochs=7,
            shuffle_rows=rows, batch=batch, windows=12,
        )  # fmt: skip
        gib = rows * 768 * 2 / 2**30
        print(
            f"  shuffle_rows {rows:>9,} ({gib:.1f} GiB at D=768): "
            f"{seen:6.0f} classes per batch ({seen / uniform:.2f})"
        )


if __name__ == "__main__":
    main()
