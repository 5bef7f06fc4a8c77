"""A searchable index of a video folder, updated incrementally.

An index folder holds:

* `embeddings-<id>.npy`: float32 (N, embed_dim) L2-normalised ITC embeddings, row i for
  `files[i]` of the manifest. float32 because these are exactly the numbers the evaluation
  compares (fp16 would round them); at 1 KiB per video (embed_dim 256) they are small next to
  the videos. `index --embedding_dtype float16` stores them as float16 instead, recorded in the
  manifest as `embedding_dtype` (an index without it is float32): half the disk, memory and
  search time at millions of videos (benchmarks/RESULTS.md), ITC scores rounded by up to about
  1e-3. Search reads them as a memory map, in chunks (inference/search.py).
* `tokens-<id>.npy` (with `--tokens`): fp16 (rows, N, D) video tokens for ITM re-ranking,
  read as a memory map so only the re-ranked rows are loaded, row i for `files[i]` (a
  window's row with `--window`). For the 224 px 32-frame
  configs a video has 1,041 tokens of 768 values: 1.5 MiB per video in fp16. Without
  tokens, search re-encodes its re-ranked candidates from their files.
* `manifest.json`: the video folder, every file (relative path, size, mtime_ns), the
  unreadable ones with their reason, the config, the checkpoint (path, size, mtime_ns,
  sha256), and the config values that change an embedding (frames, sampling, image size,
  the video encoder's keys). An index made with `--window` (inference/windows.py) records its
  `windows` (window and stride seconds) and has a row per window of a long file: that file's
  entries add the window's `start` and `end` seconds, and a changed file's are all replaced.
* `.lock` while a run updates it: one run per index folder (runtime/run_lock.py, as for
  the output folders of training), a second one stops with one line naming the first.

A rerun encodes new and changed (size or mtime) files only, drops deleted ones and copies
the other rows. The data files of a run get names of their own (a new id) and the manifest,
written to a temporary file of that run and renamed over the old one, is the commit: a run
that fails (a full disk) or is interrupted leaves the previous index valid and removes what
it wrote; a killed run's files are removed by the next run. Data files are written front to
back with a row per file allocated first, never through a memory map: a full disk is one
error line, not a SIGBUS, and for the tokens it shows before the first video is encoded (with
windows, a long file's further rows may still find the disk full later: one line too).
"""
from __future__ import annotations

import json
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from configs.keys import CONFIG_KEYS, ENCODER_KEYS, value
from inference.index_files import MANIFEST, IndexWriter
from runtime.errors import Interrupted, UserError, user_message
from runtime.fault_injection import interrupt_batch, interrupt_with_workers
from runtime.precision import LABEL_NAMES
from runtime.progress import ProgressLine
from runtime.run_lock import acquire_run_lock, release_run_lock
from utils import file_sha256

FORMAT_VERSION = 1
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg")
# The config values an embedding depends on besides the checkpoint's weights.
# What a video's tokens depend on besides the video encoder's weights (inference/stored.py), and
# what its embedding depends on besides the checkpoint's weights.
TOKEN_KEYS = ENCODER_KEYS + ("num_frm_test", "frm_sampling_strategy_test")
EMBEDDING_KEYS = TOKEN_KEYS + ("embed_dim",)
EMBEDDING_DTYPES = ("float32", "float16")  # how an index may store its embeddings (manifest "embedding_dtype")
# What a manifest must hold: a damaged or hand-edited one is one line naming the entry, not a KeyError.
MANIFEST_FIELDS = {"format": int, "root": str, "files": list, "unreadable": list, "checkpoint": dict,
                   "embedding_config": dict, "config": dict, "with_tokens": bool, "embeddings": str,
                   "tokens": (str, type(None))}
FILE_FIELDS = {"path": str, "size": int, "mtime_ns": int}
UNREADABLE_FIELDS = {**FILE_FIELDS, "reason": str}
CHECKPOINT_FIELDS = {"path": str, "size": int, "mtime_ns": int, "sha256": str}
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
    return {**record, "sha256": file_sha256(path)}


