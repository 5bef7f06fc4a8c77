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
it is loaded into: the model settings recorded in a checkpoint this project wrote must be
the model's (``check_recorded_settings``); a block stack (video encoder blocks, BERT layers)
must have as many blocks in the file as in the model; and a tensor the model needs that the
file lacks is an error naming the file's family (pre-training, retrieval, QA; video or image
BLIP), except the short list in ``may_start_fresh`` of what legitimately starts fresh.
"""
from __future__ import annotations

import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.timesformer import adapt_encoder_checkpoint
from runtime.errors import CheckpointError

VISUAL_PREFIXES = ("visual_encoder.", "visual_encoder_m.")


# Feature queues and their pointers: caches of recent momentum features, refilled within
# queue_size / batch steps (the original deleted them before every load).
QUEUE_BUFFERS = ("image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr")
# Which checkpoint tasks each model task loads from (video or image BLIP alike).
LOADS_FROM = {"retrieval": "a pre-training or retrieval", "QA": "a pre-training or QA",
              "pre-training": "a pre-training"}


# The BERT config fields (the `med_config` file) that fix what the text weights mean.
TEXT_SETTINGS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
# What a training checkpoint written before `model_settings` existed tells by its stored config.
STORED_CONFIG_SETTINGS = ("vision_width", "depth", "num_heads", "patch_size")
# (setting, the checkpoint's, the model's) that load all the same: a space-only encoder starts
# a divided space-time one, as image BLIP does (temporal attention copied from the spatial).
ALLOWED_SETTING_CHANGES = {("attention_type", "space_only", "divided_space_time")}
# A stack of numbered blocks in a key: visual_encoder.blocks.3.attn.qkv.weight, text_encoder.encoder.layer.0...
_STACKED_BLOCK = re.compile(r"^(.+\.(blocks|layer))\.(\d+)\.")
# The setting each kind of stack follows.
STACK_SETTINGS = {"blocks": "config key depth", "layer": "num_hidden_layers of the BERT config, med_config"}


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


def model_settings(model: nn.Module) -> dict:
    """The settings that fix what a model's weights mean, by the names a user sets them with:
    config keys, and `med_config.<field>` for the BERT config file. Training checkpoints record
    them and loading compares them (check_recorded_settings). Left out: what loading adapts
    (image_size, num_frames, learnable_temporal_scaling, queues) and what has no weights
    (token merging)."""
    settings = {}
    encoder = getattr(model, "visual_encoder", None)
    if encoder is not None:
        settings.update(vision_width=encoder.embed_dim, depth=len(encoder.blocks),
                        num_heads=encoder.blocks[0].attn.num_heads, patch_size=encoder.patch_embed.proj.kernel_size[0],
                        attention_type=encoder.attention_type)
    if isinstance(getattr(model, "vision_proj", None), nn.Linear):
        settings["embed_dim"] = model.vision_proj.out_features
    text_encoder = getattr(model, "text_encoder", None)
    if text_encoder is not None:
        settings.update({f"med_config.{name}": getattr(text_encoder.config, name) for name in TEXT_SETTINGS})
    return settings


def recorded_settings(checkpoint) -> dict:
    """The model settings a read checkpoint file records: its `model_settings`, else (a training
    checkpoint written before that record) its config's video encoder keys; {} for a released one."""
    if not isinstance(checkpoint, dict):
        return {}
    if isinstance(checkpoint.get("model_settings"), dict):
        return checkpoint["model_settings"]
    config = checkpoint.get("config")
    return {name: config[name] for name in STORED_CONFIG_SETTINGS if name in config} if isinstance(config, dict) else {}


def check_recorded_settings(checkpoint, source: str, model: nn.Module) -> None:
    """Stop, naming every difference and both values, when the model settings a read checkpoint
    records are not the model's. num_heads changes no shape: only this record can tell it."""
    recorded, current = recorded_settings(checkpoint), model_settings(model)
    differ = [name for name in recorded if name in current and recorded[name] != current[name]
              and (name, recorded[name], current[name]) not in ALLOWED_SETTING_CHANGES]
    if not differ:
        return

    def listed(settings):
        return ", ".join(f"{name}={settings[name]}" for name in differ)

    hint = " (med_config.*: the BERT config file)" if any(name.startswith("med_config.") for name in differ) else ""
    raise CheckpointError(f"{source} was written for another model: {listed(recorded)} there, "
                          f"{listed(current)} in this config{hint}")


def _block_stacks(keys) -> dict[str, set[int]]:
    """{'visual_encoder.blocks': {0, 1, ...}, 'text_encoder.encoder.layer': {...}, ...}"""
    stacks: dict[str, set[int]] = {}
    for key in keys:
        match = _STACKED_BLOCK.match(key)
        if match:
            stacks.setdefault(match.group(1), set()).add(int(match.group(3)))
    return stacks


