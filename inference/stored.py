"""Index once, ask many: `ask` and `caption` read a video's tokens from an index made with
`--tokens` instead of decoding and encoding the file again.

Stored tokens stand for the file only when all of this holds, else the file is decoded (and
`StoredTokens.note` says why, in one line):

* the index holds the file (same path below its folder) unchanged: the size and mtime_ns the
  index keeps for change detection (inference.index.scan_videos) equal the file's now;
* the tokens come from the same video encoder: the config values tokens depend on
  (TOKEN_KEYS: the encoder's keys, frames and sampling) are equal, and so is a sha256 of the
  video encoder's weights as loaded (encoder_fingerprint), which the index records. A retrieval
  index's tokens come from the retrieval model's encoder: a QA model fine-tuned from the same
  pre-training has other encoder weights and decodes its file; a pre-training checkpoint indexed
  as a retrieval model (zero-shot search) and used to caption shares them.

The tokens are stored as fp16 (inference/index.py), encoded at the index's precision: answers and
captions from them equal those from the file up to that rounding (identical on the toy models,
tests/test_stored_tokens.py).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from configs.keys import value
from inference.index import TOKEN_KEYS, recorded



def encoder_fingerprint(encoder: nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and values of its float weights as
    loaded): 0.28 s for the 121M parameters of TESTA-base. Call it before quantising."""
    digest = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        if not isinstance(tensor, torch.Tensor):  # a quantised module's packed parameters: not comparable
            raise ValueError(f"{name} is no plain tensor: fingerprint the encoder before quantising it")
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class StoredTokens:
    tokens: torch.Tensor | None  # (1, N, D) fp16 as the index stored them, or None: decode the file
    note: str  # one line: where the video's tokens come from, or why the file is decoded


def _same_span(entry: dict, span: tuple | None) -> bool:
    """Whether a row stands for seconds `span` of its file (None: the whole file): a row that is a
    window (inference/windows.py) only for its own start and end, to the millisecond."""
    if "start" not in entry:
        return span is None
    return span is not None and None not in span and all(
        abs(asked - stored) < 1e-3 for asked, stored in zip(span, (entry["start"], entry["end"])))


def _row_of(index, video_path, span: tuple | None = None) -> int | None:
    """The index row of `video_path` (of its seconds `span`), by its path below the index's video
    folder; None if not there."""
    rows = {entry["path"]: row for row, entry in enumerate(index.files) if _same_span(entry, span)}
    for candidate in (Path(os.path.abspath(video_path)), Path(video_path).resolve()):
        try:
            relative = candidate.relative_to(index.root).as_posix()
        except ValueError:
            continue
        if relative in rows:
            return rows[relative]
    return None


def stored_tokens(model, index, video_path, span: tuple | None = None) -> StoredTokens:
    """The tokens `index` stored for `video_path` if they stand for what `model`'s video encoder
    would give (module docstring), else None with the reason."""
    decode = "; decoding the file"
    where = f"index {index.folder}"
    if index.tokens is None:
        return StoredTokens(None, f"{where} holds no video tokens (index with --tokens to store them){decode}")
    row = _row_of(index, video_path, span)
    if row is None:
        moment = "" if span is None else f" from {span[0]} s to {span[1]} s"
        return StoredTokens(None, f"{where} does not hold {video_path}{moment}{decode}")
    entry, stat = index.files[row], os.stat(video_path)
    if (stat.st_size, stat.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
        return StoredTokens(None, f"{video_path} changed since {where} encoded it (run index again){decode}")
    stored = index.manifest["embedding_config"]
    changed = [f"{key} {recorded(stored, key)!r} (index) vs {value(model.config, key)!r}" for key in TOKEN_KEYS
               if recorded(stored, key) != value(model.config, key)]
    if changed:
        return StoredTokens(None, f"{where} encoded its videos with other settings: {', '.join(changed)}{decode}")
    stored_sha = index.manifest.get("video_encoder_sha256")
    if stored_sha is None:
        return StoredTokens(None, f"{where} does not record its video encoder's weights (made before they were "
                                  f"recorded: index into a new folder to reuse its tokens){decode}")
    if stored_sha != model.encoder_sha256:
        return StoredTokens(None, f"{where} holds the tokens of another video encoder: its checkpoint "
                                  f"{index.manifest['checkpoint']['path']} has other video encoder weights than "
                                  f"{model.checkpoint} (sha256 {stored_sha[:12]} vs {model.encoder_sha256[:12]})"
                                  f"{decode}")
    precision = index.manifest.get("precision", "an unrecorded precision")
    return StoredTokens(index.tokens_of([row]), f"video tokens: from {where} (encoded at {precision}, stored as "
                                                f"fp16), not decoded again")
