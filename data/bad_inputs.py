"""Counting unreadable inputs across DataLoader worker processes.

Workers are separate processes holding copies of the dataset, so the count lives in a
small temporary folder: each occurrence appends one byte to a counter file (O_APPEND
writes are atomic), and a marker file per bad path, created with O_EXCL, makes the
warning appear once per file across all workers and epochs.
"""
import hashlib
import os
import shutil
import sys
import tempfile
import weakref


def _remove_folder(folder, owner_pid):
    if os.getpid() == owner_pid:  # a worker's copy never removes the owner's folder
        shutil.rmtree(folder, ignore_errors=True)


class BadInputLog:
    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="testa_bad_inputs_")
        self._counter = os.path.join(self.folder, "count")
        open(self._counter, "wb").close()
        weakref.finalize(self, _remove_folder, self.folder, os.getpid())

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
        print(f"[data] unreadable input {path}: {reason}", file=sys.stderr, flush=True)

    def count(self):
        """Occurrences since the last reset, summed over all worker processes."""
        return os.path.getsize(self._counter)

    def reset(self):
        open(self._counter, "wb").close()

    def paths(self):
        """Every distinct bad file seen so far (not cleared by reset)."""
        markers = [os.path.join(self.folder, name) for name in os.listdir(self.folder) if name != "count"]
        return sorted(open(marker).read() for marker in markers)
