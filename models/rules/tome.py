"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching. Tokens alternate between sets A and B,
each A token finds its most similar B token (cosine of the attention keys), and the r best-matched
A tokens merge into their partners. Frames are matched the same way on frame descriptors (the mean
per-position similarity), where TESTA takes a vote."""
from torch import Tensor

from models.merge import Matching, bipartite_soft_matching
from models.rules.base import MergeContext, Rule


class ToMe(Rule):
    name = "tome"

    def match(self, metric: Tensor, r: int, context: MergeContext) -> Matching:
        return bipartite_soft_matching(metric, r, protect_first=context.protected > 0)
