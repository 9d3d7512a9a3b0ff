"""``--decode device``: JPEGs decoded and timm's transform run on the backbone's device. Here the
device is the CPU (libjpeg-turbo through torchvision); on a GPU the same code runs nvJPEG."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from skimage import data
from support import BACKBONE, make_runner, unit_settings
from torchvision import transforms

from jobs.run.cache_config import CacheJobConfig
from pipeline.cache import device_decode
from pipeline.cache.augment import TransformConfig, augment_pil, resolve_transform, seed_rngs
from pipeline.cache.decode import decode_image
from pipeline.cache.decode_pool import Skip, build_prepare
from pipeline.cache.device_decode import DeviceDecoder, color_jitter
from pipeline.cache.manifest import Manifest, ProvenanceMismatch, provenance_differences
from pipeline.cache.skips import BadSample
from pipeline.cache.unit import Unit
from pipeline.cache.verify import reconcile
from pipeline.demo.data import write_bad_shard, write_digit_shards
from pipeline.head.checkpoint import _provenance_differences
from schemas import read_provenance

SIZE = 64


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """Real photographs in the formats and modes shards hold: the device decodes the JPEGs it
    can, Pillow the rest (PNG, CMYK JPEG)."""
    astronaut = Image.fromarray(data.astronaut()).resize((300, 220))
    return {
        "jpeg": _encoded(astronaut, "JPEG", quality=90),
        "progressive": _encoded(Image.fromarray(data.chelsea()), "JPEG", progressive=True),
        "gray-jpeg": _encoded(Image.fromarray(data.camera()).resize((200, 260)), "JPEG"),
        "cmyk-jpeg": _encoded(astronaut.convert("CMYK"), "JPEG"),
        "png": _encoded(Image.fromarray(data.coffee()).resize((240, 160)), "PNG"),
    }


def _resolved(augment: str, crop_mode: str | None = None) -> dict:
    config = TransformConfig(
        augment=augment, input_size=(3, SIZE, SIZE), crop_mode=crop_mode, decode="device"
    )
    return resolve_transform(config, {"mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875})


@pytest.mark.parametrize("size", [(20, 30), (224, 224), (384, 384)], ids=str)
def test_color_jitter_on_a_batch_is_the_pil_paths_per_image_bit_for_bit(size):
    """torchvision's tensor formulas truncate a gray pixel a level down at each op: gray images
    ended up to 3 levels darker than the PIL path's."""
    jitter = transforms.ColorJitter(0.4, 0.4, 0.4)
    batch = torch.randint(0, 256, (24, 3, *size), dtype=torch.uint8)
    batch[:8] = batch[:8, :1]  # gray images
    batch[8:12] = 128  # flat gray ones
    ranges = (jitter.brightness, jitter.contrast, jitter.saturation, None)
    expected, params = [], []
    for index, image in enumerate(batch):
        seed_rngs(index)
        jittered = jitter(Image.fromarray(image.permute(1, 2, 0).numpy()))
        expected.append(torch.from_numpy(np.array(jittered)).permute(2, 0, 1))
        seed_rngs(index)
        params.append(jitter.get_params(*ranges))
    assert torch.equal(color_jitter(batch.clone(), params), torch.stack(expected))


@pytest.mark.parametrize("probability", [None, 0.5, 1.0])
def test_a_jitter_applied_at_random_is_the_pil_paths_bit_for_bit(probability):
    """``color_jitter_prob`` wraps timm's jitter in a RandomApply, which ran torchvision's
    tensor formulas: a flat gray image (any resize keeps it flat) came out a level darker than
    the PIL path's, whose jitter is Pillow's."""
    config = TransformConfig(
        input_size=(3, SIZE, SIZE), color_jitter_prob=probability, decode="device"
    )
    resolved = resolve_transform(config, {"mean": (0.5,) * 3, "std": (0.5,) * 3})
    flat = _encoded(Image.new("RGB", (80, 60), (128, 128, 128)), "PNG")
    tasks = [(f"flat-{seed}", flat, seed) for seed in range(12)]
    prepared = DeviceDecoder([resolved], torch.device("cpu")).prepare(tasks)
    split = build_prepare(resolved)[1]
    pil = [augment_pil(split, decode_image(flat), seed) for _, _, seed in tasks]
    device = [image.numpy() for (image,) in prepared]
    assert all(np.array_equal(a, b) for a, b in zip(device, pil, strict=True))
    if probability == 0.5:  # some images jittered, some not
        assert len({int(image[0, 0, 0]) for image in pil}) > 2


