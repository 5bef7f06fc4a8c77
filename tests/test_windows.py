"""Moments in long videos (inference/windows.py): windows encoded as the same span cut out as a
file, their time ranges through index, search and the report, a resumed interrupted run,
one decode per file, and the --start/--end errors.

The long video joins known clips written losslessly (x264 at qp 0), so a window that covers
clip k decodes to exactly clip k's frames: what differs is only float arithmetic in another batch.
"""
import json
import os
import random
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

import video_tool
from data.toy import FPS, random_events, render_event
from inference.api import VideoLanguageModel
from inference.index import VideoIndex
from inference.windows import Windowing, WindowItem, _InFileOrder, frame_spans, iter_encoded_windows
from tests.helpers import REPO_ROOT
from tests.inference_toy import fail, make_toy_setup, model_args, run

CLIPS = 5
CLIP_FRAMES = 16  # 2 s at the toy's 8 frames/s: windows of 2 s every 1 s put one window on each clip
CLIP_SECONDS = CLIP_FRAMES / FPS
WINDOWS = Windowing(window=CLIP_SECONDS, stride=CLIP_SECONDS / 2)
# Equal frames through one fp32 encoder: only the order of float sums differs between batches
# (about 1e-7 relative), so a cosine below this is another clip (neighbouring windows share half
# their frames and stay below 0.9999 on these models).
SAME_CLIP_COSINE = 0.99999


def write_lossless(path, frames):
    """An mp4 whose decoded frames are its input's, as x264 at qp 0 keeps them."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"preset": "ultrafast", "qp": "0"}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_setup(tmp_path_factory.mktemp("windows"), num_clips=2)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """clips/clip{k}.mp4 and long/long.mp4, the clips one after the other."""
    folder = tmp_path_factory.mktemp("long_videos")
    rng = random.Random(7)
    clips = []
    for _ in range(CLIPS):
        first, second = random_events(rng)
        clips.append(np.concatenate([render_event(first, CLIP_FRAMES // 2, 64),
                                     render_event(second, CLIP_FRAMES // 2, 64)]))
    (folder / "clips").mkdir()
    (folder / "long").mkdir()
    for number, frames in enumerate(clips):
        write_lossless(folder / "clips" / f"clip{number}.mp4", frames)
    write_lossless(folder / "long" / "long.mp4", np.concatenate(clips))
    return folder


@pytest.fixture(scope="module")
def model(toy):
    return VideoLanguageModel.load(toy.configs["retrieval"], toy.checkpoints["retrieval"], device="cpu",
                                   precision="fp32", overrides=toy.overrides)


def clip_embeddings(model, videos) -> torch.Tensor:
    return model.encode_videos(sorted((videos / "clips").glob("*.mp4")), num_workers=0).embeddings





def test_window_spans_cover_the_file_with_equal_windows():
    assert frame_spans(80, 8.0, WINDOWS) == [(first, first + 16) for first in range(0, 65, 8)]
    assert frame_spans(84, 8.0, WINDOWS)[-1] == (68, 84)  # the tail: a last window ending at the end
    assert frame_spans(16, 8.0, WINDOWS) == [(0, 16)]  # no longer than a window: the whole file
    assert frame_spans(10, 8.0, WINDOWS) == [(0, 10)]


def test_files_are_handed_on_whole_and_in_order():
    """Workers finish files out of order: rows wait for the files before them, a failed file drops its windows."""
    order = _InFileOrder(embed_dim=2)

    def window(file, count, reason=None):
        return WindowItem(None, file, count, None if reason else (0.0, 1.0), reason)

    rows = torch.eye(2)
    assert order.add([window(1, 1)], rows[:1], None).indices == []  # file 1 is done, file 0 is not
    assert order.add([window(0, 2), window(0, 2)], rows, None).indices == [0, 0, 1]
    assert order.add([window(2, 3)], rows[:1], None).indices == []
    batch = order.add([window(2, 0, "broken after one window"), window(3, 1)], rows[:1], None)
    assert batch.failed == {2: "broken after one window"} and batch.indices == [3] and len(batch.embeddings) == 1


def test_a_window_is_encoded_as_its_span_cut_out_as_a_file(model, videos):
    """Each window that covers a clip: the clip file's embedding, its frames bit for bit (show --start --end)."""
    batches = list(iter_encoded_windows(model, [videos / "long" / "long.mp4"], WINDOWS, batch_size=3, num_workers=0))
    spans = [span for batch in batches for span in batch.spans]
    embeddings = torch.cat([batch.embeddings for batch in batches])
    assert spans == [(n * CLIP_SECONDS / 2, n * CLIP_SECONDS / 2 + CLIP_SECONDS) for n in range(2 * CLIPS - 1)]
    clips = clip_embeddings(model, videos)
    for number in range(CLIPS):
        assert float(embeddings[2 * number] @ clips[number]) > SAME_CLIP_COSINE
        if number + 1 < CLIPS:
            assert float(embeddings[2 * number + 1] @ clips[number]) < SAME_CLIP_COSINE  # half of the next clip
    span = (2 * CLIP_SECONDS, 3 * CLIP_SECONDS)
    assert np.array_equal(model.load_clip(videos / "long" / "long.mp4", span).frames,
                          model.load_clip(videos / "clips" / "clip2.mp4").frames)


