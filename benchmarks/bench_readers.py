"""Clips/s per loader worker of each video reader, and where a training clip's time goes.

Makes two sets of clips from the same generated sources (moving shapes on a textured
background, x264 with its default 250-frame GOP): "raw" (--seconds long, --width x --height,
30 fps, like downloaded videos) and "compressed" (the raw ones re-encoded as docs/data.md
prescribes: `python -m data.compress --fps 3 --size 224`). Then, single-threaded as in a
DataLoader worker:

- readers: each reader in data.video.READERS, for 8, 32 and 96 frames, `uniform` frames at the
  evaluation size (224) and `rand` frames at the training decode size (256), resized either
  in the decoder ("at size", as decord's width/height) or after decoding by read_video's
  resize ("then resize", the pipeline's way);
- profile: one 32-frame training clip through the pipeline's stages (decode, resize to the
  decode size, crop, RandAugment, normalise, collate into a shared-memory batch as a worker
  does), and the cost of each augmentation op.

    python -m benchmarks.bench_readers --out benchmarks/results/readers_cpu.json
"""
import random
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.bench_data import compress, make_long_clip
from data import video
from data.transforms import AUGMENT_OPS, OP_PARAMETERS, VideoTrainTransform
from models.pixels import normalize

EVAL_SIZE, TRAIN_SIZE, IMAGE_SIZE = 224, 256, 224
AUGMENT_DRAWS = 10  # ops differ widely in cost (0-12 ms): the stage is timed over several draws


def make_clips(folder, count, seconds, width, height):
    """(compressed paths, raw paths): raw clips, then data.compress's re-encoding of them."""
    raw = [folder / f"clip{seed}.mp4" for seed in range(count)]
    for seed, path in enumerate(raw):
        make_long_clip(path, seconds, 30, width, height, seed)
    return compress(folder, raw), raw


def reader_rows(clip_sets, readers, frame_counts, repeats):
    """Clips/s of every reader, decoding at size and then resizing, timed in interleaved rounds
    (one pass over the clips of each per round) so that a shared machine's load changes hit
    them alike; the median pass counts."""
    rows = []
    for clips, paths in clip_sets.items():
        for frames in frame_counts:
            for strategy, size in (("uniform", EVAL_SIZE), ("rand", TRAIN_SIZE)):
                rng = random.Random(0)
                passes = {(reader, resize): lambda reader=reader, at=at: [video.resize_frames(
                              video.READERS[reader](str(path), frames, strategy, rng, None, None, at)[0], size)
                              for path in paths]
                          for reader in readers for resize, at in (("at size", size), ("then resize", None))}
                timings = common.time_interleaved(passes, torch.device("cpu"), runs=repeats, warmup=1)
                rows += [dict(clips=clips, reader=reader, frames=frames, strategy=strategy, size=size, resize=resize,
                              clips_per_s=round(len(paths) / timing["median_s"], 1),
                              cpu_clips_per_s=round(len(paths) / timing["median_cpu_s"], 1))
                         for (reader, resize), timing in timings.items()]
    return rows


def stage_times(path, repeats, batch_size):
    """Milliseconds (wall, CPU) per 32-frame training clip of each stage of the pipeline."""
    rng = random.Random(0)
    frames = video.read_video(path, 32, "rand", None, rng)
    resized = video.read_video(path, 32, "rand", TRAIN_SIZE, rng)
    augmented = VideoTrainTransform(IMAGE_SIZE)(resized, rng)
    normalised = normalize(augmented)
    stages = {
        "decode (native size)": lambda: video.read_video(path, 32, "rand", None, rng),
        f"resize to {TRAIN_SIZE}": lambda: video.resize_frames(frames.permute(0, 2, 3, 1), TRAIN_SIZE),
        f"crop + RandAugment (2 ops, mean of {AUGMENT_DRAWS} draws)": lambda: [
            VideoTrainTransform(IMAGE_SIZE)(resized, rng) for _ in range(AUGMENT_DRAWS)],
        "normalise (now on the model's device)": lambda: normalize(augmented),
        f"collate float32 (batch {batch_size})": lambda: shared_collate([normalised] * batch_size),
        f"collate uint8 (batch {batch_size})": lambda: shared_collate([augmented] * batch_size),
    }
    per_clip = {name: batch_size if "collate" in name else AUGMENT_DRAWS if "draws" in name else 1 for name in stages}
    timings = common.time_interleaved(stages, torch.device("cpu"), runs=repeats, warmup=1)
    return {name: {"wall_ms": round(1e3 * timing["median_s"] / per_clip[name], 1),
                   "cpu_ms": round(1e3 * timing["median_cpu_s"] / per_clip[name], 1)}
            for name, timing in timings.items()}


