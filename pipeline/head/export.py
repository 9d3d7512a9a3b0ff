"""Export a trained head (docs/design.md 3.5) and attach it to a stock timm model.

Usage::

    import timm
    from pipeline.head.export import attach_head

    model = timm.create_model("vit_base_patch16_224.augreg_in21k", pretrained=True).eval()
    model = attach_head(model, "runs/head")
    out = model(images)  # {"logits": (B, C), "embedding": (B, D), "uncertainty": (B,)}

The model's own head and the embedding's rounding to the cache's dtype run in the model's
weight type (float32 unless it was cast down), the uncertainty head in its own (float32, unless
the attached model is cast), outside any autocast, as ``pvu cache`` computed what the head was
trained on; the trunk runs as the caller runs it.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Mapping
from typing import Any

import fsspec
import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from pipeline.cache.backbone import model_head, state_digest
from pipeline.head.checkpoint import CHECKPOINT_DIR, CHECKPOINT_JSON
from pipeline.head.model import HeadConfig, UncertaintyHead
from pipeline.retry import exists, make_folder, read_bytes, write_bytes
from schemas import is_newer, validate_head

HEAD_WEIGHTS = "head.safetensors"
HEAD_JSON = "head.json"
FORMAT_VERSION = 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def head_document(
    head: UncertaintyHead,
    *,
    backbone: str,
    weights_digest: str,
    loss: str,
    input_dtype: str = "float16",
    num_classes: int | None = None,
    weights_state_digest: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    image_input: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The head.json document describing ``head`` (validated against the head schema).

    ``num_classes``, ``weights_state_digest``, ``model_kwargs`` and ``image_input``
    (:func:`image_input`) record the classifier whose loss the head learned and the images its
    embeddings came from.
    """
    cfg = head.config
    doc: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "embedding_dim": cfg.embedding_dim,
        "hidden": list(cfg.hidden),
        "activation": {"name": "leaky_relu", "negative_slope": cfg.negative_slope},
        "output": {"name": cfg.output}
        | (
            {"beta": cfg.softplus_beta, "threshold": cfg.softplus_threshold}
            if cfg.output == "softplus"
            else {}
        ),
        "backbone": backbone,
        "weights_digest": weights_digest,
        "loss": loss,
        "input_dtype": input_dtype,
        "training": training or {},
    }
    if num_classes is not None:
        doc["num_classes"] = num_classes
    if weights_state_digest is not None:
        doc["weights_state_digest"] = weights_state_digest
    if model_kwargs:
        doc["model_kwargs"] = model_kwargs
    if image_input is not None:
        doc["input"] = image_input
    validate_head(doc)
    return doc


def image_input(provenance: dict[str, Any]) -> dict[str, Any] | None:
    """The images a cache's embeddings came from (``input_size`` [C, H, W], ``mean``, ``std``),
    from its ``provenance``; None where its transform does not say."""
    transform = provenance.get("transform") or {}
    fields = ("input_size", "mean", "std")
    return {key: transform[key] for key in fields} if set(fields) <= transform.keys() else None


def export_head(head: UncertaintyHead, output: str, **document: Any) -> dict[str, Any]:
    """Write ``<output>/head.safetensors`` and ``<output>/head.json``; returns the document.

    Keyword arguments are those of :func:`head_document`. The JSON is written last.
    """
    doc = head_document(head, **document)
    fs, root = fsspec.core.url_to_fs(output)
    make_folder(fs, root)
    state = {name: t.detach().cpu().contiguous() for name, t in head.state_dict().items()}
    write_bytes(fs, f"{root}/{HEAD_WEIGHTS}", save_safetensors(state, metadata={"format": "pt"}))
    write_bytes(fs, f"{root}/{HEAD_JSON}", json.dumps(doc, indent=2, sort_keys=True).encode())
    return doc


def head_config(doc: dict[str, Any]) -> HeadConfig:
    """The :class:`HeadConfig` a validated head.json describes."""
    output = doc["output"]
    return HeadConfig(
        embedding_dim=doc["embedding_dim"],
        hidden=tuple(doc["hidden"]),
        negative_slope=doc["activation"].get("negative_slope", 0.01),
        output=output["name"],
        softplus_beta=output.get("beta", 1.0),
        softplus_threshold=output.get("threshold", 20.0),
    )


