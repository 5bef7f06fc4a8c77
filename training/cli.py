"""The flags every entry script shares, and the set-up they all start with."""
import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from configs.keys import value
from configs.load import load_config, save_config
from data.video import reader_names
from models.checkpoint import read_checkpoint
from runtime.distributed import gather_objects, get_world_size, init_distributed, is_main_process, seed_for_rank
from runtime.errors import UserError
from runtime.precision import PRECISION_METHODS, Precision, make_precision
from runtime.provenance import provenance
from runtime.run_lock import acquire_run_lock
from training.checkpoints import resume_differences, resume_path, training_settings
from training.logging import write_results
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
    add("--mixed_precision_method", choices=PRECISION_METHODS, default=None,
        help="sets the config key mixed_precision_method (default: the config's, else none). "
             "apex/fp16: native AMP fp16 with gradient scaling on CUDA; bf16: bf16 autocast; none: fp32. "
             "On CPU apex, fp16 and bf16 all run bf16 autocast. NVIDIA apex is not used")
    add("--checkpoint", default=None,
        help="checkpoint to resume training from (model, optimiser, scaler, epoch, step, RNG); "
             "without it, output_dir/checkpoint_last.pth is resumed when present")
    add("--resume_with_changes", action="store_true",
        help="resume although settings that change training (batch size, learning rate, processes, "
             "--accumulation_steps, ...) differ from those the checkpoint was written under; the differences "
             "are printed and recorded in log.txt. Without it such a resume stops, naming them")
    add("--evaluate", action="store_true",
        help="no training: evaluate the config's `pretrained` weights on the test split")
    add("--allow_random_weights", action="store_true",
        help="let --evaluate run with an empty `pretrained:` (randomly initialised weights: chance level)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda or cpu (default: %(default)s); under torchrun each process uses cuda:LOCAL_RANK")
    add("--seed", type=int, default=None, help="random seed (default: the config's seed, else 42)")
    add("--accumulation_steps", type=_positive_int, default=None,
        help="sets the config key accumulation_steps: micro-batches per optimiser step; the loss is divided "
             "accordingly (default: the config's, else 1)")
    add("--max_grad_norm", type=float, default=None,
        help="sets the config key max_grad_norm: clip the gradient norm to this value (unscaled first under "
             "AMP; default: the config's, else no clipping)")
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
    training_flags: dict  # accumulation_steps, max_grad_norm: from the config (recorded in its checkpoints)
    provenance: dict | None = None  # runtime.provenance: software, processes, device, git commit

    def record(self) -> dict:
        """What every results file carries beside its metrics: the settings that change results
        but are no part of the evaluation protocol (the precision also as the arithmetic it runs),
        and the provenance."""
        settings = {name: value(self.config, name) for name in RECORDED_KEYS}
        settings["precision"] = training_settings(self.precision, {})["precision"]
        return {"settings": settings, "provenance": self.provenance}


# Flags that, when given, override the config key of the same name.
_FLAGS_OVERRIDING_CONFIG = ("num_workers", "k_test_batch_size", "low_resource_eval", "seed",
                            "mixed_precision_method", "accumulation_steps", "max_grad_norm")
# Config keys whose resolved value (the default where unset) config.yaml, checkpoints and results record.
RECORDED_KEYS = ("mixed_precision_method", "accumulation_steps", "max_grad_norm")


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


def check_resume_fits(args: argparse.Namespace, config: dict, settings: dict, output_dir: Path) -> None:
    """A resume whose settings that change training differ from those its checkpoint was written
    under stops, naming each; with --resume_with_changes it goes on with a warning and a
    `resumed_with_changes` record in log.txt. Only the checkpoint's small entries are read."""
    path = resume_path(output_dir, args.checkpoint)
    if path is None:
        return
    differences = resume_differences(read_checkpoint(path, mmap=True), config, settings)
    if not differences:
        return
    listed = ", ".join(f"{name} {before} -> {now}" for name, (before, now) in differences.items())
    if not args.resume_with_changes:
        raise UserError(f"{path} was written under other settings that change training (checkpoint -> this run): "
                        f"{listed}; resume with the checkpoint's settings, use another --output_dir, or pass "
                        "--resume_with_changes to continue with these changes")
    print(f"warning: resuming {path} with changed settings (checkpoint -> this run): {listed}; "
          "recorded in log.txt", file=sys.stderr, flush=True)
    write_results(output_dir, "log.txt", {"resumed_with_changes": {name: list(pair) for name, pair in
                                                                   differences.items()}, "checkpoint": str(path)})


def keep_previous_config(config: dict, output_dir: Path) -> None:
    """config.yaml is never overwritten silently: one that differs from this run's config is
    kept as config.N.yaml (the first free N), with a warning naming the differences."""
    target = output_dir / "config.yaml"
    if not is_main_process() or not target.is_file():
        return
    try:
        previous = YAML(typ="safe").load(target.read_text())
    except YAMLError:
        previous = None
    previous = previous if isinstance(previous, dict) else {}
    changed = [f"{name} {previous.get(name)} -> {config.get(name)}" for name in sorted(previous.keys() | config.keys())
               if previous.get(name) != config.get(name)]
    if not changed:
        return
    kept = next(path for path in (output_dir / f"config.{n}.yaml" for n in itertools.count(1)) if not path.exists())
    target.rename(kept)
    more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    print(f"warning: {target} differs from this run's config ({', '.join(changed[:5])}{more}): "
          f"the earlier one is kept as {kept.name}", file=sys.stderr, flush=True)


def setup_run(args: argparse.Namespace) -> Run:
    """Distributed init, config + overrides + flags, output folder (locked for this run), the
    resume's settings compared with its checkpoint's, config.yaml (an earlier, different one
    kept), seeding."""
    device = init_distributed(args.device, args.dist_timeout_minutes)
    if device.type == "cpu" and keep_freed_cpu_memory():
        print("CPU allocator: glibc malloc keeps freed memory for reuse (no per-step page faults)")
    # The flags that set config keys go in as overrides, so their values are checked like the file's.
    flags = [f"{flag}={getattr(args, flag)}" for flag in _FLAGS_OVERRIDING_CONFIG if getattr(args, flag) is not None]
    config = load_config(args.config, list(args.options) + list(args.overrides) + flags)
    seed = config["seed"] = value(config, "seed")
    config.update({name: value(config, name) for name in RECORDED_KEYS})
    if args.evaluate and not config.get("pretrained") and not args.allow_random_weights:
        # Metrics of random weights look like results; make testing chance level a choice.
        raise UserError("--evaluate needs weights to test: `pretrained:` is empty; set pretrained=PATH "
                        "(or pass --allow_random_weights to evaluate a randomly initialised model)")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock_output_dir(output_dir)
    precision = make_precision(config["mixed_precision_method"], device)
    training_flags = {"accumulation_steps": config["accumulation_steps"], "max_grad_norm": config["max_grad_norm"]}
    if not args.evaluate:
        check_resume_fits(args, config, training_settings(precision, training_flags), output_dir)
    keep_previous_config(config, output_dir)
    run_provenance = provenance(get_world_size(), device)
    save_config(config, output_dir, run_provenance)
    seed_everything(seed_for_rank(seed))
    print(f"precision: {precision.describe()}; world size {get_world_size()}; device {device}")
    # Readers differ in how they resize, so the log says which decode this run's clips.
    print(f"video readers, in the order tried: {', '.join(reader_names())}")
    return Run(args, config, device, output_dir, precision, seed, training_flags, run_provenance)
