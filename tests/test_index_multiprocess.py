"""video_tool.py index on two processes (torchrun, gloo on the CPU): the index equals a single
process's bit for bit, with windows of long files too, and an interrupted run resumes from the
parts it left behind."""
import json
import shutil
import subprocess

import numpy as np
import pytest

import video_tool
from inference.index_processes import EncodingPlan, part_files
from tests.helpers import REPO_ROOT
from tests.inference_toy import make_toy_setup
from tests.launching import environment, run_together, torchrun_nodes

BATCH = 2  # toy folders of a few videos still make several batches, and so several parts


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_setup(tmp_path_factory.mktemp("index_processes"))


def index_args(toy, videos, index, *extra) -> list[str]:
    return [str(arg) for arg in ["index", videos, "--index", index, "--tokens", "--batch_size", BATCH, *extra,
                                 "--config", toy.configs["retrieval"], "--checkpoint", toy.checkpoints["retrieval"],
                                 "--precision", "fp32", "--options", *toy.overrides]]


def on_two_processes(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """video_tool.py on two processes, its output (stdout and stderr) in .stdout, whatever its exit."""
    [command] = torchrun_nodes(["video_tool.py", *args], nnodes=1, nproc_per_node=2)
    return subprocess.run(command, cwd=REPO_ROOT, env=environment(**env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=180)


def contents(index) -> tuple[dict, dict]:
    """The manifest without its data files' names (each run makes its own) and the data files' arrays."""
    manifest = json.loads((index / "manifest.json").read_text())
    return manifest, {key: np.load(index / manifest.pop(key)) for key in ("embeddings", "tokens")}


def assert_same_index(index, expected) -> None:
    manifest, arrays = contents(index)
    expected_manifest, expected_arrays = contents(expected)
    assert manifest == expected_manifest
    for key, array in arrays.items():  # bit for bit
        assert (array.dtype, array.shape) == (expected_arrays[key].dtype, expected_arrays[key].shape), key
        assert array.tobytes() == expected_arrays[key].tobytes(), key


def videos_with_a_broken_one(toy, folder, count: int):
    folder.mkdir()
    for video in sorted(toy.videos.iterdir())[:count]:
        shutil.copy2(video, folder / video.name)
    (folder / "sub").mkdir()
    (folder / "sub" / "broken.mp4").write_bytes(b"\x00garbage" * 64)
    return folder


def test_parts_are_whole_batches_in_the_single_process_order():
    files = [{"path": f"{number}.mp4", "size": 1, "mtime_ns": 1} for number in range(1000)]
    plan = EncodingPlan("/videos", files, 8, False, part_files(len(files), 8), "run", [])
    assert plan.files_per_part % 8 == 0 and plan.num_parts >= 64  # every rank of many gets parts
    assert [entry for number in range(plan.num_parts) for entry in plan.part(number)] == files
    renamed = EncodingPlan("/videos", files, 8, False, plan.files_per_part, "another run", [])
    assert plan.part_name(0) != plan.part_name(1)
    assert plan.part_name(0) != renamed.part_name(0)  # a part is used only by a run of the same model and settings
    assert part_files(1000, 8, windowed=True) == 8 and part_files(100, 8, windowed=True) == 1  # long files: few a part


@pytest.mark.slow
def test_two_processes_make_the_single_process_index(toy, tmp_path, capsys):
    videos = videos_with_a_broken_one(toy, tmp_path / "videos", count=8)
    video_tool.main(index_args(toy, videos, tmp_path / "single"))
    single_summary = capsys.readouterr().out
    output = run_together(torchrun_nodes(["video_tool.py", *index_args(toy, videos, tmp_path / "two")], 1, 2))[0]
    assert_same_index(tmp_path / "two", tmp_path / "single")
    summary = single_summary.replace(str(tmp_path / "single"), str(tmp_path / "two"))
    assert summary in output and output.count(f"index {tmp_path / 'two'}: ") == 1  # rank 0 alone prints it
    assert not (tmp_path / "two" / ".index-parts").exists()


@pytest.mark.slow
def test_two_processes_index_windows_as_one_process_does(toy, tmp_path, capsys):
    """Windows of 1 s every 0.5 s (three of each 2 s toy video), tokens stored; the single process
    decodes in two workers, the two processes in none: a window's batch holds its file alone, so
    the rows are the same bit for bit."""
    videos = videos_with_a_broken_one(toy, tmp_path / "videos", count=5)
    windows = ["--window", 1, "--stride", 0.5]
    video_tool.main(index_args(toy, videos, tmp_path / "single", *windows, "--num_workers", 2))
    assert "5 videos (5 encoded, 0 unchanged, 0 dropped), 1 unreadable; 15 windows\n" in capsys.readouterr().out
    run_together(torchrun_nodes(["video_tool.py", *index_args(toy, videos, tmp_path / "two", *windows)], 1, 2))
    assert_same_index(tmp_path / "two", tmp_path / "single")
    manifest, arrays = contents(tmp_path / "two")
    assert [entry["start"] for entry in manifest["files"][:3]] == [0.0, 0.5, 1.0] and len(arrays["tokens"]) == 15


@pytest.mark.slow
def test_an_interrupted_update_keeps_the_index_and_resumes(toy, tmp_path):
    videos = videos_with_a_broken_one(toy, tmp_path / "videos", count=4)
    video_tool.main(index_args(toy, videos, tmp_path / "before"))
    for video in sorted(toy.videos.iterdir())[4:8]:  # four new videos and the broken one: three parts of two
        shutil.copy2(video, videos / video.name)
    (videos / "sub" / "broken.mp4").rename(videos / "sub" / "broken2.mp4")
    shutil.copytree(tmp_path / "before", tmp_path / "single")
    shutil.copytree(tmp_path / "before", tmp_path / "two")
    video_tool.main(index_args(toy, videos, tmp_path / "single"))
    before = (tmp_path / "two" / "manifest.json").read_bytes()

    stopped = on_two_processes(index_args(toy, videos, tmp_path / "two"), TESTA_STOP_INDEX_AFTER_PART="1:1")
    assert stopped.returncode != 0 and "failure injection (rank 1)" in stopped.stdout, stopped.stdout
    assert (tmp_path / "two" / "manifest.json").read_bytes() == before  # the committed index is untouched
    assert_same_index(tmp_path / "two", tmp_path / "before")
    assert any((tmp_path / "two" / ".index-parts").glob("part-*.npz"))

    resumed = on_two_processes(index_args(toy, videos, tmp_path / "two"))
    assert resumed.returncode == 0, resumed.stdout
    assert "index: resuming: " in resumed.stdout
    assert_same_index(tmp_path / "two", tmp_path / "single")
    assert not (tmp_path / "two" / ".index-parts").exists()
