"""The machine and the code a run uses: library versions, the git commit, the hardware with its GPUs' peak
FLOP/s, and whether the Hugging Face Hub can be reached.

`collect_run_info()` gathers versions, commit and hardware for the run folder's run_info.json; `peak_flops` looks
the GPU up in a table of dense bf16 tensor-core peaks (vendor datasheets, no sparsity), which MFU divides by
(training/tracking.py); `hub_reachable()` says whether to try the Hub at all, so offline runs fail fast.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

# Dense bf16 peak FLOP/s per device, from the vendors' datasheets (the sparsity figures are twice these).
# Matched against torch.cuda.get_device_name() in order: more specific names first.
PEAK_BF16_FLOPS = [
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]

LIBRARIES = ("torch", "transformers", "accelerate", "datasets", "tiktoken", "huggingface_hub", "safetensors")


def peak_bf16_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of one device, or None when the name is not in the table (MFU then not shown)."""
    if not device_name:
        return None
    return next((peak for key, peak in PEAK_BF16_FLOPS if key.lower() in device_name.lower()), None)


def peak_flops(peak_tflops: float | None, device) -> float | None:
    """Dense bf16 peak FLOP/s of one device for MFU: --peak_tflops, else the GPU table (None on CPU)."""
    if peak_tflops:
        return peak_tflops * 1e12
    import torch

    return peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def git_commit(repo: str | Path | None = None) -> str | None:
    """HEAD of the repository holding this file, with '-dirty' when tracked files changed; None outside git."""
    cwd = Path(repo or Path(__file__).resolve().parent)
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=cwd, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if info["gpu_count"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
        info["gpu_peak_bf16_tflops"] = (peak_bf16_flops(props.name) or 0) / 1e12 or None
    return info


def collect_run_info(extra: dict | None = None) -> dict:
    """Everything needed to tell later what produced a run: command, versions, commit, hardware."""
    return {
        "command": [sys.executable, *sys.argv],
        "git_commit": git_commit(),
        "versions": versions(),
        "hardware": hardware(),
        **(extra or {}),
    }


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """False when offline mode is on or the Hub's host name does not resolve: then the Hub is not tried at all
    (huggingface_hub would otherwise retry for ~25 s before giving up)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return True
    except OSError:
        return False
