"""Pooling baseline: content-blind merges of evenly spaced neighbour pairs along the axis.

Every block averages r pairs of neighbours (frame 2k+1 into 2k in time, patch 2k+1 into 2k in
raster order in space) spread uniformly over the axis, so block after block the tokens are a
uniform temporal stride and a spatial average pooling at the same token count as any other rule.
"""
import torch
from torch import Tensor

from models.merge import Matching, pair_matching
from models.rules.base import MergeContext, Rule


def evenly_spaced_pairs(num_tokens: int, r: int, protected: int, device) -> tuple[Tensor, Tensor]:
    """(merged rows, target rows) of r neighbour pairs spread evenly over the unprotected tokens."""
    num_pairs = (num_tokens - protected) // 2
    chosen = torch.linspace(0, num_pairs - 1, r, device=device).round().long() if r else torch.zeros(
        0, dtype=torch.long, device=device)
    targets = protected + 2 * chosen
    return targets + 1, targets


class Pool(Rule):
    name = "pool"
    content_based = False

    def match(self, metric: Tensor, r: int, context: MergeContext) -> Matching:
        merged, targets = evenly_spaced_pairs(metric.shape[-2], r, context.protected, metric.device)
        groups = metric.shape[:-2] + (r,)
        return pair_matching(merged.expand(groups), targets.expand(groups), metric.shape[-2])
