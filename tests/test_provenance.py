"""What a cache is, pinned and enforced: appendix A's transform, a refusal per identity field,
``--dtype float32`` and label remaps end to end, and the cache command's exit codes."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import ray
import torch
from support import BACKBONE, SMALL_BACKBONE_FLAGS, unit_settings
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.cache import shards as shards_module
from pipeline.cache.augment import TransformConfig, build_transform, resolve_transform
from pipeline.cache.backbone import create_backbone_model, describe_backbone
from pipeline.cache.distribute import start_local_ray
from pipeline.cache.manifest import IDENTITY_FIELDS, Manifest, ProvenanceMismatch
from pipeline.cache.samples import iter_samples
from pipeline.cache.verify import reconcile
from pipeline.demo.data import write_digit_shards
from pipeline.head.export import attach_head


def test_appendix_a_train_transform_is_the_default() -> None:
    """Appendix A prints timm's train transform; the defaults must build exactly that."""
    info = describe_backbone(BACKBONE, "random")
    resolved = resolve_transform(TransformConfig(), info.data_config)
    assert resolved == {
        "is_training": True,
        "input_size": list(info.data_config["input_size"]),
        "mean": list(info.data_config["mean"]),
        "std": list(info.data_config["std"]),
        "interpolation": "random",
        "scale": [0.08, 1.0],
        "ratio": [3 / 4, 4 / 3],
        "hflip": 0.5,
        "vflip": 0.0,
        "color_jitter": 0.4,
        "color_jitter_prob": None,
    }
    steps = build_transform(resolved).transforms
    crop, flip, jitter = steps[:3]
    assert isinstance(crop, RandomResizedCropAndInterpolation)
    assert crop.size == tuple(info.data_config["input_size"][1:])
    assert (crop.scale, crop.ratio) == ((0.08, 1.0), (3 / 4, 4 / 3))
    assert [mode.value for mode in crop.interpolation] == ["bilinear", "bicubic"]
    assert isinstance(flip, transforms.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(jitter, transforms.ColorJitter)
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4)
    assert jitter.hue is None
    normalize = steps[-1]
    assert isinstance(normalize, transforms.Normalize)
    assert tuple(
        normalize.mean.tolist() if torch.is_tensor(normalize.mean) else normalize.mean
    ) == (pytest.approx(tuple(info.data_config["mean"])))


def _changed(value: object) -> object:
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, list):
        return [*value, value[-1]]
    return f"{value}-other"


def _identity_changes(provenance: dict) -> list[tuple[str, dict]]:
    """(field, provenance with only that field changed) for every identity field, and for every
    key of the transform."""
    changes = []
    for name in IDENTITY_FIELDS:
        if name == "transform":
            for key, value in provenance["transform"].items():
                transform = {**provenance["transform"], key: _changed(value)}
                changes.append((f"transform.{key}", {**provenance, "transform": transform}))
        else:
            changes.append((name, {**provenance, name: _changed(provenance.get(name))}))
    return changes


def test_every_identity_field_refuses_a_mixed_cache(tmp_path: Path) -> None:
    provenance = {
        **unit_settings(str(tmp_path)).provenance,
        "label_remap_digest": "sha256:aaaa",
        "label_space": "classifier",
        "ambiguity_key": None,
    }
    reconcile(Manifest.open(str(tmp_path), provenance))
    changes = _identity_changes(provenance)
    assert {"backbone", "weights_digest", "dtype", "label_remap_digest", "seed"} <= {
        name for name, _ in changes
    }
    assert {"transform.scale", "transform.ratio", "transform.color_jitter"} <= {
        name for name, _ in changes
    }
    for name, other in changes:
        with pytest.raises(ProvenanceMismatch, match=rf"\b{name}: cache has"):
            Manifest.open(str(tmp_path), other)


# --- through the command line, on a real local Ray ---------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("digits")
    write_digit_shards(str(folder), shards=2, per_shard=10, size=32)
    return folder


REMAP = {str(label): 990 - 7 * label for label in range(9)}  # digit 9 maps outside: skipped


