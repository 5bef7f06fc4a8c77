"""Small builders shared by the model tests."""
from pathlib import Path

import torch
from ruamel.yaml import YAML

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"


def read_yaml(path) -> dict:
    return dict(YAML(typ="safe").load(Path(path).read_text()))


def fixture_config(name: str) -> dict:
    """A fixture yaml (``retrieval``, ``retrieval_nomerge``, ``vqa``, ``pretrain``) with its
    BERT config and vocabulary resolved against ``tests/fixtures``."""
    config = read_yaml(FIXTURES / f"{name}.yaml")
    bert = "bert_config_compact.json" if name.startswith("pretrain") else "med_config_compact.json"
    config["med_config"] = str(FIXTURES / bert)
    config["tokenizer"] = str(FIXTURES / config.get("tokenizer", "vocab.txt"))
    return config


def load_exact(model, path: Path):
    """Load an original-format checkpoint with strict key matching (the key-name contract)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(state, strict=True)
    return model.eval()
