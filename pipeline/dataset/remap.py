"""Label remaps: the shards' label names (synsets) -> a classifier head's class indices.

The head's label space is a synset list: one that timm ships (``timm/data/_info/``, chosen by
subset name or inferred from a timm model's class count) or a text file, one name per line.
The result is the file ``pvu cache --label-remap`` reads (``read_label_remap``): the head
index of shard labels 0, 1, 2, ..., with -1 where the head has no counterpart.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Literal

import fsspec
import numpy as np
import timm
from timm.data import ImageNetInfo, infer_imagenet_subset

from pipeline.retry import make_folder, read_url, write_bytes

#: Head label spaces timm ships (``timm.data.ImageNetInfo``), as ``--head`` accepts them (also
#: spelled without - or _); ``infer_imagenet_subset`` names a model's among them.
TIMM_SUBSETS = (
    "imagenet-1k",
    "imagenet-12k",
    "imagenet-21k",
    "imagenet-21k-goog",
    "imagenet-21k-miil",
    "imagenet-22k",
    "imagenet-22k-ms",
)


@dataclass(frozen=True)
class Remap:
    """Shard label -> head index (-1: no counterpart), and what each side is called."""

    table: list[int]
    classes: list[str]
    head: str

    @property
    def missing(self) -> list[str]:
        """Shard label names the head has no class for, in label order."""
        return [name for name, index in zip(self.classes, self.table, strict=True) if index < 0]


def read_names(url: str) -> list[str]:
    """Label names from a JSON list (``classes.json``) or a text file, one name per line; each
    stripped of the blanks around it, in either (``" n01440764"`` is that synset)."""
    try:
        text = read_url(url).decode("utf-8-sig")  # a BOM (Notepad) is no part of the first name
        names = json.loads(text) if _is_json(url) else None
    except ValueError as error:  # not UTF-8, or not JSON
        raise ValueError(f"{url}: not a readable list of label names ({error})") from None
    if names is None:
        names = [line.strip() for line in text.splitlines()]
        while names and not names[-1]:
            names.pop()  # the file's last line break, or a few
        if "" in names:  # line i names label i - 1: a blank line left out moves those after it
            raise ValueError(
                f"{url}: line {names.index('') + 1} is blank, and line i names label i - 1: "
                "remove it (the names after it would move up a label) or write its label's name"
            )
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{url}: expected a JSON list of label names")
    if not names:
        raise ValueError(f"{url}: holds no label names")
    return [name.strip() for name in names]  # a text file's are already


@dataclass(frozen=True)
class HeadClasses:
    """A head's label space: what it is (for messages), its classes' synsets in logit order,
    and the synset file they were read from (None for a list timm ships)."""

    description: str
    names: list[str]
    file: str | None = None


def head_names(head: str) -> HeadClasses:
    """The classes of a head: a synset file, a timm subset name or a timm model."""
    fs, path = fsspec.core.url_to_fs(head)
    if fs.isfile(path):
        return HeadClasses(head, unique_names(head, read_names(head), of="classes"), file=head)
    subset = next((name for name in TIMM_SUBSETS if _spelling(name) == _spelling(head)), None)
    if subset is None:
        config = timm.models.get_pretrained_cfg(head)
        subset = infer_imagenet_subset({"num_classes": config.num_classes}) if config else None
        if subset is None:
            raise ValueError(
                f"head {head!r} is neither a synset file, a timm label space "
                f"({', '.join(TIMM_SUBSETS)}) nor a timm model with an ImageNet head"
            )
    names = ImageNetInfo(subset).label_names()
    return HeadClasses(f"{head} (timm {subset}, {len(names):,} classes)", names)


#: Why a name may not name two of a list's entries, by what they are.
_NAMED_ONCE = {
    "classes": "a head's classes are its logits, one name each; which of them was the "
    "classifier trained on?",
    "labels": "each of the shards' labels is a class of its own, one name each; correct the "
    "one that names another's class",
}


def unique_names(url: str, names: list[str], *, of: Literal["classes", "labels"]) -> list[str]:
    """``names`` read from ``url``, a head's ``classes`` (its logits' order) or the shards'
    ``labels``, refused where one names two of them."""
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        if first.setdefault(name, index) != index:
            raise ValueError(
                f"{url}: {name!r} names {of} {first[name]} and {index}: {_NAMED_ONCE[of]}"
            )
    return names


def _spelling(name: str) -> str:
    """``name`` lower-cased without - _ or blanks, as timm matches its label spaces."""
    return re.sub(r"[-_\s]", "", name.lower())


def build_remap(classes: list[str], head: HeadClasses) -> Remap:
    """The remap from label names ``classes`` (label ``i`` is ``classes[i]``) to ``head``'s
    classes (:func:`head_names`); a name the head does not spell so is matched in any case
    (``N01440764``)."""
    index = {name: i for i, name in reversed(list(enumerate(head.names)))}
    folded = {name.casefold(): i for i, name in reversed(list(enumerate(head.names)))}
    table = [index.get(name, folded.get(name.casefold(), -1)) for name in classes]
    return Remap(table, classes, head.description)


def refuse_shared_classes(url: str, remap: Remap) -> None:
    """Refuse ``remap`` (labels read from ``url``) where two labels map to one head class: names
    that differ only in case (``N01440764``, ``n01440764``), which :func:`build_remap` matches
    in any case, so their samples would be cached as one class."""
    first: dict[int, int] = {}
    for label, index in enumerate(remap.table):
        if index >= 0 and first.setdefault(index, label) != label:
            other = first[index]
            raise ValueError(
                f"{url}: labels {other} ({remap.classes[other]!r}) and {label} "
                f"({remap.classes[label]!r}) both name class {index} of head {remap.head}: "
                f"{_NAMED_ONCE['labels']}"
            )


def order_mismatch(classes: list[str], head: str) -> tuple[str, bool] | None:
    """Where label names ``classes`` (label ``i`` is ``classes[i]``) leave ``head``'s class order,
    and whether any of them is a class of ``head`` at all; None when they follow its order, are
    the labels' own numbers (``"0", "1", ...``: a table's integer labels, taken as class
    indices already), or ``head`` has no synset list to compare with. Names are compared in
    any case (``N01440764`` is ``n01440764``), as :func:`build_remap` matches them."""
    if all(name == str(label) for label, name in enumerate(classes)):
        return None
    try:
        names = head_names(head).names
    except ValueError:
        return None
    shared = not {name.casefold() for name in classes}.isdisjoint(n.casefold() for n in names)
    for label, (mine, theirs) in enumerate(zip(classes, names, strict=False)):
        if mine.casefold() != theirs.casefold():  # as build_remap matches them
            where = f"label {label} is {mine!r}, but the classifier's class {label} is {theirs!r}"
            return where, shared
    if len(classes) > len(names):
        return f"{len(classes):,} labels, but the classifier has {len(names):,} classes", shared
    return None


def remap_mismatch(classes: list[str], table: list[int], head: str) -> str | None:
    """Where remap ``table`` sends a label named by one of ``head``'s classes (label ``i`` is
    ``classes[i]``) to a class of ``head`` of another name, as a remap made for another head
    does (``--head imagenet-22k`` for a 21,843-class ``imagenet-21k-goog`` classifier: most
    indices off by one or two); None when it sends none so, or ``head`` has no synset list."""
    try:
        names = head_names(head).names
    except ValueError:
        return None
    known = {name.casefold() for name in names}  # in any case, as build_remap matches them
    wrong = [
        (label, name, index)
        for label, (name, index) in enumerate(zip(classes, table, strict=False))
        if name.casefold() in known
        and 0 <= index < len(names)
        and names[index].casefold() != name.casefold()
    ]
    if not wrong:
        return None
    label, name, index = wrong[0]
    return (
        f"{len(wrong):,} label(s), e.g. label {label} ({name!r}) to class {index}, which is "
        f"{names[index]!r}"
    )


def write_remap(remap: Remap, url: str) -> None:
    """Write ``remap`` as JSON (a ``.json`` URL) or text, one head index per line."""
    if _is_json(url):
        text = json.dumps(remap.table)
    else:
        text = "".join(f"{index}\n" for index in remap.table)
    fs, path = fsspec.core.url_to_fs(url)
    make_folder(fs, path.rsplit("/", 1)[0])  # --output remaps/in21k.json makes remaps/
    write_bytes(fs, path, text.encode())  # none left cut short


#: The largest shard label a ``--label-remap`` may map (ImageNet-21k's are below 22,000).
MAX_REMAP_LABEL = 1_000_000


def read_label_remap(url: str) -> np.ndarray:
    """Shard label -> head index, from JSON (a list, or an object of int keys) or a text file
    with the head index of shard labels 0, 1, 2, ... one per line (blank lines and ``#``
    comments skipped). Absent labels, and -1, map to no class of the head. Raises
    ``ValueError`` naming the file and the first entry that is not a whole number, or a shard
    label given twice (``"0"`` and ``"00"``).
    """
    text = read_url(url).decode("utf-8-sig", errors="replace")
    try:
        if _is_json(url):
            parsed = json.loads(text, object_pairs_hook=_Pairs)
            if not isinstance(parsed, list):
                raise ValueError("expected a JSON list or object")
            pairs = parsed if isinstance(parsed, _Pairs) else list(enumerate(parsed))
        else:
            values = [line.split("#")[0].strip() for line in text.splitlines()]
            pairs = list(enumerate(value for value in values if value))
        mapping = _mapping(pairs)
    except ValueError as error:
        raise ValueError(f"label remap {url}: {error}") from None
    if not mapping:
        raise ValueError(f"label remap {url} maps no shard label")
    if min(mapping) < 0:
        raise ValueError(f"label remap {url}: shard label {min(mapping)} is negative")
    if max(mapping) > MAX_REMAP_LABEL:  # its table holds an entry per label up to the largest
        raise ValueError(
            f"label remap {url}: shard label {max(mapping)} is over {MAX_REMAP_LABEL:,}, the "
            "most a remap maps"
        )
    wrong = next((target for target in mapping.values() if not -1 <= target < 2**63), None)
    if wrong is not None:
        raise ValueError(f"label remap {url}: {wrong} is no class index (-1 for none)")
    table = np.full(max(mapping) + 1, -1, dtype=np.int64)
    for source, target in mapping.items():
        table[source] = target
    return table


class _Pairs(list):
    """A JSON object's (key, value) pairs in file order, duplicates kept."""


def _mapping(pairs: list[tuple[object, object]]) -> dict[int, int]:
    """``pairs`` as shard label -> head index; ``ValueError`` for a label given twice."""
    mapping: dict[int, int] = {}
    spelled: dict[int, object] = {}
    for source, target in pairs:
        label = _whole(source)
        if label in mapping:
            raise ValueError(
                f"shard label {label} is given twice ({spelled[label]!r} and {source!r})"
            )
        mapping[label], spelled[label] = _whole(target), source
    return mapping


def _whole(value: object) -> int:
    """``value`` (an int, a whole float such as ``3.0``, or the text of either: numpy's
    ``savetxt`` writes ``3.000000000000000000e+00``) as an int; else ``ValueError`` quoting it."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value, re.ASCII):
        return int(value)
    try:
        number = float(value) if isinstance(value, float | str) else math.nan
    except ValueError:
        number = math.nan
    if number.is_integer() and abs(number) < 2**53:  # exact as a float
        return int(number)
    raise ValueError(f"{value!r} is not a whole number (a label or class index)")


def _is_json(url: str) -> bool:
    """Whether ``url`` names a JSON file (``.json``, in any case)."""
    return url.lower().endswith(".json")
