"""video_tool's files: an index survives a full disk, an interruption and a second writer, a
damaged manifest is one clear error, pictures are replaced whole, and every numeric flag is
range-checked (tests/bad_inputs/tool_files.py runs the same through the command line)."""
import errno
import io
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import inference.api
import inference.index
import inference.index_files
import video_tool
from inference.aggregation import save_whole
from inference.api import VideoLanguageModel
from inference.index import VideoIndex, read_manifest, update_index
from inference.index_files import HEADER_BYTES, IndexWriter, _npy_header
from runtime.errors import UserError
from tests.inference_toy import make_toy_setup

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_setup(tmp_path_factory.mktemp("tool_files"))


@pytest.fixture(scope="module")
def retrieval(toy):
    return VideoLanguageModel.load(toy.configs["retrieval"], toy.checkpoints["retrieval"], device="cpu",
                                   precision="fp32", overrides=toy.overrides)


@pytest.fixture
def indexed(toy, retrieval, tmp_path):
    """(video folder, index folder with tokens) and a video added since the index was made."""
    videos = tmp_path / "videos"
    shutil.copytree(toy.videos, videos)
    update_index(retrieval, videos, tmp_path / "index", num_workers=0, with_tokens=True)
    shutil.copy(min(videos.glob("*.mp4")), videos / "added.mp4")
    return videos, tmp_path / "index"


