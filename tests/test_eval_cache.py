"""Eval caches (issue 6): the dataset's own label space, per-sample ambiguity, deteriorations."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from support import SMALL_BACKBONE_FLAGS, make_runner
from typer.testing import CliRunner

from jobs.cli import app
from jobs.run.cache_config import CacheJobConfig
from pipeline.cache.augment import build_transform
from pipeline.cache.backbone import create_backbone_model
from pipeline.cache.decode import decode_image
from pipeline.cache.deteriorate import KINDS, Deterioration
from pipeline.cache.index import open_cache
from pipeline.cache.samples import iter_samples, parse_ambiguity
from pipeline.cache.unit import Unit
from pipeline.demo.data import write_digit_shards, write_shard
from schemas import PROVENANCE_KEY, read_provenance

#: Each shard label is shifted this far: far beyond the 1000 classes of the backbone.
SHIFT = 20_000
AMBIGUITY = {  # member bytes -> the ambiguity column's value
    b"0.25": 0.25,
    b"[1, 1, 2]": 0.5,
    b'{"cat": 3, "dog": 1}': 0.25,
    b"[0, 0, 7]": 0.0,
    b"not a number": None,
    b"[-1, 2]": None,
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    return write_digit_shards(str(tmp_path_factory.mktemp("digits")), shards=1, per_shard=12)[0]


@pytest.fixture(scope="module")
def relabelled(digits, tmp_path_factory) -> str:
    """The same images with labels beyond the classifier and an ``amb`` member on most."""
    values = list(AMBIGUITY)
    samples = []
    for i, sample in enumerate(iter_samples(digits, counts=Counter())):
        files = {"png": sample.image, "cls": b"%d" % (sample.label + SHIFT)}
        if i < len(values):
            files["amb"] = values[i]
        samples.append((sample.key, files))
    return write_shard(str(tmp_path_factory.mktemp("relabelled") / "big-0000.tar"), samples)


def read_rows(root, relpath: str) -> pa.Table:
    return pq.read_table(f"{root}/{relpath}")


def test_dataset_space_keeps_every_label_and_the_classifier_baselines(tmp_path, digits, relabelled):
    own = make_runner(
        str(tmp_path / "own"), augment="eval", label_space="dataset", ambiguity_key="amb"
    )
    result = own.run(Unit(relabelled, "big-0000", 0))
    table = read_rows(tmp_path / "own", result.relpath)
    labels = [s.label for s in iter_samples(relabelled, counts=Counter())]
    assert result.skipped == {} and table.num_rows == 12
    assert table.column("label").to_pylist() == labels and min(labels) >= SHIFT
    assert table.column("loss").null_count == 12, "no loss against classes the head lacks"
    assert read_provenance(table.schema)["label_space"] == "dataset"

    clean = make_runner(str(tmp_path / "head"), augment="eval")  # the classifier's own space
    reference = read_rows(tmp_path / "head", clean.run(Unit(digits, "big-0000", 0)).relpath)
    for column in ("embedding", "pred", "max_prob", "entropy"):
        assert table.column(column).equals(reference.column(column)), column
    assert reference.column("loss").null_count == 0

    expected = list(AMBIGUITY.values()) + [None] * (12 - len(AMBIGUITY))
    assert table.column("ambiguity").to_pylist() == expected
    assert reference.column("ambiguity").null_count == 12, "no --ambiguity-key, no ambiguity"


def test_an_ambiguity_key_no_sample_has_is_named(tmp_path, relabelled, caplog):
    """A misspelled --ambiguity-key gave an all-null column without a word, and the key is the
    cache's provenance: a rerun with the right one is refused as another cache."""
    runner = make_runner(
        str(tmp_path), augment="eval", label_space="dataset", ambiguity_key="ambig"
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.cache.unit"):
        result = runner.run(Unit(relabelled, "big-0000", 0))
    assert result.rows == 12
    assert "none of its 12 sample(s) has a readable 'ambig' member (--ambiguity-key)" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.cache.unit"):
        make_runner(
            str(tmp_path / "right"), augment="eval", label_space="dataset", ambiguity_key="amb"
        ).run(Unit(relabelled, "big-0000", 0))
    assert "--ambiguity-key" not in caplog.text


def test_classifier_space_still_refuses_labels_outside_the_head(tmp_path, relabelled):
    runner = make_runner(str(tmp_path), augment="eval", label_space="classifier")
    result = runner.run(Unit(relabelled, "big-0000", 0))
    assert result.rows == 0 and result.skipped == {"label_outside_head": 12}


def test_label_space_defaults_and_remap_in_the_dataset_space_is_refused(tmp_path, digits):
    remap = tmp_path / "remap.json"
    remap.write_text("[0, 1, 2]")
    base = {"shards": digits, "backbone": "resnet10t", "output": str(tmp_path / "c")}
    assert CacheJobConfig(**base).resolved_label_space == "classifier"
    assert CacheJobConfig(**base, augment="eval").resolved_label_space == "dataset"
    upstream = CacheJobConfig(
        **base, augment="eval", label_space="classifier", label_remap=str(remap)
    )
    assert upstream.resolved_label_space == "classifier"

    args = ["cache", "--shards", digits, "--output", str(tmp_path / "c"), *SMALL_BACKBONE_FLAGS]
    for extra in (["--augment", "eval"], ["--label-space", "dataset"]):
        result = CliRunner().invoke(
            app, [*args, *extra, "--label-remap", str(remap)], terminal_width=200
        )
        assert result.exit_code == 2, result.output
        assert "--label-remap" in result.output and "dataset" in result.output
    assert not (tmp_path / "c").exists(), "refused before anything ran"


def test_train_head_refuses_a_cache_without_losses_naming_it(tmp_path, relabelled):
    cache = tmp_path / "zero-shot-cache"
    make_runner(str(cache), augment="eval", label_space="dataset").run(
        Unit(relabelled, "big-0000", 0)
    )
    with pytest.raises(ValueError, match=r"zero-shot-cache.*--label-space dataset"):
        open_cache([str(cache)])
    assert open_cache([str(cache)], need_loss=False).rows == 12  # evaluation reads it
    result = CliRunner().invoke(
        app,
        ["train-head", "--cache", str(cache), "--output", str(tmp_path / "head")],
        terminal_width=300,
    )
    assert result.exit_code == 2
    assert str(cache) in result.output.replace("\n", "") and "no losses" in result.output


def test_version_1_caches_stay_readable_and_label_spaces_do_not_mix(tmp_path, digits, relabelled):
    train = make_runner(str(tmp_path / "v2"))
    relpath = train.run(Unit(digits, "digits-0000", 0)).relpath
    table = read_rows(tmp_path / "v2", relpath)
    provenance = read_provenance(table.schema)
    provenance.update(schema_version=1)
    del provenance["label_space"]
    v1 = table.drop_columns(["ambiguity"]).replace_schema_metadata(
        {PROVENANCE_KEY: json.dumps(provenance).encode()}
    )
    (tmp_path / "v1" / "epoch=0000").mkdir(parents=True)
    pq.write_table(v1, tmp_path / "v1" / relpath)
    index = open_cache([str(tmp_path / "v1")])
    assert index.rows == 12 and index.provenance["label_space"] == "classifier"

    other = tmp_path / "dataset"
    make_runner(str(other), label_space="dataset").run(Unit(relabelled, "big-0000", 0))
    with pytest.raises(ValueError, match="label_space differs"):
        open_cache([str(tmp_path / "v2"), str(other)], need_loss=False)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b" 3\n", 3.0),
        (b"0.5", 0.5),
        (b"[0.2, 0.8]", pytest.approx(0.2)),
        (b"[5]", 0.0),
        (b"{}", None),
        (b"[0, 0]", None),
        (b"NaN", None),
        (b'"0.5"', None),
        (b"true", None),
        (None, None),
        (b"", None),
    ],
)
def test_ambiguity_rule(data, expected):
    assert parse_ambiguity(data) == expected