def cache_command(shards: Path, output: Path, *extra: str) -> list[str]:
    return [
        *("cache", "--shards", str(shards), "--output", str(output)),
        *(*SMALL_BACKBONE_FLAGS, "--batch-size", "8", *extra),
    ]


@pytest.fixture(scope="module")
def remapped(local_ray, shards, tmp_path_factory) -> tuple[Path, Path]:
    """A cache written through the CLI with a label remap; returns (cache, remap file)."""
    root = tmp_path_factory.mktemp("remapped")
    remap = root / "remap.json"
    remap.write_text(json.dumps(REMAP))
    result = CliRunner().invoke(
        app, cache_command(shards, root / "cache", "--label-remap", str(remap))
    )
    assert result.exit_code == 0, result.output
    return root / "cache", remap


def rows(cache: Path) -> dict[str, dict]:
    table = ds.dataset(str(cache), format="parquet", ignore_prefixes=["_", "."]).to_table()
    return {row["key"]: row for row in table.to_pylist()}


@pytest.mark.slow
def test_label_remap_through_the_cli_relabels_every_key(remapped, shards) -> None:
    cache, _ = remapped
    labels = {
        sample.key: int(sample.label)
        for path in sorted(shards.glob("*.tar"))
        for sample in iter_samples(str(path), counts=Counter())
    }
    cached = rows(cache)
    for key, label in labels.items():  # a check per key
        if str(label) in REMAP:
            assert cached[key]["label"] == REMAP[str(label)], key
        else:
            assert key not in cached, f"{key}: label {label} has no class in the head"
    manifest = json.loads((cache / "_manifest.json").read_text())
    skipped = sum(u["skipped"].get("label_outside_head", 0) for u in manifest["units"].values())
    assert skipped == sum(1 for label in labels.values() if str(label) not in REMAP) > 0


@pytest.mark.slow
def test_each_cli_flag_that_defines_a_cache_is_refused_on_its_prefix(
    remapped, shards, tmp_path
) -> None:
    cache, remap = remapped
    from safetensors.torch import save_file

    model = create_backbone_model(BACKBONE, "random")
    with torch.no_grad():
        model.fc.bias += 1.0
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    other_remap = tmp_path / "remap.json"
    other_remap.write_text(json.dumps({**REMAP, "0": 1}))
    same = ("--label-remap", str(remap))
    variants = {
        "backbone": ["--backbone", "resnet14t", *same],
        "weights_digest": ["--weights", str(tmp_path / "w.safetensors"), *same],
        "transform.input_size": ["--input-size", "48", *same],
        "dtype": ["--dtype", "float32", *same],
        "seed": ["--seed", "3", *same],
        "model_kwargs": ["--model-kwargs", '{"global_pool": "max"}', *same],
        "label_remap_digest": ["--label-remap", str(other_remap)],
    }
    runner = CliRunner()
    for field, extra in variants.items():
        result = runner.invoke(app, cache_command(shards, cache, *extra))  # the last flag wins
        assert result.exit_code == 2, (field, result.output)
        assert f"{field}: cache has" in " ".join(result.output.split()), (field, result.output)


