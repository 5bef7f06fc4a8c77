"""TimeSformer video encoder with TESTA temporal-spatial token aggregation.

Token layout (divided space-time): one global [CLS] plus patch tokens held as a
(B, L, T, D) tensor, patch-major / time-minor, so that the flattened sequence
``[CLS] + patches.view(B, L*T, D)`` is the published order (token 1 + l*T + t is patch l
of frame t). Keeping [CLS] apart from the patches lets temporal attention read the
patches without a copy and avoids re-concatenating the stream in every block.

The blocks are in models/timesformer_blocks.py, the embedding resizing in models/embedding_resize.py;
`adapt_encoder_checkpoint` fits another encoder's weights to this one (models/checkpoint.py loads).
"""
import math
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from configs.keys import ConfigError, value
from models.budget import EncoderShape, MergePlan, plan_for, schedule_for_budget
from models.embedding_resize import resize_grid, resize_pos_embed, resize_time_embed
from models.pixels import normalize
from models.rules import resolve_rules
from models.schedule import ATTENTION_ALIASES, MERGING_TYPES, merge_schedule, warn_schedule_notes
from models.timesformer_blocks import DividedSpaceTimeBlock, MergeRules, Tokens, VideoTokens, ViTBlock, layer_norm
from runtime.distributed import is_main_process

ATTENTION_TYPES = ("divided_space_time", "space_only", "joint_space_time")


@dataclass
class EncoderTrace:
    """Intermediate results of one forward, for tests and analysis."""

    block_input: Optional[Tensor] = None  # residual stream entering block 0
    block_outputs: List[Tensor] = field(default_factory=list)  # stream after each block
    # (T, L) after each block; joint_space_time has one sequence: (1, patch tokens left)
    frames_patches: List[Tuple[int, int]] = field(default_factory=list)
    # Which input tokens each output token holds, when asked for: (B, rows of the output,
    # 1 + T0*L0), 1 where the row holds the input token; column 0 is [CLS], patch l of frame t
    # is column 1 + l*T0 + t (the published order) in every attention type.
    source: Optional[Tensor] = None
    block_sources: List[Tensor] = field(default_factory=list)  # the same after each block, if asked
    # How many input tokens each output token stands for: (B, rows of the output); [CLS] counts 1.
    size: Optional[Tensor] = None


