"""--mixed_precision_method: autocast dtype and gradient scaler for a device."""
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from training.errors import UserError


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


def make_precision(method: str, device) -> Precision:
    """Map --mixed_precision_method to autocast dtype and scaler for `device`."""
    device_type = torch.device(device).type
    if method not in ("apex", "fp16", "bf16", "none"):
        raise UserError(f"unknown mixed precision method {method!r}; expected apex, fp16, bf16 or none")
    if method == "none":
        dtype = None
    elif device_type == "cuda" and method in ("apex", "fp16"):
        dtype = torch.float16
    else:
        dtype = torch.bfloat16  # CPU autocast is only worthwhile (and safe) in bf16
    scaler = torch.amp.GradScaler(device_type, enabled=dtype is torch.float16)
    return Precision(method, device_type, dtype, scaler)
