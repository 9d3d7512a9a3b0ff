"""exact_float32 against TF32 turned on the ways a GPU node's process turns it on."""

from __future__ import annotations

import pytest
import torch

from pipeline.precision import exact_float32

pytestmark = pytest.mark.skipif(
    not hasattr(torch.backends.cudnn, "conv"), reason="a torch without fp32_precision"
)


@pytest.fixture
def legacy_tf32_on():
    """TF32 on through torch's older flags, as TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 (NVIDIA's
    containers) and torch.set_float32_matmul_precision("high") set it; restored afterwards."""
    settings = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
    newer = [setting.fp32_precision for setting in (*settings, torch.backends.mkldnn.matmul)]
    older = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.set_float32_matmul_precision(older[0])
    torch.backends.cudnn.allow_tf32 = older[1]
    for setting, value in zip((*settings, torch.backends.mkldnn.matmul), newer, strict=True):
        setting.fp32_precision = value


def test_tf32_is_off_through_both_generations_of_settings(legacy_tf32_on):
    # torch raises where it finds its older TF32 flags at odds with the newer fp32_precision
    # (its TunableOp GEMMs, cuDNN's RNNs, these getters): within, both say off
    with exact_float32():
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cudnn.allow_tf32 is False
        assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.allow_tf32 is True  # the process's own, restored
    assert torch.backends.cudnn.allow_tf32 is True
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_torchs_default_cudnn_flags_stay_readable():
    with exact_float32():
        assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is True
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
