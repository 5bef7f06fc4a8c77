"""Moments inside long videos: a file longer than a window is indexed as windows of it, and a
span of a file (`ask`/`caption`/`show --start --end`) is read as a clip of its own.

A window is encoded exactly as the evaluation encodes a clip of that span: `num_frm_test`
frames chosen by `frm_sampling_strategy_test` over the window's frames as if they were a whole
file (data.video.sample_frame_indices), decoded and resized by the reader the evaluation would
use (decord, resized in its decoder, else torchcodec or PyAV, resized after) and the evaluation
transform. A window of a file therefore equals, up to the decoder, the same span cut out as its
own file (tests/test_windows.py).

A file is opened once and decoded front to back for all its windows: every window's frame
indices are computed first, the union of them is decoded in ascending chunks, and each window's
clip is assembled as soon as its last frame is decoded; frames no later window needs are freed,
so memory holds a window's span, not the file.

Windows are spans in whole frames: `window` and `stride` seconds are rounded to frames, windows
start at 0, stride, 2 stride, ... and a last window ends at the file's end, so that every
window has the same length and the tail is covered. A file no longer than a window is one
window: the whole file, sampled exactly as a whole-file index samples it.
"""
from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

import data.video as video
from configs.keys import value
from data.datasets import ClipDataset, encoder_layout
from data.video import RESIZES_IN_DECODER, VideoReadError, reader_names, resize_frames, sample_frame_indices
from inference.api import DEFAULT_BATCH_SIZE, EncodedBatch, VideoLoader, decoding_worker_init
from runtime.errors import UserError

DECODE_CHUNK = 64  # frames decoded per reader call: few calls, and memory bounded for long files


@dataclass(frozen=True)
class Windowing:
    """How an index cuts long files: windows of `window` seconds every `stride` seconds."""
    window: float
    stride: float

    def as_dict(self) -> dict:
        return {"window": self.window, "stride": self.stride}


def choose_windowing(manifest: dict | None, window: float | None, stride: float | None) -> Windowing | None:
    """This run's windows: the flags, else those of the index in `manifest` (an update keeps an
    index's windows); None: one embedding per file. Other windows than an existing index's are
    refused: its rows would mix two cuts of the same files."""
    recorded = manifest.get("windows") if manifest else None
    if window is None and recorded is not None:
        window, stride = recorded["window"], recorded["stride"] if stride is None else stride
    if window is None:
        if stride is not None:
            raise UserError("--stride needs --window (the window length in seconds)")
        return None
    stride = window / 2 if stride is None else stride
    if stride > window:
        raise UserError(f"--stride {stride:g} is longer than --window {window:g}: the video between windows would "
                        "not be indexed")
    chosen = Windowing(float(window), float(stride))
    if manifest is not None and recorded != chosen.as_dict():
        had = f"windows of {recorded['window']:g} s every {recorded['stride']:g} s" if recorded else "no windows"
        raise UserError(f"index made with {had}, not windows of {chosen.window:g} s every {chosen.stride:g} s; "
                        "use another --index folder")
    return chosen


def frame_spans(num_frames: int, fps: float, windowing: Windowing) -> list[tuple[int, int]]:
    """[first, last) frame spans of a file's windows (module docstring)."""
    length = max(1, round(windowing.window * fps))
    step = max(1, round(windowing.stride * fps))
    if num_frames <= length:
        return [(0, num_frames)]
    firsts = list(range(0, num_frames - length + 1, step))
    if firsts[-1] + length < num_frames:
        firsts.append(num_frames - length)
    return [(first, first + length) for first in firsts]


def span_indices(first: int, last: int, num_frm: int, strategy: str, rng=None) -> list[int]:
    """The frames the evaluation would sample from frames [first, last) cut out as a file of their own."""
    return [first + index for index in sample_frame_indices(last - first, num_frm, strategy, rng)]


# -- readers: one open per file, frames asked for in ascending order ---------------------------
class _Frames:
    num_frames: int
    fps: float | None

    def close(self) -> None:
        """decord and torchcodec free their decoder with the object; PyAV's container is closed."""


