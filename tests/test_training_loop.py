"""Precision, optimiser groups, schedules, the training loop, checkpoints and resume."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from configs.keys import ConfigError
from runtime.distributed import setup_for_distributed
from runtime.errors import UserError
from runtime.precision import make_precision
from runtime.progress import MetricLogger
from training.checkpoints import Checkpointer
from training.cli import build_arg_parser
from training.logging import ExperimentLogger, count_parameters, log_epoch, print_model_summary, visual_gmacs_per_clip
from training.loop import LoopOptions, train_one_epoch
from training.optim import alpha_ramp, cosine_lr, create_optimizer, make_lr_schedule, param_groups_for_weight_decay
from utils import _ALLOCATOR_SETTINGS, atomic_torch_save, get_rng_state, seed_everything, set_rng_state


# ---- precision --------------------------------------------------------------------------
@pytest.mark.parametrize("method, dtype", [("apex", torch.bfloat16), ("fp16", torch.bfloat16),
                                           ("bf16", torch.bfloat16), ("none", None)])
def test_precision_on_cpu_uses_bf16_autocast_without_scaler(method, dtype):
    # A CPU with native bf16; without it see tests/test_reliability_training.py.
    precision = make_precision(method, "cpu", cpu_bf16_is_native=lambda: True)
    assert precision.dtype == dtype and not precision.scaler.is_enabled()
    with precision.autocast():
        out = nn.Linear(4, 4)(torch.ones(2, 4))
    assert out.dtype == (dtype or torch.float32)


def test_unknown_precision_method_is_a_user_error():
    with pytest.raises(UserError, match="fp8"):
        make_precision("fp8", "cpu")


# ---- optimiser and schedules ------------------------------------------------------------
class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_weight_decay_exemption_rules():
    model = Tokens()
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    trained = [p for p in model.parameters() if p.requires_grad]
    # The original's fine-tuning decays every trained parameter (frozen ones are left out).
    decay, no_decay = param_groups_for_weight_decay(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay == {"params": [], "weight_decay": 0.0}
    assert ids(decay["params"]) == ids(trained)
    # BLIP's pre-training rule matches names: biases and BERT's `LayerNorm.*`, not `norm.weight`.
    decay, no_decay = param_groups_for_weight_decay(model, 0.05, "bias_layernorm")
    assert ids(no_decay["params"]) == ids([model.proj.bias, model.norm.bias])
    # The project's rule: every 1-D tensor, tokens and embeddings.
    decay, no_decay = param_groups_for_weight_decay(model, 0.05, "bias_norm_embed")
    assert ids(decay["params"]) == {id(model.proj.weight)}
    expected = [model.cls_token, model.pos_embed, model.temp, model.proj.bias, model.norm.weight, model.norm.bias]
    assert ids(no_decay["params"]) == ids(expected)
    optimizer = create_optimizer(model, {"init_lr": 3e-4, "weight_decay": 0.05})
    assert [g["lr"] for g in optimizer.param_groups] == [3e-4, 3e-4]
    with pytest.raises(ConfigError, match="weight_decay_exempt 'norms' is unknown"):
        param_groups_for_weight_decay(model, 0.05, "norms")


def test_blip_rule_spares_bert_layernorms_by_name():
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.LayerNorm = nn.LayerNorm(4)
    model = Named()
    decay, no_decay = param_groups_for_weight_decay(model, 0.05, "bias_layernorm")
    assert decay["params"] == [] and len(no_decay["params"]) == 2


def test_cosine_schedule():
    assert cosine_lr(0, 10, 1e-5, 0.0) == pytest.approx(1e-5)
    assert cosine_lr(5, 10, 1e-5, 1e-6) == pytest.approx(5.5e-6)
    assert cosine_lr(10, 10, 1e-5, 1e-6) == pytest.approx(1e-6)
    schedule = make_lr_schedule({"init_lr": 1e-5, "min_lr": 0.0, "max_epoch": 4}, "cosine")
    assert schedule(2, 123) == pytest.approx(0.5e-5)


def test_warmup_then_step_decay_schedule():
    config = {"init_lr": 3e-4, "min_lr": 1e-6, "lr_decay_rate": 0.9, "warmup_lr": 1e-6, "warmup_steps": 100}
    schedule = make_lr_schedule(config, "warmup_step_decay")
    assert schedule(0, 0) == pytest.approx(1e-6)
    assert schedule(0, 50) == pytest.approx(1e-6 + (3e-4 - 1e-6) / 2)
    assert schedule(0, 100) == schedule(0, 5000) == pytest.approx(3e-4)
    assert schedule(2, 0) == pytest.approx(3e-4 * 0.81)
    assert schedule(200, 0) == 1e-6  # floored at min_lr


def test_schedule_needs_its_config_keys():
    with pytest.raises(ConfigError, match="missing .warmup_steps.*needed by the warmup_step_decay learning-rate schedule"):
        make_lr_schedule({"init_lr": 1, "min_lr": 0, "lr_decay_rate": 0.9}, "warmup_step_decay")


def test_alpha_ramp():
    assert alpha_ramp(0.4, 0, 0, 10) == 0.0
    assert alpha_ramp(0.4, 1, 0, 10) == pytest.approx(0.2)
    assert alpha_ramp(0.4, 3, 5, 10) == pytest.approx(0.4)


# ---- a tiny model trained by the generic loop ---------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, 8)
        self.dropout = nn.Dropout(0.3)  # exercises the RNG state that resume must restore
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.dropout(torch.relu(self.layer(x)))).squeeze(-1)


def make_data(n=24):
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 6, generator=generator), torch.randn(n, generator=generator))


def make_loader(dataset, batch_size):
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def recording_losses(record, crash_at=None):
    def compute_losses(model, batch, context):
        if crash_at is not None and (context.epoch, context.step) == crash_at:
            raise KeyboardInterrupt("simulated crash")
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        record.append(loss.item())
        return {"loss_mse": loss, "loss_l1": 0.1 * (model(x) - y).abs().mean()}
    return compute_losses


CONFIG = {"init_lr": 1e-2, "min_lr": 1e-4, "max_epoch": 3, "weight_decay": 0.05}


def build(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    optimizer = create_optimizer(model, CONFIG)
    precision = make_precision("none", "cpu")
    checkpointer = Checkpointer(tmp_path, model, optimizer, precision, CONFIG)
    return model, optimizer, precision, checkpointer


def train(tmp_path, record, epochs, crash_at=None, checkpoint=None):
    model, optimizer, precision, checkpointer = build(tmp_path)
    options = LoopOptions(accumulation_steps=2, max_grad_norm=1.0, log_every=2,
                                save_every_steps=2, seed=5)
    loader = make_loader(make_data(), batch_size=4)
    schedule = make_lr_schedule(CONFIG, "cosine")
    resume = checkpointer.resume(checkpoint)
    start = resume.epoch if resume else 0
    stats = None
    for epoch in range(start, epochs):
        stats = train_one_epoch(model, loader, optimizer, epoch, recording_losses(record, crash_at),
                                      precision, options, schedule, checkpointer, resume)
        checkpointer.save("checkpoint_last.pth", epoch, epoch_complete=True)
    return model, stats


def test_resume_mid_epoch_continues_the_loss_curve_exactly(tmp_path):
    reference_losses = []
    reference, stats = train(tmp_path / "a", reference_losses, epochs=3)
    assert set(stats) == {"lr", "loss_mse", "loss_l1", "grad_norm"}
    # Crash in epoch 1 at batch 5: the last mid-epoch checkpoint is after batch 4 (2 steps of 2).
    crashed_losses = []
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", crashed_losses, epochs=3, crash_at=(1, 5))
    state = torch.load(tmp_path / "b" / "checkpoint_last.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["epoch_complete"]) == (1, 4, False)
    assert state["global_step"] == 3 + 2 and len(state["rng"]) == 1
    resumed_losses = []
    resumed, _ = train(tmp_path / "b", resumed_losses, epochs=3)
    assert crashed_losses[:6 + 4] + resumed_losses == reference_losses
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_resumed_epoch_reports_the_averages_of_the_whole_epoch(tmp_path):
    _, reference = train(tmp_path / "a", [], epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", [], epochs=2, crash_at=(1, 5))
    state = torch.load(tmp_path / "b" / "checkpoint_last.pth", weights_only=True)
    assert state["meters"][0]["loss_mse"]["count"] == 4  # the running totals of the epoch's first 4 batches
    _, resumed = train(tmp_path / "b", [], epochs=2)
    assert resumed == reference  # exactly: the same sums in the same order


def test_resume_from_explicit_checkpoint_at_epoch_end(tmp_path):
    reference_losses, partial_losses, resumed_losses = [], [], []
    reference, _ = train(tmp_path / "a", reference_losses, epochs=2)
    train(tmp_path / "b", partial_losses, epochs=1)
    resumed, _ = train(tmp_path / "c", resumed_losses, epochs=2,
                       checkpoint=str(tmp_path / "b" / "checkpoint_last.pth"))
    assert partial_losses + resumed_losses == reference_losses
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), resumed.parameters()))


def test_accumulation_matches_the_full_batch(tmp_path):
    def one_update(batch_size, accumulation_steps):
        torch.manual_seed(0)
        model = nn.Linear(6, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        dataset = make_data(8)
        loader = DataLoader(dataset, batch_size=batch_size)

        def compute_losses(model, batch, context):
            x, y = batch
            return {"loss": ((model(x).squeeze(-1) - y) ** 2).mean()}
        train_one_epoch(model, loader, optimizer, 0, compute_losses,
                              make_precision("none", "cpu"),
                              LoopOptions(accumulation_steps=accumulation_steps))
        return model
    full, accumulated = one_update(8, 1), one_update(4, 2)
    for a, b in zip(full.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b)
    # A trailing partial group (3 batches, groups of 2) still averages over its own size.
    uneven = one_update(3, 3)
    for a, b in zip(full.parameters(), uneven.parameters()):
        assert not torch.allclose(a, b)  # 8 = 3 + 3 + 2: two updates instead of one


def test_max_grad_norm_clips_before_the_step():
    model = nn.Linear(6, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]

    def compute_losses(model, batch, context):
        return {"loss": 1000.0 * model(batch[0]).sum()}
    train_one_epoch(model, DataLoader(make_data(4), batch_size=4), optimizer, 0, compute_losses,
                          make_precision("none", "cpu"), LoopOptions(max_grad_norm=0.5))
    change = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert change.norm().item() == pytest.approx(0.5, rel=1e-4)


# ---- checkpoints ----------------------------------------------------------------------------
def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pth"
    atomic_torch_save({"epoch": 1}, path)

    def failing_save(obj, handle):
        handle.write(b"partial bytes")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pth"]


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random
    seed_everything(11)
    atomic_torch_save({"rng": get_rng_state()}, tmp_path / "rng.pth")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    seed_everything(99)
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_resume_errors_are_user_errors(tmp_path):
    model, optimizer, precision, checkpointer = build(tmp_path)
    assert checkpointer.resume() is None  # nothing to resume in a fresh output folder
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpointer.resume(str(tmp_path / "missing.pth"))
    other = nn.Linear(2, 2)
    atomic_torch_save({"model": other.state_dict(), "optimizer": {}, "epoch": 0}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="does not match this model: 4 missing keys"):
        checkpointer.resume(str(tmp_path / "other.pth"))
    reshaped = {key: value[..., :1] for key, value in model.state_dict().items()}
    atomic_torch_save({"model": reshaped, "optimizer": {}, "epoch": 0}, tmp_path / "reshaped.pth")
    with pytest.raises(UserError, match="does not match this model: .*size mismatch"):
        checkpointer.resume(str(tmp_path / "reshaped.pth"))


# ---- logging ------------------------------------------------------------------------------
def test_log_epoch_appends_one_json_line(tmp_path):
    log_epoch(tmp_path, 0, train={"lr": 1e-4, "loss_ita": 2.0}, val={"r_mean": 10.0})
    log_epoch(tmp_path, 1, train={"lr": 5e-5, "loss_ita": 1.0})
    lines = Path(tmp_path / "log.txt").read_text().splitlines()
    import json
    assert json.loads(lines[0]) == {"train_lr": 1e-4, "train_loss_ita": 2.0, "val_r_mean": 10.0, "epoch": 0}
    assert json.loads(lines[1])["epoch"] == 1


def test_visual_gmacs_counts_multiply_adds():
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 4 * 4, 10))
    assert visual_gmacs_per_clip(encoder, 2, 4) == pytest.approx(96 * 10 / 1e9)
    assert encoder.training
    assert count_parameters(encoder) == (970, 970)


def test_metric_logger_prints_rate_and_eta(capsys):
    logger = MetricLogger()
    for _ in logger.log_every(range(4), 2, header="Eval:"):
        logger.update(loss=torch.tensor(1.5))
    out = capsys.readouterr().out
    assert "Eval: [2/4]  eta:" in out and "it/s" in out and "loss: 1.5000 (1.5000)" in out
    assert math.isclose(logger.global_averages()["loss"], 1.5)


def test_a_resumed_epoch_prints_its_positions_in_the_whole_epoch(capsys):
    for _ in MetricLogger().log_every(range(2), 1, header="Train epoch: [1]", total=4, start=2):
        pass
    out = capsys.readouterr().out
    assert "Train epoch: [1] [3/4]" in out and "Train epoch: [1] [4/4]" in out and "[1/" not in out


def test_a_tuple_of_loaders_yields_batches_together_for_the_shortest_length():
    seen = []

    def compute_losses(model, batch, context):
        (video_x, _), (image_x, _) = batch
        seen.append((video_x.shape[0], image_x.shape[0], context.steps_per_epoch))
        return {"loss": model(video_x).mean() + model(image_x).mean()}
    model = nn.Linear(6, 1)
    loaders = (DataLoader(make_data(12), batch_size=4), DataLoader(make_data(12), batch_size=2))
    train_one_epoch(model, loaders, torch.optim.SGD(model.parameters(), lr=0.1), 0,
                          compute_losses, make_precision("none", "cpu"))
    assert seen == [(4, 2, 3)] * 3


def test_a_list_of_batches_is_an_epoch_of_exactly_those_batches():
    batches = [(torch.full((2, 6), float(i)), torch.zeros(2, 1)) for i in range(3)]
    seen = []

    def compute_losses(model, batch, context):
        x, _ = batch
        seen.append((x[0, 0].item(), context.step, context.steps_per_epoch))
        return {"loss": model(x).mean()}
    model = nn.Linear(6, 1)
    stats = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), 0, compute_losses,
                            make_precision("none", "cpu"))
    assert seen == [(0.0, 0, 3), (1.0, 1, 3), (2.0, 2, 3)] and "loss" in stats


@pytest.mark.parametrize("flags, package", [({"use_wandb": True}, "wandb"), ({"tensorboard": True}, "tensorboard")])
def test_missing_optional_integration_is_a_one_line_user_error(tmp_path, monkeypatch, flags, package):
    import sys
    monkeypatch.setitem(sys.modules, "wandb", None)  # None in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match=f"needs the {package} package"):
        ExperimentLogger(tmp_path, {}, **flags)


def test_rank_aware_print_silences_other_ranks_unless_forced(capsys):
    import builtins
    original = builtins.print
    try:
        setup_for_distributed(False)
        print("hidden")
        print("shown", force=True)
    finally:
        builtins.print = original
    assert capsys.readouterr().out == "shown\n"


def test_model_summary_prints_parameters_and_gmacs(capsys):
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 4 * 4, 10))
    model = nn.ModuleDict({"visual_encoder": encoder, "head": nn.Linear(10, 2)})
    model["head"].requires_grad_(False)
    print_model_summary(model, encoder, {"num_frm_test": 2, "image_size": 4})
    out = capsys.readouterr().out
    assert "parameters: 0.00M total" in out and "0.00 GMACs per clip (2 frames, 4px" in out


def test_loop_options_from_args():
    args = build_arg_parser("t").parse_args(["--config", "c", "--output_dir", "o",
                                                   "--accumulation_steps", "4", "--max_grad_norm", "2"])
    config = {"accumulation_steps": 4, "max_grad_norm": 2.0}  # as setup_run resolves them, the flags included
    assert LoopOptions.from_args(args, 7, config) == LoopOptions(4, 2.0, 50, 0, 7)
    # Accumulation and clipping are read from the config only: without its keys, their defaults.
    assert LoopOptions.from_args(args, 7, {}) == LoopOptions(1, None, 50, 0, 7)


_WHERE_A_LARGE_TENSOR_LIVES = """
import ctypes, sys, torch
sys.path.insert(0, {repo!r})
import utils
print(utils.keep_freed_cpu_memory())
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype = ctypes.c_void_p
tensor = torch.empty(64 * 2 ** 20, dtype=torch.uint8)
heap_end = libc.sbrk(0)
print(tensor.data_ptr() < heap_end)  # on the heap, not a mapping of its own
del tensor
print(libc.sbrk(0) == heap_end)  # the heap was not trimmed after the free
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
@pytest.mark.parametrize("env, keeps", [({}, True), ({"MALLOC_MMAP_THRESHOLD_": "65536"}, False)])
def test_keeping_freed_cpu_memory_serves_large_tensors_from_the_heap_unless_the_environment_chose(env, keeps):
    # By default glibc gives a 64 MiB buffer a fresh mapping of its own (every page faults in on
    # first touch, each time); kept, it comes from the heap, which is never trimmed.
    clean = {key: value for key, value in os.environ.items() if key not in _ALLOCATOR_SETTINGS}
    script = _WHERE_A_LARGE_TENSOR_LIVES.format(repo=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-c", script], env={**clean, **env}, capture_output=True,
                            text=True, check=True)
    took_effect, on_heap, *kept = result.stdout.split()
    assert took_effect == str(keeps)
    assert on_heap == str(keeps)
    if keeps:
        assert kept == ["True"]
