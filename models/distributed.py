"""Gathering features across processes for the contrastive losses (no-ops in one process)."""
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0 (no gradient flows back)."""
    if _world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, keeping the autograd graph: each rank's
    slice receives the gradient summed over all ranks (every rank's loss depends on it)."""
    if _world_size() == 1:
        return tensor
    return torch.cat(dist_nn.all_gather(tensor.contiguous()), dim=0)