class _DecordFrames(_Frames):
    def __init__(self, path: str, size: int | None):
        import decord
        kwargs = {"width": size, "height": size} if size else {}
        self.reader = decord.VideoReader(path, num_threads=video._decode_threads, **kwargs)
        self.num_frames, self.fps = len(self.reader), self.reader.get_avg_fps()

    def frames_at(self, indices: list[int]) -> torch.Tensor:
        """Ascending indices: decord skips forward within a GOP and seeks only forward, to a later keyframe."""
        return torch.from_numpy(self.reader.get_batch(indices).asnumpy())


class _TorchcodecFrames(_Frames):
    def __init__(self, path: str, size: int | None):
        from torchcodec.decoders import VideoDecoder
        self.decoder = VideoDecoder(path, num_ffmpeg_threads=video._decode_threads, dimension_order="NHWC",
                                    seek_mode="exact")
        metadata = self.decoder.metadata
        listed, present = metadata.num_frames_from_header, metadata.num_frames_from_content
        if listed and present < listed:  # a truncated file, rejected as data.video rejects it
            raise EOFError(f"the file holds {present} of the {listed} frames its header lists")
        self.num_frames, self.fps = metadata.num_frames, metadata.average_fps

    def frames_at(self, indices: list[int]) -> torch.Tensor:
        return self.decoder.get_frames_at(indices).data


class _PyavFrames(_Frames):
    """One pass of the demuxer: frames are taken as the decode loop reaches them."""

    def __init__(self, path: str, size: int | None):
        import av
        self.container = av.open(path)
        stream = self.container.streams.video[0]
        stream.thread_count = video._decode_threads
        self.fps = float(stream.average_rate or 0) or None
        self.num_frames = stream.frames
        if self.num_frames <= 0:  # no frame count in the container: counted by decoding, as data.video does
            self.num_frames = sum(1 for _ in self.container.decode(stream))
            self.container.seek(0)
        self.frames = enumerate(self.container.decode(stream))

    def frames_at(self, indices: list[int]) -> torch.Tensor:
        wanted, decoded = set(indices), {}
        for position, frame in self.frames:
            if position in wanted:
                decoded[position] = frame.to_ndarray(format="rgb24")
            if position >= indices[-1]:
                break
        if len(decoded) < len(wanted):
            raise EOFError(f"stream ended before frame {min(wanted.difference(decoded))} of {self.num_frames}")
        return torch.from_numpy(np.stack([decoded[i] for i in indices]))

    def close(self) -> None:
        self.container.close()


FRAME_READERS = {"decord": _DecordFrames, "torchcodec": _TorchcodecFrames, "pyav": _PyavFrames}


def _assemble(frames, spans: list[tuple[int, int]], clips: ClipDataset) -> Iterator[torch.Tensor]:
    """Each span's clip (C, T, H, W), in order, from one ascending pass over the union of their frames."""
    wanted = [span_indices(first, last, clips.num_frm, clips.strategy) for first, last in spans]
    union = sorted(set().union(*wanted))
    still_needed = list(itertools.accumulate((min(indices) for indices in reversed(wanted)), min))[::-1] + [math.inf]
    decoded, emitted = {}, 0
    for start in range(0, len(union), DECODE_CHUNK):
        chunk = union[start:start + DECODE_CHUNK]
        decoded.update(zip(chunk, resize_frames(frames.frames_at(chunk), clips.decode_size)))
        while emitted < len(wanted) and max(wanted[emitted]) <= chunk[-1]:
            yield encoder_layout(clips.transform(torch.stack([decoded[i] for i in wanted[emitted]])))
            emitted += 1
        decoded = {index: frame for index, frame in decoded.items() if index >= still_needed[emitted]}


def _open(path: str, name: str, clips: ClipDataset):
    return FRAME_READERS[name](path, clips.decode_size if name in RESIZES_IN_DECODER else None)


