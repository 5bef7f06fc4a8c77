"""Loading released TESTA / BLIP checkpoints into this project's models.

The state-dict key names are the contract with users (docs/checkpoints.md).
Loading is lenient only where the published workflow needs it:

* image-BLIP checkpoints into a divided space-time encoder: the temporal attention
  and its norm start as copies of each block's spatial ones, so the video model
  starts as a per-frame image model;
* ``pos_embed`` (bicubic over the patch grid), ``time_embed`` and
  ``temporal_scaling`` (nearest along time) are resized to the model's sizes,
  each encoder from its own entry;
* feature queues load when their shape fits and are re-initialised otherwise.

Any other shape mismatch is an error naming the key.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.embedding_resize import resize_pos_embed, resize_time_embed

VISUAL_PREFIXES = ("visual_encoder.", "visual_encoder_m.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or cannot be loaded into the requested model."""


def read_checkpoint(path) -> dict:
    """Read a checkpoint file on the CPU with weights_only=True (a file from the internet
    cannot run code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}") from None


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    initialised_from_spatial: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    loaded: int = 0

    def summary(self, source: str) -> str:
        lines = [f"loaded {self.loaded} tensors from {source}"]
        if self.resized:
            lines.append(f"  resized: {', '.join(self.resized)}")
        if self.initialised_from_spatial:
            lines.append(f"  temporal attention initialised from spatial attention: "
                         f"{len(self.initialised_from_spatial)} tensors")
        if self.reinitialised:
            lines.append(f"  re-initialised (shape differs): {', '.join(self.reinitialised)}")
        for title, keys in (("missing (keep their initialisation)", self.missing),
                            ("ignored (not used by this model)", self.unexpected)):
            for module, names in _group_by_module(keys).items():
                lines.append(f"  {title}: {module}: {len(names)} tensors"
                             + (f" ({', '.join(names)})" if len(names) <= 4 else ""))
        return "\n".join(lines)


def _group_by_module(keys: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = OrderedDict()
    for key in keys:
        module, _, rest = key.partition(".")
        groups.setdefault(module, []).append(rest or module)
    return groups


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file: ``{'model': sd, ...}``, ``{'state_dict': sd}`` or bare."""
    checkpoint = read_checkpoint(path)
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointError(f"{path} does not hold a state dict")
    # DDP-wrapped saves prefix every key with 'module.'.
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint


def adapt_state_dict(state_dict: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor],
                     report: LoadReport) -> dict[str, torch.Tensor]:
    """Map a checkpoint onto the model's state (names and shapes); records what changed in ``report``."""
    adapted = dict(state_dict)
    for prefix in VISUAL_PREFIXES:
        if prefix + "pos_embed" in model_state:
            _adapt_visual_encoder(adapted, model_state, prefix, report)
    for key in [k for k in adapted if "queue" in k]:
        if key in model_state and adapted[key].shape != model_state[key].shape:
            del adapted[key]
            report.reinitialised.append(key)
    return adapted


def _adapt_visual_encoder(sd: dict, model_state: dict, prefix: str, report: LoadReport) -> None:
    key = prefix + "pos_embed"
    if key in sd and sd[key].shape != model_state[key].shape:
        new_grid = math.isqrt(model_state[key].shape[1] - 1)
        old_grid = math.isqrt(sd[key].shape[1] - 1)
        sd[key] = resize_pos_embed(sd[key], new_grid)
        report.resized.append(f"{key} grid {old_grid}->{new_grid}")
    key = prefix + "time_embed"
    if key in sd and key in model_state and sd[key].shape != model_state[key].shape:
        frames = model_state[key].shape[1]
        report.resized.append(f"{key} frames {sd[key].shape[1]}->{frames}")
        sd[key] = resize_time_embed(sd[key], frames)
    for key in [k for k in sd if k.startswith(prefix) and k.endswith("temporal_scaling")]:
        if key in model_state and sd[key].shape != model_state[key].shape:
            frames = model_state[key].shape[1]
            report.resized.append(f"{key} frames {sd[key].shape[1]}->{frames}")
            sd[key] = resize_time_embed(sd[key], frames)
    # An image checkpoint has no temporal attention: start it as the spatial one.
    for key in [k for k in sd if k.startswith(prefix + "blocks.")]:
        for spatial, temporal in ((".attn.", ".temporal_attn."), (".norm1.", ".temporal_norm1.")):
            if spatial in key:
                target = key.replace(spatial, temporal)
                if target in model_state and target not in sd:
                    sd[target] = sd[key].clone()
                    report.initialised_from_spatial.append(target)


def load_checkpoint(model: nn.Module, checkpoint: str | dict, verbose: bool = True) -> LoadReport:
    """Load ``checkpoint`` (path or state dict) into ``model`` and print one readable summary."""
    source = checkpoint if isinstance(checkpoint, str) else "state dict"
    state_dict = read_state_dict(checkpoint) if isinstance(checkpoint, str) else checkpoint
    model_state = model.state_dict()
    report = LoadReport()
    adapted = adapt_state_dict(state_dict, model_state, report)

    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
                  for k, v in adapted.items() if k in model_state and v.shape != model_state[k].shape]
    if mismatched:
        raise CheckpointError(f"{source} does not fit this model (shape mismatch): " + "; ".join(mismatched[:5])
                              + (f" and {len(mismatched) - 5} more" if len(mismatched) > 5 else ""))
    usable = {k: v for k, v in adapted.items() if k in model_state}
    if not usable:
        raise CheckpointError(f"{source} shares no parameter names with {type(model).__name__}: "
                              "is it a checkpoint of another model?")
    result = model.load_state_dict(usable, strict=False)
    report.missing = list(result.missing_keys)
    report.unexpected = [k for k in adapted if k not in model_state]
    report.loaded = len(usable)
    if verbose:
        print(report.summary(source), flush=True)
    return report
