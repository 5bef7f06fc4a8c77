"""Ctrl-C with DataLoader worker processes: the main process alone handles it.

A terminal sends SIGINT to every process of its foreground group, the loader's workers as well
as the main process. A worker interrupted while it decodes prints tracebacks of its own (an
`Exception ignored in: <function VideoReader.__del__>` of decord's reader, cut short), beside
the one line the main process prints. So the workers ignore SIGINT (`ignore_interrupts`, their
first step) and the main process, unwinding from its KeyboardInterrupt, ends them. Workers are
started with SIGINT held back (`interrupts_held`), so that none is interrupted before it has
set itself to ignore it; the main process gets a Ctrl-C of that moment as soon as they run.

A main process interrupted while it takes a batch's tensors from a worker (their file
descriptors, through multiprocessing's resource sharer) hangs up on the worker's sharing
thread, which then prints a `ConnectionResetError` traceback; that one is dropped as well: the
main process reports why it hung up.
"""
from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading

_CAN_BLOCK = hasattr(signal, "pthread_sigmask")  # POSIX
RETRY_S = 0.01  # a Ctrl-C that came during a destructor is raised again this much later


def ignore_interrupts() -> None:
    """In a worker process: SIGINT is ignored from now on (one held back while it started is dropped),
    and the resource sharer's traceback when the main process hangs up on it is not printed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _CAN_BLOCK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    previous = sys.excepthook

    def hook(kind, error, traceback):
        if not (issubclass(kind, (ConnectionError, EOFError)) and _in_resource_sharer(traceback)):
            previous(kind, error, traceback)

    sys.excepthook = hook  # multiprocessing.resource_sharer reports its thread's errors through it


def _in_resource_sharer(traceback) -> bool:
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "resource_sharer.py")):
            return True
        traceback = traceback.tb_next
    return False


@contextlib.contextmanager
def interrupts_held():
    """SIGINT blocked in this thread (held back, not lost) while the block runs: processes started
    in it inherit the block until they ignore SIGINT; a Ctrl-C meanwhile is raised when it ends."""
    if not _CAN_BLOCK or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _interrupt_outside_destructors(signum, frame):
    """SIGINT's handler: KeyboardInterrupt, as Python's own, but not inside a `__del__`, where it
    would be printed as `Exception ignored in ...` and dropped: there it is asked for again a
    moment later (from a thread, so that this handler does not run again at once, inside itself)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            timer = threading.Timer(RETRY_S, _thread.interrupt_main, (signum,))
            timer.daemon = True
            timer.start()
            return
        frame = frame.f_back
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_not_swallowed():
    """A Ctrl-C that lands in a destructor (decord's VideoReader.__del__ in a process that decodes
    itself) is raised once the destructor returns, not printed as `Exception ignored in ...` and
    lost. Only where Python's own handler is in place (the main thread, SIGINT not ignored)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, _interrupt_outside_destructors)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
