"""Naming the machine a measurement ran on and measuring peak memory, written once for the
benchmarks and the sweep: the CPU's model or the GPU's name, and the memory peak since a reset
(CUDA's allocator peak, or the process's peak RSS on a Linux CPU)."""
from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

import torch

MMAP_THRESHOLD = 1 << 16  # bytes: every allocation above it is a mapping of its own, handed back when freed
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows of the processor."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """What timings were measured on: the GPU's name, or the CPU's model and torch's threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{cpu_model()} ({threads} thread{'s' if threads > 1 else ''})"


def return_freed_memory_to_os() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD, so that every tensor is its own mapping, handed
    back to the OS when freed: by default glibc raises the threshold after large frees and keeps
    freed tensors in the heap, so the RSS would still hold an earlier step's memory and a later
    step's peak RSS could not fall below it. Costs some page faults.

    Also set in the environment (MALLOC_MMAP_THRESHOLD_), for the processes this one starts and
    for utils.keep_freed_cpu_memory, which leaves an allocator configured there alone. Returns
    whether it took effect (not on non-glibc systems)."""
    try:
        fixed = bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
    if fixed:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    return fixed


def peak_memory_kind(device: torch.device) -> str | None:
    """What peak_memory_mib measures on `device`; None where it cannot (a CPU without Linux's /proc)."""
    if device.type == "cuda":
        return "cuda max_memory_allocated"
    return "cpu peak RSS (VmHWM)" if os.path.exists("/proc/self/clear_refs") else None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator peak, or the process's peak RSS (Linux resets VmHWM to the
    current RSS when '5' is written to /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif peak_memory_kind(device):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib(device: torch.device) -> float | None:
    """The peak since reset_peak_memory: allocated CUDA memory, or the process's RSS (which holds
    the weights, the interpreter and allocator caches too); None where unmeasured."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return _process_status_mib("VmHWM") if peak_memory_kind(device) else None


def current_memory_mib(device: torch.device) -> float | None:
    """Allocated CUDA memory, or the process's RSS, now; None where unmeasured."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    return _process_status_mib("VmRSS") if peak_memory_kind(device) else None


def _process_status_mib(field: str) -> float:
    """A memory field of /proc/self/status (given there in KiB), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")
