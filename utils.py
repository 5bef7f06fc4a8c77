"""Shared training core of video_pretrain.py, train_video_retrieval.py and train_video_qa.py:
distributed set-up, config, precision, optimiser, schedules, training loop, checkpoints,
logging and metrics. The scripts parse arguments, build data and model, and call these."""
import argparse
import builtins
import ctypes
import datetime
import difflib
import importlib
import io
import json
import math
import os
import random
import sys
import time
from collections import defaultdict, deque
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError


# ---- Errors and the CLI wrapper --------------------------------------------------------
class UserError(Exception):
    """A mistake in the user's input (flags, files, config): reported in one line."""


class ConfigError(UserError):
    """A bad config file or `key=value` override."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named (a checkpoint, say) does not exist."""


def run_cli(main: Callable[[], object]) -> None:
    """Run `main()`; user mistakes print one `error: ...` line to stderr and exit 1.

    Anything else is a bug and keeps its traceback.
    """
    try:
        main()
    except (UserError, FileNotFoundError) as error:
        if isinstance(error, FileNotFoundError) and error.filename is not None:
            message = f"file not found: {error.filename}"
        else:
            message = str(error)
        if int(os.environ.get("RANK", 0)) == 0:  # one line, not one per process
            print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if is_dist_avail_and_initialized():
            dist.destroy_process_group()


# ---- Distributed helpers ---------------------------------------------------------------
def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


_BUILTIN_PRINT = builtins.print


def setup_for_distributed(is_master: bool) -> None:
    """Silence `print` on every rank but the main one; `print(..., force=True)` still prints."""
    def rank_aware_print(*args, force=False, **kwargs):
        if is_master or force:
            _BUILTIN_PRINT(*args, **kwargs)

    builtins.print = rank_aware_print


def init_distributed(device: str) -> torch.device:
    """Join the process group described by torchrun's environment, if any.

    Plain `python script.py` (no RANK/WORLD_SIZE) runs as a single process. The backend is
    nccl for CUDA and gloo for CPU. Returns the device this process computes on.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        compute_device = torch.device("cuda", local_rank)
    else:
        compute_device = torch.device(device)
    if launched:
        backend = "nccl" if compute_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://",
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                device_id=compute_device if backend == "nccl" else None)
        print(f"| distributed init (rank {get_rank()} of {get_world_size()}, {backend})", flush=True)
        barrier()
    setup_for_distributed(get_rank() == 0)
    return compute_device


# Environment settings through which a user has already chosen how malloc behaves.
_ALLOCATOR_SETTINGS = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                       "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def keep_freed_cpu_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the OS.

    By default every tensor over glibc's mmap threshold (at most 32 MiB) is a fresh mapping
    that the kernel zero-fills page by page on first touch: up to 0.9 million page faults
    and 3-18% of a 32-frame CPU encoder forward (benchmarks/RESULTS.md). Serving all
    allocations from the heap and never trimming it removes them; the process keeps its
    peak memory instead of handing it back between steps. Returns whether it took effect:
    not on non-glibc systems, nor when the environment already configures the allocator.
    """
    if any(name in os.environ for name in _ALLOCATOR_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0 (no gradient flows back)."""
    if get_world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, tensor):
        gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *grads):
        # Every rank's loss depends on every slice, so a slice's gradient is the sum over ranks.
        stacked = torch.stack(grads).contiguous()
        dist.all_reduce(stacked)
        return stacked[get_rank()]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, keeping the autograd graph."""
    if get_world_size() == 1:
        return tensor
    return torch.cat(_GatherWithGrad.apply(tensor), dim=0)


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (a one-element list when not distributed)."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def wrap_distributed(model: torch.nn.Module, device: torch.device,
                     find_unused_parameters: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around `model` when distributed, else the model itself."""
    if get_world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


# ---- Seeding and RNG state -------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) for this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_for_rank(seed: int, epoch: int | None = None) -> int:
    """seed + rank at start-up; per epoch, a distinct stream so an epoch's randomness does not
    depend on what ran before it (evaluation, a restart)."""
    return seed + get_rank() + (0 if epoch is None else 10007 * (epoch + 1))


def get_rng_state() -> dict:
    """This process's RNG states as tensors and plain python values (loads with weights_only)."""
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached_gauss)],
        "python": [version, list(python_state), gauss_next],
    }


