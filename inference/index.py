"""A searchable index of a video folder, updated incrementally.

An index folder holds:

* `embeddings-<id>.npy`: float32 (N, embed_dim) L2-normalised ITC embeddings, row i for
  `files[i]` of the manifest. float32 because these are exactly the numbers the evaluation
  compares (fp16 would round them) and a CPU multiplies float32 fastest; at 1 KiB per video
  (embed_dim 256) they are small next to the videos.
* `tokens-<id>.npy` (with `--tokens`): fp16 (rows, N, D) video tokens for ITM re-ranking,
  read as a memory map so only the re-ranked rows are loaded. Rows past the manifest's
  files are unused (files that failed to decode in that run). For the 224 px 32-frame
  configs a video has 1,041 tokens of 768 values: 1.5 MiB per video in fp16. Without
  tokens, search re-encodes its re-ranked candidates from their files.
* `manifest.json`: the video folder, every file (relative path, size, mtime_ns), the
  unreadable ones with their reason, the config, the checkpoint (path, size, mtime_ns,
  sha256), and the config values that change an embedding (frames, sampling, image size,
  the video encoder's keys).

A rerun encodes new and changed (size or mtime) files only, drops deleted ones and copies
the other rows. The data files of a run get a new id and the manifest, written to a
temporary file and renamed over the old one, is the commit: an interrupted run leaves the
previous index valid (its stray files are removed by the next run).
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from configs.keys import value
from training.errors import UserError
from utils import ProgressLine

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov")
# The config values an embedding depends on besides the checkpoint's weights.
EMBEDDING_KEYS = ("vit", "image_size", "patch_size", "vision_width", "num_heads", "depth", "num_frames",
                  "attention_type", "learnable_temporal_scaling", "token_merging", "merging_type", "testa_r",
                  "prop_attn", "embed_dim", "num_frm_test", "frm_sampling_strategy_test")
PROGRESS_EVERY_S = 5.0
COPY_ROWS = 256  # rows of an earlier index copied at a time


def scan_videos(folder: Path) -> dict[str, dict]:
    """{relative path: {"size", "mtime_ns"}} of every video below `folder` (by suffix, any case)."""
    if not folder.is_dir():
        raise UserError(f"not a folder: {folder}")
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
            stat = path.stat()
            found[path.relative_to(folder).as_posix()] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return found


def checkpoint_record(path: Path, known: dict | None = None) -> dict:
    """Path, size, mtime_ns and sha256 of a checkpoint; the hash is reused from `known` when the
    file is unchanged (hashing a 2 GB checkpoint takes seconds)."""
    path = path.resolve()
    stat = path.stat()
    record = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if known and all(known.get(key) == record[key] for key in record):
        return dict(known)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return {**record, "sha256": digest.hexdigest()}


def fingerprint(model, known: dict | None = None) -> dict:
    """What an index must share with the model that searches it."""
    return {"checkpoint": checkpoint_record(model.checkpoint, known),
            "embedding_config": {key: value(model.config, key) for key in EMBEDDING_KEYS}}


def difference(index_folder, stored: dict, current: dict) -> str | None:
    """One line saying how a model differs from the one an index was made with, or None."""
    if stored["checkpoint"]["sha256"] != current["checkpoint"]["sha256"]:
        return (f"index {index_folder} was made with another checkpoint: {stored['checkpoint']['path']} "
                f"(sha256 {stored['checkpoint']['sha256'][:12]}), not {current['checkpoint']['path']} "
                f"(sha256 {current['checkpoint']['sha256'][:12]}); use another --index folder")
    changed = [f"{key} {stored['embedding_config'].get(key)!r} (index) vs {current['embedding_config'][key]!r}"
               for key in EMBEDDING_KEYS if stored["embedding_config"].get(key) != current["embedding_config"][key]]
    if changed:
        return f"index {index_folder} was made with other settings: {', '.join(changed)}; use another --index folder"
    return None


class VideoIndex:
    """An index folder opened for search: `paths`, `embeddings` and, if stored, tokens."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = folder, manifest
        self.root = Path(manifest["root"])
        self.files = manifest["files"]
        self.paths = [str(self.root / entry["path"]) for entry in self.files]
        self.embeddings = np.load(folder / manifest["embeddings"])
        self.tokens = np.load(folder / manifest["tokens"], mmap_mode="r") if manifest.get("tokens") else None

    @classmethod
    def open(cls, folder) -> VideoIndex:
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except FileNotFoundError:
            raise UserError(f"no index in {folder} (it has no {MANIFEST}); make one with video_tool.py index") from None
        except json.JSONDecodeError as error:
            raise UserError(f"{folder / MANIFEST} is not valid JSON: {error}") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise UserError(f"{folder} holds an index of format {manifest.get('format')}, not {FORMAT_VERSION}")
        return cls(folder, manifest)

    def check_model(self, model) -> None:
        problem = difference(self.folder, self.manifest, fingerprint(model, self.manifest["checkpoint"]))
        if problem:
            raise UserError(problem)

    def tokens_of(self, rows: list[int]) -> torch.Tensor | None:
        """The stored fp16 tokens of `rows` (only they are read from disk), or None without tokens."""
        return None if self.tokens is None else torch.from_numpy(np.ascontiguousarray(self.tokens[rows]))


