"""Cost of the source bookkeeping (which input patches every output token holds) in the video encoder.

Three forwards of the same random weights on the TESTA-base shape of configs/retrieval_didemo_f32.yaml
(224 px, width 768, 12 blocks, frame&patch merging [1,12]*12; --frames sets num_frames), fp32,
eval mode, no grad, timed in interleaved rounds (one call of each per round) so that load drifts
hit all three alike (CPU: with the allocator set up as the training scripts do):

  baseline  models/ as of --baseline_rev (the code before tracking could be switched on per
            call), extracted with `git archive` into a temporary folder: plain forward
  off       this tree, plain forward (tracking off)
  on        this tree, forward_with_trace(sources=True) (tracking on)

"off / baseline" is what the switch costs when off; its per-round ratios give the spread. Timing
cannot resolve 1% on a loaded machine, so the script also records the aten ops every forward
dispatches (TorchDispatchMode): "off" dispatching exactly the baseline's op sequence shows that it
does no extra work (no source tensor allocated, nothing moved), whatever the timing noise.

Example (about 2 minutes on 2 CPU cores):
  python -m benchmarks.bench_source_tracking --frames 8,32 --out benchmarks/results/source_tracking_cpu.json
"""
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile

import torch

from benchmarks import common
from configs.load import load_config
from models.timesformer import build_video_encoder
from utils import dispatched_ops, keep_freed_cpu_memory

CONFIG = 'configs/retrieval_didemo_f32.yaml'
# The last revision whose encoder tracked sources only through the `trace_source` constructor flag.
BASELINE_REV = '5895b19fd04b29ef523fff8d4cefec5cb076c930'


def parse_args():
    parser = common.base_parser(__doc__.split('\n\n')[0])
    parser.set_defaults(runs=5)
    parser.add_argument('--frames', default='8,32', help='comma-separated frame counts')
    parser.add_argument('--batch', type=int, default=1, help='clips per forward')
    parser.add_argument('--baseline_rev', default=BASELINE_REV, help='git revision whose models/ is the baseline')
    parser.add_argument('--override', action='append', default=[],
                        help='config key=value (repeatable; e.g. image_size=32 for a quick trial)')
    return parser.parse_args()


def encoder_config(frames, overrides):
    return load_config(f'{common.REPO_ROOT}/{CONFIG}', [f'num_frames={frames}'] + list(overrides))


def import_baseline_models(revision, folder):
    """The `models` package of `revision`, imported from `folder` next to (not instead of) this tree's:
    this tree's modules leave sys.modules while it is imported and come back afterwards."""
    archive = subprocess.run(['git', '-C', common.REPO_ROOT, 'archive', '--format=tar', revision, 'models'],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter='data')
    ours = {name: module for name, module in sys.modules.items() if name.split('.')[0] == 'models'}
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, folder)
    try:
        return importlib.import_module('models.timesformer')
    finally:
        sys.path.remove(folder)
        for name in [name for name in sys.modules if name.split('.')[0] == 'models']:
            del sys.modules[name]
        sys.modules.update(ours)


def forwards(baseline_module, config, batch, device):
    """The three named forwards (see the module docstring) on one shared random clip."""
    encoder = build_video_encoder(config).to(device).eval()
    baseline = baseline_module.build_video_encoder(config).to(device).eval()
    baseline.load_state_dict(encoder.state_dict())
    frames, size = config['num_frames'], config['image_size']
    video = torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        torch.testing.assert_close(encoder(video), baseline(video), atol=0, rtol=0)
    return {'baseline': lambda: baseline(video), 'off': lambda: encoder(video),
            'on': lambda: encoder.forward_with_trace(video, sources=True)}


def measure_frames(args, device, baseline_module, frames):
    functions = forwards(baseline_module, encoder_config(frames, args.override), args.batch, device)
    with torch.no_grad():
        ops = {name: dispatched_ops(function) for name, function in functions.items()}
        timing = common.time_interleaved(functions, device, args.runs, args.warmup)
    ratios = [off / base for off, base in zip(timing['off']['times_s'], timing['baseline']['times_s'])]
    rows = []
    for name in functions:
        times = timing[name]['times_s']
        rows.append({'frames': frames, 'batch': args.batch, 'forward': name, 'median_s': statistics.median(times),
                     'min_s': min(times), 'max_s': max(times), 'median_cpu_s': timing[name]['median_cpu_s'],
                     'vs_baseline': statistics.median(times) / statistics.median(timing['baseline']['times_s']),
                     'aten_ops': len(ops[name]), 'same_ops_as_baseline': ops[name] == ops['baseline']})
    rows[1]['off/baseline per round (min..max)'] = f'{min(ratios):.3f}..{max(ratios):.3f}'
    return rows


def main():
    args = parse_args()
    device = torch.device(args.device)
    machine = common.machine_info(device)
    # The allocator the training and evaluation scripts set up (no page faults on fresh tensors).
    machine['allocator_keeps_freed_memory'] = device.type == 'cpu' and keep_freed_cpu_memory()
    print(f"machine: {machine['cpu']} ({machine['cpu_count']} cores, {machine['torch_threads']} torch threads), "
          f"device {device}, load average {machine['load_average_1_5_15min']}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        baseline_module = import_baseline_models(args.baseline_rev, folder)
        rows = [row for frames in common.parse_list(args.frames, int)
                for row in measure_frames(args, device, baseline_module, frames)]
    columns = ['frames', 'batch', 'forward', 'median_s', 'min_s', 'max_s', 'median_cpu_s', 'vs_baseline',
               'aten_ops', 'same_ops_as_baseline', 'off/baseline per round (min..max)']
    common.print_table(rows, columns, title=f"encoder forward, fp32, {args.runs} rounds, on {machine['cpu']}")
    common.write_json(args.out, {'machine': machine, 'config': CONFIG, 'baseline_rev': args.baseline_rev,
                                 'rows': rows})


if __name__ == '__main__':
    main()
