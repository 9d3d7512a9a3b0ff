"""The manifest and storage agree: damaged units are found, recomputed by `pvu cache`, refused
by readers; committed files the manifest lacks are adopted."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from support import SMALL_BACKBONE_FLAGS, slow_footer_reads
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.cache.distribute import start_local_ray
from pipeline.cache.index import open_cache
from pipeline.cache.manifest import Manifest, read_manifest
from pipeline.cache.verify import (
    CacheMismatch,
    check_pages,
    list_unit_files,
    reconcile,
    verify_cache,
)
from pipeline.demo.data import write_digit_shards
from pipeline.demo.synthetic import SyntheticCache, provenance, write_synthetic_cache
from schemas import SCHEMA_VERSION, UNIT_STATS_KEY

SPEC = SyntheticCache(dim=8, samples_per_shard=40, shards=3, epochs=2, row_group_rows=20)
UNITS = [f"epoch={e:04d}/shard-{s:05d}.parquet" for e in range(2) for s in range(3)]


def damage(url: str) -> dict[str, str]:
    """Delete one unit, truncate another, put a third unit's file in place of a fourth."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.rm(f"{root}/{UNITS[0]}")
    fs.pipe_file(f"{root}/{UNITS[1]}", fs.cat_file(f"{root}/{UNITS[1]}")[:-100])
    fs.pipe_file(f"{root}/{UNITS[2]}", fs.cat_file(f"{root}/{UNITS[5]}"))
    return {UNITS[0]: "missing", UNITS[1]: "bytes", UNITS[2]: ""}  # size or footer differs


def test_deleted_truncated_and_replaced_units_are_named(tmp_path: Path) -> None:
    url = str(tmp_path / "c")
    write_synthetic_cache(url, SPEC)
    assert verify_cache(url).ok
    assert sorted(list_unit_files(url)) == UNITS
    expected = damage(url)
    check = verify_cache(url)
    assert sorted(check.damaged) == sorted(expected)
    for relpath, word in expected.items():
        assert word in check.damaged[relpath]
    with pytest.raises(CacheMismatch) as refused:
        open_cache([url])
    for relpath in expected:
        assert relpath in str(refused.value)
    assert f"`pvu info {url}` shows the settings" in str(refused.value)


