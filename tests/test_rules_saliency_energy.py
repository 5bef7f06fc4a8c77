"""The vid_tldr (saliency) and pitome (energy) rules on small synthetic metrics: the Matching contract
of models/rules/base.py, and the tokens each rule is meant to merge or to spare."""
import pytest
import torch

from models.merge import bipartite_soft_matching, merge_weighted
from models.rules.base import MergeContext
from models.rules.pitome import PiToMe
from models.rules.vid_tldr import VidTLDR

RULES = (VidTLDR(), PiToMe())


def _directions(*angles_deg):
    """Unit 2-D metric rows at the given angles: cosine similarity = cos(angle difference)."""
    angles = torch.tensor(angles_deg, dtype=torch.float32).deg2rad()
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def _attention(sharp_rows, num_tokens, sharpness=6.0):
    """(n, n) attention: rows in ``sharp_rows`` attend mostly to themselves, the others uniformly."""
    logits = torch.zeros(num_tokens, num_tokens)
    for row in sharp_rows:
        logits[row, row] = sharpness
    return logits.softmax(dim=-1)


def _context(protected, attention=None, depth_fraction=0.5):
    return MergeContext(protected=protected, attention=attention, generator=None, depth_fraction=depth_fraction)


def _random_inputs(groups, num_tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    metric = torch.randn(groups, num_tokens, 16, generator=generator)
    attention = (3 * torch.randn(groups, num_tokens, num_tokens, generator=generator)).softmax(dim=-1)
    return metric, attention


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.name)
@pytest.mark.parametrize("protected", [0, 1])
@pytest.mark.parametrize("groups,num_tokens,r", [(1, 9, 4), (3, 10, 2), (2, 17, 8), (4, 6, 0)])
def test_matching_removes_exactly_r_rows_and_never_moves_the_protected_row(rule, protected, groups, num_tokens, r):
    metric, attention = _random_inputs(groups, num_tokens, seed=num_tokens)
    r = min(r, (num_tokens - protected) // 2)
    matching = rule.match(metric, r, _context(protected, attention))
    assert matching.output_rows.shape == (groups, num_tokens - r)
    assert matching.merged_rows.shape == matching.merged_slots.shape == (groups, r)
    for group in range(groups):
        survivors, merged = matching.output_rows[group].tolist(), matching.merged_rows[group].tolist()
        assert sorted(survivors + merged) == list(range(num_tokens))
        assert all(0 <= slot < num_tokens - r for slot in matching.merged_slots[group].tolist())
        if protected:
            assert survivors[0] == 0 and 0 not in merged
            assert 0 not in matching.merged_slots[group].tolist()  # slot 0 holds the [CLS]: it receives nothing


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.name)
def test_decisions_are_deterministic_even_with_ties(rule):
    metric, attention = _random_inputs(2, 13, seed=1)
    metric[:, 5:] = metric[:, 4:5]  # many identical tokens: every tie must resolve the same way
    context = _context(1, attention)
    first, second = rule.match(metric, 6, context), rule.match(metric.clone(), 6, context)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.name)
def test_gradients_flow_through_the_merged_features(rule):
    metric, attention = _random_inputs(2, 9, seed=2)
    features = metric.clone().requires_grad_()
    matching = rule.match(features, 3, _context(1, attention))
    merged, _ = merge_weighted(features, torch.ones(2, 9, 1), matching.broadcast(lambda index: index[..., None]), 1)
    merged.sum().backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()


# vid_tldr. Rows: 0 = [CLS]; A = 2, 4, 6, 8; B = 1, 3, 5, 7. A tokens 2 and 4 nearly duplicate B tokens
# 1 and 3, so plain ToMe merges them; A tokens 6 and 8 are only fairly close to B tokens 5 and 7.
# The [CLS] duplicates token 1, so it would merge first if it were not protected.
TLDR_METRIC = _directions(0, 0, 1, 40, 41, 120, 100, 170, 150)
FOREGROUND_FIRST = [1, 2, 3, 4]  # sharp attention rows: salient
FOREGROUND_LAST = [5, 6, 7, 8]


