"""TimeSformer video encoder with TESTA temporal-spatial token aggregation.

Token layout (divided space-time): one global [CLS] plus patch tokens held as a
(B, L, T, D) tensor, patch-major / time-minor, so that the flattened sequence
``[CLS] + patches.view(B, L*T, D)`` is the published order (token 1 + l*T + t is patch l
of frame t). Keeping [CLS] apart from the patches lets temporal attention read the
patches without a copy and avoids re-concatenating the stream in every block.
"""
import math
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.merge import Matching, apply_matching, bipartite_soft_matching, clamp_r, frame_matching, merge_weighted

ATTENTION_TYPES = ("divided_space_time", "space_only", "joint_space_time")
MERGING_TYPES = ("frame&patch", "frame", "patch")
_ATTENTION_ALIASES = {"space-only": "space_only"}


# ----------------------------------------------------------------------------- embeddings
def _resize_grid(grid: Tensor, size: Tuple[int, int], mode: str) -> Tensor:
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
    grid = _resize_grid(pos_embed[:, 1:], (new_grid, new_grid), mode)
    return torch.cat([pos_embed[:, :1], grid.to(pos_embed.dtype)], dim=1)


def resize_time_embed(time_embed: Tensor, num_frames: int, mode: str = "nearest") -> Tensor:
    """Resize (1, T, C) per-frame embeddings (or scalings) to ``num_frames`` along time."""
    if time_embed.shape[1] == num_frames:
        return time_embed
    resized = F.interpolate(time_embed.transpose(1, 2), size=num_frames, mode=mode)
    return resized.transpose(1, 2)


# ----------------------------------------------------------------------------- layers
def drop_path_mask(batch: int, rate: float, training: bool, like: Tensor) -> Optional[Tensor]:
    """Stochastic depth: per-sample keep mask scaled by 1/keep, or None when nothing drops.

    One mask per residual branch, so a sample's [CLS] and patches drop together.
    """
    if rate == 0.0 or not training:
        return None
    keep = 1.0 - rate
    return like.new_empty(batch).bernoulli_(keep).div_(keep)


def drop_path(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Apply a ``drop_path_mask`` along dim 0 of ``x``."""
    return x if mask is None else x * mask.view((-1,) + (1,) * (x.dim() - 1))


class Attention(nn.Module):
    """Multi-head self-attention over (M, n, D) that can also return the merge metric."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, log_size: Optional[Tensor] = None,
                return_keys: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """``log_size`` (M, 1, 1, n) is added to the logits (proportional attention).

        Returns the projected output and, if asked, the merge metric (M, n, hd): the keys
        summed over heads. Summing points the same way as averaging, and the metric is only
        used through cosine similarity, so this saves a division pass.
        """
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        # Strided views on purpose, and SDPA's default backend: on CPU (fp32, head dim 64,
        # sequences of 8-197 tokens) the flash kernel is 2-11x faster than the math backend
        # or explicit matmul+softmax, and copying q/k/v contiguous costs more than it saves.
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=log_size)
        out = self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        return out, (key.sum(dim=1) if return_keys else None)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


def _log_size(size: Optional[Tensor], prop_attn: bool) -> Optional[Tensor]:
    """Attention bias for proportional attention from (M, n) sizes, or None."""
    if not prop_attn or size is None:
        return None
    return size.log()[:, None, None, :]


# ----------------------------------------------------------------------------- blocks
class VideoTokens(NamedTuple):
    """Divided space-time residual stream and its merge bookkeeping."""

    cls: Tensor  # (B, 1, D) global [CLS]
    patches: Tensor  # (B, L, T, D) patch-major
    size: Optional[Tensor]  # (B, L, T, 1) original tokens per token; None = all ones
    frame_source: Optional[Tensor]  # (B, T, T0) original frames per frame (only with lts)
    source: Optional[Tensor]  # (B, L, T, L0*T0) original patches per token (trace_source)


class Tokens(NamedTuple):
    """Residual stream of plain ViT blocks: token 0 of every sequence is a [CLS]."""

    x: Tensor  # (M, n, D)
    size: Optional[Tensor]  # (M, n, 1)
    source: Optional[Tensor]  # (M, n, n0)


