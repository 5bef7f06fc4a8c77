"""One run per output folder: output_dir/.lock names the run (host, pid) that owns the folder.

Two runs writing the same checkpoint_last.pth and log.txt would silently corrupt each other's
resume, so a second run stops with one line naming the first. The lock is created with
O_CREAT | O_EXCL (atomic, also on NFS v3+), removed when the process exits (any exit that
runs Python's atexit: normal end, user error, exception), and left behind by a kill; a lock
whose process is gone on this host is taken over with one printed line. A lock from another
host cannot be checked from here: the message says to delete it if that run is gone.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

from runtime.errors import UserError
from utils import process_is_running

LOCK_NAME = ".lock"


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read(path: Path) -> dict:
    """The lock's owner; {} for a lock being written or damaged (treated as held)."""
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _try_create(path: Path, owner: dict) -> bool:
    """Create the lock holding `owner` if no lock exists; False if one does."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(owner))
    return True


def release_run_lock(path: Path) -> None:
    """Remove the lock if this process holds it (a takeover by another run is left alone)."""
    held = _read(path)
    if held.get("host") == socket.gethostname() and held.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def acquire_run_lock(output_dir, what: str = "output folder", flag: str = "--output_dir") -> Path:
    """Take output_dir/.lock for this process (removed at exit), or raise UserError naming its
    owner; `what` and `flag` name the folder and the option that chose it in that message."""
    path = Path(output_dir) / LOCK_NAME
    owner = _owner()
    for _ in range(2):  # a second try after removing a stale lock
        if _try_create(path, owner):
            atexit.register(release_run_lock, path)
            return path
        held = _read(path)
        pid = held.get("pid")
        if held.get("host") == owner["host"] and isinstance(pid, int) and not process_is_running(pid):
            print(f"{output_dir}: the run that held {path.name} (host {held['host']}, pid {held['pid']}) "
                  "is gone; taking the folder over", flush=True)
            # Not guarded: two runs taking over the same stale lock within the same
            # moment could both succeed (the second removing the first's new lock).
            path.unlink(missing_ok=True)
            continue
        break
    who = f"host {held.get('host', '?')}, pid {held.get('pid', '?')}, started {held.get('started', '?')}"
    raise UserError(f"{what} {output_dir} is in use by another run ({who}); wait for it to end "
                    f"or choose another {flag} (if that run is gone, delete {path})")
