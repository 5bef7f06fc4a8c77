"""Config values are checked when a config is loaded: every rule kind of configs/keys.py
(minimum, maximum, finiteness, choices, list entries, a key that must divide another), the
task a config is for and the keys its run does not read, and the testa_r warnings the encoder
says when it is built, whose clamping must be the encoder's own."""
import re

import pytest
import torch

from configs.keys import CONFIG_KEYS, DATASET_TASKS, FRAME_SAMPLING, ConfigError, task_of
from configs.load import load_config
from models.schedule import clamped_merges, merge_schedule
from models.timesformer import build_video_encoder
from tests.helpers import REPO_ROOT

TOY = REPO_ROOT / "configs" / "toy"
# The encoder of the toy configs at depth 2: 8 frames of 4 x 4 patches, testa_r read as 2 x 2 entries.
TOY_ENCODER = ["depth=2", "testa_r=[1, 2, 1, 2]"]
CONFIGS_THAT_LOAD_SILENTLY = sorted(
    [*(REPO_ROOT / "configs").rglob("*.yaml"), *(REPO_ROOT / "tests" / "fixtures").glob("*.yaml"),
     *(REPO_ROOT / "tests" / "fixtures" / "e2e").glob("*.yaml"),
     *(REPO_ROOT / "tests" / "fixtures" / "train_e2e").glob("*.yaml")])


def load_toy(overrides, name="retrieval"):
    return load_config(TOY / f"{name}.yaml", overrides)


