"""Fault injection: a training run killed with SIGKILL at random steps and resumed each time ends
exactly where an uninterrupted run ends: the same log.txt, weights and test metrics, with 0 and
2 data-loader workers."""
import os
import random
import re
import signal
import subprocess
import sys

import pytest
import torch

from data.toy import write_corpus
from tests.helpers import REPO_ROOT, training_outcome

pytestmark = pytest.mark.slow  # starts processes or runs whole pipelines: not in make test-fast

PROGRESS = re.compile(r"Train epoch: \[(\d+)\] \[\s*(\d+)/(\d+)\]")
KILLS = 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_corpus(root, num_clips=24, frames=8, size=64, seed=0, num_images=4)
    return root


def command(corpus, out, workers):
    return [sys.executable, "train_video_retrieval.py", "--config", "configs/toy/retrieval.yaml",
            "--output_dir", str(out), "--device", "cpu", "--save_every_steps", "1", "--log_every", "1",
            "--num_workers", str(workers), f"video_root={corpus}/videos", f"ann_root={corpus}/ann",
            "depth=2", "max_epoch=2", "batch_size_train=4", "batch_size_test=8"]


def environment():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def run_to_the_end(corpus, out, workers) -> int:
    """Run (or resume) to the end; returns the number of training steps per epoch."""
    result = subprocess.run(command(corpus, out, workers), cwd=REPO_ROOT, env=environment(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return int(PROGRESS.search(result.stdout)[3])


def run_and_kill_at(corpus, out, workers, step):
    """Start (or resume) the run and SIGKILL its whole process group once `step` steps of all
    epochs have printed their progress line (their checkpoint is then written)."""
    process = subprocess.Popen(command(corpus, out, workers), cwd=REPO_ROOT, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in process.stdout:
        match = PROGRESS.search(line)
        if match and int(match[1]) * int(match[3]) + int(match[2]) >= step:
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=600)
    assert process.returncode == -signal.SIGKILL, f"the run ended before step {step}"


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_and_resumed_runs_end_as_an_uninterrupted_one(corpus, tmp_path, workers):
    steps_per_epoch = run_to_the_end(corpus, tmp_path / "uninterrupted", workers)
    expected_log, expected_weights, expected_metrics = training_outcome(tmp_path / "uninterrupted")
    kill_steps = sorted(random.Random(workers).sample(range(1, 2 * steps_per_epoch), KILLS))
    resumed = tmp_path / "killed"
    for step in kill_steps:
        run_and_kill_at(corpus, resumed, workers, step)
    run_to_the_end(corpus, resumed, workers)
    log, weights, metrics = training_outcome(resumed)
    assert log == expected_log
    assert metrics == expected_metrics
    assert weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        assert torch.equal(weights[name], tensor), name
