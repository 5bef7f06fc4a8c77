"""Pack a pre-training annotation file and its videos and images into WebDataset tar shards.

    python -m data.pack_shards --train_file ann/pretrain.json [more.json ...] [--video_root DIR] \
        --out shards/ [--max_bytes 1e9] [--max_samples N] [--prefix pretrain] [--check]

One sample per annotation row: key = the row's number over all files (`000000042`), the
file's bytes as they are under its own extension (`mp4`, `jpg`, ...), the caption in `txt`
and {"path", "row"} in `json`. A shard is closed once it holds --max_bytes (the sample that
crosses the limit still goes in) or --max_samples samples. Paths resolve as PretrainDataset
resolves them (`path`, or `video`, of each entry).

Resumable: each shard is written as NAME.tmp and renamed when complete, then progress.json
records it; re-running the same command continues after the last complete shard, and the
shards come out byte-identical to an uninterrupted run. Unreadable files (and, with --check,
undecodable ones) go to bad_files.txt with the reason, never stop the run. At the end
manifest.json lists the shards with their sample counts; the streaming dataset reads it.
"""
import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

from runtime.errors import DataError
from runtime.progress import ProgressLine

from .annotations import layout_of, read_json

PROGRESS = "progress.json"
MANIFEST = "manifest.json"
BAD_FILES = "bad_files.txt"
REPORT_EVERY_S = 5.0


def read_rows(train_files, video_root=None):
    """(path as the annotation gives it, resolved path, caption) of every row, files concatenated."""
    rows = []
    for train_file in train_files:
        entries = read_json(train_file, "pretrain train_file")
        with layout_of(train_file, 'a list of {"path", "caption"} objects'):
            for entry in entries:
                path = entry["path"] if "path" in entry else entry["video"]
                rows.append((path, Path(video_root or "") / path, entry["caption"]))
    return rows


def read_file(path):
    """The file's bytes; an empty file is as unusable as a missing one."""
    data = Path(path).read_bytes()
    if not data:
        raise OSError("empty file")
    return data


def check_decodable(path, data):
    """Decode one frame (videos) or the whole picture (images) of the bytes; raises when it cannot."""
    from PIL import Image

    from .datasets import VIDEO_EXTENSIONS
    from .video import read_video
    if Path(path).suffix.lower() in VIDEO_EXTENSIONS:
        read_video(data, 1, "uniform_spread", name=str(path))
    else:
        with Image.open(io.BytesIO(data)) as picture:
            picture.convert("RGB")


def extension_of(source):
    """The sample's field of the file's bytes: its extension, lower case."""
    return Path(source).suffix.lower().lstrip(".") or "bin"


def sample_of(row, path, source, caption, data):
    return {"__key__": f"{row:09d}", extension_of(source): data, "txt": caption,
            "json": json.dumps({"path": str(path), "row": row})}


def write_json_atomically(path, payload):
    temporary = f"{path}.tmp"
    Path(temporary).write_text(json.dumps(payload, indent=1))
    os.replace(temporary, path)


