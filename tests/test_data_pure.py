"""Pure parts of the data pipeline: sampling, text, sharding, transforms, collate, unpickler."""
import collections
import os
import pickle
import random

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from data import video
from data.annotations import restricted_loads
from data.loader import EvalShardSampler, create_sampler, vqa_collate_fn
from data.text import pre_caption, pre_question
from data.transforms import (AUGMENT_OPS, IMAGE_OPS, OP_PARAMETERS, SIGNED_IMAGE_OPS, VIDEO_OPS, EvalTransform,
                             ImageTrainTransform, VideoTrainTransform, apply_plan, random_resized_crop_box)
from data.video import STRATEGIES, original_uniform_indices, sample_frame_indices
from models.pixels import MEAN, STD, normalize
from runtime.sharding import shard_indices


def test_uniform_is_the_original_truncated_step():
    # The original's numpy.arange(0, vlen, vlen / n, dtype=int) steps by floor(vlen / n).
    assert sample_frame_indices(20, 8, "uniform") == [0, 2, 4, 6, 8, 10, 12, 14]
    assert sample_frame_indices(61, 8, "uniform") == [0, 7, 14, 21, 28, 35, 42, 49]
    assert sample_frame_indices(150, 96, "uniform") == list(range(96))
    assert sample_frame_indices(50, 96, "uniform") == [0] * 96
    for num_frm in (8, 32, 96):
        for vlen in range(num_frm, 400):
            assert sample_frame_indices(vlen, num_frm, "uniform") == [i * (vlen // num_frm) for i in range(num_frm)]


def test_uniform_with_a_range_keeps_the_whole_clip_step_and_fits_num_frm():
    # first = int(1.0 * 10) = 10, last = int(2.9 * 10) = 29, step int(10 + 100 / 8) - 10 = 12.
    assert original_uniform_indices(100, 8, 10, 29) == [10, 22]
    assert sample_frame_indices(100, 8, "uniform", start=1.0, end=2.9, fps=10) == [10, 22] + [22] * 6
    # A range longer than the whole-clip step allows gives more than num_frm: the first num_frm are kept.
    assert original_uniform_indices(16, 2, 0, 16) == [0, 8]
    assert len(original_uniform_indices(100, 8, 0, 100)) == 8


def test_uniform_spread_covers_the_whole_clip():
    assert sample_frame_indices(20, 8, "uniform_spread") == [0, 2, 5, 7, 10, 12, 15, 17]
    assert sample_frame_indices(10, 4, "nlvl_uniform") == sample_frame_indices(10, 4, "uniform_spread")


def test_uniform_warns_once_when_it_repeats_or_skips_a_clips_tail(monkeypatch, capsys):
    monkeypatch.setattr(video, "_uniform_warning_shown", False)
    sample_frame_indices(16, 8, "uniform")  # 0, 2, ..., 14: every part of the clip sampled
    assert capsys.readouterr().err == ""
    sample_frame_indices(150, 96, "uniform")  # frames 0..95: the last 36% never seen
    assert "leaves the last 36% of a clip unsampled" in capsys.readouterr().err
    sample_frame_indices(20, 96, "uniform")
    assert capsys.readouterr().err == ""  # once per process
    monkeypatch.setattr(video, "_uniform_warning_shown", False)
    sample_frame_indices(20, 96, "uniform")
    assert "repeats frames" in capsys.readouterr().err


def test_nlvl_rand_stays_within_each_stride():
    for seed in range(20):
        indices = sample_frame_indices(100, 8, "nlvl_rand", random.Random(seed))
        assert all(int(12.5 * i) <= index < 12.5 * (i + 1) for i, index in enumerate(indices))


def test_rand_is_distinct_and_sorted():
    indices = sample_frame_indices(50, 16, "rand", random.Random(1))
    assert indices == sorted(set(indices)) and len(indices) == 16 and max(indices) < 50


def test_headtail_draws_half_from_each_half():
    indices = sample_frame_indices(100, 8, "headtail", random.Random(2))
    assert indices == sorted(indices)
    assert all(i < 50 for i in indices[:4]) and all(50 <= i < 100 for i in indices[4:])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("vlen", [1, 3, 7])
def test_short_clips_still_give_num_frm_indices(strategy, vlen):
    indices = sample_frame_indices(vlen, 8, strategy, random.Random(0))
    assert len(indices) == 8 and indices == sorted(indices) and 0 <= min(indices) and max(indices) < vlen
    if vlen > 1 and strategy in ("rand", "headtail"):
        assert set(indices) == set(range(vlen))  # every frame used before any repeat


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_start_end_times_limit_the_range(strategy):
    indices = sample_frame_indices(300, 8, strategy, random.Random(3), start=2.0, end=4.0, fps=30)
    assert len(indices) == 8 and all(60 <= i < 120 for i in indices)


def test_sampling_is_deterministic_given_a_seed_and_rejects_unknown_strategy():
    draws = [sample_frame_indices(90, 8, "rand", random.Random(5)) for _ in range(2)]
    assert draws[0] == draws[1]
    with pytest.raises(ValueError, match="headtail"):
        sample_frame_indices(90, 8, "middle")


def test_pre_caption_and_pre_question():
    assert pre_caption('  A "Red" (circle)!  moves #left~ ', max_words=50) == "a red circle moves left"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_question("What colour: is it; (the *ball*)?  ") == "what colour is it the ball?"
    assert pre_question(" ".join(["w"] * 60)).count("w") == 50


@pytest.mark.parametrize("num_items,world", [(10, 3), (7, 8), (64, 4), (0, 2)])
def test_eval_shards_are_disjoint_and_cover_the_dataset_in_order(num_items, world):
    shards = [list(shard_indices(num_items, world, rank)) for rank in range(world)]
    assert sum(shards, []) == list(range(num_items))
    assert list(EvalShardSampler(range(num_items), world, world - 1)) == shards[-1]


def test_training_sampler_reshuffles_per_epoch_and_splits_ranks():
    data = list(range(40))
    rank0, rank1 = create_sampler(data, True, 2, 0), create_sampler(data, True, 2, 1)
    rank0.set_epoch(0)
    rank1.set_epoch(0)
    epoch0 = list(rank0)
    assert sorted(epoch0 + list(rank1)) == data
    rank0.set_epoch(1)
    assert list(rank0) != epoch0
    rank0.set_epoch(0)
    assert list(rank0) == epoch0
    assert isinstance(create_sampler(data, False, 2, 0), EvalShardSampler)


def test_normalize_uses_the_spec_mean_and_std():
    clip = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2).expand(3, 1, 2)
    out = normalize(clip)
    for c in range(3):
        assert out[c, 0, 0].item() == pytest.approx(-MEAN[c] / STD[c], abs=1e-6)
        assert out[c, 0, 1].item() == pytest.approx((1 - MEAN[c]) / STD[c], abs=1e-6)


@pytest.mark.parametrize("name", sorted(AUGMENT_OPS))
@pytest.mark.parametrize("magnitude, sign", [(5, 1), (7, -1)])
def test_each_augment_op_keeps_shape_and_dtype(name, magnitude, sign):
    parameter = OP_PARAMETERS[name](magnitude)
    if name in SIGNED_IMAGE_OPS:
        parameter *= sign
    for frames in (torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8),
                   torch.randint(0, 256, (3, 20, 28), dtype=torch.uint8)):
        out = AUGMENT_OPS[name](frames, parameter)
        assert out.shape == frames.shape and out.dtype == torch.uint8


