"""Process groups: set-up under torchrun, rank queries, DDP wrapping, gathering Python objects."""
import builtins
import os

import torch
import torch.distributed as dist

from training.errors import UserError


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


_BUILTIN_PRINT = builtins.print


def seed_for_rank(seed: int, epoch: int | None = None) -> int:
    """seed + rank at start-up; per epoch, a distinct stream so an epoch's randomness does not
    depend on what ran before it (evaluation, a restart)."""
    return seed + get_rank() + (0 if epoch is None else 10007 * (epoch + 1))


def setup_for_distributed(is_master: bool) -> None:
    """Silence `print` on every rank but the main one; `print(..., force=True)` still prints."""
    def rank_aware_print(*args, force=False, **kwargs):
        if is_master or force:
            _BUILTIN_PRINT(*args, **kwargs)

    builtins.print = rank_aware_print


def init_distributed(device: str) -> torch.device:
    """Join the process group described by torchrun's environment, if any.

    Plain `python script.py` (no RANK/WORLD_SIZE) runs as a single process. The backend is
    nccl for CUDA and gloo for CPU. Returns the device this process computes on.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        compute_device = torch.device("cuda", local_rank)
    else:
        compute_device = torch.device(device)
    if launched:
        backend = "nccl" if compute_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://",
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                device_id=compute_device if backend == "nccl" else None)
        print(f"| distributed init (rank {get_rank()} of {get_world_size()}, {backend})", flush=True)
        barrier()
    setup_for_distributed(get_rank() == 0)
    return compute_device


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (a one-element list when not distributed)."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def wrap_distributed(model: torch.nn.Module, device: torch.device,
                     find_unused_parameters: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around `model` when distributed, else the model itself."""
    if get_world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model
