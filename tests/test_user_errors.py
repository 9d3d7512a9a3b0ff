"""Errors a person can act on: seconds, one message naming the input and the fix, exit code 2.

Each case runs the real command (``pvu`` in-process; one case as ``python -m jobs.cli``) against
real parts: moto's S3 server, a real local Ray, real files.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import s3fs
from support import SMALL_BACKBONE_FLAGS, damage_page_header, make_runner, pvu, unboxed
from typer.testing import Result

import pipeline.head.train as train_module
from jobs.preflight import check_output_folder
from jobs.run.demo import DEMO_MARK, DemoConfig, clear_earlier_demo
from jobs.terminal import UserError
from pipeline.cache.distribute import start_local_ray
from pipeline.cache.unit import Unit
from pipeline.cache.writer import EmbeddingOverflow, to_record_batch
from pipeline.demo.data import write_digit_shards
from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache
from pipeline.head.export import HEAD_JSON, HEAD_WEIGHTS, export_head
from pipeline.head.model import HeadConfig, create_head
from schemas import cache_schema

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted(p.stem for p in (ROOT / "jobs").glob("*.py") if "def main(" in p.read_text())


def timed_pvu(*args: str) -> tuple[Result, float]:
    """``pvu args`` in-process (:func:`support.pvu`); the result and its seconds."""
    started = time.monotonic()
    result = pvu(*args)
    return result, time.monotonic() - started


def assert_actionable(result: Result, seconds: float, *phrases: str) -> None:
    """Exit code 2 within seconds, no traceback, and every phrase in the message."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert seconds < 30, f"took {seconds:.0f} s"
    for phrase in phrases:
        assert phrase in unboxed(result.text), result.output


def test_unknown_timm_model_suggests_close_names(tmp_path: Path) -> None:
    result, seconds = timed_pvu(
        "cache", "--shards", str(tmp_path), "--output", str(tmp_path / "c"),
        "--backbone", "vit_base_patch16_244",
    )  # fmt: skip
    assert_actionable(result, seconds, "timm has no model 'vit_base_patch16_244'")
    assert "vit_base_patch16_224" in unboxed(result.text).split("close names")[1]


def test_embeddings_float16_cannot_hold_are_refused_not_stored_as_inf(tmp_path: Path) -> None:
    """Random-weight Inception v3 embeds past 1e7: every row was stored as inf, silently (and
    pvu plan failed in its own sample, naming a unit and keys the user does not have)."""
    write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=4, size=32)
    flags = ["--shards", str(tmp_path / "shards"), "--output", str(tmp_path / "c")]
    backbone = ["--backbone", "inception_v3", "--weights", "random", "--input-size", "75"]
    for command in ("cache", "plan"):
        result, seconds = timed_pvu(command, *flags, *backbone)
        assert_actionable(result, seconds, "beyond float16's 65504", "--dtype float32")
        assert "inception_v3 (a probe)" in result.text, result.output
    # as an --also target, before any shard is sampled (plan sampled, measured the first
    # backbone, then refused; here the sample would be refused first: no samples in it)
    (tmp_path / "empty").mkdir()
    tarfile.open(tmp_path / "empty" / "shard.tar", "w").close()
    flags = ["--shards", str(tmp_path / "empty"), "--output", str(tmp_path / "c")]
    also = ["--also", f"inception_v3,random,{tmp_path / 'c2'}", "--input-size", "75"]
    result = pvu("plan", *flags, "--backbone", "resnet10t", "--weights", "random", *also)
    assert result.exit_code == 2 and "inception_v3 (a probe)" in result.text, result.output
    # the writer checks each batch too
    outputs = {"embedding": np.full((2, 4), 7e4, np.float32), "pred": np.zeros(2)}
    outputs |= {"max_prob": np.ones(2), "entropy": np.zeros(2), "loss": np.zeros(2)}
    outputs["embedding"][0, 0] = np.inf  # the backbone's own inf: kept, not counted as a peak
    small = {**outputs, "embedding": np.where(np.isinf(outputs["embedding"]), np.inf, 1.0)}
    batch = to_record_batch(
        cache_schema(4), keys=["a", "b"], shard="s", epoch=0, labels=np.zeros(2), outputs=small
    )
    assert batch.num_rows == 2
    with pytest.raises(EmbeddingOverflow, match=r"unit s epoch 0, keys a\.\.\.: .* reach 7e\+04"):
        to_record_batch(
            cache_schema(4), keys=["a", "b"], shard="s", epoch=0, labels=np.zeros(2),
            outputs=outputs,
        )  # fmt: skip


def test_shard_pattern_that_matches_nothing(tmp_path: Path) -> None:
    pattern = str(tmp_path / "train-{0000..0003}.tar")
    result, seconds = timed_pvu(
        "cache", "--shards", pattern, "--output", str(tmp_path / "c"), *SMALL_BACKBONE_FLAGS
    )
    assert_actionable(result, seconds, f"no shards match '{pattern}'")


