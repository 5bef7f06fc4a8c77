"""Failures caused by the user's input or the environment end in one `error:` line (the real
entry scripts, single process and torchrun); the bad-inputs folder is always cleaned up;
training items are reproducible from (seed, epoch, rank, index)."""
import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from data.annotations import AnnotationError, read_json, read_jsonl, read_pickle
from data.bad_inputs import PREFIX, BadInputLog
from data.datasets import create_dataset
from data.loader import create_loader
from data.toy import write_corpus
from data.video import VideoReadError
from runtime.errors import DataError, user_message
from tests.helpers import REPO_ROOT
from tests.test_scripts import SMALL, retrieval_args, run_script


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_corpus(root, num_clips=24, frames=8, size=64, seed=0, num_images=4)
    return root


def one_error_line(result, *fragments):
    """The run failed with exactly one `error:` line holding every fragment, and no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-4000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def copy_annotations(corpus, tmp_path):
    ann = tmp_path / "ann"
    shutil.copytree(corpus / "ann", ann)
    return ann


def break_line(path, line_number):
    """Cut line `line_number` (1-based) of a text file in half."""
    lines = path.read_text().split("\n")
    lines[line_number - 1] = lines[line_number - 1][:len(lines[line_number - 1]) // 2]
    path.write_text("\n".join(lines))


def rewrite_indented(path):
    """Rewrite a JSON file one entry per line, so a broken entry has a line number above 1."""
    entries = json.loads(path.read_text())
    path.write_text("[\n" + ",\n".join(json.dumps(entry) for entry in entries) + "\n]\n")


# --- 1. broken annotation files name the file and the line -------------------------------

@pytest.mark.slow
def test_broken_jsonl_line_names_file_and_its_line(corpus, tmp_path):
    ann = copy_annotations(corpus, tmp_path)
    break_line(ann / "val.jsonl", 3)
    result = run_script("train_video_retrieval.py", *retrieval_args(corpus, tmp_path / "out", f"ann_root={ann}"),
                        check=False)
    one_error_line(result, f"{ann / 'val.jsonl'}, line 3, column", "not valid JSON")


def broken_json_command(script, corpus, ann, out):
    """The script reading the broken file, with the toy corpus and the copied annotations."""
    if script == "activitynet":
        return "train_video_retrieval.py", retrieval_args(corpus, out, f"ann_root={ann}", "dataset=retrieval_activitynet")
    if script == "qa":
        return "train_video_qa.py", ["--config", "configs/toy/qa.yaml", "--output_dir", out,
                                     f"video_root={corpus}/videos", f"ann_root={ann}", *SMALL]
    return "video_pretrain.py", ["--config", "configs/toy/pretrain.yaml", "--output_dir", out, f"video_root={corpus}",
                                 f"train_file=[{ann}/pretrain.json]", *SMALL]


@pytest.mark.slow
@pytest.mark.parametrize("script, name, line", [("activitynet", "train.json", 4), ("qa", "train_q.json", 5),
                                                ("pretrain", "pretrain.json", 2)])
def test_broken_json_names_file_line_and_column(corpus, tmp_path, script, name, line):
    ann = copy_annotations(corpus, tmp_path)
    rewrite_indented(ann / name)
    break_line(ann / name, line)
    program, args = broken_json_command(script, corpus, ann, tmp_path / "out")
    result = run_script(program, *args, check=False)
    one_error_line(result, f"{ann / name}, line {line}, column")


def test_readers_report_line_column_and_layout(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"clip_name": "a", "caption": "x"}\n\n{"clip_name": "b", "caption": "y"}\n{"clip_name": \n')
    with pytest.raises(AnnotationError, match=rf"^{jsonl}, line 4, column \d+: not valid JSON"):
        read_jsonl(jsonl)
    broken = tmp_path / "a.json"
    broken.write_text('[\n {"video": "a"},\n {"video": }\n]')
    with pytest.raises(AnnotationError, match=rf"^{broken}, line 3, column \d+:"):
        read_json(broken)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'["caf\xe9"]')
    with pytest.raises(AnnotationError, match="not UTF-8"):
        read_json(latin)
    (tmp_path / "train.jsonl").write_text('{"clip": "a", "caption": "x"}\n')
    with pytest.raises(AnnotationError, match=r"train\.jsonl: expected one .*clip_name.*KeyError"):
        create_dataset("retrieval_didemo", {"video_root": str(tmp_path), "ann_root": str(tmp_path), "image_size": 32,
                                            "num_frm_train": 2, "num_frm_test": 2})


# --- 2. the refused QuerYD pickle names the file ----------------------------------------

class _RunsShell:
    def __reduce__(self):
        return os.system, ("true",)


@pytest.mark.slow
def test_refused_queryd_pickle_names_the_file(corpus, tmp_path):
    ann = copy_annotations(corpus, tmp_path)
    pickle_path = ann / "raw_captions_combined_filtered.pkl"
    pickle_path.write_bytes(pickle.dumps({"v_toy00000": _RunsShell()}))
    result = run_script("train_video_retrieval.py",
                        *retrieval_args(corpus, tmp_path / "out", f"ann_root={ann}", "dataset=retrieval_queryd",
                                        f"video_root={corpus}/videos_queryd"), check=False)
    one_error_line(result, str(pickle_path), "refusing to load posix.system")


def test_truncated_pickle_names_the_file(tmp_path):
    path = tmp_path / "captions.pkl"
    path.write_bytes(pickle.dumps({"a": [["b"]]})[:-3])
    with pytest.raises(AnnotationError, match=rf"^{path}: not a readable annotation pickle"):
        read_pickle(path)


# --- 3. an unreadable evaluation video inside DataLoader workers -------------------------

@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A randomly initialised checkpoint of the scripts' small toy retrieval model."""
    from configs.load import load_config
    from models import create_model

    path = tmp_path_factory.mktemp("weights") / "random.pth"
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # the config's med_config is relative to the repository
    try:
        torch.manual_seed(0)
        model = create_model(load_config("configs/toy/retrieval.yaml", ["depth=2"]), "retrieval")
    finally:
        os.chdir(cwd)
    torch.save({"model": model.state_dict()}, path)
    return path