def test_reconcile_leaves_a_folder_named_epoch_but_no_number_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A copy of an epoch as epoch=backup was taken for an epoch folder: pvu cache deleted its
    files as units in the wrong place."""
    url = tmp_path / "c"
    write_synthetic_cache(str(url), SPEC)
    (url / "epoch=backup").mkdir()
    (url / "epoch=backup" / "shard-00000.parquet").write_bytes((url / UNITS[0]).read_bytes())
    with caplog.at_level(logging.WARNING, logger="pipeline.cache.verify"):
        manifest = reconcile(Manifest.open(str(url), read_manifest(str(url))["provenance"]))
    assert (url / "epoch=backup" / "shard-00000.parquet").exists()
    assert sorted(manifest.units) == UNITS
    assert f"left out {url}/epoch=backup: not an epoch folder" in caplog.text


def test_a_same_size_file_of_another_unit_is_caught_by_its_footer(tmp_path: Path) -> None:
    url = tmp_path / "c"
    write_synthetic_cache(str(url), SPEC)
    (url / UNITS[0]).write_bytes((url / UNITS[3]).read_bytes())  # epoch 1's file under epoch 0
    manifest = json.loads((url / "_manifest.json").read_text())
    manifest["units"][UNITS[0]]["bytes"] = (url / UNITS[3]).stat().st_size  # as if sizes agreed
    (url / "_manifest.json").write_text(json.dumps(manifest))
    check = verify_cache(str(url))
    assert list(check.damaged) == [UNITS[0]]
    assert "footer: epoch 1, manifest records 0" in check.damaged[UNITS[0]]
    (url / UNITS[1]).write_bytes(b"PAR1" + b"\0" * (manifest["units"][UNITS[1]]["bytes"] - 4))
    assert "unreadable footer" in verify_cache(str(url)).damaged[UNITS[1]]


def test_a_unit_whose_footer_is_damaged_in_place_is_named_and_recomputed(
    tmp_path: Path,
) -> None:
    """A byte damaged in a footer (same size) was taken for a storage error: `pvu info --verify`
    exited 2 with 'read the footer ... failed', and `pvu cache` could not repair the cache."""
    url = tmp_path / "c"
    write_synthetic_cache(str(url), SPEC)
    stored = bytearray((url / UNITS[2]).read_bytes())
    stored[len(stored) - 8 - int.from_bytes(stored[-8:-4], "little")] = 0  # the footer's 1st byte
    (url / UNITS[2]).write_bytes(stored)
    check = verify_cache(str(url))
    assert list(check.damaged) == [UNITS[2]]
    assert "unreadable footer: Couldn't deserialize thrift" in check.damaged[UNITS[2]]
    result = CliRunner().invoke(app, ["info", str(url), "--verify"])
    assert result.exit_code == 1 and UNITS[2] in result.output, result.output
    with pytest.raises(CacheMismatch, match=UNITS[2]):
        open_cache([str(url)])
    manifest = reconcile(Manifest.open(str(url), read_manifest(str(url))["provenance"]))
    assert sorted(manifest.units) == sorted(set(UNITS) - {UNITS[2]})
    assert not (url / UNITS[2]).exists(), "removed, to be computed again"


def test_a_cache_without_a_manifest_names_the_unit_that_is_not_one(tmp_path: Path) -> None:
    """Readers glob a bare cache, with no manifest to check against: a unit cut short, or one
    whose columns are not the row schema's, was refused naming no unit ('Parquet magic bytes
    not found'), or passed to a traceback (a string label) or to 'Input contains NaN'."""
    url = tmp_path / "c"
    write_synthetic_cache(str(url), SPEC)
    (url / "_manifest.json").unlink()
    path = url / UNITS[4]
    table = pq.read_table(path)
    stored = path.read_bytes()
    for label, edit, expected in (
        ("cut", lambda: path.write_bytes(stored[:-100]), "not a readable Parquet file"),
        ("empty", lambda: path.write_bytes(b""), "not a readable Parquet file"),
        (
            "string label",
            lambda: pq.write_table(
                table.set_column(3, "label", table["label"].cast("string")), path
            ),
            "column 'label' is string, a pvu cache stores int64",
        ),
        (
            "no entropy",
            lambda: pq.write_table(table.drop_columns(["entropy"]), path),
            "column 'entropy' is missing",
        ),
    ):
        edit()
        with pytest.raises(ValueError, match=f"{path}.*{expected}") as refused:
            open_cache([str(url)], need_loss=False)
        assert str(path) in str(refused.value), label
    path.write_bytes(stored)
    assert open_cache([str(url)]).rows == SPEC.images * SPEC.epochs


def test_reconcile_forgets_damaged_units_and_adopts_orphans(tmp_path: Path, caplog) -> None:
    url = str(tmp_path / "c")
    write_synthetic_cache(url, SPEC)
    expected = damage(url)
    document = json.loads((tmp_path / "c" / "_manifest.json").read_text())
    orphan = UNITS[4]
    del document["units"][orphan]  # committed, then killed before the manifest write
    (tmp_path / "c" / "_manifest.json").write_text(json.dumps(document))
    identity = {"schema_version": SCHEMA_VERSION, "embedding_dim": SPEC.dim, **provenance(SPEC)}
    with caplog.at_level(logging.WARNING):
        manifest = reconcile(Manifest.open(url, identity))
    assert sorted(manifest.units) == sorted(set(UNITS) - set(expected))
    for relpath in expected:
        assert f"recomputing {url}/{relpath}" in caplog.text
    assert sorted(list_unit_files(url)) == sorted(manifest.units), "damaged files are removed"
    assert verify_cache(url).ok


