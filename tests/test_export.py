"""Export a trained head and attach it to a stock timm model (docs/design.md 3.5)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from skimage import data as images
from timm.data import create_transform, resolve_model_data_config
from timm.utils.model import reparameterize_model
from torch.nn import functional as F

from pipeline.cache.backbone import state_digest
from pipeline.cache.writer import to_record_batch
from pipeline.head.export import (
    HEAD_JSON,
    HEAD_WEIGHTS,
    attach_head,
    export_head,
    image_input,
    load_head,
)
from pipeline.head.model import HeadConfig, create_head
from pipeline.head.stream import StreamConfig
from pipeline.head.train import ScheduleConfig, TrainConfig, fit_head
from schemas import cache_schema, validate_head, with_provenance

BACKBONE = "vit_tiny_patch16_224"


def _pictures() -> list[Image.Image]:
    real = [images.astronaut(), images.chelsea(), images.coffee(), images.rocket()]
    gray = np.stack([images.camera()] * 3, axis=-1)
    rng = np.random.default_rng(0)
    made = [rng.integers(0, 256, (64 + 16 * i, 96, 3), dtype=np.uint8) for i in range(3)]
    return [Image.fromarray(a) for a in [*real, gray, *made]]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(BACKBONE, pretrained=False, num_classes=10).eval()


@pytest.fixture(scope="module")
def batch(model: torch.nn.Module) -> torch.Tensor:
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    return torch.stack([transform(picture) for picture in _pictures()])


def _write_eval_cache(root: Path, model: torch.nn.Module, batch: torch.Tensor) -> pa.Table:
    """An eval cache of ``batch`` (epoch 0), embeddings computed with timm directly."""
    with torch.inference_mode():
        embedding = model.forward_head(model.forward_features(batch), pre_logits=True)
        logits = model.get_classifier()(embedding)
    labels = torch.arange(len(batch)) % 10
    loss = F.cross_entropy(logits, labels, reduction="none")
    probs = logits.softmax(-1)
    dim = embedding.shape[1]
    transform = {"input_size": list(batch.shape[1:]), "mean": [0.5] * 3, "std": [0.5] * 3}
    provenance = {
        "backbone": BACKBONE,
        "weights_digest": "sha256:tuned",
        "weights_state_digest": state_digest(model),
        "transform": transform,
    }
    schema = with_provenance(cache_schema(dim), {**provenance, "seed": 0, "num_classes": 10})
    n = len(batch)
    outputs = {
        "embedding": embedding.numpy(),
        "loss": loss.numpy(),
        "pred": probs.argmax(-1).numpy(),
        "max_prob": probs.max(-1).values.numpy(),
        "entropy": (-(probs * probs.log()).sum(-1)).numpy(),
    }
    batch = to_record_batch(
        schema,
        keys=[f"img-{i:03d}" for i in range(n)],
        shard="eval-0000",
        epoch=0,
        labels=labels.numpy(),
        outputs=outputs,
    )
    table = pa.Table.from_batches([batch])
    (root / "epoch=0000").mkdir(parents=True)
    pq.write_table(table, root / "epoch=0000" / "eval-0000.parquet")
    return table


def test_attached_model_gives_the_heads_uncertainty_of_the_cached_embedding(
    tmp_path: Path, model: torch.nn.Module, batch: torch.Tensor
) -> None:
    cache = tmp_path / "cache"
    _write_eval_cache(cache, model, batch)
    config = TrainConfig(
        hidden=(32, 32),
        schedule=ScheduleConfig(episodes=2, episode_size=64, batch_size=16, warmup_episodes=1),
        stream=StreamConfig(shuffle_rows=64, val_fraction=0.0),
    )
    output = tmp_path / "head"
    result = fit_head([str(cache)], str(output), config)
    assert result.finished and (output / HEAD_WEIGHTS).exists()
    doc = json.loads((output / HEAD_JSON).read_text())  # strict JSON: NaN metrics are null
    validate_head(doc)
    assert doc["backbone"] == BACKBONE and doc["input_dtype"] == "float16"
    assert doc["num_classes"] == 10  # the classifier and the images the head learned from
    assert doc["weights_state_digest"] == state_digest(model)
    assert doc["input"] == {"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attached = attach_head(model, str(output))  # the weights the cache was made with
    torch.manual_seed(1)
    never_loaded = timm.create_model(BACKBONE, pretrained=False, num_classes=10)
    with pytest.warns(UserWarning, match=r"not those .*\(sha256:tuned\); load the weights its"):
        attach_head(never_loaded, str(output))
    with torch.inference_mode():
        out = attached(batch)
        logits = model(batch)
        embedding = model.forward_head(model.forward_features(batch), pre_logits=True)
    assert set(out) == {"logits", "embedding", "uncertainty"}
    torch.testing.assert_close(out["logits"], logits, rtol=0, atol=0)
    torch.testing.assert_close(out["embedding"], embedding, rtol=0, atol=0)

    # the head applied to each image's cached eval embedding, read back from the Parquet file
    stored = pq.read_table(cache / "epoch=0000" / "eval-0000.parquet").column("embedding")
    cached = torch.from_numpy(
        stored.combine_chunks().flatten().to_numpy().reshape(len(batch), -1).astype(np.float32)
    )
    head, _ = load_head(str(output))
    with torch.inference_mode():
        expected = head(cached)
    assert out["uncertainty"].shape == (len(batch),)
    torch.testing.assert_close(out["uncertainty"], expected, rtol=1e-6, atol=1e-7)
    with torch.inference_mode():
        assert torch.equal(result.head.eval()(cached), expected)


def test_export_round_trip_without_pickle(tmp_path: Path) -> None:
    head = create_head(HeadConfig(embedding_dim=24, hidden=(16, 8)), seed=5)
    doc = export_head(
        head, str(tmp_path), backbone="resnet18", weights_digest="sha256:abc", loss="l2"
    )
    assert json.loads((tmp_path / HEAD_JSON).read_text()) == doc
    with safe_open(tmp_path / HEAD_WEIGHTS, framework="pt") as weights:
        assert set(weights.keys()) == set(head.state_dict())
    loaded, loaded_doc = load_head(str(tmp_path))
    assert loaded_doc["hidden"] == [16, 8] and loaded_doc["loss"] == "l2"
    x = torch.randn(3, 24)
    with torch.inference_mode():
        assert torch.equal(loaded(x), head.eval()(x))


def test_attach_refuses_a_model_of_another_width_or_architecture(tmp_path: Path) -> None:
    """A resnet10t head attached silently to resnet18 (the same 512 width): garbage scores."""
    other = timm.create_model("resnet18", pretrained=False)
    head = create_head(HeadConfig(embedding_dim=192), seed=0)
    export_head(head, str(tmp_path), backbone="resnet18", weights_digest="x", loss="ranking")
    with pytest.raises(ValueError, match="512"):
        attach_head(other, str(tmp_path))
    head = create_head(HeadConfig(embedding_dim=512), seed=0)
    export_head(head, str(tmp_path), backbone="resnet10t.a1_in1k", weights_digest="x", loss="l2")
    refusal = r"trained on resnet10t\.a1_in1k .* the model is a resnet18"
    with pytest.raises(ValueError, match=refusal):
        attach_head(other, str(tmp_path))
    attach_head(timm.create_model("resnet10t", pretrained=False), str(tmp_path))


def test_head_json_is_validated(tmp_path: Path) -> None:
    head = create_head(HeadConfig(embedding_dim=8), seed=0)
    with pytest.raises(ValueError, match="loss"):
        export_head(head, str(tmp_path), backbone="b", weights_digest="d", loss="hinge")
    # JSON Schema counts 16.0 as an integer; the head's layers do not (a TypeError traceback)
    export_head(head, str(tmp_path), backbone="b", weights_digest="d", loss="ranking")
    doc = json.loads((tmp_path / HEAD_JSON).read_text())
    (tmp_path / HEAD_JSON).write_text(json.dumps({**doc, "embedding_dim": 8.0}))
    with pytest.raises(ValueError, match="is not a valid pvu head export"):
        load_head(str(tmp_path))


def _export(folder: Path, *, backbone: str = BACKBONE, weights_digest: str = "x") -> str:
    """A seeded head for 192-d (ViT-Ti) embeddings exported to ``folder``."""
    head = create_head(HeadConfig(embedding_dim=192, hidden=(16,)), seed=0)
    export_head(head, str(folder), backbone=backbone, weights_digest=weights_digest, loss="l2")
    return str(folder)


def test_the_head_runs_in_float32_under_autocast_and_in_a_cast_down_model(
    tmp_path: Path, model: torch.nn.Module, batch: torch.Tensor
) -> None:
    """The cache computes the model's head and everything after it in float32 outside autocast;
    an attached model under bf16 autocast rounded the uncertainties to bf16 (most rows tied),
    and one cast to half failed on the float32 input it fed its own head."""
    folder = _export(tmp_path)
    attached = attach_head(model, folder)
    with torch.inference_mode():
        exact = attached(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = attached(batch)
    assert mixed["logits"].dtype == mixed["uncertainty"].dtype == torch.float32
    head, _ = load_head(folder)
    with torch.inference_mode():
        expected = head(mixed["embedding"].to(torch.float16).float())
    torch.testing.assert_close(mixed["uncertainty"], expected, rtol=0, atol=0)
    torch.testing.assert_close(mixed["uncertainty"], exact["uncertainty"], rtol=0.05, atol=0.02)

    torch.manual_seed(0)
    fresh = timm.create_model(BACKBONE, pretrained=False, num_classes=10).eval()
    halved = attach_head(fresh, folder).to(torch.bfloat16)
    with torch.inference_mode():
        low = halved(batch.to(torch.bfloat16))
    assert low["uncertainty"].dtype == torch.bfloat16 and low["uncertainty"].shape == (len(batch),)
    torch.testing.assert_close(low["uncertainty"].float(), exact["uncertainty"], rtol=0.1, atol=0.1)


def test_a_forward_in_train_mode_warns(tmp_path: Path, batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    fresh = timm.create_model(BACKBONE, pretrained=False, num_classes=10)  # in train mode
    attached = attach_head(fresh, _export(tmp_path))
    with pytest.warns(UserWarning, match=r"train mode.*call \.eval\(\)"), torch.no_grad():
        attached(batch[:2])


def test_the_train_mode_warning_follows_the_models_own_mode(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    """The warning read the wrapper's mode: a model switched to train mode through the
    reference its user kept scored other embeddings silently, and one switched to eval mode
    that way was told to call .eval()."""
    torch.manual_seed(0)
    model = timm.create_model(BACKBONE, pretrained=False, num_classes=10).eval()
    attached = attach_head(model, _export(tmp_path))
    model.train()  # the model the head was attached to, not what attach_head returned
    with pytest.warns(UserWarning, match=r"train mode"), torch.no_grad():
        attached(batch[:2])
    attached.train()
    model.eval()  # the trunk in eval mode: the embeddings the head learned
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        attached(batch[:2])


def test_a_model_moved_without_its_head_is_named(tmp_path: Path, batch: torch.Tensor) -> None:
    """A model moved through the reference its user kept (model.cuda()) left the head behind:
    its first forward was torch's device-mismatch traceback, naming neither what to move."""
    torch.manual_seed(0)
    model = timm.create_model(BACKBONE, pretrained=False, num_classes=10).eval()
    attached = attach_head(model, _export(tmp_path))
    model.to("meta")  # another device than the head's, as cuda would be
    images = torch.empty(2, *batch.shape[1:], device="meta")
    with pytest.raises(ValueError, match=r"on meta, but its uncertainty head on cpu: move what"):
        attached(images)
    assert attached.to("meta")(images)["uncertainty"].shape == (2,)


