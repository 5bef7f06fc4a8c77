"""Every setting that changes results is in the run's record: mixed_precision_method,
accumulation_steps and max_grad_norm are config keys (their flags override them), and
config.yaml, checkpoints, log.txt and the results files say them with the run's provenance
(runtime/provenance.py: software versions, processes, device, git commit)."""
import ast
import json
import shutil
import subprocess
import sys

import pytest
import torch
from ruamel.yaml import YAML
from torch import nn

from configs.keys import ConfigError
from configs.load import load_config, save_config
from runtime import provenance as provenance_module
from runtime.errors import run_cli
from runtime.precision import make_precision
from runtime.provenance import git_state, provenance
from tests.helpers import REPO_ROOT
from training.checkpoints import Checkpointer, resume_differences, training_settings
from training.cli import build_arg_parser, setup_run
from training.fit import fit, report_test

TOY = REPO_ROOT / "configs" / "toy"
# What a tiny in-process run needs: the optimiser's and the lr schedule's keys.
TINY = "init_lr: 0.1\nmin_lr: 0.0\nweight_decay: 0.0\nnum_workers: 0\n"


def write(tmp_path, text: str, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def set_up(tmp_path, config_text: str, *flags, out: str = "out"):
    config = write(tmp_path, config_text, f"{out}.yaml")
    args = build_arg_parser("test").parse_args(["--config", str(config), "--output_dir", str(tmp_path / out),
                                                "--device", "cpu", *flags])
    return setup_run(args)


def commented_provenance(config_yaml) -> dict:
    """The provenance config.yaml holds in its comment lines."""
    lines = [line[2:] for line in config_yaml.read_text().splitlines() if line.startswith("# ")]
    return YAML(typ="safe").load("\n".join(lines))["provenance"]


# ---- the keys, and their flags --------------------------------------------------------------------------------
def test_the_keys_are_read_from_the_config(tmp_path):
    run = set_up(tmp_path, TINY + "mixed_precision_method: bf16\naccumulation_steps: 3\nmax_grad_norm: 0.5\n")
    assert (run.config["mixed_precision_method"], run.config["accumulation_steps"], run.config["max_grad_norm"]) \
        == ("bf16", 3, 0.5)
    assert run.precision.method == "bf16" and run.precision.dtype is torch.bfloat16
    assert run.training_flags == {"accumulation_steps": 3, "max_grad_norm": 0.5}


def test_flags_override_the_config_keys(tmp_path):
    run = set_up(tmp_path, TINY + "mixed_precision_method: bf16\naccumulation_steps: 3\nmax_grad_norm: 0.5\n",
                 "--mixed_precision_method", "none", "--accumulation_steps", "2", "--max_grad_norm", "4")
    assert (run.config["mixed_precision_method"], run.config["accumulation_steps"], run.config["max_grad_norm"]) \
        == ("none", 2, 4.0)
    assert run.precision.dtype is None and run.training_flags == {"accumulation_steps": 2, "max_grad_norm": 4.0}


def test_unset_keys_and_flags_resolve_to_the_defaults(tmp_path):
    run = set_up(tmp_path, TINY)
    assert {name: run.config[name] for name in ("mixed_precision_method", "accumulation_steps", "max_grad_norm")} \
        == {"mixed_precision_method": "none", "accumulation_steps": 1, "max_grad_norm": None}
    assert run.precision.dtype is None


@pytest.mark.parametrize("text, expected", [
    ("accumulation_steps: 0\n", r"config key 'accumulation_steps' in .*\.yaml must be >= 1, got 0"),
    ("mixed_precision_method: fp8\n",
     r"config key 'mixed_precision_method' in .*\.yaml must be one of 'apex', 'fp16', 'bf16', 'none', got 'fp8'"),
    ("max_grad_norm: -1\n", r"config key 'max_grad_norm' in .*\.yaml must be > 0, got -1"),
    ("max_grad_norm: 0\n", r"config key 'max_grad_norm' in .*\.yaml must be > 0, got 0"),
    ("accumulation_steps: 1.5\n", r"config key 'accumulation_steps' in .*\.yaml must be int, got 1.5")])
def test_a_bad_value_is_one_line_naming_the_key(tmp_path, capsys, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: load_config(path))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1 and err.startswith("error: config key ")


def test_a_flag_value_is_checked_like_the_files(tmp_path):
    # argparse takes any float; the key's rule refuses it, naming the override the flag became.
    with pytest.raises(ConfigError, match=r"^config key 'max_grad_norm' in override 'max_grad_norm=-1.0' "
                                          r"must be > 0, got -1.0$"):
        set_up(tmp_path, TINY, "--max_grad_norm", "-1")
    assert not (tmp_path / "out" / "config.yaml").exists()


@pytest.mark.parametrize("name", ["retrieval", "qa", "pretrain"])
def test_every_task_reads_the_keys(name, capsys):
    load_config(TOY / f"{name}.yaml", ["mixed_precision_method=bf16", "accumulation_steps=2", "max_grad_norm=1.0"])
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")] == []


def test_a_resume_compares_the_keys_as_training_settings():
    """As the arithmetic they run, and for a checkpoint from before they were keys (its config
    has none of them) by the training settings it recorded."""
    recorded = {"world_size": 1, "precision": "fp32", "accumulation_steps": 2, "max_grad_norm": 1.0}
    old = {"config": {"init_lr": 0.1}, "training_settings": recorded}
    now = {"init_lr": 0.1, "mixed_precision_method": "none", "accumulation_steps": 2, "max_grad_norm": 1.0}
    assert resume_differences(old, now, recorded) == {}
    fp16_state = {"config": {**now, "mixed_precision_method": "fp16"}, "training_settings": recorded}
    assert resume_differences(fp16_state, {**now, "mixed_precision_method": "apex"}, recorded) == {}
    bf16 = training_settings(make_precision("bf16", "cpu"), {"accumulation_steps": 3, "max_grad_norm": 1.0})
    assert resume_differences(old, {**now, "mixed_precision_method": "bf16", "accumulation_steps": 3}, bf16) == {
        "precision": ("fp32", "bfloat16"), "accumulation_steps": (2, 3)}


# ---- provenance --------------------------------------------------------------------------------------------------
def test_provenance_says_versions_processes_device_and_commit():
    record = provenance(4, "cpu")
    assert record["world_size"] == 4 and record["device"].startswith("cpu")
    assert record["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert torch.__version__.startswith(record["versions"]["torch"]) and "numpy" in record["versions"]
    json.dumps(record)  # plain data
    if (REPO_ROOT / ".git").exists() and shutil.which("git"):
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert record["git"]["commit"] == head.stdout.strip()
        assert isinstance(record["git"]["uncommitted_changes"], bool)


def test_provenance_outside_a_git_checkout_has_no_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance_module, "REPO_ROOT", tmp_path)
    assert provenance(1)["git"] is None
    monkeypatch.setattr(provenance_module, "REPO_ROOT", REPO_ROOT)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git installed
    assert provenance(1)["git"] is None


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_commit_and_uncommitted_changes_of_a_checkout(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)
    git("init", "-q")
    assert git_state(tmp_path) is None  # no commit yet
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "first")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True)
    (tmp_path / "outputs.txt").write_text("untracked: runs write into the checkout\n")
    assert git_state(tmp_path) == {"commit": head.stdout.strip(), "uncommitted_changes": False}
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path)["uncommitted_changes"] is True
    (tmp_path / "sub").mkdir()
    assert git_state(tmp_path / "sub") is None  # a folder inside a checkout is not one


