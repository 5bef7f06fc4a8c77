"""TimeSformer encoder: parity with the original's fixtures, every mode, keys, helpers."""
import copy

import pytest
import torch
from ruamel.yaml import YAML

from models.embedding_resize import resize_pos_embed, resize_time_embed
from models.schedule import merge_schedule
from models.timesformer import TimeSformer, build_video_encoder
from models.timesformer_blocks import DividedSpaceTimeBlock, drop_path, drop_path_mask

PREFIX = "visual_encoder."
TINY = dict(img_size=64, embed_dim=32, num_heads=2, num_frames=8)


def _tiny_video(frames=8, size=64, batch=2):
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(7))


def _load_encoder(fixtures_dir, name):
    config = YAML(typ="safe").load((fixtures_dir / f"{name}.yaml").read_text())
    encoder = build_video_encoder(config)
    state = torch.load(fixtures_dir / f"{name}.pth", map_location="cpu", weights_only=True)["model"]
    visual = {key[len(PREFIX):]: value for key, value in state.items() if key.startswith(PREFIX)}
    encoder.load_state_dict(visual, strict=True)
    return encoder.eval()


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", ["retrieval", "retrieval_nomerge", "pretrain", "vqa"])
def test_matches_the_original_block_by_block(fixtures_dir, name):
    encoder = _load_encoder(fixtures_dir, name)
    reference = torch.load(fixtures_dir / f"{name}_ref.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        out, trace = encoder.forward_with_trace(reference["video"])
    torch.testing.assert_close(trace.block_input, reference["visual_block0_input"], atol=1e-5, rtol=0)
    assert len(trace.block_outputs) == len(reference["visual_block_outputs"]) == 12
    for ours, theirs in zip(trace.block_outputs, reference["visual_block_outputs"]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, reference["visual_encoder_out"], atol=1e-5, rtol=0)
    assert [x.shape[1] for x in trace.block_outputs] == reference["block_tokens"].tolist()
    if len(reference["block_T_L"]):
        assert trace.frames_patches == [tuple(row) for row in reference["block_T_L"].tolist()]


# ----------------------------------------------------------------------------- modes
@pytest.mark.parametrize("merging_type, testa_r, expected", [
    ("frame", [2, 1, 1], [(6, 16), (5, 16), (4, 16)]),  # frame mode caps at T // 2, no [CLS] slot
    ("patch", [3, 5, 4], [(8, 13), (8, 8), (8, 4)]),
    ("frame&patch", [3, 8, 1, 2], [(5, 8), (4, 6), (4, 6)]),  # frames capped at (8 - 1) // 2
])
def test_divided_merging_modes_give_the_scheduled_token_counts(merging_type, testa_r, expected):
    encoder = TimeSformer(**TINY, depth=3, token_merging=True, testa_r=testa_r,
                          merging_type=merging_type).eval()
    with torch.no_grad():
        out, trace = encoder.forward_with_trace(_tiny_video())
    assert trace.frames_patches == expected
    frames, patches = expected[-1]
    assert out.shape == (2, 1 + frames * patches, 32)
    assert torch.isfinite(out).all()


def test_frame_merging_with_learnable_temporal_scaling_runs_and_averages_the_scale():
    encoder = TimeSformer(**TINY, depth=2, token_merging=True, testa_r=2, merging_type="frame",
                          learnable_temporal_scaling=True).eval()
    with torch.no_grad():
        for block in encoder.blocks:
            block.temporal_scaling.copy_(torch.randn(1, 8, 1))
        out, trace = encoder.forward_with_trace(_tiny_video())
    assert trace.frames_patches == [(6, 16), (4, 16)]
    assert out.shape == (2, 1 + 4 * 16, 32)
    # A frame made of original frames 0 and 3 gets the mean of their scales.
    block = encoder.blocks[0]
    scale = torch.tanh(block.temporal_scaling[0, :, 0].detach()) + 1
    frame_source = torch.zeros(1, 2, 8)
    frame_source[0, 0, [0, 3]] = 1
    frame_source[0, 1, 5] = 1
    torch.testing.assert_close(block.frame_scale(frame_source),
                               torch.stack([(scale[0] + scale[3]) / 2, scale[5]])[None])


def test_zero_temporal_scaling_equals_no_scaling_under_frame_merging():
    plain = TimeSformer(**TINY, depth=2, token_merging=True, testa_r=[1, 3, 2, 2]).eval()
    scaled = TimeSformer(**TINY, depth=2, token_merging=True, testa_r=[1, 3, 2, 2],
                         learnable_temporal_scaling=True).eval()
    scaled.load_state_dict(plain.state_dict(), strict=False)  # temporal_scaling stays 0 -> factor 1
    video = _tiny_video()
    with torch.no_grad():
        torch.testing.assert_close(scaled(video), plain(video))


@pytest.mark.parametrize("attention_type", ["space_only", "space-only"])
def test_space_only_encodes_frames_independently(attention_type):
    encoder = TimeSformer(**TINY, depth=2, attention_type=attention_type).eval()
    assert encoder.attention_type == "space_only"
    video = _tiny_video()
    with torch.no_grad():
        out = encoder(video)
        single = encoder(video[:, :, 3:4])
    assert out.shape == (2, 8 * 17, 32)
    torch.testing.assert_close(out.view(2, 8, 17, 32)[:, 3], single, atol=1e-6, rtol=0)


def test_space_only_merging_runs_tome_inside_each_frame():
    encoder = TimeSformer(**TINY, depth=3, attention_type="space_only", token_merging=True,
                          testa_r=[1, 12, 4], merging_type="frame&patch").eval()
    with torch.no_grad():
        out, trace = encoder.forward_with_trace(_tiny_video())
    # One entry per block: 16 -> 15 -> 8 (12 capped at 15 // 2 = 7) -> 4.
    assert trace.frames_patches == [(8, 15), (8, 8), (8, 4)]
    assert trace.block_outputs[-1].shape == (16, 5, 32)
    assert out.shape == (2, 8 * 5, 32)


def test_joint_space_time_attends_over_all_tokens_and_merges_with_tome():
    encoder = TimeSformer(**TINY, depth=2, attention_type="joint_space_time", token_merging=True,
                          testa_r=[20, 10]).eval()
    assert not any("temporal" in key for key in encoder.state_dict())
    assert "time_embed" in encoder.state_dict()
    with torch.no_grad():
        out, trace = encoder.forward_with_trace(_tiny_video())
    assert trace.frames_patches == [(1, 108), (1, 98)]
    assert out.shape == (2, 99, 32)


def test_proportional_attention_and_source_tracing_run_in_divided_mode():
    encoder = TimeSformer(**TINY, depth=2, token_merging=True, testa_r=[2, 3, 1, 4], prop_attn=True,
                          trace_source=True).eval()
    with torch.no_grad():
        out, trace = encoder.forward_with_trace(_tiny_video())
    assert trace.frames_patches == [(6, 13), (5, 9)]
    assert trace.source.shape == (2, 1 + 5 * 9, 1 + 8 * 16)
    # Every input token belongs to exactly one output token; [CLS] only to itself.
    assert torch.equal(trace.source.sum(dim=1), torch.ones(2, 129))
    assert trace.source[:, 0, 0].eq(1).all() and trace.source[:, 0].sum().item() == 2
    assert out.shape == (2, 46, 32)


def test_proportional_attention_changes_the_output_only_after_merging():
    video = _tiny_video()
    # Block 0 merges only after its attentions, so all its sizes are still 1.
    plain = TimeSformer(**TINY, depth=2, token_merging=True, testa_r=[0, 3, 1, 4]).eval()
    proportional = copy.deepcopy(plain)
    for block in proportional.blocks:
        block.prop_attn = True
    with torch.no_grad():
        _, plain_trace = plain.forward_with_trace(video)
        _, prop_trace = proportional.forward_with_trace(video)
    torch.testing.assert_close(prop_trace.block_outputs[0], plain_trace.block_outputs[0])
    assert not torch.allclose(prop_trace.block_outputs[1], plain_trace.block_outputs[1])


def test_input_of_another_size_and_length_uses_resized_embeddings():
    encoder = TimeSformer(**TINY, depth=1).eval()
    with torch.no_grad():
        out = encoder(_tiny_video(frames=4, size=96))
    assert out.shape == (2, 1 + 36 * 4, 32)


def test_bad_input_is_rejected_with_a_clear_message():
    encoder = TimeSformer(**TINY, depth=1)
    with pytest.raises(ValueError, match=r"video must be \(B, 3, T, H, W\)"):
        encoder(torch.randn(2, 8, 3, 64, 64))
    with pytest.raises(ValueError, match="not multiples of patch size"):
        encoder(torch.randn(1, 3, 2, 60, 64))


# ----------------------------------------------------------------------------- training
@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    video = _tiny_video()
    # Stochastic depth on: the recomputation must replay the same drop masks.
    kwargs = dict(TINY, depth=3, drop_path_rate=0.3, token_merging=True, testa_r=[1, 3, 1, 2])
    plain = TimeSformer(**kwargs).train()
    checkpointed = TimeSformer(**kwargs, grad_checkpointing=True, ckpt_layer=2).train()
    checkpointed.load_state_dict(plain.state_dict())
    outputs = []
    for encoder in (plain, checkpointed):
        torch.manual_seed(11)
        outputs.append(encoder(video))
        outputs[-1].square().mean().backward()
    torch.testing.assert_close(outputs[1], outputs[0])
    for (name, param), other in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(other.grad, param.grad, msg=name)
    assert [key for key in checkpointed.state_dict()] == [key for key in plain.state_dict()]


def test_stochastic_depth_drops_whole_samples_in_training_only():
    like = torch.zeros(1)
    assert drop_path_mask(4, 0.5, training=False, like=like) is None
    assert drop_path_mask(4, 0.0, training=True, like=like) is None
    mask = drop_path_mask(1000, 0.25, training=True, like=like)
    torch.testing.assert_close(mask.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert 0.2 < (mask == 0).float().mean() < 0.3
    x = torch.ones(3, 2, 5)
    dropped = drop_path(x, torch.tensor([0.0, 2.0, 1.0]))
    assert dropped[0].eq(0).all() and dropped[1].eq(2).all() and dropped[2].eq(1).all()


def test_initialisation_starts_as_a_per_frame_image_encoder():
    encoder = TimeSformer(**TINY, depth=3, learnable_temporal_scaling=True)
    assert encoder.time_embed.abs().sum() == 0
    for block in encoder.blocks:
        assert block.temporal_fc.weight.abs().sum() == 0 and block.temporal_fc.bias.abs().sum() == 0
        assert block.temporal_scaling.abs().sum() == 0
        assert torch.equal(block.norm1.weight, torch.ones(32)) and block.norm1.eps == 1e-6
        assert block.attn.qkv.bias.abs().sum() == 0 and 0.01 < block.attn.qkv.weight.std() < 0.03
    assert 0.01 < encoder.pos_embed.std() < 0.03 and encoder.cls_token.abs().max() < 0.1


# ----------------------------------------------------------------------------- keys
@pytest.mark.parametrize("stem, kwargs", [
    ("testa_retrieval_queryd_f32", {}),
    ("testa_retrieval_queryd_f32_lts", dict(learnable_temporal_scaling=True)),
    ("testa_retrieval_queryd_f32_space_only", dict(attention_type="space_only")),
    ("blip_pretrain_timesformer", dict(num_frames=8, learnable_temporal_scaling=True)),
    # space_only has no temporal attention, so no temporal scaling either
    ("blip_pretrain_timesformer_space_only", dict(num_frames=8, learnable_temporal_scaling=True,
                                                  attention_type="space_only")),
])
def test_base_encoder_keys_and_shapes_match_the_released_checkpoints(fixtures_dir, stem, kwargs):
    listing = fixtures_dir / "checkpoint_keys" / f"{stem}_state_dict.txt"
    expected = []
    for line in listing.read_text().splitlines():
        name, shape, _ = line.split("\t")
        if name.startswith(PREFIX):
            expected.append((name[len(PREFIX):], [int(s) for s in shape.strip("[]").split(",") if s.strip()]))
    published = dict(num_frames=32, token_merging=True, testa_r=[1, 12] * 12)
    with torch.device("meta"):
        encoder = TimeSformer(**{**published, **kwargs})
    ours = [(name, list(value.shape)) for name, value in encoder.state_dict().items()]
    assert ours == expected


# ----------------------------------------------------------------------------- config
def test_merge_schedule_reads_entries_per_block():
    assert merge_schedule(3, "frame&patch", "divided_space_time", 2) == [(3, 3), (3, 3)]
    assert merge_schedule([1, 12, 2], "frame&patch", "divided_space_time", 3) == [(1, 12), (2, 0), (0, 0)]
    assert merge_schedule([1, 2], "frame", "divided_space_time", 3) == [(1, 0), (2, 0), (0, 0)]
    assert merge_schedule([1, 2], "patch", "divided_space_time", 2) == [(0, 1), (0, 2)]
    assert merge_schedule([1, 12, 1], "frame&patch", "space_only", 3) == [(0, 1), (0, 12), (0, 1)]
    assert merge_schedule([5, 5], "frame&patch", "divided_space_time", 2, token_merging=False) == [(0, 0)] * 2
    # Extra entries are ignored: the released space_only configs keep the 24-entry list.
    assert merge_schedule([1, 2, 3], "patch", "divided_space_time", 2) == [(0, 1), (0, 2)]
    with pytest.raises(ValueError, match="entries must be >= 0"):
        merge_schedule([1, -2], "patch", "divided_space_time", 2)


def test_builder_reads_the_yaml_keys_and_rejects_unknown_choices():
    config = dict(image_size=64, vision_width=32, num_heads=2, num_frm_train=4, attention_type="divided_space_time",
                  learnable_temporal_scaling=True, token_merging=True, testa_r=[1, 2], merging_type="patch",
                  vit_grad_ckpt=True, vit_ckpt_layer=3)
    encoder = build_video_encoder(config)
    assert encoder.num_frames == 4 and encoder.embed_dim == 32
    assert encoder.grad_checkpointing and encoder.ckpt_layer == 3
    assert encoder.blocks[1].patch_r == 2 and encoder.blocks[0].frame_r == 0
    assert isinstance(encoder.blocks[0], DividedSpaceTimeBlock) and encoder.blocks[0].drop_path_rate == 0
    for key, value, message in [("attention_type", "cross", "attention_type must be one of"),
                                ("merging_type", "token", "merging_type must be one of"),
                                ("vit", "base", "'vit' must be 'timesformer'")]:
        with pytest.raises(ValueError, match=message):
            build_video_encoder(dict(config, **{key: value}))


# ----------------------------------------------------------------------------- embeddings
def test_resize_pos_embed_keeps_cls_and_interpolates_the_grid():
    pos_embed = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(pos_embed, 4) is pos_embed
    resized = resize_pos_embed(pos_embed, 6)
    assert resized.shape == (1, 37, 8)
    torch.testing.assert_close(resized[:, 0], pos_embed[:, 0])
    constant = torch.ones(1, 17, 8)
    torch.testing.assert_close(resize_pos_embed(constant, 7), torch.ones(1, 50, 8))
    nearest = resize_pos_embed(pos_embed, 8, mode="nearest").view(1 + 64, 8)[1:].view(8, 8, 8)
    torch.testing.assert_close(nearest[::2, ::2], pos_embed[0, 1:].view(4, 4, 8))


def test_resize_time_embed_repeats_frames_with_nearest():
    time_embed = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 3)
    resized = resize_time_embed(time_embed, 8)
    assert resized.shape == (1, 8, 3)
    assert resized[0, :, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert resize_time_embed(time_embed, 2)[0, :, 0].tolist() == [0, 2]