def _ones_like_tokens(x: Tensor) -> Tensor:
    return x.new_ones(x.shape[:-1] + (1,))


class DividedSpaceTimeBlock(nn.Module):
    """Temporal attention -> [frame merge] -> spatial attention -> [patch merge] -> MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 drop_path_rate: float, num_frames: int, learnable_temporal_scaling: bool,
                 frame_r: int, patch_r: int, frame_cap_protected: int, prop_attn: bool):
        super().__init__()
        # Registered first so the state-dict order matches the released checkpoints.
        self.temporal_scaling = (nn.Parameter(torch.zeros(1, num_frames, 1))
                                 if learnable_temporal_scaling else None)
        self.norm1 = _layer_norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.temporal_norm1 = _layer_norm(dim)
        self.temporal_attn = Attention(dim, num_heads, qkv_bias)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate
        self.frame_r = frame_r
        self.patch_r = patch_r
        self.frame_cap_protected = frame_cap_protected
        self.prop_attn = prop_attn

    def _drop_mask(self, like: Tensor) -> Optional[Tensor]:
        return drop_path_mask(like.shape[0], self.drop_path_rate, self.training, like)

    def frame_scale(self, frame_source: Tensor) -> Tensor:
        """Per-sample (B, T) temporal scaling: the mean over the original frames of each frame."""
        scale = torch.tanh(resize_time_embed(self.temporal_scaling, frame_source.shape[-1])) + 1
        return (frame_source @ scale[0]).squeeze(-1) / frame_source.sum(-1)

    def forward(self, tokens: VideoTokens) -> VideoTokens:
        cls, patches, size, frame_source, source = tokens
        batch, num_patches, num_frames, dim = patches.shape

        # 1. temporal attention over the frames of each patch position
        frame_r = clamp_r(self.frame_r, num_frames, self.frame_cap_protected)
        log_size = _log_size(None if size is None else size.view(-1, num_frames), self.prop_attn)
        attended, keys = self.temporal_attn(
            self.temporal_norm1(patches).view(-1, num_frames, dim), log_size, return_keys=frame_r > 0)
        attended = attended.view(batch, num_patches, num_frames, dim)
        if self.temporal_scaling is not None:
            attended = attended * self.frame_scale(frame_source)[:, None, :, None]
        patches = patches + drop_path(self.temporal_fc(attended), self._drop_mask(patches))

        # 2. frame aggregation: whole frames, decided by a vote over patch positions
        if frame_r:
            matching = frame_matching(keys.view(batch, num_patches, num_frames, -1), frame_r,
                                      self.frame_cap_protected)
            along_time = matching.broadcast(lambda index: index[:, None, :, None])
            size = _ones_like_tokens(patches) if size is None else size
            patches, size = merge_weighted(patches, size, along_time, dim=2)
            if source is not None:
                source = apply_matching(source, along_time, dim=2)
            if frame_source is not None:
                frame_source = apply_matching(
                    frame_source, matching.broadcast(lambda index: index[:, :, None]), dim=1)
            num_frames -= frame_r

        # 3. spatial attention per frame, the global [CLS] copied into every frame
        frames = patches.new_empty(batch, num_frames, 1 + num_patches, dim)
        frames[:, :, :1] = cls[:, None]
        frames[:, :, 1:] = patches.transpose(1, 2)
        patch_r = clamp_r(self.patch_r, num_patches)
        log_size = None
        if self.prop_attn and size is not None:
            frame_sizes = size.squeeze(-1).transpose(1, 2).reshape(-1, num_patches)
            log_size = _log_size(F.pad(frame_sizes, (1, 0), value=1.0), True)
        attended, keys = self.attn(self.norm1(frames.view(-1, 1 + num_patches, dim)), log_size,
                                   return_keys=patch_r > 0)
        attended = drop_path(attended.view(batch, num_frames, 1 + num_patches, dim), self._drop_mask(patches))
        cls = cls + attended[:, :, 0].mean(dim=1, keepdim=True)
        patches = patches + attended[:, :, 1:].transpose(1, 2)

        # 4. patch aggregation inside each frame ([CLS] protected, then left out)
        if patch_r:
            matching = bipartite_soft_matching(keys, patch_r, protect_first=True)
            per_frame = _drop_first_token(matching).broadcast(
                lambda index: index.view(batch, num_frames, -1).transpose(1, 2)[..., None])
            size = _ones_like_tokens(patches) if size is None else size
            patches, size = merge_weighted(patches, size, per_frame, dim=1)
            if source is not None:
                source = apply_matching(source, per_frame, dim=1)

        # 5. MLP
        keep = self._drop_mask(patches)
        cls = cls + drop_path(self.mlp(self.norm2(cls)), keep)
        patches = patches + drop_path(self.mlp(self.norm2(patches)), keep)
        return VideoTokens(cls, patches, size, frame_source, source)


def _drop_first_token(matching: Matching) -> Matching:
    """Re-index a matching made over [CLS] + patches (CLS kept first) to the patches alone."""
    return Matching(matching.output_rows[:, 1:] - 1, matching.merged_rows - 1,
                    matching.merged_slots - 1)


class ViTBlock(nn.Module):
    """Plain pre-norm transformer block with ToMe between attention and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 drop_path_rate: float, merge_r: int, prop_attn: bool):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate
        self.merge_r = merge_r
        self.prop_attn = prop_attn

    def forward(self, tokens: Tokens) -> Tokens:
        x, size, source = tokens
        merge_r = clamp_r(self.merge_r, x.shape[1], num_protected=1)
        log_size = _log_size(None if size is None else size.squeeze(-1), self.prop_attn)
        attended, keys = self.attn(self.norm1(x), log_size, return_keys=merge_r > 0)
        x = x + drop_path(attended, drop_path_mask(x.shape[0], self.drop_path_rate, self.training, x))
        if merge_r:
            matching = bipartite_soft_matching(keys, merge_r, protect_first=True)
            along_tokens = matching.broadcast(lambda index: index[..., None])
            size = _ones_like_tokens(x) if size is None else size
            x, size = merge_weighted(x, size, along_tokens, dim=1)
            if source is not None:
                source = apply_matching(source, along_tokens, dim=1)
        keep = drop_path_mask(x.shape[0], self.drop_path_rate, self.training, x)
        x = x + drop_path(self.mlp(self.norm2(x)), keep)
        return Tokens(x, size, source)


