"""Gather helpers, DDP training with accumulation, metric reduction and per-rank RNG
checkpoints under 2 gloo processes."""
import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from evaluation.qa import merge_rank_results
from runtime.distributed import (all_gather_with_grad, concat_all_gather, gather_objects, get_rank, get_world_size,
                                 init_distributed, is_main_process, seed_for_rank, wrap_distributed)
from runtime.precision import make_precision
from runtime.progress import MetricLogger
from training.checkpoints import Checkpointer
from training.loop import LoopOptions, train_one_epoch
from utils import seed_everything


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_ddp_with_accumulation(rank):
    """DDP + 2-step accumulation over 2 ranks must equal plain SGD on the 8 samples of each step."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=generator), torch.randn(16, generator=generator)
    dataset = TensorDataset(x, y)
    # Rank r reads r, r+2, ...: micro-batches of 2, two per step, so step u covers x[8u:8u+8].
    loader = DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, shuffle=False))
    torch.manual_seed(0)
    reference = torch.nn.Linear(6, 1)
    model = wrap_distributed(copy.deepcopy(reference), torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def mse(module, inputs, targets):
        return ((module(inputs).squeeze(-1) - targets) ** 2).mean()
    train_one_epoch(model, loader, optimizer, 0, lambda m, b, c: {"loss": mse(m, *b)},
                          make_precision("none", "cpu"), LoopOptions(accumulation_steps=2))
    for step in range(2):
        reference.zero_grad()
        mse(reference, x[8 * step:8 * step + 8], y[8 * step:8 * step + 8]).backward()
        with torch.no_grad():
            for param in reference.parameters():
                param -= 0.1 * param.grad
    for trained, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(trained, expected)
    return model, optimizer


def _worker(rank, port, output_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = init_distributed("cpu")
    try:
        assert device == torch.device("cpu") and get_world_size() == 2
        assert get_rank() == rank and is_main_process() == (rank == 0)

        gathered = concat_all_gather(torch.full((1, 2), float(rank)))
        assert gathered.tolist() == [[0.0, 0.0], [1.0, 1.0]]

        # Each rank's loss weighs both gathered slices; a slice's gradient sums over ranks.
        x = torch.tensor([rank + 1.0], requires_grad=True)
        everyone = all_gather_with_grad(x * 1.0)
        assert everyone.tolist() == [1.0, 2.0]
        (everyone * torch.tensor([10.0, 100.0]) * (rank + 1)).sum().backward()
        assert x.grad.item() == [30.0, 300.0][rank]

        assert gather_objects({"rank": rank}) == [{"rank": 0}, {"rank": 1}]
        merged = merge_rank_results([[{"question_id": 1}, {"question_id": 3}],
                                           [{"question_id": 2}, {"question_id": 1}]][rank])
        assert [item["question_id"] for item in merged] == [1, 2, 3]

        logger = MetricLogger()
        logger.update(loss=1.0 + 2 * rank)
        logger.synchronize_between_processes()
        assert logger.global_averages() == {"loss": 2.0}

        # Each rank saves and gets back its own RNG state.
        model, optimizer = _train_ddp_with_accumulation(rank)
        checkpointer = Checkpointer(output_dir, model, optimizer,
                                          make_precision("none", "cpu"), {})
        seed_everything(seed_for_rank(0))
        checkpointer.save("checkpoint_last.pth", 0, epoch_complete=True)
        expected = torch.rand(4)
        checkpointer.resume()
        assert torch.equal(torch.rand(4), expected)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_gather_helpers_and_rng_checkpoint_with_two_processes(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    state = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_single_process_fallbacks():
    x = torch.ones(2, 3, requires_grad=True)
    assert all_gather_with_grad(x) is x and concat_all_gather(x) is x
    assert gather_objects(5) == [5]
