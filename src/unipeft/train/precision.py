"""Where and in what precision a run computes: the device, autocast, and fp16's gradient scaler.

Mixed precision as Micikevicius et al. (ICLR 2018, "Mixed Precision Training") describe it: the frozen base is
stored and multiplied in the low precision (bf16 or fp16) under ``torch.autocast``, the trainable tensors and the
optimizer's state stay in float32 (master weights), and fp16, whose range is narrow, scales the loss so that small
gradients do not flush to zero (``torch.amp.GradScaler``, which skips a step whose gradients overflowed).

``auto`` decides by capability, never by assumption:

- device ``auto`` is the first CUDA device when there is one, else the CPU;
- precision ``auto`` is bf16 on a CUDA device that supports it (fp16 on an older one), and on a CPU bf16 only if the
  CPU multiplies bf16 natively (oneDNN reports AVX-512 BF16 or AMX: there a bf16 matmul measured 2.7x faster than
  fp32), else fp32 (on a CPU without it, bf16 measured 23-31x slower).
"""

from __future__ import annotations

import contextlib
import re
from typing import Literal, get_args

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(spec: str) -> None:
    """Raise a ValueError naming the valid forms unless ``spec`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not isinstance(spec, str) or not _DEVICE.match(spec):
        raise ValueError(f"unknown device {spec!r}; valid: auto, cpu, cuda, cuda:N")


def resolve_device(spec: str) -> torch.device:
    """The device ``spec`` names (``auto``: CUDA when available, else CPU).

    Raises:
        ValueError: for a malformed spec, or ``cuda`` on a machine without a CUDA device (or without device N).
    """
    check_device(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {spec!r}: this machine has no CUDA device; use device=cpu or device=auto")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {spec!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively (CUDA: compute capability 8+; CPU: AVX-512 BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_precision(spec: str) -> None:
    """Raise a ValueError naming the valid choices unless ``spec`` is one of :data:`PRECISIONS`."""
    if spec not in PRECISIONS:
        raise ValueError(f"unknown precision {spec!r}; valid: {', '.join(PRECISIONS)}")


def resolve_precision(spec: str, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16``: ``spec`` itself, or the capability-based choice for ``auto``.

    Raises:
        ValueError: for an unknown precision.
    """
    check_precision(spec)
    if spec != "auto":
        return spec
    if native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to the precision's dtype on ``device``; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def keep_trainable_fp32(parameters: list[torch.nn.Parameter]) -> None:
    """Store the trainable tensors in float32 (master weights), whatever the base's dtype; in place."""
    for p in parameters:
        if p.dtype != torch.float32:
            p.data = p.data.float()


__all__ = ["PRECISIONS", "DTYPES", "check_device", "check_precision", "resolve_device", "native_bf16", "resolve_precision", "autocast",
           "grad_scaler", "keep_trainable_fp32"]
