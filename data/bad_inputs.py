"""Counting unreadable inputs across DataLoader worker processes.

Workers are separate processes holding copies of the dataset, so the count lives in a
small temporary folder: each occurrence appends one byte to a counter file (O_APPEND
writes are atomic), and a marker file per bad path, created with O_EXCL, makes the
warning appear once per file across all workers and epochs.

The folder is named testa_bad_inputs_<owner pid>_*. The owner removes it when the log is
garbage-collected, at interpreter exit (normal end, exception, sys.exit) and on SIGTERM;
a SIGKILLed owner leaves it behind, and the next BadInputLog removes folders whose owner
pid is no longer running.
"""
import glob
import hashlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import weakref

from utils import process_is_running

PREFIX = "testa_bad_inputs_"
_owned = {}  # folder -> owner pid, for the SIGTERM handler


def _remove_folder(folder, owner_pid):
    if os.getpid() == owner_pid:  # a worker's copy never removes the owner's folder
        shutil.rmtree(folder, ignore_errors=True)
        _owned.pop(folder, None)


def remove_stale_folders(root=None):
    """Remove the folders of owners that are no longer running (killed before they could clean up)."""
    for folder in glob.glob(os.path.join(root or tempfile.gettempdir(), PREFIX + "*")):
        pid = os.path.basename(folder)[len(PREFIX):].split("_")[0]
        if pid.isdigit() and not process_is_running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _on_sigterm(signum, frame):
    """Remove this process's folders, then die of SIGTERM as if no handler were installed
    (launchers such as torchrun read the signal from the exit status)."""
    for folder, owner_pid in list(_owned.items()):
        _remove_folder(folder, owner_pid)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _handle_sigterm():
    """Install _on_sigterm unless the program already handles SIGTERM itself (then its handler
    decides how to exit, and atexit removes the folder when it exits normally)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


class BadInputLog:
    """Occurrences of one kind of bad input: `line` (with {path} and {reason}) is printed once per
    file; count() and paths() read what every worker recorded."""

    def __init__(self, line="[data] unreadable input {path}: {reason}"):
        self.line = line
        remove_stale_folders()
        self.folder = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}_")
        self._counter = os.path.join(self.folder, "count")
        open(self._counter, "wb").close()
        _owned[self.folder] = os.getpid()
        weakref.finalize(self, _remove_folder, self.folder, os.getpid())  # also runs at exit
        _handle_sigterm()

    def record(self, path, reason):
        fd = os.open(self._counter, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
        marker = os.path.join(self.folder, hashlib.sha1(str(path).encode()).hexdigest())
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        try:
            os.write(fd, str(path).encode())
        finally:
            os.close(fd)
        # Not print(): the distributed set-up silences it on every rank but 0, and each rank
        # reads its own files.
        sys.stderr.write(self.line.format(path=path, reason=reason) + "\n")
        sys.stderr.flush()

    def count(self):
        """Occurrences since the last reset, summed over all worker processes."""
        return os.path.getsize(self._counter)

    def reset(self):
        open(self._counter, "wb").close()

    def paths(self):
        """Every distinct bad file seen so far (not cleared by reset)."""
        markers = [os.path.join(self.folder, name) for name in os.listdir(self.folder) if name != "count"]
        return sorted(open(marker).read() for marker in markers)