DRAWS = 4000


def test_video_train_transform_draws_two_distinct_ops_always_applied_and_unsigned():
    transform = VideoTrainTransform(32)
    pairs = collections.Counter()
    for seed in range(DRAWS):
        top, left, plan = transform.draw(random.Random(seed), 34, 36)
        assert 0 <= top <= 2 and 0 <= left <= 4
        assert len(plan) == 2 and plan[0][0] != plan[1][0]
        assert all(parameter == OP_PARAMETERS[name](5) for name, parameter in plan)
        pairs[plan[0][0], plan[1][0]] += 1
    assert len(pairs) == len(VIDEO_OPS) * (len(VIDEO_OPS) - 1)  # every ordered pair of distinct ops
    for slot in (0, 1):
        counts = collections.Counter(pair[slot] for pair in pairs.elements())
        assert all(abs(counts[name] / DRAWS - 1 / len(VIDEO_OPS)) < 0.025 for name in VIDEO_OPS)
    crops = {transform.draw(random.Random(seed), 34, 36)[:2] for seed in range(200)}
    assert crops == {(top, left) for top in range(3) for left in range(5)}  # inclusive bounds


def test_video_train_transform_applies_the_same_ops_to_every_frame():
    clip = torch.randint(0, 256, (4, 3, 40, 44), dtype=torch.uint8)
    transform = VideoTrainTransform(32)
    for seed in range(20):
        out = transform(clip, random.Random(seed))
        assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8
        assert torch.equal(out, transform(clip, random.Random(seed)))
        top, left, plan = transform.draw(random.Random(seed), 40, 44)
        for t in range(4):  # each frame alone, with the same draws
            crop = clip[t, :, top:top + 32, left:left + 32]
            assert torch.equal(out[t], apply_plan(crop, plan))
            assert torch.equal(out[t], transform(clip[t:t + 1], random.Random(seed))[0])