def test_provenance_imports_no_video_reader_and_runtime_imports_no_project_package():
    code = ("import sys; from runtime.provenance import provenance; provenance(1); "
            "print([name for name in ('decord', 'av', 'torchcodec', 'torchvision') if name in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]
    tree = ast.parse((REPO_ROOT / "runtime" / "provenance.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"configs", "data", "models", "training", "evaluation", "inference"}


# ---- the record: config.yaml, checkpoints, results ---------------------------------------------------------------
def test_config_yaml_holds_the_resolved_keys_and_the_provenance(tmp_path):
    run = set_up(tmp_path, TINY, "--accumulation_steps", "2")
    written = tmp_path / "out" / "config.yaml"
    assert load_config(written) == run.config
    assert (run.config["accumulation_steps"], run.config["mixed_precision_method"]) == (2, "none")
    assert "max_grad_norm" in load_config(written) and run.config["max_grad_norm"] is None  # written, unset
    assert commented_provenance(written) == run.provenance and run.provenance["world_size"] == 1


def test_save_config_round_trips_with_the_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance_module, "REPO_ROOT", tmp_path)  # outside a git checkout
    config = {"init_lr": 1e-5, "testa_r": [1, 12], "mixed_precision_method": "bf16", "max_grad_norm": None}
    record = provenance(1, "cpu")
    path = save_config(config, tmp_path, record)
    assert load_config(path) == config
    assert commented_provenance(path) == record and record["git"] is None


def test_a_checkpoint_records_the_provenance(tmp_path):
    model = nn.Linear(2, 2)
    record = {"versions": {"python": "3"}, "world_size": 1, "device": "cpu", "git": None}
    given = Checkpointer(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), make_precision("none", "cpu"),
                         {"accumulation_steps": 2}, {"accumulation_steps": 2, "max_grad_norm": None}, record)
    state = torch.load(given.save("given.pth", 0), weights_only=True)
    assert state["provenance"] == record and state["config"] == {"accumulation_steps": 2}
    assert state["training_settings"] == {"world_size": 1, "precision": "fp32", "accumulation_steps": 2,
                                          "max_grad_norm": None}
    found = Checkpointer(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), make_precision("none", "cpu"),
                         {})
    state = torch.load(found.save("found.pth", 0), weights_only=True)
    assert state["provenance"]["world_size"] == 1 and state["provenance"]["device"].startswith("cpu")
    assert state["provenance"]["versions"]["torch"]


