"""Small generic helpers the scripts, training core and benchmarks share: seeding and RNG
state, the CPU allocator setting, atomic saves, file hashes, moving nested batches to a
device and listing the operations a function dispatches."""
import ctypes
import hashlib
import os
import random
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch

# Environment settings through which a user has already chosen how malloc behaves.
_ALLOCATOR_SETTINGS = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                       "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def keep_freed_cpu_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the OS.

    By default every tensor over glibc's mmap threshold (at most 32 MiB) is a fresh mapping
    that the kernel zero-fills page by page on first touch: up to 0.9 million page faults
    and 3-18% of a 32-frame CPU encoder forward (benchmarks/RESULTS.md). Serving all
    allocations from the heap and never trimming it removes them; the process keeps its
    peak memory instead of handing it back between steps. Returns whether it took effect:
    not on non-glibc systems, nor when the environment already configures the allocator.
    """
    if any(name in os.environ for name in _ALLOCATOR_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


def process_is_running(pid: int) -> bool:
    """Whether process `pid` exists on this host (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) for this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """This process's RNG states as tensors and plain python values (loads with weights_only)."""
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached_gauss)],
        "python": [version, list(python_state), gauss_next],
    }


def set_rng_state(state: dict) -> None:
    """Restore what `get_rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gauss))
    version, python_state, gauss_next = state["python"]
    random.setstate((version, tuple(python_state), gauss_next))


def atomic_write(path, write: Callable[[BinaryIO], object]) -> None:
    """`write(handle)` to a temporary file in the same folder, fsync, then rename it over `path`.

    A crash mid-write leaves any previous file at `path` intact, and never a half-written file that
    a rerun would take for a finished one. Callers guard the rank.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_torch_save(obj, path) -> None:
    """torch.save through atomic_write."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_bytes(path, data: bytes) -> None:
    """`data` written through atomic_write."""
    atomic_write(path, lambda handle: handle.write(data))


def file_sha256(path) -> str:
    """The hex sha256 of a file's bytes, read in 4 MiB blocks (a checkpoint may not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def move_to_device(batch, device: torch.device):
    """Tensors anywhere in nested lists/tuples/dicts moved to `device`; the rest untouched."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


def dispatched_ops(function) -> list[str]:
    """The aten operations `function()` dispatches, in order: equal lists mean the same work,
    which timing cannot show to within 1% on a busy machine."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder() as recorder:
        function()
    return recorder.ops
