"""Uncertainty sources, side by side: exported heads and the baselines that need no training.

Higher means more uncertain for every source:

- ``head`` (or ``head:<dir name>`` for several): the exported head on the cached embedding;
- ``entropy``: the classifier's softmax entropy (the paper's appendix B baseline);
- ``1-max_prob``: one minus the classifier's largest softmax probability;
- ``inverse_norm``: one over the embedding's L2 norm;
- ``random``: uniform noise seeded by the seed, the set's keys and deterioration (the chance
  line).
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch

from pipeline.evaluate.evalset import EvalSet
from pipeline.head.export import image_input, load_head
from pipeline.head.model import UncertaintyHead

log = logging.getLogger(__name__)

BASELINES = ("entropy", "1-max_prob", "inverse_norm", "random")


@dataclass(eq=False)
class LoadedHead:
    """An exported head ready to score embeddings."""

    name: str
    path: str
    head: UncertaintyHead
    document: dict[str, Any]


def load_heads(paths: list[str], *, device: str = "cpu") -> list[LoadedHead]:
    """The heads exported to ``paths``, named ``head`` (one) or ``head:<folder>`` (several)."""
    heads = []
    for path in paths:
        head, document = load_head(path)
        heads.append(LoadedHead("", path, head.to(device), document))
    names = [PurePosixPath(h.path.rstrip("/")).name or h.path for h in heads]
    for i, h in enumerate(heads):
        h.name = "head" if len(heads) == 1 else f"head:{names[i]}"
        if len(heads) > 1 and names.count(names[i]) > 1:
            h.name = f"head:{names[i]}#{i + 1}"
    return heads


#: Provenance fields that name the backbone whose embeddings a cache holds (and a head learned).
BACKBONE_FIELDS = ("backbone", "weights_digest", "model_kwargs")


def shown(value: Any) -> str:
    """A provenance value in a message; none where unset (model_kwargs: timm's defaults)."""
    return "none (timm's defaults)" if value is None else repr(value)


def check_head_fits(
    head: LoadedHead, name: str, url: str, provenance: dict[str, Any], dim: int
) -> None:
    """Refuse a head trained for another backbone or embedding width than the cache ``name``
    at ``url`` (its ``provenance`` and embedding width ``dim``); warn of one that learned from
    images of another size or normalisation, as attaching it to a model warns."""
    doc = head.document
    if doc["embedding_dim"] != dim:
        raise ValueError(
            f"head {head.path} expects {doc['embedding_dim']}-d embeddings, but cache "
            f"{url} ({name}) has {dim}-d ones"
        )
    for field in BACKBONE_FIELDS:
        if doc.get(field) != provenance.get(field):
            raise ValueError(
                f"head {head.path} was trained for {field} {shown(doc.get(field))}, but cache "
                f"{url} ({name}) has {shown(provenance.get(field))}"
            )
    learned, given = doc.get("input"), image_input(provenance)
    if learned and given and learned != given:
        log.warning(
            "head %s learned from embeddings of images %s, but cache %s (%s) holds those of "
            "images %s: its uncertainties there are outside what it learned",
            *(head.path, json.dumps(learned), url, name, json.dumps(given)),
        )


def head_uncertainty(
    head: LoadedHead, embedding: np.ndarray, *, device: str = "cpu", batch_rows: int = 8192
) -> np.ndarray:
    """``head`` on each embedding row (as cached, read as float32), as float32."""
    out = np.empty(len(embedding), np.float32)
    with torch.inference_mode():
        for start in range(0, len(embedding), batch_rows):
            part = torch.from_numpy(embedding[start : start + batch_rows].astype(np.float32))
            out[start : start + len(part)] = head.head(part.to(device)).float().cpu().numpy()
    return out


#: Rows whose norms ``inverse_norm`` computes at once (~50 MB of float64 at D=768).
NORM_CHUNK_ROWS = 8192


def baseline_uncertainty(name: str, data: EvalSet, *, seed: int = 0) -> np.ndarray:
    """The training-free baseline ``name`` (one of ``BASELINES``) for every row of ``data``."""
    if name == "entropy":
        return data.entropy.astype(np.float32)
    if name == "1-max_prob":
        return (1.0 - data.max_prob).astype(np.float32)
    if name == "inverse_norm":  # in float64, a chunk at a time (a copy of all: 8x the cache's)
        chunks = range(0, len(data.embedding), NORM_CHUNK_ROWS)
        norm = np.concatenate(
            [np.linalg.norm(data.embedding[i : i + NORM_CHUNK_ROWS].astype(np.float64), axis=1)
             for i in chunks] or [np.empty(0)]
        )  # fmt: skip
        inverse = 1.0 / np.maximum(norm, np.finfo(np.float64).tiny)  # a zero row: the largest
        return np.minimum(inverse, np.finfo(np.float32).max).astype(np.float32)
    if name == "random":  # per set by its rows and deterioration, wherever its cache lives
        rows = "\n".join(map(str, data.keys)) + json.dumps(data.deterioration, sort_keys=True)
        stream = zlib.crc32(rows.encode())
        return np.random.default_rng([seed, stream]).random(len(data)).astype(np.float32)
    raise ValueError(f"unknown baseline {name!r}: expected one of {', '.join(BASELINES)}")


def uncertainties(
    data: EvalSet, heads: list[LoadedHead], *, device: str = "cpu", seed: int = 0
) -> dict[str, np.ndarray]:
    """Every source's uncertainty for every row of ``data``, heads first."""
    scores = {}
    for head in heads:
        scores[head.name] = head_uncertainty(head, data.embedding, device=device)
        if not np.isfinite(scores[head.name]).all():
            raise ValueError(
                f"head {head.name} gives NaN/inf uncertainties on {data.name}: its weights are "
                "not finite (training diverged?); train it again with a lower --lr"
            )
    for name in BASELINES:
        scores[name] = baseline_uncertainty(name, data, seed=seed)
    return scores
