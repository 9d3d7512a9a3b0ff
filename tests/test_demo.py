"""The demo end to end (what `make demo` runs, at a smaller size): its caches, its report, and
the exported head on a stock timm model."""

from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import timm
import torch
from rich.console import Console

from jobs.config import load_job_config
from jobs.run.cache import run_cache
from jobs.run.cache_config import CacheJobConfig
from jobs.run.demo import BACKBONE, DEMO_CACHE, ZERO_SHOT, DemoConfig, run_demo
from pipeline.cache.augment import build_transform
from pipeline.cache.backbone import read_state_dict
from pipeline.cache.decode import decode_image
from pipeline.cache.samples import iter_samples
from pipeline.demo.sets import GLYPH_LABEL
from pipeline.head.export import attach_head, load_head
from schemas import read_provenance, validate_report

pytestmark = pytest.mark.slow

KINDS = ("blur", "noise")
STRENGTHS = (0.5, 1.0)


class ActorStarts(logging.Handler):
    """Counts the cache actors started (each says it is ready) while it is installed."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.getMessage().startswith("cache actor ready")


@pytest.fixture(scope="module")
def actor_starts():
    """The cache actors the ``demo`` fixture's run started."""
    return ActorStarts()


@pytest.fixture(scope="module")
def demo(tmp_path_factory, actor_starts):
    config = DemoConfig(
        output=tmp_path_factory.mktemp("demo"),
        glyph_classes=20,
        glyph_images=10,
        backbone_epochs=15,
        cache_epochs=2,
        head_episodes=4,
        kinds=KINDS,
        strengths=STRENGTHS,
        clean_images=40,
    )
    logger = logging.getLogger("pipeline.cache.distribute")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(actor_starts)
    try:
        result = run_demo(config)
    finally:
        logger.removeHandler(actor_starts)
        logger.setLevel(level)
    yield config.output, result
    ray.shutdown()


def rows(cache) -> dict[str, np.ndarray]:
    columns = ["key", "label", "embedding", "loss", "ambiguity"]
    units = sorted(cache.glob("epoch=*/*.parquet"))
    table = pa.concat_tables(pq.read_table(unit, columns=columns) for unit in units)
    return {
        "key": np.array(table.column("key").to_pylist()),
        "label": table.column("label").to_numpy(),
        "embedding": np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
        "loss": table.column("loss").to_numpy(zero_copy_only=False),
        "ambiguity": table.column("ambiguity").to_numpy(zero_copy_only=False),
    }


def test_every_report_section_is_present_and_well_formed(demo):
    output, result = demo
    report = json.loads((output / "report" / "report.json").read_text())
    validate_report(report)
    by_name = {d["name"]: d for d in report["datasets"]}
    assert set(by_name) == {ZERO_SHOT, "upstream"}
    assert by_name[ZERO_SHOT]["label_space"] == "dataset"
    assert by_name["upstream"]["label_space"] == "classifier"
    assert by_name[ZERO_SHOT]["classes"] == 4 and by_name["upstream"]["classes"] == 6
    for name, entry in by_name.items():
        assert set(entry["sources"]) == {"head", "entropy", "1-max_prob", "inverse_norm", "random"}
        assert 0 <= entry["recall_at_1"] <= 1
        assert entry["ambiguity"]["origin"] == "column", name
        assert entry["ambiguity"]["ambiguous"] > 0 and entry["ambiguity"]["clear"] > 0
        for source in entry["sources"].values():
            assert 0 <= source["r_auroc"] <= 1 and 0 <= source["ambiguity_auroc"] <= 1
            assert set(source["safe_retrieval"]) == {"per_class", "class_agnostic"}
    assert by_name[ZERO_SHOT]["sources"]["head"]["id_vs_ood_auroc"] is not None
    assert by_name["upstream"]["sources"]["head"]["classifier_auroc"] is not None
    assert set(report["deterioration"]["kinds"]) == set(KINDS)
    for curve in report["deterioration"]["kinds"].values():
        assert curve["strengths"] == [0.0, *STRENGTHS]
    assert report["tsne"]["dataset"] == ZERO_SHOT
    text = (output / "report" / "report.md").read_text()
    for heading in ("R-AUROC", "ID vs OOD", "ambiguity", "eterioration", "etrieval", "t-SNE"):
        assert heading in text, heading
    assert result.heldout_recall_at_1 > 0.25, "well above chance (1/6) even when small"


def test_eval_caches_keep_their_label_spaces_and_ambiguity(demo):
    output, _ = demo
    zero_shot = rows(output / "cache" / "zero-shot")
    upstream = rows(output / "cache" / "upstream")
    assert set(zero_shot["label"]) == {6, 7, 8, 9}, "zero-shot labels stay the dataset's own"
    assert np.isnan(zero_shot["loss"]).all() and np.isfinite(upstream["loss"]).all()
    assert set(upstream["label"]) == set(range(6))
    for cache in (zero_shot, upstream):
        degraded = cache["ambiguity"] > 0
        assert 0.2 < degraded.mean() < 0.8 and (cache["ambiguity"][~degraded] == 0).all()