def set_rng_state(state: dict) -> None:
    """Restore what `get_rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gauss))
    version, python_state, gauss_next = state["python"]
    random.setstate((version, tuple(python_state), gauss_next))


# ---- Configuration ---------------------------------------------------------------------
# Every key the published configs use. A key outside this set is a typo until added here.
KNOWN_CONFIG_KEYS = frozenset({
    # model
    "vit", "image_size", "patch_size", "vision_width", "num_heads", "depth", "num_frames",
    "num_frm_train", "num_frm_test", "attention_type", "learnable_temporal_scaling",
    "token_merging", "testa_r", "merging_type", "prop_attn", "vit_grad_ckpt",
    "vit_ckpt_layer", "drop_path_rate", "pretrained", "med_config", "tokenizer",
    "queue_size", "alpha", "negative_all_rank", "embed_dim", "momentum",
    # data
    "dataset", "video_root", "ann_root", "train_file", "max_words",
    "frm_sampling_strategy", "video_resize", "answer_list", "num_workers",
    "batch_size", "batch_size_train", "batch_size_test",
    # optimisation
    "init_lr", "min_lr", "lr_decay_rate", "warmup_lr", "warmup_steps", "weight_decay",
    "max_epoch", "seed",
    # evaluation
    "k_test", "k_test_batch_size", "low_resource_eval", "inference", "tie_rule",
    "frm_sampling_strategy_test",
})


def _unknown_key_message(key: str, where: str) -> str:
    close = difflib.get_close_matches(key, sorted(KNOWN_CONFIG_KEYS), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown config key {key!r} in {where}{hint}"


def parse_override(text: str) -> tuple[list[str], object]:
    """Split `a.b=value` into (['a', 'b'], value parsed as a YAML scalar or list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value")
    try:
        value = YAML(typ="safe").load(raw) if raw.strip() else ""
    except YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({error.problem})") from None
    return key.strip().split("."), value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Set each `key=value` (or nested `a.b=value`) in `config`; unknown top-level keys fail."""
    for text in overrides:
        path, value = parse_override(text)
        if path[0] not in KNOWN_CONFIG_KEYS:
            raise ConfigError(_unknown_key_message(path[0], f"override {text!r}"))
        parent = config
        for part in path[:-1]:
            if not isinstance(parent.get(part), dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a mapping in the config")
            parent = parent[part]
        parent[path[-1]] = value
    return config


def load_config(path, overrides: list[str] = ()) -> dict:
    """Read a YAML config (safe loader), check its keys and apply `key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        config = YAML(typ="safe").load(path.read_text())
    except YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ConfigError(f"config {path} must be a mapping of key: value, got {type(config).__name__}")
    for key in config:
        if key not in KNOWN_CONFIG_KEYS:
            raise ConfigError(_unknown_key_message(key, str(path)))
    return apply_overrides(config, list(overrides))


def save_config(config: dict, output_dir) -> Path:
    """Write the resolved config to output_dir/config.yaml (main rank only)."""
    target = Path(output_dir) / "config.yaml"
    if is_main_process():
        stream = io.StringIO()
        YAML(typ="safe").dump(config, stream)
        target.write_text(stream.getvalue())
    return target


def require_keys(config: dict, keys, purpose: str) -> None:
    """Fail clearly when `config` lacks keys that `purpose` needs."""
    missing = [key for key in keys if key not in config]
    if missing:
        raise ConfigError(f"config is missing {', '.join(missing)} (needed for {purpose})")


# ---- Argument parser and run set-up ----------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_arg_parser(description: str) -> argparse.ArgumentParser:
    """The flags every entry script shares; scripts add their own before parse_args()."""
    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument
    add("--config", required=True, help="YAML config file (keys listed in utils.KNOWN_CONFIG_KEYS)")
    add("--output_dir", required=True,
        help="folder for config.yaml, log.txt, checkpoints and results (created)")
    add("--mixed_precision_method", choices=["apex", "fp16", "bf16", "none"], default="none",
        help="apex/fp16: native AMP fp16 with gradient scaling on CUDA; bf16: bf16 autocast; "
             "none: fp32 (default). On CPU apex, fp16 and bf16 all run bf16 autocast. "
             "NVIDIA apex is not used")
    add("--checkpoint", default=None,
        help="checkpoint to resume training from (model, optimiser, scaler, epoch, step, RNG); "
             "without it, output_dir/checkpoint_last.pth is resumed when present")
    add("--evaluate", action="store_true",
        help="no training: evaluate the config's `pretrained` weights on the test split")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda or cpu (default: %(default)s); under torchrun each process uses cuda:LOCAL_RANK")
    add("--seed", type=int, default=None, help="random seed (default: the config's seed, else 42)")
    add("--accumulation_steps", type=_positive_int, default=1,
        help="micro-batches per optimiser step; the loss is divided accordingly (default: 1)")
    add("--max_grad_norm", type=float, default=None,
        help="clip the gradient norm to this value (unscaled first under AMP); off when unset")
    add("--num_workers", type=int, default=None,
        help="data-loader workers per process (default: the config's num_workers)")
    add("--k_test_batch_size", type=_positive_int, default=None,
        help="ITM pairs scored per pass when re-ranking in retrieval evaluation (default: the config's, else 128)")
    add("--low_resource_eval", action="store_true",
        help="keep cached video features in half precision on the CPU during retrieval re-ranking")
    add("--log_every", type=_positive_int, default=50, help="print training progress every N steps (default: 50)")
    add("--save_every_steps", type=int, default=0,
        help="also write checkpoint_last.pth every N optimiser steps inside an epoch (default 0: off)")
    add("--tensorboard", action="store_true", help="log scalars to output_dir/tensorboard")
    add("--wandb", action="store_true", help="log scalars to Weights & Biases (needs wandb installed)")
    add("--flop_counter", choices=["torch", "fvcore"], default="torch",
        help="count visual-encoder GMACs with torch's FlopCounterMode (default) or fvcore (if installed)")
    add("--options", nargs="+", default=[], metavar="KEY=VALUE",
        help="config overrides, e.g. --options init_lr=1e-5 testa_r=[1,12]")
    add("overrides", nargs="*", metavar="KEY=VALUE",
        help="config overrides as positional arguments (same as --options)")
    return parser


@dataclass
class Run:
    """What the set-up resolved for this process."""
    args: argparse.Namespace
    config: dict
    device: torch.device
    output_dir: Path
    precision: "Precision"
    seed: int


# Flags that, when given, override the config key of the same name.
_FLAGS_OVERRIDING_CONFIG = ("num_workers", "k_test_batch_size")


def setup_run(args: argparse.Namespace) -> Run:
    """Distributed init, config + overrides + flags, output folder, config.yaml, seeding."""
    device = init_distributed(args.device)
    if device.type == "cpu" and keep_freed_cpu_memory():
        print("CPU allocator: glibc malloc keeps freed memory for reuse (no per-step page faults)")
    config = load_config(args.config, list(args.options) + list(args.overrides))
    for flag in _FLAGS_OVERRIDING_CONFIG:
        if getattr(args, flag) is not None:
            config[flag] = getattr(args, flag)
    if args.low_resource_eval:
        config["low_resource_eval"] = True
    seed = args.seed if args.seed is not None else config.get("seed", 42)
    config["seed"] = seed
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir)
    seed_everything(seed_for_rank(seed))
    precision = make_precision(args.mixed_precision_method, device)
    print(f"precision: {precision.describe()}; world size {get_world_size()}; device {device}")
    return Run(args, config, device, output_dir, precision, seed)


# ---- Precision -------------------------------------------------------------------------
@dataclass
class Precision:
    """Autocast settings plus a GradScaler that is a no-op unless fp16 runs on CUDA."""
    method: str
    device_type: str
    dtype: torch.dtype | None  # None: full fp32
    scaler: torch.amp.GradScaler

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        kind = "fp32" if self.dtype is None else str(self.dtype).replace("torch.", "") + " autocast"
        return f"{self.method} -> {kind}{', gradient scaling' if self.scaler.is_enabled() else ''}"


def make_precision(method: str, device) -> Precision:
    """Map --mixed_precision_method to autocast dtype and scaler for `device`."""
    device_type = torch.device(device).type
    if method not in ("apex", "fp16", "bf16", "none"):
        raise UserError(f"unknown mixed precision method {method!r}; expected apex, fp16, bf16 or none")
    if method == "none":
        dtype = None
    elif device_type == "cuda" and method in ("apex", "fp16"):
        dtype = torch.float16
    else:
        dtype = torch.bfloat16  # CPU autocast is only worthwhile (and safe) in bf16
    scaler = torch.amp.GradScaler(device_type, enabled=dtype is torch.float16)
    return Precision(method, device_type, dtype, scaler)


# ---- Optimiser and learning-rate schedules ---------------------------------------------
# Learned tokens, position/time embeddings and scales: decaying them toward 0 only hurts.
NO_WEIGHT_DECAY_NAMES = frozenset({"cls_token", "pos_embed", "time_embed", "temporal_scaling", "temp"})


def param_groups_for_weight_decay(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and biases/norms/1-D params/tokens without decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name.split(".")[-1] in NO_WEIGHT_DECAY_NAMES
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(model: torch.nn.Module, config: dict) -> torch.optim.AdamW:
    """AdamW at the config's init_lr and weight_decay, with the no-decay group split off."""
    require_keys(config, ("init_lr", "weight_decay"), "the optimiser")
    groups = param_groups_for_weight_decay(unwrap_model(model), config["weight_decay"])
    return torch.optim.AdamW(groups, lr=config["init_lr"])


def cosine_lr(epoch: int, max_epoch: int, init_lr: float, min_lr: float) -> float:
    """Fine-tuning: half a cosine from init_lr (epoch 0) down to min_lr (epoch max_epoch)."""
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr


def warmup_lr(step: int, warmup_steps: int, start_lr: float, target_lr: float) -> float:
    """Linear warm-up from start_lr at step 0 to target_lr at warmup_steps, then flat."""
    if warmup_steps <= 0:
        return target_lr
    return min(target_lr, start_lr + (target_lr - start_lr) * step / warmup_steps)


def step_decay_lr(epoch: int, init_lr: float, min_lr: float, decay_rate: float) -> float:
    """Pre-training: init_lr * decay_rate**epoch, never below min_lr."""
    return max(min_lr, init_lr * decay_rate ** epoch)


def make_lr_schedule(config: dict, kind: str) -> Callable[[int, int], float]:
    """lr as a function of (epoch, optimiser step within the epoch).

    kind='cosine' (fine-tuning, per epoch) or 'warmup_step_decay' (pre-training: warm-up
    over the first warmup_steps steps of epoch 0, then step decay per epoch).
    """
    if kind == "cosine":
        require_keys(config, ("init_lr", "min_lr", "max_epoch"), "the cosine schedule")
        return lambda epoch, step: cosine_lr(epoch, config["max_epoch"], config["init_lr"], config["min_lr"])
    if kind == "warmup_step_decay":
        require_keys(config, ("init_lr", "min_lr", "lr_decay_rate", "warmup_lr", "warmup_steps"),
                     "the warm-up + step-decay schedule")

        def schedule(epoch: int, step: int) -> float:
            if epoch == 0:
                return warmup_lr(step, config["warmup_steps"], config["warmup_lr"], config["init_lr"])
            return step_decay_lr(epoch, config["init_lr"], config["min_lr"], config["lr_decay_rate"])
        return schedule
    raise ValueError(f"unknown schedule kind {kind!r}; expected 'cosine' or 'warmup_step_decay'")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def alpha_ramp(alpha: float, epoch: int, step: int, steps_per_epoch: int, ramp_epochs: int = 2) -> float:
    """Distillation weight growing linearly from 0 to `alpha` over the first `ramp_epochs`."""
    progress = (epoch * steps_per_epoch + step) / (ramp_epochs * steps_per_epoch)
    return alpha * min(1.0, progress)


# ---- Progress logging ------------------------------------------------------------------
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

    def global_averages(self) -> dict:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq: int, header: str = "", total: int | None = None):
        """Yield from `iterable`, printing progress every `print_freq` items and at the end."""
        total = len(iterable) if total is None else total
        width = len(str(total))
        start = time.time()
        for index, item in enumerate(iterable):
            yield item
            done = index + 1
            if done % print_freq == 0 or done == total:
                elapsed = time.time() - start
                rate = done / max(elapsed, 1e-9)
                eta = (total - done) / rate
                memory = (f"  max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB"
                          if torch.cuda.is_available() else "")
                print(f"{header} [{done:>{width}}/{total}]  eta: {_format_seconds(eta)}  "
                      f"{rate:.2f} it/s  {self}{memory}", flush=True)
        print(f"{header} total time: {_format_seconds(time.time() - start)}", flush=True)


# ---- Generic training loop -------------------------------------------------------------
@dataclass
class LoopOptions:
    accumulation_steps: int = 1
    max_grad_norm: float | None = None
    log_every: int = 50
    save_every_steps: int = 0  # optimiser steps between mid-epoch checkpoint_last.pth (0: off)
    seed: int | None = None  # reseed every epoch from (seed, rank, epoch) when set

    @classmethod
    def from_args(cls, args: argparse.Namespace, seed: int | None) -> "LoopOptions":
        return cls(args.accumulation_steps, args.max_grad_norm, args.log_every,
                   args.save_every_steps, seed)


@dataclass
class StepContext:
    """Where the loop is, for compute_losses (e.g. the alpha ramp)."""
    epoch: int
    step: int  # micro-batch index within the epoch
    steps_per_epoch: int
    device: torch.device


@dataclass
class ResumePoint:
    """Where a resumed run continues: epoch, batches already done in it, this rank's RNG."""
    epoch: int
    skip_batches: int = 0
    rng_state: dict | None = None


def move_to_device(batch, device: torch.device):
    """Tensors anywhere in nested lists/tuples/dicts moved to `device`; the rest untouched."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


def _batches_after(loader, skip: int):
    """An iterator over `loader` from batch `skip` on, without loading the skipped batches."""
    if skip == 0 or loader.batch_sampler is None or isinstance(loader.dataset, IterableDataset):
        iterator = iter(loader)
        for _ in range(skip):
            next(iterator)
        return iterator
    remaining = list(loader.batch_sampler)[skip:]
    resumed = DataLoader(
        loader.dataset, batch_sampler=remaining, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn, generator=loader.generator,
        timeout=loader.timeout, multiprocessing_context=loader.multiprocessing_context)
    return iter(resumed)


def train_one_epoch(model, loader, optimizer, epoch: int, compute_losses, precision: Precision,
                    options: LoopOptions | None = None, lr_schedule=None, checkpointer=None,
                    resume: ResumePoint | None = None, experiment_logger=None) -> dict:
    """One epoch of training; returns the epoch's averages over all ranks ('lr', losses...).

    `loader` is a DataLoader, or a tuple of them (e.g. video and image for --sep_img) whose
    batches arrive together as a tuple, for as many steps as the shortest has.

    `compute_losses(model, batch, context)` returns a dict of named loss tensors; their sum
    is the loss, run under autocast. With accumulation the loss is divided by the number
    of micro-batches in the group and the optimiser steps once per group (DDP gradient sync
    only on the last). `lr_schedule(epoch, optimiser_step)` sets the lr before each step.
    When `resume` is for this epoch, its first `resume.skip_batches` batches are skipped and
    the RNG state saved with them is restored, so the loss curve continues exactly.

    Exact resumption needs the sampler's order to depend only on (seed, epoch), as with
    DistributedSampler; randomness inside data-loader workers is not replayed exactly.
    """
    options = options or LoopOptions()
    loaders = tuple(loader) if isinstance(loader, (list, tuple)) else (loader,)
    model.train()
    if options.seed is not None:
        seed_everything(seed_for_rank(options.seed, epoch))
    for each in loaders:
        for sampler in (each.sampler, getattr(each.batch_sampler, "sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
    skip = resume.skip_batches if resume is not None and resume.epoch == epoch else 0
    iterators = [_batches_after(each, skip) for each in loaders]
    batches = iterators[0] if len(iterators) == 1 else zip(*iterators)
    if skip and resume.rng_state is not None:
        # Restored after the iterators exist: building them draws from the RNG.
        set_rng_state(resume.rng_state)
    total = min(len(each) for each in loaders)
    accumulation = options.accumulation_steps
    updates_per_epoch = math.ceil(total / accumulation)
    parameters = [p for p in model.parameters() if p.requires_grad]
    device = parameters[0].device
    metric_logger = MetricLogger()
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    optimizer.zero_grad(set_to_none=True)
    header = f"Train epoch: [{epoch}]"
    for index, batch in enumerate(metric_logger.log_every(batches, options.log_every, header,
                                                          total=total - skip), start=skip):
        group_start = index - index % accumulation
        group_size = min(accumulation, total - group_start)
        is_update = index + 1 == group_start + group_size
        update_index = index // accumulation
        if index == group_start:
            if lr_schedule is not None:
                set_lr(optimizer, lr_schedule(epoch, update_index))
            metric_logger.update(lr=optimizer.param_groups[0]["lr"])
        context = StepContext(epoch, index, total, device)
        sync = nullcontext() if is_update or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with precision.autocast():
                losses = compute_losses(model, move_to_device(batch, context.device), context)
                loss = sum(losses.values())
            precision.scaler.scale(loss / group_size).backward()
        metric_logger.update(**{name: value.detach().float() for name, value in losses.items()})
        if not is_update:
            continue
        if options.max_grad_norm is not None:
            precision.scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, options.max_grad_norm)
            if torch.isfinite(grad_norm):  # an fp16 overflow step is skipped by the scaler
                metric_logger.update(grad_norm=grad_norm)
        precision.scaler.step(optimizer)
        precision.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        global_step = epoch * updates_per_epoch + update_index + 1
        if experiment_logger is not None and (update_index + 1) % options.log_every == 0:
            experiment_logger.log({f"train/{name}": meter.value
                                   for name, meter in metric_logger.meters.items()}, global_step)
        if checkpointer is not None:
            checkpointer.global_step = global_step
            if (options.save_every_steps > 0 and index + 1 < total
                    and (update_index + 1) % options.save_every_steps == 0):
                checkpointer.save("checkpoint_last.pth", epoch, step_in_epoch=index + 1)
    metric_logger.synchronize_between_processes()
    print(f"Averaged stats: {metric_logger}")
    return metric_logger.global_averages()


# ---- Checkpoints -----------------------------------------------------------------------
def atomic_torch_save(obj, path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A crash mid-write leaves any previous file at `path` intact. Callers guard the rank.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_checkpoint(path) -> dict:
    """Read a checkpoint file on the CPU with weights_only=True (a file from the internet
    cannot run code). Missing or unreadable files are reported in one line by run_cli."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}") from None


def load_model_state(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Strict load that names missing/unexpected keys in one line instead of a traceback."""
    try:
        result = unwrap_model(model).load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise UserError(f"checkpoint {source} does not match this model: "
                        f"{' '.join(str(error).split())[:300]}") from None
    if result.missing_keys or result.unexpected_keys:
        def preview(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        raise UserError(f"checkpoint {source} does not match this model: "
                        f"{len(result.missing_keys)} missing keys [{preview(result.missing_keys)}], "
                        f"{len(result.unexpected_keys)} unexpected keys [{preview(result.unexpected_keys)}]")


class Checkpointer:
    """Saves and resumes the whole training state of one run in `output_dir`.

    `save` is collective (every rank contributes its RNG state) and only rank 0 writes.
    Checkpoint keys: model, optimizer, scaler, config, epoch, step_in_epoch (batches done),
    epoch_complete, global_step, best_metric, rng (one state per rank, in rank order).
    """

    def __init__(self, output_dir, model, optimizer, precision: Precision, config: dict):
        self.output_dir = Path(output_dir)
        self.model = model
        self.optimizer = optimizer
        self.precision = precision
        self.config = config
        self.best_metric: float | None = None  # scripts update it when validation improves
        self.global_step = 0  # optimiser steps so far; kept current by train_one_epoch

    def save(self, name: str, epoch: int, step_in_epoch: int = 0, epoch_complete: bool = False) -> Path:
        """Write output_dir/name; `epoch` is the epoch the state belongs to (as BLIP saves it)."""
        rng_states = gather_objects(get_rng_state())
        path = self.output_dir / name
        if is_main_process():
            atomic_torch_save({
                "model": unwrap_model(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.precision.scaler.state_dict(),
                "config": self.config,
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "epoch_complete": epoch_complete,
                "global_step": self.global_step,
                "best_metric": self.best_metric,
                "rng": rng_states,
            }, path)
        barrier()
        return path

    def resume(self, checkpoint: str | None = None) -> ResumePoint | None:
        """Restore from `checkpoint`, else from output_dir/checkpoint_last.pth if present."""
        path = Path(checkpoint) if checkpoint else self.output_dir / "checkpoint_last.pth"
        if checkpoint is None and not path.is_file():
            return None
        state = read_checkpoint(path)
        missing = [key for key in ("model", "optimizer", "epoch") if key not in state]
        if missing:
            raise UserError(f"checkpoint {path} is not a training checkpoint (no {', '.join(missing)})")
        load_model_state(self.model, state["model"], str(path))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as error:
            raise UserError(f"checkpoint {path}: optimiser state does not fit this model ({error})") from None
        if state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        self.best_metric = state.get("best_metric")
        rng_states = state.get("rng") or []
        rng_state = rng_states[get_rank()] if len(rng_states) == get_world_size() else None
        if rng_states and rng_state is None:
            print(f"checkpoint was written by {len(rng_states)} processes, not {get_world_size()}: "
                  "RNG states are not restored")
        complete = state.get("epoch_complete", True)
        self.global_step = state.get("global_step", 0)
        point = ResumePoint(epoch=state["epoch"] + 1 if complete else state["epoch"],
                            skip_batches=0 if complete else state.get("step_in_epoch", 0),
                            rng_state=rng_state)
        if complete and rng_state is not None:
            set_rng_state(rng_state)
        print(f"resumed from {path}: epoch {point.epoch}, skipping {point.skip_batches} batches")
        return point


# ---- Experiment logging and model summary ----------------------------------------------
def log_epoch(output_dir, epoch: int, **sections: dict) -> dict:
    """Append one JSON line to output_dir/log.txt, e.g. log_epoch(d, 3, train=stats, val=metrics)
    gives {'train_lr': ..., 'train_loss_ita': ..., 'val_r_mean': ..., 'epoch': 3}."""
    record = {f"{prefix}_{key}": value for prefix, values in sections.items()
              for key, value in values.items()}
    record["epoch"] = epoch
    if is_main_process():
        with open(Path(output_dir) / "log.txt", "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return record


def _import_optional(module: str, flag: str, package: str):
    """Import an optional integration, or explain in one line what `flag` needs."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{flag} needs the {package} package: pip install {package}") from None


class ExperimentLogger:
    """Scalars to tensorboard and/or wandb, on rank 0, each imported only when asked for."""

    def __init__(self, output_dir, config: dict, tensorboard: bool = False, use_wandb: bool = False,
                 project: str = "testa"):
        self.writer = None
        self.wandb = None
        if not is_main_process():
            return
        if tensorboard:
            writer_module = _import_optional("torch.utils.tensorboard", "--tensorboard", "tensorboard")
            self.writer = writer_module.SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        if use_wandb:
            self.wandb = wandb = _import_optional("wandb", "--wandb", "wandb")
            wandb.init(project=project, name=Path(output_dir).name, config=config, dir=str(output_dir))

    def log(self, scalars: dict, step: int) -> None:
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


@torch.no_grad()
def visual_gmacs_per_clip(visual_encoder: torch.nn.Module, num_frames: int, image_size: int,
                          counter: str = "torch") -> float:
    """Multiply-adds (in G) of one forward pass of a (1, 3, T, H, W) clip, in eval mode.

    torch's FlopCounterMode counts 2 FLOPs per multiply-add, so its total is halved;
    fvcore's FlopCountAnalysis already counts one per multiply-add.
    """
    device = next(visual_encoder.parameters()).device
    clip = torch.zeros(1, 3, num_frames, image_size, image_size, device=device)
    was_training = visual_encoder.training
    visual_encoder.eval()
    try:
        if counter == "fvcore":
            fvcore_nn = _import_optional("fvcore.nn", "--flop_counter fvcore", "fvcore")
            analysis = fvcore_nn.FlopCountAnalysis(visual_encoder, clip)
            analysis.unsupported_ops_warnings(False)
            return analysis.total() / 1e9
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as flop_counter:
            visual_encoder(clip)
        return flop_counter.get_total_flops() / 2 / 1e9
    finally:
        visual_encoder.train(was_training)


def print_model_summary(model: torch.nn.Module, visual_encoder: torch.nn.Module | None,
                        config: dict, counter: str = "torch") -> None:
    """Parameter counts and, on rank 0, the visual encoder's GMACs per test clip."""
    total, trainable = count_parameters(model)
    print(f"parameters: {total / 1e6:.2f}M total, {trainable / 1e6:.2f}M trainable")
    if visual_encoder is not None and is_main_process():
        num_frames = config.get("num_frm_test", config.get("num_frames"))
        gmacs = visual_gmacs_per_clip(visual_encoder, num_frames, config["image_size"], counter)
        print(f"visual encoder: {gmacs:.2f} GMACs per clip ({num_frames} frames, "
              f"{config['image_size']}px; counted by {counter})")


# ---- The epoch loop the scripts share --------------------------------------------------
def fit(run: Run, model: torch.nn.Module, train_loader, compute_losses, schedule: str,
        validate: Callable[[torch.nn.Module, int], dict] | None = None, best_metric: str | None = None,
        test: Callable[[torch.nn.Module], dict] | None = None, protocol: dict | None = None,
        bad_input_datasets=(), checkpoint_every_epoch: bool = False) -> None:
    """Train for config['max_epoch'] epochs, resuming where a previous run stopped.

    After each epoch: report unreadable inputs, `validate(model, epoch)`, save checkpoint_best.pth
    when `best_metric` improves, checkpoint_last.pth (and checkpoint_XX.pth if asked), and
    one JSON line in log.txt. Finally `test(model)` runs with the best weights and its
    metrics go to test_results.txt with the evaluation `protocol`.
    """
    args, config = run.args, run.config
    wrapped = wrap_distributed(model, run.device)
    optimizer = create_optimizer(model, config)
    lr_schedule = make_lr_schedule(config, schedule)
    checkpointer = Checkpointer(run.output_dir, wrapped, optimizer, run.precision, config)
    resume = checkpointer.resume(args.checkpoint)
    options = LoopOptions.from_args(args, run.seed)
    experiment_logger = ExperimentLogger(run.output_dir, config, args.tensorboard, args.wandb)
    for epoch in range(resume.epoch if resume else 0, config["max_epoch"]):
        stats = train_one_epoch(wrapped, train_loader, optimizer, epoch, compute_losses, run.precision,
                                options, lr_schedule, checkpointer, resume, experiment_logger)
        for dataset in bad_input_datasets:
            count = dataset.bad_inputs.count()
            if count:
                print(f"epoch {epoch}: {count} unreadable inputs were replaced "
                      f"(first: {dataset.bad_inputs.paths()[:3]})")
                dataset.bad_inputs.reset()
        val = validate(model, epoch) if validate is not None else {}
        if best_metric is not None and best_metric in val and (
                checkpointer.best_metric is None or val[best_metric] > checkpointer.best_metric):
            checkpointer.best_metric = val[best_metric]
            checkpointer.save("checkpoint_best.pth", epoch, epoch_complete=True)
        if checkpoint_every_epoch:
            checkpointer.save(f"checkpoint_{epoch:02d}.pth", epoch, epoch_complete=True)
        checkpointer.save("checkpoint_last.pth", epoch, epoch_complete=True)
        log_epoch(run.output_dir, epoch, train=stats, val=val)
        experiment_logger.log({f"val/{name}": value for name, value in val.items()
                               if isinstance(value, (int, float))}, checkpointer.global_step)
    experiment_logger.close()
    if test is not None:
        best = run.output_dir / "checkpoint_best.pth"
        if best.is_file():
            load_model_state(model, read_checkpoint(best)["model"], str(best))
            print(f"testing the best weights ({best_metric} = {checkpointer.best_metric})")
        report_test(run, model, test, "test_results.txt", protocol or {})


def evaluation_protocol(config: dict, **extra) -> dict:
    """What a result was measured with, stored next to the metrics."""
    return {"frames": config.get("num_frm_test"), "image_size": config.get("image_size"),
            "frame_sampling": config.get("frm_sampling_strategy_test") or "uniform",
            "k_test": config.get("k_test"), "tie_rule": config.get("tie_rule", "original"),
            "checkpoint": config.get("pretrained") or None, **extra}


def report_test(run: Run, model: torch.nn.Module, test: Callable[[torch.nn.Module], dict], filename: str,
                protocol: dict) -> dict:
    """Run `test(model)` and record its metrics with the protocol in output_dir/filename."""
    metrics = test(model)
    write_results(run.output_dir, filename, {"split": "test", **protocol, **metrics})
    return metrics


def write_results(output_dir, filename: str, record: dict) -> None:
    """Append `record` as one JSON line to output_dir/filename and print it (rank 0)."""
    if is_main_process():
        with open(Path(output_dir) / filename, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=1))


# ---- Metrics ---------------------------------------------------------------------------
TIE_RULES = ("original", "pessimistic")


def best_ground_truth_ranks(scores, ground_truth: list[list[int]], tie_rule: str = "original") -> np.ndarray:
    """1-based rank of the best-ranked ground truth for each query (row of `scores`).

    tie_rule decides where a ground truth lands among exactly equal scores:
    - "original": its position in ``numpy.argsort(row)[::-1]``, the original's metric, so
      published numbers reproduce (for short rows the later index comes first among ties;
      numpy promises no order for ties in general);
    - "pessimistic": 1 + the number of non-ground-truth candidates scoring at least as
      high as the best ground truth (a ground truth left at the fill value outside the
      re-ranked top k ranks last).
    Other ground truths never push a query's rank down under either rule.
    """
    if tie_rule not in TIE_RULES:
        raise ValueError(f"unknown tie_rule {tie_rule!r}; expected one of {TIE_RULES}")
    scores = scores.detach().float().cpu().numpy() if torch.is_tensor(scores) else np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != len(ground_truth):
        raise ValueError(f"scores must be (num_queries, num_candidates) with one ground-truth "
                         f"list per query; got shape {scores.shape} and {len(ground_truth)} lists")
    ranks = np.empty(len(ground_truth), dtype=np.int64)
    for query, targets in enumerate(ground_truth):
        if len(targets) == 0:
            raise ValueError(f"query {query} has no ground-truth candidate")
        row, targets = scores[query], list(targets)
        if tie_rule == "original":
            position = np.empty(row.shape[0], dtype=np.int64)
            position[np.argsort(row)[::-1]] = np.arange(row.shape[0])
            ranks[query] = 1 + int(position[targets].min())
        else:
            is_target = np.zeros(row.shape[0], dtype=bool)
            is_target[targets] = True
            ranks[query] = 1 + int(np.count_nonzero(row[~is_target] >= row[is_target].max()))
    return ranks


def _rank_metrics(ranks: np.ndarray, prefix: str) -> dict:
    recalls = {f"{prefix}_r{k}": 100.0 * float(np.mean(ranks <= k)) for k in (1, 5, 10)}
    return {**recalls,
            f"{prefix}_r_mean": sum(recalls.values()) / 3,
            f"{prefix}_median_rank": float(np.median(ranks)),
            f"{prefix}_mean_rank": float(np.mean(ranks))}


def retrieval_metrics(scores_t2v, scores_v2t, txt2video: list[int],
                      video2txt: list[list[int]], tie_rule: str = "original") -> dict:
    """R@1/5/10 (percent), their mean, median and mean rank in both directions, and r_mean.

    scores_t2v is (num_texts, num_videos); scores_v2t is (num_videos, num_texts);
    txt2video[t] is text t's video; video2txt[v] lists video v's texts (one or more);
    tie_rule as in best_ground_truth_ranks.
    """
    t2v = _rank_metrics(best_ground_truth_ranks(scores_t2v, [[v] for v in txt2video], tie_rule), "txt2video")
    v2t = _rank_metrics(best_ground_truth_ranks(scores_v2t, video2txt, tie_rule), "video2txt")
    return {**t2v, **v2t, "r_mean": (t2v["txt2video_r_mean"] + v2t["video2txt_r_mean"]) / 2}


def qa_accuracy(predictions: dict, answers: dict, question_types: dict | None = None) -> dict:
    """Exact-match accuracy in percent over all questions in `answers` (missing = wrong).

    predictions and answers map question_id -> answer string (compared after stripping
    surrounding whitespace); question_types maps question_id -> type for per-type accuracy
    ('accuracy_<type>').
    """
    if not answers:
        raise ValueError("qa_accuracy needs at least one ground-truth answer")
    correct = {qid: str(predictions.get(qid, "")).strip() == str(answer).strip()
               for qid, answer in answers.items()}
    result = {"accuracy": 100.0 * sum(correct.values()) / len(correct),
              "num_questions": len(correct)}
    if question_types:
        by_type = defaultdict(list)
        for qid, hit in correct.items():
            by_type[question_types[qid]].append(hit)
        for kind in sorted(by_type, key=str):
            result[f"accuracy_{kind}"] = 100.0 * sum(by_type[kind]) / len(by_type[kind])
    return result


def merge_rank_results(results: list[dict], key: str = "question_id") -> list[dict]:
    """Every rank's result dicts in one list, deduplicated by `key` (DistributedSampler pads
    the last batch with repeats) and sorted by it."""
    merged = {}
    for rank_results in gather_objects(results):
        for item in rank_results:
            merged.setdefault(item[key], item)
    return [merged[k] for k in sorted(merged)]
