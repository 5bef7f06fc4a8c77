"""Toy corpus: small real mp4 clips of moving coloured shapes, and every annotation format
of the spec written from the same clips, so every dataset and script can run end to end.

Each clip shows two events: one shape moves in one direction during the first half, a
second shape moves during the second half. Captions and QA pairs describe the colours,
shapes, directions and order, so a small model can learn them.

    python -m data.toy --out DIR [--num_clips 100 --frames 16 --size 64 --seed 0]
"""
import argparse
import csv
import json
import os
import pickle
import random
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
FPS = 8
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15}  # the rest is test


def shape_mask(shape, size, cx, cy, radius):
    ys, xs = np.mgrid[0:size, 0:size]
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    return (dy <= radius) & (dy >= -radius) & (np.abs(dx) * 2 <= dy + radius)


def render_event(event, num_frames, size):
    """Frames (num_frames, size, size, 3) of one shape crossing the frame in one direction."""
    radius = size // 6
    ux, uy = DIRECTIONS[event["direction"]]
    travel = size - 2 * radius - 2
    frames = np.zeros((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        progress = t / max(num_frames - 1, 1) - 0.5
        cx = size / 2 + ux * progress * travel
        cy = size / 2 + uy * progress * travel
        frames[t][shape_mask(event["shape"], size, cx, cy, radius)] = COLORS[event["color"]]
    return frames


def random_events(rng):
    first_color, second_color = rng.sample(list(COLORS), 2)
    return [{"color": color, "shape": rng.choice(SHAPES), "direction": rng.choice(list(DIRECTIONS))}
            for color in (first_color, second_color)]


def describe(events):
    """Sentences of the paragraph caption, e.g. ['a red circle moves left', 'then a blue square moves up']."""
    first, second = (f"a {e['color']} {e['shape']} moves {e['direction']}" for e in events)
    return [first, "then " + second]


def write_mp4(path, frames, fps=FPS, faststart=False):
    """faststart puts the index before the frames, so a truncated copy still opens."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "18"}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


def make_clip(path, events, num_frames=16, size=64):
    half = num_frames // 2
    frames = np.concatenate([render_event(events[0], half, size),
                             render_event(events[1], num_frames - half, size)])
    write_mp4(path, frames)


def qa_pairs(name, events, rng):
    asked_color = rng.choice(list(COLORS))
    present = "yes" if asked_color in (events[0]["color"], events[1]["color"]) else "no"
    pairs = [("what color is the first shape?", events[0]["color"], "color"),
             ("what shape moves second?", events[1]["shape"], "object"),
             ("which direction does the first shape move?", events[0]["direction"], "motion"),
             (f"is there a {asked_color} shape?", present, "yes_no")]
    questions = [{"question_id": f"{name}_{k}", "video_name": name, "question": q}
                 for k, (q, _, _) in enumerate(pairs)]
    answers = [{"question_id": f"{name}_{k}", "answer": a, "type": kind}
               for k, (_, a, kind) in enumerate(pairs)]
    return questions, answers


def split_names(names):
    n_train = max(1, int(len(names) * SPLIT_FRACTIONS["train"]))
    n_val = max(1, int(len(names) * SPLIT_FRACTIONS["val"]))
    return {"train": names[:n_train], "val": names[n_train:n_train + n_val],
            "test": names[n_train + n_val:] or names[-1:]}


def write_json(path, data):
    Path(path).write_text(json.dumps(data))


def write_images(out, rng, count, size):
    """Still images (PNG and JPG) of one shape each, for the image path of pre-training."""
    entries = []
    for k in range(count):
        event = {"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES), "direction": "left"}
        frame = render_event(event, 3, size)[1]
        name = f"images/img_{k:03d}.{'png' if k % 2 == 0 else 'jpg'}"
        Image.fromarray(frame).save(out / name)
        entries.append({"path": name, "caption": f"a {event['color']} {event['shape']}"})
    return entries


def write_corpus(out, num_clips=100, frames=16, size=64, seed=0, num_images=6):
    """Write clips and all annotation formats under `out`; returns a summary dict."""
    out = Path(out)
    for folder in ("videos", "videos_mkv", "videos_queryd", "images", "ann"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = [f"toy{k:05d}" for k in range(num_clips)]
    events = {name: random_events(rng) for name in names}
    for name in names:
        make_clip(out / "videos" / f"v_{name}.mp4", events[name], frames, size)
        # Condensed Movies names its files .mkv; QuerYD's carry no extension
        for link in (out / "videos_mkv" / f"v_{name}.mkv", out / "videos_queryd" / f"v_{name}"):
            if not link.exists():
                os.symlink(os.path.join("..", "videos", f"v_{name}.mp4"), link)
    sentences = {name: describe(events[name]) for name in names}
    splits = split_names(names)
    ann = out / "ann"

    image_entries = write_images(out, rng, num_images, size)
    video_entries = [{"path": f"videos/v_{n}.mp4", "caption": " ".join(sentences[n])} for n in splits["train"]]
    write_json(ann / "pretrain.json", video_entries + image_entries)
    write_json(ann / "pretrain_images.json", image_entries)

    queryd = {f"v_{n}": [s.split(" ") for s in sentences[n]] for n in names}
    with open(ann / "raw_captions_combined_filtered.pkl", "wb") as f:
        pickle.dump(queryd, f)
    cm_rows = []
    for split, members in splits.items():
        (ann / f"exists_{split}_list.txt").write_text("".join(f"v_{n}\n" for n in members))
        didemo = [{"clip_name": f"v_{n}", "caption": " ".join(sentences[n])} for n in members]
        if split != "train":  # DiDeMo evaluation files repeat clips; the reader de-duplicates them
            didemo.append(dict(didemo[0], caption=didemo[0]["caption"].upper()))
        (ann / f"{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in didemo))
        if split != "test":  # ActivityNet Captions has no test file
            write_json(ann / f"{split}.json", [{"video": f"v_{n}.mp4", "caption": sentences[n]} for n in members])
        cm_rows += [{"videoid": f"v_{n}", "caption": " ".join(sentences[n]), "split": split} for n in members]
        qa = [qa_pairs(n, events[n], rng) for n in members]
        write_json(ann / f"{split}_q.json", [q for qs, _ in qa for q in qs])
        write_json(ann / f"{split}_a.json", [a for _, ans in qa for a in ans])
    for filename, rows in (("train_val_challf0.csv", [r for r in cm_rows if r["split"] != "test"]),
                           ("test_challf0.csv", [r for r in cm_rows if r["split"] == "test"])):
        with open(ann / filename, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["videoid", "caption", "split"])
            writer.writeheader()
            writer.writerows(rows)

    summary = {"root": str(out), "num_clips": num_clips, "frames": frames, "size": size, "fps": FPS,
               "seed": seed, "splits": {k: len(v) for k, v in splits.items()}, "num_images": num_images,
               "config": {"video_root": str(out / "videos"), "video_root_condensedmovies": str(out / "videos_mkv"),
                          "video_root_queryd": str(out / "videos_queryd"),
                          "pretrain_video_root": str(out), "ann_root": str(ann),
                          "train_file": [str(ann / "pretrain.json")],
                          "image_train_file": [str(ann / "pretrain_images.json")]},
               "example_caption": " ".join(sentences[names[0]])}
    write_json(out / "summary.json", summary)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num_clips", type=int, default=100)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    began = time.time()
    summary = write_corpus(args.out, args.num_clips, args.frames, args.size, args.seed)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.num_clips} clips and annotations to {args.out} in {time.time() - began:.1f}s")


if __name__ == "__main__":
    main()
