"""``pvu cache``'s configuration: the job's flags as one validated ``CacheJobConfig``, with
the targets ``--also`` (more backbones) and ``--also-deteriorate`` (deteriorated copies) add
to the same pass. ``jobs.run.cache`` runs it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Annotated, Any, ClassVar, Literal

import fsspec
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from jobs.config import PathOrUrl, first_repeated
from pipeline.cache.augment import TransformConfig
from pipeline.cache.backbone import check_model_name
from pipeline.cache.deteriorate import Deterioration
from pipeline.cache.samples import IMAGE_KEYS
from pipeline.dataset.remap import read_label_remap


def absolute(url: str | None) -> str | None:
    """Local paths made absolute: actors in other processes (and nodes) start elsewhere."""
    if url is None or url in ("hub", "random") or "://" in url:
        return url
    return os.path.abspath(url)


def check_weights(weights: str) -> str:
    """``weights`` if it is 'hub', 'random' or an existing file, else ``ValueError``."""
    if weights in ("hub", "random"):
        return weights
    fs, path = fsspec.core.url_to_fs(weights)
    if not fs.isfile(path):
        raise ValueError(f"'{weights}' is neither 'hub', 'random' nor an existing weights file")
    return weights


#: ``timm.create_model`` arguments pvu sets itself, never a user's ``--model-kwargs``.
RESERVED_MODEL_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "num_classes",
                         "checkpoint_path", "features_only")  # fmt: skip


def parse_model_kwargs(value: object) -> object:
    """``--model-kwargs``'s JSON object as a dict; a config file's mapping as it is."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as error:
            raise ValueError(f"--model-kwargs is not JSON ({error}): give an object, e.g. "
                             '\'{"global_pool": "avg"}\'') from None  # fmt: skip
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"--model-kwargs must be a JSON object of timm arguments, got {value!r}")
    reserved = sorted(set(value) & set(RESERVED_MODEL_KWARGS))
    if reserved:
        raise ValueError(
            f"--model-kwargs may not set {', '.join(reserved)}: --weights decides the weights "
            "and the classifier's classes"
        )
    if value.get("in_chans", 3) != 3:
        raise ValueError(
            f"--model-kwargs in_chans={value['in_chans']!r}: pvu decodes every image to RGB, so "
            "the backbone takes 3 channels; leave in_chans out"
        )
    return value


#: Field types the cache job's backbone, weights and output share with each ``--also`` target.
ModelName = Annotated[str, AfterValidator(check_model_name)]
ModelKwargs = Annotated[dict[str, Any], BeforeValidator(parse_model_kwargs)]
Weights = Annotated[PathOrUrl, AfterValidator(check_weights), AfterValidator(absolute)]
OutputUrl = Annotated[PathOrUrl, AfterValidator(absolute)]


class AlsoTarget(BaseModel):
    """Another backbone cached in the same pass: its name, weights and output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: ModelName
    weights: Weights = "hub"
    output: OutputUrl
    model_kwargs: ModelKwargs = {}

    #: What one value of the flag is, for its errors.
    TAKES: ClassVar[str] = (
        "--also takes BACKBONE,WEIGHTS,OUTPUT (or BACKBONE,OUTPUT for hub weights)"
    )

    @classmethod
    def parse(cls, text: str) -> AlsoTarget:
        """``BACKBONE,WEIGHTS,OUTPUT`` (``BACKBONE,OUTPUT`` for hub weights)."""
        parts = [part.strip() for part in text.split(",")]
        if len(parts) == 2:
            return cls(backbone=parts[0], output=parts[1])
        if len(parts) == 3:
            return cls(backbone=parts[0], weights=parts[1], output=parts[2])
        raise ValueError(f"{cls.TAKES}, got '{text}'")


class AlsoDeterioration(BaseModel):
    """A deteriorated copy of the job's own cache, written in the same pass: its
    deterioration and output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deteriorate: Deterioration
    output: OutputUrl

    #: What one value of the flag is, for its errors.
    TAKES: ClassVar[str] = (
        "--also-deteriorate takes KIND:STRENGTH,OUTPUT, e.g. blur:0.5,caches/blur-0.5"
    )

    @field_validator("deteriorate", mode="before")
    @classmethod
    def _parse_deteriorate(cls, value: object) -> object:
        return Deterioration.parse(value, "--also-deteriorate") if isinstance(value, str) else value

    @classmethod
    def parse(cls, text: str) -> AlsoDeterioration:
        """``KIND:STRENGTH,OUTPUT``."""
        deteriorate, comma, output = text.partition(",")
        if not comma:
            raise ValueError(f"{cls.TAKES}, got '{text}'")
        return cls(deteriorate=deteriorate.strip(), output=output.strip())


