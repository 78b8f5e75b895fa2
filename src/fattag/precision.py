"""Mixed precision and the GPU check: which autocast dtype a device runs with, and whether torch can use the GPU.

The autocast dtype is a setting of the device (`cfg.amp`), not a `device.type == "cuda"` branch, so that the
same training, throughput and prediction paths run under CPU autocast (bfloat16) in tests that have no GPU.
"""
from __future__ import annotations

import torch
from fastai.callback.fp16 import MixedPrecision

from .config import Config

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def amp_dtype(cfg: Config, device) -> torch.dtype | None:
    """The autocast dtype of `cfg.amp` on `device`: `auto` is float16 on CUDA and float32 (None) on the CPU, where
    bfloat16 is asked for with `bf16`; `off` is float32 everywhere (Config checks the name)."""
    if cfg.amp == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else None
    return AMP_DTYPES.get(cfg.amp)


def autocast(device, dtype: torch.dtype | None):
    """torch's autocast on `device` with `dtype`, or a disabled one for float32 (None)."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def grad_scaler(device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling for float16 (its range is narrow); bfloat16 has float32's range and float32 needs none."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=dtype == torch.float16)


class DeviceMixedPrecision(MixedPrecision):
    """fastai's MixedPrecision callback on the data's device with the given dtype: fastai 2.8 always autocasts
    for "cuda", which leaves a CPU run in float32 whatever it asks for. Everything after `before_fit` (loss
    scaling, skipped steps on overflow, float predictions) is fastai's."""

    def __init__(self, dtype: torch.dtype):
        super().__init__(amp_mode="fp16" if dtype == torch.float16 else "bf16")
        self.dtype = dtype

    def before_fit(self):
        device = self.learn.dls.device
        self.autocast, self.learn.scaler = autocast(device, self.dtype), grad_scaler(device, self.dtype)
        self.scales = []


def unsupported_gpu(name: str, capability: tuple[int, int], arch_list: list[str]) -> str | None:
    """Why this torch build cannot run on the GPU (`name`, compute capability `capability`), or None when it can.

    A build runs on a GPU when it ships kernels for its capability (`sm_XY` in `torch.cuda.get_arch_list()`), or
    PTX (`compute_XY`) of an equal or lower capability of the same major version that the driver can compile.
    Kaggle's torch 2.10 is a CUDA 12.8 build from sm_70 up: the retired P100 (6.0) is not among them.
    """
    major, minor = capability
    sm = [tuple(divmod(int(a.split("_")[1]), 10)) for a in arch_list if a.startswith("sm_")]
    ptx = [tuple(divmod(int(a.split("_")[1]), 10)) for a in arch_list if a.startswith("compute_")]
    if (major, minor) in sm or any(p[0] == major and p <= (major, minor) for p in ptx):
        return None
    oldest = min(sm, default=(7, 0))
    return (f"this torch {torch.__version__} (CUDA {torch.version.cuda}) has no kernels for the GPU {name} "
            f"(compute capability {major}.{minor}; built for {', '.join(arch_list) or 'no GPU'}). On Kaggle choose "
            f"the accelerator 'GPU T4 x2' (capability 7.5) in the notebook's settings; elsewhere use a GPU of "
            f"capability {oldest[0]}.{oldest[1]} or newer, or run on the CPU with CUDA_VISIBLE_DEVICES=''.")


def check_device(device) -> None:
    """Stop with one clear error when the device is a GPU this torch build cannot run on (before any training)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    index = device.index or 0
    why = unsupported_gpu(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index),
                          torch.cuda.get_arch_list())
    if why:
        raise SystemExit(f"error: {why}")
