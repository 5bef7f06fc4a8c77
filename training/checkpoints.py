"""Training checkpoints: atomic saves of the whole training state and exact resumption."""
from dataclasses import dataclass
from pathlib import Path

import torch

from models.checkpoint import checkpoint_family, read_checkpoint
from training.distributed import barrier, gather_objects, get_rank, get_world_size, is_main_process, unwrap_model
from training.errors import UserError
from training.precision import Precision
from utils import atomic_torch_save, get_rng_state, set_rng_state


@dataclass
class ResumePoint:
    """Where a resumed run continues: epoch, batches already done in it, this rank's RNG and
    running averages, and the training averages of the epoch before `epoch` when it ended
    but may not have been validated and logged yet (fit decides from log.txt)."""
    epoch: int
    skip_batches: int = 0
    rng_state: dict | None = None
    meters: dict | None = None
    finished_epoch_stats: dict | None = None


def load_model_state(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Strict load that names missing/unexpected keys in one line instead of a traceback."""
    what = f"checkpoint {source} (a {checkpoint_family(state_dict)} checkpoint) does not match this model"
    try:
        result = unwrap_model(model).load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise UserError(f"{what}: {' '.join(str(error).split())[:300]}") from None
    if result.missing_keys or result.unexpected_keys:
        def preview(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        raise UserError(f"{what}: {len(result.missing_keys)} missing keys [{preview(result.missing_keys)}], "
                        f"{len(result.unexpected_keys)} unexpected keys [{preview(result.unexpected_keys)}]")


class Checkpointer:
    """Saves and resumes the whole training state of one run in `output_dir`.

    `save` is collective (every rank contributes its RNG state) and only rank 0 writes.
    Checkpoint keys: model, optimizer, scaler, config, epoch, step_in_epoch (batches done),
    epoch_complete, global_step, best_metric, rng and meters (one per rank, in rank order:
    RNG states and the epoch's running loss totals), epoch_stats (the finished epoch's
    training averages, for its log.txt line).
    """

    def __init__(self, output_dir, model, optimizer, precision: Precision, config: dict):
        self.output_dir = Path(output_dir)
        self.model = model
        self.optimizer = optimizer
        self.precision = precision
        self.config = config
        self.best_metric: float | None = None  # scripts update it when validation improves
        self.global_step = 0  # optimiser steps so far; kept current by train_one_epoch

    def save(self, name: str, epoch: int, step_in_epoch: int = 0, epoch_complete: bool = False,
             meters: dict | None = None, epoch_stats: dict | None = None) -> Path:
        """Write output_dir/name; `epoch` is the epoch the state belongs to (as BLIP saves it).
        `meters`: this rank's MetricLogger state mid-epoch; `epoch_stats`: the averages of a
        finished epoch."""
        rng_states, meter_states = zip(*gather_objects((get_rng_state(), meters)))
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
                "rng": list(rng_states),
                "meters": list(meter_states) if meters is not None else None,
                "epoch_stats": epoch_stats,
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
        rng_state, meters = _this_ranks(state, "rng"), _this_ranks(state, "meters")
        complete = state.get("epoch_complete", True)
        self.global_step = state.get("global_step", 0)
        point = ResumePoint(epoch=state["epoch"] + 1 if complete else state["epoch"],
                            skip_batches=0 if complete else state.get("step_in_epoch", 0),
                            rng_state=rng_state, meters=None if complete else meters,
                            finished_epoch_stats=state.get("epoch_stats") if complete else None)
        if complete and rng_state is not None:
            set_rng_state(rng_state)
        print(f"resumed from {path}: epoch {point.epoch}, skipping {point.skip_batches} batches")
        return point


def _this_ranks(state: dict, key: str):
    """This rank's entry of a per-rank list (RNG states, meters), if the world size is the same."""
    entries = state.get(key) or []
    if len(entries) == get_world_size():
        return entries[get_rank()]
    if entries:
        print(f"checkpoint was written by {len(entries)} processes, not {get_world_size()}: "
              f"its {key} states are not restored")
    return None
