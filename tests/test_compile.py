"""--compile: two-process (DDP) toy retrieval fine-tuning with the visual encoder compiled gives
the eager run's losses and writes a checkpoint with the eager key names.

The runs use TESTA_COMPILE_BACKEND=aot_eager: the same Dynamo graphs and AOTAutograd backward
as inductor without its C++ code generation, which alone takes ~45 s for the toy encoder on a
2-vCPU machine."""
import json
import math

import pytest
import torch

from runtime.errors import UserError
from tests.launching import environment, run_together, torchrun_nodes
from training.compile import compile_visual_encoder


def fine_tune(small_corpus, out, *flags) -> str:
    script = ["train_video_retrieval.py", "--config", "configs/toy/retrieval.yaml", "--output_dir", str(out),
              "--device", "cpu", "--num_workers", "0", *flags, f"video_root={small_corpus}/videos",
              f"ann_root={small_corpus}/ann", "depth=2", "max_epoch=1", "batch_size_train=2", "batch_size_test=8"]
    [command] = torchrun_nodes(script, nnodes=1, nproc_per_node=2)
    return run_together([command], [environment(TESTA_COMPILE_BACKEND="aot_eager")])[0]


def training_losses(out) -> dict:
    record = json.loads((out / "log.txt").read_text().splitlines()[0])
    return {name: loss for name, loss in record.items() if name.startswith("train_loss")}


@pytest.mark.slow
def test_compiled_run_has_the_eager_losses_and_checkpoint_keys(small_corpus, tmp_path):
    output = fine_tune(small_corpus, tmp_path / "compiled", "--compile")
    assert "the visual encoder is compiled by torch.compile (backend aot_eager)" in output
    fine_tune(small_corpus, tmp_path / "eager")
    compiled, eager = training_losses(tmp_path / "compiled"), training_losses(tmp_path / "eager")
    assert compiled.keys() == eager.keys() and compiled
    for name, loss in eager.items():
        assert math.isclose(compiled[name], loss, rel_tol=1e-4), name
    keys = [list(torch.load(tmp_path / run / "checkpoint_last.pth", weights_only=True)["model"])
            for run in ("compiled", "eager")]
    assert keys[0] == keys[1]
    assert not [key for key in keys[0] if "_orig_mod" in key]


def test_compile_without_a_cpu_compiler_fails_in_one_line(monkeypatch):
    monkeypatch.delenv("TESTA_COMPILE_BACKEND", raising=False)
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    model = torch.nn.Module()
    model.visual_encoder = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler, and no-such-c\\+\\+-compiler was not found"):
        compile_visual_encoder(model, torch.device("cpu"))
