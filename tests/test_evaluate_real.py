"""``pvu evaluate`` on caches the real unit code wrote from real images, deteriorated or not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support import BACKBONE, make_runner
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.cache.backbone import describe_backbone
from pipeline.cache.deteriorate import KINDS, Deterioration
from pipeline.cache.unit import Unit
from pipeline.demo.data import write_digit_shards
from pipeline.head.export import export_head
from pipeline.head.model import HeadConfig, create_head
from schemas import validate_report

STRENGTHS = (0.5, 1.0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_digit_shards(str(tmp_path_factory.mktemp("digits")), shards=2, per_shard=24)


def cache(root: Path, shard: str, **options) -> str:
    """An eval cache of one digit shard, written by the real unit code (resnet10t, 32x32)."""
    make_runner(str(root), augment="eval", **options).run(Unit(shard, "digits-0000", 0))
    return str(root)


@pytest.mark.slow
def test_report_from_really_deteriorated_caches(tmp_path: Path, shards: list[str]) -> None:
    clean = cache(tmp_path / "clean", shards[0], label_space="dataset")
    upstream = cache(tmp_path / "upstream", shards[1])
    flags = ["--deterioration", clean]
    for kind in KINDS:
        for strength in STRENGTHS:
            worse = Deterioration(kind=kind, strength=strength)
            url = cache(tmp_path / f"{kind}-{strength}", shards[0], deteriorate=worse)
            flags += ["--deterioration", url]
    info = describe_backbone(BACKBONE, "random", input_size=(3, 32, 32))
    head = str(tmp_path / "head")
    export_head(
        create_head(HeadConfig(info.embedding_dim, hidden=(16,)), seed=0),
        head, loss="ranking", backbone=BACKBONE, weights_digest=info.weights_digest,
    )  # fmt: skip
    report = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        ["evaluate", "--head", head, "--dataset", f"digits={clean}", "--upstream", upstream,
         "--report", str(report), *flags],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads((report / "report.json").read_text())
    validate_report(document)
    digits, up = document["datasets"]
    assert (digits["label_space"], up["label_space"]) == ("dataset", "classifier")
    assert digits["classifier_accuracy"] is None and up["classifier_accuracy"] is not None
    assert digits["sources"]["entropy"]["classifier_auroc"] is None
    curves = document["deterioration"]["kinds"]
    assert sorted(curves) == sorted(KINDS)
    for kind, curve in curves.items():
        assert curve["strengths"] == [0.0, *STRENGTHS] and curve["n"] == [24] * 3
        for source, values in curve["sources"].items():
            medians = values["median"]
            # really deteriorated images: the cached uncertainties move away from the clean ones
            if source != "random":
                assert len(set(medians)) == 3, (kind, source, medians)
            assert values["spearman"] in (-1.0, -0.5, 0.5, 1.0)
            assert values["rises"] == (values["spearman"] > 0)
    assert np.isfinite(digits["recall_at_1"]) and digits["n"] == 24
    for figure in document["figures"]:
        assert (report / figure).stat().st_size > 1000
