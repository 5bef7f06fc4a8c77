"""A checkpoint must fit the model it is loaded into, and a resume the run that wrote its
checkpoint (docs/checkpoints.md: "Loading rules", "Resuming"; the scripts' lines are in
tests/bad_inputs/checkpoint_fit.py and resume_fit.py)."""
import json
from io import StringIO

import pytest
import torch
from ruamel.yaml import YAML
from torch import nn

from configs.load import load_config
from evaluation import evaluation_protocol
from models import create_model
from models.checkpoint import CheckpointError, check_recorded_settings, load_checkpoint, model_settings, read_checkpoint
from runtime.errors import UserError
from runtime.precision import make_precision
from tests.helpers import REPO_ROOT
from training.checkpoints import Checkpointer, resume_differences, training_settings
from training.cli import build_arg_parser, check_resume_fits, keep_previous_config, setup_run

TOY_RETRIEVAL = REPO_ROOT / "configs" / "toy" / "retrieval.yaml"


def toy_config(*overrides) -> dict:
    return load_config(TOY_RETRIEVAL, ["depth=2", *overrides])


def toy_retrieval(*overrides):
    torch.manual_seed(0)
    return create_model(toy_config(*overrides), "retrieval")


@pytest.fixture(scope="module")
def retrieval():
    return toy_retrieval()


def unchanged(model, before: dict) -> bool:
    return all(torch.equal(before[key], value) for key, value in model.state_dict().items())


