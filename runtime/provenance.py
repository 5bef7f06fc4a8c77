"""Where a run's numbers come from, as plain data: the software versions, the number of
processes, the device kind and the git commit of the code (with whether its tracked files
differ from that commit). config.yaml, checkpoints and results files record it."""
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# Installed distributions whose version is recorded when present (the video readers are optional).
DISTRIBUTIONS = ("torch", "torchvision", "numpy", "decord", "av", "torchcodec")


def provenance(world_size: int, device=None) -> dict:
    """{'versions': {...}, 'world_size': N, 'device': '...', 'git': {'commit', 'uncommitted_changes'} or None}."""
    return {"versions": software_versions(), "world_size": world_size, "device": device_kind(device),
            "git": git_state()}


def software_versions() -> dict:
    """Python's version and each installed distribution's, read from its metadata (nothing is imported)."""
    versions = {"python": platform.python_version()}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def device_kind(device=None) -> str:
    """'cuda (NVIDIA H100 80GB HBM3)', 'cpu (x86_64)', ...; the device type alone where its name is unknown."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.machine() or 'unknown'})"
    return device.type


def _git(*args: str, root: Path) -> str | None:
    """git's output in `root`, or None where git is missing, fails or hangs."""
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20,
                              check=False, env=_git_environment())
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _git_environment() -> dict:
    # `git status` takes no index.lock: another process may be using the checkout.
    return {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}


def git_state(root=None) -> dict | None:
    """{'commit': sha, 'uncommitted_changes': bool} of the checkout the code runs from (`root`,
    default this repository's folder), or None when it is not the top of a git checkout (an
    installed copy, an exported tree) or git is not installed. Untracked files do not count as
    changes: runs may write their outputs inside the checkout."""
    root = Path(root if root is not None else REPO_ROOT).resolve()
    top = _git("rev-parse", "--show-toplevel", root=root)
    if top is None or Path(top).resolve() != root:  # not a checkout, or a folder inside another one
        return None
    commit = _git("rev-parse", "--verify", "HEAD", root=root)
    if commit is None:  # a repository without commits
        return None
    status = _git("status", "--porcelain", "--untracked-files=no", root=root)
    return {"commit": commit, "uncommitted_changes": None if status is None else bool(status)}
