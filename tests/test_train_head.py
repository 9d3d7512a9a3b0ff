"""Training the head end to end: it learns, checkpoints without pickle, resumes exactly, CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import typer
from rich.console import Console
from support import make_runner, unboxed, unit_settings
from typer.testing import CliRunner

import pipeline.head.train as train_module
from jobs import terminal
from jobs.run.train_head import TrainHeadConfig
from jobs.train_head import train_head
from pipeline.cache.deteriorate import Deterioration
from pipeline.cache.index import open_cache
from pipeline.cache.lock import RunLock
from pipeline.cache.unit import Unit, UnitRunner
from pipeline.demo.data import write_digit_shards
from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache
from pipeline.head.checkpoint import _provenance_differences
from pipeline.head.export import load_head
from pipeline.head.rows import key_fraction
from pipeline.head.stream import StreamConfig
from pipeline.head.train import (
    RunOptions,
    ScheduleConfig,
    TrainConfig,
    cpu_has_fast_bf16,
    fit_head,
    training_rows,
)
from schemas import leaf_column, validate_head

SPEC = SyntheticCache(dim=32, samples_per_shard=500, shards=4, epochs=3, row_group_rows=125)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("cache") / "synthetic")
    write_synthetic_cache(url, SPEC)
    return url


def _config(loss: str = "ranking", episodes: int = 6, seed: int = 0) -> TrainConfig:
    return TrainConfig(
        hidden=(64, 64),
        loss=loss,  # type: ignore[arg-type]
        schedule=ScheduleConfig(
            episodes=episodes, episode_size=3000, batch_size=256, warmup_episodes=1
        ),
        stream=StreamConfig(seed=seed, shuffle_rows=1000, val_fraction=0.2),
        val_rows=2000,
    )


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("loss", "precision"), [("ranking", "fp32"), ("l2", "fp32"), ("ranking", "bf16")]
)
def test_head_learns_to_rank_held_out_rows(
    cache: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, loss: str, precision: str
) -> None:
    config = dataclasses.replace(_config(loss), precision=precision)
    with caplog.at_level(logging.WARNING, logger="pipeline.head.train"):
        result = fit_head([cache], str(tmp_path), config)
    emulated = precision == "bf16" and not cpu_has_fast_bf16()  # an AVX2 CPU: ~12x slower
    assert ("no native bfloat16" in caplog.text) == emulated, caplog.text
    untrained, trained = result.metrics[0], result.metrics[-1]
    assert untrained["episode"] == 0 and trained["episode"] == 6
    assert abs(untrained["val_pair_accuracy"] - 0.5) < 0.15
    assert trained["val_pair_accuracy"] > 0.85, trained
    assert trained["val_spearman"] > 0.85, trained
    assert trained["val_rows"] > 1000
    lines = _metrics(tmp_path)
    assert [line["episode"] for line in lines] == list(range(7))
    assert {"train_loss", "lr", "val_pair_accuracy", "val_spearman"} <= set(lines[-1])
    doc = json.loads((tmp_path / "head.json").read_text())
    validate_head(doc)
    assert doc["loss"] == loss and doc["backbone"] == SPEC.backbone and doc["embedding_dim"] == 32


def test_a_head_trained_on_a_cache_still_being_written_records_it(
    cache: str, tmp_path: Path
) -> None:
    """head.json named the caches but not that one was still being written when read: the
    head learned from part of it, and only the run's log had said so."""
    with RunLock(cache, owner="pvu cache --output synthetic"):
        fit_head([cache], str(tmp_path), _config(episodes=2))
    training = json.loads((tmp_path / "head.json").read_text())["training"]
    assert "still being written, by run" in training["incomplete_caches"][cache]
    fit_head([cache], str(tmp_path / "whole"), _config(episodes=2))
    assert (
        "incomplete_caches"
        not in json.loads((tmp_path / "whole" / "head.json").read_text())["training"]
    )


def _training_rows(cache: str, val_fraction: float) -> int:
    """Rows of ``cache`` outside the validation slice with a finite loss, by their keys."""
    table = pa.concat_tables(
        pq.read_table(path, columns=["key", "loss"])
        for path in Path(cache).glob("epoch=*/*.parquet")
    )
    finite = np.isfinite(table.column("loss").to_numpy())
    return int(((key_fraction(table.column("key")) >= val_fraction) & finite).sum())


@pytest.fixture
def nan_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A cache whose every 50th row of each batch written has a NaN loss (2%)."""
    import pipeline.demo.synthetic as synthetic

    written = synthetic.to_record_batch

    def some_losses_nan(schema: pa.Schema, **kw: Any) -> pa.RecordBatch:
        loss = kw["outputs"]["loss"].copy()
        loss[::50] = np.nan
        return written(schema, **{**kw, "outputs": {**kw["outputs"], "loss": loss}})

    monkeypatch.setattr(synthetic, "to_record_batch", some_losses_nan)
    url = str(tmp_path / "nan")
    write_synthetic_cache(url, SPEC)
    return url


def test_metrics_count_passes_and_warn_when_views_repeat(
    cache: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Passes count the rows the split leaves to train on: 4,731 here, where the share of
    6,000 rows, 4,800, gave 0.83 passes for 0.85."""
    rows = _training_rows(cache, 0.2)
    assert rows == 4731
    short = _config(episodes=2)
    short = dataclasses.replace(
        short, schedule=dataclasses.replace(short.schedule, episode_size=2000)
    )
    with caplog.at_level(logging.INFO, logger="pipeline.head.train"):
        fit_head([cache], str(tmp_path / "short"), short)
    assert "0.85 passes over ~4,731 training rows" in caplog.text
    assert not [r for r in caplog.records if r.levelno == logging.WARNING], "no view repeats"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.head.train"):
        fit_head([cache], str(tmp_path / "long"), _config(episodes=3))
    lines = _metrics(tmp_path / "long")
    assert lines[0]["schedule_passes"] == pytest.approx(9000 / rows, abs=1e-4)
    assert [line["passes"] for line in lines] == pytest.approx(
        [0.0, 3000 / rows, 6000 / rows, 9000 / rows], abs=1e-4
    )
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "1.90 passes over the cache" in warning[0].getMessage()
    assert "3 augmented epochs" in warning[0].getMessage()
    assert "one pass is ~4,731)" in warning[0].getMessage()  # how far to shorten it
    doc = json.loads((tmp_path / "long" / "head.json").read_text())
    assert doc["training"]["cached_epochs"] == 3
    assert doc["training"]["passes"] == pytest.approx(9000 / rows, abs=1e-4)


def test_passes_count_only_the_rows_training_uses(
    nan_cache: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows with a NaN loss are dropped by the stream, so a pass is that much shorter: counting
    them (2% here) gave passes ~2% low."""
    rows = _training_rows(nan_cache, 0.2)
    with caplog.at_level(logging.INFO, logger="pipeline.head.train"):
        fit_head([nan_cache], str(tmp_path), _config(episodes=2))
    assert f"passes over ~{rows:,} training rows" in caplog.text
    lines = _metrics(tmp_path)
    assert lines[-1]["nonfinite_rows"] > 0
    assert [line["passes"] for line in lines] == pytest.approx(
        [0.0, 3000 / rows, 6000 / rows], abs=1e-4
    )


def test_rows_left_out_for_their_loss_are_not_blamed_on_the_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache of NaN losses was refused as '--val-fraction 0 leaves 0 of the cache's rows':
    lower --val-fraction, which cannot go lower and brings no row back. It is refused as it
    opens, for its losses."""
    import pipeline.demo.synthetic as synthetic

    written = synthetic.to_record_batch

    def losses_nan(schema: pa.Schema, **kw: Any) -> pa.RecordBatch:
        loss = np.full_like(kw["outputs"]["loss"], np.nan)
        return written(schema, **{**kw, "outputs": {**kw["outputs"], "loss": loss}})

    monkeypatch.setattr(synthetic, "to_record_batch", losses_nan)
    write_synthetic_cache(str(tmp_path / "nan"), SPEC)
    config = _config(episodes=2)
    config = dataclasses.replace(config, stream=dataclasses.replace(config.stream, val_fraction=0))
    with pytest.raises(ValueError, match=r"no cached loss is finite") as refused:
        training_rows(open_cache([str(tmp_path / "nan")]), config)
    assert "--val-fraction" not in str(refused.value)


def test_a_handful_of_validation_rows_is_warned_about(
    cache: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cache of ~100 rows at --val-fraction 0.01 validated on a row or none, silently."""
    config = _config(episodes=2)
    config = dataclasses.replace(
        config,
        schedule=dataclasses.replace(config.schedule, episode_size=512),
        stream=dataclasses.replace(config.stream, val_fraction=0.002),
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.head.train"):
        fit_head([cache], str(tmp_path), config)
    assert "validation rows (--val-fraction 0.002 of 6,000 rows)" in caplog.text
    caplog.clear()
    none = dataclasses.replace(config, stream=dataclasses.replace(config.stream, val_fraction=0))
    with caplog.at_level(logging.WARNING, logger="pipeline.head.train"):
        fit_head([cache], str(tmp_path / "none"), none)
    assert "--val-fraction 0: no validation rows, so no validation metrics" in caplog.text


def test_val_rows_0_warns_that_the_slice_is_held_out_unvalidated(
    cache: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--val-rows 0 turned validation off silently, while the --val-fraction slice stayed out
    of training: rows neither trained nor validated on."""
    config = dataclasses.replace(_config(episodes=2), val_rows=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.head.train"):
        result = fit_head([cache], str(tmp_path), config)
    assert "--val-rows 0: no validation metrics, yet the --val-fraction 0.2 slice" in caplog.text
    assert result.metrics[-1]["val_rows"] == 0


def test_resume_without_a_checkpoint_warns_that_it_starts_afresh(
    cache: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mistyped --output (or a checkpoint folder not copied) under --resume trained from the
    start, said only at info level."""
    with caplog.at_level(logging.WARNING, logger="pipeline.head.train"):
        fit_head([cache], str(tmp_path / "typo"), _config(episodes=2), RunOptions(resume=True))
    assert f"--resume: no checkpoint in {tmp_path / 'typo'}; training from the start" in (
        caplog.text
    )


def test_refuses_caches_of_different_embedding_dtypes(cache: str, tmp_path: Path) -> None:
    wide = str(tmp_path / "float32")
    write_synthetic_cache(wide, dataclasses.replace(SPEC, shards=1, dtype="float32"))
    with pytest.raises(ValueError, match="different dtypes") as error:
        fit_head([cache, wide], str(tmp_path / "run"), _config())
    assert f"float16 in {cache}" in str(error.value) and f"float32 in {wide}" in str(error.value)
    single = fit_head([wide], str(tmp_path / "run32"), _config(episodes=2))
    assert single.export is not None and single.export["input_dtype"] == "float32"


def test_training_runs_without_tf32(cache: str, tmp_path: Path, tf32_on) -> None:
    """A head trained on a GPU ran its float32 steps as the process said: TF32 in NVIDIA's
    containers, so --device cuda trained another head than the CPU. Checked by the settings
    the steps run under (a CPU computes no TF32)."""
    seen = set()
    options = RunOptions(on_batch=lambda n: seen.add(tf32_on()), stop_after=1)
    fit_head([cache], str(tmp_path), _config(episodes=2), options)
    assert seen == {("ieee", "ieee")} and tf32_on() == ("tf32", "tf32")


def test_checkpoints_hold_no_pickle(cache: str, tmp_path: Path) -> None:
    fit_head([cache], str(tmp_path), _config(episodes=3), RunOptions(stop_after=1))
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert files == ["episode-00001.safetensors", "state.json"]
    assert not (tmp_path / "head.json").exists(), "an unfinished run exports nothing"
    with pytest.raises(ValueError, match="already holds a training run"):
        fit_head([cache], str(tmp_path), _config(episodes=3))


def test_an_exported_head_without_its_run_is_not_overwritten(cache: str, tmp_path: Path) -> None:
    """A head copied into --output (no checkpoint beside it) was replaced without a word."""
    fit_head([cache], str(tmp_path / "run"), _config(episodes=2))
    kept = tmp_path / "kept"
    kept.mkdir()
    for name in ("head.json", "head.safetensors"):
        shutil.copy(tmp_path / "run" / name, kept)
    before = (kept / "head.safetensors").read_bytes()
    for options in (RunOptions(), RunOptions(resume=True)):
        with pytest.raises(ValueError, match=r"holds an exported head \(head.json\) and no"):
            fit_head([cache], str(kept), _config(episodes=2, seed=1), options)
    assert (kept / "head.safetensors").read_bytes() == before


def test_a_run_not_finished_given_as_a_head_says_to_resume_it(cache: str, tmp_path: Path) -> None:
    """The --output of a run stopped before its last episode (killed, preempted) given to
    `pvu evaluate --head` or `attach_head` was called no head export and the user told to give
    the folder `pvu train-head --output` wrote, which it was."""
    fit_head([cache], str(tmp_path), _config(episodes=3), RunOptions(stop_after=1))
    with pytest.raises(ValueError, match=r"has not finished.*same `pvu train-head` command and "):
        load_head(str(tmp_path))
    finished = tmp_path / "finished"  # its export then lost: it was said not to have finished
    fit_head([cache], str(finished), _config(episodes=2))
    (finished / "head.safetensors").unlink()
    with pytest.raises(ValueError, match=r"that finished, but its head export .* missing"):
        load_head(str(finished))
    (finished / "head.safetensors").write_bytes(b"\x10\x00\x00")  # cut short: no --resume said
    with pytest.raises(ValueError, match=r"not a valid .*export .* cut short: write it again"):
        load_head(str(finished))
    fit_head([cache], str(finished), _config(episodes=2), RunOptions(resume=True))
    load_head(str(finished))  # as the message says: the same command and --resume


def test_pvu_evaluate_given_a_run_not_finished_says_to_resume_it(
    cache: str, tmp_path: Path
) -> None:
    """`pvu evaluate --head` checks a local head folder before the work, and said of such a
    run's --output only "is not an exported head (no head.json in it)"."""
    from jobs.cli import app

    fit_head([cache], str(tmp_path), _config(episodes=3), RunOptions(stop_after=1))
    report = str(tmp_path / "report")
    args = ["evaluate", "--head", str(tmp_path), "--dataset", f"d={cache}", "--report", report]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    said = unboxed(result.output)
    assert f"{tmp_path} holds a training run that has not finished" in said, result.output
    assert "same `pvu train-head` command and --resume" in said


def test_a_run_named_like_a_glob_keeps_to_its_own_checkpoints(cache: str, tmp_path: Path) -> None:
    """Old checkpoints were globbed under the unescaped --output: run[1] removed run1's."""
    other = tmp_path / "run1" / "checkpoint" / "episode-00007.safetensors"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"another run's tensors")
    fit_head([cache], str(tmp_path / "run[1]"), _config(episodes=3), RunOptions(stop_after=2))
    assert other.exists()
    mine = sorted(p.name for p in (tmp_path / "run[1]" / "checkpoint").iterdir())
    assert mine == ["episode-00002.safetensors", "state.json"]


def test_resumed_run_ends_with_the_same_head(
    cache: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(episodes=4, seed=3)
    straight = fit_head([cache], str(tmp_path / "straight"), config)
    parted = str(tmp_path / "parted")
    first = fit_head([cache], parted, config, RunOptions(stop_after=2))
    assert not first.finished and first.episodes == 2
    third = fit_head([cache], parted, config, RunOptions(stop_after=3, resume=True))
    assert (third.episodes, len(third.metrics)) == (3, 1)
    with caplog.at_level(logging.WARNING, logger="pipeline.head.train"):
        again = fit_head([cache], parted, config, RunOptions(stop_after=2, resume=True))
    assert (again.finished, again.episodes, again.metrics) == (False, 3, []), "nothing to redo"
    assert "--stop-after 2: the run already trained 3 of 4 episodes" in caplog.text  # was silent
    resumed = fit_head([cache], parted, config, RunOptions(resume=True))
    assert resumed.finished
    for (name, a), (_, b) in zip(
        straight.head.state_dict().items(), resumed.head.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    a_lines = _metrics(tmp_path / "straight")
    b_lines = _metrics(tmp_path / "parted")
    assert [line["episode"] for line in b_lines] == [0, 1, 2, 3, 4]
    for a, b in zip(a_lines, b_lines, strict=True):
        assert a.get("train_loss") == b.get("train_loss")
        assert a["val_pair_accuracy"] == b["val_pair_accuracy"]
    head, _ = load_head(str(tmp_path / "parted"))
    x = torch.randn(5, SPEC.dim)
    assert torch.equal(head(x), straight.head.eval()(x))


def test_a_resumed_run_counts_the_nonfinite_rows_an_uninterrupted_one_does(
    nan_cache: str, tmp_path: Path
) -> None:
    """metrics.jsonl's ``nonfinite_rows`` goes on from the checkpoint (it restarted at 0), and
    a window resumed part way is not counted twice."""
    url = nan_cache
    config = _config(episodes=4)
    fit_head([url], str(tmp_path / "straight"), config)
    parted = str(tmp_path / "parted")
    fit_head([url], parted, config, RunOptions(stop_after=1))
    fit_head([url], parted, config, RunOptions(resume=True))
    straight = [line.get("nonfinite_rows") for line in _metrics(tmp_path / "straight")]
    assert straight[-1] > 0
    assert [line.get("nonfinite_rows") for line in _metrics(Path(parted))] == straight


def test_resume_refuses_other_settings(cache: str, tmp_path: Path) -> None:
    fit_head([cache], str(tmp_path), _config(episodes=3), RunOptions(stop_after=1))
    # said only "other settings (schedule, stream)", then named schedule.episodes, no flag
    other = _config(episodes=4, seed=9)
    expected = (
        "other settings (--episodes: the checkpoint has 3, this run 4; "
        "--seed: the checkpoint has 0, this run 9)"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        fit_head([cache], str(tmp_path), other, RunOptions(resume=True))


def test_resume_refusals_say_each_value_as_it_is_typed(cache: str, tmp_path: Path) -> None:
    """They said `--hidden: the checkpoint has [64, 64], this run [32]` and `model_kwargs: the
    checkpoint has None, this run {'global_pool': 'avg'}`: Python's spelling, not the flag's."""
    config = _config(episodes=3)
    fit_head([cache], str(tmp_path), config, RunOptions(stop_after=1))
    schedule = dataclasses.replace(config.schedule, betas=(0.9, 0.95))
    other = dataclasses.replace(config, hidden=(32,), schedule=schedule)
    expected = (
        "(--hidden: the checkpoint has 64,64, this run 32; "
        "--betas: the checkpoint has 0.8,0.95, this run 0.9,0.95)"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        fit_head([cache], str(tmp_path), other, RunOptions(resume=True))
    unset = {"seed": 0, "ambiguity_key": None}
    given = {"seed": 0, "ambiguity_key": "ambiguity", "model_kwargs": {"global_pool": "avg"}}
    assert _provenance_differences([unset], [given]) == [
        "ambiguity_key: the checkpoint has none, this run ambiguity",
        'model_kwargs: the checkpoint has none, this run {"global_pool": "avg"}',
    ]


def test_a_damaged_metrics_line_is_named_when_resuming(cache: str, tmp_path: Path) -> None:
    fit_head([cache], str(tmp_path), _config(episodes=3), RunOptions(stop_after=1))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-20])
    with pytest.raises(ValueError, match=r"metrics.jsonl has a damaged line .* restore the file"):
        fit_head([cache], str(tmp_path), _config(episodes=3), RunOptions(resume=True))


@pytest.mark.parametrize("lost", ["the checkpoint's line", "every line"])
def test_metrics_lines_lost_at_or_before_the_checkpoint_block_resume(
    cache: str, tmp_path: Path, lost: str
) -> None:
    """metrics.jsonl cut at a line boundary (a copy cut off) or left empty (a crash before its
    data reached the disk): the lost episodes' lines cannot be made again from the checkpoint.
    Before, the resume went on: the log read 0, 1, 3, 4, and a finished run resumed rewrote
    head.json with no final metrics."""
    config = _config(episodes=4)
    fit_head([cache], str(tmp_path), config, RunOptions(stop_after=2))
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) if lost == "the checkpoint's line" else "")
    missing = "2" if lost == "the checkpoint's line" else "0-2"
    with pytest.raises(
        ValueError, match=rf"metrics\.jsonl lacks the lines of episode\(s\) {missing}"
    ):
        fit_head([cache], str(tmp_path), config, RunOptions(resume=True))
    assert path.read_text() == ("".join(lines[:-1]) if lost == "the checkpoint's line" else "")


def test_a_diverged_run_stops_before_it_exports_a_nan_head(cache: str, tmp_path: Path) -> None:
    """--lr 1e12 logged 'loss nan', exited 0 and exported NaN weights that evaluate then
    refused with a bare 'Input contains NaN.'"""
    config = _config(episodes=2)
    config = dataclasses.replace(
        config, schedule=dataclasses.replace(config.schedule, lr=1e12, warmup_episodes=0)
    )
    with pytest.raises(ValueError, match=r"training diverged in episode 1 .* lower --lr"):
        fit_head([cache], str(tmp_path), config)
    assert not (tmp_path / "head.safetensors").exists()


def test_a_run_diverged_after_a_checkpoint_says_where_to_train_again(
    cache: str, tmp_path: Path
) -> None:
    """It said 'train again with a lower --lr (the checkpoint of the episode before is kept)':
    in that --output a run needs --resume, and --resume refuses another --lr."""
    config = _config(episodes=3)
    config = dataclasses.replace(config, schedule=dataclasses.replace(config.schedule, lr=1e30))
    with pytest.raises(ValueError, match=r"episode 2 .* lower --lr into another --output"):
        fit_head([cache], str(tmp_path), config)
    lower = dataclasses.replace(config, schedule=dataclasses.replace(config.schedule, lr=1e-3))
    with pytest.raises(ValueError, match=r"other settings \(--lr: "):
        fit_head([cache], str(tmp_path), lower, RunOptions(resume=True))
    fit_head([cache], str(tmp_path / "another"), lower)


def test_resume_with_the_caches_in_another_order_says_so(cache: str, tmp_path: Path) -> None:
    """It said the checkpoint 'was trained on other caches (...; seed: the checkpoint has 0,
    this run 1; seed: the checkpoint has 1, this run 0)' of the same two caches."""
    other = str(tmp_path / "seed1")
    write_synthetic_cache(other, dataclasses.replace(SPEC, seed=1, epochs=1))
    output = str(tmp_path / "run")
    fit_head([cache, other], output, _config(episodes=3), RunOptions(stop_after=1))
    with pytest.raises(ValueError, match=r"same caches in another order") as error:
        fit_head([other, cache], output, _config(episodes=3), RunOptions(resume=True))
    assert "seed: the checkpoint has" not in str(error.value)


def test_resume_refuses_other_caches(cache: str, tmp_path: Path) -> None:
    """It trained on whatever --cache the resume was given, and head.json named only that."""
    fewer = tmp_path / "fewer"
    write_synthetic_cache(str(fewer), dataclasses.replace(SPEC, epochs=2))
    output = str(tmp_path / "run")
    fit_head([cache], output, _config(episodes=3), RunOptions(stop_after=1))
    with pytest.raises(ValueError, match=r"before they changed \(units, digest, sources differ\)"):
        fit_head([str(fewer)], output, _config(episodes=3), RunOptions(resume=True))
    other = tmp_path / "other-shards"  # the same layout and settings, other images
    write_synthetic_cache(str(other), dataclasses.replace(SPEC, noise=0.9))
    with pytest.raises(
        ValueError,
        match=r"trained on other caches, or on these before they changed \(sources differ\)",
    ):
        fit_head([str(other)], output, _config(episodes=3), RunOptions(resume=True))
    moved = tmp_path / "moved"
    shutil.copytree(cache, moved)  # the same cache elsewhere still resumes
    assert fit_head([str(moved)], output, _config(episodes=3), RunOptions(resume=True)).finished


def test_an_old_checkpoint_resumed_on_a_smaller_cache_is_refused(
    cache: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint from before pvu recorded its caches (no ``data`` in state.json) resumed
    on a cache with fewer row groups than its reader position: it ended in a traceback,
    'RuntimeError: stream out of step with its background reader'. On any cache, resuming it
    said nothing of the caches going unchecked."""
    output = tmp_path / "run"
    fit_head([cache], str(output), _config(episodes=3), RunOptions(stop_after=1))
    state_file = output / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    del state["data"]  # as an older pvu wrote it
    state_file.write_text(json.dumps(state))
    assert state["stream"]["window"] >= 4
    smaller = tmp_path / "smaller"  # 4 row groups
    write_synthetic_cache(str(smaller), dataclasses.replace(SPEC, shards=1, epochs=2))
    with pytest.raises(ValueError, match=r"past the 8 windows .* other caches") as error:
        fit_head([str(smaller)], str(output), _config(episodes=3), RunOptions(resume=True))
    assert "pass the --cache it was trained on" in str(error.value)
    assert "did not record its caches, so this run's --cache is not" in " ".join(
        caplog.text.split()
    )


def test_a_cache_given_twice_is_refused_under_any_spelling_or_as_a_copy(
    cache: str, tmp_path: Path
) -> None:
    """`--cache c --cache c//` (or ./, a link, a copy) trained on every row twice."""
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    (tmp_path / "link").symlink_to(cache)
    for twice in (cache.replace("/", "//", 1), f"{cache}/.", str(tmp_path / "link"), str(copy)):
        with pytest.raises(ValueError, match=r"are one unit .* the same cache given twice"):
            open_cache([cache, twice])
    other = tmp_path / "reseeded"  # the same shards made with another seed: other rows
    write_synthetic_cache(str(other), dataclasses.replace(SPEC, seed=1))
    assert len(open_cache([cache, str(other)]).files) == 2 * len(open_cache([cache]).files)


def test_resume_refuses_a_cache_of_the_same_layout_made_with_other_settings(
    cache: str, tmp_path: Path
) -> None:
    """A cache of the same units and rows but another --seed or augmentation was taken for the
    same cache moved: the resumed head trained on two caches, and head.json named one."""
    other = tmp_path / "reseeded"
    write_synthetic_cache(str(other), dataclasses.replace(SPEC, seed=1, jitter=0.5))
    output = str(tmp_path / "run")
    fit_head([cache], output, _config(episodes=3), RunOptions(stop_after=1))
    with pytest.raises(ValueError, match=r"trained on other caches") as refused:
        fit_head([str(other)], output, _config(episodes=3), RunOptions(resume=True))
    said = str(refused.value)
    assert "seed: the checkpoint has 0, this run 1" in said, said
    assert "transform.jitter: the checkpoint has 0.3, this run 0.5" in said, said
    state = Path(output) / "checkpoint" / "state.json"
    document = json.loads(state.read_text())
    del document["data"]["provenance"]  # a checkpoint from before it was recorded
    state.write_text(json.dumps(document))
    assert fit_head([cache], output, _config(episodes=3), RunOptions(resume=True)).finished


def test_a_second_run_into_the_same_output_is_refused_naming_the_first(
    cache: str, tmp_path: Path
) -> None:
    """Both exited 0 and the second's head overwrote the first's, metrics interleaved."""
    output = tmp_path / "run"
    holder = RunLock(str(output), owner="pvu train-head --loss l2")
    args = ["train-head", "--cache", cache, "--output", str(output), "--episodes", "2"]
    args += ["--warmup-episodes", "1", "--episode-size", "1000", "--hidden", "8"]
    args += ["--batch-size", "256"]
    with holder:
        result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "another pvu run is writing to" in text and "--loss l2" in text


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("train-head")(train_head)
    app.command("noop")(lambda: None)  # keep train-head a sub-command, as on the pvu app
    return app


def test_cli_trains_and_exports(cache: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train-head", "--cache", cache, "--output", str(out), "--episodes", "2"]
    args += ["--episode-size", "2000", "--batch-size", "256", "--warmup-episodes", "1"]
    args += ["--hidden", "32", "--seed", "1", "--val-fraction", "0.2", "--shuffle-rows", "800"]
    args += ["--device", "cpu", "--threads", "2", "--loss", "ranking", "--lr", "0.003"]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    assert "samples/s" in result.output
    doc = json.loads((out / "head.json").read_text())
    assert doc["hidden"] == [32]
    assert doc["training"]["config"]["schedule"]["lr"] == 0.003
    resumed = CliRunner().invoke(_app(), [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output


def test_a_resumed_run_s_bar_starts_where_the_run_resumes(
    cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed run's bar started at 0 and counted the episode's batches from there, so it
    read 0/3,000 after two of three episodes (and jumped at the episode's end)."""
    args = ["train-head", "--cache", cache, "--output", str(tmp_path / "run"), "--episodes", "3"]
    args += ["--episode-size", "1000", "--batch-size", "250", "--warmup-episodes", "1"]
    args += ["--hidden", "8", "--val-fraction", "0.2", "--shuffle-rows", "800"]
    first = CliRunner().invoke(_app(), [*args, "--stop-after", "2"])
    assert first.exit_code == 0, first.output
    drawn = io.StringIO()
    monkeypatch.setattr(terminal, "console", Console(file=drawn, force_terminal=True, width=160))
    resumed = CliRunner().invoke(_app(), [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    shown = [int(n.replace(",", "")) for n in re.findall(r"([\d,]+)/3,000", drawn.getvalue())]
    assert shown and min(shown) >= 2000 and shown[-1] == 3000, shown


def test_cli_rejects_bad_flags_by_name(cache: str, tmp_path: Path) -> None:
    base = ["train-head", "--cache", cache, "--output", str(tmp_path)]
    result = CliRunner().invoke(_app(), [*base, "--episode-size", "128", "--batch-size", "1000"])
    assert "--batch-size (1000) must be at most --episode-size (128)" in unboxed(result.output)
    for hidden in ("512,x", "512,,512", ","):  # an empty width was dropped: (512, 512)
        result = CliRunner().invoke(_app(), [*base, "--hidden", hidden])
        assert result.exit_code == 2 and "--hidden" in result.output, hidden
    result = CliRunner().invoke(_app(), [*base, "--episodes", "10", "--warmup-episodes", "10"])
    assert result.exit_code == 2 and "--warmup-episodes (10) must be less than --episodes (10)" in (
        " ".join(result.output.split())
    )
    for flag in ("--min-lr", "--warmup-lr"):  # a decay or warmup that would raise the rate
        result = CliRunner().invoke(_app(), [*base, "--lr", "0.001", flag, "0.01"])
        said = f"{flag} (0.01) must be at most --lr (0.001)"
        assert result.exit_code == 2 and said in " ".join(result.output.split()), flag
    result = CliRunner().invoke(_app(), [*base, "--loss", "hinge"])
    assert result.exit_code == 2 and "--loss" in result.output
    odd = ["--episode-size", "1025", "--batch-size", "256"]  # a last batch of one row: no pair
    result = CliRunner().invoke(_app(), [*base, *odd])
    said = "--episode-size (1025) must be even for --loss ranking"
    assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
    absent = ["train-head", "--cache", str(tmp_path / "none"), "--output", str(tmp_path)]
    missing = CliRunner().invoke(_app(), absent)
    assert missing.exit_code == 2 and "does not exist" in " ".join(missing.output.split())


def test_a_shuffle_pool_larger_than_the_memory_left_is_refused_with_one_that_fits(
    cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the check the kernel kills the run part way (exit 137, no message)."""
    head = 16 * (33 * 8 + 9)  # bytes of a --hidden 8 head, its gradients and AdamW's moments
    monkeypatch.setattr(train_module, "available_memory", lambda: 150_000 + head)  # bytes
    args = ["train-head", "--cache", cache, "--output", str(tmp_path / "run"), "--episodes", "2"]
    args += ["--episode-size", "1000", "--batch-size", "256", "--warmup-episodes", "1"]
    args += ["--hidden", "8"]  # 512,512 would not fit either, as the next test shows
    refused = CliRunner().invoke(_app(), [*args, "--shuffle-rows", "6000"])
    message = " ".join(refused.output.split())
    assert refused.exit_code == 2, refused.output
    assert "--shuffle-rows 6,000 of 32-wide float16 embeddings" in message
    assert "0.1 MiB of memory is left here" in message
    fits = int(re.search(r"lower --shuffle-rows \(to ([\d,]+), say\)", message)[1].replace(",", ""))
    assert 125 < fits < 6000  # a window of more than one row group still fits
    assert not (tmp_path / "run").exists()  # refused before anything was written
    trained = CliRunner().invoke(_app(), [*args, "--shuffle-rows", str(fits)])
    assert trained.exit_code == 0, trained.output


def test_a_head_too_wide_for_the_memory_left_is_refused_naming_hidden(
    cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --hidden typo reached torch: a traceback ('can't allocate memory', or a TypeError for
    a width past 64 bits), or, where the allocation was granted, a run the kernel killed."""
    args = ["train-head", "--cache", cache, "--output", str(tmp_path / "run"), "--episodes", "2"]
    args += ["--episode-size", "1000", "--batch-size", "256", "--warmup-episodes", "1"]
    for hidden, parameters in (
        ("99999999999999999999", "3,399,999,999,999,999,999,967"),  # past int64: a TypeError
        ("200000,200000", "40,007,000,001"),  # 596 GiB: "can't allocate memory"
    ):
        refused = CliRunner().invoke(_app(), [*args, "--hidden", hidden])
        message = " ".join(refused.output.split())
        assert refused.exit_code == 2 and "Traceback" not in message, refused.output
        head = f"a head of --hidden {hidden} on 32-wide embeddings has {parameters} parameters"
        assert head in message, message
        assert "give narrower --hidden widths" in message, message
    monkeypatch.setattr(train_module, "available_memory", lambda: 2 * 2**20)
    refused = CliRunner().invoke(_app(), [*args, "--hidden", "512,512"])
    message = " ".join(refused.output.split())
    assert refused.exit_code == 2, refused.output
    assert "has 280,065 parameters, 4.3 MiB with their gradients and AdamW's moments, but " in (
        message
    ), message
    assert "2.0 MiB is left here" in message, message
    assert not (tmp_path / "run").exists()  # refused before anything was written
    trained = CliRunner().invoke(_app(), [*args, "--hidden", "8", "--shuffle-rows", "250"])
    assert trained.exit_code == 0, trained.output


def test_config_defaults_are_the_papers() -> None:
    config = TrainHeadConfig(cache=["c"], output="o").to_train_config()
    assert config.schedule == ScheduleConfig()
    assert (config.schedule.episodes, config.schedule.episode_size) == (460, 200_000)
    assert (config.schedule.batch_size, config.schedule.lr) == (2048, 2.8e-3)
    assert config.hidden == (512, 512) and config.loss == "ranking" and config.margin == 0.1
    assert TrainHeadConfig(cache=["c"], output="o", hidden="256").hidden == (256,)


def test_resuming_a_finished_run_keeps_its_summary(cache: str, tmp_path: Path) -> None:
    fit_head([cache], str(tmp_path), _config(episodes=2))
    before = json.loads((tmp_path / "head.json").read_text())
    weights = (tmp_path / "head.safetensors").read_bytes()
    again = fit_head([cache], str(tmp_path), _config(episodes=2), RunOptions(resume=True))
    assert again.finished
    after = json.loads((tmp_path / "head.json").read_text())
    assert before["training"]["final"]["episode"] == 2
    assert after["training"] == before["training"]
    assert (tmp_path / "head.safetensors").read_bytes() == weights
    # the same command with a --stop-after: it said 'stopped after episode 2; continue with
    # --resume' of a finished run, and exported nothing where its head had been removed
    (tmp_path / "head.json").unlink()
    stopped = RunOptions(resume=True, stop_after=1)
    assert fit_head([cache], str(tmp_path), _config(episodes=2), stopped).finished
    assert json.loads((tmp_path / "head.json").read_text())["training"] == before["training"]


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_kill_around_the_checkpoint_loses_no_metrics_line(
    cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """The run dies just before, or just after, episode 2's checkpoint is written."""
    config = _config(episodes=4)
    real = train_module.save_checkpoint

    def dies_at_episode_2(output: str, **kwargs: Any) -> None:
        if kwargs["episode"] == 2 and when == "before":
            raise KeyboardInterrupt
        real(output, **kwargs)
        if kwargs["episode"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", dies_at_episode_2)
    with pytest.raises(KeyboardInterrupt):
        fit_head([cache], str(tmp_path), config)
    monkeypatch.setattr(train_module, "save_checkpoint", real)
    fit_head([cache], str(tmp_path), config, RunOptions(resume=True))
    assert [line["episode"] for line in _metrics(tmp_path)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("cut", ["after", "at"])
def test_a_metrics_line_cut_short_blocks_resume_only_at_or_before_the_checkpoint(
    cache: str, tmp_path: Path, cut: str
) -> None:
    """A kill mid-write of episode 3's line, after episode 2's checkpoint: that line is trained
    again, so the cut is dropped; episode 2's own line cut short is still refused."""
    config = _config(episodes=4)
    fit_head([cache], str(tmp_path), config, RunOptions(stop_after=2))
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    if cut == "after":
        lines.append(json.dumps(_metrics(tmp_path)[-1] | {"episode": 3})[:20])
    else:
        lines[-1] = lines[-1][:20]
    path.write_text("\n".join(lines))
    if cut == "at":
        with pytest.raises(ValueError, match=r"metrics\.jsonl has a damaged line"):
            fit_head([cache], str(tmp_path), config, RunOptions(resume=True))
    else:
        fit_head([cache], str(tmp_path), config, RunOptions(resume=True))
        assert [line["episode"] for line in _metrics(tmp_path)] == [0, 1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.faults
def test_sigkill_mid_episode_then_resume_gives_the_same_head_bit_for_bit(
    cache: str, tmp_path: Path
) -> None:
    flags = ["--episodes", "5", "--episode-size", "4000", "--batch-size", "256"]
    flags += ["--warmup-episodes", "1", "--hidden", "64,64", "--val-fraction", "0.2"]
    flags += ["--shuffle-rows", "1000", "--threads", "1", "--cache", cache]

    def command(output: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "jobs.train_head", *flags, "--output", str(output), *extra]

    straight = subprocess.run(command(tmp_path / "straight"), capture_output=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = tmp_path / "killed"
    run = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoint" / "state.json").exists():  # episode 1 is done
        assert run.poll() is None and time.monotonic() < deadline, "training ended too soon"
        time.sleep(0.01)
    time.sleep(0.03)  # into episode 2 (an episode takes ~60 ms, the four left ~0.3 s)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (killed / "head.json").exists(), "the kill must land before the end"
    resumed = subprocess.run(command(killed, "--resume"), capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    weights = "head.safetensors"
    assert (killed / weights).read_bytes() == (tmp_path / "straight" / weights).read_bytes()
    assert [line["episode"] for line in _metrics(killed)] == list(range(6))
    final = json.loads((killed / "head.json").read_text())["training"]["final"]
    straight_final = json.loads((tmp_path / "straight" / "head.json").read_text())["training"]
    timing = {key: final[key] for key in ("seconds", "samples_per_s")}
    assert final == straight_final["final"] | timing


_STEP_FAULTS = """
import ctypes, resource, sys, torch
from pipeline.head.train import keep_freed_memory
# glibc adapts its thresholds to a process's allocation history, so whether it gives a step's
# memory back depends on that history; start each run from the returning policy it may reach.
assert ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: mmap (and unmap) >= 1 MB
if sys.argv[1] == "kept":
    assert keep_freed_memory()
def step():  # three batch-sized (2048 x 768 float32, 6 MB) tensors alive at once, then freed
    held = [torch.ones(2048, 768) for _ in range(3)]
    return sum(float(t[-1, -1]) for t in held)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_training_process_keeps_freed_memory_instead_of_faulting_it_in_each_step() -> None:
    """An allocator that gives such a step's memory back to the kernel faults it in again every
    step; `pvu train-head` has it kept, whatever policy the process had reached."""

    def faults_per_step(mode: str) -> float:
        done = subprocess.run(
            [sys.executable, "-c", _STEP_FAULTS, mode], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return float(done.stdout)

    returned = faults_per_step("returned")
    assert returned > 1000  # ~18 MB of pages, every step
    # ~0 kept; under the full suite a loaded host once added 154 a step, cause unknown
    assert faults_per_step("kept") < returned / 10


def _rewrite_unit(
    cache: Path,
    relpath: str,
    *,
    loss: float | list[float] | None = None,
    loss_statistics: bool = True,
) -> None:
    """Write unit ``relpath`` of ``cache`` again: every loss ``loss`` (if given; a list repeats
    down the rows), the loss column without footer statistics (as another writer may leave
    it); its manifest size too."""
    path = cache / relpath
    table = pq.read_table(path)
    if loss is not None:
        column = table.schema.get_field_index("loss")
        losses = pa.array(np.resize(np.asarray(loss, np.float32), table.num_rows))
        table = table.set_column(column, table.schema.field("loss"), losses)
    stats = True if loss_statistics else [name for name in table.column_names if name != "loss"]
    pq.write_table(table, path, row_group_size=64, write_statistics=stats)
    manifest = json.loads((cache / "_manifest.json").read_text())
    manifest["units"][relpath]["bytes"] = path.stat().st_size
    (cache / "_manifest.json").write_text(json.dumps(manifest))


def test_equal_losses_are_refused_when_the_first_row_group_has_no_statistics(
    tmp_path: Path,
) -> None:
    """The check read the footers' statistics and gave up at a first group without them."""
    spec = SyntheticCache(dim=8, samples_per_shard=128, shards=2)
    cache, varied = tmp_path / "cache", tmp_path / "varied"
    for url in (cache, varied):
        write_synthetic_cache(str(url), spec)
    units = sorted(str(p.relative_to(cache)) for p in cache.glob("epoch=*/*.parquet"))
    for n, relpath in enumerate(units):
        _rewrite_unit(cache, relpath, loss=2.5, loss_statistics=n > 0)
        _rewrite_unit(varied, relpath, loss_statistics=False)
    first = pq.read_metadata(cache / units[0])
    assert first.row_group(0).column(leaf_column(first, "loss")).statistics is None
    with pytest.raises(ValueError, match=f"cache {cache}: every cached loss is 2.5"):
        open_cache([str(cache)])
    assert open_cache([str(varied)]).rows == spec.epochs * spec.images  # read, and they differ


@pytest.mark.parametrize("statistics", [True, False])
def test_a_cache_without_two_finite_losses_is_refused(tmp_path: Path, statistics: bool) -> None:
    """Every finite loss one value beside some inf ones trained a head on a loss of 0 and
    exported it; every loss NaN was blamed on --val-fraction (training drops such rows)."""
    spec = SyntheticCache(dim=8, samples_per_shard=64, shards=1, epochs=1)
    cases = {"inf": ([2.5] * 9 + [np.inf], "every cached loss is 2.5")}
    cases["nan"] = ([np.nan, np.inf], "no cached loss is finite")
    for name, (losses, words) in cases.items():
        cache = tmp_path / name
        write_synthetic_cache(str(cache), spec)
        _rewrite_unit(
            cache, "epoch=0000/shard-00000.parquet", loss=losses, loss_statistics=statistics
        )
        with pytest.raises(ValueError, match=f"cache {cache}: {words}"):
            open_cache([str(cache)])


def test_a_training_split_smaller_than_a_batch_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every batch repeats rows: trained, with a warning, where it was silent."""
    cache = str(tmp_path / "cache")
    write_synthetic_cache(cache, SyntheticCache(dim=8, samples_per_shard=50, shards=1, epochs=1))
    config = TrainConfig(
        hidden=(8,),
        schedule=ScheduleConfig(episodes=1, episode_size=64, batch_size=32, warmup_episodes=0),
        stream=StreamConfig(shuffle_rows=64, val_fraction=0.5),
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.head.train"):
        assert fit_head([cache], str(tmp_path / "run"), config).finished
    assert (
        "--val-fraction 0.5 leaves 30 of the cache's 50 rows to train on, fewer than one batch "
        "(--batch-size 32): every batch repeats rows"
    ) in caplog.text


@pytest.fixture
def digit_shard(tmp_path: Path) -> str:
    """One shard of 8 digits at 32 px, for real caches made unit by unit."""
    return write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=8, size=32)[0]


def test_caches_of_the_same_shards_with_other_seeds_count_their_views(
    tmp_path: Path, digit_shard: str
) -> None:
    """Two caches of one shard's epoch 0 made with seeds 0 and 1 hold two views of each image:
    the run logged '1 epoch cached, so 1.0 views of each image' and head.json said
    ``cached_epochs: 1``, half of what the schedule made of each image."""
    for seed in (0, 1):
        make_runner(str(tmp_path / f"seed{seed}"), seed=seed).run(
            Unit(digit_shard, "digits-0000", 0)
        )
    caches = [str(tmp_path / "seed0"), str(tmp_path / "seed1")]
    assert open_cache(caches[:1]).epochs == 1
    assert open_cache(caches).epochs == 2


def test_caches_of_the_same_images_under_another_seed_or_ambiguity_key_are_refused(
    tmp_path: Path,
    digit_shard: str,
) -> None:
    """An eval transform draws nothing from the seed, and --ambiguity-key only adds a column:
    two such caches of one shard hold the same images, and were taken as two views of each,
    their rows trained on twice. Eval noise does draw from the seed: other images."""
    unit = Unit(digit_shard, "digits-0000", 0)

    def cache(name: str, **options: Any) -> str:
        make_runner(str(tmp_path / name), **options).run(unit)
        return str(tmp_path / name)

    evaluated = [cache(f"eval{seed}", seed=seed, augment="eval") for seed in (0, 1)]
    with pytest.raises(
        ValueError, match=r"made twice \(seed: the first has 0, the second 1\)"
    ) as e:
        open_cache(evaluated)
    assert str(e.value).endswith("Give one of the two caches")  # an eval cache has one epoch
    noise = Deterioration(kind="noise", strength=0.5)
    noisy = [cache(f"noise{seed}", seed=seed, augment="eval", deteriorate=noise) for seed in (0, 1)]
    assert open_cache(noisy, need_loss=False).epochs == 2
    settings = unit_settings(str(tmp_path / "ambiguity"), ambiguity_key="amb")
    with_key = settings.model_copy(
        update={"provenance": {**settings.provenance, "ambiguity_key": "amb"}}
    )
    UnitRunner(make_runner(str(tmp_path / "plain")).backbone, with_key).run(unit)
    with pytest.raises(ValueError, match=r"made twice \(ambiguity_key: .*None.*'amb'"):
        open_cache([cache("plain"), str(tmp_path / "ambiguity")])


def test_one_shard_spelled_two_ways_counts_its_views_once(tmp_path: Path, digit_shard: str) -> None:
    """A shard named ``.../shards/x.tar`` by one cache and ``...//shards/x.tar`` by another
    (or ``s3a://`` and ``s3://``) was taken for two shards of one view each: '1 epoch cached'
    for two epochs of every image."""
    make_runner(str(tmp_path / "a")).run(Unit(digit_shard, "digits-0000", 0))
    respelled = digit_shard.replace("/shards/", "//shards/")
    make_runner(str(tmp_path / "b")).run(Unit(respelled, "digits-0000", 1))
    assert open_cache([str(tmp_path / "a"), str(tmp_path / "b")]).epochs == 2


def test_two_runs_of_the_same_shards_and_seed_are_told_which_epochs_to_give(
    tmp_path: Path,
    digit_shard: str,
) -> None:
    """Two seed-0 caches of one shard hold the same rows for each epoch they share: refused
    naming both units; the advice to give 'the one with more epochs' did not fit two caches
    of epochs 0-1 and 1-2, each holding an epoch the other lacks."""

    def cache(name: str, epochs: range) -> str:
        runner = make_runner(str(tmp_path / name))
        for epoch in epochs:
            runner.run(Unit(digit_shard, "digits-0000", epoch))
        return str(tmp_path / name)

    one, two = cache("one", range(1)), cache("two", range(2))
    with pytest.raises(ValueError) as error:
        open_cache([one, two])
    said = str(error.value)
    assert f"{one}/epoch=0000/digits-0000.parquet and {two}/epoch=0000/" in said
    assert "or two runs of the same shards and settings holding the same epochs?" in said
    assert f"Give each epoch once: one cache, or {two}, which holds the other's units" in said
    each_lacks = (
        "Give each epoch once: one cache, or, as each holds units the other lacks, one cache of "
        "every shard and epoch of both (pvu cache --epochs 3 into one of them, of both's shards)"
    )
    with pytest.raises(ValueError, match=re.escape(each_lacks)):
        open_cache([two, cache("later", range(1, 3))])
    # another shard beside: the cache of more epochs does not hold all of the other's units
    second = write_digit_shards(str(tmp_path / "more"), shards=2, per_shard=8, size=32)[1]
    make_runner(str(tmp_path / "one")).run(Unit(second, "digits-0001", 0))
    with pytest.raises(ValueError, match=r"as each holds units the other lacks, one cache of"):
        open_cache([one, two])
