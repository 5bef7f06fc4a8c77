"""Autocast dtype and gradient scaler for a device: training's --mixed_precision_method
(make_precision) and the precision names of inference and the benchmarks (inference_precision),
with int8: the video encoder's linear layers dynamically quantised (quantize_linear_layers)."""
import platform
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

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
    int8: bool = False  # the video encoder's linear layers run as dynamic int8 (quantize_linear_layers)
    reason: str | None = None  # why 'auto' chose this, in words

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    @property
    def label(self) -> str:
        """What an index manifest records as its precision: fp32, bfloat16, float16 or int8."""
        return "int8" if self.int8 else str(self.dtype or "fp32").replace("torch.", "")

    @property
    def name(self) -> str:
        """The precision name (INFERENCE_PRECISIONS) that gives this precision again: never 'auto'."""
        return LABEL_NAMES[self.label]

    def describe(self) -> str:
        if self.int8:
            kind = "int8 dynamic quantisation of the video encoder's linear layers"
        else:
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
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
# Precision.label (what an index manifest records) -> the precision name that runs it.
LABEL_NAMES = {"fp32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "int8"}
# Why 'auto' never picks int8 (benchmarks/RESULTS.md, "Own videos", bench_int8, 2-vCPU AMD EPYC): the int8
# video encoder runs 1.8x fp32 with AVX2 (2.5-2.8x with AVX-512), but it changes near-tied token-merging
# decisions, so the ITC top-10 of a search keeps 65-67% of fp32's hits (target 90%) on the trained toy model;
# bf16 does no better (61%). Without merging int8 keeps 98%.
INT8_TRADE = "--precision int8 encodes 1.8x faster but keeps only 2/3 of fp32's top-10 search hits on the toy model"


def int8_available() -> bool:
    """Whether this torch has dynamic int8 linear kernels for x86 (fbgemm/x86 quantized engine)."""
    try:
        from torch.ao.quantization import quantize_dynamic  # noqa: F401  (deprecated: see quantize_linear_layers)
    except ImportError:
        return False
    return bool({"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines))


def fast_cpu_int8() -> bool:
    """Whether --precision int8 is faster than fp32 on this CPU: x86-64 with AVX2 or better and int8
    kernels in this torch (measured 1.8x fp32 with AVX2, 2.5-2.8x with AVX-512)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and int8_available()


def inference_precision(name: str, device, cpu_bf16_is_native: Callable[[], bool] = native_cpu_bf16,
                        cpu_int8_is_fast: Callable[[], bool] = fast_cpu_int8) -> Precision:
    """The autocast of a precision name; fp32 runs without, int8 too (its video encoder is
    quantised by quantize_linear_layers; CPU only, refused elsewhere in one line). 'auto' picks,
    with its reason in `.reason`: bf16 on CUDA where supported (else fp16), bf16 on a CPU that runs
    it natively, else fp32 (emulated bf16 is far slower); never int8, which misses the search
    agreement target with token merging (INT8_TRADE), but its line names int8 where it is faster.
    Tests inject the CPU's answers (`cpu_bf16_is_native`, `cpu_int8_is_fast`)."""
    if name not in INFERENCE_PRECISIONS:
        raise UserError(f"unknown precision {name!r}; expected one of {', '.join(INFERENCE_PRECISIONS)}")
    device = torch.device(device)
    reason = None
    if name == "int8" and device.type != "cpu":
        raise UserError(f"--precision int8 runs on the CPU only (dynamic int8 kernels), not on {device}; use "
                        "bf16 or fp16 there")
    if name == "auto":
        name, reason = _auto(device, cpu_bf16_is_native, cpu_int8_is_fast)
    if name == "int8" and not int8_available():
        raise UserError("--precision int8 needs torch's dynamic int8 kernels (torch.ao.quantization with the "
                        "x86/fbgemm engine), which this torch build lacks; use --precision fp32")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}[name]
    return Precision(name if reason is None else "auto", device.type, dtype,
                     torch.amp.GradScaler(device.type, enabled=False), int8=name == "int8", reason=reason)


def _auto(device: torch.device, cpu_bf16_is_native, cpu_int8_is_fast) -> tuple[str, str]:
    """The precision name 'auto' runs on `device`, and why, in words."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "this GPU runs bf16"
        return "fp16", "this GPU has no bf16"
    if device.type != "cpu":
        return "fp32", f"no faster precision is known for {device.type}"
    if cpu_bf16_is_native():
        return "bf16", "this CPU runs bf16 natively"
    if cpu_int8_is_fast():
        return "fp32", f"this CPU has no native bf16; {INT8_TRADE}"
    return "fp32", "this CPU has no native bf16"


def quantize_linear_layers(module: nn.Module, qconfig_spec: dict | None = None) -> nn.Module:
    """`module` with its nn.Linear layers (in the video encoder: attention and MLP, about 70% of
    its time) replaced, in place, by dynamically quantised int8 ones: int8 weights with one scale
    per tensor, activations quantised per call, float32 outputs. What --precision int8 applies to
    the video encoder (inference.api.VideoLanguageModel.load); the text side stays fp32.
    `qconfig_spec` (quantize_dynamic's: module types or names -> qconfig) quantises other layers
    or other ways (benchmarks/bench_int8.py measures some: per-channel scales, the MLPs only, all
    but qkv; none kept 90% of a search's top 10 at 1.5x fp32's rate on the toy model).

    torch.ao.quantization is deprecated in favour of torchao's quantize_, but torchao's int8
    dynamic linear runs slower than fp32 on a CPU without torch.compile (0.87x measured on a
    768x3072 layer, against 3.9x for this one); its deprecation warnings are silenced here, and a
    torch without it is refused by inference_precision in one line."""
    from torch.ao.quantization import quantize_dynamic
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.ao\.quantization")
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*quantize_per_tensor")
        return quantize_dynamic(module, qconfig_spec or {nn.Linear}, dtype=torch.qint8, inplace=True)


def precision_for_index(requested: str, stored: str | None, device, index_folder, updating: bool,
                        cpu_bf16_is_native: Callable[[], bool] = native_cpu_bf16) -> tuple[str, str | None]:
    """The precision name a run on the index in `index_folder`, encoded at `stored` (its manifest's
    label; None for an index that does not record it), runs at, and the reason when 'auto' follows the
    index. The rows of one index share one precision, so 'auto' takes the index's where `device`
    runs it (int8 on a CPU, bf16 on a GPU or a CPU with native bf16, fp16 on a GPU, fp32 anywhere);
    an update (`updating`) that cannot is refused in one line saying what to do, a search falls back
    to the device's own choice (the index's embeddings are what they are; only re-encoded
    candidates differ). A precision given explicitly is kept: inference.index refuses an update
    at another precision than the index's."""
    if requested != "auto" or stored not in LABEL_NAMES:
        return requested, None
    name, device = LABEL_NAMES[stored], torch.device(device)
    unfit = None
    if name == "int8" and (device.type != "cpu" or not int8_available()):
        unfit = ("which runs on a CPU only" if device.type != "cpu" else "and this torch has no int8 kernels",
                 "update it with --device cpu")
    elif name == "fp16" and device.type != "cuda":
        unfit = ("which a GPU runs", "update it on a GPU or pass --precision fp16")
    elif name == "bf16" and device.type == "cpu" and not cpu_bf16_is_native():
        unfit = ("which this CPU only emulates, far slower than fp32", "pass --precision bf16 to update it anyway")
    if unfit is None:
        return name, f"index {index_folder} was encoded at {stored}: the rows of an index share one precision"
    if not updating:
        return requested, None
    raise UserError(f"index {index_folder} was encoded at {stored}, {unfit[0]}: {unfit[1]}, or index into "
                    "another --index folder")