# ---- reading: a 0-byte or cut-short file is one line naming it ----------------------------------------------
def test_an_empty_file_is_one_line_naming_it(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(CheckpointError, match=rf"^cannot read checkpoint {empty}: the file is empty \(0 bytes"):
        read_checkpoint(empty)


@pytest.mark.parametrize("keep", [10, 0.5, -30])  # the zip header, half, all but the central directory's end
def test_a_truncated_file_is_one_line_naming_it(tmp_path, retrieval, keep):
    whole = tmp_path / "whole.pth"
    torch.save({"model": retrieval.state_dict()}, whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(cut)
    message = str(error.value)
    assert message.startswith(f"cannot read checkpoint {cut}: the file ({cut.stat().st_size} bytes) is truncated "
                              "or damaged") and "\n" not in message


# ---- the settings a checkpoint records --------------------------------------------------------------------
def test_the_model_settings_are_what_shapes_the_weights(retrieval):
    assert model_settings(retrieval) == {
        "vision_width": 64, "depth": 2, "num_heads": 2, "patch_size": 16, "attention_type": "divided_space_time",
        "embed_dim": 256, "med_config.hidden_size": 64, "med_config.num_hidden_layers": 2,
        "med_config.num_attention_heads": 2, "med_config.intermediate_size": 256, "med_config.vocab_size": 30524}
    qa = create_model(load_config(REPO_ROOT / "configs" / "toy" / "qa.yaml", ["depth=1"]), "qa")
    assert model_settings(qa)["depth"] == 1 and "embed_dim" not in model_settings(qa)  # QA has no ITC projection


def test_a_recorded_setting_that_differs_stops_the_load_naming_both_values(tmp_path, retrieval):
    path = tmp_path / "own.pth"
    torch.save({"model": retrieval.state_dict(), "model_settings": model_settings(retrieval)}, path)
    other = toy_retrieval("num_heads=4")  # no shape changes: only the record can tell
    before = {key: value.clone() for key, value in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"^{path} was written for another model: num_heads=2 there, "
                                              r"num_heads=4 in this config$"):
        load_checkpoint(other, str(path), verbose=False)
    assert unchanged(other, before)
    load_checkpoint(toy_retrieval(), str(path), verbose=False)  # the same settings load


def test_every_difference_is_named_and_bert_settings_say_where_they_are_set(retrieval):
    recorded = {**model_settings(retrieval), "depth": 4, "med_config.num_attention_heads": 8}
    with pytest.raises(CheckpointError) as error:
        check_recorded_settings({"model_settings": recorded}, "x.pth", retrieval)
    assert str(error.value) == ("x.pth was written for another model: depth=4, med_config.num_attention_heads=8 "
                                "there, depth=2, med_config.num_attention_heads=2 in this config "
                                "(med_config.*: the BERT config file)")


def test_a_space_only_checkpoint_may_start_a_divided_model_but_not_the_reverse(retrieval):
    space_only = {**model_settings(retrieval), "attention_type": "space_only"}
    check_recorded_settings({"model_settings": space_only}, "image.pth", retrieval)  # as image BLIP does
    divided = model_settings(retrieval)
    with pytest.raises(CheckpointError, match="attention_type=divided_space_time there, attention_type=space_only"):
        check_recorded_settings({"model_settings": divided}, "video.pth", toy_retrieval("attention_type=space_only"))


def test_a_training_checkpoint_written_before_the_record_is_checked_by_its_config(retrieval):
    old = {"model": {}, "config": {"num_heads": 4, "depth": 2, "image_size": 96}}
    with pytest.raises(CheckpointError, match="num_heads=4 there, num_heads=2 in this config$"):
        check_recorded_settings(old, "old.pth", retrieval)
    check_recorded_settings({"model": {}}, "released.pth", retrieval)  # no record: checked by its keys


# ---- released checkpoints: missing or extra blocks -----------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 3])
def test_missing_or_extra_video_blocks_are_an_error_naming_them(retrieval, depth):
    model = toy_retrieval(f"depth={depth}")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(model, retrieval.state_dict(), verbose=False)
    assert str(error.value) == ("state dict (video retrieval checkpoint) does not fit this model: "
                                "visual_encoder.blocks, visual_encoder_m.blocks: 2 blocks in the file, "
                                f"{depth} in the model (config key depth)")
    assert unchanged(model, before)


def test_an_extra_bert_layer_is_an_error_naming_its_setting(retrieval):
    state = dict(retrieval.state_dict())
    layer = {key.replace("encoder.layer.1.", "encoder.layer.2."): value for key, value in state.items()
             if key.startswith("text_encoder.encoder.layer.1.")}
    with pytest.raises(CheckpointError, match=r"text_encoder\.encoder\.layer: 3 blocks in the file, 2 in the model "
                                              r"\(num_hidden_layers of the BERT config, med_config\)$"):
        load_checkpoint(toy_retrieval(), {**state, **layer}, verbose=False)


def test_the_modules_of_another_family_are_still_ignored(retrieval, capsys):
    extra = {"text_decoder.bert.encoder.layer.0.output.dense.weight": torch.zeros(2, 2)}  # pre-training's decoder
    report = load_checkpoint(toy_retrieval(), {**retrieval.state_dict(), **extra})
    assert report.unexpected == list(extra)
    assert "ignored (not used by this model): text_decoder: 1 tensors" in capsys.readouterr().out


def test_the_evaluation_protocol_records_the_model_settings():
    model = evaluation_protocol(toy_config("num_heads=4"), "best.pth")["model"]
    assert (model["depth"], model["num_heads"], model["vision_width"], model["token_merging"]) == (2, 4, 64, True)


# ---- resuming --------------------------------------------------------------------------------------------------
RUN = {"world_size": 1, "precision": "fp32", "accumulation_steps": 1, "max_grad_norm": None}


def test_a_resume_compares_what_changes_training_and_nothing_else():
    state = {"config": toy_config(), "training_settings": RUN}
    moved = toy_config("max_epoch=40", "video_root=/elsewhere", "num_workers=0", "k_test=4", "shuffle_seed=0")
    assert resume_differences(state, moved, RUN) == {}  # shuffle_seed 0 is its default
    changed = toy_config("init_lr=2e-3", "batch_size_train=4")
    assert resume_differences(state, changed, {**RUN, "accumulation_steps": 2, "world_size": 2}) == {
        "batch_size_train": (8, 4), "init_lr": (0.001, 0.002), "world_size": (1, 2), "accumulation_steps": (1, 2)}


def test_a_checkpoint_without_the_record_tells_its_processes_by_its_rng_states():
    state = {"config": toy_config(), "rng": [{}, {}]}
    assert resume_differences(state, toy_config(), RUN) == {"world_size": (2, 1)}


def test_training_settings_name_the_arithmetic_not_the_flag():
    assert training_settings(make_precision("none", "cpu"), {"accumulation_steps": 2}) == {
        "world_size": 1, "precision": "fp32", "accumulation_steps": 2}
    assert training_settings(make_precision("bf16", "cpu"), {})["precision"] == "bfloat16"


def _checkpointer(folder, config: dict, flags=None) -> Checkpointer:
    model = nn.Linear(2, 2)
    return Checkpointer(folder, model, torch.optim.SGD(model.parameters(), lr=0.1), make_precision("none", "cpu"),
                        config, flags)


def test_a_checkpoint_records_the_settings_a_resume_compares(tmp_path):
    path = _checkpointer(tmp_path, {"batch_size_train": 4}, {"accumulation_steps": 3}).save("checkpoint_last.pth", 0)
    state = torch.load(path, weights_only=True)
    assert state["training_settings"] == {"world_size": 1, "precision": "fp32", "accumulation_steps": 3}
    assert state["model_settings"] == {}  # a model without a video or text encoder


@pytest.mark.parametrize("batch, skipped", [(4, 6), (8, 3), (5, 4)])
def test_a_mid_epoch_resume_skips_the_samples_done_whatever_the_batch_size(tmp_path, batch, skipped):
    _checkpointer(tmp_path, {"batch_size_train": 4}).save("checkpoint_last.pth", 0, step_in_epoch=6)
    point = _checkpointer(tmp_path, {"batch_size_train": batch}).resume()
    assert point.epoch == 0 and point.skip_batches == skipped  # 24 samples done: none skipped that was not


# ---- the resume check of setup_run, and config.yaml ---------------------------------------------------------
def _written_checkpoint(folder, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "optimizer": {}, "epoch": 0, "config": config, "training_settings": RUN},
               folder / "checkpoint_last.pth")


def _args(out, *extra):
    return build_arg_parser("test").parse_args(
        ["--config", str(TOY_RETRIEVAL), "--output_dir", str(out), "--device", "cpu", "depth=2", *extra])


def test_a_refused_resume_stops_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    _written_checkpoint(out, toy_config())
    (out / "config.yaml").write_text("written by the first run\n")
    with pytest.raises(UserError, match=r"checkpoint_last\.pth was written under other settings that change "
                                        r"training \(checkpoint -> this run\): batch_size_train 8 -> 4; "):
        setup_run(_args(out, "batch_size_train=4"))
    assert (out / "config.yaml").read_text() == "written by the first run\n"
    assert not (out / "log.txt").exists()


def test_changes_the_flag_allows_are_warned_about_and_recorded_in_log_txt(tmp_path, capsys):
    out = tmp_path / "out"
    _written_checkpoint(out, toy_config())
    args = _args(out, "batch_size_train=4", "init_lr=2e-3", "--resume_with_changes")
    check_resume_fits(args, toy_config("batch_size_train=4", "init_lr=2e-3"), RUN, out)
    assert f"warning: resuming {out / 'checkpoint_last.pth'} with changed settings (checkpoint -> this run): " \
           "batch_size_train 8 -> 4, init_lr 0.001 -> 0.002; recorded in log.txt\n" in capsys.readouterr().err
    record = json.loads((out / "log.txt").read_text())
    assert record == {"resumed_with_changes": {"batch_size_train": [8, 4], "init_lr": [0.001, 0.002]},
                      "checkpoint": str(out / "checkpoint_last.pth")}


def test_an_evaluation_is_no_resume(tmp_path):
    out = tmp_path / "out"
    _written_checkpoint(out, toy_config())
    run = setup_run(_args(out, "batch_size_train=4", "pretrained=x.pth", "--evaluate"))
    assert run.config["batch_size_train"] == 4 and not (out / "log.txt").exists()


def test_a_config_yaml_that_differs_is_kept_not_overwritten(tmp_path, capsys):
    first, second = toy_config(), toy_config("max_epoch=2")
    keep_previous_config(first, tmp_path)  # nothing to keep yet
    (tmp_path / "config.yaml").write_text(_yaml(first))
    keep_previous_config(first, tmp_path)  # the same config: nothing to keep
    assert [path.name for path in tmp_path.iterdir()] == ["config.yaml"]
    keep_previous_config(second, tmp_path)
    assert (tmp_path / "config.1.yaml").read_text() == _yaml(first) and not (tmp_path / "config.yaml").exists()
    assert capsys.readouterr().err.splitlines()[-1] == (f"warning: {tmp_path / 'config.yaml'} differs from this "
                                                        "run's config (max_epoch 20 -> 2): the earlier one is kept "
                                                        "as config.1.yaml")
    (tmp_path / "config.yaml").write_text(_yaml(second))
    keep_previous_config(first, tmp_path)
    assert (tmp_path / "config.2.yaml").read_text() == _yaml(second)


def _yaml(config: dict) -> str:
    stream = StringIO()
    YAML(typ="safe").dump(config, stream)
    return stream.getvalue()
