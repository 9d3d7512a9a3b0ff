"""The cache job end to end on a real local Ray: local disk, the S3 protocol server, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import types
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import psutil
import pyarrow.dataset as ds
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import ray
from ray._private import ray_constants
from support import JOB_FLAGS, SMALL_BACKBONE_FLAGS, pvu, unit_settings
from typer.testing import CliRunner

from jobs.cli import app
from jobs.run.cache import failed_in, member_advice, run_cache, summarize
from jobs.run.cache_config import CacheJobConfig
from pipeline.cache.deteriorate import Deterioration
from pipeline.cache.distribute import (
    FIRST_UNIT_DEADLINE_S,
    MIN_UNIT_DEADLINE_S,
    ActorPool,
    CacheWorker,
    PoolReport,
    start_local_ray,
)
from pipeline.cache.index import open_cache
from pipeline.cache.manifest import Manifest, read_manifest
from pipeline.cache.shards import shard_name
from pipeline.cache.unit import Unit, UnitSettings
from pipeline.cache.verify import verify_cache
from pipeline.demo.data import (
    bad_samples,
    write_bad_shard,
    write_bad_shards,
    write_digit_shards,
    write_duplicate_key_shards,
    write_shard,
)
from pipeline.named import NAMED
from pipeline.retry import StorageFull
from schemas import read_provenance

pytestmark = pytest.mark.slow

COMMON = {"backbone": "resnet10t", "weights": "random", "input_size": 32, "batch_size": 16}


@pytest.fixture(scope="module")
def local_ray(s3_server):  # the S3 environment must exist before Ray's workers start
    start_local_ray(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def read_cache(root: str, filesystem: pyarrow.fs.FileSystem | None = None):
    """The whole cache as one table, read with plain pyarrow (hive partition on epoch dirs)."""
    dataset = ds.dataset(
        root,
        filesystem=filesystem,
        format="parquet",
        exclude_invalid_files=False,
        ignore_prefixes=["_", "."],
    )
    return dataset.to_table()


def assert_one_row_per_sample_and_epoch(table, samples: int, epochs: int) -> None:
    pairs = list(
        zip(table.column("key").to_pylist(), table.column("epoch").to_pylist(), strict=True)
    )
    assert len(pairs) == len(set(pairs)) == samples * epochs


def test_local_round_trip_counts_bad_input_and_resumes(local_ray, tmp_path):
    shards = write_digit_shards(str(tmp_path / "shards"), shards=3, per_shard=12, size=32)
    bad = write_bad_shard(str(tmp_path / "shards" / "zz-bad.tar"))
    config = CacheJobConfig(
        shards=str(tmp_path / "shards"), output=str(tmp_path / "cache"), epochs=2, **COMMON
    )
    report = run_cache(config)
    valid_bad = sum(1 for sample in bad if sample.expect is None)
    assert not report.failed and len(report.results) == 8
    table = read_cache(str(tmp_path / "cache"))
    assert_one_row_per_sample_and_epoch(table, 3 * 12 + valid_bad, 2)
    import json

    manifest = json.loads((tmp_path / "cache" / "_manifest.json").read_text())
    assert len(manifest["units"]) == 8
    bad_unit = manifest["units"]["epoch=0000/zz-bad.parquet"]
    assert sum(bad_unit["skipped"].values()) == sum(1 for s in bad if s.expect is not None)
    assert manifest["units"]["epoch=0001/digits-0000.parquet"]["skipped"] == {}
    assert again_skips_everything(config)
    assert len(shards) == 3


def test_decode_device_runs_through_the_job_with_no_decode_pool(local_ray, tmp_path):
    write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=12, size=32)
    config = CacheJobConfig(
        shards=str(tmp_path / "shards"), output=str(tmp_path / "cache"), decode="device", **COMMON
    )
    report = run_cache(config)
    assert not report.failed and [result.rows for result in report.results] == [12]
    assert [worker["decode_workers"] for worker in report.workers] == [0]
    manifest = read_manifest(str(tmp_path / "cache"))
    assert manifest["provenance"]["transform"]["decode"] == "device"


def test_another_shard_set_of_the_same_names_is_warned_of_and_a_moved_one_resumes(
    local_ray, tmp_path, caplog
):
    """Units are named by shard: a second set's shard-000000.tar counts as done, and its
    images were never cached without a word (exit 0, 0 rows). A set moved resumes as well."""
    first = write_digit_shards(str(tmp_path / "a"), shards=2, per_shard=6, size=32)
    write_digit_shards(str(tmp_path / "b"), shards=2, per_shard=9, size=32, seed=1)
    config = CacheJobConfig(shards=str(tmp_path / "a"), output=str(tmp_path / "cache"), **COMMON)
    run_cache(config)
    caplog.clear()
    run_cache(config.model_copy(update={"shards": str(tmp_path / "a") + "//"}))
    assert "other URLs" not in caplog.text  # the same files, spelled otherwise
    caplog.clear()
    report = run_cache(config.model_copy(update={"shards": str(tmp_path / "b")}))
    said = "2 committed shard(s) were read from other URLs than this run's shards of their names"
    assert not report.results and said in caplog.text and "pvu shards --prefix" in caplog.text
    assert f"'digits-0000' from {first[0]}, now {tmp_path / 'b' / 'digits-0000.tar'}" in caplog.text
    moved = tmp_path / "moved"
    (tmp_path / "a").rename(moved)
    report = run_cache(config.model_copy(update={"shards": str(moved), "epochs": 2}))
    assert len(report.results) == 2  # epoch 1 only: epoch 0 was committed before the move
    assert len(read_cache(str(tmp_path / "cache"))) == 24


def test_units_of_shards_and_epochs_a_run_no_longer_names_are_warned_of(
    local_ray, tmp_path, caplog
):
    """A shard left out of --shards (bad data, say) or fewer --epochs: its earlier units stayed
    in the cache and were trained on, with no word (the summary counted their rows)."""
    shards = write_digit_shards(str(tmp_path / "shards"), shards=2, per_shard=6, size=32)
    config = CacheJobConfig(shards=shards[0], output=str(tmp_path / "cache"), **COMMON)
    run_cache(config.model_copy(update={"shards": str(tmp_path / "shards"), "epochs": 2}))
    assert "this run's --shards and --epochs do not make" not in caplog.text
    run_cache(config)
    said = " ".join(caplog.text.split())
    assert "holds 3 units, 18 rows, that this run's --shards and --epochs do not make" in said
    assert "e.g. epoch=0000/digits-0001.parquet (shard digits-0001, epoch 0)" in said


def test_a_shard_set_rebuilt_under_the_same_urls_is_refused_until_its_units_are_deleted(
    local_ray, tmp_path
):
    """Units are done by name: shards rebuilt in place (other samples, same URLs) counted as
    done, their new samples never read, with exit 0. Each unit records its shard's size; a
    shard at the same URL of another size is refused, naming the units to delete."""
    shards = tmp_path / "sh"
    first = write_digit_shards(str(shards), shards=2, per_shard=6, size=32)
    config = CacheJobConfig(shards=str(shards), output=str(tmp_path / "cache"), **COMMON)
    run_cache(config)
    shutil.rmtree(shards)
    write_digit_shards(str(shards), shards=2, per_shard=9, size=32, seed=5)
    units = [tmp_path / "cache" / f"epoch=0000/digits-000{i}.parquet" for i in range(2)]
    with pytest.raises(ValueError, match="rebuilt under the same URLs") as refused:
        run_cache(config)
    said = str(refused.value)
    assert f"{first[0]} was " in said and all(str(unit) in said for unit in units)
    assert "another --output" in said
    for unit in units:
        unit.unlink()
    report = run_cache(config)
    assert len(report.results) == 2 and len(read_cache(str(tmp_path / "cache"))) == 18
    entry = read_manifest(str(tmp_path / "cache"))["units"]["epoch=0000/digits-0000.parquet"]
    assert entry["source_bytes"] == os.path.getsize(first[0])


def test_caches_of_other_images_once_staged_at_one_path_train_together(local_ray, tmp_path):
    """Two caches of the same shard URL and settings but other images (a fixed scratch path
    filled anew) were refused to train-head as one cache given twice."""
    staged = tmp_path / "scratch"
    caches = []
    for seed, per_shard in ((0, 6), (7, 6)):
        shutil.rmtree(staged, ignore_errors=True)
        write_digit_shards(str(staged), shards=2, per_shard=per_shard, size=32, seed=seed)
        caches.append(str(tmp_path / f"cache-{seed}"))
        run_cache(CacheJobConfig(shards=str(staged), output=caches[-1], **COMMON))
    assert len(open_cache(caches).files) == 4
    with pytest.raises(ValueError, match="the same cache given twice"):
        open_cache([caches[0], caches[0] + "/."])


def test_every_kind_of_bad_input_is_counted_and_nothing_leaves_the_output(
    local_ray, tmp_path, wide_console, capsys
):
    import json

    shards = tmp_path / "in" / "shards"
    write_digit_shards(str(shards), shards=1, per_shard=6, size=32)
    bad = write_bad_shard(str(shards / "zz-bad.tar"))
    expected = write_bad_shards(str(shards))
    expected["zz-bad.tar"] = {}
    for sample in bad:
        if sample.expect is not None:
            counts = expected["zz-bad.tar"]
            counts[sample.expect.value] = counts.get(sample.expect.value, 0) + 1
    before = {path for path in tmp_path.rglob("*")}
    output = tmp_path / "in" / "cache"
    report = run_cache(CacheJobConfig(shards=str(shards), output=str(output), **COMMON))

    assert not report.failed and len(report.results) == 7
    units = json.loads((output / "_manifest.json").read_text())["units"]
    for name, counts in expected.items():
        assert units[f"epoch=0000/{shard_name(name)}.parquet"]["skipped"] == counts, name
    assert len({kind for counts in expected.values() for kind in counts}) >= 10
    # the rest of each shard is cached: every valid sample, once
    keys = read_cache(str(output)).column("key").to_pylist()
    valid = [s.key for s in bad if s.expect is None] + [f"digit-{i:06d}" for i in range(6)]
    duplicated = [f"ok-dup-{i}" for i in range(6)]  # in two shards, ok-dup-4 twice in one
    expected_keys = [*valid, "ok-climb", *duplicated]
    assert sorted(k for k in keys if not k.startswith("ok-cut")) == sorted(expected_keys)
    assert keys.count("ok-cut-0") == 1 and len(keys) == len(set(keys))
    # the summary names the shards cut short (it said "empty_shard=1, truncated_tar=1", which
    # reads as two samples lost)
    [damaged] = [line for line in capsys.readouterr().err.splitlines() if "cut short" in line]
    assert f"{shards}/cut.tar.gz, {shards}/empty.tar:" in damaged
    # member names are never paths: nothing appeared outside the output prefix
    created = {path for path in tmp_path.rglob("*")} - before
    assert all(output in path.parents or path == output for path in created), created
    assert not (tmp_path / "x.png").exists() and not os.path.exists("/abs/y.png")


def test_keys_two_shards_share_are_cached_once_per_epoch_from_the_earlier_shard(
    local_ray, tmp_path
):
    shards = tmp_path / "shards"
    expected = write_duplicate_key_shards(str(shards))
    output = tmp_path / "cache"
    config = CacheJobConfig(shards=str(shards), output=str(output), epochs=2, **COMMON)
    # The later shard's units commit first: by a run of their own, then the whole run.
    run_cache(config.model_copy(update={"shards": str(shards / "dup-1.tar"), "epochs": 1}))
    report = run_cache(config)
    assert not report.failed and len(report.results) == 3

    table = by_key_and_epoch(output)
    assert_one_row_per_sample_and_epoch(table, 6, 2)
    keys, shard, label = (table[name].to_pylist() for name in ("key", "shard", "label"))
    assert shard == ["dup-0" if int(key[-1]) < 4 else "dup-1" for key in keys]
    assert label == [1 if int(key[-1]) < 4 else 2 for key in keys]  # never ok-dup-4's 2nd (3)
    units = json.loads((output / "_manifest.json").read_text())["units"]
    for epoch in ("0000", "0001"):
        assert units[f"epoch={epoch}/dup-0.parquet"]["skipped"] == expected["dup-0.tar"]
        assert units[f"epoch={epoch}/dup-1.parquet"]["skipped"] == expected["dup-1.tar"]
        assert units[f"epoch={epoch}/dup-1.parquet"]["rows"] == 5 - 3
    info = CliRunner().invoke(app, ["info", str(output)])
    assert "duplicate_key=6" in " ".join(info.output.split())
    assert verify_cache(str(output)).ok

    # The earlier shard first, into a fresh cache: the same rows.
    fresh = tmp_path / "fresh"
    run_cache(config.model_copy(update={"output": str(fresh)}))
    assert by_key_and_epoch(fresh).equals(table)
    # A lost unit that held later copies is recomputed with them, and they go again.
    (output / "epoch=0001" / "dup-1.parquet").unlink()
    assert len(run_cache(config).results) == 1
    assert by_key_and_epoch(output).equals(table) and verify_cache(str(output)).ok
    assert again_skips_everything(config) and by_key_and_epoch(output).equals(table)


def test_shards_whose_keys_restart_are_named_in_the_summary(local_ray, tmp_path, capsys):
    """Shards written with keys 000000... in each (as a per-shard counter gives) kept one
    shard's samples: two thirds of the rows went as duplicate keys under a plain count."""
    png = bad_samples()[0].files["png"]
    for shard in range(3):
        members = [(f"{n:06d}", {"png": png, "cls": str(shard).encode()}) for n in range(4)]
        write_shard(str(tmp_path / "shards" / f"part-{shard}.tar"), members)
    config = CacheJobConfig(shards=str(tmp_path / "shards"), output=str(tmp_path / "c"), **COMMON)
    assert not run_cache(config).failed
    said = " ".join(capsys.readouterr().err.split()).replace("│ ", "")
    assert "8 rows of 2 units, the key's first row kept" in said, said
    assert "67% of the rows" in said and "if the shards' keys restart (000000 in" in said, said