# ----------------------------------------------------------------------------- encoder
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


@dataclass
class EncoderTrace:
    """Intermediate results of one forward, for tests and analysis."""

    block_input: Optional[Tensor] = None  # residual stream entering block 0
    block_outputs: List[Tensor] = field(default_factory=list)  # stream after each block
    # (T, L) after each block; joint_space_time has one sequence: (1, patch tokens left)
    frames_patches: List[Tuple[int, int]] = field(default_factory=list)
    source: Optional[Tensor] = None  # (rows of output) x (input tokens) membership, if traced


class TimeSformer(nn.Module):
    """TimeSformer video encoder: (B, 3, T, H, W) -> (B, N, embed_dim), final LayerNorm applied."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.1,
                 num_frames=8, attention_type="divided_space_time",
                 learnable_temporal_scaling=False, token_merging=False, testa_r=0,
                 merging_type="frame&patch", prop_attn=False, trace_source=False,
                 grad_checkpointing=False, ckpt_layer=0):
        super().__init__()
        attention_type = _ATTENTION_ALIASES.get(attention_type, attention_type)
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.embed_dim = embed_dim
        self.num_frames = num_frames
        self.in_chans = in_chans
        self.attention_type = attention_type
        self.trace_source = trace_source
        self.grad_checkpointing = grad_checkpointing
        self.ckpt_layer = ckpt_layer
        divided = attention_type == "divided_space_time"
        self.learnable_temporal_scaling = learnable_temporal_scaling and divided
        schedule = merge_schedule(testa_r, merging_type, attention_type, depth, token_merging)

        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.time_embed = (None if attention_type == "space_only"
                           else nn.Parameter(torch.zeros(1, num_frames, embed_dim)))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

        # Stochastic depth grows linearly with depth (plain floats: also builds on 'meta').
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        if divided:
            # Frames keep one [CLS]-sized slot out of the merge cap when patches merge too:
            # the released models were trained with that cap.
            frame_cap = 1 if merging_type == "frame&patch" else 0
            blocks = [DividedSpaceTimeBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, rate,
                                            num_frames, learnable_temporal_scaling, frame_r,
                                            patch_r, frame_cap, prop_attn)
                      for rate, (frame_r, patch_r) in zip(rates, schedule)]
        else:
            blocks = [ViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, rate, patch_r, prop_attn)
                      for rate, (_, patch_r) in zip(rates, schedule)]
        self.blocks = nn.ModuleList(blocks)
        self.norm = _layer_norm(embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Zero temporal_fc and time_embed: a fresh encoder starts as a per-frame image encoder.
        for block in self.blocks:
            if isinstance(block, DividedSpaceTimeBlock):
                nn.init.zeros_(block.temporal_fc.weight)
                nn.init.zeros_(block.temporal_fc.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    # -- embedding
    def _embed(self, video: Tensor) -> Tuple[Tensor, Tensor]:
        """Patch + position (+ time) embeddings -> cls (1, 1, D) and patches (B, T, L, D)."""
        if video.dim() != 5 or video.shape[1] != self.in_chans:
            raise ValueError(f"video must be (B, {self.in_chans}, T, H, W), got {tuple(video.shape)}")
        batch, chans, frames, height, width = video.shape
        patch = self.patch_embed.proj.kernel_size[0]
        if height % patch or width % patch:
            raise ValueError(f"video frames {height}x{width} are not multiples of patch size {patch}")
        x = self.patch_embed.proj(video.transpose(1, 2).reshape(batch * frames, chans, height, width))
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        # Nearest resize when the input's grid differs from the trained one.
        pos_patches = _resize_grid(self.pos_embed[:, 1:], tuple(grid), mode="nearest")
        cls = self.cls_token + self.pos_embed[:, :1]
        patches = (x + pos_patches).view(batch, frames, -1, self.embed_dim)
        return cls, patches

    def _time_embed(self, frames: int) -> Tensor:
        """(1, T, 1, D): broadcast over the patches of each frame."""
        return resize_time_embed(self.time_embed, frames, mode="nearest")[:, :, None]

    # -- forward
    def forward(self, video: Tensor) -> Tensor:
        return self._encode(video, None)

    def forward_with_trace(self, video: Tensor) -> Tuple[Tensor, EncoderTrace]:
        """Forward that also records the per-block streams and token counts."""
        trace = EncoderTrace()
        return self._encode(video, trace), trace

    def _run_block(self, index: int, block: nn.Module, tokens):
        if self.grad_checkpointing and index >= len(self.blocks) - self.ckpt_layer and torch.is_grad_enabled():
            return checkpoint(block, tokens, use_reentrant=False)
        return block(tokens)

    def _encode(self, video: Tensor, trace: Optional[EncoderTrace]) -> Tensor:
        cls, patches = self._embed(video)
        if self.attention_type == "divided_space_time":
            return self._encode_divided(cls, patches, trace)
        batch, frames, num_patches, dim = patches.shape
        if self.attention_type == "space_only":
            # Every frame is an independent image: (B*T, 1+L, D).
            x = torch.cat([cls.expand(batch * frames, 1, dim),
                           patches.view(batch * frames, num_patches, dim)], dim=1)
        else:
            # One sequence over all patches of all frames, in the published patch-major order.
            patches = (patches + self._time_embed(frames)).transpose(1, 2)
            x = torch.cat([cls.expand(batch, 1, dim), patches.reshape(batch, -1, dim)], dim=1)
        source = None
        if self.trace_source:
            source = torch.eye(x.shape[1], dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1)
        tokens = Tokens(x, None, source)
        if trace is not None:
            trace.block_input = x
        for index, block in enumerate(self.blocks):
            tokens = self._run_block(index, block, tokens)
            if trace is not None:
                trace.block_outputs.append(tokens.x)
                frame_axis = frames if self.attention_type == "space_only" else 1
                trace.frames_patches.append((frame_axis, tokens.x.shape[1] - 1))
        if trace is not None:
            trace.source = tokens.source
        out = self.norm(tokens.x)
        if self.attention_type == "space_only":
            out = out.reshape(batch, -1, dim)
        return out

    def _encode_divided(self, cls: Tensor, patches: Tensor, trace: Optional[EncoderTrace]) -> Tensor:
        batch, frames, num_patches, dim = patches.shape
        # To patch-major (B, L, T, D): temporal attention then reads the stream without copies.
        patches = (patches + self._time_embed(frames)).transpose(1, 2).contiguous()
        cls = cls.expand(batch, 1, dim)
        frame_source = None
        if self.learnable_temporal_scaling:
            frame_source = torch.eye(frames, dtype=patches.dtype, device=patches.device).expand(batch, -1, -1)
        source = None
        if self.trace_source:
            count = num_patches * frames
            source = torch.eye(count, dtype=patches.dtype, device=patches.device)
            source = source.view(1, num_patches, frames, count).expand(batch, -1, -1, -1)
        tokens = VideoTokens(cls, patches, None, frame_source, source)
        if trace is not None:
            trace.block_input = _flatten_stream(tokens)
        for index, block in enumerate(self.blocks):
            tokens = self._run_block(index, block, tokens)
            if trace is not None:
                trace.block_outputs.append(_flatten_stream(tokens))
                trace.frames_patches.append((tokens.patches.shape[2], tokens.patches.shape[1]))
        if trace is not None and tokens.source is not None:
            trace.source = _source_with_cls(tokens.source)
        return self.norm(_flatten_stream(tokens))


def _flatten_stream(tokens: VideoTokens) -> Tensor:
    """[CLS] + patches in the published (patch-major, time-minor) order: (B, 1+L*T, D)."""
    batch, _, _, dim = tokens.patches.shape
    return torch.cat([tokens.cls, tokens.patches.reshape(batch, -1, dim)], dim=1)


def _source_with_cls(source: Tensor) -> Tensor:
    """(B, L, T, N0) patch membership -> (B, 1+L*T, 1+N0) with [CLS] standing for itself."""
    batch, patches, frames, count = source.shape
    with_cls = F.pad(source.reshape(batch, patches * frames, count), (1, 0, 1, 0))
    with_cls[:, 0, 0] = 1
    return with_cls


def build_video_encoder(config: dict) -> TimeSformer:
    """TimeSformer from the YAML config keys used by the released configs (``depth`` defaults
    to the released 12; the toy configs use fewer blocks)."""
    vit = config.get("vit", "timesformer")
    if vit != "timesformer":
        raise ValueError(f"config 'vit' must be 'timesformer' (the only video encoder), got {vit!r}")
    num_frames = config.get("num_frames", config.get("num_frm_train"))
    if num_frames is None:
        raise ValueError("config needs 'num_frames' (or 'num_frm_train') for the video encoder")
    return TimeSformer(
        img_size=config["image_size"],
        patch_size=config.get("patch_size", 16),
        embed_dim=config["vision_width"],
        num_heads=config["num_heads"],
        depth=config.get("depth", 12),
        num_frames=num_frames,
        attention_type=config.get("attention_type", "divided_space_time"),
        learnable_temporal_scaling=config.get("learnable_temporal_scaling", False),
        token_merging=config.get("token_merging", False),
        testa_r=config.get("testa_r", 0),
        merging_type=config.get("merging_type", "frame&patch"),
        prop_attn=config.get("prop_attn", False),
        grad_checkpointing=config.get("vit_grad_ckpt", False),
        ckpt_layer=config.get("vit_ckpt_layer", 0),
        drop_path_rate=config.get("drop_path_rate", 0.1),
    )
