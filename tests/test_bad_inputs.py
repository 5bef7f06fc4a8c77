"""Bad inputs, table-driven: every case of tests/bad_inputs runs a real entry script or tool and
must end with the stated exit code and one `error:` line (or go on with one `warning:` line),
never with a traceback. docs/reliability.md lists the classes and what each prints."""
import os
import re
import subprocess
import sys

import pytest
import torch

from data.toy import write_corpus
from tests.bad_inputs import Workspace, all_cases
from tests.helpers import REPO_ROOT

CASES = all_cases()


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """A toy corpus and toy-sized checkpoints of the three model families."""
    from configs.load import load_config
    from models import create_model
    root = tmp_path_factory.mktemp("bad_inputs")
    corpus = root / "corpus"
    write_corpus(corpus, num_clips=16, frames=8, size=64, seed=0, num_images=2)
    checkpoints = {}
    for family in ("retrieval", "qa", "pretrain"):
        config = load_config(REPO_ROOT / "configs" / "toy" / f"{family}.yaml", ["depth=2"])
        torch.manual_seed(0)
        checkpoints[family] = root / f"{family}.pth"
        torch.save({"model": create_model(config, family).state_dict()}, checkpoints[family])
    return corpus, checkpoints


def run(argv, timeout, extra_env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **(extra_env or {})}
    return subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("module, case", CASES, ids=[f"{module}-{case.name}" for module, case in CASES])
def test_bad_input(module, case, shared, tmp_path):
    workspace = Workspace(*shared, tmp_path)
    if case.setup is not None:
        case.setup(workspace)
    result = run(case.command(workspace), case.timeout, case.env)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-4000:]
    assert result.returncode == case.exit_code, f"exit {result.returncode}:\n{output[-4000:]}"
    lines = [line for line in output.splitlines() if line.startswith(f"{case.stream}:")]
    if case.stream == "error":
        assert len(lines) == 1, output[-4000:]
    assert any(re.search(case.expect, line) for line in lines), f"no {case.stream} line matches {case.expect!r}:\n" \
                                                                 + "\n".join(lines or [output[-3000:]])


def test_the_table_covers_every_class_with_forty_cases_in_all():
    modules = {module for module, _ in CASES}
    assert modules == set(__import__("tests.bad_inputs", fromlist=["CLASS_MODULES"]).CLASS_MODULES)
    assert len(CASES) >= 40
    assert len({f"{module}-{case.name}" for module, case in CASES}) == len(CASES)
