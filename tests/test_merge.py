"""Unit tests of the pure token-aggregation functions in models/merge.py."""
import pytest
import torch

from models.merge import (Matching, apply_matching, bipartite_soft_matching, clamp_r, frame_matching,
                          merge_weighted)


def _directions(*angles_deg):
    """Unit 2-D metric rows at the given angles: cosine similarity = cos(angle difference)."""
    angles = torch.tensor(angles_deg, dtype=torch.float64).deg2rad()
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def _reference_weighted_merge(x, size, matching):
    """Loop over groups: the definition of the size-weighted merge, written plainly."""
    outs, sizes = [], []
    for g in range(x.shape[0]):
        total = [x[g, row] * size[g, row] for row in matching.output_rows[g].tolist()]
        weight = [size[g, row].clone() for row in matching.output_rows[g].tolist()]
        for row, slot in zip(matching.merged_rows[g].tolist(), matching.merged_slots[g].tolist()):
            total[slot] = total[slot] + x[g, row] * size[g, row]
            weight[slot] = weight[slot] + size[g, row]
        outs.append(torch.stack([t / w for t, w in zip(total, weight)]))
        sizes.append(torch.stack(weight))
    return torch.stack(outs), torch.stack(sizes)


def test_clamp_r_caps_at_half_of_the_unprotected_tokens():
    assert clamp_r(20, 17, num_protected=1) == 8
    assert clamp_r(100, 8, num_protected=1) == 3
    assert clamp_r(100, 8) == 4
    assert clamp_r(2, 8) == 2
    assert clamp_r(3, 1) == 0
    with pytest.raises(ValueError, match="r must be >= 0"):
        clamp_r(-1, 8)


def test_matching_merges_the_most_similar_pairs_and_keeps_the_published_order():
    # Tokens 0..5: A = 0, 2, 4; B = 1, 3, 5. Token 2 is closest to 5, token 4 to 3, token 0 far.
    metric = _directions(90, 0, 43, 30, 31, 40)[None]
    matching = bipartite_soft_matching(metric, r=2)
    assert matching.merged_rows.tolist() == [[4, 2]]  # best score first
    # Output: surviving A (token 0) then B tokens 1, 3, 5; 4 -> slot of 3, 2 -> slot of 5.
    assert matching.output_rows.tolist() == [[0, 1, 3, 5]]
    assert matching.merged_slots.tolist() == [[2, 3]]


def test_surviving_a_tokens_stay_in_original_order():
    metric = _directions(0, 90, 10, 91, 20, 92, 30, 93)[None]  # every A token prefers B token 1
    matching = bipartite_soft_matching(metric, r=1)
    assert matching.merged_rows.tolist() == [[6]]  # 30 deg is nearest to 90
    assert matching.output_rows[0, :3].tolist() == [0, 2, 4]


def test_protected_first_token_is_never_merged_and_stays_first():
    # The first token is identical to token 1, so it would be merged first without protection.
    metric = _directions(0, 0, 50, 51, 70, 71)[None]
    assert 0 in bipartite_soft_matching(metric, r=1).merged_rows[0].tolist()
    protected = bipartite_soft_matching(metric, r=5, protect_first=True)
    assert protected.merged_rows.shape[-1] == 2  # clamped to (6 - 1) // 2
    assert 0 not in protected.merged_rows[0].tolist()
    assert protected.output_rows[0, 0].item() == 0


def test_weighted_merge_matches_the_plain_definition_with_shared_destinations():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 11, 5, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 4, (3, 11, 1), generator=generator).double()
    # Clustered metric so that several A tokens pick the same B partner.
    metric = torch.randn(3, 11, 4, generator=generator, dtype=torch.float64).round()
    matching = bipartite_soft_matching(metric, r=4, protect_first=True)
    assert any(len(set(slots)) < len(slots) for slots in matching.merged_slots.tolist())
    merged, new_size = merge_weighted(x, size, matching.broadcast(lambda i: i[..., None]), dim=1)
    expected, expected_size = _reference_weighted_merge(x, size, matching)
    assert merged.shape == (3, 7, 5) and new_size.shape == (3, 7, 1)
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(new_size, expected_size)
    assert new_size.sum().item() == size.sum().item()


def test_weighted_merge_along_a_middle_axis_moves_whole_columns():
    # Merge along dim 2 of (B, L, T, D), one decision per sample shared by all L.
    x = torch.arange(2 * 3 * 4, dtype=torch.float64).view(2, 3, 4, 1).expand(2, 3, 4, 2)
    size = torch.ones(2, 3, 4, 1, dtype=torch.float64)
    matching = Matching(output_rows=torch.tensor([[0, 1, 3], [2, 1, 3]]),
                        merged_rows=torch.tensor([[2], [0]]), merged_slots=torch.tensor([[1], [2]]))
    merged, new_size = merge_weighted(x, size, matching.broadcast(lambda i: i[:, None, :, None]), dim=2)
    assert merged.shape == (2, 3, 3, 2)
    torch.testing.assert_close(merged[0, :, 1, 0], (x[0, :, 1, 0] + x[0, :, 2, 0]) / 2)
    torch.testing.assert_close(merged[1, :, 2, 0], (x[1, :, 3, 0] + x[1, :, 0, 0]) / 2)
    torch.testing.assert_close(merged[1, :, 0, 0], x[1, :, 2, 0])
    assert new_size[:, 0, :, 0].tolist() == [[1, 2, 1], [1, 1, 2]]


