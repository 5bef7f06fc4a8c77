"""Decision cost of every token-reduction rule (models.rules.RULES) as a share of the encoder forward.

A rule only decides which tokens combine; the block then applies the decision the same way for
every rule, so what differs between rules is the decision. This times the decisions alone, in the
layout of the divided space-time encoder: per block, the time decision on the temporal keys
(B, L, T, C) of every patch position and the space decision on the keys (T, 1 + L, C) of every frame
([CLS] protected), with the token counts that the published f32 schedule (frame r 1, patch r 12 per
block: testa_r [1, 12] * 12) leaves at each block. A rule reduces only the axes it names (rule.axes).
Rules that read the attention map (needs_attention) are charged for producing it: an explicit
softmax(q k^T / sqrt(d)) per head averaged over heads (and over patch positions for time), which the
block computes for them only. Keys, queries and metrics are random (a decision's cost does not hang
on the values); the metric is the keys summed over heads, as the block passes it.

The reference is one forward of the same encoder (TimeSformer, TESTA merging with that schedule,
random weights, batch 1, fp32, no grad), timed in the same interleaved rounds as the decisions, so
that load drifts hit all alike.

On a machine shared with other jobs, --threads 1 gives the steadiest reading: cpu_share_pct then
counts no waiting for a core (two runs at load averages 2.5 and 4.6 on 2 vCPUs agreed within 0.07 points).

Example (the base encoder, 32 frames; about 2 minutes on 2 CPU cores):
  python -m benchmarks.bench_rules --threads 1 --out benchmarks/results/rules_cpu_f32.json
"""
from typing import NamedTuple

import torch

from benchmarks import common
from models.merge import clamp_r
from models.rules import RULES
from models.rules.base import MergeContext
from models.timesformer import TimeSformer
from utils import keep_freed_cpu_memory

BASE = dict(embed_dim=768, depth=12, num_heads=12, img_size=224, patch_size=16, frames=32)
QUICK = dict(embed_dim=64, depth=12, num_heads=2, img_size=32, patch_size=16, frames=8)
FRAME_R, PATCH_R = 1, 12  # per block, the published f32 schedule


class BlockInputs(NamedTuple):
    """What one block hands its rules: r per axis, the metrics, and q/k for the attention map."""

    depth_fraction: float
    frame_r: int
    frame_keys: torch.Tensor  # (1, L, T, C) temporal keys summed over heads
    frame_qk: tuple  # (L, heads, T, hd) queries and keys of the temporal attention
    patch_r: int
    patch_keys: torch.Tensor  # (T, 1 + L, C) spatial keys summed over heads, [CLS] first
    patch_qk: tuple  # (T, heads, 1 + L, hd) queries and keys of the spatial attention


