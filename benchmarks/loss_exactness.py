"""The cached loss against float64, with CUDA's TF32 on for the process (a GPU check).

``Backbone.forward`` runs the backbone's head, loss, ``max_prob`` and ``entropy`` in IEEE
float32 whatever TF32 is set to (``pipeline.precision.exact_float32``; ``tests/test_backbone.py``
checks that it does). This turns TF32 on for products and convolutions, as NVIDIA's containers
(``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1``) and cuDNN's default do, and compares the loss of the
head on the same float32 features with float64: under ``exact_float32`` and under the
process's TF32. Random weights, the classifier scaled so that logits reach 8-16; on a CPU both
columns are exact (no TF32 there).

    .venv/bin/python benchmarks/loss_exactness.py --device cuda
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from pipeline.cache.backbone import create_backbone_model, model_head
from pipeline.precision import exact_float32


def _loss(model: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The per-sample cross-entropy of ``model``'s head on ``features``."""
    return F.cross_entropy(model_head(model, features, features.dtype)[1], labels, reduction="none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--backbones", nargs="+", default=["vit_base_patch16_224", "mobilenetv3_large_100"]
    )
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, 224, 224, generator=generator)
    print(f"device {device}; TF32 on for the process; max |loss - float64 loss|, nats")
    print("backbone | under exact_float32 (as pvu) | under the process's TF32")
    for name in args.backbones:
        model = create_backbone_model(name, "random").to(device)
        with torch.no_grad():
            model.get_classifier().weight.mul_(40)
        labels = torch.randint(0, model.num_classes, (args.images,), generator=generator)
        with torch.inference_mode():
            features = model.forward_features(images.to(device)).float()
            exact = _loss(model.double(), features.double(), labels.to(device)).float().cpu()
            model.float()
            loose = _loss(model, features, labels.to(device)).cpu()
            with exact_float32():
                ieee = _loss(model, features, labels.to(device)).cpu()
        print(f"{name} | {(ieee - exact).abs().max():.2e} | {(loose - exact).abs().max():.2e}")


if __name__ == "__main__":
    main()
