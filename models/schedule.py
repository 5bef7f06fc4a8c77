"""The per-block merge schedule an encoder reads from `testa_r`, and where it departs from it.

The notes are said in one `warning:` line when an encoder is built: the schedule a config asks
for can be cut, padded or clamped by the clip sizes it meets.
"""
import sys
from typing import List, Tuple

from configs.keys import value
from models.merge import clamp_r
from runtime.distributed import is_main_process

MERGING_TYPES = ("frame&patch", "frame", "patch")
ATTENTION_ALIASES = {"space-only": "space_only"}


def merge_schedule(testa_r, merging_type: str, attention_type: str, depth: int,
                   token_merging: bool = True) -> List[Tuple[int, int]]:
    """Per-block (frames to merge, patches to merge) from the ``testa_r`` config entry.

    Divided frame&patch reads two entries per block (frames, patches); frame, patch and
    the single-attention types (space_only, joint_space_time: plain ToMe) read one.
    An int applies to every block; a short list is padded with zeros, a long one truncated.
    """
    if merging_type not in MERGING_TYPES:
        raise ValueError(f"merging_type must be one of {MERGING_TYPES}, got {merging_type!r}")
    if not token_merging:
        return [(0, 0)] * depth
    two_per_block = attention_type == "divided_space_time" and merging_type == "frame&patch"
    per_block = 2 if two_per_block else 1
    if isinstance(testa_r, int):
        entries = [testa_r] * (depth * per_block)
    else:
        # Extra entries are ignored, as the original does: the released space_only configs
        # reuse the 24-entry frame&patch list.
        entries = [int(r) for r in testa_r][:depth * per_block]
        entries += [0] * (depth * per_block - len(entries))
    if any(r < 0 for r in entries):
        raise ValueError(f"testa_r entries must be >= 0, got {testa_r}")
    if two_per_block:
        return list(zip(entries[0::2], entries[1::2]))
    if attention_type == "divided_space_time" and merging_type == "frame":
        return [(r, 0) for r in entries]
    return [(0, r) for r in entries]


def merge_schedule_notes(config: dict) -> list[str]:
    """Where the encoder departs from `testa_r` (merge_schedule, and models/merge.py: clamp_r in
    every block), for the clips of num_frm_train and num_frm_test."""
    if not value(config, "token_merging"):
        return []
    testa_r, merging_type, depth = value(config, "testa_r"), value(config, "merging_type"), value(config, "depth")
    attention = ATTENTION_ALIASES.get(value(config, "attention_type"), value(config, "attention_type"))
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


def warn_schedule_notes(config: dict) -> None:
    """One `warning: testa_r: ...` line (rank 0) when the encoder of `config` will not merge as
    its `testa_r` says."""
    notes = merge_schedule_notes(config)
    if notes and is_main_process():
        print(f"warning: testa_r: {'; '.join(notes)}", file=sys.stderr, flush=True)
