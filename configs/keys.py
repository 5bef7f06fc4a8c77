"""Every config key, with its type, its one default and what it means.

The YAML files beside this module use these keys. Unknown-key errors, type checks, the
defaults the models, datasets and scripts fall back to, and the key table of the README
(`python -m configs.keys`) all come from CONFIG_KEYS. Models and datasets read a config
through `value(config, name)`, so they depend on this description and nothing else.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

REQUIRED = object()  # the default of a key every user of it must set


class ConfigError(ValueError):
    """A config key that is unknown, of the wrong type, or missing where it is needed."""


@dataclass(frozen=True)
class ConfigKey:
    name: str
    types: tuple  # accepted Python types of the YAML value
    default: object
    section: str
    help: str
    falls_back_to: str | None = None  # an older key whose value this one takes when unset

    def describe_default(self) -> str:
        default = "required" if self.default is REQUIRED else f"`{self.default!r}`"
        return f"`{self.falls_back_to}`, else {default}" if self.falls_back_to else default


def _key(name, types, default, section, help, falls_back_to=None):
    types = types if isinstance(types, tuple) else (types,)
    return ConfigKey(name, types, default, section, help, falls_back_to)


_NUMBER = (int, float)
_PATHS = (str, list)

CONFIG_KEYS: dict[str, ConfigKey] = {key.name: key for key in [
    # the video encoder
    _key("vit", str, "timesformer", "model", "video encoder; `timesformer` is the only one"),
    _key("image_size", int, REQUIRED, "model", "frame size in pixels (square)"),
    _key("patch_size", int, 16, "model", "patch size in pixels"),
    _key("vision_width", int, REQUIRED, "model", "video encoder width"),
    _key("num_heads", int, REQUIRED, "model", "video encoder attention heads"),
    _key("depth", int, 12, "model", "video encoder blocks"),
    _key("num_frames", int, REQUIRED, "model", "frames the encoder's time embedding holds",
         falls_back_to="num_frm_train"),
    _key("attention_type", str, "divided_space_time", "model",
         "`divided_space_time`, `space_only` (also `space-only`) or `joint_space_time`"),
    _key("learnable_temporal_scaling", bool, False, "model", "scale temporal attention by a learned factor per frame"),
    _key("token_merging", bool, False, "model", "TESTA token aggregation on/off"),
    _key("merging_type", str, "frame&patch", "model", "`frame`, `patch` or `frame&patch`"),
    _key("testa_r", (int, list), 0, "model",
         "tokens merged per block; in `frame&patch` two entries per block (frames, then patches per frame)"),
    _key("prop_attn", bool, False, "model", "proportional attention (off as published)"),
    _key("vit_grad_ckpt", bool, False, "model", "activation checkpointing of the video encoder"),
    _key("vit_ckpt_layer", int, 0, "model", "checkpoint the last N blocks"),
    _key("drop_path_rate", _NUMBER, 0.0, "model", "stochastic depth of the video encoder (the original trains without)"),
    # the text side and the heads
    _key("med_config", str, None, "model", "BERT config json; default `configs/med_config.json` "
                                           "(`bert_config.json` for pre-training)"),
    _key("tokenizer", str, None, "model", "folder or file with a BERT `vocab.txt`; default the bundled one"),
    _key("max_words", int, None, "model", "sets both `caption_max_words` and `text_max_tokens` (the published key)"),
    _key("text_max_tokens", int, 35, "model", "tokens a retrieval text is padded/truncated to",
         falls_back_to="max_words"),
    _key("embed_dim", int, 256, "model", "ITC projection size"),
    _key("queue_size", int, REQUIRED, "model", "ITC feature queue length (retrieval and pre-training)"),
    _key("momentum", _NUMBER, 0.995, "model", "momentum-encoder update rate"),
    _key("alpha", _NUMBER, REQUIRED, "model", "weight of the momentum distillation targets"),
    _key("negative_all_rank", bool, False, "model", "draw ITM hard negatives from every rank's batch"),
    _key("pretrained", (str, type(None)), None, "model", "checkpoint to start from (or test with `--evaluate`)"),
    _key("pretrained_queues", bool, False, "model",
         "keep the ITC feature queues stored in `pretrained`; off: they start fresh, as the original deleted them "
         "on load (docs/training.md, Feature queues)"),
    # data
    _key("dataset", str, REQUIRED, "data", "which reader: `retrieval_queryd`, `retrieval_didemo`, "
                                          "`retrieval_activitynet`, `retrieval_condensedmovies`, `activitynet_qa`"),
    _key("video_root", str, None, "data", "folder of the videos (optional for pre-training)"),
    _key("ann_root", str, REQUIRED, "data", "folder of the annotation files"),
    _key("train_file", _PATHS, REQUIRED, "data", "pre-training annotation JSON file(s)"),
    _key("train_shards", _PATHS, None, "data",
         "pre-training WebDataset tar shards (brace patterns, paths, URLs or `pipe:` commands; a list allowed); "
         "when set they replace `train_file` (docs/data.md, Streamed shards)"),
    _key("train_shards_samples", int, None, "data",
         "samples in `train_shards`, for the epoch length; default: the manifest.json beside the shards"),
    _key("shard_shuffle_buffer", int, 1000, "data", "samples in each data-loader worker's shuffle buffer (shards)"),
    _key("answer_list", str, None, "data", "QA: JSON list of candidate answers; replaces `answer_candidates`"),
    _key("answer_weight", _NUMBER, 0.2, "optimisation",
         "QA training: weight of a question's answer in the loss (the original's 0.2; repeated answers share it)"),
    _key("caption_max_words", int, 30, "data", "words a caption keeps after cleaning", falls_back_to="max_words"),
    _key("num_frm_train", int, REQUIRED, "data", "frames sampled per training clip"),
    _key("num_frm_test", int, REQUIRED, "data", "frames sampled per evaluation clip"),
    _key("frm_sampling_strategy", str, "uniform", "data",
         "training frame sampling: `uniform` (the original's for fine-tuning), `headtail` (its pre-training), "
         "`rand`, ..."),
    _key("frm_sampling_strategy_test", str, "uniform", "data",
         "evaluation frame sampling: `uniform` (the original's rule) or `uniform_spread`"),
    _key("video_resize", int, 256, "data",
         "augmented training clips (pre-training, `finetune_augmentation`) are decoded at this size, then cropped"),
    _key("finetune_augmentation", bool, False, "data",
         "fine-tuning: decode at `video_resize`, one random crop and 2 augmentation ops, as pre-training does; "
         "off: the original's clips, decoded straight at `image_size`"),
    _key("batch_size", int, REQUIRED, "data", "pre-training batch per process"),
    _key("batch_size_train", int, REQUIRED, "data", "fine-tuning batch per process"),
    _key("batch_size_test", int, REQUIRED, "data", "evaluation batch per process"),
    _key("num_workers", int, 4, "data", "data-loader workers per process"),
    _key("substitute_black_on_error", bool, False, "data",
         "evaluation: a black clip replaces an unreadable video (counted and named) instead of stopping"),
    # optimisation
    _key("init_lr", _NUMBER, REQUIRED, "optimisation", "learning rate after warm-up"),
    _key("min_lr", _NUMBER, REQUIRED, "optimisation", "lowest learning rate"),
    _key("lr_decay_rate", _NUMBER, REQUIRED, "optimisation", "pre-training: lr factor per epoch"),
    _key("warmup_lr", _NUMBER, REQUIRED, "optimisation", "pre-training: lr at step 0"),
    _key("warmup_steps", int, REQUIRED, "optimisation", "pre-training: warm-up steps in epoch 0"),
    _key("weight_decay", _NUMBER, REQUIRED, "optimisation", "AdamW weight decay"),
    _key("weight_decay_exempt", str, "none", "optimisation",
         "parameters AdamW does not decay: `none` (the original's fine-tuning), `bias_layernorm` (its pre-training: "
         "names containing `bias` or `LayerNorm.weight`) or `bias_norm_embed` (1-D tensors, tokens, embeddings)"),
    _key("max_epoch", int, REQUIRED, "optimisation", "epochs"),
    _key("seed", int, 42, "optimisation", "random seed (each process adds its rank)"),
    _key("shuffle_seed", int, 0, "optimisation",
         "seed of the training sampler's shuffle (with the epoch); the original used 0 whatever `seed` said"),
    # evaluation
    _key("k_test", int, REQUIRED, "evaluation", "retrieval: candidates re-ranked by ITM per query; "
                                               "QA: answers re-ranked per question"),
    _key("k_test_batch_size", int, 128, "evaluation", "ITM pairs scored per pass while re-ranking"),
    _key("low_resource_eval", bool, False, "evaluation", "keep the cached video tokens in fp16 on the CPU"),
    _key("tie_rule", str, "original", "evaluation", "`original` (argsort order) or `pessimistic`"),
    _key("inference", str, "rank", "evaluation", "QA: `rank` the answer list or `generate`"),
    _key("answer_candidates", str, "split", "evaluation",
         "QA `rank`: `split` (the distinct answers of the split evaluated, the original's rule) or `train` "
         "(the training answers only), each in order of first appearance (docs/evaluation.md)"),
    _key("val_question_every", int, 50, "evaluation",
         "QA validation: every N-th question of the val split after a shuffle seeded by `seed` "
         "(the original's 1/50); 1 = every question"),
]}


def unknown_key_message(key: str, where: str) -> str:
    close = difflib.get_close_matches(key, sorted(CONFIG_KEYS), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown config key {key!r} in {where}{hint}"


def check(config: dict, where: str) -> None:
    """Unknown keys and values of the wrong type are errors naming the key."""
    for name, given in config.items():
        key = CONFIG_KEYS.get(name)
        if key is None:
            raise ConfigError(unknown_key_message(name, where))
        optional = key.default is None or key.default is REQUIRED
        if given is None and optional:
            continue
        if isinstance(given, bool) and bool not in key.types or not isinstance(given, key.types):
            expected = " or ".join(t.__name__ for t in key.types)
            raise ConfigError(f"config key {name!r} in {where} must be {expected}, got {given!r}")


def value(config: dict, name: str, purpose: str = ""):
    """The config's value of `name`, else the key it falls back to, else its one default."""
    key = CONFIG_KEYS[name]
    if config.get(name) is not None:
        return config[name]
    if key.falls_back_to and config.get(key.falls_back_to) is not None:
        return config[key.falls_back_to]
    if key.default is REQUIRED:
        needed = f", needed by {purpose}" if purpose else ""
        raise ConfigError(f"config is missing {name!r} ({key.help}){needed}")
    return key.default


def markdown_table() -> str:
    """The README's key table."""
    rows = ["| key | section | default | meaning |", "| --- | --- | --- | --- |"]
    rows += [f"| `{key.name}` | {key.section} | {key.describe_default()} | {key.help} |"
             for key in CONFIG_KEYS.values()]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
