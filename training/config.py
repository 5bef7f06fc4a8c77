"""Reading a YAML config and `key=value` overrides; the keys themselves are described in configs/keys.py.

Every value is checked here, before any data or model work: its type and rules, the keys that
must divide others, and what the run will do differently from what it asks (keys it never
reads, a `testa_r` schedule that is cut, padded or clamped), said in one `warning:` line each.
"""
import io
import sys
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from configs.keys import (CONFIG_KEYS, ConfigError, check, check_values, task_of, unknown_key_message, unread_keys,
                          value)
from models.merge import clamp_r
from models.timesformer import merge_schedule
from training.distributed import is_main_process

RUN_NAMES = {"pretrain": "pre-training", "retrieval": "retrieval", "qa": "video QA"}


def parse_override(text: str) -> tuple[str, object]:
    """Split `key=value` into the key and the value parsed as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value")
    try:
        value = YAML(typ="safe").load(raw) if raw.strip() else ""
    except YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({error.problem})") from None
    return key.strip(), value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Set each `key=value` in `config`; unknown keys fail."""
    for text in overrides:
        key, value = parse_override(text)
        if key not in CONFIG_KEYS:
            raise ConfigError(unknown_key_message(key, f"override {text!r}"))
        config[key] = value
    return config


def load_config(path, overrides: list[str] = ()) -> dict:
    """Read a YAML config (safe loader), apply `key=value` overrides and check every value; warn
    (rank 0) about keys the config's run does not read and about a testa_r the encoder adjusts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        config = YAML(typ="safe").load(path.read_text())
    except YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ConfigError(f"config {path} must be a mapping of key: value, got {type(config).__name__}")
    check(config, str(path))
    config = apply_overrides(config, list(overrides))
    check(config, "the overrides")
    set_by = {parse_override(text)[0]: f"override {text!r}" for text in overrides}
    check_values_and_warn(config, lambda name: set_by.get(name, str(path)))
    return config


def check_values_and_warn(config: dict, where_of) -> None:
    """Every value within its key's rules (configs/keys.py: check_values; `where_of(name)` says
    where a key was set), then one `warning:` line (rank 0) for each thing the run will not do
    as the config says. For a config that `check` has passed."""
    check_values(config, where_of)
    for message in config_warnings(config):
        if is_main_process():
            print(f"warning: {message}", file=sys.stderr)


def config_warnings(config: dict) -> list[str]:
    """What the run will not do as the config says, one line each."""
    messages = []
    task = task_of(config)
    unread = unread_keys(config, task) if task else []
    if unread:
        names = ", ".join(f"{name!r} ({CONFIG_KEYS[name].help.split(';')[0]})" for name in unread)
        messages.append(f"a {RUN_NAMES[task]} run does not read {names}; "
                        f"{'it is' if len(unread) == 1 else 'they are'} ignored")
    notes = merge_schedule_notes(config)
    if notes:
        messages.append("testa_r: " + "; ".join(notes))
    return messages


def merge_schedule_notes(config: dict) -> list[str]:
    """Where the encoder departs from `testa_r` (models/timesformer.py: merge_schedule, and
    models/merge.py: clamp_r in every block), for the clips of num_frm_train and num_frm_test."""
    if not value(config, "token_merging"):
        return []
    testa_r, merging_type, depth = value(config, "testa_r"), value(config, "merging_type"), value(config, "depth")
    attention = value(config, "attention_type").replace("-", "_")  # the encoder's one alias: space-only
    notes = [_length_note(testa_r, attention, merging_type, depth)] if isinstance(testa_r, list) else []
    schedule = merge_schedule(testa_r, merging_type, attention, depth)
    clip_frames = {}  # frames -> the keys that sample clips of them
    for name in ("num_frm_train", "num_frm_test"):
        if config.get(name):
            clip_frames.setdefault(config[name], []).append(name)
    image_size = config.get("image_size")
    for frames, names in clip_frames.items() if image_size else ():
        clamped = clamped_merges(schedule, attention, merging_type, frames,
                                 (image_size // value(config, "patch_size")) ** 2)
        if clamped:
            block, done, count, what, asked = clamped[0]
            counts = "1 merge count is" if len(clamped) == 1 else f"{len(clamped)} merge counts are"
            notes.append(f"with clips of {frames} frames ({', '.join(names)}) {counts} clamped to half of the "
                         f"tokens that may merge, first in block {block}: {done} of its {count} {what}, not {asked}")
    return [note for note in notes if note]


def _length_note(testa_r: list, attention: str, merging_type: str, depth: int) -> str | None:
    """merge_schedule reads two entries per block in divided frame&patch, else one: it drops the
    entries beyond them and takes zeros for those missing."""
    per_block = 2 if attention == "divided_space_time" and merging_type == "frame&patch" else 1
    read = per_block * depth
    reads = f"the encoder reads {read} entries ({depth} blocks x {per_block} for {attention} {merging_type})"
    if len(testa_r) > read:
        return f"{reads}: the last {len(testa_r) - read} of the {len(testa_r)} given are ignored"
    if len(testa_r) < read:
        return f"{reads}: {read - len(testa_r)} zeros are added to the {len(testa_r)} given"
    return None


def clamped_merges(schedule, attention: str, merging_type: str, frames: int, patches: int) -> list[tuple]:
    """(block, merges done, tokens, which tokens, merges asked) for each merge count the encoder's
    blocks clamp, for clips of `frames` frames of `patches` patches each."""
    clamped = []
    if attention == "divided_space_time":
        protected_frames = 1 if merging_type == "frame&patch" else 0  # as the encoder caps frame merges
        for block, (frame_r, patch_r) in enumerate(schedule, 1):
            frame_merges, patch_merges = clamp_r(frame_r, frames, protected_frames), clamp_r(patch_r, patches)
            clamped += [(block, done, count, what, asked)
                        for done, count, what, asked in ((frame_merges, frames, "frames", frame_r),
                                                         (patch_merges, patches, "patches", patch_r)) if done < asked]
            frames, patches = frames - frame_merges, patches - patch_merges
        return clamped
    # Single attention: space_only over [CLS] + each frame's patches, joint_space_time over the clip.
    tokens = 1 + (patches if attention == "space_only" else frames * patches)
    for block, (_, r) in enumerate(schedule, 1):
        merges = clamp_r(r, tokens, num_protected=1)
        if merges < r:
            clamped.append((block, merges, tokens, "tokens", r))
        tokens -= merges
    return clamped


def save_config(config: dict, output_dir) -> Path:
    """Write the resolved config to output_dir/config.yaml (main rank only)."""
    target = Path(output_dir) / "config.yaml"
    if is_main_process():
        stream = io.StringIO()
        YAML(typ="safe").dump(config, stream)
        target.write_text(stream.getvalue())
    return target
