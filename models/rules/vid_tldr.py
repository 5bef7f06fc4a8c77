"""vid-TLDR (Choi et al., CVPR 2024): saliency-aware token merging for video transformers.

Followed from the paper (and its released code):
- saliency from attention sharpness: a token whose attention row is peaked attends to something
  specific, so its saliency is the negative entropy of its (head-averaged) attention row,
  s_i = sum_j a_ij log a_ij, min-max normalised to [0, 1] per group;
- background drop: tokens below the mean saliency are background, their saliency is masked to 0;
- foreground sharpening: the other tokens get (s_i - mean) / max(s - mean), in [0, 1];
- the bipartite matching of ToMe decides partners: A = even, B = odd tokens, an A token's partner is
  its most similar B token (the paper's score (cos + 1) / 2).

Departure: in the paper the decision is plain ToMe and saliency enters the merge itself, which sums
each merged token scaled by its saliency (background tokens, at 0, are dropped from the sum). Our
blocks merge by a size-weighted mean that takes no extra weights, so saliency steers which tokens
merge instead: every background A token ranks above every foreground one (it would contribute
nothing to the paper's merge, so merging it away loses least), and a foreground A token's score is
lowered by its sharpened saliency (the paper's weight), so the most salient tokens merge last.
Saliency is normalised over the unprotected tokens only, so a [CLS] does not move the threshold.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from models.merge import Matching, bipartite_matching, unit_scores
from models.rules.base import MergeContext, Rule

# Keeps the normalisations finite when every token of a group is equally salient.
_TINY = 1e-12


def attention_saliency(attention: Tensor, protected: int) -> Tensor:
    """(G, n, n) head-averaged attention (rows: queries) -> (G, n - protected) sharpened saliency in
    [0, 1] of the unprotected tokens: 0 for background (below the mean), (s - mean) / max(s - mean) else."""
    with torch.autocast(attention.device.type, enabled=False):
        attention = attention.detach().float()
        # xlogy: a row entry that underflowed to 0 contributes 0, not nan.
        negative_entropy = torch.xlogy(attention, attention).sum(dim=-1)[:, protected:]
        lowest = negative_entropy.amin(dim=-1, keepdim=True)
        spread = negative_entropy.amax(dim=-1, keepdim=True) - lowest
        saliency = (negative_entropy - lowest) / spread.clamp_min(_TINY)
        centred = saliency - saliency.mean(dim=-1, keepdim=True)
        sharpened = centred / centred.amax(dim=-1, keepdim=True).clamp_min(_TINY)
        return torch.where(centred < 0, torch.zeros_like(sharpened), sharpened)


class VidTLDR(Rule):
    name = "vid_tldr"
    needs_attention = True

    def match(self, metric: Tensor, r: int, context: MergeContext) -> Matching:
        if context.attention is None:
            raise ValueError("the vid_tldr rule needs the block's attention map (context.attention)")
        protected = context.protected
        saliency = attention_saliency(context.attention, protected)
        # Background (saliency masked to 0) outranks all foreground; foreground pays its saliency.
        offset = torch.where(saliency > 0, -saliency, torch.ones_like(saliency))
        offset = F.pad(offset, (protected, 0))  # protected rows: kept out by protect_first
        scores = (unit_scores(metric.detach()) + 1) / 2 + offset[:, ::2, None]
        return bipartite_matching(scores, r, protect_first=protected > 0)