@dataclass
class UpdateSummary:
    kept: int
    added: int
    dropped: int
    failed: dict  # relative path -> reason, this run's new failures
    unreadable: int  # every unreadable file listed in the manifest


class IndexWriter:
    """The data files of one new index generation, committed by writing the manifest."""

    def __init__(self, folder: Path, capacity: int):
        self.folder, self.capacity = folder, capacity
        self.id = uuid.uuid4().hex[:12]
        self.embeddings, self.files, self.tokens = [], [], None

    def add(self, files: list[dict], embeddings: np.ndarray, tokens=None) -> None:
        if tokens is not None:
            if self.tokens is None:
                self.tokens = np.lib.format.open_memmap(self._temporary(f"tokens-{self.id}.npy"), mode="w+",
                                                        dtype=np.float16, shape=(self.capacity, *tokens.shape[1:]))
            self.tokens[len(self.files):len(self.files) + len(files)] = tokens
        self.files += files
        self.embeddings.append(np.asarray(embeddings, dtype=np.float32))

    def _temporary(self, name: str) -> Path:
        return self.folder / f".{name}.tmp"

    def _finish(self, name: str) -> str:
        os.replace(self._temporary(name), self.folder / name)
        return name

    def commit(self, manifest: dict) -> None:
        embeddings_name = f"embeddings-{self.id}.npy"
        with open(self._temporary(embeddings_name), "wb") as handle:  # a path would get ".npy" appended
            np.save(handle, np.concatenate(self.embeddings), allow_pickle=False)
            _sync(handle)
        manifest["embeddings"] = self._finish(embeddings_name)
        manifest["tokens"] = None
        if self.tokens is not None:
            self.tokens.flush()
            self.tokens = None
            manifest["tokens"] = self._finish(f"tokens-{self.id}.npy")
        manifest["files"] = self.files
        with open(self.folder / f".{MANIFEST}.tmp", "w") as handle:
            handle.write(json.dumps(manifest, indent=1))
            _sync(handle)
        os.replace(self.folder / f".{MANIFEST}.tmp", self.folder / MANIFEST)
        self._remove_stale(manifest)

    def _remove_stale(self, manifest: dict) -> None:
        """Data files of earlier generations and leftovers of interrupted runs."""
        current = {manifest["embeddings"], manifest["tokens"], MANIFEST}
        for path in self.folder.iterdir():
            if path.name not in current and path.name.lstrip(".").startswith(("embeddings-", "tokens-", MANIFEST)):
                path.unlink(missing_ok=True)


def _sync(handle) -> None:
    """On disk before the manifest names it: a crash must not commit a manifest whose data is lost."""
    handle.flush()
    os.fsync(handle.fileno())