def _gather_scatter_weighted_merge(x, size, matching, dim):
    """The size-weighted merge written with whole-tensor gather / scatter_add_ over dim."""
    def expand(index, like):
        shape = list(like.shape)
        shape[dim] = index.shape[dim]
        return index.expand(shape)

    def take(values, index):
        return values.gather(dim, expand(index, values))

    total = take(x * size, matching.output_rows).scatter_add(
        dim, expand(matching.merged_slots, x), take(x * size, matching.merged_rows))
    new_size = take(size, matching.output_rows).scatter_add(
        dim, expand(matching.merged_slots, size), take(size, matching.merged_rows))
    return total / new_size, new_size


def test_per_frame_merge_along_patches_matches_gather_scatter_with_gradients():
    # The block's patch merge: (B, L, T, D) merged along L with a different matching per frame.
    generator = torch.Generator().manual_seed(5)
    batch, patches, frames, dim = 2, 9, 3, 4
    x = torch.randn(batch, patches, frames, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 3, (batch, patches, frames, 1), generator=generator).double()
    metric = torch.randn(batch * frames, patches, 3, generator=generator, dtype=torch.float64).round()
    matching = bipartite_soft_matching(metric, r=3).broadcast(
        lambda index: index.view(batch, frames, -1).transpose(1, 2)[..., None])

    merged, new_size = merge_weighted(x, size, matching, dim=1)
    expected, expected_size = _gather_scatter_weighted_merge(x, size, matching, dim=1)
    assert merged.shape == (batch, patches - 3, frames, dim)
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(new_size, expected_size)

    weights = torch.randn(merged.shape, generator=generator, dtype=torch.float64)
    grad, = torch.autograd.grad((merged * weights).sum(), x)
    expected_grad, = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(grad, expected_grad)


def test_source_tracing_sums_memberships():
    metric = torch.randn(2, 9, 3)
    matching = bipartite_soft_matching(metric, r=3).broadcast(lambda i: i[..., None])
    source = apply_matching(torch.eye(9).expand(2, 9, 9), matching, dim=1)
    assert source.shape == (2, 6, 9)
    assert torch.equal(source.sum(dim=1), torch.ones(2, 9))  # every input token lands once
    assert sorted(source.sum(dim=2).unique().tolist()) in ([1.0, 2.0], [1.0, 2.0, 3.0], [1.0, 3.0])


def test_frame_partner_is_the_majority_vote_over_patch_positions():
    # 4 frames (A = 0, 2; B = 1, 3), 3 patch positions. Frame 0 prefers B frame 3 at two positions.
    frame0 = _directions(0, 0, 0)
    frame1 = _directions(5, 90, 90)
    frame2 = _directions(170, 170, 170)
    frame3 = _directions(90, 2, 3)
    metric = torch.stack([frame0, frame1, frame2, frame3], dim=1)[None]  # (1, L=3, T=4, 2)
    matching = frame_matching(metric, r=1)
    assert matching.merged_rows.tolist() == [[0]]
    assert matching.output_rows.tolist() == [[2, 1, 3]]
    assert matching.merged_slots.tolist() == [[2]]  # into frame 3, the majority partner


def test_frame_vote_tie_goes_to_the_smallest_frame_index():
    # Two patch positions: frame 0 prefers B frame 3 at one and B frame 1 at the other.
    frame0 = _directions(0, 0)
    frame1 = _directions(90, 1)
    frame2 = _directions(180, 180)
    frame3 = _directions(1, 90)
    metric = torch.stack([frame0, frame1, frame2, frame3], dim=1)[None]
    matching = frame_matching(metric, r=1)
    assert matching.merged_rows.tolist() == [[0]]
    assert matching.merged_slots.tolist() == [[1]]  # slot of frame 1 (output = [2, 1, 3])


def test_frame_score_is_the_most_frequent_per_patch_best_score():
    # Frame 0's best scores over 3 positions: 1, 1, cos(60)=0.5 -> mode 1.
    # Frame 2's: cos(10), cos(10), cos(10) -> 0.985. Without the mode, the min would rank 2 first.
    frame0 = _directions(0, 0, 60)
    frame1 = _directions(0, 0, 0)
    frame2 = _directions(100, 100, 100)
    frame3 = _directions(90, 90, 90)
    metric = torch.stack([frame0, frame1, frame2, frame3], dim=1)[None]
    assert frame_matching(metric, r=1).merged_rows.tolist() == [[0]]


def test_frame_cap_counts_a_protected_slot():
    metric = torch.randn(1, 4, 8, 3)
    assert frame_matching(metric, r=5).merged_rows.shape[-1] == 4
    assert frame_matching(metric, r=5, num_protected=1).merged_rows.shape[-1] == 3
