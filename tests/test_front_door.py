"""models.create_model_and_transforms: one way to build a model from a config, load a checkpoint
into it (strict or adapted) and read a video file as evaluation reads it."""
import pytest
import torch

from configs.keys import ConfigError
from configs.load import load_config
from data.datasets import create_dataset
from models import create_model, create_model_and_transforms
from models.blip_pretrain import VideoPretrainModel
from models.checkpoint import CheckpointError
from models.testa_retrieval import VideoRetrievalModel
from models.testa_vqa import VideoQAModel
from models.timesformer import adapt_encoder_checkpoint
from tests.inference_toy import make_toy_setup


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_setup(tmp_path_factory.mktemp("front_door"))


def test_the_task_defaults_to_the_configs_own(toy):
    kinds = {"retrieval": VideoRetrievalModel, "qa": VideoQAModel, "pretrain": VideoPretrainModel}
    for task, kind in kinds.items():
        model, _ = create_model_and_transforms(toy.configs[task], overrides=toy.overrides, verbose=False)
        assert type(model) is kind


def test_preprocess_reads_a_file_as_the_evaluation_does(toy):
    config = load_config(toy.configs["retrieval"], toy.overrides)
    _, preprocess = create_model_and_transforms(config)
    dataset = create_dataset("retrieval_didemo", config, split="test")
    clip = preprocess(dataset.video[0])
    assert clip.shape == (3, config["num_frm_test"], config["image_size"], config["image_size"])
    assert torch.equal(clip, dataset[0][0])
    frames, same_clip = preprocess.with_frames(dataset.video[0])
    assert frames.dtype == torch.uint8 and frames.shape[0] == config["num_frm_test"]
    assert torch.equal(same_clip, clip)


def test_a_checkpoint_loads_into_the_model_it_builds(toy):
    model = create_model(toy.configs["retrieval"], checkpoint=toy.checkpoints["retrieval"], strict=True,
                         overrides=toy.overrides, verbose=False)
    saved = torch.load(toy.checkpoints["retrieval"], weights_only=True)["model"]
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[key], saved[key]) for key in saved)


def test_strict_refuses_what_adapting_accepts(toy):
    # A pre-training checkpoint starts a retrieval model (its decoder is left out) only when adapted.
    model = create_model(toy.configs["retrieval"], checkpoint=toy.checkpoints["pretrain"], overrides=toy.overrides,
                         verbose=False)
    assert isinstance(model, VideoRetrievalModel)
    with pytest.raises(CheckpointError, match=r"pre-training checkpoint\) does not match this model: .*unexpected keys"):
        create_model(toy.configs["retrieval"], checkpoint=toy.checkpoints["pretrain"], strict=True,
                     overrides=toy.overrides)


def test_a_checkpoint_of_another_model_size_is_refused_either_way(toy):
    for strict in (False, True):
        with pytest.raises(CheckpointError, match="depth=2 there, depth=1 in this config|does not fit|does not match"):
            create_model(toy.configs["retrieval"], checkpoint=toy.checkpoints["retrieval"], strict=strict,
                         overrides=[*toy.overrides, "depth=1"], verbose=False)


def test_an_unknown_task_is_one_line(toy):
    with pytest.raises(ConfigError, match="no model for task 'caption': expected one of retrieval, qa, pretrain"):
        create_model(toy.configs["retrieval"], "caption", overrides=toy.overrides)


def test_encoder_checkpoints_are_fitted_beside_the_encoder():
    """Resizing and the image-to-video start, on plain tensors (no model needed)."""
    checkpoint = {"pos_embed": torch.randn(1, 1 + 4 * 4, 8), "time_embed": torch.randn(1, 4, 8),
                  "blocks.0.attn.qkv.weight": torch.randn(24, 8)}
    model_state = {"pos_embed": torch.zeros(1, 1 + 8 * 8, 8), "time_embed": torch.zeros(1, 16, 8),
                   "blocks.0.attn.qkv.weight": torch.zeros(24, 8), "blocks.0.temporal_attn.qkv.weight": torch.zeros(24, 8)}
    changes = adapt_encoder_checkpoint(checkpoint, model_state)
    assert changes == {"resized": ["pos_embed grid 4->8", "time_embed frames 4->16"],
                       "initialised_from_spatial": ["blocks.0.temporal_attn.qkv.weight"]}
    assert checkpoint["pos_embed"].shape == (1, 65, 8) and checkpoint["time_embed"].shape == (1, 16, 8)
    assert torch.equal(checkpoint["blocks.0.temporal_attn.qkv.weight"], checkpoint["blocks.0.attn.qkv.weight"])