@pytest.mark.slow
def test_model_kwargs_build_the_backbone_of_every_unit_and_reach_the_head(
    remapped, shards, tmp_path
) -> None:
    """A checkpoint fine-tuned with global_pool='max' (the same tensors) had no way in: it was
    cached with timm's default pooling, another embedding, and nothing said so."""
    _, remap = remapped
    output, default = tmp_path / "max-pooled", tmp_path / "avg-pooled"
    common = ["--label-remap", str(remap), "--input-size", "64"]  # 2 x 2 features to pool
    kwargs = ["--model-kwargs", '{"global_pool": "max"}', *common]
    for cache, extra in ((output, kwargs), (default, common)):
        result = CliRunner().invoke(app, cache_command(shards, cache, *extra))
        assert result.exit_code == 0, result.output
    provenance = json.loads((output / "_manifest.json").read_text())["provenance"]
    assert provenance["model_kwargs"] == {"global_pool": "max"}
    pooled, averaged = rows(output), rows(default)
    assert pooled.keys() == averaged.keys()
    for key, row in pooled.items():  # the same image: each channel's max is at least its mean
        most = np.asarray(row["embedding"], np.float32)
        mean = np.asarray(averaged[key]["embedding"], np.float32)
        assert (most >= mean - 1e-3).all() and (most > mean + 1e-3).any(), key
    head = tmp_path / "head"
    train = ["train-head", "--cache", str(output), "--output", str(head), "--episodes", "1"]
    train += ["--episode-size", "32", "--batch-size", "16", "--warmup-episodes", "0"]
    result = CliRunner().invoke(app, [*train, "--hidden", "8", "--val-fraction", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads((head / "head.json").read_text())["model_kwargs"] == {"global_pool": "max"}
    stock = create_backbone_model(BACKBONE, "random")  # the cache's weights, its pooling not
    with pytest.warns(UserWarning, match=r"global_pool='max', but the model has global_pool='avg'"):
        attach_head(stock, str(head))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach_head(create_backbone_model(BACKBONE, "random", {"global_pool": "max"}), str(head))
    result = CliRunner().invoke(
        app, cache_command(shards, tmp_path / "x", "--model-kwargs", '{"global_pol": 1}')
    )
    assert result.exit_code == 2
    assert "timm could not build resnet10t with --model-kwargs" in " ".join(result.output.split())


@pytest.mark.slow
def test_dtype_float32_end_to_end(remapped, shards, tmp_path) -> None:
    cache, remap = remapped
    output = tmp_path / "f32"
    command = cache_command(shards, output, "--dtype", "float32", "--label-remap", str(remap))
    assert CliRunner().invoke(app, command).exit_code == 0
    wide, narrow = rows(output), rows(cache)
    assert wide.keys() == narrow.keys()
    schema = ds.dataset(str(output), format="parquet", ignore_prefixes=["_", "."]).schema
    assert str(schema.field("embedding").type.value_type) == "float"
    for key, row in wide.items():  # the same forward, stored wider
        embedding = np.asarray(row["embedding"], np.float32)
        assert np.array_equal(embedding.astype(np.float16), np.asarray(narrow[key]["embedding"]))
        assert row["loss"] == narrow[key]["loss"]
    head = tmp_path / "head"
    train = ["train-head", "--cache", str(output), "--output", str(head), "--episodes", "2"]
    train += ["--episode-size", "64", "--batch-size", "16", "--warmup-episodes", "0"]
    train += ["--hidden", "8", "--val-fraction", "0.2"]
    result = CliRunner().invoke(app, train)
    assert result.exit_code == 0, result.output
    assert json.loads((head / "head.json").read_text())["input_dtype"] == "float32"


@pytest.mark.slow
def test_exit_codes_2_for_bad_input_and_1_for_failed_units(
    local_ray, shards, tmp_path, monkeypatch
) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, cache_command(tmp_path / "no-such-shards", tmp_path / "c1"))
    assert missing.exit_code == 2 and "no-such-shards" in missing.output
    assert "Traceback" not in missing.output
    bad_value = runner.invoke(app, [*cache_command(shards, tmp_path / "c2"), "--epochs", "0"])
    assert bad_value.exit_code == 2 and "epochs" in bad_value.output
    # a listed shard that cannot be read fails its unit for good: a directory named like a tar,
    # as if it became one after the up-front check (which refuses a listed folder, exit 2)
    (tmp_path / "broken.tar").mkdir()
    monkeypatch.setattr(shards_module, "is_file_entry", lambda fs, info: True)
    listing = tmp_path / "shards.txt"
    listing.write_text(f"{sorted(shards.glob('*.tar'))[0]}\n{tmp_path / 'broken.tar'}\n")
    failed = runner.invoke(app, [*cache_command(listing, tmp_path / "c3"), "--max-attempts", "1"])
    assert failed.exit_code == 1, failed.output
    assert "broken.tar" in failed.output and "failed permanently" in failed.output