def test_video_train_transform_upscales_a_clip_smaller_than_the_crop():
    out = VideoTrainTransform(32)(torch.randint(0, 256, (2, 3, 24, 40), dtype=torch.uint8), random.Random(0))
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8


def test_image_transform_applies_each_op_with_probability_one_half_drawn_with_replacement():
    transform = ImageTrainTransform(32, num_frm=3)
    lengths, names, flips = collections.Counter(), collections.Counter(), 0
    repeats = negatives = signed = 0
    for seed in range(DRAWS):
        _, flip, plan = transform.draw(random.Random(seed), 50, 70)
        flips += flip
        lengths[len(plan)] += 1
        repeats += len(plan) == 2 and plan[0][0] == plan[1][0]
        for name, parameter in plan:
            names[name] += 1
            magnitude_seven = OP_PARAMETERS[name](7)
            if name in SIGNED_IMAGE_OPS:
                assert abs(parameter) == magnitude_seven
                signed += 1
                negatives += parameter < 0
            else:
                assert parameter == magnitude_seven
    assert abs(flips / DRAWS - 0.5) < 0.03
    for length, probability in ((0, 0.25), (1, 0.5), (2, 0.25)):  # two independent coin flips
        assert abs(lengths[length] / DRAWS - probability) < 0.03
    assert abs(repeats / lengths[2] - 1 / len(IMAGE_OPS)) < 0.04  # with replacement
    applied = sum(names.values())
    assert set(names) == set(IMAGE_OPS) and all(abs(names[n] / applied - 1 / len(IMAGE_OPS)) < 0.02 for n in IMAGE_OPS)
    assert abs(negatives / signed - 0.5) < 0.04


def test_image_transform_crop_boxes_respect_scale_and_ratio():
    height, width = 300, 400
    for seed in range(2000):
        top, left, box_height, box_width = random_resized_crop_box(random.Random(seed), height, width)
        assert 0 <= top <= height - box_height and 0 <= left <= width - box_width
        # Within the bounds up to rounding each side to whole pixels.
        assert 0.5 * 0.99 < box_height * box_width / (height * width) <= 1.0
        assert 3 / 4 * 0.99 < box_width / box_height < 4 / 3 * 1.01
    # No box of a 4:3 ratio at half the area fits a 10 x 1000 strip: the central fallback, ratio clamped.
    assert random_resized_crop_box(random.Random(0), 10, 1000) == (0, (1000 - 13) // 2, 10, 13)


def test_image_transform_makes_a_pseudo_video():
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    transform = ImageTrainTransform(32, num_frm=3)
    for seed in range(10):
        out = transform(image, random.Random(seed))
        assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8
        assert torch.equal(out[0], out[2]) and torch.equal(out, transform(image, random.Random(seed)))
        (top, left, box_height, box_width), flip, plan = transform.draw(random.Random(seed), 50, 70)
        expected = TF.resized_crop(image, top, left, box_height, box_width, [32, 32],
                                   interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        assert torch.equal(out[0], apply_plan(expected.flip(-1) if flip else expected, plan))


def test_eval_transform_resizes_deterministically():
    clip = torch.randint(0, 256, (2, 3, 40, 30), dtype=torch.uint8)
    assert EvalTransform(16)(clip).shape == (2, 3, 16, 16)
    assert torch.equal(EvalTransform(16)(clip), EvalTransform(16)(clip))


def test_vqa_collate_flattens_answers_with_weights():
    batch = [(torch.zeros(2, 3, 4, 4), "q1", ["red", "blue"], [0.5, 0.5]),
             (torch.ones(2, 3, 4, 4), "q2", ["up"], [1.0])]
    videos, questions, answers, weights, counts = vqa_collate_fn(batch)
    assert videos.shape == (2, 2, 3, 4, 4) and questions == ["q1", "q2"]
    assert answers == ["red", "blue", "up"] and weights.tolist() == [0.5, 0.5, 1.0] and counts == [2, 1]


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code_and_loads_plain_data(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"v1": [["a", "b"]], "evil": _RunsShell(marker)})
    with pytest.raises(pickle.UnpicklingError, match="system"):
        restricted_loads(payload)
    assert not marker.exists()
    plain = {"v1": [["a", "red", "circle"]], "n": (1, 2.5), "s": {1, 2}}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert restricted_loads(pickle.dumps(plain, protocol=protocol)) == plain


@pytest.mark.parametrize("num_items, world, unit", [(10, 2, 4), (7, 3, 2), (5, 4, 8), (16, 2, 8)])
def test_eval_shards_are_made_of_whole_batches(num_items, world, unit):
    shards = [shard_indices(num_items, world, rank, unit) for rank in range(world)]
    assert [i for shard in shards for i in shard] == list(range(num_items))
    for shard in shards:
        assert len(shard) == 0 or shard.start % unit == 0
