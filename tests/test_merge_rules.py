"""Every token-reduction rule (models/rules), in every attention layout of the encoder: the tokens
left follow the schedule, sizes and sources account for every input token, a seed fixes the
decisions, gradients flow, torch.compile runs, and bf16 decides as fp32 on well-separated inputs."""
import pytest
import torch

from models.budget import EncoderShape, token_counts
from models.rules import RULES, MergeContext, resolve_rules
from models.timesformer import TimeSformer

MERGING_RULES = [name for name in RULES if name != "none"]
LAYOUTS = {  # attention type -> testa_r: divided reads (frames, patches) per block, the others one entry
    "divided_space_time": [1, 3, 1, 2, 0, 2],
    "joint_space_time": [6, 5, 4],
    "space_only": [3, 2, 2],
}
FRAMES, GRID = 6, 4  # 6 frames of 4 x 4 patches


def encoder(rule, attention_type: str, seed: int = 0, **kwargs) -> TimeSformer:
    torch.manual_seed(0)
    return TimeSformer(img_size=16 * GRID, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_frames=FRAMES,
                       attention_type=attention_type, token_merging=True, testa_r=LAYOUTS[attention_type],
                       merge_rule=rule, merge_seed=seed, **kwargs).eval()


def clip(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, FRAMES, 16 * GRID, 16 * GRID, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("attention_type", LAYOUTS)
@pytest.mark.parametrize("rule", MERGING_RULES)
def test_tokens_sizes_and_sources_follow_the_schedule(rule, attention_type):
    model = encoder(rule, attention_type)
    video = clip()
    with torch.no_grad():
        out, trace = model.forward_with_trace(video, sources=True)
    expected = token_counts(EncoderShape.of(model), model.schedule(), FRAMES, GRID * GRID)
    assert trace.frames_patches == expected
    frames, patches = expected[-1]
    per_clip = frames * (1 + patches) if attention_type == "space_only" else 1 + frames * patches
    assert out.shape == (2, per_clip, 32)
    inputs = FRAMES * (1 + GRID * GRID) if attention_type == "space_only" else 1 + FRAMES * GRID * GRID
    # Every clip's sizes add up to its input tokens, and every input token is in exactly one output token.
    assert torch.equal(trace.size.sum(dim=1), torch.full((2,), float(inputs)))
    patch_columns = trace.source[:, :, 1:]
    assert torch.equal(patch_columns.sum(dim=1), torch.ones_like(patch_columns[:, 0]))
    assert torch.equal(trace.source[:, :, 1:].sum(dim=2) + trace.source[:, :, 0], trace.size)


@pytest.mark.parametrize("rule", MERGING_RULES)
def test_a_seed_gives_the_same_decisions_every_time(rule):
    video = clip()
    with torch.no_grad():
        first = encoder(rule, "divided_space_time", seed=3).forward_with_trace(video, sources=True)[1].source
        again = encoder(rule, "divided_space_time", seed=3).forward_with_trace(video, sources=True)[1].source
    assert torch.equal(first, again)


def test_the_random_rule_draws_from_its_seed():
    video = clip()
    with torch.no_grad():
        sources = [encoder("random", "divided_space_time", seed=seed).forward_with_trace(video, sources=True)[1].source
                   for seed in (0, 1)]
    assert not torch.equal(*sources)


@pytest.mark.parametrize("rule", MERGING_RULES)
def test_gradients_flow_through_the_merged_tokens(rule):
    model = encoder(rule, "divided_space_time").train()
    model(clip()).square().mean().backward()
    gradient = model.patch_embed.proj.weight.grad
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


@pytest.mark.slow  # a compilation per rule
@pytest.mark.parametrize("rule", MERGING_RULES)
def test_torch_compile_runs_each_rule_and_matches_eager(rule):
    model = encoder(rule, "divided_space_time")
    video = clip()
    with torch.no_grad():
        eager = model(video)
        compiled = torch.compile(model, backend="aot_eager")(video)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def _sharp_attention(tokens: int, groups: int) -> torch.Tensor:
    logits = torch.randn(groups, tokens, tokens, generator=torch.Generator().manual_seed(6)) * 3
    return logits.softmax(dim=-1)


@pytest.mark.parametrize("rule", MERGING_RULES)
def test_bf16_decides_as_fp32_on_well_separated_inputs(rule):
    # Random tokens in 32 dimensions have no near ties; held at bf16-representable values, the two runs
    # see the same inputs, so any difference would come from deciding in bf16 (rules decide in fp32).
    metric = torch.randn(3, 13, 32, generator=torch.Generator().manual_seed(5)).bfloat16()
    attention = _sharp_attention(13, 3).bfloat16()
    decisions = []
    for dtype in (torch.float32, torch.bfloat16):
        context = MergeContext(1, attention.to(dtype), torch.Generator().manual_seed(0), 0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            decisions.append(RULES[rule].match(metric.to(dtype), 4, context))
    for fp32, bf16 in zip(*decisions):
        assert torch.equal(fp32, bf16)


@pytest.mark.parametrize("rule", MERGING_RULES)
def test_a_matching_removes_r_rows_and_never_moves_the_protected_token(rule):
    metric = torch.randn(4, 11, 8, generator=torch.Generator().manual_seed(2))
    context = MergeContext(1, _sharp_attention(11, 4), torch.Generator().manual_seed(0), 0.25)
    matching = RULES[rule].match(metric, 5, context)
    assert matching.output_rows.shape == (4, 6) and matching.merged_rows.shape == (4, 5)
    assert (matching.output_rows[:, 0] == 0).all() and (matching.merged_rows != 0).all()
    assert (matching.merged_slots != 0).all()  # nothing merges into the [CLS]
    for kept, merged in zip(matching.output_rows.tolist(), matching.merged_rows.tolist()):
        assert sorted(kept + merged) == list(range(11))


def test_merge_rule_names_a_rule_per_axis():
    assert {axis: rule.name for axis, rule in resolve_rules("adjacent").items()} == {"time": "adjacent",
                                                                                    "space": "none"}
    assert {axis: rule.name for axis, rule in resolve_rules({"space": "pool"}).items()} == {"time": "none",
                                                                                          "space": "pool"}
    with pytest.raises(ValueError, match="unknown merge rule 'tomme'"):
        resolve_rules("tomme")


def test_a_rule_for_one_axis_merges_that_axis_only():
    with torch.no_grad():
        trace = encoder({"time": "none", "space": "tome"}, "divided_space_time").forward_with_trace(clip())[1]
    assert [frames for frames, _ in trace.frames_patches] == [FRAMES] * 3
    assert trace.frames_patches[-1][1] < GRID * GRID