def check_block_stacks(state_dict: dict, model_state: dict, source: str, family: str) -> None:
    """Missing or extra blocks are an error, not blocks left at their initialisation or ignored:
    a stack of blocks that both the file and the model have must have the same blocks."""
    in_file, in_model = _block_stacks(state_dict), _block_stacks(model_state)
    differ: dict[tuple, list[str]] = {}
    for stack, blocks in in_model.items():
        if stack in in_file and in_file[stack] != blocks:
            kind = stack.rpartition(".")[2]
            differ.setdefault((len(in_file[stack]), len(blocks), kind), []).append(stack)
    if differ:
        raise CheckpointError(f"{source} ({family} checkpoint) does not fit this model: " + "; ".join(
            f"{', '.join(stacks)}: {in_file_count} blocks in the file, {in_model_count} in the model "
            f"({STACK_SETTINGS[kind]})" for (in_file_count, in_model_count, kind), stacks in differ.items()))


def _missing_error(source: str, family: str, model_task: str, missing: list[str]) -> CheckpointError:
    modules = list(_group_by_module(missing))
    examples = [next(k for k in missing if k.partition(".")[0] == m) for m in modules[:4]]
    examples += [k for k in missing if k not in examples][:max(0, 3 - len(examples))]  # at least 3 names
    more = f" and {len(modules) - 4} more modules" if len(modules) > 4 else ""
    hint = (f"; a {model_task} model loads {LOADS_FROM[model_task]} checkpoint (video or image BLIP)"
            if model_task in LOADS_FROM else "")
    return CheckpointError(f"{source} is a {family} checkpoint and does not fit this {model_task} model: "
                           f"it lacks {len(missing)} tensors the model needs ({', '.join(examples)}{more}){hint}")


def read_checkpoint(path, mmap: bool = False) -> dict:
    """Read a checkpoint file on the CPU with weights_only=True (a file from the internet
    cannot run code). ``mmap`` maps the tensors instead of reading them: a cheap look at the
    other entries of a large file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (0 bytes; an interrupted "
                              "save, copy or download?)")
    try:
        # torch maps only its zip format (a truncated file is no zip either: read, it says so).
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {_reading_failure(error, size)}") from None


def _reading_failure(error: Exception, size: int) -> str:
    """torch's reason, shortened to its first sentence where the file is cut short or damaged."""
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, (EOFError, OSError)) or "PytorchStreamReader" in first_line:
        return (f"the file ({size} bytes) is truncated or damaged ({first_line.split('. ')[0]}; "
                "an interrupted save, copy or download?)")
    return first_line


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
    return state_dict_of(read_checkpoint(path), path)


def state_dict_of(checkpoint, path: str) -> dict[str, torch.Tensor]:
    """The state dict a read checkpoint holds (formats: read_state_dict)."""
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
            changes = adapt_encoder_checkpoint(adapted, model_state, prefix)
            report.resized += changes["resized"]
            report.initialised_from_spatial += changes["initialised_from_spatial"]
    for key in [k for k in adapted if "queue" in k]:
        if key in model_state and (not keep_queues or adapted[key].shape != model_state[key].shape):
            del adapted[key]
            report.reinitialised.append(key)
    return adapted


def load_checkpoint(model: nn.Module, checkpoint, strict: bool = False, keep_queues: bool = True,
                    verbose: bool = True, source: str | None = None) -> LoadReport:
    """Load ``checkpoint`` into ``model``: a file path, a checkpoint read with read_checkpoint, or a
    bare state dict. The model settings a checkpoint records must be the model's.

    strict: the file holds exactly the model's tensors (a run's own checkpoint, resumed or
    re-read); otherwise it is adapted as the module docstring says (released and earlier-stage
    checkpoints), and ``keep_queues=False`` starts every feature queue fresh (adapt_state_dict).
    ``source`` names the checkpoint in messages (default: the path, or "state dict"). Prints
    one readable summary when ``verbose``.
    """
    if isinstance(checkpoint, (str, Path)):
        source = source or str(checkpoint)
        checkpoint = read_checkpoint(checkpoint)
    source = source or "state dict"
    check_recorded_settings(checkpoint, source, model)
    state_dict = state_dict_of(checkpoint, source)
    if strict:
        return _load_exact(model, state_dict, source)
    model_state = model.state_dict()
    report = LoadReport(family=checkpoint_family(state_dict))
    adapted = adapt_state_dict(state_dict, model_state, report, keep_queues)

    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
                  for k, v in adapted.items() if k in model_state and v.shape != model_state[k].shape]
    if mismatched:
        raise CheckpointError(f"{source} ({report.family} checkpoint) does not fit this model (shape mismatch): "
                              + "; ".join(mismatched[:5])
                              + (f" and {len(mismatched) - 5} more" if len(mismatched) > 5 else ""))
    check_block_stacks(state_dict, model_state, source, report.family)
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


def _load_exact(model: nn.Module, state_dict: dict, source: str) -> LoadReport:
    """Strict load that names missing/unexpected keys in one line instead of a traceback."""
    family = checkpoint_family(state_dict)
    what = f"checkpoint {source} (a {family} checkpoint) does not match this model"
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise CheckpointError(f"{what}: {' '.join(str(error).split())[:300]}") from None
    if result.missing_keys or result.unexpected_keys:
        def preview(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        raise CheckpointError(f"{what}: {len(result.missing_keys)} missing keys [{preview(result.missing_keys)}], "
                              f"{len(result.unexpected_keys)} unexpected keys [{preview(result.unexpected_keys)}]")
    return LoadReport(loaded=len(state_dict), family=family)
