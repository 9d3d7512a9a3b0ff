"""Several backbones from one read and decode of each unit: every cache exactly as its own run."""

from __future__ import annotations

import json
import threading
import weakref

import pyarrow.parquet as pq
import pytest
import torch
from support import BACKBONE, make_runner, unit_settings

from pipeline.cache.backbone import Backbone, create_backbone_model
from pipeline.cache.distribute import describe_failure
from pipeline.cache.unit import Fanout, Unit, UnitRunner
from pipeline.demo.data import write_bad_shard, write_digit_shards
from schemas import read_provenance

TARGETS = {  # name: make_runner options
    "resnet32": {},
    "resnet14t": {"backbone": "resnet14t"},  # shares resnet32's transform
    "resnet48": {"size": 48},
    # differs from resnet32's in normalization only: augmented once with it, normalized apart
    "resnet32-half": {"normalize": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))},
}


@pytest.fixture(scope="module")
def units(tmp_path_factory) -> list[Unit]:
    root = tmp_path_factory.mktemp("shards")
    (digits,) = write_digit_shards(str(root), shards=1, per_shard=20, size=40)
    write_bad_shard(str(root / "bad.tar"))
    return [Unit(digits, "digits-0000", 1), Unit(str(root / "bad.tar"), "bad", 0)]


