"""Readers for the released annotation formats (docs/data.md, "Formats"). Each retrieval
reader returns (video file name relative to video_root, raw paragraph) pairs; text
normalisation happens in the datasets.

A file that is not what its format says (broken JSON, a refused pickle, a missing field)
raises AnnotationError naming the file, and the line and column where there is one."""
import csv
import io
import json
import pickle
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import DataError, one_line


class AnnotationError(DataError, ValueError):
    """An annotation file that cannot be read as its format says."""


def require_file(path, what):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected annotation file {path} does not exist")
    return path


@contextmanager
def layout_of(path, layout):
    """A missing field or a wrongly shaped entry while reading `path` is the file's fault:
    name the file and the layout it should have."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise AnnotationError(one_line(f"{path}: expected {layout} ({type(err).__name__}: {err})")) from None


def _decode_error(path, err, line=None):
    """json.JSONDecodeError -> AnnotationError with the file, line and column."""
    return AnnotationError(one_line(f"{path}, line {line or err.lineno}, column {err.colno}: "
                                    f"not valid JSON ({err.msg})"))


def _text(path, what):
    try:
        return require_file(path, what).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {err.start})") from None


def read_json(path, what="annotation"):
    try:
        return json.loads(_text(path, what))
    except json.JSONDecodeError as err:
        raise _decode_error(path, err) from None


def read_jsonl(path, what="annotation"):
    entries = []
    for number, line in enumerate(_text(path, what).split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as err:  # err.lineno counts within the one line: always 1
                raise _decode_error(path, err, number) from None
    return entries


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
    data = require_file(path, what).read_bytes()
    try:
        return restricted_loads(data)
    except Exception as err:  # refused globals, truncation and garbage raise many types
        raise AnnotationError(one_line(f"{path}: not a readable annotation pickle ({type(err).__name__}: {err})")) \
            from None


def read_queryd(ann_root, split):
    ann_root = Path(ann_root)
    names = _text(ann_root / f"exists_{split}_list.txt", "QuerYD").split()
    pickle_path = ann_root / "raw_captions_combined_filtered.pkl"
    sentences = read_pickle(pickle_path, "QuerYD captions")
    with layout_of(pickle_path, "a dict of video name -> list of sentences (lists of words)"):
        missing = [n for n in names if n not in sentences]
        if missing:
            raise AnnotationError(f"{pickle_path} has no entry for {len(missing)} videos listed in "
                                  f"exists_{split}_list.txt, e.g. {missing[0]!r}")
        return [(name, " ".join(" ".join(words) for words in sentences[name])) for name in names]


def read_didemo(ann_root, split):
    path = Path(ann_root) / f"{split}.jsonl"
    lines = read_jsonl(path, "DiDeMo")
    with layout_of(path, 'one {"clip_name", "caption"} object per line'):
        return [(line["clip_name"] + ".mp4", line["caption"]) for line in lines]


def read_activitynet(ann_root, split):
    split = "val" if split == "test" else split  # ActivityNet Captions has no test file
    path = Path(ann_root) / f"{split}.json"
    entries = read_json(path, "ActivityNet Captions")
    with layout_of(path, 'a list of {"video", "caption": [sentences]} objects'):
        return [(entry["video"], " ".join(entry["caption"])) for entry in entries]


def read_condensedmovies(ann_root, split):
    filename = "test_challf0.csv" if split == "test" else "train_val_challf0.csv"
    path = require_file(Path(ann_root) / filename, "Condensed Movies")
    with open(path, newline="") as f, layout_of(path, "a csv with the columns videoid, caption, split"):
        rows = [row for row in csv.DictReader(f) if row["split"] == split]
        return [(row["videoid"] + ".mkv", row["caption"]) for row in rows]
