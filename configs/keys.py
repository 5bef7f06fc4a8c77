"""Every config key, with its type, its one default, what it means, the values it accepts and
the runs that read it.

The YAML files beside this module use these keys. Unknown-key errors, type and value checks,
the defaults the models, datasets and scripts fall back to, and the key table of docs/configs.md
(`python -m configs.keys`) all come from CONFIG_KEYS. Models and datasets read a config
through `value(config, name)`, so they depend on this description and nothing else.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable

from runtime.errors import ConfigError

REQUIRED = object()  # the default of a key every user of it must set

# The runs a config drives: video_pretrain.py, train_video_retrieval.py, train_video_qa.py.
EVERY_TASK = frozenset({"pretrain", "retrieval", "qa"})
FINE_TUNING = frozenset({"retrieval", "qa"})
CONTRASTIVE = frozenset({"pretrain", "retrieval"})  # ITC + ITM models: queues, momentum encoders
# A fine-tuning config's `dataset` names its task; a pre-training config has none.
DATASET_TASKS = {"retrieval_queryd": "retrieval", "retrieval_didemo": "retrieval",
                 "retrieval_activitynet": "retrieval", "retrieval_condensedmovies": "retrieval",
                 "activitynet_qa": "qa"}
FRAME_SAMPLING = ("uniform", "uniform_spread", "nlvl_uniform", "nlvl_rand", "rand", "headtail")
# The token-reduction rules of models/rules (a test keeps the two lists equal) and their axes.
MERGE_RULES = ("testa", "tome", "vid_tldr", "pitome", "adjacent", "pool", "random", "none")
MERGE_AXES = ("time", "space")
BUDGET = {"greater_than": 0, "maximum": 1}

# Value rules, spread into _key(...).
POSITIVE = {"minimum": 1}
NON_NEGATIVE = {"minimum": 0}
FRACTION = {"minimum": 0, "maximum": 1}


@dataclass(frozen=True)
class ConfigKey:
    name: str
    types: tuple  # accepted Python types of the YAML value
    default: object
    section: str
    help: str
    falls_back_to: str | None = None  # an older key whose value this one takes when unset
    # The values accepted beyond the type; a list value's entries are checked one by one.
    minimum: float | None = None
    maximum: float | None = None
    greater_than: float | None = None  # an exclusive minimum
    choices: tuple | None = None
    multiple_of: str | None = None  # another key whose value divides this one's
    entry_types: tuple | None = None  # a list value: the types of its entries
    tasks: frozenset = EVERY_TASK  # the runs it changes; elsewhere it is named in a warning

    def describe_default(self) -> str:
        default = "required" if self.default is REQUIRED else f"`{self.default!r}`"
        return f"`{self.falls_back_to}`, else {default}" if self.falls_back_to else default


def _key(name, types, default, section, help, falls_back_to=None, **rules):
    types = types if isinstance(types, tuple) else (types,)
    if "tasks" in rules:
        rules["tasks"] = frozenset(rules["tasks"])
    return ConfigKey(name, types, default, section, help, falls_back_to, **rules)


_NUMBER = (int, float)
_PATHS = (str, list)

CONFIG_KEYS: dict[str, ConfigKey] = {key.name: key for key in [
    # the video encoder
    _key("vit", str, "timesformer", "model", "video encoder; `timesformer` is the only one", choices=("timesformer",)),
    _key("image_size", int, REQUIRED, "model", "frame size in pixels (square)", **POSITIVE, multiple_of="patch_size"),
    _key("patch_size", int, 16, "model", "patch size in pixels", **POSITIVE),
    _key("vision_width", int, REQUIRED, "model", "video encoder width", **POSITIVE, multiple_of="num_heads"),
    _key("num_heads", int, REQUIRED, "model", "video encoder attention heads", **POSITIVE),
    _key("depth", int, 12, "model", "video encoder blocks", **POSITIVE),
    _key("num_frames", int, REQUIRED, "model", "frames the encoder's time embedding holds",
         falls_back_to="num_frm_train", **POSITIVE),
    _key("attention_type", str, "divided_space_time", "model",
         "`divided_space_time`, `space_only` (also `space-only`) or `joint_space_time`",
         choices=("divided_space_time", "space_only", "space-only", "joint_space_time")),
    _key("learnable_temporal_scaling", bool, False, "model", "scale temporal attention by a learned factor per frame"),
    _key("token_merging", bool, False, "model", "TESTA token aggregation on/off"),
    _key("merging_type", str, "frame&patch", "model", "`frame`, `patch` or `frame&patch`",
         choices=("frame&patch", "frame", "patch")),
    _key("testa_r", (int, list), 0, "model",
         "tokens merged per block; in `frame&patch` two entries per block (frames, then patches per frame)",
         **NON_NEGATIVE, entry_types=(int,)),
    _key("prop_attn", bool, False, "model", "proportional attention (off as published)"),
    _key("merge_rule", (str, dict), "testa", "model",
         "which tokens merge: a rule for both axes, or `{time: RULE, space: RULE}`; rules: "
         + ", ".join(f"`{rule}`" for rule in MERGE_RULES), choices=MERGE_RULES),
    _key("merge_budget", (int, float), None, "model",
         "the encoder's cost as a fraction of the unmerged encoder's counted GMACs; set, it derives the "
         "schedule (`testa_r` is then not read); 1 merges nothing", **BUDGET),
    _key("merge_token_budget", (int, float), None, "model",
         "fraction of the patch tokens that reach the text side (alone, or shaping the schedule under "
         "`merge_budget`)", **BUDGET),
    _key("merge_seed", int, 0, "model", "seed of the `random` rule's draws", **NON_NEGATIVE),
    _key("merge_budget_range", list, None, "optimisation",
         "`[low, high]`: train with a `merge_budget` drawn per step from this range (seeded, the same on "
         "every rank), so that one checkpoint serves every budget", entry_types=(int, float), **BUDGET),
    _key("vit_grad_ckpt", bool, False, "model", "activation checkpointing of the video encoder"),
    _key("vit_ckpt_layer", int, 0, "model", "checkpoint the last N blocks", **NON_NEGATIVE),
    _key("drop_path_rate", _NUMBER, 0.0, "model", "stochastic depth of the video encoder (the original trains without)",
         **FRACTION),
    # the text side and the heads
    _key("med_config", str, None, "model", "BERT config json; default `configs/med_config.json` "
                                           "(`bert_config.json` for pre-training)"),
    _key("tokenizer", str, None, "model", "folder or file with a BERT `vocab.txt`; default the bundled one"),
    _key("max_words", int, None, "model", "sets both `caption_max_words` and `text_max_tokens` (the published key)",
         **POSITIVE, tasks=CONTRASTIVE),
    _key("text_max_tokens", int, 35, "model", "tokens a retrieval text is padded/truncated to",
         falls_back_to="max_words", **POSITIVE, tasks={"retrieval"}),
    _key("embed_dim", int, 256, "model", "ITC projection size", **POSITIVE, tasks=CONTRASTIVE),
    _key("queue_size", int, REQUIRED, "model", "ITC feature queue length (retrieval and pre-training)", **POSITIVE,
         tasks=CONTRASTIVE),
    _key("momentum", _NUMBER, 0.995, "model", "momentum-encoder update rate", **FRACTION, tasks=CONTRASTIVE),
    _key("alpha", _NUMBER, REQUIRED, "model", "weight of the momentum distillation targets", **FRACTION,
         tasks=CONTRASTIVE),
    _key("negative_all_rank", bool, False, "model", "draw ITM hard negatives from every rank's batch",
         tasks={"retrieval"}),
    _key("pretrained", (str, type(None)), None, "model", "checkpoint to start from (or test with `--evaluate`)"),
    _key("pretrained_queues", bool, False, "model",
         "keep the ITC feature queues stored in `pretrained`; off: they start fresh, as the original deleted them "
         "on load (docs/training.md, Feature queues)", tasks=CONTRASTIVE),
    # data
    _key("dataset", str, REQUIRED, "data", "which reader: `retrieval_queryd`, `retrieval_didemo`, "
                                          "`retrieval_activitynet`, `retrieval_condensedmovies`, `activitynet_qa`",
         choices=tuple(DATASET_TASKS), tasks=FINE_TUNING),
    _key("video_root", str, None, "data", "folder of the videos (optional for pre-training)"),
    _key("allow_paths_outside_video_root", bool, False, "data",
         "let annotations name files outside `video_root` (`..`, absolute paths); pre-training's absolute "
         "paths are always allowed"),
    _key("ann_root", str, REQUIRED, "data", "folder of the annotation files", tasks=FINE_TUNING),
    _key("train_file", _PATHS, REQUIRED, "data", "pre-training annotation JSON file(s)", entry_types=(str,),
         tasks={"pretrain"}),
    _key("train_shards", _PATHS, None, "data",
         "pre-training WebDataset tar shards (brace patterns, paths, URLs or `pipe:` commands; a list allowed); "
         "when set they replace `train_file` (docs/data.md, Streamed shards)", entry_types=(str,), tasks={"pretrain"}),
    _key("train_shards_samples", int, None, "data",
         "samples in `train_shards`, for the epoch length; default: the manifest.json beside the shards", **POSITIVE,
         tasks={"pretrain"}),
    _key("shard_shuffle_buffer", int, 1000, "data", "samples in each data-loader worker's shuffle buffer (shards)",
         **NON_NEGATIVE, tasks={"pretrain"}),
    _key("answer_list", str, None, "data", "QA: JSON list of candidate answers; replaces `answer_candidates`",
         tasks={"qa"}),
    _key("answer_weight", _NUMBER, 0.2, "optimisation",
         "QA training: weight of a question's answer in the loss (the original's 0.2; repeated answers share it)",
         **NON_NEGATIVE, tasks={"qa"}),
    _key("caption_max_words", int, 30, "data", "words a caption keeps after cleaning", falls_back_to="max_words",
         **POSITIVE, tasks=CONTRASTIVE),
    _key("num_frm_train", int, REQUIRED, "data", "frames sampled per training clip", **POSITIVE),
    _key("num_frm_test", int, REQUIRED, "data", "frames sampled per evaluation clip", **POSITIVE),
    _key("frm_sampling_strategy", str, "uniform", "data",
         "training frame sampling: `uniform` (the original's for fine-tuning), `headtail` (its pre-training), "
         "`rand`, ...", choices=FRAME_SAMPLING),
    _key("frm_sampling_strategy_test", str, "uniform", "data",
         "evaluation frame sampling: `uniform` (the original's rule) or `uniform_spread`", choices=FRAME_SAMPLING,
         tasks=FINE_TUNING),
    _key("video_resize", int, 256, "data",
         "augmented training clips (pre-training, `finetune_augmentation`) are decoded at this size, then cropped",
         **POSITIVE),
    _key("finetune_augmentation", bool, False, "data",
         "fine-tuning: decode at `video_resize`, one random crop and 2 augmentation ops, as pre-training does; "
         "off: the original's clips, decoded straight at `image_size`", tasks=FINE_TUNING),
    _key("batch_size", int, REQUIRED, "data", "pre-training batch per process", **POSITIVE, tasks={"pretrain"}),
    _key("batch_size_train", int, REQUIRED, "data", "fine-tuning batch per process", **POSITIVE, tasks=FINE_TUNING),
    _key("batch_size_test", int, REQUIRED, "data", "evaluation batch per process", **POSITIVE, tasks=FINE_TUNING),
    _key("num_workers", int, 4, "data", "data-loader workers per process", **NON_NEGATIVE),
    _key("substitute_black_on_error", bool, False, "data",
         "evaluation: a black clip replaces an unreadable video (counted and named) instead of stopping",
         tasks=FINE_TUNING),
    # optimisation
    _key("init_lr", _NUMBER, REQUIRED, "optimisation", "learning rate after warm-up", **NON_NEGATIVE),
    _key("min_lr", _NUMBER, REQUIRED, "optimisation", "lowest learning rate", **NON_NEGATIVE),
    _key("lr_decay_rate", _NUMBER, REQUIRED, "optimisation", "pre-training: lr factor per epoch", **NON_NEGATIVE,
         tasks={"pretrain"}),
    _key("warmup_lr", _NUMBER, REQUIRED, "optimisation", "pre-training: lr at step 0", **NON_NEGATIVE,
         tasks={"pretrain"}),
    _key("warmup_steps", int, REQUIRED, "optimisation", "pre-training: warm-up steps in epoch 0", **NON_NEGATIVE,
         tasks={"pretrain"}),
    _key("weight_decay", _NUMBER, REQUIRED, "optimisation", "AdamW weight decay", **NON_NEGATIVE),
    _key("weight_decay_exempt", str, "none", "optimisation",
         "parameters AdamW does not decay: `none` (the original's fine-tuning), `bias_layernorm` (its pre-training: "
         "names containing `bias` or `LayerNorm.weight`) or `bias_norm_embed` (1-D tensors, tokens, embeddings)",
         choices=("none", "bias_layernorm", "bias_norm_embed")),
    _key("max_epoch", int, REQUIRED, "optimisation", "epochs", **POSITIVE),
    _key("seed", int, 42, "optimisation", "random seed (each process adds its rank)"),
    _key("shuffle_seed", int, 0, "optimisation",
         "seed of the training sampler's shuffle (with the epoch); the original used 0 whatever `seed` said"),
    _key("mixed_precision_method", str, "none", "optimisation",
         "`apex`/`fp16`: fp16 autocast with gradient scaling on CUDA; `bf16`: bf16 autocast; `none`: fp32. On CPU "
         "the three run bf16 autocast where bf16 is native (docs/training.md); flag `--mixed_precision_method`",
         choices=("apex", "fp16", "bf16", "none")),
    _key("accumulation_steps", int, 1, "optimisation",
         "micro-batches per optimiser step (the loss is divided accordingly); flag `--accumulation_steps`",
         **POSITIVE),
    _key("max_grad_norm", _NUMBER, None, "optimisation",
         "clip the gradient norm to this (unscaled first under AMP); unset: no clipping; flag `--max_grad_norm`",
         greater_than=0),
    # evaluation
    _key("k_test", int, REQUIRED, "evaluation", "retrieval: candidates re-ranked by ITM per query; "
                                               "QA: answers re-ranked per question", **POSITIVE, tasks=FINE_TUNING),
    _key("k_test_batch_size", int, 128, "evaluation", "ITM pairs scored per pass while re-ranking", **POSITIVE,
         tasks={"retrieval"}),
    _key("low_resource_eval", bool, False, "evaluation", "keep the cached video tokens in fp16 on the CPU",
         tasks={"retrieval"}),
    _key("tie_rule", str, "original", "evaluation", "`original` (argsort order) or `pessimistic`",
         choices=("original", "pessimistic"), tasks={"retrieval"}),
    _key("inference", str, "rank", "evaluation", "QA: `rank` the answer list or `generate`",
         choices=("rank", "generate"), tasks={"qa"}),
    _key("answer_candidates", str, "split", "evaluation",
         "QA `rank`: `split` (the distinct answers of the split evaluated, the original's rule) or `train` "
         "(the training answers only), each in order of first appearance (docs/evaluation.md)",
         choices=("split", "train"), tasks={"qa"}),
    _key("val_question_every", int, 50, "evaluation",
         "QA validation: every N-th question of the val split after a shuffle seeded by `seed` "
         "(the original's 1/50); 1 = every question", **POSITIVE, tasks={"qa"}),
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


# The keys that build the video encoder and decide what it computes: results and indexes
# record them (evaluation.evaluation_protocol, inference.index).
ENCODER_KEYS = ("vit", "image_size", "patch_size", "vision_width", "num_heads", "depth", "num_frames",
                "attention_type", "learnable_temporal_scaling", "token_merging", "merging_type", "testa_r",
                "prop_attn", "merge_rule", "merge_budget", "merge_token_budget", "merge_seed")


def value_problem(key: ConfigKey, given) -> str | None:
    """What `given` (of the right type) breaks of the key's value rules, in words; None if nothing."""
    if isinstance(given, dict):
        return _mapping_problem(key, given)
    if not isinstance(given, list):
        rule = _broken_rule(key, given)
        return rule and f"must be {rule}, got {given!r}"
    for entry in given:
        if isinstance(entry, bool) or not isinstance(entry, key.entry_types):
            return f"has entry {entry!r}; entries must be {' or '.join(t.__name__ for t in key.entry_types)}"
        rule = _broken_rule(key, entry)
        if rule:
            return f"has entry {entry!r}; entries must be {rule}"
    return None


