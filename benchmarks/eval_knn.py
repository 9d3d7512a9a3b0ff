"""Exact leave-one-out cosine 1-NN (``pipeline.evaluate.knn``) vs a plain float32 matmul.

Both do the same floating-point work on the same data in the same process: for every block of
queries, the (block x D) @ (D x N) product of the search. The reference is only that product
(``torch.mm`` into a preallocated block); the search adds self-exclusion, the max, the tie
scan and the bookkeeping. Prints GFLOP per CPU-second and per wall-second of each, their
ratio (target >= 0.7), the peak resident memory against an N x N float32 matrix, and checks
the neighbours of a sample of queries against float64 numpy.

    .venv/bin/python benchmarks/eval_knn.py --rows 100000 --dim 768 --queries 25000
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from pipeline.evaluate.knn import nearest_neighbours, normalize, query_chunk


def timed(work, device: str) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of ``work()``, the GPU synchronised."""
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.process_time() - cpu, time.perf_counter() - wall


def reference(x: torch.Tensor, queries: int, block_bytes: int) -> None:
    """The search's matrix products alone, block by block, into one preallocated block."""
    step = query_chunk(len(x), block_bytes=block_bytes)
    block = torch.empty((step, len(x)), device=x.device)
    with torch.inference_mode():
        for start in range(0, queries, step):
            rows = x[start : min(start + step, queries)]
            torch.mm(rows, x.T, out=block[: len(rows)])


def check(unit: np.ndarray, index: np.ndarray, sample: int = 200) -> int:
    """How many of ``sample`` queries have the float64 numpy neighbour (up to ties)."""
    rows = np.random.default_rng(1).choice(len(index), sample, replace=False)
    sim = unit[rows].astype(np.float64) @ unit.T.astype(np.float64)
    sim[np.arange(sample), rows] = -np.inf
    best = sim.max(axis=1)
    return int(sum(sim[i, index[r]] >= best[i] - 1e-6 for i, r in enumerate(rows)))


def main() -> None:
    """Parse arguments, run reference and search interleaved, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=None, help="Default: every row.")
    parser.add_argument("--block-mb", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (then wall-time ratios).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    queries = args.queries or args.rows
    block_bytes = args.block_mb * 2**20
    unit = np.empty((args.rows, args.dim), np.float32)
    for start in range(0, args.rows, 10_000):  # chunked: no second full-size copy
        part = np.random.default_rng([0, start]).standard_normal(
            (min(10_000, args.rows - start), args.dim), dtype=np.float32
        )
        unit[start : start + len(part)] = normalize(part)
    x = torch.from_numpy(unit).to(args.device)
    flop = 2.0 * queries * args.rows * args.dim
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    found = {}

    def search() -> None:
        found["nb"] = nearest_neighbours(
            x, queries=np.arange(queries), block_bytes=block_bytes, device=args.device
        )

    if args.device == "cuda":
        reference(x, min(queries, 4096), block_bytes)  # warm-up: kernels, allocator
    ref_cpu, ref_wall = timed(lambda: reference(x, queries, block_bytes), args.device)
    knn_cpu, knn_wall = timed(search, args.device)
    ref2_cpu, ref2_wall = timed(lambda: reference(x, queries, block_bytes), args.device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ref_cpu, ref_wall = (ref_cpu + ref2_cpu) / 2, (ref_wall + ref2_wall) / 2
    print(f"{queries:,} queries x {args.rows:,} rows x {args.dim} dims, {flop / 1e12:.2f} TFLOP")
    print(f"torch threads {torch.get_num_threads()}, block {args.block_mb} MiB")
    for name, cpu, wall in (("matmul", ref_cpu, ref_wall), ("1-NN", knn_cpu, knn_wall)):
        print(
            f"{name:>7}: {flop / cpu / 1e9:7.1f} GFLOP/CPU-s {flop / wall / 1e9:7.1f} GFLOP/s "
            f"({cpu:.1f} CPU-s, {wall:.1f} s)"
        )
    print(f"ratio by CPU time {ref_cpu / knn_cpu:.3f}, by wall time {ref_wall / knn_wall:.3f}")
    full = args.rows**2 * 4 / 2**30
    print(
        f"peak RSS {peak:.2f} GiB, {peak - rss_before:+.2f} GiB during the runs (embeddings "
        f"{unit.nbytes / 2**30:.2f} GiB, block {args.block_mb} MiB; an N x N float32 matrix "
        f"would be {full:.1f} GiB)"
    )
    print(f"exact: {check(unit, found['nb'].index)}/200 sampled queries match float64 numpy")


if __name__ == "__main__":
    main()
