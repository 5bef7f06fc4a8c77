"""One training epoch: accumulation, AMP, clipping, mid-epoch checkpoints and exact resumption."""
import argparse
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, IterableDataset

from configs.keys import value
from models.checkpoint import CheckpointError, read_checkpoint
from runtime.distributed import seed_for_rank, unwrap_model
from runtime.errors import Interrupted, NonFiniteError
from runtime.fault_injection import exit_abruptly, exit_step, interrupt_self, interrupt_step
from runtime.numerics import first_nonfinite_tensor, nonfinite_name
from runtime.precision import Precision
from runtime.progress import MetricLogger, SmoothedValue
from training.budgets import BudgetDraws
from training.checkpoints import Checkpointer, ResumePoint
from training.optim import set_lr
from utils import move_to_device, seed_everything, set_rng_state


@dataclass
class LoopOptions:
    accumulation_steps: int = 1
    max_grad_norm: float | None = None
    log_every: int = 50
    save_every_steps: int = 0  # optimiser steps between mid-epoch checkpoint_last.pth (0: off)
    seed: int | None = None  # reseed every epoch from (seed, rank, epoch) when set
    budget_draws: BudgetDraws | None = None  # a token budget per step (merge_budget_range)

    @classmethod
    def from_args(cls, args: argparse.Namespace, seed: int | None, config: dict) -> "LoopOptions":
        """Accumulation and clipping from the config (their flags are overrides of it), the rest from the flags."""
        return cls(value(config, "accumulation_steps"), value(config, "max_grad_norm"), args.log_every,
                   args.save_every_steps, seed)


@dataclass
class StepContext:
    """Where the loop is, for compute_losses (e.g. the alpha ramp)."""
    epoch: int
    step: int  # micro-batch index within the epoch
    steps_per_epoch: int
    device: torch.device


def _batches_after(loader, skip: int):
    """An iterator over `loader` from batch `skip` on, without loading the skipped batches
    when it is a DataLoader with a batch sampler."""
    if (skip == 0 or not isinstance(loader, DataLoader) or loader.batch_sampler is None
            or isinstance(loader.dataset, IterableDataset)):
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


def _epoch_batches(loaders, epoch: int, skip: int, options: LoopOptions, resume: ResumePoint | None):
    """Seed the epoch, tell samplers the epoch, and iterate from batch `skip` on (a tuple of
    batches, one per loader, when there are several)."""
    if options.seed is not None:
        seed_everything(seed_for_rank(options.seed, epoch))
    for each in loaders:
        # Datasets with set_epoch draw each sample's randomness from (seed, epoch, rank, index),
        # so a resumed epoch, whose batches go to other workers, decodes the same clips.
        for target in (getattr(each, "sampler", None), getattr(getattr(each, "batch_sampler", None), "sampler", None),
                       getattr(each, "dataset", None)):
            if hasattr(target, "set_epoch"):
                target.set_epoch(epoch)
    iterators = [_batches_after(each, skip) for each in loaders]
    if skip and resume.rng_state is not None:
        # Restored after the iterators exist: building them draws from the RNG.
        set_rng_state(resume.rng_state)
    return iterators[0] if len(iterators) == 1 else zip(*iterators)


def position(epoch: int, index: int, total: int, accumulation: int) -> str:
    """Batch `index` of `epoch` as the one-line messages name it: the optimiser step it belongs
    to, counted over the run as checkpoints count them (global_step), and the batch."""
    step = epoch * math.ceil(total / accumulation) + index // accumulation + 1
    return f"epoch {epoch} step {step} (batch {index + 1}/{total})"


def checkpoint_on_disk(checkpointer: Checkpointer | None) -> str:
    """What a stopped run leaves to resume from, read from the file itself (memory-mapped: the
    weights are not read): 'checkpoint_last.pth from step K kept' or 'no checkpoint written yet'."""
    path = None if checkpointer is None else Path(checkpointer.output_dir) / "checkpoint_last.pth"
    if path is None or not path.is_file():
        return "no checkpoint written yet"
    try:
        step = read_checkpoint(path, mmap=True).get("global_step")
    except CheckpointError:
        return f"{path.name} kept (its step unreadable)"
    return f"{path.name} from step {step} kept"


