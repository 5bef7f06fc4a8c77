"""Shared test fixtures.

Parity tests compare against tensors computed by the original implementation.
They live outside the repo (see ../shared/README.md): ``TESTA_REFERENCE_DIR``
points at them, defaulting to ``../shared/fixtures`` beside the checkout. A
user's clone without them skips those tests; CI sets ``TESTA_REQUIRE_REFERENCE=1``
so a missing folder fails instead of silently skipping parity.
"""
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _reference_dir() -> Path:
    env = os.environ.get("TESTA_REFERENCE_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    path = _reference_dir()
    if not (path / "tiny").is_dir():
        if os.environ.get("TESTA_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"reference fixtures not found at {path} (TESTA_REQUIRE_REFERENCE=1)")
        pytest.skip(f"reference fixtures not found at {path}; set TESTA_REFERENCE_DIR")
    return path


@pytest.fixture(scope="session")
def tiny_dir(reference_dir) -> Path:
    return reference_dir / "tiny"


def load_reference(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
