"""Seconds and videos/s of `video_tool.py index` on one process against `torchrun --nproc_per_node=N`
(inference/index_processes.py), and whether the two indexes are equal bit for bit.

Whole commands are timed, as a user runs them: start-up, model loading, scan, decoding,
encoding, the commit. The videos are copies of the toy corpus (`make toy`: toy_data/videos)
indexed by the toy retrieval checkpoint (output/toy/retrieval/checkpoint_best.pth), so start-up
weighs heavily against the encoding of 64 px clips: the figures say what sharing costs and
gains on small work, not what it gains for the 224 px models. The single process keeps torch's
default threads (one per core); under torchrun each process has one thread (torchrun's
OMP_NUM_THREADS=1), so N processes on N cores compete for no more CPU than one process has.

    python -m benchmarks.bench_index_processes --videos 40 --processes 2 --num_workers 0
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import common

TOY_VIDEOS = Path(common.REPO_ROOT) / "toy_data" / "videos"
CONFIG = Path(common.REPO_ROOT) / "configs" / "toy" / "retrieval.yaml"
CHECKPOINT = Path(common.REPO_ROOT) / "output" / "toy" / "retrieval" / "checkpoint_best.pth"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=40, help="toy videos to index")
    parser.add_argument("--processes", type=int, default=2, help="torchrun's --nproc_per_node")
    parser.add_argument("--num_workers", type=int, default=0, help="decoding workers per process")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each command, alternating")
    parser.add_argument("--out", default=None, help="write the results as JSON to this path")
    return parser.parse_args()


def index_command(videos: Path, index: Path, args) -> list[str]:
    return ["video_tool.py", "index", str(videos), "--index", str(index), "--config", str(CONFIG),
            "--checkpoint", str(CHECKPOINT), "--device", "cpu", "--precision", "fp32",
            "--batch_size", str(args.batch_size), "--num_workers", str(args.num_workers),
            "--options", f"video_root={TOY_VIDEOS}", f"ann_root={TOY_VIDEOS.parent / 'ann'}"]


def launchers(processes: int) -> dict[str, list[str]]:
    return {"1 process": [sys.executable],
            f"{processes} processes": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       f"--nproc_per_node={processes}"]}


def timed(command: list[str]) -> float:
    """Wall seconds of one fresh run of `command` (a new index folder each time)."""
    began = time.perf_counter()
    subprocess.run(command, cwd=common.REPO_ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def embeddings(index: Path) -> np.ndarray:
    return np.load(index / json.loads((index / "manifest.json").read_text())["embeddings"])


def main():
    args = parse_args()
    if not (TOY_VIDEOS.is_dir() and CHECKPOINT.is_file()):
        sys.exit("needs the toy corpus and checkpoint: run `make toy` first")
    scratch = Path(common.scratch_folder("bench_index_processes_"))
    videos = scratch / "videos"
    videos.mkdir()
    for video in sorted(TOY_VIDEOS.glob("*.mp4"))[:args.videos]:
        shutil.copy2(video, videos / video.name)
    seconds = {name: [] for name in launchers(args.processes)}
    for run in range(args.runs):  # alternating: a slower moment of the machine hits both
        for name, launcher in launchers(args.processes).items():
            index = scratch / f"index-{name.split()[0]}-{run}"
            seconds[name].append(timed([*launcher, *index_command(videos, index, args)]))
    same = all(np.array_equal(embeddings(scratch / f"index-1-{run}"),
                              embeddings(scratch / f"index-{args.processes}-{run}")) for run in range(args.runs))
    count = len(list(videos.iterdir()))
    rows = [{"launch": name, "seconds": statistics.median(times), "videos/s": count / statistics.median(times),
             "runs": ", ".join(f"{time_s:.1f}" for time_s in times)} for name, times in seconds.items()]
    common.print_table(rows, ["launch", "seconds", "videos/s", "runs"],
                       title=f"video_tool.py index, {args.videos} toy videos, batch {args.batch_size}, "
                             f"{args.num_workers} decoding workers per process; indexes equal: {same}")
    common.write_json(args.out, {"machine": common.machine_info(torch.device("cpu")), "settings": vars(args),
                                 "equal_embeddings": same, "rows": rows})


if __name__ == "__main__":
    main()
