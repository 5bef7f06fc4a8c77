"""Checkpoint loading: image-BLIP initialisation of a video model, resizing, queues, clear errors."""
import json

import pytest
import torch

from models import build_retrieval_model
from models.checkpoint import CheckpointError, load_checkpoint
from tests.conftest import load_reference
from tests.helpers import fixture_config


@pytest.fixture()
def fresh_retrieval():
    torch.manual_seed(0)
    return build_retrieval_model(fixture_config("retrieval"))


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
    model = build_retrieval_model(config)
    before = model.image_queue.clone()
    report = load_checkpoint(model, str(fixtures_dir / "retrieval.pth"), verbose=False)
    assert "image_queue" in report.reinitialised and torch.equal(model.image_queue, before)


def test_time_and_position_embeddings_are_resized(fixtures_dir):
    config = {**fixture_config("retrieval"), "num_frames": 4, "image_size": 96}
    model = build_retrieval_model(config)
    report = load_checkpoint(model, str(fixtures_dir / "retrieval.pth"), verbose=False)
    assert model.visual_encoder.time_embed.shape[1] == 4
    assert model.visual_encoder.pos_embed.shape[1] == 1 + 6 * 6
    assert any("time_embed" in r for r in report.resized) and any("pos_embed" in r for r in report.resized)
    source = torch.load(fixtures_dir / "retrieval.pth", weights_only=True)["model"]
    # The momentum encoder's time_embed comes from its own entry (nearest: frames 0, 2, 4, 6).
    torch.testing.assert_close(model.visual_encoder_m.time_embed, source["visual_encoder_m.time_embed"][:, ::2])


def test_shape_mismatch_names_the_key(fixtures_dir, tmp_path):
    config = {**fixture_config("retrieval"), "vision_width": 64}
    model = build_retrieval_model(config)
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