def by_key_and_epoch(root) -> pyarrow.Table:
    return read_cache(str(root)).sort_by([("epoch", "ascending"), ("key", "ascending")])


def again_skips_everything(config: CacheJobConfig) -> bool:
    report = run_cache(config)
    return not report.results and not report.failed


def test_s3_in_s3_out_read_back_with_plain_pyarrow(local_ray, s3_bucket, s3_server):
    write_digit_shards(f"{s3_bucket}/shards", shards=2, per_shard=10, size=32)
    config = CacheJobConfig(
        shards=f"{s3_bucket}/shards/digits-{{0000..0001}}.tar",
        output=f"{s3_bucket}/cache",
        **COMMON,
    )
    report = run_cache(config)
    assert not report.failed
    endpoint = urlsplit(s3_server)
    s3 = pyarrow.fs.S3FileSystem(
        endpoint_override=endpoint.netloc,
        scheme=endpoint.scheme,
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
    )
    table = read_cache(f"{s3_bucket.removeprefix('s3://')}/cache", s3)
    assert_one_row_per_sample_and_epoch(table, 20, 1)
    assert table.schema.field("embedding").type.list_size == 512
    # The same command repairs a unit lost since: the driver, which listed the cache before
    # the actors wrote it, must not answer "not found" from its stale listing.
    s3.delete_file(f"{s3_bucket.removeprefix('s3://')}/cache/epoch=0000/digits-0001.parquet")
    report = run_cache(config)
    assert not report.failed and len(report.results) == 1
    assert read_cache(f"{s3_bucket.removeprefix('s3://')}/cache", s3).equals(table)