@contextmanager
def stops_reported(doing: Callable[[], str], on_disk: Callable[[], str]):
    """Inside the block, a NaN or inf (NonFiniteError) and Ctrl-C end the run with one line that
    adds what the run was doing (e.g. 'at epoch 0 step 2 (batch 2/4)') and what it leaves on
    disk (e.g. checkpoint_on_disk). Blocks do not nest: the line would say it twice."""
    try:
        yield
    except NonFiniteError as error:
        raise NonFiniteError(f"{error} {doing()}; {on_disk()}") from None
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted {doing()}; {on_disk()}") from None


def save_if_finite(checkpointer: Checkpointer, name: str, epoch: int, **fields) -> None:
    """checkpointer.save, refused when a weight or buffer holds a NaN or inf: a broken state must
    not replace the last good checkpoint."""
    broken = first_nonfinite_tensor(unwrap_model(checkpointer.model).state_dict().items())
    if broken is not None:
        raise NonFiniteError(f"weight {broken} is non-finite")
    checkpointer.save(name, epoch, **fields)


def _finite_loss_values(losses: dict) -> dict:
    """The losses as floats (one device synchronisation), refused when one is NaN or inf:
    checked before backward, so that no NaN reaches the gradients, the weights or a checkpoint.
    An fp16 overflow in the *gradients* is not refused: the GradScaler skips that step."""
    values = dict(zip(losses, torch.stack([value.detach().float().reshape(()) for value in losses.values()]).tolist()))
    for name, value in values.items():
        if not math.isfinite(value):
            raise NonFiniteError(f"{name} is {nonfinite_name(value)}")
    return values


def _finite_gradient_norm(named_parameters: list) -> torch.Tensor:
    """The gradients' total norm, refused when a gradient holds a NaN or inf. The norm is one
    cheap reduction; the gradients are searched only when it is not finite (finite gradients
    whose norm overflows pass: clipping zeroes them, as torch's clip_grad_norm_ does)."""
    grad_norm = torch.nn.utils.get_total_norm([p.grad for _, p in named_parameters if p.grad is not None])
    if not torch.isfinite(grad_norm):
        broken = first_nonfinite_tensor((name, parameter.grad) for name, parameter in named_parameters)
        if broken is not None:
            raise NonFiniteError(f"the gradient of {broken} is non-finite")
    return grad_norm


def _optimizer_step(optimizer, named_parameters: list, precision: Precision, max_grad_norm: float | None,
                    metric_logger: MetricLogger) -> None:
    """Clip (unscaled first under AMP), step, update the scaler and clear the gradients.

    A GradScaler skips a step whose gradients overflowed; without one nothing would, so such a
    step is refused, naming the first non-finite gradient (before clipping spreads it to all).
    """
    parameters = [parameter for _, parameter in named_parameters]
    grad_norm = None
    if not precision.scaler.is_enabled():
        grad_norm = _finite_gradient_norm(named_parameters)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(parameters, max_grad_norm, grad_norm)
    elif max_grad_norm is not None:
        precision.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    if max_grad_norm is not None and torch.isfinite(grad_norm):  # an fp16 overflow step is skipped by the scaler
        metric_logger.update(grad_norm=grad_norm)
    precision.scaler.step(optimizer)
    precision.scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _after_update(epoch: int, batches_done: int, total: int, update_index: int, global_step: int, options: LoopOptions,
                  metric_logger: MetricLogger, checkpointer, experiment_logger, stop_after: int,
                  interrupt_after: int) -> None:
    """After an optimiser step: scalars to tensorboard/wandb, the mid-epoch checkpoint when due
    (with the running averages, so a resumed epoch reports the same averages), and the
    failure-injection stop."""
    if experiment_logger is not None and (update_index + 1) % options.log_every == 0:
        experiment_logger.log({f"train/{name}": meter.value
                               for name, meter in metric_logger.meters.items()}, global_step)
    if checkpointer is not None:
        checkpointer.global_step = global_step
        # The epoch's end is saved by fit, with the epoch marked complete.
        if options.save_every_steps > 0 and batches_done < total and (update_index + 1) % options.save_every_steps == 0:
            save_if_finite(checkpointer, "checkpoint_last.pth", epoch, step_in_epoch=batches_done,
                           meters=metric_logger.state_dict())
    if global_step == stop_after:
        exit_abruptly(global_step)
    if global_step == interrupt_after:
        interrupt_self()


