"""The epoch loop the three scripts share: train, validate, checkpoint, log, then test the best."""
from typing import Callable

import torch

from configs.keys import value
from models.checkpoint import read_checkpoint
from training.checkpoints import Checkpointer, load_model_state
from training.cli import Run
from training.distributed import wrap_distributed
from training.logging import ExperimentLogger, log_epoch, write_results
from training.loop import LoopOptions, train_one_epoch
from training.optim import create_optimizer, make_lr_schedule


def report_bad_inputs(datasets, epoch: int) -> None:
    """Say how many unreadable inputs each dataset replaced this epoch, and start counting anew."""
    for dataset in datasets:
        count = dataset.bad_inputs.count()
        if count:
            print(f"epoch {epoch}: {count} unreadable inputs were replaced "
                  f"(first: {dataset.bad_inputs.paths()[:3]})")
            dataset.bad_inputs.reset()


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
    for epoch in range(resume.epoch if resume else 0, value(config, "max_epoch")):
        stats = train_one_epoch(wrapped, train_loader, optimizer, epoch, compute_losses, run.precision,
                                options, lr_schedule, checkpointer, resume, experiment_logger)
        report_bad_inputs(bad_input_datasets, epoch)
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
        test_best_weights(run, model, test, protocol or {}, best_metric, checkpointer.best_metric)


def test_best_weights(run: Run, model: torch.nn.Module, test: Callable[[torch.nn.Module], dict], protocol: dict,
                      best_metric: str | None, best_value: float | None) -> None:
    """Test checkpoint_best.pth (else the final weights, as saved in checkpoint_last.pth) into
    test_results.txt, naming the file tested."""
    best = run.output_dir / "checkpoint_best.pth"
    tested = best if best.is_file() else run.output_dir / "checkpoint_last.pth"
    if best.is_file():
        load_model_state(model, read_checkpoint(best)["model"], str(best))
        print(f"testing the best weights ({best_metric} = {best_value})")
    report_test(run, model, test, "test_results.txt", {**protocol, "checkpoint": str(tested)})


def report_test(run: Run, model: torch.nn.Module, test: Callable[[torch.nn.Module], dict], filename: str,
                protocol: dict) -> dict:
    """Run `test(model)` and record its metrics with the protocol in output_dir/filename."""
    metrics = test(model)
    write_results(run.output_dir, filename, {"split": "test", **protocol, **metrics})
    return metrics
