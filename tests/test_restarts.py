"""Restarts after a failure: under `torchrun --max-restarts=1` one of two processes dies
mid-epoch (TESTA_FAIL_AT_STEP), torchrun stops the other and restarts both, they resume from
checkpoint_last.pth, and the run ends exactly as an uninterrupted one: log.txt, weights and
test metrics."""

import pytest
import torch

from runtime.fault_injection import exit_step
from tests.helpers import training_outcome
from tests.launching import environment, run_together, torchrun_nodes

# Two optimiser steps per epoch (8 training clips, 2 per process and step), two epochs.
STEPS_PER_EPOCH = 2


def fine_tune(small_corpus, out, **variables) -> str:
    """Two-process retrieval fine-tuning under torchrun --max-restarts=1; returns its output."""
    script = ["train_video_retrieval.py", "--config", "configs/toy/retrieval.yaml", "--output_dir", str(out),
              "--device", "cpu", "--save_every_steps", "1", "--log_every", "1", "--num_workers", "0",
              f"video_root={small_corpus}/videos", f"ann_root={small_corpus}/ann", "depth=2", "max_epoch=2",
              "batch_size_train=2", "batch_size_test=8"]
    [command] = torchrun_nodes(script, nnodes=1, nproc_per_node=2, max_restarts=1)
    return run_together([command], [environment(**variables)])[0]


@pytest.fixture(scope="module")
def uninterrupted(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    fine_tune(small_corpus, out)
    return training_outcome(out)


# Rank 0 in the first epoch (its output folder lock is left behind by the dead process and
# must be taken over), rank 1 in the second (after an epoch was logged).
@pytest.mark.slow
@pytest.mark.parametrize("rank, step", [(0, 1), (1, STEPS_PER_EPOCH + 1)])
def test_a_restarted_run_ends_as_an_uninterrupted_one(small_corpus, uninterrupted, tmp_path, rank, step):
    output = fine_tune(small_corpus, tmp_path, TESTA_FAIL_AT_STEP=f"{rank}:{step}")
    assert f"failure injection (rank {rank}): stopping after optimiser step {step}" in output
    assert "resumed from" in output, output[-3000:]
    log, weights, metrics = training_outcome(tmp_path)
    expected_log, expected_weights, expected_metrics = uninterrupted
    assert log == expected_log
    assert metrics == expected_metrics
    assert weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        assert torch.equal(weights[name], tensor), name


def test_failure_injection_reads_rank_step_and_only_fails_the_first_attempt(monkeypatch):
    monkeypatch.delenv("TESTA_STOP_AFTER_STEP", raising=False)
    monkeypatch.setenv("TESTA_FAIL_AT_STEP", "0:3")  # this test process is rank 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert exit_step() == 3
    monkeypatch.setenv("TESTA_FAIL_AT_STEP", "1:3")
    assert exit_step() == 0
    monkeypatch.setenv("TESTA_FAIL_AT_STEP", "0:3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert exit_step() == 0
    monkeypatch.delenv("TESTA_FAIL_AT_STEP")
    assert exit_step() == 0
