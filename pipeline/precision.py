"""Float32 that stays float32 on CUDA: TF32 off for the numbers pvu records and compares."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: The CUDA settings that may run float32 work as TF32, cuBLAS's products and cuDNN's
#: convolutions (a timm head's 1x1 conv_head, as MobileNetV3's), and their IEEE value: torch's
#: newer ``fp32_precision`` where it has them (mixing them with the older flags is an error).
_TF32_SETTINGS = (
    ((torch.backends.cuda.matmul, "fp32_precision", "ieee"),
     (torch.backends.cudnn.conv, "fp32_precision", "ieee"))
    if hasattr(torch.backends.cudnn, "conv")
    else ((torch.backends.cuda.matmul, "allow_tf32", False),
          (torch.backends.cudnn, "allow_tf32", False))
)  # fmt: skip


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
    before = [getattr(owner, name) for owner, name, _ in _TF32_SETTINGS]
    for owner, name, exact in _TF32_SETTINGS:
        setattr(owner, name, exact)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(_TF32_SETTINGS, before, strict=True):
            setattr(owner, name, value)