def test_reconcile_names_ten_damaged_units_and_counts_the_rest(tmp_path: Path, caplog) -> None:
    """Units deleted by hand (as the refusal of rebuilt shards asks: every epoch of each) were
    each warned of: 1,000 / 2,000 / 4,000 units gone, as many lines (14,000 for 2,000 shards
    x 7 epochs)."""
    spec = SyntheticCache(dim=8, samples_per_shard=2, shards=15, epochs=2, row_group_rows=2)
    url = str(tmp_path / "c")
    write_synthetic_cache(url, spec)
    for path in (tmp_path / "c" / "epoch=0001").iterdir():
        path.unlink()
    identity = {"schema_version": SCHEMA_VERSION, "embedding_dim": spec.dim, **provenance(spec)}
    with caplog.at_level(logging.WARNING, logger="pipeline.cache.verify"):
        manifest = reconcile(Manifest.open(url, identity))
    assert len(manifest.units) == 15
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 11, lines
    assert lines[0] == f"recomputing {url}/epoch=0001/shard-00000.parquet: missing"
    assert lines[-1].startswith(f"recomputing 5 more units of {url} (15 of all 15 missing")


def test_reconcile_adopts_a_cache_without_manifest_in_parallel_in_one_line(
    tmp_path: Path, caplog, monkeypatch
) -> None:
    """With its manifest moved aside, every unit is an orphan: their footers were read one at a
    time and each adoption logged at INFO (96 s and 14,000 lines for 14,000 units on a local
    S3 server, against 43 s for the parallel check of a manifest's units)."""
    url = str(tmp_path / "c")
    write_synthetic_cache(url, SPEC)
    (tmp_path / "c" / "_manifest.json").unlink()
    identity = {"schema_version": SCHEMA_VERSION, "embedding_dim": SPEC.dim, **provenance(SPEC)}
    reads = slow_footer_reads(monkeypatch)
    with caplog.at_level(logging.INFO, logger="pipeline.cache.verify"):
        manifest = reconcile(Manifest.open(url, identity))
    assert list(manifest.units) == UNITS and reads.calls == len(UNITS)
    assert reads.peak > 1, "footers read one at a time"
    adopted = [r.getMessage() for r in caplog.records if "adopted" in r.getMessage()]
    assert adopted == [
        f"adopted 6 committed units missing from the manifest: {', '.join(UNITS[:3])} and 3 more"
    ]
    assert verify_cache(url).ok


def test_a_parquet_file_that_is_not_a_unit_is_left_alone(tmp_path: Path, caplog) -> None:
    """It was deleted, under a warning that said 'recomputing'."""
    url = str(tmp_path / "c")
    write_synthetic_cache(url, SPEC)
    foreign = tmp_path / "c" / "epoch=0000" / "notes.parquet"
    pq.write_table(pa.table({"note": ["mine"]}), foreign)
    identity = {"schema_version": SCHEMA_VERSION, "embedding_dim": SPEC.dim, **provenance(SPEC)}
    with caplog.at_level(logging.WARNING):
        manifest = reconcile(Manifest.open(url, identity))
    assert foreign.exists() and sorted(manifest.units) == sorted(UNITS)
    assert f"left {url}/epoch=0000/notes.parquet alone" in caplog.text
    broken = tmp_path / "c" / "epoch=0000" / "shard-00009.parquet"  # a unit's stats cut short
    pq.write_table(pa.table({"note": ["x"]}).replace_schema_metadata({UNIT_STATS_KEY: "{"}), broken)
    with caplog.at_level(logging.WARNING):
        reconcile(Manifest.open(url, identity))
    assert not broken.exists() and "its unit stats are unreadable" in caplog.text


def test_a_damaged_manifest_is_named_with_the_way_out(tmp_path: Path) -> None:
    url = tmp_path / "c"
    write_synthetic_cache(str(url), SPEC)
    (url / "_manifest.json").write_text('{"units": {"epoch=00')
    with pytest.raises(ValueError, match=r"_manifest.json is not a valid manifest.*Move it aside"):
        open_cache([str(url)])


