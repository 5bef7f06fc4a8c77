"""Readers for the released annotation formats (spec: data_formats.md). Each retrieval
reader returns (video file name relative to video_root, raw paragraph) pairs; text
normalisation happens in the datasets."""
import csv
import io
import json
import pickle
from pathlib import Path


def require_file(path, what):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected annotation file {path} does not exist")
    return path


def read_json(path, what="annotation"):
    with open(require_file(path, what)) as f:
        return json.load(f)


def read_jsonl(path, what="annotation"):
    with open(require_file(path, what)) as f:
        return [json.loads(line) for line in f if line.strip()]


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and scalars only. Lists, dicts, strings, numbers and
    tuples need no global lookup; every other global (os.system, eval, any class) is refused
    before it is called, so a crafted annotation file cannot run code."""

    SAFE_GLOBALS = {(module, name) for module in ("builtins", "__builtin__")  # __builtin__: protocol < 3
                    for name in ("set", "frozenset", "list", "dict", "tuple", "str", "int", "float", "bool",
                                 "complex", "bytes", "bytearray")}
    SAFE_GLOBALS.add(("collections", "OrderedDict"))

    def find_class(self, module, name):
        if (module, name) in self.SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from an annotation pickle: only dicts, lists, strings "
            "and numbers are allowed")


def restricted_loads(data: bytes):
    return RestrictedUnpickler(io.BytesIO(data)).load()


def read_pickle(path, what="annotation"):
    return restricted_loads(require_file(path, what).read_bytes())


def read_queryd(ann_root, split):
    ann_root = Path(ann_root)
    names = require_file(ann_root / f"exists_{split}_list.txt", "QuerYD").read_text().split()
    sentences = read_pickle(ann_root / "raw_captions_combined_filtered.pkl", "QuerYD captions")
    missing = [n for n in names if n not in sentences]
    if missing:
        raise KeyError(f"QuerYD captions pickle has no entry for {len(missing)} listed videos, e.g. {missing[0]!r}")
    return [(name, " ".join(" ".join(words) for words in sentences[name])) for name in names]


def read_didemo(ann_root, split):
    lines = read_jsonl(Path(ann_root) / f"{split}.jsonl", "DiDeMo")
    return [(line["clip_name"] + ".mp4", line["caption"]) for line in lines]


def read_activitynet(ann_root, split):
    split = "val" if split == "test" else split  # ActivityNet Captions has no test file
    return [(entry["video"], " ".join(entry["caption"])) for entry in read_json(Path(ann_root) / f"{split}.json")]


def read_condensedmovies(ann_root, split):
    filename = "test_challf0.csv" if split == "test" else "train_val_challf0.csv"
    with open(require_file(Path(ann_root) / filename, "Condensed Movies")) as f:
        rows = [row for row in csv.DictReader(f) if row["split"] == split]
    return [(row["videoid"] + ".mkv", row["caption"]) for row in rows]