def test_a_file_no_longer_than_a_window_is_its_whole_file_embedding(model, videos):
    clip = videos / "clips" / "clip1.mp4"
    (batch,) = iter_encoded_windows(model, [clip], WINDOWS, num_workers=0)
    assert batch.spans == [(0.0, CLIP_SECONDS)]
    assert float(batch.embeddings[0] @ clip_embeddings(model, videos)[1]) > SAME_CLIP_COSINE


@pytest.fixture
def query_is_clip(monkeypatch, model, videos):
    """Search for clip k by its own embedding: a random-weight model has learnt no captions, so the
    query a perfect text encoder would give for clip k's caption stands in for it."""
    clips = clip_embeddings(model, videos)
    monkeypatch.setattr(VideoLanguageModel, "encode_texts", lambda self, texts: clips[[int(texts[0][-1])]])


@pytest.mark.slow
def test_search_gives_each_clip_its_time_range(toy, videos, tmp_path, capsys, query_is_clip):
    index, folder = tmp_path / "index", tmp_path / "videos"
    shutil.copytree(videos / "long", folder)
    shutil.copy(videos / "clips" / "clip0.mp4", folder / "short.mp4")
    out = run(["index", folder, "--index", index, "--window", CLIP_SECONDS, "--num_workers", "0", *model_args(toy)],
              capsys)
    assert out.endswith(f"2 videos (2 encoded, 0 unchanged, 0 dropped), 0 unreadable; {2 * CLIPS} windows\n")
    for number in range(CLIPS):
        hits = json.loads(run(["search", "--index", index, f"clip {number}", "-k", "2", "--rerank", "0", "--json"],
                              capsys))["hits"]
        moment = next(hit for hit in hits if hit["path"].endswith("long.mp4"))
        stride = WINDOWS.stride
        assert abs(moment["start"] - number * CLIP_SECONDS) < stride, (number, moment)
        assert abs(moment["end"] - (number + 1) * CLIP_SECONDS) < stride, (number, moment)
    table = run(["search", "--index", index, "clip 3", "-k", "1", "--rerank", "1"], capsys).splitlines()
    assert table[0].split() == ["rank", "score", "itc", "start", "end", "path"]
    assert table[1].split()[3:5] == ["6.00", "8.00"]
    report = tmp_path / "report"
    run(["search", "--index", index, "clip 0", "-k", "2", "--report", report], capsys)
    page = (report / "index.html").read_text()
    assert "long.mp4 (0.00 s to 2.00 s)" in page and "short.mp4 (0.00 s to 2.00 s)" in page