def shared_collate(clips):
    """What default_collate does inside a worker: stack into a shared-memory tensor."""
    out = torch.empty((len(clips), *clips[0].shape), dtype=clips[0].dtype).share_memory_()
    return torch.stack(clips, out=out)


def op_times(clip, repeats):
    """Milliseconds (wall, CPU) per clip of each RandAugment op at magnitude 5."""
    ops = {name: (lambda op=op, parameter=OP_PARAMETERS[name](5): op(clip, parameter))
           for name, op in AUGMENT_OPS.items()}
    timings = common.time_interleaved(ops, torch.device("cpu"), runs=repeats, warmup=1)
    return {name: {"wall_ms": round(1e3 * timing["median_s"], 1), "cpu_ms": round(1e3 * timing["median_cpu_s"], 1)}
            for name, timing in timings.items()}


def markdown(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(row[column]) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def reader_label(reader):
    """The reader and its package version (decord2 installs as `decord`, so the version tells them apart)."""
    module = {"torchcodec": "torchcodec", "decord": "decord", "pyav": "av"}[reader]
    return f"{reader} {__import__(module).__version__}"


def main():
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(device="cpu")
    parser.add_argument("--clips", type=int, default=2, help="clips per set")
    parser.add_argument("--seconds", type=int, default=30, help="length of the raw clips")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--frames", default="8,32,96")
    parser.add_argument("--readers", default=",".join(video.reader_names()),
                        help="default: every reader that loads")
    parser.add_argument("--batch_size", type=int, default=8, help="batch of the collate stage")
    args = parser.parse_args()

    video.worker_init_fn(0)  # one decoder thread and one torch thread, as inside a DataLoader worker
    compressed, raw = make_clips(Path(common.scratch_folder("bench_readers_")), args.clips, args.seconds,
                                 args.width, args.height)
    readers = common.parse_list(args.readers)
    rows = reader_rows({"compressed": compressed, "raw": raw}, readers, common.parse_list(args.frames, int),
                       args.runs)
    rows.sort(key=lambda row: (row["clips"], readers.index(row["reader"])))  # stable: frames, strategy stay in order
    for row in rows:
        row["reader"] = reader_label(row["reader"])
    stages = stage_times(compressed[0], args.runs * 3, args.batch_size)
    ops = op_times(video.read_video(compressed[0], 32, "rand", IMAGE_SIZE), args.runs * 3)

    machine = common.machine_info(torch.device("cpu"))
    print(f"\n{machine['cpu']}, {machine['cpu_count']} CPUs, 1 thread per worker, torch {machine['torch']}, "
          f"{machine['date_utc']}, load average {machine['load_average_1_5_15min']}")
    print(f"compressed: {args.clips} clips re-encoded by data.compress (3 fps, shorter side 224); raw: "
          f"{args.clips} clips of {args.seconds} s, {args.width}x{args.height}, 30 fps, GOP 250\n")
    print(markdown(rows, ["clips", "reader", "frames", "strategy", "size", "resize", "clips_per_s",
                          "cpu_clips_per_s"]))
    print("\n32-frame training clip (compressed set), ms per clip:\n")
    print(markdown([{"stage": name, **ms} for name, ms in stages.items()], ["stage", "wall_ms", "cpu_ms"]))
    print("\nRandAugment ops on a 32x3x224x224 uint8 clip, ms per clip:\n")
    print(markdown([{"op": name, **ms} for name, ms in ops.items()], ["op", "wall_ms", "cpu_ms"]))
    common.write_json(args.out, dict(machine=machine, args=vars(args), readers=rows, stages_ms=stages, ops_ms=ops))


if __name__ == "__main__":
    main()
