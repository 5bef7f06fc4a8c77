"""Token aggregation for TESTA: bipartite soft matching of tokens and of whole frames.

A matching is computed once from a metric (attention keys averaged over heads) and then
applied to any tensor laid out along the same token axis (features, sizes, sources), so
that one decision moves every per-token quantity consistently.

Conventions: set A = even positions, set B = odd positions. Each A token looks up its
most similar B token; the ``r`` best-scoring A tokens are merged into their partners.
Output order is [A tokens that stay, in original order] + [all B tokens, in order].
"""
import math
from typing import NamedTuple, Tuple

import torch
from torch import Tensor


class Matching(NamedTuple):
    """Which input rows survive and where the merged-away rows go.

    All index tensors have a leading group shape (e.g. one row per frame) and index the
    token axis of the tensor the matching is applied to.
    """

    output_rows: Tensor  # (G, n - r): input row feeding each output slot
    merged_rows: Tensor  # (G, r): input rows merged away
    merged_slots: Tensor  # (G, r): output slot each merged row is added into

    def broadcast(self, reshape) -> "Matching":
        """Reshape every index tensor (e.g. add broadcast dims to match a token layout)."""
        return Matching(*(reshape(index) for index in self))


def clamp_r(r: int, num_tokens: int, num_protected: int = 0) -> int:
    """Largest usable r: at most half of the tokens that may merge."""
    if r < 0:
        raise ValueError(f"merge count r must be >= 0, got {r}")
    return max(0, min(r, (num_tokens - num_protected) // 2))


def _unit_scores(metric: Tensor) -> Tensor:
    """Cosine similarity of every A (even) token with every B (odd) token.

    Computed in float32 even under autocast: bfloat16 scores would tie often and make
    the merge decisions arbitrary. The metric is small (one head-width per token).
    """
    with torch.autocast(metric.device.type, enabled=False):
        metric = metric.float()
        metric = metric / metric.norm(dim=-1, keepdim=True)
        return metric[..., ::2, :] @ metric[..., 1::2, :].transpose(-1, -2)


def _select(score: Tensor, partner: Tensor, r: int, num_tokens: int) -> Matching:
    """Turn per-A-token best scores/partners (G, n_a) into a Matching that merges the top r."""
    # Stable, so equal scores (e.g. several -inf) resolve the same way on every device.
    order = score.argsort(dim=-1, descending=True, stable=True)
    merged_a = order[..., :r]
    # Sorting the survivors keeps them in their original order (and a protected first token first).
    kept_a = order[..., r:].sort(dim=-1).values
    num_kept = kept_a.shape[-1]
    b_rows = torch.arange(1, num_tokens, 2, device=score.device).expand(*score.shape[:-1], -1)
    return Matching(
        output_rows=torch.cat([2 * kept_a, b_rows], dim=-1),
        merged_rows=2 * merged_a,
        merged_slots=num_kept + partner.gather(-1, merged_a),
    )


def bipartite_soft_matching(metric: Tensor, r: int, protect_first: bool = False) -> Matching:
    """Match tokens of ``metric`` (G, n, C) and merge the r most similar A tokens.

    ``protect_first`` keeps token 0 (a [CLS]) out of the merge by giving it score -inf;
    r is clamped to half the unprotected tokens.
    """
    return bipartite_matching(_unit_scores(metric), r, protect_first)


def bipartite_matching(scores: Tensor, r: int, protect_first: bool = False) -> Matching:
    """The Matching of ``bipartite_soft_matching`` from any A-by-B score matrix (G, n_a, n_b):
    each A (even) token's partner is its best-scoring B (odd) token, and the r best A tokens merge.
    Scores of -inf never merge while others remain."""
    num_tokens = scores.shape[-2] + scores.shape[-1]
    r = clamp_r(r, num_tokens, int(protect_first))
    if protect_first:
        scores = scores.clone()
        scores[..., 0, :] = -torch.inf
    best_score, partner = scores.max(dim=-1)
    return _select(best_score, partner, r, num_tokens)


def unit_scores(metric: Tensor) -> Tensor:
    """Cosine similarity (float32) of the A (even) tokens of ``metric`` (G, n, C) with its B (odd) ones."""
    return _unit_scores(metric)


def pair_matching(merged_rows: Tensor, target_rows: Tensor, num_tokens: int) -> Matching:
    """Matching that merges each row of ``merged_rows`` (G, r) into the row of ``target_rows`` (G, r)
    beside it; survivors keep their original order. No target may itself be merged away."""
    keep = torch.ones(merged_rows.shape[:-1] + (num_tokens,), dtype=torch.bool, device=merged_rows.device)
    keep.scatter_(-1, merged_rows, False)
    # A stable sort of "merged" flags lists the survivors first, in order.
    output_rows = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)
    output_rows = output_rows[..., :num_tokens - merged_rows.shape[-1]]
    slot_of_row = keep.long().cumsum(dim=-1) - 1
    return Matching(output_rows, merged_rows, slot_of_row.gather(-1, target_rows))


def frame_matching(metric: Tensor, r: int, num_protected: int = 0) -> Matching:
    """Match whole frames by a vote over patch positions.

    ``metric`` is (B, L, T, C): per patch position, the temporal keys of each frame.
    Every patch position scores A frames against B frames; an A frame's partner is the
    most frequent per-position best partner and its score the most frequent per-position
    best score (``torch.mode``: ties go to the smallest value, i.e. the smallest frame
    index). ``num_protected`` only tightens the cap on r (the released models were
    trained with the [CLS] cap applied to frames too).
    """
    num_frames = metric.shape[-2]
    r = clamp_r(r, num_frames, num_protected)
    best_score, best_partner = _unit_scores(metric).max(dim=-1)  # (B, L, T_a)
    partner = best_partner.mode(dim=1).values
    score = best_score.mode(dim=1).values
    return _select(score, partner, r, num_frames)


class RowPlan(NamedTuple):
    """A Matching resolved to row numbers of tensors viewed as (rows, features).

    Tokens are whole contiguous feature rows, so moving them with ``index_select`` /
    ``index_add_`` on the flattened rows copies each row in one piece, where a ``gather``
    over the expanded index reads an index per feature (benchmarks/RESULTS.md, bench_encoder).
    """

    output_shape: Tuple[int, ...]  # leading (token) shape of the merged tensor
    output_rows: Tensor  # (prod(output_shape),) input row feeding each output row
    merged_rows: Tensor  # input rows merged away
    merged_slots: Tensor  # output row each merged row is added into


def _flat_rows(index: Tensor, leading_shape: Tuple[int, ...], dim: int) -> Tensor:
    """Flat row numbers, in a (prod(leading_shape), features) view, of the rows ``index`` picks."""
    picked_shape = list(leading_shape)
    picked_shape[dim] = index.shape[dim]
    rows = torch.arange(math.prod(leading_shape), device=index.device).view(leading_shape)
    return rows.gather(dim, index[..., 0].expand(picked_shape)).reshape(-1)


def plan_rows(matching: Matching, leading_shape: Tuple[int, ...], dim: int) -> RowPlan:
    """Resolve ``matching`` along ``dim`` for tensors whose shape is ``leading_shape`` + (features,).

    The matching's index tensors must have one more dim than ``leading_shape`` (size 1 where
    they broadcast, including the feature dim: see ``Matching.broadcast``).
    """
    leading_shape = tuple(leading_shape)
    output_shape = list(leading_shape)
    output_shape[dim] = matching.output_rows.shape[dim]
    output_shape = tuple(output_shape)
    return RowPlan(output_shape,
                   _flat_rows(matching.output_rows, leading_shape, dim),
                   _flat_rows(matching.merged_rows, leading_shape, dim),
                   _flat_rows(matching.merged_slots, output_shape, dim))


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _apply_plan(x: Tensor, plan: RowPlan) -> Tensor:
    rows = _rows(x)
    out = rows.index_select(0, plan.output_rows)
    out.index_add_(0, plan.merged_slots, rows.index_select(0, plan.merged_rows))
    return out.view(plan.output_shape + (x.shape[-1],))


def apply_matching(x: Tensor, matching: Matching, dim: int) -> Tensor:
    """Sum-merge ``x`` along ``dim``: survivors kept, merged rows added into their slots.

    The matching's index tensors must already have ``x``'s number of dims (size 1 where
    they broadcast, see ``Matching.broadcast``).
    """
    return _apply_plan(x, plan_rows(matching, x.shape[:-1], dim))


def merge_weighted(x: Tensor, size: Tensor, matching: Matching, dim: int) -> Tuple[Tensor, Tensor]:
    """Size-weighted mean merge: new = sum(size * x) / sum(size); sizes add up.

    ``size`` has ``x``'s leading shape and a trailing dim of 1: how many original tokens
    each token stands for. Written as an update of the destination,
    dst + sum(size_src * (src - dst)) / new_size, so the cost beyond one copy of ``x``
    scales with r, and nothing autograd saved is modified in place.
    """
    plan = plan_rows(matching, x.shape[:-1], dim)
    new_size = _apply_plan(size, plan)
    x_rows = _rows(x)
    slot_input_rows = plan.output_rows.index_select(0, plan.merged_slots)
    share = (_rows(size).index_select(0, plan.merged_rows)
             / _rows(new_size).index_select(0, plan.merged_slots))
    update = (x_rows.index_select(0, plan.merged_rows) - x_rows.index_select(0, slot_input_rows)) * share
    out = x_rows.index_select(0, plan.output_rows).index_add_(0, plan.merged_slots, update)
    return out.view(plan.output_shape + (x.shape[-1],)), new_size