def _digit_image(digits: str) -> Image.Image:
    sample = next(iter_samples(digits, counts=Counter()))
    return decode_image(sample.image, key=sample.key)


@pytest.mark.parametrize("kind", KINDS)
def test_each_deterioration_grows_with_strength_and_is_deterministic(kind, digits):
    image = _digit_image(digits)
    clean = np.asarray(image, np.float32)

    def changed(strength: float) -> float:
        """Mean pixel change; for zoom, the share of the image cropped away."""
        torch.manual_seed(1)
        out = Deterioration(kind=kind, strength=strength)(image)
        if kind == "zoom":
            return 1 - out.width * out.height / (image.width * image.height)
        return float(np.abs(np.asarray(out, np.float32) - clean).mean())

    levels = [changed(s) for s in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert levels[0] == 0
    assert levels == sorted(set(levels)), levels
    assert changed(0.5) == changed(0.5)


def test_deterioration_flag_is_parsed_checked_and_recorded(tmp_path, digits):
    assert Deterioration.parse("zoom:0.75") == Deterioration(kind="zoom", strength=0.75)
    for bad in ("blur", "smudge:0.5", "blur:x", "blur:1.5"):
        with pytest.raises(ValueError, match="--deteriorate"):
            Deterioration.parse(bad)
    base = {"shards": digits, "backbone": "resnet10t", "output": str(tmp_path)}
    config = CacheJobConfig(**base, augment="eval", deteriorate="box:0.5")
    assert config.transform_config().deteriorate == Deterioration(kind="box", strength=0.5)
    with pytest.raises(ValueError, match="--augment eval"):
        CacheJobConfig(**base, deteriorate="box:0.5")


def test_deteriorated_eval_cache_holds_the_deteriorated_images(tmp_path, digits):
    """The cached rows are the backbone's output on really deteriorated images, and the
    embeddings move further from the clean ones as the strength grows."""
    model = create_backbone_model("resnet10t", "random")
    clean = make_runner(str(tmp_path / "clean"), augment="eval")
    reference = read_rows(tmp_path / "clean", clean.run(Unit(digits, "d", 0)).relpath)
    base = np.stack(reference.column("embedding").to_numpy(zero_copy_only=False))
    distances = []
    for strength in (0.25, 0.5, 1.0):
        blur = Deterioration(kind="blur", strength=strength)
        runner = make_runner(str(tmp_path / f"blur{strength}"), augment="eval", deteriorate=blur)
        assert runner.settings.transform["deterioration"] == {"kind": "blur", "strength": strength}
        table = read_rows(tmp_path / f"blur{strength}", runner.run(Unit(digits, "d", 0)).relpath)
        assert read_provenance(table.schema)["transform"]["deterioration"]["strength"] == strength
        cached = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        distances.append(float(np.linalg.norm(cached - base, axis=1).mean()))

    transform = build_transform(runner.settings.transform)
    images = torch.stack(
        [transform(decode_image(s.image)) for s in iter_samples(digits, counts=Counter())]
    )
    with torch.no_grad():
        direct = model.forward_head(model.forward_features(images), pre_logits=True)
    np.testing.assert_allclose(cached.astype(np.float32), direct.numpy(), rtol=2e-3, atol=2e-3)
    assert distances[0] > 0 and distances == sorted(distances), distances