class TimeSformer(nn.Module):
    """TimeSformer video encoder: (B, 3, T, H, W) -> (B, N, embed_dim), final LayerNorm applied."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.1,
                 num_frames=8, attention_type="divided_space_time",
                 learnable_temporal_scaling=False, token_merging=False, testa_r=0,
                 merging_type="frame&patch", prop_attn=False, trace_source=False,
                 grad_checkpointing=False, ckpt_layer=0, merge_rule="testa", merge_budget=None,
                 merge_token_budget=None, merge_seed=0):
        super().__init__()
        attention_type = ATTENTION_ALIASES.get(attention_type, attention_type)
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.embed_dim = embed_dim
        self.num_frames = num_frames
        self.in_chans = in_chans
        self.attention_type = attention_type
        self.trace_source = trace_source  # forward_with_trace's default for ``sources``
        self.grad_checkpointing = grad_checkpointing
        self.ckpt_layer = ckpt_layer
        divided = attention_type == "divided_space_time"
        self.learnable_temporal_scaling = learnable_temporal_scaling and divided
        schedule = merge_schedule(testa_r, merging_type, attention_type, depth, token_merging)
        rules = resolve_rules(merge_rule)
        if not divided:  # one token sequence: the rule named for space, else the one for time
            rules["space"] = rules["space"] if rules["space"].axes else rules["time"]
        # The axes a budget may reduce: those the rules reduce, within those merging_type allows.
        allowed = {"frame&patch": ("time", "space"), "frame": ("time",), "patch": ("space",)}[merging_type]
        self.budget_axes = tuple(axis for axis in ("time", "space")
                                 if rules[axis].axes and (axis in allowed if divided else axis == "space"))
        # An axis whose rule is `none` does not merge, whatever testa_r says.
        schedule = [(frame_r if rules["time"].axes and divided else 0, patch_r if rules["space"].axes else 0)
                    for frame_r, patch_r in schedule]
        self.merge_budget, self.merge_token_budget = merge_budget, merge_token_budget
        self._testa_schedule = schedule
        self._budget_schedules = {}  # (frames, patches, budget, token budget) -> schedule

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
                                            patch_r, frame_cap, prop_attn,
                                            MergeRules(rules["time"], rules["space"], index, depth, merge_seed))
                      for index, (rate, (frame_r, patch_r)) in enumerate(zip(rates, schedule))]
        else:
            blocks = [ViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, rate, patch_r, prop_attn,
                               MergeRules(rules["time"], rules["space"], index, depth, merge_seed))
                      for index, (rate, (_, patch_r)) in enumerate(zip(rates, schedule))]
        self.blocks = nn.ModuleList(blocks)
        self.norm = layer_norm(embed_dim)
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
        """Patch + position (+ time) embeddings -> cls (1, 1, D) and patches (B, T, L, D).

        video: uint8 clips as the loaders give them, normalised here on the model's device, or
        clips already normalised (float)."""
        if video.dim() != 5 or video.shape[1] != self.in_chans:
            raise ValueError(f"video must be (B, {self.in_chans}, T, H, W), got {tuple(video.shape)}")
        if video.dtype == torch.uint8:
            video = normalize(video, channel_dim=1)
        batch, chans, frames, height, width = video.shape
        patch = self.patch_embed.proj.kernel_size[0]
        if height % patch or width % patch:
            raise ValueError(f"video frames {height}x{width} are not multiples of patch size {patch}")
        x = self.patch_embed.proj(video.transpose(1, 2).reshape(batch * frames, chans, height, width))
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        # Nearest resize when the input's grid differs from the trained one.
        pos_patches = resize_grid(self.pos_embed[:, 1:], tuple(grid), mode="nearest")
        cls = self.cls_token + self.pos_embed[:, :1]
        patches = (x + pos_patches).view(batch, frames, -1, self.embed_dim)
        return cls, patches

    def _time_embed(self, frames: int) -> Tensor:
        """(1, T, 1, D): broadcast over the patches of each frame."""
        return resize_time_embed(self.time_embed, frames, mode="nearest")[:, :, None]

    # -- merge schedule
    @property
    def budgeted(self) -> bool:
        """Whether a budget, not `testa_r`, sets the schedule."""
        return self.merge_budget is not None or self.merge_token_budget is not None

    def set_merge_budget(self, budget: Optional[float], token_budget: Optional[float] = None) -> None:
        """Derive the schedule from a budget from the next forward on (None, None: back to `testa_r`).
        Training with `merge_budget_range` calls this every step."""
        self.merge_budget, self.merge_token_budget = budget, token_budget
        if not self.budgeted:
            self._set_schedule(self._testa_schedule)

    def schedule(self) -> List[Tuple[int, int]]:
        """The blocks' current (frames, patches) merge counts, before any clamping."""
        return [(block.frame_r, block.patch_r) if isinstance(block, DividedSpaceTimeBlock) else (0, block.merge_r)
                for block in self.blocks]

    def _set_schedule(self, schedule: List[Tuple[int, int]]) -> None:
        for block, (frame_r, patch_r) in zip(self.blocks, schedule):
            if isinstance(block, DividedSpaceTimeBlock):
                block.frame_r, block.patch_r = frame_r, patch_r
            else:
                block.merge_r = patch_r

    def _schedule_for(self, frames: int, patches: int) -> List[Tuple[int, int]]:
        """The budget's schedule for clips of `frames` x `patches` tokens (computed once per shape)."""
        key = (frames, patches, self.merge_budget, self.merge_token_budget)
        if key not in self._budget_schedules:
            self._budget_schedules[key] = schedule_for_budget(
                EncoderShape.of(self), frames, patches, self.budget_axes, self.merge_budget, self.merge_token_budget)
        return self._budget_schedules[key]

    def merge_plan(self, frames: int, patches: int) -> MergePlan:
        """What the encoder computes for clips of `frames` frames of `patches` patches: its schedule,
        counted GMACs against the unmerged encoder's, and the tokens that reach the text side."""
        schedule = self._schedule_for(frames, patches) if self.budgeted else self.schedule()
        return plan_for(EncoderShape.of(self), schedule, frames, patches, self.merge_budget)

    # -- forward
    def forward(self, video: Tensor) -> Tensor:
        return self._encode(video, None)

    def forward_with_trace(self, video: Tensor, sources: Optional[bool] = None,
                           block_sources: bool = False) -> Tuple[Tensor, EncoderTrace]:
        """Forward that also records the per-block streams and token counts.

        sources: also track which input tokens each output token holds (``trace.source``);
        None follows the encoder's ``trace_source``. block_sources: record that after every
        block as well (``trace.block_sources``, for per-block pictures; implies sources; each is
        dense: about 150 MB per block for one 32-frame 224 px clip).
        Plain ``forward`` never tracks: the source bookkeeping is skipped, not just discarded.
        """
        trace = EncoderTrace()
        track = block_sources or (self.trace_source if sources is None else sources)
        return self._encode(video, trace, track, block_sources), trace

    def _run_block(self, index: int, block: nn.Module, tokens):
        if self.grad_checkpointing and index >= len(self.blocks) - self.ckpt_layer and torch.is_grad_enabled():
            return checkpoint(block, tokens, use_reentrant=False)
        return block(tokens)

    def _encode(self, video: Tensor, trace: Optional[EncoderTrace], track_source: bool = False,
                every_block: bool = False) -> Tensor:
        cls, patches = self._embed(video)
        if self.budgeted:
            self._set_schedule(self._schedule_for(patches.shape[1], patches.shape[2]))
        if self.attention_type == "divided_space_time":
            return self._encode_divided(cls, patches, trace, track_source, every_block)
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
        if track_source:
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
                if every_block:
                    trace.block_sources.append(self._clip_source(tokens.source, batch, frames))
        if trace is not None:
            size = torch.ones_like(tokens.x[..., 0]) if tokens.size is None else tokens.size[..., 0]
            trace.size = size.reshape(batch, -1)
            if track_source:
                trace.source = self._clip_source(tokens.source, batch, frames)
        out = self.norm(tokens.x)
        if self.attention_type == "space_only":
            out = out.reshape(batch, -1, dim)
        return out

    def _clip_source(self, source: Tensor, batch: int, frames: int) -> Tensor:
        """A single-attention stream's source in the clip-wide layout of ``EncoderTrace.source``."""
        if self.attention_type == "space_only":
            return _per_frame_source_to_clip(source, batch, frames)
        return source

    def _encode_divided(self, cls: Tensor, patches: Tensor, trace: Optional[EncoderTrace],
                        track_source: bool, every_block: bool) -> Tensor:
        batch, frames, num_patches, dim = patches.shape
        # To patch-major (B, L, T, D): temporal attention then reads the stream without copies.
        patches = (patches + self._time_embed(frames)).transpose(1, 2).contiguous()
        cls = cls.expand(batch, 1, dim)
        frame_source = None
        if self.learnable_temporal_scaling:
            frame_source = torch.eye(frames, dtype=patches.dtype, device=patches.device).expand(batch, -1, -1)
        source = None
        if track_source:
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
                if every_block:
                    trace.block_sources.append(_source_with_cls(tokens.source))
        if trace is not None:
            size = torch.ones_like(tokens.patches[..., 0]) if tokens.size is None else tokens.size[..., 0]
            trace.size = torch.cat([size.new_ones(batch, 1), size.reshape(batch, -1)], dim=1)
            if track_source:
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


