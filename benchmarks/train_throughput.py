"""Head-training throughput: streaming a Parquet cache vs the same step on in-memory tensors.

Writes a synthetic cache (D=768 by default, the writer's Parquet options), then times the
training step of ``pipeline.head.train`` on (a) batches sliced from tensors already in memory and
(b) batches from ``pipeline.head.stream.CacheStream`` over the local cache (whole passes, the
first timed from cold: it opens the stream and first touches the memory it holds rows in);
optionally (c) the same stream through a moto S3 server on loopback. The in-memory reference
runs before the first round and after each, and each round's streamed passes are compared with
the reference runs just before and after them, so the host's speed drifting between runs
(+-30% here) moves both sides. Prints samples/s and each round's streaming/in-memory ratio of
the first pass and of the later ones, and their median (targets, by CPU time: >= 0.9 in fp32,
>= 0.8 in bf16; absolute >= 30,000/s), and the reader's own CPU per row. A cache no larger
than ``--shuffle-rows`` is held whole and decoded once, so its later passes read nothing; a
smaller ``--shuffle-rows`` makes every pass read.

    .venv/bin/python benchmarks/train_throughput.py --dim 768 --precision fp32 bf16 --s3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from local_s3 import start_s3

from pipeline.cache.index import open_cache
from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache
from pipeline.head.model import HeadConfig, create_head, create_objective
from pipeline.head.stream import CacheStream, StreamConfig, read_validation
from pipeline.head.train import ScheduleConfig, create_optimizer, keep_freed_memory, train_step


@dataclass(frozen=True)
class Rate:
    """Samples per wall-clock second, and per CPU-second of this process (all threads)."""

    wall: float
    cpu: float


class Clock:
    """Wall and process CPU time since construction (a CUDA device's queued work included)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def rate(self, samples: int) -> Rate:
        """Samples per wall second and per CPU second since construction."""
        self._sync()
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return Rate(samples / wall, samples / cpu)


def _stepper(
    dim: int, precision: str, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    head = create_head(HeadConfig(dim), seed=0).to(device)
    optimizer = create_optimizer(head, ScheduleConfig())
    objective = create_objective("ranking")

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        train_step(head, optimizer, objective, x, y, precision=precision)

    return step


def in_memory_rows(url: str, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row of the cache at ``url`` shuffled once, on ``device``: float32 embeddings (the
    strict reference: its step has no widening to do) and losses."""
    everything = read_validation(open_cache([url]), val_fraction=1.0 - 1e-12, max_rows=rows)
    order = torch.randperm(len(everything), generator=torch.Generator().manual_seed(0))
    x = everything.embedding[order].to(device, torch.float32).contiguous()
    return x, everything.loss[order].contiguous().to(device)


def time_in_memory(
    x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, precision: str
) -> Rate:
    """Samples/s of ``args.steps`` steps on contiguous slices of in-memory tensors (already on
    the device)."""
    step, b = _stepper(x.shape[1], precision, x.device), args.batch_size
    for i in range(args.warmup):
        step(x[i * b : (i + 1) * b], y[i * b : (i + 1) * b])
    clock = Clock(x.device)
    for i in range(args.steps):
        j = i % (len(y) // b)
        step(x[j * b : (j + 1) * b], y[j * b : (j + 1) * b])
    return clock.rate(args.steps * b)


def _stream_config(args: argparse.Namespace, seed: int) -> StreamConfig:
    return StreamConfig(
        seed=seed, shuffle_rows=args.shuffle_rows, val_fraction=0.01, io_threads=args.io_threads
    )


def time_stream(url: str, args: argparse.Namespace, precision: str, seed: int) -> list[Rate]:
    """Samples/s of training on each of ``args.passes`` whole passes streamed from the cache at
    ``url`` (batches copied to ``args.device``).

    The first clock starts before the stream opens, so it counts opening it and reading and
    decoding every row it trains on; each later clock starts where the previous pass ended.
    """
    index = open_cache([url])
    device = torch.device(args.device)
    step = _stepper(index.dim, precision, device)
    for _ in range(args.warmup):  # the step's own warm-up, as for the in-memory reference
        step(torch.randn(args.batch_size, index.dim), torch.rand(args.batch_size))
    config = _stream_config(args, seed)
    rates = []
    clock, samples = Clock(device), 0
    with CacheStream(index, config) as stream:
        while stream.state.pass_index < args.passes:
            batch = stream.next_batch(args.batch_size)
            step(batch.embedding, batch.loss)
            samples += len(batch)
            if stream.state.pass_index > len(rates):  # a pass ended: the batch size divides no
                rates.append(clock.rate(samples))  # pass exactly, so a few rows spill over
                clock, samples = Clock(device), 0
    return rates


def time_reader(url: str, args: argparse.Namespace, seed: int) -> tuple[float, float]:
    """CPU microseconds per row to stream the cache at ``url`` without training: the first
    pass (from opening the stream: it also touches the memory it holds rows in for the first
    time) and the second.

    Batches are gathered on one torch thread: with two, the second OpenMP thread spins after
    each gather while the caller waits for reads (~1 us/row here), CPU that a training run
    spends on its step instead.
    """
    index = open_cache([url])
    config = _stream_config(args, seed)
    passes, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    with CacheStream(index, config) as stream:
        for done in (1, 2):
            cpu, samples = time.process_time(), 0
            while stream.state.pass_index < done:
                samples += len(stream.next_batch(args.batch_size))
            passes.append((time.process_time() - cpu) / samples * 1e6)
    torch.set_num_threads(threads)
    return passes[0], passes[1]


def _s3_copy(local: str) -> tuple[str, Callable[[], None]]:
    """Upload the cache to a moto S3 server on loopback; returns its URL and a stopper."""
    import s3fs

    server, _ = start_s3()
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    fs.put(local.rstrip("/") + "/", "bench/cache/", recursive=True)
    return "s3://bench/cache", server.stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rows", type=int, default=262_144, help="rows in the synthetic cache")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--shuffle-rows", type=int, default=StreamConfig.shuffle_rows, help="rows held to shuffle"
    )
    parser.add_argument(
        "--io-threads", type=int, default=StreamConfig.io_threads, help="the stream's read threads"
    )
    parser.add_argument("--passes", type=int, default=2, help="streamed passes per measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--s3", action="store_true", help="also stream through moto S3")
    parser.add_argument("--device", default="cpu", help="where the head trains: cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `pvu train-head` does

    with tempfile.TemporaryDirectory(prefix="pvu-bench-") as tmp:
        shards = max(1, args.rows // 8192)
        spec = SyntheticCache(
            dim=args.dim,
            samples_per_shard=args.rows // shards,
            shards=shards,
            epochs=1,
            row_group_rows=4096,
        )
        started = time.perf_counter()
        url = f"{tmp}/cache"
        rows = write_synthetic_cache(url, spec)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(url) for f in fs)
        print(
            f"cache: {rows:,} rows, D={args.dim}, {size / 2**20:.0f} MiB "
            f"({size / rows / (2 * args.dim):.3f}x raw float16), "
            f"written in {time.perf_counter() - started:.1f}s; torch threads {args.threads}; "
            f"device {args.device}"
        )
        x, y = in_memory_rows(url, rows, torch.device(args.device))
        reader = [time_reader(url, args, seed=r) for r in range(args.repeats)]
        first, second = (
            ", ".join(f"{us:.2f}" for us in column) for column in zip(*reader, strict=True)
        )
        print(f"reader alone, CPU us/row (target <= 4): first pass {first}; second pass {second}")
        s3_url, stop = _s3_copy(url) if args.s3 else (None, None)
        for precision in args.precision:
            memory, local, remote = [time_in_memory(x, y, args, precision)], [], []
            for r in range(args.repeats):
                local.append(time_stream(url, args, precision, seed=r))
                if s3_url:
                    remote.append(time_stream(s3_url, args, precision, seed=r))
                memory.append(time_in_memory(x, y, args, precision))
            _report(precision, args, memory, local, remote)
        if stop:
            stop()


def _report(
    precision: str,
    args: argparse.Namespace,
    memory: list[Rate],
    local: list[list[Rate]],
    remote: list[list[Rate]],
) -> None:
    print(f"\n[{precision}] batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats")
    target = 0.9 if precision == "fp32" else 0.8
    _line("in-memory tensors", memory)
    around = [pooled(memory[r : r + 2]) for r in range(len(memory) - 1)]  # each round's bracket
    for name, runs in (("streaming local", local), ("streaming moto S3", remote)):
        if not runs:
            continue
        for passes, label in ((slice(0, 1), "first pass"), (slice(1, None), "later passes")):
            if not runs[0][passes]:
                continue
            rates = [pooled(run[passes]) for run in runs]
            _line(f"{name}, {label}", rates)
            cpu = [s.cpu / m.cpu for s, m in zip(rates, around, strict=True)]
            wall = [s.wall / m.wall for s, m in zip(rates, around, strict=True)]
            print(
                f"    ratio to in-memory, by CPU time: {statistics.median(cpu):.2f} median of "
                f"rounds {', '.join(f'{r:.2f}' for r in cpu)} (target >= {target}); wall "
                f"{statistics.median(wall):.2f} ({', '.join(f'{r:.2f}' for r in wall)})"
            )


def pooled(rates: list[Rate]) -> Rate:
    """One rate for several passes of equal size (harmonic means: total samples / time)."""
    return Rate(
        len(rates) / sum(1 / r.wall for r in rates), len(rates) / sum(1 / r.cpu for r in rates)
    )


def _line(name: str, rates: list[Rate]) -> None:
    wall = max(r.wall for r in rates)
    median = statistics.median(r.wall for r in rates)
    cpu = max(r.cpu for r in rates)
    print(
        f"  {name:32}: best {wall:9,.0f} samples/s wall (median {median:9,.0f}); "
        f"{cpu:9,.0f} samples per CPU-second"
    )


if __name__ == "__main__":
    main()
