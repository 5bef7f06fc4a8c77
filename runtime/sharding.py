"""Splitting a list of items over the processes of a run."""
import math


def shard_indices(num_items, num_replicas, rank, unit=1):
    """Rank `rank`'s contiguous slice of range(num_items), made of whole `unit`s (batches).
    The slices are disjoint and their union, concatenated in rank order, is exactly
    range(num_items): gathering per-rank results in rank order restores dataset order
    without padded duplicates. Whole batches mean every rank computes exactly the batches
    a single process would, so sharded evaluation gives bit-identical results."""
    units = math.ceil(num_items / unit)
    start, stop = rank * units // num_replicas, (rank + 1) * units // num_replicas
    return range(min(num_items, start * unit), min(num_items, stop * unit))
