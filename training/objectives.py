"""What each script trains: the `compute_losses(model, batch, context)` that train_one_epoch calls.

Each returns a dict of named loss tensors (their sum is the loss). They are functions, not
closures inside the scripts, so that a test or a notebook can drive the exact training step
on batches of its own (tests/test_train_e2e.py replays the original's recorded batches).
"""
from typing import Callable

from training.loop import StepContext
from training.optim import alpha_ramp

ComputeLosses = Callable[[object, tuple, StepContext], dict]


def retrieval_losses(alpha: float) -> ComputeLosses:
    """ITC + ITM of a retrieval batch (video, captions, video index); the distillation weight
    ramps from 0 to `alpha` over the first epoch, as the original's fine-tuning does."""
    def compute(model, batch, context: StepContext) -> dict:
        video, captions, idx = batch
        return model(video, captions, alpha_ramp(alpha, context.epoch, context.step, context.steps_per_epoch,
                                                 ramp_epochs=1), idx)
    return compute


def qa_losses(model, batch, context: StepContext) -> dict:
    """The answer decoder's weighted loss on a QA batch (vqa_collate_fn's layout)."""
    video, questions, answers, weights, n = batch
    return {"loss": model(video, questions, answers, n, weights)}


def pretrain_losses(alpha: float, separate_images: bool) -> ComputeLosses:
    """ITC + ITM + LM of a pre-training batch, or of a (video batch, image batch) pair with
    `separate_images` (--sep_img); the distillation weight ramps over the first two epochs."""
    def compute(model, batch, context: StepContext) -> dict:
        ramped = alpha_ramp(alpha, context.epoch, context.step, context.steps_per_epoch, ramp_epochs=2)
        if separate_images:
            (video, captions), (images, image_captions) = batch
            return model(video, captions, ramped, images, image_captions)
        video, captions = batch
        return model(video, captions, ramped)
    return compute
