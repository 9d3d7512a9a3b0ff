"""The frozen backbone: load a timm model once, then embedding, logits and loss in one forward.

The trunk (``forward_features``) may run under bf16 autocast on a GPU; the model's own head
(``forward_head``: pooling, the pre-logits embedding, the classifier, whatever its shape: one
layer, distilled DeiT's two, CrossViT's one per branch), the loss, ``max_prob`` and ``entropy``
always run in float32 on the float32-cast features (about 0.1% of the FLOPs), IEEE float32 even
where CUDA's TF32 is on (:func:`exact_float32`), since the loss is the label the head learns:
bf16 logits would be off by up to 0.0625 between 8 and 16. Where and
how the trunk ran (:class:`Compute`) is part of a cache's provenance.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import logging
import pickle
import re
from dataclasses import dataclass
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from timm.data import infer_imagenet_subset, resolve_model_data_config

from pipeline.cache.writer import finite_peak
from pipeline.precision import exact_float32
from pipeline.retry import read_url

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: timm's image-text towers (CLIP, SigLIP, MobileCLIP, Perception Encoder): their hub heads
#: project into a text embedding space unless fine-tuned on ImageNet's classes.
_IMAGE_TEXT = re.compile(r"clip|siglip|pe_core")


class Compute(BaseModel):
    """Where the trunk runs and under which autocast dtype (None: float32). Part of the
    provenance, so units computed on a CPU in fp32 and on a GPU in bf16 never share a cache."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: Literal["cpu", "cuda"] = "cpu"
    autocast: Literal["bfloat16"] | None = None

    @classmethod
    def resolve(cls, device: str, precision: Literal["bf16", "fp32"]) -> Compute:
        """``precision`` applied to ``device``: bf16 autocast runs on GPUs only."""
        return cls(
            device=device, autocast="bfloat16" if precision == "bf16" and device == "cuda" else None
        )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The torch dtype of :attr:`autocast`."""
        return None if self.autocast is None else getattr(torch, self.autocast)


@dataclass(frozen=True)
class BackboneInfo:
    """What the driver needs to know about a backbone without running it."""

    name: str
    weights_digest: str
    weights_state: str  # :func:`state_digest` of the weights as loaded
    embedding_dim: int
    num_classes: int
    data_config: dict[str, Any]
    embedding_peak: float  # the largest finite embedding magnitude on the probe images


def read_state_dict(url: str) -> dict[str, torch.Tensor]:
    """Weights from a safetensors file or a torch state dict, never unpickling arbitrary objects.

    The format is read from the bytes, not the name (a JAX ``.npz``, refused, by its name).
    A dict wrapping the weights (``state_dict``, ``model``, EMA, or the one dict of tensors a
    checkpoint holds beside others, as ``model_state_dict``) is opened, and a prefix every key
    shares from ``DataParallel`` (``module.``), ``torch.compile`` (``_orig_mod.``) or
    Lightning (``model.``) is removed.
    """
    data = read_url(url)
    if url.endswith(".npz"):
        raise ValueError(f"{url}: JAX .npz checkpoints are not loaded; convert to safetensors")
    if _is_safetensors(data):  # first: its header length may start with a pickle's byte
        try:
            state = load_safetensors(data)
        except SafetensorError as error:
            raise ValueError(f"{url}: a damaged safetensors file ({_first_line(error)})") from None
    elif data[:2] == b"PK" or data[:1] == b"\x80":  # a torch.save zip, or a legacy pickle
        state = _torch_state(url, data)
    else:
        raise ValueError(
            f"{url}: neither a safetensors file nor a torch state dict "
            f"({len(data)} bytes{', empty' if not data else ''})"
        )
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        holds = (
            f"a dict of {', '.join(map(repr, list(state)[:8]))}"
            if isinstance(state, dict)
            else f"a {type(state).__name__}"
        )
        raise ValueError(
            f"{url}: not a state dict of tensors, nor a checkpoint holding one dict of them (it "
            f"holds {holds}); save the model's state_dict() alone, or as a safetensors file"
        )
    if not state:
        raise ValueError(f"{url}: holds no tensors (an empty state dict)")
    return _strip_prefixes(state)


def _torch_state(url: str, data: bytes) -> Any:
    """What ``torch.save`` stored in ``data``, unpickling tensors and plain types only; a dict
    wrapping the weights is opened."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # the weights-only unpickler's refusal
        raise ValueError(
            f"{url}: refused to unpickle it (it holds more than tensors: "
            f"{_first_line(error)}); give a safetensors file or a plain state dict"
        ) from None
    except Exception as error:  # a damaged zip or pickle raises many types
        raise ValueError(f"{url}: a damaged torch file, or none ({_first_line(error)})") from None
    if not isinstance(state, dict) or _holds_tensors(state):
        return state
    for wrapper in _WRAPPER_KEYS:
        if _holds_tensors(state.get(wrapper)):
            return state[wrapper]
    # a trainer's own key (PyTorch's tutorial saves ``model_state_dict`` beside the
    # optimizer's, an epoch and a loss): the one dict of tensors the checkpoint holds
    nested = [key for key, value in state.items() if _holds_tensors(value)]
    return state[nested[0]] if len(nested) == 1 else state


