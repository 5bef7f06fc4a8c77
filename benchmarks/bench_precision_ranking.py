"""Does bf16 autocast change the retrieval ranking? Runs the real toy evaluation
(`train_video_retrieval.py --evaluate`) once in fp32 and once per other precision, on the same
checkpoint and data, and compares the saved test score matrices and metrics.

  python -m benchmarks.bench_precision_ranking --config output/toy/retrieval/config.yaml \
      --checkpoint output/toy/retrieval/checkpoint_best.pth --out benchmarks/results/ranking_bf16_cpu.json

(`python run_toy.py` makes that checkpoint and the toy corpus.)
"""
import json
import os
import subprocess
import sys
import tempfile

import torch

from benchmarks import common

METHODS = {'fp32': 'none', 'bf16': 'bf16', 'fp16': 'fp16'}


def evaluate(config, checkpoint, precision, device, output_dir, overrides=()):
    command = [sys.executable, os.path.join(common.REPO_ROOT, 'train_video_retrieval.py'), '--config', config,
               '--output_dir', output_dir, '--evaluate', '--device', device,
               '--mixed_precision_method', METHODS[precision], f'pretrained={checkpoint}', *overrides]
    subprocess.run(command, check=True, cwd=common.REPO_ROOT, capture_output=True, text=True)
    scores = torch.load(os.path.join(output_dir, 'scores_test.pt'), weights_only=True)
    with open(os.path.join(output_dir, 'evaluate.txt')) as handle:
        metrics = json.loads(handle.read().strip().splitlines()[-1])
    return scores, metrics


def compare(reference, candidate):
    """Per direction: share of query rows whose whole ranking is unchanged, top-1 agreement,
    and the largest score difference."""
    result = {}
    for key in ('txt2video', 'video2txt'):
        a, b = reference[key].float(), candidate[key].float()
        order_a = a.argsort(dim=1, descending=True, stable=True)
        order_b = b.argsort(dim=1, descending=True, stable=True)
        result[key] = dict(rows=a.shape[0], same_ranking_rows=int((order_a == order_b).all(dim=1).sum()),
                           same_top1_rows=int((order_a[:, 0] == order_b[:, 0]).sum()),
                           max_abs_score_diff=(a - b).abs().max().item())
    return result


def main():
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument('--config', required=True)
    parser.add_argument('--checkpoint', required=True)
    parser.add_argument('--precision', default='fp32,bf16',
                        help='comma list compared against a first fp32 run (fp32 again = control)')
    parser.add_argument('--override', action='append', default=[], help='config key=value for both runs')
    args = parser.parse_args()
    info = common.machine_info(torch.device(args.device))
    # fp32 may be listed among the candidates too: a second fp32 run is the control that shows
    # how much of any difference is the evaluation's own run-to-run variation.
    candidates = common.parse_list(args.precision)
    with tempfile.TemporaryDirectory() as scratch:
        reference_scores, reference_metrics = evaluate(args.config, args.checkpoint, 'fp32', args.device,
                                                       os.path.join(scratch, 'reference'), args.override)
        runs = [(precision, evaluate(args.config, args.checkpoint, precision, args.device,
                                     os.path.join(scratch, f'{index}_{precision}'), args.override))
                for index, precision in enumerate(candidates)]
    rows = []
    for precision, (scores, metrics) in runs:
        changed = {key: (reference_metrics[key], metrics[key]) for key in reference_metrics
                   if isinstance(metrics.get(key), float) and metrics[key] != reference_metrics[key]}
        row = dict(precision=precision, metrics_changed=changed, **compare(reference_scores, scores))
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    common.write_json(args.out, dict(machine=info, args=vars(args), fp32_metrics=reference_metrics, rows=rows))


if __name__ == '__main__':
    main()
