"""video_tool.py: every subcommand on a toy corpus, incremental indexing and its errors."""
import json
import shutil
import subprocess
import sys

import pytest

import inference.api
import inference.index
import video_tool
from tests.helpers import REPO_ROOT
from tests.inference_toy import make_toy_setup


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_setup(tmp_path_factory.mktemp("video_tool"))


def model_args(toy, family):
    return ["--config", str(toy.configs[family]), "--checkpoint", str(toy.checkpoints[family]), "--precision",
            "fp32", "--options", *toy.overrides]


def run(argv, capsys):
    video_tool.main([str(arg) for arg in argv])
    return capsys.readouterr().out


def fail(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        video_tool.main([str(arg) for arg in argv])
    assert stopped.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    return error


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
    previous = json.loads(before)  # the interrupted run removed its own files and released the lock
    assert {path.name for path in index.iterdir()} == {"manifest.json", previous["embeddings"], previous["tokens"]}
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
    payload = json.loads(result.stdout[:result.stdout.rindex("}") + 1])
    assert [hit["rank"] for hit in payload["hits"]] == [1, 2]
    assert payload["hits"][0]["score"] >= payload["hits"][1]["score"]
    assert (report / "index.html").is_file()


def test_mismatched_index_is_one_clear_error(toy, tmp_path, capsys):
    index = tmp_path / "index"
    run(["index", toy.videos, "--index", index, "--num_workers", "0", *model_args(toy, "retrieval")], capsys)
    other = ["--config", toy.configs["retrieval"], "--checkpoint", toy.checkpoints["retrieval_other"],
             "--options", *toy.overrides]
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