def _read(path, clips: ClipDataset, spans_of) -> Iterator[tuple[float, float, int, torch.Tensor]]:
    """(start s, end s, number of spans, clip) of the spans `spans_of(num_frames, fps)` chooses, decoding the file
    once; readers are tried in the evaluation's order until one opens the file and gives the first
    clip (a failure after that is the file's: VideoReadError)."""
    path, failures = str(path), []
    for name in reader_names():
        given = 0
        try:
            with closing(_open(path, name, clips)) as frames:
                if not frames.fps:
                    raise ValueError("the file gives no frame rate: its seconds are unknown")
                spans = spans_of(frames.num_frames, frames.fps)
                for (first, last), clip in zip(spans, _assemble(frames, spans, clips)):
                    yield first / frames.fps, last / frames.fps, len(spans), clip
                    given += 1
            return
        except UserError:
            raise
        except Exception as error:  # decoders raise many types (DECORDError, av.error.*, OSError, ...)
            if given:
                raise VideoReadError(path, f"{name}: {type(error).__name__}: {error}") from error
            failures.append(f"{name}: {type(error).__name__}: {error}")
    raise VideoReadError(path, "; ".join(failures))


def read_windows(path, clips: ClipDataset, windowing: Windowing) -> Iterator[tuple[float, float, int, torch.Tensor]]:
    """(start s, end s, number of windows, clip (C, T, H, W)) of every window of a file, in order, from one
    decode."""
    return _read(path, clips, lambda num_frames, fps: frame_spans(num_frames, fps, windowing))


def read_span(path, clips: ClipDataset, start: float | None, end: float | None) -> torch.Tensor:
    """The clip (C, T, H, W) of seconds [start, end) of a file (None: its beginning, its end), read
    as the evaluation reads a file holding just that span; a range outside the file is a UserError."""
    def spans_of(num_frames, fps):
        return [frame_range_of(path, num_frames, fps, start, end)]
    return next(_read(path, clips, spans_of))[3]


def frame_range_of(path, num_frames: int, fps: float, start: float | None, end: float | None) -> tuple[int, int]:
    """[first, last) frames of seconds [start, end), rounded to the nearest frame; one line naming
    the file's duration for a range beyond it (half a frame of slack: printed times are rounded)."""
    duration = num_frames / fps
    start = 0.0 if start is None else start
    end = duration if end is None else end
    if start >= duration:
        raise UserError(f"--start {start:g} is not before the end of {path} ({duration:.2f} s)")
    if end > duration + 0.5 / fps:
        raise UserError(f"--end {end:g} is beyond the end of {path} ({duration:.2f} s)")
    first, last = round(start * fps), min(round(end * fps), num_frames)
    if last <= first:
        raise UserError(f"--start {start:g} .. --end {end:g} of {path} holds no whole frame ({fps:g} frames/s)")
    return first, last


# -- indexing: windows of many files, decoded in worker processes -------------------------------
@dataclass
class WindowItem:
    clip: torch.Tensor | None
    file: int  # position in the list of paths
    count: int  # windows of the file; the file is complete when this many have come
    span: tuple[float, float] | None
    reason: str | None  # the file is unreadable: its earlier windows are dropped


class WindowClips(IterableDataset):
    """Batches of the windows of a list of files: worker w of n reads files w, w + n, ... whole, so a
    file is decoded once, by one process. A batch holds one file's windows only (up to
    `batch_size` of them): a window's numbers then depend on its file alone, not on the files
    indexed beside it or on how many workers or processes share the work (a multi-process index
    equals a single-process one, inference/index_processes.py)."""

    def __init__(self, config: dict, paths, windowing: Windowing, batch_size: int):
        self.clips = ClipDataset(config, "video files", train=False, substitute_black_on_error=False)
        self.paths, self.windowing, self.batch_size = [str(path) for path in paths], windowing, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, list[WindowItem]]]:
        worker = get_worker_info()
        first, step = (worker.id, worker.num_workers) if worker else (0, 1)
        for number in range(first, len(self.paths), step):
            items = []
            for item in self._file(number):
                if item.reason is not None:  # its windows not yet handed on are dropped with it
                    items = []
                items.append(item)
                if len(items) == self.batch_size or item.reason is not None:
                    yield collate_windows(items)
                    items = []
            if items:
                yield collate_windows(items)

    def _file(self, number: int) -> Iterator[WindowItem]:
        path = self.paths[number]
        if not os.path.exists(path):  # not tried by every reader (decord would print its failure)
            yield WindowItem(None, number, 0, None, f"file not found: {path}")
            return
        try:
            for start, end, count, clip in read_windows(path, self.clips, self.windowing):
                yield WindowItem(clip, number, count, (start, end), None)
        except VideoReadError as error:
            yield WindowItem(None, number, 0, None, str(error))


