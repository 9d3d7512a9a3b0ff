"""Keys two shards share: one row per (key, epoch), from the earliest shard, whatever the order
units were committed in. Real tar shards, a real timm model and real Parquet units, no Ray."""

from __future__ import annotations

import io
import types
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from support import make_runner

import jobs.run.cache as cache_job
from jobs import terminal
from jobs.run.plan import PlanJobConfig, committed_units
from pipeline.cache.dedupe import deduplicate, drop_rows
from pipeline.cache.index import open_cache
from pipeline.cache.lock import RunLock
from pipeline.cache.manifest import Manifest
from pipeline.cache.unit import Unit
from pipeline.cache.verify import CacheMismatch, verify_cache
from pipeline.demo.data import write_duplicate_key_shards

ORDER = ["dup-0", "dup-1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("shards")
    write_duplicate_key_shards(str(folder))
    return {name: str(folder / f"{name}.tar") for name in ORDER}


def committed(root: str, shards: dict[str, str], units: list[tuple[str, int]]) -> Manifest:
    """Commit ``units`` (shard, epoch) in the given order."""
    runner = make_runner(root)
    manifest = Manifest(root, runner.settings.provenance)
    for name, epoch in units:
        result = runner.run(Unit(shards[name], name, epoch))
        manifest.record(result.relpath, result.manifest_entry())
    return manifest


def cache_in_order(root: str, shards: dict[str, str], units: list[tuple[str, int]]) -> Manifest:
    """Commit ``units`` (shard, epoch) in the given order, then run the pass as a job does."""
    manifest = committed(root, shards, units)
    deduplicate(manifest, ORDER)
    manifest.flush(force=True)
    return manifest


def rows(root: str):
    table = pq.read_table(root, partitioning=None, ignore_prefixes=["_", "."])
    return table.sort_by([("epoch", "ascending"), ("key", "ascending")])


def test_each_key_once_per_epoch_from_the_earliest_shard_whatever_finished_first(tmp_path, shards):
    later_first = [("dup-1", 1), ("dup-1", 0), ("dup-0", 0), ("dup-0", 1)]
    manifest = cache_in_order(str(tmp_path / "a"), shards, later_first)
    table = rows(str(tmp_path / "a"))
    pairs = list(zip(table["key"].to_pylist(), table["epoch"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)) == 6 * 2
    kept = dict(zip(table["key"].to_pylist(), table["shard"].to_pylist(), strict=True))
    assert kept == {f"ok-dup-{i}": "dup-0" if i < 4 else "dup-1" for i in range(6)}
    labels = dict(zip(table["key"].to_pylist(), table["label"].to_pylist(), strict=True))
    assert labels == {f"ok-dup-{i}": 1 if i < 4 else 2 for i in range(6)}  # not ok-dup-4's 3
    for epoch in (0, 1):
        assert manifest.units[f"epoch={epoch:04d}/dup-1.parquet"]["skipped"] == {"duplicate_key": 3}
        assert manifest.units[f"epoch={epoch:04d}/dup-1.parquet"]["rows"] == 2
        assert manifest.units[f"epoch={epoch:04d}/dup-0.parquet"]["skipped"] == {}
    assert verify_cache(str(tmp_path / "a")).ok  # rewritten files agree with their records
    rewritten, untouched = (tmp_path / "a" / "epoch=0000" / f"{n}.parquet" for n in ORDER[::-1])
    assert pq.read_schema(rewritten).equals(pq.read_schema(untouched))
    assert open_cache([str(tmp_path / "a")]).rows == 6 * 2  # what train-head and evaluate read

    earlier_first = [("dup-0", 0), ("dup-0", 1), ("dup-1", 0), ("dup-1", 1)]
    cache_in_order(str(tmp_path / "b"), shards, earlier_first)
    assert rows(str(tmp_path / "b")).equals(table)


def test_the_pass_again_changes_nothing_and_a_recomputed_unit_is_cut_again(tmp_path, shards):
    root = str(tmp_path / "cache")
    manifest = cache_in_order(root, shards, [("dup-0", 0), ("dup-1", 0)])
    before = rows(root)
    unit = tmp_path / "cache" / "epoch=0000" / "dup-1.parquet"
    written = unit.stat().st_mtime_ns
    assert deduplicate(manifest, ORDER) == {}
    assert unit.stat().st_mtime_ns == written  # only read

    unit.unlink()  # lost, then recomputed with its duplicates, as a repairing run does
    runner = make_runner(root)
    result = runner.run(Unit(shards["dup-1"], "dup-1", 0))
    manifest.record(result.relpath, result.manifest_entry())
    assert deduplicate(manifest, ORDER) == {"epoch=0000/dup-1.parquet": 3}
    assert rows(root).equals(before)


def test_epochs_checked_as_they_are_are_not_read_again(tmp_path, shards, monkeypatch):
    """Every run read every unit's keys again, a no-op resume too: 14,000 key columns and
    2-3 minutes of each ImageNet-21k re-run, for nothing."""
    import pipeline.cache.dedupe as dedupe

    root = str(tmp_path / "cache")
    manifest = cache_in_order(root, shards, [("dup-0", 0), ("dup-1", 0), ("dup-0", 1)])
    read: list[str] = []
    real = dedupe.read_keys
    monkeypatch.setattr(
        dedupe,
        "read_keys",
        lambda root, relpath, size=None: read.append(relpath) or real(root, relpath, size),
    )
    reopened = Manifest.open(root, manifest.provenance)  # what the next run finds
    assert set(reopened.deduplicated) == {"0", "1"}
    assert deduplicate(reopened, ORDER) == {} and read == []
    result = make_runner(root).run(Unit(shards["dup-1"], "dup-1", 1))  # epoch 1 grows
    reopened.record(result.relpath, result.manifest_entry())
    assert deduplicate(reopened, ORDER) == {"epoch=0001/dup-1.parquet": 3}
    assert {relpath.split("/")[0] for relpath in read} == {"epoch=0001"}


def test_a_unit_removed_before_the_pass_is_named_with_the_way_on(tmp_path, shards):
    """A unit deleted after its commit ended the run in a bare FileNotFoundError."""
    root = str(tmp_path / "cache")
    runner = make_runner(root)
    manifest = Manifest(root, runner.settings.provenance)
    for name in ORDER:
        result = runner.run(Unit(shards[name], name, 0))
        manifest.record(result.relpath, result.manifest_entry())
    (tmp_path / "cache" / "epoch=0000" / "dup-0.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"dup-0\.parquet.* run the same command again"):
        deduplicate(manifest, ORDER)


def test_the_pass_shows_the_units_whose_keys_it_reads(tmp_path, shards, monkeypatch):
    """The pass at the end of a run read every unit's keys without a sign of life (7 s at
    8,000 units, after the run's bar had ended)."""
    said = io.StringIO()
    monkeypatch.setattr(terminal, "console", Console(file=said, force_terminal=True, width=120))
    units = [("dup-0", 0), ("dup-1", 0), ("dup-0", 1), ("dup-1", 1)]
    manifest = committed(str(tmp_path / "cache"), shards, units)
    target = types.SimpleNamespace(manifest=manifest)
    dropped = cache_job._deduplicate_with_progress([target], ORDER)
    assert dropped == [{f"epoch={e:04d}/dup-1.parquet": 3 for e in (0, 1)}]
    assert "duplicate keys" in said.getvalue() and "4/4" in said.getvalue()

    calls: list[tuple[int, int]] = []
    deduplicate(manifest, ORDER, on_read=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 0)]  # checked as they are: nothing read
    manifest.forget("epoch=0001/dup-0.parquet")
    deduplicate(manifest, ORDER, on_read=lambda done, total: calls.append((done, total)))
    assert calls[1:] == [(0, 1), (1, 1)]


def test_rewritten_units_past_the_first_few_are_counted_not_each_warned_of(
    tmp_path, shards, monkeypatch, caplog
):
    for module in ("pipeline.named", "pipeline.cache.dedupe"):
        monkeypatch.setattr(f"{module}.NAMED", 1)  # 2 rewritten units stand for 14,000
    with caplog.at_level("DEBUG", logger="pipeline.cache.dedupe"):
        cache_in_order(str(tmp_path), shards, [(name, e) for e in (0, 1) for name in ORDER])
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len([line for line in warned if "dup-1.parquet: dropped 3 rows" in line]) == 1
    assert any("1 more unit than named above had rows dropped" in line for line in warned)
    debug = [r.getMessage() for r in caplog.records if r.levelname == "DEBUG"]
    assert len([line for line in debug if "dup-1.parquet: dropped 3 rows" in line]) == 1


def test_a_reader_inside_a_live_runs_pass_is_told_the_run_still_writes(tmp_path, shards):
    """A train-head started between the pass's rewrite of a unit and the manifest's write was
    refused as damaged, "re-run pvu cache to repair", though that run held the lock."""
    root = str(tmp_path / "cache")
    manifest = committed(root, shards, [("dup-0", 0), ("dup-1", 0)])
    manifest.flush(force=True)
    with RunLock(root, owner="pvu cache --output cache", lease=60):
        drop_rows(manifest, "epoch=0000/dup-1.parquet", np.array([0]))  # not yet recorded
        with pytest.raises(CacheMismatch) as refused:
            open_cache([root])
    message = str(refused.value)
    assert "still being written, by run" in message and "pvu cache --output cache" in message
    assert "epoch=0000/dup-1.parquet" in message and "Wait until it finishes" in message
    assert "Repair it" not in message
    with pytest.raises(CacheMismatch, match="Repair it by re-running"):  # no run: damage
        open_cache([root])


class Killed(Exception):
    """The run stopping dead: nothing after it is written."""


def test_a_run_killed_after_the_pass_rewrote_a_unit_keeps_the_unit(tmp_path, shards, caplog):
    """A run killed between the pass's rewrite of a unit and the manifest's (throttled) write
    left the manifest recording the unit's old size: the next run warned that it was damaged
    ("recomputing ...: N bytes, manifest records M"), deleted it and computed it again."""
    from pipeline.cache.verify import reconcile

    root = str(tmp_path / "cache")
    units = [(name, epoch) for epoch in (0, 1) for name in ORDER]
    manifest = committed(root, shards, units)
    manifest.flush(force=True)  # as a run's last unit leaves it; the next write waits 10 s

    def killed_once_epoch_0_is_rewritten(done: int, total: int) -> None:
        if done == 3:  # epoch 0's duplicates dropped, epoch 1's keys being read
            raise Killed

    with pytest.raises(Killed):
        deduplicate(manifest, ORDER, on_read=killed_once_epoch_0_is_rewritten)
    unit = tmp_path / "cache" / "epoch=0000" / "dup-1.parquet"
    rewritten = unit.read_bytes()
    assert pq.read_metadata(unit).num_rows == 2  # rewritten on disk, not in the manifest
    folder = str(Path(shards["dup-0"]).parent)
    backbone = manifest.provenance["backbone"]
    plan = PlanJobConfig(shards=folder, output=root, epochs=2, backbone=backbone, weights="random")
    sizes = {url: Path(url).stat().st_size for url in shards.values()}
    assert len(committed_units(plan, manifest.provenance, sizes)) == 4  # pvu plan: all done

    with caplog.at_level("INFO", logger="pipeline.cache.verify"):
        reopened = reconcile(Manifest.open(root, manifest.provenance))  # the next run
    assert "recomputing" not in caplog.text, caplog.text
    assert "rewritten by the duplicate-key pass" in caplog.text
    assert unit.read_bytes() == rewritten, "the rewritten unit is kept"
    entry = reopened.units["epoch=0000/dup-1.parquet"]
    assert (entry["rows"], entry["skipped"], entry["bytes"]) == (
        2,
        {"duplicate_key": 3},
        unit.stat().st_size,
    )
    assert verify_cache(root).ok
    assert deduplicate(reopened, ORDER) == {"epoch=0001/dup-1.parquet": 3}  # the rest of the pass
    reopened.flush(force=True)
    assert rows(root).equals(rows(str(cache_in_order(str(tmp_path / "whole"), shards, units).root)))
