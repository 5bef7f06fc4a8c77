"""Token budgets: analytic cost against a FLOP counter, token counts against the encoder, schedules for budgets."""
import re

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.budget import (TOLERANCE, EncoderShape, MergePlan, applied_schedule, encoder_macs, plan_for,
                           schedule_for_budget, token_counts)
from models.merge import clamp_r
from models.schedule import merge_schedule
from models.timesformer import ATTENTION_TYPES, TimeSformer

# The released encoder: 224 px, patch 16 (196 patches), 32 frames, ViT-B, frame&patch merging.
REAL = EncoderShape(embed_dim=768, depth=12, mlp_hidden=3072, patch_size=16, in_chans=3,
                    attention_type="divided_space_time", frame_cap_protected=1)
REAL_FRAMES, REAL_PATCHES = 32, 196
AXES_CHOICES = [("time", "space"), ("time",), ("space",)]
SMALL = dict(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=2, num_frames=8)
SMALL_FRAMES, SMALL_PATCHES = 8, 16
TINY = dict(SMALL, img_size=32, depth=2, num_frames=4)  # 4 frames of 4 patches


@pytest.fixture(autouse=True)
def _one_thread():
    """The encoders here are tiny: extra threads only wait on each other (3x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _encoder(attention_type, testa_r=0, token_merging=True, size=SMALL):
    return TimeSformer(**size, attention_type=attention_type, token_merging=token_merging, testa_r=testa_r,
                       merging_type="frame&patch").eval()


def _video(size=SMALL):
    pixels = size["img_size"]
    return torch.randn(1, 3, size["num_frames"], pixels, pixels, generator=torch.Generator().manual_seed(3))


def _counted_flops(encoder, size=SMALL):
    """FLOPs of one forward as torch counts them. The math attention backend runs QK^T and attention @ V
    as matmuls the counter sees (it has no formula for the CPU flash kernel)."""
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        encoder(_video(size))
    return counter.get_total_flops()


def _greedy_floor(shape, frames, patches, axes):
    """Cost fraction when every block merges all the clamps allow along ``axes``: the lowest reachable."""
    divided = shape.attention_type == "divided_space_time"
    counts = [frames, patches] if shape.attention_type != "joint_space_time" else [1, frames * patches]
    schedule = []
    for _ in range(shape.depth):
        frame_r = clamp_r(counts[0], counts[0], shape.frame_cap_protected) if divided and "time" in axes else 0
        patch_r = counts[1] // 2 if "space" in axes else 0
        counts = [counts[0] - frame_r, counts[1] - patch_r]
        schedule.append((frame_r, patch_r))
    unmerged = encoder_macs(shape, [(0, 0)] * shape.depth, frames, patches)
    return encoder_macs(shape, schedule, frames, patches) / unmerged


def _real_cost(schedule):
    return plan_for(REAL, schedule, REAL_FRAMES, REAL_PATCHES).cost_fraction


# ----------------------------------------------------------------------------- cost and counts
@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
@pytest.mark.parametrize("size", [SMALL, TINY], ids=["small", "tiny"])
def test_macs_equal_the_flop_counter_without_merging(attention_type, size):
    encoder = _encoder(attention_type, token_merging=False, size=size)
    patches = (size["img_size"] // size["patch_size"]) ** 2
    macs = encoder_macs(EncoderShape.of(encoder), [(0, 0)] * size["depth"], size["num_frames"], patches)
    assert _counted_flops(encoder, size) == 2 * macs


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
@pytest.mark.parametrize("testa_r", [[1, 3, 2, 2, 1, 4, 0, 5], [3, 6] * 4])  # the second hits the clamps
def test_macs_follow_the_flop_counter_with_merging(attention_type, testa_r):
    encoder = _encoder(attention_type, testa_r)
    schedule = merge_schedule(testa_r, "frame&patch", attention_type, SMALL["depth"])
    macs = encoder_macs(EncoderShape.of(encoder), schedule, SMALL_FRAMES, SMALL_PATCHES)
    # The counter also sees the merge decisions' matmuls (cosine similarity of the keys).
    assert 2 * macs <= _counted_flops(encoder) <= 2 * macs * 1.03


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
@pytest.mark.parametrize("testa_r", [[1, 3, 2, 2, 1, 4, 0, 5], [3, 6] * 4, 0])
def test_token_counts_match_the_encoder_trace(attention_type, testa_r):
    encoder = _encoder(attention_type, testa_r)
    schedule = merge_schedule(testa_r, "frame&patch", attention_type, SMALL["depth"])
    with torch.no_grad():
        _, trace = encoder.forward_with_trace(_video())
    assert token_counts(EncoderShape.of(encoder), schedule, SMALL_FRAMES, SMALL_PATCHES) == trace.frames_patches


def test_shape_of_an_encoder():
    assert EncoderShape.of(_encoder("divided_space_time")) == EncoderShape(
        embed_dim=64, depth=4, mlp_hidden=256, patch_size=16, in_chans=3, attention_type="divided_space_time",
        frame_cap_protected=1)
    assert EncoderShape.of(_encoder("space_only")).frame_cap_protected == 0


def test_applied_schedule_shows_the_clamps():
    shape = EncoderShape.of(_encoder("divided_space_time"))
    assert applied_schedule(shape, [(5, 9), (0, 0), (1, 1), (9, 9)], SMALL_FRAMES, SMALL_PATCHES) == [
        (3, 8), (0, 0), (1, 1), (1, 3)]


# ----------------------------------------------------------------------------- schedules for a budget
@pytest.mark.parametrize("axes", AXES_CHOICES)
@pytest.mark.parametrize("budget", [0.15, 0.25, 0.35, 0.5, 0.75, 1])
def test_budget_is_met_on_the_real_config(budget, axes):
    floor = _greedy_floor(REAL, REAL_FRAMES, REAL_PATCHES, axes)
    if floor > budget * (1 + TOLERANCE):
        with pytest.raises(ValueError, match=f"lowest reachable cost fraction {floor:.4f}"):
            schedule_for_budget(REAL, REAL_FRAMES, REAL_PATCHES, axes, budget=budget)
        return
    schedule = schedule_for_budget(REAL, REAL_FRAMES, REAL_PATCHES, axes, budget=budget)
    assert applied_schedule(REAL, schedule, REAL_FRAMES, REAL_PATCHES) == schedule
    assert abs(_real_cost(schedule) / budget - 1) <= TOLERANCE
    for axis, name in enumerate(("time", "space")):
        if name not in axes:
            assert all(block[axis] == 0 for block in schedule)
    if budget == 1:
        assert schedule == [(0, 0)] * REAL.depth


def test_budget_sweep_on_the_real_config():
    for axes in AXES_CHOICES:
        floor = _greedy_floor(REAL, REAL_FRAMES, REAL_PATCHES, axes)
        for budget in [step / 100 for step in range(15, 101)]:
            if floor <= budget * (1 + TOLERANCE):
                schedule = schedule_for_budget(REAL, REAL_FRAMES, REAL_PATCHES, axes, budget=budget)
                assert abs(_real_cost(schedule) / budget - 1) <= TOLERANCE, (axes, budget)


@pytest.mark.parametrize("axes", AXES_CHOICES)
@pytest.mark.parametrize("token_budget", [0.5, 0.25, 0.1])
@pytest.mark.parametrize("budget", [None, 0.6, 0.75])  # within reach of every token budget here
def test_token_budget_is_honoured(axes, token_budget, budget):
    schedule = schedule_for_budget(REAL, REAL_FRAMES, REAL_PATCHES, axes, budget=budget, token_budget=token_budget)
    assert applied_schedule(REAL, schedule, REAL_FRAMES, REAL_PATCHES) == schedule
    frames, patches = token_counts(REAL, schedule, REAL_FRAMES, REAL_PATCHES)[-1]
    kept = token_budget ** (1 / len(axes))  # each reduced axis keeps an equal share
    for name, start, end in (("time", REAL_FRAMES, frames), ("space", REAL_PATCHES, patches)):
        assert abs(end - start * kept) <= 0.5 if name in axes else end == start
    if budget is not None:
        assert abs(_real_cost(schedule) / budget - 1) <= TOLERANCE


def test_budget_below_reach_says_the_floor():
    floor = _greedy_floor(REAL, REAL_FRAMES, REAL_PATCHES, ("time", "space"))
    with pytest.raises(ValueError, match=f"budget 0.05 is below the lowest reachable cost fraction {floor:.4f} "
                                         r"for axes \('time', 'space'\) .* 32 frames x 196 patches$"):
        schedule_for_budget(REAL, REAL_FRAMES, REAL_PATCHES, ("time", "space"), budget=0.05)


def test_unreachable_budgets_raise():
    with pytest.raises(ValueError, match="lowest reachable token fraction"):
        schedule_for_budget(REAL, REAL_FRAMES, REAL_PATCHES, ("time",), token_budget=0.01)  # frames stop at 2
    with pytest.raises(ValueError, match="lowest reachable cost fraction .* with token_budget 0.5"):
        schedule_for_budget(REAL, REAL_FRAMES, REAL_PATCHES, ("time", "space"), budget=0.3, token_budget=0.5)
    with pytest.raises(ValueError, match="highest reachable cost fraction .* with token_budget 0.1"):
        schedule_for_budget(REAL, REAL_FRAMES, REAL_PATCHES, ("time", "space"), budget=0.99, token_budget=0.1)
    single = EncoderShape.of(_encoder("space_only"))
    with pytest.raises(ValueError, match="lowest reachable cost fraction 1.0000 for axes \\(\\)"):
        schedule_for_budget(single, SMALL_FRAMES, SMALL_PATCHES, ("time",), budget=0.5)  # no time axis there
    for bad in (dict(budget=0), dict(budget=1.5), dict(token_budget=0), {}):
        with pytest.raises(ValueError):
            schedule_for_budget(REAL, REAL_FRAMES, REAL_PATCHES, ("time", "space"), **bad)
    with pytest.raises(ValueError, match="axes must be drawn from"):
        schedule_for_budget(REAL, REAL_FRAMES, REAL_PATCHES, ("frames",), budget=0.5)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
@pytest.mark.parametrize("budget, token_budget", [(0.5, None), (None, 0.3), (0.7, 0.3)])
def test_the_encoder_applies_a_budget_schedule_unclamped(attention_type, budget, token_budget):
    shape = EncoderShape.of(_encoder(attention_type, token_merging=False))
    schedule = schedule_for_budget(shape, SMALL_FRAMES, SMALL_PATCHES, ("time", "space"), budget=budget,
                                   token_budget=token_budget)
    assert applied_schedule(shape, schedule, SMALL_FRAMES, SMALL_PATCHES) == schedule
    testa_r = [r for block in schedule for r in block] if attention_type == "divided_space_time" else \
        [patch_r for _, patch_r in schedule]
    encoder = _encoder(attention_type, testa_r)
    assert [(block.frame_r, block.patch_r) if attention_type == "divided_space_time" else (0, block.merge_r)
            for block in encoder.blocks] == schedule
    with torch.no_grad():
        _, trace = encoder.forward_with_trace(_video())
    counts = token_counts(shape, schedule, SMALL_FRAMES, SMALL_PATCHES)
    assert trace.frames_patches == counts
    plan = plan_for(shape, schedule, SMALL_FRAMES, SMALL_PATCHES)
    assert plan.tokens_out == counts[-1][0] * counts[-1][1]


def test_schedules_are_deterministic_and_not_shared():
    first = schedule_for_budget(REAL, REAL_FRAMES, REAL_PATCHES, ["time", "space"], budget=0.4)
    first[0] = (99, 99)
    assert schedule_for_budget(REAL, REAL_FRAMES, REAL_PATCHES, ("time", "space"), budget=0.4)[0] != (99, 99)


def test_plan_describes_itself():
    schedule = [(1, 10)] * REAL.depth
    plan = plan_for(REAL, schedule, REAL_FRAMES, REAL_PATCHES, budget=0.5)
    assert isinstance(plan, MergePlan) and plan.tokens_in == 6272 and plan.tokens_out == 20 * 76
    assert plan.macs == encoder_macs(REAL, schedule, REAL_FRAMES, REAL_PATCHES)
    assert plan.token_fraction == pytest.approx(1520 / 6272)
    line = plan.describe()
    assert re.fullmatch(r"budget 0\.50: [\d.]+ of 786 GMACs \(\d+\.\d%\), 1520 of 6272 patch tokens reach the text "
                        r"side \(24\.2%\), schedule frames \[1(,1){11}\] patches \[10(,10){11}\]", line), line
    assert f"({plan.cost_fraction:.1%})" in line
