"""Decode + augmentation throughput: the cache job's background thread vs its decode pool.

Times only what ``UnitRunner`` does per sample before the forward (JPEG decode and timm's PIL
train steps, seeded per sample; ``prepare_image``), on ImageNet-like JPEGs already in memory
(``write_photo_shards``, ~400x350, quality 90), with the backbone's own transform (ViT-B/16 at
224 by default). Rounds alternate between in-thread (``decode_workers=0``) and each pool size;
pool start-up is excluded (the pool lives as long as the actor). Checks the outputs are equal.
Also prints CPU milliseconds per image, which a busy machine disturbs less than images/s: the
workers' (what each added core buys) and the parent's (the pool's own overhead, in the actor:
its ceiling is about 1000 / parent ms images/s, as the parent's share runs under one GIL).

    .venv/bin/python benchmarks/decode_throughput.py --images 256 --workers 1 2 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter, deque

import numpy as np
import psutil


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    args = parser.parse_args()

    from pipeline.cache.augment import (
        TransformConfig,
        build_transform,
        resolve_transform,
        sample_seed,
        split_transform,
    )
    from pipeline.cache.backbone import describe_backbone
    from pipeline.cache.decode_pool import DecodePool, prepare_image
    from pipeline.cache.samples import iter_samples
    from pipeline.demo.data import write_photo_shards

    resolved = resolve_transform(
        TransformConfig(), describe_backbone(args.backbone, "random").data_config
    )
    with tempfile.TemporaryDirectory() as tmp:
        (shard,) = write_photo_shards(tmp, shards=1, per_shard=args.images)
        samples = list(iter_samples(shard, counts=Counter()))
    tasks = [(s.key, s.image, sample_seed(0, 0, s.key)) for s in samples]
    transform = build_transform(resolved)
    split = split_transform(transform)

    def in_thread() -> list:
        return [prepare_image(transform, split, data, key, seed) for key, data, seed in tasks]

    pools = {n: DecodePool([resolved], n) for n in args.workers}
    for pool in pools.values():  # start-up: spawn, import torch and timm, build the transform
        list(pool.map(tasks[: 2 * pool.workers]))
    expected = in_thread()
    rates: dict[str, list[float]] = {"thread": []}
    cpu: dict[str, list[tuple[float, float]]] = {"thread": []}
    for _ in range(args.rounds):
        tick = time.thread_time()
        rates["thread"].append(len(tasks) / _timed(in_thread)[1])
        cpu["thread"].append((0.0, time.thread_time() - tick))
        for n, pool in pools.items():
            workers = [psutil.Process(pid) for pid in pool.pids]
            before = _cpu(workers), time.process_time()
            # each image is dropped once it is taken, as the actor drops it once batched
            _, seconds = _timed(lambda pool=pool: deque(pool.map(tasks), maxlen=0))
            parent = time.process_time() - before[1]
            cpu.setdefault(f"{n} workers", []).append((parent, _cpu(workers) - before[0]))
            rates.setdefault(f"{n} workers", []).append(len(tasks) / seconds)
    for pool in pools.values():
        images = list(pool.map(tasks))
        assert all(np.array_equal(a, b) for (a,), b in zip(images, expected, strict=True))
        pool.close()
    base = statistics.mean(rates["thread"])
    print(f"{len(tasks)} images, {args.backbone} train transform {resolved['input_size']}")
    for name, values in rates.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        mean = statistics.mean(values)
        rounds = len(cpu[name]) * len(tasks) / 1000
        parent, work = (sum(column) / rounds for column in zip(*cpu[name], strict=True))
        print(
            f"{name:>10}: {shown} images/s (mean {mean:.0f}, {mean / base:.2f}x the thread); "
            f"CPU ms/image: decoding {work:.2f}, parent {parent:.2f}"
        )


def _cpu(processes: list[psutil.Process]) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in processes)


def _timed(work):
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


if __name__ == "__main__":
    main()