@pytest.mark.parametrize(
    ("remap", "bad"),
    [
        ("[3, null, 5]", "None"), ('{"n01440764": 0}', "'n01440764'"), ("[3, 5.5]", "5.5"),
        # a MemoryError (a 745 GiB table) and an OverflowError, each with a traceback
        ('{"100000000000": 0}', "shard label 100000000000"), (f"[1{'0' * 29}]", f"1{'0' * 29}"),
    ],
)  # fmt: skip
def test_a_malformed_label_remap_is_named_before_the_output_is_touched(
    remap: str, bad: str, tmp_path: Path
) -> None:
    """It was read only in the actors: a Ray traceback after a minute of actor restarts, and a
    manifest recording its digest that refused the corrected file's re-run."""
    (tmp_path / "remap.json").write_text(remap)
    write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=2, size=32)
    result, seconds = timed_pvu(
        "cache", "--shards", str(tmp_path / "shards"), "--output", str(tmp_path / "c"),
        "--label-remap", str(tmp_path / "remap.json"), *SMALL_BACKBONE_FLAGS,
    )  # fmt: skip
    assert_actionable(result, seconds, f"label remap {tmp_path / 'remap.json'}: {bad} is ")
    assert not (tmp_path / "c").exists()


def test_an_output_that_cannot_be_made_is_named_before_any_work(tmp_path: Path) -> None:
    """A link to an unmounted volume and an overlong name passed the check, so pvu evaluate
    failed writing its report after all its work; pvu plan took a file as its --output."""
    (tmp_path / "results").symlink_to("/unmounted-volume/results")
    with pytest.raises(UserError, match="links to /unmounted-volume/results, which does not"):
        check_output_folder(str(tmp_path / "results" / "run1"), flag="--report")
    with pytest.raises(UserError, match="is over the 255 bytes a name may have"):
        check_output_folder(str(tmp_path / ("x" * 300) / "run1"), flag="--report")
    (tmp_path / "file").write_text("")
    flags = ["--shards", str(tmp_path), *SMALL_BACKBONE_FLAGS, "--output", str(tmp_path / "file")]
    result = pvu("plan", *flags)
    assert result.exit_code == 2 and "is a file; give a folder" in result.text, result.output


