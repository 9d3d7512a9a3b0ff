"""Why a sample was skipped: the reasons counted per unit and reported in the manifest."""

from __future__ import annotations

from enum import Enum


class SkipReason(str, Enum):
    """A kind of bad input (docs/design.md section 5). The value is the manifest's counter name."""

    NO_IMAGE = "no_image"
    NO_LABEL = "no_label"
    BAD_LABEL = "bad_label"
    LABEL_OUTSIDE_HEAD = "label_outside_head"
    EMPTY_IMAGE = "empty_image"
    UNDECODABLE = "undecodable"
    TRUNCATED_IMAGE = "truncated_image"
    TOO_SMALL = "too_small"
    TOO_LARGE = "too_large"
    TRUNCATED_TAR = "truncated_tar"
    EMPTY_SHARD = "empty_shard"
    UNSAFE_NAME = "unsafe_name"
    #: A key an earlier shard of the run holds too, in the same epoch: counted by the driver's
    #: pass over committed units (``pipeline.cache.dedupe``); or a sample whose files repeat
    #: in a row in one shard (``k.jpg k.cls k.jpg k.cls``), counted by the unit.
    DUPLICATE_KEY = "duplicate_key"


#: Skips that stand for the rest of a shard: it is empty, or cut short or damaged mid-way.
SHARD_DAMAGE = frozenset({SkipReason.TRUNCATED_TAR.value, SkipReason.EMPTY_SHARD.value})


class BadSample(Exception):
    """Raised by a step that rejects one sample; carries the reason and the sample's key."""

    def __init__(self, reason: SkipReason, detail: str = "", key: str = "") -> None:
        self.reason = reason
        self.detail = detail
        self.key = key
        super().__init__(f"{key or '<sample>'}: {self.why}")

    @property
    def why(self) -> str:
        """The reason, and its detail if any (``undecodable: not a readable image``)."""
        return f"{self.reason.value}{': ' + self.detail if self.detail else ''}"
