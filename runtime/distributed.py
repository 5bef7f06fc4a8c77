"""Process groups: set-up under torchrun or srun, rank queries, DDP wrapping, gathering Python objects
and tensors (no-ops in one process)."""
import builtins
import itertools
import os
import re
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from runtime.errors import UserError


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


def expand_hostlist(hostlist: str) -> list[str]:
    """The host names of a SLURM hostlist such as `node[01-03,07],gpu5` (zero padding kept;
    several bracket groups in one name, `rack[1-2]-n[1-2]`, expand to every combination)."""
    names = []
    for pattern in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", hostlist):
        parts = re.split(r"\[([^\]]*)\]", pattern)  # literal, ranges, literal, ranges, ...
        choices = [[part] if index % 2 == 0 else _expand_ranges(part) for index, part in enumerate(parts)]
        names += ["".join(combination) for combination in itertools.product(*choices)]
    return names


def _expand_ranges(ranges: str) -> list[str]:
    """`01-03,07` -> ['01', '02', '03', '07']."""
    numbers = []
    for item in ranges.split(","):
        first, _, last = item.partition("-")
        numbers += [str(number).zfill(len(first)) for number in range(int(first), int(last or first) + 1)]
    return numbers


def slurm_environment(environ) -> dict:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) taken from
    SLURM's when the script was started by `srun` without torchrun in a step of several tasks;
    {} otherwise. Under torchrun (even one per node started by srun) torchrun's own win."""
    launched_by_torchrun = "RANK" in environ and "WORLD_SIZE" in environ
    if launched_by_torchrun or "SLURM_PROCID" not in environ or int(environ.get("SLURM_NTASKS", 1)) < 2:
        return {}
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not environ.get("MASTER_ADDR") and not nodelist:
        raise UserError("started by srun but SLURM_JOB_NODELIST is not set: set MASTER_ADDR to the first node")
    # Every task derives the same port from the job id; jobs sharing a node get different ones.
    default_port = 15000 + int(environ.get("SLURM_JOB_ID", 0)) % 10000
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": environ.get("MASTER_ADDR") or expand_hostlist(nodelist)[0],
            "MASTER_PORT": environ.get("MASTER_PORT") or str(default_port)}


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The env:// store, its keys scoped to torchrun's restart attempt: torchrun lends its
    rendezvous store to the workers, so after a restart the dead group's addresses are still
    there, and a process reading them would try to connect to a process that has gone."""
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(device: str, timeout_minutes: float = 30) -> torch.device:
    """Join the process group described by torchrun's environment, or by SLURM's under srun.

    Plain `python script.py` (no RANK/WORLD_SIZE, no multi-task srun step) runs as a single
    process. The backend is nccl for CUDA and gloo for CPU. A collective that waits longer
    than `timeout_minutes` (a peer died outside torchrun, which would stop the others) fails
    instead of hanging. Returns the device this process computes on.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    os.environ.update(slurm_environment(os.environ))  # env:// and run_cli read the result
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        compute_device = torch.device("cuda", local_rank)
    else:
        compute_device = torch.device(device)
    if launched:
        backend = "nccl" if compute_device.type == "cuda" else "gloo"
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        timeout = timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend=backend, store=_attempt_store(rank, world_size, timeout), timeout=timeout,
                                rank=rank, world_size=world_size,
                                device_id=compute_device if backend == "nccl" else None)
        print(f"| distributed init (rank {get_rank()} of {get_world_size()}, {backend})", flush=True)
        barrier()
    setup_for_distributed(get_rank() == 0)
    return compute_device


def choose_device(device=None) -> torch.device:
    """The device named (checked to exist here), else CUDA where there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; expected e.g. cpu, cuda or cuda:1") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device}: CUDA is not available on this machine; use cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise UserError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0")
    return chosen


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (a one-element list when not distributed)."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_main(obj=None):
    """Rank 0's picklable `obj` on every rank (the other ranks' `obj` is ignored); `obj` itself when
    not distributed."""
    if get_world_size() == 1:
        return obj
    message = [obj]
    dist.broadcast_object_list(message, src=0)
    return message[0]


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


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0 (no gradient flows back)."""
    if get_world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, keeping the autograd graph: each rank's
    slice receives the gradient summed over all ranks (every rank's loss depends on it)."""
    if get_world_size() == 1:
        return tensor
    return torch.cat(dist_nn.all_gather(tensor.contiguous()), dim=0)
