"""Random baseline: r tokens, drawn at random (seeded), merge into r other tokens drawn at random.

The dropped tokens are merged rather than discarded so that sizes and sources still account for
every input patch (proportional attention and the pictures work as for any rule); the decision
ignores content, which is what the baseline measures.
"""
import torch
from torch import Tensor

from models.merge import Matching, pair_matching
from models.rules.base import MergeContext, Rule


class RandomMerge(Rule):
    name = "random"
    content_based = False
    needs_generator = True

    def match(self, metric: Tensor, r: int, context: MergeContext) -> Matching:
        num_tokens, protected = metric.shape[-2], context.protected
        groups = metric.shape[:-2]
        draws = torch.rand(groups + (num_tokens - protected,), generator=context.generator,
                           device=context.generator.device).to(metric.device)
        order = protected + draws.argsort(dim=-1)
        return pair_matching(order[..., :r], order[..., r:2 * r], num_tokens)
