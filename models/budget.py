"""Token budgets: the merge schedule that gives a video encoder a chosen cost, counted analytically.

A budget says how much of the unmerged encoder's compute a clip may use (``budget``, a fraction of its
multiply-accumulates) and, optionally, what fraction of the patch tokens reach the text side
(``token_budget``). ``schedule_for_budget`` turns that into the per-block ``(frame_r, patch_r)`` schedule
the encoder's blocks read (models/timesformer_blocks.py), already within the clamps they apply
(models/merge.py: clamp_r), so the encoder merges exactly what the plan says.

Everything here is arithmetic on token counts: no module is run, so a plan for a 224 px, 32-frame clip
takes milliseconds, and is cached per clip shape and budget.
"""
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

from models.merge import clamp_r

ATTENTION_TYPES = ("divided_space_time", "space_only", "joint_space_time")
AXES = ("time", "space")
TIME, SPACE = 0, 1  # index of each axis in a (frame_r, patch_r) schedule entry and in a token count
TOLERANCE = 0.02  # relative: a schedule meets ``budget`` when |cost / budget - 1| <= TOLERANCE
SEARCH_STEPS = 48  # bisection halvings: far below one token's worth of cost on any clip
REFINE_STEPS = 256  # single-merge adjustments at most, after the bisection

Schedule = List[Tuple[int, int]]


@dataclass(frozen=True)
class EncoderShape:
    """What the cost of a TimeSformer encoder depends on (hashable: plans are cached by it)."""

    embed_dim: int
    depth: int
    mlp_hidden: int
    patch_size: int
    in_chans: int
    attention_type: str  # "divided_space_time" | "space_only" | "joint_space_time"
    frame_cap_protected: int  # frames kept out of the frame-merge cap (1 with frame&patch merging)

    def __post_init__(self):
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {self.attention_type!r}")

    @classmethod
    def of(cls, encoder) -> "EncoderShape":
        """The shape of a ``models.timesformer.TimeSformer`` (read from its attributes and blocks)."""
        first = encoder.blocks[0]
        return cls(embed_dim=encoder.embed_dim, depth=len(encoder.blocks), mlp_hidden=first.mlp.fc1.out_features,
                   patch_size=encoder.patch_embed.proj.kernel_size[0], in_chans=encoder.in_chans,
                   attention_type=encoder.attention_type,
                   frame_cap_protected=getattr(first, "frame_cap_protected", 0))

    @property
    def divided(self) -> bool:
        return self.attention_type == "divided_space_time"


# ----------------------------------------------------------------------------- token counts
def _start(shape: EncoderShape, frames: int, patches: int) -> Tuple[int, int]:
    """(time, space) counts entering block 1, in the layout of ``EncoderTrace.frames_patches``:
    divided (frames, patches per frame), space_only (sequences = frames, patches per sequence),
    joint_space_time (one sequence, all patches)."""
    if frames < 1 or patches < 1:
        raise ValueError(f"clips need at least 1 frame and 1 patch, got {frames} frames x {patches} patches")
    if shape.attention_type == "joint_space_time":
        return 1, frames * patches
    return frames, patches


def _merges(shape: EncoderShape, axis: int, r: int, count: int) -> int:
    """Merges a block does when asked for ``r`` along ``axis`` with ``count`` tokens: the blocks' clamps."""
    if axis == TIME:
        return clamp_r(r, count, shape.frame_cap_protected) if shape.divided else 0
    if shape.divided:
        return clamp_r(r, count)
    return clamp_r(r, 1 + count, num_protected=1)  # the sequence's [CLS] never merges


def _most_before(shape: EncoderShape, axis: int, count: int) -> int:
    """Largest count from which one block can merge down to ``count`` (the inverse of ``_merges``'s cap:
    n - (n - p) // 2 <= count  <=>  n <= 2 * count - p)."""
    protected = shape.frame_cap_protected if axis == TIME and shape.divided else 0
    return max(count, 2 * count - protected)


def _check_schedule(shape: EncoderShape, schedule: Sequence[Tuple[int, int]]) -> None:
    if len(schedule) != shape.depth:
        raise ValueError(f"a schedule needs one (frame_r, patch_r) per block: {shape.depth}, got {len(schedule)}")