def test_killed_driver_then_rerun_gives_each_row_exactly_once(local_ray, tmp_path):
    write_digit_shards(str(tmp_path / "shards"), shards=6, per_shard=24, size=32)
    output = tmp_path / "cache"
    command = [
        sys.executable,
        "-m",
        "jobs.cache",
        "--shards",
        str(tmp_path / "shards"),
        "--output",
        str(output),
        "--epochs",
        "2",
        "--ray-address",
        local_ray,
        *SMALL_BACKBONE_FLAGS,
        "--batch-size",
        "16",
    ]
    # a user's shell: without the setting this process made to keep its own Ray on loopback
    # (joining 127.0.0.1 then hung for good, Ray trying this machine's address instead)
    shell = {k: v for k, v in os.environ.items() if k != ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR}
    driver = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=shell,
    )
    deadline = time.monotonic() + 180
    while not list(output.glob("epoch=*/*.parquet")):
        assert driver.poll() is None, "the job ended before it could be interrupted"
        assert time.monotonic() < deadline, "no unit was committed in time"
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    wait_for_no_cache_actor()  # the dead job's actor may still be committing its unit
    committed = len(list(output.glob("epoch=*/*.parquet")))
    assert 1 <= committed < 12, "the kill must land mid-job"
    assert read_manifest(str(output))["last_run"] == {"units": 12, "finished": False}
    config = CacheJobConfig(shards=str(tmp_path / "shards"), output=str(output), epochs=2, **COMMON)
    stale = output / "_staging" / "0123-epoch=0000-digits-0000.parquet"  # as if a writer died
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"PAR1 half a file")
    aside = output / "._manifest.json.4f7b0c"  # a kill between its write and its move (S3)
    aside.write_bytes(b"{}")
    report = run_cache(config)
    assert not stale.parent.exists(), "a finished job leaves no staging garbage behind"
    assert not aside.exists(), "nor a manifest left aside for good"
    assert not report.failed and len(report.results) == 12 - committed
    assert_one_row_per_sample_and_epoch(read_cache(str(output)), 6 * 24, 2)
    finished = {"units": 12, "finished": True, "failed": 0, "failed_units": []}
    assert read_manifest(str(output))["last_run"] == finished