def _previous(index_folder: Path, video_folder: Path, current: dict, with_tokens: bool) -> VideoIndex | None:
    """The index already in `index_folder`, checked to fit this run; None when there is none."""
    if not (index_folder / MANIFEST).is_file():
        return None
    previous = VideoIndex.open(index_folder)
    problem = difference(index_folder, previous.manifest, current)
    if problem is None and Path(previous.manifest["root"]) != video_folder:
        problem = f"index {index_folder} covers {previous.manifest['root']}, not {video_folder}"
    if problem is None and previous.manifest["with_tokens"] != with_tokens:
        state = "with" if previous.manifest["with_tokens"] else "without"
        problem = f"index {index_folder} was made {state} --tokens; use another --index folder"
    if problem:
        raise UserError(problem)
    return previous


def update_index(model, video_folder, index_folder, batch_size: int | None = None, num_workers: int | None = None,
                 with_tokens: bool = False) -> UpdateSummary:
    """Make or update the index of `video_folder` in `index_folder` (see the module docstring)."""
    video_folder, index_folder = Path(video_folder).resolve(), Path(index_folder)
    index_folder.mkdir(parents=True, exist_ok=True)
    known = json.loads((index_folder / MANIFEST).read_text())["checkpoint"] if (index_folder / MANIFEST).is_file() \
        else None
    current = fingerprint(model, known)
    previous = _previous(index_folder, video_folder, current, with_tokens)
    found = scan_videos(video_folder)
    old_rows = {entry["path"]: row for row, entry in enumerate(previous.files)} if previous else {}
    old_unreadable = {entry["path"]: entry for entry in previous.manifest["unreadable"]} if previous else {}

    def unchanged(entry):
        stat = found.get(entry["path"])
        return stat is not None and stat == {"size": entry["size"], "mtime_ns": entry["mtime_ns"]}

    kept = [row for path, row in old_rows.items() if unchanged(previous.files[row])]
    unreadable = [entry for entry in old_unreadable.values() if unchanged(entry)]
    done = {previous.files[row]["path"] for row in kept} | {entry["path"] for entry in unreadable}
    to_encode = [path for path in found if path not in done]
    writer = IndexWriter(index_folder, len(kept) + len(to_encode))
    for start in range(0, len(kept), COPY_ROWS):  # in chunks: the tokens of all rows may not fit in memory
        rows = kept[start:start + COPY_ROWS]
        writer.add([previous.files[row] for row in rows], previous.embeddings[rows],
                   previous.tokens[rows] if with_tokens else None)
    failed = _encode_new(model, writer, video_folder, to_encode, found, batch_size, num_workers, with_tokens)
    unreadable += [{"path": path, **found[path], "reason": reason} for path, reason in failed.items()]
    manifest = {"format": FORMAT_VERSION, "root": str(video_folder), **current, "config": model.config,
                "with_tokens": with_tokens,
                "precision": str(model.dtype or "fp32").replace("torch.", ""),
                "num_frames": value(model.config, "num_frm_test"),
                "sampling": value(model.config, "frm_sampling_strategy_test"),
                "unreadable": sorted(unreadable, key=lambda entry: entry["path"])}
    if not kept and not writer.files:  # nothing readable: an empty but valid index
        writer.add([], np.zeros((0, value(model.config, "embed_dim")), np.float32))
    writer.commit(manifest)
    dropped = sum(path not in found for path in [*old_rows, *old_unreadable])
    return UpdateSummary(len(kept), len(writer.files) - len(kept), dropped, failed, len(unreadable))


def _encode_new(model, writer: IndexWriter, video_folder: Path, to_encode: list[str], found: dict,
                batch_size, num_workers, with_tokens: bool) -> dict[str, str]:
    """Encode `to_encode` into `writer`, printing progress; {relative path: reason} of the failures."""
    progress, failed, done = ProgressLine("index:", len(to_encode), "videos", PROGRESS_EVERY_S), {}, 0
    paths = [video_folder / path for path in to_encode]
    for batch in model.iter_encoded(paths, batch_size, return_tokens=with_tokens, num_workers=num_workers):
        files = [{"path": to_encode[i], **found[to_encode[i]]} for i in batch.indices]
        if files:
            writer.add(files, batch.embeddings.numpy(), batch.tokens.half().numpy() if with_tokens else None)
        failed.update({to_encode[i]: reason for i, reason in batch.failed.items()})
        done += len(batch.indices) + len(batch.failed)
        progress.update(done)
    return failed
