"""Failure injection, a testing aid and not for users: a process ends abruptly, as a crash or a
kill would (os._exit: no clean-up, no atexit, no lock released), right after an optimiser step
and the mid-epoch checkpoint of that step when one is due.

TESTA_STOP_AFTER_STEP=N  every process stops after global optimiser step N
                         (tests/test_reliability_training.py).
TESTA_FAIL_AT_STEP=R:N   only rank R stops after step N, and only in torchrun's first attempt
                         (TORCHELASTIC_RESTART_COUNT 0 or unset), so that a run under
                         `torchrun --max-restarts` fails once and recovers (tests/test_restarts.py).
TESTA_INTERRUPT_AFTER_STEP=N  the process sends itself SIGINT after step N, as Ctrl-C would
                         (tests/bad_inputs/interrupts.py): at a known step, however busy the machine.
TESTA_INTERRUPT_AFTER_BATCH=N  `video_tool.py index` sends itself and its decoding workers SIGINT
                         after encoding batch N, as Ctrl-C in a terminal would (tests/bad_inputs/interrupts.py).
TESTA_STOP_INDEX_AFTER_PART=R:N  rank R of a multi-process `video_tool.py index` stops after writing
                         its Nth part, as a killed process would (tests/test_index_multiprocess.py).

Unset, they cost one integer comparison per optimiser step (or batch).
"""
import multiprocessing
import os
import signal
import sys

from runtime.distributed import get_rank
from runtime.errors import UserError


def exit_step() -> int:
    """The global optimiser step after which this process exits; 0: never."""
    stop_after = int(os.environ.get("TESTA_STOP_AFTER_STEP") or 0)
    if stop_after:
        return stop_after
    fail_at = os.environ.get("TESTA_FAIL_AT_STEP")
    if not fail_at or int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) > 0:
        return 0
    rank, _, step = fail_at.partition(":")
    if not (rank.isdigit() and step.isdigit()):
        raise UserError(f"TESTA_FAIL_AT_STEP={fail_at}: expected RANK:STEP, e.g. 1:3")
    return int(step) if int(rank) == get_rank() else 0


def interrupt_step() -> int:
    """The global optimiser step after which this process interrupts itself; 0: never."""
    return int(os.environ.get("TESTA_INTERRUPT_AFTER_STEP") or 0)


def interrupt_self() -> None:
    """SIGINT to this process: Python raises KeyboardInterrupt at once, as for Ctrl-C in a terminal's
    foreground, also where the process was started in the background (`cmd &` in a script), which
    starts it with SIGINT ignored."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    os.kill(os.getpid(), signal.SIGINT)


def interrupt_batch() -> int:
    """The batch of videos after which an index run interrupts itself; 0: never."""
    return int(os.environ.get("TESTA_INTERRUPT_AFTER_BATCH") or 0)


def interrupt_with_workers() -> None:
    """SIGINT to this process's children (DataLoader workers) and then to itself, as Ctrl-C sends it
    to every process of the terminal's group (not to the group itself: under a test runner that
    would interrupt the runner too)."""
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGINT)
    interrupt_self()


def index_stop_part() -> int:
    """The number of parts after which this rank of a multi-process index run stops; 0: never."""
    setting = os.environ.get("TESTA_STOP_INDEX_AFTER_PART")
    if not setting:
        return 0
    rank, _, parts = setting.partition(":")
    if not (rank.isdigit() and parts.isdigit()):
        raise UserError(f"TESTA_STOP_INDEX_AFTER_PART={setting}: expected RANK:PARTS, e.g. 1:1")
    return int(parts) if int(rank) == get_rank() else 0


def stop_index_rank(parts: int) -> None:
    """End this rank as a kill would: its finished parts stay, the others are never written."""
    sys.stdout.write(f"failure injection (rank {get_rank()}): stopping after index part {parts}\n")
    sys.stdout.flush()
    os._exit(137)


def exit_abruptly(step: int) -> None:
    # Not print(): the distributed set-up silences print() on every rank but 0.
    sys.stdout.write(f"failure injection (rank {get_rank()}): stopping after optimiser step {step}\n")
    sys.stdout.flush()
    os._exit(137)
