"""The retrieval evaluation end to end on a GPU, against the original implementation's run.

Runs train_video_retrieval.py --evaluate on the end-to-end fixtures (tests/fixtures/e2e: ten
clips in the DiDeMo, ActivityNet, QuerYD and Condensed Movies formats) on the chosen device,
once per precision, and compares the score matrices and metrics with the original's (which
were computed on a CPU in fp32). Also checks beam-search captions and answers against the
generation references on that device. Writes one JSON with every difference and timing.

  PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_eval_check --out "$OUT/gpu_eval_check.json"   # on a GPU
  python -m benchmarks.gpu_eval_check --device cpu --precisions none --formats didemo --out /tmp/check.json
"""
import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from tests.helpers import E2E, E2E_FORMATS, E2E_METRIC_NAMES, FIXTURES, e2e_evaluate_command, fixture_config, load_exact

REPO = Path(__file__).resolve().parents[1]


def evaluate(fmt, precision, device, output_dir):
    """One --evaluate run of the script on a fixture format: (scores, result line, seconds)."""
    command = e2e_evaluate_command(fmt, output_dir, "--device", device, "--mixed_precision_method", precision)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    scores = torch.load(output_dir / "scores_test.pt", map_location="cpu", weights_only=True)
    metrics = json.loads((output_dir / "evaluate.txt").read_text().splitlines()[-1])
    return scores, metrics, seconds


def compare(fmt, scores, metrics):
    ref = torch.load(E2E / f"{fmt}_ref.pt", weights_only=True)
    row = {"max_abs_diff_v2t": (scores["video2txt"] - ref["scores_v2t"]).abs().max().item(),
           "max_abs_diff_t2v": (scores["txt2video"] - ref["scores_t2v"]).abs().max().item(),
           "same_ranking_v2t": bool(torch.equal(scores["video2txt"].argsort(dim=1, descending=True),
                                                ref["scores_v2t"].argsort(dim=1, descending=True)))}
    if "r_mean" in metrics:  # Condensed Movies' test split writes a submission instead
        row["metrics_equal"] = all(metrics[ours] == ref["metrics"][theirs] for theirs, ours in E2E_METRIC_NAMES.items())
    return row


@torch.no_grad()
def generation(device):
    """Beam-search ids on `device` against the original's (CPU, fp32) references."""
    from models import create_model
    rows = {}
    for name, task, call, key in (("pretrain", "pretrain", "generate_caption_ids", "generated_caption_ids"),
                                   ("vqa", "qa", "generate_answer_ids", "generated_answer_ids")):
        ref = torch.load(FIXTURES / f"{name}_ref.pt", weights_only=True)
        model = load_exact(create_model(fixture_config(name), task), FIXTURES / f"{name}.pth").to(device)
        video = ref["video"].to(device)
        if name == "pretrain":
            ids = model.generate_caption_ids(video, num_beams=3, max_length=20, min_length=5)
        else:
            ids = model.generate_answer_ids(video, ref["questions"])
        rows[name] = {"ids_equal": bool(torch.equal(ids.cpu(), ref[key]))}
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", default="none,apex,bf16")
    parser.add_argument("--formats", default=",".join(E2E_FORMATS))
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_eval_check.json"))
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
              "torch": torch.__version__, "python": platform.python_version(), "runs": [],
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for precision in args.precisions.split(","):
        for fmt in args.formats.split(","):
            with tempfile.TemporaryDirectory() as folder:
                try:
                    scores, metrics, seconds = evaluate(fmt, precision, args.device, Path(folder))
                    row = {"format": fmt, "precision": precision, "seconds": round(seconds, 2),
                           **compare(fmt, scores, metrics)}
                except Exception as error:  # recorded; the next run still goes
                    row = {"format": fmt, "precision": precision, "error": str(error)[-1500:]}
            print(json.dumps(row))
            report["runs"].append(row)
    try:
        report["generation"] = generation(args.device)
    except Exception as error:
        report["generation"] = {"error": str(error)[-1500:]}
    print(json.dumps(report["generation"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