def _holds_tensors(value: Any) -> bool:
    """Whether ``value`` is a non-empty dict of tensors (a state dict)."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def _is_safetensors(data: bytes) -> bool:
    """Whether ``data`` starts as a safetensors file: an 8-byte header length (little-endian,
    within the file), then its JSON header."""
    length = int.from_bytes(data[:8], "little")
    return len(data) >= 9 and data[8:9] == b"{" and 8 + length <= len(data)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without a wrapper prefix that every key shares, however nested."""
    while state:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def _first_line(error: BaseException) -> str:
    """The first line of ``error``'s message without terminal styling, or its type's name."""
    lines = _ANSI.sub("", str(error)).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _classifier_rows(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """Number of classes of the classifier stored in ``state`` for ``model``'s architecture."""
    classifier = model.pretrained_cfg.get("classifier") or "head"
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    for name in names:
        weight = state.get(f"{name}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def _first_conv(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(name, input channels) of the first convolution stored in ``state`` for ``model``'s
    architecture (timm's ``first_conv``, a Conv2d; CrossViT names one per branch); ("", 0)
    where ``state`` holds none."""
    first = model.pretrained_cfg.get("first_conv") or ()
    for name in [first] if isinstance(first, str) else list(first):
        weight = state.get(f"{name}.weight")
        if weight is not None and weight.ndim == 4:  # a Conv2d (out, in, h, w)
            return f"{name}.weight", int(weight.shape[1])
    return "", 0


def _image_channels(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(name, image channels) of the first convolution in ``state``, from its input channels
    against those of ``model``'s own, which takes 3 (TResNet's space-to-depth stem 48 for 3);
    channels 3 where either holds none."""
    conv, stored = _first_conv(model, state)
    own = _first_conv(model, model.state_dict())[1]
    return conv, round(3 * stored / own) if stored and own else 3


def file_digest(url: str) -> str:
    """``sha256:<hex>`` of the bytes of the file at ``url``."""
    return "sha256:" + hashlib.sha256(read_url(url)).hexdigest()


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and values, in name order)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _weights_digest(name: str, weights: str, state: str) -> str:
    """The cache identity of ``weights``; ``state`` is the :func:`state_digest` of the model."""
    if weights == "random":  # a seeded init still changes with timm's and torch's versions
        return f"random:{name}:seed{RANDOM_INIT_SEED}:state-sha256:{state}"
    if weights == "hub":  # the hub's weights can change under one name: digest what was loaded
        return f"hub:{name}:state-sha256:{state}"
    return file_digest(weights)


#: Said when a weights file does not fit: a checkpoint of a model built with other arguments.
_KWARGS_HINT = (
    " (made with other timm arguments, as global_pool='avg' or img_size=384? give them with "
    "--model-kwargs, or for an --also target as model_kwargs in its also: entry of --config)"
)


def _create(name: str, kwargs: dict[str, Any], **fixed: Any) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs, **fixed)``, never pretrained unless ``fixed`` says
    so; a ``ValueError`` naming ``kwargs`` where timm refuses them."""
    try:
        return timm.create_model(name, **{"pretrained": False, **kwargs, **fixed})
    except (TypeError, AssertionError, ValueError, RuntimeError) as error:
        # RuntimeError: hub weights that do not fit the model the arguments build
        if not kwargs:
            raise
        raise ValueError(
            f"timm could not build {name} with --model-kwargs {json.dumps(kwargs)}: "
            f"{_first_line(error)}"
        ) from None


def check_model_name(name: str) -> str:
    """``name`` if timm knows the model (and its pretrained tag), else a ``ValueError`` that
    suggests the closest names."""
    known = timm.is_model(name) and ("." not in name or name in timm.list_pretrained(name))
    if known:
        return name
    names = timm.list_models() + timm.list_pretrained()
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6) or difflib.get_close_matches(
        name, names, n=4, cutoff=0.4
    )
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise ValueError(f"timm has no model '{name}'{hint} (all names: timm.list_pretrained())")


def _no_classifier(name: str) -> ValueError:
    return ValueError(
        f"backbone {name} has no classifier (num_classes=0): pvu caches the classifier's "
        "per-sample loss; pick weights with a classification head"
    )


def _refuse_hub_head(name: str) -> None:
    """Refuse, before their download, hub weights without a classifier, or whose head is an
    image-text projection (``vit_base_patch32_clip_224.openai``'s 512 "classes"): a loss over
    its outputs means nothing."""
    try:
        config = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag: timm.create_model says so
        return
    if config is None or infer_imagenet_subset(config.to_dict()) is not None:
        return
    if config.num_classes == 0:
        raise _no_classifier(name)
    if _IMAGE_TEXT.search(f"{config.architecture}.{config.tag}".lower()):
        raise ValueError(
            f"backbone {name}: its hub weights ({config.architecture}.{config.tag}) are an "
            f"image-text tower whose {config.num_classes} outputs project into a text space, "
            "not classes, so its per-sample loss would mean nothing; pick a tag fine-tuned on "
            "ImageNet (e.g. ..._ft_in1k), or give a classifier's --weights FILE"
        )


def model_key(backbone: str, weights: str, model_kwargs: dict[str, Any] | None) -> str:
    """What tells one model from another: the arguments :func:`create_backbone_model` builds it
    from, so that the caches of one pass (``--also-deteriorate``) share one model and probe."""
    return json.dumps([backbone, weights, model_kwargs], sort_keys=True)


def create_backbone_model(
    name: str, weights: str, model_kwargs: dict[str, Any] | None = None
) -> torch.nn.Module:
    """The timm model ``name`` with ``weights``: ``hub``, ``random`` (seeded) or a local file;
    ``model_kwargs`` go to ``timm.create_model`` (``global_pool``, ``img_size``, ...).

    A local file bypasses timm's pretrained loaders (so ``custom_load`` models never reach the
    JAX ``.npz`` path) and decides the classifier's number of classes.
    """
    kwargs = model_kwargs or {}
    if weights == "hub":
        _refuse_hub_head(name)
        try:
            model = _create(name, kwargs, pretrained=True)
        except OSError as error:  # huggingface_hub's: offline, not found, denied
            raise ValueError(
                f"could not get the pretrained weights of {name} from the Hugging Face Hub "
                f"({_first_line(error)}); give --weights a local file (safetensors or a torch "
                "state dict), or --weights random"
            ) from None
    elif weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = _create(name, kwargs)
    else:
        state = read_state_dict(weights)
        with torch.device("meta"):
            probe = _create(name, kwargs)
        num_classes = _classifier_rows(probe, state)
        model = _create(
            name, kwargs | ({} if num_classes is None else {"num_classes": num_classes})
        )
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # tensors of other shapes: another model's weights
            conv, channels = _image_channels(model, state)
            if channels != 3:  # in_chans, which --model-kwargs may not set
                raise ValueError(
                    f"{weights} does not fit {name}: its {conv} takes {channels}-channel images "
                    f"(a model made with in_chans={channels}), but pvu decodes every image to "
                    "RGB; give weights of a 3-channel model"
                ) from None
            shapes = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
            raise ValueError(
                f"{weights} does not fit {name}: {len(shapes)} tensor(s) of other shapes, e.g. "
                f"{shapes[0] if shapes else _first_line(error)}{_KWARGS_HINT}"
            ) from None
        if num_classes is None and missing and not unexpected:
            raise ValueError(
                f"{weights} holds no classifier for {name} (no {', '.join(missing[:2])}): pvu "
                "caches the classifier's per-sample loss; give weights with a classification head"
            )
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not fit {name}: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}{_KWARGS_HINT}"
            )
    return model.eval().requires_grad_(False)


def _cast(features: Any, dtype: torch.dtype) -> Any:
    """``features`` (a tensor, or a list of them: one per branch, as CrossViT's) as ``dtype``."""
    if isinstance(features, torch.Tensor):
        return features.to(dtype)
    return type(features)(_cast(branch, dtype) for branch in features)


def model_head(
    model: torch.nn.Module, features: Any, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-logits embedding, logits) of ``model``'s own head on ``features`` cast to ``dtype``
    (float32 unless the model's own weights are in another type; call outside autocast)."""
    features = _cast(features, dtype)
    return model.forward_head(features, pre_logits=True), model.forward_head(features)


#: What a timm model's forward raises on inputs or arguments it cannot take (TypeError and
#: AttributeError: features forward_head cannot take, as inception_v3's aux_logits tuple).
_FORWARD_ERRORS = (RuntimeError, ValueError, AssertionError, IndexError, TypeError, AttributeError)


def _forward(
    model: torch.nn.Module, input_size: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding, logits) of ``model`` for two seeded random images of ``input_size``."""
    images = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model_head(model, model.forward_features(images))


def _runs_at(model: torch.nn.Module, input_size: tuple[int, ...]) -> bool:
    """Whether ``model`` runs on inputs of ``input_size``."""
    try:
        _forward(model, input_size)
    except _FORWARD_ERRORS:
        return False
    return True


def _resized(
    model: torch.nn.Module, name: str, input_size: tuple[int, ...], model_kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """The timm arguments that build ``name`` to run at ``input_size`` where ``model`` does not:
    a ViT, Swin or EVA resampling its position embedding (and padding to whole patches), the
    same weights; None if none does."""
    if getattr(model, "dynamic_img_size", None) is not False:
        return None
    for extra in ({"dynamic_img_size": True}, {"dynamic_img_size": True, "dynamic_img_pad": True}):
        kwargs = {**model_kwargs, **extra}
        try:
            resized = _create(name, kwargs)
        except ValueError:  # timm refuses them: a model that takes no dynamic_img_pad (Swin)
            return None
        if _runs_at(resized.eval(), input_size):
            return kwargs
    return None


def _probe(
    model: torch.nn.Module,
    name: str,
    input_size: tuple[int, ...],
    native: tuple[int, ...],
    model_kwargs: dict[str, Any],
) -> tuple[int, float]:
    """Run one forward on two random images: the embedding width and largest finite magnitude.
    Warn when both get the same logits: a classifier initialised to zero (random weights)
    gives every image one loss. ``native`` is the model's own input size; ``model_kwargs``
    the timm arguments it was built with."""
    try:
        embedding, logits = _forward(model, input_size)
    except _FORWARD_ERRORS as error:
        own = tuple(native)
        hints = []
        if tuple(input_size) != own and _runs_at(model, own):
            hint = f"it takes only its own input size, {own}: leave --input-size out"
            resized = _resized(model, name, input_size, model_kwargs)
            if resized:
                hint += f", or build it for this size with --model-kwargs '{json.dumps(resized)}'"
            hints.append(hint)
        if model_kwargs:
            hints.append(f"check --model-kwargs {json.dumps(model_kwargs)}")
        hint = "".join(f"; {h}" for h in hints)
        raise ValueError(
            f"backbone {name} does not run on inputs of {input_size}: {_first_line(error)}{hint}"
        ) from None
    shapes = [tuple(getattr(out, "shape", ())) for out in (embedding, logits)]
    if len(shapes[0]) != 2 or shapes[1] != (2, model.num_classes):
        raise ValueError(
            f"backbone {name}: its head gives an embedding of shape {shapes[0]} and logits of "
            f"shape {shapes[1]} for 2 images; pvu needs (2, width) and (2, {model.num_classes})"
        )
    if torch.equal(logits[0], logits[1]):
        log.warning(
            "backbone %s gives two different images the same logits (a classifier initialised "
            "to zero, as timm starts Sequencer's and MLP-Mixer's?), so every image would get "
            "one loss: nothing for a head to learn (pvu train-head refuses such a cache) or a "
            "baseline to rank; give trained --weights",
            name,
        )
    return int(embedding.shape[-1]), finite_peak(embedding.numpy())


def _model_data_config(model: torch.nn.Module, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm's data config of ``model``, its input size the ``img_size`` the model was built
    with, where ``model_kwargs`` give one (timm's keeps the pretrained size: a ViT built for 384
    px was fed 224 px and refused); not for a model that takes any size (``dynamic_img_size``),
    which ran, and made its caches, at timm's."""
    config = resolve_model_data_config(model)
    size = model_kwargs.get("img_size")
    if size is not None and not model_kwargs.get("dynamic_img_size"):
        height, width = (size, size) if isinstance(size, int) else size
        config["input_size"] = (config["input_size"][0], int(height), int(width))
    return config


def describe_backbone(
    name: str,
    weights: str,
    *,
    input_size: tuple[int, int, int] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> BackboneInfo:
    """Name, weights digest, embedding width, classes and data config of a backbone.

    Runs one probe forward at ``input_size`` (default: the model's own), so a backbone that
    cannot run the job is refused here, before any worker starts.
    """
    model = create_backbone_model(name, weights, model_kwargs)
    if not model.num_classes:
        raise _no_classifier(name)
    data_config = _model_data_config(model, model_kwargs or {})
    native = data_config["input_size"]
    width, peak = _probe(model, name, input_size or native, native, model_kwargs or {})
    state = state_digest(model)
    return BackboneInfo(
        name=name,
        weights_digest=_weights_digest(name, weights, state),
        weights_state=state,
        embedding_dim=width,
        num_classes=int(model.num_classes),
        data_config=data_config,
        embedding_peak=peak,
    )


class Backbone:
    """A frozen timm classifier on one device, loaded once and run under ``inference_mode``.

    ``autocast`` (e.g. ``torch.bfloat16``) applies to the trunk only; see the module docstring.
    """

    def __init__(
        self, model: torch.nn.Module, device: torch.device, autocast: torch.dtype | None = None
    ) -> None:
        self.model = model.to(device)
        self.device = device
        self.autocast = autocast
        self.num_classes = int(model.num_classes)

    @property
    def compute(self) -> Compute:
        """Where and in which precision this backbone runs, as the provenance records it."""
        autocast = None if self.autocast is None else str(self.autocast).removeprefix("torch.")
        return Compute(device=self.device.type, autocast=autocast)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Embedding, argmax, max softmax probability, entropy and, given ``labels`` in the
        classifier's space, the per-sample cross-entropy ``loss``."""
        images = images.to(self.device, non_blocking=True)
        with torch.autocast(
            self.device.type, dtype=self.autocast or torch.float32, enabled=bool(self.autocast)
        ):
            features = self.model.forward_features(images)
        with exact_float32():  # outside autocast, and no TF32: the loss is the head's label
            embedding, logits = model_head(self.model, features)
            log_probs = F.log_softmax(logits, dim=-1)
        outputs = {
            "embedding": embedding.cpu(),
            "pred": logits.argmax(dim=-1).int().cpu(),  # logits a hair apart can tie in log_probs
            "max_prob": log_probs.amax(dim=-1).exp().cpu(),
            "entropy": -(log_probs.exp() * log_probs).sum(dim=-1).cpu(),
        }
        if labels is not None:
            labels = labels.to(self.device, non_blocking=True)
            outputs["loss"] = F.nll_loss(log_probs, labels, reduction="none").cpu()
        return outputs
