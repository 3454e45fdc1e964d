"""Device and precision are settings, not code paths.

``resolve_device("auto")`` picks CUDA, then Apple's MPS, then the CPU. ``autocast(device, precision)``
returns the context manager that runs the forward pass in that precision (weights stay fp32 for training).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from zenlm.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
# Weight dtypes for inference (``zenlm.load(RUN, dtype=...)``, ``--dtype``), by name.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """Turn "auto" | "cpu" | "cuda" | "cuda:N" | "mps" into a ``torch.device``, checking it exists."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for but MPS is not available; use --device cpu or auto.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device type {dev.type!r} is not supported; use auto, cpu, cuda or mps.")
    return dev


def resolve_dtype(name: str) -> torch.dtype:
    """"fp32" | "bf16" | "fp16" -> the torch dtype (ConfigError naming the choices otherwise)."""
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; choose fp32, bf16 or fp16.")
    return DTYPES[name]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's tensors live on (its first parameter's, or buffer's for a model of counts)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """True when this CPU runs bf16 matrix multiplies natively (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn "auto" into a concrete precision for ``device`` and refuse combinations that cannot work."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision {precision!r} is not supported; choose auto, fp32, bf16 or fp16.")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu":
            return "bf16" if cpu_has_bf16() else "fp32"
        return "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 is not supported on the CPU; use --precision bf16 or fp32.")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Context manager for the forward pass in ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (for honest timings); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
