"""Float32 that stays float32 on CUDA: TF32 off for the numbers pvu records and compares."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

#: Whether this torch has the newer ``fp32_precision`` settings beside the older TF32 flags.
_NEW_API = hasattr(torch.backends.cudnn, "conv")
#: The settings :func:`exact_float32` turns to IEEE, and those it restores: torch's
#: ``set_float32_matmul_precision``, which restores the older flag, also writes oneDNN's.
_IEEE = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
_RESTORED = (*_IEEE, getattr(torch.backends.mkldnn, "matmul", None)) if _NEW_API else ()


def _readable(read: Callable[[], Any]) -> Any:
    """``read()``; None where torch finds an older flag at odds with the newer settings
    already (set through both) and refuses to read it."""
    try:
        return read()
    except RuntimeError:
        return None


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Float32 products and convolutions in IEEE float32 within, on CUDA, whatever TF32 is set
    to outside (and on a CPU, whatever ``torch.set_float32_matmul_precision`` lets oneDNN
    do); restored on exit.

    cuDNN runs float32 convolutions as TF32 by default, and cuBLAS its products where
    ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1`` (NVIDIA's PyTorch containers set it) or
    ``torch.set_float32_matmul_precision("high")`` says so. TF32 keeps 10 bits of mantissa:
    logits between 8 and 16 off by up to ~0.01, the losses with them, and cosine similarities
    far past a 1e-6 tie.

    Both generations of torch's settings are turned off, the older flags first: with only the
    newer ``fp32_precision`` at IEEE beside an older flag still at TF32 (what those two ways of
    turning it on set), torch finds the two at odds and raises wherever it checks them (its
    TunableOp GEMMs, cuDNN's RNNs, ``torch.backends.cuda.matmul.allow_tf32``).
    """
    if not _NEW_API:  # a torch before fp32_precision: the older flags alone
        before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
        return
    matmul = _readable(torch.get_float32_matmul_precision)
    cudnn = _readable(lambda: torch.backends.cudnn.allow_tf32)
    before = [setting.fp32_precision for setting in _RESTORED if setting is not None]
    torch.set_float32_matmul_precision("highest")  # cuBLAS's and oneDNN's, older and newer
    torch.backends.cudnn.allow_tf32 = False
    for setting in _IEEE:
        setting.fp32_precision = "ieee"
    try:
        yield
    finally:
        # the older flags first (an unreadable one stays off): their setters write newer ones
        if matmul is not None:
            torch.set_float32_matmul_precision(matmul)
        if cudnn is not None:
            torch.backends.cudnn.allow_tf32 = cudnn
        for setting, precision in zip((s for s in _RESTORED if s is not None), before, strict=True):
            setting.fp32_precision = precision