def test_a_driver_whose_ray_node_dies_stops_naming_it(tmp_path):
    """The local Ray's raylet killed mid-run (the OOM killer takes it): the driver waited on
    its actors forever, holding the output's lock, its progress bar still ticking."""
    write_digit_shards(str(tmp_path / "shards"), shards=8, per_shard=64, size=32)
    output = tmp_path / "cache"
    command = [sys.executable, "-m", "jobs.cache", "--shards", str(tmp_path / "shards")]
    # 320 units, ~30 s: Ray marks a node dead ~15 s after its raylet is gone
    command += ["--output", str(output), "--epochs", "40", *SMALL_BACKBONE_FLAGS]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    said = ""
    while "cache actor ready" not in said:  # the run is under way, its units to do
        line = driver.stdout.readline()
        assert line, f"the job ended before its node could be killed: {said}"
        said += line
    ours = psutil.Process(driver.pid).children(recursive=True)  # its own Ray
    next(p for p in ours if p.name() == "raylet").kill()
    try:
        said += driver.communicate(timeout=120)[0]
    finally:
        driver.kill()  # a driver that hangs, as it did
    assert driver.returncode == 2, said
    assert "the Ray node this run's driver is on" in said and "died" in said, said
    assert not (output / "_lock.json").exists()  # released: the same command runs at once


def wait_for_no_cache_actor(seconds: float = 120) -> None:
    """Return once the local Ray (this module's) runs no cache actor: it reaps a dead job's."""
    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)
    deadline = time.monotonic() + seconds
    while any(_is_cache_actor(process) for process in raylet.children(recursive=True)):
        assert time.monotonic() < deadline, "the killed job's cache actor outlived it"
        time.sleep(0.2)


def _is_cache_actor(process: psutil.Process) -> bool:
    try:
        return "CacheWorker" in " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


@pytest.mark.faults
def test_actor_killed_mid_unit_loses_and_duplicates_no_row(local_ray, tmp_path):
    import threading

    import psutil

    # units long enough that the kill lands mid-unit: at 16 images the five units left could
    # all finish while the scan below looked for the actor, and then nothing was replaced
    per_shard = 64
    write_digit_shards(str(tmp_path / "shards"), shards=3, per_shard=per_shard, size=32)
    output = tmp_path / "cache"
    config = CacheJobConfig(shards=str(tmp_path / "shards"), output=str(output), epochs=2, **COMMON)
    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.update(report=run_cache(config)))
    job.start()
    deadline = time.monotonic() + 180
    victim = None
    while victim is None:  # a unit is committed and the actor is in the middle of another
        assert job.is_alive() and time.monotonic() < deadline, "the job did not get going"
        if list(output.glob("epoch=*/*.parquet")):
            ours = psutil.Process().children(recursive=True)  # this test's Ray only
            victim = next((p for p in ours if "CacheWorker.run" in p.name()), None)
        time.sleep(0.02)
    victim.kill()  # SIGKILL, as the OOM killer sends it
    job.join(timeout=300)
    assert not job.is_alive(), "the job did not finish after losing its actor"
    report = outcome["report"]
    assert not report.failed and report.actors_replaced >= 1
    assert_one_row_per_sample_and_epoch(read_cache(str(output)), 3 * per_shard, 2)
    assert len(list(output.glob("epoch=*/*.parquet"))) == 6


def test_cli_refuses_a_different_seed_into_the_same_prefix(local_ray, tmp_path):
    write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=4, size=32)
    args = [
        "cache",
        "--shards",
        str(tmp_path / "shards"),
        "--output",
        str(tmp_path / "c"),
        *SMALL_BACKBONE_FLAGS,
    ]
    runner = CliRunner()
    assert runner.invoke(app, args).exit_code == 0
    refused = runner.invoke(app, [*args, "--seed", "7"])
    assert refused.exit_code == 2
    assert "seed: cache has 0, this run asks for 7" in " ".join(refused.output.split())
    bad = runner.invoke(app, [*args, "--augment", "eval", "--epochs", "3"])
    assert bad.exit_code == 2 and "--epochs 1 (not 3)" in bad.output  # it said "drop --epochs"


def test_the_advice_for_a_run_without_rows_names_a_json_labels_member_and_field(tmp_path):
    """It named '<key>.json:label', a file no shard holds."""
    config = CacheJobConfig(
        shards="s", backbone="resnet10t", output=str(tmp_path), label_key="json:label"
    )
    assert "/ppm/pgm/pbm/pnm with <key>.json (its field label), set" in member_advice(config)


def test_a_run_of_shards_without_samples_says_so_not_that_every_sample_was_skipped(
    local_ray, tmp_path
):
    """Empty tars were said to have had 'every sample skipped (see samples skipped)', which
    said none, and told to set --image-key / --label-key."""
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "empty-000000.tar", "w"):
        pass
    args = ["cache", "--shards", str(tmp_path / "shards"), "--output", str(tmp_path / "c")]
    result = CliRunner().invoke(app, [*args, *SMALL_BACKBONE_FLAGS])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "its shards hold no sample's files" in text, text
    assert "every sample was skipped" not in text and "--image-key" not in text


