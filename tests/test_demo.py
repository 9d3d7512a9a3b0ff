"""The demo end to end (what `make demo` runs), then the exported head on a stock timm model."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import timm
import torch

from jobs.cache import CacheJobConfig, run_cache
from jobs.demo import BACKBONE, INPUT_SIZE, run_demo
from pipeline.cache.augment import build_transform
from pipeline.cache.backbone import read_state_dict
from pipeline.cache.decode import decode_image
from pipeline.cache.samples import iter_samples
from pipeline.head.export import attach_head, load_head

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    result = run_demo(output)  # the sizes `make demo` uses
    yield output, result
    ray.shutdown()


def test_trained_head_beats_an_untrained_one_on_held_out_demo_images(demo):
    _, result = demo
    untrained, trained = result.metrics[0], result.metrics[-1]
    assert untrained["episode"] == 0 and trained["episode"] == 30
    assert trained["val_pair_accuracy"] > untrained["val_pair_accuracy"] + 0.03
    assert trained["val_spearman"] > untrained["val_spearman"] + 0.1
    assert result.finished


def test_attached_head_equals_the_head_on_cached_eval_embeddings(demo):
    output, _ = demo
    weights = str(output / "backbone" / "backbone.safetensors")
    shard = str(output / "shards" / "digits-0000.tar")
    config = CacheJobConfig(
        shards=shard,
        backbone=BACKBONE,
        weights=weights,
        augment="eval",
        input_size=INPUT_SIZE,
        output=str(output / "eval-cache"),
    )
    assert not run_cache(config).failed
    table = pq.read_table(output / "eval-cache" / "epoch=0000" / "digits-0000.parquet")
    cached = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    head, document = load_head(str(output / "head"))
    with torch.no_grad():
        expected = head(torch.from_numpy(cached.astype(np.float32))).numpy()

    model = timm.create_model(BACKBONE, pretrained=False, num_classes=10)
    model.load_state_dict(read_state_dict(weights))
    attached = attach_head(model.eval(), str(output / "head"))
    manifest_transform = run_cache_transform(output / "eval-cache")
    transform = build_transform(manifest_transform)
    from collections import Counter

    samples = list(iter_samples(shard, counts=Counter()))
    images = torch.stack([transform(decode_image(sample.image)) for sample in samples])
    with torch.no_grad():
        out = attached(images)
    assert table.column("key").to_pylist() == [sample.key for sample in samples]
    np.testing.assert_allclose(out["uncertainty"].numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(table.column("pred").to_numpy(), out["logits"].argmax(1).numpy())
    assert document["backbone"] == BACKBONE


def run_cache_transform(cache) -> dict:
    import json

    return json.loads((cache / "_manifest.json").read_text())["provenance"]["transform"]