@pytest.mark.slow
def test_an_interrupted_long_index_resumes(toy, videos, tmp_path, capsys):
    """Interrupted after its third batch (TESTA_INTERRUPT_AFTER_BATCH, runtime/fault_injection.py), when
    b.mp4's nine windows are encoded (batches of 4, 4 and 1), the run leaves the index as it was and
    keeps b.mp4's part; the next run keeps the index's rows and that part, and encodes c.mp4."""
    folder, index = tmp_path / "videos", tmp_path / "index"
    folder.mkdir()
    shutil.copy(videos / "long" / "long.mp4", folder / "a.mp4")
    run(["index", folder, "--index", index, "--window", CLIP_SECONDS, "--num_workers", "0", *model_args(toy)],
        capsys)
    before = (index / "manifest.json").read_text()
    for name in ("b.mp4", "c.mp4"):
        shutil.copy(videos / "long" / "long.mp4", folder / name)
    command = [sys.executable, str(REPO_ROOT / "video_tool.py"), "index", str(folder), "--index", str(index),
               "--num_workers", "1", "--batch_size", "4"]
    env = {**os.environ, "TESTA_INTERRUPT_AFTER_BATCH": "3", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 130, result.stdout + result.stderr
    assert (index / "manifest.json").read_text() == before
    video_tool.main([str(arg) for arg in ["index", folder, "--index", index, "--num_workers", "0",
                                          "--batch_size", "4"]])
    out, err = capsys.readouterr()
    assert "index: resuming: 1 of 2 videos were encoded by an interrupted run" in err
    assert f"3 videos (2 encoded, 1 unchanged, 0 dropped), 0 unreadable; {3 * (2 * CLIPS - 1)} windows" in out
    resumed = VideoIndex.open(index)
    rows = {name: [row for row, entry in enumerate(resumed.files) if entry["path"] == name]
            for name in ("a.mp4", "b.mp4", "c.mp4")}
    spans = {name: [resumed.span_of(row) for row in numbers] for name, numbers in rows.items()}
    assert spans["a.mp4"] == spans["b.mp4"] == spans["c.mp4"] and len(spans["a.mp4"]) == 2 * CLIPS - 1
    for name in ("b.mp4", "c.mp4"):  # the same file encoded by another run: the same rows
        assert np.allclose(resumed.embeddings[rows[name]], resumed.embeddings[rows["a.mp4"]], atol=1e-5)


@pytest.mark.slow
def test_windows_with_stored_tokens_caption_a_moment_without_decoding(toy, videos, tmp_path, capsys):
    """--tokens with --window: a token row per window, kept by an update that adds a file, and
    `caption --start --end` of a window reads its row (a pre-training checkpoint indexes for
    zero-shot search and captions with one encoder)."""
    index, folder = tmp_path / "index", tmp_path / "videos"
    shutil.copytree(videos / "long", folder)
    out = run(["index", folder, "--index", index, "--window", CLIP_SECONDS, "--tokens", "--num_workers", "0",
               *model_args(toy, "pretrain")], capsys)
    assert out.endswith(f"; {2 * CLIPS - 1} windows\n")
    stored = VideoIndex.open(index)
    assert stored.tokens.shape[0] == len(stored.files) == 2 * CLIPS - 1
    long_tokens = np.array(stored.tokens)
    shutil.copy(videos / "clips" / "clip0.mp4", folder / "short.mp4")
    out = run(["index", folder, "--index", index, "--tokens", "--num_workers", "0"], capsys)
    assert f"2 videos (1 encoded, 1 unchanged, 0 dropped), 0 unreadable; {2 * CLIPS} windows" in out
    stored = VideoIndex.open(index)
    rows = [row for row, entry in enumerate(stored.files) if entry["path"] == "long.mp4"]
    assert stored.tokens.shape[0] == len(stored.files) == 2 * CLIPS and np.array_equal(stored.tokens[rows], long_tokens)
    caption = ["caption", folder / "long.mp4", "--start", 2 * CLIP_SECONDS, "--end", 3 * CLIP_SECONDS,
               *model_args(toy, "pretrain")]
    from_file = run(caption, capsys)
    video_tool.main([str(arg) for arg in [*caption, "--index", index]])
    captured = capsys.readouterr()
    assert captured.out == from_file and f"video tokens: from index {index}" in captured.err
    video_tool.main([str(arg) for arg in [*caption[:2], "--start", CLIP_SECONDS / 4, *caption[4:], "--index", index]])
    assert "does not hold" in capsys.readouterr().err  # not a window's span: the file is decoded


def window_count(model, videos, windows: Windowing) -> int:
    batches = iter_encoded_windows(model, [videos / "long" / "long.mp4"], windows, num_workers=0)
    return sum(len(batch.spans) for batch in batches)


def test_a_long_file_is_opened_once_and_decoded_front_to_back(model, videos, monkeypatch):
    decord = pytest.importorskip("decord")  # x86-64 wheels only (requirements.txt)
    opens, asked = [], []

    class CountedReader(decord.VideoReader):
        """decord's reader, counting opens and the frames asked of it."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opens.append(args)

        def get_batch(self, indices):
            asked.append(list(indices))
            return super().get_batch(indices)

    monkeypatch.setenv("TESTA_VIDEO_READER", "decord")
    monkeypatch.setattr(decord, "VideoReader", CountedReader)
    monkeypatch.setattr("inference.windows.DECODE_CHUNK", 8)  # several reader calls for this short video
    windows = Windowing(window=1.0, stride=0.25)  # 37 windows of 8 of the 80 frames, overlapping by 6
    assert window_count(model, videos, windows) == 37 and len(opens) == 1
    frames = [index for indices in asked for index in indices]
    assert frames == sorted(set(frames)) and len(asked) > 1  # ascending, each frame once


def test_pyav_reads_a_long_file_in_one_pass(model, videos, monkeypatch):
    opened, seeks = [], []
    real_open = av.open

    class Counted:
        def __init__(self, container):
            self.container = container

        def __getattr__(self, name):
            return getattr(self.container, name)

        def seek(self, *args, **kwargs):
            seeks.append(args)
            return self.container.seek(*args, **kwargs)

    monkeypatch.setenv("TESTA_VIDEO_READER", "pyav")
    monkeypatch.setattr(av, "open", lambda *args, **kwargs: opened.append(args) or Counted(real_open(*args, **kwargs)))
    assert window_count(model, videos, WINDOWS) == 2 * CLIPS - 1 and len(opened) == 1 and not seeks


@pytest.mark.parametrize("flags, message", [
    (["--start", "4", "--end", "4"], "error: --end 4 must be after --start 4"),
    (["--start", "-1"], "error: --start must be at least 0, got -1.0"),
    (["--window", "0"], "error: --window must be at least 0.1, got 0.0")])
def test_bad_ranges_stop_before_a_model_is_loaded(flags, message, capsys):
    command = ["index", "videos", "--index", "nowhere"] if "--window" in flags else [
        "show", "v.mp4", "--out", "a.png", "--config", "nowhere.yaml", "--checkpoint", "nowhere.pth"]
    assert fail([*command, *flags], capsys) == message + "\n"


def test_a_range_beyond_the_video_is_one_line(toy, videos, tmp_path, capsys):
    long = videos / "long" / "long.mp4"
    argv = ["show", long, "--out", tmp_path / "a.png", *model_args(toy)]
    assert fail([*argv, "--start", "9", "--end", "11"], capsys) == (
        f"error: --end 11 is beyond the end of {long} ({CLIPS * CLIP_SECONDS:.2f} s)\n")
    assert fail([*argv, "--start", "10.5"], capsys) == (
        f"error: --start 10.5 is not before the end of {long} ({CLIPS * CLIP_SECONDS:.2f} s)\n")