def test_a_run_that_skips_every_sample_fails_naming_the_flags_and_a_corrected_run_caches(
    local_ray, tmp_path
):
    write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=4, size=32)
    args = ["cache", "--shards", str(tmp_path / "shards"), "--output", str(tmp_path / "c")]
    result = CliRunner().invoke(app, [*args, *SMALL_BACKBONE_FLAGS, "--label-key", "txt"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "no_label=4" in text and "the cache has no rows" in text
    assert "/ppm/pgm/pbm/pnm with <key>.txt, set --image-key / --label-key" in text
    assert "per-class archives (one class per tar, no label members" in text  # ImageNet's
    assert "make them into shards with pvu shards --input FOLDER" in text
    plan = CliRunner().invoke(app, ["plan", *args[1:], *SMALL_BACKBONE_FLAGS], terminal_width=200)
    assert "0 already in --output" in plan.output, plan.output  # it said 1 (of 1)
    corrected = CliRunner().invoke(app, [*args, *SMALL_BACKBONE_FLAGS])  # the units held none
    assert corrected.exit_code == 0, corrected.output
    assert sum(unit["rows"] for unit in read_manifest(str(tmp_path / "c"))["units"].values()) == 4


@pytest.mark.parametrize(("command", "job"), [("cache", "cache"), ("train-head", "train_head")])
def test_help_explains_every_flag_the_issues_fix(command, job):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    for flag in JOB_FLAGS[job]:
        assert flag in result.output, flag
    if command == "cache":  # defaults that depend on the cluster are explained, not swallowed
        assert "one per GPU" in " ".join(result.output.replace("│", " ").split())


def cpu_pool(settings: UnitSettings, size: int = 1, **options: Any) -> ActorPool:
    """A pool of ``size`` one-CPU actors of resnet10t at random weights writing ``settings``."""
    backbone = {"backbone": "resnet10t", "weights": "random"}
    return ActorPool(size=size, gpus=0, cpus=1, settings=settings, **backbone, **options)


def small_pool(
    tmp_path, worker: type[CacheWorker], *, shards: int, max_attempts: int, actors: int = 1
) -> tuple[ActorPool, list[Unit], str]:
    """A pool of ``actors`` one-CPU actors of class ``worker``, epoch 0's units of ``shards``
    digit shards, and the cache's output."""
    urls = write_digit_shards(str(tmp_path / "shards"), shards=shards, per_shard=4, size=32)
    settings = unit_settings(str(tmp_path / "cache"))
    pool = cpu_pool(settings, size=actors, max_attempts=max_attempts, worker=worker)
    return pool, [Unit(url, f"digits-{i:04d}", 0) for i, url in enumerate(urls)], settings.output


def test_a_unit_that_kills_every_actor_it_runs_on_fails_after_max_attempts(local_ray, tmp_path):
    class CrashesOnOneShard(CacheWorker):
        def run(self, unit, targets=None):
            if unit.shard == "digits-0001":
                os._exit(1)  # as an OOM kill or a segfaulting decoder would
            return super().run(unit, targets)

    pool, units, _ = small_pool(tmp_path, CrashesOnOneShard, shards=2, max_attempts=2)
    report = pool.run(units, on_result=lambda result: None)
    assert [result.relpath for result in report.results] == ["epoch=0000/digits-0000.parquet"]
    assert list(report.failed) == ["epoch=0000/digits-0001.parquet"]
    failure = report.failed["epoch=0000/digits-0001.parquet"]
    assert "its actor died" in failure and "gave up after 2 tries" in failure
    assert report.actors_replaced == 2


def test_a_unit_that_hangs_has_its_actor_killed_and_runs_again_elsewhere(local_ray, tmp_path):
    """An actor stopped mid-unit (SIGSTOP, as a read of a stalled mount or a hung GPU leaves
    it) held the run forever: the driver waited on it with no limit."""
    stopped = tmp_path / "stopped"

    class HangsOnceOnOneShard(CacheWorker):
        def run(self, unit, targets=None):
            if unit.shard == "digits-0001" and not stopped.exists():
                stopped.touch()
                os.kill(os.getpid(), signal.SIGSTOP)
            return super().run(unit, targets)

    pool, units, _ = small_pool(tmp_path, HangsOnceOnOneShard, shards=2, max_attempts=2)
    pool.unit_timeout = 10.0
    started = time.monotonic()
    report = pool.run(units, on_result=lambda result: None)
    assert sorted(result.relpath for result in report.results) == [
        f"epoch=0000/digits-000{i}.parquet" for i in (0, 1)
    ]
    assert not report.failed and report.actors_replaced == 1 and stopped.exists()
    assert time.monotonic() - started < 90


def test_a_unit_whose_result_waits_for_a_busy_driver_is_not_taken_as_hung(local_ray) -> None:
    """A driver busy past a deadline (a slow manifest write, a paused process) killed the
    actors of units that had finished, their results not yet collected, and ran them again."""
    pool = ActorPool(size=1, gpus=0, cpus=1, backbone="b", weights="w", settings=None)
    pool.unit_timeout = 10.0
    finished = ray.put("a result waiting to be collected")
    pool._running[finished] = (None, Unit("s.tar", "s", 0))
    pool._given_at[finished] = time.monotonic() - 60
    report = PoolReport()
    pool._stop_hung(report, deque(), {})
    assert finished in pool._running and report.actors_replaced == 0


def test_the_unit_deadline_follows_the_slowest_units_unless_given() -> None:
    """A small shard finished first set every larger one's deadline by its own time: a
    normal 20-minute unit was killed at 15 minutes, on every try."""
    pool = ActorPool(size=1, gpus=0, cpus=1, backbone="b", weights="w", settings=None)
    small, large, unsized = (Unit("s.tar", "s", 0, size) for size in (10**6, 10**8, None))
    assert pool.unit_deadline(large) == FIRST_UNIT_DEADLINE_S  # nothing finished yet
    pool._longest, pool._slowest = 60.0, 60.0 / 10**6  # the small shard took a minute
    assert pool.unit_deadline(small) == pool.unit_deadline(unsized) == MIN_UNIT_DEADLINE_S
    assert pool.unit_deadline(large) == 10 * 6000.0  # 100x the bytes: 100 minutes expected
    pool._longest = 600.0
    assert pool.unit_deadline(unsized) == 6000.0
    pool.unit_timeout = 5.0
    assert pool.unit_deadline(large) == 5.0


def test_an_actor_that_cannot_start_ends_the_run_with_its_own_error(local_ray, tmp_path):
    """The error start() raised, not an ActorDiedError wrapping its traceback as text: the CLI
    prints it as one line."""
    tries = tmp_path / "tries"
    tries.mkdir()

    class NoSharedMemory:  # not a CacheWorker: its actors start without importing torch
        def __init__(self, *args):
            pass

        def start(self):
            (tries / str(os.getpid())).touch()
            raise OSError(28, "decode pool: no room in /dev/shm for 1.0 MiB of shared memory")

    pool, units, _ = small_pool(tmp_path, NoSharedMemory, shards=1, max_attempts=1)
    with pytest.raises(OSError) as failed:
        pool.run(units, on_result=lambda result: None)
    assert type(failed.value) is OSError
    assert (
        str(failed.value)
        == "[Errno 28] decode pool: no room in /dev/shm for 1.0 MiB of shared memory"
    )
    assert len(list(tries.iterdir())) == 4  # the pool's size + 3 tries, each a new actor


def test_a_node_where_no_actor_can_start_is_given_up_and_the_run_goes_on(local_ray, tmp_path):
    """One actor starts; every later one fails (as on a node with a broken GPU, which takes each
    new actor Ray places there). The pool stops replacing them after size + 3 failures in a
    row, rather than starting actors for as long as the run lasts."""
    failed = tmp_path / "failed"
    failed.mkdir()

    class OneNodeBroken:  # a CacheWorker in the first actor only: the others fail fast
        def __init__(self, *args):
            self.args = args

        def start(self):
            try:
                (tmp_path / "started").mkdir()  # the first actor only
            except FileExistsError:
                # fail once the pool runs a unit on the first: its start, counted by then,
                # would otherwise reset the count of failures in a row
                deadline = time.monotonic() + 120
                while not (tmp_path / "running").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                (failed / str(os.getpid())).touch()
                raise RuntimeError("CUDA error: unspecified launch failure") from None
            from pipeline.cache.distribute import CacheWorker

            self.worker = CacheWorker(*self.args)
            return self.worker.start()

        def run(self, unit, targets=None):
            (tmp_path / "running").touch()
            deadline = time.monotonic() + 120
            while len(list(failed.iterdir())) < 5 and time.monotonic() < deadline:
                time.sleep(0.1)  # the run lasts until the starts have failed size + 3 times
            return self.worker.run(unit, targets)

        def close(self):
            self.worker.close()

    pool, units, _ = small_pool(tmp_path, OneNodeBroken, shards=2, max_attempts=1, actors=2)
    report = pool.run(units, on_result=lambda result: None)
    assert sum(result.rows for result in report.results) == 8 and not report.failed
    assert len(list(failed.iterdir())) == 5  # the pool's size + 3
    assert report.actors_replaced == 4  # and no replacement asked for after the last


def test_a_storage_check_that_fails_in_passing_is_a_failed_start_not_a_node_left_out(
    local_ray, tmp_path
):
    """Before: any error of an actor's storage check (here a reset connection, once) left its
    node out as 'the node's environment differs from the driver's'; with one node, the run
    ended with that. Now only the check's refusal (StorageRefused: no credentials, denied, no
    bucket) does; another error is a failed start: the actor is replaced and the run goes on."""
    failed_once = tmp_path / "failed-once"

    def check() -> None:
        if not failed_once.exists():
            failed_once.touch()
            raise ConnectionResetError(104, "Connection reset by peer")

    urls = write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=4, size=32)
    settings = unit_settings(str(tmp_path / "cache"))
    pool = cpu_pool(settings, check=check)
    report = pool.run([Unit(urls[0], "digits-0000", 0)], on_result=lambda result: None)
    assert [result.rows for result in report.results] == [4] and not report.failed
    assert not report.nodes_left_out and report.actors_replaced == 1 and failed_once.exists()


def test_a_full_disk_stops_the_run_at_its_first_unit_and_keeps_what_was_written(
    local_ray, tmp_path
):
    """Every later unit would fill the disk too: no retries, no other unit started."""

    class DiskFullOnOneShard(CacheWorker):
        def run(self, unit, targets=None):
            if unit.shard != "digits-0001":
                return super().run(unit, targets)
            import pipeline.cache.writer as writer

            write_table = writer.pq.write_table

            def onto_a_full_disk(table, where, **options):
                with open("/dev/full", "wb") as full:  # fails with ENOSPC, as a full disk does
                    write_table(table, full, **options)

            writer.pq.write_table = onto_a_full_disk
            try:
                return super().run(unit, targets)
            finally:
                writer.pq.write_table = write_table

    pool, units, output = small_pool(tmp_path, DiskFullOnOneShard, shards=3, max_attempts=3)
    written = []
    with pytest.raises(StorageFull) as stopped:
        pool.run(units, on_result=lambda result: written.append(result.relpath))
    message = str(stopped.value)
    assert f"commit {output}/epoch=0000/digits-0001.parquet failed" in message
    assert "No space left on device" in message and "free space" in message
    assert written == ["epoch=0000/digits-0000.parquet"]  # and digits-0002 never started
    assert sorted(os.listdir(tmp_path / "cache" / "epoch=0000")) == ["digits-0000.parquet"]


def test_also_caches_a_second_backbone_from_the_same_pass(local_ray, tmp_path):
    write_digit_shards(str(tmp_path / "shards"), shards=2, per_shard=6, size=32)
    shards = str(tmp_path / "shards")
    also = f"resnet14t,random,{tmp_path / 'both-14t'}"
    result = CliRunner().invoke(
        app,
        [
            "cache",
            "--shards",
            shards,
            "--output",
            str(tmp_path / "both-10t"),
            "--also",
            also,
            *SMALL_BACKBONE_FLAGS,
        ],
    )
    assert result.exit_code == 0, result.output
    alone = {"backbone": "resnet14t", "weights": "random", "input_size": 32, "batch_size": 64}
    run_cache(CacheJobConfig(shards=shards, output=str(tmp_path / "alone-14t"), **alone))
    for relpath in ("epoch=0000/digits-0000.parquet", "epoch=0000/digits-0001.parquet"):
        both = pq.read_table(tmp_path / "both-14t" / relpath)
        theirs = pq.read_table(tmp_path / "alone-14t" / relpath)
        assert both.equals(theirs)
        assert read_provenance(both.schema) == read_provenance(theirs.schema)
    manifests = [
        json.loads((tmp_path / n / "_manifest.json").read_text()) for n in ("both-14t", "alone-14t")
    ]
    assert manifests[0]["provenance"] == manifests[1]["provenance"]
    assert manifests[0]["units"].keys() == manifests[1]["units"].keys()
    assert read_cache(str(tmp_path / "both-10t")).num_rows == 12


def test_a_run_whose_every_label_is_outside_the_head_blames_the_labels_not_the_members(
    local_ray, tmp_path
):
    """Every sample skipped as label_outside_head (a remap of another dataset's classes) ended
    advising --image-key / --label-key, for shards whose images and labels were read."""
    write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=4, size=32)
    (tmp_path / "remap.json").write_text("[-1]")
    args = ["cache", "--shards", str(tmp_path / "shards"), "--output", str(tmp_path / "c")]
    remap = ["--label-remap", str(tmp_path / "remap.json")]
    result = CliRunner().invoke(app, [*args, *SMALL_BACKBONE_FLAGS, *remap])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "label_outside_head=4" in text and "the cache has no rows" in text
    assert "--image-key" not in text and "check --label-remap" in text
    assert "pvu shards --input" not in text  # the labels were read


