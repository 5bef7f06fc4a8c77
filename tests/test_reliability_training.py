"""What a run does when things go wrong: a checkpoint of another model, a failing validation set,
a run stopped mid-epoch, two runs on one folder, --evaluate without weights, CPUs without bf16."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from data.toy import write_corpus
from runtime import precision as precision_module
from runtime.errors import UserError
from runtime.precision import make_precision
from runtime.run_lock import acquire_run_lock, release_run_lock
from tests.helpers import REPO_ROOT, log_records, without
from tests.test_scripts import SMALL, last_json_line, retrieval_args, run_script


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_corpus(root, num_clips=24, frames=8, size=64, seed=0, num_images=4)
    return root


def qa_args(corpus, out, *extra):
    return ["--config", "configs/toy/qa.yaml", "--output_dir", out, f"video_root={corpus}/videos",
            f"ann_root={corpus}/ann", "batch_size_train=4", *SMALL, *extra]


def error_line(result) -> str:
    """The one `error:` line of a failed script (and nothing like a traceback)."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# ---- 1. a checkpoint must fit the model it is loaded into ------------------------------------
def _toy_checkpoint(tmp_path, kind: str):
    """A toy-sized checkpoint of the retrieval or QA model (what a fine-tuning run writes)."""
    from configs.load import load_config
    from models import create_model
    config = load_config(REPO_ROOT / "configs" / "toy" / f"{kind}.yaml",
                         ["depth=2", f"med_config={REPO_ROOT / 'configs' / 'toy' / 'bert_toy.json'}"])
    path = tmp_path / f"{kind}.pth"
    torch.save({"model": create_model(config, kind).state_dict()}, path)
    return path


@pytest.mark.slow
def test_a_qa_checkpoint_given_to_retrieval_stops_naming_its_family(corpus, tmp_path):
    checkpoint = _toy_checkpoint(tmp_path, "qa")
    args = retrieval_args(corpus, tmp_path / "out", f"pretrained={checkpoint}")
    result = run_script("train_video_retrieval.py", *args, "--evaluate", check=False)
    line = error_line(result)
    assert line.startswith(f"error: {checkpoint} is a video QA checkpoint and does not fit this retrieval model: "
                           "it lacks ") and "vision_proj.weight" in line, line


@pytest.mark.slow
def test_a_retrieval_checkpoint_given_to_qa_stops_naming_its_family(corpus, tmp_path):
    checkpoint = _toy_checkpoint(tmp_path, "retrieval")
    result = run_script("train_video_qa.py", *qa_args(corpus, tmp_path / "out", f"pretrained={checkpoint}"),
                        "--evaluate", check=False)
    line = error_line(result)
    assert line.startswith(f"error: {checkpoint} is a video retrieval checkpoint and does not fit this QA model: ")
    assert "text_decoder." in line, line


# ---- 2. checkpoint_last.pth is written before validation reads anything ------------------------
@pytest.mark.slow
def test_a_failing_validation_set_keeps_the_epoch_and_the_resume_validates_it(corpus, tmp_path):
    broken = tmp_path / "corpus"
    shutil.copytree(corpus, broken)
    val_video = broken / "videos" / "v_toy00016.mp4"  # the first validation clip, not a training clip
    assert "v_toy00016" in (broken / "ann" / "val.jsonl").read_text()
    assert "v_toy00016" not in (broken / "ann" / "train.jsonl").read_text()
    val_video.write_bytes(b"not a video")
    out = tmp_path / "out"
    args = ["--config", "configs/toy/retrieval.yaml", "--output_dir", out, f"video_root={broken}/videos",
            f"ann_root={broken}/ann", "batch_size_train=4", *SMALL]
    failed = run_script("train_video_retrieval.py", *args, check=False)
    assert "v_toy00016.mp4" in error_line(failed)
    state = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert (state["epoch"], state["epoch_complete"]) == (0, True) and state["epoch_stats"]["loss_ita"] > 0
    assert not (out / "log.txt").exists() and not (out / ".lock").exists()

    shutil.copy(corpus / "videos" / "v_toy00016.mp4", val_video)
    resumed = run_script("train_video_retrieval.py", *args)
    assert "epoch 0 was trained and saved but not logged: validating it now" in resumed.stdout
    record = last_json_line(out / "log.txt")
    assert record["epoch"] == 0 and record["train_loss_ita"] == state["epoch_stats"]["loss_ita"]
    assert "val_r_mean" in record and (out / "checkpoint_best.pth").is_file()