@pytest.mark.parametrize(
    ("augment", "crop_mode"),
    [("train", None), ("eval", None), ("eval", "squash"), ("eval", "border")],  # border pads
)
def test_each_image_gets_the_pil_paths_crop_flip_and_jitter(photos, augment, crop_mode):
    resolved = _resolved(augment, crop_mode)
    split = build_prepare(resolved)[1]
    tasks = [(name, encoded, 1000 + index) for index, (name, encoded) in enumerate(photos.items())]
    prepared = DeviceDecoder([resolved], torch.device("cpu")).prepare(tasks)
    for (name, encoded, seed), (image,) in zip(tasks, prepared, strict=True):
        assert image.dtype == torch.uint8 and tuple(image.shape) == (SIZE, SIZE, 3), name
        pil = decode_image(encoded)
        same_draws = augment_pil(split, pil, seed).astype(int)
        difference = np.abs(image.numpy().astype(int) - same_draws).mean()
        assert difference < 2.0, f"{name}: {difference:.2f} levels from the PIL path"
        if augment == "train":  # another seed's crop is far off: the draws are what match
            other = np.abs(image.numpy().astype(int) - augment_pil(split, pil, seed + 1)).mean()
            assert other > 5 * max(difference, 1.0), name


def _levels_apart(resolved: dict, photos: dict[str, bytes]) -> dict[str, float]:
    """Per photo, the mean difference between the device's image and the PIL path's."""
    split = build_prepare(resolved)[1]
    tasks = [(name, encoded, 1000 + index) for index, (name, encoded) in enumerate(photos.items())]
    prepared = DeviceDecoder([resolved], torch.device("cpu")).prepare(tasks)
    return {
        name: np.abs(
            image.numpy().astype(int) - augment_pil(split, decode_image(encoded), seed)
        ).mean()
        for (name, encoded, seed), (image,) in zip(tasks, prepared, strict=True)
    }


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_a_nearest_resize_samples_pixel_centres_as_pillow_does(photos, crop_mode):
    """torchvision's NEAREST on tensors samples each output pixel's corner, Pillow's its centre:
    the device's images were 5 to 20 levels from the PIL path's."""
    config = TransformConfig(
        augment="eval",
        input_size=(3, SIZE, SIZE),
        interpolation="nearest",
        crop_mode=crop_mode,
        decode="device",
    )
    resolved = resolve_transform(config, {"mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert max(_levels_apart(resolved, photos).values()) < 0.5


@pytest.mark.parametrize("interpolation", ["lanczos", "box", "hamming"])
def test_a_resampling_tensors_lack_is_refused_before_any_image(interpolation):
    """torchvision resizes no tensor with box, hamming or lanczos: every chunk failed mid-run."""
    config = TransformConfig(augment="eval", input_size=(3, SIZE, SIZE), decode="device")
    data_config = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": interpolation}
    with pytest.raises(ValueError, match=f"no '{interpolation}' resampling.*--decode pil"):
        resolve_transform(config, data_config)
    on_pil = config.model_copy(update={"decode": "pil"})
    assert resolve_transform(on_pil, data_config)["interpolation"] == interpolation


def test_a_chunk_of_large_photos_decoded_in_parts_gives_the_same_images(photos, monkeypatch):
    tasks = [(name, encoded, index) for index, (name, encoded) in enumerate(photos.items())]
    decoder = DeviceDecoder([_resolved("train"), _resolved("eval")], torch.device("cpu"))
    whole = decoder.prepare(tasks)
    monkeypatch.setattr(device_decode, "DECODE_PIXELS", 1)  # one image a part
    for (name, _, _), in_parts, at_once in zip(tasks, decoder.prepare(tasks), whole, strict=True):
        assert all(map(torch.equal, in_parts, at_once)), name


def test_bad_images_are_skipped_for_the_pil_paths_reasons(photos):
    cut = photos["jpeg"][: len(photos["jpeg"]) // 2]
    bad = {
        "empty": b"",
        "junk": b"not an image at all",
        "cut-jpeg": cut,
        "cut-jpeg-padded": cut + b"\0" * 64,
        "tiny-jpeg": _encoded(Image.new("RGB", (4, 4)), "JPEG"),
        "strip-jpeg": _encoded(Image.new("RGB", (2000, 10)), "JPEG"),
        "bad-marker": photos["jpeg"][:200] + b"\xff\x00" * 500 + b"\xff\xd9",
    }
    tasks = [(name, encoded, 0) for name, encoded in bad.items()]
    prepared = DeviceDecoder([_resolved("train")], torch.device("cpu")).prepare(tasks)
    for (name, encoded, _), result in zip(tasks, prepared, strict=True):
        try:
            decode_image(encoded, key=name)
        except BadSample as expected:
            assert isinstance(result, Skip), f"{name}: the PIL path skips it as {expected.reason}"
            assert (result.reason, result.key) == (expected.reason, name)
        else:
            assert not isinstance(result, Skip), f"{name}: the PIL path keeps it"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_digit_shards(
        str(tmp_path_factory.mktemp("shards")), shards=1, per_shard=12, size=40
    )


def test_a_unit_cached_on_the_device_is_reproducible_and_says_so(tmp_path, shards):
    runner = make_runner(str(tmp_path / "device"), decode="device")
    first = runner.run(Unit(shards[0], "digits-0000", 0))
    table = pq.read_table(tmp_path / "device" / first.relpath)
    assert table.num_rows == 12 and read_provenance(table.schema)["backbone"] == BACKBONE
    assert read_provenance(table.schema)["transform"]["decode"] == "device"
    (tmp_path / "device" / first.relpath).unlink()
    again = make_runner(str(tmp_path / "device"), decode="device").run(
        Unit(shards[0], "digits-0000", 0)
    )
    assert pq.read_table(tmp_path / "device" / again.relpath).equals(table)

    pil = make_runner(str(tmp_path / "pil"))
    assert "decode" not in pil.settings.transform, "the PIL path's record is unchanged"
    reconcile(Manifest.open(str(tmp_path / "device"), runner.settings.provenance))
    with pytest.raises(ProvenanceMismatch, match="transform"):
        Manifest.open(str(tmp_path / "device"), pil.settings.provenance)


def test_a_refusal_names_the_pil_decode_a_cache_does_not_record():
    """It said `transform.decode: cache has 'device', this run asks for None` to a user who
    ran `--decode pil` (or no --decode) into a device cache, and `this run None` on --resume."""
    pil = {"seed": 0, "transform": {"is_training": True}}
    device = {"seed": 0, "transform": {"is_training": True, "decode": "device"}}
    assert provenance_differences(device, pil) == [
        "transform.decode: cache has 'device', this run asks for 'pil'"
    ]
    assert provenance_differences(pil, device) == [
        "transform.decode: cache has 'pil', this run asks for 'device'"
    ]
    assert provenance_differences(pil, pil) == []
    assert _provenance_differences([device], [pil]) == [
        "transform.decode: the checkpoint has device, this run pil"
    ]


def test_bad_samples_of_a_shard_are_counted_as_on_the_pil_path(tmp_path):
    write_bad_shard(str(tmp_path / "bad.tar"))
    unit = Unit(str(tmp_path / "bad.tar"), "bad", 0)
    on_device = make_runner(str(tmp_path / "device"), decode="device").run(unit)
    on_pil = make_runner(str(tmp_path / "pil")).run(unit)
    assert on_device.skipped == on_pil.skipped and on_device.rows == on_pil.rows > 0


def test_what_the_device_cannot_do_is_refused_naming_the_flags():
    base = {"shards": "s/", "backbone": BACKBONE, "output": "out", "decode": "device"}
    with pytest.raises(ValidationError, match="--deteriorate runs on PIL images"):
        CacheJobConfig(**base, augment="eval", deteriorate="blur:0.5")
    with pytest.raises(ValidationError, match="--decode-workers 2 starts PIL decoding"):
        CacheJobConfig(**base, decode_workers=2)
    assert CacheJobConfig(**base).transform_config().decode == "device"


def test_the_decoders_stream_is_idle_before_nvjpeg_writes(photos, monkeypatch):
    """torchvision allocates nvJPEG's outputs on the current stream (the decoder's) but writes
    them on a stream of its own that waits for nothing: a block the previous chunk's queued
    kernels still read would be overwritten. The decoder's stream must be idle first."""
    events: list[str] = []

    class Stream:  # the decoder's CUDA stream, here where there is no GPU
        def synchronize(self) -> None:
            events.append("synchronize")

    real = device_decode._decode_jpeg

    def decode(encoded, device):
        events.append("decode")
        return real(encoded, device)

    decoder = DeviceDecoder([_resolved("eval")], torch.device("cpu"))
    monkeypatch.setattr(device_decode, "_decode_jpeg", decode)
    decoder.stream = Stream()
    decoder._decode_jpegs([photos["jpeg"]])
    assert events == ["synchronize", "decode"]


def test_the_same_views_decoded_two_ways_are_not_trained_on_twice(tmp_path, shards):
    """A pil cache and a device cache of the same shards, seed and epochs hold the same crops
    (losses a rounding apart): train-head took both and trained each view twice."""
    from pipeline.cache.index import open_cache

    unit = Unit(shards[0], "digits-0000", 0)
    for decode in ("pil", "device"):
        make_runner(str(tmp_path / decode), decode=decode).run(unit)
    twice = r"made twice \(transform.decode: .*'pil'.*'device'\): their rows"
    with pytest.raises(ValueError, match=twice):
        open_cache([str(tmp_path / "pil"), str(tmp_path / "device")])
    make_runner(str(tmp_path / "later"), decode="device").run(Unit(shards[0], "digits-0000", 1))
    assert open_cache([str(tmp_path / "pil"), str(tmp_path / "later")]).rows == 24


def test_a_torchvision_that_cannot_decode_on_the_device_is_warned_of(monkeypatch, caplog):
    """A torchvision built without nvJPEG fails every decode on the GPU: each JPEG then went
    through Pillow without a word, the run as slow as the PIL path."""

    def no_nvjpeg(encoded, device):
        raise RuntimeError("decode_jpegs_cuda: torchvision not compiled with nvJPEG support")

    monkeypatch.setattr(device_decode, "_decode_jpeg", no_nvjpeg)
    device_decode._check_decoder.cache_clear()
    with caplog.at_level("WARNING", logger="pipeline.cache.device_decode"):
        DeviceDecoder([_resolved("train")], torch.device("cpu"))
        DeviceDecoder([_resolved("eval")], torch.device("cpu"))  # once a process
    assert "torchvision cannot decode JPEGs on cpu (decode_jpegs_cuda: torchvision not" in (
        caplog.text
    )
    assert caplog.text.count("cannot decode JPEGs") == 1
    caplog.clear()
    monkeypatch.undo()
    device_decode._check_decoder.cache_clear()
    with caplog.at_level("WARNING", logger="pipeline.cache.device_decode"):
        DeviceDecoder([_resolved("train")], torch.device("cpu"))
    assert not caplog.text


def test_the_same_views_made_on_other_compute_are_not_trained_on_twice(tmp_path, shards):
    """A device cache is made on a GPU (bf16) and a pil one often on a CPU (fp32): their
    provenance differs in compute too, and the two-decodes refusal missed exactly that pair."""
    from pipeline.cache.backbone import Backbone, create_backbone_model
    from pipeline.cache.index import open_cache
    from pipeline.cache.unit import UnitRunner

    unit = Unit(shards[0], "digits-0000", 0)
    make_runner(str(tmp_path / "cpu"), decode="pil").run(unit)
    settings = unit_settings(str(tmp_path / "gpu"), decode="device")
    on_gpu = {**settings.provenance, "compute": {"device": "cuda", "autocast": "bfloat16"}}
    model = Backbone(create_backbone_model(BACKBONE, "random"), torch.device("cpu"))
    UnitRunner(model, settings.model_copy(update={"provenance": on_gpu})).run(unit)
    with pytest.raises(ValueError, match=r"made twice \(.*compute.*\): their rows"):
        open_cache([str(tmp_path / "cpu"), str(tmp_path / "gpu")])