def test_the_summary_names_ten_failed_units_and_counts_the_rest():
    """A run whose every unit failed at once (shards denied to read: 2,000 shards x 7 epochs)
    printed a 14,000-row summary table, one row per unit; the log names each instead."""
    report = PoolReport()
    for i in range(4000):
        report.failed[f"epoch=0000/s-{i:05d}.parquet"] = f"s3://b/s-{i:05d}.tar: PermissionError"
    table = summarize(report, already=0, seconds=1.0, manifest=Manifest("/nowhere", {}))
    failed = [cell for cell in table.columns[0].cells if "FAILED" in str(cell)]
    assert len(failed) == NAMED + 1, len(failed)
    assert str(failed[-1]).endswith(f"and {4000 - NAMED:,} more")


def test_a_unit_out_of_tries_is_named_in_the_log(caplog):
    """The summary names the first failed units only: one that ran out of tries was named
    nowhere else (only its earlier tries were logged, as tried again)."""
    pool = types.SimpleNamespace(max_attempts=1)
    unit, report = Unit("s3://b/s-1.tar", "s-1", 0), PoolReport()
    ActorPool._retry_or_fail(pool, unit, (0,), "its actor died", report, deque(), {})
    assert list(report.failed) == [unit.relpath]
    assert f"unit {unit.relpath} failed: its actor died; gave up after 1 tries" in caplog.text