def _per_frame_source_to_clip(source: Tensor, batch: int, frames: int) -> Tensor:
    """space_only: (B*T, n, 1+L) per-frame memberships -> (B, T*n, 1+L*T) over the whole clip.

    Rows follow the encoder's output (frame-major); every frame's [CLS] holds column 0.
    """
    _, tokens, columns = source.shape
    per_frame = source.reshape(batch, frames, tokens, columns)
    same_frame = torch.eye(frames, dtype=source.dtype, device=source.device)
    # (B, T, n, L, T'): a token of frame t holds patch l of frame t' only when t' == t.
    patches = per_frame[..., 1:, None] * same_frame[None, :, None, None, :]
    patches = patches.reshape(batch, frames * tokens, (columns - 1) * frames)
    return torch.cat([per_frame[..., :1].reshape(batch, frames * tokens, 1), patches], dim=2)


def build_video_encoder(config: dict, verbose: bool = True) -> TimeSformer:
    """TimeSformer from the YAML config keys used by the released configs (``depth`` defaults
    to the released 12; the toy configs use fewer blocks). `verbose`: say the merge plan or where
    the encoder departs from `testa_r`, on stderr."""
    def get(name):
        return value(config, name, "the video encoder")

    if get("vit") != "timesformer":
        raise ConfigError(f"config 'vit' must be 'timesformer' (the only video encoder), got {get('vit')!r}")
    encoder = TimeSformer(
        img_size=get("image_size"), patch_size=get("patch_size"), embed_dim=get("vision_width"),
        num_heads=get("num_heads"), depth=get("depth"), num_frames=get("num_frames"),
        attention_type=get("attention_type"), learnable_temporal_scaling=get("learnable_temporal_scaling"),
        token_merging=get("token_merging"), testa_r=get("testa_r"), merging_type=get("merging_type"),
        prop_attn=get("prop_attn"), grad_checkpointing=get("vit_grad_ckpt"), ckpt_layer=get("vit_ckpt_layer"),
        drop_path_rate=get("drop_path_rate"), merge_rule=get("merge_rule"), merge_budget=get("merge_budget"),
        merge_token_budget=get("merge_token_budget"), merge_seed=get("merge_seed"),
    )
    if encoder.budgeted:
        check_merge_plans(config, encoder, say=verbose)
    elif verbose:
        warn_schedule_notes(config)
    return encoder


