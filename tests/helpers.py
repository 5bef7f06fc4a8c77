"""Small builders shared by the tests and the GPU check scripts."""
import json
import sys
from pathlib import Path

import torch
from ruamel.yaml import YAML

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
E2E = FIXTURES / "e2e"
TRAIN_E2E = FIXTURES / "train_e2e"
E2E_FORMATS = ["didemo", "activitynet", "queryd", "condensedmovies"]
# The original's metric names -> this project's: txt_* rank texts for a video, vid_* videos for a text.
E2E_METRIC_NAMES = {f"{old}_{m}": f"{new}_{m}" for old, new in (("txt", "video2txt"), ("vid", "txt2video"))
                    for m in ("r1", "r5", "r10", "r_mean")} | {"r_mean": "r_mean"}


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


def fixture_paths(path: Path) -> dict:
    """An end-to-end fixture yaml's relative paths, made absolute (they are relative to its folder)."""
    config = read_yaml(path)
    return {key: str((path.parent / config[key]).resolve())
            for key in ("video_root", "ann_root", "pretrained", "tokenizer", "med_config") if key in config}


def e2e_paths(fmt: str) -> dict:
    return fixture_paths(E2E / f"{fmt}.yaml")


def train_e2e_config(name: str) -> dict:
    """A tests/fixtures/train_e2e yaml with its paths made absolute."""
    path = TRAIN_E2E / f"{name}.yaml"
    return {**read_yaml(path), **fixture_paths(path)}


def e2e_evaluate_command(fmt: str, output_dir, *options) -> list[str]:
    """train_video_retrieval.py --evaluate on an end-to-end fixture format (run from REPO_ROOT)."""
    overrides = [f"{key}={value}" for key, value in e2e_paths(fmt).items()]
    return [sys.executable, "train_video_retrieval.py", "--config", str(E2E / f"{fmt}.yaml"),
            "--output_dir", str(output_dir), "--evaluate", "--num_workers", "0", *options, *overrides]


def without(record: dict, *keys: str) -> dict:
    return {key: value for key, value in record.items() if key not in keys}


def log_records(out) -> list[dict]:
    """output_dir/log.txt's lines without what the first line of each run (a resumed one too)
    adds: its settings and provenance (training.cli.Run.record)."""
    return [without(json.loads(line), "settings", "provenance") for line in (out / "log.txt").read_text().splitlines()]


def training_outcome(out):
    """What a finished training run leaves: log.txt (log_records), the last weights, and the
    test metrics (without the tested checkpoint's path and the provenance: its git state may
    change while tests run)."""
    weights = torch.load(out / "checkpoint_last.pth", map_location="cpu", weights_only=True)["model"]
    result = json.loads((out / "test_results.txt").read_text().splitlines()[-1])
    return log_records(out), weights, without(result, "checkpoint", "provenance")