def fingerprint(model, known: dict | None = None) -> dict:
    """What an index must share with the model that searches it."""
    return {"checkpoint": checkpoint_record(model.checkpoint, known),
            "embedding_config": {key: value(model.config, key) for key in EMBEDDING_KEYS}}


def recorded(settings: dict, key: str):
    """A setting an index recorded; one made before the key existed was made with its default."""
    return settings[key] if key in settings else CONFIG_KEYS[key].default


def difference(index_folder, stored: dict, current: dict) -> str | None:
    """One line saying how a model differs from the one an index was made with, or None."""
    if stored["checkpoint"]["sha256"] != current["checkpoint"]["sha256"]:
        return (f"index {index_folder} was made with another checkpoint: {stored['checkpoint']['path']} "
                f"(sha256 {stored['checkpoint']['sha256'][:12]}), not {current['checkpoint']['path']} "
                f"(sha256 {current['checkpoint']['sha256'][:12]}); use another --index folder")
    was, now = stored["embedding_config"], current["embedding_config"]
    changed = [f"{key} {recorded(was, key)!r} (index) vs {now[key]!r}"
               for key in EMBEDDING_KEYS if recorded(was, key) != now[key]]
    if changed:
        return f"index {index_folder} was made with other settings: {', '.join(changed)}; use another --index folder"
    return None


def damaged(folder: Path, name: str, problem: str) -> UserError:
    """The error for an index whose file `name` is unusable: what is wrong and what to do."""
    return UserError(f"index {folder} is damaged: its {name} {problem}; delete the folder and run "
                     "video_tool.py index again (with --config and --checkpoint)")


def _misfit(record, fields: dict) -> str | None:
    """What in `record` is missing or of another type than `fields` says, in words; None if nothing."""
    if not isinstance(record, dict):
        return f"is {type(record).__name__}, not an object"
    for key, kind in fields.items():
        if key not in record:
            return f"has no {key!r}"
        if not isinstance(record[key], kind):
            return f"has a {type(record[key]).__name__} as {key!r}"
    return None


def _manifest_problem(manifest) -> str | None:
    """What makes a parsed manifest unusable, in words; None for a usable one."""
    problem = _misfit(manifest, MANIFEST_FIELDS)
    if problem:
        return problem
    problem = _misfit(manifest["checkpoint"], CHECKPOINT_FIELDS)
    if problem:
        return f"'checkpoint' {problem}"
    for key, fields in (("files", FILE_FIELDS), ("unreadable", UNREADABLE_FIELDS)):
        for number, entry in enumerate(manifest[key]):
            problem = _misfit(entry, fields)
            if problem:
                return f"entry {number} of {key!r} {problem}"
    for key in ("embeddings", "tokens"):
        name = manifest[key]
        if name is not None and Path(name).name != name:
            return f"{key!r} ({name}) is not a file name"
    if manifest.get("embedding_dtype", "float32") not in EMBEDDING_DTYPES:
        return f"'embedding_dtype' is {manifest['embedding_dtype']!r}, not one of {', '.join(EMBEDDING_DTYPES)}"
    return None


def read_manifest(folder) -> dict | None:
    """The manifest of the index in `folder`, checked; None when there is none. A damaged one is
    a UserError naming the file, what is wrong and what to do."""
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as error:  # not JSON, or not UTF-8
        raise damaged(folder, MANIFEST, f"is not valid JSON ({error})") from None
    if isinstance(manifest, dict) and isinstance(manifest.get("format"), int) and manifest["format"] != FORMAT_VERSION:
        raise UserError(f"{folder} holds an index of format {manifest['format']}, not {FORMAT_VERSION}; index the "
                        "videos again into another --index folder")
    problem = _manifest_problem(manifest)
    if problem:
        raise damaged(folder, MANIFEST, problem)
    return manifest


