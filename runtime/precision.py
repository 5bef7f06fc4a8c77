"""Autocast dtype and gradient scaler for a device: training's --mixed_precision_method
(make_precision) and the precision names of inference and the benchmarks (inference_precision)."""
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from runtime.errors import UserError

_PRINTED: set[str] = set()  # warnings already printed by this process
# The config key mixed_precision_method's values (configs/keys.py; --mixed_precision_method).
PRECISION_METHODS = ("apex", "fp16", "bf16", "none")


@dataclass
class Precision:
    """Autocast settings plus a GradScaler that is a no-op unless fp16 runs on CUDA."""
    method: str
    device_type: str
    dtype: torch.dtype | None  # None: full fp32
    scaler: torch.amp.GradScaler

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        kind = "fp32" if self.dtype is None else str(self.dtype).replace("torch.", "") + " autocast"
        return f"{self.method} -> {kind}{', gradient scaling' if self.scaler.is_enabled() else ''}"


def native_cpu_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (oneDNN: AVX512 core, AVX512-BF16 or AMX).

    Without that, bf16 is emulated in software: about 100x slower than fp32 on an AVX2-only
    AMD EPYC, which turns mixed precision into a slowdown.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: judge by the vector unit
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _print_once(message: str) -> None:
    if message not in _PRINTED:
        _PRINTED.add(message)
        print(message, flush=True)


def make_precision(method: str, device, cpu_bf16_is_native: Callable[[], bool] = native_cpu_bf16) -> Precision:
    """Map mixed_precision_method to autocast dtype and scaler for `device`.

    On CPU every method but `none` means bf16 autocast (fp16 autocast is neither faster nor
    safe there), but only where the CPU has native bf16 (`cpu_bf16_is_native`, injectable for
    tests): otherwise apex/fp16, which only ask for speed, run fp32 with a notice, and an
    explicit bf16 runs as asked with a warning.
    """
    device_type = torch.device(device).type
    if method not in PRECISION_METHODS:
        raise UserError(f"unknown mixed precision method {method!r}; expected apex, fp16, bf16 or none")
    if method == "none":
        dtype = None
    elif device_type == "cuda" and method in ("apex", "fp16"):
        dtype = torch.float16
    elif device_type != "cpu" or cpu_bf16_is_native():
        dtype = torch.bfloat16
    elif method == "bf16":
        dtype = torch.bfloat16
        _print_once("warning: this CPU has no native bf16 (no AVX512/AMX): bf16 autocast is emulated and "
                    "much slower than fp32; --mixed_precision_method none runs fp32")
    else:
        dtype = None
        _print_once(f"precision: --mixed_precision_method {method} runs fp32 on this CPU: it has no native "
                    "bf16 (no AVX512/AMX), and emulated bf16 is much slower than fp32")
    scaler = torch.amp.GradScaler(device_type, enabled=dtype is torch.float16)
    return Precision(method, device_type, dtype, scaler)


# Inference and benchmark precision names: no gradients, so no scaling.
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def inference_precision(name: str, device, cpu_bf16_is_native: Callable[[], bool] = native_cpu_bf16) -> Precision:
    """The autocast of a precision name; fp32 runs without. 'auto' picks bf16 where it is native
    (CUDA with bf16, or a CPU with AVX512/AMX), fp16 on older CUDA, else fp32: emulated bf16 on
    an AVX2-only CPU is far slower than fp32."""
    if name not in INFERENCE_PRECISIONS:
        raise UserError(f"unknown precision {name!r}; expected one of {', '.join(INFERENCE_PRECISIONS)}")
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.bfloat16 if device.type == "cpu" and cpu_bf16_is_native() else None
    else:
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return Precision(name, device.type, dtype, torch.amp.GradScaler(device.type, enabled=False))