@pytest.fixture(scope="module")
def remap(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("remap") / "remap.json"
    path.write_text(json.dumps([0, 1, 2, 3, 4]))  # labels 5-9 are outside this target's head
    return str(path)


@pytest.mark.parametrize("workers", [0, 1])
def test_each_target_is_written_as_its_own_run_would(tmp_path, units, remap, workers):
    options = {**TARGETS, "resnet48": {**TARGETS["resnet48"], "label_remap": remap}}
    alone = {name: make_runner(str(tmp_path / "alone" / name), **o) for name, o in options.items()}
    together = [make_runner(str(tmp_path / "together" / name), **o) for name, o in options.items()]
    fanout = Fanout(together, decode_workers=workers)
    try:
        assert len(fanout.prepares) == 2, "one augmentation per distinct transform"
        for unit in units:
            results = fanout.run(unit)
            for (name, runner), result in zip(alone.items(), results.values(), strict=True):
                expected = runner.run(unit)
                assert (result.rows, result.skipped) == (expected.rows, expected.skipped), name
                mine = pq.read_table(f"{tmp_path}/together/{name}/{result.relpath}")
                theirs = pq.read_table(f"{tmp_path}/alone/{name}/{expected.relpath}")
                assert mine.equals(theirs), name
                assert read_provenance(mine.schema) == read_provenance(theirs.schema)
        first = fanout.run(units[0])
        assert first[2].skipped["label_outside_head"] > 0 and "label_outside_head" not in (
            first[0].skipped
        )
    finally:
        fanout.close()
        for runner in [*alone.values(), *together]:
            runner.close()


def test_targets_must_agree_on_the_samples(tmp_path):
    runners = [make_runner(str(tmp_path / "a")), make_runner(str(tmp_path / "b"), seed=1)]
    with pytest.raises(ValueError, match="share seed"):
        Fanout(runners, decode_workers=0)


def test_a_sample_every_target_skips_alike_is_named_once(tmp_path, units, caplog):
    """With --also, each undecodable image was named once per backbone, and so was each
    unit's count of them."""
    runners = [make_runner(str(tmp_path / name), **TARGETS[name]) for name in TARGETS]
    fanout = Fanout(runners, decode_workers=0)
    try:
        with caplog.at_level("WARNING", logger="pipeline.cache.unit"):
            results = fanout.run(units[1])
    finally:
        fanout.close()
    assert all(result.skipped["truncated_image"] == 2 for result in results.values())
    said = [record.getMessage() for record in caplog.records]
    assert len([line for line in said if line.startswith("skipping corrupt in ")]) == 1, said
    assert len([line for line in said if "2 samples skipped as truncated_image" in line]) == 1


def test_a_backbone_whose_forward_fails_costs_the_others_nothing(tmp_path, units):
    """With --also, a unit whose forward failed in one backbone (ViT-L out of memory at a
    --batch-size the small ViTs take) failed for every backbone: the others' work was lost.
    It also was reported as the error alone ("Input height (32) doesn't match model (224)"):
    nothing said which backbone."""
    fits = make_runner(str(tmp_path / "resnet"))
    alone = make_runner(str(tmp_path / "alone"))
    settings = unit_settings(str(tmp_path / "mixer"))  # a model that takes 224 px only
    model = create_backbone_model("mixer_s32_224", "random")
    fails = UnitRunner(Backbone(model, torch.device("cpu")), settings)
    fanout = Fanout([fits, fails], decode_workers=0)
    try:
        outcomes = fanout.run(units[0])
        again = fanout.run(units[0], targets=[1])  # a retry: the failed target's alone
        expected = alone.run(units[0])
    finally:
        for closing in (fanout, alone):
            closing.close()
    committed, failed = outcomes[0], outcomes[1]
    assert (committed.rows, committed.target) == (expected.rows, 0)
    mine = pq.read_table(tmp_path / "resnet" / committed.relpath)
    assert mine.equals(pq.read_table(tmp_path / "alone" / expected.relpath))
    assert not (tmp_path / "mixer" / committed.relpath).exists()
    why = describe_failure(units[0].source, failed)
    assert why.startswith(f"{units[0].source}: AssertionError: Input height (32)"), why
    assert f"backbone {BACKBONE}, cache {tmp_path / 'mixer'}" in why, why
    assert list(again) == [1] and isinstance(again[1], AssertionError)
    # a unit failed in every target of its try stops decoding with it, though its error is
    # still held: a thread left augmenting would draw from torch's global RNG beside the
    # actor's next unit
    assert "pvu-prefetch" not in {thread.name for thread in threading.enumerate()}


def test_a_failed_forward_s_error_holds_none_of_its_tensors(tmp_path, units):
    """With --also, the error kept for a backbone whose forward failed (a GPU out of memory)
    held its traceback's frames and so that forward's batch and activations (on the GPU,
    the memory the other backbones then need) until the unit was over."""
    fits = make_runner(str(tmp_path / "resnet"))
    model = create_backbone_model("mixer_s32_224", "random")  # takes 224 px only: fails
    seen: list[weakref.ref] = []  # the images each forward of it was given
    forward_features = model.forward_features

    def seeing(images: torch.Tensor) -> torch.Tensor:  # a hook's closure would hold them
        seen.append(weakref.ref(images))
        return forward_features(images)

    model.forward_features = seeing
    fails = UnitRunner(Backbone(model, torch.device("cpu")), unit_settings(str(tmp_path / "m")))
    fanout = Fanout([fits, fails], decode_workers=0)
    try:
        outcomes = fanout.run(units[0])
    finally:
        fanout.close()
    assert isinstance(outcomes[1], AssertionError) and seen
    assert [ref() for ref in seen] == [None] * len(seen)  # freed, though the error is held


def test_a_failed_backbone_s_samples_are_no_longer_labelled_for_it(tmp_path):
    """With --also, a backbone whose forward failed at a unit's first batch still had every
    later sample of the unit labelled and batched for it, to be dropped."""
    (shard,) = write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=160, size=32)
    model = create_backbone_model("mixer_s32_224", "random")  # takes 224 px only: fails
    fails = UnitRunner(Backbone(model, torch.device("cpu")), unit_settings(str(tmp_path / "m")))
    labelled = 0
    head_label = fails.head_label

    def counting(sample):
        nonlocal labelled
        labelled += 1
        return head_label(sample)

    fails.head_label = counting
    fanout = Fanout([make_runner(str(tmp_path / "resnet")), fails], decode_workers=0)
    try:
        outcomes = fanout.run(Unit(shard, "digits-0000", 0))
    finally:
        fanout.close()
    assert outcomes[0].rows == 160 and isinstance(outcomes[1], AssertionError)
    assert labelled < 80  # its first batch of 8, and those prefetched by its failure


def test_a_single_backbone_whose_forward_fails_raises_the_error(tmp_path, units):
    settings = unit_settings(str(tmp_path / "mixer"))
    model = create_backbone_model("mixer_s32_224", "random")
    runner = UnitRunner(Backbone(model, torch.device("cpu")), settings)
    try:
        with pytest.raises(AssertionError, match="Input height"):
            runner.run(units[0])
    finally:
        runner.close()
    assert "pvu-prefetch" not in {thread.name for thread in threading.enumerate()}
