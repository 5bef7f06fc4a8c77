"""Loading released TESTA / BLIP checkpoints into this project's models.

The state-dict key names are the contract with users (docs/checkpoints.md).
Loading is lenient only where the published workflow needs it:

* image-BLIP checkpoints into a divided space-time encoder: the temporal attention
  and its norm start as copies of each block's spatial ones, so the video model
  starts as a per-frame image model;
* ``pos_embed`` (bicubic over the patch grid), ``time_embed`` and
  ``temporal_scaling`` (nearest along time) are resized to the model's sizes,
  each encoder from its own entry;
* feature queues load when their shape fits and are re-initialised otherwise; with
  ``keep_queues=False`` every queue starts fresh, as the original's loader deleted them.

Any other shape mismatch is an error naming the key. A checkpoint must also fit the model
it is loaded into: a tensor the model needs that the file lacks is an error naming the
file's family (pre-training, retrieval, QA; video or image BLIP), except the short list in
``may_start_fresh`` of what legitimately starts fresh.
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


# Feature queues and their pointers: caches of recent momentum features, refilled within
# queue_size / batch steps (the original deleted them before every load).
QUEUE_BUFFERS = ("image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr")
# Which checkpoint tasks each model task loads from (video or image BLIP alike).
LOADS_FROM = {"retrieval": "a pre-training or retrieval", "QA": "a pre-training or QA",
              "pre-training": "a pre-training"}


def _is_temporal(key: str) -> bool:
    return key.endswith("time_embed") or ".temporal_" in key


def task_of(keys) -> str:
    """The task a state dict was trained for, from its keys: the decoder, ITM head and queue
    pointers differ between pre-training, retrieval and QA (docs/checkpoints.md)."""
    keys = set(keys)
    decoder = any(k.startswith("text_decoder.") for k in keys)
    itm = any(k.startswith("itm_head.") for k in keys)
    if decoder and itm:
        return "pre-training"
    if itm or "idx_queue" in keys or "ptr_queue" in keys:
        return "retrieval"
    return "QA" if decoder else "unrecognised"


def checkpoint_family(keys) -> str:
    """E.g. 'video pre-training', 'image-BLIP retrieval', 'video QA': the task, and whether the
    video encoder has temporal weights (a space-only video model reads as image BLIP, which
    it is built like)."""
    keys = list(keys)
    visual = [k for k in keys if k.startswith("visual_encoder.")]
    kind = "video " if any(_is_temporal(k) for k in visual) else "image-BLIP " if visual else ""
    return f"{kind}{task_of(keys)}"


def may_start_fresh(key: str, image_prefixes: set[str]) -> bool:
    """Whether a tensor the model has may be missing from the checkpoint (it keeps its
    initialisation). The list, and why, is in docs/checkpoints.md ("Loading rules")."""
    if key in QUEUE_BUFFERS:
        return True  # caches, not weights
    if key.endswith("embeddings.position_ids"):
        return True  # a constant arange buffer that newer savers leave out
    if key.endswith("temporal_scaling"):
        return True  # starts at 0, a scale of tanh(0) + 1 = 1: the unscaled model
    # An image-BLIP encoder has no temporal weights: time_embed and temporal_fc start at zero,
    # so the temporal branch adds nothing (its attention was copied from the spatial one).
    return any(key.startswith(p) and _is_temporal(key) for p in image_prefixes)


def _missing_error(source: str, family: str, model_task: str, missing: list[str]) -> CheckpointError:
    modules = list(_group_by_module(missing))
    examples = [next(k for k in missing if k.partition(".")[0] == m) for m in modules[:4]]
    examples += [k for k in missing if k not in examples][:max(0, 3 - len(examples))]  # at least 3 names
    more = f" and {len(modules) - 4} more modules" if len(modules) > 4 else ""
    hint = (f"; a {model_task} model loads {LOADS_FROM[model_task]} checkpoint (video or image BLIP)"
            if model_task in LOADS_FROM else "")
    return CheckpointError(f"{source} is a {family} checkpoint and does not fit this {model_task} model: "
                           f"it lacks {len(missing)} tensors the model needs ({', '.join(examples)}{more}){hint}")


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
    family: str = "unrecognised"  # checkpoint_family() of the file

    def summary(self, source: str) -> str:
        lines = [f"loaded {self.loaded} tensors from {source} ({self.family} checkpoint)"]
        if self.resized:
            lines.append(f"  resized: {', '.join(self.resized)}")
        if self.initialised_from_spatial:
            lines.append(f"  temporal attention initialised from spatial attention: "
                         f"{len(self.initialised_from_spatial)} tensors")
        if self.reinitialised:
            lines.append(f"  started fresh (queues not kept, or shape differs): {', '.join(self.reinitialised)}")
        for title, keys in (("missing, allowed to start fresh", self.missing),
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
                     report: LoadReport, keep_queues: bool = True) -> dict[str, torch.Tensor]:
    """Map a checkpoint onto the model's state (names and shapes); records what changed in ``report``.
    Queues (every key naming one) that do not fit, or all of them unless ``keep_queues``, are left
    out, so the model keeps its freshly initialised ones."""
    adapted = dict(state_dict)
    for prefix in VISUAL_PREFIXES:
        if prefix + "pos_embed" in model_state:
            _adapt_visual_encoder(adapted, model_state, prefix, report)
    for key in [k for k in adapted if "queue" in k]:
        if key in model_state and (not keep_queues or adapted[key].shape != model_state[key].shape):
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


def load_checkpoint(model: nn.Module, checkpoint: str | dict, verbose: bool = True,
                    keep_queues: bool = True) -> LoadReport:
    """Load ``checkpoint`` (path or state dict) into ``model`` and print one readable summary.
    ``keep_queues=False`` starts every feature queue fresh (see adapt_state_dict)."""
    source = checkpoint if isinstance(checkpoint, str) else "state dict"
    state_dict = read_state_dict(checkpoint) if isinstance(checkpoint, str) else checkpoint
    model_state = model.state_dict()
    report = LoadReport(family=checkpoint_family(state_dict))
    adapted = adapt_state_dict(state_dict, model_state, report, keep_queues)

    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
                  for k, v in adapted.items() if k in model_state and v.shape != model_state[k].shape]
    if mismatched:
        raise CheckpointError(f"{source} ({report.family} checkpoint) does not fit this model (shape mismatch): "
                              + "; ".join(mismatched[:5])
                              + (f" and {len(mismatched) - 5} more" if len(mismatched) > 5 else ""))
    usable = {k: v for k, v in adapted.items() if k in model_state}
    if not usable:
        raise CheckpointError(f"{source} shares no parameter names with {type(model).__name__}: "
                              "is it a checkpoint of another model?")
    # Checked before loading, so a refused checkpoint leaves the model untouched.
    image_prefixes = {p for p in VISUAL_PREFIXES if not any(k.startswith(p) and _is_temporal(k) for k in state_dict)}
    required = [k for k in model_state if k not in usable and not may_start_fresh(k, image_prefixes)]
    if required:
        raise _missing_error(source, report.family, task_of(model_state), required)
    result = model.load_state_dict(usable, strict=False)
    report.missing = list(result.missing_keys)
    report.unexpected = [k for k in adapted if k not in model_state]
    report.loaded = len(usable)
    if verbose:
        print(report.summary(source), flush=True)
    return report
