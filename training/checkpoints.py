"""Training checkpoints: atomic saves of the whole training state and exact resumption."""
from dataclasses import dataclass
from pathlib import Path

import torch

from models.checkpoint import read_checkpoint
from training.distributed import barrier, gather_objects, get_rank, get_world_size, is_main_process, unwrap_model
from training.errors import UserError
from training.precision import Precision
from utils import atomic_torch_save, get_rng_state, set_rng_state


@dataclass
class ResumePoint:
    """Where a resumed run continues: epoch, batches already done in it, this rank's RNG."""
    epoch: int
    skip_batches: int = 0
    rng_state: dict | None = None


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
