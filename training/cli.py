"""The flags every entry script shares, and the set-up they all start with."""
import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from configs.keys import value
from data.video import reader_names
from training.config import load_config, save_config
from training.distributed import gather_objects, get_world_size, init_distributed, is_main_process, seed_for_rank
from training.errors import UserError
from training.precision import Precision, make_precision
from training.run_lock import acquire_run_lock
from utils import keep_freed_cpu_memory, seed_everything


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_arg_parser(description: str) -> argparse.ArgumentParser:
    """The flags every entry script shares; scripts add their own before parse_args()."""
    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument
    add("--config", required=True, help="YAML config file (its keys are described in configs/keys.py)")
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
    add("--allow_random_weights", action="store_true",
        help="let --evaluate run with an empty `pretrained:` (randomly initialised weights: chance level)")
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
    add("--low_resource_eval", action="store_const", const=True, default=None,
        help="keep cached video features in half precision on the CPU during retrieval re-ranking")
    add("--log_every", type=_positive_int, default=50, help="print training progress every N steps (default: 50)")
    add("--save_every_steps", type=int, default=0,
        help="also write checkpoint_last.pth every N optimiser steps inside an epoch (default 0: off)")
    add("--tensorboard", action="store_true", help="log scalars to output_dir/tensorboard")
    add("--wandb", action="store_true", help="log scalars to Weights & Biases (needs wandb installed)")
    add("--compile", action="store_true",
        help="torch.compile the visual encoder for training and evaluation (on the CPU this needs a C++ "
             "compiler; the first steps are slow while it compiles); checkpoints keep the eager key names")
    add("--dist_timeout_minutes", type=float, default=30,
        help="under torchrun or srun, a collective waiting this long for another process fails instead of "
             "hanging (default: 30)")
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
_FLAGS_OVERRIDING_CONFIG = ("num_workers", "k_test_batch_size", "low_resource_eval", "seed")


def lock_output_dir(output_dir: Path) -> None:
    """Rank 0 takes output_dir/.lock (torchrun's ranks share the folder); every rank stops if it
    could not, so no rank waits at a collective for a rank that has gone."""
    refusal = None
    if is_main_process():
        try:
            acquire_run_lock(output_dir)
        except UserError as error:
            refusal = str(error)
    refusal = gather_objects(refusal)[0]
    if refusal is not None:
        raise UserError(refusal)


def setup_run(args: argparse.Namespace) -> Run:
    """Distributed init, config + overrides + flags, output folder (locked for this run),
    config.yaml, seeding."""
    device = init_distributed(args.device, args.dist_timeout_minutes)
    if device.type == "cpu" and keep_freed_cpu_memory():
        print("CPU allocator: glibc malloc keeps freed memory for reuse (no per-step page faults)")
    config = load_config(args.config, list(args.options) + list(args.overrides))
    for flag in _FLAGS_OVERRIDING_CONFIG:
        if getattr(args, flag) is not None:
            config[flag] = getattr(args, flag)
    seed = config["seed"] = value(config, "seed")
    if args.evaluate and not config.get("pretrained") and not args.allow_random_weights:
        # Metrics of random weights look like results; make testing chance level a choice.
        raise UserError("--evaluate needs weights to test: `pretrained:` is empty; set pretrained=PATH "
                        "(or pass --allow_random_weights to evaluate a randomly initialised model)")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock_output_dir(output_dir)
    save_config(config, output_dir)
    seed_everything(seed_for_rank(seed))
    precision = make_precision(args.mixed_precision_method, device)
    print(f"precision: {precision.describe()}; world size {get_world_size()}; device {device}")
    # Readers differ in how they resize, so the log says which decode this run's clips.
    print(f"video readers, in the order tried: {', '.join(reader_names())}")
    return Run(args, config, device, output_dir, precision, seed)