def _losses(model, batch, context):
    return {"loss": model(batch).pow(2).mean()}


def test_a_tiny_run_records_the_settings_and_provenance_everywhere(tmp_path):
    """fit with accumulation and clipping set in the config: they act (2 optimiser steps of 4
    batches, a gradient norm logged) and log.txt, checkpoint_last.pth and test_results.txt say them."""
    run = set_up(tmp_path, TINY + "accumulation_steps: 2\nmax_grad_norm: 0.5\nmax_epoch: 2\n")
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    batches = [torch.randn(2, 3) for _ in range(4)]
    fit(run, model, batches, _losses, "cosine", test=lambda m: {"mse": 1.0}, protocol={"frames": 8})
    out = run.output_dir
    expected_settings = {"mixed_precision_method": "none", "accumulation_steps": 2, "max_grad_norm": 0.5,
                         "precision": "fp32"}

    first, second = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert first["epoch"] == 0 and first["settings"] == expected_settings and first["provenance"] == run.provenance
    assert "train_grad_norm" in first  # clipping was on
    assert second["epoch"] == 1 and "settings" not in second and "provenance" not in second  # once per run

    state = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert state["global_step"] == 4  # 2 epochs of 4 batches, 2 per optimiser step
    assert state["provenance"] == run.provenance
    assert (state["training_settings"]["accumulation_steps"], state["training_settings"]["max_grad_norm"]) == (2, 0.5)
    assert (state["config"]["accumulation_steps"], state["config"]["max_grad_norm"]) == (2, 0.5)

    result = json.loads((out / "test_results.txt").read_text().splitlines()[-1])
    assert result["split"] == "test" and result["mse"] == 1.0 and result["frames"] == 8
    assert result["settings"] == expected_settings and result["provenance"] == run.provenance


def test_an_evaluation_records_the_settings_and_provenance(tmp_path):
    run = set_up(tmp_path, TINY, "--mixed_precision_method", "bf16", "--evaluate", "--allow_random_weights")
    report_test(run, nn.Linear(2, 2), lambda m: {"r_mean": 50.0}, "evaluate.txt", {"checkpoint": None})
    result = json.loads((run.output_dir / "evaluate.txt").read_text())
    assert result["r_mean"] == 50.0 and result["checkpoint"] is None
    assert result["settings"] == {"mixed_precision_method": "bf16", "accumulation_steps": 1, "max_grad_norm": None,
                                  "precision": "bfloat16"}
    assert result["provenance"] == run.provenance and result["provenance"]["versions"]["torch"]
