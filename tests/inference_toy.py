"""A toy corpus and randomly initialised toy checkpoints of every family, for the inference tests."""
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import video_tool
from configs.load import load_config
from data.toy import write_corpus
from models import create_model
from tests.helpers import REPO_ROOT

# A 2-block toy model (two testa_r entries per block), decoding in the test process.
SMALL = ["depth=2", "testa_r=[1, 2, 1, 2]", "num_workers=0"]
FAMILIES = {"retrieval": "retrieval.yaml", "qa": "qa.yaml", "pretrain": "pretrain.yaml"}


@dataclass
class ToySetup:
    corpus: Path
    videos: Path
    configs: dict  # family -> config path
    overrides: list  # config overrides every family needs
    checkpoints: dict  # family -> checkpoint path; "retrieval_other": another random retrieval model


def save_checkpoint(model, path: Path) -> Path:
    """The file layout training/checkpoints.py writes (its 'model' entry is what loading reads)."""
    torch.save({"model": model.state_dict(), "epoch": 0, "global_step": 0}, path)
    return path


def make_toy_setup(folder: Path, num_clips: int = 8) -> ToySetup:
    corpus = folder / "corpus"
    write_corpus(corpus, num_clips=num_clips, frames=16, size=64, seed=0, num_images=1)
    overrides = SMALL + [f"video_root={corpus / 'videos'}", f"ann_root={corpus / 'ann'}",
                         "med_config=configs/toy/bert_toy.json"]  # as written in configs: relative to the repo
    configs, checkpoints = {}, {}
    for seed, (family, name) in enumerate(FAMILIES.items()):
        configs[family] = REPO_ROOT / "configs" / "toy" / name
        torch.manual_seed(seed)
        model = create_model(load_config(configs[family], overrides), family)
        checkpoints[family] = save_checkpoint(model, folder / f"{family}.pth")
        if family == "retrieval":
            torch.manual_seed(100)
            other = create_model(load_config(configs[family], overrides), family)
            checkpoints["retrieval_other"] = save_checkpoint(other, folder / "retrieval_other.pth")
    return ToySetup(corpus, corpus / "videos", configs, overrides, checkpoints)


# ----------------------------------------------------------------------------- running video_tool.py
def model_args(toy: ToySetup, family: str = "retrieval") -> list[str]:
    """video_tool.py's options for the toy model of `family`, in fp32."""
    return ["--config", str(toy.configs[family]), "--checkpoint", str(toy.checkpoints[family]), "--precision",
            "fp32", "--options", *toy.overrides]


def run(argv, capsys) -> str:
    """video_tool.py with `argv`; what it printed to stdout."""
    video_tool.main([str(arg) for arg in argv])
    return capsys.readouterr().out


def fail(argv, capsys) -> str:
    """video_tool.py with `argv`, which must stop with one `error:` line and status 1; that line."""
    with pytest.raises(SystemExit) as stopped:
        video_tool.main([str(arg) for arg in argv])
    assert stopped.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    return error
