"""PiToMe (Tran et al., NeurIPS 2024): protect informative tokens before merging, by an energy score.

Tokens are nodes of a graph weighted by the cosine similarity of their metrics. A token's energy is
E_i = 1/N sum_j f_m(cos(x_i, x_j)) over the N mergeable tokens, with (the paper's eq. 4)
f_m(x) = x if x >= m, alpha * (exp(x - m) - 1) otherwise: near neighbours count fully, the others
add a small negative term. High energy marks a token inside a large cluster of similar tokens
(redundant: merging it loses little), low energy an isolated one (informative: protected).
The 2r highest-energy tokens are the merge candidates; in energy order they alternate between
sets A and B, each A token merges into its most similar B token (all r of them merge), and every
other token survives in its original order.

Constants: alpha = 1.0 and a margin that falls with depth, m = 0.9 - 0.9 * l / L for block l of L
(the schedule of the released ViT code), from ``context.depth_fraction``. The released
code computes ELU(x - m), i.e. x - m rather than x above the margin; we follow the paper's form.
A protected [CLS] takes no part: it is left out of the energies, the candidates and the targets.
"""
import torch
from torch import Tensor

from models.merge import Matching, pair_matching
from models.rules.base import MergeContext, Rule, cosine_similarity

ALPHA = 1.0
MARGIN_AT_FIRST_BLOCK = 0.9


def margin_at(depth_fraction: float) -> float:
    """The similarity above which two tokens count as neighbours: strict early, looser with depth."""
    return MARGIN_AT_FIRST_BLOCK * (1.0 - depth_fraction)


def energy_scores(similarity: Tensor, margin: float, alpha: float = ALPHA) -> Tensor:
    """(G, N, N) cosine similarity -> (G, N) energy: the mean over j of f_m(similarity_ij)."""
    below = alpha * torch.expm1(similarity - margin)
    return torch.where(similarity >= margin, similarity, below).mean(dim=-1)


class PiToMe(Rule):
    name = "pitome"

    def match(self, metric: Tensor, r: int, context: MergeContext) -> Matching:
        protected = context.protected
        num_tokens = metric.shape[-2]
        similarity = cosine_similarity(metric.detach()[:, protected:])  # float32, unprotected tokens only
        energy = energy_scores(similarity, margin_at(context.depth_fraction))
        # Stable, so ties in energy resolve the same way on every device.
        candidates = energy.argsort(dim=-1, descending=True, stable=True)[:, :2 * r]
        merged, targets = candidates[:, 0::2], candidates[:, 1::2]
        # Each A token's most similar B token (the first on ties): non-targets masked out of its row.
        is_target = torch.zeros_like(energy, dtype=torch.bool).scatter_(1, targets, True)
        merged_similarity = similarity.gather(1, merged[:, :, None].expand(-1, -1, similarity.shape[-1]))
        partner = merged_similarity.masked_fill(~is_target[:, None, :], -torch.inf).argmax(dim=-1)
        return pair_matching(merged + protected, partner + protected, num_tokens)
