"""video_tool.py: every subcommand on a toy corpus, incremental indexing and its errors, what goes
to stdout (results) and stderr (everything else), Ctrl-C, missing paths and the report folder."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import inference.api
import inference.index
import video_tool
from configs.load import load_config
from inference.index import VIDEO_SUFFIXES, VideoIndex
from tests.helpers import REPO_ROOT
from tests.inference_toy import fail, make_toy_setup, model_args, run


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_setup(tmp_path_factory.mktemp("video_tool"))





@pytest.fixture
def counted_decodes(monkeypatch):
    """The videos decoded (in this process: --num_workers 0), by name."""
    decoded = []
    original = inference.api.VideoFiles.item

    def item(self, index, rng=None):
        decoded.append(self.paths[index].rsplit("/", 1)[-1])
        return original(self, index, rng)

    monkeypatch.setattr(inference.api.VideoFiles, "item", item)
    return decoded


@pytest.fixture
def folder(toy, tmp_path):
    """A copy of the toy videos with a broken one, in a nested folder with an upper-case suffix."""
    videos = tmp_path / "videos"
    shutil.copytree(toy.videos, videos)
    (videos / "sub").mkdir()
    (videos / "sub" / "broken.MP4").write_bytes(b"\x00garbage" * 64)
    return videos


def write_container(path, codec: str, fps: int) -> None:
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for value in range(0, 160, 10):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), value, np.uint8))))
        container.mux(stream.encode())


def test_flash_mpeg_and_m4v_files_are_indexed(toy, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name, codec, fps in [("a.flv", "flv1", 8), ("b.MPG", "mpeg1video", 25), ("c.m4v", "mpeg4", 8)]:
        write_container(videos / name, codec, fps)
    out = run(["index", videos, "--index", tmp_path / "index", "--num_workers", "0", *model_args(toy)], capsys)
    assert "3 videos (3 encoded, 0 unchanged, 0 dropped), 0 unreadable" in out


def test_incremental_index(toy, folder, tmp_path, capsys, counted_decodes):
    index = tmp_path / "index"
    out = run(["index", folder, "--index", index, "--num_workers", "0", *model_args(toy, "retrieval")], capsys)
    total = len(list(toy.videos.glob("*.mp4")))
    assert f"{total} videos ({total} encoded, 0 unchanged, 0 dropped), 1 unreadable" in out
    assert "unreadable: sub/broken.MP4: cannot decode video" in out
    manifest = json.loads((index / "manifest.json").read_text())
    assert [entry["path"] for entry in manifest["unreadable"]] == ["sub/broken.MP4"]
    assert manifest["num_frames"] == 8 and len(manifest["checkpoint"]["sha256"]) == 64

    deleted, changed = sorted(folder.glob("*.mp4"))[:2]
    deleted.unlink()
    changed.write_bytes(changed.read_bytes() + b"\x00")  # a new size: re-encoded
    shutil.copy(changed, folder / "sub" / "new.webm")
    counted_decodes.clear()
    out = run(["index", folder, "--index", index, "--num_workers", "0"], capsys)  # model from the manifest
    assert sorted(counted_decodes) == sorted([changed.name, "new.webm"])  # the broken one is not retried
    assert f"{total} videos (2 encoded, {total - 2} unchanged, 1 dropped), 1 unreadable" in out
    manifest = json.loads((index / "manifest.json").read_text())
    assert deleted.name not in {entry["path"] for entry in manifest["files"]}
    assert sorted(path.name for path in index.iterdir()) == sorted(["manifest.json", manifest["embeddings"]])


def test_interrupted_update_leaves_the_previous_index(toy, folder, tmp_path, capsys, monkeypatch):
    index = tmp_path / "index"
    run(["index", folder, "--index", index, "--tokens", "--num_workers", "0", *model_args(toy, "retrieval")], capsys)
    before = (index / "manifest.json").read_text()
    shutil.copy(min(folder.glob("*.mp4")), folder / "added.mp4")

    def interrupt(self, count):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference.index.ProgressLine, "update", interrupt)
    with pytest.raises(SystemExit) as stopped:  # run_cli: Ctrl-C is one line and status 130
        video_tool.main(["index", str(folder), "--index", str(index), "--tokens", "--num_workers", "0"])
    assert stopped.value.code == 130
    assert (index / "manifest.json").read_text() == before
    monkeypatch.undo()
    assert "rank" in run(["search", "--index", index, "a red circle moves left", "-k", "2"], capsys)
    previous = json.loads(before)  # the interrupted run removed its data files, released the lock, kept its part
    assert {path.name for path in index.iterdir()} == {"manifest.json", previous["embeddings"], previous["tokens"],
                                                       ".index-parts"}
    assert len(list((index / ".index-parts").glob("part-*.npz"))) == 1
    out = run(["index", folder, "--index", index, "--tokens", "--num_workers", "0"], capsys)
    assert "(1 encoded" in out
    manifest = json.loads((index / "manifest.json").read_text())
    assert {path.name for path in index.iterdir()} == {"manifest.json", manifest["embeddings"], manifest["tokens"]}


@pytest.mark.slow
def test_search_table_json_and_report(toy, folder, tmp_path, capsys):
    index = tmp_path / "index"
    run(["index", folder, "--index", index, "--num_workers", "0", *model_args(toy, "retrieval")], capsys)
    table = run(["search", "--index", index, "a red circle moves left", "-k", "3", "--rerank", "2"], capsys)
    lines = table.splitlines()
    assert lines[0].split() == ["rank", "score", "itc", "path"] and len(lines) == 4
    assert lines[3].split()[1] == "-"  # beyond --rerank: ITC only

    report = tmp_path / "report"
    command = [sys.executable, str(REPO_ROOT / "video_tool.py"), "search", "--index", str(index),
               "a red circle moves left", "-k", "2", "--json", "--report", str(report)]
    # From another working folder: the manifest's config names med_config relative to the repository.
    result = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)  # stdout holds the JSON alone; the report's path goes to stderr
    assert [hit["rank"] for hit in payload["hits"]] == [1, 2]
    assert payload["hits"][0]["score"] >= payload["hits"][1]["score"]
    assert (report / "index.html").is_file()
    assert f"report: {report / 'index.html'}" in result.stderr.splitlines()


def test_mismatched_index_is_one_clear_error(toy, tmp_path, capsys):
    index = tmp_path / "index"
    run(["index", toy.videos, "--index", index, "--num_workers", "0", *model_args(toy, "retrieval")], capsys)
    other = ["--config", toy.configs["retrieval"], "--checkpoint", toy.checkpoints["retrieval_other"],
             "--precision", "fp32", "--options", *toy.overrides]  # 'auto' would say its choice on stderr first
    assert "was made with another checkpoint" in fail(["search", "--index", index, "query", *other], capsys)
    frames = [*model_args(toy, "retrieval"), "num_frm_test=4"]
    error = fail(["search", "--index", index, "query", *frames], capsys)
    assert "other settings: num_frm_test 8 (index) vs 4" in error
    assert "another checkpoint" in fail(["index", toy.videos, "--index", index, *other], capsys)


def test_ask_caption_show(toy, tmp_path, capsys):
    video = min(toy.videos.glob("*.mp4"))
    answers = tmp_path / "answers.txt"
    answers.write_text("red\nblue\ngreen\n")
    assert run(["ask", video, "what color is the first shape?", "--answers", answers, *model_args(toy, "qa")],
               capsys).strip() in {"red", "blue", "green"}
    assert run(["ask", video, "what color is the first shape?", *model_args(toy, "qa")], capsys).strip()
    sampled = ["caption", video, "--sample", "--seed", "1", *model_args(toy, "pretrain")]
    assert run(sampled, capsys) == run(sampled, capsys)
    assert "caption needs a pre-training checkpoint" in fail(["caption", video, *model_args(toy, "qa")], capsys)
    out = run(["show", video, "--out", tmp_path / "show.png", *model_args(toy, "retrieval")], capsys)
    assert (tmp_path / "show.png").is_file() and str(tmp_path / "show.png") in out


def test_results_go_to_stdout_and_everything_else_to_stderr(toy, folder, tmp_path, capsys):
    index = tmp_path / "index"
    video_tool.main([str(arg) for arg in ["index", folder, "--index", index, "--num_workers", "0",
                                          *model_args(toy, "retrieval")]])
    captured = capsys.readouterr()
    assert [line.split()[0] for line in captured.out.splitlines()] == ["index", "unreadable:"]
    assert "index: " in captured.err  # the progress line
    video_tool.main([str(arg) for arg in ["search", "--index", index, "a red circle", "-k", "2", "--rerank", "1",
                                          "--json"]])
    captured = capsys.readouterr()
    assert [hit["rank"] for hit in json.loads(captured.out)["hits"]] == [1, 2]


def test_report_folder_is_replaced_only_when_it_holds_a_report(toy, tmp_path, capsys, monkeypatch):
    index = tmp_path / "index"
    run(["index", toy.videos, "--index", index, "--num_workers", "0", *model_args(toy, "retrieval")], capsys)
    report = tmp_path / "report"
    for query in ("a red circle", "a blue square"):  # the second run replaces the first one's report
        video_tool.main(["search", "--index", str(index), query, "-k", "2", "--rerank", "0", "--report", str(report)])
        assert capsys.readouterr().err.splitlines()[-1] == f"report: {report / 'index.html'}"
        assert f"Search: {query}" in (report / "index.html").read_text()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index", "report"]

    def no_model(*args, **kwargs):
        raise AssertionError("the folder is checked before a model is loaded")

    monkeypatch.setattr(video_tool, "load_model", no_model)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    error = fail(["search", "--index", index, "a red circle", "--report", notes], capsys)
    assert error == (f"error: {notes} exists and is not a search report written by this tool (it holds keep.txt); "
                     "choose another folder, or empty this one (a report replaces its folder whole)\n")
    (report / "keep.txt").write_text("mine")  # a report with a file of the user's: replacing it would lose it
    assert "it holds a search report and other files: keep.txt" in fail(
        ["search", "--index", index, "a red circle", "--report", report], capsys)
    assert (notes / "keep.txt").read_text() == "mine" and (report / "keep.txt").read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index", "notes", "report"]


def test_an_empty_folder_is_indexed_with_one_warning(toy, folder, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no video here")
    index = tmp_path / "empty_index"
    video_tool.main([str(arg) for arg in ["index", empty, "--index", index, "--num_workers", "0",
                                          *model_args(toy, "retrieval")]])  # returns: exit status 0
    captured = capsys.readouterr()
    assert captured.out == f"index {index}: 0 videos (0 encoded, 0 unchanged, 0 dropped), 0 unreadable\n"
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: no videos in {empty} (looked for {', '.join(VIDEO_SUFFIXES)} files, in any "
                        f"case, in it and its subfolders); the index {index} holds none"]
    assert VideoIndex.open(index).embeddings.shape == (0, 256)

    # A folder whose videos are all gone: its index is emptied, stays consistent and searchable.
    index = tmp_path / "index"
    run(["index", folder, "--index", index, "--num_workers", "0", *model_args(toy, "retrieval")], capsys)
    for path in [*folder.rglob("*.mp4"), *folder.rglob("*.MP4")]:
        path.unlink()
    video_tool.main(["index", str(folder), "--index", str(index), "--num_workers", "0"])
    captured = capsys.readouterr()
    total = len(list(toy.videos.glob("*.mp4")))
    assert f"0 videos (0 encoded, 0 unchanged, {total + 1} dropped), 0 unreadable" in captured.out
    assert sum(line.startswith("warning: no videos in") for line in captured.err.splitlines()) == 1
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["files"] == [] and manifest["unreadable"] == []
    assert sorted(path.name for path in index.iterdir()) == sorted(["manifest.json", manifest["embeddings"]])
    assert run(["search", "--index", index, "a red circle"], capsys).splitlines() == [
        f"{'rank':>4}  {'score':>8}  {'itc':>7}  path"]


@pytest.mark.parametrize("command", ["ask", "caption", "show", "index"])
def test_a_missing_path_is_file_not_found_before_any_model_is_loaded(toy, tmp_path, capsys, monkeypatch, command):
    def no_model(*args, **kwargs):
        raise AssertionError("a missing path is found before a model is loaded")

    monkeypatch.setattr(video_tool, "load_model", no_model)
    missing = tmp_path / ("videos" if command == "index" else "missing.mp4")
    argv = {"ask": ["ask", missing, "what moves?", *model_args(toy, "qa")],
            "caption": ["caption", missing, *model_args(toy, "pretrain")],
            "show": ["show", missing, "--out", tmp_path / "a.png", *model_args(toy, "retrieval")],
            "index": ["index", missing, "--index", tmp_path / "index", *model_args(toy, "retrieval")]}[command]
    assert fail(argv, capsys) == f"error: file not found: {missing}\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # no index folder made, no picture


def test_missing_and_undecodable_videos_say_which_they_are(toy, tmp_path, capsys):
    missing, broken = tmp_path / "missing.mp4", tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00garbage" * 64)
    error = fail(["ask", broken, "what moves?", *model_args(toy, "qa")], capsys)
    assert error.startswith(f"error: cannot decode video {broken}: ")
    assert "is a folder, not a video file" in fail(["caption", tmp_path, *model_args(toy, "pretrain")], capsys)
    # The library says the same: a missing file is no decoding failure, for one clip or in a batch.
    with pytest.raises(FileNotFoundError) as raised:
        inference.api.VideoLanguageModel.load_clip(None, missing)
    assert raised.value.filename == str(missing)
    files = inference.api.VideoFiles(load_config(toy.configs["retrieval"], toy.overrides), [missing, broken])
    assert files.item(0) == (None, 0, f"file not found: {missing}")
    assert files.item(1)[2].startswith(f"cannot decode video {broken}: ")


def index_files(index) -> dict:
    """The index folder's files and their bytes (a folder of parts: its parts' names)."""
    return {path.name: sorted(part.name for part in path.iterdir()) if path.is_dir() else path.read_bytes()
            for path in index.iterdir()}


@pytest.mark.slow
def test_ctrl_c_while_indexing_is_one_line_and_keeps_the_previous_index(toy, folder, tmp_path, capsys):
    """Ctrl-C as a terminal sends it (to the process and its decoding workers), at a known batch:
    the run sends it itself (TESTA_INTERRUPT_AFTER_BATCH), so no race with a short run."""
    index = tmp_path / "index"
    run(["index", folder, "--index", index, "--tokens", "--num_workers", "0", *model_args(toy, "retrieval")], capsys)
    before = index_files(index)
    for number in range(6):  # three batches of two to encode; interrupted after the first
        shutil.copy(min(folder.glob("*.mp4")), folder / f"added{number}.mp4")
    command = [sys.executable, str(REPO_ROOT / "video_tool.py"), "index", str(folder), "--index", str(index),
               "--tokens", "--num_workers", "1", "--batch_size", "2"]
    env = {**os.environ, "TESTA_INTERRUPT_AFTER_BATCH": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 130, output
    assert "Traceback" not in output and "Exception ignored" not in output, output
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        f"error: interrupted: index {index} not updated (the previous index is unchanged and searchable); nothing "
        f"of this run was committed; the videos encoded so far are kept in {index / '.index-parts'}: the same "
        "command resumes"]
    after = index_files(index)
    assert len(after.pop(".index-parts")) == 1  # the first batch's part, kept for the next run
    assert after == before  # the same manifest and data files, no leftovers, no lock
    previous = VideoIndex.open(index)
    assert np.array_equal(previous.embeddings, np.load(index / json.loads(before["manifest.json"])["embeddings"]))
    assert len(run(["search", "--index", index, "a red circle", "-k", "2"], capsys).splitlines()) == 3
    video_tool.main([str(arg) for arg in ["index", folder, "--index", index, "--tokens", "--num_workers", "0",
                                          "--batch_size", "2"]])
    assert "index: resuming: 2 of 6 videos were encoded by an interrupted run" in capsys.readouterr().err
    assert not (index / ".index-parts").exists()


def test_ctrl_c_in_a_destructor_is_raised_after_it_not_printed_and_lost():
    script = """
import os, signal
from runtime.interrupts import interrupts_not_swallowed

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, however the tests were started

class Reader:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while decord's VideoReader.__del__ runs
        sum(range(1000))

try:
    with interrupts_not_swallowed():
        Reader()
        for _ in range(10**8):
            pass
        print("not interrupted")
except KeyboardInterrupt:
    print("interrupted")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert (result.stdout, result.stderr) == ("interrupted\n", "")


def test_decoding_workers_ignore_ctrl_c_and_stay_quiet_when_the_main_process_hangs_up():
    script = """
import signal, sys
from runtime.interrupts import ignore_interrupts

ignore_interrupts()
assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
for error in (ConnectionResetError(104, "Connection reset by peer"), ValueError("a bug")):
    try:
        exec(compile("raise error", "/lib/python3/multiprocessing/resource_sharer.py", "exec"))
    except Exception:
        sys.excepthook(*sys.exc_info())  # what the resource sharer's thread does
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ValueError: a bug" in result.stderr and "ConnectionResetError" not in result.stderr
