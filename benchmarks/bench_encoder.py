"""Video encoder (TimeSformer + TESTA token aggregation) forward benchmark.

For every (frames, merging, precision, batch) it reports the median forward time after a
warm-up, multiply-adds per clip (torch.utils.flop_counter, halved: see common.py), the achieved
FLOP/s as a fraction of a same-precision 2048^2 matmul measured in this run, and the visual
tokens in and out. With --profile it also measures the share of the forward spent in merge
bookkeeping (sorting, top-k, gathers, scatters, indexing) with torch.profiler.

Examples (CPU, the headline comparison of benchmarks/RESULTS.md):
  python -m benchmarks.bench_encoder --frames 32 --merging off,on --precision fp32,bf16 \
      --profile --out benchmarks/results/encoder_cpu_f32.json
"""
import os
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common
from models.timesformer import TimeSformer
from models.timesformer_blocks import Attention
from utils import keep_freed_cpu_memory

# The published schedules, one (frames, patches) pair per block in frame&patch mode:
# f32 configs use [1,12]*12 and f96 configs [4,8]*12; 8 frames uses the f32 schedule (its
# reference 61.8 GMACs is what [1,12]*12 gives at 8 frames).
PUBLISHED_SCHEDULES = {8: [1, 12] * 12, 32: [1, 12] * 12, 96: [4, 8] * 12}

# Multiply-adds per clip measured with the original implementation, base width,
# 224 px, patch 16: (frames, merging) -> GMACs.
REFERENCE_GMACS = {(32, False): 786.8, (32, True): 419.8, (8, False): 196.1, (8, True): 61.8}

# aten ops that only move or select tokens during merging (no arithmetic on features).
BOOKKEEPING_OPS = ('sort', 'argsort', 'topk', 'gather', 'scatter', 'scatter_add', 'scatter_add_',
                   'scatter_reduce', 'scatter_reduce_', 'scatter_', 'index', 'index_select',
                   'index_add', 'index_add_', 'index_put_', 'masked_select', 'mode', 'argmax',
                   'max', 'take_along_dim', 'repeat_interleave', 'nonzero', 'unique')

BASE_WIDTH = dict(embed_dim=768, depth=12, num_heads=12, img_size=224, patch_size=16)


def schedule_for(frames, override):
    if override is not None:
        return override
    if frames not in PUBLISHED_SCHEDULES:
        raise ValueError(f"no published merging schedule for {frames} frames "
                         f"(known: {sorted(PUBLISHED_SCHEDULES)}); pass --testa_r")
    return PUBLISHED_SCHEDULES[frames]


def build_encoder(size, frames, merging, device, testa_r=None, grad_checkpointing=False):
    """Encoder of `size` (TimeSformer kwargs: embed_dim, depth, num_heads, img_size, patch_size)
    with the published frame&patch schedule for `frames` (or `testa_r`) when merging, in eval mode."""
    encoder = TimeSformer(**size, drop_path_rate=0.0, num_frames=frames, attention_type='divided_space_time',
                          token_merging=merging, testa_r=schedule_for(frames, testa_r) if merging else 0,
                          merging_type='frame&patch', grad_checkpointing=grad_checkpointing,
                          ckpt_layer=size['depth'] if grad_checkpointing else 0)
    return encoder.to(device).eval()


