"""Pictures of merged tokens: source bookkeeping in every mode, token regions, colours, PNG/GIF."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from inference.aggregation import (BORDER_COLOUR, GAP, region_colors, render_aggregation, tinted_frame, token_colors,
                                   token_regions)
from models.pixels import normalize
from models.timesformer import TimeSformer
from tests.helpers import REPO_ROOT
from utils import dispatched_ops

TINY = dict(img_size=64, embed_dim=32, num_heads=2, num_frames=8)


def _frames_with_a_repeat(seed=3):
    """8 random 64x64 frames in which frame 1 repeats frame 0: a fresh encoder keeps them
    identical (zero time embedding and temporal_fc), so they are the pair a frame merge picks."""
    frames = np.random.default_rng(seed).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    frames[1] = frames[0]
    return frames


def _clip(frames):
    """uint8 (T, H, W, 3) -> the (1, C, T, H, W) float clip the encoder gets."""
    return normalize(torch.from_numpy(frames).permute(0, 3, 1, 2)).permute(1, 0, 2, 3)[None]


def _encoder(depth=2, **merging):
    torch.manual_seed(0)
    return TimeSformer(**TINY, depth=depth, token_merging=True, drop_path_rate=0.0, **merging).eval()


@pytest.mark.parametrize("merging", [
    dict(merging_type="frame&patch", testa_r=[1, 4, 1, 3]),
    dict(merging_type="frame", testa_r=[2, 1]),
    dict(merging_type="patch", testa_r=[3, 5]),
    dict(attention_type="space_only", testa_r=[3, 5]),
    dict(attention_type="joint_space_time", testa_r=[20, 10]),
])
def test_every_mode_traces_a_partition_of_the_patches_into_the_output_tokens(merging):
    encoder = _encoder(**merging)
    with torch.no_grad():
        out, trace = encoder.forward_with_trace(_clip(_frames_with_a_repeat()), block_sources=True)
    assert len(trace.block_sources) == 2 and torch.equal(trace.block_sources[-1], trace.source)
    regions = token_regions(trace.source[0], 8, (4, 4))
    # Every output token except the [CLS] rows holds at least one patch, each patch one token.
    holders = torch.nonzero(trace.source[0, :, 1:].sum(dim=1)).flatten().tolist()
    assert sorted(np.unique(regions).tolist()) == holders
    assert len(holders) == out.shape[1] - (8 if merging.get("attention_type") == "space_only" else 1)


def test_sources_are_tracked_only_when_asked():
    encoder = _encoder(merging_type="frame&patch", testa_r=[1, 4])
    with torch.no_grad():
        plain, trace = encoder.forward_with_trace(_clip(_frames_with_a_repeat()))
        traced, traced_trace = encoder.forward_with_trace(_clip(_frames_with_a_repeat()), sources=True)
    assert trace.source is None and trace.block_sources == []
    assert traced_trace.source is not None and traced_trace.block_sources == []
    torch.testing.assert_close(traced, plain, atol=0, rtol=0)


def test_regions_colours_and_picture_of_a_known_merge(tmp_path):
    frames = _frames_with_a_repeat()
    encoder = _encoder(merging_type="frame&patch", testa_r=[1, 4, 0, 2])
    with torch.no_grad():
        out, trace = encoder.forward_with_trace(_clip(frames), sources=True)
    regions = token_regions(trace.source[0], 8, (4, 4))
    final_tokens = out.shape[1] - 1
    assert trace.frames_patches[-1] == (7, 10)  # frame 0 went into frame 1; 16 -> 12 -> 10 patches
    assert np.array_equal(regions[0], regions[1])  # the merged frames share their tokens
    assert not np.isin(regions[2], regions[1]).any()
    assert len(np.unique(regions)) == final_tokens
    colors = region_colors(regions)
    assert len(np.unique(colors.reshape(-1, 3), axis=0)) == final_tokens

    paths = render_aggregation(encoder, _clip(frames), frames, tmp_path / "view.png", per_block=True,
                               gif=True, scale=2)
    assert [path.name for path in paths] == ["view.png", "view_block01.png", "view_block02.png",
                                            "view_blocks.gif"]
    with Image.open(paths[0]) as picture:
        assert picture.size == (8 * 128 + 7 * GAP, 128)
    with Image.open(paths[-1]) as animation:
        assert animation.n_frames == 2
    assert Image.open(paths[2]).tobytes() == Image.open(paths[0]).tobytes()  # last block = final


def test_tinted_frame_blends_colours_and_draws_borders_between_tokens():
    frame = np.full((4, 4, 3), 100, dtype=np.uint8)
    regions = np.array([[0, 0], [1, 1]])
    colors = np.zeros((2, 2, 3), dtype=np.uint8)
    colors[1] = 200
    tinted = tinted_frame(frame, regions, colors, scale=2)
    assert tinted.shape == (8, 8, 3)
    assert (tinted[0] == 50).all() and (tinted[7] == 150).all()  # half frame, half token colour
    assert (tinted[3:5] == BORDER_COLOUR).all()  # a 1-pixel border on each side of the boundary
    assert not (tinted[:, 3:5] == BORDER_COLOUR).all()  # none inside a token


def test_palette_is_reproducible_and_neighbours_differ_in_hue():
    assert np.array_equal(token_colors(50, seed=1), token_colors(50, seed=1))
    assert not np.array_equal(token_colors(50, seed=1), token_colors(50, seed=2))
    colors = token_colors(50).astype(int)
    assert (np.abs(np.diff(colors, axis=0)).sum(axis=1) > 60).all()


def test_bad_inputs_are_refused():
    encoder = _encoder(merging_type="frame&patch", testa_r=[1, 4])
    frames = _frames_with_a_repeat()
    with pytest.raises(ValueError, match="frames must be uint8"):
        render_aggregation(encoder, _clip(frames), frames[:4], "unused.png")
    with pytest.raises(ValueError, match="not a partition"):
        token_regions(torch.ones(3, 1 + 8 * 16), 8, (4, 4))


def test_tracking_off_dispatches_the_plain_forward_ops_whatever_the_default():
    """The bookkeeping costs nothing when off: the plain forward dispatches the same operations
    whatever the encoder's tracking default, and switching tracking on adds some."""
    clip = _clip(_frames_with_a_repeat())
    encoder = _encoder(testa_r=[1, 4, 1, 3])
    with torch.no_grad():
        plain = dispatched_ops(lambda: encoder(clip))
        traced = dispatched_ops(lambda: encoder.forward_with_trace(clip, sources=False))  # records block outputs
        encoder.trace_source = True  # only forward_with_trace's default: the plain forward never tracks
        assert dispatched_ops(lambda: encoder(clip)) == plain
        assert len(dispatched_ops(lambda: encoder.forward_with_trace(clip))) > len(traced)


@pytest.mark.slow
def test_source_tracking_benchmark_finds_the_off_path_unchanged(tmp_path):
    """The benchmark's A/B against the committed encoder, at a tiny size: tracking off dispatches
    exactly the committed forward's aten ops, tracking on dispatches more."""
    if subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], check=False, capture_output=True).returncode:
        pytest.skip("not a git checkout: the benchmark's baseline is a git revision")
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "benchmarks.bench_source_tracking", "--device", "cpu", "--runs", "1",
               "--warmup", "0", "--frames", "4", "--baseline_rev", "HEAD", "--out", str(out)]
    for override in ("image_size=32", "vision_width=32", "num_heads=2", "depth=2"):
        command += ["--override", override]
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = {row["forward"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["off"]["same_ops_as_baseline"] and rows["off"]["aten_ops"] == rows["baseline"]["aten_ops"]
    assert rows["on"]["aten_ops"] > rows["off"]["aten_ops"]
