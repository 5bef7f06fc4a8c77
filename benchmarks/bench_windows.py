"""Windows/s of indexing one long video as windows (`video_tool.py index --window`, inference/windows.py:
one decode per file, in a DataLoader worker, while the model encodes) against the video encoder
alone on the same windows decoded beforehand, at the same batch size and precision. The ratio
says how much of the encoder's speed window indexing keeps (target >= 90%: decoding keeps up).

toy: the toy retrieval checkpoint (configs/toy/retrieval.yaml, output/toy/retrieval/checkpoint_best.pth;
run_toy.py makes it) on a long video joined from the toy clips (toy_data/videos: 64 px, 8 frames/s).
224: the 224 px, 768-wide video encoder of configs/retrieval_didemo_f32.yaml with random weights
(`--depth` blocks) on a generated 320x240, 30 frames/s video (benchmarks/bench_data.make_long_clip).

    python -m benchmarks.bench_windows                       # toy, 1,200 clips joined: 40 min of video
    python -m benchmarks.bench_windows --threads 1             # a core left to the decoding worker
    python -m benchmarks.bench_windows --model 224 --seconds 30 --window 4 --batch_size 2 --rounds 2
    python -m benchmarks.bench_windows --contention --threads 1 --clips 150   # what decoding beside costs
"""
import argparse
import json
import multiprocessing
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from benchmarks import common
from benchmarks.bench_data import make_long_clip
from configs.load import load_config
from data.datasets import ClipDataset
from data.toy import write_mp4
from inference.api import VideoLanguageModel
from inference.index import update_index
from inference.windows import Windowing, read_windows
from models import create_model

TOY_CONFIG = common.REPO_ROOT + "/configs/toy/retrieval.yaml"
TOY_CHECKPOINT = common.REPO_ROOT + "/output/toy/retrieval/checkpoint_best.pth"
TOY_CLIPS = Path(common.REPO_ROOT) / "toy_data" / "videos"
CONFIG_224 = common.REPO_ROOT + "/configs/retrieval_didemo_f32.yaml"
TOY_TEXT = common.REPO_ROOT + "/configs/toy/bert_toy.json"  # the text side is not part of indexing


def join_toy_clips(path: Path, count: int) -> None:
    """`count` toy clips one after the other (from the first, starting over after the last),
    re-encoded as one mp4."""
    clips = sorted(TOY_CLIPS.glob("*.mp4"))
    frames = {}
    for clip in clips[:count]:
        with av.open(str(clip)) as container:
            frames[clip] = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    write_mp4(path, np.stack([frame for number in range(count) for frame in frames[clips[number % len(clips)]]]))


def load_model(folder: Path, args) -> VideoLanguageModel:
    options = [f"num_workers={args.num_workers}"]
    if args.model == "toy":
        return VideoLanguageModel.load(TOY_CONFIG, TOY_CHECKPOINT, args.device, args.precision, options)
    options += [f"depth={args.depth}", f"testa_r={[1, 12] * args.depth}", f"med_config={TOY_TEXT}"]
    config = load_config(CONFIG_224, options)
    checkpoint = folder / "random.pth"
    torch.save({"model": create_model(config, "retrieval").state_dict()}, checkpoint)
    return VideoLanguageModel.load(config, checkpoint, args.device, args.precision)


def pipeline_rate(model, long_video: Path, warm_video: Path, folder: Path, args) -> tuple[float, int]:
    """(windows/s, windows) of an index update that encodes the long video; a first, untimed run
    indexes a short video (it hashes the checkpoint and warms the model up)."""
    corpus, index = folder / "corpus", folder / "index"
    shutil.rmtree(corpus, ignore_errors=True)
    shutil.rmtree(index, ignore_errors=True)
    corpus.mkdir()
    shutil.copy(warm_video, corpus)
    warm = update_index(model, corpus, index, args.batch_size, args.num_workers, window=args.window).windows
    shutil.copy(long_video, corpus)
    began = time.perf_counter()
    summary = update_index(model, corpus, index, args.batch_size, args.num_workers)
    windows = summary.windows - warm
    return windows / (time.perf_counter() - began), windows


@torch.no_grad()
def encoder_rate(model, long_video: Path, args) -> float:
    """Windows/s of model.encode_video alone on the long video's windows, decoded beforehand."""
    clips = ClipDataset(model.config, "video files", train=False, substitute_black_on_error=False)
    windows = [clip for _, _, _, clip in read_windows(long_video, clips, Windowing(args.window, args.window / 2))]
    batches = [torch.stack(windows[start:start + args.batch_size]) for start in range(0, len(windows),
                                                                                        args.batch_size)]
    with model.autocast():
        for batch in {batch.shape: batch for batch in batches}.values():  # warm-up: each batch shape once
            model.model.encode_video(batch.to(model.device))
        common.synchronize(model.device)
        began = time.perf_counter()
        for batch in batches:
            model.model.encode_video(batch.to(model.device))
        common.synchronize(model.device)
    return len(windows) / (time.perf_counter() - began)


