"""Training checkpoints: atomic saves of the whole training state and exact resumption, and
what a resume must have in common with the run that wrote the checkpoint."""
from dataclasses import dataclass
from pathlib import Path

import torch

from configs.keys import CONFIG_KEYS, ConfigError, value
from models.checkpoint import load_checkpoint, model_settings, read_checkpoint
from runtime.distributed import barrier, gather_objects, get_rank, get_world_size, is_main_process, unwrap_model
from runtime.errors import UserError
from runtime.precision import Precision
from runtime.provenance import provenance as current_provenance
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


# Config keys a resume may change: where the files are, how evaluation runs, how fast or
# memory-hungry training is, and max_epoch (to train longer or stop sooner). Every other key
# changes what training computes (docs/checkpoints.md, "Resuming").
CHANGEABLE_ON_RESUME = frozenset({
    "max_epoch", "pretrained", "pretrained_queues", "video_root", "ann_root", "train_file", "train_shards",
    "allow_paths_outside_video_root",
    "answer_list", "med_config", "tokenizer", "num_workers", "vit_grad_ckpt", "vit_ckpt_layer",
    "batch_size_test", "num_frm_test", "frm_sampling_strategy_test", "k_test", "k_test_batch_size",
    "low_resource_eval", "tie_rule", "inference", "answer_candidates", "val_question_every",
    "substitute_black_on_error",
    "max_words",  # compared through caption_max_words and text_max_tokens, which it sets
})
# Config keys a resume compares through `training_settings` instead, under the same names: the
# precision as the arithmetic it runs (apex and fp16 are the same), accumulation and clipping also
# for checkpoints written while they were flags only (their configs do not say them).
COMPARED_AS_TRAINING_SETTINGS = frozenset({"mixed_precision_method", "accumulation_steps", "max_grad_norm"})
# The training batch per process: fine-tuning, pre-training.
BATCH_KEYS = ("batch_size_train", "batch_size")


def resume_path(output_dir, checkpoint: str | None) -> Path | None:
    """The checkpoint a training run resumes: `checkpoint` (--checkpoint), else
    output_dir/checkpoint_last.pth when present."""
    if checkpoint:
        return Path(checkpoint)
    last = Path(output_dir) / "checkpoint_last.pth"
    return last if last.is_file() else None


def training_settings(precision: Precision, flags: dict) -> dict:
    """What a resume compares besides the config: the number of processes, the arithmetic
    precision and the config's accumulation_steps and max_grad_norm (`flags`, resolved)."""
    arithmetic = "fp32" if precision.dtype is None else str(precision.dtype).removeprefix("torch.")
    return {"world_size": get_world_size(), "precision": arithmetic, **flags}


def recorded_training_settings(state: dict) -> dict:
    """The training settings a checkpoint records; a checkpoint written before that record
    tells its number of processes by its RNG states, one per process."""
    if isinstance(state.get("training_settings"), dict):
        return state["training_settings"]
    return {"world_size": len(state["rng"])} if state.get("rng") else {}


def _resolved(config: dict, name: str):
    try:
        return value(config, name)
    except ConfigError:  # a required key this config does not set
        return None


def resume_differences(state: dict, config: dict, settings: dict) -> dict[str, tuple]:
    """{setting: (the checkpoint's, this run's)} for every setting that changes training and
    differs: the config keys (defaults resolved) but CHANGEABLE_ON_RESUME and
    COMPARED_AS_TRAINING_SETTINGS, then the training settings the checkpoint records."""
    differences = {}
    if isinstance(state.get("config"), dict):
        for name in CONFIG_KEYS:
            before, now = _resolved(state["config"], name), _resolved(config, name)
            if name not in CHANGEABLE_ON_RESUME | COMPARED_AS_TRAINING_SETTINGS and before != now:
                differences[name] = (before, now)
    recorded = recorded_training_settings(state)
    differences.update({name: (recorded[name], now) for name, now in settings.items()
                        if name in recorded and recorded[name] != now})
    return differences


