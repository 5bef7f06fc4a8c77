"""The video readers: the same frames from each, the fallback order, the reader switch, and
the reader benchmark at a tiny size."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from data import video
from data.toy import write_mp4
from data.transforms import AUGMENT_OPS
from data.video import READER_VARIABLE, VideoReadError, read_video, reader_names, sample_frame_indices
from runtime.errors import DataError
from tests.helpers import REPO_ROOT

READERS = reader_names()  # the readers installed here
NUM_FRAMES, HEIGHT, WIDTH = 30, 48, 64
LEVEL_STEP = 8  # frame t is a flat grey of level LEVEL_STEP * t


@pytest.fixture(scope="module")
def numbered_clip(tmp_path_factory):
    """Frame t a flat grey of level 8 * t: a decoded frame tells its index, whatever the scaler."""
    levels = (np.arange(NUM_FRAMES) * LEVEL_STEP).astype(np.uint8)
    path = tmp_path_factory.mktemp("numbered") / "numbered.mp4"
    write_mp4(path, np.broadcast_to(levels[:, None, None, None], (NUM_FRAMES, HEIGHT, WIDTH, 3)).copy())
    return path


@pytest.fixture(scope="module")
def textured_clip(tmp_path_factory):
    """Random 4x4-pixel blocks: any difference between the readers' pixels shows."""
    blocks = np.random.default_rng(0).integers(0, 256, (NUM_FRAMES, HEIGHT // 4, WIDTH // 4, 3), dtype=np.uint8)
    frames = blocks.repeat(4, axis=1).repeat(4, axis=2)
    path = tmp_path_factory.mktemp("textured") / "textured.mp4"
    write_mp4(path, frames)
    return path


def frame_numbers(clip):
    return [round(frame.float().mean().item() / LEVEL_STEP) for frame in clip]


@pytest.mark.parametrize("strategy", ["rand", "headtail", "uniform_spread", "nlvl_rand"])
@pytest.mark.parametrize("size", [None, 32])
def test_every_reader_returns_the_sampled_frames(numbered_clip, strategy, size):
    expected = sample_frame_indices(NUM_FRAMES, 8, strategy, random.Random(3))
    for reader in READERS:
        clip = read_video(numbered_clip, 8, strategy, size, random.Random(3), backend=reader)
        assert clip.dtype == torch.uint8 and clip.shape == (8, 3, size or HEIGHT, size or WIDTH)
        assert frame_numbers(clip) == expected, reader


def test_readers_agree_on_pixels(textured_clip):
    """Full size: the same pixels from every reader. Resized: torchcodec and PyAV share
    read_video's scaler; decord resizes in its decoder (the original's pixels), which differs
    by a few levels on average (printed with -s)."""
    full = {reader: read_video(textured_clip, 6, "uniform_spread", None, backend=reader) for reader in READERS}
    resized = {reader: read_video(textured_clip, 6, "uniform_spread", 32, backend=reader) for reader in READERS}
    for reader in READERS:
        assert torch.equal(full[reader], full[READERS[0]]), reader
        if reader not in video.RESIZES_IN_DECODER:
            assert torch.equal(resized[reader], resized["pyav"]), reader
    if "decord" in READERS:
        difference = (resized["decord"].float() - resized["pyav"].float()).abs()
        print(f"decord's resize vs read_video's: max {difference.max():.0f}, mean {difference.mean():.2f} levels")
        assert difference.mean() < 10  # 2-3 levels on the benchmark clips; sharp 4x4 blocks are a worst case


def test_encoded_bytes_read_like_the_file(numbered_clip):
    data = numbered_clip.read_bytes()
    for reader in READERS:
        from_bytes = read_video(data, 4, "uniform_spread", None, backend=reader, name="numbered")
        assert torch.equal(from_bytes, read_video(numbered_clip, 4, "uniform_spread", None, backend=reader))


def test_a_rejected_file_goes_to_the_next_reader(numbered_clip, monkeypatch):
    first, *rest = reader_names()

    def reject(*args):
        raise RuntimeError("rejected for the test")
    monkeypatch.setitem(video.READERS, first, reject)
    clip = read_video(numbered_clip, 4, "uniform_spread", None)
    assert frame_numbers(clip) == sample_frame_indices(NUM_FRAMES, 4, "uniform_spread")
    for reader in rest:
        monkeypatch.setitem(video.READERS, reader, reject)
    with pytest.raises(VideoReadError, match="rejected for the test") as caught:
        read_video(numbered_clip, 4, "uniform_spread", None)
    assert all(f"{reader}: RuntimeError" in str(caught.value) for reader in READERS)


def test_a_truncated_file_is_rejected_by_every_reader(tmp_path):
    path = tmp_path / "truncated.mp4"
    write_mp4(path, np.random.default_rng(1).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), faststart=True)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    for reader in READERS:
        with pytest.raises(VideoReadError, match=str(path)):
            read_video(path, 4, "uniform", None, backend=reader)


def test_reader_order_and_the_reader_switch(monkeypatch):
    monkeypatch.delenv(READER_VARIABLE, raising=False)
    assert reader_names() == [name for name in video.READ_ORDER if name in READERS]
    assert "decord" not in READERS or reader_names()[0] == "decord"  # the original's reader, where installed
    monkeypatch.setenv(READER_VARIABLE, "pyav")
    assert reader_names() == ["pyav"]
    assert reader_names("decord") == ["decord"]  # the argument wins over the variable
    monkeypatch.setenv(READER_VARIABLE, "opencv")
    with pytest.raises(DataError, match="unknown video reader 'opencv'"):
        reader_names()


@pytest.mark.slow
def test_reader_benchmark_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "readers.json"
    command = [sys.executable, "-m", "benchmarks.bench_readers", "--out", str(out), "--clips", "1", "--seconds", "2",
               "--width", "96", "--height", "64", "--frames", "4", "--runs", "1", "--batch_size", "2"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| clips | reader |" in result.stdout
    payload = json.loads(out.read_text())
    assert {(row["clips"], row["reader"].split()[0], row["resize"]) for row in payload["readers"]} == {
        (clips, reader, resize) for clips in ("compressed", "raw") for reader in READERS
        for resize in ("at size", "then resize")}
    assert all(ms["wall_ms"] > 0 for ms in payload["stages_ms"].values())
    assert set(payload["ops_ms"]) == set(AUGMENT_OPS)


@pytest.fixture(scope="module")
def files_readers_disagree_on(tmp_path_factory):
    """A clip with a display-matrix rotation (decord applies it, PyAV does not) and a 10-bit clip
    (the readers' conversions to 8 bits differ slightly), both 96x64."""
    import imageio_ffmpeg
    folder = tmp_path_factory.mktemp("disagree")
    ffmpeg = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error"]
    source = ["-f", "lavfi", "-i", "testsrc=size=96x64:rate=10", "-t", "2", "-c:v", "libx264"]
    subprocess.run(ffmpeg + source + ["-pix_fmt", "yuv420p10le", str(folder / "ten_bit.mp4")], check=True)
    subprocess.run(ffmpeg + source + ["-pix_fmt", "yuv420p", str(folder / "plain.mp4")], check=True)
    subprocess.run(ffmpeg + ["-display_rotation", "90", "-i", str(folder / "plain.mp4"), "-c", "copy",
                             str(folder / "rotated.mp4")], check=True)
    return folder


@pytest.mark.skipif("decord" not in READERS or "pyav" not in READERS, reason="needs decord and PyAV")
def test_training_and_evaluation_read_files_the_readers_disagree_on_alike(files_readers_disagree_on):
    """Readers disagree on some files; every clip, training or evaluation, goes to the same reader
    first, so a file is read one way in both (the reader order is the only one)."""
    from data.datasets import create_dataset
    rotated, ten_bit = files_readers_disagree_on / "rotated.mp4", files_readers_disagree_on / "ten_bit.mp4"
    assert read_video(rotated, 4, "uniform", None, backend="decord").shape[-2:] == (96, 64)  # turned upright
    assert read_video(rotated, 4, "uniform", None, backend="pyav").shape[-2:] == (64, 96)
    assert not torch.equal(read_video(ten_bit, 4, "uniform", None, backend="decord"),
                           read_video(ten_bit, 4, "uniform", None, backend="pyav"))
    ann = files_readers_disagree_on / "ann"
    ann.mkdir()
    (ann / "train.jsonl").write_text("".join(json.dumps({"clip_name": name, "caption": "a test pattern"}) + "\n"
                                             for name in ("rotated", "ten_bit")))
    (ann / "test.jsonl").write_text((ann / "train.jsonl").read_text())
    config = {"video_root": str(files_readers_disagree_on), "ann_root": str(ann), "image_size": 32,
              "num_frm_train": 4, "num_frm_test": 4, "max_words": 30}
    train, test = (create_dataset("retrieval_didemo", config, split) for split in ("train", "test"))
    for index in range(2):
        assert torch.equal(train[index][0], test[index][0])