def schedule_inputs(size, device):
    """BlockInputs of every block, with the token counts that the schedule leaves: each block merges
    frames first (r capped as the block caps it: a [CLS]-sized cap), then patches in every frame.
    Drawn on the CPU, so every device decides on the same values."""
    generator = torch.Generator().manual_seed(0)
    frames, patches = size['frames'], (size['img_size'] // size['patch_size']) ** 2
    heads, head_dim = size['num_heads'], size['embed_dim'] // size['num_heads']

    def query_and_key(groups, tokens):
        return tuple(torch.randn(groups, heads, tokens, head_dim, generator=generator).to(device) for _ in range(2))

    blocks = []
    for block in range(size['depth']):
        frame_r = clamp_r(FRAME_R, frames, 1)
        frame_qk = query_and_key(patches, frames)
        frames -= frame_r
        patch_r = clamp_r(PATCH_R, patches)
        patch_qk = query_and_key(frames, 1 + patches)
        blocks.append(BlockInputs(block / size['depth'], frame_r, frame_qk[1].sum(1)[None], frame_qk,
                                  patch_r, patch_qk[1].sum(1), patch_qk))
        patches -= patch_r
    return blocks


def attention_map(query, key):
    """(G, heads, n, hd) q and k -> (G, n, n) softmax attention averaged over heads."""
    return ((query * query.shape[-1] ** -0.5) @ key.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)


def context_for(rule, block_index, depth_fraction, protected, attention):
    generator = torch.Generator().manual_seed(block_index) if rule.needs_generator else None
    return MergeContext(protected, attention, generator, depth_fraction)


def time_decisions(rule, blocks):
    """The frame decisions of every block that merges frames (and their attention maps, if read)."""
    def decide():
        for index, block in enumerate(blocks):
            if not block.frame_r:
                continue
            attention = None
            if rule.needs_attention:
                attention = attention_map(*block.frame_qk).mean(dim=0, keepdim=True)
            rule.match_frames(block.frame_keys, block.frame_r,
                              context_for(rule, index, block.depth_fraction, 0, attention))
    return decide


def space_decisions(rule, blocks):
    """The patch decisions of every block that merges patches, [CLS] protected (and their attention maps)."""
    def decide():
        for index, block in enumerate(blocks):
            if not block.patch_r:
                continue
            attention = attention_map(*block.patch_qk) if rule.needs_attention else None
            rule.match(block.patch_keys, block.patch_r, context_for(rule, index, block.depth_fraction, 1, attention))
    return decide


def encoder_forward(size, device):
    encoder = TimeSformer(img_size=size['img_size'], patch_size=size['patch_size'], embed_dim=size['embed_dim'],
                          depth=size['depth'], num_heads=size['num_heads'], num_frames=size['frames'],
                          attention_type='divided_space_time', drop_path_rate=0.0, token_merging=True,
                          testa_r=[FRAME_R, PATCH_R] * size['depth']).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(1, 3, size['frames'], size['img_size'], size['img_size'], generator=generator).to(device)

    def forward():
        with torch.no_grad():
            return encoder(video)
    return forward


def decision_functions(blocks):
    """(rule name, axis) -> closure, for every rule and every axis it reduces."""
    makers = {'time': time_decisions, 'space': space_decisions}
    return {(name, axis): makers[axis](rule, blocks)
            for name, rule in RULES.items() for axis in rule.axes}


def result_rows(timings):
    """One row per rule: median wall times and shares, and two readings less disturbed by other load:
    the share in process CPU time (with --threads 1 it does not count waiting for a core) and the
    share of each one's fastest run."""
    forward = timings['encoder']
    rows = []
    for name, rule in RULES.items():
        if not rule.axes:
            continue
        per_axis = {axis: timings[(name, axis)] for axis in rule.axes}

        def total(key):
            return sum(timing[key] for timing in per_axis.values())

        rows.append(dict(rule=name, axes='+'.join(rule.axes), attention_map_included=rule.needs_attention,
                         time_ms=1e3 * per_axis['time']['median_s'] if 'time' in per_axis else None,
                         space_ms=1e3 * per_axis['space']['median_s'] if 'space' in per_axis else None,
                         decision_ms=1e3 * total('median_s'), encoder_forward_ms=1e3 * forward['median_s'],
                         share_pct=100 * total('median_s') / forward['median_s'],
                         cpu_share_pct=100 * total('median_cpu_s') / forward['median_cpu_s'],
                         fastest_share_pct=100 * total('min_s') / forward['min_s']))
    return rows


def parse_args():
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help='a tiny encoder (width 64, 2 heads, 32 px, 8 frames, 12 blocks): for the tests')
    parser.add_argument('--threads', type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    return parser.parse_args()


def main():
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = QUICK if args.quick else BASE
    info = common.machine_info(device)
    info['allocator_keeps_freed_memory'] = device.type == 'cpu' and keep_freed_cpu_memory()
    print(info, flush=True)

    functions = decision_functions(schedule_inputs(size, device))
    functions['encoder'] = encoder_forward(size, device)
    timings = common.time_interleaved(functions, device, runs=args.runs, warmup=args.warmup)
    rows = result_rows(timings)
    common.print_table(rows, ['rule', 'axes', 'time_ms', 'space_ms', 'decision_ms', 'encoder_forward_ms', 'share_pct',
                              'cpu_share_pct', 'fastest_share_pct', 'attention_map_included'],
                       title=f"decision cost per clip ({size['frames']} frames, {size['img_size']} px, width "
                             f"{size['embed_dim']}, {size['depth']} blocks, fp32, batch 1, schedule "
                             f"[{FRAME_R}, {PATCH_R}] * {size['depth']}); share = decisions / encoder forward, medians "
                             f"of {args.runs} runs (cpu_: in process CPU time; fastest_: of each one's fastest run)")
    print('attention_map_included: the decision time includes producing the attention map '
          '(softmax(q k^T / sqrt(d)) per head, averaged over heads) that the block computes only for such rules.')
    common.write_json(args.out, dict(machine=info, args=vars(args), size=size, rows=rows,
                                     timings={'/'.join(key) if isinstance(key, tuple) else key: value
                                              for key, value in timings.items()}))


if __name__ == '__main__':
    main()