def token_counts(shape: EncoderShape, schedule: Sequence[Tuple[int, int]], frames: int,
                 patches: int) -> List[Tuple[int, int]]:
    """(T, L) after each block, as ``EncoderTrace.frames_patches`` records it, with the blocks' clamps.

    Divided: (frames, patches per frame); space_only: (frames, patches left per frame); joint_space_time:
    (1, patch tokens left). Single-attention blocks read only patch_r, as the encoder does.
    """
    _check_schedule(shape, schedule)
    counts = list(_start(shape, frames, patches))
    after = []
    for block in schedule:
        for axis in (TIME, SPACE):
            counts[axis] -= _merges(shape, axis, block[axis], counts[axis])
        after.append((counts[TIME], counts[SPACE]))
    return after


def applied_schedule(shape: EncoderShape, schedule: Sequence[Tuple[int, int]], frames: int,
                     patches: int) -> Schedule:
    """The merges the encoder actually does for ``schedule``: equal to it exactly when it is feasible."""
    before = _start(shape, frames, patches)
    applied = []
    for after in token_counts(shape, schedule, frames, patches):
        applied.append((before[TIME] - after[TIME], before[SPACE] - after[SPACE]))
        before = after
    return applied


# ----------------------------------------------------------------------------- cost
def _block_macs(shape: EncoderShape, before: Tuple[int, int], after: Tuple[int, int]) -> int:
    """Multiply-accumulates of one block going from ``before`` to ``after`` token counts."""
    dim, mlp = shape.embed_dim, 2 * shape.embed_dim * shape.mlp_hidden  # mlp: fc1 + fc2 per token
    projections = 4 * dim * dim  # qkv + output projection per token
    if not shape.divided:
        sequences, tokens_in = before[TIME], 1 + before[SPACE]
        attention = sequences * (projections * tokens_in + 2 * tokens_in * tokens_in * dim)
        return attention + mlp * sequences * (1 + after[SPACE])
    frames_in, patches_in = before
    frames_mid, patches_out = after  # frames after this block's frame merge, patches after its patch merge
    # Temporal attention: one sequence of frames_in per patch position, then temporal_fc.
    temporal = patches_in * frames_in * (projections + dim * dim) + 2 * patches_in * frames_in * frames_in * dim
    # Spatial attention: [CLS] + patches_in in each merged frame.
    frame_tokens = 1 + patches_in
    spatial = frames_mid * (projections * frame_tokens + 2 * frame_tokens * frame_tokens * dim)
    return temporal + spatial + mlp * (1 + frames_mid * patches_out)  # the global [CLS] runs the MLP once


def encoder_macs(shape: EncoderShape, schedule: Sequence[Tuple[int, int]], frames: int, patches: int) -> int:
    """Multiply-accumulates of one clip's forward through the encoder under ``schedule``.

    Counts the patch-embedding conv and, per block, the linear layers, the attention products (QK^T
    and attention @ V) and temporal_fc, on the tokens each sub-layer sees. Leaves out what is small
    beside them: LayerNorm, GELU, softmax, biases and the merge decisions.
    """
    before = _start(shape, frames, patches)
    macs = frames * patches * shape.embed_dim * shape.in_chans * shape.patch_size ** 2
    for after in token_counts(shape, schedule, frames, patches):
        macs += _block_macs(shape, before, after)
        before = after
    return macs


def _unmerged(shape: EncoderShape) -> Schedule:
    return [(0, 0)] * shape.depth


def _tokens_out(shape: EncoderShape, schedule: Sequence[Tuple[int, int]], frames: int, patches: int) -> int:
    """Patch tokens of one clip after the last block (what the text side reads, [CLS] aside)."""
    time, space = (token_counts(shape, schedule, frames, patches) or [_start(shape, frames, patches)])[-1]
    return time * space


