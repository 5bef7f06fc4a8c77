"""Videos/s of `video_tool.py index` (inference.index.update_index: scan, decode in DataLoader
workers, encode, write) against the video encoder alone on clips decoded beforehand, at the
same batch size and precision. The ratio says how much of the encoder's speed indexing keeps
(target >= 90%: decoding hides behind encoding).

The model is the real 224 px, 768-wide, 12-block video encoder of
configs/retrieval_didemo_f32.yaml (random weights; `--depth` fewer blocks for a quick trial:
a cheaper encoder makes the ratio harder to reach). Videos are 10 s, 30 fps, 320x240 clips
(bench_data.make_long_clip), a typical compressed retrieval video. On a CPU, the decoding
workers share the cores with the encoder, so the ratio there also says how little CPU time
decoding takes next to encoding; on a GPU decoding has the CPU to itself.

    python -m benchmarks.bench_indexing --out benchmarks/results/indexing_cpu.json
    python -m benchmarks.bench_indexing --threads 1 --frames 8   # a core left to the decoding worker
"""
import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.bench_data import make_long_clip
from configs.load import load_config
from inference.api import VideoFiles, VideoLanguageModel, collate_clips
from inference.index import update_index
from models import create_model

CONFIG = common.REPO_ROOT + "/configs/retrieval_didemo_f32.yaml"
# The text side is not part of indexing: the toy BERT keeps the checkpoint small.
TOY_TEXT = common.REPO_ROOT + "/configs/toy/bert_toy.json"


def indexing_model(folder: Path, frames: int, args) -> VideoLanguageModel:
    overrides = [f"num_frames={frames}", f"num_frm_test={frames}", f"depth={args.depth}",
                 f"testa_r={[1, 12] * args.depth}", f"med_config={TOY_TEXT}", f"num_workers={args.num_workers}"]
    config = load_config(CONFIG, overrides)
    checkpoint = folder / f"random_f{frames}.pth"
    torch.save({"model": create_model(config, "retrieval").state_dict()}, checkpoint)
    return VideoLanguageModel.load(config, checkpoint, args.device, args.precision)


def pipeline_rate(model, videos: list[Path], folder: Path, args) -> float:
    """Videos/s of an index update that encodes every video but the first (which a first, untimed
    run indexes: it hashes the checkpoint and warms the model up)."""
    corpus, index = folder / "corpus", folder / "index"
    shutil.rmtree(corpus, ignore_errors=True)
    shutil.rmtree(index, ignore_errors=True)
    corpus.mkdir()
    shutil.copy(videos[0], corpus)
    update_index(model, corpus, index, args.batch_size, args.num_workers)
    for video in videos[1:]:
        shutil.copy(video, corpus)
    began = time.perf_counter()
    summary = update_index(model, corpus, index, args.batch_size, args.num_workers)
    assert summary.added == len(videos) - 1, summary
    return summary.added / (time.perf_counter() - began)


@torch.no_grad()
def encoder_rate(model, videos: list[Path], args) -> float:
    """Videos/s of model.encode_video alone on the same videos, decoded beforehand."""
    batches = [clips for clips, _, _ in map(collate_clips, _chunks(VideoFiles(model.config, videos[1:]), args))]
    with model.autocast():
        model.model.encode_video(batches[0][:1].to(model.device))  # warm-up
        common.synchronize(model.device)
        began = time.perf_counter()
        for clips in batches:
            model.model.encode_video(clips.to(model.device))
        common.synchronize(model.device)
    return (len(videos) - 1) / (time.perf_counter() - began)


def _chunks(dataset, args):
    items = [dataset[i] for i in range(len(dataset))]
    return [items[start:start + args.batch_size] for start in range(0, len(items), args.batch_size)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", default="8,32", help="frames per video, comma separated")
    parser.add_argument("--depth", type=int, default=12, help="video encoder blocks (default: the real 12)")
    parser.add_argument("--rounds", type=int, default=2, help="measurements of each, median reported")
    parser.add_argument("--videos", type=int, default=13,
                        help="videos generated (the first warms up; starting the decoding workers and decoding the "
                             "first batch are not hidden, so few videos understate the ratio)")
    common.add_indexing_pipeline_options(parser, batch_size=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = Path(tempfile.mkdtemp(prefix="bench_indexing_"))
    try:
        videos = [folder / f"video{k:03d}.mp4" for k in range(args.videos)]
        for seed, path in enumerate(videos):
            make_long_clip(path, 10, 30, 320, 240, seed)
        rows = []
        for frames in common.parse_list(args.frames, int):
            model = indexing_model(folder, frames, args)
            rates = [(pipeline_rate(model, videos, folder, args), encoder_rate(model, videos, args))
                     for _ in range(args.rounds)]  # alternated, so that drifts in load hit both alike
            pipeline, encoder = (statistics.median(column) for column in zip(*rates))
            rows.append({"frames": frames, "pipeline_videos_per_s": round(pipeline, 3),
                         "encoder_videos_per_s": round(encoder, 3), "ratio": round(pipeline / encoder, 3)})
            del model
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    machine = common.machine_info(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    print(f"machine: {machine['cpu']} ({machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads); "
          f"device {machine['device']}, precision {args.precision}")
    print(f"224 px, width 768, depth {args.depth}, batch {args.batch_size}, {args.num_workers} decoding worker(s), "
          f"{args.videos - 1} timed videos (10 s, 30 fps, 320x240), median of {args.rounds} rounds")
    print(f"{'frames':>6} {'index videos/s':>15} {'encoder videos/s':>17} {'ratio':>6}")
    for row in rows:
        print(f"{row['frames']:>6} {row['pipeline_videos_per_s']:>15.3f} {row['encoder_videos_per_s']:>17.3f} "
              f"{row['ratio']:>6.0%}")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "settings": vars(args), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
