"""Seconds to write one training checkpoint of the real-size pre-training model, to size
--save_every_steps: the model of configs/pretrain_timesformer.yaml (TimeSformer ViT-B, BERT
encoder and decoder, momentum copies) with its AdamW state, written by the trainer's own
Checkpointer.save (torch.save to a temporary file, fsync, rename).

    python -m benchmarks.bench_checkpoint_write --out benchmarks/results/checkpoint_write_cpu.json

The time is mostly the disk: run it with --dir on the file system the runs write to.
"""
import json
import tempfile
from pathlib import Path

import torch

from benchmarks import common
from configs.load import load_config
from models import create_model
from runtime.precision import make_precision
from training.checkpoints import Checkpointer
from training.optim import create_optimizer


def model_with_optimizer_state(config_path: str):
    """The pre-training model and an AdamW that has taken one step (so it holds its two moments)."""
    config = load_config(config_path)
    model = create_model(config, "pretrain")
    optimizer = create_optimizer(model, config)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    return config, model, optimizer


def main():
    parser = common.base_parser(__doc__)
    parser.add_argument('--config', default='configs/pretrain_timesformer.yaml',
                        help='model config (default: %(default)s)')
    parser.add_argument('--dir', default=None, help='folder to write into (default: a temporary folder)')
    args = parser.parse_args()
    device = torch.device('cpu')
    config, model, optimizer = model_with_optimizer_state(args.config)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        checkpointer = Checkpointer(folder, model, optimizer, make_precision('none', device), config)
        timing = common.time_call(lambda: checkpointer.save('checkpoint_last.pth', 0), device,
                                  runs=args.runs, warmup=args.warmup)
        size_gib = (Path(folder) / 'checkpoint_last.pth').stat().st_size / 2 ** 30
    row = {'config': args.config, 'parameters_m': round(parameters / 1e6, 1), 'checkpoint_gib': round(size_gib, 2),
           'write_s_median': round(timing['median_s'], 2), 'write_gib_per_s': round(size_gib / timing['median_s'], 2)}
    machine = common.machine_info(device)
    print(f"machine: {machine['cpu']} ({machine['cpu_count']} CPUs), load {machine['load_average_1_5_15min']}")
    print(json.dumps(row, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({'machine': machine, 'rows': [row]}, indent=1) + '\n')


if __name__ == '__main__':
    main()