def test_an_attached_model_compiles_whole_in_train_mode(tmp_path: Path, batch: torch.Tensor):
    """torch.compile(fullgraph=True) stopped at the train-mode warning (dynamo cannot trace
    warnings.warn): fine-tuning a model with its head attached could not compile whole."""
    torch.manual_seed(0)
    attached = attach_head(timm.create_model(BACKBONE, num_classes=10), _export(tmp_path))
    compiled = torch.compile(attached, fullgraph=True, backend="eager")
    with torch.no_grad():
        expected = attached.eval()(batch[:2])
        got = compiled.eval()(batch[:2])
        compiled.train()(batch[:2])  # recompiled for train mode: whole, no warning to trace
    assert torch.equal(got["uncertainty"], expected["uncertainty"])


def test_attach_refuses_what_would_give_wrong_uncertainties(
    tmp_path: Path, model: torch.nn.Module, batch: torch.Tensor
) -> None:
    """Each was accepted: per-token uncertainties from an unpooled ViT, a head moved onto the
    meta device (garbage once the model was materialised), a second head (an AttributeError at
    the first forward)."""
    folder = _export(tmp_path)
    with pytest.warns(UserWarning, match="global_pool=''"):
        unpooled = attach_head(timm.create_model(BACKBONE, global_pool="", num_classes=10), folder)
    with pytest.raises(ValueError, match=r"shape \(2, 197, 192\).*\(batch, 192\).*global_pool"):
        unpooled.eval()(batch[:2])
    with torch.device("meta"):
        meta = timm.create_model(BACKBONE, pretrained=False, num_classes=10)
    with pytest.raises(ValueError, match="meta device"):
        attach_head(meta, folder)
    with pytest.raises(ValueError, match="already has an uncertainty head"):
        attach_head(attach_head(model, folder), folder)