# ---- 3. a run stopped at any step and resumed is the uninterrupted run, bit for bit -----------
RESUME_ARGS = ["max_epoch=2", "--save_every_steps", "2"]  # 4 optimiser steps per epoch


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_script("train_video_retrieval.py", *retrieval_args(corpus, out, *RESUME_ARGS))
    return out


def _stopped_run(script_args, stop_after: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "TESTA_STOP_AFTER_STEP": str(stop_after)}
    return subprocess.run([sys.executable, "train_video_retrieval.py", *map(str, script_args)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600, check=False)


# Stopped one step after a save (epoch 0: that step is redone), and right after a save (epoch 1).
@pytest.mark.slow
@pytest.mark.parametrize("stop_after, saved_at", [(3, 2), (6, 6)])
def test_a_run_stopped_mid_training_resumes_to_the_same_log_weights_and_metrics(corpus, uninterrupted, tmp_path,
                                                                              stop_after, saved_at):
    out = tmp_path / "out"
    args = retrieval_args(corpus, out, *RESUME_ARGS)
    stopped = _stopped_run(args, stop_after)
    assert stopped.returncode == 137 and f"stopping after optimiser step {stop_after}" in stopped.stdout
    state = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert state["global_step"] == saved_at and not state["epoch_complete"]
    assert len(state["meters"]) == 1 and state["meters"][0]["loss_ita"]["count"] == state["step_in_epoch"]
    assert (out / ".lock").is_file()  # a killed run leaves its lock behind

    resumed = run_script("train_video_retrieval.py", *args)
    assert f"the run that held .lock (host {socket.gethostname()}, pid " in resumed.stdout
    assert "is gone; taking the folder over" in resumed.stdout
    assert log_records(out) == log_records(uninterrupted)  # but for what the resumed run's first line adds
    weights = torch.load(out / "checkpoint_last.pth", weights_only=True)["model"]
    expected = torch.load(uninterrupted / "checkpoint_last.pth", weights_only=True)["model"]
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[key], expected[key]) for key in expected)

    def metrics(folder):
        return without(last_json_line(folder / "test_results.txt"), "checkpoint", "provenance")
    assert metrics(out) == metrics(uninterrupted)
    assert not (out / ".lock").exists()


# ---- 4. a run owns its output folder --------------------------------------------------------
def _wait_for_lock(path, process, timeout=120.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError(f"no lock appeared (exit code {process.poll()})")


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_stops_naming_the_first(corpus, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    first = subprocess.Popen([sys.executable, "train_video_retrieval.py", *map(str, retrieval_args(corpus, out))],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        owner = _wait_for_lock(out / ".lock", first)
        assert owner["pid"] == first.pid
        os.kill(first.pid, signal.SIGSTOP)  # hold the first run inside its work, whatever the machine's speed
        try:
            second = run_script("train_video_retrieval.py", *retrieval_args(corpus, out), check=False)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        _, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-3000:]
    line = error_line(second)
    assert line.startswith(f"error: output folder {out} is in use by another run "
                           f"(host {socket.gethostname()}, pid {first.pid}, started "), line
    assert line.endswith(f"(if that run is gone, delete {out / '.lock'})")
    assert (out / "test_results.txt").is_file() and not (out / ".lock").exists()
    assert len((out / "log.txt").read_text().splitlines()) == 1  # one run's one epoch


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: the pid names no process
    return process.pid


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path, capsys):
    lock = tmp_path / ".lock"
    dead = _dead_pid()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "started": "then"}))
    assert acquire_run_lock(tmp_path) == lock
    assert capsys.readouterr().out == (f"{tmp_path}: the run that held .lock (host {socket.gethostname()}, "
                                       f"pid {dead}) is gone; taking the folder over\n")
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):  # held now, even against this process
        acquire_run_lock(tmp_path)
    release_run_lock(lock)
    assert not lock.exists()


