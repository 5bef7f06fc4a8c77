"""What a run records besides checkpoints: log.txt, result lines, tensorboard/wandb, model size."""
import importlib
import json
from pathlib import Path

import torch

from runtime.distributed import is_main_process
from runtime.errors import UserError


def log_epoch(output_dir, epoch: int, run_record: dict | None = None, **sections: dict) -> dict:
    """Append one JSON line to output_dir/log.txt, e.g. log_epoch(d, 3, train=stats, val=metrics)
    gives {'train_lr': ..., 'train_loss_ita': ..., 'val_r_mean': ..., 'epoch': 3}; `run_record`
    (the first line a run writes: its settings and provenance) is added after 'epoch'."""
    record = {f"{prefix}_{key}": value for prefix, values in sections.items()
              for key, value in values.items()}
    record["epoch"] = epoch
    record.update(run_record or {})
    if is_main_process():
        with open(Path(output_dir) / "log.txt", "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return record


def write_results(output_dir, filename: str, record: dict) -> None:
    """Append `record` as one JSON line to output_dir/filename and print it (rank 0)."""
    if is_main_process():
        with open(Path(output_dir) / filename, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=1))


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
