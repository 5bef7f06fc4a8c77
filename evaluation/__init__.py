"""Evaluation: retrieval (ITC + ITM re-ranking), video QA and their metrics.

The protocol, step by step and where it differs from the original, is docs/evaluation.md.
"""
from configs.keys import ENCODER_KEYS, value

# The config keys that build the tested model: the video encoder's, and the text side's files
# (None where the bundled ones are used).
MODEL_KEYS = ENCODER_KEYS + ("med_config", "tokenizer")


def evaluation_protocol(config: dict, checkpoint: str | None, **extra) -> dict:
    """What a result was measured with, stored next to its metrics: `checkpoint` is the file
    whose weights were tested, `model` the settings the model was built with."""
    return {"frames": value(config, "num_frm_test"), "image_size": value(config, "image_size"),
            "frame_sampling": value(config, "frm_sampling_strategy_test"), "k_test": config.get("k_test"),
            "tie_rule": value(config, "tie_rule"), "checkpoint": checkpoint or None,
            "model": {name: value(config, name) for name in MODEL_KEYS}, **extra}


def merge_record(encoder, config: dict) -> dict:
    """What the video encoder's token merging costs on the test clips, written next to the metrics:
    the rule, the budget, the resolved per-block schedule and the counted GMACs (models/budget.py)."""
    patches = (value(config, "image_size") // value(config, "patch_size")) ** 2
    plan = encoder.merge_plan(value(config, "num_frm_test"), patches)
    return {"rule": value(config, "merge_rule"), "budget": plan.budget, **plan.fields(digits=4)}
