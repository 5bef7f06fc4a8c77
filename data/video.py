"""Frame sampling (pure functions) and video decoding with torchcodec, decord and PyAV.

read_video returns the sampled frames as a uint8 tensor laid out (T, C, H, W), the layout the
transforms and the batch interface use.
"""
import functools
import importlib
import io
import os
import random
import sys
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

from runtime.errors import DataError, one_line

STRATEGIES = ("uniform", "uniform_spread", "nlvl_uniform", "nlvl_rand", "rand", "headtail")
# A warning is due when 'uniform' leaves more than this share of a clip's tail unsampled.
UNSAMPLED_TAIL_WARNING = 0.25

# 0 lets the decoders pick their own thread count; DataLoader workers set it to 1 so that
# num_workers processes do not each start a decoder thread per core.
_decode_threads = 0


class VideoReadError(DataError):
    """A video no reader can decode; the one-line message names the path.

    `VideoReadError(message)` with one argument is how torch's DataLoader re-raises it from a
    worker (the message then ends with the worker's traceback); `.path` is None then."""

    def __init__(self, path, reason=None):
        if reason is None:
            super().__init__(path)
            self.path = None
        else:
            super().__init__(one_line(f"cannot decode video {path}: {reason}"))  # decord's errors span lines
            self.path = str(path)


def worker_init_fn(worker_id):
    global _decode_threads
    _decode_threads = 1
    torch.set_num_threads(1)


def frame_range(vlen, start=None, end=None, fps=None):
    """[first, last) frame range for optional start/end times (seconds), truncated to whole
    frames as the original does; never empty."""
    first, last = 0, vlen
    if fps:
        if start is not None:
            first = min(max(int(start * fps), 0), vlen - 1)
        if end is not None:
            last = min(max(int(end * fps), first + 1), vlen)
    return first, last


def original_uniform_indices(vlen, num_frm, first=0, last=None):
    """The original's `uniform` rule, verbatim: numpy.arange(first, last, vlen / num_frm, dtype=int).

    NumPy takes the count from the float step but fills the range from its first two values
    cast to int, so the step is truncated to int(first + vlen / num_frm) - first: the tail
    of the clip is never sampled (20 frames at 8 give 0, 2, ..., 14), a clip shorter than
    num_frm gives its first frame num_frm times, and with a start/end range the count can
    differ from num_frm. Released checkpoints were evaluated with exactly these indices.
    """
    return np.arange(first, vlen if last is None else last, vlen / num_frm, dtype=int).tolist()


_uniform_warning_shown = False


def _warn_if_degenerate(indices, vlen, num_frm, first, last):
    """Say once per process when the original rule repeats frames or skips much of a clip."""
    global _uniform_warning_shown
    unsampled_tail = (last - 1 - indices[-1]) / (last - first)
    repeats = len(set(indices)) < len(indices)
    if _uniform_warning_shown or not (repeats or unsampled_tail > UNSAMPLED_TAIL_WARNING):
        return
    _uniform_warning_shown = True
    problem = "repeats frames" if repeats else f"leaves the last {unsampled_tail:.0%} of a clip unsampled"
    print(f"warning: 'uniform' frame sampling (the original's rule) {problem} ({num_frm} frames of "
          f"{vlen}: indices {indices[0]}..{indices[-1]}); uniform_spread (frm_sampling_strategy[_test]) "
          "spreads them over the whole clip, but published numbers were measured with 'uniform'. "
          "Shown once.", file=sys.stderr)


def uniform_indices(vlen, num_frm, first, last):
    """The original's indices, fitted to exactly num_frm (cut, or the last index repeated):
    they differ in count only with a start/end range, and the model needs num_frm frames."""
    indices = original_uniform_indices(vlen, num_frm, first, last)  # never empty: first < last
    indices = indices[:num_frm] + indices[-1:] * (num_frm - len(indices))
    _warn_if_degenerate(indices, vlen, num_frm, first, last)
    return indices


def _sorted_draw(first, last, count, rng):
    """`count` sorted random indices in [first, last): distinct when the range allows,
    otherwise every frame once plus random repeats so the count is always met."""
    span = max(last - first, 1)
    if span >= count:
        picks = rng.sample(range(span), count)
    else:
        picks = list(range(span)) + [rng.randrange(span) for _ in range(count - span)]
    return sorted(first + p for p in picks)