def videos_with_a_broken_test_clip(corpus, tmp_path):
    """A copy of the videos folder whose test clip v_toy00020.mp4 is not a video."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for path in (corpus / "videos").iterdir():
        (videos / path.name).symlink_to(path)
    broken = videos / "v_toy00020.mp4"
    broken.unlink()
    broken.write_text("not a video\n")
    return videos, broken


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_evaluation_video_in_a_worker_names_the_video(corpus, tmp_path, random_weights, workers):
    videos, broken = videos_with_a_broken_test_clip(corpus, tmp_path)
    result = run_script("train_video_retrieval.py",
                        *retrieval_args(corpus, tmp_path / "out", f"video_root={videos}", f"pretrained={random_weights}",
                                        f"num_workers={workers}"), "--evaluate", check=False)
    one_error_line(result, f"error: cannot decode video {broken}:")


@pytest.mark.slow
def test_substitute_black_on_error_from_the_command_line(corpus, tmp_path, random_weights):
    videos, broken = videos_with_a_broken_test_clip(corpus, tmp_path)
    result = run_script("train_video_retrieval.py",
                        *retrieval_args(corpus, tmp_path / "out", f"video_root={videos}", f"pretrained={random_weights}",
                                        "num_workers=1", "substitute_black_on_error=true"), "--evaluate", check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"unreadable input {broken}" in result.stderr
    assert (tmp_path / "out" / "evaluate.txt").is_file()


def test_worker_error_is_reraised_as_itself_and_reported_in_one_line(corpus, tmp_path):
    videos, broken = videos_with_a_broken_test_clip(corpus, tmp_path)
    config = {"video_root": str(videos), "ann_root": str(corpus / "ann"), "image_size": 32, "num_frm_train": 2,
              "num_frm_test": 2}
    dataset = create_dataset("retrieval_didemo", config, "test")
    loader = create_loader(dataset, None, batch_size=1, num_workers=1, train=False, pin_memory=False)
    with pytest.raises(VideoReadError) as caught:
        list(loader)
    assert "Original Traceback" in str(caught.value)  # torch re-raised it with the worker's traceback
    message = user_message(caught.value)
    assert message.startswith(f"cannot decode video {broken}: ") and "\n" not in message


def test_substitute_black_on_error_is_a_config_key(corpus, tmp_path):
    videos, _ = videos_with_a_broken_test_clip(corpus, tmp_path)
    config = {"video_root": str(videos), "ann_root": str(corpus / "ann"), "image_size": 32, "num_frm_train": 2,
              "num_frm_test": 2, "substitute_black_on_error": True}
    lenient = create_dataset("retrieval_didemo", config, "test")
    index = [path.name for path in lenient.video].index("v_toy00020.mp4")
    clip, _ = lenient[index]
    assert torch.equal(clip, torch.zeros(3, 2, 32, 32, dtype=torch.uint8))
    assert lenient.bad_inputs.count() == 1
    strict = create_dataset("retrieval_didemo", config, "test", substitute_black_on_error=False)  # the option wins
    with pytest.raises(VideoReadError):
        strict[index]
    default = create_dataset("retrieval_didemo", {**config, "substitute_black_on_error": None}, "test")
    assert default.substitute_black_on_error is False


# --- 4. output folder and disk failures --------------------------------------------------

@pytest.mark.slow
def test_output_dir_under_a_file_is_one_line(corpus, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder\n")
    result = run_script("train_video_retrieval.py", *retrieval_args(corpus, blocker / "sub"), check=False)
    one_error_line(result, f"error: {blocker / 'sub'}: not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_output_dir_is_one_line(corpus, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = run_script("train_video_retrieval.py", *retrieval_args(corpus, locked / "out"), check=False)
    finally:
        locked.chmod(0o700)
    one_error_line(result, str(locked / "out"), "permission denied")


def raised(function):
    try:
        function()
    except Exception as error:  # noqa: BLE001 - the error under test
        return error
    raise AssertionError("nothing raised")


@pytest.mark.slow
def test_environment_errors_map_to_path_and_reason(tmp_path):
    assert user_message(PermissionError(errno.EACCES, "Permission denied", "/out/x")) == "/out/x: permission denied"
    assert user_message(OSError(errno.EROFS, "Read-only file system", "/out")) == "/out: read-only file system"
    assert user_message(FileExistsError(errno.EEXIST, "File exists", "/out")) == "/out: file exists"

    target = tmp_path / "checkpoint.pth"

    def write_full_disk():  # how a write() of a full disk fails: ENOSPC without a file name
        with open(target, "wb") as handle:
            handle.write(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert user_message(raised(write_full_disk)) == f"{target}: no space left on device"

    def torch_save_on_full_disk():  # torch.save's zip writer: its own text, the OSError as context
        handle = open(target, "wb")
        try:
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        finally:
            handle.close()
    assert user_message(raised(torch_save_on_full_disk)) == \
        f"{target}: no space left on device (saving with torch.save failed)"
    message = user_message(RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed "
                                        "writing file data/0: file write failed"))
    assert message == "(file unknown): write failed, most likely no space left on device (saving with torch.save failed)"

    assert user_message(RuntimeError("a bug")) is None
    assert user_message(OSError(errno.EBADF, "Bad file descriptor")) is None
    wrapped = ("Caught VideoReadError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\n    raise VideoReadError(path, reason)\n'
               "data.video.VideoReadError: cannot decode video /v/a.mp4: bad\n")
    assert user_message(VideoReadError(wrapped)) == "cannot decode video /v/a.mp4: bad"
    assert user_message(AnnotationError("a.json, line 3\n column 2")) == "a.json, line 3 column 2"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_real_torch_save_on_a_full_device_names_it():
    state = {"weights": torch.zeros(100_000)}

    def to_handle():
        with open("/dev/full", "wb") as handle:
            torch.save(state, handle)
            handle.flush()
    assert user_message(raised(to_handle)) == "/dev/full: no space left on device"
    message = user_message(raised(lambda: torch.save(state, "/dev/full")))
    # torch's C++ writer hides the errno: the reason is the likely one
    assert message == "/dev/full: write failed, most likely no space left on device (saving with torch.save failed)"


# --- 5. every video missing ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("evaluate", [True, False])
def test_all_videos_missing_is_one_line_naming_split_and_video_root(corpus, tmp_path, random_weights, evaluate):
    empty = tmp_path / "no_videos"
    empty.mkdir()
    args = retrieval_args(corpus, tmp_path / "out", f"video_root={empty}", f"pretrained={random_weights}")
    result = run_script("train_video_retrieval.py", *args, *(["--evaluate"] if evaluate else []), check=False)
    split = "test" if evaluate else "train"
    one_error_line(result, f"retrieval_didemo {split} split: none of the", f"exist under video_root {empty}")


def test_empty_split_raises_data_error(corpus, tmp_path):
    config = {"video_root": str(tmp_path), "ann_root": str(corpus / "ann"), "image_size": 32, "num_frm_train": 2,
              "num_frm_test": 2}
    for split in ("train", "val"):
        with pytest.raises(DataError, match=f"retrieval_didemo {split} split: none of the .* under video_root"):
            create_dataset("retrieval_didemo", config, split)


# --- 7. the bad-inputs folder ---------------------------------------------------------------

def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_folders_are_removed_and_live_ones_kept():
    stale = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{dead_pid()}_"))
    live = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getppid()}_"))  # pytest's parent is running
    try:
        log = BadInputLog()
        assert not stale.exists() and live.is_dir() and Path(log.folder).is_dir()
        assert Path(log.folder).name.startswith(f"{PREFIX}{os.getpid()}_")
    finally:
        shutil.rmtree(live, ignore_errors=True)


OWNER = """
import sys, time
from data.bad_inputs import BadInputLog
log = BadInputLog()
print(log.folder, flush=True)
if sys.argv[1] == "raise":
    raise ValueError("boom")