def test_the_demo_replaces_only_folders_an_earlier_demo_wrote(tmp_path: Path) -> None:
    """`pvu demo --output .` deleted a project's own cache/ and report/ without a word."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "_manifest.json").write_text("a user's cache")
    result = pvu("demo", "--output", str(tmp_path))
    assert result.exit_code == 2 and "holds cache, which no earlier demo marked" in result.text
    assert (tmp_path / "cache" / "_manifest.json").exists()
    (tmp_path / DEMO_MARK).write_text("")  # an earlier demo's folder: replaced
    (tmp_path / "backbone").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "kept").write_text("")
    (tmp_path / "report").symlink_to(tmp_path / "elsewhere")  # a link is removed, not followed
    clear_earlier_demo(tmp_path)
    assert (tmp_path / "elsewhere" / "kept").exists() and (tmp_path / DEMO_MARK).exists()
    assert not any(os.path.lexists(tmp_path / part) for part in ("report", "backbone", "cache"))


def test_the_demo_refuses_an_output_it_cannot_write_before_any_work(tmp_path: Path) -> None:
    """`pvu demo --output s3://b/demo` wrote the whole demo to ./s3:/b/demo; a file as --output
    said only "[Errno 17] File exists"."""
    with pytest.raises(ValueError, match="is a URL: give a local path"):
        DemoConfig(output="s3://bucket/demo")
    (tmp_path / "file").write_text("")
    for output, words in [
        ("s3://bucket/demo", "--output: 's3://bucket/demo' is a URL: give a local path"),
        (str(tmp_path / "file"), f"--output {tmp_path / 'file'} is a file; give a folder"),
    ]:
        result = pvu("demo", "--output", output)
        assert result.exit_code == 2 and words in unboxed(result.output), result.output
    assert not (tmp_path / "file" / ".pvu-demo").exists() and not Path("s3:").exists()


def test_missing_cache_fails_before_any_progress_bar(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-cache")
    result, seconds = timed_pvu("train-head", "--cache", missing, "--output", str(tmp_path / "h"))
    assert_actionable(result, seconds, f"--cache {missing} does not exist")
    assert "samples/s" not in result.output and "━" not in result.output


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("train-head", "--cache", "{cache}", "--output", ""), "--output"),
        (("train-head", "--cache", "", "--output", "{tmp}/h"), "--cache: value 1"),
        (("info", ""), "CACHE"),
        (("label-remap", "--classes", "", "--head", "imagenet-1k", "--output", "r"), "--classes"),
        (("label-remap", "--classes", "c", "--head", "imagenet-1k", "--output", ""), "--output"),
    ],
)
def test_an_empty_url_is_refused_not_taken_for_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], flag: str
) -> None:
    """``--output ""`` (an unset variable) trained into the working folder and said "head
    exported to  (head.safetensors, head.json)"; ``--cache ""`` and ``pvu info ""`` read the
    working folder as a cache, as ``pvu evaluate --report ""`` once did."""
    cache = str(tmp_path / "cache")
    write_synthetic_cache(cache, SyntheticCache(dim=8, samples_per_shard=64, shards=1, epochs=1))
    monkeypatch.chdir(tmp_path)
    result = pvu(*(arg.format(cache=cache, tmp=tmp_path) for arg in args))
    assert result.exit_code == 2, result.output
    assert f"{flag}: '' is empty: give a local path or an fsspec URL" in unboxed(result.output)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache"]


def test_a_missing_eval_dataset_is_named_before_the_others_are_evaluated(tmp_path: Path) -> None:
    """It surfaced only after every dataset ahead of it was read, searched and mapped."""
    cache = str(tmp_path / "eval")
    write_synthetic_cache(cache, SyntheticCache(dim=8, samples_per_shard=64, shards=1, epochs=1))
    missing = str(tmp_path / "no-such-eval")
    result, seconds = timed_pvu(
        "evaluate", "--dataset", f"good={cache}", "--dataset", f"typo={missing}",
        "--report", str(tmp_path / "r"),
    )  # fmt: skip
    assert_actionable(result, seconds, f"--dataset typo={missing} does not exist")
    assert "━" not in result.output


@pytest.mark.parametrize("command", ["train-head", "evaluate"])
def test_a_damaged_cache_unit_is_named(command: str, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    spec = SyntheticCache(dim=16, samples_per_shard=512, shards=2, epochs=1, row_group_rows=256)
    write_synthetic_cache(cache, spec)
    unit = sorted((tmp_path / "cache").glob("epoch=*/*.parquet"))[1]
    damage_page_header(unit, 1)  # in place: the size still matches the manifest's
    output = str(tmp_path / "out")
    args = {
        "train-head": ["--cache", cache, "--output", output, "--episodes", "2",
                       "--episode-size", "2048", "--batch-size", "256", "--warmup-episodes", "1"],
        "evaluate": ["--dataset", f"synthetic={cache}", "--report", output],
    }[command]  # fmt: skip
    result, seconds = timed_pvu(command, *args)
    where = f"row group 1 of {unit}" if command == "train-head" else str(unit)
    assert_actionable(result, seconds, f"read {where} failed", "page header")


@pytest.mark.parametrize("command", ["train-head", "info"])
def test_a_manifest_that_is_not_json_is_named(command: str, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    write_synthetic_cache(cache, SyntheticCache(dim=16, samples_per_shard=64, shards=1, epochs=1))
    (tmp_path / "cache" / "_manifest.json").write_text('{"units": {')  # cut off mid-write
    args = (
        ["--cache", cache, "--output", str(tmp_path / "out")]
        if command == "train-head"
        else [cache]
    )
    result, seconds = timed_pvu(command, *args)
    assert_actionable(result, seconds, f"{cache}/_manifest.json is not a valid manifest")


@pytest.mark.parametrize("damage", ["head.json cut off", "weights of another width"])
def test_a_damaged_head_export_is_named(damage: str, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    write_synthetic_cache(cache, SyntheticCache(dim=16, samples_per_shard=64, shards=1, epochs=1))
    folder = tmp_path / "head"
    export_head(create_head(HeadConfig(16, (8,)), seed=0), str(folder), backbone="synthetic",
                weights_digest="sha256:synthetic", loss="ranking")  # fmt: skip
    if damage == "head.json cut off":
        (folder / HEAD_JSON).write_text((folder / HEAD_JSON).read_text()[:40])
    else:
        other = tmp_path / "other"
        export_head(create_head(HeadConfig(16, (4,)), seed=0), str(other), backbone="synthetic",
                    weights_digest="sha256:synthetic", loss="ranking")  # fmt: skip
        (folder / HEAD_WEIGHTS).write_bytes((other / HEAD_WEIGHTS).read_bytes())
    result, seconds = timed_pvu(
        "evaluate", "--dataset", f"synthetic={cache}", "--head", str(folder),
        "--report", str(tmp_path / "report"),
    )  # fmt: skip
    assert_actionable(result, seconds, f"{folder} is not a valid pvu head export")


@pytest.mark.parametrize(
    "damaged", ["state.json", "episode-00001.safetensors", "episode-00001.safetensors gone"]
)
def test_resuming_from_a_damaged_checkpoint_is_refused_with_the_fix(
    damaged: str, tmp_path: Path
) -> None:
    """Cut off, as a full disk leaves it; or its tensors gone (deleted, a copy without them),
    which ended in a bare FileNotFoundError."""
    cache, output = str(tmp_path / "cache"), str(tmp_path / "run")
    write_synthetic_cache(cache, SyntheticCache(dim=16, samples_per_shard=256, shards=1, epochs=1))
    args = ["train-head", "--cache", cache, "--output", output, "--episodes", "3",
            "--episode-size", "512", "--batch-size", "128", "--warmup-episodes", "1"]  # fmt: skip
    assert pvu(*args, "--stop-after", "1").exit_code == 0
    path = tmp_path / "run" / "checkpoint" / damaged.removesuffix(" gone")
    if damaged.endswith(" gone"):
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:100])
    result, seconds = timed_pvu(*args, "--resume")
    assert_actionable(
        result,
        seconds,
        f"cannot resume from {output}: its checkpoint is damaged",
        "another --output",
    )


@pytest.mark.parametrize(
    "written", ["checkpoint/episode-00001.safetensors", "checkpoint/state.json.tmp", "head.json"]
)
def test_a_full_disk_names_the_file_it_could_not_write(written: str, tmp_path: Path) -> None:
    cache, output = str(tmp_path / "cache"), tmp_path / "run"
    write_synthetic_cache(cache, SyntheticCache(dim=16, samples_per_shard=256, shards=1, epochs=1))
    full = output / written  # writes to /dev/full fail with ENOSPC, as on a full disk
    full.parent.mkdir(parents=True)
    full.symlink_to("/dev/full")
    result, seconds = timed_pvu(
        "train-head", "--cache", cache, "--output", str(output), "--episodes", "1",
        "--episode-size", "256", "--batch-size", "128", "--warmup-episodes", "0",
    )  # fmt: skip
    assert_actionable(result, seconds, f"write file://{full} failed", "No space left on device")
    assert not os.path.lexists(full), "what could not be written is removed (here: the link)"


def test_a_cache_whose_losses_are_all_equal_is_refused_naming_it(tmp_path: Path) -> None:
    """Sequencer's classifier starts at zero: with random weights every image gets the same
    loss, ln(1000), and a head would train on nothing to rank."""
    shard = write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=8, size=40)[0]
    cache = str(tmp_path / "cache")
    make_runner(cache, backbone="sequencer2d_s", size=64).run(Unit(shard, "digits-0000", 0))
    result, seconds = timed_pvu(
        "train-head", "--cache", cache, "--output", str(tmp_path / "h"), "--episodes", "1",
        "--episode-size", "16", "--batch-size", "8", "--warmup-episodes", "0",
    )  # fmt: skip
    assert_actionable(
        result, seconds, f"cache {cache}: every cached loss is 6.90776", "trained --weights"
    )


def test_a_validation_split_that_leaves_no_pair_to_train_on_is_refused(tmp_path: Path) -> None:
    """--val-fraction 0.99 of a 50-row cache trained on the one row left, silently."""
    cache, output = str(tmp_path / "cache"), tmp_path / "h"
    write_synthetic_cache(cache, SyntheticCache(dim=8, samples_per_shard=50, shards=1, epochs=1))
    args = ["train-head", "--cache", cache, "--output", str(output), "--episodes", "1",
            "--episode-size", "16", "--batch-size", "8", "--warmup-episodes", "0"]  # fmt: skip
    result, seconds = timed_pvu(*args, "--val-fraction", "0.99")
    assert_actionable(
        result,
        seconds,
        "--val-fraction 0.99 leaves 1 of the cache's 50 rows to train on",
        "lower --val-fraction",
    )
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not output.exists(), "refused before the output is made"
    assert pvu(*args, "--val-fraction", "0.5").exit_code == 0  # a batch and more


def test_a_cache_unit_rewritten_while_train_head_reads_it_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit another pvu cache run rewrote after train-head read its footer ended in pyarrow's
    words ("Couldn't deserialize thrift")."""
    cache, other = tmp_path / "cache", tmp_path / "other"
    spec = SyntheticCache(dim=8, samples_per_shard=256, shards=1, epochs=1, row_group_rows=64)
    write_synthetic_cache(str(cache), spec)
    write_synthetic_cache(str(other), dataclasses.replace(spec, row_group_rows=100, seed=1))
    unit = next(cache.glob("epoch=*/*.parquet"))
    indexed = train_module.check_memory

    def then_rewritten(*args: object, **kwargs: object) -> None:  # footers read: a unit rewritten
        indexed(*args, **kwargs)
        os.replace(shutil.copy(next(other.glob("epoch=*/*.parquet")), tmp_path / "new"), unit)

    monkeypatch.setattr(train_module, "check_memory", then_rewritten)
    result, seconds = timed_pvu(
        "train-head", "--cache", str(cache), "--output", str(tmp_path / "h"), "--episodes", "1",
        "--episode-size", "64", "--batch-size", "32", "--warmup-episodes", "0",
    )  # fmt: skip
    assert_actionable(
        result,
        seconds,
        f"cache unit {unit} was rewritten or removed after it was indexed",
        "then run the same train-head command again with --resume",
    )
    assert "thrift" not in result.output


