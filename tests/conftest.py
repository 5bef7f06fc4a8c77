"""Shared test fixtures.

Parity tests compare against tensors computed by the original implementation. They are
shipped in ``tests/fixtures/`` (its README says what every file is), so they always run.
"""
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def load_reference(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def qa(fixtures_dir):
    """The QA fixture model (read-only use) and its reference outputs."""
    from models import create_model
    from tests.helpers import fixture_config, load_exact
    model = load_exact(create_model(fixture_config("vqa"), "qa"), fixtures_dir / "vqa.pth")
    return model, load_reference(fixtures_dir / "vqa_ref.pt")


@pytest.fixture(scope="module")
def pretrain(fixtures_dir):
    """The pre-training fixture model (read-only use) and its reference outputs."""
    from models import create_model
    from tests.helpers import fixture_config, load_exact
    model = load_exact(create_model(fixture_config("pretrain"), "pretrain"), fixtures_dir / "pretrain.pth")
    return model, load_reference(fixtures_dir / "pretrain_ref.pt")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """12 toy clips and 2 images (a few steps per epoch): the multi-process runs' corpus."""
    from data.toy import write_corpus
    root = tmp_path_factory.mktemp("toy")
    write_corpus(root, num_clips=12, frames=8, size=64, seed=0, num_images=2)
    return root