def _refuse_split_values(values: list | tuple, takes: str) -> None:
    """Refuse ``values`` (of ``--also`` or ``--also-deteriorate``) where two in a row lack the
    comma each value has: one value split in two, as a YAML flow list splits
    ``[blur:0.5,o2]`` into ``blur:0.5`` and ``o2``; ``takes`` says what one value is."""
    lone = [isinstance(value, str) and "," not in value for value in values]
    first = next((i for i in range(len(lone) - 1) if lone[i] and lone[i + 1]), None)
    if first is None:
        return
    end = next((i for i in range(first, len(lone)) if not lone[i]), len(lone))
    raise ValueError(
        f"{takes}, each as one value; got {', '.join(map(repr, values[first:end]))} as values "
        "of their own: in a config file, a YAML flow list [a,b] splits at every comma, so "
        "quote each item (['a,b']) or write one item per line (- a,b)"
    )


class CacheJobConfig(BaseModel):
    """The cache job's configuration, validated before anything runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shards: PathOrUrl
    backbone: ModelName
    output: OutputUrl
    weights: Weights = "hub"
    #: Arguments of ``timm.create_model`` the weights were made with (``global_pool``, ...).
    model_kwargs: ModelKwargs = {}
    label_remap: PathOrUrl | None = None
    epochs: int = Field(default=1, ge=1)
    augment: Literal["train", "eval"] = "train"
    seed: int = Field(default=0, ge=0)
    batch_size: int = Field(default=64, ge=1)
    actors: int | None = Field(default=None, ge=1)
    gpus_per_actor: float | None = Field(default=None, ge=0)
    cpus_per_actor: float | None = Field(default=None, gt=0)
    image_key: str | None = None
    label_key: str = "cls"
    ray_address: str | None = None
    dtype: Literal["float16", "float32"] = "float16"
    max_attempts: int = Field(default=3, ge=1)
    #: Seconds a unit may run before its actor is killed and the unit tried again (None: auto).
    unit_timeout: float | None = Field(default=None, gt=0)
    input_size: int | None = Field(default=None, ge=8)
    #: Area range of the train transform's random-resized crop (appendix A: 0.08 to 1).
    crop_scale: tuple[float, float] = (0.08, 1.0)
    decode_workers: int | None = Field(default=None, ge=0)
    decode: Literal["pil", "device"] = "pil"
    label_space: Literal["classifier", "dataset"] | None = None
    ambiguity_key: str | None = None
    deteriorate: Deterioration | None = None
    precision: Literal["bf16", "fp32"] = "bf16"
    #: More backbones cached from the same decode pass, each into its own output.
    also: list[AlsoTarget] = []
    #: Deteriorated copies of this backbone's cache from the same pass, each into its own output.
    also_deteriorate: list[AlsoDeterioration] = []

    @field_validator("deteriorate", mode="before")
    @classmethod
    def _parse_deteriorate(cls, value: object) -> object:
        return Deterioration.parse(value) if isinstance(value, str) else value

    @field_validator("also", "also_deteriorate", mode="before")
    @classmethod
    def _parse_also(cls, value: object, info: ValidationInfo) -> object:
        kind = AlsoTarget if info.field_name == "also" else AlsoDeterioration
        if value is None:
            return []
        if isinstance(value, (str, dict)):
            value = [value]  # one target, as one --also
        if isinstance(value, (list, tuple)):
            _refuse_split_values(value, kind.TAKES)
            return [kind.parse(item) if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _outputs_differ(self) -> CacheJobConfig:
        outputs = [target.output for _, target in self.flagged_targets()]
        repeated = first_repeated(outputs)
        if repeated is not None:
            raise ValueError(
                f"{repeated} is the output of two caches of this run (--output, --also, "
                "--also-deteriorate): give each cache its own"
            )
        kinds = [self.deteriorate, *(target.deteriorate for target in self.also_deteriorate)]
        twice = first_repeated([kind for kind in kinds if kind is not None])
        if twice is not None:
            raise ValueError(
                f"--also-deteriorate {twice.kind}:{twice.strength:g} is given twice (or is "
                "--deteriorate's own): both caches would hold the same rows; give it once"
            )
        return self

    def targets(self) -> list[CacheJobConfig]:
        """This job as one configuration per cache written (the first is this one's own)."""
        return [target for _, target in self.flagged_targets()]

    def flagged_targets(self) -> list[tuple[str, CacheJobConfig]]:
        """:meth:`targets`, each with the flag that asked for it: ``--output`` (this job's own
        cache), ``--also`` (another backbone) or ``--also-deteriorate`` (this backbone's cache
        deteriorated otherwise)."""
        own = self.model_copy(update={"also": [], "also_deteriorate": []})
        more = [("--also", target) for target in self.also]
        more += [("--also-deteriorate", target) for target in self.also_deteriorate]
        return [
            ("--output", own),
            *((flag, own.model_copy(update=dict(target))) for flag, target in more),
        ]

    @field_validator("label_remap")
    @classmethod
    def _remap_reads(cls, label_remap: str | None) -> str | None:
        if label_remap is not None:
            fs, path = fsspec.core.url_to_fs(label_remap)
            if not fs.isfile(path):
                raise ValueError(f"label remap file '{label_remap}' does not exist")
            read_label_remap(label_remap)  # before a manifest records its digest
        return absolute(label_remap)

    @field_validator("image_key", mode="before")
    @classmethod
    def _join_a_list(cls, image_key: object) -> object:
        """A config file's list of extensions, as the flag's ``jpg/png``."""
        return "/".join(map(str, image_key)) if isinstance(image_key, list) else image_key

    @field_validator("image_key")
    @classmethod
    def _names_an_extension(cls, image_key: str | None) -> str | None:
        if image_key is not None and not re.sub(r"[\s/,;.]", "", image_key):
            raise ValueError(f"--image-key {image_key!r} names no file extension")
        return image_key

    @field_validator("ambiguity_key")
    @classmethod
    def _names_an_ambiguity_member(cls, ambiguity_key: str | None) -> str | None:
        if ambiguity_key is not None and not ambiguity_key.strip(" ."):
            raise ValueError(f"--ambiguity-key {ambiguity_key!r} names no member's extension")
        return ambiguity_key

    @field_validator("label_key")
    @classmethod
    def _names_a_member(cls, label_key: str) -> str:
        member, colon, field = label_key.partition(":")
        if not member.strip(" .") or (colon and not all(field.split("."))):
            raise ValueError(
                f"--label-key {label_key!r}: give a member's extension (cls), or EXT:FIELD for "
                "a field of a JSON member (json:label)"
            )
        return label_key

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale_is_an_area_range(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop_scale must be 0 < MIN <= MAX <= 1, got {scale}")
        return scale

    @model_validator(mode="after")
    def _eval_has_one_epoch(self) -> CacheJobConfig:
        if self.augment == "eval" and self.epochs != 1:
            raise ValueError(
                f"--augment eval caches one un-augmented epoch (0): set --epochs 1 (not "
                f"{self.epochs})"
            )
        for flag, given in (
            ("--deteriorate", self.deteriorate is not None),
            ("--also-deteriorate", bool(self.also_deteriorate)),
        ):
            if given and self.augment != "eval":
                raise ValueError(f"{flag} applies to the eval transform: add --augment eval")
            if given and self.decode == "device":
                raise ValueError(f"{flag} runs on PIL images: drop --decode device")
        if self.decode == "device" and self.decode_workers:
            raise ValueError(
                f"--decode-workers {self.decode_workers} starts PIL decoding processes, but "
                "--decode device decodes on the backbone's device: drop one of them"
            )
        if self.label_remap is not None and self.resolved_label_space == "dataset":
            raise ValueError(
                "--label-remap maps labels into the classifier's space, but this cache keeps the "
                "dataset's own labels (--label-space dataset, the default of --augment eval); "
                "drop --label-remap or pass --label-space classifier"
            )
        return self

    @property
    def resolved_label_space(self) -> str:
        """The label space: as given, else ``classifier`` for train and ``dataset`` for eval."""
        if self.label_space is not None:
            return self.label_space
        return "classifier" if self.augment == "train" else "dataset"

    def transform_config(self) -> TransformConfig:
        """The augmentation settings; unset fields fall back to the backbone's data config."""
        size = None if self.input_size is None else (3, self.input_size, self.input_size)
        return TransformConfig(
            augment=self.augment,
            input_size=size,
            scale=self.crop_scale,
            deteriorate=self.deteriorate,
            decode=self.decode,
        )

    @property
    def image_keys(self) -> tuple[str, ...]:
        """Tar member extensions tried, in order, for a sample's image."""
        if not self.image_key:
            return IMAGE_KEYS
        return tuple(key for key in re.split(r"[/,;]", self.image_key) if key.strip(" ."))