def train_one_epoch(model, loader, optimizer, epoch: int, compute_losses, precision: Precision,
                    options: LoopOptions | None = None, lr_schedule=None, checkpointer=None,
                    resume: ResumePoint | None = None, experiment_logger=None) -> dict:
    """One epoch of training; returns the epoch's averages over all ranks ('lr', losses...).

    `loader` is any sized iterable of batches (a DataLoader, a list of batches), or a tuple of
    them (e.g. video and image loaders for --sep_img) whose batches arrive together as a
    tuple, for as many steps as the shortest has.

    `compute_losses(model, batch, context)` returns a dict of named loss tensors; their sum
    is the loss, run under autocast. With accumulation the loss is divided by the number
    of micro-batches in the group and the optimiser steps once per group (DDP gradient sync
    only on the last). `lr_schedule(epoch, optimiser_step)` sets the lr before each step.
    When `resume` is for this epoch, its first `resume.skip_batches` batches are skipped and
    the RNG state and running averages saved with them are restored, so the loss curve and
    the epoch's averages continue exactly.

    A NaN or inf loss (checked before backward), gradient (without a GradScaler, before the
    step) or weight (before a checkpoint) raises NonFiniteError, and Ctrl-C Interrupted, each
    naming the epoch and step and what checkpoint_last.pth on disk holds.

    Exact resumption needs the sampler's order to depend only on (seed, epoch), as with
    DistributedSampler, and, with data-loader workers, each sample's randomness to depend
    only on its index and the epoch (datasets with `set_epoch`).
    """
    options = options or LoopOptions()
    loaders = loader if isinstance(loader, tuple) else (loader,)
    model.train()
    skip = resume.skip_batches if resume is not None and resume.epoch == epoch else 0
    batches = _epoch_batches(loaders, epoch, skip, options, resume)
    total = min(len(each) for each in loaders)
    accumulation = options.accumulation_steps
    updates_per_epoch = math.ceil(total / accumulation)
    named_parameters = [(name, p) for name, p in unwrap_model(model).named_parameters() if p.requires_grad]
    device = named_parameters[0][1].device
    metric_logger = MetricLogger()
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    if skip and resume.meters is not None:
        metric_logger.load_state_dict(resume.meters)  # the epoch's averages cover every batch
    stop_after, interrupt_after = exit_step(), interrupt_step()
    optimizer.zero_grad(set_to_none=True)
    header = f"Train epoch: [{epoch}]"
    in_progress = skip  # the batch being fetched or trained, for the line that reports a stop

    def doing() -> str:
        return f"at {position(epoch, min(in_progress, total - 1), total, accumulation)}"
    with stops_reported(doing, lambda: checkpoint_on_disk(checkpointer)):
        for index, batch in enumerate(metric_logger.log_every(batches, options.log_every, header, total=total,
                                                              start=skip), start=skip):
            in_progress = index
            group_start = index - index % accumulation
            group_size = min(accumulation, total - group_start)
            is_update = index + 1 == group_start + group_size
            update_index = index // accumulation
            if index == group_start:
                if lr_schedule is not None:
                    set_lr(optimizer, lr_schedule(epoch, update_index))
                metric_logger.update(lr=optimizer.param_groups[0]["lr"])
            if options.budget_draws is not None:
                options.budget_draws.set_step(epoch, index)
            sync = nullcontext() if is_update or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with precision.autocast():
                    losses = compute_losses(model, move_to_device(batch, device), StepContext(epoch, index, total, device))
                    loss = sum(losses.values())
                metric_logger.update(**_finite_loss_values(losses))
                precision.scaler.scale(loss / group_size).backward()
            if is_update:
                _optimizer_step(optimizer, named_parameters, precision, options.max_grad_norm, metric_logger)
                _after_update(epoch, index + 1, total, update_index, epoch * updates_per_epoch + update_index + 1,
                              options, metric_logger, checkpointer, experiment_logger, stop_after, interrupt_after)
            in_progress = index + 1
    if options.budget_draws is not None:
        options.budget_draws.restore()
    metric_logger.synchronize_between_processes()
    print(f"Averaged stats: {metric_logger}")
    return metric_logger.global_averages()