# ----------------------------------------------------------------------------- plans
@dataclass
class MergePlan:
    """A schedule with what it costs and what it keeps, per clip."""

    schedule: Schedule
    macs: int
    unmerged_macs: int
    tokens_out: int  # patch tokens after the last block
    tokens_in: int  # patch tokens entering block 1
    budget: Optional[float] = None  # the cost budget the schedule was made for, if any

    @property
    def cost_fraction(self) -> float:
        return self.macs / self.unmerged_macs

    @property
    def token_fraction(self) -> float:
        return self.tokens_out / self.tokens_in

    def fields(self, digits: Optional[int] = None) -> dict:
        """What a result records of the plan: the schedule, counted GMACs, cost and token fractions
        (rounded to `digits`, when given)."""
        number = (lambda x: x) if digits is None else (lambda x: round(x, digits))
        return {"schedule": [list(block) for block in self.schedule], "gmacs": number(self.macs / 1e9),
                "unmerged_gmacs": number(self.unmerged_macs / 1e9), "cost_fraction": number(self.cost_fraction),
                "tokens_out": self.tokens_out, "token_fraction": number(self.token_fraction)}

    def describe(self) -> str:
        """One line for logs: cost, tokens kept and the schedule."""
        frames = ",".join(str(frame_r) for frame_r, _ in self.schedule)
        patches = ",".join(str(patch_r) for _, patch_r in self.schedule)
        head = "" if self.budget is None else f"budget {self.budget:.2f}: "
        return (f"{head}{self.macs / 1e9:.3g} of {self.unmerged_macs / 1e9:.3g} GMACs ({self.cost_fraction:.1%}), "
                f"{self.tokens_out} of {self.tokens_in} patch tokens reach the text side ({self.token_fraction:.1%}), "
                f"schedule frames [{frames}] patches [{patches}]")


def plan_for(shape: EncoderShape, schedule: Sequence[Tuple[int, int]], frames: int, patches: int,
             budget: Optional[float] = None) -> MergePlan:
    """The MergePlan of ``schedule`` on clips of ``frames`` x ``patches``."""
    return MergePlan(schedule=[tuple(block) for block in schedule],
                     macs=encoder_macs(shape, schedule, frames, patches),
                     unmerged_macs=encoder_macs(shape, _unmerged(shape), frames, patches),
                     tokens_out=_tokens_out(shape, schedule, frames, patches), tokens_in=frames * patches,
                     budget=budget)


# ----------------------------------------------------------------------------- schedules for a budget
def schedule_for_budget(shape: EncoderShape, frames: int, patches: int, axes: Sequence[str],
                        budget: Optional[float] = None, token_budget: Optional[float] = None) -> Schedule:
    """The per-block (frame_r, patch_r) that meets ``budget`` and/or ``token_budget``, feasible as given.

    ``axes``: which of ("time", "space") merge. In space_only and joint_space_time "space" is each
    sequence's tokens and "time" is ignored. ``budget`` (0, 1]: encoder_macs as a fraction of the
    unmerged encoder's, met within TOLERANCE (relative) wherever reachable. ``token_budget`` (0, 1]:
    the fraction of patch tokens left after the last block.

    Shape family: along each reduced axis the kept share of tokens after block l is
    ``1 - (1 - a) * (l / depth) ** gamma``, with a = f for one axis and a = sqrt(f) for each of two
    (the final token fraction f split equally). gamma = 1 merges a constant number per block, the shape
    of TESTA's published schedules; smaller gamma merges earlier (cheaper), larger later (dearer).
      - only ``budget``: gamma = 1 and f found by bisection; when even f = 0 costs too much, f = 0 and
        gamma < 1 found by bisection (gamma -> 0 is merging as much as the clamps allow, every block).
      - only ``token_budget``: f = token_budget, gamma = 1.
      - both: f = token_budget, gamma found by bisection.
    Target counts are rounded per block and turned into merges by differences, within the clamps (at
    most half the mergeable tokens per block; frames never below what the frame cap keeps), merging
    earlier than the curve only where the clamps would otherwise miss the final count. If the result
    misses ``budget`` by more than TOLERANCE, single-merge moves (one merge moved to a neighbouring block;
    without ``token_budget`` also one merge more or less in a block) are taken while they help.

    Raises ValueError, in one line, when the budget is out of reach for these axes and clip size.
    Cached: the arguments are hashable and the answer depends on nothing else.
    """
    axes = tuple(axes)
    unknown = [axis for axis in axes if axis not in AXES]
    if unknown:
        raise ValueError(f"axes must be drawn from {AXES}, got {axes}")
    if budget is None and token_budget is None:
        raise ValueError("schedule_for_budget needs a budget, a token_budget or both")
    for name, fraction in (("budget", budget), ("token_budget", token_budget)):
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {fraction}")
    reduced = tuple(axis for axis, name in ((TIME, "time"), (SPACE, "space"))
                    if name in axes and (shape.divided or axis == SPACE))
    return list(_solve(shape, frames, patches, reduced, budget, token_budget))


