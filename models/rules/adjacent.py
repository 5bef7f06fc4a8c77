"""Adjacent merging: only neighbours along the axis may merge, the most similar pairs first (the idea
behind TempMe, ICLR 2025, and FrameFusion, ICCV 2025, which merge neighbouring frames).

Named alone it reduces time only: neighbouring frames. On a token sequence (patches of a frame, or
`joint_space_time`'s patch-major, time-minor sequence, where neighbours are one patch in
consecutive frames) it merges sequence neighbours. Survivors keep their order, so neighbours stay
neighbours block after block.
"""
import torch
from torch import Tensor

from models.merge import Matching, pair_matching
from models.rules.base import MergeContext, Rule


class Adjacent(Rule):
    name = "adjacent"
    axes = ("time",)

    def match(self, metric: Tensor, r: int, context: MergeContext) -> Matching:
        num_tokens = metric.shape[-2]
        with torch.autocast(metric.device.type, enabled=False):
            unit = metric.float()
            unit = unit / unit.norm(dim=-1, keepdim=True)
            neighbour_similarity = (unit[..., 1:, :] * unit[..., :-1, :]).sum(-1)  # (G, n-1): pair (i, i+1)
        # Pairs join an even row (the survivor) with an odd neighbour (merged away) on either side,
        # so no token both merges and receives; the [CLS] row and its pair are left out.
        odd_rows = torch.arange(1, num_tokens, 2, device=metric.device)
        with_previous = neighbour_similarity[..., odd_rows - 1]
        if context.protected:
            with_previous[..., 0] = -torch.inf  # row 1's previous neighbour is the [CLS]
        after = (odd_rows + 1).clamp(max=num_tokens - 1)
        with_next = neighbour_similarity[..., after - 1].masked_fill(odd_rows + 1 >= num_tokens, -torch.inf)
        best, choice = torch.stack([with_previous, with_next], dim=-1).max(dim=-1)
        merged_pairs = best.argsort(dim=-1, descending=True, stable=True)[..., :r]
        merged_rows = odd_rows[merged_pairs]
        target_rows = merged_rows + 2 * choice.gather(-1, merged_pairs) - 1  # choice 0: previous, 1: next
        return pair_matching(merged_rows, target_rows, num_tokens)
