"""NaN, inf and Ctrl-C: the finiteness checks, the training loop's refusals (before backward, before
the step, before a checkpoint), the evaluation checks, and the one line run_cli prints."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from evaluation.metrics import best_ground_truth_ranks
from evaluation.qa import nonfinite_values
from evaluation.retrieval import cache_video_tokens
from runtime.errors import INTERRUPTED_EXIT_CODE, Interrupted, NonFiniteError, run_cli
from runtime.numerics import first_nonfinite_row, first_nonfinite_tensor, nonfinite_name, require_finite
from runtime.precision import Precision, make_precision
from training.checkpoints import Checkpointer
from training.fit import report_test
from training.loop import LoopOptions, checkpoint_on_disk, position, save_if_finite, train_one_epoch

NAN, INF = float("nan"), float("inf")


# ---- the pure checks --------------------------------------------------------------------------
def test_first_nonfinite_row_finds_the_first_row_with_a_nan_or_inf():
    assert first_nonfinite_row(torch.ones(3, 2)) is None
    assert first_nonfinite_row(torch.tensor([[1.0, 2.0], [3.0, INF], [NAN, 0.0]])) == 1
    assert first_nonfinite_row(torch.tensor([1.0, -INF])) == 1
    assert first_nonfinite_row(torch.empty(0, 4)) is None


def test_require_finite_raises_with_the_message_of_the_first_bad_row():
    require_finite(torch.zeros(2, 2), lambda row: "unused")
    with pytest.raises(NonFiniteError, match="^bad row 2$"):
        require_finite(torch.tensor([[0.0], [1.0], [NAN]]), lambda row: f"bad row {row}")


def test_first_nonfinite_tensor_names_the_first_and_skips_missing_ones():
    named = [("a", torch.ones(2)), ("no_grad", None), ("b", torch.tensor([INF])), ("c", torch.tensor([NAN]))]
    assert first_nonfinite_tensor(named) == "b"
    assert first_nonfinite_tensor([("a", torch.ones(2)), ("i", torch.arange(3))]) is None
    assert first_nonfinite_tensor([]) is None
    # Finite values whose sum overflows are not taken for an inf.
    assert first_nonfinite_tensor([("huge", torch.full((4,), 3e38))]) is None


def test_nonfinite_values_are_named_as_messages_name_them():
    assert [nonfinite_name(v) for v in (NAN, INF, -INF)] == ["NaN", "inf", "-inf"]


def test_position_counts_optimiser_steps_over_the_run_and_batches_in_the_epoch():
    assert position(0, 0, 4, 1) == "epoch 0 step 1 (batch 1/4)"
    assert position(1, 2, 4, 1) == "epoch 1 step 7 (batch 3/4)"
    assert position(1, 3, 5, 2) == "epoch 1 step 5 (batch 4/5)"  # 3 steps per epoch of 5 batches in pairs


def test_rank_metrics_refuse_nan_scores():
    with pytest.raises(ValueError, match=r"NaN or inf \(first in query 1\)"):
        best_ground_truth_ranks([[0.5, 0.1], [NAN, 0.2]], [[0], [1]])


# ---- the training loop --------------------------------------------------------------------------
def make_loader(batches=6):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4 * batches, 3, generator=generator), torch.randn(4 * batches, generator=generator))
    return DataLoader(data, batch_size=4)


def mse_losses(nan_at_step=None):
    """compute_losses with a NaN loss at micro-batch `nan_at_step` of epoch 0."""
    def compute(model, batch, context):
        x, y = batch
        loss = ((model(x).squeeze(-1) - y) ** 2).mean()
        if context.step == nan_at_step:
            loss = loss * NAN
        return {"loss_mse": loss}
    return compute


def build(tmp_path, precision=None, lr=0.1):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    precision = precision or make_precision("none", "cpu")
    return model, optimizer, precision, Checkpointer(tmp_path, model, optimizer, precision, {})


def saved(tmp_path):
    return torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)


def test_a_nan_loss_stops_before_backward_and_keeps_the_last_good_checkpoint(tmp_path):
    model, optimizer, precision, checkpointer = build(tmp_path)
    with pytest.raises(NonFiniteError, match=r"^loss_mse is NaN at epoch 0 step 3 \(batch 3/6\); "
                                             r"checkpoint_last\.pth from step 2 kept$"):
        train_one_epoch(model, make_loader(), optimizer, 0, mse_losses(nan_at_step=2), precision,
                        LoopOptions(save_every_steps=1), checkpointer=checkpointer)
    state = saved(tmp_path)
    assert state["global_step"] == 2 and state["step_in_epoch"] == 2
    # The NaN step neither reached the weights nor the file: both hold the weights after step 2.
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor).all() and torch.equal(tensor, state["model"][name])


def test_a_nan_loss_before_any_checkpoint_says_none_was_written(tmp_path):
    model, optimizer, precision, checkpointer = build(tmp_path)
    with pytest.raises(NonFiniteError, match=r"^loss_mse is NaN at epoch 0 step 1 \(batch 1/6\); "
                                             r"no checkpoint written yet$"):
        train_one_epoch(model, make_loader(), optimizer, 0, mse_losses(nan_at_step=0), precision,
                        checkpointer=checkpointer)
    assert not (tmp_path / "checkpoint_last.pth").exists()


def nan_gradient_at(parameter, step_counter, at_call):
    """A gradient hook turning `parameter`'s gradient into NaN on backward number `at_call`."""
    def hook(grad):
        step_counter.append(1)
        return grad * NAN if len(step_counter) == at_call else grad
    parameter.register_hook(hook)


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_a_nan_gradient_is_refused_before_the_step_without_a_grad_scaler(tmp_path, max_grad_norm):
    model, optimizer, precision, checkpointer = build(tmp_path)
    nan_gradient_at(model.bias, [], at_call=2)  # clipping would spread it to the weight: named first
    before = None

    def remember(model, batch, context):
        nonlocal before
        before = [p.detach().clone() for p in model.parameters()]
        return mse_losses()(model, batch, context)
    with pytest.raises(NonFiniteError, match=r"^the gradient of bias is non-finite at epoch 0 step 2 \(batch 2/6\); "
                                             r"no checkpoint written yet$"):
        train_one_epoch(model, make_loader(), optimizer, 0, remember, precision,
                        LoopOptions(max_grad_norm=max_grad_norm), checkpointer=checkpointer)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_the_grad_scaler_still_skips_an_overflowing_step(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    model, optimizer, precision, checkpointer = build(tmp_path, Precision("fp16", "cpu", None, scaler))
    nan_gradient_at(model.weight, [], at_call=1)
    weights = []

    def record(model, batch, context):
        weights.append(model.weight.detach().clone())
        return mse_losses()(model, batch, context)
    train_one_epoch(model, make_loader(2), optimizer, 0, record, precision, LoopOptions(max_grad_norm=1.0),
                    checkpointer=checkpointer)
    assert torch.equal(weights[0], weights[1])  # the first step was skipped, not refused
    assert scaler.get_scale() == 2.0 ** 3
    assert not torch.equal(weights[1], model.weight)  # the second one stepped


def test_weights_that_became_non_finite_are_not_saved(tmp_path):
    model, optimizer, precision, checkpointer = build(tmp_path)

    def schedule(epoch, step):
        return 0.1 if step == 0 else INF  # finite gradients, non-finite weights after the update
    with pytest.raises(NonFiniteError, match=r"^weight weight is non-finite at epoch 0 step 2 \(batch 2/6\); "
                                             r"checkpoint_last\.pth from step 1 kept$"):
        train_one_epoch(model, make_loader(), optimizer, 0, mse_losses(), precision,
                        LoopOptions(save_every_steps=1), schedule, checkpointer=checkpointer)
    assert saved(tmp_path)["global_step"] == 1
    assert all(torch.isfinite(tensor).all() for tensor in saved(tmp_path)["model"].values())


def test_save_if_finite_writes_a_finite_state(tmp_path):
    model, _, _, checkpointer = build(tmp_path)
    save_if_finite(checkpointer, "checkpoint_last.pth", 0, epoch_complete=True)
    assert checkpoint_on_disk(checkpointer) == "checkpoint_last.pth from step 0 kept"
    assert checkpoint_on_disk(None) == "no checkpoint written yet"


def test_hard_negative_sampling_goes_on_when_similarities_are_not_finite():
    """A diverged model's similarities must not stop ITM's sampling inside multinomial: the
    forward pass ends and the loop then reports the loss as NaN (tests/bad_inputs/nonfinite.py)."""
    from models.contrastive import sample_hard_negatives
    weights = torch.tensor([[0.2, 0.8, 0.0], [NAN, 0.5, 0.5], [0.0, 0.0, 0.0]])
    positives = torch.eye(3, dtype=torch.bool)
    for seed in range(20):
        torch.manual_seed(seed)
        picks = sample_hard_negatives(weights, positives).tolist()
        assert picks[0] == 1 and 0 <= picks[1] < 3 and 0 <= picks[2] < 3

def test_ctrl_c_in_training_says_where_and_what_is_on_disk(tmp_path):
    model, optimizer, precision, checkpointer = build(tmp_path)

    def interrupted_at_step_4(model, batch, context):
        if context.step == 3:
            raise KeyboardInterrupt
        return mse_losses()(model, batch, context)
    with pytest.raises(Interrupted, match=r"^interrupted at epoch 0 step 4 \(batch 4/6\); "
                                          r"checkpoint_last\.pth from step 2 kept$"):
        train_one_epoch(model, make_loader(), optimizer, 0, interrupted_at_step_4, precision,
                        LoopOptions(save_every_steps=2), checkpointer=checkpointer)


# ---- evaluation ---------------------------------------------------------------------------------
class VideoEncoder(nn.Module):
    """encode_video of a retrieval model whose features are NaN for the clips filled with `bad`."""
    bad = 7.0

    def encode_video(self, video):
        tokens = video.mean(dim=(2, 3, 4))[:, None, :].repeat(1, 2, 1)
        tokens[video.flatten(1)[:, 0] == self.bad] = NAN
        return tokens, tokens[:, 0]


def test_video_features_name_the_batch_and_the_first_video():
    videos = torch.zeros(6, 3, 1, 2, 2)
    videos[4] = VideoEncoder.bad
    loader = DataLoader(TensorDataset(videos, torch.arange(6)), batch_size=2)
    with pytest.raises(NonFiniteError, match=r"^non-finite video tokens in evaluation batch 2 \(first at video 4\)$"):
        cache_video_tokens(VideoEncoder(), loader, torch.device("cpu"), torch.no_grad, low_resource=False)


def test_fp16_overflow_in_the_token_cache_is_found():
    videos = torch.full((2, 3, 1, 2, 2), 1e6)  # finite in fp32, inf once cached in fp16
    loader = DataLoader(TensorDataset(videos, torch.arange(2)), batch_size=2)
    with pytest.raises(NonFiniteError, match=r"^non-finite video tokens in evaluation batch 0 \(first at video 0\)$"):
        cache_video_tokens(VideoEncoder(), loader, torch.device("cpu"), torch.no_grad, low_resource=True)


class Echo(nn.Module):
    def forward(self, x, encoder_hidden_states=None):
        return x


def test_qa_values_are_named_in_the_order_computed():
    model = SimpleNamespace(text_encoder=Echo(), text_decoder=Echo())
    with nonfinite_values(model) as found:
        model.text_encoder(torch.ones(2), encoder_hidden_states=torch.ones(2))
        model.text_decoder(torch.ones(2))
        assert found == []
        model.text_encoder(torch.tensor([NAN]), encoder_hidden_states=torch.tensor([INF]))
        model.text_decoder(torch.tensor([NAN]))
    assert found == ["video features", "question states", "answer decoder outputs"]
    model.text_decoder(torch.tensor([NAN]))  # the hooks are gone after the block
    assert len(found) == 3


def test_no_metrics_are_written_from_a_non_finite_test(tmp_path):
    def broken_test(model):
        raise NonFiniteError("non-finite video tokens in evaluation batch 0 (first at video 0)")
    with pytest.raises(NonFiniteError, match=r"\(first at video 0\) while testing; no metrics written to evaluate\.txt$"):
        report_test(SimpleNamespace(output_dir=tmp_path), None, broken_test, "evaluate.txt", {})
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_testing_writes_no_metrics(tmp_path):
    def interrupted_test(model):
        raise KeyboardInterrupt
    with pytest.raises(Interrupted, match=r"^interrupted while testing; no metrics written to evaluate\.txt$"):
        report_test(SimpleNamespace(output_dir=tmp_path), None, interrupted_test, "evaluate.txt", {})
    assert list(tmp_path.iterdir()) == []


# ---- the one line -------------------------------------------------------------------------------
@pytest.mark.parametrize("raised, line", [
    (Interrupted("interrupted at epoch 0 step 2 (batch 2/4); no checkpoint written yet"),
     "error: interrupted at epoch 0 step 2 (batch 2/4); no checkpoint written yet\n"),
    (KeyboardInterrupt(), "error: interrupted\n"),
])
def test_ctrl_c_exits_130_with_one_line_from_rank_0_only(raised, line, capsys, monkeypatch):
    def main():
        raise raised
    for rank, expected in (("0", line), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as stopped:
            run_cli(main)
        assert stopped.value.code == INTERRUPTED_EXIT_CODE == 130
        assert capsys.readouterr().err == expected


def test_a_non_finite_value_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")

    def main():
        raise NonFiniteError("loss_ita is NaN at epoch 0 step 2 (batch 2/4); no checkpoint written yet")
    with pytest.raises(SystemExit) as stopped:
        run_cli(main)
    assert stopped.value.code == 1
    assert capsys.readouterr().err == "error: loss_ita is NaN at epoch 0 step 2 (batch 2/4); no checkpoint written yet\n"
