"""TimeSformer's transformer blocks with token aggregation between their sub-layers.

``DividedSpaceTimeBlock`` (divided space-time attention, frame and patch merging) and ``ViTBlock``
(one attention over all tokens, merging over each sequence, for space_only and joint_space_time), plus
the attention they share and the stochastic depth they apply. Which tokens merge is a rule's decision
(models/rules; TESTA's by default); how they merge is models/merge.py. models/timesformer.py stacks
the blocks into the encoder. Attribute names are the state-dict names of the released checkpoints.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.embedding_resize import resize_time_embed
from models.merge import Matching, apply_matching, clamp_r, merge_weighted
from models.rules import RULES, MergeContext, Rule


# ----------------------------------------------------------------------------- layers
class Mlp(nn.Module):
    """fc1 -> GELU -> fc2. Written here: timm's identical layer costs every process about 1.5 s
    and 2,700 imported modules."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path_mask(batch: int, rate: float, training: bool, like: Tensor) -> Optional[Tensor]:
    """Stochastic depth: per-sample keep mask scaled by 1/keep, or None when nothing drops.

    One mask per residual branch, so a sample's [CLS] and patches drop together (which is why
    timm's ``DropPath``, one mask per call, is not used).
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

    def forward(self, x: Tensor, log_size: Optional[Tensor] = None, return_keys: bool = False,
                return_attention: bool = False) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """``log_size`` (M, 1, 1, n) is added to the logits (proportional attention).

        Returns the projected output, if asked the merge metric (M, n, hd): the keys summed over
        heads (summing points the same way as averaging, and the metric is only used through
        cosine similarity, so this saves a division pass), and if asked the attention map averaged
        over heads (M, n, n), for rules that read it.
        """
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attention = None
        if return_attention:
            logits = (query * query.shape[-1] ** -0.5) @ key.transpose(-2, -1)
            probabilities = (logits if log_size is None else logits + log_size).softmax(dim=-1)
            out = probabilities @ value
            attention = probabilities.mean(dim=1)
        else:
            # Strided views on purpose, and SDPA's default backend: on CPU (fp32, head dim 64,
            # sequences of 8-197 tokens) the flash kernel is 2-11x faster than the math backend
            # or explicit matmul+softmax, and copying q/k/v contiguous costs more than it saves.
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=log_size)
        out = self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        return out, (key.sum(dim=1) if return_keys else None), attention


def layer_norm(dim: int) -> nn.LayerNorm:
    """TimeSformer's LayerNorm (eps 1e-6)."""
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
    source: Optional[Tensor]  # (B, L, T, L0*T0) original patches per token, when traced


class Tokens(NamedTuple):
    """Residual stream of plain ViT blocks: token 0 of every sequence is a [CLS]."""

    x: Tensor  # (M, n, D)
    size: Optional[Tensor]  # (M, n, 1)
    source: Optional[Tensor]  # (M, n, n0)


def _ones_like_tokens(x: Tensor) -> Tensor:
    return x.new_ones(x.shape[:-1] + (1,))


class MergeRules(NamedTuple):
    """A block's rules and where it sits: what a rule's MergeContext is made of."""

    time: Rule
    space: Rule
    block_index: int
    depth: int
    seed: int

    def context(self, axis: str, protected: int, attention: Optional[Tensor], like: Tensor) -> MergeContext:
        generator = None
        if getattr(self, axis).needs_generator:
            generator = torch.Generator(like.device).manual_seed(self.seed + 2 * self.block_index + (axis == "space"))
        return MergeContext(protected, attention, generator, self.block_index / self.depth)


TESTA_RULES = MergeRules(RULES["testa"], RULES["testa"], 0, 1, 0)


