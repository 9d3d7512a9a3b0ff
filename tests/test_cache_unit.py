"""The cache's unit of work without Ray: real shards, a real timm model, real Parquet."""

from __future__ import annotations

import datetime
import json
import logging
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from support import BACKBONE, make_runner

from pipeline.cache import backbone as backbone_module
from pipeline.cache.augment import build_transform
from pipeline.cache.backbone import (
    Backbone,
    create_backbone_model,
    describe_backbone,
    read_state_dict,
    state_digest,
)
from pipeline.cache.decode import decode_image
from pipeline.cache.manifest import Manifest, ProvenanceMismatch
from pipeline.cache.unit import Unit
from pipeline.cache.verify import reconcile
from pipeline.demo.data import write_bad_shard, write_digit_shards
from schemas import UNIT_STATS_KEY, read_provenance


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_digit_shards(
        str(tmp_path_factory.mktemp("shards")), shards=2, per_shard=20, size=40
    )


def read_unit(root, relpath: str):
    return pq.read_table(f"{root}/{relpath}")


def test_unit_rows_follow_schema_and_carry_provenance(tmp_path, shards):
    runner = make_runner(str(tmp_path))
    result = runner.run(Unit(shards[0], "digits-0000", 0))
    table = read_unit(tmp_path, result.relpath)
    assert result.rows == table.num_rows == 20
    assert table.schema.field("embedding").type.list_size == 512
    assert str(table.schema.field("embedding").type.value_type) == "halffloat"
    assert read_provenance(table.schema)["backbone"] == BACKBONE
    assert json.loads(table.schema.metadata[UNIT_STATS_KEY])["rows"] == 20
    assert set(table.column("shard").to_pylist()) == {"digits-0000"}
    assert table.column("key").to_pylist() == [f"digit-{i:06d}" for i in range(20)]
    assert not list((tmp_path / "_staging").iterdir()), "staging must be empty after a commit"
    losses = table.column("loss").to_numpy()
    assert np.all(np.isfinite(losses)) and np.all(losses > 0)
    probs = table.column("max_prob").to_numpy()
    assert np.all((probs > 0) & (probs <= 1))


def test_recomputed_unit_is_identical_and_epochs_differ(tmp_path, shards):
    runner = make_runner(str(tmp_path))
    first = read_unit(tmp_path, runner.run(Unit(shards[0], "digits-0000", 0)).relpath)
    (tmp_path / "epoch=0000" / "digits-0000.parquet").unlink()
    again = make_runner(str(tmp_path))  # a fresh worker, as after a retry elsewhere
    second = read_unit(tmp_path, again.run(Unit(shards[0], "digits-0000", 0)).relpath)
    assert first.drop_columns([]).equals(second)
    other_epoch = read_unit(tmp_path, runner.run(Unit(shards[0], "digits-0000", 1)).relpath)
    assert first.column("key").equals(other_epoch.column("key"))
    emb0 = np.stack(first.column("embedding").to_numpy(zero_copy_only=False))
    emb1 = np.stack(other_epoch.column("embedding").to_numpy(zero_copy_only=False))
    assert np.abs(emb0 - emb1).mean(axis=1).min() > 0, "each epoch re-draws every augmentation"


