"""Running averages and progress lines with rate and ETA: MetricLogger for loops that track
metrics (training, evaluation), ProgressLine for loops that count items (indexing, packing)."""
import datetime
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist

from runtime.distributed import get_world_size


class SmoothedValue:
    """A scalar series: windowed median for display, global average for the epoch."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.window = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        return float(np.median(self.window)) if self.window else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.window[-1] if self.window else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, global_avg=self.global_avg, value=self.value)

    def state_dict(self) -> dict:
        """Plain data for a mid-epoch checkpoint: a resumed epoch continues the same averages."""
        return {"count": self.count, "total": self.total, "window": list(self.window)}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.total = int(state["count"]), float(state["total"])
        self.window.clear()
        self.window.extend(state["window"])


def _format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class MetricLogger:
    """Named SmoothedValues plus `log_every`, which prints progress with rate and ETA."""

    def __init__(self, delimiter: str = "  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **values) -> None:
        for name, value in values.items():
            self.meters[name].update(value.item() if torch.is_tensor(value) else float(value))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def synchronize_between_processes(self) -> None:
        """Make every meter's count and total global in one all_reduce (windows stay local)."""
        if get_world_size() == 1:
            return
        names = sorted(self.meters)  # the same order on every rank
        totals = torch.tensor([[self.meters[name].count, self.meters[name].total] for name in names],
                              dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(totals)
        for name, (count, total) in zip(names, totals.tolist()):
            self.meters[name].count, self.meters[name].total = int(count), total

    def state_dict(self) -> dict:
        return {name: meter.state_dict() for name, meter in self.meters.items()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the meters of `state` (meters added beforehand keep their window size and format)."""
        for name, meter_state in state.items():
            self.meters[name].load_state_dict(meter_state)

    def global_averages(self) -> dict:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq: int, header: str = "", total: int | None = None, start: int = 0):
        """Yield from `iterable`, printing progress every `print_freq` items and at the end.

        `start`: items done before `iterable` begins (a resumed epoch), so the lines count
        positions in the whole epoch of `total` items, as an uninterrupted run prints them.
        """
        total = len(iterable) + start if total is None else total
        width = len(str(total))
        began = time.time()
        for index, item in enumerate(iterable):
            yield item
            done = start + index + 1
            if done % print_freq == 0 or done == total:
                elapsed = time.time() - began
                rate = (index + 1) / max(elapsed, 1e-9)
                eta = (total - done) / rate
                memory = (f"  max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB"
                          if torch.cuda.is_available() else "")
                print(f"{header} [{done:>{width}}/{total}]  eta: {_format_seconds(eta)}  "
                      f"{rate:.2f} it/s  {self}{memory}", flush=True)
        print(f"{header} total time: {_format_seconds(time.time() - began)}", flush=True)


class ProgressLine:
    """'{label} done/total unit  rate unit/s  eta H:MM:SS[  extra]' for long loops: at most
    every `every_s` seconds, and when the last item is done."""

    def __init__(self, label: str, total: int, unit: str, every_s: float = 5.0, start: int = 0):
        self.label, self.total, self.unit, self.every_s, self.start = label, total, unit, every_s, start
        self.began = self.last = time.time()

    def update(self, done: int, extra: str = "") -> None:
        now = time.time()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = (done - self.start) / max(now - self.began, 1e-9)
        eta = _format_seconds((self.total - done) / rate) if rate else "?"
        print(f"{self.label} {done}/{self.total} {self.unit}  {rate:.1f} {self.unit}/s  eta {eta}"
              + (f"  {extra}" if extra else ""), flush=True)