@pytest.mark.parametrize("owner", [{"host": "another-host", "pid": 1}, {"host": socket.gethostname(), "pid": 1}])
def test_a_lock_held_elsewhere_or_by_a_live_process_is_respected(tmp_path, owner):
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({**owner, "started": "2026-01-01 00:00:00"}))
    with pytest.raises(UserError) as error:
        acquire_run_lock(tmp_path)
    assert str(error.value) == (f"output folder {tmp_path} is in use by another run (host {owner['host']}, pid 1, "
                                f"started 2026-01-01 00:00:00); wait for it to end or choose another --output_dir "
                                f"(if that run is gone, delete {lock})")
    release_run_lock(lock)  # not ours: left alone
    assert json.loads(lock.read_text())["pid"] == 1


# ---- 5. --evaluate refuses random weights ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("script, args", [("train_video_retrieval.py", retrieval_args), ("train_video_qa.py", qa_args)])
def test_evaluate_without_pretrained_weights_stops_unless_allowed(corpus, tmp_path, script, args):
    refused = run_script(script, *args(corpus, tmp_path / "refused", "pretrained="), "--evaluate", check=False)
    assert error_line(refused) == ("error: --evaluate needs weights to test: `pretrained:` is empty; set "
                                   "pretrained=PATH (or pass --allow_random_weights to evaluate a randomly "
                                   "initialised model)")
    assert not (tmp_path / "refused" / "config.yaml").exists()
    allowed = tmp_path / "allowed"
    run_script(script, *args(corpus, allowed, "pretrained="), "--evaluate", "--allow_random_weights")
    assert last_json_line(allowed / "evaluate.txt")["split"] == "test"


# ---- 6. precision on CPUs without native bf16 -------------------------------------------------
@pytest.fixture()
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(precision_module, "_PRINTED", set())


@pytest.mark.parametrize("method", ["apex", "fp16"])
def test_amp_on_a_cpu_without_native_bf16_runs_fp32_with_a_notice(fresh_warnings, capsys, method):
    precision = make_precision(method, "cpu", cpu_bf16_is_native=lambda: False)
    assert precision.dtype is None and not precision.scaler.is_enabled()
    assert precision.describe() == f"{method} -> fp32"
    assert capsys.readouterr().out == (f"precision: --mixed_precision_method {method} runs fp32 on this CPU: it has "
                                       "no native bf16 (no AVX512/AMX), and emulated bf16 is much slower than fp32\n")


def test_explicit_bf16_on_a_cpu_without_native_bf16_runs_bf16_and_warns_once(fresh_warnings, capsys):
    for _ in range(2):
        precision = make_precision("bf16", "cpu", cpu_bf16_is_native=lambda: False)
        assert precision.dtype is torch.bfloat16
    assert capsys.readouterr().out == ("warning: this CPU has no native bf16 (no AVX512/AMX): bf16 autocast is "
                                       "emulated and much slower than fp32; --mixed_precision_method none runs fp32\n")


@pytest.mark.parametrize("method", ["apex", "fp16", "bf16"])
def test_a_cpu_with_native_bf16_runs_bf16_silently(fresh_warnings, capsys, method):
    assert make_precision(method, "cpu", cpu_bf16_is_native=lambda: True).dtype is torch.bfloat16
    assert make_precision("none", "cpu", cpu_bf16_is_native=lambda: False).dtype is None
    assert capsys.readouterr().out == ""


def test_the_capability_is_not_asked_off_the_cpu_or_for_fp32():
    def never():
        raise AssertionError("asked")
    assert make_precision("none", "cpu", cpu_bf16_is_native=never).dtype is None
    assert make_precision("bf16", "cuda", cpu_bf16_is_native=never).dtype is torch.bfloat16