def _samples_per_batch(config: dict, world_size: int | None) -> int | None:
    """Training samples per loader step, all processes together."""
    batch = next((config[key] for key in BATCH_KEYS if key in config), None)
    return batch * world_size if batch and world_size else None


class Checkpointer:
    """Saves and resumes the whole training state of one run in `output_dir`.

    `save` is collective (every rank contributes its RNG state) and only rank 0 writes.
    Checkpoint keys: model, optimizer, scaler, config, epoch, step_in_epoch (batches done),
    epoch_complete, global_step, best_metric, rng and meters (one per rank, in rank order:
    RNG states and the epoch's running loss totals), epoch_stats (the finished epoch's
    training averages, for its log.txt line), model_settings (models.checkpoint.model_settings:
    checked wherever the file is loaded), training_settings (`training_settings` of this run,
    from `training_flags`: compared when a run resumes), provenance (runtime.provenance: the
    software, processes, device and git commit of the run; `provenance`, else found at the
    first save).
    """

    def __init__(self, output_dir, model, optimizer, precision: Precision, config: dict,
                 training_flags: dict | None = None, provenance: dict | None = None):
        self.output_dir = Path(output_dir)
        self.model = model
        self.optimizer = optimizer
        self.precision = precision
        self.config = config
        self.training_flags = training_flags or {}
        self.provenance = provenance
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
                "model_settings": model_settings(unwrap_model(self.model)),
                "training_settings": training_settings(self.precision, self.training_flags),
                "provenance": self._provenance(),
            }, path)
        barrier()
        return path

    def _provenance(self) -> dict:
        if self.provenance is None:
            device = next((p.device for p in unwrap_model(self.model).parameters()), None)
            self.provenance = current_provenance(get_world_size(), device)
        return self.provenance

    def resume(self, checkpoint: str | None = None) -> ResumePoint | None:
        """Restore from `checkpoint`, else from output_dir/checkpoint_last.pth if present. The
        settings that change training were compared before (training.cli.setup_run)."""
        path = resume_path(self.output_dir, checkpoint)
        if path is None:
            return None
        state = read_checkpoint(path)
        missing = [key for key in ("model", "optimizer", "epoch") if key not in state]
        if missing:
            raise UserError(f"checkpoint {path} is not a training checkpoint (no {', '.join(missing)})")
        load_checkpoint(unwrap_model(self.model), state, strict=True, verbose=False, source=str(path))
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
                            skip_batches=0 if complete else self._batches_to_skip(state),
                            rng_state=rng_state, meters=None if complete else meters,
                            finished_epoch_stats=state.get("epoch_stats") if complete else None)
        if complete and rng_state is not None:
            set_rng_state(rng_state)
        print(f"resumed from {path}: epoch {point.epoch}, skipping {point.skip_batches} batches")
        return point

    def _batches_to_skip(self, state: dict) -> int:
        """The batches of this run that hold the samples the checkpoint's run had done in its
        epoch. DistributedSampler deals out one shuffled order per epoch, so those are its first
        `step_in_epoch * batch * processes`; a resume with another batch size or process count
        (--resume_with_changes) redoes at most one batch's worth, and skips none it had not done."""
        done = state.get("step_in_epoch", 0)
        before = _samples_per_batch(state.get("config") or {}, recorded_training_settings(state).get("world_size"))
        now = _samples_per_batch(self.config, get_world_size())
        if not done or before is None or now is None or before == now:
            return done
        print(f"the checkpoint had done {done} batches of {before} samples (all processes) in its epoch: "
              f"skipping {done * before // now} batches of {now}")
        return done * before // now


def _this_ranks(state: dict, key: str):
    """This rank's entry of a per-rank list (RNG states, meters), if the world size is the same."""
    entries = state.get(key) or []
    if len(entries) == get_world_size():
        return entries[get_rank()]
    if entries:
        print(f"checkpoint was written by {len(entries)} processes, not {get_world_size()}: "
              f"its {key} states are not restored")
    return None