def _load_rows(folder: Path, name: str, mmap: bool) -> np.ndarray:
    try:
        return np.load(folder / name, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise damaged(folder, name, f"is missing (named by {MANIFEST})") from None
    except (ValueError, EOFError) as error:  # truncated, or no .npy file
        raise damaged(folder, name, f"is unreadable ({error})") from None


class VideoIndex:
    """An index folder opened for search: `paths`, `embeddings` and, if stored, tokens."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = folder, manifest
        self.root = Path(manifest["root"])
        self.files = manifest["files"]
        self.paths = [str(self.root / entry["path"]) for entry in self.files]
        self.windowed = manifest.get("windows") is not None  # rows are moments of files (inference/windows.py)
        # A memory map: search reads it in chunks (inference/search.py), an update copies the kept rows.
        self.embeddings = _load_rows(folder, manifest["embeddings"], mmap=True)
        self.embedding_dtype = manifest.get("embedding_dtype", "float32")
        expected = (len(self.files), manifest["embedding_config"].get("embed_dim"))
        if self.embeddings.shape != expected:
            raise damaged(folder, manifest["embeddings"], f"holds {self.embeddings.shape} values, the manifest "
                                                          f"needs {expected}")
        if self.embeddings.dtype != np.dtype(self.embedding_dtype):
            raise damaged(folder, manifest["embeddings"], f"holds {self.embeddings.dtype} values, the manifest "
                                                          f"says {self.embedding_dtype}")
        self.tokens = _load_rows(folder, manifest["tokens"], mmap=True) if manifest["tokens"] else None
        if self.tokens is not None and (self.tokens.ndim != 3 or len(self.tokens) < len(self.files)):
            raise damaged(folder, manifest["tokens"], f"holds {self.tokens.shape} values, the manifest needs "
                                                      f"{len(self.files)} rows of tokens")

    @classmethod
    def open(cls, folder) -> VideoIndex:
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise UserError(f"no index in {folder} (it has no {MANIFEST}); make one with video_tool.py index")
        return cls(folder, manifest)

    def check_model(self, model) -> None:
        problem = difference(self.folder, self.manifest, fingerprint(model, self.manifest["checkpoint"]))
        if problem:
            raise UserError(problem)

    def span_of(self, row: int) -> tuple[float | None, float | None]:
        """(start, end) seconds of a row that is a window of its file; (None, None) for a whole file."""
        entry = self.files[row]
        return entry.get("start"), entry.get("end")

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
    windows: int | None = None  # rows of an index with windows (inference/windows.py), None without


def _check_fits(previous: VideoIndex | None, video_folder: Path, current: dict, with_tokens: bool,
                precision: str) -> None:
    """That the index already in the folder (if any) can be updated by this run, encoding at
    `precision` (Precision.label): its rows share one precision (an index that does not record its
    own takes any)."""
    if previous is None:
        return
    problem = difference(previous.folder, previous.manifest, current)
    if problem is None and Path(previous.manifest["root"]) != video_folder:
        problem = f"index {previous.folder} covers {previous.manifest['root']}, not {video_folder}"
    if problem is None and previous.manifest["with_tokens"] != with_tokens:
        state = "with" if previous.manifest["with_tokens"] else "without"
        problem = f"index {previous.folder} was made {state} --tokens; use another --index folder"
    stored = previous.manifest.get("precision")
    if problem is None and stored is not None and stored != precision:
        problem = (f"index {previous.folder} was encoded at {stored}, this run encodes at {precision}: the rows of "
                   f"an index share one precision; pass --precision {LABEL_NAMES.get(stored, stored)} (or auto), "
                   "or use another --index folder")
    if problem:
        raise UserError(problem)


def update_index(model, video_folder, index_folder, batch_size: int | None = None, num_workers: int | None = None,
                 with_tokens: bool = False, embedding_dtype: str | None = None, encode=None,
                 window: float | None = None, stride: float | None = None) -> UpdateSummary:
    """Make or update the index of `video_folder` in `index_folder` (see the module docstring);
    `embedding_dtype` (EMBEDDING_DTYPES): None keeps an existing index's, float32 for a new one;
    `encode`: what encodes the new files (_encode_new's arguments and result), None for _encode_new;
    `window`, `stride`: seconds of the windows long files are indexed as (inference.windows.choose_windowing)."""
    video_folder, index_folder = Path(video_folder).resolve(), Path(index_folder)
    index_folder.mkdir(parents=True, exist_ok=True)
    lock = acquire_run_lock(index_folder, what="index folder", flag="--index")
    before = _manifest_version(index_folder)
    try:
        return _update_locked(model, video_folder, index_folder, batch_size, num_workers, with_tokens,
                              embedding_dtype, encode, (window, stride))
    except KeyboardInterrupt:  # Ctrl-C: one line saying what the folder holds now
        raise _interrupted(index_folder, before) from None
    finally:
        release_run_lock(lock)


def _manifest_version(folder: Path):
    """Which manifest the folder holds (committing replaces the file: a new inode), None for none."""
    with suppress(FileNotFoundError):
        stat = (folder / MANIFEST).stat()
        return stat.st_ino, stat.st_mtime_ns, stat.st_size
    return None


def _interrupted(index_folder: Path, before) -> Interrupted:
    if _manifest_version(index_folder) != before:  # interrupted after its commit: the update is in place
        return Interrupted(f"interrupted after index {index_folder} was updated (the update is complete)")
    state = "the previous index is unchanged and searchable" if before else "no index was written"
    return Interrupted(f"interrupted: index {index_folder} not updated ({state}); nothing of this run was committed")


def _embedding_dtype(previous: VideoIndex | None, requested: str | None) -> str:
    """How this run stores the embeddings: as the index does (float32 for a new one, unless asked)."""
    if requested is not None and requested not in EMBEDDING_DTYPES:
        raise UserError(f"embedding dtype {requested!r}: expected one of {', '.join(EMBEDDING_DTYPES)}")
    if previous is None:
        return requested or "float32"
    if requested is not None and requested != previous.embedding_dtype:
        raise UserError(f"index {previous.folder} stores {previous.embedding_dtype} embeddings, not {requested}; "
                        "leave out --embedding_dtype, or use another --index folder")
    return previous.embedding_dtype


def _update_locked(model, video_folder: Path, index_folder: Path, batch_size, num_workers,
                   with_tokens: bool, embedding_dtype: str | None = None, encode=None,
                   window_and_stride: tuple = (None, None)) -> UpdateSummary:
    from inference.windows import choose_windowing
    stored = read_manifest(index_folder)
    windowing = choose_windowing(stored, *window_and_stride)
    previous = VideoIndex(index_folder, stored) if stored else None
    current = fingerprint(model, stored["checkpoint"] if stored else None)
    _check_fits(previous, video_folder, current, with_tokens, model.precision.label)
    found = scan_videos(video_folder)
    old_rows = {}  # path -> its rows: a file indexed as windows has several
    for row, entry in enumerate(previous.files if previous else []):
        old_rows.setdefault(entry["path"], []).append(row)
    old_unreadable = {entry["path"]: entry for entry in previous.manifest["unreadable"]} if previous else {}

    def unchanged(entry):
        stat = found.get(entry["path"])
        return stat is not None and stat == {"size": entry["size"], "mtime_ns": entry["mtime_ns"]}

    kept = [row for rows in old_rows.values() for row in rows if unchanged(previous.files[row])]
    unreadable = [entry for entry in old_unreadable.values() if unchanged(entry)]
    done = {previous.files[row]["path"] for row in kept} | {entry["path"] for entry in unreadable}
    to_encode = [path for path in found if path not in done]
    embedding_dtype = _embedding_dtype(previous, embedding_dtype)
    writer = IndexWriter(index_folder, len(kept) + len(to_encode), embedding_dtype)
    try:
        with writer:
            for start in range(0, len(kept), COPY_ROWS):  # in chunks: the tokens of all rows may not fit in memory
                rows = kept[start:start + COPY_ROWS]
                writer.add([previous.files[row] for row in rows], previous.embeddings[rows],
                           previous.tokens[rows] if with_tokens else None)
            failed = (encode or _encode_new)(model, writer, video_folder, to_encode, found, batch_size, num_workers,
                                             with_tokens, windowing)
            unreadable += [{"path": path, **found[path], "reason": reason} for path, reason in failed.items()]
            manifest = {"format": FORMAT_VERSION, "root": str(video_folder), **current, "config": model.config,
                        "with_tokens": with_tokens, "embedding_dtype": embedding_dtype,
                        "precision": model.precision.label,
                        # ask and caption reuse the tokens where their video encoder is this one (inference/stored.py)
                        "video_encoder_sha256": model.encoder_sha256,
                        "num_frames": value(model.config, "num_frm_test"),
                        "sampling": value(model.config, "frm_sampling_strategy_test"),
                        "windows": windowing.as_dict() if windowing else None,
                        "unreadable": sorted(unreadable, key=lambda entry: entry["path"])}
            if not kept and not writer.files:  # nothing readable: an empty but valid index
                writer.add([], np.zeros((0, value(model.config, "embed_dim")), np.float32))
            writer.commit(manifest)
    except OSError as error:
        message = user_message(error)  # a full disk, a read-only folder: one line, not a bug
        if message is None or writer.committed:
            raise
        kept_state = "the previous index is unchanged" if previous else "no index was written"
        raise UserError(f"index {index_folder} not updated ({kept_state}): {message}") from error
    dropped = sum(path not in found for path in [*old_rows, *old_unreadable])
    kept_files = len({previous.files[row]["path"] for row in kept})
    return UpdateSummary(kept_files, len({entry["path"] for entry in writer.files}) - kept_files, dropped, failed,
                         len(unreadable), len(writer.files) if windowing else None)


def _encode_new(model, writer: IndexWriter, video_folder: Path, to_encode: list[str], found: dict,
                batch_size, num_workers, with_tokens: bool, windowing=None) -> dict[str, str]:
    """Encode `to_encode` into `writer`, printing progress; {relative path: reason} of the failures.
    `windowing` (inference.windows.Windowing): long files as windows, a row each."""
    progress, failed, done = ProgressLine("index:", len(to_encode), "videos", PROGRESS_EVERY_S), {}, 0
    paths = [video_folder / path for path in to_encode]
    interrupt_after = interrupt_batch()  # a testing aid (runtime/fault_injection.py); 0: never
    for number, batch in enumerate(encoded_batches(model, paths, batch_size, with_tokens, num_workers, windowing),
                                   start=1):
        files = [{"path": to_encode[i], **found[to_encode[i]], **span}
                 for i, span in zip(batch.indices, batch.span_fields())]
        if files:
            writer.add(files, batch.embeddings.numpy(), batch.tokens.half().numpy() if with_tokens else None)
        failed.update({to_encode[i]: reason for i, reason in batch.failed.items()})
        done += batch.num_files
        progress.update(done)
        if number == interrupt_after:
            interrupt_with_workers()
    return failed


def encoded_batches(model, paths: list, batch_size, with_tokens: bool, num_workers, windowing=None):
    """inference.api.EncodedBatch after EncodedBatch of `paths`, their files in order: one row per
    file, or with `windowing` one per window of it (a file's windows all in one batch)."""
    if windowing is None:
        return model.iter_encoded(paths, batch_size, return_tokens=with_tokens, num_workers=num_workers)
    from inference.windows import iter_encoded_windows
    return iter_encoded_windows(model, paths, windowing, batch_size, with_tokens, num_workers)
