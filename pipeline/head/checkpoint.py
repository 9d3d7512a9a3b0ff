"""A training run's checkpoint and metrics log under its ``--output``.

The checkpoint is the head's and the optimiser's tensors (safetensors, no pickle) and
``state.json``, its commit marker: the episode, the reader's position, the run's settings and
what it trained on, so a resume refuses other settings or other caches. ``metrics.jsonl`` holds
one line per episode, rewritten aside and moved into place.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
from collections.abc import Callable
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from pipeline.cache.index import CacheIndex
from pipeline.cache.manifest import identity, spelled_out
from pipeline.head.stream import StreamState
from pipeline.named import as_typed
from pipeline.retry import exists, make_folder, move_file, read_bytes, write_bytes

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_JSON = "state.json"
METRICS_FILE = "metrics.jsonl"


def trained_on(index: CacheIndex) -> dict[str, Any]:
    """What a run trains on, as its checkpoint records it: the caches' identity, the distinct
    provenances of their units (the fields that define a cache: seed, transform, ...), a
    digest of their units (epoch folder, file, rows) and one of the shards they were made from,
    in stream order. A copy of the caches elsewhere matches; other caches, the same layout made
    with other settings or from other shards, or more units since, do not."""
    digest, sources = hashlib.sha256(), hashlib.sha256()
    for f in index.files:
        digest.update(f"{'/'.join(f.url.rsplit('/', 2)[-2:])}\0{f.rows}\n".encode())
        sources.update(f"{f.unit.get('source', '')}\n".encode())
    provenances = {
        json.dumps(made, sort_keys=True): made
        for made in (identity(f.provenance) for f in index.files)
    }
    return {
        **index.provenance,
        "provenance": list(provenances.values()),
        "units": len(index.files),
        "digest": digest.hexdigest()[:16],
        "sources": sources.hexdigest()[:16],  # a checkpoint without it resumes as before
    }


def save_checkpoint(
    output: str,
    *,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    episode: int,
    stream_state: StreamState,
    settings: dict[str, Any],
    data: dict[str, Any],
) -> None:
    """Write tensors (safetensors) then ``state.json``, the commit marker, under ``output``;
    ``settings`` is the run's ``TrainConfig.identity()``."""
    fs, root = fsspec.core.url_to_fs(output)
    folder = f"{root}/{CHECKPOINT_DIR}"
    make_folder(fs, folder)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    optim = optimizer.state_dict()
    for index, slots in optim["state"].items():
        for slot, value in slots.items():
            tensors[f"optim.{index}.{slot}"] = torch.as_tensor(value).detach().cpu().contiguous()
    name = f"episode-{episode:05d}.safetensors"
    write_bytes(fs, f"{folder}/{name}", save_safetensors(tensors))
    state = {
        "episode": episode,
        "tensors": name,
        "stream": stream_state.to_json(),
        "param_groups": optim["param_groups"],
        "config": settings,
        "data": data,
    }
    tmp = f"{folder}/{CHECKPOINT_JSON}.tmp"
    write_bytes(fs, tmp, json.dumps(state, indent=1).encode())
    move_file(fs, tmp, f"{folder}/{CHECKPOINT_JSON}")
    try:
        for old in fs.glob(f"{glob.escape(folder)}/episode-*.safetensors"):  # run[1]: itself
            if not old.endswith(name):
                fs.rm(old)
    except OSError as error:  # an earlier episode's tensors left behind take space, nothing else
        log.warning("left earlier checkpoints in %s (%r)", fs.unstrip_protocol(folder), error)


def load_checkpoint(
    output: str,
    *,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    settings: dict[str, Any],
    data: dict[str, Any],
) -> tuple[int, StreamState] | None:
    """Restore ``head`` and ``optimizer``; returns (episodes done, reader position) or None.

    Refuses a checkpoint trained with other ``settings`` (``TrainConfig.identity()``), or on
    other caches (``data``, from
    :func:`trained_on`; what a checkpoint predates is not checked: it resumes as before)."""
    fs, root = fsspec.core.url_to_fs(output)
    folder = f"{root}/{CHECKPOINT_DIR}"
    if not exists(fs, f"{folder}/{CHECKPOINT_JSON}"):
        return None
    try:
        state = json.loads(read_bytes(fs, f"{folder}/{CHECKPOINT_JSON}"))
        trained_with = dict(state["config"])
    except (ValueError, KeyError, TypeError) as error:
        raise _damaged_checkpoint(output, error) from None
    if trained_with != settings:
        differ = _differences(trained_with, settings, flags=True)
        raise ValueError(
            f"cannot resume from {output}: its checkpoint was trained with other settings "
            f"({'; '.join(differ)}); use another --output or the same settings"
        )
    unrecorded = sorted(set(data) - set(state.get("data", {})))
    if unrecorded:
        what = "caches" if "data" not in state else f"caches' {', '.join(unrecorded[:3])}"
        log.warning(
            "--resume: the checkpoint in %s was written by a pvu that did not record its %s, "
            "so this run's --cache is not checked against it: give the caches it was trained on",
            *(output, what),
        )
    recorded = {**data, **state.get("data", {})}  # what it did not record is not checked
    if recorded != data:
        differ = ", ".join(k for k, v in data.items() if recorded[k] != v) + " differ"
        detail = _provenance_differences(recorded["provenance"], data["provenance"])
        if _same_caches_reordered(recorded, data):
            detail = ["the same caches in another order? --cache in the first run's order"]
        raise ValueError(
            f"cannot resume from {output}: its checkpoint was trained on other caches, or on "
            f"these before they changed ({'; '.join([differ, *detail])}); pass the --cache it "
            "was trained on, as it was then, or train into another --output"
        )
    try:
        tensors = load_safetensors(read_bytes(fs, f"{folder}/{state['tensors']}"))
        prefix = len("model.")
        head.load_state_dict({k[prefix:]: v for k, v in tensors.items() if k.startswith("model.")})
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, slot = key.split(".", 2)
                slots.setdefault(int(index), {})[slot] = value
        optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
        return int(state["episode"]), StreamState.from_json(state["stream"])
    except (
        ValueError,
        KeyError,
        TypeError,
        RuntimeError,
        SafetensorError,
        FileNotFoundError,  # its tensors deleted, or the folder copied without them
    ) as error:
        raise _damaged_checkpoint(output, error) from None