def unfinished_run(head_dir: str) -> str | None:
    """Why ``head_dir`` holds no whole head, where it holds a `pvu train-head` run that has not
    finished (stopped, or still running) or whose export is gone; else None."""
    fs, root = fsspec.core.url_to_fs(head_dir)
    state = f"{root}/{CHECKPOINT_DIR}/{CHECKPOINT_JSON}"
    if not exists(fs, state):
        return None
    try:
        doc = json.loads(read_bytes(fs, state))
        finished = int(doc["episode"]) >= int(doc["config"]["schedule"]["episodes"])
    except (ValueError, KeyError, TypeError):  # a damaged checkpoint: --resume names it
        finished = False
    if finished:
        return (
            f"{head_dir} holds a training run that finished, but its head export ({HEAD_JSON}, "
            f"{HEAD_WEIGHTS}) is missing or cut short: write it again with the same `pvu "
            "train-head` command and --resume"
        )
    return (
        f"{head_dir} holds a training run that has not finished: its head is exported when the "
        "last episode is done; finish it with the same `pvu train-head` command and --resume"
    )


def load_head(head_dir: str) -> tuple[UncertaintyHead, dict[str, Any]]:
    """The head exported to ``head_dir`` (in eval mode) and its head.json document; raises
    ``ValueError`` naming the folder if its files are not a head export that fits together."""
    fs, root = fsspec.core.url_to_fs(head_dir)
    try:
        doc = json.loads(read_bytes(fs, f"{root}/{HEAD_JSON}"))
        if isinstance(doc, dict) and is_newer(doc.get("format_version"), FORMAT_VERSION):
            raise ValueError(
                f"format_version {doc['format_version']} is newer than this pvu reads "
                f"({FORMAT_VERSION}): upgrade pvu"
            )
        validate_head(doc)
        head = UncertaintyHead(head_config(doc))
        weights = load_safetensors(read_bytes(fs, f"{root}/{HEAD_WEIGHTS}"))
        head.load_state_dict(weights, strict=True)
    except OSError as error:  # no such folder, or the path of head.json itself
        raise ValueError(
            unfinished_run(head_dir)
            or f"{head_dir} is not a valid pvu head export: {error}; give the folder `pvu "
            f"train-head --output` wrote, which holds {HEAD_JSON} and {HEAD_WEIGHTS}"
        ) from None
    # a bad size is a RuntimeError; a width JSON Schema let through as 16.0, a TypeError
    except (ValueError, RuntimeError, TypeError, SafetensorError) as error:
        reasons = [line.strip() for line in str(error).splitlines() if line.strip()]
        run = unfinished_run(head_dir)  # an export cut short, which its run writes again
        reason = "; ".join([*reasons, *([run] if run else [])])
        raise ValueError(f"{head_dir} is not a valid pvu head export: {reason}") from None
    return head.eval(), doc


#: Said (once per call site) by a forward of a model in train mode.
TRAIN_MODE = (
    "the model with an uncertainty head is in train mode: BatchNorm uses each batch's "
    "statistics and dropout is on, so its embeddings, and uncertainties, are not those the head "
    "was trained on; call .eval() first"
)


class HeadedModel(nn.Module):
    """A timm classifier plus an uncertainty head: one forward, three outputs.

    ``torch.jit.script`` takes it where it takes the model. A scripted forward warns of nothing
    (:meth:`_warn_of_misuse`), runs the model's own head and the uncertainty head under the
    caller's autocast (TorchScript cannot turn it off inside: call it outside autocast for the
    uncertainties the head learned) and takes the model's weight type from the attached model's
    (``.to(dtype)`` of what :func:`attach_head` returns, not of its ``.model``).
    """

    __jit_unused_properties__ = ("pretrained_cfg", "default_cfg")  # timm's config: Python's

    def __init__(
        self,
        model: nn.Module,
        head: UncertaintyHead,
        input_dtype: str,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.input_dtype = _DTYPES[input_dtype]
        self.image_size = image_size  # (H, W) the head's cache fed the model, if recorded
        self.pooling = _setting(model, "global_pool")  # checked at attach; a change is warned of
        self.width = head.config.embedding_dim
        # the model's weight type for a scripted forward, which cannot iterate its parameters:
        # an empty tensor, cast with the attached model (not kept in its state_dict)
        weights = next(model.parameters())
        self.register_buffer("weight_type", weights.new_empty(0), persistent=False)

    @property
    def pretrained_cfg(self) -> dict[str, Any] | None:
        """The model's timm config, so ``timm.data.resolve_model_data_config`` of the attached
        model gives the model's input size, mean and std."""
        return getattr(self.model, "pretrained_cfg", None)

    @pretrained_cfg.setter
    def pretrained_cfg(self, config: dict[str, Any] | None) -> None:
        self.model.pretrained_cfg = config

    @property
    def default_cfg(self) -> dict[str, Any] | None:
        """The model's timm config under its older name."""
        return getattr(self.model, "default_cfg", None)

    @torch.jit.unused
    def _warn_of_misuse(self, images: torch.Tensor) -> None:
        """Warn of a forward whose uncertainties are not those the head learned; refuse one of
        a model moved to another device than its head."""
        model, head = next(self.model.parameters()).device, self.head.layers[0].weight.device
        if model != head:  # moved through the reference its user kept: the head stayed
            raise ValueError(
                f"the model is on {model}, but its uncertainty head on {head}: move what "
                "attach_head returns (.to(device)), not the model it was attached to"
            )
        # the model's own mode, which a switch through the reference its user kept sets too
        # (not each layer's: those timm.utils.reparameterize_model fuses are made in train mode)
        if self.model.training:
            warnings.warn(TRAIN_MODE, stacklevel=3)
        if self.image_size and tuple(images.shape[-2:]) != self.image_size:
            warnings.warn(
                f"images of {tuple(images.shape[-2:])} pixels, but the head was trained on "
                f"embeddings of {self.image_size} images: its uncertainties are for those; "
                "prepare images as head.json's input says (size, mean, std)",
                stacklevel=3,
            )
        pooling = _setting(self.model, "global_pool")
        if pooling != self.pooling:  # reset_classifier(n, global_pool=...) since attach
            warnings.warn(
                f"the model's global_pool is {pooling!r} since the head was attached, not "
                f"{self.pooling!r}: its embeddings are not those the head was trained on",
                stacklevel=3,
            )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``logits (B, C)``, pre-logit ``embedding (B, D)`` and ``uncertainty (B,)``."""
        if not torch.jit.is_scripting() and not torch.compiler.is_compiling():
            self._warn_of_misuse(images)  # neither dynamo nor TorchScript takes warnings.warn
        features = self.model.forward_features(images)  # under the caller's autocast, if any
        if torch.jit.is_scripting():  # autocast's device and switch must be constants there
            dtype = self.weight_type.dtype
            # features' type is static there, so one branch is compiled; model_head does not
            # script, and a list of them (one per branch, CrossViT's) has no .to()
            if isinstance(features, torch.Tensor):
                features = features.to(dtype)
            else:
                features = [branch.to(dtype) for branch in features]
            embedding = self.model.forward_head(features, pre_logits=True)
            return self._outputs(embedding, self.model.forward_head(features))
        meta = images.device.type == "meta"  # shapes only (autocast has no meta device)
        with (
            contextlib.nullcontext() if meta else torch.autocast(images.device.type, enabled=False)
        ):
            dtype = next(self.model.parameters()).dtype
            return self._outputs(*model_head(self.model, features, dtype))

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``nn.Module.load_state_dict``; refuses a state_dict of the timm model alone (a timm
        checkpoint, keys without ``model.``), whose weights would all be missing (or, with
        ``strict=False``, none loaded)."""
        if not any(key.startswith("model.") for key in state_dict):
            own = self.model.state_dict().keys()
            found = ", ".join([repr(key) for key in state_dict if key in own][:2])
            if found:
                raise ValueError(
                    f"the state_dict holds the timm model's own weights ({found}, ...), not the "
                    "attached model's (model.*, head.*): load it into the timm model, then "
                    "attach the head (attach_head checks the weights against those the head "
                    "was trained on)"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _outputs(self, embedding: torch.Tensor, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`forward`'s outputs from the model's pre-logit ``embedding`` and ``logits``."""
        if embedding.ndim != 2 or embedding.shape[1] != self.width:
            shape = ", ".join([str(size) for size in embedding.shape])  # tuple() does not script
            raise ValueError(
                f"the model's pre-logit output has shape ({shape}), but the head takes "
                f"(batch, {self.width}): give the model the pooling (global_pool) and head it "
                "had when its embeddings were cached"
            )
        # The head was trained on embeddings stored as input_dtype; round them the same way.
        rounded = embedding.detach().to(self.input_dtype)
        uncertainty = self.head(rounded.to(self.head.layers[0].weight.dtype))
        return {"logits": logits, "embedding": embedding, "uncertainty": uncertainty}


def attach_head(model: nn.Module, head_dir: str) -> HeadedModel:
    """``model`` (a timm classifier, its weights loaded) with the head exported to ``head_dir``
    attached.

    The head's input is the model's pre-logit embedding, ``forward_head(..., pre_logits=True)``;
    a model of another timm architecture than the head was trained on, or of another width, a
    model on the meta device or one with a head already attached is refused; a classifier or
    float32 weights other than those the cache was made with are warned about. The returned
    module is in ``model``'s train/eval mode (call ``.eval()``: a forward in train mode warns).
    """
    if isinstance(model, HeadedModel):
        raise ValueError("the model already has an uncertainty head: attach to its .model")
    compiled = hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None)
    if compiled:  # torch.compile(model) or model.compile(): forward_features runs uncompiled
        raise ValueError(
            "the model is compiled: attach the head to the model itself, then compile what "
            "attach_head returns"
        )
    if not all(hasattr(model, name) for name in ("forward_features", "forward_head")):
        wrapped = isinstance(getattr(model, "module", None), nn.Module)  # DataParallel, DDP
        raise ValueError(
            f"the model ({type(model).__name__}) has no forward_features and forward_head: "
            + (
                "attach the head to the timm classifier it wraps (its .module), then wrap "
                "what attach_head returns"
                if wrapped
                else "attach the head to a timm classifier (a features_only model is a "
                "feature extractor; create the model without features_only)"
            )
        )
    if any(parameter.is_meta for parameter in model.parameters()):
        raise ValueError(
            "the model's weights are on the meta device: load them (to_empty, "
            "load_state_dict) before attaching the head"
        )
    head, doc = load_head(head_dir)
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if architecture and architecture != _architecture(doc["backbone"], architecture):
        raise ValueError(
            f"head in {head_dir} was trained on {doc['backbone']} embeddings, but the model is "
            f"a {architecture}: attach it to the backbone it was trained for"
        )
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if width is not None and width != doc["embedding_dim"]:
        raise ValueError(
            f"head in {head_dir} expects {doc['embedding_dim']}-d embeddings "
            f"(backbone {doc['backbone']}), but the model's pre-logit width is {width}: "
            "attach it to the backbone it was trained for, created with head.json's model_kwargs"
        )
    _check_weights(model, doc, head_dir)
    _check_model_kwargs(model, doc, head_dir)
    size = doc.get("input", {}).get("input_size")
    attached = HeadedModel(
        model, head, doc.get("input_dtype", "float32"), tuple(size[-2:]) if size else None
    )
    head.to(next(model.parameters()).device)
    return attached.train(model.training)


def _architecture(backbone: str, expected: str) -> str:
    """timm's architecture of the model name ``backbone``: its name without a pretrained tag,
    or, when that is not ``expected``, the architecture timm builds for it (a deprecated name
    such as ``vit_tiny_patch16_224_in21k`` builds ``vit_tiny_patch16_224``)."""
    name = backbone.split(".")[0]
    if name == expected:
        return name
    built = _meta_model(backbone, {})
    return (built.pretrained_cfg.get("architecture") if built else None) or name


def _meta_model(backbone: str, kwargs: dict[str, Any]) -> nn.Module | None:
    """timm's ``backbone`` built with ``kwargs`` on the meta device (no weights, no time);
    None where this timm cannot build it."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's "Mapping deprecated model name ..."
        try:
            return timm.create_model(backbone, pretrained=False, **kwargs)
        except (RuntimeError, ValueError, TypeError, AssertionError, NotImplementedError):
            return None


def _check_weights(model: nn.Module, doc: dict[str, Any], head_dir: str) -> None:
    """Warn when ``model`` is not the classifier whose embeddings and loss the head learned:
    one of another class count, or float32 weights whose state digest is not the cache's (a
    weights file never loaded, a model created without ``pretrained=True``); say that one
    without a classifier (``num_classes=0``) could not be checked."""
    trained, found = doc.get("num_classes"), getattr(model, "num_classes", None)
    digest = str(doc["weights_digest"])
    made_with = digest.split(":state-sha256:")[0]
    expected = doc.get("weights_state_digest") or (
        digest.rsplit(":", 1)[1] if ":state-sha256:" in digest else None
    )
    if found == 0 and trained != 0 and (trained or expected):
        # timm.create_model(..., num_classes=0): the trunk alone, whose state cannot be digested
        # as the whole classifier's was; its embeddings are the classifier's
        warnings.warn(
            "the model has no classifier (num_classes=0), so its weights could not be checked "
            f"against those the head in {head_dir} was trained on ({made_with}); its logits are "
            "its embedding",
            stacklevel=3,
        )
        return
    if trained is not None and found is not None and trained != found:
        warnings.warn(
            f"the head in {head_dir} learned the loss of a {trained}-class classifier, but the "
            f"model has {found} classes: load the weights its cache was made with",
            stacklevel=3,
        )
        return
    if expected is None:
        return  # a head exported before the state digest was recorded
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        return  # cast down: its digest cannot match the float32 weights the cache digested
    if expected != state_digest(model):
        built = _meta_model(doc["backbone"], doc.get("model_kwargs") or {})
        if built is not None and set(built.state_dict()) != set(model.state_dict()):
            # timm.utils.reparameterize_model (MobileOne, FastViT, RepViT, LeViT, ...) fuses
            # layers: the same function, so the same embeddings, under other weight names
            warnings.warn(
                f"the model's layers are not those of timm's {doc['backbone']} (reparameterized "
                "or fused, as timm.utils.reparameterize_model does?), so its weights could not "
                f"be checked against those the head in {head_dir} was trained on ({made_with}); "
                "attach the head to the model as timm creates it, then reparameterize what "
                "attach_head returns",
                stacklevel=3,
            )
            return
        advice = (
            "did you create it with pretrained=True?"
            if digest.startswith("hub:")
            else "load the weights its cache was made with"
        )
        warnings.warn(
            f"the model's weights are not those the head in {head_dir} was trained on "
            f"({made_with}); {advice}",
            stacklevel=3,
        )


#: ``model_kwargs`` of training only (dropout, stochastic depth): no-ops in eval mode, where
#: caches are made, so a model created without them has the same embeddings.
_EVAL_NO_OP = re.compile(r"drop(_path|_block)?_rate$")


def _check_model_kwargs(model: nn.Module, doc: dict[str, Any], head_dir: str) -> None:
    """Warn when ``model``'s pooling, or another plain setting a ``model_kwargs`` argument sets,
    differs from the backbone's the cache was made with (timm's defaults and head.json's
    ``model_kwargs``): its embeddings are others."""
    kwargs = doc.get("model_kwargs") or {}
    built = _meta_model(doc["backbone"], kwargs)
    if built is None:
        return
    for name in sorted({"global_pool", *kwargs} - set(filter(_EVAL_NO_OP.search, kwargs))):
        found, wanted = _setting(model, name), _setting(built, name)
        if found is not None and wanted is not None and found != wanted:
            warnings.warn(
                f"the head in {head_dir} was trained on embeddings of {doc['backbone']} with "
                f"{name}={wanted!r}, but the model has {name}={found!r}: create the model as "
                "its cache's backbone was (timm.create_model(..., **head.json's model_kwargs))",
                stacklevel=3,
            )


def _setting(model: nn.Module, name: str) -> str | int | float | bool | None:
    """``model``'s plain attribute ``name``, or its head's (ConvNeXt, RegNet, ... pool there);
    of timm's pooling module, its ``pool_type``. ``global_pool`` is also the ``pool_type`` a
    head keeps without a pooling module (timm's ``ClNormMlpClassifierHead``: Hiera, MambaOut)."""
    head = getattr(model, "head", None)
    owners = [model, head] if isinstance(head, nn.Module) else [model]
    names = [name, "pool_type"] if name == "global_pool" else [name]
    found = (getattr(owner, attr, None) for attr in names for owner in owners)
    value = next((value for value in found if value is not None), None)
    if isinstance(value, nn.Module):
        value = getattr(value, "pool_type", None)
    return value if isinstance(value, (str, int, float, bool)) else None
