"""Retrieval training step (ITC + ITM, momentum encoders, AdamW): time and peak memory, with and
without activation checkpointing of the video encoder.

Peak memory is max_memory_allocated on CUDA and the process's peak RSS on CPU (VmHWM, reset
before each configuration). The RSS includes the weights, momentum copies and AdamW state, so
the CPU rows also report the peak above the RSS just before the measured steps: the memory the
step itself needs (activations, gradients), which is what checkpointing changes.

  python -m benchmarks.bench_train_step --preset toy --out benchmarks/results/train_toy_cpu.json
  python -m benchmarks.bench_train_step --preset base --frames 32 --precision bf16 --runs 1
"""
import os

import torch

from benchmarks import common
from configs.load import load_config
from models import create_model

PRESETS = {
    'toy': ('configs/toy/retrieval.yaml', {}),
    'base': ('configs/retrieval_queryd_f32.yaml', {}),
}
# The published f96 schedule, used whenever a base run asks for 96 frames.
F96_SCHEDULE = '[' + ', '.join(['4, 8'] * 12) + ']'
WORDS = ('a person walks into the room and picks up a red cup from the table while another one talks '
         'about the weather outside then they both leave through the door and the camera pans to the '
         'window where a dog sits quietly watching the street below').split()


def build_config(preset, frames, checkpointing, overrides):
    path, _ = PRESETS[preset]
    settings = [f'num_frames={frames}', f'num_frm_train={frames}', f'num_frm_test={frames}',
                f'vit_grad_ckpt={checkpointing}', 'pretrained=', 'drop_path_rate=0.0']
    if checkpointing:
        settings.append('vit_ckpt_layer=12' if preset == 'base' else 'vit_ckpt_layer=4')
    if preset == 'base' and frames == 96:
        settings.append(f'testa_r={F96_SCHEDULE}')
    return load_config(os.path.join(common.REPO_ROOT, path), settings + list(overrides))


def captions(batch, max_words):
    return [' '.join(WORDS[(index * 7) % len(WORDS):] + WORDS)[:8 * max_words] for index in range(batch)]


def train_step_closure(model, optimizer, video, texts, idx, device, precision):
    scaler = torch.amp.GradScaler(device.type) if precision == 'fp16' else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        with common.autocast(device, precision):
            losses = model(video, texts, alpha=0.4, idx=idx)
        loss = sum(losses.values())
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    return step


def run_config(args, device, frames, checkpointing, precision):
    config = build_config(args.preset, frames, checkpointing, args.override)
    torch.manual_seed(0)
    model = create_model(config, "retrieval").to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(args.batch, 3, frames, config['image_size'], config['image_size'],
                        generator=generator).to(device)
    idx = torch.arange(args.batch, device=device)
    step = train_step_closure(model, optimizer, video, captions(args.batch, config.get('max_words', 35)), idx,
                              device, precision)
    for _ in range(args.warmup):  # also allocates the AdamW state, so the peak below is the step's own
        step()
    common.reset_peak_memory(device)
    before = common.current_memory_mib(device)
    timing = common.time_call(step, device, runs=args.runs, warmup=0)
    peak = common.peak_memory_mib(device)
    row = dict(preset=args.preset, frames=frames, grad_ckpt='on' if checkpointing else 'off', precision=precision,
               batch=args.batch, median_s=timing['median_s'], min_s=timing['min_s'],
               median_cpu_s=timing['median_cpu_s'], peak_mib=peak, before_step_mib=before,
               step_peak_mib=peak - before, load_average_1min=round(os.getloadavg()[0], 2))
    del model, optimizer, step
    return row


def main():
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument('--preset', choices=sorted(PRESETS), default='toy',
                        help='toy: configs/toy/retrieval.yaml; base: configs/retrieval_queryd_f32.yaml')
    parser.add_argument('--frames', default=None, help='comma list (default: the config\'s num_frames)')
    parser.add_argument('--grad_ckpt', default='off,on', help='comma list of off/on')
    parser.add_argument('--precision', default='fp32', help='comma list of fp32/bf16/fp16')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--override', action='append', default=[], help='config key=value (repeatable)')
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == 'cpu':
        common.return_freed_memory_to_os()
    info = common.machine_info(device)
    print(info, flush=True)
    default_frames = build_config(args.preset, 8, False, args.override)['num_frames'] if args.frames is None else None
    frame_list = common.parse_list(args.frames, int) if args.frames else [default_frames]
    rows = []
    for frames in frame_list:
        for checkpointing in [value == 'on' for value in common.parse_list(args.grad_ckpt)]:
            for precision in common.parse_list(args.precision):
                common.check_precision(precision, device)
                try:
                    row = run_config(args, device, frames, checkpointing, precision)
                except RuntimeError as error:  # CUDA out-of-memory is the expected failure here
                    if 'out of memory' not in str(error).lower():
                        raise
                    row = dict(preset=args.preset, frames=frames, grad_ckpt='on' if checkpointing else 'off',
                               precision=precision, batch=args.batch, error='out of memory')
                    if device.type == 'cuda':
                        torch.cuda.empty_cache()
                rows.append(row)
                print(row, flush=True)
    by_key = {(row['frames'], row['precision'], row['grad_ckpt']): row for row in rows}
    for row in rows:
        without = by_key.get((row['frames'], row['precision'], 'off'))
        if row['grad_ckpt'] == 'on' and without and 'step_peak_mib' in row and 'step_peak_mib' in without:
            row['step_peak_ratio_vs_off'] = row['step_peak_mib'] / without['step_peak_mib']
            row['time_ratio_vs_off'] = row['median_s'] / without['median_s']
    common.print_table(rows, ['preset', 'frames', 'grad_ckpt', 'precision', 'batch', 'median_s', 'min_s',
                              'peak_mib', 'step_peak_mib', 'step_peak_ratio_vs_off', 'time_ratio_vs_off', 'error'],
                       title='retrieval training step (peak = max_memory_allocated on CUDA, peak RSS on CPU)')
    common.write_json(args.out, dict(machine=info, args=vars(args), rows=rows))


if __name__ == '__main__':
    main()
