"""Harness of gpu_check.py: the sectioned JSON report with its time budget, and the forward
closures and timings the sections measure, with an out-of-memory recorded instead of raised."""
import contextlib
import gc
import json
import os
import time
import traceback

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import common

BACKENDS = {'math': SDPBackend.MATH, 'efficient': SDPBackend.EFFICIENT_ATTENTION,
            'flash': SDPBackend.FLASH_ATTENTION, 'cudnn': SDPBackend.CUDNN_ATTENTION}


class Report:
    """Results by section, saved as JSON after each one, with a global time budget."""

    def __init__(self, path, budget_s):
        self.path, self.start, self.budget_s = path, time.perf_counter(), budget_s
        self.data = {'sections': {}}

    def elapsed(self):
        return time.perf_counter() - self.start

    def save(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, 'w') as handle:
            json.dump(self.data, handle, indent=2, default=str)

    @contextlib.contextmanager
    def section(self, name, needs_s=0):
        entry = self.data['sections'].setdefault(name, {})
        if self.elapsed() + needs_s > self.budget_s:
            entry['skipped'] = f'time budget: {self.elapsed():.0f} s used of {self.budget_s} s'
            print(f'[{self.elapsed():6.1f}s] skip {name}: {entry["skipped"]}', flush=True)
            self.save()
            yield None
            return
        print(f'[{self.elapsed():6.1f}s] {name} ...', flush=True)
        begin = time.perf_counter()
        try:
            yield entry
        except Exception as error:  # keep going: one broken section must not lose the others
            entry['error'] = f'{type(error).__name__}: {error}'
            entry['traceback'] = traceback.format_exc(limit=6)
            print(f'  {name} failed: {entry["error"]}', flush=True)
        entry['section_s'] = round(time.perf_counter() - begin, 1)
        free_memory()
        self.save()


def attention_ops(forward):
    """Names of the attention ops one forward dispatched to (e.g. _scaled_dot_product_flash_attention),
    so each backend row shows which kernel really ran; empty if the encoder never calls SDPA."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        forward()
    return sorted({event.key for event in profiler.key_averages()
                   if 'attention' in event.key or 'scaled_dot_product' in event.key})


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(error):
    return isinstance(error, torch.cuda.OutOfMemoryError) or 'out of memory' in str(error).lower()


def forward_closure(encoder, video, device, precision, backend=None):
    def forward():
        kernel = sdpa_kernel(BACKENDS[backend]) if backend else contextlib.nullcontext()
        with torch.inference_mode(), common.autocast(device, precision), kernel:
            return encoder(video)
    return forward


def measure(forward, device, batch, runs, warmup):
    """clips/s and peak memory of `forward`, or {'oom': True} when it does not fit."""
    try:
        common.reset_peak_memory(device)
        timing = common.time_call(forward, device, runs=runs, warmup=warmup)
    except RuntimeError as error:
        if not is_oom(error):
            raise
        free_memory()
        return {'batch': batch, 'oom': True}
    return {'batch': batch, 'median_ms': round(timing['median_s'] * 1e3, 3),
            'clips_per_s': round(batch / timing['median_s'], 2),
            'peak_mib': round(common.peak_memory_mib(device), 1)}