def test_also_computes_only_the_backbone_whose_cache_lacks_the_units(local_ray, tmp_path):
    """A finished cache given again beside a new --also target was computed again in full:
    every unit it held was forwarded and rewritten, only because the other cache lacked it."""
    write_digit_shards(str(tmp_path / "shards"), shards=2, per_shard=4, size=32)
    flags = {"shards": str(tmp_path / "shards"), "output": str(tmp_path / "a"), **COMMON}
    run_cache(CacheJobConfig(**flags))
    units = sorted((tmp_path / "a").glob("epoch=*/*.parquet"))
    written = {path: path.stat().st_mtime_ns for path in units}
    also = f"resnet14t,random,{tmp_path / 'b'}"
    report = run_cache(CacheJobConfig(**flags, also=[also]))
    assert {path: path.stat().st_mtime_ns for path in units} == written
    assert sum(result.rows for result in report.results) == 8  # the new cache's
    manifest = json.loads((tmp_path / "b" / "_manifest.json").read_text())
    assert sorted(manifest["units"]) == [str(p.relative_to(tmp_path / "a")) for p in units]


def test_also_computes_each_unit_only_for_the_caches_that_lack_it(local_ray, tmp_path):
    """Re-run after each cache lost a unit (a backbone's forward failed there): each unit was
    computed, and its file rewritten, for both backbones, though one cache held it."""
    write_digit_shards(str(tmp_path / "shards"), shards=2, per_shard=4, size=32)
    also = f"resnet14t,random,{tmp_path / 'b'}"
    flags = {"shards": str(tmp_path / "shards"), "output": str(tmp_path / "a"), **COMMON}
    run_cache(CacheJobConfig(**flags, also=[also]))
    first, second = "epoch=0000/digits-0000.parquet", "epoch=0000/digits-0001.parquet"
    (tmp_path / "a" / first).unlink()
    (tmp_path / "b" / second).unlink()
    held = [tmp_path / "a" / second, tmp_path / "b" / first]
    written = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in held}
    report = run_cache(CacheJobConfig(**flags, also=[also]))
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in held} == written
    assert (tmp_path / "a" / first).exists() and (tmp_path / "b" / second).exists()
    assert [result.relpath for result in report.results] == [first] and not report.failed
    for cache in ("a", "b"):
        assert sorted(read_manifest(str(tmp_path / cache))["units"]) == [first, second]


