"""The epoch loop the three scripts share: train, validate, checkpoint, log, then test the best."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from configs.keys import value
from models.checkpoint import load_checkpoint
from runtime.distributed import gather_objects, is_main_process, unwrap_model, wrap_distributed
from training.budgets import BudgetDraws
from training.checkpoints import Checkpointer
from training.cli import Run
from training.logging import ExperimentLogger, log_epoch, write_results
from training.loop import LoopOptions, checkpoint_on_disk, save_if_finite, stops_reported, train_one_epoch
from training.optim import create_optimizer, make_lr_schedule

# What each of a dataset's input logs counts, as the epoch's summary says it.
EPOCH_COUNTS = (("bad_inputs", "unreadable inputs were replaced"),
                ("short_clips", "clips had fewer frames than sampled and were used with frames repeated"))


def report_bad_inputs(datasets, epoch: int) -> None:
    """Say how many unreadable inputs each dataset replaced this epoch, and how many clips it
    read with repeated frames; then start counting anew."""
    for dataset in datasets:
        for name, happened in EPOCH_COUNTS:
            log = getattr(dataset, name)
            if log.count():
                print(f"epoch {epoch}: {log.count()} {happened} (first: {log.paths()[:3]})")
                log.reset()


def fit(run: Run, model: torch.nn.Module, train_loader, compute_losses, schedule: str,
        validate: Callable[[torch.nn.Module, int], dict] | None = None, best_metric: str | None = None,
        test: Callable[[torch.nn.Module], dict] | None = None, protocol: dict | None = None,
        bad_input_datasets=(), checkpoint_every_epoch: bool = False) -> None:
    """Train for config['max_epoch'] epochs, resuming where a previous run stopped.

    After each epoch: report unreadable inputs, write checkpoint_last.pth (before any
    validation data is read, so a failing validation set cannot lose the epoch), then
    `EpochEnd`: validation, checkpoint_best.pth, log.txt. A resume whose last epoch was
    saved but not logged finishes that epoch first. Finally `test(model)` runs with the best
    weights and its metrics go to test_results.txt with the evaluation `protocol`.

    A NaN or inf (a loss, gradient or weight; a feature or score in validation or test) and
    Ctrl-C stop the run with one line that says where and what checkpoint_last.pth holds; no
    weights with a NaN or inf are saved, and no metrics computed from one are written.
    """
    args, config = run.args, run.config
    wrapped = wrap_distributed(model, run.device)
    optimizer = create_optimizer(model, config)
    lr_schedule = make_lr_schedule(config, schedule)
    checkpointer = Checkpointer(run.output_dir, wrapped, optimizer, run.precision, config, run.training_flags,
                                run.provenance)
    resume = checkpointer.resume(args.checkpoint)
    options = LoopOptions.from_args(args, run.seed, config)
    options.budget_draws = BudgetDraws.from_config(model, config, run.seed)
    experiment_logger = ExperimentLogger(run.output_dir, config, args.tensorboard, args.wandb)
    finish = EpochEnd(run, model, checkpointer, experiment_logger, validate, best_metric, checkpoint_every_epoch)
    start = resume.epoch if resume else 0
    own_checkpoint = args.checkpoint is None or Path(args.checkpoint).resolve() == (
        run.output_dir / "checkpoint_last.pth").resolve()
    if (resume is not None and own_checkpoint and resume.finished_epoch_stats is not None
            and not _was_logged(run.output_dir, start - 1)):
        print(f"epoch {start - 1} was trained and saved but not logged: validating it now")
        finish(start - 1, resume.finished_epoch_stats)
    for epoch in range(start, value(config, "max_epoch")):
        stats = train_one_epoch(wrapped, train_loader, optimizer, epoch, compute_losses, run.precision,
                                options, lr_schedule, checkpointer, resume, experiment_logger)
        report_bad_inputs(bad_input_datasets, epoch)
        with stops_reported(lambda: f"at the end of epoch {epoch}", lambda: checkpoint_on_disk(checkpointer)):
            save_if_finite(checkpointer, "checkpoint_last.pth", epoch, epoch_complete=True, epoch_stats=stats)
        finish(epoch, stats)
    experiment_logger.close()
    if test is not None:
        test_best_weights(run, model, test, protocol or {}, best_metric, checkpointer.best_metric)


def _was_logged(output_dir: Path, epoch: int) -> bool:
    """Whether log.txt has the line of `epoch` (the last thing an epoch writes), decided on
    rank 0 so every rank agrees."""
    logged = None
    if is_main_process():
        log = output_dir / "log.txt"
        lines = log.read_text().splitlines() if log.is_file() else []
        logged = any(_epoch_of(line) == epoch for line in lines)
    return gather_objects(logged)[0]


def _epoch_of(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("epoch") if isinstance(record, dict) else None


@dataclass
class EpochEnd:
    """What follows an epoch's training (and its checkpoint_last.pth): validate, keep the
    best, per-epoch checkpoints, the log.txt line (the run's first also says its settings and
    provenance: Run.record)."""
    run: Run
    model: torch.nn.Module
    checkpointer: Checkpointer
    experiment_logger: ExperimentLogger
    validate: Callable[[torch.nn.Module, int], dict] | None
    best_metric: str | None
    checkpoint_every_epoch: bool
    recorded: bool = False  # whether this run's log.txt lines have said its settings and provenance

    def __call__(self, epoch: int, stats: dict) -> None:
        checkpointer = self.checkpointer
        val = {}
        if self.validate is not None:
            with stops_reported(lambda: f"while validating epoch {epoch}", lambda: checkpoint_on_disk(checkpointer)):
                val = self.validate(self.model, epoch)
        best = self.best_metric
        if best is not None and best in val and (checkpointer.best_metric is None
                                                 or val[best] > checkpointer.best_metric):
            checkpointer.best_metric = val[best]
            checkpointer.save("checkpoint_best.pth", epoch, epoch_complete=True, epoch_stats=stats)
            # Again, so that a resume from checkpoint_last.pth knows the new best.
            checkpointer.save("checkpoint_last.pth", epoch, epoch_complete=True, epoch_stats=stats)
        if self.checkpoint_every_epoch:
            checkpointer.save(f"checkpoint_{epoch:02d}.pth", epoch, epoch_complete=True, epoch_stats=stats)
        run_record = None if self.recorded else self.run.record()
        log_epoch(self.run.output_dir, epoch, run_record, train=stats, val=val)  # last: marks the epoch finished
        self.recorded = True
        self.experiment_logger.log({f"val/{name}": value for name, value in val.items()
                                    if isinstance(value, (int, float))}, checkpointer.global_step)


def test_best_weights(run: Run, model: torch.nn.Module, test: Callable[[torch.nn.Module], dict], protocol: dict,
                      best_metric: str | None, best_value: float | None) -> None:
    """Test checkpoint_best.pth (else the final weights, as saved in checkpoint_last.pth) into
    test_results.txt, naming the file tested."""
    best = run.output_dir / "checkpoint_best.pth"
    tested = best if best.is_file() else run.output_dir / "checkpoint_last.pth"
    if best.is_file():
        load_checkpoint(unwrap_model(model), best, strict=True, verbose=False)
        print(f"testing the best weights ({best_metric} = {best_value})")
    report_test(run, model, test, "test_results.txt", {**protocol, "checkpoint": str(tested)})


def report_test(run: Run, model: torch.nn.Module, test: Callable[[torch.nn.Module], dict], filename: str,
                protocol: dict) -> dict:
    """Run `test(model)` and record its metrics with the protocol, the run's settings and its
    provenance (Run.record) in output_dir/filename."""
    with stops_reported(lambda: "while testing", lambda: f"no metrics written to {filename}"):
        metrics = test(model)
    write_results(run.output_dir, filename, {"split": "test", **protocol, **metrics, **run.record()})
    return metrics
