"""Shared harness for the benchmark scripts: timing, matmul reference rate, FLOP counting,
peak memory, machine description, table printing and JSON output.

FLOPs: torch.utils.flop_counter counts 2 FLOPs per multiply-add. The published TESTA figures
(and the targets) are quoted in multiply-adds, so `count_gmacs` halves the counter's total; the
achieved rate is reported in real FLOP/s (2 per multiply-add) to compare with the matmul rate,
which is also 2 * n**3 / time.
"""
import argparse
import atexit
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# Written once in runtime/machine.py (the sweep measures with them too); the scripts call them as common.*.
from runtime.machine import (cpu_model, current_memory_mib, peak_memory_mib, reset_peak_memory,  # noqa: F401
                             return_freed_memory_to_os)
from runtime.precision import inference_precision

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The explicit precision names of runtime.precision (benchmarks name what they measure: no 'auto').
PRECISIONS = ('fp32', 'bf16', 'fp16')


def base_parser(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cpu or cuda (default: cuda when available)')
    parser.add_argument('--out', default=None, help='write the results as JSON to this path')
    parser.add_argument('--runs', type=int, default=3, help='timed runs per configuration')
    parser.add_argument('--warmup', type=int, default=1, help='untimed runs before timing')
    return parser


def add_indexing_pipeline_options(parser, batch_size: int) -> None:
    """The options of the benchmarks that time video_tool's indexing pipeline (decoding workers
    feeding the encoder) against the encoder alone: bench_indexing, bench_windows."""
    parser.add_argument("--batch_size", type=int, default=batch_size)
    parser.add_argument("--num_workers", type=int, default=1, help="decoding processes of the pipeline")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the encoding process (default: torch's); fewer than the cores "
                             "leaves the decoding workers cores of their own")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")


def scratch_folder(prefix):
    """A temporary folder for generated clips, removed when the benchmark exits."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, True)
    return folder


def parse_list(text, cast=str):
    """'8,32' -> [8, 32]; used by the --frames/--batch/--precision style options."""
    return [cast(item) for item in text.split(',') if item.strip()]


def check_precision(precision, device):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == 'fp16' and device.type != 'cuda':
        raise ValueError("precision 'fp16' is only benchmarked on CUDA (CPU fp16 autocast is not a supported path)")


def autocast(device, precision):
    """Mixed precision the way the scripts run it (runtime.precision): autocast, weights stay fp32."""
    check_precision(precision, device)
    return inference_precision(precision, device).autocast()


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_interleaved(functions, device, runs=3, warmup=1):
    """Median wall time of each named function, called in rounds (one call of each per round)
    after `warmup` untimed rounds, so drifts in the machine's load hit every configuration alike."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for _ in range(warmup):
        for function in functions.values():
            function()
    synchronize(device)
    times = {name: [] for name in functions}
    cpu_times = {name: [] for name in functions}
    for _ in range(runs):
        for name, function in functions.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    # Process CPU time is a second opinion when other jobs share the cores: wall time then
    # includes waiting for a core, CPU time mostly does not.
    return {name: {'median_s': statistics.median(values), 'min_s': min(values), 'times_s': values,
                   'median_cpu_s': statistics.median(cpu_times[name])}
            for name, values in times.items()}


def time_call(function, device, runs=3, warmup=1):
    return time_interleaved({'call': function}, device, runs, warmup)['call']


MATMUL_SIZE = 2048


def matmul_closure(device, precision, size=MATMUL_SIZE):
    """One size x size matmul in `precision`; 2 * size**3 FLOPs per call."""
    check_precision(precision, device)
    dtype = inference_precision(precision, device).dtype or torch.float32
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    return lambda: torch.mm(a, b)


def matmul_rate(device, precision='fp32', size=MATMUL_SIZE, runs=5):
    """FLOP/s (2 per multiply-add) of a size x size matmul in `precision`, measured now, so ratios
    against it cancel the machine's speed and its current load."""
    timing = time_call(matmul_closure(device, precision, size), device, runs=runs, warmup=2)
    return 2 * size ** 3 / timing['median_s']


def count_gmacs(fn):
    """Multiply-adds (in 1e9) of one `fn()` call, as torch.utils.flop_counter sees them.

    Attention runs on the math backend while counting: the counter has no formula for the CPU
    flash kernel and would silently leave the attention products out (about 3.5% of the encoder)."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops() / 2 / 1e9


def machine_info(device):
    info = {
        'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        'cpu': cpu_model(),
        'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(),
        'omp_num_threads_env': os.environ.get('OMP_NUM_THREADS'),
        'malloc_mmap_threshold_env': os.environ.get('MALLOC_MMAP_THRESHOLD_'),
        'torch': torch.__version__,
        'python': platform.python_version(),
        'device': str(device),
        'command': ' '.join([os.path.basename(sys.executable)] + sys.orig_argv[1:]),
        'load_average_1_5_15min': [round(value, 2) for value in os.getloadavg()],
    }
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def reference_rates(device, precisions):
    """Matmul rates (GFLOP/s) for every precision benchmarked, measured in this run."""
    return {precision: matmul_rate(device, precision) / 1e9 for precision in precisions}


def format_value(value):
    if isinstance(value, float):
        return f'{value:.3g}' if abs(value) < 1000 else f'{value:.0f}'
    return str(value)


def print_table(rows, columns, title=None):
    """Plain fixed-width table of `columns` (keys of each row dict); missing values print '-'."""
    cells = [[format_value(row[column]) if row.get(column) is not None else '-' for column in columns]
             for row in rows]
    widths = [max([len(column)] + [len(line[index]) for line in cells]) for index, column in enumerate(columns)]
    if title:
        print(f'\n{title}')
    print('  '.join(column.ljust(width) for column, width in zip(columns, widths)))
    print('  '.join('-' * width for width in widths))
    for line in cells:
        print('  '.join(cell.ljust(width) for cell, width in zip(line, widths)))
    sys.stdout.flush()


def write_json(path, payload):
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, 'w') as handle:
        json.dump(payload, handle, indent=2, default=str)
    print(f'wrote {path}', flush=True)