def warnings_of(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


# ----------------------------------------------------------------------------- one key's rules
@pytest.mark.parametrize("name", sorted(name for name, key in CONFIG_KEYS.items() if key.minimum is not None))
def test_every_minimum_is_the_lowest_value_accepted(name):
    key = CONFIG_KEYS[name]
    below, lowest = (key.minimum - 1, key.minimum) if int in key.types else (key.minimum - 0.5, float(key.minimum))
    with pytest.raises(ConfigError, match=rf"config key '{name}' in override '{name}={below}' "
                                          rf"must be >= {key.minimum}, got {below}"):
        load_toy([f"{name}={below}"])
    divisible_by_anything = ["patch_size=1", "num_heads=1"]  # so that image_size and vision_width may be 1
    assert load_toy([*divisible_by_anything, f"{name}={lowest}"])[name] == lowest


@pytest.mark.parametrize("name", sorted(name for name, key in CONFIG_KEYS.items()
                                        if key.maximum is not None and key.types != (list,)))
def test_every_maximum_is_the_highest_value_accepted(name):
    with pytest.raises(ConfigError, match=rf"'{name}' in override '{name}=1.5' must be <= 1, got 1.5"):
        load_toy([f"{name}=1.5"])
    load_toy([f"{name}=1"])


@pytest.mark.parametrize("name", sorted(name for name, key in CONFIG_KEYS.items() if key.choices))
def test_every_enumeration_accepts_its_choices_and_nothing_else(name):
    key = CONFIG_KEYS[name]
    choices = re.escape(", ".join(map(repr, key.choices)))
    with pytest.raises(ConfigError, match=rf"'{name}' in override '{name}=bogus' must be one of {choices}, got "):
        load_toy([f"{name}=bogus"])
    for choice in key.choices:
        assert load_toy([f"{name}={choice}"])[name] == choice


def test_numbers_must_be_finite():
    for text in (".nan", ".inf"):
        with pytest.raises(ConfigError, match=rf"'init_lr' in override 'init_lr={text}' must be a finite number"):
            load_toy([f"init_lr={text}"])


@pytest.mark.parametrize("override, expected", [
    ("testa_r=[1, 2, -1, 2]", r"'testa_r' in override .* has entry -1; entries must be >= 0"),
    ("testa_r=[1.5, 2]", r"has entry 1.5; entries must be int"),
    ("testa_r=[1, true]", r"has entry True; entries must be int"),
    ("testa_r=-3", r"'testa_r' in override 'testa_r=-3' must be >= 0, got -3"),
    ("train_file=[a.json, 7]", r"'train_file' in override .* has entry 7; entries must be str"),
    ("merge_budget_range=[0.2, 1.5]", r"has entry 1.5; entries must be <= 1"),
    ("merge_budget_range=[0, 0.5]", r"has entry 0; entries must be > 0"),
    ("merge_rule={time: adjacent, space: tomme}", r"'merge_rule' .* has space: 'tomme'; it must be one of 'testa'"),
    ("merge_rule={frames: tome}", r"'merge_rule' .* has axis 'frames'; the axes are time, space")])
def test_list_entries_are_checked_one_by_one(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_toy([override], "pretrain")


def test_an_error_names_the_file_or_the_override_that_set_the_value(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text((TOY / "retrieval.yaml").read_text().replace("k_test: 16", "k_test: 0"))
    with pytest.raises(ConfigError, match=rf"'k_test' in {path} must be >= 1, got 0"):
        load_config(path)
    assert load_config(path, ["k_test=4"])["k_test"] == 4  # a later override fixes the file's value


# ----------------------------------------------------------------------------- keys that divide others
@pytest.mark.parametrize("overrides, expected", [
    (["image_size=65"], r"'image_size' \(65, in override 'image_size=65'\) must be a multiple of 'patch_size' "
                        r"\(16, in .*retrieval\.yaml\)"),
    (["num_heads=3"], r"'vision_width' \(64, in .*retrieval\.yaml\) must be a multiple of 'num_heads' "
                      r"\(3, in override 'num_heads=3'\)")])
def test_a_size_must_be_a_multiple_of_the_key_that_divides_it(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_toy(overrides)


def test_a_divisor_left_at_its_default_is_named_so(tmp_path):
    path = tmp_path / "images.yaml"
    path.write_text("train_file: [images.json]\nimage_size: 40\n")  # patch_size: the default 16
    with pytest.raises(ConfigError, match=r"'image_size' \(40, .*\) must be a multiple of 'patch_size' "
                                          r"\(16, the default\)"):
        load_config(path)


def test_clips_of_other_lengths_than_the_time_embedding_are_allowed(capsys):
    # The encoder resizes its time embedding to the clip's frames (models/embedding_resize.py).
    config = load_toy([*TOY_ENCODER, "num_frames=8", "num_frm_train=4", "num_frm_test=16"])
    assert (config["num_frm_train"], config["num_frm_test"]) == (4, 16) and warnings_of(capsys) == []


def test_a_divisor_of_zero_is_reported_as_itself():
    with pytest.raises(ConfigError, match=r"'patch_size' in override 'patch_size=0' must be >= 1"):
        load_toy(["patch_size=0"])


# ----------------------------------------------------------------------------- the tables agree with the code
def test_the_enumerations_are_the_ones_the_code_acts_on():
    from data.datasets import ANSWER_CANDIDATE_RULES, RETRIEVAL_FORMATS
    from data.video import STRATEGIES
    from evaluation.metrics import TIE_RULES
    from evaluation.qa import INFERENCE_MODES
    from models.rules import RULES
    from models.schedule import ATTENTION_ALIASES, MERGING_TYPES
    from models.timesformer import ATTENTION_TYPES
    from runtime.precision import PRECISION_METHODS
    from training.optim import EXEMPTION_RULES
    acted_on = {"attention_type": {*ATTENTION_TYPES, *ATTENTION_ALIASES}, "merging_type": set(MERGING_TYPES),
                "frm_sampling_strategy": set(STRATEGIES), "frm_sampling_strategy_test": set(STRATEGIES),
                "tie_rule": set(TIE_RULES), "inference": set(INFERENCE_MODES),
                "answer_candidates": set(ANSWER_CANDIDATE_RULES), "weight_decay_exempt": set(EXEMPTION_RULES),
                "dataset": {*RETRIEVAL_FORMATS, "activitynet_qa"}, "vit": {"timesformer"},
                "mixed_precision_method": set(PRECISION_METHODS), "merge_rule": set(RULES)}
    assert {name: set(key.choices) for name, key in CONFIG_KEYS.items() if key.choices} == acted_on
    assert set(FRAME_SAMPLING) == set(STRATEGIES)


def test_each_dataset_names_its_task():
    assert {dataset: task_of({"dataset": dataset}) for dataset in DATASET_TASKS} == {
        "retrieval_queryd": "retrieval", "retrieval_didemo": "retrieval", "retrieval_activitynet": "retrieval",
        "retrieval_condensedmovies": "retrieval", "activitynet_qa": "qa"}
    assert task_of({"train_shards": "shards/{0..3}.tar"}) == task_of({"train_file": ["a.json"]}) == "pretrain"
    assert task_of({"image_size": 224}) is None  # a partial config: nothing is said about unread keys


@pytest.mark.parametrize("path", CONFIGS_THAT_LOAD_SILENTLY, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_published_toy_and_original_format_configs_load_without_a_warning(path, capsys):
    config = load_config(path)
    assert warnings_of(capsys) == []
    assert task_of(config) is not None  # so the keys they set are all read by their run


# ----------------------------------------------------------------------------- keys a run does not read
@pytest.mark.parametrize("name, overrides, expected", [
    ("retrieval", ["batch_size=8"],
     "warning: a retrieval run does not read 'batch_size' (pre-training batch per process); it is ignored"),
    ("retrieval", ["answer_list=answers.json", "lr_decay_rate=0.9"],
     "warning: a retrieval run does not read 'answer_list' (QA: JSON list of candidate answers), "
     "'lr_decay_rate' (pre-training: lr factor per epoch); they are ignored"),
    ("qa", ["queue_size=64"],
     "warning: a video QA run does not read 'queue_size' (ITC feature queue length (retrieval and pre-training)); "
     "it is ignored"),
    ("pretrain", ["batch_size_test=4"],
     "warning: a pre-training run does not read 'batch_size_test' (evaluation batch per process); it is ignored")])
def test_a_key_the_run_does_not_read_is_one_warning(name, overrides, expected, capsys):
    load_toy(TOY_ENCODER + overrides, name)
    assert warnings_of(capsys) == [expected]


def test_only_the_first_process_warns(monkeypatch, capsys):
    monkeypatch.setattr("configs.load.is_main_process", lambda: False)
    monkeypatch.setattr("models.schedule.is_main_process", lambda: False)
    build_video_encoder(load_toy([*TOY_ENCODER, "batch_size=8", "testa_r=[1, 2]"]))
    assert warnings_of(capsys) == []


# ----------------------------------------------------------------------------- the testa_r schedule
@pytest.mark.parametrize("overrides, expected", [
    (["testa_r=[1, 2, 1, 2, 1, 2]"], "the encoder reads 4 entries (2 blocks x 2 for divided_space_time "
                                     "frame&patch): the last 2 of the 6 given are ignored"),
    (["testa_r=[1, 2]"], "the encoder reads 4 entries (2 blocks x 2 for divided_space_time frame&patch): "
                         "2 zeros are added to the 2 given"),
    (["testa_r=[1, 2, 1, 2]", "attention_type=space-only"],
     "the encoder reads 2 entries (2 blocks x 1 for space_only frame&patch): the last 2 of the 4 given are ignored"),
    (["testa_r=[5, 2, 1, 20]"], "with clips of 8 frames (num_frm_train, num_frm_test) 2 merge counts are clamped to "
                                "half of the tokens that may merge, first in block 1: 3 of its 8 frames, not 5"),
    (["testa_r=[0, 9, 0, 2]"], "with clips of 8 frames (num_frm_train, num_frm_test) 1 merge count is clamped to "
                               "half of the tokens that may merge, first in block 1: 8 of its 16 patches, not 9"),
    (["testa_r=[1, 2, 1, 2]", "num_frm_test=2"],
     "with clips of 2 frames (num_frm_test) 2 merge counts are clamped to half of the tokens that may merge, "
     "first in block 1: 0 of its 2 frames, not 1"),
    (["testa_r=[1, 2, 1, 2, 1, 2]", "num_frm_test=2"],
     "the encoder reads 4 entries (2 blocks x 2 for divided_space_time frame&patch): the last 2 of the 6 given are "
     "ignored; with clips of 2 frames (num_frm_test) 2 merge counts are clamped to half of the tokens that may "
     "merge, first in block 1: 0 of its 2 frames, not 1"),
    (["testa_r=100", "attention_type=joint_space_time"],
     "with clips of 8 frames (num_frm_train, num_frm_test) 2 merge counts are clamped to half of the tokens that "
     "may merge, first in block 1: 64 of its 129 tokens, not 100")])
def test_a_schedule_the_encoder_adjusts_is_one_warning_saying_how(overrides, expected, capsys):
    config = load_toy(["depth=2", *overrides])
    assert warnings_of(capsys) == []  # said by the encoder it concerns, when it is built
    build_video_encoder(config)
    assert warnings_of(capsys) == [f"warning: testa_r: {expected}"]


@pytest.mark.parametrize("overrides", [
    ["testa_r=[1, 2, 1, 2]"], ["testa_r=1"], ["testa_r=[9, 99]", "token_merging=false"],
    ["testa_r=[1, 2]", "merging_type=patch"]])
def test_a_schedule_the_encoder_follows_is_silent(overrides, capsys):
    build_video_encoder(load_toy(["depth=2", *overrides]))
    assert warnings_of(capsys) == []


@pytest.mark.parametrize("attention_type, merging_type, testa_r", [
    ("divided_space_time", "frame&patch", [5, 2, 1, 20, 2, 9]), ("divided_space_time", "frame", [5, 3, 2]),
    ("divided_space_time", "patch", [9, 3, 9]), ("space_only", "patch", [9, 3, 9]),
    ("joint_space_time", "patch", [70, 30, 30])])
def test_the_clamping_warned_about_is_the_encoders_own(attention_type, merging_type, testa_r):
    config = load_toy(["depth=3", f"attention_type={attention_type}", f"merging_type={merging_type}",
                       f"testa_r={testa_r}"])
    with torch.no_grad():
        _, trace = build_video_encoder(config).eval().forward_with_trace(torch.zeros(1, 3, 8, 64, 64))
    schedule = merge_schedule(testa_r, merging_type, attention_type, 3)
    # trace.frames_patches: (frames, patches) after each divided block, else (frames, tokens - 1 for [CLS]).
    start = {"divided_space_time": (8, 16), "space_only": (8, 16), "joint_space_time": (1, 8 * 16)}[attention_type]
    counts = [start, *trace.frames_patches]
    seen_clamped = []
    for block, (before, after, asked) in enumerate(zip(counts, counts[1:], schedule), 1):
        if attention_type == "divided_space_time":
            for axis, what in ((0, "frames"), (1, "patches")):
                if before[axis] - after[axis] < asked[axis]:
                    seen_clamped.append((block, before[axis] - after[axis], before[axis], what, asked[axis]))
        elif before[1] - after[1] < asked[1]:
            seen_clamped.append((block, before[1] - after[1], 1 + before[1], "tokens", asked[1]))
    assert seen_clamped and clamped_merges(schedule, attention_type, merging_type, 8, 16) == seen_clamped