def collate_windows(items: list[WindowItem]) -> tuple[torch.Tensor | None, list[WindowItem]]:
    """(the batch's clips (B, C, T, H, W) or None, its items without their clips)."""
    clips = [item.clip for item in items if item.clip is not None]
    for item in items:
        item.clip = None
    return (torch.stack(clips) if clips else None), items


def _as_batched(batch):
    """The DataLoader's collate step for batches the dataset already formed."""
    return batch


@dataclass
class _FileRows:
    """A file's encoded windows until its last one comes: its rows are committed whole or not at all."""
    spans: list
    embeddings: list
    tokens: list  # fp16, as an index stores them: a long file's windows wait here until its last one


class _InFileOrder:
    """The rows of the windows as they come from the workers, handed on a file at a time, whole,
    in the order of the files (each worker reads other files)."""

    def __init__(self, embed_dim: int):
        self.embed_dim, self.pending, self.finished, self.next_file = embed_dim, {}, {}, 0

    def add(self, items: list[WindowItem], embeddings, tokens) -> EncodedBatch:
        """The batch of the files these items let go: the ones finished, up to the first still unfinished."""
        row = 0
        for item in items:
            if item.reason is not None:
                self.pending.pop(item.file, None)
                self.finished[item.file] = item.reason
                continue
            rows = self.pending.setdefault(item.file, _FileRows([], [], []))
            rows.spans.append(item.span)
            rows.embeddings.append(embeddings[row])
            if tokens is not None:
                rows.tokens.append(tokens[row].half())
            row += 1
            if len(rows.spans) == item.count:
                self.finished[item.file] = self.pending.pop(item.file)
        done, failed = [], {}
        while self.next_file in self.finished:
            rows = self.finished.pop(self.next_file)
            if isinstance(rows, str):
                failed[self.next_file] = rows
            else:
                done.append((self.next_file, rows))
            self.next_file += 1
        indices = [file for file, rows in done for _ in rows.spans]
        spans = [span for _, rows in done for span in rows.spans]
        embeddings = torch.stack([e for _, rows in done for e in rows.embeddings]) if indices \
            else torch.empty(0, self.embed_dim)
        tokens = torch.stack([t for _, rows in done for t in rows.tokens]).float() if indices and tokens is not None \
            else None
        return EncodedBatch(indices, embeddings, tokens, failed, spans)


def iter_encoded_windows(model, paths, windowing: Windowing, batch_size: int | None = None,
                         return_tokens: bool = False, num_workers: int | None = None):
    """inference.api.EncodedBatch after EncodedBatch, each holding the next files (in the order of
    `paths`) whose windows are all encoded, one row per window (`spans`: their seconds); a file
    that fails, even after some windows, is in `failed` alone. With `return_tokens` a file's
    windows' tokens are held (fp16) until its last window is encoded: 1.5 MiB a window with the
    224 px 32-frame models."""
    model._require(("retrieval", "pre-training"), "encoding videos")
    workers = value(model.config, "num_workers") if num_workers is None else num_workers
    dataset = WindowClips(model.config, paths, windowing, batch_size or DEFAULT_BATCH_SIZE)
    loader = VideoLoader(dataset, batch_size=None, num_workers=min(workers, len(paths)), collate_fn=_as_batched,
                         worker_init_fn=decoding_worker_init, pin_memory=model.device.type == "cuda")
    in_order = _InFileOrder(value(model.config, "embed_dim"))
    with torch.no_grad():
        for clips, items in loader:
            tokens = embeddings = None
            if clips is not None:
                with model.autocast():
                    tokens, embeddings = model.model.encode_video(clips.to(model.device, non_blocking=True))
                embeddings, tokens = embeddings.float().cpu(), tokens.cpu() if return_tokens else None
            yield in_order.add(items, embeddings, tokens)