def _decode_until(stop, path: str, config: dict, window: float) -> None:
    """Another process: the windows of `path` decoded over and over, as a decoding worker does."""
    torch.set_num_threads(1)
    clips = ClipDataset(config, "video files", train=False, substitute_black_on_error=False)
    while not stop.is_set():
        for _ in read_windows(path, clips, Windowing(window, window / 2)):
            if stop.is_set():
                break


def _spin_until(stop) -> None:
    """Another process: arithmetic on a few registers, no memory traffic."""
    count = 0
    while not stop.is_set():
        count += 1


def contention_rates(model, long_video: Path, args) -> dict:
    """Encoder-only windows/s alone, beside a process decoding windows, and beside one spinning: what
    a decoding worker's mere presence on another core costs the encoder (shared caches and memory)."""
    context = multiprocessing.get_context("spawn")
    rates = {"alone": encoder_rate(model, long_video, args)}
    for name, target, extra in (("beside decoding", _decode_until, (str(long_video), model.config, args.window)),
                                ("beside a busy loop", _spin_until, ())):
        stop = context.Event()
        process = context.Process(target=target, args=(stop, *extra), daemon=True)
        process.start()
        time.sleep(5)  # the process started (imports) and is working
        rates[name] = encoder_rate(model, long_video, args)
        stop.set()
        process.join()
    return rates


def make_videos(folder: Path, args) -> tuple[Path, Path]:
    long_video, warm_video = folder / "long.mp4", folder / "warm.mp4"
    if args.model == "toy":
        join_toy_clips(long_video, args.clips)
        shutil.copy(sorted(TOY_CLIPS.glob("*.mp4"))[-1], warm_video)
    else:
        make_long_clip(long_video, args.seconds, 30, 320, 240, 0)
        make_long_clip(warm_video, 2, 30, 320, 240, 1)
    return long_video, warm_video


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("toy", "224"), default="toy")
    parser.add_argument("--clips", type=int, default=1200,
                        help="toy clips joined (2 s each; the 300 toy clips start over): a long video amortises "
                             "starting the decoding worker")
    parser.add_argument("--seconds", type=int, default=120, help="length of the 224 px model's generated video")
    parser.add_argument("--depth", type=int, default=12, help="the 224 px encoder's blocks (default: the real 12)")
    parser.add_argument("--window", type=float, default=2.0, help="window seconds (stride: half of it)")
    common.add_indexing_pipeline_options(parser, batch_size=8)
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each, median reported")
    parser.add_argument("--contention", action="store_true",
                        help="instead: the encoder-only rate alone, beside a decoding process and beside a busy "
                             "loop (run with --threads 1 on a 2-core machine: each process has a core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = Path(tempfile.mkdtemp(prefix="bench_windows_"))
    try:
        long_video, warm_video = make_videos(folder, args)
        model = load_model(folder, args)
        if args.contention:
            return report_contention(model, [contention_rates(model, long_video, args) for _ in range(args.rounds)],
                                     args)
        rates = [(*pipeline_rate(model, long_video, warm_video, folder, args), encoder_rate(model, long_video, args))
                 for _ in range(args.rounds)]  # alternated, so that drifts in load hit both alike
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    pipeline, encoder = statistics.median(rate[0] for rate in rates), statistics.median(rate[2] for rate in rates)
    result = {"windows": rates[0][1], "index_windows_per_s": round(pipeline, 2),
              "encoder_windows_per_s": round(encoder, 2), "ratio": round(pipeline / encoder, 3),
              "rounds": [{"index_windows_per_s": round(index, 2), "encoder_windows_per_s": round(alone, 2)}
                         for index, _, alone in rates]}
    machine = common.machine_info(model.device)
    print(f"machine: {machine['cpu']} ({machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads); "
          f"device {machine['device']}, precision {model.precision.name}")
    print(f"model {args.model}, window {args.window:g} s every {args.window / 2:g} s, batch {args.batch_size}, "
          f"{args.num_workers} decoding worker(s), median of {args.rounds} rounds")
    print(f"{'windows':>7} {'index windows/s':>16} {'encoder windows/s':>18} {'ratio':>6}")
    print(f"{result['windows']:>7} {result['index_windows_per_s']:>16.2f} {result['encoder_windows_per_s']:>18.2f} "
          f"{result['ratio']:>6.0%}")
    print("rounds (index, encoder windows/s): " + ", ".join(
        f"({rate['index_windows_per_s']:.1f}, {rate['encoder_windows_per_s']:.1f})" for rate in result["rounds"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "settings": vars(args), "results": result},
                                             indent=1))


def report_contention(model, rounds: list[dict], args) -> None:
    medians = {name: statistics.median(rates[name] for rates in rounds) for name in rounds[0]}
    machine = common.machine_info(model.device)
    print(f"machine: {machine['cpu']} ({machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads); "
          f"precision {model.precision.name}; encoder-only windows/s, median of {args.rounds} rounds")
    for name, rate in medians.items():
        print(f"{name:>20} {rate:8.1f}  {rate / medians['alone']:5.0%}")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "settings": vars(args), "medians": medians,
                                              "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
