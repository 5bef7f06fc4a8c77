"""AdamW and its weight-decay groups, learning-rate schedules and the distillation ramp."""
import math
from typing import Callable

import torch

from configs.keys import ConfigError, value
from runtime.distributed import unwrap_model

# Learned tokens, position/time embeddings and scales: the project's own exemption rule
# decays none of them (nor any 1-D tensor).
EMBEDDING_NAMES = frozenset({"cls_token", "pos_embed", "time_embed", "temporal_scaling", "temp"})
# BLIP's pre-training rule: a substring match on the name, so the TimeSformer's norms (norm1, ...)
# are decayed and only BERT's LayerNorms and every bias are exempt.
BLIP_NO_DECAY_SUBSTRINGS = ("bias", "LayerNorm.bias", "LayerNorm.weight")
EXEMPTION_RULES = {
    "none": lambda name, param: False,  # the original's fine-tuning: AdamW(model.parameters(), weight_decay)
    "bias_layernorm": lambda name, param: any(part in name for part in BLIP_NO_DECAY_SUBSTRINGS),
    "bias_norm_embed": lambda name, param: param.ndim <= 1 or name.split(".")[-1] in EMBEDDING_NAMES,
}


def param_groups_for_weight_decay(model: torch.nn.Module, weight_decay: float, exempt: str = "none") -> list[dict]:
    """AdamW groups: decayed parameters, and those the rule `exempt` (a weight_decay_exempt value)
    spares, in named_parameters() order; parameters that are not trained are left out."""
    if exempt not in EXEMPTION_RULES:
        raise ConfigError(f"weight_decay_exempt {exempt!r} is unknown; expected one of {list(EXEMPTION_RULES)}")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if EXEMPTION_RULES[exempt](name, param) else decay).append(param)
    # Two groups whatever the rule (the second may be empty), so optimiser states stay interchangeable.
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(model: torch.nn.Module, config: dict) -> torch.optim.AdamW:
    """AdamW at the config's init_lr and weight_decay, sparing the parameters weight_decay_exempt names."""
    groups = param_groups_for_weight_decay(unwrap_model(model), value(config, "weight_decay", "the optimiser"),
                                           value(config, "weight_decay_exempt"))
    return torch.optim.AdamW(groups, lr=value(config, "init_lr", "the optimiser"))


def cosine_lr(epoch: int, max_epoch: int, init_lr: float, min_lr: float) -> float:
    """Fine-tuning: half a cosine from init_lr (epoch 0) down to min_lr (epoch max_epoch)."""
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr


def warmup_lr(step: int, warmup_steps: int, start_lr: float, target_lr: float) -> float:
    """Linear warm-up from start_lr at step 0 to target_lr at warmup_steps, then flat."""
    if warmup_steps <= 0:
        return target_lr
    return min(target_lr, start_lr + (target_lr - start_lr) * step / warmup_steps)


def step_decay_lr(epoch: int, init_lr: float, min_lr: float, decay_rate: float) -> float:
    """Pre-training: init_lr * decay_rate**epoch, never below min_lr."""
    return max(min_lr, init_lr * decay_rate ** epoch)


def make_lr_schedule(config: dict, kind: str) -> Callable[[int, int], float]:
    """lr as a function of (epoch, optimiser step within the epoch).

    kind='cosine' (fine-tuning, per epoch) or 'warmup_step_decay' (pre-training: warm-up
    over the first warmup_steps steps of epoch 0, then step decay per epoch).
    """
    def get(name):
        return value(config, name, f"the {kind} learning-rate schedule")

    if kind == "cosine":
        max_epoch, init_lr, min_lr = get("max_epoch"), get("init_lr"), get("min_lr")
        return lambda epoch, step: cosine_lr(epoch, max_epoch, init_lr, min_lr)
    if kind == "warmup_step_decay":
        init_lr, min_lr, decay_rate = get("init_lr"), get("min_lr"), get("lr_decay_rate")
        warmup_steps, start_lr = get("warmup_steps"), get("warmup_lr")

        def schedule(epoch: int, step: int) -> float:
            if epoch == 0:
                return warmup_lr(step, warmup_steps, start_lr, init_lr)
            return step_decay_lr(epoch, init_lr, min_lr, decay_rate)
        return schedule
    raise ValueError(f"unknown schedule kind {kind!r}; expected 'cosine' or 'warmup_step_decay'")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def alpha_ramp(alpha: float, epoch: int, step: int, steps_per_epoch: int, ramp_epochs: int = 2) -> float:
    """Distillation weight growing linearly from 0 to `alpha` over the first `ramp_epochs`."""
    progress = (epoch * steps_per_epoch + step) / (ramp_epochs * steps_per_epoch)
    return alpha * min(1.0, progress)
