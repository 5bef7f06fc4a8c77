"""Training with a token budget drawn per step (`merge_budget_range`), so that one checkpoint
serves every budget: each step's budget is a function of (seed, epoch, step), hence the same on
every rank and the same again after a resume."""
from __future__ import annotations

import numpy as np

from configs.keys import ConfigError, value
from models.timesformer import TimeSformer
from runtime.distributed import unwrap_model


class BudgetDraws:
    """Sets every video encoder of a model (the momentum copy too) to the step's budget."""

    def __init__(self, encoders: list[TimeSformer], low: float, high: float, seed: int):
        self.encoders, self.low, self.high, self.seed = encoders, low, high, seed
        self.fixed = [(encoder.merge_budget, encoder.merge_token_budget) for encoder in encoders]

    @classmethod
    def from_config(cls, model, config: dict, seed: int | None) -> BudgetDraws | None:
        """None without `merge_budget_range`; a range the encoder cannot reach for the training clips
        is a ConfigError before any step."""
        budget_range = value(config, "merge_budget_range")
        if budget_range is None:
            return None
        if len(budget_range) != 2 or budget_range[0] > budget_range[1]:
            raise ConfigError(f"config key 'merge_budget_range' must be [low, high] with low <= high, "
                              f"got {budget_range!r}")
        encoders = [module for module in unwrap_model(model).modules() if isinstance(module, TimeSformer)]
        frames = value(config, "num_frm_train")
        patches = (value(config, "image_size") // value(config, "patch_size")) ** 2
        encoder = encoders[0]
        fixed = encoder.merge_budget, encoder.merge_token_budget
        try:
            encoder.set_merge_budget(float(budget_range[0]), encoder.merge_token_budget)
            encoder.merge_plan(frames, patches)
        except ValueError as error:
            raise ConfigError(f"config key 'merge_budget_range' {budget_range!r}: {error}") from None
        finally:
            encoder.set_merge_budget(*fixed)
        return cls(encoders, float(budget_range[0]), float(budget_range[1]), seed or 0)

    def budget_at(self, epoch: int, step: int) -> float:
        return float(np.random.default_rng([self.seed, epoch, step]).uniform(self.low, self.high))

    def set_step(self, epoch: int, step: int) -> None:
        budget = self.budget_at(epoch, step)
        for encoder in self.encoders:
            encoder.set_merge_budget(budget, encoder.merge_token_budget)

    def restore(self) -> None:
        """Back to the config's own budget (or `testa_r`), for validation and testing."""
        for encoder, fixed in zip(self.encoders, self.fixed):
            encoder.set_merge_budget(*fixed)