def _mapping_problem(key: ConfigKey, given: dict) -> str | None:
    """A per-axis mapping (`merge_rule`): its keys are axes and its values within the key's rules."""
    unknown = [axis for axis in given if axis not in MERGE_AXES]
    if unknown:
        return f"has axis {unknown[0]!r}; the axes are {', '.join(MERGE_AXES)}"
    broken = [(axis, rule) for axis, entry in given.items() if (rule := _broken_rule(key, entry))]
    return broken and f"has {broken[0][0]}: {given[broken[0][0]]!r}; it must be {broken[0][1]}"


def _broken_rule(key: ConfigKey, given) -> str | None:
    """The rule a single value breaks, e.g. '>= 1'; None when it keeps them all."""
    if isinstance(given, float) and not math.isfinite(given):
        return "a finite number"
    if key.minimum is not None and given < key.minimum:
        return f">= {key.minimum}"
    if key.greater_than is not None and given <= key.greater_than:
        return f"> {key.greater_than}"
    if key.maximum is not None and given > key.maximum:
        return f"<= {key.maximum}"
    if key.choices is not None and given not in key.choices:
        return f"one of {', '.join(map(repr, key.choices))}"
    return None


def check_values(config: dict, where_of: Callable[[str], str]) -> None:
    """Each value within its key's rules, then each multiple of the key that must divide it;
    `where_of(name)` says where a key was set (a file, an override). Run after `check`."""
    for name, given in config.items():
        problem = None if given is None else value_problem(CONFIG_KEYS[name], given)
        if problem:
            raise ConfigError(f"config key {name!r} in {where_of(name)} {problem}")
    for name, given in config.items():
        other = CONFIG_KEYS[name].multiple_of
        divisor = config.get(other, CONFIG_KEYS[other].default) if other else None
        if given is not None and divisor not in (None, REQUIRED) and given % divisor:
            divisor_from = f"in {where_of(other)}" if other in config else "the default"
            raise ConfigError(f"config key {name!r} ({given}, in {where_of(name)}) must be a multiple of "
                              f"{other!r} ({divisor}, {divisor_from})")


def task_of(config: dict) -> str | None:
    """The run a config is for: its `dataset` names a fine-tuning task; a pre-training config
    names annotation files or shards instead. None for a partial config (the --sep_img image data)."""
    if config.get("dataset") is not None:
        return DATASET_TASKS[config["dataset"]]
    if config.get("train_file") is not None or config.get("train_shards") is not None:
        return "pretrain"
    return None


def unread_keys(config: dict, task: str) -> list[str]:
    """The keys set in `config` that a `task` run does not read."""
    return [name for name in config if task not in CONFIG_KEYS[name].tasks]


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
    """The key table of docs/configs.md."""
    rows = ["| key | section | default | meaning |", "| --- | --- | --- | --- |"]
    rows += [f"| `{key.name}` | {key.section} | {key.describe_default()} | {key.help} |"
             for key in CONFIG_KEYS.values()]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
