"""The demo's data, split as the paper's setting is: pretraining classes and unseen classes.

scikit-learn's digits and rendered glyphs (``pipeline.demo.glyphs``: letters and symbols made
the way the digits were, 8x8 counts of a 32x32 bitmap) become four sets of WebDataset shards:

- ``train``: digits of the pretraining classes (0-5 by default), each drawn ``copies`` times in
  new colours, and ``glyph_images`` renderings of each of ``glyph_classes`` glyph classes
  (labels 10, 11, ...); the backbone is trained on them and the head on their cached
  augmentations. Six digit classes alone give the head nothing class-agnostic to learn: the
  paper's transfer rests on the thousands of classes of ImageNet-21k;
- ``upstream``: held-out digits of classes 0-5 (never trained on), the ImageNet-validation
  of this miniature;
- ``zero_shot``: every digit of the other classes (6-9), which neither backbone nor head saw,
  and which no glyph class looks like;
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
from pipeline.demo.glyphs import glyph_alphabet, render_glyph

AMBIGUITY_KEY = "ambiguity"
#: Label of the first glyph class; 6-9 stay the zero-shot digits' own.
GLYPH_LABEL = 10


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
    glyph_classes: int = 100
    glyph_images: int = 40
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

    def pick(indices: np.ndarray) -> list[tuple[np.ndarray, int]]:
        return [(digits.images[i], int(digits.target[i])) for i in indices]

    glyphs = _glyphs(config, rng)
    sets = {
        "train": ([*pick(np.tile(train, config.copies)), *glyphs], config.degraded),
        "upstream": (pick(upstream), config.degraded),
        "zero_shot": (pick(zero_shot), config.degraded),
        "clean": (pick(zero_shot[: config.clean_images]), 0.0),
    }
    urls = {
        name: _write_set(join(out_dir, name), name, images, degraded, rng, config)
        for name, (images, degraded) in sets.items()
    }
    classes = (*config.pretraining_classes, *range(GLYPH_LABEL, GLYPH_LABEL + config.glyph_classes))
    return DemoSets(**urls, pretraining_classes=classes)


def _glyphs(config: SetsConfig, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """``glyph_images`` renderings of each of the first ``glyph_classes`` glyphs, shuffled;
    glyph ``i`` is labelled ``GLYPH_LABEL + i``."""
    alphabet = glyph_alphabet(limit=config.glyph_classes)
    if len(alphabet) < config.glyph_classes:
        raise ValueError(
            f"glyph_classes must be at most {len(alphabet)}, got {config.glyph_classes}"
        )
    glyphs = [
        (render_glyph(char, rng), GLYPH_LABEL + label)
        for label, char in enumerate(alphabet)
        for _ in range(config.glyph_images)
    ]
    return [glyphs[i] for i in rng.permutation(len(glyphs))]


def _write_set(
    folder: str,
    name: str,
    images: list[tuple[np.ndarray, int]],
    degraded: float,
    rng: np.random.Generator,
    config: SetsConfig,
) -> list[str]:
    """Shards ``<name>-NNNN.tar`` of the 8x8 ``images`` (pixels, label), a ``degraded`` share
    degraded."""
    samples = []
    for i, (pixels, label) in enumerate(images):
        image = coloured_digit(pixels, config.size, rng)
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
            "cls": b"%d" % label,
            "degradation.json": json.dumps(degradation).encode(),
            AMBIGUITY_KEY: b"%g" % degradation["strength"],
        }
        samples.append((f"{name}-{i:06d}", files))
    return [
        write_shard(join(folder, f"{name}-{n:04d}.tar"), samples[start : start + config.per_shard])
        for n, start in enumerate(range(0, len(samples), config.per_shard))
    ]