def test_attach_knows_a_deprecated_name_and_warns_of_other_hub_weights(
    tmp_path: Path, model: torch.nn.Module
) -> None:
    # timm builds vit_tiny_patch16_224 for the deprecated name the head's cache was made with
    attach_head(model, _export(tmp_path / "old", backbone="vit_tiny_patch16_224_in21k"))
    with pytest.raises(ValueError, match="the model is a resnet10t"):
        attach_head(timm.create_model("resnet10t"), _export(tmp_path / "vit"))

    hub = f"hub:{BACKBONE}.augreg_in21k:state-sha256:{state_digest(model)}"
    folder = _export(tmp_path / "hub", weights_digest=hub)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach_head(model, folder)  # the weights the cache was made with: no warning
    torch.manual_seed(1)
    other = timm.create_model(BACKBONE, pretrained=False, num_classes=10).eval()
    with pytest.warns(UserWarning, match=r"not those .*augreg_in21k.*pretrained=True"):
        attach_head(other, folder)
    torch.manual_seed(0)
    same = timm.create_model(BACKBONE, pretrained=False, num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach_head(same.to(torch.bfloat16), folder)  # the same weights, cast down: no warning


def test_attach_says_a_model_without_classifier_went_unchecked(
    tmp_path: Path, model: torch.nn.Module, batch: torch.Tensor
) -> None:
    """timm's num_classes=0 (the trunk alone, its embedding as output) with the cache's weights
    was told to load the weights its cache was made with (a head recording the class count) or
    that it was reparameterized (an older head): its weights are right, only uncheckable."""
    hub = f"hub:{BACKBONE}.augreg_in21k:state-sha256:{state_digest(model)}"
    head = create_head(HeadConfig(embedding_dim=192, hidden=(16,)), seed=0)
    counted, older = str(tmp_path / "counted"), str(tmp_path / "older")
    export_head(head, counted, backbone=BACKBONE, weights_digest=hub, loss="l2", num_classes=10)
    export_head(head, older, backbone=BACKBONE, weights_digest=hub, loss="l2")
    trunk = timm.create_model(BACKBONE, pretrained=False, num_classes=0).eval()
    trunk.load_state_dict({k: v for k, v in model.state_dict().items() if k in trunk.state_dict()})
    for folder in (counted, older):
        with pytest.warns(UserWarning) as said:
            attached = attach_head(trunk, folder)
        assert [str(warning.message) for warning in said] == [
            f"the model has no classifier (num_classes=0), so its weights could not be checked "
            f"against those the head in {folder} was trained on (hub:{BACKBONE}.augreg_in21k); "
            "its logits are its embedding"
        ]
    with torch.no_grad():
        got, want = attached(batch[:2]), attach_head(model, older)(batch[:2])
    assert torch.equal(got["uncertainty"], want["uncertainty"])


def test_attach_warns_of_another_classifier_or_image_size_and_refuses_a_compiled_model(
    tmp_path: Path, model: torch.nn.Module, batch: torch.Tensor
) -> None:
    """Silent before: a model whose fine-tuned weights file was never loaded (1,000 classes
    where the cache's classifier had 10), images of another size than the cache's (shifted
    embeddings), and a compiled model (a false weights warning; the trunk ran uncompiled)."""
    head = create_head(HeadConfig(embedding_dim=192, hidden=(16,)), seed=0)
    transform = {"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3, "hflip": 0.5}
    folder = str(tmp_path / "head")
    export_head(head, folder, backbone=BACKBONE, weights_digest="x", loss="l2", num_classes=10,
                image_input=image_input({"transform": transform}))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attached = attach_head(model, folder)
        with torch.no_grad():
            attached(batch[:2])  # the cache's classifier and image size: no warning
    stock = timm.create_model(BACKBONE, pretrained=False, dynamic_img_size=True).eval()
    smaller = torch.nn.functional.interpolate(batch[:2], size=160)
    with pytest.warns(UserWarning) as said, torch.no_grad():
        attach_head(stock, folder)(smaller)
    assert [str(warning.message).split(":")[0] for warning in said] == [
        f"the head in {folder} learned the loss of a 10-class classifier, but the model has 1000 "
        "classes",
        "images of (160, 160) pixels, but the head was trained on embeddings of (224, 224) images",
    ]
    with pytest.raises(ValueError, match="compile what attach_head returns"):
        attach_head(torch.compile(model), folder)
    in_place = timm.create_model(BACKBONE, pretrained=False, num_classes=10).eval()
    in_place.compile()
    with pytest.raises(ValueError, match="compile what attach_head returns"):
        attach_head(in_place, folder)


def test_attach_warns_of_a_model_pooled_otherwise_than_its_cache(tmp_path: Path, model) -> None:
    """A head from a cache of timm's default pooling (no model_kwargs) attached silently to a
    model built with global_pool='avg': another embedding, with no parameter to tell it by.
    Hiera's and MambaOut's pooling, which their head keeps as pool_type, went unread: any
    global_pool attached silently, and a reset_classifier after attaching changed it unwarned."""
    folder = _export(tmp_path / "head")
    averaged = timm.create_model(BACKBONE, pretrained=False, num_classes=10, global_pool="avg")
    with pytest.warns(
        UserWarning, match=r"with global_pool='token', but the model has global_pool='avg'"
    ):
        attach_head(averaged, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach_head(model, folder)  # timm's default, as the cache's backbone
    head = create_head(HeadConfig(embedding_dim=320, hidden=(8,)), seed=0)  # pooled in .head
    export_head(head, str(tmp_path / "convnext"), backbone="convnext_atto", weights_digest="x",
                loss="l2", model_kwargs={"global_pool": "max"})  # fmt: skip
    with pytest.warns(UserWarning, match=r"global_pool='max', but the model has global_pool='avg'"):
        attach_head(timm.create_model("convnext_atto"), str(tmp_path / "convnext"))
    # Hiera's and MambaOut's head keeps its pooling as pool_type, with no global_pool
    mambaout = str(tmp_path / "mambaout")
    narrow = create_head(HeadConfig(embedding_dim=256, hidden=(8,)), seed=0)
    export_head(narrow, mambaout, backbone="test_mambaout", weights_digest="x", loss="l2")
    with pytest.warns(UserWarning, match=r"global_pool='avg', but the model has global_pool='max'"):
        attach_head(timm.create_model("test_mambaout", global_pool="max"), mambaout)
    attached = attach_head(timm.create_model("test_mambaout").eval(), mambaout)
    attached.model.reset_classifier(1000, global_pool="max")
    with pytest.warns(UserWarning, match="global_pool is 'max' since the head was attached"):
        attached(torch.rand(1, 3, 64, 64))
    # dropout is off in eval mode, where caches are made: the same embeddings without it
    export_head(head, str(tmp_path / "dropout"), backbone="convnext_atto", weights_digest="x",
                loss="l2", model_kwargs={"drop_rate": 0.3, "drop_path_rate": 0.1})  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attach_head(timm.create_model("convnext_atto"), str(tmp_path / "dropout"))
    assert not [w for w in caught if "drop" in str(w.message)], [str(w.message) for w in caught]


def test_a_missing_or_newer_head_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a valid pvu head export"):
        load_head(str(tmp_path / "nothing-here"))
    folder = _export(tmp_path / "head")
    document = json.loads((tmp_path / "head" / HEAD_JSON).read_text())
    (tmp_path / "head" / HEAD_JSON).write_text(json.dumps({**document, "format_version": 2}))
    with pytest.raises(ValueError, match=r"format_version 2 is newer .* upgrade pvu"):
        load_head(folder)


def test_the_attached_model_stays_a_timm_model_to_its_users(
    tmp_path: Path, model: torch.nn.Module, batch: torch.Tensor
) -> None:
    """Each was silent or a traceback: timm's data config of the attached model was timm's
    default (other mean and std than the model's), pooling changed after attach scored other
    embeddings, a features_only model failed at its first forward (a DataParallel one was told
    to be created without features_only), the path of head.json
    raised NotADirectoryError, and a forward on the meta device (shapes only) raised."""
    folder = _export(tmp_path / "head")
    own = timm.create_model(f"{BACKBONE}.augreg_in21k", pretrained=False, num_classes=10).eval()
    attached = attach_head(own, folder)
    assert resolve_model_data_config(attached) == resolve_model_data_config(own)
    attached.pretrained_cfg = {**own.pretrained_cfg, "mean": (0.1, 0.2, 0.3)}  # timm's habit
    assert own.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)

    changed = attach_head(timm.create_model(BACKBONE, num_classes=10).eval(), folder)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        changed(batch[:2])
        changed.model.reset_classifier(10, global_pool="avg")
        with pytest.raises(UserWarning, match="global_pool is 'avg' since the head was attached"):
            changed(batch[:2])

    features = timm.create_model("resnet10t", pretrained=False, features_only=True)
    with pytest.raises(ValueError, match="create the model without features_only"):
        attach_head(features, folder)
    with pytest.raises(ValueError, match=r"the timm classifier it wraps \(its \.module\)"):
        attach_head(torch.nn.DataParallel(own), folder)  # was told: without features_only
    with pytest.raises(ValueError, match=r"give the folder `pvu train-head --output` wrote"):
        attach_head(model, f"{folder}/{HEAD_JSON}")

    shapes = attach_head(timm.create_model(BACKBONE, num_classes=10).eval(), folder).to("meta")
    out = shapes(torch.empty(2, *batch.shape[1:], device="meta"))
    assert {name: tuple(value.shape) for name, value in out.items()} == {
        "logits": (2, 10), "embedding": (2, 192), "uncertainty": (2,)
    }  # fmt: skip


def test_attach_tells_a_reparameterized_model_from_one_of_other_weights(tmp_path: Path) -> None:
    """MobileOne fused by timm.utils.reparameterize_model gives the same embeddings under other
    weight names; attach said its weights were not the cache's ("load the weights ...")."""
    torch.manual_seed(0)
    model = timm.create_model("mobileone_s0", pretrained=False, num_classes=10).eval()
    digest = f"random:mobileone_s0:seed0:state-sha256:{state_digest(model)}"
    head = create_head(HeadConfig(embedding_dim=model.num_features, hidden=(8,)), seed=0)
    export_head(head, str(tmp_path), backbone="mobileone_s0", weights_digest=digest,
                loss="ranking", num_classes=10)  # fmt: skip
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model.forward_head(model.forward_features(images), pre_logits=True)

    with pytest.warns(UserWarning, match="reparameterized or fused") as record:
        attach_head(reparameterize_model(model), str(tmp_path))  # a fused copy
    assert not any("load the weights" in str(w.message) for w in record)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the weights the cache was made with, fused after
        attached = reparameterize_model(attach_head(model, str(tmp_path)))
        with torch.inference_mode():
            got = attached(images)["embedding"]
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


@pytest.mark.parametrize(
    ("backbone", "width", "size"),
    [("resnet18", 512, 64), (BACKBONE, 192, 224), ("crossvit_tiny_240", 288, 64)],
)
def test_an_attached_model_scripts_as_the_stock_model_does(
    tmp_path: Path, backbone: str, width: int, size: int
) -> None:
    """torch.jit.script of an attached model failed (timm's config properties, warnings,
    parameters() and autocast with a device known only at run time; CrossViT's features, one
    tensor per branch, were cast as one tensor); the stock model's scripts."""
    head = create_head(HeadConfig(embedding_dim=width, hidden=(16,)), seed=0)
    export_head(head, str(tmp_path), backbone=backbone, weights_digest="x", loss="l2")
    torch.manual_seed(0)
    attached = attach_head(timm.create_model(backbone, num_classes=10).eval(), str(tmp_path))
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    _assert_scripts_the_same(attached, images)
    _assert_scripts_the_same(attached.to(torch.bfloat16), images.bfloat16())  # a cast followed


def _assert_scripts_the_same(model: torch.nn.Module, images: torch.Tensor) -> None:
    """``model`` scripted gives what it gives eagerly on ``images``."""
    scripted = torch.jit.script(model)
    with torch.no_grad():
        expected, got = model(images), scripted(images)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_a_timm_checkpoint_loaded_into_the_attached_model_is_refused_saying_where(
    tmp_path: Path, model: torch.nn.Module, batch: torch.Tensor
) -> None:
    """The stock model's state_dict loaded into what attach_head returns failed listing every
    weight twice (missing under ``model.``, unexpected without), and with strict=False loaded
    nothing, silently; the attached model's own state_dict (``model.*``, ``head.*``) loads."""
    folder = _export(tmp_path)
    attached = attach_head(model, folder)
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"timm model's own weights \('cls_token', .*load "):
            attached.load_state_dict(model.state_dict(), strict=strict)
    state = attached.state_dict()
    assert {name.split(".")[0] for name in state} == {"model", "head"}
    copy = attach_head(timm.create_model(BACKBONE, num_classes=10).eval(), folder)
    assert not copy.load_state_dict(state).missing_keys
    with torch.no_grad():
        got, want = copy(batch[:2]), attached(batch[:2])
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("strict", [False, True])
def test_an_attached_model_exports_with_a_dynamic_batch(tmp_path: Path, strict: bool) -> None:
    """torch.export of an attached model, saved and loaded, gives its eager outputs for any
    batch size (what docs/usage.md promises deployers; ONNX's dynamo export builds on it)."""
    model = timm.create_model("resnet10t", num_classes=10).eval()
    head = create_head(HeadConfig(embedding_dim=model.num_features, hidden=(16,)), seed=0)
    export_head(head, str(tmp_path), backbone="resnet10t", weights_digest="x", loss="l2")
    attached = attach_head(model, str(tmp_path))
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    batch = {"images": {0: torch.export.Dim("batch", min=1, max=64)}}
    program = torch.export.export(attached, (images[:2],), dynamic_shapes=batch, strict=strict)
    torch.export.save(program, tmp_path / "attached.pt2")
    loaded = torch.export.load(tmp_path / "attached.pt2").module()
    for size in (1, 3):
        with torch.no_grad():
            expected, got = attached(images[:size]), loaded(images[:size])
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)