def test_also_a_backbone_whose_forward_fails_fails_its_own_units_alone(local_ray, tmp_path):
    """The paper's four ViTs in one run, ViT-L out of memory at the --batch-size the others
    take: every unit failed for all four backbones after --max-attempts tries, and the small
    ones' work was lost. Here the failing backbone takes 224 px only (a real forward error)."""
    urls = write_digit_shards(str(tmp_path / "shards"), shards=2, per_shard=4, size=32)
    units = [Unit(url, f"digits-{i:04d}", 0) for i, url in enumerate(urls)]
    good = unit_settings(str(tmp_path / "good"))
    mixer = str(tmp_path / "mixer")
    provenance = {**good.provenance, "backbone": "mixer_s32_224"}
    bad = good.model_copy(update={"output": mixer, "provenance": provenance})
    pool = cpu_pool(good, max_attempts=2, also=(("mixer_s32_224", "random", bad),))
    committed = []
    report = pool.run(units, on_result=committed.append)
    relpaths = [unit.relpath for unit in units]
    # each unit committed once for the good backbone: its tries again were the mixer's alone
    assert sorted((r.target, r.relpath) for r in committed) == [(0, r) for r in relpaths]
    alone = unit_settings(str(tmp_path / "alone"))
    solo = cpu_pool(alone)
    assert not solo.run(units, on_result=lambda result: None).failed
    for relpath in relpaths:
        ours = pq.read_table(tmp_path / "good" / relpath)
        assert ours.equals(pq.read_table(tmp_path / "alone" / relpath)), relpath
    assert not list(tmp_path.glob("mixer/epoch=*/*.parquet"))
    assert sorted(report.failed) == relpaths
    assert report.failed_targets == {relpath: [1] for relpath in relpaths}
    assert (failed_in(report, 0), failed_in(report, 1)) == ([], relpaths)  # each cache's
    for why in report.failed.values():
        assert "Input height (32)" in why and "gave up after 2 tries" in why, why
        assert f"backbone mixer_s32_224, cache {mixer}" in why, why
    table = summarize(report, already=0, seconds=1.0, manifest=Manifest(good.output, {}))
    rows = dict(zip(*(map(str, column.cells) for column in table.columns), strict=True))
    assert rows["units done / already committed / failed"] == "2 / 0 / 0"  # the good cache's
    assert all(f"backbone mixer_s32_224, cache {mixer}" in rows[f"FAILED {r}"] for r in relpaths)


def test_also_deteriorate_caches_each_copy_in_one_pass_as_its_own_run_would(local_ray, tmp_path):
    """The eval caches of figure 6 (a dataset deteriorated by each kind at each strength) took
    a run each, every run reading and decoding every image again; --also-deteriorate writes
    them in the pass of the clean cache, each exactly as `--deteriorate` alone would."""
    shards = str(tmp_path / "shards")
    write_digit_shards(shards, shards=2, per_shard=6, size=32)
    common = ["--shards", shards, "--augment", "eval", *SMALL_BACKBONE_FLAGS]
    noise, zoom, r14 = (str(tmp_path / name) for name in ("noise-1", "zoom-0.5", "clean-14t"))
    more = ["--also-deteriorate", f"noise:1,{noise}", "--also-deteriorate", f"zoom:0.5,{zoom}"]
    also = ["--also", f"resnet14t,random,{r14}"]  # another backbone: not deteriorated
    result = pvu("cache", *common, "--output", str(tmp_path / "clean"), *more, *also)
    assert result.exit_code == 0, result.output
    assert result.text.count("cache actor ready") == 1, "one pass: one actor, one decode"
    for told in ("resnet10t noise:1: 12 rows", "resnet10t zoom:0.5: 12 rows", "resnet14t: 12 rows"):
        assert f"also {told} in" in result.text, told
    assert "deterioration" not in read_manifest(r14)["provenance"]["transform"]

    alone = pvu("cache", *common, "--deteriorate", "noise:1", "--output", f"{noise}-alone")
    assert alone.exit_code == 0, alone.output
    for relpath in ("epoch=0000/digits-0000.parquet", "epoch=0000/digits-0001.parquet"):
        ours, theirs = (
            pq.read_table(f"{noise}/{relpath}"),
            pq.read_table(f"{noise}-alone/{relpath}"),
        )
        assert ours.equals(theirs), relpath
        assert read_provenance(ours.schema) == read_provenance(theirs.schema)
    ours, theirs = read_manifest(noise), read_manifest(f"{noise}-alone")
    assert ours["provenance"] == theirs["provenance"]
    assert ours["units"].keys() == theirs["units"].keys()


def test_caches_of_one_model_share_it_on_the_actor(local_ray, tmp_path):
    """Each --also-deteriorate copy loaded its own copy of the backbone on every actor: 17
    copies of one model on a GPU for figure 6's 16 deteriorations."""
    settings = [
        unit_settings(str(tmp_path / name), augment="eval", deteriorate=deteriorate, backbone=b)
        for name, deteriorate, b in (
            ("clean", None, "resnet10t"),
            ("noise", Deterioration(kind="noise", strength=1), "resnet10t"),
            ("other", None, "resnet14t"),
        )
    ]
    also = (("resnet10t", "random", settings[1]), ("resnet14t", "random", settings[2]))
    worker = ray.remote(CacheWorker).remote("resnet10t", "random", settings[0], also=also)
    ray.get(worker.start.remote())
    models = worker.__ray_call__.remote(lambda self: [id(r.backbone) for r in self.fanout.runners])
    clean, noise, other = ray.get(models)
    assert noise == clean and other != clean
    ray.kill(worker)
