"""Evaluation: retrieval (ITC + ITM re-ranking), video QA and their metrics.

The protocol, step by step and where it differs from the original, is docs/evaluation.md.
"""
from configs.keys import value

# The config keys that build the tested model: what shapes its weights, and how it computes
# (token merging). med_config and tokenizer are None where the bundled ones are used.
MODEL_KEYS = ("vit", "image_size", "patch_size", "vision_width", "num_heads", "depth", "num_frames", "attention_type",
              "learnable_temporal_scaling", "token_merging", "merging_type", "testa_r", "prop_attn", "med_config",
              "tokenizer")


def evaluation_protocol(config: dict, checkpoint: str | None, **extra) -> dict:
    """What a result was measured with, stored next to its metrics: `checkpoint` is the file
    whose weights were tested, `model` the settings the model was built with."""
    return {"frames": value(config, "num_frm_test"), "image_size": value(config, "image_size"),
            "frame_sampling": value(config, "frm_sampling_strategy_test"), "k_test": config.get("k_test"),
            "tie_rule": value(config, "tie_rule"), "checkpoint": checkpoint or None,
            "model": {name: value(config, name) for name in MODEL_KEYS}, **extra}
