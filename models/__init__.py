"""Model builders: each takes a config dict (keys and defaults: configs/keys.py) and an optional
checkpoint path."""
from __future__ import annotations

from pathlib import Path

from configs.keys import value
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


def _load(model, checkpoint: str | None, config: dict):
    if checkpoint:
        load_checkpoint(model, checkpoint, keep_queues=value(config, "pretrained_queues"))
    return model


def _components(config: dict, bert_file: str, with_decoder: bool):
    """Tokenizer, video encoder, text encoder and (optionally) the text decoder of a config."""
    tokenizer = init_tokenizer(value(config, "tokenizer"))
    visual_encoder = build_video_encoder(config)

    def text_config():
        return _text_config(config, bert_file, visual_encoder.embed_dim, len(tokenizer))

    text_encoder = BertModel(text_config(), add_pooling_layer=False)
    text_decoder = BertLMHeadModel(text_config()) if with_decoder else None
    return tokenizer, visual_encoder, text_encoder, text_decoder


def build_retrieval_model(config: dict, checkpoint: str | None = None) -> VideoRetrievalModel:
    tokenizer, visual_encoder, text_encoder, _ = _components(config, "med_config.json", with_decoder=False)
    model = VideoRetrievalModel(visual_encoder, text_encoder, tokenizer, embed_dim=value(config, "embed_dim"),
                                queue_size=value(config, "queue_size", "the retrieval model"),
                                momentum=value(config, "momentum"),
                                negative_all_rank=value(config, "negative_all_rank"),
                                max_words=value(config, "text_max_tokens"))
    return _load(model, checkpoint, config)


def build_qa_model(config: dict, checkpoint: str | None = None) -> VideoQAModel:
    tokenizer, visual_encoder, text_encoder, text_decoder = _components(config, "med_config.json", with_decoder=True)
    return _load(VideoQAModel(visual_encoder, text_encoder, text_decoder, tokenizer), checkpoint, config)


def build_pretrain_model(config: dict, checkpoint: str | None = None) -> VideoPretrainModel:
    tokenizer, visual_encoder, text_encoder, text_decoder = _components(config, "bert_config.json", with_decoder=True)
    model = VideoPretrainModel(visual_encoder, text_encoder, text_decoder, tokenizer,
                               embed_dim=value(config, "embed_dim"),
                               queue_size=value(config, "queue_size", "the pre-training model"),
                               momentum=value(config, "momentum"))
    return _load(model, checkpoint, config)