@pytest.mark.parametrize("before", [False, True], ids=["pvu train-head -v", "pvu -v train-head"])
def test_traceback_only_under_verbose(tmp_path: Path, before: bool) -> None:
    """``-v`` after the command or before it (``pvu -v train-head`` was 'No such option: -v')."""
    missing = str(tmp_path / "no-such-cache")
    args = ["train-head", "--cache", missing, "--output", str(tmp_path / "h")]
    result, _ = timed_pvu(*(["-v", *args] if before else [*args, "-v"]))
    assert result.exit_code == 2 and "Traceback" in result.output, result.output
    assert f"--cache {missing} does not exist" in result.text
    quiet, _ = timed_pvu(*args)
    assert quiet.exit_code == 2 and "Traceback" not in quiet.output


@pytest.fixture
def no_credentials(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The moto endpoint stays set (nothing leaves 127.0.0.1), but no credentials anywhere."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_s3_without_credentials(no_credentials: None, tmp_path: Path) -> None:
    result, seconds = timed_pvu(
        "train-head", "--cache", "s3://bucket/cache", "--output", str(tmp_path)
    )
    assert_actionable(
        result,
        seconds,
        "--cache s3://bucket/cache: no credentials for s3://",
        "AWS_ACCESS_KEY_ID",
        "for a public bucket, FSSPEC_S3_ANON=true",
    )


@pytest.mark.slow
def test_s3_bucket_that_does_not_exist(s3_server: str, tmp_path: Path) -> None:
    shards = write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=4, size=32)
    result, seconds = timed_pvu(
        "cache", "--shards", shards[0], "--output", "s3://no-such-bucket/cache",
        *SMALL_BACKBONE_FLAGS,
    )  # fmt: skip
    assert_actionable(
        result, seconds, "--output s3://no-such-bucket/cache: bucket no-such-bucket does not exist"
    )


