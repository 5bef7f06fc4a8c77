"""What a token-reduction rule is: a decision of which tokens of a block to combine.

A rule sees the merge metric of one axis of a block (attention keys summed over heads) and returns
a ``models.merge.Matching``; the block applies it the way it applies TESTA's (size-weighted mean,
sizes and sources carried along), so proportional attention and the pictures work for every rule.

Axes. With divided space-time attention every frame must keep the same number of tokens, so a rule
works per axis: ``match_frames`` merges whole frames (the same frames at every patch position) and
``match`` merges patches within each frame (the same count in every frame, the [CLS] protected).
With ``space_only`` / ``joint_space_time`` attention ``match`` works over each sequence's tokens.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from models.merge import Matching


class MergeContext(NamedTuple):
    """What a block knows besides the metric when it asks a rule for a decision."""

    protected: int  # leading tokens that never merge (1: a [CLS] at row 0), else 0
    attention: Optional[Tensor]  # (G, n, n) softmax attention averaged over heads (rows: queries),
    #                              given only to rules with ``needs_attention``
    generator: Optional[torch.Generator]  # seeded per block and forward, for rules that draw at random
    depth_fraction: float  # block index / number of blocks, in [0, 1)


class Rule:
    """A token-reduction rule. Subclasses set ``name`` and implement ``match``.

    ``match(metric, r, context)``: metric (G, n, C) per token, r merges per group (already clamped to
    at most half of the unprotected tokens); returns a Matching over the n tokens of each group that
    removes exactly r rows and never moves the protected rows.
    ``match_frames(keys, r, context)``: keys (B, L, T, C) per patch position and frame; returns a
    Matching over the T frames of each clip. By default frames are compared by the mean over patch
    positions of their keys' cosine similarity, and ``match`` decides on those frame descriptors.
    """

    name = ""
    axes = ("time", "space")  # the axes a rule reduces when it is named alone
    needs_attention = False  # ask the block for the attention map (an extra cost, only when needed)
    needs_generator = False  # the block passes a seeded generator (the same draw in every forward)
    content_based = True  # False: the decision ignores the metric (baselines)

    def match(self, metric: Tensor, r: int, context: MergeContext) -> Matching:
        raise NotImplementedError

    def match_frames(self, keys: Tensor, r: int, context: MergeContext) -> Matching:
        return self.match(frame_descriptors(keys), r, context)


def frame_descriptors(keys: Tensor) -> Tensor:
    """(B, L, T, C) keys -> (B, T, L*C) unit frame descriptors whose dot product is the mean over the
    L patch positions of the two frames' per-position cosine similarity."""
    with torch.autocast(keys.device.type, enabled=False):
        keys = keys.float()
        unit = keys / keys.norm(dim=-1, keepdim=True)
        batch, positions, frames, width = unit.shape
        return unit.transpose(1, 2).reshape(batch, frames, positions * width) / positions ** 0.5


def cosine_similarity(metric: Tensor) -> Tensor:
    """(G, n, C) -> (G, n, n) cosine similarity of every token pair, in float32 (bf16 would tie often)."""
    with torch.autocast(metric.device.type, enabled=False):
        unit = metric.float()
        unit = unit / unit.norm(dim=-1, keepdim=True)
        return unit @ unit.transpose(-1, -2)