class DividedSpaceTimeBlock(nn.Module):
    """Temporal attention -> [frame merge] -> spatial attention -> [patch merge] -> MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 drop_path_rate: float, num_frames: int, learnable_temporal_scaling: bool,
                 frame_r: int, patch_r: int, frame_cap_protected: int, prop_attn: bool,
                 rules: MergeRules = TESTA_RULES):
        super().__init__()
        # Registered first so the state-dict order matches the released checkpoints.
        self.temporal_scaling = (nn.Parameter(torch.zeros(1, num_frames, 1))
                                 if learnable_temporal_scaling else None)
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.temporal_norm1 = layer_norm(dim)
        self.temporal_attn = Attention(dim, num_heads, qkv_bias)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate
        self.frame_r = frame_r
        self.patch_r = patch_r
        self.frame_cap_protected = frame_cap_protected
        self.prop_attn = prop_attn
        self.rules = rules

    def _drop_mask(self, like: Tensor) -> Optional[Tensor]:
        return drop_path_mask(like.shape[0], self.drop_path_rate, self.training, like)

    def frame_scale(self, frame_source: Tensor) -> Tensor:
        """Per-sample (B, T) temporal scaling: the mean over the original frames of each frame."""
        scale = torch.tanh(resize_time_embed(self.temporal_scaling, frame_source.shape[-1])) + 1
        return (frame_source @ scale[0]).squeeze(-1) / frame_source.sum(-1)

    def forward(self, tokens: VideoTokens) -> VideoTokens:
        cls, patches, size, frame_source, source = tokens
        frame_r = clamp_r(self.frame_r, patches.shape[2], self.frame_cap_protected)
        patches, keys, attention = self._temporal_attention(
            patches, size, frame_source, return_keys=frame_r > 0,
            return_attention=frame_r > 0 and self.rules.time.needs_attention)
        if frame_r:
            patches, size, frame_source, source = self._merge_frames(patches, size, frame_source, source,
                                                                     keys, attention, frame_r)
        patch_r = clamp_r(self.patch_r, patches.shape[1])
        cls, patches, keys, attention = self._spatial_attention(
            cls, patches, size, return_keys=patch_r > 0,
            return_attention=patch_r > 0 and self.rules.space.needs_attention)
        if patch_r:
            patches, size, source = self._merge_patches(patches, size, source, keys, attention, patch_r)
        keep = self._drop_mask(patches)
        cls = cls + drop_path(self.mlp(self.norm2(cls)), keep)
        patches = patches + drop_path(self.mlp(self.norm2(patches)), keep)
        return VideoTokens(cls, patches, size, frame_source, source)

    def _temporal_attention(self, patches: Tensor, size: Optional[Tensor], frame_source: Optional[Tensor],
                            return_keys: bool, return_attention: bool):
        """Attention over the frames of each patch position; returns the stream, the merge metric and,
        if asked, the attention between frames averaged over heads and patch positions (B, T, T)."""
        batch, num_patches, num_frames, dim = patches.shape
        log_size = _log_size(None if size is None else size.view(-1, num_frames), self.prop_attn)
        attended, keys, attention = self.temporal_attn(
            self.temporal_norm1(patches).view(-1, num_frames, dim), log_size, return_keys=return_keys,
            return_attention=return_attention)
        if attention is not None:
            attention = attention.view(batch, num_patches, num_frames, num_frames).mean(dim=1)
        attended = attended.view(batch, num_patches, num_frames, dim)
        if self.temporal_scaling is not None:
            attended = attended * self.frame_scale(frame_source)[:, None, :, None]
        patches = patches + drop_path(self.temporal_fc(attended), self._drop_mask(patches))
        return patches, keys, attention

    def _merge_frames(self, patches: Tensor, size: Optional[Tensor], frame_source: Optional[Tensor],
                      source: Optional[Tensor], keys: Tensor, attention: Optional[Tensor], frame_r: int):
        """Frame aggregation: ``frame_r`` whole frames merged, the same frames at every patch position."""
        batch, num_patches, num_frames, _ = patches.shape
        matching = self.rules.time.match_frames(keys.view(batch, num_patches, num_frames, -1), frame_r,
                                                self.rules.context("time", 0, attention, patches))
        along_time = matching.broadcast(lambda index: index[:, None, :, None])
        size = _ones_like_tokens(patches) if size is None else size
        patches, size = merge_weighted(patches, size, along_time, dim=2)
        if source is not None:
            source = apply_matching(source, along_time, dim=2)
        if frame_source is not None:
            frame_source = apply_matching(
                frame_source, matching.broadcast(lambda index: index[:, :, None]), dim=1)
        return patches, size, frame_source, source

    def _spatial_attention(self, cls: Tensor, patches: Tensor, size: Optional[Tensor],
                           return_keys: bool, return_attention: bool):
        """Attention within each frame, the global [CLS] copied into every frame and then averaged back."""
        batch, num_patches, num_frames, dim = patches.shape
        frames = patches.new_empty(batch, num_frames, 1 + num_patches, dim)
        frames[:, :, :1] = cls[:, None]
        frames[:, :, 1:] = patches.transpose(1, 2)
        log_size = None
        if self.prop_attn and size is not None:
            frame_sizes = size.squeeze(-1).transpose(1, 2).reshape(-1, num_patches)
            log_size = _log_size(F.pad(frame_sizes, (1, 0), value=1.0), True)
        attended, keys, attention = self.attn(self.norm1(frames.view(-1, 1 + num_patches, dim)), log_size,
                                              return_keys=return_keys, return_attention=return_attention)
        attended = drop_path(attended.view(batch, num_frames, 1 + num_patches, dim), self._drop_mask(patches))
        cls = cls + attended[:, :, 0].mean(dim=1, keepdim=True)
        patches = patches + attended[:, :, 1:].transpose(1, 2)
        return cls, patches, keys, attention

    def _merge_patches(self, patches: Tensor, size: Optional[Tensor], source: Optional[Tensor], keys: Tensor,
                       attention: Optional[Tensor], patch_r: int):
        """Patch aggregation inside each frame, the same count in every frame ([CLS] protected, then left out)."""
        batch, _, num_frames, _ = patches.shape
        matching = self.rules.space.match(keys, patch_r, self.rules.context("space", 1, attention, patches))
        per_frame = _drop_first_token(matching).broadcast(
            lambda index: index.view(batch, num_frames, -1).transpose(1, 2)[..., None])
        size = _ones_like_tokens(patches) if size is None else size
        patches, size = merge_weighted(patches, size, per_frame, dim=1)
        if source is not None:
            source = apply_matching(source, per_frame, dim=1)
        return patches, size, source


def _drop_first_token(matching: Matching) -> Matching:
    """Re-index a matching made over [CLS] + patches (CLS kept first) to the patches alone."""
    return Matching(matching.output_rows[:, 1:] - 1, matching.merged_rows - 1,
                    matching.merged_slots - 1)


class ViTBlock(nn.Module):
    """Plain pre-norm transformer block with ToMe between attention and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 drop_path_rate: float, merge_r: int, prop_attn: bool, rules: MergeRules = TESTA_RULES):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate
        self.merge_r = merge_r
        self.prop_attn = prop_attn
        self.rules = rules

    def forward(self, tokens: Tokens) -> Tokens:
        x, size, source = tokens
        merge_r = clamp_r(self.merge_r, x.shape[1], num_protected=1)
        log_size = _log_size(None if size is None else size.squeeze(-1), self.prop_attn)
        attended, keys, attention = self.attn(self.norm1(x), log_size, return_keys=merge_r > 0,
                                              return_attention=merge_r > 0 and self.rules.space.needs_attention)
        x = x + drop_path(attended, drop_path_mask(x.shape[0], self.drop_path_rate, self.training, x))
        if merge_r:
            matching = self.rules.space.match(keys, merge_r, self.rules.context("space", 1, attention, x))
            along_tokens = matching.broadcast(lambda index: index[..., None])
            size = _ones_like_tokens(x) if size is None else size
            x, size = merge_weighted(x, size, along_tokens, dim=1)
            if source is not None:
                source = apply_matching(source, along_tokens, dim=1)
        keep = drop_path_mask(x.shape[0], self.drop_path_rate, self.training, x)
        x = x + drop_path(self.mlp(self.norm2(x)), keep)
        return Tokens(x, size, source)