if sys.argv[1] == "wait":
    time.sleep(60)
"""


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["return", "raise", "sigterm"])
def test_owner_removes_its_folder_on_every_exit(ending):
    owner = subprocess.Popen([sys.executable, "-c", OWNER, "wait" if ending == "sigterm" else ending], cwd=REPO_ROOT,
                             env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    folder = Path(owner.stdout.readline().strip())
    assert folder.name.startswith(f"{PREFIX}{owner.pid}_")
    if ending == "sigterm":
        assert folder.is_dir()
        owner.send_signal(signal.SIGTERM)
    owner.communicate(timeout=60)
    assert owner.returncode == {"return": 0, "raise": 1, "sigterm": -signal.SIGTERM}[ending]
    assert not folder.exists()


# --- 8. torchrun: one line from rank 0, the other rank quiet -------------------------------

@pytest.mark.slow
def test_user_error_under_torchrun_is_one_line(corpus, tmp_path):
    ann = copy_annotations(corpus, tmp_path)
    break_line(ann / "train.jsonl", 2)
    result = run_script("train_video_retrieval.py", *retrieval_args(corpus, tmp_path / "out", f"ann_root={ann}"),
                        nproc=2, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{ann / 'train.jsonl'}, line 2, column" in errors[0], result.stderr[-4000:]
    # torchrun prints its own failure block (with the launcher's traceback); no rank prints one
    assert 'train_video_retrieval.py", line' not in result.stderr, result.stderr[-4000:]


# --- 9. training items depend on (seed, epoch, rank, index) alone --------------------------

class _From(torch.utils.data.Sampler):
    def __init__(self, indices):
        self.indices = list(indices)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def items_by_index(dataset, indices, workers):
    loader = DataLoader(dataset, batch_size=1, sampler=_From(indices), num_workers=workers)
    return {int(video_index): clip[0] for clip, _, video_index in loader}


def test_training_items_do_not_depend_on_workers_or_start(corpus):
    config = {"video_root": str(corpus / "videos"), "ann_root": str(corpus / "ann"), "image_size": 32,
              "video_resize": 40, "num_frm_train": 3, "num_frm_test": 3, "frm_sampling_strategy": "rand", "seed": 5}
    dataset = create_dataset("retrieval_didemo", config, "train")
    dataset.set_epoch(1)
    indices = list(range(8))
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    first = dataset[0][0]
    # no draws from the global generators, which drive dropout in the training process
    assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state)
    reference = items_by_index(dataset, indices, 0)
    assert torch.equal(reference[0], first)
    with_workers = items_by_index(dataset, indices, 2)
    resumed = items_by_index(dataset, indices[5:], 0)
    for index in indices:
        assert torch.equal(with_workers[index], reference[index]), index
    for index in indices[5:]:
        assert torch.equal(resumed[index], reference[index]), index
    dataset.set_epoch(2)
    assert not torch.equal(items_by_index(dataset, [0], 0)[0], reference[0])  # a new epoch, new draws
    dataset.set_epoch(1)
    dataset.set_seed(5, rank=1)
    assert not torch.equal(items_by_index(dataset, [0], 0)[0], reference[0])  # another rank, other draws


@pytest.mark.slow
def test_bad_video_in_one_ranks_shard_under_torchrun(corpus, tmp_path, random_weights):
    """Only rank 1 meets the error: it reports it (after waiting for a rank 0 report that does
    not come), and rank 0, left waiting in a collective, exits quietly."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for path in (corpus / "videos").iterdir():
        (videos / path.name).symlink_to(path)
    broken = videos / "v_toy00023.mp4"  # the last test clip: rank 1's shard in batches of 2
    broken.unlink()
    broken.write_text("not a video\n")
    result = run_script("train_video_retrieval.py",
                        *retrieval_args(corpus, tmp_path / "out", f"video_root={videos}", f"pretrained={random_weights}",
                                        "num_workers=1", "batch_size_test=2"), "--evaluate", nproc=2, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot decode video {broken}:"), result.stderr[-4000:]
    assert 'train_video_retrieval.py", line' not in result.stderr, result.stderr[-4000:]


def test_clips_shorter_than_sampled_are_used_said_once_and_counted(corpus, tmp_path, capsys):
    from data.toy import make_clip, random_events
    from training.fit import report_bad_inputs
    videos = tmp_path / "videos"
    shutil.copytree(corpus / "videos", videos, symlinks=True)
    first = json.loads((corpus / "ann" / "train.jsonl").read_text().splitlines()[0])["clip_name"]
    (videos / f"{first}.mp4").unlink()
    make_clip(videos / f"{first}.mp4", random_events(random.Random(0)), num_frames=3, size=64)
    config = {"video_root": str(videos), "ann_root": str(corpus / "ann"), "image_size": 32, "num_frm_train": 8,
              "num_frm_test": 8, "max_words": 30}
    dataset = create_dataset("retrieval_didemo", config, "train")
    short = next(i for i, (path, _, _) in enumerate(dataset.items) if Path(path).stem == first)
    clip = dataset[short][0]
    dataset[short]
    assert clip.shape[1] == 8 and torch.equal(clip[:, 0], clip[:, 7])  # used, its first frame repeated
    assert dataset.short_clips.count() == 2 and dataset.bad_inputs.count() == 0
    assert capsys.readouterr().err.count("has fewer frames than sampled (only 1 distinct of the 8 frames") == 1
    report_bad_inputs([dataset], epoch=3)
    assert "epoch 3: 2 clips had fewer frames than sampled and were used with frames repeated" in \
        capsys.readouterr().out
    assert dataset.short_clips.count() == 0
