"""Checkpoint loading: image-BLIP initialisation of a video model, resizing, queues, clear errors."""
import json

import pytest
import torch

from models import create_model
from models.checkpoint import CheckpointError, load_checkpoint
from tests.conftest import load_reference
from tests.helpers import fixture_config


@pytest.fixture()
def fresh_retrieval():
    torch.manual_seed(0)
    return create_model(fixture_config("retrieval"), "retrieval")


def test_blip_image_checkpoint_initialises_video_model(fixtures_dir, fresh_retrieval):
    blip_dir = fixtures_dir / "blip_init"
    report = load_checkpoint(fresh_retrieval, str(blip_dir / "blip_image_compact.pth"), verbose=False)
    expected = load_reference(blip_dir / "loaded_blip_image_compact__retrieval.pth")["model"]
    original_msg = json.loads((blip_dir / "loaded_blip_image_compact__retrieval_msg.json").read_text())
    from_checkpoint = [k for k in expected if k not in original_msg["missing_keys"]]
    assert len(from_checkpoint) > 500
    state = fresh_retrieval.state_dict()
    for key in from_checkpoint:
        torch.testing.assert_close(state[key], expected[key], atol=0, rtol=0, msg=key)

    # The original also deleted the queues; this project keeps them when they fit.
    def without_queues(keys):
        return sorted(k for k in keys if "queue" not in k)

    assert without_queues(report.missing) == without_queues(original_msg["missing_keys"])
    assert "image_queue" not in report.missing
    # queue_ptr is the pre-training model's pointer; retrieval names its own ptr_queue.
    assert {k.split(".")[0] for k in report.unexpected} == {"text_decoder", "queue_ptr"}
    assert report.initialised_from_spatial and all("temporal" in k for k in report.initialised_from_spatial)


def test_queues_that_do_not_fit_are_reinitialised(fixtures_dir):
    config = {**fixture_config("retrieval"), "queue_size": 4}
    model = create_model(config, "retrieval")
    before = model.image_queue.clone()
    report = load_checkpoint(model, str(fixtures_dir / "retrieval.pth"), verbose=False)
    assert "image_queue" in report.reinitialised and torch.equal(model.image_queue, before)


def test_time_and_position_embeddings_are_resized(fixtures_dir):
    config = {**fixture_config("retrieval"), "num_frames": 4, "image_size": 96}
    model = create_model(config, "retrieval")
    report = load_checkpoint(model, str(fixtures_dir / "retrieval.pth"), verbose=False)
    assert model.visual_encoder.time_embed.shape[1] == 4
    assert model.visual_encoder.pos_embed.shape[1] == 1 + 6 * 6
    assert any("time_embed" in r for r in report.resized) and any("pos_embed" in r for r in report.resized)
    source = torch.load(fixtures_dir / "retrieval.pth", weights_only=True)["model"]
    # The momentum encoder's time_embed comes from its own entry (nearest: frames 0, 2, 4, 6).
    torch.testing.assert_close(model.visual_encoder_m.time_embed, source["visual_encoder_m.time_embed"][:, ::2])


def test_shape_mismatch_names_the_key(fixtures_dir, tmp_path):
    config = {**fixture_config("retrieval"), "vision_width": 64}
    model = create_model(config, "retrieval")
    with pytest.raises(CheckpointError, match=r"visual_encoder\.cls_token"):
        load_checkpoint(model, str(fixtures_dir / "retrieval.pth"), verbose=False)


def test_unrelated_or_missing_checkpoints_fail_clearly(fresh_retrieval, tmp_path):
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, unrelated)
    with pytest.raises(CheckpointError, match="shares no parameter names"):
        load_checkpoint(fresh_retrieval, str(unrelated), verbose=False)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(fresh_retrieval, str(tmp_path / "nope.pth"), verbose=False)


def test_summary_reports_ignored_modules_once(fixtures_dir, fresh_retrieval, capsys):
    load_checkpoint(fresh_retrieval, str(fixtures_dir / "blip_init" / "blip_image_compact.pth"))
    out = capsys.readouterr().out
    assert out.count("ignored (not used by this model): text_decoder") == 1