def test_eval_rows_equal_a_direct_timm_forward(tmp_path, shards):
    runner = make_runner(str(tmp_path), augment="eval")
    table = read_unit(tmp_path, runner.run(Unit(shards[1], "digits-0001", 0)).relpath)
    model = create_backbone_model(BACKBONE, "random")
    transform = build_transform(runner.settings.transform)
    from collections import Counter

    from pipeline.cache.samples import iter_samples

    samples = list(iter_samples(shards[1], counts=Counter()))
    images = torch.stack([transform(decode_image(s.image)) for s in samples])
    labels = torch.tensor([s.label for s in samples])
    with torch.no_grad():
        embedding = model.forward_head(model.forward_features(images), pre_logits=True)
        logits = model(images)
    expected_loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    cached = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(cached, embedding.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(table.column("loss").to_numpy(), expected_loss.numpy(), rtol=1e-4)
    assert table.column("pred").to_pylist() == logits.argmax(1).tolist()
    assert set(table.column("epoch").to_pylist()) == {0}


def test_bad_inputs_are_counted_by_reason_and_valid_ones_kept(tmp_path):
    samples = write_bad_shard(str(tmp_path / "bad.tar"))
    result = make_runner(str(tmp_path / "cache")).run(Unit(str(tmp_path / "bad.tar"), "bad", 0))
    expected: dict[str, int] = {}
    for sample in samples:
        if sample.expect is not None:
            expected[sample.expect.value] = expected.get(sample.expect.value, 0) + 1
    assert result.skipped == expected
    valid = [s.key for s in samples if s.expect is None]
    table = read_unit(tmp_path / "cache", result.relpath)
    assert table.column("key").to_pylist() == valid


def test_label_remap_and_labels_outside_the_head(tmp_path, shards, caplog):
    """The skipped samples are counted; the first is named, then one line gives their number
    (a line per sample sent ~1M lines through Ray when 1% of an ImageNet-21k run skips)."""
    remap = tmp_path / "remap.json"
    # digits 0..9 -> classes 990..999; digit 9 is mapped outside the 1000-way head
    remap.write_text(json.dumps({str(d): (990 + d if d < 9 else 5000) for d in range(10)}))
    runner = make_runner(str(tmp_path / "cache"), label_remap=str(remap))
    result = runner.run(Unit(shards[0], "digits-0000", 0))
    table = read_unit(tmp_path / "cache", result.relpath)
    labels = table.column("label").to_numpy()
    assert labels.min() >= 990 and labels.max() <= 998
    nines = sum(1 for label in _shard_labels(shards[0]) if label == 9)
    assert nines > 1 and result.skipped == {"label_outside_head": nines}
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([line for line in said if line.startswith("skipping ")]) == 1
    assert (
        f"{shards[0]}: {nines} samples skipped as label_outside_head (the first named above)"
        in said
    )
    # a later epoch skips the same samples: counted, named no more (2,000 shards x 7 epochs
    # named each, some 14,000 lines of each kind through Ray)
    caplog.clear()
    later = runner.run(Unit(shards[0], "digits-0000", 1))
    assert later.skipped == {"label_outside_head": nines}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def _shard_labels(url: str) -> list[int]:
    from collections import Counter

    from pipeline.cache.samples import iter_samples

    return [sample.label for sample in iter_samples(url, counts=Counter())]


def test_local_weights_file_sets_the_class_count_and_is_not_unpickled(tmp_path):
    from safetensors.torch import save_file

    model = timm.create_model(BACKBONE, pretrained=False, num_classes=7)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = create_backbone_model(BACKBONE, str(tmp_path / name))
        assert loaded.num_classes == 7
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    torch.save({"payload": datetime.timedelta(days=1)}, tmp_path / "evil.pth")  # any pickle
    with pytest.raises(Exception, match=r"(?i)weights_only|unpickl|not a state dict"):
        create_backbone_model(BACKBONE, str(tmp_path / "evil.pth"))


def read_state_dict_keys(folder, data: bytes) -> list[str]:
    """The keys ``read_state_dict`` finds in ``data`` written to a file in ``folder``."""
    (folder / "probe.safetensors").write_bytes(data)
    return list(read_state_dict(str(folder / "probe.safetensors")))


def test_hub_weights_that_cannot_be_fetched_name_the_model_and_the_way_out(monkeypatch, capfd):
    """Offline (as here: huggingface_hub's offline mode, so no request leaves), the error was
    huggingface_hub's own, naming neither the model nor --weights; its retry lines were
    printed twice, through its own handler and pvu's."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"pretrained weights of resnet10t .* --weights random"):
        create_backbone_model(BACKBONE, "hub")
    script = (
        "import logging; from jobs.terminal import setup_logging; setup_logging(verbose=False); "
        "import timm; logging.getLogger('huggingface_hub.file_download').warning('a hub line')"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr.count("a hub line") == 1, run.stderr


def test_a_model_built_for_another_image_size_is_fed_that_size() -> None:
    """--model-kwargs '{"img_size": 384}' (the documented example) was fed timm's pretrained
    224 px and refused, unless --input-size repeated the size."""
    for size, expected in ((64, (3, 64, 64)), ([48, 64], (3, 48, 64))):
        info = describe_backbone("vit_tiny_patch16_224", "random", model_kwargs={"img_size": size})
        assert tuple(info.data_config["input_size"]) == expected
    # one that takes any size ran at timm's 224 px before, and its caches resume as they are
    dynamic = {"img_size": 64, "dynamic_img_size": True}
    info = describe_backbone("vit_tiny_patch16_224", "random", model_kwargs=dynamic)
    assert tuple(info.data_config["input_size"]) == (3, 224, 224)


def test_hub_weights_that_do_not_fit_the_model_kwargs_are_named(monkeypatch):
    """global_pool='avg' gives a ViT an fc_norm its hub weights lack: timm's strict load raised
    a RuntimeError, a traceback where every other misfit is one line."""
    stock = timm.create_model("vit_tiny_patch16_224").state_dict()
    build = timm.create_model

    def from_hub(name: str, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        model = build(name, pretrained=False, **kwargs)
        if pretrained:  # the hub's weights, loaded strictly as timm loads them
            model.load_state_dict(stock)
        return model

    monkeypatch.setattr(timm, "create_model", from_hub)
    said = r"could not build vit_tiny_patch16_224 with --model-kwargs .*Error\(s\) in loading"
    with pytest.raises(ValueError, match=said):
        create_backbone_model("vit_tiny_patch16_224", "hub", {"global_pool": "avg"})


def test_weights_files_are_read_by_their_bytes_and_damage_is_named(tmp_path):
    """Empty, text or damaged files gave IndexError, KeyError or SafetensorError tracebacks;
    a safetensors file not named so was refused as a pickle; torch.compile's and Lightning's
    key prefixes were not removed."""
    from safetensors.torch import save, save_file

    model = timm.create_model(BACKBONE, pretrained=False, num_classes=5)
    state = model.state_dict()
    save_file(state, str(tmp_path / "w.bin"))
    torch.save({f"model._orig_mod.{key}": value for key, value in state.items()}, tmp_path / "l.pt")
    for name in ("w.bin", "l.pt"):
        loaded = create_backbone_model(BACKBONE, str(tmp_path / name))
        assert torch.equal(loaded.get_classifier().weight, model.get_classifier().weight), name
    pickle_byte = next(  # a header 0x80 long starts as a pickle does: safetensors is read first
        data for data in (save({"w" * n: torch.zeros(1)}) for n in range(1, 300)) if data[0] == 0x80
    )
    assert read_state_dict_keys(tmp_path, pickle_byte)
    headless = {key: value for key, value in state.items() if not key.startswith("fc.")}
    torch.save(headless, tmp_path / "headless.pth")  # said "missing ['fc.weight', 'fc.bias']"
    with pytest.raises(ValueError, match=r"headless\.pth holds no classifier for resnet10t"):
        create_backbone_model(BACKBONE, str(tmp_path / "headless.pth"))
    with pytest.raises(ValueError, match=r"w\.bin does not fit resnet18: \d+ tensor\(s\) of other"):
        create_backbone_model("resnet18", str(tmp_path / "w.bin"))  # was a RuntimeError traceback
    whole = save(state)
    damaged = {
        "empty.pth": (b"", "neither a safetensors file nor a torch state dict (0 bytes, empty)"),
        "text.pth": (b"hello\n", "neither a safetensors file nor a torch state dict"),
        "cut.safetensors": (whole[: len(whole) // 2], "a damaged safetensors file"),
        "cut.pth": ((tmp_path / "l.pt").read_bytes()[:200], "a damaged torch file, or none"),
    }
    for name, (data, message) in damaged.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(f"{name}: {message}")):
            create_backbone_model(BACKBONE, str(tmp_path / name))


def test_weights_of_a_grayscale_model_are_refused_as_such(tmp_path):
    """Weights of a model made with in_chans=1 were said to need other --model-kwargs, which
    then refused in_chans: the message sent the user to a flag that cannot help."""
    from safetensors.torch import save_file

    gray = timm.create_model(BACKBONE, pretrained=False, in_chans=1)
    save_file(gray.state_dict(), str(tmp_path / "gray.safetensors"))
    with pytest.raises(ValueError) as refused:
        create_backbone_model(BACKBONE, str(tmp_path / "gray.safetensors"))
    said = str(refused.value)
    assert "its conv1.0.weight takes 1-channel images (a model made with in_chans=1)" in said
    assert "--model-kwargs" not in said
    # TResNet's space-to-depth stem takes 16 channels an image channel: 48 for RGB
    gray = timm.create_model("tresnet_m", pretrained=False, in_chans=1).state_dict()
    save_file(gray, str(tmp_path / "gray-tresnet.safetensors"))
    with pytest.raises(ValueError, match=r"takes 1-channel images \(a model made with in_chans=1"):
        create_backbone_model("tresnet_m", str(tmp_path / "gray-tresnet.safetensors"))
    rgb = timm.create_model("tresnet_m", pretrained=False).state_dict()  # of another size:
    rgb["body.conv1.conv.weight"] = rgb["body.conv1.conv.weight"][:32]  # was 'in_chans=48'
    save_file(rgb, str(tmp_path / "rgb-tresnet.safetensors"))
    with pytest.raises(ValueError, match=r"tensor\(s\) of other shapes") as refused:
        create_backbone_model("tresnet_m", str(tmp_path / "rgb-tresnet.safetensors"))
    assert "in_chans" not in str(refused.value)


def test_a_trainers_checkpoint_is_opened_at_its_one_state_dict(tmp_path):
    """PyTorch's tutorial checkpoint ({'epoch', 'model_state_dict', 'optimizer_state_dict',
    'loss'}) and one under a key of a trainer's own ('net') were refused as 'not a state dict of
    tensors', naming nothing it held; an empty 'state_dict_ema' beside the weights was taken
    for them; an empty state dict was said to hold 'no classifier'."""
    model = timm.create_model(BACKBONE, pretrained=False, num_classes=5)
    state = model.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    files = {
        "tutorial.pt": {"epoch": 3, "model_state_dict": state, "loss": 0.25,
                        "optimizer_state_dict": optimizer.state_dict()},
        "own_key.pt": {"epoch": 3, "net": {f"module.{k}": v for k, v in state.items()}},
        "empty_ema.pt": {"state_dict_ema": {}, "state_dict": state},
    }  # fmt: skip
    for name, checkpoint in files.items():
        torch.save(checkpoint, tmp_path / name)
        loaded = create_backbone_model(BACKBONE, str(tmp_path / name))
        assert torch.equal(loaded.get_classifier().weight, model.get_classifier().weight), name
    torch.save({"epoch": 3, "a": state, "b": state}, tmp_path / "two.pt")  # which is the model?
    with pytest.raises(ValueError, match=r"two\.pt: not a state dict .*'epoch', 'a', 'b'"):
        create_backbone_model(BACKBONE, str(tmp_path / "two.pt"))
    torch.save({}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match=r"empty\.pt: holds no tensors"):
        create_backbone_model(BACKBONE, str(tmp_path / "empty.pt"))


def test_manifest_adopts_orphans_and_refuses_other_caches(tmp_path, shards):
    runner = make_runner(str(tmp_path))
    provenance = runner.settings.provenance
    manifest = reconcile(Manifest.open(str(tmp_path), provenance))
    result = runner.run(Unit(shards[0], "digits-0000", 0))  # committed, never recorded
    reopened = reconcile(Manifest.open(str(tmp_path), provenance))
    assert reopened.is_done(result.relpath)
    assert reopened.units[result.relpath]["rows"] == 20
    assert not manifest.is_done(result.relpath)
    other = {**provenance, "seed": 1}
    with pytest.raises(ProvenanceMismatch, match=r"seed: cache has 0, this run asks for 1"):
        Manifest.open(str(tmp_path), other)


def test_backbones_that_cannot_run_the_job_are_refused_up_front():
    with pytest.raises(ValueError, match="no classifier"):
        describe_backbone("vit_small_patch16_dinov3.lvd1689m", "random")
    with pytest.raises(ValueError, match=r"does not run on inputs of \(3, 32, 32\)") as raised:
        describe_backbone("vit_tiny_patch16_224", "random", input_size=(3, 32, 32))
    assert "its own input size, (3, 224, 224): leave --input-size out" in str(raised.value)
    # ... or build it for that size, as the message says: a ViT resamples its position
    # embedding, and pads to whole patches a size that is not one
    assert """--model-kwargs '{"dynamic_img_size": true}'""" in str(raised.value)
    with pytest.raises(ValueError, match="does not run") as raised:
        describe_backbone("vit_tiny_patch16_224", "random", input_size=(3, 40, 40))
    told = re.search(r"--model-kwargs '(.*?)'", str(raised.value))
    assert told and json.loads(told[1]) == {"dynamic_img_size": True, "dynamic_img_pad": True}
    for size, kwargs in (
        ((3, 32, 32), {"dynamic_img_size": True}),
        ((3, 40, 40), json.loads(told[1])),
    ):
        describe_backbone("vit_tiny_patch16_224", "random", input_size=size, model_kwargs=kwargs)
    info = describe_backbone("mobilenetv3_small_050", "random", input_size=(3, 64, 64))
    assert info.embedding_dim == 1024  # the head's hidden width, not num_features
    # timm's bare assert gave the reason "" ("(3, 40, 40): ; it may take only ...")
    with pytest.raises(ValueError, match=r"\(3, 40, 40\): AssertionError; it takes only") as raised:
        describe_backbone("halonet26t", "random", input_size=(3, 40, 40))
    assert "dynamic_img_size" not in str(raised.value)  # timm cannot resample a HaloNet
    # at the model's own size, a pooling the weights do not fit left no word of the kwargs
    with pytest.raises(ValueError, match=r"cannot be multiplied .*; check --model-kwargs"):
        describe_backbone("resnet18", "random", model_kwargs={"global_pool": ""})
    # at another size too, and it said to leave --input-size out, which failed the same way
    with pytest.raises(ValueError, match=r"cannot be multiplied") as raised:
        describe_backbone(
            "resnet18", "random", input_size=(3, 32, 32), model_kwargs={"global_pool": ""}
        )
    assert "--input-size" not in str(raised.value)
    # kwargs whose forward_features gives no features forward_head takes: a traceback
    kwargs = {"return_interm_layers": True, "img_size": 64}  # CoaT's: a dict of stages
    with pytest.raises(ValueError, match=r"not iterable; check --model-kwargs") as raised:
        describe_backbone("coat_lite_tiny", "random", input_size=(3, 64, 64), model_kwargs=kwargs)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("name", "refused"),
    [
        ("vit_base_patch32_clip_224.openai", True),  # 512 outputs into CLIP's text space
        ("resnet50_clip", True),  # its default tag, openai: a 1,024-wide projection
        ("convnext_large_mlp.clip_laion2b_ft_320", True),  # fine-tuned, still a projection
        ("vit_pe_core_base_patch16_224", True),  # Perception Encoder
        ("vit_base_patch32_clip_224", False),  # its default tag is fine-tuned on ImageNet-1k
        ("vit_base_patch16_clip_224.openai_ft_in12k", False),
        ("vit_base_patch16_siglip_224.webli", "no classifier"),  # said "its 0 outputs"
    ],
)
def test_hub_weights_of_an_image_text_tower_are_refused_before_the_download(
    name, refused, monkeypatch
):
    """A CLIP tower's 512 projection outputs were taken for classes: a cache, a head and a
    report of losses that mean nothing, without a word."""
    downloads: list[str] = []

    def offline(name: str, kwargs: dict, pretrained: bool) -> None:
        downloads.append(name)
        raise OSError("offline")

    monkeypatch.setattr(backbone_module, "_create", offline)
    said = {True: f"backbone {name}: its hub weights .* are an image", False: "could not get"}
    said = said.get(refused, refused)
    with pytest.raises(ValueError, match=said):
        create_backbone_model(name, "hub")
    assert downloads == ([] if refused else [name])


@pytest.mark.parametrize(
    ("name", "size", "dim"),
    [
        ("dla46_c", 64, 256),  # a 1x1 convolution on the pooled features (and BiT's ResNetV2)
        ("sequencer2d_s", 64, 384),  # timm's pool + fc head module, initialised to zero
        ("deit_tiny_distilled_patch16_224", 224, 192),  # two heads, their logits averaged
        ("crossvit_tiny_240", 240, 288),  # one head per branch: features are a list
    ],
)
def test_a_backbone_whose_head_is_not_one_linear_layer_caches_its_exact_loss(
    name, size, dim, caplog
):
    info = describe_backbone(name, "random", input_size=(3, size, size))
    model = create_backbone_model(name, "random")
    assert info.embedding_dim == dim
    zero = name == "sequencer2d_s"  # random weights give every image the same loss
    assert ("the same logits" in caplog.text) == zero, caplog.text
    seeded = torch.Generator().manual_seed(0)
    if zero:  # give the losses something to differ by
        torch.nn.init.normal_(model.get_classifier().fc.weight, generator=seeded)
    images = torch.randn(4, 3, size, size, generator=seeded)
    labels = torch.tensor([0, 1, 2, 999])
    outputs = Backbone(model, torch.device("cpu")).forward(images, labels)
    with torch.inference_mode():
        exact = torch.nn.functional.cross_entropy(model(images), labels, reduction="none")
        embedding = model.forward_head(model.forward_features(images), pre_logits=True)
    torch.testing.assert_close(outputs["loss"], exact, rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs["embedding"], embedding)  # what an attached head is given
    assert outputs["loss"].std() > 0


def test_custom_load_model_from_a_local_file_never_reaches_the_npz_loader(tmp_path):
    from safetensors.torch import save_file

    name = "vit_tiny_patch16_224.augreg_in21k"  # timm loads its hub weights with custom_load
    assert timm.create_model(name, pretrained=False).pretrained_cfg.get("custom_load")
    model = timm.create_model(name, pretrained=False, num_classes=11)
    save_file(model.state_dict(), str(tmp_path / "vit.safetensors"))
    loaded = create_backbone_model(name, str(tmp_path / "vit.safetensors"))
    assert loaded.num_classes == 11
    assert torch.equal(loaded.head.weight, model.head.weight)


def test_state_digest_tells_weights_apart():
    first = create_backbone_model(BACKBONE, "random")
    second = create_backbone_model(BACKBONE, "random")
    assert state_digest(first) == state_digest(second), "random init is seeded"
    with torch.no_grad():
        second.fc.weight[0, 0] += 1e-3
    assert state_digest(first) != state_digest(second)


def test_label_remap_files_json_or_one_index_per_line(tmp_path):
    from pipeline.dataset.remap import read_label_remap

    (tmp_path / "remap.txt").write_text("# shard label i -> head index on line i\n7\n\n3 # cat\n")
    assert read_label_remap(str(tmp_path / "remap.txt")).tolist() == [7, 3]
    (tmp_path / "remap.json").write_text('{"0": 5, "3": 1}')
    assert read_label_remap(str(tmp_path / "remap.json")).tolist() == [5, -1, -1, 1]


def test_prepare_seconds_leave_out_the_wait_for_a_slow_forward(tmp_path, monkeypatch):
    """A batch's prepare time ran until the next one began, so it held the wait for the
    forward to take it: a slow backbone showed as slow decoding (prepare 156 s, 1.7 CPU-s)."""
    [shard] = write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=64, size=32)
    runner = make_runner(str(tmp_path / "cache"))  # batches of 8, prefetched 2 ahead
    forward = runner.backbone.forward

    def slow(images, labels):
        time.sleep(0.2)
        return forward(images, labels)

    monkeypatch.setattr(runner.backbone, "forward", slow)
    result = runner.run(Unit(shard, "digits-0000", 0))
    assert result.timings["forward"] >= 8 * 0.2
    assert result.timings["prepare"] < 0.25 * result.timings["forward"], result.timings
