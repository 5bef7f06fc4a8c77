"""Resizing of TimeSformer's learned position and time embeddings.

Used when a checkpoint was trained at another resolution or frame count (models/checkpoint.py) and
when a video's patch grid differs from the trained one (the encoder's forward).

timm's ``resample_abs_pos_embed`` matches ``resize_pos_embed`` only for float32 tables and with
``antialias=False`` (its default antialiases when shrinking); it interpolates every dtype in float32,
so float16/bfloat16/float64 tables would come out different. Hence the project's own resizing.
"""
import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def resize_grid(grid: Tensor, size: Tuple[int, int], mode: str) -> Tensor:
    """Resize (1, h*w, D) square-grid embeddings to ``size`` = (h', w')."""
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"position embedding holds {grid.shape[1]} patches, not a square grid")
    if (old, old) == tuple(size):
        return grid
    dim = grid.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2)
    align = False if mode in ("bilinear", "bicubic") else None
    grid = F.interpolate(grid, size=size, mode=mode, align_corners=align)
    return grid.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], dim)


def resize_pos_embed(pos_embed: Tensor, new_grid: int, mode: str = "bicubic") -> Tensor:
    """Resize (1, 1+L, D) position embeddings to a new_grid x new_grid patch grid; [CLS] kept."""
    if pos_embed.shape[1] == 1 + new_grid * new_grid:
        return pos_embed
    grid = resize_grid(pos_embed[:, 1:], (new_grid, new_grid), mode)
    return torch.cat([pos_embed[:, :1], grid.to(pos_embed.dtype)], dim=1)


def resize_time_embed(time_embed: Tensor, num_frames: int, mode: str = "nearest") -> Tensor:
    """Resize (1, T, C) per-frame embeddings (or scalings) to ``num_frames`` along time."""
    if time_embed.shape[1] == num_frames:
        return time_embed
    resized = F.interpolate(time_embed.transpose(1, 2), size=num_frames, mode=mode)
    return resized.transpose(1, 2)