class ShardPacker:
    """The state of one packing run in `out`: finished shards, the next row to pack, bad files."""

    def __init__(self, rows, out, arguments):
        self.rows, self.out, self.check = rows, Path(out), arguments["check"]
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = self.load_progress(arguments)
        self.pending_samples = 0
        self.row = self.progress["next_row"]

    def load_progress(self, arguments):
        path = self.out / PROGRESS
        if not path.is_file():
            return {"arguments": arguments, "rows": len(self.rows), "next_row": 0, "shards": [], "bad": []}
        progress = json.loads(path.read_text())
        if progress["arguments"] != arguments or progress["rows"] != len(self.rows):
            raise DataError(f"{self.out} holds shards packed with other arguments or another annotation "
                            f"({progress['arguments']}); use another --out or empty it")
        return progress

    def pattern(self):
        return str(self.out / f"{self.progress['arguments']['prefix']}-%06d.tar.tmp")

    def remove_partial_shards(self):
        for partial in self.out.glob(f"{self.progress['arguments']['prefix']}-*.tar.tmp"):
            partial.unlink()

    def shard_written(self, temporary):
        """ShardWriter's callback once a shard is closed: rename it into place, then record it."""
        if self.pending_samples == 0:  # the last shard opened with every remaining file bad
            os.remove(temporary)
            return
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        final = temporary[:-len(".tmp")]
        os.replace(temporary, final)
        self.progress["shards"].append({"name": os.path.basename(final), "samples": self.pending_samples,
                                        "bytes": os.path.getsize(final)})
        self.progress["next_row"] = self.row
        self.pending_samples = 0
        write_json_atomically(self.out / PROGRESS, self.progress)
        self.write_bad_files()

    def write_bad_files(self):
        lines = [f"{path}\t{reason}\n" for _, path, reason in self.progress["bad"]]
        (self.out / BAD_FILES).write_text("".join(lines))

    def sample(self, row):
        """The row's sample, or None after recording why its file cannot be packed."""
        path, source, caption = self.rows[row]
        try:
            data = read_file(source)
            if self.check:
                check_decodable(source, data)
        except Exception as err:  # noqa: BLE001 - missing, unreadable, undecodable: listed, never fatal
            self.progress["bad"].append((row, str(source), f"{type(err).__name__}: {err}".replace("\n", " ")))
            return None
        return sample_of(row, path, source, caption, data)

    def run(self):
        import webdataset

        self.remove_partial_shards()
        progress = ProgressLine("[pack]", len(self.rows), "rows", REPORT_EVERY_S, start=self.row)
        packed_bytes = 0
        arguments = self.progress["arguments"]
        writer = webdataset.ShardWriter(self.pattern(), maxcount=arguments["max_samples"] or sys.maxsize,
                                        maxsize=arguments["max_bytes"],
                                        post=self.shard_written, start_shard=len(self.progress["shards"]),
                                        verbose=0, mtime=0)  # a fixed mtime: identical shards on every run
        for row in range(self.row, len(self.rows)):
            self.row = row
            sample = self.sample(row)
            if sample is not None:
                writer.write(sample)
                packed_bytes += len(sample[extension_of(self.rows[row][1])])
                self.pending_samples += 1
            megabytes_per_s = packed_bytes / max(time.time() - progress.began, 1e-9) / 1e6
            progress.update(row + 1, f"{len(self.progress['shards'])} shards done, {len(self.progress['bad'])} "
                                     f"bad files, {megabytes_per_s:.1f} MB/s")
        self.row = len(self.rows)
        writer.close()
        self.progress["next_row"] = self.row
        write_json_atomically(self.out / PROGRESS, self.progress)  # also when the last shard was empty
        self.write_bad_files()


def manifest_of(progress):
    shards = progress["shards"]
    return {"shards": shards, "total_samples": sum(shard["samples"] for shard in shards),
            "total_bytes": sum(shard["bytes"] for shard in shards), "bad_files": len(progress["bad"]),
            "arguments": progress["arguments"]}


def pack(train_files, out, video_root=None, max_bytes=1e9, prefix="pretrain", check=False, max_samples=None):
    """Pack (or finish packing) `train_files` into `out`; returns the manifest."""
    if max_bytes <= 0 or (max_samples is not None and max_samples < 1):
        raise DataError(f"--max_bytes and --max_samples must be positive, got {max_bytes} and {max_samples}")
    train_files = [str(path) for path in ([train_files] if isinstance(train_files, (str, Path)) else train_files)]
    arguments = {"train_files": train_files, "video_root": video_root and str(video_root),
                 "max_bytes": max_bytes, "max_samples": max_samples, "prefix": prefix, "check": check}
    packer = ShardPacker(read_rows(train_files, video_root), out, arguments)
    manifest_path = Path(out) / MANIFEST
    if packer.row == len(packer.rows) and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        print(f"[pack] {out} is already complete: {len(manifest['shards'])} shards, "
              f"{manifest['total_samples']} samples ({manifest_path})")
        return manifest
    if packer.row:
        print(f"[pack] resuming after {len(packer.progress['shards'])} complete shards, at row {packer.row}")
    packer.run()
    manifest = manifest_of(packer.progress)
    write_json_atomically(manifest_path, manifest)
    print(f"[pack] complete: {len(manifest['shards'])} shards, {manifest['total_samples']} samples, "
          f"{manifest['total_bytes'] / 1e6:.1f} MB, {manifest['bad_files']} bad files "
          f"(listed in {Path(out) / BAD_FILES}); manifest {manifest_path}")
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_file", nargs="+", required=True, help="pre-training annotation JSON file(s)")
    parser.add_argument("--video_root", default=None, help="folder relative paths resolve against "
                                                           "(default: the working folder)")
    parser.add_argument("--out", required=True, help="folder of the shards, manifest.json and bad_files.txt")
    parser.add_argument("--max_bytes", type=float, default=1e9, help="bytes per shard (default 1e9)")
    parser.add_argument("--max_samples", type=int, default=None, help="samples per shard (default: no limit)")
    parser.add_argument("--prefix", default="pretrain", help="shard names: PREFIX-000000.tar, ...")
    parser.add_argument("--check", action="store_true", help="also list files that cannot be decoded "
                                                             "(decodes one frame of each video; slower)")
    args = parser.parse_args(argv)
    try:
        pack(args.train_file, args.out, args.video_root, args.max_bytes, args.prefix, args.check, args.max_samples)
    except (DataError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
