"""Training with a budget drawn per step (`merge_budget_range`): one checkpoint for every budget."""
import pytest
import torch
from torch import nn

from configs.keys import ConfigError
from models.timesformer import TimeSformer
from runtime.precision import make_precision
from training.budgets import BudgetDraws
from training.loop import LoopOptions, train_one_epoch

CONFIG = {"num_frm_train": 4, "image_size": 32, "patch_size": 16}


class VideoModel(nn.Module):
    """A video encoder and its momentum copy, as the retrieval and pre-training models hold them."""

    def __init__(self):
        super().__init__()
        make = lambda: TimeSformer(img_size=32, patch_size=16, embed_dim=16, depth=2, num_heads=2,  # noqa: E731
                                   num_frames=4, token_merging=True, testa_r=[1, 1, 0, 1])
        self.visual_encoder, self.visual_encoder_m = make(), make()


def draws_for(model, budget_range=(0.8, 0.95), seed=7):
    return BudgetDraws.from_config(model, {**CONFIG, "merge_budget_range": list(budget_range)}, seed)


def test_each_step_draws_its_budget_from_the_seed_and_the_position():
    draws = draws_for(VideoModel())
    budgets = [draws.budget_at(epoch, step) for epoch in range(2) for step in range(20)]
    assert all(0.8 <= budget <= 0.95 for budget in budgets)
    assert len(set(budgets)) == len(budgets)  # every step its own budget
    again = draws_for(VideoModel())  # another process (another rank, or the run resumed) draws the same
    assert budgets == [again.budget_at(epoch, step) for epoch in range(2) for step in range(20)]
    assert draws_for(VideoModel(), seed=8).budget_at(0, 0) != budgets[0]


def test_training_sets_every_encoder_to_the_step_budget_and_restores_the_schedule_after():
    model = VideoModel()
    fixed_schedule = model.visual_encoder.schedule()
    draws = draws_for(model)
    seen = []

    def compute_losses(model, batch, context):
        seen.append((model.visual_encoder.merge_budget, model.visual_encoder_m.merge_budget))
        clips = torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(context.step))
        return {"loss": model.visual_encoder(clips).square().mean()}

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train_one_epoch(model, [None] * 3, optimizer, 1, compute_losses, make_precision("none", "cpu"),
                    LoopOptions(log_every=100, budget_draws=draws))
    assert seen == [(draws.budget_at(1, step),) * 2 for step in range(3)]
    assert model.visual_encoder.merge_budget is None and model.visual_encoder.schedule() == fixed_schedule


def test_a_range_the_encoder_cannot_reach_is_a_config_error_before_training():
    with pytest.raises(ConfigError, match=r"'merge_budget_range' \[0.5, 0.9\]: .*lowest reachable cost fraction 0.759"):
        draws_for(VideoModel(), budget_range=(0.5, 0.9))
    with pytest.raises(ConfigError, match=r"must be \[low, high\] with low <= high"):
        draws_for(VideoModel(), budget_range=(0.8, 0.5))


def test_no_range_no_draws():
    assert BudgetDraws.from_config(VideoModel(), dict(CONFIG), 0) is None