@pytest.mark.slow
def test_an_output_inside_a_cache_is_refused_before_any_work(
    s3_bucket: str, tmp_path: Path
) -> None:
    """`--output` (train-head) or `--report` (evaluate) at or under a cache was taken: the
    head, checkpoints and report landed among the cache's units, where pyarrow's dataset of
    the cache's folder (as the README reads one) then failed on `head.safetensors`; and a
    cache written inside another became rows of the outer one to that reader."""
    cache = f"{s3_bucket}/caches/eval"
    write_synthetic_cache(cache, SyntheticCache(dim=8, samples_per_shard=64, shards=1, epochs=1))
    bucket = s3_bucket.removeprefix("s3://")
    before = sorted(s3fs.S3FileSystem().find(bucket))
    train = ["train-head", "--cache", cache, "--episodes", "1", "--warmup-episodes", "0"]
    for output in (cache + "/", f"s3a://{bucket}/caches/eval/heads/h1"):
        result, seconds = timed_pvu(*train, "--output", output)
        assert_actionable(result, seconds, f"--output {output} is inside --cache {cache}")
    result, seconds = timed_pvu("evaluate", "--dataset", f"d={cache}", "--report", cache)
    assert_actionable(result, seconds, f"--report {cache} is inside --dataset d={cache}")
    shards = write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=4, size=32)
    nested = f"{cache}/by-resnet"
    result, seconds = timed_pvu(
        "cache", "--shards", shards[0], "--output", nested, *SMALL_BACKBONE_FLAGS
    )
    assert_actionable(result, seconds, f"--output {nested} is inside the cache {cache}")
    assert sorted(s3fs.S3FileSystem().find(bucket)) == before
    # beside the cache (a name it starts with, too) is outside it
    assert timed_pvu(*train, "--output", f"{cache}-heads/h1")[0].exit_code == 0


@pytest.mark.slow
def test_an_output_at_or_inside_another_cache_is_refused(s3_bucket: str) -> None:
    """A train-head `--output` or evaluate `--report` at or under a cache the run does not read
    was taken: its head, checkpoints or report landed among that cache's units."""
    spec = SyntheticCache(dim=8, samples_per_shard=64, shards=1, epochs=1)
    read, other = f"{s3_bucket}/caches/read", f"{s3_bucket}/caches/other"
    write_synthetic_cache(read, spec)
    write_synthetic_cache(other, spec)
    before = sorted(s3fs.S3FileSystem().find(s3_bucket))
    train = ["train-head", "--cache", read, "--episodes", "1", "--warmup-episodes", "0"]
    result, seconds = timed_pvu(*train, "--output", other)
    assert_actionable(result, seconds, f"--output {other} is the cache {other}")
    report = f"{other}/report"
    result, seconds = timed_pvu("evaluate", "--dataset", f"d={read}", "--report", report)
    assert_actionable(result, seconds, f"--report {report} is inside the cache {other}")
    assert sorted(s3fs.S3FileSystem().find(s3_bucket)) == before


@pytest.mark.parametrize("where", ["the shards' folder", "a folder above it"])
@pytest.mark.parametrize("command", ["cache", "plan"])
def test_an_output_that_holds_the_shards_is_refused_before_any_work(
    tmp_path: Path, where: str, command: str
) -> None:
    """`--output` at (or above) the shards' folder was taken: the units were written among
    the tars, and pyarrow's dataset of the cache's folder (as the README reads one) then
    failed with 'Could not open Parquet input source .../digits-0000.tar'."""
    shards = tmp_path / "data" / "shards"
    write_digit_shards(str(shards), shards=2, per_shard=2, size=32)
    output = shards if where == "the shards' folder" else tmp_path / "data"
    before = sorted(p.name for p in shards.iterdir())
    for spec in (str(shards), f"{shards}/digits-{{0000..0001}}.tar"):
        result, seconds = timed_pvu(
            command, "--shards", spec, "--output", f"{output}/", *SMALL_BACKBONE_FLAGS
        )
        assert_actionable(
            result, seconds, f"--output {output} holds the shards it would read", "beside"
        )
    assert sorted(p.name for p in shards.iterdir()) == before  # no lock, no unit
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["shards"]
    # a folder beside the shards (a name they start with, too) is apart from them
    from jobs.run.cache import check_outputs_apart_from_shards
    from jobs.run.cache_config import CacheJobConfig

    beside = CacheJobConfig(shards=str(shards), output=f"{shards}-cache", backbone="resnet10t")
    check_outputs_apart_from_shards(beside, [str(shards / "digits-0000.tar")])


