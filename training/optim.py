"""AdamW with a no-decay group, learning-rate schedules and the distillation ramp."""
import math
from typing import Callable

import torch

from configs.keys import value
from training.distributed import unwrap_model


# Learned tokens, position/time embeddings and scales: decaying them toward 0 only hurts.
NO_WEIGHT_DECAY_NAMES = frozenset({"cls_token", "pos_embed", "time_embed", "temporal_scaling", "temp"})


def param_groups_for_weight_decay(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and biases/norms/1-D params/tokens without decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name.split(".")[-1] in NO_WEIGHT_DECAY_NAMES
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(model: torch.nn.Module, config: dict) -> torch.optim.AdamW:
    """AdamW at the config's init_lr and weight_decay, with the no-decay group split off."""
    groups = param_groups_for_weight_decay(unwrap_model(model), value(config, "weight_decay", "the optimiser"))
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