def test_readers_warn_of_a_cache_whose_last_run_did_not_finish_or_failed_units(
    tmp_path: Path, caplog
) -> None:
    """A cache whose run was killed, or failed units, was trained on without a word: the
    manifest kept no record of the run, so readers could not tell the cache was partial."""
    url = str(tmp_path / "c")
    write_synthetic_cache(url, SPEC)
    manifest = Manifest.open(url, read_manifest(url)["provenance"])
    for last in (None, "begun", "failed", "whole"):
        if last == "begun":
            manifest.begin_run(units=8)
        elif last == "failed":
            manifest.end_run(["epoch=0001/shard-00003.parquet", "epoch=0000/shard-00003.parquet"])
        elif last == "whole":
            manifest.begin_run(units=6)
            manifest.end_run([])
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            open_cache([url])
        said = {
            None: "",
            "begun": "its last pvu cache run did not finish (stopped or killed)",
            "failed": "failed 2 units (e.g. epoch=0000/shard-00003.parquet, epoch=0001/",
            "whole": "",
        }[last]
        assert (said in caplog.text) if said else "last pvu cache run" not in caplog.text, last
    result = CliRunner().invoke(app, ["info", url])
    assert "finished, every unit" in result.output, result.output


def test_the_first_unit_after_a_run_begins_is_written_at_once(tmp_path: Path) -> None:
    """The run's start record reset the manifest's 10 s write spacing: a run killed in that
    time left its first units unlisted, and readers called the cache empty."""
    url = str(tmp_path / "c")
    write_synthetic_cache(url, SPEC)
    manifest = Manifest.open(url, read_manifest(url)["provenance"])
    entry = manifest.units[UNITS[0]]
    manifest.forget(UNITS[0])
    manifest.begin_run(units=6)
    manifest.record(UNITS[0], entry)
    assert UNITS[0] in read_manifest(url)["units"]


def test_a_manifest_from_a_newer_pvu_says_to_upgrade(tmp_path: Path) -> None:
    """It failed validation and was called invalid, with advice to move it aside and let this
    (older) pvu write it anew over a newer cache."""
    url = tmp_path / "c"
    write_synthetic_cache(str(url), SPEC)
    manifest = url / "_manifest.json"
    newer = SCHEMA_VERSION + 1
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "schema_version": newer}))
    with pytest.raises(ValueError) as refused:
        open_cache([str(url)])
    message = str(refused.value)
    assert f"{manifest} was written by a newer pvu (schema_version {newer}" in message
    assert f"reads up to {SCHEMA_VERSION}): upgrade pvu" in message
    assert "Move it aside" not in message


# --- the user's path: `pvu cache` repairs what `pvu train-head` refuses ------------------------


@pytest.fixture(scope="module")
def local_ray(s3_server):  # the S3 environment must exist before Ray's workers start
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


def read_rows(url: str) -> dict[tuple[str, int], bytes]:
    """Every row of the cache at ``url`` by (key, epoch), as the bytes of its columns."""
    rows = {}
    fs, root = fsspec.core.url_to_fs(url)
    for relpath in list_unit_files(url):
        table = pq.read_table(fs.open(f"{root}/{relpath}", "rb"))
        for row in table.to_pylist():
            rows[row["key"], row["epoch"]] = repr(sorted(row.items())).encode()
    return rows


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("storage", ["local", "s3"])
def test_cache_rerun_repairs_a_damaged_cache_that_train_head_refused(
    local_ray, storage, tmp_path, request
):
    root = request.getfixturevalue("s3_bucket") if storage == "s3" else str(tmp_path)
    write_digit_shards(f"{root}/shards", shards=3, per_shard=6, size=32)
    output = f"{root}/cache"
    command = [
        "cache",
        *("--shards", f"{root}/shards/digits-{{0000..0002}}.tar", "--output", output),
        *("--epochs", "2", "--batch-size", "8", *SMALL_BACKBONE_FLAGS),
    ]
    runner = CliRunner()
    assert runner.invoke(app, command).exit_code == 0
    exact = read_rows(output)
    assert len(exact) == 3 * 6 * 2
    fs, path = fsspec.core.url_to_fs(output)
    units = sorted(list_unit_files(output))
    fs.rm(f"{path}/{units[0]}")
    fs.pipe_file(f"{path}/{units[1]}", fs.cat_file(f"{path}/{units[1]}")[:-64])
    fs.pipe_file(f"{path}/{units[2]}", fs.cat_file(f"{path}/{units[4]}"))

    train = ["train-head", "--cache", output, "--output", str(tmp_path / "head")]
    refused = runner.invoke(app, [*train, "--episodes", "2", "--warmup-episodes", "0"])
    message = " ".join(refused.output.split())
    assert refused.exit_code == 2, refused.output
    assert all(unit in message for unit in units[:3]) and "`pvu cache`" in message

    repaired = runner.invoke(app, command)
    assert repaired.exit_code == 0, repaired.output
    assert read_rows(output) == exact, "the same command gives the exact cache again"
    assert verify_cache(output).ok


