"""The demo's data, split as the paper's setting is: pretraining classes and unseen classes.

scikit-learn's digits become four sets of WebDataset shards:

- ``train``: digits of the pretraining classes (0-5 by default), each drawn ``copies`` times in
  new colours; the backbone is trained on them and the head on their cached augmentations;
- ``upstream``: held-out digits of the same classes (never trained on), the ImageNet-validation
  of this miniature;
- ``zero_shot``: every digit of the other classes (6-9), which neither backbone nor head saw;
- ``clean``: the first zero-shot digits with no degradation, the base of the deterioration
  analysis (paper figure 6).

Real evaluation data is not uniformly clean. A seeded ``degraded`` share of the train, upstream
and zero-shot images is degraded with a random kind (``pipeline.cache.deteriorate``: blur, grey
box, zoom, noise) at a random strength, and each sample records it in two members:
``degradation.json`` (``{"kind": ..., "strength": ...}``, kind null when clean) and
``ambiguity`` (the strength as a number, 0 when clean), which
``pvu cache --ambiguity-key ambiguity`` reads for the ambiguity analysis (figure 7).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.cache.deteriorate import KINDS, Deterioration
from pipeline.demo.data import coloured_digit, encode_image, join, write_shard

AMBIGUITY_KEY = "ambiguity"


@dataclass(frozen=True)
class DemoSets:
    """Shard URLs of each set, and the class split."""

    train: list[str]
    upstream: list[str]
    zero_shot: list[str]
    clean: list[str]
    pretraining_classes: tuple[int, ...]


@dataclass(frozen=True)
class SetsConfig:
    """How the digits are split, coloured and degraded."""

    pretraining_classes: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    held_out: float = 0.3
    copies: int = 2
    size: int = 32
    degraded: float = 0.5
    min_strength: float = 0.2
    clean_images: int = 240
    per_shard: int = 256
    seed: int = 0


def write_demo_sets(out_dir: str, config: SetsConfig = SetsConfig()) -> DemoSets:
    """Write the four sets of shards under ``out_dir`` (``train/``, ``upstream/``, ...)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(config.seed)
    pretraining = np.isin(digits.target, config.pretraining_classes)
    seen = rng.permutation(np.flatnonzero(pretraining))
    cut = round(len(seen) * config.held_out)
    upstream, train = seen[:cut], seen[cut:]
    zero_shot = rng.permutation(np.flatnonzero(~pretraining))
    sets = {
        "train": (np.tile(train, config.copies), config.degraded),
        "upstream": (upstream, config.degraded),
        "zero_shot": (zero_shot, config.degraded),
        "clean": (zero_shot[: config.clean_images], 0.0),
    }
    urls = {
        name: _write_set(join(out_dir, name), name, digits, indices, degraded, rng, config)
        for name, (indices, degraded) in sets.items()
    }
    return DemoSets(**urls, pretraining_classes=tuple(config.pretraining_classes))


def _write_set(
    folder: str,
    name: str,
    digits,
    indices: np.ndarray,
    degraded: float,
    rng: np.random.Generator,
    config: SetsConfig,
) -> list[str]:
    """Shards ``<name>-NNNN.tar`` of the digits at ``indices``, a ``degraded`` share degraded."""
    samples = []
    for i, index in enumerate(indices):
        image = coloured_digit(digits.images[index], config.size, rng)
        degradation = {"kind": None, "strength": 0.0}
        if rng.random() < degraded:
            kind = str(rng.choice(KINDS))
            strength = round(float(rng.uniform(config.min_strength, 1.0)), 3)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng.integers(2**31)))  # the noise kind draws from torch
                image = Deterioration(kind=kind, strength=strength)(image)
            degradation = {"kind": kind, "strength": strength}
        files = {
            "png": encode_image(image.resize((config.size, config.size)), "png"),
            "cls": b"%d" % digits.target[index],
            "degradation.json": json.dumps(degradation).encode(),
            AMBIGUITY_KEY: b"%g" % degradation["strength"],
        }
        samples.append((f"{name}-{i:06d}", files))
    return [
        write_shard(join(folder, f"{name}-{n:04d}.tar"), samples[start : start + config.per_shard])
        for n, start in enumerate(range(0, len(samples), config.per_shard))
    ]