@lru_cache(maxsize=1024)
def _solve(shape: EncoderShape, frames: int, patches: int, reduced: Tuple[int, ...], budget: Optional[float],
           token_budget: Optional[float]) -> Tuple[Tuple[int, int], ...]:
    start = _start(shape, frames, patches)
    unmerged_macs = encoder_macs(shape, _unmerged(shape), frames, patches)

    def cost(schedule: Schedule) -> float:
        return encoder_macs(shape, schedule, frames, patches) / unmerged_macs

    where = f"for axes {_axis_names(reduced)} on {shape.attention_type} clips of {frames} frames x {patches} patches"
    if token_budget is not None:
        _check_token_budget(shape, start, reduced, token_budget, where)
    if budget is None:
        return tuple(_family(shape, start, reduced, token_budget, 1.0, exact_final=True))
    if budget == 1 and token_budget is None:
        return tuple(_unmerged(shape))

    if token_budget is None:
        # One monotone knob s in [0, 2]: s <= 1 is (f = 0, gamma = s), s >= 1 is (f = s - 1, gamma = 1).
        def schedule_at(s: float) -> Schedule:
            return _family(shape, start, reduced, max(s - 1, 0.0), min(s, 1.0), exact_final=False)
        knob_range, condition = (0.0, 2.0), ""
    else:
        # gamma = s / (1 - s): s = 0 merges as early as the clamps allow, s = 1 only at the end.
        def schedule_at(s: float) -> Schedule:
            return _family(shape, start, reduced, token_budget, s / (1 - s) if s < 1 else math.inf,
                           exact_final=True)
        knob_range, condition = (0.0, 1.0), f" with token_budget {token_budget:g}"

    lowest, highest = (cost(schedule_at(s)) for s in knob_range)
    if lowest > budget * (1 + TOLERANCE):
        raise ValueError(f"budget {budget:g} is below the lowest reachable cost fraction {lowest:.4f} "
                         f"{where}{condition}")
    if highest < budget * (1 - TOLERANCE):
        raise ValueError(f"budget {budget:g} is above the highest reachable cost fraction {highest:.4f} "
                         f"{where}{condition}")
    schedule = _bisect(schedule_at, cost, budget, *knob_range)
    return tuple(_refine(shape, frames, patches, reduced, schedule, cost, budget,
                         keep_final=token_budget is not None))


def _axis_names(reduced: Tuple[int, ...]) -> Tuple[str, ...]:
    return tuple(AXES[axis] for axis in reduced)


def _check_token_budget(shape: EncoderShape, start: Tuple[int, int], reduced: Tuple[int, ...],
                        token_budget: float, where: str) -> None:
    """token_budget is reachable when every reduced axis can merge down to its equal share of it."""
    if token_budget == 1:
        return
    floors = [_greedy_counts(shape, axis, start[axis])[-1] for axis in reduced]
    keep = token_budget ** (1 / len(reduced)) if reduced else 1.0
    if not reduced or any(_rounded(start[axis] * keep) < floor for axis, floor in zip(reduced, floors)):
        lowest = max((floor / start[axis] for axis, floor in zip(reduced, floors)), default=1.0) ** len(reduced)
        raise ValueError(f"token_budget {token_budget:g} is below the lowest reachable token fraction {lowest:.4f} "
                         f"{where} (each reduced axis keeping an equal share)")


def _rounded(count: float) -> int:
    """Half up, the same on every platform (round() goes to even)."""
    return math.floor(count + 0.5)


def _greedy_counts(shape: EncoderShape, axis: int, count: int) -> List[int]:
    """Counts along ``axis`` entering each block and after the last when every block merges all it may."""
    counts = [count]
    for _ in range(shape.depth):
        counts.append(counts[-1] - _merges(shape, axis, counts[-1], counts[-1]))
    return counts


