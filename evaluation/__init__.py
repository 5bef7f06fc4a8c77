"""Evaluation: retrieval (ITC + ITM re-ranking), video QA and their metrics.

The protocol, step by step and where it differs from the original, is docs/evaluation.md.
"""
from configs.keys import value


def evaluation_protocol(config: dict, checkpoint: str | None, **extra) -> dict:
    """What a result was measured with, stored next to its metrics: `checkpoint` is the file
    whose weights were tested."""
    return {"frames": value(config, "num_frm_test"), "image_size": value(config, "image_size"),
            "frame_sampling": value(config, "frm_sampling_strategy_test"), "k_test": config.get("k_test"),
            "tie_rule": value(config, "tie_rule"), "checkpoint": checkpoint or None, **extra}
