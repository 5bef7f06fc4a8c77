"""Pre-training clips/s through the DataLoader: WebDataset shards vs loose files.

Two corpora: the toy corpus (data.toy: 64 px clips and images, the toy config's 8 frames)
and clips at the real size (224x224, 30 fps, textured background as in bench_data.py;
32 frames sampled with `rand`, decoded at 256, cropped to 224). Each is packed into shards
with data.pack_shards, then one epoch is loaded with 1 and 2 workers from the shards
(ShardedPretrainDataset) and from the files (PretrainDataset), in the training
configuration (batch of 4, every worker single-threaded).

    python -m benchmarks.bench_shards --out benchmarks/results/shards_cpu.json
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.bench_data import make_long_clip
from configs.load import load_config
from data.datasets import PretrainDataset
from data.loader import create_loader, create_sampler
from data.pack_shards import pack
from data.shards import ShardedPretrainDataset
from data.toy import write_corpus

BATCH_SIZE = 4


def toy_corpus(folder, clips):
    write_corpus(folder, num_clips=clips, frames=16, size=64, seed=0)
    config = load_config(str(Path(common.REPO_ROOT) / "configs/toy/pretrain.yaml"))
    return folder / "ann" / "pretrain.json", config


def real_size_corpus(folder, clips, seconds):
    (folder / "videos").mkdir(parents=True)
    entries = []
    for seed in range(clips):
        make_long_clip(folder / "videos" / f"clip{seed:03d}.mp4", seconds, 30, 224, 224, seed)
        entries.append({"path": f"videos/clip{seed:03d}.mp4", "caption": f"clip number {seed}"})
    annotation = folder / "pretrain.json"
    annotation.write_text(json.dumps(entries))
    config = load_config(str(Path(common.REPO_ROOT) / "configs/toy/pretrain.yaml"))
    config.update(image_size=224, num_frm_train=32, frm_sampling_strategy="rand", video_resize=256)
    return annotation, config


def epoch_rate(dataset, workers):
    """(clips, seconds) of one epoch, loader start-up included."""
    sampler = create_sampler(dataset, True, 1, 0)
    loader = create_loader(dataset, sampler, BATCH_SIZE, workers, train=True, pin_memory=False)
    began = time.perf_counter()
    clips = sum(len(captions) for _, captions in loader)
    return clips, time.perf_counter() - began


def measure(name, folder, annotation, config, worker_counts, shard_count):
    """Rows for one corpus: files and shards, for every worker count."""
    manifest = pack([annotation], folder / "shards", folder, max_samples=-(-len(json.loads(annotation.read_text()))
                                                                          // shard_count))
    config.update(train_file=[str(annotation)], video_root=str(folder), batch_size=BATCH_SIZE)
    shards = [str(folder / "shards" / shard["name"]) for shard in manifest["shards"]]
    rows = []
    for workers in worker_counts:
        for source, dataset in (("files", PretrainDataset(config, "pretrain")),
                                ("shards", ShardedPretrainDataset({**config, "train_shards": shards,
                                                                   "num_workers": workers}, rank=0, world_size=1))):
            clips, seconds = epoch_rate(dataset, workers)
            rows.append({"corpus": name, "source": source, "workers": workers, "clips": clips,
                         "seconds": round(seconds, 2), "clips_per_s": round(clips / seconds, 2),
                         "clips_per_s_per_worker": round(clips / seconds / workers, 2)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON to this path")
    parser.add_argument("--toy_clips", type=int, default=200, help="clips of the toy corpus (70%% are trained on)")
    parser.add_argument("--real_clips", type=int, default=64, help="clips at the real size")
    parser.add_argument("--real_seconds", type=int, default=2, help="length of each real-size clip (30 fps)")
    parser.add_argument("--workers", default="1,2", help="loader workers to measure, e.g. 1,2")
    parser.add_argument("--shards", type=int, default=4, help="shards each corpus is packed into")
    args = parser.parse_args()

    torch.set_num_threads(1)
    machine = common.machine_info(torch.device("cpu"))
    workers = common.parse_list(args.workers, int)
    with tempfile.TemporaryDirectory(prefix="bench_shards_") as temporary:
        folder = Path(temporary)
        rows = measure("toy 64px, 8 frames", folder / "toy", *toy_corpus(folder / "toy", args.toy_clips),
                       workers, args.shards)
        rows += measure("224px, 32 frames rand", folder / "real",
                        *real_size_corpus(folder / "real", args.real_clips, args.real_seconds), workers, args.shards)
    common.print_table(rows, ["corpus", "source", "workers", "clips", "seconds", "clips_per_s",
                              "clips_per_s_per_worker"],
                       title=f"Pre-training loader, batch {BATCH_SIZE}: shards vs files on {machine['cpu']} "
                             f"({machine['cpu_count']} CPUs, load {machine['load_average_1_5_15min']})")
    common.write_json(args.out, {"machine": machine, "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
