"""The backbone's precision: a bf16 trunk never rounds the loss, and the provenance says how
the trunk ran."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from support import BACKBONE, make_runner

from pipeline.cache.backbone import (
    Backbone,
    Compute,
    create_backbone_model,
    describe_backbone,
    state_digest,
)
from pipeline.cache.manifest import Manifest, ProvenanceMismatch


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, 32, 32, generator=generator), torch.arange(16)


def test_bf16_trunk_gives_float32_logits_from_the_embedding(batch):
    images, labels = batch
    model = create_backbone_model(BACKBONE, "random")
    # logits of a few units, where bf16 rounding (steps of 2**-8 relative) is visible
    with torch.no_grad():
        model.get_classifier().weight.mul_(40)
    outputs = Backbone(model, torch.device("cpu"), torch.bfloat16).forward(images, labels)
    embedding = outputs["embedding"]
    assert embedding.dtype == torch.float32
    with torch.inference_mode():
        logits = model.get_classifier()(embedding)
        rounded = logits.to(torch.bfloat16).float()
    exact = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(outputs["loss"], exact, rtol=1e-6, atol=1e-6)
    assert (F.cross_entropy(rounded, labels, reduction="none") - exact).abs().max() > 1e-3
    probs = logits.softmax(-1)
    torch.testing.assert_close(outputs["max_prob"], probs.max(-1).values, rtol=1e-6, atol=1e-6)
    entropy = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(outputs["entropy"], entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs["pred"], logits.argmax(-1).int())


def test_the_head_and_the_loss_run_without_tf32(batch, tf32_on, monkeypatch):
    """The fp32 head ran under whatever TF32 the process had: on a GPU in NVIDIA's containers
    (and in any conv_head, by cuDNN's default) the logits kept 10 bits of mantissa, and the
    loss, the head's label, with them. Checked by the settings the head runs under (a CPU
    computes no TF32)."""
    images, labels = batch
    model = create_backbone_model(BACKBONE, "random")
    seen = []
    head = model.forward_head
    monkeypatch.setattr(
        model, "forward_head", lambda *a, **k: seen.append(tf32_on()) or head(*a, **k)
    )
    Backbone(model, torch.device("cpu"), torch.bfloat16).forward(images, labels)
    assert seen and set(seen) == {("ieee", "ieee")}
    assert tf32_on() == ("tf32", "tf32")  # the process's own setting, restored


def test_nearest_neighbours_search_without_tf32(tf32_on, monkeypatch):
    """Cosine similarities under TF32 (a GPU search in NVIDIA's containers) blur far past the
    1e-6 tie tolerance, so neighbours were not the exact ones."""
    from pipeline.evaluate.knn import nearest_neighbours, normalize

    seen = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: seen.append(tf32_on()) or mm(*a, **k))
    unit = normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)).numpy())
    nearest_neighbours(unit)
    assert seen and set(seen) == {("ieee", "ieee")}
    assert tf32_on() == ("tf32", "tf32")


def test_compute_precision_is_provenance(tmp_path):
    assert Compute.resolve("cpu", "bf16") == Compute(device="cpu", autocast=None)
    gpu = Compute.resolve("cuda", "bf16")
    assert gpu.autocast_dtype is torch.bfloat16
    runner = make_runner(str(tmp_path))
    Manifest.open(str(tmp_path), runner.settings.provenance).flush(force=True)
    mixed = {**runner.settings.provenance, "compute": gpu.model_dump()}
    with pytest.raises(ProvenanceMismatch, match=r"compute.autocast: cache has None"):
        Manifest.open(str(tmp_path), mixed)
    with pytest.raises(ValueError, match="wrong provenance"):
        make_runner(str(tmp_path), compute=gpu)  # a CPU backbone cannot write bf16-GPU units


def test_the_loaded_weights_are_digested_by_value(tmp_path):
    """Random weights were named by seed alone (an init that changes with timm's or torch's
    version resumed the same cache), and a weights file's loaded state was not recorded (a
    model with that file never loaded attached without a word)."""
    model = create_backbone_model(BACKBONE, "random")
    random = describe_backbone(BACKBONE, "random", input_size=(3, 32, 32))
    assert random.weights_state == state_digest(model)
    assert random.weights_digest == f"random:{BACKBONE}:seed0:state-sha256:{state_digest(model)}"
    with torch.no_grad():
        model.get_classifier().weight.add_(1.0)
    save_file(model.state_dict(), tmp_path / "tuned.safetensors")
    tuned = describe_backbone(BACKBONE, str(tmp_path / "tuned.safetensors"), input_size=(3, 32, 32))
    assert (
        tuned.weights_digest.startswith("sha256:") and tuned.weights_digest != random.weights_digest
    )
    assert tuned.weights_state == state_digest(model) != random.weights_state
