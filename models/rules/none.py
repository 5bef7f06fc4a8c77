"""No reduction on an axis: `merge_rule: {time: none, space: tome}` merges patches only."""
from torch import Tensor

from models.merge import Matching
from models.rules.base import MergeContext, Rule


class NoMerge(Rule):
    name = "none"
    axes = ()
    content_based = False

    def match(self, metric: Tensor, r: int, context: MergeContext) -> Matching:
        raise ValueError("the `none` rule merges nothing; its axis must have r = 0")
