"""`make toy`: the main job on the bundled toy setup, end to end on the CPU.

Generates the toy corpus, pre-trains with 2 processes (torchrun, gloo), fine-tunes and tests
retrieval from that checkpoint, runs a zero-shot retrieval --evaluate, fine-tunes and tests
QA, then prints one table of the metrics.

    python run_toy.py [--out output/toy] [--data toy_data] [--nproc 2]
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def run(command: list[str]) -> None:
    print("\n$ " + " ".join(command), flush=True)
    started = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    print(f"({time.time() - started:.0f}s)", flush=True)


def last_result(path: Path) -> dict:
    return json.loads(path.read_text().splitlines()[-1])


def _test_videos(data: Path) -> int:
    """Distinct test videos: R@1 of a random ranking is 1 / this."""
    return len({json.loads(line)["clip_name"] for line in (data / "ann" / "test.jsonl").read_text().splitlines()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="output/toy", help="folder for every run's outputs")
    parser.add_argument("--data", default="toy_data", help="folder of the generated toy corpus")
    parser.add_argument("--nproc", type=int, default=2, help="processes per torchrun launch")
    parser.add_argument("--num_clips", type=int, default=300, help="clips in the toy corpus")
    args = parser.parse_args()
    out, data = Path(args.out), Path(args.data)
    started = time.time()
    python = sys.executable
    torchrun = [python, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}"]
    paths = [f"video_root={data}/videos", f"ann_root={data}/ann"]
    if out.exists():  # a fresh run each time: earlier checkpoints would otherwise be resumed
        shutil.rmtree(out)

    run([python, "-m", "data.toy", "--out", str(data), "--num_clips", str(args.num_clips)])
    run(torchrun + ["video_pretrain.py", "--config", "configs/toy/pretrain.yaml", "--output_dir",
                    str(out / "pretrain"), f"video_root={data}", f"train_file=[{data}/ann/pretrain.json]"])
    pretrained = f"pretrained={out / 'pretrain' / 'checkpoint_last.pth'}"
    run(torchrun + ["train_video_retrieval.py", "--config", "configs/toy/retrieval.yaml", "--output_dir",
                    str(out / "retrieval"), pretrained] + paths)
    run(torchrun + ["train_video_retrieval.py", "--config", "configs/toy/retrieval.yaml", "--output_dir",
                    str(out / "retrieval_zero_shot"), "--evaluate", pretrained] + paths)
    run(torchrun + ["train_video_qa.py", "--config", "configs/toy/qa.yaml", "--output_dir", str(out / "qa"),
                    pretrained] + paths)

    finetuned = last_result(out / "retrieval" / "test_results.txt")
    zero_shot = last_result(out / "retrieval_zero_shot" / "evaluate.txt")
    qa = last_result(out / "qa" / "test_results.txt")
    chance_r1 = 100.0 / _test_videos(data)
    rows = [("retrieval fine-tuned", "text-to-video R@1", finetuned["txt2video_r1"]),
            ("retrieval fine-tuned", "text-to-video R@5", finetuned["txt2video_r5"]),
            ("retrieval fine-tuned", "video-to-text R@1", finetuned["video2txt_r1"]),
            ("retrieval fine-tuned", "mean recall", finetuned["r_mean"]),
            ("retrieval zero-shot", "text-to-video R@1", zero_shot["txt2video_r1"]),
            ("retrieval zero-shot", "mean recall", zero_shot["r_mean"]),
            ("retrieval (chance)", "text-to-video R@1", chance_r1),
            ("QA fine-tuned", "accuracy", qa["accuracy"])]
    rows += [("QA fine-tuned", key.replace("_", " "), value) for key, value in qa.items()
             if key.startswith("accuracy_")]
    print(f"\nToy results ({time.time() - started:.0f}s in all; outputs in {out})")
    print(f"{'run':<22} {'metric':<28} {'value':>7}")
    for run_name, metric, value in rows:
        print(f"{run_name:<22} {metric:<28} {value:7.1f}")


if __name__ == "__main__":
    main()
