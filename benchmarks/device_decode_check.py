"""``--decode device`` against the PIL path: throughput, the actor's CPU per image, and agreement.

On ImageNet-like JPEGs (``write_photo_shards``, ~400x350, quality 90) with the backbone's train
transform (ViT-B/16 at 224 by default), decoded and augmented by ``DeviceDecoder`` on the
device (CUDA when there is one, else the CPU) in chunks of ``--chunk``, against the PIL path
(``prepare_image``) in one thread, alternating for ``--rounds``. Prints images/s and the
calling thread's CPU milliseconds per image (what one actor thread pays: its ceiling is about
1000 / ms images/s), then the agreement on corrupted copies of the JPEGs (bytes flipped, cut,
zeroed; ``random.Random(0)``) and the bad-input shard: a sample kept by one path and skipped
(or skipped for another reason) by the other is listed, and kept images' mean absolute
difference from the PIL path in levels is summarised.

    .venv/bin/python benchmarks/device_decode_check.py --images 512 --rounds 3
    .venv/bin/python benchmarks/device_decode_check.py --photo-size 32 24 --input-size 16
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections import Counter

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=128, help="the job's --batch-size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--corrupted", type=int, default=200, help="corrupted JPEGs compared")
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument(
        "--photo-size", type=int, nargs=2, default=(400, 350), metavar=("W", "H"), help="JPEGs'"
    )
    parser.add_argument(
        "--input-size",
        type=int,
        help="the transform's output side (default: the backbone's); with tiny photos and a "
        "tiny input the device's own work is nil, and what is left is the CPU's per image",
    )
    args = parser.parse_args()

    from pipeline.cache.augment import TransformConfig, resolve_transform, sample_seed
    from pipeline.cache.backbone import describe_backbone
    from pipeline.cache.decode_pool import build_prepare
    from pipeline.cache.device_decode import DeviceDecoder
    from pipeline.cache.samples import iter_samples
    from pipeline.demo.data import bad_samples, write_photo_shards

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data_config = describe_backbone(args.backbone, "random").data_config
    size = None if args.input_size is None else (3, args.input_size, args.input_size)
    resolved = resolve_transform(TransformConfig(decode="device", input_size=size), data_config)
    prepare = build_prepare(resolved)
    decoder = DeviceDecoder([resolved], device)
    with tempfile.TemporaryDirectory() as tmp:
        (shard,) = write_photo_shards(
            tmp, shards=1, per_shard=args.images, size=tuple(args.photo_size)
        )
        samples = list(iter_samples(shard, counts=Counter()))
    tasks = [(s.key, s.image, sample_seed(0, 0, s.key)) for s in samples]
    print(f"device {device}, {len(tasks)} JPEGs, chunks of {args.chunk}, {args.backbone}")

    def on_device() -> None:
        for start in range(0, len(tasks), args.chunk):
            decoder.prepare(tasks[start : start + args.chunk])
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def with_pil() -> None:
        for task in tasks:
            _pil(prepare, task)

    on_device()  # warm-up: nvJPEG's handle, the kernels, the allocator
    for name, run in (("device", on_device), ("pil", with_pil)):
        rates, cpu = [], []
        for _ in range(args.rounds):
            wall, thread = time.perf_counter(), time.thread_time()
            run()
            rates.append(len(tasks) / (time.perf_counter() - wall))
            cpu.append((time.thread_time() - thread) / len(tasks) * 1000)
        print(
            f"{name:>6}: {statistics.median(rates):,.0f} images/s (rounds "
            f"{', '.join(f'{r:,.0f}' for r in rates)}); calling thread "
            f"{statistics.median(cpu):.3f} CPU-ms per image"
        )

    rng = random.Random(0)
    compared = [
        (f"corrupt-{i}", _corrupted(rng, tasks[i % len(tasks)][1]), i)
        for i in range(args.corrupted)
    ]
    compared += [
        (sample.key, data, 0)
        for sample in bad_samples(size=64)
        for extension, data in sample.files.items()
        if extension in ("png", "jpg", "webp")
    ]
    _agreement(decoder, prepare, compared + tasks[:32])


def _pil(prepare, task) -> np.ndarray | str:
    """The PIL path's uint8 image for ``task``, or its skip reason."""
    from pipeline.cache.decode_pool import prepare_image
    from pipeline.cache.skips import BadSample

    key, data, seed = task
    try:
        return prepare_image(*prepare, data, key, seed)
    except BadSample as bad:
        return bad.reason.value


def _corrupted(rng: random.Random, data: bytes) -> bytes:
    """``data`` with bytes flipped, zeroed or cut, past its header."""
    corrupt = bytearray(data)
    kind, at = rng.choice(("flip", "zero", "cut")), rng.randrange(600, len(corrupt) - 16)
    if kind == "flip":
        corrupt[at : at + 16] = bytes(b ^ 0xFF for b in corrupt[at : at + 16])
    elif kind == "zero":
        corrupt[at : at + 200] = bytes(len(corrupt[at : at + 200]))
    else:
        corrupt = corrupt[:at] + b"\xff\xd9"
    return bytes(corrupt)


def _agreement(decoder, prepare, tasks) -> None:
    """Print where the two paths disagree on keeping a sample, and the pixel differences."""
    from pipeline.cache.decode_pool import Skip

    differences, disagreements = [], []
    for task, on_device in zip(tasks, decoder.prepare(tasks), strict=True):
        pil = _pil(prepare, task)
        device = on_device.reason.value if isinstance(on_device, Skip) else on_device[0]
        if isinstance(pil, str) or isinstance(device, str):
            if pil != device:
                said = [
                    "kept" if isinstance(x, (np.ndarray, torch.Tensor)) else x
                    for x in (pil, device)
                ]
                disagreements.append(f"{task[0]}: pil {said[0]}, device {said[1]}")
            continue
        differences.append(float(np.abs(device.cpu().numpy().astype(int) - pil).mean()))
    alike = len(tasks) - len(disagreements)
    print(f"agreement: {alike} of {len(tasks)} samples kept or skipped alike")
    for line in disagreements[:20]:
        print(f"  {line}")
    if differences:
        quantiles = np.quantile(differences, [0.5, 0.95, 1.0])
        print(
            f"kept images, mean |device - pil| in levels: median {quantiles[0]:.2f}, "
            f"95th percentile {quantiles[1]:.2f}, max {quantiles[2]:.2f} "
            f"({len(differences)} images)"
        )


if __name__ == "__main__":
    main()
