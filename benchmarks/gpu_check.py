"""One-shot GPU check: precision, SDPA backends, torch.compile, throughput, memory and
training steps of the base video encoder at 32 frames, in one prepared run of under 4 minutes.

Every section is guarded: a failure is recorded in the JSON and the next section still runs; the
JSON is rewritten after every section, so a run cut off by its time limit keeps what it measured.
torch.compile runs in a child process with a timeout, so a slow or hanging compile costs at most
--compile_timeout_s. Sections past --budget_s are recorded as skipped.

  PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out_dir "$OUT"      # on the GPU machine
  python -m benchmarks.gpu_check --smoke --device cpu --out_dir /tmp/gpu_check_smoke   # CPU check

Comparison target: the best configuration >= 1.3x the clips/s of the eager fp16
math-attention path (autocast fp16, sdpa_kernel(MATH)).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from benchmarks import common
from benchmarks.bench_encoder import BASE_WIDTH, build_encoder, make_video
from benchmarks.gpu_harness import BACKENDS, Report, attention_ops, forward_closure, free_memory, measure

SMOKE_WIDTH = dict(embed_dim=64, depth=2, num_heads=2, img_size=32, patch_size=16)


def baseline_for(device):
    """The reference path: eager autocast fp16 with math attention (bf16 where fp16 is not
    benchmarked, i.e. the CPU smoke run)."""
    return ('fp16' if device.type == 'cuda' else 'bf16', 'math')


def precisions_for(device):
    return ['fp32', 'bf16', 'fp16'] if device.type == 'cuda' else ['fp32', 'bf16']


def section_precision(report, args, device, size, encoders):
    with report.section('precision_forward', needs_s=10) as entry:
        if entry is None:
            return
        rows = []
        for merging in (True, False):
            encoder = encoders[merging]
            for precision in precisions_for(device):
                for batch in (1, args.mid_batch):
                    video = make_video(batch, args.frames, size['img_size'], device)
                    row = dict(merging=merging, precision=precision,
                               **measure(forward_closure(encoder, video, device, precision), device, batch,
                                         args.runs, args.warmup))
                    rows.append(row)
                    print('  ', row, flush=True)
        entry['rows'] = rows
        for precision in precisions_for(device):
            for batch in (1, args.mid_batch):
                pair = {row['merging']: row for row in rows if row['precision'] == precision
                        and row['batch'] == batch and 'clips_per_s' in row}
                if len(pair) == 2:
                    entry[f'merge_speedup_{precision}_b{batch}'] = round(
                        pair[True]['clips_per_s'] / pair[False]['clips_per_s'], 2)


def section_backends(report, args, device, size, encoder):
    with report.section('sdpa_backends', needs_s=10) as entry:
        if entry is None:
            return
        rows = []
        for precision in [p for p in precisions_for(device) if p != 'fp32'] or ['fp32']:
            for backend in BACKENDS:
                for batch in (1, args.mid_batch):
                    video = make_video(batch, args.frames, size['img_size'], device)
                    forward = forward_closure(encoder, video, device, precision, backend)
                    row = dict(precision=precision, backend=backend, batch=batch)
                    try:
                        row['attention_ops'] = attention_ops(forward)
                        row.update(measure(forward, device, batch, args.runs, args.warmup))
                    except RuntimeError as error:  # e.g. no flash kernel for this dtype or head size
                        row['error'] = f'{type(error).__name__}: {str(error)[:300]}'
                        free_memory()
                    rows.append(row)
                    print('  ', row, flush=True)
        entry['rows'] = rows


def train_step_closure(encoder, video, device, precision, optimizer, scaler):
    def step():
        optimizer.zero_grad(set_to_none=True)
        with common.autocast(device, precision):
            features = encoder(video).float().mean(dim=1)
            loss = features.pow(2).mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
    return step


def section_train(report, args, device, size):
    with report.section('train_step', needs_s=20) as entry:
        if entry is None:
            return
        rows = []
        for frames, batch in ((args.frames, args.train_batch), (args.long_frames, args.long_train_batch)):
            for checkpointing in (False, True):
                torch.manual_seed(0)
                encoder = build_encoder(size, frames, True, device, args.testa_r,
                                        grad_checkpointing=checkpointing).train()
                optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5)
                video = make_video(batch, frames, size['img_size'], device)
                for precision in ('fp16', 'bf16') if device.type == 'cuda' else ('bf16',):
                    scaler = torch.amp.GradScaler(device.type) if precision == 'fp16' else None
                    step = train_step_closure(encoder, video, device, precision, optimizer, scaler)
                    row = dict(frames=frames, grad_checkpointing=checkpointing, precision=precision,
                               **measure(step, device, batch, runs=max(2, args.runs // 2), warmup=1))
                    rows.append(row)
                    print('  ', row, flush=True)
                del encoder, optimizer
                free_memory()
        entry['rows'] = rows
        for frames in (args.frames, args.long_frames):
            pair = {row['grad_checkpointing']: row for row in rows
                    if row['frames'] == frames and row['precision'] == 'bf16' and 'peak_mib' in row}
            if len(pair) == 2:
                entry[f'ckpt_peak_ratio_{frames}f_bf16'] = round(pair[True]['peak_mib'] / pair[False]['peak_mib'], 3)


def section_compile(report, args, device):
    timeout = min(args.compile_timeout_s, report.budget_s - report.elapsed() - 30)
    with report.section('torch_compile', needs_s=60) as entry:
        if entry is None:
            return
        result_path = os.path.join(args.out_dir, 'gpu_check_compile.json')
        command = [sys.executable, '-m', 'benchmarks.gpu_check', '--compile_worker', '--device', args.device,
                   '--out_dir', args.out_dir, '--frames', str(args.frames), '--mid_batch', str(args.mid_batch),
                   '--runs', str(args.runs), '--warmup', str(args.warmup)] + (['--smoke'] if args.smoke else [])
        try:
            completed = subprocess.run(command, timeout=timeout, capture_output=True, text=True)
            entry['returncode'] = completed.returncode
            entry['stderr_tail'] = completed.stderr[-2000:]
        except subprocess.TimeoutExpired:
            entry['error'] = f'compile worker exceeded {timeout:.0f} s (results so far kept)'
        if os.path.exists(result_path):
            with open(result_path) as handle:
                entry.update(json.load(handle))
        print('  ', {key: value for key, value in entry.items() if key != 'stderr_tail'}, flush=True)


def compile_worker(args, device, size):
    """Child process: compile the merged encoder and time it at batch 1 and mid_batch, saving
    after every measurement so a timeout keeps the finished ones."""
    result = {'rows': []}
    path = os.path.join(args.out_dir, 'gpu_check_compile.json')

    def save():
        with open(path, 'w') as handle:
            json.dump(result, handle, indent=2)

    torch.manual_seed(0)
    encoder = build_encoder(size, args.frames, True, device, args.testa_r)
    # Static shapes: each (precision, batch) compiles its own graph, so the most informative
    # ones (fp16 at the comparison batch, then batch 1) go first in case the timeout cuts in.
    # mode 'reduce-overhead' adds CUDA graphs: it matters where kernel launches dominate (batch 1).
    compiled = torch.compile(encoder, dynamic=False, mode=args.compile_mode)
    result['mode'] = args.compile_mode
    batches = [int(b) for b in args.compile_batches.split(',')] if args.compile_batches else [args.mid_batch, 1]
    precisions = args.compile_precisions.split(',') if args.compile_precisions else (
        ['fp16', 'bf16'] if device.type == 'cuda' else ['bf16'])
    for precision in precisions:
        for batch in batches:
            video = make_video(batch, args.frames, size['img_size'], device)
            begin = time.perf_counter()
            forward = forward_closure(compiled, video, device, precision)
            forward()
            common.synchronize(device)
            row = dict(precision=precision, compile_s=round(time.perf_counter() - begin, 1),
                       **measure(forward, device, batch, args.runs, args.warmup))
            reference = forward_closure(encoder, video, device, precision)()
            row['max_abs_diff_vs_eager'] = (forward().float() - reference.float()).abs().max().item()
            # The reference path, timed in the same process for a same-machine ratio.
            baseline = measure(forward_closure(encoder, video, device, 'fp16' if device.type == 'cuda' else 'bf16',
                                               'math'), device, batch, args.runs, args.warmup)
            row['eager_fp16_math_clips_per_s'] = baseline.get('clips_per_s')
            if row.get('clips_per_s') and baseline.get('clips_per_s'):
                row['speedup_vs_eager_fp16_math'] = round(row['clips_per_s'] / baseline['clips_per_s'], 2)
            result['rows'].append(row)
            print('  compiled', row, flush=True)
            save()


def section_throughput(report, args, device, size, encoders, best):
    with report.section('throughput_search', needs_s=15) as entry:
        if entry is None:
            return
        entry['configs'] = {}
        for precision, backend in (baseline_for(device), best):
            name = f'{precision}-{backend or "default"}'
            if name in entry['configs']:
                continue
            rows = []
            for batch in args.search_batches:
                if report.elapsed() > report.budget_s - 10:
                    rows.append({'batch': batch, 'skipped': 'time budget'})
                    break
                video = make_video(batch, args.frames, size['img_size'], device)
                row = measure(forward_closure(encoders[True], video, device, precision, backend), device, batch,
                              runs=3, warmup=1)
                del video
                rows.append(row)
                print(f'   {name}', row, flush=True)
                if row.get('oom'):
                    break
            fitted = [row for row in rows if 'clips_per_s' in row]
            entry['configs'][name] = {'rows': rows, 'largest_batch': fitted[-1]['batch'] if fitted else None,
                                      'best_clips_per_s': max((row['clips_per_s'] for row in fitted), default=None)}


def best_eager(report):
    """(precision, backend) of the fastest eager mid-batch forward seen in the backend sweep."""
    rows = report.data['sections'].get('sdpa_backends', {}).get('rows', [])
    timed = [row for row in rows if 'clips_per_s' in row and row['batch'] > 1]
    if not timed:
        return ('bf16', None)
    fastest = max(timed, key=lambda row: row['clips_per_s'])
    return (fastest['precision'], fastest['backend'])


def summarise(report, args, device):
    """The target comparison: best configuration vs the eager fp16 math-attention path."""
    sections = report.data['sections']
    candidates = []
    for row in sections.get('sdpa_backends', {}).get('rows', []):
        if 'clips_per_s' in row:
            candidates.append((f"eager {row['precision']} {row['backend']}", row['batch'], row['clips_per_s']))
    for row in sections.get('torch_compile', {}).get('rows', []):
        if 'clips_per_s' in row:
            candidates.append((f"compiled {row['precision']} default-sdpa", row['batch'], row['clips_per_s']))
    summary = {}
    baseline_name = 'eager {} {}'.format(*baseline_for(device))
    for batch in (1, args.mid_batch):
        baseline = [clips for name, size, clips in candidates if size == batch and name == baseline_name]
        at_batch = [(clips, name) for name, size, clips in candidates if size == batch]
        if baseline and at_batch:
            clips, name = max(at_batch)
            summary[f'batch_{batch}'] = dict(best=name, best_clips_per_s=clips, baseline=baseline_name,
                                             baseline_clips_per_s=baseline[0],
                                             speedup=round(clips / baseline[0], 2),
                                             target_1_3x_met=clips / baseline[0] >= 1.3)
    report.data['summary'] = summary
    print('summary', json.dumps(summary, indent=1), flush=True)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out_dir', default=os.environ.get('OUT', '.'))
    parser.add_argument('--smoke', action='store_true', help='tiny width and 2 frames: checks the script runs')
    parser.add_argument('--frames', type=int, default=None, help='default 32 (2 with --smoke)')
    parser.add_argument('--long_frames', type=int, default=None, help='training frames of the memory check '
                                                                       '(default 96, 4 with --smoke)')
    parser.add_argument('--mid_batch', type=int, default=None, help='batch for comparisons (default 16)')
    parser.add_argument('--train_batch', type=int, default=None, help='training batch at --frames (default 4)')
    parser.add_argument('--long_train_batch', type=int, default=None,
                        help='training batch at --long_frames (default 8)')
    parser.add_argument('--runs', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--budget_s', type=float, default=220, help='skip sections past this many seconds')
    parser.add_argument('--compile_timeout_s', type=float, default=90)
    parser.add_argument('--compile_worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--compile_mode', default='default', help="torch.compile mode, e.g. 'reduce-overhead'")
    parser.add_argument('--compile_batches', default=None, help='batches to compile, e.g. 1,16 (default: mid, 1)')
    parser.add_argument('--compile_precisions', default=None,
                        help='autocast precisions to compile, in order, e.g. bf16,fp16 (default: fp16,bf16 on CUDA)')
    args = parser.parse_args()

    smoke = args.smoke
    args.frames = args.frames or (2 if smoke else 32)
    args.long_frames = args.long_frames or (4 if smoke else 96)
    args.mid_batch = args.mid_batch or (2 if smoke else 16)
    args.train_batch = args.train_batch or (2 if smoke else 4)
    args.long_train_batch = args.long_train_batch or (2 if smoke else 8)
    args.search_batches = [1, 2, 4] if smoke else [1, 16, 64, 128, 256, 512, 1024]
    if smoke:
        args.runs, args.warmup = min(args.runs, 2), min(args.warmup, 1)
    # 2 frames have no published schedule: merge 1 frame (capped to 0 at 2 frames) and 1 patch per block.
    args.testa_r = [1, 1] * SMOKE_WIDTH['depth'] if smoke else None
    return args


def section_machine(report, args, device, size):
    with report.section('machine') as entry:
        entry.update(common.machine_info(device))
        entry['args'] = vars(args)
        entry['size'] = size
        entry['matmul_gflops_per_s'] = {key: round(value, 1) for key, value in
                                        common.reference_rates(device, precisions_for(device)).items()}
        print('  ', entry, flush=True)


def section_build_encoders(report, args, device, size):
    """Merged (True) and unmerged (False) encoders; fewer if the section failed part way."""
    encoders = {}
    with report.section('build_encoders') as entry:
        for merging in (True, False):
            torch.manual_seed(0)
            encoders[merging] = build_encoder(size, args.frames, merging, device, args.testa_r)
        video = make_video(1, args.frames, size['img_size'], device)
        with torch.inference_mode():
            entry['tokens_out'] = {str(merging): encoder(video).shape[1] for merging, encoder in encoders.items()}
        entry['gmacs_per_clip'] = {}
        for merging, encoder in encoders.items():
            with torch.inference_mode():
                entry['gmacs_per_clip'][str(merging)] = round(common.count_gmacs(lambda: encoder(video)), 4)
    return encoders


def main():
    args = parse_args()
    size = SMOKE_WIDTH if args.smoke else BASE_WIDTH
    device = torch.device(args.device)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.compile_worker:
        compile_worker(args, device, size)
        return

    report = Report(os.path.join(args.out_dir, 'gpu_check.json'), args.budget_s)
    section_machine(report, args, device, size)
    encoders = section_build_encoders(report, args, device, size)
    if len(encoders) == 2:
        section_precision(report, args, device, size, encoders)
        section_backends(report, args, device, size, encoders[True])
    section_train(report, args, device, size)
    section_compile(report, args, device)
    if len(encoders) == 2:
        section_throughput(report, args, device, size, encoders, best_eager(report))
    summarise(report, args, device)
    report.data['total_s'] = round(report.elapsed(), 1)
    report.save()
    print(f'done in {report.elapsed():.0f} s; wrote {report.path}', flush=True)

if __name__ == '__main__':
    main()
