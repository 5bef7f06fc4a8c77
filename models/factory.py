"""The front door to the models: `create_model_and_transforms` builds the model of a task from a
config, loads a checkpoint into it when one is given, and returns the preprocessing that turns
a video file into the encoder's input as evaluation reads it.

    model, preprocess = create_model_and_transforms("configs/retrieval_didemo_f32.yaml",
                                                    checkpoint="testa_didemo.pth", device="cuda")
    clip = preprocess("video.mp4")                  # (C, T, H, W)
    tokens, embedding = model.eval().encode_video(clip[None].cuda())

Config keys and their defaults: configs/keys.py. Loading rules: models/checkpoint.py.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from configs.keys import ConfigError, task_of, value
from configs.load import load_config
from data.preprocess import ClipPreprocess
from models.blip_pretrain import VideoPretrainModel
from models.checkpoint import load_checkpoint
from models.med import BertConfig, BertLMHeadModel, BertModel
from models.testa_retrieval import VideoRetrievalModel
from models.testa_vqa import VideoQAModel
from models.timesformer import build_video_encoder
from models.tokenizer import init_tokenizer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _text_config(config: dict, default_file: str, vision_width: int, vocab_size: int) -> BertConfig:
    path = Path(value(config, "med_config") or CONFIG_DIR / default_file)
    if not path.is_file() and not path.is_absolute() and (CONFIG_DIR.parent / path).is_file():
        # The published configs name it relative to the repository (configs/...): that works from
        # any working folder, e.g. a saved config.yaml or an index's manifest read from elsewhere.
        path = CONFIG_DIR.parent / path
    if not path.is_file():
        raise FileNotFoundError(f"BERT config not found: {path} (config key 'med_config')")
    text_config = BertConfig.from_json_file(str(path))
    text_config.encoder_width = vision_width
    # [DEC] and [ENC] extend the BERT vocabulary (30522 -> 30524), as in BLIP.
    text_config.vocab_size = vocab_size
    return text_config


def _components(config: dict, bert_file: str, with_decoder: bool):
    """Tokenizer, video encoder, text encoder and (optionally) the text decoder of a config."""
    tokenizer = init_tokenizer(value(config, "tokenizer"))
    visual_encoder = build_video_encoder(config)

    def text_config():
        return _text_config(config, bert_file, visual_encoder.embed_dim, len(tokenizer))

    text_encoder = BertModel(text_config(), add_pooling_layer=False)
    text_decoder = BertLMHeadModel(text_config()) if with_decoder else None
    return tokenizer, visual_encoder, text_encoder, text_decoder


def _retrieval_model(config: dict) -> VideoRetrievalModel:
    tokenizer, visual_encoder, text_encoder, _ = _components(config, "med_config.json", with_decoder=False)
    return VideoRetrievalModel(visual_encoder, text_encoder, tokenizer, embed_dim=value(config, "embed_dim"),
                               queue_size=value(config, "queue_size", "the retrieval model"),
                               momentum=value(config, "momentum"), negative_all_rank=value(config, "negative_all_rank"),
                               max_words=value(config, "text_max_tokens"))


def _qa_model(config: dict) -> VideoQAModel:
    tokenizer, visual_encoder, text_encoder, text_decoder = _components(config, "med_config.json", with_decoder=True)
    return VideoQAModel(visual_encoder, text_encoder, text_decoder, tokenizer)


def _pretrain_model(config: dict) -> VideoPretrainModel:
    tokenizer, visual_encoder, text_encoder, text_decoder = _components(config, "bert_config.json", with_decoder=True)
    return VideoPretrainModel(visual_encoder, text_encoder, text_decoder, tokenizer,
                              embed_dim=value(config, "embed_dim"),
                              queue_size=value(config, "queue_size", "the pre-training model"),
                              momentum=value(config, "momentum"))


# The model of each task (configs.keys.task_of names the task a config is for).
_BUILDERS = {"retrieval": _retrieval_model, "qa": _qa_model, "pretrain": _pretrain_model}
TASKS = tuple(_BUILDERS)


def create_model(config, task: str | None = None, checkpoint=None, strict: bool = False,
                 overrides=(), verbose: bool = True) -> nn.Module:
    """The model of `task` ('retrieval', 'qa' or 'pretrain'; default: the task `config` is for),
    with `checkpoint` loaded when given.

    config: a YAML path (read and checked with `overrides`, configs/load.py) or a config dict.
    checkpoint: a path, a checkpoint read with models.checkpoint.read_checkpoint, or a state
    dict. strict=False adapts released and earlier-stage checkpoints (an image-BLIP or
    pre-training checkpoint starting a retrieval model; the `pretrained_queues` key decides
    whether feature queues are kept); strict=True takes exactly the model's own tensors.
    Either way a checkpoint that does not fit is refused in one line (models/checkpoint.py).
    """
    if isinstance(config, (str, Path)):
        config = load_config(config, overrides)
    task = task or task_of(config)
    if task not in _BUILDERS:
        raise ConfigError(f"no model for task {task!r}: expected one of {', '.join(TASKS)}"
                          + ("" if task else " (the config does not say which: pass task=)"))
    model = _BUILDERS[task](config)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, strict=strict, keep_queues=value(config, "pretrained_queues"),
                        verbose=verbose)
    return model


def create_model_and_transforms(config, task: str | None = None, checkpoint=None, strict: bool = False,
                                device=None, overrides=(), verbose: bool = True) -> tuple[nn.Module, ClipPreprocess]:
    """`create_model(...)` moved to `device` (when given), and the evaluation preprocessing of its
    config: ``preprocess(path)`` is one video file as the encoder's input (data/preprocess.py)."""
    if isinstance(config, (str, Path)):
        config = load_config(config, overrides)
    model = create_model(config, task, checkpoint, strict, verbose=verbose)
    if device is not None:
        model.to(torch.device(device))
    return model, ClipPreprocess(config)