class Float32Linear(nn.Module):
    """A Linear that runs in fp32 under autocast (the --qkv_fp32 experiment)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.linear(x.float())


def qkv_in_fp32(encoder):
    """Every attention's q/k/v projection in fp32: the merge metric's keys then carry no bf16
    rounding of their own, only that of the residual stream they are computed from."""
    for module in encoder.modules():
        if isinstance(module, Attention):
            module.qkv = Float32Linear(module.qkv)
    return encoder


def size_from_args(args):
    return dict(embed_dim=args.width, depth=args.depth, num_heads=args.heads, img_size=args.img_size,
                patch_size=args.patch_size)


def make_video(batch, frames, img_size, device):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, frames, img_size, img_size, generator=generator).to(device)


def bookkeeping_share(forward, device):
    """Fraction of one profiled forward's op self-time spent in BOOKKEEPING_OPS, and the top ops."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        forward()
        common.synchronize(device)
    time_attr = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    events = [(event.key, getattr(event, time_attr)) for event in profiler.key_averages()]
    total = sum(time for _, time in events)
    bookkeeping = {name: time for name, time in events
                   if name.startswith('aten::') and name[len('aten::'):] in BOOKKEEPING_OPS and time > 0}
    top = sorted(events, key=lambda item: -item[1])[:8]
    return {'share': sum(bookkeeping.values()) / total if total else float('nan'),
            'bookkeeping_ms': {name: round(time / 1e3, 2) for name, time in bookkeeping.items()},
            'top_ops_ms': {name: round(time / 1e3, 2) for name, time in top},
            'profiled_total_ms': round(total / 1e3, 2)}


def feature_agreement(reference, candidate):
    """Cosine similarity of the mean-pooled features (what ITC uses) and, when the token counts
    agree, the smallest per-token cosine."""
    pooled = F.cosine_similarity(reference.float().mean(1), candidate.float().mean(1), dim=-1).min().item()
    per_token = None
    if reference.shape == candidate.shape:
        per_token = F.cosine_similarity(reference.float(), candidate.float(), dim=-1).min().item()
    return pooled, per_token


def forward_closure(encoder, video, device, precision):
    def forward():
        with torch.inference_mode(), common.autocast(device, precision):
            return encoder(video)
    return forward


def build_forwards(args, device, frames, merging_values, precisions, batches):
    """Encoders by merging, and a forward closure, its input video and (with --compile) its
    compile time for every (merging, precision, batch)."""
    encoders, forwards, videos, compile_s = {}, {}, {}, {}
    for merging in merging_values:
        torch.manual_seed(0)
        encoders[merging] = build_encoder(size_from_args(args), frames, merging, device, args.testa_r)
        if args.qkv_fp32:
            qkv_in_fp32(encoders[merging])
        # Static shapes: every (precision, batch) compiles its own graph, on its first call.
        runner = torch.compile(encoders[merging], dynamic=False) if args.compile else encoders[merging]
        for precision in precisions:
            for batch in batches:
                key = (merging, precision, batch)
                videos[key] = make_video(batch, frames, args.img_size, device)
                forwards[key] = forward_closure(runner, videos[key], device, precision)
                if args.compile:
                    began = time.perf_counter()
                    forwards[key]()
                    common.synchronize(device)
                    compile_s[key] = time.perf_counter() - began
                    print(f'compiled {key} in {compile_s[key]:.0f} s', flush=True)
    return encoders, forwards, videos, compile_s


def time_with_matmuls(args, device, frames, forwards, precisions):
    """Timings of the forwards and of a 2048^2 matmul per precision, in the same interleaved
    rounds; the matmul rates in GFLOP/s; the 1-minute load average before and after."""
    functions = {('matmul', precision): common.matmul_closure(device, precision) for precision in precisions}
    functions.update(forwards)
    load_before = os.getloadavg()[0]
    timings = common.time_interleaved(functions, device, runs=args.runs, warmup=args.warmup)
    load_after = os.getloadavg()[0]
    rates = {precision: 2 * common.MATMUL_SIZE ** 3 / timings[('matmul', precision)]['median_s'] / 1e9
             for precision in precisions}
    print(f'{frames} frames: matmul GFLOP/s in the same rounds:', {k: round(v, 1) for k, v in rates.items()},
          flush=True)
    return timings, rates, [round(load_before, 2), round(load_after, 2)]


def encoder_gmacs(encoder, frames, img_size, device, precision):
    with torch.inference_mode(), common.autocast(device, precision):
        return common.count_gmacs(lambda: encoder(make_video(1, frames, img_size, device)))


