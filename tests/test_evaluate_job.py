"""``pvu evaluate`` end to end on real eval caches: report contract, figures, offline HTML."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.cache.writer import PARQUET_OPTIONS, to_record_batch
from pipeline.head.export import export_head
from pipeline.head.model import HeadConfig, create_head
from schemas import cache_schema, validate_report, with_provenance

DIM = 16
BACKBONE = {"backbone": "synthetic", "weights_digest": "sha256:eval-test"}


def write_eval_cache(
    url: str,
    embedding: np.ndarray,
    labels: np.ndarray,
    *,
    keys: list[str] | None = None,
    transform: dict[str, Any] | None = None,
    shards: int = 2,
) -> str:
    """An eval cache (epoch 0, manifest-less) of ``embedding`` rows with ``labels`` at ``url``."""
    n = len(labels)
    keys = keys or [f"img-{i:06d}" for i in range(n)]
    rng = np.random.default_rng(n)
    logits = rng.standard_normal((n, 5))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    provenance = {**BACKBONE, "transform": transform or {"is_training": False}, "seed": 0}
    schema = with_provenance(cache_schema(embedding.shape[1]), provenance)
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(f"{root}/epoch=0000", exist_ok=True)
    for shard, rows in enumerate(np.array_split(np.arange(n), shards)):
        batch = to_record_batch(
            schema,
            keys=[keys[i] for i in rows],
            shard=f"shard-{shard}",
            epoch=0,
            labels=labels[rows],
            outputs={
                "embedding": embedding[rows],
                "loss": -np.log(probs[rows, 0]),
                "pred": probs[rows].argmax(1),
                "max_prob": probs[rows].max(1),
                "entropy": -(probs[rows] * np.log(probs[rows])).sum(1),
            },
        )
        with fs.open(f"{root}/epoch=0000/shard-{shard}.parquet", "wb") as handle:
            pq.write_table(pa.Table.from_batches([batch]), handle, **PARQUET_OPTIONS)
    return url


def clustered(n: int, classes: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class clusters with per-row noise: some rows sit between clusters (1-NN errors)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, DIM)) * 2
    noise = rng.uniform(0.2, 3.0, (n, 1))
    return (centres[labels] + noise * rng.standard_normal((n, DIM))).astype(np.float32), labels


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("head") / "head")
    head = create_head(HeadConfig(embedding_dim=DIM, hidden=(8,)), seed=0)
    export_head(head, out, loss="ranking", **BACKBONE)
    return out


def test_evaluate_writes_a_valid_report(tmp_path: Path, head_dir: str) -> None:
    zero_shot = write_eval_cache(str(tmp_path / "zs"), *clustered(300, 4, seed=1))
    up = write_eval_cache(str(tmp_path / "up"), *clustered(200, 5, seed=2))
    report = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        f"evaluate --head {head_dir} --dataset zs={zero_shot} --upstream {up} "
        f"--report {report} --tsne-points 120".split(),
    )
    assert result.exit_code == 0, result.output
    document = json.loads((report / "report.json").read_text())
    validate_report(document)
    names = [d["name"] for d in document["datasets"]]
    assert names == ["zs", "upstream"]
    html = (report / "tsne.html").read_text()
    assert "<circle" in html and not re.search(r"https?://", html)
    for figure in document["figures"]:
        assert (report / figure).stat().st_size > 1000