@pytest.mark.slow
def test_storage_is_listed_once_per_epoch_and_each_footer_read_once(s3_bucket: str) -> None:
    import s3fs

    url = f"{s3_bucket}/cache"
    spec = SyntheticCache(dim=8, samples_per_shard=4, shards=12, epochs=2)
    write_synthetic_cache(url, spec)
    calls: Counter[str] = Counter()
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.connect()
    fs.s3.meta.events.register(
        "before-call.s3", lambda event_name, **_: calls.update([event_name.split(".")[-1]])
    )
    assert verify_cache(url, footers=False).ok
    assert calls["ListObjectsV2"] <= 1 + spec.epochs + 1  # the root, each epoch, a probe
    assert calls["HeadObject"] + calls["GetObject"] <= 2  # the manifest, nothing per unit
    calls.clear()
    assert verify_cache(url).ok
    assert calls["GetObject"] == 1 + spec.shards * spec.epochs  # the manifest, then one footer each
    assert calls["HeadObject"] <= 1
    calls.clear()
    index = open_cache([url])  # the readers' check and index: each footer is read once
    assert calls["GetObject"] == 1 + spec.shards * spec.epochs  # the manifest and each footer once
    assert index.rows == spec.shards * spec.epochs * spec.samples_per_shard
    calls.clear()
    result = CliRunner().invoke(app, ["info", url, "--verify"])
    assert result.exit_code == 0, result.output
    assert calls["GetObject"] == 1 + spec.shards * spec.epochs  # the summary and check share one


@pytest.mark.slow
def test_a_storage_outage_is_an_error_not_a_damaged_unit(s3_bucket: str, fault_proxy) -> None:
    url = f"{s3_bucket}/cache"
    write_synthetic_cache(url, SPEC)
    unit = r"cache/epoch(=|%3D)0001/shard-00000\.parquet"  # UNITS[3], as the request spells it
    fault_proxy.fail_next("cut", 1, pattern=unit, methods=["GET"])  # retried: nothing wrong
    assert verify_cache(url).ok and fault_proxy.counts["cut"] == 1
    fault_proxy.fail_next("500", 1000, pattern=unit, methods=["GET"])  # the store stays down
    with pytest.raises(OSError, match=UNITS[3]):
        verify_cache(url)


@pytest.mark.slow
def test_a_page_check_left_early_reads_no_more_units(s3_bucket: str, fault_proxy) -> None:
    """``pvu info --checksums`` interrupted (or its caller failed) between two units: the
    pool's exit read the pages of every unit left, the whole cache, before it let go."""
    url = f"{s3_bucket}/cache"
    spec = SyntheticCache(dim=8, samples_per_shard=4, shards=12, epochs=2)
    write_synthetic_cache(url, spec)
    check = verify_cache(url)
    assert len(check.footers) == 24
    fault_proxy.clear()
    pages = check_pages(check, io_threads=1)
    next(pages)
    pages.close()
    read = {path for method, path in fault_proxy.requests if method == "GET"}
    assert len(read) <= 3, sorted(read)  # the unit taken, the one being read, and one more