def test_deterioration_curves_come_from_really_deteriorated_images(demo):
    output, result = demo
    clean = rows(output / "cache" / "clean")
    for kind in KINDS:
        distances = []
        for strength in STRENGTHS:
            cache = output / "cache" / f"{kind}-{strength:g}"
            schema = pq.read_schema(next(cache.glob("epoch=0000/*.parquet")))
            deterioration = read_provenance(schema)["transform"]["deterioration"]
            assert deterioration == {"kind": kind, "strength": strength}
            moved = rows(cache)
            assert (moved["key"] == clean["key"]).all()
            change = moved["embedding"].astype(np.float32) - clean["embedding"]
            distances.append(float(np.linalg.norm(change, axis=1).mean()))
        assert 0 < distances[0] < distances[1], (kind, distances)
    assert result.report["deterioration"]["caches"][0].endswith("clean")


def test_deterioration_caches_come_from_one_pass_and_equal_a_run_of_their_own(
    demo, actor_starts, tmp_path
):
    """The clean set and its deteriorations are cached in one pass (an actor each took the
    demo longer than their rows), and a deteriorated cache holds, bit for bit, the rows that
    `pvu cache --deteriorate` of its own writes."""
    output, _ = demo
    assert actor_starts.count == 4, "train, upstream, zero-shot, clean and its deteriorations"
    alone = load_job_config(
        CacheJobConfig,
        str(DEMO_CACHE),
        shards=str(output / "shards" / "clean"),
        weights=str(output / "backbone" / "backbone.safetensors"),
        output=str(tmp_path / "noise-1"),
        augment="eval",
        epochs=1,
        deteriorate="noise:1",
    )
    assert not run_cache(alone).failed
    ours, theirs = rows(output / "cache" / "noise-1"), rows(tmp_path / "noise-1")
    for column in ours:
        assert np.array_equal(ours[column], theirs[column], equal_nan=column != "key"), column


def test_figures_are_written_and_the_html_opens_offline(demo):
    output, result = demo
    report = output / "report"
    figures = json.loads((report / "report.json").read_text())["figures"]
    for name in ("r_auroc.png", "id_vs_ood.png", "deterioration.png", "tsne.png"):
        assert name in figures
    for name in figures:
        data = (report / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 2000, name
    page = (report / "tsne.html").read_text()
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page), "nothing to fetch"
    parser = HTMLParser()
    parser.feed(page)
    parser.close()
    assert page.count("<circle") == result.report["tsne"]["points"]
    assert "<title>" in page


def test_attached_head_equals_the_head_on_cached_eval_embeddings(demo):
    output, _ = demo
    weights = str(output / "backbone" / "backbone.safetensors")
    unit = next((output / "cache" / "upstream").glob("epoch=0000/*.parquet"))
    shard = output / "shards" / "upstream" / unit.name.replace(".parquet", ".tar")
    table = pq.read_table(unit)
    cached = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    head, document = load_head(str(output / "head"))
    with torch.no_grad():
        expected = head(torch.from_numpy(cached.astype(np.float32))).numpy()

    classes = GLYPH_LABEL + 20  # digits 0-5, 6-9 never trained, then the 20 glyphs
    model = timm.create_model(BACKBONE, pretrained=False, num_classes=classes)
    model.load_state_dict(read_state_dict(weights))
    attached = attach_head(model.eval(), str(output / "head"))
    transform = build_transform(read_provenance(table.schema)["transform"])
    samples = list(iter_samples(str(shard), counts=Counter()))
    images = torch.stack([transform(decode_image(sample.image)) for sample in samples])
    with torch.no_grad():
        out = attached(images)
    assert table.column("key").to_pylist() == [sample.key for sample in samples]
    np.testing.assert_allclose(out["uncertainty"].numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(table.column("pred").to_numpy(), out["logits"].argmax(1))
    assert document["backbone"] == BACKBONE


def test_a_report_without_an_r_auroc_is_shown_as_such(tmp_path):
    """A set where every (or no) 1-NN is right has no R-AUROC (null in the report): the demo's
    table and its claim raised TypeError on it, after the whole run."""
    from jobs.run.demo import DemoResult, demo_table

    errors = {"class_agnostic": {"full": 0.0, "clean_database": 0.0}}
    sources = {name: {"r_auroc": None, "safe_retrieval": errors} for name in ("head", "entropy")}
    sources["1-max_prob"] = {"r_auroc": 0.6, "safe_retrieval": errors}
    report = {
        "sources": [{"name": name} for name in sources],
        "datasets": [{"name": ZERO_SHOT, "n": 3, "recall_at_1": 1.0, "sources": sources}],
    }
    demo = DemoResult(report, tmp_path, heldout_recall_at_1=1.0)
    assert not demo.claim_holds()
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(demo_table(demo))
    text = console.export_text()
    assert text.count("n/a") == 2 and "0.600" in text and "does NOT hold" in text