def _differences(
    recorded: dict[str, Any], wanted: dict[str, Any], prefix: str = "", *, flags: bool = False
) -> list[str]:
    """``name: the checkpoint has A, this run B`` for each setting that differs (nested ones
    dotted: ``schedule.lr``; with ``flags``, named by their ``pvu train-head`` flag: ``--lr``)."""
    found = []
    for key in dict.fromkeys([*wanted, *recorded]):
        have, want = recorded.get(key), wanted.get(key)
        if isinstance(have, dict) and isinstance(want, dict):
            found += _differences(have, want, f"{prefix}{key}.", flags=flags)
        elif have != want:
            name = f"--{key.replace('_', '-')}" if flags else f"{prefix}{key}"
            found.append(f"{name}: the checkpoint has {as_typed(have)}, this run {as_typed(want)}")
    return found


def _provenance_differences(
    recorded: list[dict[str, Any]], wanted: list[dict[str, Any]]
) -> list[str]:
    """The fields that differ between the provenances of the checkpoint's caches and this
    run's, cache by cache; none named where they hold different numbers of provenances."""
    if len(recorded) != len(wanted):
        return []
    return [
        line
        for have, want in zip(recorded, wanted, strict=True)
        for line in _differences(spelled_out(have), spelled_out(want))
    ]


def _same_caches_reordered(recorded: dict[str, Any], data: dict[str, Any]) -> bool:
    """Whether ``recorded`` and ``data`` differ only as the caches' order does: the same
    units and provenances, listed otherwise (the stream's order is the caches' order)."""
    if recorded["units"] != data["units"] or len(recorded["provenance"]) < 2:
        return False
    key = [json.dumps(p, sort_keys=True) for p in recorded["provenance"]]
    wanted = [json.dumps(p, sort_keys=True) for p in data["provenance"]]
    return key != wanted and sorted(key) == sorted(wanted)


def _damaged_checkpoint(output: str, error: Exception) -> ValueError:
    return ValueError(
        f"cannot resume from {output}: its checkpoint is damaged ({type(error).__name__}: "
        f"{error}); train from the start into another --output"
    )


def _episode(line: str, path: str) -> int:
    """The episode of a ``metrics.jsonl`` line; a ``ValueError`` naming the file if damaged."""
    try:
        return int(json.loads(line)["episode"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"cannot resume: {path} has a damaged line ({type(error).__name__}: {error}); "
            f"{_LINES_LOST}"
        ) from None


#: What to do when lines of episodes the checkpoint holds are lost: a resume cannot make them.
_LINES_LOST = (
    "the checkpoint's episodes are not trained again, so their lines cannot be made anew: "
    "restore the file from a copy, or train from the start into another --output"
)


def _up_to(lines: list[str], done: int, path: str) -> list[str]:
    """The lines of episodes <= ``done``, read up to the first of episode >= ``done``; those
    after it are trained again, so one cut short there (a kill mid-write) is dropped unread.
    A ``ValueError`` naming the file if a line of episode 0 to ``done`` is damaged or lost
    (the file cut at a line boundary, or emptied by a crash)."""
    kept, episodes = [], set()
    for line in filter(None, lines):
        episode = _episode(line, path)
        if episode <= done:
            kept.append(line)
            episodes.add(episode)
        if episode >= done:
            break
    missing = [episode for episode in range(done + 1) if episode not in episodes]
    if missing:
        raise ValueError(
            f"cannot resume: {path} lacks the lines of episode(s) {_span(missing)}, which the "
            f"checkpoint (episode {done}) trained; {_LINES_LOST}"
        )
    return kept


def _span(episodes: list[int]) -> str:
    """``0-2`` for [0, 1, 2], ``1, 3`` for [1, 3]: sorted episode numbers, runs joined."""
    if episodes == list(range(episodes[0], episodes[-1] + 1)) and len(episodes) > 1:
        return f"{episodes[0]}-{episodes[-1]}"
    return ", ".join(map(str, episodes))


def metrics_log(
    output: str, done: int
) -> tuple[list[dict[str, Any]], Callable[[dict[str, Any]], None]]:
    """Keep ``metrics.jsonl`` records of episodes <= ``done``; return them and an appender.

    The file is rewritten aside and moved into place, so a kill never leaves half a line.
    """
    fs, root = fsspec.core.url_to_fs(output)
    path = f"{root}/{METRICS_FILE}"
    data = read_bytes(fs, path) if exists(fs, path) else b""
    kept = _up_to(data.decode(errors="replace").splitlines(), done, path) if done >= 0 else []

    def write() -> None:
        write_bytes(fs, f"{path}.tmp", "".join(line + "\n" for line in kept).encode())
        move_file(fs, f"{path}.tmp", path)

    def append(record: dict[str, Any]) -> None:
        kept.append(json.dumps(json_safe(record), allow_nan=False))
        write()

    write()
    return [json.loads(line) for line in kept], append


def json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with NaN/inf floats replaced by None (strict JSON has no NaN)."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }
