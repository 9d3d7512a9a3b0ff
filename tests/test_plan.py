"""`pvu plan`: its rows and bytes against a real `pvu cache` run on the same shards."""

from __future__ import annotations

import gzip
import io
import logging
import multiprocessing
import re
import shutil
import tarfile
import time
from pathlib import Path

import fsspec
import pytest
import ray
import torch
from PIL import Image
from support import SMALL_BACKBONE_FLAGS, make_runner, pvu, unit_settings

from jobs.run.cache import run_cache
from jobs.run.cache_config import CacheJobConfig
from jobs.run.plan import PlanJobConfig, run_plan
from pipeline.cache.backbone import Backbone, create_backbone_model
from pipeline.cache.distribute import start_local_ray
from pipeline.cache.info import read_cache_info
from pipeline.cache.plan import (
    Measurement,
    estimate,
    measure,
    read_prefix,
    sample_shards,
    shard_sizes,
)
from pipeline.cache.unit import Unit, UnitResult
from pipeline.demo.data import (
    encode_image,
    truncate_shard,
    write_bad_shard,
    write_digit_shards,
)

pytestmark = pytest.mark.usefixtures("wide_console")

COMMON = {"backbone": "resnet10t", "weights": "random", "input_size": 32, "batch_size": 16}
#: Rows and bytes of a plan that sampled part of the shards, against the real cache.
TOLERANCE = 0.1


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Four shards of digits and one of every kind of bad input (skipped by the cache)."""
    root = tmp_path_factory.mktemp("plan") / "shards"
    write_digit_shards(str(root), shards=4, per_shard=40, size=32)
    write_bad_shard(str(root / "zz-bad.tar"))
    return str(root)


def digits_only(shards: str, folder) -> str:
    """A shard list file naming the digit shards of ``shards``."""
    listed = folder / "digits.txt"
    listed.write_text("".join(f"{shards}/digits-{i:04d}.tar\n" for i in range(4)))
    return str(listed)


@pytest.mark.slow
def test_plan_predicts_the_cache_run(shards, tmp_path, caplog):
    output = str(tmp_path / "cache")
    [everything] = run_plan(PlanJobConfig(shards=shards, output=output, epochs=2, **COMMON))
    [part] = run_plan(
        PlanJobConfig(
            shards=digits_only(shards, tmp_path),
            output=str(tmp_path / "other"),
            epochs=2,
            sample_images=30,
            **COMMON,
        )
    )
    assert not (tmp_path / "cache").exists()  # a plan writes nothing to --output
    assert part.estimate.counted_shards == 0 and everything.estimate.counted_shards == 5

    start_local_ray(num_cpus=1)
    try:
        report = run_cache(CacheJobConfig(shards=shards, output=output, epochs=2, **COMMON))
    finally:
        ray.shutdown()
    assert not report.failed
    real = read_cache_info(output)

    # every sample read: rows exact (skips included), bytes within 5%
    assert everything.estimate.rows == real.rows
    assert everything.estimate.units == len(real.units) == 10
    assert everything.estimate.bytes == pytest.approx(real.bytes, rel=0.05)
    # 30 samples of the digit shards: the rest extrapolated from shard sizes
    digits = [unit for unit in real.units.values() if unit["shard"].startswith("digits")]
    assert part.estimate.rows == pytest.approx(sum(u["rows"] for u in digits), rel=TOLERANCE)
    assert part.estimate.bytes == pytest.approx(sum(u["bytes"] for u in digits), rel=TOLERANCE)

    # resuming into a longer run: the committed units are not planned again
    [more] = run_plan(PlanJobConfig(shards=shards, output=output, epochs=3, **COMMON))
    assert more.estimate.units_done == 10 and more.estimate.rows == real.rows // 2
    # a listed unit gone from storage is recomputed by pvu cache: not done
    shutil.copytree(output, tmp_path / "damaged")
    relpath, gone = min(real.units.items())
    (tmp_path / "damaged" / relpath).unlink()
    damaged = PlanJobConfig(shards=shards, output=str(tmp_path / "damaged"), epochs=3, **COMMON)
    [repair] = run_plan(damaged)
    assert repair.estimate.units_done == 9
    assert repair.estimate.rows == real.rows // 2 + gone["rows"]
    (tmp_path / "cache" / "_manifest.json").unlink()  # pvu cache adopts the units it finds
    [bare] = run_plan(PlanJobConfig(shards=shards, output=output, epochs=3, **COMMON))
    assert bare.estimate.units_done == 10 and bare.estimate.rows == real.rows // 2
    # other shards of the committed ones' names: pvu cache takes them as done, and says so
    write_digit_shards(str(tmp_path / "other-set"), shards=4, per_shard=9, size=32)
    with caplog.at_level(logging.WARNING, logger="pipeline.cache.shards"):
        run_plan(PlanJobConfig(shards=str(tmp_path / "other-set"), output=output, **COMMON))
    assert "4 committed shard(s) were read from other URLs" in caplog.text

    flags = ["--shards", shards, "--output", output, *SMALL_BACKBONE_FLAGS, "--seed", "1"]
    result = pvu("plan", *flags, "--sample-images", "8")
    text = result.text
    assert result.exit_code == 2 and "would refuse" in text and "seed" in text, text


@pytest.mark.slow
def test_plan_of_shards_on_s3_prints_units_rows_bytes_and_hours(s3_bucket):
    write_digit_shards(f"{s3_bucket}/shards", shards=5, per_shard=12, size=32)
    flags = ["--shards", f"{s3_bucket}/shards/digits-{{0000..0004}}.tar", *SMALL_BACKBONE_FLAGS]
    args = ["plan", *flags, "--output", f"{s3_bucket}/cache", "--epochs", "7"]
    result = pvu(*args, "--images-per-second-per-gpu", "2000")
    text = result.text
    assert result.exit_code == 0, result.output
    assert "35 (7 epochs)" in text and "bytes on storage" in text
    assert "shards │ 5 (all counted)" in text and "samples per epoch │ 60" in text  # exact
    assert "rows to compute │ ~420" in text  # 5 shards x 12 samples x 7 epochs
    assert "CPU actor-hours" in text and "at 2,000 images/s per GPU" in text
    assert not fsspec.filesystem("s3").exists(f"{s3_bucket}/cache")


def test_a_plan_with_decode_device_counts_no_decode_cores_for_a_gpu(shards, tmp_path):
    """It said a GPU needs ~N cores of decoding, which --decode device does on the GPU."""
    flags = ["--shards", shards, "--output", str(tmp_path / "c"), "--sample-images", "16"]
    gpu = ["--images-per-second-per-gpu", "2500"]
    result = pvu("plan", *flags, *SMALL_BACKBONE_FLAGS, *gpu, "--decode", "device")
    assert result.exit_code == 0, result.output
    assert "(on CPUs; --decode device: on the GPU of a GPU node)" in result.text
    assert "decode cores/GPU" not in result.text
    assert "decode cores/GPU" in pvu("plan", *flags, *SMALL_BACKBONE_FLAGS, *gpu).text


def test_plan_covers_every_also_backbone(shards, tmp_path):
    """--also was accepted and ignored: the plan priced the first backbone's cache alone."""
    also = f"mobilenetv3_small_050,random,{tmp_path / 'wide'}"
    flags = ["--shards", shards, "--output", str(tmp_path / "narrow"), "--sample-images", "16"]
    result = pvu("plan", *flags, *SMALL_BACKBONE_FLAGS, "--also", also)
    text = result.text
    assert result.exit_code == 0, result.output
    first, second = text.split("pvu plan: ")[1:]
    assert first.startswith("what `pvu cache` will do for resnet10t into")
    assert "mobilenetv3_small_050" in second and "wide" in second
    assert "done once, in the first backbone's pass" in second
    per_row = [int(re.search(r"([\d,]+) per row", t)[1].replace(",", "")) for t in (first, second)]
    assert per_row[1] > per_row[0]  # 1,024 float16 values a row against 512


def test_prefixes_stop_after_the_budget_and_survive_damage(tmp_path, caplog):
    urls = write_digit_shards(str(tmp_path), shards=10, per_shard=10, size=16)
    sizes = shard_sizes(urls)
    assert sizes == {url: Path(url).stat().st_size for url in urls}
    part = read_prefix(urls[0], 4, sizes[urls[0]])
    assert [key for key, _ in part.samples] == [f"digit-{i:06d}" for i in range(4)]
    assert not part.complete and 0 < part.bytes < sizes[urls[0]]
    assert [name for name, _ in part.samples[0][1]] == ["digit-000000.png", "digit-000000.cls"]
    whole = read_prefix(urls[0], 50, sizes[urls[0]])
    assert whole.complete and len(whole.samples) == 10 and whole.bytes == sizes[urls[0]]
    cut = truncate_shard(urls[1], str(tmp_path / "cut.tar"), keep_bytes=sizes[urls[1]] // 2)
    with caplog.at_level(logging.WARNING, logger="pipeline.cache.plan"):
        damaged = read_prefix(cut, 50, sizes[urls[1]] // 2)
    assert damaged.complete and 0 < len(damaged.samples) < 10
    assert f"{cut}: no end-of-archive marker" in caplog.text  # it was silent
    zstd = tmp_path / "z.tar"  # a .tar.zst: named so, as pvu cache names it
    zstd.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(256)) * 8)
    with caplog.at_level(logging.WARNING, logger="pipeline.cache.plan"):
        assert read_prefix(str(zstd), 50, zstd.stat().st_size).samples == []
    assert f"{zstd}: a zstd-compressed file, which no tar reader here opens" in caplog.text

    spread = sample_shards(sizes, 16)  # 8 shards spread over the 10, 2 samples each
    assert list(spread) == [urls[i] for i in (0, 1, 2, 3, 5, 6, 7, 8)]
    assert all(len(p.samples) == 2 for p in spread.values())
    everything = sample_shards(sizes, 1000)
    assert len(everything) == 10 and all(p.complete for p in everything.values())


def test_the_estimate_of_many_epochs_is_its_units_summed_and_prompt(tmp_path):
    """The estimate walked every (epoch, shard) unit: pvu plan --epochs 10000000 took minutes
    over a few shards before it printed anything."""
    urls = write_digit_shards(str(tmp_path / "small"), shards=2, per_shard=2, size=16)
    urls += write_digit_shards(str(tmp_path / "large"), shards=3, per_shard=10, size=16)
    sizes = shard_sizes(urls)
    prefixes = sample_shards(sizes, 15)  # the small shards whole, the large extrapolated
    assert [prefixes[url].complete for url in urls] == [True, True, False, False, False]
    kept = {url: max(0, len(prefix.samples) - 1) for url, prefix in prefixes.items()}
    result = UnitResult("u", 0, "s", "s", rows=9, bytes=1, skipped={}, seconds=1.0)
    measured = Measurement(15, result, kept, unit_file_bytes=1500.4, bytes_per_row=71.7)

    def rows_bytes(epochs: int, done: set) -> tuple[int, int]:
        est = estimate(sizes=sizes, prefixes=prefixes, measurement=measured, epochs=epochs,
                       done=done)  # fmt: skip
        return est.rows, est.bytes

    one = rows_bytes(1, set())  # a unit's rows and bytes: what leaving it out takes off
    unit = {url: [a - b for a, b in zip(one, rows_bytes(1, {(0, url)}), strict=True)]
            for url in urls}  # fmt: skip
    done = {(1, urls[0]), (2, urls[0]), (2, urls[3])}
    left = [(e, u) for e in range(3) for u in urls if (e, u) not in done]
    assert rows_bytes(3, done) == (sum(unit[u][0] for _, u in left),
                                   sum(unit[u][1] for _, u in left))  # fmt: skip
    epochs = 10_000_000
    start = time.perf_counter()
    many = rows_bytes(epochs, done)
    assert time.perf_counter() - start < 1.0
    assert many == (epochs * one[0] - sum(unit[u][0] for _, u in done),
                    epochs * one[1] - sum(unit[u][1] for _, u in done))  # fmt: skip


def test_a_key_repeated_across_shards_or_in_one_is_counted_once_as_the_cache_keeps_it(tmp_path):
    """A key in two shards, or twice in one, apart: the plan counted each copy, the cache keeps
    the first (two copies of a shard: 2 x 6 rows planned, 6 cached), though every sample was
    read."""
    [first] = write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=6, size=32)
    copy = str(tmp_path / "shards" / "zz-copy.tar")
    with tarfile.open(first) as tar:
        image = tar.extractfile("digit-000000.png").read()
    with tarfile.open(copy, "w") as tar:  # first's digit-000000 again, and x twice, apart
        for key in ("digit-000000", "x", "y", "x"):
            for name, data in ((f"{key}.png", image), (f"{key}.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    config = PlanJobConfig(shards=str(tmp_path / "shards"), output=str(tmp_path / "o"), **COMMON)
    [plan] = run_plan(config)
    assert plan.estimate.counted_shards == 2 and plan.estimate.rows == 8
    assert plan.measurement.kept_per_shard == {first: 6, copy: 2}
    assert plan.measurement.kept == 8 / 10  # "80.0% of the sample kept": 90% before


def test_the_bytes_a_prefix_takes_are_its_stored_bytes_in_a_compressed_shard(tmp_path):
    """A .tar.gz prefix was measured in decompressed bytes and applied to compressed sizes: a
    plan of 600 samples said ~114 (one compression ratio short)."""
    [plain] = write_digit_shards(str(tmp_path), shards=1, per_shard=100, size=32)
    packed = Path(plain + ".gz")
    packed.write_bytes(gzip.compress(Path(plain).read_bytes()))
    for url in (plain, str(packed)):
        size = Path(url).stat().st_size
        prefix = read_prefix(url, max_samples=50, size=size)
        assert prefix.bytes / size == pytest.approx(0.5, abs=0.1), url  # gzip's read ahead


def test_plan_samples_a_shard_as_the_cache_reads_it(tmp_path, caplog):
    """Files of a sample apart (``tar`` without ``--sort``), a key starting ``__`` and an
    absolute name: the plan grouped each key's files wherever they lay, dropped the ``__``
    key and read the absolute name as a safe one, so its rows differed from the cache's. Its
    warnings named the scratch sample's keys ('0/a', 'skipping 0/bad')."""
    image = encode_image(Image.new("RGB", (32, 32), "gray"))
    members = [
        ("a.png", image), ("b.png", image), ("a.cls", b"1"), ("b.cls", b"2"),  # apart
        ("__under_3.png", image), ("__under_3.cls", b"3"),
        ("/abs/y.png", image), ("/abs/y.cls", b"4"),
        ("ok.png", image), ("ok.cls", b"5"), ("bad.png", b"no image"), ("bad.cls", b"6"),
    ]  # fmt: skip
    shard = tmp_path / "shards" / "odd.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cached = make_runner(str(tmp_path / "cache")).run(Unit(str(shard), "odd", 0))
    assert cached.rows == 2, cached.skipped  # __under_3 and ok
    config = PlanJobConfig(shards=str(shard), output=str(tmp_path / "out"), **COMMON)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        [plan] = run_plan(config)
    assert plan.estimate.rows == cached.rows
    assert plan.measurement.result.skipped == cached.skipped
    # the warnings name the user's shard and key, not the plan's scratch sample ('0/a')
    [apart] = [r.getMessage() for r in caplog.records if "not next to each other" in r.message]
    assert apart.startswith(f"{shard}: the files of sample 'a' are not next to each other")
    skips = [r.getMessage() for r in caplog.records if r.message.startswith("skipping")]
    assert skips == [
        f"skipping a in {shard}: no_label: its files (.png) hold no label by --label-key (cls)",
        "skipping /abs/y in the shards pvu plan sampled: unsafe_name: its name is absolute, "
        "climbs out with '..' or is not UTF-8",  # kept unnumbered in the sample: shard unknown
        f"skipping bad in {shard}: undecodable: not a readable image",
    ]


def test_plan_of_shards_without_samples_says_so(tmp_path):
    """It printed '0.0% of the sample kept; skipped there: none' for empty or non-tar shards."""
    (tmp_path / "shards").mkdir()
    tarfile.open(tmp_path / "shards" / "empty.tar", "w").close()
    (tmp_path / "shards" / "text.tar").write_bytes(b"not a tar\n" * 100)
    flags = ["--shards", str(tmp_path / "shards"), "--output", str(tmp_path / "out")]
    result = pvu("plan", *flags, *SMALL_BACKBONE_FLAGS, "--sample-images", "8")
    text = result.text
    assert result.exit_code == 2 and "the 2 shards sampled hold no samples" in text, text
    assert "empty.tar" in text and "text.tar" in text


def test_a_plan_whose_sample_keeps_no_row_names_the_member_flags(shards, tmp_path):
    """It printed '~0 rows' and '0.0 images/s' with no word on why, as `pvu cache` then failed."""
    flags = ["--shards", digits_only(shards, tmp_path), "--output", str(tmp_path / "out")]
    flags += ["--sample-images", "8", "--label-key", "txt"]
    result = pvu("plan", *flags, *SMALL_BACKBONE_FLAGS)
    text = result.text
    assert result.exit_code == 0 and "no_label=8" in text, text
    assert "`pvu cache` would cache no row: every sampled sample was skipped" in text
    assert "/ppm/pgm/pbm/pnm with <key>.txt, set --image-key / --label-key" in text
    # every skip no_label, as ImageNet's per-class tars given as shards: `pvu cache` says so
    assert "per-class archives (one class per tar, no label members" in text
    assert "make them into shards with pvu shards --input FOLDER" in text


def test_a_plan_whose_every_label_is_outside_the_head_blames_the_labels(shards, tmp_path):
    """Every sampled sample skipped as label_outside_head (a remap of another dataset's
    classes): plan advised --image-key / --label-key, where `pvu cache` names the remap."""
    remap = tmp_path / "remap.json"
    remap.write_text("[-1]")  # digit 0 to no class; the others past its end
    flags = ["--shards", digits_only(shards, tmp_path), "--output", str(tmp_path / "out")]
    flags += ["--sample-images", "8", "--label-remap", str(remap)]
    result = pvu("plan", *flags, *SMALL_BACKBONE_FLAGS)
    text = result.text
    assert result.exit_code == 0 and "label_outside_head=8" in text, text
    assert "`pvu cache` would cache no row: every sampled sample was skipped" in text
    assert "check --label-remap (pvu label-remap)" in text and "--label-space dataset" in text
    assert "--image-key" not in text and "pvu shards --input" not in text  # labels were read


def test_a_plan_of_deteriorated_copies_counts_them_as_copies_of_one_backbone(shards, tmp_path):
    """--also-deteriorate printed a full table per copy (the same model, rows and bytes,
    measured again) and "One pass runs all 3 backbones" for one backbone and two copies."""
    flags = ["--shards", digits_only(shards, tmp_path), "--output", str(tmp_path / "out")]
    flags += ["--sample-images", "8", "--augment", "eval"]
    blur, box = tmp_path / "blur", tmp_path / "box"
    copies = ["--also-deteriorate", f"blur:0.5,{blur}", "--also-deteriorate", f"box:1,{box}"]
    result = pvu("plan", *flags, *SMALL_BACKBONE_FLAGS, *copies)
    text = result.text
    assert result.exit_code == 0, result.output
    assert text.count("pvu plan: what `pvu cache` will do for") == 1, text
    assert "pvu plan: 2 deteriorated copies of resnet10t (--also-deteriorate)" in text
    assert f"blur:0.5 │ {blur}: ~" in text and f"box:1 │ {box}: ~" in text
    assert "One pass runs resnet10t and 2 deteriorated copies of it" in text
    assert "backbones" not in text


@pytest.mark.slow
def test_plan_reads_the_cache_jobs_config_file(shards, tmp_path):
    settings = {
        "shards": shards, "backbone": "resnet10t", "weights": "random", "input_size": 32,
        "output": str(tmp_path / "c"), "epochs": 3, "sample_images": 8,
    }  # fmt: skip
    config = tmp_path / "cache.yaml"
    config.write_text("".join(f"{key}: {value}\n" for key, value in settings.items()))
    result = pvu("plan", "--config", str(config), "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert "10 (2 epochs)" in result.text  # the flag overrides the file
    config.write_text(config.read_text() + "sample_image: 8\n")
    result = pvu("plan", "--config", str(config))
    assert result.exit_code == 2 and "unknown key 'sample_image'" in result.text, result.output


def test_a_measure_that_fails_leaves_no_decode_workers(shards, tmp_path):
    """A warm-up forward that failed (a model that takes 224 px only, at 32) left the plan's
    decode worker processes and their shared memory running until its traceback was freed."""
    settings = unit_settings(str(tmp_path / "cache"), decode_workers=1)
    model = create_backbone_model("mixer_s32_224", "random")
    prefixes = sample_shards(shard_sizes([f"{shards}/digits-0000.tar"]), 8)
    with pytest.raises(AssertionError, match="Input height") as raised:
        measure(Backbone(model, torch.device("cpu")), settings, prefixes)
    assert raised.value.__traceback__ is not None  # still held, as a caller's handler would
    assert not [child.name for child in multiprocessing.active_children()]


def test_a_gpu_rate_that_is_no_number_is_refused(tmp_path):
    """--images-per-second-per-gpu inf was taken: 'inf images/s per GPU', '0.0 min' of GPU
    time and '~inf decode cores/GPU' to feed it."""
    flags = ["--shards", str(tmp_path / "s.tar"), "--output", str(tmp_path / "out")]
    for rate in ("inf", "infinity"):
        result = pvu("plan", *flags, *SMALL_BACKBONE_FLAGS, "--images-per-second-per-gpu", rate)
        assert result.exit_code == 2, result.output
        assert "--images-per-second-per-gpu" in result.text and "finite" in result.text
