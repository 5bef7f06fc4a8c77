"""TESTA (Ren et al., 2023): frames merge by a vote over patch positions, patches by bipartite soft
matching within each frame. The default rule: the released checkpoints were trained with it."""
from torch import Tensor

from models.merge import Matching, bipartite_soft_matching, frame_matching
from models.rules.base import MergeContext, Rule


class Testa(Rule):
    name = "testa"

    def match(self, metric: Tensor, r: int, context: MergeContext) -> Matching:
        return bipartite_soft_matching(metric, r, protect_first=context.protected > 0)

    def match_frames(self, keys: Tensor, r: int, context: MergeContext) -> Matching:
        # r arrives clamped by the block (with its [CLS]-sized frame cap), so no cap is passed here.
        return frame_matching(keys, r)
