"""Indexing in parts, on one process or many: `video_tool.py index ...`, or under
`python -m torch.distributed.run --nproc_per_node=N video_tool.py index ...`.

Rank 0 (the only one without torchrun) does what inference/index.py's update_index does (the
lock, the previous index, the kept rows, the commit); only the encoding of the new files is
shared. Those files are cut into parts of whole batches, in the single-process order, so every
batch is one a single process would form and the numbers are the same bit for bit, whatever a
clip's output owes to the other clips of its batch. The parts still to encode go to the processes in contiguous runs; each
process writes a part as a file of its own (written to a temporary name, then renamed) into
the index folder's PARTS_FOLDER, named by a hash of its files and of what their numbers depend
on. Rank 0 then adds the parts in order to the new generation and commits one manifest, as a
single process does, so readers never see a half index.

Windows of long files (`--window`, inference/windows.py) are shared the same way: their
batches never hold two files, so a part of whole files gives the rows a single process gives,
and a part holds few files (a long file is much work).

An interrupted or failed run leaves its finished parts behind: the same command again encodes
only the others (a part is used only when its files, model and settings are the same), and the
commit removes the folder. The index folder must be one every process sees (a shared file
system when the processes run on several machines).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from configs.keys import value
from inference.api import DEFAULT_BATCH_SIZE
from inference.index import EMBEDDING_KEYS, PROGRESS_EVERY_S, UpdateSummary, encoded_batches, update_index
from inference.index_files import PARTS_FOLDER, sync_to_disk
from inference.windows import Windowing
from runtime.distributed import (broadcast_from_main, choose_device, gather_objects, get_rank, get_world_size,
                                 init_distributed, slurm_environment)
from runtime.errors import Interrupted, UserError, user_message
from runtime.fault_injection import index_stop_part, interrupt_batch, interrupt_with_workers, stop_index_rank
from runtime.progress import ProgressLine
from runtime.sharding import shard_indices

# The ranks wait for each other while rank 0 copies the kept rows and while the last ranks
# encode: hours for a large folder, far past the 30 minutes after which a training run gives up.
WAIT = timedelta(hours=24)
PART_VIDEOS_MOST = 256  # videos in a part, at most (rounded to whole batches): the work an interruption loses
PARTS_LEAST = 64  # a folder is cut into at least this many parts where it has the batches, for every rank to share
WINDOWED_PART_FILES_MOST = 8  # files in a part of an index with windows, at most: a long file is hours of windows


def launched_on_processes() -> bool:
    """Whether torchrun (or a multi-task srun step) started this process as one of a group."""
    return ("RANK" in os.environ and "WORLD_SIZE" in os.environ) or bool(slurm_environment(os.environ))


def join_processes(device: str | None) -> torch.device:
    """Join the group of processes torchrun started; the device this process computes on (its
    local rank's GPU on CUDA machines)."""
    return init_distributed(choose_device(device).type, timeout_minutes=WAIT.total_seconds() / 60)


def part_files(num_files: int, batch_size: int, windowed: bool = False) -> int:
    """Files per part: whole batches, at most about PART_VIDEOS_MOST videos, at least PARTS_LEAST
    parts; with windows (whose batches hold one file each) up to WINDOWED_PART_FILES_MOST files."""
    if windowed:
        return max(1, min(num_files // PARTS_LEAST, WINDOWED_PART_FILES_MOST))
    batches = -(-num_files // batch_size)
    return batch_size * max(1, min(batches // PARTS_LEAST, PART_VIDEOS_MOST // batch_size))


@dataclass
class EncodingPlan:
    """What rank 0 tells every rank to encode: the same list of parts for all."""

    video_folder: str
    files: list  # {"path", "size", "mtime_ns"} of the files to encode, in the single-process order
    batch_size: int
    with_tokens: bool
    files_per_part: int
    run_key: str  # what the numbers of a part depend on besides its files
    missing: list  # the numbers of the parts no earlier run left
    windows: dict | None = None  # Windowing.as_dict() of an index of windows of long files

    @property
    def windowing(self) -> Windowing | None:
        return Windowing(**self.windows) if self.windows else None

    def part(self, number: int) -> list:
        return self.files[number * self.files_per_part:(number + 1) * self.files_per_part]

    @property
    def num_parts(self) -> int:
        return -(-len(self.files) // self.files_per_part)

    def part_name(self, number: int) -> str:
        content = json.dumps([self.run_key, self.part(number)], sort_keys=True)
        return f"part-{hashlib.sha256(content.encode()).hexdigest()[:24]}.npz"


def run_key(model, video_folder: Path, batch_size: int, with_tokens: bool, windows: dict | None = None) -> str:
    """A hash of what the numbers of a part depend on besides its files: the checkpoint file (as
    the manifest checks it, without hashing gigabytes), the settings, the precision, the batches."""
    stat = Path(model.checkpoint).resolve().stat()
    settings = {"root": str(video_folder), "checkpoint": [str(Path(model.checkpoint).resolve()), stat.st_size,
                                                          stat.st_mtime_ns],
                "config": {key: value(model.config, key) for key in EMBEDDING_KEYS},
                "precision": model.precision.label, "batch_size": batch_size, "with_tokens": with_tokens,
                "windows": windows}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class _Part:
    """The rows of one part as its batches come, saved as one file."""

    def __init__(self):
        self.files, self.embeddings, self.tokens, self.failed = [], [], [], {}

    def add(self, batch, entries: list) -> None:
        self.files += [{**entries[i], **span} for i, span in zip(batch.indices, batch.span_fields())]
        self.embeddings.append(batch.embeddings.numpy())
        if batch.tokens is not None:
            self.tokens.append(batch.tokens.half().numpy())
        self.failed.update({entries[i]["path"]: reason for i, reason in batch.failed.items()})

    def save(self, path: Path) -> None:
        """Written to a name of this rank, on disk, then renamed: a part file is whole or absent."""
        record = json.dumps({"files": self.files, "failed": self.failed}).encode()
        arrays = {"embeddings": np.concatenate(self.embeddings), "record": np.frombuffer(record, np.uint8)}
        if self.tokens:
            arrays["tokens"] = np.concatenate(self.tokens)
        temporary = path.with_name(f".{path.name}.{get_rank()}.tmp")
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
            sync_to_disk(handle)
        os.replace(temporary, path)


def _encode_parts(model, plan: EncodingPlan, numbers: list[int], parts_folder: Path, num_workers) -> None:
    """Encode the parts `numbers` (ascending) in one pass of the decoding workers, a file per part."""
    entries = [entry for number in numbers for entry in plan.part(number)]
    paths = [Path(plan.video_folder) / entry["path"] for entry in entries]
    ends = np.cumsum([len(plan.part(number)) for number in numbers]).tolist()
    progress, part, done, saved = ProgressLine("index:", len(entries), "videos", PROGRESS_EVERY_S), _Part(), 0, 0
    stop_after, interrupt_after = index_stop_part(), interrupt_batch()  # testing aids (runtime/fault_injection.py)
    batches = encoded_batches(model, paths, plan.batch_size, plan.with_tokens, num_workers, plan.windowing)
    for batch_number, batch in enumerate(batches, start=1):
        rest = batch
        while saved < len(ends) and (rest.indices or rest.failed):  # a batch of windows may end several parts
            head, rest = rest.split_at(ends[saved])
            part.add(head, entries)
            done += head.num_files
            if done == ends[saved]:
                part.save(parts_folder / plan.part_name(numbers[saved]))
                part, saved = _Part(), saved + 1
                if saved == stop_after:
                    stop_index_rank(saved)
        progress.update(done)
        if batch_number == interrupt_after:
            interrupt_with_workers()


def _encode_share(model, plan: EncodingPlan, parts_folder: Path, num_workers) -> str | None:
    """Encode this rank's share of the missing parts; the one-line reason where that failed (a
    full disk), so that rank 0 reports it, or None."""
    share = [plan.missing[i] for i in shard_indices(len(plan.missing), get_world_size(), get_rank())]
    try:
        _encode_parts(model, plan, share, parts_folder, num_workers)
    except Exception as error:
        message = user_message(error)
        if message is None:  # a bug: its traceback
            raise
        return message
    return None


def _assemble(plan: EncodingPlan, parts_folder: Path, writer) -> dict[str, str]:
    """Every part's rows into `writer`, in the single-process order; {relative path: reason} of the failures."""
    failed = {}
    for number in range(plan.num_parts):
        with np.load(parts_folder / plan.part_name(number), allow_pickle=False) as part:
            record = json.loads(part["record"].tobytes())
            if record["files"]:
                writer.add(record["files"], part["embeddings"], part["tokens"] if plan.with_tokens else None)
            failed.update(record["failed"])
    return failed


class _Leader:
    """Rank 0's side: the encoding step of update_index shared with the other ranks, and what
    they are told at each step where they wait for rank 0."""

    def __init__(self, index_folder: Path):
        self.index_folder, self.parts_folder = index_folder, index_folder / PARTS_FOLDER
        self.followers_wait = True  # for the plan, or for the outcome once the parts are gathered

    def encode(self, model, writer, video_folder: Path, to_encode: list[str], found: dict, batch_size, num_workers,
               with_tokens: bool, windowing: Windowing | None = None) -> dict[str, str]:
        """update_index's encoding step (inference.index._encode_new's arguments and result)."""
        batch_size = batch_size or DEFAULT_BATCH_SIZE
        files = [{"path": path, **found[path]} for path in to_encode]
        windows = windowing.as_dict() if windowing else None
        plan = EncodingPlan(str(video_folder), files, batch_size, with_tokens,
                            part_files(len(files), batch_size, windowed=windows is not None),
                            run_key(model, video_folder, batch_size, with_tokens, windows), [], windows)
        self.parts_folder.mkdir(exist_ok=True)
        plan.missing = [number for number in range(plan.num_parts)
                        if not (self.parts_folder / plan.part_name(number)).exists()]
        _say_resumed(plan)
        broadcast_from_main(plan)
        self.followers_wait = False
        problems = gather_objects(_encode_share(model, plan, self.parts_folder, num_workers))
        self.followers_wait = True
        for rank, problem in enumerate(problems):
            if problem:
                raise UserError(f"index {self.index_folder} not updated (the parts encoded are kept: the same "
                                f"command resumes): rank {rank}: {problem}")
        return _assemble(plan, self.parts_folder, writer)

    def tell_followers(self, outcome) -> None:
        """The plan's or the commit's outcome to the ranks waiting for it: an UpdateSummary, or why rank 0 stopped."""
        if self.followers_wait:
            with suppress(RuntimeError):  # they may be gone already (Ctrl-C reaches every process)
                broadcast_from_main(outcome)
            self.followers_wait = False

    def interrupted(self, interrupt: Interrupted) -> Interrupted:
        """Ctrl-C's line, saying what a rerun keeps."""
        if any(self.parts_folder.glob("part-*.npz")):
            return Interrupted(f"{interrupt}; the videos encoded so far are kept in {self.parts_folder}: the same "
                               "command resumes")
        self.remove_empty_parts_folder()
        return interrupt

    def remove_empty_parts_folder(self) -> None:
        """A run stopped before its first part leaves no folder behind."""
        with suppress(OSError):  # absent, or holding parts (or another process's temporary files)
            self.parts_folder.rmdir()


def _say_resumed(plan: EncodingPlan) -> None:
    missing = set(plan.missing)
    kept = sum(len(plan.part(number)) for number in range(plan.num_parts) if number not in missing)
    if kept:
        print(f"index: resuming: {kept} of {len(plan.files)} videos were encoded by an interrupted run; "
              f"encoding the other {len(plan.files) - kept}", file=sys.stderr, flush=True)


def update_index_on_processes(model, video_folder, index_folder, batch_size: int | None = None,
                              num_workers: int | None = None, with_tokens: bool = False,
                              embedding_dtype: str | None = None, window: float | None = None,
                              stride: float | None = None) -> UpdateSummary:
    """inference.index.update_index with the encoding shared by every process of the group
    (join_processes); every rank returns the same summary."""
    index_folder = Path(index_folder)
    if get_rank() != 0:
        return _follow(model, index_folder, num_workers)
    leader = _Leader(index_folder)
    try:
        summary = update_index(model, video_folder, index_folder, batch_size, num_workers, with_tokens,
                               embedding_dtype, encode=leader.encode, window=window, stride=stride)
    except Interrupted as interrupt:
        leader.tell_followers(str(interrupt))
        raise leader.interrupted(interrupt) from None
    except Exception as error:
        leader.tell_followers(user_message(error) or f"rank 0 failed: {type(error).__name__}")
        leader.remove_empty_parts_folder()
        raise
    leader.tell_followers(summary)
    return summary


def _follow(model, index_folder: Path, num_workers) -> UpdateSummary:
    """A rank other than 0: encode the share of the plan rank 0 sends, then learn how the commit went."""
    plan = broadcast_from_main()
    if isinstance(plan, EncodingPlan):
        gather_objects(_encode_share(model, plan, index_folder / PARTS_FOLDER, num_workers))
        outcome = broadcast_from_main()
    else:
        outcome = plan  # rank 0 stopped before the encoding (a mismatched index, the folder in use)
    if not isinstance(outcome, UpdateSummary):
        raise UserError(outcome)  # rank 0 reports it; this rank stays quiet (runtime.errors.run_cli)
    return outcome
