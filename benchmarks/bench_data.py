"""Clips/s that one data-loader worker decodes and augments.

Generates longer clips than the toy corpus (default 10 s, 30 fps, 320x240, moving shapes
over a textured background), optionally re-encoded as docs/data.md prescribes (--compressed:
`python -m data.compress --fps 3 --size 224`), then times read_video + the augmented path
(pre-training and finetune_augmentation: 32 frames decoded at video_resize 256, cropped to 224,
augmented) and the plain path (the published fine-tuning and evaluation: decoded at 224),
single-threaded as inside a DataLoader worker. The transforms return uint8
clips: the video encoder normalises them on its device.

    python -m benchmarks.bench_data --out benchmarks/results/data_cpu.json
    python -m benchmarks.bench_data --compressed --backends torchcodec,decord,pyav
"""
import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import common
from data.toy import write_mp4
from data.transforms import EvalTransform, VideoTrainTransform
from data.video import read_video, worker_init_fn


def make_long_clip(path, seconds, fps, width, height, seed):
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    background = (rng.integers(0, 60, (height, width, 3)) + np.stack([xs % 97, ys % 89, (xs + ys) % 71], -1))
    frames = np.empty((seconds * fps, height, width, 3), np.uint8)
    for t in range(len(frames)):
        frame = background.copy()
        cx, cy = (t * 3) % width, height / 2 + 60 * np.sin(t / 15)
        frame[(xs - cx) ** 2 + (ys - cy) ** 2 < 900] = (230, 40, 40)
        frames[t] = np.clip(frame, 0, 255)
    write_mp4(path, frames, fps)


def compress(folder, paths):
    """The clips re-encoded by data.compress (3 fps, shorter side 224) into folder/compressed."""
    subprocess.run([sys.executable, "-m", "data.compress", "--input_root", str(folder), "--output_root",
                    str(folder / "compressed"), "--fps", "3", "--size", "224", "--num_workers", "1"],
                   cwd=common.REPO_ROOT, check=True, capture_output=True)
    return [folder / "compressed" / path.name for path in paths]


def time_path(paths, repeats, backend, strategy, decode_size, transform):
    """(clips/s end to end, share of the time spent decoding)."""
    rng = random.Random(0)
    decoding = transforming = 0.0
    for _ in range(repeats):
        for path in paths:
            began = time.perf_counter()
            clip = read_video(path, 32, strategy, decode_size, rng, backend=backend)
            decoded = time.perf_counter()
            out = transform(clip)
            decoding, transforming = decoding + decoded - began, transforming + time.perf_counter() - decoded
    assert out.shape == (32, 3, 224, 224)
    return repeats * len(paths) / (decoding + transforming), decoding / (decoding + transforming)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_data.json")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--compressed", action="store_true", help="time the clips re-encoded by data.compress")
    parser.add_argument("--backends", default="decord,pyav", help="readers to time (data.video.READERS)")
    args = parser.parse_args()

    worker_init_fn(0)  # one thread, as inside a DataLoader worker
    folder = Path(common.scratch_folder("bench_data_"))
    paths = [folder / f"clip{k}.mp4" for k in range(args.clips)]
    for seed, path in enumerate(paths):
        make_long_clip(path, args.seconds, args.fps, args.width, args.height, seed)
    if args.compressed:
        paths = compress(folder, paths)

    train, evaluation = VideoTrainTransform(224), EvalTransform(224)
    rows = []
    for backend in args.backends.split(","):
        for mode, strategy, size, transform in (("augmented", "headtail", 256, train),
                                                ("augmented", "rand", 256, train),
                                                ("plain", "uniform", 224, evaluation)):
            rate, decode_share = time_path(paths, args.repeats, backend, strategy, size, transform)
            rows.append({"backend": backend, "mode": mode, "strategy": strategy, "decode_size": size,
                         "clips_per_s": round(rate, 2), "decode_share": round(decode_share, 2)})
    machine = common.machine_info(torch.device("cpu"))
    encoding = "re-encoded by data.compress (3 fps, shorter side 224)" if args.compressed else "as generated"
    print(f"{machine['cpu']}; {args.clips} clips of {args.seconds}s at {args.fps} fps, {args.width}x{args.height}, "
          f"{encoding}; 32 frames -> 224 px; 1 thread; torch {torch.__version__}")
    print(f"{'backend':8} {'mode':9} {'strategy':9} {'decode':>6} {'clips/s':>8} {'decoding':>9}")
    for row in rows:
        print(f"{row['backend']:8} {row['mode']:9} {row['strategy']:9} {row['decode_size']:>6} "
              f"{row['clips_per_s']:>8} {row['decode_share']:>8.0%}")
    Path(args.out).write_text(json.dumps({"machine": machine, "settings": vars(args), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