def test_an_empty_output_is_refused_not_taken_for_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--output ""` (an unset variable in a script: `--output "$OUT"`), or an `--also`
    target's empty output, was made absolute as the working folder, and the cache (or pvu
    shards' tars) written there; `--output " out"` made a folder named ' out' in it."""
    shards = write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=2, size=32)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    cache = ["cache", "--shards", shards[0], *SMALL_BACKBONE_FLAGS]
    to_shards = ["shards", "--input", str(tmp_path / "shards"), "--output"]
    for args, said in (
        ([*cache, "--output", ""], "--output: '' is empty"),
        ([*cache, "--output", " c"], "--output: ' c' starts or ends with a space"),
        ([*cache, "--output", "c", "--also", "resnet18,random,"], "--also: '' is empty"),
        ([*to_shards, ""], "--output: '' is empty"),
        ([*to_shards, "s "], "--output: 's ' starts or ends with a space"),
    ):  # every job's: tests/test_config.py::test_every_path_flag_refuses_an_empty_or_space_...
        result, seconds = timed_pvu(*args)
        assert_actionable(result, seconds, said)
    assert not list((tmp_path / "cwd").iterdir())


def test_an_also_target_inside_the_output_is_refused_on_the_first_run_too(
    tmp_path: Path,
) -> None:
    """`--also` nested in `--output` was taken on the first run (one cache written inside the
    other), then the same command, run again to resume, was refused as inside the cache."""
    from jobs.run.cache import check_outputs
    from jobs.run.cache_config import CacheJobConfig

    shard = write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=2, size=32)[0]
    for output, also in (("c", "c/r18"), ("c/r18", "c")):
        config = CacheJobConfig(
            shards=shard,
            output=str(tmp_path / output),
            backbone="resnet10t",
            weights="random",
            also=[f"resnet18,random,{tmp_path / also}"],
        )
        inner, outer = sorted([config.output, config.also[0].output], key=len, reverse=True)
        with pytest.raises(UserError, match=f" {inner} is inside --(output|also) {outer}: one"):
            check_outputs(config)
        assert not (tmp_path / "c").exists()
    apart = config.model_copy(update={"output": str(tmp_path / "c-resnet10t")})
    check_outputs(apart)  # a name the other starts with is beside it


@pytest.mark.parametrize("store", ["local", "s3"])
def test_an_output_that_holds_another_cache_is_refused(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """`--output runs` with `runs/exp/vit_b` a cache was taken: its units were written beside
    the other's, and a Parquet reader of `runs` read both; an output inside a cache was already
    refused."""
    from jobs.run.cache import check_outputs
    from jobs.run.cache_config import CacheJobConfig

    root = request.getfixturevalue("s3_bucket") if store == "s3" else str(tmp_path)
    held = f"{root}/runs/epoch=best/vit_b"  # only epoch=<number> folders go unlisted
    write_synthetic_cache(held, SyntheticCache(dim=8, samples_per_shard=8, shards=1, epochs=1))
    shard = write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=2, size=32)[0]
    config = CacheJobConfig(shards=shard, output=held, backbone="resnet10t", weights="random")
    for output in (f"{root}/runs", f"{root}/runs/epoch=best/"):
        with pytest.raises(
            UserError, match=re.escape(f"--output {output} holds the cache {held}: ")
        ):
            check_outputs(config.model_copy(update={"output": output}))
    check_outputs(config)  # the cache itself, run again to resume or extend it
    check_outputs(config.model_copy(update={"output": f"{root}/runs/epoch=best-2"}))


def test_looking_for_caches_under_an_output_lists_a_bounded_number_of_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An --output at a bucket's top, thousands of folders, cost a listing of each and of
    each of theirs before the run started."""
    from jobs import preflight
    from pipeline.cache import verify

    for index in range(300):
        (tmp_path / f"run-{index:03d}" / "exp").mkdir(parents=True)
    listed: list[str] = []
    real = verify.list_folder
    monkeypatch.setattr(
        verify, "list_folder", lambda fs, path: listed.append(path) or real(fs, path)
    )
    preflight.check_holds_no_cache(str(tmp_path), flag="--output")
    assert len(listed) == verify.NESTED_CACHE_LISTINGS
    assert listed[0] == str(tmp_path)  # nearest first


@pytest.mark.slow
def test_s3_access_denied(s3_bucket: str, fault_proxy, tmp_path: Path) -> None:
    bucket = s3_bucket.removeprefix("s3://")
    fault_proxy.deny(f"/{bucket}", kind="deny")
    result, seconds = timed_pvu(
        "train-head", "--cache", f"{s3_bucket}/cache", "--output", str(tmp_path)
    )
    assert_actionable(result, seconds, f"access to bucket {bucket} denied")


@pytest.mark.slow
def test_gpus_asked_for_on_a_cluster_without_any(tmp_path: Path) -> None:
    start_local_ray(num_cpus=2)
    try:
        shards = write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=4, size=32)
        result, seconds = timed_pvu(
            "cache", "--shards", shards[0], "--output", str(tmp_path / "c"),
            *SMALL_BACKBONE_FLAGS, "--gpus-per-actor", "1",
        )  # fmt: skip
    finally:
        ray.shutdown()
    assert_actionable(result, seconds, "--gpus-per-actor 1 asks for GPUs", "--gpus-per-actor 0")


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("job", JOBS)
def test_every_job_runs_as_python_dash_m(job: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [f"jobs/{job}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(f"jobs.{job}", run_name="__main__")
    assert exit_info.value.code in (0, None)


@pytest.mark.slow
def test_python_dash_m_jobs_cli_is_pvu() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "jobs.cli"]
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.startswith("pvu "), version.stderr
    listing = subprocess.run([*command, "--help"], capture_output=True, text=True, env=env)
    assert listing.returncode == 0
    for command_name in ("cache", "train-head", "evaluate", "shards", "info"):
        assert command_name in listing.stdout


@pytest.mark.parametrize(
    ("command", "args", "run", "next_step"),
    [
        (
            "cache",
            ["--shards", "s", "--backbone", "resnet10t", "--output", "o"],
            "run_cache",
            "committed units are kept; the same command resumes",
        ),
        (
            "train-head",
            ["--cache", "c", "--output", "o"],
            "run_train_head",
            "the same command with --resume continues from the last episode's checkpoint (from "
            "the start where none was written yet)",
        ),
        ("evaluate", ["--dataset", "d=c"], "run_evaluate", None),
        ("shards", ["--input", "i", "--output", "o"], "run_shards", "run the same command again"),
    ],
    ids=["cache", "train-head", "evaluate", "shards"],
)
def test_ctrl_c_or_sigterm_ends_a_job_with_one_line_that_says_how_to_go_on(
    command: str, args: list[str], run: str, next_step: str | None, monkeypatch
) -> None:
    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    name = command.replace("-", "_")
    module = importlib.import_module("jobs.shards" if name == "shards" else f"jobs.run.{name}")
    monkeypatch.setattr(module, run, interrupted)
    result = pvu(command, *args)
    assert result.exit_code == 130, result.output
    expected = f"{command}: interrupted" + (f"; {next_step}" if next_step else "")
    assert expected in result.text and "Traceback" not in result.output

    def terminated(*_args: object, **_kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # ray job stop, a pod evicted
        time.sleep(5)

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(module, run, terminated)
    result = pvu(command, *args)
    assert result.exit_code == 143, result.output
    assert expected.replace("interrupted", "terminated") in result.text
    assert signal.getsignal(signal.SIGTERM) is handler, "the job's handler outlived the job"


def closed_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago: nothing listens there."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_ray_address_where_nothing_listens_is_refused_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A --ray-address with no cluster behind it (a typo, a stopped head) was retried by Ray
    for minutes (7 by hand) before any word."""
    from jobs.run.ray_address import connect_ray

    port = closed_port()

    def retried_for_minutes(**options: object) -> None:
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", retried_for_minutes)
    address = f"127.0.0.1:{port}"
    with pytest.raises(ConnectionError) as refused:
        connect_ray(address)
    said = str(refused.value)
    assert said.startswith(f"--ray-address {address}: no Ray cluster found there"), said
    assert "leave the address out for a local Ray" in said


def test_a_ray_address_that_answers_but_is_not_joined_says_why(monkeypatch) -> None:
    """A cluster that refuses the driver's token (Ray's token authentication) or a port of
    another server: Ray logs InvalidAuthToken and raises 'Failed to connect', which read 'no
    Ray cluster found there; start one' of a running cluster."""
    from jobs.run.ray_address import connect_ray

    def refused(**options: object) -> None:
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:1. Please check")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    with socket.socket() as server:  # something that answers on the address
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(ConnectionError) as failed:
            connect_ray(address)
    said = str(failed.value)
    assert said.startswith(f"--ray-address {address}: something answers there"), said
    assert "RAY_AUTH_TOKEN" in said and "6379" in said


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "127.0.0.1:", "127.0.0.1:port", ":6379", "127.0.0.1:99999"]
)
@pytest.mark.parametrize("given", ["--ray-address", "RAY_ADDRESS"])
def test_a_ray_address_that_is_no_host_and_port_is_named(
    monkeypatch: pytest.MonkeyPatch, address: str, given: str
) -> None:
    """A Ray address without a port, or with one that is no port number, ended the job with
    Ray's 'Invalid address format: 127.0.0.1' or 'Unable to parse port number from port',
    naming neither the flag nor RAY_ADDRESS nor the form to give; ':6379' was looked up as a
    host name."""
    from jobs.run.ray_address import connect_ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **options: pytest.fail("ray.init was called"))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("connected"))
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ValueError) as refused:
        connect_ray(address if given == "--ray-address" else None)
    said = str(refused.value)
    assert said.startswith(f"{given} {address}: not a Ray cluster's address; give HOST:PORT")


def test_ray_address_local_starts_pvus_local_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """`local`, Ray's word for a new local Ray, went to ray.init as it was: a Ray not bound
    to 127.0.0.1 as pvu's own local Ray is."""
    import jobs.run.ray_address as ray_address

    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **options: pytest.fail("ray.init was called"))
    monkeypatch.setattr(ray_address, "start_local_ray", lambda **k: started.append(k))
    monkeypatch.setenv("RAY_ADDRESS", "local")
    ray_address.connect_ray(None)
    ray_address.connect_ray("local")
    assert len(started) == 2


def no_ray_found_by_auto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Ray's ``auto`` sees no Ray running on this machine (this suite's own, say) and looks for
    its address file under ``tmp_path``; ``ray.init`` must not be reached. The file's path."""
    from ray._private import services

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setattr(services, "find_gcs_addresses", frozenset)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **options: pytest.fail("ray.init was called"))
    return tmp_path / "ray" / "ray_current_cluster"


def test_a_ray_address_with_no_cluster_names_pvus_flag(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Ray's own words named its `--address` flag, which pvu does not have: `auto` finding no
    address at all is said in pvu's words, naming pvu's flag or RAY_ADDRESS."""
    from jobs.run.ray_address import connect_ray

    no_ray_found_by_auto(monkeypatch, tmp_path)
    for address, flag in (("auto", "--ray-address auto"), (None, "RAY_ADDRESS auto")):
        monkeypatch.setenv("RAY_ADDRESS", "auto")
        with pytest.raises(ConnectionError) as refused:
            connect_ray(address)
        said = str(refused.value)
        assert said.startswith(f"{flag}: no Ray cluster found there (Could not find any running")
        assert "leave the address out for a local Ray" in said and "`--address`" not in said


def test_auto_finding_a_stale_address_file_names_it_and_ray_stop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A cluster stopped without `ray stop` leaves its address in Ray's address file, where
    `auto` finds it; Ray then retried the dead address for minutes."""
    from jobs.run.ray_address import connect_ray

    file = no_ray_found_by_auto(monkeypatch, tmp_path)
    file.parent.mkdir()
    address = f"127.0.0.1:{closed_port()}"
    file.write_text(address)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = time.monotonic()
    with pytest.raises(ConnectionError) as refused:
        connect_ray("auto")
    assert time.monotonic() - started < 15
    said = str(refused.value)
    assert said.startswith(f"--ray-address auto ({address}, from {file}): no Ray cluster found")
    assert "run `ray stop` to clear it" in said and "ray start --head" in said


@pytest.mark.slow
@pytest.mark.parametrize("given", ["auto", "the address"])
def test_a_dead_ray_address_fails_the_real_command_within_seconds(
    given: str, tmp_path: Path
) -> None:
    """`pvu cache --ray-address auto` with `$RAY_ADDRESS` left from a cluster that is gone (or
    that address given itself): Ray retried it for minutes (over 5, measured) before a
    confusing error; now exit 2 within seconds, naming the address and where it came from."""
    write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=2, size=32)
    address = f"127.0.0.1:{closed_port()}"
    flag = "auto" if given == "auto" else address
    command = [sys.executable, "-m", "jobs.cli", "cache", "--shards", str(tmp_path / "shards")]
    command += ["--output", str(tmp_path / "cache"), "--ray-address", flag, *SMALL_BACKBONE_FLAGS]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": address}
    env["RAY_TMPDIR"] = str(tmp_path)  # no address file of another Ray on this machine
    started = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=90)
    seconds = time.monotonic() - started
    said = " ".join(run.stderr.split() + run.stdout.split())
    assert run.returncode == 2, said
    assert seconds < 60, f"took {seconds:.0f} s"
    named = f"auto ({address}, from $RAY_ADDRESS)" if given == "auto" else address
    assert f"--ray-address {named}: no Ray cluster found there" in said, said
    assert "ray start --head" in said and "Traceback" not in said


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--also-deteriorate", "blur:0.5"], "--also-deteriorate takes KIND:STRENGTH,OUTPUT"),
        (["--also-deteriorate", "blurr:0.5,d"], "KIND one of blur, box, zoom, noise"),
        (["--also-deteriorate", "blur:1.5,d"], "'blur:1.5': strength must be in [0, 1]"),
        (["--also-deteriorate", "blur:0.5,c"], "c is the output of two caches of this run"),
        (["--also-deteriorate", "blur:0.5,d", "--also-deteriorate", "box:1,d"], "d is the output"),
        (["--also-deteriorate", "blur:0.5,d", "--also", "resnet14t,random,d"], "d is the output"),
        (
            ["--also-deteriorate", "box:1,d", "--also-deteriorate", "box:1.0,e"],
            "box:1 is given twice",
        ),
        (["--also-deteriorate", "box:1,d", "--deteriorate", "box:1"], "box:1 is given twice"),
        (["--also-deteriorate", "box:1,c/d"], "is inside --output"),
        (["--also-deteriorate", "blur:0.5,d", "--decode", "device"], "drop --decode device"),
    ],
)
def test_also_deteriorate_refuses_what_deteriorate_refuses_and_an_output_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], said: str
) -> None:
    """--also-deteriorate KIND:STRENGTH,OUTPUT adds a cache --deteriorate KIND:STRENGTH
    --output OUTPUT would write: what --deteriorate refuses, it refuses; and each cache of
    the pass needs an output of its own."""
    shard = write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=2, size=32)[0]
    monkeypatch.chdir(tmp_path)
    cache = ["cache", "--shards", shard, "--output", "c", *SMALL_BACKBONE_FLAGS]
    result, seconds = timed_pvu(*cache, "--augment", "eval", *flags)
    assert_actionable(result, seconds, said)
    assert sorted(os.listdir(tmp_path)) == ["shards"]  # no cache, no lock


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--also", "resnet18", "--also takes BACKBONE,WEIGHTS,OUTPUT"),
        ("--deteriorate", "blur", "--deteriorate 'blur': expected KIND:STRENGTH"),
        ("--also-deteriorate", "blur:0.5", "--also-deteriorate takes KIND:STRENGTH,OUTPUT"),
        ("--also-deteriorate", "blurr:0.5,d", "--also-deteriorate 'blurr:0.5': expected"),
        ("--image-key", ".", "--image-key '.' names no file extension"),
    ],
)
def test_a_malformed_value_names_its_flag_once(
    tmp_path: Path, flag: str, value: str, said: str
) -> None:
    """A parser's message that names its flag itself was prefixed with the flag again
    ("--also-deteriorate: --also-deteriorate takes ...")."""
    cache = ["cache", "--shards", str(tmp_path), "--output", str(tmp_path / "c")]
    result, seconds = timed_pvu(*cache, *SMALL_BACKBONE_FLAGS, "--augment", "eval", flag, value)
    assert_actionable(result, seconds, said)
    assert unboxed(result.text).count(flag) == 1, result.output


def test_also_deteriorate_needs_the_eval_transform_as_deteriorate_does(tmp_path: Path) -> None:
    shard = write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=2, size=32)[0]
    cache = ["cache", "--shards", shard, "--output", str(tmp_path / "c"), *SMALL_BACKBONE_FLAGS]
    for flag, value in (("--deteriorate", "blur:0.5"), ("--also-deteriorate", "blur:0.5,d")):
        result, seconds = timed_pvu(*cache, flag, value)  # --augment train, the default
        assert_actionable(
            result, seconds, f"{flag} applies to the eval transform: add --augment eval"
        )
