"""training/tracking.py: the trackers' names, MFU."""

import numpy as np
import pytest

from gpt2_repro.base.machine import peak_bf16_flops
from gpt2_repro.training.tracking import mfu


def test_trackers_get_the_trainers_names():
    from gpt2_repro.training.tracking import TRACKER_NAMES

    assert TRACKER_NAMES["loss"] == "train/loss" and TRACKER_NAMES["lr"] == "train/learning_rate"
    assert TRACKER_NAMES["val_loss"] == "eval/loss" and TRACKER_NAMES["tokens"] == "train/num_input_tokens_seen"
    assert all(name.startswith(("train/", "eval/")) for name in TRACKER_NAMES.values())


def test_peak_flops_table_and_mfu():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA A10G") == 70e12
    assert peak_bf16_flops("NVIDIA L4") == 121e12 and peak_bf16_flops("NVIDIA L40S") == 362e12
    assert peak_bf16_flops("Some Future GPU") is None and peak_bf16_flops(None) is None
    # 124M at T=1024 is ~855M FLOPs/token (nanoGPT's estimate); 50% MFU on one H100 is ~578K tokens/s.
    assert mfu(855e6, 578e3, 989e12, 1) == pytest.approx(0.5, rel=0.01)
    assert mfu(855e6, 8 * 578e3, 989e12, 8) == pytest.approx(0.5, rel=0.01)
    assert np.isnan(mfu(855e6, 1e3, None, 1))
