"""Small builders shared by the model tests."""
from pathlib import Path

import torch
from ruamel.yaml import YAML

REPO_ROOT = Path(__file__).resolve().parents[1]


def read_yaml(path) -> dict:
    return dict(YAML(typ="safe").load(Path(path).read_text()))


def tiny_config(tiny_dir: Path, name: str) -> dict:
    """A fixture yaml with its tiny BERT config (the fixtures' ``med_config``)."""
    config = read_yaml(tiny_dir / f"{name}.yaml")
    bert = "bert_config_tiny.json" if name.startswith("pretrain") else "med_config_tiny.json"
    config["med_config"] = str(tiny_dir / bert)
    return config


def load_exact(model, path: Path):
    """Load an original-format checkpoint with strict key matching (the key-name contract)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(state, strict=True)
    return model.eval()