def _family(shape: EncoderShape, start: Tuple[int, int], reduced: Tuple[int, ...], final_fraction: float,
            gamma: float, exact_final: bool) -> Schedule:
    """The schedule of the shape family (see schedule_for_budget) for final token fraction f and gamma."""
    merges = {axis: [0] * shape.depth for axis in (TIME, SPACE)}
    for axis in reduced:
        keep = final_fraction ** (1 / len(reduced))
        merges[axis] = _axis_merges(shape, axis, start[axis], keep, gamma, exact_final)
    return list(zip(merges[TIME], merges[SPACE]))


def _axis_merges(shape: EncoderShape, axis: int, count: int, keep: float, gamma: float,
                 exact_final: bool) -> List[int]:
    """Per-block merges along one axis that follow the kept share 1 - (1 - keep) * (l / depth) ** gamma.

    The curve is held above what merging all it may reaches by each block, then lowered, backwards,
    wherever the clamps could not bring it down to the next block's count in time. That is done on
    real counts first, so the forced run of halvings near a small final count grows smoothly with
    ``keep`` (the cost stays nearly continuous for the bisection), then again on the rounded counts,
    so every difference is within the clamp. exact_final: end on the rounded final count itself.
    """
    depth = shape.depth
    floors = _greedy_counts(shape, axis, count)
    curve = [max(floors[block], count * (1 - (1 - keep) * (block / depth) ** gamma)) for block in range(depth + 1)]
    curve[0] = count
    if exact_final:
        curve[depth] = max(floors[depth], _rounded(count * keep))
    counts = _reachable(shape, axis, [_rounded(value) for value in _reachable(shape, axis, curve)])
    return [before - after for before, after in zip(counts, counts[1:])]


def _reachable(shape: EncoderShape, axis: int, counts: list) -> list:
    """``counts`` lowered, from the last block back, to where one block's merges can reach the next."""
    counts = list(counts)
    for block in range(len(counts) - 2, -1, -1):
        counts[block] = min(counts[block], _most_before(shape, axis, counts[block + 1]))
    return counts


def _bisect(schedule_at, cost, budget: float, low: float, high: float) -> Schedule:
    """The schedule closest to ``budget`` along a knob whose cost rises with it."""
    best, best_miss = None, math.inf
    for _ in range(SEARCH_STEPS):
        middle = (low + high) / 2
        schedule = schedule_at(middle)
        spent = cost(schedule)
        if abs(spent - budget) < best_miss:
            best, best_miss = schedule, abs(spent - budget)
        if spent > budget:
            high = middle
        else:
            low = middle
    for knob in (low, high):
        schedule = schedule_at(knob)
        if abs(cost(schedule) - budget) < best_miss:
            best, best_miss = schedule, abs(cost(schedule) - budget)
    return best


def _refine(shape: EncoderShape, frames: int, patches: int, reduced: Tuple[int, ...], schedule: Schedule, cost,
            budget: float, keep_final: bool) -> Schedule:
    """Single-merge moves, best first, while they bring the cost closer to ``budget`` and it still misses.

    keep_final: only move merges between neighbouring blocks (the final counts stay). Only moves the
    encoder would apply unclamped are taken.
    """
    miss = abs(cost(schedule) - budget)
    for _ in range(REFINE_STEPS):
        if miss <= TOLERANCE * budget:
            break
        best, best_miss = None, miss
        for candidate in _moves(schedule, reduced, keep_final):
            if applied_schedule(shape, candidate, frames, patches) != candidate:
                continue
            candidate_miss = abs(cost(candidate) - budget)
            if candidate_miss < best_miss:
                best, best_miss = candidate, candidate_miss
        if best is None:
            break
        schedule, miss = best, best_miss
    return schedule


def _moves(schedule: Schedule, reduced: Tuple[int, ...], keep_final: bool):
    """Schedules one merge away from ``schedule`` along a reduced axis (not yet checked against the clamps):
    a merge moved to a neighbouring block and, unless keep_final, one merge more or one less."""
    def changed(changes):
        moved = [list(entry) for entry in schedule]
        for block, axis, change in changes:
            moved[block][axis] += change
        return [tuple(entry) for entry in moved]

    for axis in reduced:
        for block in range(len(schedule)):
            if schedule[block][axis] > 0:
                for neighbour in (block - 1, block + 1):
                    if 0 <= neighbour < len(schedule):
                        yield changed([(block, axis, -1), (neighbour, axis, +1)])
                if not keep_final:
                    yield changed([(block, axis, -1)])
            if not keep_final:
                yield changed([(block, axis, +1)])
