"""Several nodes and SLURM, on this machine: two torchrun launchers joined by a c10d rendezvous
(two "nodes" of one process each), and two tasks started as srun would start them, compute
exactly what one node of two processes (training) or one process (evaluation) computes."""
import json
import sys

import pytest
import torch

from runtime.distributed import expand_hostlist, slurm_environment
from tests.launching import environment, free_port, run_together, torchrun_nodes


def pretrain_args(small_corpus, out) -> list[str]:
    return ["video_pretrain.py", "--config", "configs/toy/pretrain.yaml", "--output_dir", str(out),
            "--device", "cpu", "--num_workers", "0", f"train_file=[{small_corpus}/ann/pretrain.json]",
            f"video_root={small_corpus}", "depth=2", "max_epoch=1", "batch_size=2"]


def evaluate_args(small_corpus, out, pretrained) -> list[str]:
    # Two test videos per batch: each of two processes encodes and re-ranks its own batches.
    return ["train_video_retrieval.py", "--config", "configs/toy/retrieval.yaml", "--output_dir", str(out),
            "--device", "cpu", "--evaluate", "--num_workers", "0", f"video_root={small_corpus}/videos",
            f"ann_root={small_corpus}/ann", f"pretrained={pretrained}", "depth=2", "batch_size_test=2"]


def weights(out):
    return torch.load(out / "checkpoint_last.pth", map_location="cpu", weights_only=True)["model"]


def evaluation(out):
    metrics = json.loads((out / "evaluate.txt").read_text().splitlines()[-1])
    metrics.pop("provenance")  # says the number of processes, which differs
    return metrics, torch.load(out / "scores_test.pt", weights_only=True)


@pytest.fixture(scope="module")
def two_node_checkpoint(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_nodes") / "pretrain"
    run_together(torchrun_nodes(pretrain_args(small_corpus, out), nnodes=2, nproc_per_node=1))
    return out / "checkpoint_last.pth"


@pytest.fixture(scope="module")
def single_process_evaluation(small_corpus, two_node_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    run_together([[sys.executable, *evaluate_args(small_corpus, out, two_node_checkpoint)]])
    return evaluation(out)


def assert_same_evaluation(found, expected):
    (metrics, scores), (expected_metrics, expected_scores) = found, expected
    assert metrics == expected_metrics
    assert scores.keys() == expected_scores.keys()
    for name in scores:
        assert torch.equal(scores[name], expected_scores[name]), name


@pytest.mark.slow
def test_two_node_pretraining_equals_one_node_of_two_processes(small_corpus, two_node_checkpoint, tmp_path):
    run_together(torchrun_nodes(pretrain_args(small_corpus, tmp_path), nnodes=1, nproc_per_node=2))
    expected, found = weights(tmp_path), weights(two_node_checkpoint.parent)
    assert found.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(found[name], tensor), name


@pytest.mark.slow
def test_two_node_evaluation_equals_one_process(small_corpus, two_node_checkpoint, single_process_evaluation, tmp_path):
    run_together(torchrun_nodes(evaluate_args(small_corpus, tmp_path, two_node_checkpoint), nnodes=2, nproc_per_node=1))
    assert_same_evaluation(evaluation(tmp_path), single_process_evaluation)


@pytest.mark.slow
def test_srun_tasks_without_torchrun_equal_one_process(small_corpus, two_node_checkpoint, single_process_evaluation,
                                                       tmp_path):
    port = str(free_port())
    tasks = [environment(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_ID="1",
                         SLURM_JOB_NODELIST="127.0.0.1", MASTER_PORT=port) for rank in range(2)]
    command = [sys.executable, *evaluate_args(small_corpus, tmp_path, two_node_checkpoint)]
    outputs = run_together([command, command], tasks)
    assert "distributed init (rank 0 of 2, gloo)" in outputs[0]
    assert_same_evaluation(evaluation(tmp_path), single_process_evaluation)


@pytest.mark.parametrize("hostlist, hosts", [
    ("localhost", ["localhost"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("a[8-10]", ["a8", "a9", "a10"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


SLURM_TASK = {"SLURM_PROCID": "3", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "123456",
              "SLURM_JOB_NODELIST": "gpu[07-08]"}


def test_slurm_environment_gives_torchrun_variables():
    assert slurm_environment(SLURM_TASK) == {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3",
                                             "MASTER_ADDR": "gpu07", "MASTER_PORT": str(15000 + 123456 % 10000)}
    assert slurm_environment({**SLURM_TASK, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"


@pytest.mark.parametrize("environ", [
    {},  # plain python
    {**SLURM_TASK, "SLURM_NTASKS": "1"},  # a one-task step: a single process
    {**SLURM_TASK, "RANK": "0", "WORLD_SIZE": "2"},  # torchrun started by srun: torchrun's variables win
])
def test_slurm_environment_is_not_used(environ):
    assert slurm_environment(environ) == {}