def sample_frame_indices(vlen, num_frm, strategy="uniform", rng=None, start=None, end=None, fps=None):
    """Choose exactly `num_frm` frame indices out of `vlen` frames (docs/data.md, "Frame sampling")."""
    if vlen < 1:
        raise ValueError(f"cannot sample frames from a clip with {vlen} frames")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown frm_sampling_strategy {strategy!r}; expected one of {STRATEGIES}")
    rng = rng or random
    first, last = frame_range(vlen, start, end, fps)
    if strategy == "uniform":
        return uniform_indices(vlen, num_frm, first, last)
    span = last - first
    stride = span / num_frm
    if strategy in ("uniform_spread", "nlvl_uniform"):  # evenly spread over the whole range
        return [first + int(i * stride) for i in range(num_frm)]
    if strategy == "nlvl_rand":
        return [min(first + int((i + rng.random()) * stride), last - 1) for i in range(num_frm)]
    if strategy == "rand":
        return _sorted_draw(first, last, num_frm, rng)
    middle = first + span // 2
    head = _sorted_draw(first, max(middle, first + 1), num_frm // 2, rng)
    return head + _sorted_draw(middle, last, num_frm - num_frm // 2, rng)


def _decord_read(source, num_frm, strategy, rng, start, end, size=None):
    """size: resize in the decoder (decord's width/height), as the original did."""
    import decord
    kwargs = {"width": size, "height": size} if size else {}
    reader = decord.VideoReader(source, num_threads=_decode_threads, **kwargs)
    indices = sample_frame_indices(len(reader), num_frm, strategy, rng, start, end, reader.get_avg_fps())
    return torch.from_numpy(reader.get_batch(indices).asnumpy()), indices


def _torchcodec_read(source, num_frm, strategy, rng, start, end, size=None):
    """Exact seek mode: frame i is the i-th frame in presentation order, as decord and PyAV
    count; get_frames_at seeks to a keyframe only when that skips decoding."""
    from torchcodec.decoders import VideoDecoder
    from torchcodec.transforms import Resize
    decoder = VideoDecoder(source, num_ffmpeg_threads=_decode_threads, dimension_order="NHWC", seek_mode="exact",
                           transforms=[Resize((size, size))] if size else None)
    metadata = decoder.metadata
    listed, present = metadata.num_frames_from_header, metadata.num_frames_from_content
    if listed and present < listed:  # the scan stops where a truncated file ends: reject it as the others do
        raise EOFError(f"the file holds {present} of the {listed} frames its header lists")
    indices = sample_frame_indices(metadata.num_frames, num_frm, strategy, rng, start, end, metadata.average_fps)
    return decoder.get_frames_at(indices).data, indices


def _pyav_read(source, num_frm, strategy, rng, start, end, size=None):
    """Decodes every frame up to the last index: fine for the short or re-encoded clips it
    is the fallback for, slow for sparse indices in long videos."""
    import av
    with av.open(source) as container:
        stream = container.streams.video[0]
        stream.thread_count = _decode_threads
        fps = float(stream.average_rate or 0) or None
        vlen = stream.frames
        if vlen <= 0:  # containers without a frame count (e.g. some mkv/webm): count by decoding
            vlen = sum(1 for _ in container.decode(stream))
            container.seek(0)
        indices = sample_frame_indices(vlen, num_frm, strategy, rng, start, end, fps)
        wanted = set(indices)
        decoded = {}
        for position, frame in enumerate(container.decode(stream)):
            if position in wanted:
                width, height = (size, size) if size else (frame.width, frame.height)
                decoded[position] = frame.to_ndarray(
                    width=width, height=height, format="rgb24", interpolation="BICUBIC")
            if position >= indices[-1]:
                break
    missing = wanted.difference(decoded)
    if missing:
        raise EOFError(f"stream ended before frame {min(missing)} of {vlen} listed frames")
    return torch.from_numpy(np.stack([decoded[i] for i in indices])), indices


# Each reader: (file path or file object, num_frm, strategy, rng, start, end, size=None) ->
# (uint8 frames (T, H, W, C), the frame indices); `size` resizes in the decoder. At full size the three return the
# same pixels; resized, decord's scaler differs from read_video's (tests/test_readers.py).
READERS = {"torchcodec": _torchcodec_read, "decord": _decord_read, "pyav": _pyav_read}
# The order read_video tries them in: decord first, resizing in its decoder as the original did,
# so that training and evaluation clips are the original's pixels bit for bit
# (tests/test_eval_e2e.py, tests/test_train_e2e.py). torchcodec decodes faster
# (benchmarks/bench_readers.py) but its frames differ by about a grey level: TESTA_VIDEO_READER
# picks it where that trade is wanted.
READ_ORDER = ("decord", "torchcodec", "pyav")
RESIZES_IN_DECODER = {"decord"}  # the others decode at full size and read_video resizes: faster for them
READER_VARIABLE = "TESTA_VIDEO_READER"  # names one reader to use alone, e.g. torchcodec


@functools.cache
def reader_problem(name):
    """Why reader `name` cannot load here (its package is missing, or FFmpeg's libraries for
    torchcodec), or None. Asked once per process, so a missing reader costs no import per clip."""
    try:
        importlib.import_module({"torchcodec": "torchcodec.decoders", "pyav": "av"}.get(name, name))
    except Exception as err:  # ImportError, or older torchcodecs' RuntimeError when no FFmpeg loads
        return one_line(f"{type(err).__name__}: {err}")
    if name == "torchcodec" and getattr(importlib.import_module("torchcodec"), "ffmpeg_major_version", 0) is None:
        # Newer torchcodecs import without FFmpeg and fail at the first decode instead.
        return "FFmpeg's shared libraries do not load (Debian: apt-get install ffmpeg)"
    return None


def reader_names(backend=None):
    """The readers read_video tries: `backend`, else $TESTA_VIDEO_READER, else every reader
    that loads, in READ_ORDER."""
    chosen = backend or os.environ.get(READER_VARIABLE)
    if not chosen:
        names = [name for name in READ_ORDER if reader_problem(name) is None]
        if not names:
            reasons = "; ".join(f"{name}: {reader_problem(name)}" for name in READERS)
            raise DataError(f"no video reader loads: {reasons}")
        return names
    if chosen not in READERS:
        raise DataError(f"unknown video reader {chosen!r} ({READER_VARIABLE} or backend); "
                        f"expected one of {list(READERS)}")
    if reader_problem(chosen):
        raise DataError(f"video reader {chosen!r} was asked for but cannot load: {reader_problem(chosen)}")
    return [chosen]


def resize_frames(frames, size):
    """(T, H, W, C) uint8 -> (T, C, size, size): bilinear with antialiasing on the channels-last
    view, which torch resizes with its vectorised uint8 kernel (no float copy)."""
    clip = frames.permute(0, 3, 1, 2)
    if size and tuple(clip.shape[-2:]) != (size, size):
        clip = F.resize(clip, [size, size], antialias=True)
    return clip.contiguous()


class SampledClip(NamedTuple):
    frames: torch.Tensor  # uint8 (T, C, H, W)
    indices: list  # the frame indices sampled

    @property
    def repeats_frames(self) -> bool:
        """A clip with fewer frames than sampled (in its range) gives some frames twice."""
        return len(set(self.indices)) < len(self.indices)


def read_video(path, num_frm, strategy="uniform", size=None, rng=None, start=None, end=None, backend=None,
               name=None):
    """Decode `num_frm` sampled frames of `path` as uint8 (T, C, H, W), resized to size x size
    when `size` is set (read_clip's frames)."""
    return read_clip(path, num_frm, strategy, size, rng, start, end, backend, name).frames


def read_clip(path, num_frm, strategy="uniform", size=None, rng=None, start=None, end=None, backend=None,
              name=None) -> SampledClip:
    """Decode `num_frm` sampled frames of `path` as uint8 (T, C, H, W), resized to size x size
    when `size` is set, with the frame indices they are.

    path: a file path, or the encoded file's bytes (a video read from a tar shard); `name`
    then says which video it is in errors. backend: None tries the readers in READ_ORDER, a
    file one rejects going to the next, or the reader $TESTA_VIDEO_READER names; 'torchcodec',
    'decord' or 'pyav' forces one.
    Raises VideoReadError naming the video when no reader can decode it.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown frm_sampling_strategy {strategy!r}; expected one of {STRATEGIES}")
    in_memory = isinstance(path, (bytes, bytearray, memoryview))
    failures = []
    for reader in reader_names(backend):
        # A fresh stream per reader: a failed attempt may have read part of it.
        source = io.BytesIO(path) if in_memory else (path if hasattr(path, "read") else str(path))
        try:
            frames, indices = READERS[reader](source, num_frm, strategy, rng, start, end,
                                              size if reader in RESIZES_IN_DECODER else None)
        except Exception as err:  # decoders raise many types (DECORDError, av.error.*, OSError, ...)
            failures.append(f"{reader}: {type(err).__name__}: {err}")
            continue
        return SampledClip(resize_frames(frames, size), list(indices))
    raise VideoReadError(name or ("<video bytes>" if in_memory else path), "; ".join(failures))