# ---- checkpoint identity: a checkpoint must fit the model it is loaded into ---------------
def _build(kind):
    from models import create_model
    fixtures = {"retrieval": "retrieval", "qa": "vqa", "pretrain": "pretrain"}
    config = fixtures[kind]
    torch.manual_seed(0)
    return create_model(fixture_config(config), kind)


CHECKPOINTS = {"retrieval": "retrieval.pth", "vqa": "vqa.pth", "pretrain": "pretrain.pth",
               "blip": "blip_init/blip_image_compact.pth"}


@pytest.mark.parametrize("file, family", [("retrieval", "video retrieval"), ("vqa", "video QA"),
                                          ("pretrain", "video pre-training"), ("blip", "image-BLIP pre-training")])
def test_the_family_of_a_checkpoint_is_read_from_its_keys(fixtures_dir, file, family):
    from models.checkpoint import checkpoint_family, read_state_dict
    assert checkpoint_family(read_state_dict(str(fixtures_dir / CHECKPOINTS[file]))) == family


@pytest.mark.parametrize("model_kind, file, may_be_fresh", [
    ("retrieval", "blip", {"idx_queue", "ptr_queue", "visual_encoder", "visual_encoder_m"}),  # temporal
    ("retrieval", "pretrain", {"idx_queue", "ptr_queue"}),  # fine-tuning / zero-shot from pre-training
    ("retrieval", "retrieval", set()),  # --evaluate of a fine-tuned model
    ("qa", "blip", {"visual_encoder"}),
    ("qa", "pretrain", set()),  # the QA decoder comes from the pre-training decoder
    ("qa", "vqa", set()),
    ("pretrain", "blip", {"visual_encoder", "visual_encoder_m"}),  # pretrain_timesformer_from_blip
    ("pretrain", "pretrain", set()),
])
def test_every_published_workflow_still_loads(fixtures_dir, capsys, model_kind, file, may_be_fresh):
    model = _build(model_kind)
    report = load_checkpoint(model, str(fixtures_dir / CHECKPOINTS[file]))
    assert {k.split(".")[0] for k in report.missing} == may_be_fresh
    fresh_visual = [k for k in report.missing if k.startswith("visual_encoder")]
    assert all(k.endswith(("time_embed", "temporal_scaling")) or ".temporal_fc." in k for k in fresh_visual)
    expected_family = {"blip": "image-BLIP pre-training", "pretrain": "video pre-training",
                       "retrieval": "video retrieval", "vqa": "video QA"}[file]
    assert report.family == expected_family
    assert capsys.readouterr().out.splitlines()[0].endswith(f"({expected_family} checkpoint)")


@pytest.mark.parametrize("model_kind, file, family, lacks", [
    ("retrieval", "vqa", "video QA", "vision_proj.weight"),
    ("qa", "retrieval", "video retrieval", "text_decoder."),
    ("pretrain", "retrieval", "video retrieval", "text_decoder."),
    ("pretrain", "vqa", "video QA", "itm_head.weight"),
])
def test_a_checkpoint_of_another_family_is_refused_naming_it(fixtures_dir, model_kind, file, family, lacks):
    model = _build(model_kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = str(fixtures_dir / CHECKPOINTS[file])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(model, path, verbose=False)
    message = str(error.value)
    assert message.startswith(f"{path} is a {family} checkpoint and does not fit this ") and lacks in message
    assert "\n" not in message
    # Refused before loading: the model is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_what_may_start_fresh_is_a_short_list():
    from models.checkpoint import may_start_fresh
    assert may_start_fresh("idx_queue", set()) and may_start_fresh("queue_ptr", set())
    assert may_start_fresh("text_encoder.embeddings.position_ids", set())
    assert may_start_fresh("visual_encoder.blocks.3.temporal_scaling", set())
    assert may_start_fresh("visual_encoder.time_embed", {"visual_encoder."})
    assert not may_start_fresh("visual_encoder.time_embed", set())  # a video checkpoint must have it
    assert not may_start_fresh("visual_encoder.blocks.0.temporal_fc.weight", {"visual_encoder_m."})
    for key in ("itm_head.weight", "vision_proj.weight", "text_decoder.cls.predictions.bias", "temp",
                "visual_encoder_m.cls_token"):
        assert not may_start_fresh(key, {"visual_encoder.", "visual_encoder_m."}), key
