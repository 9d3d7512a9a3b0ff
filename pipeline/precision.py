"""Float32 that stays float32 on CUDA: TF32 off for the numbers pvu records and compares."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: The CUDA settings that may run float32 work as TF32: cuBLAS's products and cuDNN's
#: convolutions (a timm head's 1x1 conv_head, as MobileNetV3's).
_TF32_SETTINGS = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Float32 products and convolutions in IEEE float32 within, on CUDA, whatever TF32 is set
    to outside; restored on exit (the CPU is unaffected either way).

    cuDNN runs float32 convolutions as TF32 by default, and cuBLAS its products where
    ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1`` (NVIDIA's PyTorch containers set it) or
    ``torch.set_float32_matmul_precision("high")`` says so. TF32 keeps 10 bits of mantissa:
    logits between 8 and 16 off by up to ~0.01, the losses with them, and cosine similarities
    far past a 1e-6 tie.
    """
    before = [setting.fp32_precision for setting in _TF32_SETTINGS]
    for setting in _TF32_SETTINGS:
        setting.fp32_precision = "ieee"
    try:
        yield
    finally:
        for setting, precision in zip(_TF32_SETTINGS, before, strict=True):
            setting.fp32_precision = precision