def check_merge_plans(config: dict, encoder: TimeSformer, say: bool = True) -> None:
    """A budget out of reach for the config's clips is a ConfigError before any work; with `say`, the
    schedule it resolves to and its counted GMACs, one line per clip length (rank 0)."""
    patches = (value(config, "image_size") // value(config, "patch_size")) ** 2
    for frames in dict.fromkeys(config[name] for name in ("num_frm_train", "num_frm_test") if config.get(name)):
        try:
            plan = encoder.merge_plan(frames, patches)
        except ValueError as error:
            raise ConfigError(f"merge_budget {encoder.merge_budget}, merge_token_budget "
                              f"{encoder.merge_token_budget}: {error}") from None
        if say and is_main_process():
            print(f"merge plan ({value(config, 'merge_rule')}, clips of {frames} frames): {plan.describe()}",
                  file=sys.stderr, flush=True)


def adapt_encoder_checkpoint(state_dict: dict, model_state: dict, prefix: str = "") -> dict[str, list[str]]:
    """Fit the video-encoder tensors of a checkpoint (keys under `prefix`) to the encoder whose
    state is `model_state`, in `state_dict` itself: ``pos_embed`` resized over the patch grid,
    ``time_embed`` and ``temporal_scaling`` along time, and an image checkpoint's missing temporal
    attention started as each block's spatial one. Returns what changed, by kind."""
    changes = {"resized": [], "initialised_from_spatial": []}
    key = prefix + "pos_embed"
    if key in state_dict and state_dict[key].shape != model_state[key].shape:
        new_grid = math.isqrt(model_state[key].shape[1] - 1)
        old_grid = math.isqrt(state_dict[key].shape[1] - 1)
        state_dict[key] = resize_pos_embed(state_dict[key], new_grid)
        changes["resized"].append(f"{key} grid {old_grid}->{new_grid}")
    temporal = [prefix + "time_embed"] + [k for k in state_dict if k.startswith(prefix) and k.endswith("temporal_scaling")]
    for key in temporal:
        if key in state_dict and key in model_state and state_dict[key].shape != model_state[key].shape:
            frames = model_state[key].shape[1]
            changes["resized"].append(f"{key} frames {state_dict[key].shape[1]}->{frames}")
            state_dict[key] = resize_time_embed(state_dict[key], frames)
    for key in [k for k in state_dict if k.startswith(prefix + "blocks.")]:
        for spatial, temporal_name in ((".attn.", ".temporal_attn."), (".norm1.", ".temporal_norm1.")):
            if spatial in key:
                target = key.replace(spatial, temporal_name)
                if target in model_state and target not in state_dict:
                    state_dict[target] = state_dict[key].clone()
                    changes["initialised_from_spatial"].append(target)
    return changes