def timing_row(args, frames, key, tokens_out, gmacs, timing, matmul_rate, load_average):
    merging, precision, batch = key
    achieved = 2 * gmacs * batch / timing['median_s']
    return dict(frames=frames, merging='on' if merging else 'off', precision=precision, batch=batch,
                tokens_in=1 + (args.img_size // args.patch_size) ** 2 * frames, tokens_out=tokens_out,
                gmacs_per_clip=gmacs, median_s=timing['median_s'], min_s=timing['min_s'],
                median_cpu_s=timing['median_cpu_s'],
                times_s=timing['times_s'], clips_per_s=batch / timing['median_s'], gflops_per_s=achieved,
                matmul_gflops_per_s=matmul_rate, frac_matmul=achieved / matmul_rate,
                load_average_1min=load_average)


def measure_frames(args, device, frames, merging_values, precisions, batches):
    """Rows for every (merging, precision, batch) at `frames`. All of them, and a 2048^2 matmul
    per precision, are timed in interleaved rounds, so ratios between them are side by side."""
    encoders, forwards, videos, compile_s = build_forwards(args, device, frames, merging_values, precisions, batches)
    timings, rates, load_average = time_with_matmuls(args, device, frames, forwards, precisions)
    rows, gmacs, outputs = [], {}, {}
    for key, forward in forwards.items():
        merging, precision, batch = key
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        output = forward()
        usage_after = resource.getrusage(resource.RUSAGE_SELF)
        if merging not in gmacs:
            # Multiply-adds depend on the shapes only (the schedule fixes every token count),
            # so one count per encoder serves every precision and batch size.
            gmacs[merging] = encoder_gmacs(encoders[merging], frames, args.img_size, device, precision)
        row = timing_row(args, frames, key, output.shape[1], gmacs[merging], timings[key], rates[precision],
                         load_average)
        if device.type == 'cpu':  # one more forward after the timed ones: what the allocator costs
            row.update(minor_page_faults=usage_after.ru_minflt - usage_before.ru_minflt,
                       system_s=usage_after.ru_stime - usage_before.ru_stime)
        if args.compile:
            eager = forward_closure(encoders[merging], videos[key], device, precision)()
            row.update(compile_s=compile_s[key],
                       max_abs_diff_vs_eager=(output.float() - eager.float()).abs().max().item())
        if precision == 'fp32':
            outputs[(merging, batch)] = output
        elif (merging, batch) in outputs:
            row['cos_vs_fp32'], row['min_token_cos_vs_fp32'] = feature_agreement(outputs[(merging, batch)], output)
        if args.profile and merging:
            profile = bookkeeping_share(forward, device)
            row['bookkeeping_share'] = profile['share']
            row['profile'] = profile
        rows.append(row)
        print({name: value for name, value in row.items() if name not in ('profile', 'times_s')}, flush=True)
    return rows


def add_ratios(rows):
    by_key = {(row['frames'], row['merging'], row['precision'], row['batch']): row for row in rows}
    for row in rows:
        unmerged = by_key.get((row['frames'], 'off', row['precision'], row['batch']))
        if row['merging'] == 'on' and unmerged:
            row['merge_speedup'] = unmerged['median_s'] / row['median_s']
            row['merge_speedup_cpu_time'] = unmerged['median_cpu_s'] / row['median_cpu_s']
        fp32 = by_key.get((row['frames'], row['merging'], 'fp32', row['batch']))
        if row['precision'] != 'fp32' and fp32:
            row['speedup_vs_fp32'] = fp32['median_s'] / row['median_s']
            row['speedup_vs_fp32_cpu_time'] = fp32['median_cpu_s'] / row['median_cpu_s']


def target_checks(args, rows):
    """The targets that this sweep can decide; a target needing a missing row is skipped."""
    checks = []
    is_base = size_from_args(args) == BASE_WIDTH and args.testa_r is None

    def check(name, value, target, passed):
        checks.append(dict(target=name, value=value, goal=target, passed=bool(passed)))

    for row in rows:
        if row['precision'] == 'fp32' and row['batch'] == 1:
            reference = REFERENCE_GMACS.get((row['frames'], row['merging'] == 'on'))
            if is_base and reference:
                error = abs(row['gmacs_per_clip'] - reference) / reference
                check(f"GMACs {row['frames']}f merging {row['merging']} = {reference} within 1%",
                      round(row['gmacs_per_clip'], 2), reference, error <= 0.01)
            check(f"fp32 {row['frames']}f merging {row['merging']}: >= 85% of fp32 matmul rate",
                  round(row['frac_matmul'], 3), 0.85, row['frac_matmul'] >= 0.85)
        if row['frames'] == 32 and row['precision'] == 'fp32' and 'merge_speedup' in row:
            check(f"32f fp32 batch {row['batch']}: merging >= 2.0x faster", round(row['merge_speedup'], 2), 2.0,
                  row['merge_speedup'] >= 2.0)
        if row['frames'] == 32 and row['merging'] == 'on' and row['precision'] == 'bf16' and 'speedup_vs_fp32' in row:
            check(f"32f merged batch {row['batch']}: bf16 >= 2.5x fp32", round(row['speedup_vs_fp32'], 2), 2.5,
                  row['speedup_vs_fp32'] >= 2.5)
        if row.get('cos_vs_fp32') is not None:
            check(f"{row['frames']}f merging {row['merging']} {row['precision']} batch {row['batch']}: pooled feature cosine > 0.999",
                  round(row['cos_vs_fp32'], 6), 0.999, row['cos_vs_fp32'] > 0.999)
        if row.get('bookkeeping_share') is not None:
            check(f"{row['frames']}f {row['precision']} batch {row['batch']}: merge bookkeeping < 5% of forward",
                  round(row['bookkeeping_share'], 4), 0.05, row['bookkeeping_share'] < 0.05)
    return checks


def count_only(args, device, merging_values, precision, info):
    rows = []
    for frames in common.parse_list(args.frames, int):
        video = make_video(1, frames, args.img_size, device)
        for merging in merging_values:
            torch.manual_seed(0)
            encoder = build_encoder(size_from_args(args), frames, merging, device, args.testa_r)
            with torch.inference_mode(), common.autocast(device, precision):
                gmacs = common.count_gmacs(lambda: encoder(video))
                tokens_out = encoder(video).shape[1]
            rows.append(dict(frames=frames, merging='on' if merging else 'off', tokens_in=1 + (
                args.img_size // args.patch_size) ** 2 * frames, tokens_out=tokens_out, gmacs_per_clip=gmacs,
                reference_gmacs=REFERENCE_GMACS.get((frames, merging)) if size_from_args(args) == BASE_WIDTH
                and args.testa_r is None else None))
            print(rows[-1], flush=True)
    common.print_table(rows, ['frames', 'merging', 'tokens_in', 'tokens_out', 'gmacs_per_clip', 'reference_gmacs'],
                       title='video encoder multiply-adds per clip')
    common.write_json(args.out, dict(machine=info, args=vars(args), rows=rows))


def parse_args():
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument('--frames', default='8,32', help='comma list, e.g. 8,32,96')
    parser.add_argument('--merging', default='off,on', help='comma list of off/on')
    parser.add_argument('--precision', default=None,
                        help='comma list of fp32/bf16/fp16 (default: fp32,bf16 on CPU, fp32,bf16,fp16 on CUDA)')
    parser.add_argument('--batch', default='1', help='comma list of batch sizes')
    parser.add_argument('--testa_r', default=None,
                        help='override the published schedule: comma list read in block order (frame&patch)')
    parser.add_argument('--profile', action='store_true',
                        help='profile one merged forward per config and report the merge bookkeeping share')
    parser.add_argument('--flops_only', action='store_true',
                        help='only count multiply-adds and tokens (one forward per config, in the first precision)')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: torch\'s own choice). With 1 thread, process CPU '
                             'time is a load-independent measure: no thread waits at a barrier for a busy core')
    parser.add_argument('--allocator', choices=('keep', 'glibc-default'), default='keep',
                        help="CPU: 'keep' = what the training scripts set up (keep_freed_cpu_memory: "
                             "malloc reuses freed memory, no page faults per forward); 'glibc-default' = leave "
                             "malloc as it is, to measure the difference")
    parser.add_argument('--compile', action='store_true',
                        help='time torch.compile\'d encoders (Inductor; on CPU with freezing: weights become '
                             'constants, so bias and activation fuse into the linears); records compile time '
                             'and the largest difference from eager')
    parser.add_argument('--qkv_fp32', action='store_true',
                        help='experiment: run the attention q/k/v projections (whose keys are the merge metric) '
                             'in fp32 under autocast, to see whether key precision moves bf16 merge decisions')
    parser.add_argument('--width', type=int, default=BASE_WIDTH['embed_dim'])
    parser.add_argument('--depth', type=int, default=BASE_WIDTH['depth'])
    parser.add_argument('--heads', type=int, default=BASE_WIDTH['num_heads'])
    parser.add_argument('--img_size', type=int, default=BASE_WIDTH['img_size'])
    parser.add_argument('--patch_size', type=int, default=BASE_WIDTH['patch_size'])
    return parser.parse_args()


def configure_torch(args, device):
    if args.compile and device.type == 'cpu':
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True
    if args.threads:
        torch.set_num_threads(args.threads)


def merging_values_from(text):
    values = []
    for value in common.parse_list(text):
        if value not in ('off', 'on'):
            raise ValueError(f"--merging takes off/on, got {value!r}")
        values.append(value == 'on')
    return values


def print_forward_table(rows):
    common.print_table(rows, ['frames', 'merging', 'precision', 'batch', 'tokens_in', 'tokens_out',
                              'gmacs_per_clip', 'median_s', 'min_s', 'median_cpu_s', 'clips_per_s', 'gflops_per_s', 'frac_matmul',
                              'merge_speedup', 'speedup_vs_fp32', 'cos_vs_fp32', 'bookkeeping_share', 'compile_s',
                              'minor_page_faults'],
                       title='video encoder forward (GMACs = multiply-adds; GFLOP/s = 2 per multiply-add)')


def main():
    args = parse_args()
    device = torch.device(args.device)
    configure_torch(args, device)
    precisions = common.parse_list(args.precision) if args.precision else \
        (['fp32', 'bf16', 'fp16'] if device.type == 'cuda' else ['fp32', 'bf16'])
    merging_values = merging_values_from(args.merging)
    args.testa_r = common.parse_list(args.testa_r, int) if args.testa_r else None
    for precision in precisions:
        common.check_precision(precision, device)

    info = common.machine_info(device)
    if device.type == 'cpu':
        info['allocator_keeps_freed_memory'] = args.allocator == 'keep' and keep_freed_cpu_memory()
    print(info, flush=True)
    if args.flops_only:
        count_only(args, device, merging_values, precisions[0], info)
        return
    rows = []
    for frames in common.parse_list(args.frames, int):
        rows += measure_frames(args, device, frames, merging_values, precisions, common.parse_list(args.batch, int))
    add_ratios(rows)
    print_forward_table(rows)
    if device.type == 'cpu':
        info['peak_rss_mib'] = common.peak_memory_mib(device)
    checks = target_checks(args, rows)
    common.print_table(checks, ['target', 'value', 'goal', 'passed'], title='targets')
    common.write_json(args.out, dict(machine=info, args=vars(args),
                                     schedules={str(frames): schedule_for(frames, args.testa_r)
                                                for frames in common.parse_list(args.frames, int)},
                                     rows=rows, checks=checks))

if __name__ == '__main__':
    main()
