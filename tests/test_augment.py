"""The batched tensor steps (``SplitTransform``) give exactly timm's per-image transform."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipeline.cache.augment import (
    TransformConfig,
    augment,
    augment_pil,
    build_transform,
    resolve_transform,
    sample_seed,
    split_transform,
)
from pipeline.cache.backbone import describe_backbone
from pipeline.cache.samples import iter_samples
from pipeline.demo.data import write_photo_shards


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from collections import Counter

    from pipeline.cache.decode import decode_image

    [shard] = write_photo_shards(str(tmp_path_factory.mktemp("photos")), shards=1, per_shard=6)
    return [(s.key, decode_image(s.image)) for s in iter_samples(shard, counts=Counter())]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_split_transform_is_bit_identical_to_the_full_transform(images, mode):
    info = describe_backbone("resnet10t", "random")
    config = TransformConfig(augment=mode, input_size=(3, 64, 64), mean=(0.485, 0.456, 0.406))
    transform = build_transform(resolve_transform(config, info.data_config))
    split = split_transform(transform)
    assert split is not None
    seeded = [(image, sample_seed(7, 2, key)) for key, image in images]
    full = torch.stack([augment(transform, image, seed) for image, seed in seeded])
    parts = [augment_pil(split, image, seed) for image, seed in seeded]
    batched = split.to_tensor(torch.from_numpy(np.stack(parts)))
    assert batched.dtype == full.dtype and batched.is_contiguous()
    assert torch.equal(batched, full)


def test_seeding_matches_torch_manual_seed(images):
    """Seeding only torch's CPU generator draws the same augmentations as torch.manual_seed."""
    info = describe_backbone("resnet10t", "random")
    transform = build_transform(resolve_transform(TransformConfig(), info.data_config))
    _, image = images[0]
    random.seed(123)
    torch.manual_seed(123)
    expected = transform(image)
    assert torch.equal(augment(transform, image, 123), expected)


def test_transforms_not_ending_in_to_tensor_normalize_are_not_split():
    from torchvision import transforms

    assert split_transform(transforms.Compose([transforms.CenterCrop(8)])) is None
    assert split_transform(lambda image: image) is None


def test_crop_scale_reaches_the_train_transform_and_its_provenance():
    from jobs.run.cache_config import CacheJobConfig

    def crop_scale(**flags) -> tuple[float, float]:
        job = CacheJobConfig(shards="s", backbone="resnet10t", output="o", **flags)
        data_config = describe_backbone("resnet10t", "random").data_config
        resolved = resolve_transform(job.transform_config(), data_config)
        crop = build_transform(resolved).transforms[0]
        assert tuple(resolved["scale"]) == crop.scale  # the provenance says what runs
        return crop.scale

    assert crop_scale() == (0.08, 1.0)  # appendix A
    assert crop_scale(crop_scale=(0.5, 1.0)) == (0.5, 1.0)
    with pytest.raises(ValueError, match="crop_scale"):
        CacheJobConfig(shards="s", backbone="resnet10t", output="o", crop_scale=(0.5, 2.0))