def snapshot(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def no_space_left(descriptor, offset, length):
    raise ENOSPC


class FillingFile:
    """A file on a disk that fills after `room` bytes: writes past it fail with ENOSPC."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, data):
        self.room -= len(data) if isinstance(data, str) else memoryview(data).nbytes
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.handle.close()


@pytest.fixture
def counted_decodes(monkeypatch):
    decoded = []
    original_item = inference.api.VideoFiles.item

    def item(self, index, rng=None):
        decoded.append(index)
        return original_item(self, index, rng)

    monkeypatch.setattr(inference.api.VideoFiles, "item", item)
    return decoded


def test_full_disk_fails_before_encoding_and_keeps_the_previous_index(indexed, retrieval, monkeypatch,
                                                                     counted_decodes):
    videos, index = indexed
    before = snapshot(index)
    monkeypatch.setattr(inference.index_files.os, "posix_fallocate", no_space_left)
    with pytest.raises(UserError, match=r"index .* not updated \(the previous index is unchanged\): "
                                        r".*tokens-\w+\.npy: no space left on device"):
        update_index(retrieval, videos, index, num_workers=0, with_tokens=True)
    assert counted_decodes == []  # the tokens file is allocated in full before any video is decoded
    assert snapshot(index) == before  # nothing of the failed run left, the lock released
    assert VideoIndex.open(index).paths  # and the previous index opens


def test_a_new_index_with_tokens_on_a_full_disk_stops_at_the_first_batch(toy, retrieval, tmp_path, monkeypatch,
                                                                        counted_decodes):
    monkeypatch.setattr(inference.index_files.os, "posix_fallocate", no_space_left)
    with pytest.raises(UserError, match=r"not updated \(no index was written\): .*tokens-\w+\.npy: no space"):
        update_index(retrieval, toy.videos, tmp_path / "index", batch_size=2, num_workers=0, with_tokens=True)
    assert len(counted_decodes) == 2
    assert list((tmp_path / "index").iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("full_at", ["tokens-", "embeddings-", ".manifest.json."])
def test_failed_writes_on_a_file_system_without_fallocate_keep_the_previous_index(indexed, retrieval, monkeypatch,
                                                                                  full_at):
    """Where the file system cannot allocate ahead, the write that meets the full disk fails:
    here the first write past a file's header, of the file named `full_at`..."""
    videos, index = indexed
    before = snapshot(index)

    def unsupported(descriptor, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    def filling_open(path, mode="r", *args, **kwargs):
        return FillingFile(open(path, mode, *args, **kwargs), 200 if path.name.startswith(full_at) else 10 ** 9)

    monkeypatch.setattr(inference.index_files.os, "posix_fallocate", unsupported)
    monkeypatch.setattr(inference.index_files, "open", filling_open, raising=False)
    with pytest.raises(UserError, match=rf"not updated \(the previous index is unchanged\): .*/{full_at}\S+: "
                                        r"no space left on device"):
        update_index(retrieval, videos, index, num_workers=0, with_tokens=True)
    assert snapshot(index) == before


@pytest.mark.slow
def test_a_new_index_on_a_full_disk_leaves_an_empty_folder(toy, retrieval, tmp_path, monkeypatch):
    monkeypatch.setattr(inference.index_files.os, "posix_fallocate", no_space_left)
    with pytest.raises(UserError, match=r"not updated \(no index was written\): .*embeddings-\w+\.npy: no space"):
        update_index(retrieval, toy.videos, tmp_path / "index", num_workers=0)
    assert list((tmp_path / "index").iterdir()) == []


def test_run_files_have_names_of_their_own_and_go_with_the_run(tmp_path):
    """Two writers in one folder: the one that stops removes its files only; the commit of the
    other replaces the manifest and removes what killed runs left."""
    stray = [tmp_path / "tokens-0123456789ab.npy", tmp_path / ".manifest.json.0123456789ab.tmp"]
    for path in stray:
        path.write_bytes(b"from a killed run")
    first, second = IndexWriter(tmp_path, expected_rows=2), IndexWriter(tmp_path, expected_rows=2)
    assert first.id != second.id
    tokens = np.ones((2, 3, 4), np.float16)
    with second:
        second.add([{"path": "a.mp4", "size": 1, "mtime_ns": 1}] * 2, np.ones((2, 8)), tokens)
        with pytest.raises(KeyboardInterrupt):
            with first:
                first.add([{"path": "a.mp4", "size": 1, "mtime_ns": 1}] * 2, np.ones((2, 8)), tokens)
                assert (tmp_path / f"tokens-{first.id}.npy").is_file()
                raise KeyboardInterrupt
        assert not any(first.id in path.name for path in tmp_path.iterdir())
        assert (tmp_path / f"tokens-{second.id}.npy").is_file()
        second.commit({"format": 1})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {path.name for path in tmp_path.iterdir()} == {"manifest.json", manifest["embeddings"], manifest["tokens"]}
    np.testing.assert_array_equal(np.load(tmp_path / manifest["tokens"]), tokens)


@pytest.mark.parametrize("written", [1, 3, 12345])  # fewer, as many and more rows than expected (windows)
def test_the_tokens_file_holds_the_rows_written(tmp_path, written):
    tokens = np.arange(written * 12, dtype=np.float16).reshape(written, 3, 4)
    with IndexWriter(tmp_path, expected_rows=3) as writer:
        for start in range(0, written, 1000):
            rows = tokens[start:start + 1000]
            writer.add([{"path": "a.mp4", "size": 1, "mtime_ns": 1}] * len(rows), np.ones((len(rows), 8)), rows)
        writer.commit({"format": 1})
    path = tmp_path / writer.tokens.path.name
    assert path.stat().st_size == HEADER_BYTES + tokens.nbytes  # no allocation left past the rows
    np.testing.assert_array_equal(np.load(path, mmap_mode="r"), tokens)


def test_npy_headers_of_any_row_count_take_the_same_bytes():
    for shape in [(0, 8), (7, 1041, 768), (10**12, 1041, 768)]:
        header = _npy_header(np.dtype(np.float16), shape)
        assert len(header) == HEADER_BYTES and header.endswith(b"\n")
        assert np.lib.format.read_array_header_1_0(io.BytesIO(header[8:]))[0] == shape


def lock_of(index):
    return index / ".lock"


@pytest.mark.slow
def test_the_lock_is_released_on_success_error_and_interruption(indexed, retrieval, toy, monkeypatch):
    videos, index = indexed
    update_index(retrieval, videos, index, num_workers=0, with_tokens=True)
    assert not lock_of(index).exists()
    with pytest.raises(UserError, match="was made with --tokens"):
        update_index(retrieval, videos, index, num_workers=0, with_tokens=False)
    assert not lock_of(index).exists()

    def interrupt(self, done):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference.index.ProgressLine, "update", interrupt)
    (videos / "another.mp4").write_bytes((videos / "added.mp4").read_bytes())
    with pytest.raises(KeyboardInterrupt):
        update_index(retrieval, videos, index, num_workers=0, with_tokens=True)
    assert not lock_of(index).exists()
    assert not any(path.name.endswith(".tmp") for path in index.iterdir())


def test_a_second_writer_stops_and_a_dead_ones_lock_is_taken_over(indexed, retrieval):
    videos, index = indexed
    here = socket.gethostname()
    lock_of(index).write_text(json.dumps({"host": here, "pid": os.getppid(), "started": "then"}))
    before = snapshot(index)
    with pytest.raises(UserError, match=rf"{index} is in use by another run \(host {here}, pid {os.getppid()}"):
        update_index(retrieval, videos, index, num_workers=0, with_tokens=True)
    assert snapshot(index) == before
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_of(index).write_text(json.dumps({"host": here, "pid": int(gone.stdout), "started": "then"}))
    assert update_index(retrieval, videos, index, num_workers=0, with_tokens=True).added == 1
    assert not lock_of(index).exists()


def manifest_of_a_real_index(indexed) -> dict:
    return json.loads((indexed[1] / "manifest.json").read_text())


@pytest.mark.parametrize("damage, problem", [
    (lambda manifest, text: text[: len(text) // 2], r"its manifest\.json is not valid JSON \(.+\)"),
    (lambda manifest, text: b"\x80\x81{", r"its manifest\.json is not valid JSON \(.utf-8. codec can.t decode.+\)"),
    (lambda manifest, text: "[1, 2]", r"its manifest\.json is list, not an object"),
    (lambda manifest, text: {**manifest, "root": None}, r"its manifest\.json has a NoneType as 'root'"),
    (lambda manifest, text: {k: v for k, v in manifest.items() if k != "with_tokens"},
     r"its manifest\.json has no 'with_tokens'"),
    (lambda manifest, text: {**manifest, "checkpoint": {**manifest["checkpoint"], "sha256": 7}},
     r"its manifest\.json 'checkpoint' has a int as 'sha256'"),
    (lambda manifest, text: {**manifest, "unreadable": [{"path": "x.mp4", "size": 1, "mtime_ns": 2}]},
     r"its manifest\.json entry 0 of 'unreadable' has no 'reason'"),
    (lambda manifest, text: {**manifest, "embeddings": "../elsewhere.npy"},
     r"its manifest\.json 'embeddings' \(\.\./elsewhere\.npy\) is not a file name"),
    (lambda manifest, text: {**manifest, "embeddings": "embeddings-gone.npy"},
     r"its embeddings-gone\.npy is missing \(named by manifest\.json\)"),
    (lambda manifest, text: {**manifest, "files": manifest["files"][1:]},
     r"its embeddings-\w+\.npy holds \(8, 256\) values, the manifest needs \(7, 256\)"),
], ids=["truncated", "not_utf8", "not_an_object", "wrong_type", "missing_key", "checkpoint_entry", "file_entry",
        "not_a_file_name", "data_file_missing", "rows_disagree"])
@pytest.mark.slow
def test_a_damaged_index_is_one_line_saying_what_to_do(indexed, damage, problem):
    index = indexed[1]
    text = (index / "manifest.json").read_text()
    damaged = damage(json.loads(text), text)
    damaged = damaged if isinstance(damaged, (str, bytes)) else json.dumps(damaged)
    (index / "manifest.json").write_bytes(damaged.encode() if isinstance(damaged, str) else damaged)
    with pytest.raises(UserError, match=rf"^index {index} is damaged: {problem}; delete the folder and run "
                                        r"video_tool.py index again \(with --config and --checkpoint\)$"):
        VideoIndex.open(index)


def test_damaged_tokens_and_another_format(indexed):
    index = indexed[1]
    manifest = manifest_of_a_real_index(indexed)
    tokens = index / manifest["tokens"]
    tokens.write_bytes(tokens.read_bytes()[:1000])
    with pytest.raises(UserError, match=rf"its {manifest['tokens']} is unreadable \(.+\); delete the folder"):
        VideoIndex.open(index)
    (index / "manifest.json").write_text(json.dumps({**manifest, "format": 2}))
    with pytest.raises(UserError, match=r"holds an index of format 2, not 1; index the videos again"):
        read_manifest(index)
    assert read_manifest(index.parent / "nowhere") is None


def test_every_numeric_flag_is_range_checked():
    """A new int or float flag must get its range in NUMBER_RANGES (and a command its model in COMMAND_TASKS)."""
    commands = next(action for action in video_tool.build_parser()._actions if action.choices)
    numeric = {action.dest for parser in commands.choices.values() for action in parser._actions
               if action.type in (int, float)}
    assert numeric == set(video_tool.NUMBER_RANGES)
    assert set(commands.choices) == set(video_tool.COMMANDS) == set(video_tool.COMMAND_TASKS)


@pytest.mark.parametrize("flag, number, allowed", [("-k", 0, "at least 1"), ("--rerank", -1, "at least 0"),
                                                  ("--scale", 33, "from 1 to 32"),
                                                  ("--seed", 2 ** 64, "from 0 to 18446744073709551615")])
def test_numbers_out_of_range_stop_before_any_work(flag, number, allowed, capsys):
    command = {"-k": "search", "--rerank": "search", "--scale": "show", "--seed": "caption"}[flag]
    argv = {"search": ["search", "q", "--index", "nowhere"], "show": ["show", "v.mp4", "--out", "a.png"],
            "caption": ["caption", "v.mp4", "--sample"]}[command]
    if command != "search":
        argv += ["--config", "nowhere.yaml", "--checkpoint", "nowhere.pth"]
    with pytest.raises(SystemExit) as stopped:
        video_tool.main([*argv, flag, str(number)])
    assert stopped.value.code == 1
    assert capsys.readouterr().err == f"error: {flag} must be {allowed}, got {number}\n"


def test_a_picture_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "agg.png"
    save_whole(Image.new("RGB", (4, 4), (255, 0, 0)), path)
    before = path.read_bytes()

    def half_then_full(self, handle, **options):
        handle.write(b"\x89PNG half")
        raise ENOSPC

    monkeypatch.setattr(Image.Image, "save", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        save_whole(Image.new("RGB", (4, 4)), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["agg.png"]