def test_vid_tldr_merges_the_background_tokens_where_tome_merges_the_most_similar():
    assert sorted(bipartite_soft_matching(TLDR_METRIC[None], 2, protect_first=True).merged_rows[0].tolist()) == [2, 4]
    metric = TLDR_METRIC.expand(2, -1, -1)
    # Group 0: tokens 5..8 are background; group 1: tokens 1..4 are (saliency is normalised per group).
    attention = torch.stack([_attention(FOREGROUND_FIRST, 9), _attention(FOREGROUND_LAST, 9)])
    matching = VidTLDR().match(metric, 2, _context(1, attention))
    assert sorted(matching.merged_rows[0].tolist()) == [6, 8]
    assert sorted(matching.merged_rows[1].tolist()) == [2, 4]


def test_vid_tldr_merges_the_most_salient_token_last():
    # Token 8 is the nearest duplicate of its partner (ToMe merges it first) and the most salient.
    metric = _directions(0, 0, 10, 40, 50, 120, 100, 170, 169.5)[None]
    assert 8 in bipartite_soft_matching(metric, 1, protect_first=True).merged_rows[0].tolist()
    logits = torch.zeros(9, 9)
    for row, sharpness in ((2, 7.0), (4, 6.0), (6, 5.0), (8, 8.0)):  # B tokens and [CLS] attend uniformly
        logits[row, row] = sharpness
    matching = VidTLDR().match(metric, 3, _context(1, logits.softmax(dim=-1)[None]))
    assert sorted(matching.merged_rows[0].tolist()) == [2, 4, 6]


def test_vid_tldr_merges_frames_with_the_temporal_attention():
    keys = torch.randn(2, 5, 8, 4)
    attention = _attention([0, 1, 2, 3], 8).expand(2, -1, -1)
    matching = VidTLDR().match_frames(keys, 2, _context(0, attention))
    assert matching.output_rows.shape == (2, 6)
    assert all(row in (4, 6) for row in matching.merged_rows.flatten().tolist())  # background A frames


def test_vid_tldr_needs_the_attention_map():
    with pytest.raises(ValueError, match="attention"):
        VidTLDR().match(TLDR_METRIC[None], 1, _context(1))


# pitome. Two clusters of near-duplicates (around 0 and 90 degrees) and one isolated token at 225.
ISOLATED = 3
PITOME_ANGLES = (0, 4, 91, 225, 9, 95, 13, 99, 17)


@pytest.mark.parametrize("depth_fraction", [0.0, 0.5, 11 / 12])
@pytest.mark.parametrize("protected", [0, 1])
def test_pitome_spares_an_isolated_token_and_merges_within_clusters(depth_fraction, protected):
    angles = ((60,) if protected else ()) + PITOME_ANGLES  # a [CLS] unlike everything else
    isolated = ISOLATED + protected
    metric = _directions(*angles)[None]
    r = (len(angles) - protected) // 2  # 4: every cluster token is a candidate
    matching = PiToMe().match(metric, r, _context(protected, depth_fraction=depth_fraction))
    merged = matching.merged_rows[0].tolist()
    targets = matching.output_rows[0, matching.merged_slots[0]].tolist()
    assert isolated not in merged + targets
    assert len(merged) == r
    for row, target in zip(merged, targets):  # a merge pairs tokens of one cluster
        assert abs(angles[row] - angles[target]) < 45


def test_pitome_merges_the_largest_cluster_first():
    # A cluster of four near-duplicates and three scattered pairs: r = 2 merges within the cluster.
    metric = _directions(0, 60, 2, 130, 4, 200, 6, 62, 132)[None]
    matching = PiToMe().match(metric, 2, _context(0, depth_fraction=0.0))
    merged = matching.merged_rows[0].tolist()
    targets = matching.output_rows[0, matching.merged_slots[0]].tolist()
    assert set(merged + targets) <= {0, 2, 4, 6}


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.name)
def test_same_decisions_in_bf16_autocast_and_fp32_for_well_separated_inputs(rule):
    if rule.name == "vid_tldr":
        metric = TLDR_METRIC.expand(2, -1, -1)
        attention = torch.stack([_attention(FOREGROUND_FIRST, 9), _attention(FOREGROUND_LAST, 9)])
    else:
        metric, attention = _directions(*PITOME_ANGLES).expand(2, -1, -1), None
    context = _context(1, attention)
    reference = rule.match(metric, 3, context)
    low_precision = context._replace(attention=None if attention is None else attention.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = rule.match(metric.bfloat16(), 3, low_precision)
    assert all(torch.equal(a, b) for a, b in zip(reference, autocast))
