"""Cache-job throughput: the whole job (S3 shards -> Parquet) vs a bare backbone forward.

Starts a moto S3 server on loopback (``--local``: none, everything on local disk), writes
ImageNet-like JPEG shards to it (``write_photo_shards``, ~400x350, quality 90) and starts a
local Ray on 127.0.0.1. Then, in ``--rounds`` rounds, it alternates:

- the bare reference: ``Backbone.forward`` on random tensors already on the device, same model,
  precision, batch size and torch threads as the job's actor (all of Ray's CPUs), in a Ray
  actor of its own (on a GPU node in this process: Ray hides the GPU from actors without one);
- the real job, ``jobs.run.cache.run_cache`` (one actor with every CPU), for one more epoch of
  every shard, with the Parquet output on the S3 server and/or on local disk.

The machine may be shared, so each round's job figure is compared with the references just
before and after it. The job figure is steady state: rows / the units' own seconds (shard read,
decode, augmentation, forward, Arrow, Parquet commit); Ray start-up and actor start + model load
are reported apart, as is the figure that includes them. A second ratio compares CPU seconds
per image (the actor's process CPU time during its units vs the reference actor's), which a busy
machine disturbs less. Target: job / reference >= 0.8 on 2 CPU cores, >= 0.85 on a GPU node
(ViT-B/16, bf16, the decode pool on the node's cores; ``benchmarks/gpu_check.sh``).

    .venv/bin/python benchmarks/cache_throughput.py --shards 2 --per-shard 128 --batch-size 32 \
        --rounds 3 --output both
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from types import SimpleNamespace
from typing import Any

from local_s3 import start_s3


class Reference:
    """The bare forward: ``Backbone.forward`` on pre-made tensors, same model, batch and threads."""

    def __init__(self, backbone: str, batch_size: int, threads: int, precision: str) -> None:
        import torch

        from pipeline.cache.backbone import (
            Backbone,
            Compute,
            create_backbone_model,
            describe_backbone,
        )

        self.threads = threads
        info = describe_backbone(backbone, "random")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        autocast = Compute.resolve(device.type, precision).autocast_dtype
        model = create_backbone_model(backbone, "random")
        self.model = Backbone(model, device, autocast)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, *info.data_config["input_size"], generator=generator)
        self.images = images.to(device)
        self.labels = torch.randint(0, self.model.num_classes, (batch_size,), generator=generator)
        self.measure(3)  # warm-up

    def measure(self, batches: int) -> tuple[float, float]:
        """(images/s, CPU seconds per image) over ``batches`` forwards."""
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            started, cpu = time.perf_counter(), time.process_time()
            for _ in range(batches):
                self.model.forward(self.images, self.labels)
            images = batches * len(self.labels)
            seconds = time.perf_counter() - started
            return images / seconds, (time.process_time() - cpu) / images
        finally:
            torch.set_num_threads(previous)


def run_round(args: argparse.Namespace, output: str, shards: str, epochs: int) -> dict[str, Any]:
    """The real cache job up to ``epochs``; earlier epochs are committed, so only the last runs."""
    import torch

    from jobs.run.cache import run_cache
    from jobs.run.cache_config import CacheJobConfig

    config = CacheJobConfig(
        shards=f"{shards}/",
        backbone=args.backbone,
        output=output,
        weights="random",
        batch_size=args.batch_size,
        epochs=epochs,
        seed=0,
        decode_workers=args.decode_workers,
        decode=args.decode,
        precision=args.precision,
        gpus_per_actor=1.0 if torch.cuda.is_available() else None,  # fail, never run on CPUs
    )
    started = time.perf_counter()
    report = run_cache(config)
    wall = time.perf_counter() - started
    if report.failed or not report.results:
        raise SystemExit(f"units failed: {report.failed}")
    timings: dict[str, float] = {}
    for result in report.results:
        for stage, seconds in result.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
    return {
        "rows": sum(result.rows for result in report.results),
        "unit_seconds": [result.seconds for result in report.results],
        "units": len(report.results),
        "busy": sum(result.seconds for result in report.results),
        "wall": wall,
        "threads": report.workers[0]["threads"] if report.workers else 0,
        "decode_workers": report.workers[0]["decode_workers"] if report.workers else 0,
        **timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=2, help="input shards (one unit each)")
    parser.add_argument("--per-shard", type=int, default=128, help="JPEGs per shard")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="job epochs, each between references")
    parser.add_argument("--backbone", default="vit_small_patch16_224")
    parser.add_argument(
        "--reference-batches", type=int, default=4, help="forwards per reference measurement"
    )
    parser.add_argument(
        "--output", choices=["s3", "local", "both"], default="s3", help="where Parquet goes"
    )
    parser.add_argument(
        "--decode-workers",
        type=int,
        default=None,
        help="the job's --decode-workers [default: the job's own, 0 on CPUs]",
    )
    parser.add_argument(
        "--decode", choices=["pil", "device"], default="pil", help="the job's --decode"
    )
    parser.add_argument(
        "--precision", choices=["bf16", "fp32"], default="bf16", help="the job's --precision"
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help="no S3 server: shards and Parquet on local disk (nodes without moto)",
    )
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    server, endpoint = (None, "local disk") if args.local else start_s3()
    outputs = (
        ["local"] if args.local else ["s3", "local"] if args.output == "both" else [args.output]
    )
    references: list[tuple[float, float]] = []
    jobs: dict[str, list[dict[str, Any]]] = {where: [] for where in outputs}
    scratch = tempfile.TemporaryDirectory()
    try:
        import ray
        import torch

        from pipeline.cache.distribute import start_local_ray
        from pipeline.demo.data import write_photo_shards

        tick = time.perf_counter()
        shards = f"{scratch.name}/shards" if args.local else "s3://pvu-bench/shards"
        if not args.local:
            import s3fs

            s3fs.S3FileSystem().mkdir("pvu-bench")
        write_photo_shards(shards, shards=args.shards, per_shard=args.per_shard, quality=90)
        print(f"wrote {args.shards} x {args.per_shard} JPEGs in {time.perf_counter() - tick:.1f} s")
        tick = time.perf_counter()
        # address="local": always a fresh Ray of our own, never one that `ray start` left running
        start_local_ray(log_to_driver=True)
        ray_start = time.perf_counter() - tick
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # The reference runs in a Ray actor too, so both figures come from a worker process
        # with the same environment and torch threads, free of the driver's S3 server. It asks
        # for no CPUs so that the job's actor still gets all of them; it idles during the job.
        reference_args = (args.backbone, args.batch_size, cpus, args.precision)
        if torch.cuda.is_available():
            reference = Reference(*reference_args)
        else:
            actor = ray.remote(num_cpus=0)(Reference).remote(*reference_args)
            reference = SimpleNamespace(measure=lambda n: ray.get(actor.measure.remote(n)))
        for epoch in range(args.rounds):
            references.append(reference.measure(args.reference_batches))
            for where in outputs:
                output = "s3://pvu-bench/cache" if where == "s3" else f"{scratch.name}/cache"
                jobs[where].append(run_round(args, output, shards, epochs=epoch + 1))
        references.append(reference.measure(args.reference_batches))
        ray.shutdown()
    finally:
        scratch.cleanup()
        if server is not None:
            server.stop()
    report(args, endpoint, cpus, ray_start, references, jobs)


def report(
    args: argparse.Namespace,
    endpoint: str,
    cpus: int,
    ray_start: float,
    references: list[tuple[float, float]],
    jobs: dict[str, list[dict[str, Any]]],
) -> None:
    """Print the figures: reference, job per output and round, ratios (wall and CPU)."""
    ref_rates = [rate for rate, _ in references]
    ref_rate = statistics.mean(ref_rates)
    ref_cpu = statistics.mean(cpu for _, cpu in references)
    print()
    print(
        f"backbone {args.backbone} (random weights, {args.precision}), batch {args.batch_size}, "
        f"{cpus} CPUs; {args.shards} shards x {args.per_shard} JPEGs (~400x350, q90) on "
        f"{endpoint}; {args.rounds} rounds"
    )
    print(
        f"reference, bare Backbone.forward on pre-made tensors ({_device()}), "
        f"{cpus} torch threads: "
        + ", ".join(f"{rate:.2f}" for rate in ref_rates)
        + f" images/s (before/between/after rounds); mean {ref_rate:.2f} images/s, "
        f"{ref_cpu:.3f} CPU-s/image"
    )
    print(f"ray.init: {ray_start:.1f} s")
    for where, rounds in jobs.items():
        print(f"job, Parquet on {where}:")
        ratios = []
        for i, job in enumerate(rounds):
            rate = job["rows"] / job["busy"]
            ratio = rate / statistics.mean(ref_rates[i : i + 2])
            ratios.append(ratio)
            print(
                f"  round {i}: {job['rows']:.0f} rows, {job['units']:.0f} units, steady "
                f"{rate:.2f} images/s (ratio to the references around it {ratio:.3f}); wall "
                f"{job['wall']:.1f} s of which {job['wall'] - job['busy']:.1f} s outside units "
                f"(actor start + model load, planning, manifest); actor threads "
                f"{job['threads']:.0f}, decode workers {job['decode_workers']:.0f}; seconds per "
                "unit " + ", ".join(f"{seconds:.2f}" for seconds in job["unit_seconds"])
            )
        rows = sum(job["rows"] for job in rounds)
        busy = sum(job["busy"] for job in rounds)
        wall = sum(job["wall"] for job in rounds)
        stages = {
            key: sum(job.get(key, 0.0) for job in rounds)
            for key in ("prepare", "wait", "forward", "write", "cpu")
        }
        cpu_per_image = stages["cpu"] / rows
        print(
            "  seconds over all rounds: "
            + ", ".join(f"{key}={value:.1f}" for key, value in stages.items())
            + " (prepare runs in the background thread; cpu = the actor's CPU time in units)"
        )
        print(
            f"  steady {rows / busy:.2f} images/s; incl. actor start-up {rows / wall:.2f} "
            f"images/s; {cpu_per_image:.3f} CPU-s/image"
        )
        print(
            f"  RATIO job/reference: {rows / busy / ref_rate:.3f} overall, median of rounds "
            f"{statistics.median(ratios):.3f} (target >= 0.8); by CPU time per image "
            f"{ref_cpu / cpu_per_image:.3f}"
        )


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


if __name__ == "__main__":
    main()
